//! The protocol seam: what the engine needs from a product's wire protocol,
//! and the reference protocol any WebSocket server can speak.
//!
//! The reference protocol, exactly:
//! - Text frames, each one JSON object with a `"type"` field. Heartbeats are
//!   WebSocket ping/pong, nothing else.
//! - Peer → engine: `{"type":"pairing","code":"…"}` (a pairing code, zero or
//!   more times); `{"type":"ready","id":"…"}` (the session is usable; `id` is
//!   the peer identity — without a non-empty `id` the instance does not open, R6).
//! - Engine → peer, first frame of every connection:
//!   `{"type":"hello","instance":"<name>","resume":<identity or null>}`.
//! - Engine → peer: `{"type":"logout"}`; the peer answers
//!   `{"type":"logged_out"}` and closes with 1000.
//! - Close codes 4000–4999 mean status code − 4000 (4401 → 401, 4515 → 515);
//!   any other close code is its own status; a connection that ends without a
//!   close frame has no status ("connection lost").
//! - Any other `type` is the host's own traffic (an application frame): it
//!   reaches the host whole (`Engine::frames`), in order, and is never logged.
//!   The host sends its own frames with `Engine::send` while the instance is `Open`.
//! - A frame that is not a JSON object with a string `type`, or a binary
//!   frame, is a protocol error: the engine closes with 1002 and the policy
//!   decides on status 1002. An oversized message is closed with 1009.

use std::borrow::Cow;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use super::pacing::Pacer;
use super::traffic::Frame;
use crate::machine::{Identity, InstanceName, StatusCode, WsUrl};

/// A message from the peer, as the engine understands it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PeerMessage {
    /// The peer issued a pairing code.
    Pairing,
    /// The session is usable; `identity` is `None` when the peer sent none or an invalid one (R6).
    /// For a protocol that resumes, the identity is also what it resumes with.
    Ready {
        /// The identity, if valid.
        identity: Option<Identity>,
    },
    /// The peer confirmed a logout.
    LoggedOut,
    /// The host's own traffic: handed to the host as it came (never logged).
    Application,
    /// The peer acknowledged a heartbeat: a pong (R7). When the protocol
    /// sets its own schedule ([`ProtocolSession::next_beat`]), the engine
    /// reports it with the time to the next beat.
    HeartbeatAck,
    /// The peer asks for a new connection that resumes the session (R13).
    ReconnectRequested,
    /// The peer says the session is invalid and cannot be resumed (R14):
    /// connect anew after `retry_after`.
    SessionInvalid {
        /// The protocol's wait before the next attempt.
        retry_after: Duration,
    },
    /// A frame the protocol handled itself (a greeting, a heartbeat the peer
    /// asked for): nothing for the lifecycle or the host.
    Handled,
    /// A message the protocol itself drops (traced, not handed on).
    Unknown {
        /// Its type (bounded).
        kind: String,
    },
}

/// What a frame from the peer meant, and whether the host gets it too.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reading {
    /// What it means for the lifecycle.
    pub message: PeerMessage,
    /// Hand the frame to the host as well (`Engine::frames`): Discord's
    /// READY and RESUMED are both the session opening and events a bot needs.
    /// Always true for [`PeerMessage::Application`].
    pub to_host: bool,
}

impl From<PeerMessage> for Reading {
    fn from(message: PeerMessage) -> Self {
        let to_host = matches!(message, PeerMessage::Application);
        Self { message, to_host }
    }
}

/// A frame a protocol session wants written.
#[derive(Clone, Debug)]
pub enum Write {
    /// Write it now.
    Now(Frame),
    /// Write it once `pacer` grants a permit for `key` (a fleet-wide limit
    /// such as Discord's IDENTIFY concurrency); the connection waits, still
    /// bounded by the core's connect timer.
    Paced {
        /// The shared limit.
        pacer: Arc<Pacer>,
        /// The bucket (Discord: `shard_id % max_concurrency`).
        key: u64,
        /// The frame.
        frame: Frame,
    },
}

/// What a heartbeat is on this protocol (the core decides when: R7).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Beat {
    /// A WebSocket ping; its pong is the acknowledgement.
    Ping,
    /// An application frame (Discord's op 1); the protocol reads the
    /// acknowledgement ([`PeerMessage::HeartbeatAck`]).
    Frame(Frame),
}

/// How this protocol logs out.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Logout {
    /// Send this frame; the peer confirms ([`PeerMessage::LoggedOut`]).
    Frame(Frame),
    /// Close the socket with this status: the close itself ends the session
    /// (Discord: 1000), so the logout is confirmed once the close is written.
    Close(StatusCode),
}

/// One connection's protocol state, driven by the transport: sans-IO, it
/// reads frames and says what they mean and what to write.
pub trait ProtocolSession: Send {
    /// Frames to write as soon as the socket is open (a greeting).
    fn greet(&mut self, now: Instant, out: &mut Vec<Write>);
    /// Reads a text frame from the peer; frames to answer with go to `out`.
    fn read_text(&mut self, text: &str, now: Instant, out: &mut Vec<Write>) -> Result<Reading, ProtocolError>;
    /// Reads a binary frame: by default a protocol error (text protocols).
    fn read_binary(&mut self, bytes: &[u8], now: Instant, out: &mut Vec<Write>) -> Result<Reading, ProtocolError> {
        let _ = (now, out);
        Err(ProtocolError::Binary { len: bytes.len() })
    }
    /// The heartbeat to send now (the core's timer fired).
    fn heartbeat(&mut self, now: Instant) -> Beat {
        let _ = now;
        Beat::Ping
    }
    /// When the next heartbeat is due, for a protocol whose peer sets the
    /// schedule: asked once the session opens and at each acknowledgement.
    /// `None` (the default): the policy's interval.
    fn next_beat(&mut self, now: Instant) -> Option<Duration> {
        let _ = now;
        None
    }
    /// How to log out.
    fn logout(&mut self) -> Logout;
}

/// What the engine needs from a wire protocol: a session per connection,
/// and the mapping between close codes and statuses.
pub trait Protocol: Send + Sync + 'static {
    /// The session of one new connection of `instance`, resuming `resume` if any.
    fn open(&self, instance: &InstanceName, resume: Option<&Identity>) -> Box<dyn ProtocolSession>;
    /// Where to connect: the instance's configured URL unless the protocol's
    /// resume data names another (Discord's `resume_gateway_url`).
    fn url<'a>(&self, configured: &'a WsUrl, resume: Option<&Identity>) -> Cow<'a, WsUrl> {
        let _ = resume;
        Cow::Borrowed(configured)
    }
    /// The status a close code from the peer means.
    fn status_of(&self, close_code: u16) -> StatusCode;
    /// The close code the engine sends for a status.
    fn close_code_of(&self, status: StatusCode) -> u16;
}

/// A frame that breaks the protocol.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ProtocolError {
    /// Not a JSON object with a string `type`.
    #[error("frame is not a JSON object with a string \"type\": {reason}")]
    Malformed {
        /// What the parser said.
        reason: String,
    },
    /// A binary frame, which the protocol does not use.
    #[error("binary frame of {len} bytes (the protocol uses text frames)")]
    Binary {
        /// Its length.
        len: usize,
    },
    /// A frame the protocol understood but that breaks its rules (a Discord
    /// HELLO without a usable interval, a frame before HELLO).
    #[error("{what}")]
    Violation {
        /// What was wrong.
        what: String,
    },
}

/// The reference protocol documented in the README.
#[derive(Clone, Copy, Debug, Default)]
pub struct ReferenceProtocol;

#[derive(Serialize)]
struct Hello<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    instance: &'a str,
    resume: Option<&'a str>,
}

/// What the reference protocol reads of a frame: its type (borrowed when it
/// has no escapes: no allocation for the host's frames) and a `ready`'s id.
#[derive(Deserialize)]
struct RefFrame<'a> {
    #[serde(rename = "type", borrow)]
    kind: Cow<'a, str>,
    id: Option<serde_json::Value>,
}

impl ReferenceProtocol {
    /// The first frame of a connection.
    pub fn hello(&self, instance: &InstanceName, resume: Option<&Identity>) -> Option<String> {
        let hello = Hello { kind: "hello", instance: instance.as_str(), resume: resume.map(Identity::as_str) };
        serde_json::to_string(&hello).ok()
    }

    /// Parses a text frame from the peer.
    pub fn parse(&self, text: &str) -> Result<PeerMessage, ProtocolError> {
        let frame: RefFrame<'_> =
            serde_json::from_str(text).map_err(|e| ProtocolError::Malformed { reason: e.to_string() })?;
        Ok(match &*frame.kind {
            "pairing" => PeerMessage::Pairing,
            "ready" => PeerMessage::Ready {
                identity: match frame.id {
                    Some(serde_json::Value::String(id)) => Identity::new(id).ok(),
                    _ => None,
                },
            },
            "logged_out" => PeerMessage::LoggedOut,
            _ => PeerMessage::Application,
        })
    }

    /// The frame that asks the peer to log out.
    pub fn logout_frame(&self) -> String {
        r#"{"type":"logout"}"#.to_owned()
    }
}

/// A reference-protocol connection: a hello, then frames read one by one.
struct ReferenceSession {
    hello: Option<String>,
}

impl ProtocolSession for ReferenceSession {
    fn greet(&mut self, _now: Instant, out: &mut Vec<Write>) {
        if let Some(hello) = self.hello.take() {
            out.push(Write::Now(Frame::Text(hello)));
        }
    }

    fn read_text(&mut self, text: &str, _now: Instant, _out: &mut Vec<Write>) -> Result<Reading, ProtocolError> {
        ReferenceProtocol.parse(text).map(Reading::from)
    }

    fn logout(&mut self) -> Logout {
        Logout::Frame(Frame::Text(ReferenceProtocol.logout_frame()))
    }
}

impl Protocol for ReferenceProtocol {
    fn open(&self, instance: &InstanceName, resume: Option<&Identity>) -> Box<dyn ProtocolSession> {
        Box::new(ReferenceSession { hello: self.hello(instance, resume) })
    }

    fn status_of(&self, close_code: u16) -> StatusCode {
        if (4000..=4999).contains(&close_code) { StatusCode(close_code - 4000) } else { StatusCode(close_code) }
    }

    fn close_code_of(&self, status: StatusCode) -> u16 {
        if status.0 < 1000 { status.0 + 4000 } else { status.0 }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reference_protocol_frames() {
        let p = ReferenceProtocol;
        let name = InstanceName::new("acme").expect("valid");
        assert_eq!(p.hello(&name, None).as_deref(), Some(r#"{"type":"hello","instance":"acme","resume":null}"#));
        let id = Identity::new("5511@s").expect("valid");
        assert_eq!(
            p.hello(&name, Some(&id)).as_deref(),
            Some(r#"{"type":"hello","instance":"acme","resume":"5511@s"}"#)
        );
        assert_eq!(
            p.parse(r#"{"type":"ready","id":"x"}"#),
            Ok(PeerMessage::Ready { identity: Identity::new("x").ok() })
        );
        assert_eq!(p.parse(r#"{"type":"ready","id":""}"#), Ok(PeerMessage::Ready { identity: None }));
        assert_eq!(p.parse(r#"{"type":"ready","id":7}"#), Ok(PeerMessage::Ready { identity: None }));
        assert_eq!(p.parse(r#"{"type":"ready"}"#), Ok(PeerMessage::Ready { identity: None }));
        assert_eq!(p.parse(r#"{"type":"pairing","code":"2@abc"}"#), Ok(PeerMessage::Pairing));
        assert_eq!(p.parse(r#"{"type":"logged_out"}"#), Ok(PeerMessage::LoggedOut));
        assert_eq!(p.parse(r#"{"type":"presence","who":"x"}"#), Ok(PeerMessage::Application));
        let mut session = p.open(&name, None);
        let (now, mut out) = (Instant::now(), Vec::new());
        assert_eq!(session.read_binary(&[1, 2], now, &mut out), Err(ProtocolError::Binary { len: 2 }));
        assert_eq!(session.heartbeat(now), Beat::Ping);
        assert_eq!(session.next_beat(now), None);
        assert_eq!(session.logout(), Logout::Frame(Frame::Text(r#"{"type":"logout"}"#.into())));
        session.greet(now, &mut out);
        assert!(matches!(&out[..], [Write::Now(Frame::Text(t))] if t.starts_with(r#"{"type":"hello""#)), "{out:?}");
        let app = session.read_text(r#"{"type":"chat"}"#, now, &mut out).expect("app");
        assert_eq!(app, Reading { message: PeerMessage::Application, to_host: true });
        let ready = session.read_text(r#"{"type":"ready","id":"x"}"#, now, &mut out).expect("ready");
        assert!(!ready.to_host);
        for bad in ["", "null", "[]", "{}", r#"{"type":1}"#, "{\"type\":\"ready\"", "\u{0}"] {
            assert!(p.parse(bad).is_err(), "{bad:?}");
        }
        assert_eq!(
            (p.status_of(4401), p.status_of(4515), p.status_of(1000), p.status_of(1011)),
            (StatusCode(401), StatusCode(515), StatusCode(1000), StatusCode(1011))
        );
        assert_eq!((p.close_code_of(StatusCode(408)), p.close_code_of(StatusCode(1000))), (4408, 1000));
    }
}
