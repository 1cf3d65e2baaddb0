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

use serde::{Deserialize, Serialize};

use crate::machine::{Identity, InstanceName, StatusCode};

/// A message from the peer, as the engine understands it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PeerMessage {
    /// The peer issued a pairing code.
    Pairing,
    /// The session is usable; `identity` is `None` when the peer sent none or an invalid one (R6).
    Ready {
        /// The identity, if valid.
        identity: Option<Identity>,
    },
    /// The peer confirmed a logout.
    LoggedOut,
    /// The host's own traffic: handed to the host as it came (never logged).
    Application,
    /// A message the protocol itself drops (traced, not handed on).
    Unknown {
        /// Its type (bounded).
        kind: String,
    },
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
}

/// What the engine needs from a wire protocol.
pub trait Protocol: Send + Sync + 'static {
    /// The first frame of a connection, if the protocol has one.
    fn hello(&self, instance: &InstanceName, resume: Option<&Identity>) -> Option<String>;
    /// Parses a text frame from the peer.
    fn parse(&self, text: &str) -> Result<PeerMessage, ProtocolError>;
    /// Parses a binary frame from the peer: by default a protocol error
    /// (the reference protocol's frames are text).
    fn parse_binary(&self, bytes: &[u8]) -> Result<PeerMessage, ProtocolError> {
        Err(ProtocolError::Binary { len: bytes.len() })
    }
    /// The frame that asks the peer to log out.
    fn logout(&self) -> String;
    /// The status a close code from the peer means.
    fn status_of(&self, close_code: u16) -> StatusCode;
    /// The close code the engine sends for a status.
    fn close_code_of(&self, status: StatusCode) -> u16;
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
struct Frame<'a> {
    #[serde(rename = "type", borrow)]
    kind: std::borrow::Cow<'a, str>,
    id: Option<serde_json::Value>,
}

impl Protocol for ReferenceProtocol {
    fn hello(&self, instance: &InstanceName, resume: Option<&Identity>) -> Option<String> {
        let hello = Hello { kind: "hello", instance: instance.as_str(), resume: resume.map(Identity::as_str) };
        serde_json::to_string(&hello).ok()
    }

    fn parse(&self, text: &str) -> Result<PeerMessage, ProtocolError> {
        let frame: Frame<'_> =
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

    fn logout(&self) -> String {
        r#"{"type":"logout"}"#.to_owned()
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
        assert_eq!(p.parse_binary(&[1, 2]), Err(ProtocolError::Binary { len: 2 }));
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
