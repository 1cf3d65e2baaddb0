//! The table, cell by cell, against what the rules say — over every sample
//! state × every sample input × every exploration policy of the catalog.
//!
//! The expectations are written from the rules, not from today's outputs:
//! [`verdict`] says, for each (state, input), whether the rules move the
//! instance, keep it with upkeep, ignore the input (and why) or refuse it;
//! [`consequences`] checks what a move must carry (an abandoned socket, the
//! real status, a recorded failure, the timer that bounds the next wait). A
//! rule dropped, a guard loosened, or an arm answered by the fall-through
//! disagrees with one of them.

use instance_lifecycle::machine::catalog::{exploration_policies, sample_inputs, sample_states};
use instance_lifecycle::machine::{
    ClosedCause, ClosingStep, Effect, Generation, Ignored, Input, Instance, Intent, LogoutOutcome, Outcome, Phase,
    Rejection, State, TimerKind, Timestamp, ZombieCause, step,
};
use instance_lifecycle::testing::waits_on;

use crate::support::name;

/// What the rules decide, without the details.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Verdict {
    Moves,
    Upkeep,
    Ignored(Ignored),
    Rejected(Rejection),
}

use Verdict::{Moves, Upkeep};

fn not_expected() -> Verdict {
    Verdict::Ignored(Ignored::NotExpected)
}

/// A socket that may still carry a session or a logout: handshaking,
/// pairing, open, or closing with the socket still there.
fn connected(s: &State) -> bool {
    matches!(
        s,
        State::Connecting { phase: Phase::Handshaking | Phase::Pairing { .. }, .. }
            | State::Open { .. }
            | State::Closing { step: ClosingStep::LoggingOut | ClosingStep::ClosingSocket { .. }, .. }
    )
}

/// The verdict of the rules on `input` (of the instance's own generation) in `state`.
fn verdict(state: &State, input: &Input) -> Verdict {
    use Input as I;
    use State as S;
    let backoff = matches!(state, S::Connecting { phase: Phase::Backoff { .. }, .. });
    let attempting = matches!(state, S::Connecting { .. }) && !backoff;
    let closing = |intent| matches!(state, S::Closing { intent: i, .. } if *i == intent);
    if let S::Removed { .. } = state {
        // R1: nothing leaves Removed; a second delete is a no-op (R2).
        return match input {
            I::Delete => Verdict::Ignored(Ignored::AlreadyRemoved),
            I::Connect | I::Logout | I::Restart => Verdict::Rejected(Rejection::Removed),
            _ => not_expected(),
        };
    }
    match input {
        I::Connect => match state {
            S::Closing { intent, .. } => Verdict::Rejected(Rejection::Closing { intent: *intent }),
            S::Open { .. } => Verdict::Ignored(Ignored::AlreadyConnecting),
            S::Connecting { .. } if attempting => Verdict::Ignored(Ignored::AlreadyConnecting),
            _ => Moves,
        },
        I::Restart => match state {
            S::Closing { intent, .. } => Verdict::Rejected(Rejection::Closing { intent: *intent }),
            _ => Moves,
        },
        I::Logout => match state {
            S::Closed { resume: None, .. } => Verdict::Ignored(Ignored::AlreadyClosed),
            _ if closing(Intent::Logout) => Verdict::Ignored(Ignored::LogoutInProgress),
            _ if closing(Intent::Delete) => Verdict::Ignored(Ignored::DeleteInProgress),
            _ => Moves,
        },
        I::Delete if closing(Intent::Delete) => Verdict::Ignored(Ignored::DeleteInProgress),
        I::Delete => Moves,
        I::TransportOpened { identity, .. } if attempting => {
            if identity.is_some() {
                Moves
            } else {
                Verdict::Ignored(Ignored::MissingIdentity)
            }
        }
        I::PairingCode { .. } if attempting => Moves,
        I::TransportClosed { .. } | I::TransportClosedV1 { .. } | I::WriteFailed { .. } | I::HeartbeatMissed { .. }
            if connected(state) =>
        {
            Moves
        }
        I::Pong { .. } | I::HeartbeatDue { .. } if matches!(state, S::Open { .. }) => Upkeep,
        // R15: a step after a fleet-wide wait restarts the connect deadline of a handshake.
        I::HandshakeStep { .. } if matches!(state, S::Connecting { phase: Phase::Handshaking, .. }) => Upkeep,
        // R13, R14: the peer's request moves a connection that is live (open or handshaking).
        I::ReconnectRequested { .. } | I::SessionInvalid { .. }
            if matches!(state, S::Open { .. })
                || (attempting && !matches!(state, S::Connecting { phase: Phase::Backoff { .. }, .. })) =>
        {
            Moves
        }
        I::LogoutConfirmed { .. } | I::LogoutFailed { .. }
            if matches!(state, S::Closing { step: ClosingStep::LoggingOut, .. }) =>
        {
            Moves
        }
        I::CloseFinished { .. } if matches!(state, S::Closing { step: ClosingStep::ClosingSocket { .. }, .. }) => Moves,
        I::CleanupFinished { .. }
            if matches!(state, S::Closing { intent: Intent::Delete, step: ClosingStep::CleaningUp }) =>
        {
            Moves
        }
        I::TimerFired { timer } => match timer.kind {
            // The timer that bounds the state's wait ends it; nothing else does.
            kind if waits_on(state) == Some(kind) => Moves,
            TimerKind::Heartbeat if matches!(state, S::Open { .. }) => Upkeep,
            // A pong overdue: the connection is dead where a connection still counts (R7).
            TimerKind::PongDeadline
                if matches!(state, S::Open { .. })
                    || matches!(
                        state,
                        S::Closing { step: ClosingStep::LoggingOut | ClosingStep::ClosingSocket { .. }, .. }
                    ) =>
            {
                Moves
            }
            _ => not_expected(),
        },
        I::Recovered if matches!(state, S::Closed { .. }) => not_expected(),
        I::Recovered | I::Panicked { .. } => Moves,
        _ => not_expected(),
    }
}

/// What a move must carry, by the rule that makes it.
fn consequences(from: &Instance, input: &Input, to: &Instance, effects: &[Effect]) -> Result<(), String> {
    let g = from.generation;
    let aborts = effects.iter().any(|e| matches!(e, Effect::AbortTransport { generation } if *generation == g));
    let dead = matches!(input, Input::WriteFailed { .. } | Input::HeartbeatMissed { .. })
        || matches!(input, Input::TimerFired { timer } if timer.kind == TimerKind::PongDeadline);
    // R7: a dead connection is abandoned at once, never waited on.
    if dead && !aborts {
        return Err("a dead connection was not aborted".into());
    }
    if dead && matches!(from.state, State::Open { .. }) {
        let cause_ok = match (&to.state, input) {
            (State::Zombie { cause: ZombieCause::WriteFailed { error }, .. }, Input::WriteFailed { error: e, .. }) => {
                error == e
            }
            (State::Zombie { cause: ZombieCause::HeartbeatMissed, .. }, i) => !matches!(i, Input::WriteFailed { .. }),
            _ => false,
        };
        if !cause_ok {
            return Err(format!("Open + {input:?} must be a Zombie with that cause, got {}", to.state));
        }
    }
    // R5: a logout that failed on the way is recorded with its error.
    if let (
        State::Closing { step: ClosingStep::LoggingOut, .. },
        Input::LogoutFailed { error, .. } | Input::WriteFailed { error, .. },
    ) = (&from.state, input)
    {
        let recorded = match &to.state {
            State::Closed { cause: ClosedCause::LoggedOut { logout: LogoutOutcome::Failed { error: e } }, .. } => {
                e == error
            }
            State::Closing { step: ClosingStep::CleaningUp, .. } => true,
            _ => false,
        };
        if !recorded {
            return Err(format!("a failed logout's error is not in {}", to.state));
        }
    }
    // R5: the status recorded is the real close's, never a constant.
    if let (Some((_, status, _)), State::Closed { status: recorded, cause, .. }) = (input.closed(), &to.state)
        && !matches!(cause, ClosedCause::Panicked { .. })
        && *recorded != status
    {
        return Err(format!("closed with status {status:?}, recorded {recorded:?}"));
    }
    // R13 resumes with the session's data; R14 never does.
    let resume_of = |s: &State| match s {
        State::Open { identity, .. } => Some(identity.clone()),
        State::Connecting { resume, .. } | State::Closed { resume, .. } => resume.clone(),
        _ => None,
    };
    match input {
        Input::ReconnectRequested { .. } if resume_of(&to.state) != resume_of(&from.state) => {
            return Err(format!("a reconnect request lost the resume data: {}", to.state));
        }
        Input::SessionInvalid { .. } if resume_of(&to.state).is_some() => {
            return Err(format!("an invalid session kept its resume data: {}", to.state));
        }
        _ => {}
    }
    // Every wait the move ends in is bounded by a timer it arms (or that is already armed, for a delete taking over).
    if let Some(kind) = waits_on(&to.state) {
        let armed = effects.iter().any(
            |e| matches!(e, Effect::ArmTimer { timer, .. } if timer.kind == kind && timer.generation == to.generation),
        );
        let carried = from.state.kind() == to.state.kind()
            && waits_on(&from.state) == Some(kind)
            && !matches!(input, Input::TimerFired { .. });
        if !armed && !carried {
            return Err(format!("{} waits on {kind:?} but no such timer was armed", to.state));
        }
    }
    Ok(())
}

#[test]
fn every_cell_of_the_table_is_what_its_rule_says() {
    let n = name("table");
    let mut cells = 0;
    for policy in exploration_policies() {
        for state in sample_states() {
            let from = Instance { generation: Generation(3), state };
            for input in sample_inputs(from.generation) {
                cells += 1;
                let outcome = step(&n, &from, &input, &policy, Timestamp(60_000));
                let stale = input.generation().is_some_and(|g| g != from.generation);
                let expected = if stale {
                    Verdict::Ignored(Ignored::Stale {
                        input: input.generation().unwrap_or_default(),
                        current: from.generation,
                    })
                } else {
                    verdict(&from.state, &input)
                };
                let got = match &outcome {
                    Outcome::Transition(_) => Moves,
                    Outcome::Effects(_) => Upkeep,
                    Outcome::Ignored(why) => Verdict::Ignored(why.clone()),
                    Outcome::Rejected(why) => Verdict::Rejected(why.clone()),
                };
                assert_eq!(got, expected, "{} + {input:?} under {}", from.state, policy.name);
                if let Outcome::Transition(t) = &outcome {
                    let mut to = from.clone();
                    to.apply(t);
                    if let Err(broken) = consequences(&from, &input, &to, &t.effects) {
                        panic!("{} + {input:?} under {}: {broken}; effects {:?}", from.state, policy.name, t.effects);
                    }
                }
            }
        }
    }
    assert!(cells > 10_000, "only {cells} cells");
}

#[test]
fn every_reason_prints_distinct_and_nonempty() {
    let g = Generation(1);
    let ignored = [
        Ignored::Stale { input: Generation(0), current: g },
        Ignored::MissingIdentity,
        Ignored::AlreadyConnecting,
        Ignored::AlreadyClosed,
        Ignored::LogoutInProgress,
        Ignored::DeleteInProgress,
        Ignored::AlreadyRemoved,
        Ignored::NotExpected,
    ];
    let rejected = [
        Rejection::Removed,
        Rejection::Closing { intent: Intent::Logout },
        Rejection::Closing { intent: Intent::Delete },
    ];
    let texts: Vec<String> =
        ignored.iter().map(ToString::to_string).chain(rejected.iter().map(ToString::to_string)).collect();
    for t in &texts {
        assert!(t.len() > 5, "a reason too short to read: {t:?}");
    }
    let distinct: std::collections::BTreeSet<&String> = texts.iter().collect();
    assert_eq!(distinct.len(), texts.len(), "two reasons read the same: {texts:?}");
    assert!(texts[0].contains("g0") && texts[0].contains("g1"), "a stale reason names both generations: {}", texts[0]);
}

/// The policies the table is explored under are valid, and each has its own
/// name: a failing cell names the policy it failed under.
#[test]
fn exploration_policies_are_valid_and_named_apart() {
    let policies = exploration_policies();
    let mut names: Vec<&str> = policies.iter().map(|p| p.name.as_str()).collect();
    for p in &policies {
        assert_eq!(p.validate(), Ok(()), "{}", p.name);
    }
    names.sort_unstable();
    names.dedup();
    assert_eq!(names.len(), policies.len(), "names: {names:?}");
}
