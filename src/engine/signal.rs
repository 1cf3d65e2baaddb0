//! Host-reported signals: for a connection the host holds in its own process
//! (an `external:` endpoint), the host tells the engine what the connection
//! did, and the engine answers with what the rules made of it.

use serde::{Deserialize, Serialize};

use crate::machine::{Effect, Generation, Ignored, Input, Instance, State};

/// What the engine made of a signal a host reported ([`Engine::signal`](super::Engine::signal)).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Signaled {
    /// The instance's state after it.
    pub state: State,
    /// The instance's connection generation after it: what the host's next signals carry.
    pub generation: Generation,
    /// What the rules did with it.
    pub outcome: SignalOutcome,
}

/// What the rules did with a reported signal.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum SignalOutcome {
    /// A transition, recorded as `seq`, with the effects it decided.
    Moved {
        /// The record's sequence number.
        seq: u64,
        /// The effects, in order (the host carries out the transport's).
        effects: Vec<Effect>,
    },
    /// No transition, only upkeep (a pong re-arms the heartbeat).
    Upkeep {
        /// The effects.
        effects: Vec<Effect>,
    },
    /// Nothing moved, and why (a signal of an older connection: R12).
    Ignored {
        /// The table's reason.
        reason: Ignored,
    },
}

impl Signaled {
    pub(crate) fn ignored(instance: &Instance, reason: Ignored) -> Self {
        Self {
            state: instance.state.clone(),
            generation: instance.generation,
            outcome: SignalOutcome::Ignored { reason },
        }
    }
}

/// The inputs a host may report: what a connection does, tagged with its
/// generation. Host commands have their own calls; timers, clean-up
/// completions and runtime events come from the engine itself.
pub(crate) fn is_reportable(input: &Input) -> bool {
    matches!(
        input,
        Input::TransportOpened { .. }
            | Input::PairingCode { .. }
            | Input::TransportClosed { .. }
            | Input::WriteFailed { .. }
            | Input::HeartbeatMissed { .. }
            | Input::Pong { .. }
            | Input::ReconnectRequested { .. }
            | Input::SessionInvalid { .. }
            | Input::HeartbeatDue { .. }
            | Input::HandshakeStep { .. }
            | Input::LogoutConfirmed { .. }
            | Input::LogoutFailed { .. }
            | Input::CloseFinished { .. }
    )
}
