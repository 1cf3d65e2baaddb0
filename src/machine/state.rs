//! The states of an instance. Each variant carries only the data it has:
//! `Open` knows its peer identity, `Zombie` when and why it was detected,
//! `Closing` what the host asked for and how far it got. There are no flags
//! beside the state (the seeds' `endSession` flag is what went wrong there).

use std::fmt;

use serde::{Deserialize, Serialize};

use super::types::{Generation, Identity, Reason, StatusCode, Timestamp};

/// An instance: its last connection generation and its state. The name lives
/// with whoever owns the instance (registry, log record); the core needs it
/// only to seed jitter, so [`crate::machine::step`] takes it separately.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Instance {
    /// The generation of the latest connection attempt (0: never connected).
    /// A signal tagged with any other generation is stale (R12).
    pub generation: Generation,
    /// The lifecycle state.
    pub state: State,
}

impl Instance {
    /// A freshly created instance: `Closed` (cause `Created`), never connected.
    pub fn new() -> Self {
        Self {
            generation: Generation(0),
            state: State::Closed { cause: ClosedCause::Created, status: None, resume: None },
        }
    }
}

impl Default for Instance {
    fn default() -> Self {
        Self::new()
    }
}

/// The lifecycle state of one instance.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum State {
    /// Getting a usable session: waiting out a backoff, handshaking, or pairing.
    Connecting {
        /// Where the attempt is.
        phase: Phase,
        /// Consecutive automatic attempts without a stable open (R9's counter).
        retries: u32,
        /// Identity of the last session, offered to the peer to resume it.
        resume: Option<Identity>,
    },
    /// A usable session with a known peer identity (R6).
    Open {
        /// Who the peer says it is.
        identity: Identity,
        /// When the session opened; after `stable_period` the retry counter resets.
        since: Timestamp,
        /// Retry counter carried over from the attempts that led here.
        retries: u32,
    },
    /// Leaving a session because the host asked (logout or delete).
    Closing {
        /// What the host asked for.
        intent: Intent,
        /// How far the closing has got.
        step: ClosingStep,
    },
    /// Resting: the instance exists and can be connected again.
    Closed {
        /// Why it is closed.
        cause: ClosedCause,
        /// The close status that ended the session, from the real close, if one was seen (R5).
        status: Option<StatusCode>,
        /// Identity a later `connect` offers to resume (dropped by a logout).
        resume: Option<Identity>,
    },
    /// The socket stopped answering while `Open` (R7); the socket is already
    /// abandoned and a reconnect timer decides what happens next.
    Zombie {
        /// When it was detected.
        since: Timestamp,
        /// What gave it away.
        cause: ZombieCause,
        /// The identity of the session that died.
        identity: Identity,
        /// Retry counter at detection.
        retries: u32,
    },
    /// Terminal (R1): deleted, cleanup done or given up on.
    Removed {
        /// What the host cleanup reported.
        cleanup: CleanupOutcome,
    },
}

/// Where a connection attempt is.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Phase {
    /// No socket: waiting until `until` for the reconnect timer (backoff).
    Backoff {
        /// When the reconnect timer is due.
        until: Timestamp,
    },
    /// Socket opening / protocol handshake in progress.
    Handshaking,
    /// The peer issued pairing codes (a WhatsApp QR) and waits for the user.
    Pairing {
        /// How many codes it has issued on this connection.
        codes: u32,
    },
}

/// What the host asked for when it started closing.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Intent {
    /// Log out and keep the instance (ends in `Closed`).
    Logout,
    /// Log out, run the host cleanup, and remove the instance (ends in `Removed`).
    Delete,
}

/// How far a `Closing` instance has got.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ClosingStep {
    /// A logout was sent; waiting for the peer's confirmation.
    LoggingOut,
    /// Closing the socket; `logout` says how the logout went.
    ClosingSocket {
        /// The logout's outcome.
        logout: LogoutOutcome,
    },
    /// No socket any more; the host cleanup is running (delete only).
    CleaningUp,
}

/// How a logout went. Anything but `Confirmed` is a failure recorded in the log
/// (R5) — and never a reason to stay open.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum LogoutOutcome {
    /// The peer confirmed the logout.
    Confirmed,
    /// Sending the logout failed (the seeds' "Connection Closed").
    Failed {
        /// The transport's error.
        error: Reason,
    },
    /// The peer did not answer within `timeout_logout`.
    TimedOut,
    /// The connection ended before the peer confirmed.
    Unconfirmed,
    /// No logout could be sent: there was no usable session (still connecting,
    /// a zombie, or no socket at all).
    NotSent,
    /// The engine stopped while the logout was in progress.
    Interrupted,
}

/// Why an instance is `Closed`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ClosedCause {
    /// Created and never connected.
    Created,
    /// The host logged it out.
    LoggedOut {
        /// How the logout went.
        logout: LogoutOutcome,
    },
    /// The peer closed with a status the policy marks final for the phase (R4).
    FinalStatus,
    /// Too many consecutive attempts (R9's give-up limit).
    GaveUp {
        /// Attempts made.
        attempts: u32,
    },
    /// More pairing codes than the policy allows, none used.
    PairingRefused {
        /// Codes issued.
        codes: u32,
    },
    /// The engine restarted and the policy says not to reconnect.
    NotRecovered,
    /// The instance's task or a host hook panicked (R10).
    Panicked {
        /// The panic message.
        message: Reason,
    },
}

/// What gave a zombie away (R7).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ZombieCause {
    /// No pong within the heartbeat deadline.
    HeartbeatMissed,
    /// A write to the socket failed.
    WriteFailed {
        /// The transport's error.
        error: Reason,
    },
}

/// What the host cleanup did during a delete.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum CleanupOutcome {
    /// Every step ran; each one's outcome.
    Finished {
        /// Step reports, in the order the steps ran.
        steps: Vec<StepReport>,
    },
    /// The whole cleanup exceeded `timeout_cleanup`; the instance is removed anyway (R2).
    TimedOut,
    /// The instance's task panicked during the delete; removed anyway (R2, R10).
    Aborted {
        /// The panic message.
        message: Reason,
    },
}

impl CleanupOutcome {
    /// True when every step succeeded.
    pub fn is_clean(&self) -> bool {
        matches!(self, Self::Finished { steps } if steps.iter().all(|s| s.outcome == StepOutcome::Done))
    }
}

/// One cleanup step's report.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct StepReport {
    /// The step's name, as the host named it (e.g. `session-store`).
    pub step: String,
    /// What happened.
    pub outcome: StepOutcome,
}

/// What one cleanup step did.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum StepOutcome {
    /// Succeeded.
    Done,
    /// Returned an error.
    Failed {
        /// The error's message.
        error: Reason,
    },
    /// Exceeded its time-out.
    TimedOut,
    /// Panicked (caught: R10).
    Panicked {
        /// The panic message.
        message: Reason,
    },
}

/// The six state kinds, without data: for diagrams, counts and filters.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum StateKind {
    /// See [`State::Connecting`].
    Connecting,
    /// See [`State::Open`].
    Open,
    /// See [`State::Closing`].
    Closing,
    /// See [`State::Closed`].
    Closed,
    /// See [`State::Zombie`].
    Zombie,
    /// See [`State::Removed`].
    Removed,
}

impl StateKind {
    /// Every kind, in diagram order.
    pub const ALL: [StateKind; 6] =
        [Self::Connecting, Self::Open, Self::Closing, Self::Closed, Self::Zombie, Self::Removed];

    /// The name used in diagrams, the CLI and filters.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Connecting => "Connecting",
            Self::Open => "Open",
            Self::Closing => "Closing",
            Self::Closed => "Closed",
            Self::Zombie => "Zombie",
            Self::Removed => "Removed",
        }
    }

    /// Parses a kind name, case-insensitively.
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.as_str().eq_ignore_ascii_case(s))
    }
}

impl fmt::Display for StateKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.as_str())
    }
}

/// The coarse status Evolution-style APIs report, so a host can keep its API.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CoarseStatus {
    /// `connecting`: trying to get a session (including a zombie waiting to reconnect).
    Connecting,
    /// `open`: a usable session.
    Open,
    /// `close`: no session and none being made.
    Close,
}

impl CoarseStatus {
    /// `"connecting"`, `"open"` or `"close"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Connecting => "connecting",
            Self::Open => "open",
            Self::Close => "close",
        }
    }
}

impl State {
    /// The state's kind.
    pub fn kind(&self) -> StateKind {
        match self {
            Self::Connecting { .. } => StateKind::Connecting,
            Self::Open { .. } => StateKind::Open,
            Self::Closing { .. } => StateKind::Closing,
            Self::Closed { .. } => StateKind::Closed,
            Self::Zombie { .. } => StateKind::Zombie,
            Self::Removed { .. } => StateKind::Removed,
        }
    }

    /// The status an Evolution-style API reports for this state. A zombie is
    /// `connecting`, never `open`: reporting a dead socket as open is the bug
    /// of PR 2501 ("the database keeps saying open").
    pub fn coarse(&self) -> CoarseStatus {
        match self {
            Self::Connecting { .. } | Self::Zombie { .. } => CoarseStatus::Connecting,
            Self::Open { .. } => CoarseStatus::Open,
            Self::Closing { .. } | Self::Closed { .. } | Self::Removed { .. } => CoarseStatus::Close,
        }
    }

    /// True when the runtime holds a live socket in this state.
    pub fn has_socket(&self) -> bool {
        match self {
            Self::Connecting { phase, .. } => !matches!(phase, Phase::Backoff { .. }),
            Self::Open { .. } => true,
            Self::Closing { step, .. } => !matches!(step, ClosingStep::CleaningUp),
            Self::Closed { .. } | Self::Zombie { .. } | Self::Removed { .. } => false,
        }
    }

    /// The identity of the current session, if the instance is `Open`.
    pub fn identity(&self) -> Option<&Identity> {
        match self {
            Self::Open { identity, .. } => Some(identity),
            _ => None,
        }
    }
}

/// As people say it: the state, then why or how far, e.g. `Closed — logged
/// out (logout failed: heartbeat missed while logging out)`. The structure
/// itself is what `{:?}` and serde show.
impl fmt::Display for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Connecting { phase: Phase::Backoff { until }, retries, .. } => {
                write!(f, "Connecting — backing off until {} (attempt {retries})", until.utc())
            }
            Self::Connecting { phase: Phase::Handshaking, retries: 0, .. } => f.write_str("Connecting — handshaking"),
            Self::Connecting { phase: Phase::Handshaking, retries, .. } => {
                write!(f, "Connecting — handshaking (attempt {retries})")
            }
            Self::Connecting { phase: Phase::Pairing { codes }, .. } => {
                write!(f, "Connecting — pairing ({codes} code{} issued)", plural(*codes))
            }
            Self::Open { identity, .. } => write!(f, "Open — as {identity}"),
            Self::Closing { intent, step } => {
                let doing = match step {
                    ClosingStep::LoggingOut => "logging out".to_owned(),
                    ClosingStep::ClosingSocket { logout } => format!("closing the socket ({logout})"),
                    ClosingStep::CleaningUp => "cleaning up".to_owned(),
                };
                write!(f, "Closing — {intent}: {doing}")
            }
            Self::Closed { cause: ClosedCause::FinalStatus, status: Some(s), .. } => {
                write!(f, "Closed — closed for good by status {s}")
            }
            Self::Closed { cause, status: Some(s), .. } => write!(f, "Closed — {cause} (status {s})"),
            Self::Closed { cause, status: None, .. } => write!(f, "Closed — {cause}"),
            Self::Zombie { cause, .. } => write!(f, "Zombie — {cause}"),
            Self::Removed { cleanup } => write!(f, "Removed — {cleanup}"),
        }
    }
}

fn plural(n: u32) -> &'static str {
    if n == 1 { "" } else { "s" }
}

impl fmt::Display for Intent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Logout => "logout",
            Self::Delete => "delete",
        })
    }
}

impl fmt::Display for LogoutOutcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Confirmed => f.write_str("logout confirmed"),
            Self::Failed { error } => write!(f, "logout failed: {error}"),
            Self::TimedOut => f.write_str("logout unanswered"),
            Self::Unconfirmed => f.write_str("connection ended before the logout was confirmed"),
            Self::NotSent => f.write_str("no session to log out of"),
            Self::Interrupted => f.write_str("logout interrupted by a restart"),
        }
    }
}

impl fmt::Display for ClosedCause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Created => f.write_str("created, never connected"),
            Self::LoggedOut { logout: LogoutOutcome::Confirmed } => f.write_str("logged out"),
            Self::LoggedOut { logout } => write!(f, "logged out ({logout})"),
            Self::FinalStatus => f.write_str("closed for good by status"),
            Self::GaveUp { attempts } => write!(f, "gave up after {attempts} attempts"),
            Self::PairingRefused { codes } => write!(f, "pairing refused after {codes} codes"),
            Self::NotRecovered => f.write_str("not reconnected after a restart"),
            Self::Panicked { message } => write!(f, "stopped by a panic: {message}"),
        }
    }
}

impl fmt::Display for ZombieCause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::HeartbeatMissed => f.write_str("heartbeat missed"),
            Self::WriteFailed { error } => write!(f, "write failed: {error}"),
        }
    }
}

impl fmt::Display for CleanupOutcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Finished { steps } => {
                let failed = steps.iter().filter(|s| s.outcome != StepOutcome::Done).count();
                match (steps.len(), failed) {
                    (0, _) => f.write_str("no cleanup steps"),
                    (n, 0) => write!(f, "cleaned up ({n} step{})", if n == 1 { "" } else { "s" }),
                    (n, k) => write!(f, "cleanup: {k} of {n} steps did not succeed"),
                }
            }
            Self::TimedOut => f.write_str("cleanup timed out"),
            Self::Aborted { message } => write!(f, "cleanup aborted by a panic: {message}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id() -> Identity {
        Identity::new("5511@s.whatsapp.net").expect("valid")
    }

    #[test]
    fn states_read_as_people_say_them() {
        let cases: Vec<(State, &str)> = vec![
            (Instance::new().state, "Closed — created, never connected"),
            (
                State::Connecting { phase: Phase::Backoff { until: Timestamp(1_000) }, retries: 2, resume: None },
                "Connecting — backing off until 1970-01-01 00:00:01.000 (attempt 2)",
            ),
            (State::Connecting { phase: Phase::Handshaking, retries: 0, resume: None }, "Connecting — handshaking"),
            (
                State::Connecting { phase: Phase::Handshaking, retries: 3, resume: None },
                "Connecting — handshaking (attempt 3)",
            ),
            (
                State::Connecting { phase: Phase::Pairing { codes: 1 }, retries: 0, resume: None },
                "Connecting — pairing (1 code issued)",
            ),
            (
                State::Connecting { phase: Phase::Pairing { codes: 4 }, retries: 0, resume: None },
                "Connecting — pairing (4 codes issued)",
            ),
            (State::Open { identity: id(), since: Timestamp(0), retries: 0 }, "Open — as 5511@s.whatsapp.net"),
            (State::Closing { intent: Intent::Logout, step: ClosingStep::LoggingOut }, "Closing — logout: logging out"),
            (
                State::Closing {
                    intent: Intent::Delete,
                    step: ClosingStep::ClosingSocket { logout: LogoutOutcome::TimedOut },
                },
                "Closing — delete: closing the socket (logout unanswered)",
            ),
            (State::Closing { intent: Intent::Delete, step: ClosingStep::CleaningUp }, "Closing — delete: cleaning up"),
            (
                State::Closed {
                    cause: ClosedCause::LoggedOut {
                        logout: LogoutOutcome::Failed { error: Reason::new("heartbeat missed while logging out") },
                    },
                    status: None,
                    resume: None,
                },
                "Closed — logged out (logout failed: heartbeat missed while logging out)",
            ),
            (
                State::Closed {
                    cause: ClosedCause::LoggedOut { logout: LogoutOutcome::Confirmed },
                    status: Some(StatusCode(1000)),
                    resume: None,
                },
                "Closed — logged out (status 1000)",
            ),
            (
                State::Closed { cause: ClosedCause::FinalStatus, status: Some(StatusCode(401)), resume: None },
                "Closed — closed for good by status 401",
            ),
            (
                State::Closed { cause: ClosedCause::GaveUp { attempts: 25 }, status: None, resume: None },
                "Closed — gave up after 25 attempts",
            ),
            (
                State::Closed { cause: ClosedCause::PairingRefused { codes: 31 }, status: None, resume: None },
                "Closed — pairing refused after 31 codes",
            ),
            (
                State::Closed { cause: ClosedCause::NotRecovered, status: None, resume: None },
                "Closed — not reconnected after a restart",
            ),
            (
                State::Closed {
                    cause: ClosedCause::Panicked { message: Reason::new("bug") },
                    status: None,
                    resume: None,
                },
                "Closed — stopped by a panic: bug",
            ),
            (
                State::Zombie { since: Timestamp(0), cause: ZombieCause::HeartbeatMissed, identity: id(), retries: 0 },
                "Zombie — heartbeat missed",
            ),
            (
                State::Zombie {
                    since: Timestamp(0),
                    cause: ZombieCause::WriteFailed { error: Reason::new("EPIPE") },
                    identity: id(),
                    retries: 0,
                },
                "Zombie — write failed: EPIPE",
            ),
            (State::Removed { cleanup: CleanupOutcome::Finished { steps: vec![] } }, "Removed — no cleanup steps"),
            (
                State::Removed {
                    cleanup: CleanupOutcome::Finished {
                        steps: vec![StepReport { step: "store".into(), outcome: StepOutcome::Done }],
                    },
                },
                "Removed — cleaned up (1 step)",
            ),
            (
                State::Removed {
                    cleanup: CleanupOutcome::Finished {
                        steps: vec![
                            StepReport { step: "store".into(), outcome: StepOutcome::Done },
                            StepReport { step: "files".into(), outcome: StepOutcome::TimedOut },
                        ],
                    },
                },
                "Removed — cleanup: 1 of 2 steps did not succeed",
            ),
            (State::Removed { cleanup: CleanupOutcome::TimedOut }, "Removed — cleanup timed out"),
            (
                State::Removed { cleanup: CleanupOutcome::Aborted { message: Reason::new("oops") } },
                "Removed — cleanup aborted by a panic: oops",
            ),
        ];
        for (state, text) in cases {
            assert_eq!(state.to_string(), text);
        }
        for (outcome, text) in [
            (LogoutOutcome::Unconfirmed, "connection ended before the logout was confirmed"),
            (LogoutOutcome::NotSent, "no session to log out of"),
            (LogoutOutcome::Interrupted, "logout interrupted by a restart"),
            (LogoutOutcome::Confirmed, "logout confirmed"),
        ] {
            assert_eq!(outcome.to_string(), text);
        }
    }

    #[test]
    fn kinds_coarse_statuses_sockets_and_identities() {
        let open = State::Open { identity: id(), since: Timestamp(0), retries: 0 };
        let zombie =
            State::Zombie { since: Timestamp(0), cause: ZombieCause::HeartbeatMissed, identity: id(), retries: 0 };
        let backoff = State::Connecting { phase: Phase::Backoff { until: Timestamp(0) }, retries: 1, resume: None };
        let handshaking = State::Connecting { phase: Phase::Handshaking, retries: 0, resume: None };
        let logging_out = State::Closing { intent: Intent::Logout, step: ClosingStep::LoggingOut };
        let cleaning = State::Closing { intent: Intent::Delete, step: ClosingStep::CleaningUp };
        let closed = Instance::new().state;
        let removed = State::Removed { cleanup: CleanupOutcome::TimedOut };
        // (state, kind, coarse, has a socket)
        let table = [
            (&open, StateKind::Open, CoarseStatus::Open, true),
            (&zombie, StateKind::Zombie, CoarseStatus::Connecting, false),
            (&backoff, StateKind::Connecting, CoarseStatus::Connecting, false),
            (&handshaking, StateKind::Connecting, CoarseStatus::Connecting, true),
            (&logging_out, StateKind::Closing, CoarseStatus::Close, true),
            (&cleaning, StateKind::Closing, CoarseStatus::Close, false),
            (&closed, StateKind::Closed, CoarseStatus::Close, false),
            (&removed, StateKind::Removed, CoarseStatus::Close, false),
        ];
        for (state, kind, coarse, socket) in table {
            assert_eq!((state.kind(), state.coarse(), state.has_socket()), (kind, coarse, socket), "{state}");
            assert_eq!(StateKind::parse(&kind.as_str().to_uppercase()), Some(kind));
            assert_eq!(state.identity().cloned(), if kind == StateKind::Open { Some(id()) } else { None });
        }
        assert_eq!(StateKind::parse("zombies"), None);
        let names: std::collections::BTreeSet<_> = StateKind::ALL.iter().map(|k| k.as_str()).collect();
        assert_eq!(names.len(), 6);
        assert_eq!(format!("{:>8}", StateKind::Open), "    Open", "kinds pad in columns");
        assert_eq!(
            [CoarseStatus::Connecting, CoarseStatus::Open, CoarseStatus::Close].map(CoarseStatus::as_str),
            ["connecting", "open", "close"]
        );
        assert!(CleanupOutcome::Finished { steps: vec![] }.is_clean());
        assert!(!CleanupOutcome::TimedOut.is_clean());
        let failed = StepReport { step: "s".into(), outcome: StepOutcome::Failed { error: Reason::new("e") } };
        assert!(!CleanupOutcome::Finished { steps: vec![failed] }.is_clean());
    }
}
