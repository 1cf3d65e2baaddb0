//! proptest strategies for the core's values.

use std::time::Duration;

use proptest::prelude::*;

use crate::machine::{
    Backoff, CleanupOutcome, CloseInitiator, ClosedCause, ClosingStep, Generation, Identity, Input, Instance, Intent,
    Jitter, LogoutOutcome, Phase, Policy, Preset, State, StatusCode, StepOutcome, StepReport, Timer, TimerKind,
    Timestamp, ZombieCause,
};

/// Statuses that the presets name, plus arbitrary ones.
pub fn status() -> impl Strategy<Value = Option<StatusCode>> {
    prop_oneof![
        3 => prop::sample::select(vec![401u16, 402, 403, 405, 406, 408, 409, 428, 440, 500, 503, 515, 1000, 1001, 1002, 1006, 1011, 1012, 4000, 4004, 4009, 4010, 4014]).prop_map(|c| Some(StatusCode(c))),
        1 => any::<u16>().prop_map(|c| Some(StatusCode(c))),
        1 => prop::sample::select(vec![4001u16, 4005, 4007, 4008, 4011]).prop_map(|c| Some(StatusCode(c))),
        2 => Just(None),
    ]
}

/// A valid peer identity.
pub fn identity() -> impl Strategy<Value = Identity> {
    "[a-z0-9@.]{1,24}".prop_filter_map("valid identity", |s| Identity::new(s).ok())
}

fn timestamp() -> impl Strategy<Value = Timestamp> {
    (0u64..1_000_000).prop_map(Timestamp)
}

fn logout_outcome() -> impl Strategy<Value = LogoutOutcome> {
    prop_oneof![
        Just(LogoutOutcome::Confirmed),
        Just(LogoutOutcome::TimedOut),
        Just(LogoutOutcome::Unconfirmed),
        Just(LogoutOutcome::NotSent),
        Just(LogoutOutcome::Interrupted),
        "[a-z ]{0,12}".prop_map(|error| LogoutOutcome::Failed { error: error.into() }),
    ]
}

fn intent() -> impl Strategy<Value = Intent> {
    prop_oneof![Just(Intent::Logout), Just(Intent::Delete)]
}

/// Any state, including ones with exhausted retry counters.
pub fn state() -> impl Strategy<Value = State> {
    let retries = prop_oneof![3 => 0u32..4, 1 => 0u32..100];
    let phase = prop_oneof![
        timestamp().prop_map(|until| Phase::Backoff { until }),
        Just(Phase::Handshaking),
        (1u32..40).prop_map(|codes| Phase::Pairing { codes }),
    ];
    prop_oneof![
        (phase, retries.clone(), prop::option::of(identity())).prop_map(|(phase, retries, resume)| State::Connecting {
            phase,
            retries,
            resume
        }),
        (identity(), timestamp(), retries.clone()).prop_map(|(identity, since, retries)| State::Open {
            identity,
            since,
            retries
        }),
        (
            intent(),
            prop_oneof![
                Just(ClosingStep::LoggingOut),
                logout_outcome().prop_map(|logout| ClosingStep::ClosingSocket { logout }),
            ]
        )
            .prop_map(|(intent, step)| State::Closing { intent, step }),
        Just(State::Closing { intent: Intent::Delete, step: ClosingStep::CleaningUp }),
        (prop::option::of(identity()), status()).prop_map(|(resume, status)| State::Closed {
            cause: ClosedCause::Created,
            status,
            resume
        }),
        (logout_outcome(), status()).prop_map(|(logout, status)| State::Closed {
            cause: ClosedCause::LoggedOut { logout },
            status,
            resume: None
        }),
        (timestamp(), identity(), retries, any::<bool>()).prop_map(|(since, identity, retries, hb)| State::Zombie {
            since,
            cause: if hb { ZombieCause::HeartbeatMissed } else { ZombieCause::WriteFailed { error: "EPIPE".into() } },
            identity,
            retries
        }),
        Just(State::Removed { cleanup: CleanupOutcome::TimedOut }),
    ]
}

/// Any instance: a state with a generation.
pub fn instance() -> impl Strategy<Value = Instance> {
    (1u64..50, state()).prop_map(|(g, state)| Instance { generation: Generation(g), state })
}

/// Cleanup step reports.
pub fn cleanup_steps() -> impl Strategy<Value = Vec<StepReport>> {
    prop::collection::vec(
        (
            "[a-z-]{1,12}",
            prop_oneof![
                Just(StepOutcome::Done),
                Just(StepOutcome::TimedOut),
                "[a-z ]{0,12}".prop_map(|error| StepOutcome::Failed { error: error.into() }),
                "[a-z ]{0,12}".prop_map(|message| StepOutcome::Panicked { message: message.into() }),
            ],
        )
            .prop_map(|(step, outcome)| StepReport { step, outcome }),
        0..4,
    )
}

/// A transport signal, completion or timer for generation `g`, or (one time in
/// `1 + stale_weight`) for another generation.
pub fn signal(g: Generation) -> impl Strategy<Value = Input> {
    let generation = prop_oneof![6 => Just(g), 1 => (0u64..60).prop_map(Generation)];
    (generation, 0u8..17, prop::option::of(identity()), status(), cleanup_steps(), any::<u8>()).prop_map(
        |(generation, which, identity, status, steps, timer)| match which {
            0 => Input::TransportOpened { generation, identity },
            1 => Input::PairingCode { generation },
            2 => {
                let initiator =
                    [CloseInitiator::Peer, CloseInitiator::Local, CloseInitiator::Transport][usize::from(timer) % 3];
                Input::TransportClosed { generation, initiator, status, reason: "peer closed".into() }
            }
            11 => Input::TransportClosedV1 { generation, status, reason: "peer closed".into() },
            12 => Input::Pong { generation },
            13 => Input::ReconnectRequested { generation },
            14 => Input::SessionInvalid { generation, retry_after: Duration::from_millis(u64::from(timer) * 20) },
            15 => Input::HeartbeatDue { generation, after: Duration::from_millis(u64::from(timer) * 200) },
            16 => Input::HandshakeStep { generation },
            3 => Input::WriteFailed { generation, error: "broken pipe".into() },
            4 => Input::HeartbeatMissed { generation },
            5 => Input::LogoutConfirmed { generation },
            6 => Input::LogoutFailed { generation, error: "Connection Closed".into() },
            7 => Input::CloseFinished { generation },
            8 => Input::CleanupFinished { steps },
            _ => Input::TimerFired {
                timer: Timer { kind: TimerKind::ALL[usize::from(timer) % TimerKind::ALL.len()], generation },
            },
        },
    )
}

/// A host command.
pub fn command() -> impl Strategy<Value = Input> {
    prop_oneof![Just(Input::Connect), Just(Input::Logout), Just(Input::Delete), Just(Input::Restart)]
}

/// Any input for generation `g`: commands, signals, and rarely the runtime's own events.
pub fn input(g: Generation) -> impl Strategy<Value = Input> {
    prop_oneof![
        3 => command(),
        8 => signal(g),
        1 => prop_oneof![
            Just(Input::Recovered),
            "[a-z ]{0,12}".prop_map(|message| Input::Panicked { message: message.into() })
        ],
    ]
}

/// A preset, or a preset with random bounds (small give-up limits and pairing caps
/// so the limits are reached in short sequences).
pub fn policy() -> impl Strategy<Value = Policy> {
    (
        prop::sample::select(Preset::ALL.to_vec()),
        1u64..5_000,
        1u32..4,
        1u64..400,
        1u32..8,
        0u64..120_000,
        0u32..5,
        any::<u64>(),
        any::<bool>(),
        any::<bool>(),
    )
        .prop_map(|(preset, base, factor, cap_factor, attempts_max, stable, pairing, seed, jitter, recover)| {
            let mut p = Policy::preset(preset);
            p.backoff = Backoff {
                base: Duration::from_millis(base),
                factor,
                cap: Duration::from_millis(base.saturating_mul(cap_factor)),
                jitter: if jitter { Jitter::Full } else { Jitter::None },
                attempts_max,
                stable_period: Duration::from_millis(stable),
            };
            p.pairing_codes_max = pairing;
            p.jitter_seed = seed;
            p.reconnect_after_restart = recover;
            p
        })
}
