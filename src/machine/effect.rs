//! Effects: what a transition asks the runtime to do. The core decides; the
//! runtime carries out, in order, and reports back through inputs.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::input::Timer;
use super::types::{Generation, Identity, StatusCode};

/// One thing the runtime must do after a transition has been logged.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Effect {
    /// Open a transport for this generation, offering `resume` to the peer.
    /// The runtime holds at most one transport per instance (R9): opening a
    /// generation replaces any earlier one.
    OpenTransport {
        /// The new connection's generation.
        generation: Generation,
        /// The identity of the session to resume, if any.
        resume: Option<Identity>,
    },
    /// Send the protocol's logout on the live transport.
    SendLogout {
        /// The connection to send it on.
        generation: Generation,
    },
    /// Close the transport gracefully with this status, bounded by the close timer.
    CloseTransport {
        /// The connection to close.
        generation: Generation,
        /// The status to close with (the protocol maps it to a close code).
        status: StatusCode,
    },
    /// Drop the transport without a handshake: it is dead or must not be waited on (R7).
    AbortTransport {
        /// The connection to drop.
        generation: Generation,
    },
    /// Arm (or re-arm) a timer to fire `after` from now.
    ArmTimer {
        /// The timer.
        timer: Timer,
        /// Delay until it fires.
        after: Duration,
    },
    /// Cancel a timer; a cancelled timer that fires anyway is ignored by the core.
    CancelTimer {
        /// The timer.
        timer: Timer,
    },
    /// Run the host cleanup steps, in order, each once, and report `CleanupFinished`.
    RunCleanup,
    /// Send a ping on the live transport; its pong comes back as `Input::Pong` (R7).
    SendPing {
        /// The connection to ping.
        generation: Generation,
    },
}

impl Effect {
    /// True for the effects the runtime carries out on the world (sockets,
    /// cleanup); false for timers, which the driver keeps itself.
    pub fn is_io(&self) -> bool {
        !matches!(self, Self::ArmTimer { .. } | Self::CancelTimer { .. })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::machine::TimerKind;

    #[test]
    fn only_timers_are_not_io() {
        let g = Generation(1);
        let timer = Timer { kind: TimerKind::Connect, generation: g };
        let io = [
            Effect::OpenTransport { generation: g, resume: None },
            Effect::SendLogout { generation: g },
            Effect::CloseTransport { generation: g, status: StatusCode::NORMAL },
            Effect::AbortTransport { generation: g },
            Effect::RunCleanup,
            Effect::SendPing { generation: g },
        ];
        assert!(io.iter().all(Effect::is_io));
        assert!(!Effect::ArmTimer { timer, after: Duration::ZERO }.is_io());
        assert!(!Effect::CancelTimer { timer }.is_io());
    }
}
