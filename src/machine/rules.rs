//! The transition table: [`step`] is the whole lifecycle. Read it top to
//! bottom; each arm names the rule it implements. The engine, the replay
//! tool, the verifier, the simulator and the diagrams all call this function.

use std::fmt;

use serde::{Deserialize, Serialize};

use super::effect::Effect;
use super::input::{Input, Timer, TimerKind};
use super::policy::{CloseAction, ClosePhase, Policy};
use super::state::{
    CleanupOutcome, ClosedCause, ClosingStep, Instance, Intent, LogoutOutcome, Phase, State, ZombieCause,
};
use super::types::{Generation, Identity, InstanceName, Reason, StatusCode, Timestamp};

/// What [`step`] decided.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Outcome {
    /// The instance moves: log it, apply it, then carry out the effects.
    Transition(Transition),
    /// The state stays, but the runtime must do these (a heartbeat's ping and
    /// its deadline, a pong that cancels it): upkeep, not a transition, so
    /// nothing is recorded (R8 records state changes).
    Effects(Vec<Effect>),
    /// Nothing changes, for a stated reason (not an error: a stale signal, a duplicate delete).
    Ignored(Ignored),
    /// The host asked for something the state does not allow.
    Rejected(Rejection),
}

/// A decided transition.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Transition {
    /// The instance's generation afterwards (higher when a new attempt starts).
    pub generation: Generation,
    /// The state afterwards.
    pub to: State,
    /// What the runtime must do, in order.
    pub effects: Vec<Effect>,
}

impl Instance {
    /// Applies a transition decided by [`step`] for this instance.
    pub fn apply(&mut self, t: &Transition) {
        self.generation = t.generation;
        self.state = t.to.clone();
    }
}

/// Why an input changed nothing.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Ignored {
    /// R12: the signal, completion or timer belongs to another connection generation.
    Stale {
        /// The generation the input carried.
        input: Generation,
        /// The instance's current generation.
        current: Generation,
    },
    /// R6: the peer said it was open without an identity.
    MissingIdentity,
    /// Already open or connecting; nothing to do.
    AlreadyConnecting,
    /// Already closed with no credentials to drop.
    AlreadyClosed,
    /// A logout is already in progress.
    LogoutInProgress,
    /// A delete is already in progress (R2: deleting twice changes nothing).
    DeleteInProgress,
    /// Already removed (R2: deleting twice changes nothing).
    AlreadyRemoved,
    /// The input does not apply in this state (a timer that outlived its state,
    /// a signal from a socket that is being abandoned).
    NotExpected,
}

impl fmt::Display for Ignored {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Stale { input, current } => {
                write!(f, "stale: from {input}, current is {current}")
            }
            Self::MissingIdentity => f.write_str("opened without identity"),
            Self::AlreadyConnecting => f.write_str("already connecting or open"),
            Self::AlreadyClosed => f.write_str("already closed"),
            Self::LogoutInProgress => f.write_str("logout in progress"),
            Self::DeleteInProgress => f.write_str("delete in progress"),
            Self::AlreadyRemoved => f.write_str("already removed"),
            Self::NotExpected => f.write_str("not expected in this state"),
        }
    }
}

/// A host command the state does not allow.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum Rejection {
    /// R1: the instance was removed; its name can only be created anew.
    #[error("the instance was removed")]
    Removed,
    /// The instance is being logged out or deleted; connect after it is `Closed`.
    #[error("the instance is closing ({intent:?}); wait until it is Closed")]
    Closing {
        /// What it is closing for.
        intent: Intent,
    },
}

/// The whole transition table. Pure: no I/O, no clock, no randomness beyond
/// the policy's seeded jitter. `name` seeds jitter; `now` is the input's time.
pub fn step(name: &InstanceName, instance: &Instance, input: &Input, policy: &Policy, now: Timestamp) -> Outcome {
    table(name, instance, input, policy, now, RulesVersion::CURRENT)
}

/// [`step`] as the rules of an earlier version decided: what `verify`
/// replays a record under, when the log says (or suggests) that version
/// wrote it. See [`RulesVersion`] for what each version changed.
pub fn step_under(
    rules: RulesVersion,
    name: &InstanceName,
    instance: &Instance,
    input: &Input,
    policy: &Policy,
    now: Timestamp,
) -> Outcome {
    let outcome = table(name, instance, input, policy, now, rules);
    if rules >= RulesVersion::V2 {
        return outcome;
    }
    // Version 1: the transport kept the heartbeat; the table armed no heartbeat timer and sent no ping.
    let heartbeat = |e: &Effect| match e {
        Effect::ArmTimer { timer, .. } | Effect::CancelTimer { timer } => {
            matches!(timer.kind, TimerKind::Heartbeat | TimerKind::PongDeadline)
        }
        Effect::SendPing { .. } => true,
        _ => false,
    };
    match outcome {
        Outcome::Transition(mut t) => {
            t.effects.retain(|e| !heartbeat(e));
            Outcome::Transition(t)
        }
        Outcome::Effects(mut effects) => {
            effects.retain(|e| !heartbeat(e));
            if effects.is_empty() { Outcome::Ignored(Ignored::NotExpected) } else { Outcome::Effects(effects) }
        }
        other => other,
    }
}

/// The version of the transition table. Each log records the version it was
/// written under (as it records its policy), and `verify` replays each record
/// under its own version; a version is added whenever the table decides any
/// input differently, and the old behaviour stays reproducible through
/// [`step_under`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct RulesVersion(pub u16);

impl RulesVersion {
    /// The first table (to 2026-11-30): the transport kept the heartbeat
    /// itself, so no `Heartbeat`/`PongDeadline` timer or ping appears in its effects.
    pub const V1: Self = Self(1);
    /// Heartbeats in the table (R7 as timers: `Heartbeat`, `PongDeadline`, `SendPing`).
    pub const V2: Self = Self(2);
    /// Full jitter spreads even the first retry: the draw reaches the next
    /// exponential step, not the current one.
    pub const V3: Self = Self(3);
    /// Protocol sessions: the peer's reconnect request (R13), an invalid
    /// session (R14), a heartbeat schedule the protocol sets (R7), and the
    /// close action that reconnects without resume data. Earlier versions
    /// ignore the three inputs (no log of theirs holds one).
    pub const V4: Self = Self(4);
    /// A handshake step taken after a fleet-wide wait restarts the connect
    /// deadline (R15). Earlier versions ignore the input (no log of theirs holds one).
    pub const V5: Self = Self(5);
    /// The rules of this build.
    pub const CURRENT: Self = Self::V5;
    /// Every version, oldest first.
    pub const ALL: [Self; 5] = [Self::V1, Self::V2, Self::V3, Self::V4, Self::V5];

    /// Whether this build can replay records of this version.
    pub fn is_known(self) -> bool {
        Self::ALL.contains(&self)
    }
}

impl fmt::Display for RulesVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "rules v{}", self.0)
    }
}

fn table(
    name: &InstanceName,
    instance: &Instance,
    input: &Input,
    policy: &Policy,
    now: Timestamp,
    rules: RulesVersion,
) -> Outcome {
    let cx = Cx { name, g: instance.generation, policy, now, rules };
    let rules = cx.rules;
    // R12: a signal, completion or timer of another connection never moves this one.
    if let Some(input_generation) = input.generation()
        && input_generation != cx.g
    {
        return Outcome::Ignored(Ignored::Stale { input: input_generation, current: cx.g });
    }
    use Input as I;
    use State as S;
    match (&instance.state, input) {
        // R1: nothing leaves Removed. A second delete is a no-op success (R2).
        (S::Removed { .. }, I::Delete) => ignored(Ignored::AlreadyRemoved),
        (S::Removed { .. }, I::Connect | I::Logout | I::Restart) => Outcome::Rejected(Rejection::Removed),
        (S::Removed { .. }, _) => ignored(Ignored::NotExpected),

        // ---- host: connect / restart ----
        // R3: an explicit connect is what re-enables connecting after a logout (#2560).
        (S::Closed { resume, .. }, I::Connect | I::Restart) => cx.attempt(0, resume.clone(), vec![]),
        (S::Connecting { phase: Phase::Backoff { .. }, resume, .. }, I::Connect | I::Restart) => {
            // R9: the pending reconnect timer is cancelled, so exactly one attempt starts.
            cx.attempt(0, resume.clone(), vec![cx.cancel(TimerKind::Reconnect)])
        }
        (S::Zombie { identity, .. }, I::Connect | I::Restart) => {
            cx.attempt(0, Some(identity.clone()), vec![cx.cancel(TimerKind::Reconnect)])
        }
        (S::Connecting { .. } | S::Open { .. }, I::Connect) => ignored(Ignored::AlreadyConnecting),
        (S::Connecting { resume, .. }, I::Restart) => {
            // R9: the old socket is closed before the new one opens: never two live sockets.
            cx.attempt(0, resume.clone(), vec![cx.cancel(TimerKind::Connect), cx.close(StatusCode::RESTART)])
        }
        (S::Open { identity, .. }, I::Restart) => {
            let mut effects = cx.stop_heartbeat();
            effects.push(cx.close(StatusCode::RESTART));
            cx.attempt(0, Some(identity.clone()), effects)
        }
        (S::Closing { intent, .. }, I::Connect | I::Restart) => {
            Outcome::Rejected(Rejection::Closing { intent: *intent })
        }

        // ---- host: logout (R3, R5) and delete (R2) ----
        (S::Open { .. }, I::Logout | I::Delete) => {
            let mut effects = cx.stop_heartbeat();
            effects.push(Effect::SendLogout { generation: cx.g });
            effects.push(cx.arm(TimerKind::Logout, policy.timeouts.logout));
            cx.go(S::Closing { intent: intent_of(input), step: ClosingStep::LoggingOut }, effects)
        }
        (S::Connecting { phase: Phase::Handshaking | Phase::Pairing { .. }, .. }, I::Logout | I::Delete) => {
            // No session to log out of: close the socket, bounded by the close timer.
            let effects = vec![cx.cancel(TimerKind::Connect)];
            cx.close_socket(intent_of(input), LogoutOutcome::NotSent, effects)
        }
        (S::Connecting { phase: Phase::Backoff { .. }, .. }, I::Logout | I::Delete) => {
            cx.finish_closing(intent_of(input), LogoutOutcome::NotSent, None, vec![cx.cancel(TimerKind::Reconnect)])
        }
        // R7: logout and delete of a zombie never wait on its dead socket.
        (S::Zombie { .. }, I::Logout | I::Delete) => {
            cx.finish_closing(intent_of(input), LogoutOutcome::NotSent, None, vec![cx.cancel(TimerKind::Reconnect)])
        }
        (S::Closed { resume: Some(_), .. }, I::Logout) => {
            // A logout of a closed instance drops the credentials it would resume with.
            cx.finish_closing(Intent::Logout, LogoutOutcome::NotSent, None, vec![])
        }
        (S::Closed { resume: None, .. }, I::Logout) => ignored(Ignored::AlreadyClosed),
        (S::Closed { .. }, I::Delete) => cx.finish_closing(Intent::Delete, LogoutOutcome::NotSent, None, vec![]),
        (S::Closing { intent: Intent::Logout, .. }, I::Logout) => ignored(Ignored::LogoutInProgress),
        (S::Closing { intent: Intent::Delete, .. }, I::Logout | I::Delete) => ignored(Ignored::DeleteInProgress),
        (S::Closing { intent: Intent::Logout, step }, I::Delete) => {
            // A delete takes over a logout where it is; its timers stay armed.
            cx.go(S::Closing { intent: Intent::Delete, step: step.clone() }, vec![])
        }

        // ---- transport: opened, pairing ----
        (
            S::Connecting { phase: Phase::Handshaking | Phase::Pairing { .. }, retries, .. },
            I::TransportOpened { identity, .. },
        ) => {
            match identity {
                // R6: no identity, no Open. The connect timer still bounds the wait.
                None => ignored(Ignored::MissingIdentity),
                // R7: an open connection is pinged, starting one interval from now.
                Some(identity) => cx.go(
                    S::Open { identity: identity.clone(), since: now, retries: *retries },
                    vec![cx.cancel(TimerKind::Connect), cx.arm(TimerKind::Heartbeat, policy.heartbeat.interval)],
                ),
            }
        }
        // R15: a step the transport took after waiting for a fleet-wide permit
        // (a paced IDENTIFY, a paced connect) starts the connect deadline again:
        // the wait was the fleet's, not a peer that does not answer.
        (S::Connecting { phase: Phase::Handshaking, .. }, I::HandshakeStep { .. }) if rules >= RulesVersion::V5 => {
            Outcome::Effects(vec![cx.arm(TimerKind::Connect, policy.timeouts.connect)])
        }
        (_, I::HandshakeStep { .. }) => ignored(Ignored::NotExpected),
        (
            S::Connecting { phase: Phase::Handshaking | Phase::Pairing { .. }, retries, resume },
            I::PairingCode { .. },
        ) => {
            let codes = match &instance.state {
                S::Connecting { phase: Phase::Pairing { codes }, .. } => codes.saturating_add(1),
                _ => 1,
            };
            if codes > policy.pairing_codes_max {
                let effects = vec![cx.cancel(TimerKind::Connect), cx.close(StatusCode::NORMAL)];
                let cause = ClosedCause::PairingRefused { codes: codes - 1 };
                return cx.go(S::Closed { cause, status: None, resume: resume.clone() }, effects);
            }
            // Each code gets its own lifetime: re-arming replaces the connect timer.
            let effects =
                vec![Effect::ArmTimer { timer: cx.timer(TimerKind::Connect), after: policy.timeouts.pairing_code }];
            cx.go(S::Connecting { phase: Phase::Pairing { codes }, retries: *retries, resume: resume.clone() }, effects)
        }
        (_, I::TransportOpened { .. } | I::PairingCode { .. }) => ignored(Ignored::NotExpected),

        // ---- transport: the connection ended or died ----
        (
            S::Connecting { phase: Phase::Handshaking | Phase::Pairing { .. }, retries, resume },
            I::TransportClosed { status, .. } | I::TransportClosedV1 { status, .. },
        ) => cx.lost(*status, ClosePhase::BeforeOpen, *retries, resume.clone(), vec![cx.cancel(TimerKind::Connect)]),
        // (No pong deadline here: the core pings only open connections.)
        (
            S::Connecting { phase: Phase::Handshaking | Phase::Pairing { .. }, retries, resume },
            I::WriteFailed { .. } | I::HeartbeatMissed { .. },
        ) => {
            let effects = vec![cx.cancel(TimerKind::Connect), cx.abort()];
            cx.lost(None, ClosePhase::BeforeOpen, *retries, resume.clone(), effects)
        }
        (
            S::Open { identity, since, retries },
            I::TransportClosed { status, .. } | I::TransportClosedV1 { status, .. },
        ) => {
            let retries = cx.retries_after_open(*since, *retries);
            cx.lost(*status, ClosePhase::AfterOpen, retries, Some(identity.clone()), cx.stop_heartbeat())
        }
        // R7: the heartbeat. A ping every interval after the last pong; the pong is due within the deadline.
        (S::Open { .. }, I::TimerFired { timer }) if timer.kind == TimerKind::Heartbeat => Outcome::Effects(vec![
            Effect::SendPing { generation: cx.g },
            cx.arm(TimerKind::PongDeadline, policy.heartbeat.deadline),
        ]),
        (S::Open { .. }, I::Pong { .. }) => Outcome::Effects(vec![
            cx.cancel(TimerKind::PongDeadline),
            cx.arm(TimerKind::Heartbeat, policy.heartbeat.interval),
        ]),
        // R7: a protocol whose heartbeats are its own frames sets the schedule; its acknowledgement is the pong.
        (S::Open { .. }, I::HeartbeatDue { after, .. }) if rules >= RulesVersion::V4 => {
            Outcome::Effects(vec![cx.cancel(TimerKind::PongDeadline), cx.arm(TimerKind::Heartbeat, *after)])
        }
        (_, I::Pong { .. } | I::HeartbeatDue { .. }) => ignored(Ignored::NotExpected),
        // R13: the peer asks for a new connection: one new attempt at once, resuming; it counts toward giving up.
        (S::Open { identity, since, retries }, I::ReconnectRequested { .. }) if rules >= RulesVersion::V4 => {
            let retries = cx.retries_after_open(*since, *retries);
            let mut effects = cx.stop_heartbeat();
            effects.push(cx.close(StatusCode::RESTART));
            cx.requested(retries, Some(identity.clone()), None, effects)
        }
        (
            S::Connecting { phase: Phase::Handshaking | Phase::Pairing { .. }, retries, resume },
            I::ReconnectRequested { .. },
        ) if rules >= RulesVersion::V4 => {
            let effects = vec![cx.cancel(TimerKind::Connect), cx.close(StatusCode::RESTART)];
            cx.requested(*retries, resume.clone(), None, effects)
        }
        // R14: an invalid session is never resumed; the next attempt, after the protocol's delay, starts without it.
        (S::Open { since, retries, .. }, I::SessionInvalid { retry_after, .. }) if rules >= RulesVersion::V4 => {
            let retries = cx.retries_after_open(*since, *retries);
            let mut effects = cx.stop_heartbeat();
            effects.push(cx.close(StatusCode::RESTART));
            cx.requested(retries, None, Some(*retry_after), effects)
        }
        (
            S::Connecting { phase: Phase::Handshaking | Phase::Pairing { .. }, retries, .. },
            I::SessionInvalid { retry_after, .. },
        ) if rules >= RulesVersion::V4 => {
            let effects = vec![cx.cancel(TimerKind::Connect), cx.close(StatusCode::RESTART)];
            cx.requested(*retries, None, Some(*retry_after), effects)
        }
        (_, I::ReconnectRequested { .. } | I::SessionInvalid { .. }) => ignored(Ignored::NotExpected),
        // R7: a missed heartbeat or a failed write while Open makes a zombie at once.
        (S::Open { identity, since, retries }, i) if dead(i) => {
            let cause = match input {
                I::WriteFailed { error, .. } => ZombieCause::WriteFailed { error: error.clone() },
                _ => ZombieCause::HeartbeatMissed,
            };
            let retries = cx.retries_after_open(*since, *retries);
            let after = match cx.loss_decision(None, ClosePhase::AfterOpen, retries) {
                Loss::Retry { delay, .. } => delay,
                Loss::Stop | Loss::Remove | Loss::GiveUp => std::time::Duration::ZERO,
            };
            let mut effects = cx.stop_heartbeat();
            effects.extend([cx.abort(), cx.arm(TimerKind::Reconnect, after)]);
            cx.go(S::Zombie { since: now, cause, identity: identity.clone(), retries }, effects)
        }
        (
            S::Closing { intent, step: ClosingStep::LoggingOut },
            I::TransportClosed { status, .. } | I::TransportClosedV1 { status, .. },
        ) => cx.finish_closing(*intent, LogoutOutcome::Unconfirmed, *status, vec![cx.cancel(TimerKind::Logout)]),
        (S::Closing { intent, step: ClosingStep::LoggingOut }, i) if dead(i) => {
            let error = match input {
                I::WriteFailed { error, .. } => error.clone(),
                _ => Reason::new("heartbeat missed while logging out"),
            };
            let effects = vec![cx.cancel(TimerKind::Logout), cx.abort()];
            cx.finish_closing(*intent, LogoutOutcome::Failed { error }, None, effects)
        }
        (
            S::Closing { intent, step: ClosingStep::ClosingSocket { logout } },
            I::TransportClosed { status, .. } | I::TransportClosedV1 { status, .. },
        ) => cx.finish_closing(*intent, logout.clone(), *status, vec![cx.cancel(TimerKind::Close)]),
        (S::Closing { intent, step: ClosingStep::ClosingSocket { logout } }, I::CloseFinished { .. }) => {
            cx.finish_closing(*intent, logout.clone(), None, vec![cx.cancel(TimerKind::Close)])
        }
        (S::Closing { intent, step: ClosingStep::ClosingSocket { logout } }, i) if dead(i) => {
            cx.finish_closing(*intent, logout.clone(), None, vec![cx.cancel(TimerKind::Close), cx.abort()])
        }
        (
            _,
            I::TransportClosed { .. }
            | I::TransportClosedV1 { .. }
            | I::WriteFailed { .. }
            | I::HeartbeatMissed { .. }
            | I::CloseFinished { .. },
        ) => ignored(Ignored::NotExpected),

        // ---- completions: logout and cleanup ----
        (S::Closing { intent, step: ClosingStep::LoggingOut }, I::LogoutConfirmed { .. }) => {
            cx.close_socket(*intent, LogoutOutcome::Confirmed, vec![cx.cancel(TimerKind::Logout)])
        }
        // R5: a logout that throws is recorded and the socket abandoned; closing goes on.
        (S::Closing { intent, step: ClosingStep::LoggingOut }, I::LogoutFailed { error, .. }) => {
            let effects = vec![cx.cancel(TimerKind::Logout), cx.abort()];
            cx.finish_closing(*intent, LogoutOutcome::Failed { error: error.clone() }, None, effects)
        }
        (_, I::LogoutConfirmed { .. } | I::LogoutFailed { .. }) => ignored(Ignored::NotExpected),
        // R2: cleanup failures are recorded in Removed, never block it.
        (S::Closing { intent: Intent::Delete, step: ClosingStep::CleaningUp }, I::CleanupFinished { steps }) => cx.go(
            S::Removed { cleanup: CleanupOutcome::Finished { steps: steps.clone() } },
            vec![cx.cancel(TimerKind::Cleanup)],
        ),
        (_, I::CleanupFinished { .. }) => ignored(Ignored::NotExpected),

        // ---- timers (their generation was checked above) ----
        (S::Connecting { phase: Phase::Backoff { .. }, retries, resume }, I::TimerFired { timer })
            if timer.kind == TimerKind::Reconnect =>
        {
            cx.attempt(*retries, resume.clone(), vec![])
        }
        (S::Zombie { identity, retries, .. }, I::TimerFired { timer }) if timer.kind == TimerKind::Reconnect => {
            // R7: from Zombie, reconnect if the policy allows, else give up or remove.
            match cx.loss_decision(None, ClosePhase::AfterOpen, *retries) {
                Loss::Retry { attempt, fresh, .. } => cx.attempt(attempt, (!fresh).then(|| identity.clone()), vec![]),
                decision => cx.settle(decision, None, *retries, Some(identity.clone()), vec![]),
            }
        }
        (
            S::Connecting { phase: Phase::Handshaking | Phase::Pairing { .. }, retries, resume },
            I::TimerFired { timer },
        ) if timer.kind == TimerKind::Connect => {
            // A connect or pairing time-out is a 408 the engine raises itself, judged by the policy like any close.
            let effects = vec![cx.close(StatusCode::TIMEOUT)];
            cx.lost(Some(StatusCode::TIMEOUT), ClosePhase::BeforeOpen, *retries, resume.clone(), effects)
        }
        // R5: a logout that hangs is given up on; the socket is closed regardless.
        (S::Closing { intent, step: ClosingStep::LoggingOut }, I::TimerFired { timer })
            if timer.kind == TimerKind::Logout =>
        {
            cx.close_socket(*intent, LogoutOutcome::TimedOut, vec![])
        }
        (S::Closing { intent, step: ClosingStep::ClosingSocket { logout } }, I::TimerFired { timer })
            if timer.kind == TimerKind::Close =>
        {
            cx.finish_closing(*intent, logout.clone(), None, vec![cx.abort()])
        }
        // R2: a cleanup that hangs does not keep the instance alive.
        (S::Closing { intent: Intent::Delete, step: ClosingStep::CleaningUp }, I::TimerFired { timer })
            if timer.kind == TimerKind::Cleanup =>
        {
            cx.go(S::Removed { cleanup: CleanupOutcome::TimedOut }, vec![])
        }
        (_, I::TimerFired { .. }) => ignored(Ignored::NotExpected),

        // ---- the runtime: restart recovery (R11) and caught panics (R10) ----
        (S::Open { identity, .. } | S::Zombie { identity, .. }, I::Recovered) => cx.recover(Some(identity.clone())),
        (S::Connecting { resume, .. }, I::Recovered) => cx.recover(resume.clone()),
        (S::Closing { intent: Intent::Logout, .. }, I::Recovered) => {
            cx.finish_closing(Intent::Logout, LogoutOutcome::Interrupted, None, vec![])
        }
        (S::Closing { intent: Intent::Delete, .. }, I::Recovered) => {
            // The cleanup restarts from its first step: host steps must be idempotent.
            cx.finish_closing(Intent::Delete, LogoutOutcome::Interrupted, None, vec![])
        }
        (S::Closed { .. }, I::Recovered) => ignored(Ignored::NotExpected),
        (S::Closing { intent: Intent::Delete, .. }, I::Panicked { message }) => {
            // R2 holds even when our own task fails mid-delete.
            let effects = cx.abort_if_socket(&instance.state);
            cx.go(S::Removed { cleanup: CleanupOutcome::Aborted { message: message.clone() } }, effects)
        }
        (state, I::Panicked { message }) => {
            let resume = match state {
                S::Open { identity, .. } | S::Zombie { identity, .. } => Some(identity.clone()),
                S::Connecting { resume, .. } | S::Closed { resume, .. } => resume.clone(),
                S::Closing { .. } | S::Removed { .. } => None,
            };
            let cause = ClosedCause::Panicked { message: message.clone() };
            let mut effects = if matches!(state, S::Open { .. }) { cx.stop_heartbeat() } else { vec![] };
            effects.extend(cx.abort_if_socket(state));
            cx.go(S::Closed { cause, status: None, resume }, effects)
        }
    }
}

fn ignored(why: Ignored) -> Outcome {
    Outcome::Ignored(why)
}

/// The connection is dead (R7): a write failed, or a heartbeat went unanswered
/// (reported by a transport, or the core's own pong deadline).
fn dead(input: &Input) -> bool {
    matches!(input, Input::WriteFailed { .. }) || input.is_heartbeat_missed()
}

fn intent_of(input: &Input) -> Intent {
    if matches!(input, Input::Delete) { Intent::Delete } else { Intent::Logout }
}

/// What to do about a lost connection, after the policy and the give-up limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Loss {
    /// `fresh`: without the resume data (R14).
    Retry {
        attempt: u32,
        delay: std::time::Duration,
        fresh: bool,
    },
    Stop,
    Remove,
    GiveUp,
}

/// The context of one step: the helpers every arm shares.
struct Cx<'a> {
    name: &'a InstanceName,
    g: Generation,
    policy: &'a Policy,
    now: Timestamp,
    rules: RulesVersion,
}

impl Cx<'_> {
    fn go(&self, to: State, effects: Vec<Effect>) -> Outcome {
        Outcome::Transition(Transition { generation: self.g, to, effects })
    }

    fn timer(&self, kind: TimerKind) -> Timer {
        Timer { kind, generation: self.g }
    }

    fn cancel(&self, kind: TimerKind) -> Effect {
        Effect::CancelTimer { timer: self.timer(kind) }
    }

    fn arm(&self, kind: TimerKind, after: std::time::Duration) -> Effect {
        Effect::ArmTimer { timer: self.timer(kind), after }
    }

    /// Leaving `Open`: its heartbeat timers go with it.
    fn stop_heartbeat(&self) -> Vec<Effect> {
        vec![self.cancel(TimerKind::Heartbeat), self.cancel(TimerKind::PongDeadline)]
    }

    fn close(&self, status: StatusCode) -> Effect {
        Effect::CloseTransport { generation: self.g, status }
    }

    fn abort(&self) -> Effect {
        Effect::AbortTransport { generation: self.g }
    }

    fn abort_if_socket(&self, state: &State) -> Vec<Effect> {
        if state.has_socket() { vec![self.abort()] } else { vec![] }
    }

    /// A new connection attempt with the next generation (R9: one in flight;
    /// `prior` closes or cancels whatever the old generation had).
    fn attempt(&self, retries: u32, resume: Option<Identity>, mut prior: Vec<Effect>) -> Outcome {
        let generation = self.g.next();
        prior.push(Effect::OpenTransport { generation, resume: resume.clone() });
        let timer = Timer { kind: TimerKind::Connect, generation };
        prior.push(Effect::ArmTimer { timer, after: self.policy.timeouts.connect });
        Outcome::Transition(Transition {
            generation,
            to: State::Connecting { phase: Phase::Handshaking, retries, resume },
            effects: prior,
        })
    }

    /// The retry counter resets only after a session stayed open for the stable period.
    fn retries_after_open(&self, since: Timestamp, retries: u32) -> u32 {
        if self.now.saturating_since(since) >= self.policy.backoff.stable_period { 0 } else { retries }
    }

    fn loss_decision(&self, status: Option<StatusCode>, phase: ClosePhase, retries: u32) -> Loss {
        let (now, fresh) = match self.policy.close_action(status, phase) {
            CloseAction::Stop => return Loss::Stop,
            CloseAction::Remove => return Loss::Remove,
            CloseAction::ReconnectNow => (true, false),
            CloseAction::Reconnect => (false, false),
            CloseAction::ReconnectFresh => (false, true),
        };
        let attempt = retries.saturating_add(1);
        // R9: a give-up limit ends in Closed.
        if attempt > self.policy.backoff.attempts_max {
            return Loss::GiveUp;
        }
        let delay = if now {
            std::time::Duration::ZERO
        } else {
            self.policy.backoff_delay_under(self.rules, self.name, attempt)
        };
        Loss::Retry { attempt, delay, fresh }
    }

    /// The peer asked for the next attempt (R13, R14): it starts after
    /// `delay` (at once when `None`), counted toward the give-up limit (R9)
    /// so a peer that asks forever cannot loop the instance without end.
    fn requested(
        &self,
        retries: u32,
        resume: Option<Identity>,
        delay: Option<std::time::Duration>,
        effects: Vec<Effect>,
    ) -> Outcome {
        let attempt = retries.saturating_add(1);
        let decision = if attempt > self.policy.backoff.attempts_max {
            Loss::GiveUp
        } else {
            Loss::Retry { attempt, delay: delay.unwrap_or_default(), fresh: false }
        };
        self.settle(decision, None, retries, resume, effects)
    }

    /// A connection ended (or was given up on) in `phase` with `status`: R4 and R9.
    fn lost(
        &self,
        status: Option<StatusCode>,
        phase: ClosePhase,
        retries: u32,
        resume: Option<Identity>,
        effects: Vec<Effect>,
    ) -> Outcome {
        let decision = self.loss_decision(status, phase, retries);
        self.settle(decision, status, retries, resume, effects)
    }

    fn settle(
        &self,
        decision: Loss,
        status: Option<StatusCode>,
        retries: u32,
        resume: Option<Identity>,
        mut effects: Vec<Effect>,
    ) -> Outcome {
        match decision {
            Loss::Retry { fresh: true, attempt, delay } => {
                self.settle(Loss::Retry { attempt, delay, fresh: false }, status, retries, None, effects)
            }
            Loss::Retry { attempt, delay, .. } if delay.is_zero() => self.attempt(attempt, resume, effects),
            Loss::Retry { attempt, delay, .. } => {
                effects.push(Effect::ArmTimer { timer: self.timer(TimerKind::Reconnect), after: delay });
                let phase = Phase::Backoff { until: self.now.saturating_add(delay) };
                self.go(State::Connecting { phase, retries: attempt, resume }, effects)
            }
            // R4: a status final for the phase ends in Closed.
            Loss::Stop => self.go(State::Closed { cause: ClosedCause::FinalStatus, status, resume }, effects),
            Loss::GiveUp => {
                self.go(State::Closed { cause: ClosedCause::GaveUp { attempts: retries }, status, resume }, effects)
            }
            Loss::Remove => self.finish_closing(Intent::Delete, LogoutOutcome::NotSent, status, effects),
        }
    }

    /// Close the live socket, bounded by the close timer.
    fn close_socket(&self, intent: Intent, logout: LogoutOutcome, mut effects: Vec<Effect>) -> Outcome {
        effects.push(self.close(StatusCode::NORMAL));
        effects.push(Effect::ArmTimer { timer: self.timer(TimerKind::Close), after: self.policy.timeouts.close });
        self.go(State::Closing { intent, step: ClosingStep::ClosingSocket { logout } }, effects)
    }

    /// The socket is gone: a logout ends in Closed (R5), a delete goes on to cleanup (R2).
    fn finish_closing(
        &self,
        intent: Intent,
        logout: LogoutOutcome,
        status: Option<StatusCode>,
        mut effects: Vec<Effect>,
    ) -> Outcome {
        match intent {
            Intent::Logout => {
                self.go(State::Closed { cause: ClosedCause::LoggedOut { logout }, status, resume: None }, effects)
            }
            Intent::Delete => {
                effects.push(Effect::RunCleanup);
                effects.push(Effect::ArmTimer {
                    timer: self.timer(TimerKind::Cleanup),
                    after: self.policy.timeouts.cleanup,
                });
                self.go(State::Closing { intent, step: ClosingStep::CleaningUp }, effects)
            }
        }
    }

    /// R11: after a restart no socket of the last run is alive; the policy decides.
    fn recover(&self, resume: Option<Identity>) -> Outcome {
        if self.policy.reconnect_after_restart {
            self.attempt(0, resume, vec![])
        } else {
            self.go(State::Closed { cause: ClosedCause::NotRecovered, status: None, resume }, vec![])
        }
    }
}
