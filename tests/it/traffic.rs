//! Application traffic on an engine-held connection: `Engine::send` and
//! `Engine::frames` against the reference peer (which echoes application
//! frames and sends bursts on command).

use std::time::Duration;

use instance_lifecycle::engine::EngineError;
use instance_lifecycle::log::InstanceSpec;
use instance_lifecycle::machine::{Policy, Preset, State, StateKind};
use instance_lifecycle::testing::peer::{Action, Fault, TestPeer};
use instance_lifecycle::transport::{Frame, Inbound, InboundError, InboundFrame, SendBudget};
use tokio::time::timeout;

use crate::engine::{Harness, fast};

fn text(s: &str) -> Frame {
    Frame::Text(s.to_owned())
}

async fn next(inbound: &mut Inbound) -> std::sync::Arc<InboundFrame> {
    timeout(Duration::from_secs(5), inbound.recv()).await.expect("a frame within 5 s").expect("a frame")
}

/// Frames sent are written in order and the peer's echoes reach the host in
/// order, each with its instance and generation; nothing of it is logged.
#[tokio::test]
async fn frames_round_trip_in_order_and_are_not_logged() {
    let h = Harness::new(Policy::preset(Preset::Whatsapp)).await;
    h.open("a").await;
    let history = h.engine.history("a").await.expect("history").len();
    let mut inbound = h.engine.frames();
    let generation = h.engine.history("a").await.expect("history").pop().expect("record").to.generation;
    for n in 0..300 {
        let frame = text(&format!(r#"{{"type":"chat","n":{n}}}"#));
        loop {
            match h.engine.send("a", frame.clone()) {
                Ok(()) => break,
                Err(EngineError::SendQueueFull { capacity, .. }) => {
                    assert_eq!(capacity, 64);
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                Err(e) => panic!("send {n}: {e}"),
            }
        }
    }
    for n in 0..300 {
        let got = next(&mut inbound).await;
        assert_eq!((got.instance.as_str(), got.generation), ("a", generation));
        assert_eq!(got.frame, text(&format!(r#"{{"type":"chat","n":{n}}}"#)), "in order");
    }
    assert_eq!(h.engine.history("a").await.expect("history").len(), history, "traffic is not lifecycle");
    let stats = h.engine.traffic();
    assert_eq!(stats.sent, 300);
    assert!(matches!(h.engine.state("a"), Ok(State::Open { .. })));
}

/// `send` in every state but `Open` is refused with the state it is in,
/// and for unknown, removed and invalid names with their own errors.
#[tokio::test]
async fn send_is_refused_in_every_state_but_open() {
    let peer = TestPeer::start().await.expect("peer");
    peer.set_fault("pairing", Fault::Pairing { codes: 1_000 });
    peer.set_fault("hang", Fault::HangOnLogout);
    // Fast heartbeats (a zombie within a second), slow enough backoff and logout to look at.
    let mut policy = fast(Preset::Whatsapp);
    policy.backoff.base = Duration::from_secs(3);
    policy.backoff.cap = Duration::from_secs(6);
    policy.timeouts.logout = Duration::from_secs(3);
    let h = Harness::with(policy, peer, |_| {}).await;
    let not_open = |name: &str| match h.engine.send(name, text("{}")) {
        Err(EngineError::NotOpen { state, .. }) => state,
        other => panic!("{name}: {other:?}"),
    };

    h.engine.create("closed", h.spec()).await.expect("create");
    assert_eq!(not_open("closed"), StateKind::Closed);

    h.engine.create("pairing", h.spec()).await.expect("create");
    h.engine.connect("pairing").await.expect("connect");
    h.wait("pairing", |s| matches!(s, State::Connecting { .. }), Duration::from_secs(5)).await;
    assert_eq!(not_open("pairing"), StateKind::Connecting);

    h.open("hang").await;
    let engine = h.engine.clone();
    let logout = tokio::spawn(async move { engine.logout("hang").await });
    h.wait("hang", |s| matches!(s, State::Closing { .. }), Duration::from_secs(5)).await;
    assert_eq!(not_open("hang"), StateKind::Closing);
    let _ = logout.await;

    h.open("zombie").await;
    h.peer.act("zombie", Action::Zombify);
    h.wait("zombie", |s| matches!(s, State::Zombie { .. }), Duration::from_secs(10)).await;
    assert_eq!(not_open("zombie"), StateKind::Zombie);

    h.open("gone").await;
    h.engine.delete("gone").await.expect("delete");
    assert!(matches!(h.engine.send("gone", text("{}")), Err(EngineError::Removed { .. })));
    assert!(matches!(h.engine.send("nobody", text("{}")), Err(EngineError::UnknownInstance { .. })));
    assert!(matches!(h.engine.send("no such name!", text("{}")), Err(EngineError::InvalidName(_))));
    assert_eq!(h.engine.traffic().refused, 6, "every refusal of a valid name is counted");
}

/// A host-driven (`external:`) instance's socket is the host's: the engine
/// refuses to send on it, saying so.
#[tokio::test]
async fn send_on_a_host_driven_instance_is_refused() {
    use instance_lifecycle::transport::{Hub, ReferenceProtocol, Routed, WsLimits, WsTransport};
    let hub = Hub::new();
    let ws = WsTransport::new(std::sync::Arc::new(ReferenceProtocol), WsLimits::default());
    let h = Harness::with(Policy::preset(Preset::Whatsapp), TestPeer::start().await.expect("peer"), |c| {
        c.transport = std::sync::Arc::new(Routed::new(ws, hub.clone()));
    })
    .await;
    h.engine.create("host", InstanceSpec { url: "external:".into() }).await.expect("create");
    h.engine.connect("host").await.expect("connect");
    let generation = h.engine.history("host").await.expect("history").pop().expect("record").to.generation;
    let opened = instance_lifecycle::machine::Input::TransportOpened {
        generation,
        identity: instance_lifecycle::machine::Identity::new("me").ok(),
    };
    h.engine.signal("host", opened).await.expect("signal");
    let answer = h.engine.send("host", text("{}"));
    assert!(matches!(answer, Err(EngineError::HostDriven { .. })), "{answer:?} in {:?}", h.engine.state("host"));
}

/// A subscriber that does not keep up loses the oldest frames and is told
/// how many; the socket reader never waits for it, and the connection stays
/// healthy (open, and frames still flow both ways).
#[tokio::test]
async fn a_slow_consumer_is_told_what_it_missed_and_the_connection_stays_healthy() {
    let h = Harness::with(Policy::preset(Preset::Whatsapp), TestPeer::start().await.expect("peer"), |c| {
        c.frames_capacity = 16;
    })
    .await;
    h.open("a").await;
    let mut slow = h.engine.frames();
    h.peer.act("a", Action::Send { count: 500, pad: 64 });
    // Let the whole burst arrive while nobody reads (the reader never waits for this subscriber).
    let start = std::time::Instant::now();
    while h.engine.traffic().received < 500 {
        let received = h.engine.traffic().received;
        assert!(start.elapsed() < Duration::from_secs(10), "only {received} of 500 frames received in 10 s");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let (mut missed, mut seen) = (0, Vec::new());
    while seen.last() != Some(&499) {
        match timeout(Duration::from_secs(5), slow.recv()).await.expect("an answer within 5 s") {
            Err(InboundError::Missed { frames }) => missed += frames,
            Ok(got) => {
                let Frame::Text(t) = &got.frame else { panic!("{:?}", got.frame) };
                let v: serde_json::Value = serde_json::from_str(t).expect("json");
                seen.push(v["n"].as_u64().expect("n"));
            }
            Err(e) => panic!("{e}"),
        }
    }
    assert!(missed > 0, "the slow subscriber fell behind and was told so");
    assert_eq!(missed + seen.len() as u64, 500, "every frame is either seen or counted as missed");
    assert!(seen.windows(2).all(|w| w[0] < w[1]), "what it sees is in order: {seen:?}");
    assert!(matches!(h.engine.state("a"), Ok(State::Open { .. })));
    h.engine.send("a", text(r#"{"type":"still-here"}"#)).expect("send");
    assert_eq!(next(&mut slow).await.frame, text(r#"{"type":"still-here"}"#));
}

/// After a reconnect the host hears the new connection's frames under its
/// new generation; the old connection's frames never come after them.
#[tokio::test]
async fn frames_after_a_reconnect_carry_the_new_generation() {
    let h = Harness::new(Policy::preset(Preset::Whatsapp)).await;
    h.open("a").await;
    let mut inbound = h.engine.frames();
    h.engine.send("a", text(r#"{"type":"one"}"#)).expect("send");
    let first = next(&mut inbound).await;
    h.engine.restart("a").await.expect("restart");
    h.wait("a", |s| matches!(s, State::Open { .. }), Duration::from_secs(5)).await;
    h.engine.send("a", text(r#"{"type":"two"}"#)).expect("send");
    let second = next(&mut inbound).await;
    assert_eq!(second.frame, text(r#"{"type":"two"}"#));
    assert!(second.generation > first.generation, "{} then {}", first.generation, second.generation);
    assert_eq!(inbound.try_recv(), Ok(None));
}

/// With a send budget, a frame past it is refused with when to retry, and
/// spends nothing; the ones within it go out.
#[tokio::test]
async fn a_send_budget_refuses_with_when_to_retry() {
    let budget = SendBudget { frames: 5, per: Duration::from_secs(60) };
    let h = Harness::with(Policy::preset(Preset::Whatsapp), TestPeer::start().await.expect("peer"), |c| {
        c.send_budget = Some(budget);
    })
    .await;
    h.open("a").await;
    let mut inbound = h.engine.frames();
    for n in 0..5 {
        h.engine.send("a", text(&format!(r#"{{"n":{n},"type":"x"}}"#))).expect("within budget");
    }
    match h.engine.send("a", text("{}")) {
        Err(EngineError::RateLimited { retry_after, .. }) => {
            assert!(retry_after > Duration::from_secs(55) && retry_after <= Duration::from_secs(60), "{retry_after:?}")
        }
        other => panic!("{other:?}"),
    }
    for n in 0..5 {
        assert_eq!(next(&mut inbound).await.frame, text(&format!(r#"{{"n":{n},"type":"x"}}"#)));
    }
    assert_eq!(
        EngineError::RateLimited { name: "a".parse().expect("name"), retry_after: Duration::ZERO }.code(),
        "rate_limited"
    );
}

/// A queue of no frames or a budget of none is refused at start, naming the field.
#[tokio::test]
async fn a_send_queue_or_budget_of_nothing_is_refused() {
    use instance_lifecycle::engine::{Engine, EngineConfig};
    use instance_lifecycle::log::Log;
    let zero_queue = EngineConfig { send_queue: 0, compaction: None, ..EngineConfig::default() };
    let zero_budget = EngineConfig {
        send_budget: Some(SendBudget { frames: 0, per: Duration::from_secs(1) }),
        compaction: None,
        ..EngineConfig::default()
    };
    let no_window = EngineConfig {
        send_budget: Some(SendBudget { frames: 5, per: Duration::ZERO }),
        compaction: None,
        ..EngineConfig::default()
    };
    for (config, field) in [(zero_queue, "send_queue"), (zero_budget, "send_budget"), (no_window, "send_budget")] {
        match Engine::with_log(Log::in_memory().expect("log"), config).await {
            Err(EngineError::InvalidConfig { field: f, .. }) => assert_eq!(f, field),
            Err(e) => panic!("{field}: {e}"),
            Ok(_) => panic!("{field}: accepted"),
        }
    }
}

/// `WsTransport::with_connect_pacing`: new sockets are spaced fleet-wide by
/// the pacer (four instances in one bucket take at least three windows),
/// and an attempt given up while it waits for its turn opens no socket.
#[tokio::test]
async fn connect_pacing_spaces_new_sockets_and_a_waiting_attempt_opens_none() {
    use instance_lifecycle::transport::{Pacer, ReferenceProtocol, WsLimits, WsTransport};
    use std::sync::Arc;
    let window = Duration::from_millis(300);
    let pacer = Arc::new(Pacer::new(1, window).expect("pacer"));
    let peer = TestPeer::start().await.expect("peer");
    let transport =
        WsTransport::new(Arc::new(ReferenceProtocol), WsLimits::default()).with_connect_pacing(pacer.clone());
    let h = Harness::with(Policy::preset(Preset::Whatsapp), peer, |c| c.transport = Arc::new(transport)).await;
    let names = ["p0", "p1", "p2", "p3"];
    for name in names {
        h.engine.create(name, h.spec()).await.expect("create");
    }
    let start = tokio::time::Instant::now();
    for name in names {
        h.engine.connect(name).await.expect("connect");
    }
    for name in names {
        h.wait(name, |s| matches!(s, State::Open { .. }), Duration::from_secs(10)).await;
    }
    assert!(start.elapsed() >= pacer.lower_bound(names.len()), "{:?} < {:?}", start.elapsed(), pacer.lower_bound(4));

    // The next attempt waits a window for its permit; deleted meanwhile, it never opens a socket.
    h.engine.create("late", h.spec()).await.expect("create");
    h.engine.connect("late").await.expect("connect");
    h.engine.delete("late").await.expect("delete");
    tokio::time::sleep(window * 2).await;
    assert_eq!(h.peer.handshakes("late"), 0, "a socket was opened for an attempt given up");
}
