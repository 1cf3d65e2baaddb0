//! Model-based test: the real `step` (driven by the harness `Driver`) against a
//! small reference model of the rules, with proptest-state-machine.
//!
//! The model is deliberately coarse — it tracks which kind of state the
//! instance is in, the retry counter and how far a close got — and is written
//! from the design brief, not from `rules.rs`.

use std::time::Duration;

use instance_lifecycle::machine::{
    CloseInitiator, ClosingStep, Generation, Identity, Input, Intent, Phase, Policy, Preset, State, StatusCode,
};
use instance_lifecycle::testing::Driver;
use proptest::prelude::*;
use proptest_state_machine::{ReferenceStateMachine, StateMachineTest, prop_state_machine};

use crate::support::name;

const ATTEMPTS_MAX: u32 = 3;

fn policy() -> Policy {
    let mut p = Policy::preset(Preset::Whatsapp);
    p.backoff.attempts_max = ATTEMPTS_MAX;
    // Every open is stable: a loss after open starts counting from zero.
    p.backoff.stable_period = Duration::ZERO;
    p
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum M {
    Closed,
    Backoff { retries: u32 },
    Socket { retries: u32 },
    Open,
    Zombie,
    Closing { delete: bool, step: u8 }, // 0 logging out, 1 closing socket, 2 cleaning up
    Removed,
}

#[derive(Clone, Debug)]
enum Op {
    Connect,
    Logout,
    Delete,
    Restart,
    Ready,
    ReadyWithoutIdentity,
    PeerClose(Option<u16>),
    HeartbeatMiss,
    LogoutConfirmed,
    CleanupDone,
    StaleClose,
    AdvanceTime,
    /// The peer asks for a new connection (R13).
    PeerReconnect,
    /// The peer says the session is invalid; retry after 2 s (R14).
    SessionInvalid,
}

struct Model;

impl Model {
    /// What a loss means under the whatsapp preset with stable period 0.
    fn lost(status: Option<u16>, before_open: bool, retries: u32) -> M {
        let stop =
            matches!(status, Some(401 | 402 | 403 | 405 | 406 | 409 | 440)) || (status == Some(408) && before_open);
        if stop {
            return M::Closed;
        }
        let retries = if before_open { retries } else { 0 } + 1;
        if retries > ATTEMPTS_MAX {
            M::Closed
        } else if status == Some(515) {
            M::Socket { retries }
        } else {
            M::Backoff { retries }
        }
    }

    /// The next attempt the peer asked for: at once, or (an invalid session) after a wait.
    fn requested(retries: u32, wait: bool) -> M {
        let retries = retries + 1;
        if retries > ATTEMPTS_MAX {
            M::Closed
        } else if wait {
            M::Backoff { retries }
        } else {
            M::Socket { retries }
        }
    }

    /// Let every timer run out, in order, until nothing is armed.
    fn settle(m: &M) -> M {
        match m {
            // The connect timer raises 408 before open: final under whatsapp.
            M::Socket { .. } | M::Backoff { .. } | M::Zombie => M::Closed,
            M::Closing { delete: true, .. } => M::Removed,
            M::Closing { delete: false, .. } => M::Closed,
            other => other.clone(),
        }
    }
}

impl ReferenceStateMachine for Model {
    type State = M;
    type Transition = Op;

    fn init_state() -> BoxedStrategy<M> {
        Just(M::Closed).boxed()
    }

    fn transitions(_: &M) -> BoxedStrategy<Op> {
        prop_oneof![
            3 => Just(Op::Connect),
            1 => Just(Op::Logout),
            1 => Just(Op::Delete),
            1 => Just(Op::Restart),
            3 => Just(Op::Ready),
            1 => Just(Op::ReadyWithoutIdentity),
            3 => prop::sample::select(vec![None, Some(401), Some(408), Some(440), Some(500), Some(515), Some(1006)]).prop_map(Op::PeerClose),
            1 => Just(Op::HeartbeatMiss),
            1 => Just(Op::LogoutConfirmed),
            1 => Just(Op::CleanupDone),
            1 => Just(Op::StaleClose),
            2 => Just(Op::AdvanceTime),
            1 => Just(Op::PeerReconnect),
            1 => Just(Op::SessionInvalid),
        ]
        .boxed()
    }

    fn apply(m: M, op: &Op) -> M {
        use M::*;
        match (m, op) {
            (Removed, _) => Removed,
            (Closed | Backoff { .. } | Zombie, Op::Connect | Op::Restart) => Socket { retries: 0 },
            (Socket { .. } | Open, Op::Restart) => Socket { retries: 0 },
            (Open, Op::Logout) => Closing { delete: false, step: 0 },
            (Open, Op::Delete) => Closing { delete: true, step: 0 },
            (Socket { .. }, Op::Logout) => Closing { delete: false, step: 1 },
            (Socket { .. }, Op::Delete) => Closing { delete: true, step: 1 },
            (Backoff { .. } | Zombie | Closed, Op::Logout) => Closed,
            (Backoff { .. } | Zombie | Closed, Op::Delete) => Closing { delete: true, step: 2 },
            (Closing { delete: false, step }, Op::Delete) => Closing { delete: true, step },
            (Socket { .. }, Op::Ready) => Open,
            (Socket { retries }, Op::PeerClose(s)) => Self::lost(*s, true, retries),
            (Open, Op::PeerClose(s)) => Self::lost(*s, false, 0),
            (Open, Op::HeartbeatMiss) => Zombie,
            (Socket { retries }, Op::HeartbeatMiss) => Self::lost(None, true, retries),
            (Closing { delete, step: 0 }, Op::LogoutConfirmed) => Closing { delete, step: 1 },
            (Closing { delete: true, step: 0 | 1 }, Op::PeerClose(_) | Op::HeartbeatMiss) => {
                Closing { delete: true, step: 2 }
            }
            (Closing { delete: false, step: 0 | 1 }, Op::PeerClose(_) | Op::HeartbeatMiss) => Closed,
            (Closing { delete: true, step: 2 }, Op::CleanupDone) => Removed,
            // R13 and R14: the peer's request is an attempt like any, counted;
            // a session open long enough (here: at once) starts counting from zero.
            (Open, Op::PeerReconnect) => Self::requested(0, false),
            (Socket { retries }, Op::PeerReconnect) => Self::requested(retries, false),
            (Open, Op::SessionInvalid) => Self::requested(0, true),
            (Socket { retries }, Op::SessionInvalid) => Self::requested(retries, true),
            (m, Op::AdvanceTime) => Self::settle(&m),
            (m, _) => m,
        }
    }
}

struct Real {
    driver: Driver,
}

fn observe(s: &State) -> M {
    match s {
        State::Closed { .. } => M::Closed,
        State::Connecting { phase: Phase::Backoff { .. }, retries, .. } => M::Backoff { retries: *retries },
        State::Connecting { retries, .. } => M::Socket { retries: *retries },
        State::Open { .. } => M::Open,
        State::Zombie { .. } => M::Zombie,
        State::Closing { intent, step } => M::Closing {
            delete: *intent == Intent::Delete,
            step: match step {
                ClosingStep::LoggingOut => 0,
                ClosingStep::ClosingSocket { .. } => 1,
                ClosingStep::CleaningUp => 2,
            },
        },
        State::Removed { .. } => M::Removed,
    }
}

impl StateMachineTest for Real {
    type SystemUnderTest = Self;
    type Reference = Model;

    fn init_test(_: &M) -> Self {
        Real { driver: Driver::new(name("model"), policy()) }
    }

    fn apply(mut real: Self, reference: &M, op: Op) -> Self {
        let d = &mut real.driver;
        let g = d.instance().generation;
        let id = || Some(Identity::new("5511@s.whatsapp.net").expect("valid"));
        match op {
            Op::Connect => drop(d.feed(Input::Connect)),
            Op::Logout => drop(d.feed(Input::Logout)),
            Op::Delete => drop(d.feed(Input::Delete)),
            Op::Restart => drop(d.feed(Input::Restart)),
            Op::Ready => drop(d.feed(Input::TransportOpened { generation: g, identity: id() })),
            Op::ReadyWithoutIdentity => drop(d.feed(Input::TransportOpened { generation: g, identity: None })),
            Op::PeerClose(s) => drop(d.feed(Input::TransportClosed {
                initiator: CloseInitiator::Peer,
                generation: g,
                status: s.map(StatusCode),
                reason: "peer".into(),
            })),
            Op::HeartbeatMiss => drop(d.feed(Input::HeartbeatMissed { generation: g })),
            Op::LogoutConfirmed => drop(d.feed(Input::LogoutConfirmed { generation: g })),
            Op::CleanupDone => drop(d.feed(Input::CleanupFinished { steps: vec![] })),
            Op::StaleClose => drop(d.feed(Input::TransportClosed {
                initiator: CloseInitiator::Peer,
                generation: Generation(g.0.wrapping_sub(1)),
                status: None,
                reason: "late".into(),
            })),
            Op::AdvanceTime => {
                d.run_timers(16);
            }
            Op::PeerReconnect => drop(d.feed(Input::ReconnectRequested { generation: g })),
            Op::SessionInvalid => {
                drop(d.feed(Input::SessionInvalid { generation: g, retry_after: Duration::from_secs(2) }))
            }
        }
        assert_eq!(
            observe(&d.instance().state),
            *reference,
            "real {:?} vs model after {:?}",
            d.instance().state,
            d.steps.last().map(|s| &s.input)
        );
        real
    }

    fn check_invariants(real: &Self, _: &M) {
        assert!(real.driver.violations.is_empty(), "{:?}", real.driver.violations);
    }
}

prop_state_machine! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]
    #[test]
    fn model_matches_step(sequential 1..40 => Real);
}
