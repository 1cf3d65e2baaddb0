//! Host-driven sessions: an instance created with the `external:` endpoint
//! has its connection in the host's own process (Baileys in Node, say). The
//! engine decides; the host carries out and reports.
//!
//! When the engine opens a connection for such an instance, [`Hub`] turns it
//! into effects for the host — `open` for generation g, then `send_logout`,
//! `close {status}`, `ping`, and `abort` when the engine drops the
//! connection. The host reports what its connection does as a
//! [`HostSignal`] tagged with the generation it was given; the engine's
//! rules decide (a stale generation is ignored, R12).
//!
//! One implementation, three hosts: a Rust host gives the engine a
//! [`Routed`] transport and listens on the hub ([`Hub::listen`]); `lifecycle
//! serve` publishes effects on `GET /v1/effects` (SSE) and takes signals on
//! `POST /v1/instances/{name}/signals`; the Node package calls a JavaScript
//! callback per effect and takes signals from JavaScript. Each passes every
//! signal through [`Hub::reported`] before the engine's `signal`.
//!
//! ```
//! use std::sync::Arc;
//! use instance_lifecycle::transport::{Hub, ReferenceProtocol, Routed, WsLimits, WsTransport};
//! let hub = Hub::new();
//! hub.listen(Box::new(|effect| println!("do {:?} for {}", effect.action, effect.instance)));
//! let ws = WsTransport::new(Arc::new(ReferenceProtocol), WsLimits::default());
//! let transport = Arc::new(Routed::new(ws, hub.clone())); // EngineConfig::transport
//! ```

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::{broadcast, mpsc};

use super::{BoxFuture, ConnectSpec, Control, Endpoint, Signals, Transport, WsTransport};
use crate::machine::{CloseInitiator, Generation, Identity, Input, InstanceName, Reason, StatusCode};

/// Effects kept for subscribers that fall behind ([`Hub::subscribe`]): a slower one is told it lagged.
const EFFECTS_BUFFER: usize = 1024;

/// What the host must do for one of its connections.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "serve", derive(utoipa::ToSchema))]
pub struct HostEffect {
    /// Increasing over the service's life: the SSE id.
    pub id: u64,
    /// The instance.
    #[cfg_attr(feature = "serve", schema(value_type = String))]
    pub instance: InstanceName,
    /// The connection it concerns: every signal about it carries this.
    pub generation: u64,
    /// What to do.
    #[serde(flatten)]
    pub action: HostAction,
}

/// What to do.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "serve", derive(utoipa::ToSchema))]
#[serde(tag = "effect", rename_all = "snake_case")]
pub enum HostAction {
    /// Open a new connection for this generation (resuming this identity, if any)
    /// and report `opened` (or `closed`, if it fails).
    Open {
        /// The identity to resume.
        resume: Option<String>,
    },
    /// Send the protocol's logout; report `logout_confirmed` or `logout_failed`.
    SendLogout,
    /// Close the connection with this status; report `closed`.
    Close {
        /// The status.
        status: u16,
    },
    /// Ping the peer; report `pong` when it answers.
    Ping,
    /// Drop the connection at once, without a goodbye: the engine has given it up.
    Abort,
}

/// A signal as a host reports it.
#[derive(Clone, Debug, Deserialize)]
#[cfg_attr(feature = "serve", derive(utoipa::ToSchema))]
#[serde(tag = "signal", rename_all = "snake_case", deny_unknown_fields)]
pub enum HostSignal {
    /// The session is usable; `identity` is who it is (R6: without one it does not open).
    Opened {
        /// The connection.
        generation: u64,
        /// The peer's identity (a WhatsApp JID, say).
        identity: Option<String>,
    },
    /// The peer issued a pairing code (a QR code).
    Pairing {
        /// The connection.
        generation: u64,
        /// The code, kept for `qrcode.updated` webhooks (not recorded in the log).
        code: Option<String>,
    },
    /// The connection ended.
    Closed {
        /// The connection.
        generation: u64,
        /// The close status (Baileys' `statusCode`, or a WebSocket close code); absent when lost.
        status: Option<u16>,
        /// Why, in words.
        #[serde(default)]
        reason: String,
        /// Who ended it: `peer` (the default), `local` (the host, as asked) or `transport` (lost).
        #[serde(default)]
        initiator: Initiator,
    },
    /// A write failed (R7).
    WriteFailed {
        /// The connection.
        generation: u64,
        /// The error.
        #[serde(default)]
        error: String,
    },
    /// The host's own heartbeat found the connection dead (R7).
    HeartbeatMissed {
        /// The connection.
        generation: u64,
    },
    /// The peer answered a ping.
    Pong {
        /// The connection.
        generation: u64,
    },
    /// The logout was sent and confirmed.
    LogoutConfirmed {
        /// The connection.
        generation: u64,
    },
    /// The logout could not be sent.
    LogoutFailed {
        /// The connection.
        generation: u64,
        /// The error.
        #[serde(default)]
        error: String,
    },
    /// The host finished closing the connection as asked.
    CloseFinished {
        /// The connection.
        generation: u64,
    },
    /// The peer asked for a new connection that resumes the session
    /// (Discord's op 7, say): the engine closes this one with 1012 and opens
    /// the next at once, resuming (R13).
    ReconnectRequested {
        /// The connection.
        generation: u64,
    },
    /// The peer said the session is invalid and cannot be resumed (Discord's
    /// op 9 with `d: false`): the next connection, after `retry_after_ms`,
    /// starts a new session (R14).
    SessionInvalid {
        /// The connection.
        generation: u64,
        /// How long to wait before the next attempt, in milliseconds (at most an hour).
        #[serde(default, deserialize_with = "host_wait")]
        retry_after_ms: u64,
    },
    /// The peer acknowledged a heartbeat and set when the next is due (a
    /// protocol whose heartbeats are application frames): counts as a pong,
    /// and the next `ping` effect comes after `after_ms` (R7).
    HeartbeatDue {
        /// The connection.
        generation: u64,
        /// When the next heartbeat is due, in milliseconds from now (at most an hour).
        #[serde(deserialize_with = "host_wait")]
        after_ms: u64,
    },
    /// The host took a step of the handshake after waiting for a fleet-wide
    /// permit (its own IDENTIFY queue, say), or is still waiting for one: the
    /// connect deadline counts from now (R15). Report it at least twice per
    /// connect time-out while the wait lasts.
    HandshakeStep {
        /// The connection.
        generation: u64,
    },
}

/// The longest wait a host's signal may ask for (`retry_after_ms`,
/// `after_ms`), in milliseconds: an hour. A longer one is refused as a bad
/// body, not obeyed: no protocol asks for it, and an instance told to wait
/// a century would look alive and never connect.
pub const HOST_WAIT_MAX_MS: u64 = 3_600_000;

fn host_wait<'de, D: serde::Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    let ms = u64::deserialize(d)?;
    if ms > HOST_WAIT_MAX_MS {
        return Err(serde::de::Error::custom(format!("a wait of {ms} ms: at most {HOST_WAIT_MAX_MS} (an hour)")));
    }
    Ok(ms)
}

/// Who ended a connection.
#[derive(Clone, Copy, Debug, Default, Deserialize)]
#[cfg_attr(feature = "serve", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum Initiator {
    /// The peer (a close frame, Baileys' `connection: close` with a status).
    #[default]
    Peer,
    /// The host, as the engine asked.
    Local,
    /// Nobody: the connection was lost.
    Transport,
}

impl HostSignal {
    /// The engine's input for it; an identity that is not valid is
    /// reported as none (the rules then refuse to open: R6).
    pub fn input(&self) -> Input {
        match self {
            Self::Opened { generation, identity } => Input::TransportOpened {
                generation: Generation(*generation),
                identity: identity.as_deref().and_then(|i| Identity::new(i).ok()),
            },
            Self::Pairing { generation, .. } => Input::PairingCode { generation: Generation(*generation) },
            Self::Closed { generation, status, reason, initiator } => Input::TransportClosed {
                generation: Generation(*generation),
                initiator: match initiator {
                    Initiator::Peer => CloseInitiator::Peer,
                    Initiator::Local => CloseInitiator::Local,
                    Initiator::Transport => CloseInitiator::Transport,
                },
                status: status.map(StatusCode),
                reason: Reason::new(reason.as_str()),
            },
            Self::WriteFailed { generation, error } => {
                Input::WriteFailed { generation: Generation(*generation), error: Reason::new(error.as_str()) }
            }
            Self::HeartbeatMissed { generation } => Input::HeartbeatMissed { generation: Generation(*generation) },
            Self::Pong { generation } => Input::Pong { generation: Generation(*generation) },
            Self::LogoutConfirmed { generation } => Input::LogoutConfirmed { generation: Generation(*generation) },
            Self::LogoutFailed { generation, error } => {
                Input::LogoutFailed { generation: Generation(*generation), error: Reason::new(error.as_str()) }
            }
            Self::CloseFinished { generation } => Input::CloseFinished { generation: Generation(*generation) },
            Self::ReconnectRequested { generation } => {
                Input::ReconnectRequested { generation: Generation(*generation) }
            }
            Self::SessionInvalid { generation, retry_after_ms } => Input::SessionInvalid {
                generation: Generation(*generation),
                retry_after: Duration::from_millis(*retry_after_ms),
            },
            Self::HandshakeStep { generation } => Input::HandshakeStep { generation: Generation(*generation) },
            Self::HeartbeatDue { generation, after_ms } => {
                Input::HeartbeatDue { generation: Generation(*generation), after: Duration::from_millis(*after_ms) }
            }
        }
    }
}

/// Called with every effect, in the order emitted, in the task that emits
/// it: it must not block (hand the effect on: a channel, a JavaScript
/// threadsafe function).
pub type EffectListener = Box<dyn Fn(&HostEffect) + Send + Sync>;

/// The host's side of every external connection: where effects come out.
pub struct Hub {
    effects: broadcast::Sender<HostEffect>,
    state: Mutex<HubState>,
    /// Who hears every effect, in order, without loss (unlike a subscriber, which may lag).
    listeners: Mutex<Vec<EffectListener>>,
}

#[derive(Default)]
struct HubState {
    next_id: u64,
    /// The connections the engine holds open through the host, and whether
    /// the host has reported their end (then no `abort` is owed for them).
    live: HashMap<(InstanceName, Generation), bool>,
}

impl Hub {
    /// A hub with no listener and no subscriber yet.
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            effects: broadcast::channel(EFFECTS_BUFFER).0,
            state: Mutex::default(),
            listeners: Mutex::default(),
        })
    }

    /// Calls `listener` with every effect from now on, in order, none
    /// missed: for a host that carries effects out (and must see each one).
    pub fn listen(&self, listener: EffectListener) {
        self.listeners.lock().unwrap_or_else(std::sync::PoisonError::into_inner).push(listener);
    }

    /// Every effect from now on, for watchers that may fall behind: one that
    /// does is told how many it missed (`RecvError::Lagged`), after the
    /// newest [`EFFECTS_BUFFER`] are kept.
    pub fn subscribe(&self) -> broadcast::Receiver<HostEffect> {
        self.effects.subscribe()
    }

    /// Call with every signal a host reports, before the engine's `signal`:
    /// once the host has reported a connection's end, no `abort` is owed for it.
    pub fn reported(&self, instance: &InstanceName, input: &Input) {
        if input.ends_connection()
            && let Some(generation) = input.generation()
            && let Some(ended) = self.lock().live.get_mut(&(instance.clone(), generation))
        {
            *ended = true;
        }
    }

    fn lock(&self) -> MutexGuard<'_, HubState> {
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn emit(&self, instance: &InstanceName, generation: Generation, action: HostAction) {
        let id = {
            let mut s = self.lock();
            s.next_id += 1;
            s.next_id
        };
        tracing::debug!(instance = %instance, %generation, ?action, "effect for the host");
        let effect = HostEffect { id, instance: instance.clone(), generation: generation.0, action };
        for listener in self.listeners.lock().unwrap_or_else(std::sync::PoisonError::into_inner).iter() {
            listener(&effect);
        }
        let _ = self.effects.send(effect);
    }

    /// Runs one external connection: tells the host to open it, passes the
    /// engine's controls on, and says `abort` if the engine drops it before
    /// the host reported its end.
    async fn run(self: Arc<Self>, spec: ConnectSpec, mut control: mpsc::Receiver<Control>) {
        struct Guard {
            hub: Arc<Hub>,
            instance: InstanceName,
            generation: Generation,
        }
        impl Drop for Guard {
            fn drop(&mut self) {
                let key = (self.instance.clone(), self.generation);
                let ended = self.hub.lock().live.remove(&key);
                if ended != Some(true) {
                    self.hub.emit(&self.instance, self.generation, HostAction::Abort);
                }
            }
        }
        let (instance, generation) = (spec.instance.clone(), spec.generation);
        let resume = spec.resume.as_ref().map(|i| i.as_str().to_owned());
        self.lock().live.insert((instance.clone(), generation), false);
        self.emit(&instance, generation, HostAction::Open { resume });
        let _guard = Guard { hub: self.clone(), instance: instance.clone(), generation };
        while let Some(ctl) = control.recv().await {
            let action = match ctl {
                Control::SendLogout => HostAction::SendLogout,
                Control::Close { status } => HostAction::Close { status: status.0 },
                Control::Ping => HostAction::Ping,
            };
            self.emit(&instance, generation, action);
        }
    }
}

/// A transport for hosts that hold some connections themselves: WebSocket
/// endpoints through the engine's own transport, `external:` endpoints
/// through the hub.
pub struct Routed {
    ws: WsTransport,
    hub: Arc<Hub>,
}

impl Routed {
    /// Routes `external:` instances to `hub`, the others to `ws`.
    pub fn new(ws: WsTransport, hub: Arc<Hub>) -> Self {
        Self { ws, hub }
    }
}

impl Transport for Routed {
    fn run(&self, spec: ConnectSpec, control: mpsc::Receiver<Control>, signals: Signals) -> BoxFuture {
        match spec.endpoint {
            Endpoint::External => Box::pin(self.hub.clone().run(spec, control)),
            Endpoint::Ws(_) => self.ws.run(spec, control, signals),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transport::{ReferenceProtocol, WsLimits};

    fn spec(instance: &InstanceName, generation: u64) -> ConnectSpec {
        ConnectSpec {
            instance: instance.clone(),
            generation: Generation(generation),
            endpoint: Endpoint::External,
            resume: Identity::new("1234@s.whatsapp.net").ok(),
            connect_timeout: std::time::Duration::from_secs(1),
            outbound: crate::transport::Outbound::none(),
        }
    }

    /// A listener hears every effect of a connection in order: open with the
    /// identity to resume, the engine's controls, and `abort` when the engine
    /// drops a connection whose end the host never reported — but none for
    /// one it did report.
    #[tokio::test]
    async fn a_listener_hears_every_effect_in_order_and_abort_only_when_owed() {
        let hub = Hub::new();
        let heard = Arc::new(Mutex::new(Vec::new()));
        let into = heard.clone();
        hub.listen(Box::new(move |e| into.lock().expect("lock").push((e.id, e.generation, e.action.clone()))));
        let routed = Routed::new(WsTransport::new(Arc::new(ReferenceProtocol), WsLimits::default()), hub.clone());
        let name = InstanceName::new("acme").expect("name");
        let (signals_tx, _signals_rx) = mpsc::channel(8);

        // Generation 1: pinged, then dropped by the engine without a reported end.
        let (control, rx) = mpsc::channel(8);
        let run = tokio::spawn(routed.run(spec(&name, 1), rx, Signals::new(Generation(1), signals_tx.clone())));
        control.send(Control::Ping).await.expect("ping");
        control.send(Control::Close { status: StatusCode(1000) }).await.expect("close");
        drop(control);
        run.await.expect("run");

        // Generation 2: the host reports its close first; the drop owes nothing.
        let (control, rx) = mpsc::channel(8);
        let run = tokio::spawn(routed.run(spec(&name, 2), rx, Signals::new(Generation(2), signals_tx)));
        tokio::task::yield_now().await;
        let closed = HostSignal::Closed {
            generation: 2,
            status: Some(428),
            reason: "connection closed".into(),
            initiator: Initiator::Peer,
        };
        // Until the hub has the connection, a report finds nothing to mark: wait for its open.
        while heard.lock().expect("lock").len() < 5 {
            tokio::task::yield_now().await;
        }
        hub.reported(&name, &closed.input());
        drop(control);
        run.await.expect("run");

        let heard = heard.lock().expect("lock").clone();
        let resume = Some("1234@s.whatsapp.net".to_owned());
        assert_eq!(
            heard.iter().map(|(_, g, a)| (*g, a.clone())).collect::<Vec<_>>(),
            vec![
                (1, HostAction::Open { resume: resume.clone() }),
                (1, HostAction::Ping),
                (1, HostAction::Close { status: 1000 }),
                (1, HostAction::Abort),
                (2, HostAction::Open { resume }),
            ]
        );
        assert!(heard.windows(2).all(|w| w[0].0 < w[1].0), "ids increase: {heard:?}");
    }

    /// A stale generation's report marks nothing: the live connection is still owed its abort.
    #[tokio::test]
    async fn a_report_for_another_generation_leaves_the_abort_owed() {
        let hub = Hub::new();
        let aborts = Arc::new(Mutex::new(0));
        let into = aborts.clone();
        hub.listen(Box::new(move |e| {
            if e.action == HostAction::Abort {
                *into.lock().expect("lock") += 1;
            }
        }));
        let routed = Routed::new(WsTransport::new(Arc::new(ReferenceProtocol), WsLimits::default()), hub.clone());
        let name = InstanceName::new("acme").expect("name");
        let (signals_tx, _signals_rx) = mpsc::channel(8);
        let (control, rx) = mpsc::channel(8);
        let run = tokio::spawn(routed.run(spec(&name, 3), rx, Signals::new(Generation(3), signals_tx)));
        control.send(Control::Ping).await.expect("ping");
        let stale =
            HostSignal::Closed { generation: 2, status: None, reason: String::new(), initiator: Initiator::Transport };
        hub.reported(&name, &stale.input());
        drop(control);
        run.await.expect("run");
        assert_eq!(*aborts.lock().expect("lock"), 1);
    }
}
