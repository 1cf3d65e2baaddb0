//! Host-driven sessions: an instance created with the `external:` endpoint
//! has its connection in the host's own process (Baileys in Node, say). The
//! engine decides; the host carries out and reports.
//!
//! When the engine opens a connection for such an instance, [`Hub`] turns it
//! into effects for the host — `open` for generation g, then `send_logout`,
//! `close {status}`, `ping`, and `abort` when the engine drops the
//! connection — published on `GET /v1/effects` (SSE). The host reports what
//! its connection does with `POST /v1/instances/{name}/signals`, tagged with
//! the generation it was given; the engine's rules decide (a stale
//! generation is ignored, R12) and the answer carries the transition and
//! its effects.
//!
//! In a cluster the host's client may be connected to any host, not the
//! owner: the owner relays each effect over the cluster's NATS
//! (`<namespace>.effects.<instance>`, not stored: effects are live, as on
//! one host), and `/v1/effects` on every host streams them from there.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use serde::{Deserialize, Serialize};
use tokio::sync::{broadcast, mpsc};
use utoipa::ToSchema;

use crate::machine::{CloseInitiator, Generation, Identity, Input, InstanceName, Reason, StatusCode};
use crate::transport::{BoxFuture, ConnectSpec, Control, Endpoint, Signals, Transport, WsTransport};

/// Effects kept for SSE subscribers that fall behind: a slower one is told it lagged.
const EFFECTS_BUFFER: usize = 1024;

/// What the host must do for one of its connections.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct HostEffect {
    /// Increasing over the service's life: the SSE id.
    pub id: u64,
    /// The instance.
    #[schema(value_type = String)]
    pub instance: InstanceName,
    /// The connection it concerns: every signal about it carries this.
    pub generation: u64,
    /// What to do.
    #[serde(flatten)]
    pub action: HostAction,
}

/// What to do.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
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
#[derive(Clone, Debug, Deserialize, ToSchema)]
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
}

/// Who ended a connection.
#[derive(Clone, Copy, Debug, Default, Deserialize, ToSchema)]
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
        }
    }
}

/// Effects queued for the cluster's NATS; past it, the newest are dropped
/// (and a subscriber that lagged reads each instance's state, as on one host).
const RELAY_BUFFER: usize = 4096;

/// The host's side of every external connection.
pub(crate) struct Hub {
    effects: broadcast::Sender<HostEffect>,
    state: Mutex<HubState>,
    /// In a cluster: where effects go to be published, in order.
    relay: Mutex<Option<mpsc::Sender<HostEffect>>>,
}

/// The subject an instance's effects are published on in a cluster (`None`: every instance's).
pub(crate) fn effects_subject(namespace: &str, instance: Option<&InstanceName>) -> String {
    match instance {
        Some(name) => format!("{namespace}.effects.{}", crate::cluster::token_of(name)),
        None => format!("{namespace}.effects.>"),
    }
}

#[derive(Default)]
struct HubState {
    next_id: u64,
    /// The connections the engine holds open through the host, and whether
    /// the host has reported their end (then no `abort` is owed for them).
    live: HashMap<(InstanceName, Generation), bool>,
}

impl Hub {
    pub(crate) fn new() -> Arc<Self> {
        Arc::new(Self {
            effects: broadcast::channel(EFFECTS_BUFFER).0,
            state: Mutex::default(),
            relay: Mutex::default(),
        })
    }

    /// Publishes every effect from now on on the cluster's NATS too, in the
    /// order emitted, until the service is dropped.
    pub(crate) fn relay(&self, client: async_nats::Client, namespace: String) {
        let (tx, mut rx) = mpsc::channel::<HostEffect>(RELAY_BUFFER);
        *self.relay.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(tx);
        tokio::spawn(async move {
            while let Some(effect) = rx.recv().await {
                let subject = effects_subject(&namespace, Some(&effect.instance));
                let body = serde_json::to_vec(&effect).unwrap_or_default();
                if let Err(e) = client.publish(subject, body.into()).await {
                    tracing::warn!(instance = %effect.instance, error = %e, "an effect was not relayed to the cluster");
                }
            }
        });
    }

    fn lock(&self) -> MutexGuard<'_, HubState> {
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub(crate) fn subscribe(&self) -> broadcast::Receiver<HostEffect> {
        self.effects.subscribe()
    }

    fn emit(&self, instance: &InstanceName, generation: Generation, action: HostAction) {
        let id = {
            let mut s = self.lock();
            s.next_id += 1;
            s.next_id
        };
        tracing::debug!(instance = %instance, %generation, ?action, "effect for the host");
        let effect = HostEffect { id, instance: instance.clone(), generation: generation.0, action };
        if let Some(relay) = self.relay.lock().unwrap_or_else(std::sync::PoisonError::into_inner).as_ref()
            && relay.try_send(effect.clone()).is_err()
        {
            tracing::warn!(instance = %instance, "the cluster's effect relay is full: an effect was dropped");
        }
        let _ = self.effects.send(effect);
    }

    /// The host reported the end of this connection.
    pub(crate) fn ended(&self, instance: &InstanceName, generation: Generation) {
        if let Some(ended) = self.lock().live.get_mut(&(instance.clone(), generation)) {
            *ended = true;
        }
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

/// The service's transport: WebSocket endpoints through the engine's own
/// transport, `external:` endpoints through the hub.
pub(crate) struct Routed {
    pub(crate) ws: WsTransport,
    pub(crate) hub: Arc<Hub>,
}

impl Transport for Routed {
    fn run(&self, spec: ConnectSpec, control: mpsc::Receiver<Control>, signals: Signals) -> BoxFuture {
        match spec.endpoint {
            Endpoint::External => Box::pin(self.hub.clone().run(spec, control)),
            Endpoint::Ws(_) => self.ws.run(spec, control, signals),
        }
    }
}
