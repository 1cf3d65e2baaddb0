//! Hostile peers: oversized frames, binary garbage, text that is not JSON or
//! not UTF-8, an invalid close code, floods of pings and of "ready", a
//! handshake that never completes. Each instance ends in a defined state with
//! the cause in its log, and the healthy instances beside it are untouched.

use std::time::Duration;

use instance_lifecycle::log::{Event, InstanceSpec};
use instance_lifecycle::machine::{ClosedCause, Input, Preset, State, StatusCode};
use instance_lifecycle::testing::peer::{Fault, TestPeer};

use crate::engine::{Harness, fast};

fn closed_statuses(history: &[instance_lifecycle::log::Record]) -> Vec<Option<StatusCode>> {
    history
        .iter()
        .filter_map(|r| match &r.event {
            Event::Transition { input: Input::TransportClosed { status, .. }, .. } => Some(*status),
            _ => None,
        })
        .collect()
}

async fn healthy_fleet(h: &Harness) {
    for n in ["ok-1", "ok-2", "ok-3"] {
        h.open(n).await;
    }
}

async fn assert_healthy_untouched(h: &Harness) {
    for n in ["ok-1", "ok-2", "ok-3"] {
        assert!(matches!(h.engine.state(n), Ok(State::Open { .. })), "{n}");
        assert_eq!(h.peer.handshakes(n), 1, "{n} reconnected");
        assert_eq!(h.history_len(n).await, 3, "{n} moved");
    }
}

/// Faults that break the protocol after `ready`: the engine closes with the
/// protocol's code, the policy reconnects, and after `attempts_max` tries the
/// instance gives up into Closed. The status is in the log every time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protocol_violations_end_in_closed_with_the_status_logged() {
    let mut policy = fast(Preset::Whatsapp);
    policy.backoff.attempts_max = 2;
    let h = Harness::new(policy).await;
    healthy_fleet(&h).await;
    let cases = [
        ("oversized", Fault::Oversized { bytes: 200_000 }, 1009),
        ("binary", Fault::BinaryGarbage, 1002),
        ("not-json", Fault::NotJson, 1002),
        ("bad-utf8", Fault::InvalidUtf8, 1007),
        ("bad-close", Fault::BadCloseCode, 1002),
    ];
    for (name, fault, _) in &cases {
        h.peer.set_fault(name, fault.clone());
        h.engine.create(name, h.spec()).await.expect("create");
        h.engine.connect(name).await.expect("connect");
    }
    for (name, _, code) in &cases {
        let state = h.wait(name, |s| matches!(s, State::Closed { .. }), Duration::from_secs(10)).await;
        assert!(matches!(state, State::Closed { cause: ClosedCause::GaveUp { .. }, .. }), "{name}: {state:?}");
        let statuses = closed_statuses(&h.engine.history(name).await.expect("history"));
        assert!(!statuses.is_empty() && statuses.iter().all(|s| *s == Some(StatusCode(*code))), "{name}: {statuses:?}");
    }
    assert_healthy_untouched(&h).await;
}

/// Floods: thousands of "ready" open the instance once; thousands of pings
/// are answered; neither moves the instance again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn floods_of_ready_and_pings_change_nothing() {
    let h = Harness::new(fast(Preset::Whatsapp)).await;
    healthy_fleet(&h).await;
    for (name, fault) in
        [("ready-flood", Fault::ReadyFlood { count: 5_000 }), ("ping-flood", Fault::PingFlood { count: 10_000 })]
    {
        h.peer.set_fault(name, fault);
        h.open(name).await;
    }
    tokio::time::sleep(Duration::from_millis(800)).await;
    for name in ["ready-flood", "ping-flood"] {
        assert!(matches!(h.engine.state(name), Ok(State::Open { .. })), "{name}");
        assert_eq!(h.history_len(name).await, 3, "{name}: created, connect, opened — and nothing else");
        assert_eq!(h.peer.handshakes(name), 1);
    }
    assert_healthy_untouched(&h).await;
}

/// A handshake that never completes: never Open; the connect time-out ends
/// each attempt; the instance ends Closed with the cause logged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handshake_that_never_completes_times_out() {
    let mut policy = fast(Preset::Whatsapp);
    policy.backoff.attempts_max = 2;
    let h = Harness::new(policy.clone()).await;
    healthy_fleet(&h).await;
    let silent = TestPeer::start().await.expect("peer");
    silent.set_default_fault(Fault::NeverHandshake);
    h.engine.create("silent", InstanceSpec { url: silent.url() }).await.expect("create");
    h.engine.connect("silent").await.expect("connect");
    let bound =
        (policy.timeouts.connect + policy.backoff.cap) * (policy.backoff.attempts_max + 1) + Duration::from_secs(2);
    let state = h.wait("silent", |s| matches!(s, State::Closed { .. }), bound).await;
    let history = h.engine.history("silent").await.expect("history");
    assert!(history.iter().all(|r| !matches!(r.to.state, State::Open { .. })));
    let timed_out = history.iter().any(|r| match &r.event {
        Event::Transition { input: Input::TimerFired { .. }, .. } => true,
        Event::Transition { input: Input::TransportClosed { reason, .. }, .. } => reason.contains("timed out"),
        _ => false,
    });
    assert!(timed_out, "the time-out is the logged cause: {state:?}");
    assert_healthy_untouched(&h).await;
}
