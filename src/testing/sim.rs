//! A simulated transport: no sockets, scripted behaviour per instance, and
//! actions on live connections. It runs under `tokio::time::pause`, so hours
//! of simulated fleet life take seconds, and it is deterministic for a given
//! schedule of commands and actions.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::mpsc;

use crate::machine::{CloseInitiator, Identity, Input, StatusCode};
use crate::transport::{BoxFuture, ConnectSpec, Control, Signals, Transport};

/// How a simulated peer treats a new connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SimBehaviour {
    /// Open after `delay` with an identity; confirm logouts; echo closes.
    Ready {
        /// Handshake latency.
        delay: Duration,
    },
    /// Say ready without an identity (R6).
    NoIdentity,
    /// Fail the connect at once (no status).
    Refuse,
    /// Open, then never answer a logout.
    HangOnLogout,
    /// Issue `codes` pairing codes, one per `every`, and never open.
    Pairing {
        /// How many.
        codes: u32,
        /// Interval.
        every: Duration,
    },
}

/// What to do to a live simulated connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SimAction {
    /// The peer closes with this status.
    Close(Option<StatusCode>),
    /// The connection goes silent: no pong, no answer, no close (half-open);
    /// the core's heartbeat finds it.
    Zombify,
    /// A write fails.
    WriteFails,
}

#[derive(Default)]
struct State {
    behaviours: HashMap<String, SimBehaviour>,
    live: HashMap<String, mpsc::UnboundedSender<SimAction>>,
    connects: HashMap<String, u32>,
}

/// The simulated transport. Cheap to clone; clones share the script.
#[derive(Clone, Default)]
pub struct SimTransport {
    state: Arc<Mutex<State>>,
}

impl SimTransport {
    /// A transport whose peers open after 1 ms.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The behaviour of new connections of `instance`.
    pub fn set(&self, instance: &str, behaviour: SimBehaviour) {
        self.lock().behaviours.insert(instance.to_owned(), behaviour);
    }

    /// Acts on the live connection of `instance`; false when it has none.
    pub fn act(&self, instance: &str, action: SimAction) -> bool {
        self.lock().live.get(instance).is_some_and(|tx| tx.send(action).is_ok())
    }

    /// Connection attempts of `instance` so far.
    pub fn connects(&self, instance: &str) -> u32 {
        self.lock().connects.get(instance).copied().unwrap_or(0)
    }
}

impl Transport for SimTransport {
    fn run(&self, spec: ConnectSpec, mut control: mpsc::Receiver<Control>, signals: Signals) -> BoxFuture {
        let name = spec.instance.to_string();
        let (tx, mut actions) = mpsc::unbounded_channel();
        let behaviour = {
            let mut s = self.lock();
            *s.connects.entry(name.clone()).or_default() += 1;
            s.live.insert(name.clone(), tx);
            s.behaviours.get(&name).cloned().unwrap_or(SimBehaviour::Ready { delay: Duration::from_millis(1) })
        };
        let g = spec.generation;
        Box::pin(async move {
            let identity = spec.resume.clone().or_else(|| Identity::new(format!("sim-{name}")).ok());
            match behaviour {
                SimBehaviour::Refuse => {
                    signals.closed(CloseInitiator::Transport, None, "connection refused").await;
                    return;
                }
                SimBehaviour::Ready { delay } => {
                    tokio::time::sleep(delay).await;
                    signals.opened(identity).await;
                }
                SimBehaviour::HangOnLogout => {
                    signals.opened(identity).await;
                }
                SimBehaviour::NoIdentity => {
                    signals.opened(None).await;
                }
                SimBehaviour::Pairing { codes, every } => {
                    for _ in 0..codes {
                        tokio::time::sleep(every).await;
                        signals.send(Input::PairingCode { generation: g }).await;
                    }
                }
            }
            let hang = behaviour == SimBehaviour::HangOnLogout;
            let mut silent = false;
            loop {
                // Biased: polling order must not depend on tokio's random choice (determinism).
                tokio::select! {
                    biased;
                    ctl = control.recv() => match ctl {
                        None => return,
                        // A half-open connection answers nothing.
                        Some(_) if silent => {}
                        Some(Control::SendLogout) if hang => {}
                        Some(Control::SendLogout) => {
                            signals.send(Input::LogoutConfirmed { generation: g }).await;
                        }
                        Some(Control::Ping) => {
                            signals.pong().await;
                        }
                        Some(Control::Close { status }) => {
                            signals.closed(CloseInitiator::Local, Some(status), "closed by the engine").await;
                            return;
                        }
                    },
                    Some(action) = actions.recv() => match action {
                        SimAction::Close(status) => {
                            let by = if status.is_some() { CloseInitiator::Peer } else { CloseInitiator::Transport };
                            signals.closed(by, status, "closed by the peer").await;
                            return;
                        }
                        SimAction::Zombify => silent = true,
                        SimAction::WriteFails => {
                            signals.write_failed("broken pipe").await;
                            return;
                        }
                    },
                }
            }
        })
    }
}
