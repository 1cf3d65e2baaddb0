//! One property per rule of the design brief that the pure core expresses.
//! Each runs random input sequences from random starting states under random
//! policies; a failure prints the seed proptest persisted and the minimal case.

use std::time::Duration;

use instance_lifecycle::machine::{
    CloseInitiator, ClosePhase, ClosedCause, Effect, Generation, Ignored, Input, Instance, Intent, Outcome, Phase,
    Rejection, State, StatusCode, TimerKind, Timestamp, step,
};
use instance_lifecycle::testing::{self, Driver, strategy};
use proptest::prelude::*;

use crate::support::{arms_reconnect, is_connecting, name, opens};

/// Inputs the runtime produces on its own (no host command, no restart event).
fn runtime_noise(g: Generation) -> impl Strategy<Value = Vec<NoiseOrTimer>> {
    prop::collection::vec(
        prop_oneof![
            4 => strategy::signal(g).prop_map(NoiseOrTimer::Signal),
            2 => Just(NoiseOrTimer::FireTimer),
        ],
        0..24,
    )
}

#[derive(Clone, Debug)]
enum NoiseOrTimer {
    Signal(Input),
    FireTimer,
}

/// Most signals go to the current generation, every fifth to the previous one.
fn retarget(input: &Input, d: &Driver, salt: usize) -> Input {
    let current = d.instance().generation;
    let g = if salt.is_multiple_of(5) { Generation(current.0.saturating_sub(1)) } else { current };
    testing::retarget(input, g)
}

fn apply_noise(d: &mut Driver, noise: &[NoiseOrTimer]) {
    for (i, n) in noise.iter().enumerate() {
        match n {
            NoiseOrTimer::Signal(s) => {
                let s = retarget(s, d, i);
                d.feed(s);
            }
            NoiseOrTimer::FireTimer => {
                d.fire_next_timer();
            }
        }
    }
}

fn config() -> ProptestConfig {
    ProptestConfig { cases: 512, ..ProptestConfig::default() }
}

proptest! {
    #![proptest_config(config())]

    /// R1: nothing leaves Removed; connect/logout/restart are rejected, a delete is a no-op.
    #[test]
    fn r1_removed_is_terminal(
        policy in strategy::policy(),
        start in strategy::instance(),
        inputs in prop::collection::vec(strategy::input(Generation(3)), 1..40),
    ) {
        let n = name("r1");
        let mut instance = start;
        let mut removed = false;
        for input in &inputs {
            let outcome = step(&n, &instance, input, &policy, Timestamp(1_000));
            if removed {
                prop_assert!(!matches!(outcome, Outcome::Transition(_)), "left Removed on {input:?}");
                if matches!(input, Input::Connect | Input::Logout | Input::Restart) {
                    prop_assert_eq!(outcome, Outcome::Rejected(Rejection::Removed));
                } else if *input == Input::Delete {
                    prop_assert_eq!(outcome, Outcome::Ignored(Ignored::AlreadyRemoved));
                }
                continue;
            }
            if let Outcome::Transition(t) = &outcome {
                instance.apply(t);
            }
            removed = matches!(instance.state, State::Removed { .. });
        }
    }

    /// R2: from every state, a delete reaches Removed within the sum of the
    /// logout, close and cleanup time-outs whatever the transport does; cleanup
    /// is requested exactly once; a second delete changes nothing.
    #[test]
    fn r2_delete_always_removes(
        policy in strategy::policy(),
        start in strategy::instance(),
        noise in runtime_noise(Generation(3)),
        commands in prop::collection::vec(strategy::command(), 0..4),
    ) {
        prop_assume!(!matches!(start.state, State::Removed { .. } | State::Closing { intent: Intent::Delete, .. }));
        let mut d = Driver::with_instance(name("r2"), policy.clone(), start);
        let deleted_at = d.now;
        let first = d.feed(Input::Delete);
        prop_assert!(matches!(first, Outcome::Transition(_)), "delete refused: {first:?}");
        let steps_before = d.steps.len() - 1;
        // The transport and the host do anything at all (throws, hangs, never answers)...
        apply_noise(&mut d, &noise);
        for c in &commands {
            let o = d.feed(c.clone());
            prop_assert!(!matches!(o, Outcome::Transition(ref t) if t.effects.iter().any(opens)), "{c:?} reconnected a deleted instance");
        }
        // ...and only the clock keeps going.
        d.run_timers(10);
        prop_assert!(matches!(d.instance().state, State::Removed { .. }), "not removed: {:?}", d.instance().state);
        let bound = policy.timeouts.logout + policy.timeouts.close + policy.timeouts.cleanup;
        prop_assert!(d.now.saturating_since(deleted_at) <= bound, "took {:?} > {bound:?}", d.now.saturating_since(deleted_at));
        let cleanups = d.steps[steps_before..].iter().flat_map(|s| &s.effects).filter(|e| **e == Effect::RunCleanup).count();
        prop_assert_eq!(cleanups, 1, "cleanup must be requested exactly once");
        let again = d.feed(Input::Delete);
        prop_assert_eq!(again, Outcome::Ignored(Ignored::AlreadyRemoved));
        prop_assert!(d.violations.is_empty(), "{:?}", d.violations);
    }

    /// R3: after a logout, nothing reconnects automatically until the host connects again.
    #[test]
    fn r3_logout_suppresses_reconnect(
        policy in strategy::policy(),
        start in strategy::instance(),
        noise in runtime_noise(Generation(3)),
        recovered in any::<bool>(),
    ) {
        let mut d = Driver::with_instance(name("r3"), policy, start);
        let outcome = d.feed(Input::Logout);
        prop_assume!(!matches!(outcome, Outcome::Rejected(_)));
        let mark = d.steps.len();
        apply_noise(&mut d, &noise);
        if recovered {
            d.feed(Input::Recovered);
        }
        d.run_timers(10);
        for s in &d.steps[mark..] {
            prop_assert!(!is_connecting(&s.to.state), "reconnected after logout on {:?}", s.input);
            prop_assert!(!s.effects.iter().any(opens), "opened a transport after logout on {:?}", s.input);
        }
        // The host can always connect again (Evolution API #2560).
        if matches!(d.instance().state, State::Closed { .. }) {
            let again = d.feed(Input::Connect);
            prop_assert!(matches!(again, Outcome::Transition(ref t) if t.effects.iter().any(opens)), "{again:?}");
        }
    }

    /// R4: a close whose status the policy marks final for the phase ends in
    /// Closed with that status and never reconnects on its own; other actions
    /// do what the table says.
    #[test]
    fn r4_no_reconnect_codes(
        policy in strategy::policy(),
        status in strategy::status(),
        open in any::<bool>(),
        identity in strategy::identity(),
        noise in runtime_noise(Generation(7)),
    ) {
        use instance_lifecycle::machine::CloseAction;
        let g = Generation(7);
        let expected_resume = open.then(|| identity.clone());
        let (state, phase) = if open {
            (State::Open { identity, since: Timestamp(0), retries: 0 }, ClosePhase::AfterOpen)
        } else {
            (State::Connecting { phase: Phase::Handshaking, retries: 0, resume: None }, ClosePhase::BeforeOpen)
        };
        let mut d = Driver::with_instance(name("r4"), policy.clone(), Instance { generation: g, state });
        let o = d.feed(Input::TransportClosed { initiator: CloseInitiator::Peer, generation: g, status, reason: "peer".into() });
        match policy.close_action(status, phase) {
            CloseAction::Stop => {
                prop_assert_eq!(&d.instance().state, &State::Closed {
                    cause: ClosedCause::FinalStatus,
                    status,
                    resume: expected_resume,
                });
                let mark = d.steps.len();
                apply_noise(&mut d, &noise);
                d.run_timers(10);
                prop_assert!(d.steps[mark..].iter().all(|s| !s.effects.iter().any(opens)), "reconnected after a final status");
            }
            CloseAction::Remove => prop_assert!(matches!(d.instance().state, State::Closing { intent: Intent::Delete, .. }), "{:?}", d.instance().state),
            CloseAction::Reconnect | CloseAction::ReconnectNow | CloseAction::ReconnectFresh => {
                let retried = matches!(&o, Outcome::Transition(t) if t.effects.iter().any(|e| opens(e) || arms_reconnect(e)));
                let gave_up = matches!(d.instance().state, State::Closed { cause: ClosedCause::GaveUp { .. }, .. });
                prop_assert!(retried || gave_up, "{o:?}");
                // R14: a status that makes the peer forget the session reconnects without its resume data.
                if policy.close_action(status, phase) == CloseAction::ReconnectFresh && retried {
                    prop_assert!(matches!(d.instance().state, State::Connecting { resume: None, .. }), "{:?}", d.instance().state);
                }
            }
        }
    }

    /// R5: a logout from any state ends in Closed within the logout and close
    /// time-outs whatever the transport does; the recorded status is the real
    /// close's (never a constant); a failed logout is recorded.
    #[test]
    fn r5_forced_close(
        policy in strategy::policy(),
        start in strategy::instance(),
        noise in runtime_noise(Generation(3)),
    ) {
        prop_assume!(!matches!(start.state, State::Removed { .. } | State::Closing { intent: Intent::Delete, .. }));
        let mut d = Driver::with_instance(name("r5"), policy.clone(), start);
        let at = d.now;
        d.feed(Input::Logout);
        let noise: Vec<_> = noise.into_iter().filter(|n| !matches!(n, NoiseOrTimer::Signal(Input::CleanupFinished { .. }))).collect();
        apply_noise(&mut d, &noise);
        d.run_timers(10);
        prop_assert!(matches!(d.instance().state, State::Closed { .. }), "not closed: {:?}", d.instance().state);
        prop_assert!(d.now.saturating_since(at) <= policy.timeouts.logout + policy.timeouts.close);
        if let Some(last) = d.steps.iter().rev().find(|s| !matches!(s.from.state, State::Closed { .. })) {
            let State::Closed { status, cause, .. } = &last.to.state else { unreachable!() };
            let real = last.input.closed().and_then(|(_, status, _)| status);
            prop_assert_eq!(*status, real, "status must come from the real close");
            prop_assert!(matches!(cause, ClosedCause::LoggedOut { .. }), "{cause:?}");
            if let Input::LogoutFailed { error, .. } = &last.input {
                let recorded = instance_lifecycle::machine::LogoutOutcome::Failed { error: error.clone() };
                prop_assert_eq!(cause, &ClosedCause::LoggedOut { logout: recorded }, "a failed logout is recorded");
            }
        }
    }

    /// R6: "opened" without identity never opens; every Open came from an
    /// "opened" carrying exactly that identity. (`step` is total: no input panics.)
    #[test]
    fn r6_open_needs_identity(
        policy in strategy::policy(),
        start in strategy::instance(),
        inputs in prop::collection::vec(strategy::input(Generation(3)), 1..40),
    ) {
        let mut d = Driver::with_instance(name("r6"), policy, start);
        for (i, input) in inputs.iter().enumerate() {
            let input = retarget(input, &d, i);
            d.feed(input);
        }
        for s in &d.steps {
            if let State::Open { identity, .. } = &s.to.state && !matches!(s.from.state, State::Open { .. }) {
                prop_assert_eq!(&s.input, &Input::TransportOpened { generation: s.from.generation, identity: Some(identity.clone()) });
            }
            if let Input::TransportOpened { identity: None, .. } = s.input {
                prop_assert!(!matches!(s.to.state, State::Open { .. }), "{:?}", s.to.state);
            }
        }
    }

    /// R7, over the pure core and its own heartbeat: an open connection is
    /// pinged every interval after its last pong; while the peer answers it
    /// stays Open, and once the peer goes silent it is a Zombie within one
    /// interval plus the pong deadline, its socket abandoned and its
    /// heartbeat timers gone with it (none fires into a later generation).
    /// A failed write makes a Zombie at once. From a Zombie, logout and
    /// delete never wait on the dead socket, and the reconnect timer resolves it.
    #[test]
    fn r7_zombie_detection(
        policy in strategy::policy(),
        identity in strategy::identity(),
        healthy in 0usize..6,
        write_failed in any::<bool>(),
        then in 0u8..3,
    ) {
        let g = Generation(4);
        let start = Instance { generation: g, state: State::Open { identity, since: Timestamp(0), retries: 0 } };
        let mut d = Driver::with_instance(name("r7"), policy.clone(), start);
        let hb = policy.heartbeat;
        // A healthy peer: every ping answered, the connection stays open, nothing is recorded.
        for _ in 0..healthy {
            prop_assert!(d.fire_next_timer().is_some(), "an open connection always has its heartbeat armed");
            prop_assert!(matches!(d.instance().state, State::Open { .. }), "{:?}", d.instance().state);
        }
        prop_assert!(d.steps.is_empty(), "heartbeats are upkeep, not records: {:?}", d.steps);
        let silent_at = d.now;
        let o = if write_failed {
            d.feed(Input::WriteFailed { generation: g, error: "EPIPE".into() })
        } else {
            d.answers_pings = false;
            let mut last = None;
            while matches!(d.instance().state, State::Open { .. }) && d.steps.is_empty() {
                last = d.fire_next_timer();
                prop_assert!(last.is_some(), "an open connection has a timer");
            }
            prop_assert!(
                d.now.saturating_since(silent_at) <= hb.interval + hb.deadline,
                "found after {:?}, bound {:?}", d.now.saturating_since(silent_at), hb.interval + hb.deadline
            );
            last.expect("a timer fired")
        };
        prop_assert!(matches!(&d.instance().state, State::Zombie { cause, .. }
            if write_failed == matches!(cause, instance_lifecycle::machine::ZombieCause::WriteFailed { .. })), "{o:?}");
        prop_assert!(d.live().is_none(), "the dead socket is abandoned at once");
        prop_assert!(crate::support::effects_of(&o).iter().any(arms_reconnect));
        let heartbeat = |k: TimerKind| matches!(k, TimerKind::Heartbeat | TimerKind::PongDeadline);
        prop_assert!(!d.timers().keys().any(|t| heartbeat(t.kind)), "heartbeat timers outlive Open: {:?}", d.timers());
        let late = Input::TimerFired { timer: instance_lifecycle::machine::Timer { kind: TimerKind::PongDeadline, generation: g } };
        let mark = d.steps.len();
        match then {
            0 => { d.feed(Input::Logout); prop_assert!(matches!(d.instance().state, State::Closed { .. }), "{:?}", d.instance().state); }
            1 => { d.feed(Input::Delete); prop_assert!(matches!(d.instance().state, State::Closing { intent: Intent::Delete, step: instance_lifecycle::machine::ClosingStep::CleaningUp }), "{:?}", d.instance().state); }
            _ => {
                d.fire_next_timer();
                prop_assert!(!matches!(d.instance().state, State::Zombie { .. } | State::Open { .. }), "{:?}", d.instance().state);
                if d.instance().generation != g {
                    let o = d.feed(late);
                    prop_assert!(matches!(o, Outcome::Ignored(Ignored::Stale { .. })), "an old deadline moved a new connection: {o:?}");
                }
            }
        }
        for s in &d.steps[mark..] {
            prop_assert!(!s.effects.iter().any(|e| matches!(e, Effect::SendLogout { .. } | Effect::CloseTransport { .. })), "waited on a dead socket: {:?}", s.effects);
        }
    }

    /// R8 (core part): the table is deterministic, so replaying every recorded
    /// (from, input, time) gives the recorded "to" and effects; records chain.
    #[test]
    fn r8_replay_reproduces_states(
        policy in strategy::policy(),
        start in strategy::instance(),
        inputs in prop::collection::vec((strategy::input(Generation(3)), 0u64..100_000), 1..60),
    ) {
        let mut d = Driver::with_instance(name("r8"), policy.clone(), start.clone());
        for (i, (input, dt)) in inputs.iter().enumerate() {
            d.now = Timestamp(d.now.0 + dt);
            let input = retarget(input, &d, i);
            d.feed(input);
        }
        let mut expected_from = start;
        for s in &d.steps {
            prop_assert_eq!(&s.from, &expected_from, "records must chain");
            let Outcome::Transition(t) = step(d.name(), &s.from, &s.input, &policy, s.at) else {
                return Err(TestCaseError::fail("replay did not transition"));
            };
            let mut replayed = s.from.clone();
            replayed.apply(&t);
            prop_assert_eq!(&replayed, &s.to);
            prop_assert_eq!(&t.effects, &s.effects);
            expected_from = s.to.clone();
        }
        prop_assert_eq!(&expected_from, d.instance());
    }

    /// R9: at most one transport in flight; backoff within [base, cap]; a peer
    /// that accepts and drops at once is given up on after `attempts_max`
    /// automatic attempts, even when it says "ready" before dropping.
    #[test]
    fn r9_bounded_reconnect(
        policy in strategy::policy(),
        says_ready in any::<bool>(),
        status in prop_oneof![Just(None), Just(Some(StatusCode(1006))), Just(Some(StatusCode(515))), Just(Some(StatusCode(1011)))],
    ) {
        use instance_lifecycle::machine::CloseAction;
        let phase = if says_ready { ClosePhase::AfterOpen } else { ClosePhase::BeforeOpen };
        prop_assume!(matches!(policy.close_action(status, phase), CloseAction::Reconnect | CloseAction::ReconnectNow));
        prop_assume!(policy.backoff.stable_period > Duration::ZERO);
        let mut d = Driver::new(name("r9"), policy.clone());
        d.feed(Input::Connect);
        let id = instance_lifecycle::machine::Identity::new("peer").expect("valid");
        let mut rounds = 0;
        while let Some(g) = d.live() {
            rounds += 1;
            prop_assert!(rounds <= policy.backoff.attempts_max + 1, "did not give up");
            if says_ready {
                d.feed(Input::TransportOpened { generation: g, identity: Some(id.clone()) });
            }
            d.feed(Input::TransportClosed { initiator: CloseInitiator::Peer, generation: g, status, reason: "dropped at once".into() });
            // Run only the reconnect timer: the next attempt starts.
            while d.live().is_none() && d.fire_next_timer().is_some() {}
        }
        prop_assert!(matches!(d.instance().state, State::Closed { cause: ClosedCause::GaveUp { .. }, .. }), "{:?}", d.instance().state);
        let attempts = d.effects().filter(|e| opens(e)).count();
        prop_assert_eq!(attempts as u32, policy.backoff.attempts_max + 1, "the first connect plus attempts_max retries");
        for e in d.effects() {
            if let Effect::ArmTimer { timer, after } = e && timer.kind == instance_lifecycle::machine::TimerKind::Reconnect {
                prop_assert!(*after >= policy.backoff.base && *after <= policy.backoff.cap, "delay {after:?}");
            }
        }
        prop_assert!(d.violations.is_empty(), "{:?}", d.violations);
    }

    /// R9 (in flight): under any inputs, the runtime is never asked to open a
    /// transport while another one is live.
    #[test]
    fn r9_one_attempt_in_flight(
        policy in strategy::policy(),
        start in strategy::instance(),
        inputs in prop::collection::vec(strategy::input(Generation(3)), 1..60),
        fire in prop::collection::vec(any::<bool>(), 60),
    ) {
        let mut d = Driver::with_instance(name("r9b"), policy, start);
        for (i, input) in inputs.iter().enumerate() {
            let input = retarget(input, &d, i);
            d.feed(input);
            if fire[i] {
                d.fire_next_timer();
            }
        }
        prop_assert!(d.violations.is_empty(), "{:?}", d.violations);
        for s in &d.steps {
            let opened = s.effects.iter().filter(|e| opens(e)).count();
            prop_assert!(opened <= 1);
            if opened == 1 {
                prop_assert_eq!(s.to.generation, s.from.generation.next(), "each attempt gets the next generation");
            } else {
                prop_assert_eq!(s.to.generation, s.from.generation);
            }
        }
    }

    /// R13: a peer that asks for a new connection (Discord's op 7, or op 9
    /// resumable) gets exactly one new attempt at once, resuming with the
    /// session's data; the old socket is closed with a status that does not
    /// end the session (never 1000 or 1001), its timers go with it, and the
    /// attempt counts toward giving up, so a peer asking forever ends in
    /// Closed. In any other state the request changes nothing.
    #[test]
    fn r13_reconnect_request_resumes(
        policy in strategy::policy(),
        start in strategy::instance(),
        asks in 1usize..12,
    ) {
        let g = start.generation;
        let resume_before = match &start.state {
            State::Open { identity, .. } => Some(identity.clone()),
            State::Connecting { phase: Phase::Handshaking | Phase::Pairing { .. }, resume, .. } => resume.clone(),
            _ => None,
        };
        let live = matches!(start.state, State::Open { .. } | State::Connecting { phase: Phase::Handshaking | Phase::Pairing { .. }, .. });
        let mut d = Driver::with_instance(name("r13"), policy.clone(), start.clone());
        let o = d.feed(Input::ReconnectRequested { generation: g });
        if !live {
            prop_assert_eq!(o, Outcome::Ignored(Ignored::NotExpected));
            prop_assert_eq!(d.instance(), &start);
            return Ok(());
        }
        let effects = crate::support::effects_of(&o);
        prop_assert!(effects.iter().any(|e| matches!(e, Effect::CloseTransport { status, .. } if *status != StatusCode::NORMAL && *status != StatusCode(1001))), "{effects:?}");
        match &d.instance().state {
            State::Connecting { phase: Phase::Handshaking, resume, .. } => {
                prop_assert_eq!(resume, &resume_before, "the attempt resumes with the session's data");
                prop_assert_eq!(effects.iter().filter(|e| opens(e)).count(), 1);
                let resumes = effects.iter().any(|e| matches!(e, Effect::OpenTransport { resume: r, .. } if *r == resume_before));
                prop_assert!(resumes, "{:?}", effects);
            }
            State::Closed { cause: ClosedCause::GaveUp { .. }, .. } => {}
            other => prop_assert!(false, "{other:?}"),
        }
        prop_assert!(!d.timers().keys().any(|t| t.generation == g), "the old connection's timers outlive it: {:?}", d.timers());
        // A peer that asks again and again: bounded by the give-up limit (R9).
        for _ in 0..asks.max(policy.backoff.attempts_max as usize + 1) {
            let g = d.instance().generation;
            if !matches!(d.instance().state, State::Connecting { .. }) { break; }
            d.feed(Input::ReconnectRequested { generation: g });
        }
        let attempts = d.steps.iter().filter(|s| s.effects.iter().any(opens)).count();
        prop_assert!(attempts <= policy.backoff.attempts_max as usize, "{attempts} attempts, limit {}", policy.backoff.attempts_max);
    }

    /// R14: an invalid session is never resumed. Its resume data is dropped
    /// at once, the next attempt starts without it after the delay the
    /// protocol chose, and no later attempt resumes on its own (until a new
    /// session opens).
    #[test]
    fn r14_invalid_session_is_never_resumed(
        policy in strategy::policy(),
        start in strategy::instance(),
        retry_ms in 0u64..5_000,
        noise in runtime_noise(Generation(9)),
    ) {
        let g = start.generation;
        let live = matches!(start.state, State::Open { .. } | State::Connecting { phase: Phase::Handshaking | Phase::Pairing { .. }, .. });
        let mut d = Driver::with_instance(name("r14"), policy.clone(), start.clone());
        let retry_after = Duration::from_millis(retry_ms);
        let o = d.feed(Input::SessionInvalid { generation: g, retry_after });
        if !live {
            prop_assert_eq!(o, Outcome::Ignored(Ignored::NotExpected));
            prop_assert_eq!(d.instance(), &start);
            return Ok(());
        }
        let effects = crate::support::effects_of(&o);
        prop_assert!(effects.iter().any(|e| matches!(e, Effect::CloseTransport { .. })), "{effects:?}");
        match &d.instance().state {
            State::Connecting { phase: Phase::Backoff { .. }, resume: None, .. } => {
                prop_assert!(effects.iter().any(|e| matches!(e, Effect::ArmTimer { timer, after } if timer.kind == TimerKind::Reconnect && *after == retry_after)), "{effects:?}");
            }
            State::Connecting { phase: Phase::Handshaking, resume: None, .. } => prop_assert!(retry_after.is_zero()),
            State::Closed { cause: ClosedCause::GaveUp { .. }, resume: None, .. } => {}
            other => prop_assert!(false, "{other:?}"),
        }
        // Whatever the runtime does next (no new session opens: opens are filtered out), nothing resumes.
        for (i, n) in noise.iter().enumerate() {
            match n {
                NoiseOrTimer::Signal(Input::TransportOpened { .. }) => {}
                NoiseOrTimer::Signal(s) => { let s = retarget(s, &d, i); d.feed(s); }
                NoiseOrTimer::FireTimer => { d.fire_next_timer(); }
            }
        }
        for s in &d.steps {
            prop_assert!(!s.effects.iter().any(|e| matches!(e, Effect::OpenTransport { resume: Some(_), .. })), "resumed an invalid session: {:?}", s.effects);
        }
    }

    /// R7 with a protocol's own heartbeat: its acknowledgement cancels the
    /// pong deadline and sets the next beat when the protocol says; anywhere
    /// but Open it changes nothing, and it is never recorded.
    #[test]
    fn r7_protocol_heartbeat_schedule(
        policy in strategy::policy(),
        start in strategy::instance(),
        after_ms in 0u64..100_000,
    ) {
        let g = start.generation;
        let mut d = Driver::with_instance(name("r7p"), policy, start.clone());
        let after = Duration::from_millis(after_ms);
        let o = d.feed(Input::HeartbeatDue { generation: g, after });
        if matches!(start.state, State::Open { .. }) {
            let hb = |kind| instance_lifecycle::machine::Timer { kind, generation: g };
            prop_assert_eq!(o, Outcome::Effects(vec![
                Effect::CancelTimer { timer: hb(TimerKind::PongDeadline) },
                Effect::ArmTimer { timer: hb(TimerKind::Heartbeat), after },
            ]));
        } else {
            prop_assert_eq!(o, Outcome::Ignored(Ignored::NotExpected));
        }
        prop_assert!(d.steps.is_empty());
        prop_assert_eq!(d.instance(), &start);
    }

    /// R15: a step the transport takes after a fleet-wide wait (a paced
    /// IDENTIFY, a paced connect) restarts a handshake's connect deadline from
    /// that moment, so a fleet's queue never reads as a silent peer. The
    /// deadline moves, it does not go: with no answer after the step, the
    /// handshake times out one connect time-out later. Anywhere but a
    /// handshake the step changes nothing, and it is never recorded.
    #[test]
    fn r15_a_fleet_wide_wait_is_not_a_silent_peer(
        policy in strategy::policy(),
        start in strategy::instance(),
        waited in 0.0f64..1.0,
    ) {
        let g = start.generation;
        let mut d = Driver::with_instance(name("r15"), policy.clone(), start.clone());
        let connect = instance_lifecycle::machine::Timer { kind: TimerKind::Connect, generation: g };
        let timers = d.timers().clone();
        // The step comes somewhere before the first deadline (the wait that went before it was the fleet's).
        d.now = Timestamp(0).saturating_add(policy.timeouts.connect.mul_f64(waited));
        let stepped = d.now;
        let o = d.feed(Input::HandshakeStep { generation: g });
        prop_assert!(d.steps.is_empty());
        prop_assert_eq!(d.instance(), &start);
        if matches!(start.state, State::Connecting { phase: Phase::Handshaking, .. }) {
            prop_assert_eq!(o, Outcome::Effects(vec![Effect::ArmTimer { timer: connect, after: policy.timeouts.connect }]));
            let due = stepped.saturating_add(policy.timeouts.connect);
            prop_assert_eq!(d.timers().get(&connect), Some(&due));
            prop_assert!(d.fire_next_timer().is_some());
            prop_assert_eq!(d.now, due, "the handshake is timed out one connect time-out after its last step");
            prop_assert_eq!(d.steps.len(), 1);
            prop_assert_eq!(&d.steps[0].input, &Input::TimerFired { timer: connect });
        } else {
            prop_assert_eq!(o, Outcome::Ignored(Ignored::NotExpected));
            prop_assert_eq!(d.timers(), &timers);
        }
    }

    /// R12: a signal, completion or timer from another generation never moves the instance.
    #[test]
    fn r12_stale_signals(
        policy in strategy::policy(),
        start in strategy::instance(),
        signal in strategy::signal(Generation(0)),
        offset in 1u64..5,
        newer in any::<bool>(),
    ) {
        let Some(_) = signal.generation() else { return Ok(()) };
        let g = start.generation;
        let other = if newer { Generation(g.0 + offset) } else { Generation(g.0.saturating_sub(offset)) };
        prop_assume!(other != g);
        let mut d = Driver::with_instance(name("r12"), policy, start.clone());
        let stale = testing::retarget(&signal, other);
        let o = d.feed(stale);
        prop_assert_eq!(o, Outcome::Ignored(Ignored::Stale { input: other, current: g }));
        prop_assert_eq!(d.instance(), &start);
    }
}

/// R13 with R9's limit, exactly: a peer that asks for a reconnect again and
/// again gets one attempt per request, exactly `attempts_max` of them, and
/// then the instance gives up into Closed, still holding its resume data.
#[test]
fn r13_a_peer_asking_forever_gets_exactly_the_attempts_the_policy_allows() {
    for attempts_max in 1..5 {
        let mut policy = instance_lifecycle::machine::Policy::preset(instance_lifecycle::machine::Preset::Discord);
        policy.backoff.attempts_max = attempts_max;
        let identity = instance_lifecycle::machine::Identity::new("s 1 wss://r").expect("id");
        let open = State::Open { identity: identity.clone(), since: Timestamp(0), retries: 0 };
        let mut d = Driver::with_instance(name("r13x"), policy, Instance { generation: Generation(1), state: open });
        let mut attempts = 0;
        while !matches!(d.instance().state, State::Closed { .. }) {
            let g = d.instance().generation;
            let o = d.feed(Input::ReconnectRequested { generation: g });
            attempts += crate::support::effects_of(&o).iter().filter(|e| opens(e)).count();
            assert!(attempts <= attempts_max as usize + 1, "no end");
        }
        assert_eq!(attempts, attempts_max as usize, "limit {attempts_max}");
        assert!(
            matches!(&d.instance().state, State::Closed { cause: ClosedCause::GaveUp { .. }, resume: Some(r), .. } if *r == identity),
            "{:?}",
            d.instance().state
        );
    }
}
