//! Everything that can happen to an instance: host commands, transport
//! signals (tagged with their connection generation), completions of effects,
//! timers, and the runtime's own events.

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::state::StepReport;
use super::types::{Generation, Identity, Reason, StatusCode};

/// The timers the core asks the runtime to keep. A timer belongs to a
/// generation: one that fires for another generation, or in a state that does
/// not expect it, is ignored (as `gen_statem` state time-outs are).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum TimerKind {
    /// Backoff elapsed: try again (from `Connecting(backoff)` or `Zombie`).
    Reconnect,
    /// The handshake or the current pairing code took too long.
    Connect,
    /// The peer did not confirm a logout.
    Logout,
    /// The socket did not finish closing.
    Close,
    /// The host cleanup did not finish.
    Cleanup,
    /// Time to ping an open connection (R7): armed when it opens and again at each pong.
    Heartbeat,
    /// The pong to the last ping is overdue: the connection is a zombie (R7).
    PongDeadline,
}

impl TimerKind {
    /// Every kind.
    pub const ALL: [TimerKind; 7] =
        [Self::Reconnect, Self::Connect, Self::Logout, Self::Close, Self::Cleanup, Self::Heartbeat, Self::PongDeadline];
}

/// Who ended a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum CloseInitiator {
    /// The peer sent a close frame.
    Peer,
    /// We closed it: our close handshake, or a protocol violation of the peer we closed for.
    Local,
    /// It broke: reset, refused, timed out, or ended without a close frame.
    Transport,
}

impl CloseInitiator {
    /// `peer`, `local` or `transport`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Peer => "peer",
            Self::Local => "local",
            Self::Transport => "transport",
        }
    }
}

impl fmt::Display for CloseInitiator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.as_str())
    }
}

/// A timer: its kind and the generation it was armed for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Timer {
    /// What the timer is for.
    pub kind: TimerKind,
    /// The generation it belongs to.
    pub generation: Generation,
}

/// An input to the state machine.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Input {
    // --- host commands ---
    /// Connect (or reconnect now). Also what re-enables reconnects after a logout (R3).
    Connect,
    /// Log out and keep the instance.
    Logout,
    /// Log out, clean up, remove.
    Delete,
    /// Drop the current connection, if any, and start a fresh attempt.
    Restart,

    // --- transport signals, tagged with their generation ---
    /// The peer declared the session usable; `identity` is who it is (R6: `None` does not open).
    TransportOpened {
        /// The connection this came from.
        generation: Generation,
        /// The peer's identity, if it sent a valid one.
        identity: Option<Identity>,
    },
    /// The peer issued a pairing code (a WhatsApp QR).
    PairingCode {
        /// The connection this came from.
        generation: Generation,
    },
    /// The connection ended, as logs written before close initiators were
    /// recorded say it (read and replayed like [`Input::TransportClosed`];
    /// never written any more).
    TransportClosedV1 {
        /// The connection this came from.
        generation: Generation,
        /// The close status, mapped by the protocol.
        status: Option<StatusCode>,
        /// The close reason text or the transport error.
        reason: Reason,
    },
    /// A write failed (R7).
    WriteFailed {
        /// The connection this came from.
        generation: Generation,
        /// The transport's error.
        error: Reason,
    },
    /// No pong within the heartbeat deadline, as a transport that keeps its
    /// own heartbeats reports it (R7). The engine's own heartbeats are the
    /// core's timers instead ([`TimerKind::PongDeadline`]); both mean the same.
    HeartbeatMissed {
        /// The connection this came from.
        generation: Generation,
    },

    // --- completions of effects ---
    /// The peer confirmed a logout.
    LogoutConfirmed {
        /// The connection this came from.
        generation: Generation,
    },
    /// Sending the logout failed.
    LogoutFailed {
        /// The connection this came from.
        generation: Generation,
        /// The transport's error.
        error: Reason,
    },
    /// Our close of the socket finished.
    CloseFinished {
        /// The connection this came from.
        generation: Generation,
    },
    /// The host cleanup finished; every step's outcome, in order.
    CleanupFinished {
        /// Step reports.
        steps: Vec<StepReport>,
    },
    /// A timer armed by an earlier transition fired.
    TimerFired {
        /// Which one.
        timer: Timer,
    },

    // --- the runtime ---
    /// The engine restarted on an existing log; any socket of the last run is gone (R11).
    Recovered,
    /// The instance's task or a host hook panicked; the runtime caught it (R10).
    Panicked {
        /// The panic message.
        message: Reason,
    },

    // --- added later: new variants go last (records store the variant index) ---
    /// The peer answered a ping (R7).
    Pong {
        /// The connection this came from.
        generation: Generation,
    },
    /// The connection ended. `status` is the close status (absent when the
    /// connection was lost without a close frame); `initiator` says who ended it.
    TransportClosed {
        /// The connection this came from.
        generation: Generation,
        /// Who ended it.
        initiator: CloseInitiator,
        /// The close status, mapped by the protocol.
        status: Option<StatusCode>,
        /// The close reason text or the transport error.
        reason: Reason,
    },
    /// The peer asked for a new connection that resumes this session
    /// (Discord's op 7 RECONNECT, or op 9 INVALID SESSION with `d: true`) (R13).
    ReconnectRequested {
        /// The connection this came from.
        generation: Generation,
    },
    /// The peer said the session is invalid and cannot be resumed (Discord's
    /// op 9 with `d: false`): connect anew without resume data, after
    /// `retry_after`, which the protocol chose (R14).
    SessionInvalid {
        /// The connection this came from.
        generation: Generation,
        /// How long to wait before the next attempt.
        retry_after: Duration,
    },
    /// The protocol says when the next heartbeat is due: a protocol whose
    /// heartbeats are application frames at an interval the peer sets reports
    /// its acknowledgement with the time left to the next beat. It is a pong
    /// that also sets the schedule (R7).
    HeartbeatDue {
        /// The connection this came from.
        generation: Generation,
        /// Time to the next heartbeat.
        after: Duration,
    },
    /// The transport took a step of the handshake after a wait for a
    /// fleet-wide permit (it sent a paced IDENTIFY, or opened a socket the
    /// connect pacing held back), or reports that such a wait goes on (at
    /// least twice per connect time-out): the connect deadline counts from
    /// here, not from before the wait (R15).
    HandshakeStep {
        /// The connection this came from.
        generation: Generation,
    },
}

/// The kinds of input, without data: for diagrams and counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[allow(missing_docs)]
pub enum InputKind {
    Connect,
    Logout,
    Delete,
    Restart,
    Opened,
    PairingCode,
    Closed,
    WriteFailed,
    HeartbeatMissed,
    LogoutConfirmed,
    LogoutFailed,
    CloseFinished,
    CleanupFinished,
    ReconnectTimer,
    ConnectTimeout,
    LogoutTimeout,
    CloseTimeout,
    CleanupTimeout,
    Recovered,
    Panicked,
    Pong,
    HeartbeatTimer,
    PongDeadline,
    ReconnectRequested,
    SessionInvalid,
    HeartbeatDue,
    HandshakeStep,
}

impl InputKind {
    /// Every kind.
    pub const ALL: [InputKind; 27] = [
        Self::Connect,
        Self::Logout,
        Self::Delete,
        Self::Restart,
        Self::Opened,
        Self::PairingCode,
        Self::Closed,
        Self::WriteFailed,
        Self::HeartbeatMissed,
        Self::LogoutConfirmed,
        Self::LogoutFailed,
        Self::CloseFinished,
        Self::CleanupFinished,
        Self::ReconnectTimer,
        Self::ConnectTimeout,
        Self::LogoutTimeout,
        Self::CloseTimeout,
        Self::CleanupTimeout,
        Self::Recovered,
        Self::Panicked,
        Self::Pong,
        Self::HeartbeatTimer,
        Self::PongDeadline,
        Self::ReconnectRequested,
        Self::SessionInvalid,
        Self::HeartbeatDue,
        Self::HandshakeStep,
    ];

    /// The kind a label names (`heartbeat missed`, `heartbeat-missed` or
    /// `HeartbeatMissed`; any case).
    pub fn parse(s: &str) -> Option<Self> {
        let squash =
            |t: &str| t.chars().filter(char::is_ascii_alphanumeric).map(|c| c.to_ascii_lowercase()).collect::<String>();
        let wanted = squash(s);
        Self::ALL.into_iter().find(|k| squash(k.as_str()) == wanted)
    }

    /// A short label for diagrams and summaries.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Connect => "connect",
            Self::Logout => "logout",
            Self::Delete => "delete",
            Self::Restart => "restart",
            Self::Opened => "opened",
            Self::PairingCode => "pairing code",
            Self::Closed => "closed",
            Self::WriteFailed => "write failed",
            Self::HeartbeatMissed => "heartbeat missed",
            Self::LogoutConfirmed => "logout confirmed",
            Self::LogoutFailed => "logout failed",
            Self::CloseFinished => "close finished",
            Self::CleanupFinished => "cleanup finished",
            Self::ReconnectTimer => "reconnect timer",
            Self::ConnectTimeout => "connect timeout",
            Self::LogoutTimeout => "logout timeout",
            Self::CloseTimeout => "close timeout",
            Self::CleanupTimeout => "cleanup timeout",
            Self::Recovered => "recovered",
            Self::Panicked => "panicked",
            Self::Pong => "pong",
            Self::HeartbeatTimer => "heartbeat timer",
            Self::PongDeadline => "pong deadline",
            Self::ReconnectRequested => "reconnect requested",
            Self::SessionInvalid => "session invalid",
            Self::HeartbeatDue => "heartbeat due",
            Self::HandshakeStep => "handshake step",
        }
    }
}

impl fmt::Display for InputKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.as_str())
    }
}

impl Input {
    /// The generation a transport signal, completion or timer belongs to;
    /// `None` for host commands and runtime events, which are never stale.
    pub fn generation(&self) -> Option<Generation> {
        match self {
            Self::TransportOpened { generation, .. }
            | Self::PairingCode { generation }
            | Self::TransportClosed { generation, .. }
            | Self::TransportClosedV1 { generation, .. }
            | Self::Pong { generation }
            | Self::ReconnectRequested { generation }
            | Self::SessionInvalid { generation, .. }
            | Self::HeartbeatDue { generation, .. }
            | Self::HandshakeStep { generation }
            | Self::WriteFailed { generation, .. }
            | Self::HeartbeatMissed { generation }
            | Self::LogoutConfirmed { generation }
            | Self::LogoutFailed { generation, .. }
            | Self::CloseFinished { generation } => Some(*generation),
            Self::TimerFired { timer } => Some(timer.generation),
            Self::Connect
            | Self::Logout
            | Self::Delete
            | Self::Restart
            | Self::CleanupFinished { .. }
            | Self::Recovered
            | Self::Panicked { .. } => None,
        }
    }

    /// A connection's end, as (initiator, status, reason), in either form it is recorded.
    pub fn closed(&self) -> Option<(CloseInitiator, Option<StatusCode>, &Reason)> {
        match self {
            Self::TransportClosed { initiator, status, reason, .. } => Some((*initiator, *status, reason)),
            // Before initiators were recorded: a status means a close frame (the peer's, or ours for a violation).
            Self::TransportClosedV1 { status, reason, .. } => {
                Some((if status.is_some() { CloseInitiator::Peer } else { CloseInitiator::Transport }, *status, reason))
            }
            _ => None,
        }
    }

    /// A missed heartbeat, in either form: a transport's report, or the core's own deadline.
    pub fn is_heartbeat_missed(&self) -> bool {
        matches!(self, Self::HeartbeatMissed { .. })
            || matches!(self, Self::TimerFired { timer } if timer.kind == TimerKind::PongDeadline)
    }

    /// True for the signals after which a transport has ended (it reports
    /// one of these last): the one list of connection-ending signals.
    pub fn ends_connection(&self) -> bool {
        matches!(
            self,
            Self::TransportClosed { .. }
                | Self::TransportClosedV1 { .. }
                | Self::WriteFailed { .. }
                | Self::HeartbeatMissed { .. }
                | Self::LogoutFailed { .. }
                | Self::CloseFinished { .. }
        )
    }

    /// True for the host's commands.
    pub fn is_host_command(&self) -> bool {
        matches!(self, Self::Connect | Self::Logout | Self::Delete | Self::Restart)
    }

    /// The input's kind.
    pub fn kind(&self) -> InputKind {
        match self {
            Self::Connect => InputKind::Connect,
            Self::Logout => InputKind::Logout,
            Self::Delete => InputKind::Delete,
            Self::Restart => InputKind::Restart,
            Self::TransportOpened { .. } => InputKind::Opened,
            Self::PairingCode { .. } => InputKind::PairingCode,
            Self::TransportClosed { .. } | Self::TransportClosedV1 { .. } => InputKind::Closed,
            Self::Pong { .. } => InputKind::Pong,
            Self::ReconnectRequested { .. } => InputKind::ReconnectRequested,
            Self::SessionInvalid { .. } => InputKind::SessionInvalid,
            Self::HeartbeatDue { .. } => InputKind::HeartbeatDue,
            Self::HandshakeStep { .. } => InputKind::HandshakeStep,
            Self::WriteFailed { .. } => InputKind::WriteFailed,
            Self::HeartbeatMissed { .. } => InputKind::HeartbeatMissed,
            Self::LogoutConfirmed { .. } => InputKind::LogoutConfirmed,
            Self::LogoutFailed { .. } => InputKind::LogoutFailed,
            Self::CloseFinished { .. } => InputKind::CloseFinished,
            Self::CleanupFinished { .. } => InputKind::CleanupFinished,
            Self::TimerFired { timer } => match timer.kind {
                TimerKind::Reconnect => InputKind::ReconnectTimer,
                TimerKind::Connect => InputKind::ConnectTimeout,
                TimerKind::Logout => InputKind::LogoutTimeout,
                TimerKind::Close => InputKind::CloseTimeout,
                TimerKind::Cleanup => InputKind::CleanupTimeout,
                TimerKind::Heartbeat => InputKind::HeartbeatTimer,
                TimerKind::PongDeadline => InputKind::PongDeadline,
            },
            Self::Recovered => InputKind::Recovered,
            Self::Panicked { .. } => InputKind::Panicked,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::machine::catalog::sample_inputs;

    #[test]
    fn every_kind_is_listed_once_and_parses_from_its_label() {
        let labels: std::collections::BTreeSet<&str> = InputKind::ALL.iter().map(|k| k.as_str()).collect();
        assert_eq!(labels.len(), InputKind::ALL.len());
        for input in sample_inputs(Generation(1)) {
            assert!(InputKind::ALL.contains(&input.kind()), "{:?}", input.kind());
        }
        for k in InputKind::ALL {
            assert_eq!(InputKind::parse(k.as_str()), Some(k));
            assert_eq!(InputKind::parse(&k.as_str().replace(' ', "-").to_uppercase()), Some(k));
            assert_eq!(InputKind::parse(&format!("{k:?}")), Some(k));
        }
        assert_eq!(InputKind::parse("heartbeat"), None);
    }

    #[test]
    fn every_input_says_its_kind_generation_and_whether_it_ends_a_connection() {
        let g = Generation(5);
        let reason = Reason::from("r");
        let closed =
            |initiator| Input::TransportClosed { generation: g, initiator, status: None, reason: reason.clone() };
        // (input, kind, generation, ends a connection, host command)
        let table: Vec<(Input, InputKind, Option<Generation>, bool, bool)> = vec![
            (Input::Connect, InputKind::Connect, None, false, true),
            (Input::Logout, InputKind::Logout, None, false, true),
            (Input::Delete, InputKind::Delete, None, false, true),
            (Input::Restart, InputKind::Restart, None, false, true),
            (Input::TransportOpened { generation: g, identity: None }, InputKind::Opened, Some(g), false, false),
            (Input::PairingCode { generation: g }, InputKind::PairingCode, Some(g), false, false),
            (closed(CloseInitiator::Peer), InputKind::Closed, Some(g), true, false),
            (
                Input::TransportClosedV1 { generation: g, status: None, reason: reason.clone() },
                InputKind::Closed,
                Some(g),
                true,
                false,
            ),
            (Input::WriteFailed { generation: g, error: reason.clone() }, InputKind::WriteFailed, Some(g), true, false),
            (Input::HeartbeatMissed { generation: g }, InputKind::HeartbeatMissed, Some(g), true, false),
            (Input::LogoutConfirmed { generation: g }, InputKind::LogoutConfirmed, Some(g), false, false),
            (
                Input::LogoutFailed { generation: g, error: reason.clone() },
                InputKind::LogoutFailed,
                Some(g),
                true,
                false,
            ),
            (Input::CloseFinished { generation: g }, InputKind::CloseFinished, Some(g), true, false),
            (Input::CleanupFinished { steps: vec![] }, InputKind::CleanupFinished, None, false, false),
            (Input::Recovered, InputKind::Recovered, None, false, false),
            (Input::Panicked { message: reason.clone() }, InputKind::Panicked, None, false, false),
            (Input::Pong { generation: g }, InputKind::Pong, Some(g), false, false),
            (Input::ReconnectRequested { generation: g }, InputKind::ReconnectRequested, Some(g), false, false),
            (
                Input::SessionInvalid { generation: g, retry_after: Duration::from_secs(2) },
                InputKind::SessionInvalid,
                Some(g),
                false,
                false,
            ),
            (
                Input::HeartbeatDue { generation: g, after: Duration::from_secs(41) },
                InputKind::HeartbeatDue,
                Some(g),
                false,
                false,
            ),
            (Input::HandshakeStep { generation: g }, InputKind::HandshakeStep, Some(g), false, false),
        ];
        for (input, kind, generation, ends, host) in &table {
            assert_eq!(input.kind(), *kind, "{input:?}");
            assert_eq!(input.generation(), *generation, "{input:?}");
            assert_eq!(input.ends_connection(), *ends, "{input:?}");
            assert_eq!(input.is_host_command(), *host, "{input:?}");
        }
        let timer_kinds: Vec<InputKind> = TimerKind::ALL
            .iter()
            .map(|&kind| {
                let input = Input::TimerFired { timer: Timer { kind, generation: g } };
                assert_eq!(input.generation(), Some(g));
                assert!(!input.ends_connection());
                assert_eq!(input.is_heartbeat_missed(), kind == TimerKind::PongDeadline);
                input.kind()
            })
            .collect();
        assert_eq!(
            timer_kinds,
            [
                InputKind::ReconnectTimer,
                InputKind::ConnectTimeout,
                InputKind::LogoutTimeout,
                InputKind::CloseTimeout,
                InputKind::CleanupTimeout,
                InputKind::HeartbeatTimer,
                InputKind::PongDeadline,
            ]
        );
        // Every kind has its own name, and the catalog covers every kind.
        let mut names: Vec<&str> =
            table.iter().map(|(_, k, ..)| k.as_str()).chain(timer_kinds.iter().map(|k| k.as_str())).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), 27, "{names:?}");
        let covered: std::collections::BTreeSet<InputKind> = sample_inputs(g).iter().map(Input::kind).collect();
        assert_eq!(covered.len(), 27);
        assert!(Input::HeartbeatMissed { generation: g }.is_heartbeat_missed());
        assert!(!Input::WriteFailed { generation: g, error: reason.clone() }.is_heartbeat_missed());
    }

    #[test]
    fn a_close_says_who_ended_it_in_either_form() {
        let g = Generation(1);
        let reason = Reason::from("bye");
        let new = Input::TransportClosed {
            generation: g,
            initiator: CloseInitiator::Local,
            status: None,
            reason: reason.clone(),
        };
        assert_eq!(new.closed(), Some((CloseInitiator::Local, None, &reason)));
        let with_status =
            Input::TransportClosedV1 { generation: g, status: Some(StatusCode(401)), reason: reason.clone() };
        assert_eq!(with_status.closed(), Some((CloseInitiator::Peer, Some(StatusCode(401)), &reason)));
        let lost = Input::TransportClosedV1 { generation: g, status: None, reason: reason.clone() };
        assert_eq!(lost.closed(), Some((CloseInitiator::Transport, None, &reason)));
        assert_eq!(Input::Connect.closed(), None);
        let names = [CloseInitiator::Peer, CloseInitiator::Local, CloseInitiator::Transport].map(|c| c.to_string());
        assert_eq!(names, ["peer", "local", "transport"]);
        assert_eq!(format!("{:>6}|{:<10}|", CloseInitiator::Peer, InputKind::Pong), "  peer|pong      |");
    }
}
