//! The seed pull requests and the reports behind them, at the core level.
//! Each test reads like its bug report: arrange, do what the user did, assert
//! the state, the effects, and what must never happen afterwards.

use instance_lifecycle::machine::{
    CloseInitiator, ClosedCause, Effect, Generation, Identity, Ignored, Input, LogoutOutcome, Outcome, Phase, Policy,
    Preset, State, StatusCode, Timer, TimerKind,
};
use instance_lifecycle::testing::Driver;

use crate::support::{name, opens};

fn identity() -> Identity {
    Identity::new("5511999999999@s.whatsapp.net").expect("valid identity")
}

/// A driver whose instance is `Open` on generation 1 under `preset`.
fn open(preset: Preset) -> Driver {
    let mut d = Driver::new(name("customer-42"), Policy::preset(preset));
    d.feed(Input::Connect);
    d.feed(Input::TransportOpened { generation: Generation(1), identity: Some(identity()) });
    assert!(matches!(d.instance().state, State::Open { .. }), "{:?}", d.instance().state);
    d
}

fn close(d: &mut Driver, status: Option<u16>) -> Outcome {
    let generation = d.instance().generation;
    d.feed(Input::TransportClosed {
        initiator: CloseInitiator::Peer,
        generation,
        status: status.map(StatusCode),
        reason: "peer closed".into(),
    })
}

fn no_reconnect_ever(d: &mut Driver) {
    let mark = d.steps.len();
    d.run_timers(20);
    let reopened = d.steps[mark..].iter().any(|s| s.effects.iter().any(opens));
    assert!(!reopened, "an automatic reconnect happened: {:#?}", &d.steps[mark..]);
    assert!(d.timers().keys().all(|t| t.kind != TimerKind::Reconnect), "a reconnect timer is still armed");
}

/// PR 2520: the socket died, so `logout()` throws "Connection Closed" during
/// DELETE. The instance must still be removed, cleanup requested exactly once,
/// and a second DELETE changes nothing.
#[test]
fn pr2520_delete_whose_logout_fails_still_removes() {
    let mut d = open(Preset::Whatsapp);
    d.feed(Input::Delete);
    d.feed(Input::LogoutFailed { generation: Generation(1), error: "Connection Closed".into() });
    assert!(matches!(d.instance().state, State::Closing { .. }), "cleanup runs next");
    d.feed(Input::CleanupFinished { steps: vec![] });
    assert!(matches!(d.instance().state, State::Removed { .. }));
    assert_eq!(d.effects().filter(|e| **e == Effect::RunCleanup).count(), 1, "cleanup exactly once");
    let failure = d
        .steps
        .iter()
        .find(|s| matches!(s.input, Input::LogoutFailed { .. }))
        .expect("the failed logout is a recorded transition");
    assert!(matches!(&failure.input, Input::LogoutFailed { error, .. } if error == "Connection Closed"));
    let steps = d.steps.len();
    assert_eq!(d.feed(Input::Delete), Outcome::Ignored(Ignored::AlreadyRemoved));
    assert_eq!(d.steps.len(), steps, "the second delete records nothing");
}

/// PR 2520, zombie variant: the instance is a zombie; delete does not wait on it.
#[test]
fn pr2520_delete_of_a_zombie_skips_the_dead_socket() {
    let mut d = open(Preset::Whatsapp);
    d.feed(Input::HeartbeatMissed { generation: Generation(1) });
    assert!(matches!(d.instance().state, State::Zombie { .. }));
    d.feed(Input::Delete);
    let last = d.steps.last().expect("delete transitioned");
    assert!(last.effects.contains(&Effect::RunCleanup));
    assert!(!last.effects.iter().any(|e| matches!(e, Effect::SendLogout { .. })), "no logout on a dead socket");
    d.run_timers(5);
    assert!(matches!(d.instance().state, State::Removed { .. }), "the cleanup time-out removes even a hung cleanup");
}

/// PR 2501: logout on a dead socket throws; the instance must end `Closed`,
/// the failure recorded, and no reconnect may fire afterwards.
#[test]
fn pr2501_logout_on_dead_socket_closes_and_never_reconnects() {
    let mut d = open(Preset::Whatsapp);
    d.feed(Input::Logout);
    d.feed(Input::LogoutFailed { generation: Generation(1), error: "Connection Closed".into() });
    assert_eq!(
        d.instance().state,
        State::Closed {
            cause: ClosedCause::LoggedOut { logout: LogoutOutcome::Failed { error: "Connection Closed".into() } },
            status: None,
            resume: None,
        },
        "status is not a hard-coded 401: no close was seen, so there is none"
    );
    no_reconnect_ever(&mut d);
}

/// Evolution API #2560: a flag set by delete/logout was never reset, so
/// pairing after logout never completed. An explicit connect must work.
#[test]
fn evolution_2560_connect_after_logout_connects_again() {
    let mut d = open(Preset::Whatsapp);
    d.feed(Input::Logout);
    d.feed(Input::LogoutConfirmed { generation: Generation(1) });
    close(&mut d, Some(1000));
    assert!(
        matches!(d.instance().state, State::Closed { status: Some(StatusCode(1000)), .. }),
        "status from the real close"
    );
    let o = d.feed(Input::Connect);
    let Outcome::Transition(t) = o else { panic!("connect after logout refused: {o:?}") };
    assert!(
        t.effects.contains(&Effect::OpenTransport { generation: Generation(2), resume: None }),
        "a fresh session, no stale credentials"
    );
    d.feed(Input::PairingCode { generation: Generation(2) });
    d.feed(Input::TransportOpened { generation: Generation(2), identity: Some(identity()) });
    assert!(matches!(d.instance().state, State::Open { .. }));
}

/// Evolution preset = the seeds' list: 401 and 408 never reconnect.
#[test]
fn evolution_preset_408_and_401_never_reconnect() {
    for status in [401, 408] {
        let mut d = open(Preset::Evolution);
        close(&mut d, Some(status));
        assert!(matches!(d.instance().state, State::Closed { cause: ClosedCause::FinalStatus, .. }), "{status}");
        no_reconnect_ever(&mut d);
    }
}

/// Evolution API #2612: under the recommended preset a 408 after open is a
/// network blip and reconnects (resuming the session); a 408 while pairing
/// means the codes ran out and stops.
#[test]
fn whatsapp_preset_408_depends_on_phase() {
    let mut d = open(Preset::Whatsapp);
    let o = close(&mut d, Some(408));
    assert!(matches!(d.instance().state, State::Connecting { phase: Phase::Backoff { .. }, .. }), "{o:?}");
    d.fire_next_timer();
    assert!(
        d.steps
            .last()
            .expect("reconnected")
            .effects
            .contains(&Effect::OpenTransport { generation: Generation(2), resume: Some(identity()) }),
        "the reconnect resumes the stored identity"
    );

    let mut d = Driver::new(name("pairing"), Policy::preset(Preset::Whatsapp));
    d.feed(Input::Connect);
    d.feed(Input::PairingCode { generation: Generation(1) });
    close(&mut d, Some(408));
    assert!(matches!(
        d.instance().state,
        State::Closed { cause: ClosedCause::FinalStatus, status: Some(StatusCode(408)), .. }
    ));
    no_reconnect_ever(&mut d);
}

/// 440 "replaced by another session": reconnecting would kick the other
/// session, which would kick us: a loop. It must stop.
#[test]
fn replaced_440_never_loops() {
    let mut d = open(Preset::Whatsapp);
    close(&mut d, Some(440));
    assert!(matches!(d.instance().state, State::Closed { status: Some(StatusCode(440)), .. }));
    no_reconnect_ever(&mut d);
}

/// PR 2501: Baileys fired "open" before the user was known and the handler crashed.
#[test]
fn opened_without_identity_does_not_open() {
    let mut d = Driver::new(name("early-open"), Policy::preset(Preset::Whatsapp));
    d.feed(Input::Connect);
    let o = d.feed(Input::TransportOpened { generation: Generation(1), identity: None });
    assert_eq!(o, Outcome::Ignored(Ignored::MissingIdentity));
    assert!(matches!(d.instance().state, State::Connecting { phase: Phase::Handshaking, .. }));
    d.fire_next_timer();
    assert!(
        !matches!(d.instance().state, State::Connecting { phase: Phase::Handshaking, .. } | State::Open { .. }),
        "the connect time-out ends the wait"
    );
}

/// R12: the previous socket's close arrives late, after the new one opened.
#[test]
fn late_close_of_previous_generation_is_ignored() {
    let mut d = open(Preset::Whatsapp);
    d.feed(Input::Restart);
    d.feed(Input::TransportOpened { generation: Generation(2), identity: Some(identity()) });
    let before = d.instance().clone();
    let o = d.feed(Input::TransportClosed {
        initiator: CloseInitiator::Peer,
        generation: Generation(1),
        status: Some(StatusCode(1012)),
        reason: "late".into(),
    });
    assert_eq!(o, Outcome::Ignored(Ignored::Stale { input: Generation(1), current: Generation(2) }));
    assert_eq!(d.instance(), &before);
}

/// Evolution API #693, #765: restart while a reconnect is pending produced two
/// sockets and loops. Exactly one new attempt must start, and the old timer is dead.
#[test]
fn restart_while_reconnect_pending_makes_exactly_one_attempt() {
    let mut d = open(Preset::Whatsapp);
    close(&mut d, None);
    assert!(matches!(d.instance().state, State::Connecting { phase: Phase::Backoff { .. }, .. }));
    let o = d.feed(Input::Restart);
    let Outcome::Transition(t) = o else { panic!("{o:?}") };
    assert_eq!(t.effects.iter().filter(|e| opens(e)).count(), 1);
    assert!(
        t.effects
            .contains(&Effect::CancelTimer { timer: Timer { kind: TimerKind::Reconnect, generation: Generation(1) } })
    );
    // Even if the cancelled timer fires anyway, it is stale.
    let late = d.feed(Input::TimerFired { timer: Timer { kind: TimerKind::Reconnect, generation: Generation(1) } });
    assert!(matches!(late, Outcome::Ignored(Ignored::Stale { .. })));
    assert_eq!(d.effects().filter(|e| opens(e)).count(), 2, "the first connect and the one restart");
    assert!(d.violations.is_empty(), "{:?}", d.violations);
}

/// Pairing codes have a limit (Evolution's default 30): past it, "pairing refused".
#[test]
fn pairing_code_limit_ends_in_closed() {
    let policy = Policy::preset(Preset::Whatsapp);
    let mut d = Driver::new(name("qr"), policy.clone());
    d.feed(Input::Connect);
    for _ in 0..policy.pairing_codes_max {
        d.feed(Input::PairingCode { generation: Generation(1) });
    }
    assert!(matches!(d.instance().state, State::Connecting { phase: Phase::Pairing { codes: 30 }, .. }));
    d.feed(Input::PairingCode { generation: Generation(1) });
    assert!(
        matches!(d.instance().state, State::Closed { cause: ClosedCause::PairingRefused { codes: 30 }, .. }),
        "{:?}",
        d.instance().state
    );
    no_reconnect_ever(&mut d);
}

/// Coarse status for Evolution-style APIs: a zombie is never reported "open".
#[test]
fn coarse_status_never_reports_a_zombie_open() {
    let mut d = open(Preset::Whatsapp);
    assert_eq!(d.instance().state.coarse().as_str(), "open");
    d.feed(Input::HeartbeatMissed { generation: Generation(1) });
    assert_eq!(d.instance().state.coarse().as_str(), "connecting");
    d.feed(Input::Logout);
    assert_eq!(d.instance().state.coarse().as_str(), "close");
}
