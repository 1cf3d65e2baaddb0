//! The engine against the fault-injecting peer, over real sockets on
//! 127.0.0.1: the seed scenarios and the rules, each asserting the final
//! state, the log, and what the other instances did. Time is real (the
//! sockets are), so the policy's durations are short and the bounds generous.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use instance_lifecycle::engine::{Cleanup, Compaction, Engine, EngineConfig, EngineError, StepFuture};
use instance_lifecycle::log::{Event, InstanceSpec, LogConfig, Retention};
use instance_lifecycle::machine::{
    CloseInitiator, ClosedCause, ClosingStep, Effect, Heartbeat, Input, InputKind, InstanceName, LogoutOutcome, Phase,
    Policy, Preset, State, StepOutcome, Timeouts, Timestamp,
};
use instance_lifecycle::testing::peer::{Action, Fault, TestPeer};
use instance_lifecycle::transport::{ReferenceProtocol, TlsConfigError, WsLimits, WsTransport};
use tokio::time::{Instant, sleep};

pub const HEARTBEAT: Duration = Duration::from_millis(100);
pub const DEADLINE: Duration = Duration::from_millis(150);

/// A policy with short durations, so real-time tests stay quick.
pub fn fast(preset: Preset) -> Policy {
    let mut p = Policy::preset(preset);
    p.heartbeat = Heartbeat { interval: HEARTBEAT, deadline: DEADLINE };
    p.timeouts = Timeouts {
        connect: Duration::from_millis(1_000),
        pairing_code: Duration::from_millis(1_000),
        logout: Duration::from_millis(300),
        close: Duration::from_millis(300),
        cleanup: Duration::from_millis(1_500),
    };
    p.backoff.base = Duration::from_millis(50);
    p.backoff.cap = Duration::from_millis(200);
    p.backoff.stable_period = Duration::from_millis(500);
    p
}

/// What the host cleanup does for one instance.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StepBehaviour {
    Succeed,
    Fail,
    Hang,
    Panic,
}

/// (instance, step, "start" or "end").
pub type StepEvent = (String, String, &'static str);

/// A cleanup with three steps that records when each starts and ends.
#[derive(Clone, Default)]
pub struct RecordingCleanup {
    pub events: Arc<Mutex<Vec<StepEvent>>>,
    pub behaviour: Arc<Mutex<std::collections::HashMap<(String, String), StepBehaviour>>>,
}

impl Cleanup for RecordingCleanup {
    fn steps(&self) -> Vec<String> {
        vec!["session-store".into(), "files".into(), "cache".into()]
    }

    fn run(&self, instance: InstanceName, step: &str) -> StepFuture {
        let me = self.clone();
        let step = step.to_owned();
        Box::pin(async move {
            let key = (instance.to_string(), step.clone());
            let behaviour = me.behaviour.lock().expect("lock").get(&key).copied().unwrap_or(StepBehaviour::Succeed);
            me.events.lock().expect("lock").push((key.0.clone(), step.clone(), "start"));
            sleep(Duration::from_millis(20)).await;
            let result = match behaviour {
                StepBehaviour::Succeed => Ok(()),
                StepBehaviour::Fail => Err("database said no".to_owned()),
                StepBehaviour::Hang => std::future::pending().await,
                StepBehaviour::Panic => panic!("cleanup hook bug"),
            };
            me.events.lock().expect("lock").push((key.0, step, "end"));
            result
        })
    }
}

pub struct Harness {
    pub peer: TestPeer,
    pub engine: Engine,
    pub dir: tempfile::TempDir,
    pub cleanup: RecordingCleanup,
    pub policy: Policy,
}

impl Harness {
    pub async fn new(policy: Policy) -> Self {
        Self::with(policy, TestPeer::start().await.expect("peer"), |_| {}).await
    }

    /// An engine on `peer` whose configuration `tweak` adjusts.
    pub async fn with(policy: Policy, peer: TestPeer, tweak: impl FnOnce(&mut EngineConfig)) -> Self {
        let dir = tempfile::tempdir().expect("dir");
        let cleanup = RecordingCleanup::default();
        let mut cfg = config(&policy, &cleanup);
        tweak(&mut cfg);
        let engine = Engine::open(dir.path(), cfg).await.expect("engine");
        Self { peer, engine, dir, cleanup, policy }
    }

    pub fn spec(&self) -> InstanceSpec {
        InstanceSpec { url: self.peer.url() }
    }

    /// Creates and connects `name`, waiting until it is `Open`.
    pub async fn open(&self, name: &str) {
        self.engine.create(name, self.spec()).await.expect("create");
        self.engine.connect(name).await.expect("connect");
        self.wait(name, |s| matches!(s, State::Open { .. }), Duration::from_secs(5)).await;
    }

    /// Waits until `name`'s state satisfies `ok`; fails with its history otherwise.
    pub async fn wait(&self, name: &str, ok: impl Fn(&State) -> bool, within: Duration) -> State {
        let start = Instant::now();
        loop {
            match self.engine.state(name) {
                Ok(s) if ok(&s) => return s,
                Err(EngineError::Removed { .. })
                    if ok(&State::Removed { cleanup: instance_lifecycle::machine::CleanupOutcome::TimedOut }) =>
                {
                    return self.engine.history(name).await.expect("history").pop().expect("record").to.state;
                }
                _ => {}
            }
            if start.elapsed() > within {
                let history = self.engine.history(name).await.map(|h| {
                    h.iter().map(|r| format!("#{} {} → {}", r.seq, r.event.label(), r.to.state)).collect::<Vec<_>>()
                });
                panic!(
                    "{name}: condition not reached within {within:?}; now {:?}; history {history:#?}",
                    self.engine.state(name)
                );
            }
            sleep(Duration::from_millis(10)).await;
        }
    }

    pub async fn history_len(&self, name: &str) -> usize {
        self.engine.history(name).await.expect("history").len()
    }

    pub async fn inputs(&self, name: &str) -> Vec<InputKind> {
        self.engine
            .history(name)
            .await
            .expect("history")
            .into_iter()
            .filter_map(|r| match r.event {
                Event::Transition { input, .. } => Some(input.kind()),
                _ => None,
            })
            .collect()
    }
}

pub fn config(policy: &Policy, cleanup: &RecordingCleanup) -> EngineConfig {
    EngineConfig {
        policy: policy.clone(),
        log: LogConfig::default(),
        cleanup: Arc::new(cleanup.clone()),
        cleanup_step_timeout: Duration::from_millis(200),
        ..EngineConfig::default()
    }
}

/// A harness whose instance `name` opened, lost its connection, and now
/// waits out a reconnect backoff of exactly `backoff`.
async fn in_backoff(name: &str, backoff: Duration) -> Harness {
    let mut policy = fast(Preset::Whatsapp);
    policy.backoff.base = backoff;
    policy.backoff.cap = backoff;
    let h = Harness::new(policy).await;
    h.open(name).await;
    h.peer.act(name, Action::Drop);
    h.wait(name, |s| matches!(s, State::Connecting { phase: Phase::Backoff { .. }, .. }), Duration::from_secs(5)).await;
    h
}

fn removed(s: &State) -> bool {
    matches!(s, State::Removed { .. })
}

/// PR 2520: ten instances open; one becomes a zombie; deleting it succeeds
/// without waiting on the dead socket, cleanup runs once, and the nine others
/// stay Open with no extra transitions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pr2520_zombie_delete_removes_it_and_leaves_the_others_alone() {
    let h = Harness::new(fast(Preset::Whatsapp)).await;
    let names: Vec<String> = (0..10).map(|i| format!("vendor-{i}")).collect();
    for n in &names {
        h.open(n).await;
    }
    let mut before = Vec::new();
    for n in &names {
        before.push(h.history_len(n).await);
    }
    assert_eq!(h.peer.act("vendor-3", Action::Zombify), 1);
    h.wait("vendor-3", |s| matches!(s, State::Zombie { .. }), HEARTBEAT + DEADLINE + Duration::from_secs(1)).await;
    let start = Instant::now();
    let state = h.engine.delete("vendor-3").await.expect("delete succeeds");
    assert!(removed(&state), "{state:?}");
    assert!(
        start.elapsed() < h.policy.timeouts.logout,
        "took {:?}, not bounded by the logout time-out",
        start.elapsed()
    );
    let runs: Vec<_> = h
        .cleanup
        .events
        .lock()
        .expect("lock")
        .iter()
        .filter(|e| e.0 == "vendor-3" && e.2 == "start")
        .cloned()
        .collect();
    assert_eq!(runs.len(), 3, "each cleanup step ran once: {runs:?}");
    assert!(h.inputs("vendor-3").await.contains(&InputKind::PongDeadline), "the core's own heartbeat found it");
    for (n, len) in names.iter().zip(before) {
        if n != "vendor-3" {
            assert!(matches!(h.engine.state(n), Ok(State::Open { .. })), "{n}");
            assert_eq!(h.history_len(n).await, len, "{n} moved");
        }
    }
    // Deleting twice: the same success, nothing more.
    assert!(removed(&h.engine.delete("vendor-3").await.expect("second delete")));
}

/// PR 2520, before detection: the zombie is still "Open"; delete is bounded by
/// the logout and close time-outs (it does not hang on the dead socket).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_of_an_undetected_zombie_is_bounded_by_its_timeouts() {
    let mut policy = fast(Preset::Whatsapp);
    policy.heartbeat = Heartbeat { interval: Duration::from_secs(30), deadline: Duration::from_secs(10) };
    let h = Harness::new(policy).await;
    h.open("z").await;
    h.peer.act("z", Action::Zombify);
    let start = Instant::now();
    assert!(removed(&h.engine.delete("z").await.expect("delete")));
    let t = &h.policy.timeouts;
    assert!(start.elapsed() < t.logout + t.close + Duration::from_secs(1), "took {:?}", start.elapsed());
    let history = h.engine.history("z").await.expect("history");
    assert!(history.iter().any(|r| matches!(
        &r.to.state,
        State::Closing { step: ClosingStep::ClosingSocket { logout: LogoutOutcome::TimedOut }, .. }
    )));
}

/// PR 2501: logout on a dead socket returns success; Closed; the failed logout
/// is in the log; no reconnect in the following heartbeat and backoff periods.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pr2501_logout_on_dead_socket_closes_and_never_reconnects() {
    let mut policy = fast(Preset::Whatsapp);
    policy.heartbeat = Heartbeat { interval: Duration::from_secs(30), deadline: Duration::from_secs(10) };
    let h = Harness::new(policy).await;
    h.open("acme").await;
    h.peer.act("acme", Action::Zombify);
    let state = h.engine.logout("acme").await.expect("logout succeeds");
    assert!(
        matches!(state, State::Closed { cause: ClosedCause::LoggedOut { logout: LogoutOutcome::TimedOut }, .. }),
        "{state:?}"
    );
    let handshakes = h.peer.handshakes("acme");
    sleep(HEARTBEAT + DEADLINE + h.policy.backoff.cap * 2).await;
    assert_eq!(h.peer.handshakes("acme"), handshakes, "reconnected after a logout");
    assert!(matches!(h.engine.state("acme"), Ok(State::Closed { .. })));
    // Evolution API #2560: an explicit connect works again.
    h.peer.act("acme", Action::Drop);
    h.engine.connect("acme").await.expect("connect");
    h.wait("acme", |s| matches!(s, State::Open { .. }), Duration::from_secs(5)).await;
    assert_eq!(h.peer.hellos("acme").last(), Some(&None), "a logout forgets the identity: no resume");
}

async fn close_with(preset: Preset, fault: Fault) -> (Harness, State) {
    let h = Harness::new(fast(preset)).await;
    h.peer.set_fault("c", fault);
    h.engine.create("c", h.spec()).await.expect("create");
    h.engine.connect("c").await.expect("connect");
    let state = h.wait("c", |s| matches!(s, State::Closed { .. }), Duration::from_secs(5)).await;
    sleep(h.policy.backoff.cap * 3).await;
    (h, state)
}

/// Close statuses under the seeds' preset: 401 and 408 never reconnect.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn evolution_preset_401_and_408_close_without_reconnect() {
    for code in [4401, 4408] {
        let (h, state) = close_with(Preset::Evolution, Fault::CloseAfterReady { code }).await;
        assert!(
            matches!(state, State::Closed { cause: ClosedCause::FinalStatus, status: Some(s), .. } if s.0 == code - 4000),
            "{state:?}"
        );
        assert_eq!(h.peer.handshakes("c"), 1, "{code}: reconnected");
    }
}

/// Under the recommended preset, 408 while pairing and 440 stop.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn whatsapp_preset_408_while_pairing_and_440_stop() {
    let (h, state) = close_with(Preset::Whatsapp, Fault::CloseAfterReady { code: 4440 }).await;
    assert!(matches!(state, State::Closed { status: Some(s), .. } if s.0 == 440), "{state:?}");
    assert_eq!(h.peer.handshakes("c"), 1);

    let h = Harness::new(fast(Preset::Whatsapp)).await;
    h.peer.set_fault("qr", Fault::Pairing { codes: 2 });
    h.engine.create("qr", h.spec()).await.expect("create");
    h.engine.connect("qr").await.expect("connect");
    h.wait("qr", |s| matches!(s, State::Connecting { phase: Phase::Pairing { codes: 2 }, .. }), Duration::from_secs(5))
        .await;
    h.peer.act("qr", Action::Close(4408));
    let state = h.wait("qr", |s| matches!(s, State::Closed { .. }), Duration::from_secs(5)).await;
    assert!(
        matches!(state, State::Closed { cause: ClosedCause::FinalStatus, status: Some(s), .. } if s.0 == 408),
        "{state:?}"
    );
    sleep(h.policy.backoff.cap * 3).await;
    assert_eq!(h.peer.handshakes("qr"), 1);
}

/// Under the recommended preset, 408 after open is a blip: reconnect with
/// backoff, resuming the stored identity. A drop without a close frame too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn whatsapp_preset_408_after_open_and_drops_reconnect_with_resume() {
    let h = Harness::new(fast(Preset::Whatsapp)).await;
    for (name, action) in [("blip", Action::Close(4408)), ("drop", Action::Drop)] {
        h.open(name).await;
        h.peer.act(name, action);
        let start = Instant::now();
        h.wait(name, |s| matches!(s, State::Connecting { .. }), Duration::from_secs(5)).await;
        h.wait(name, |s| matches!(s, State::Open { .. }), Duration::from_secs(5)).await;
        assert!(start.elapsed() >= h.policy.backoff.base, "no backoff");
        assert_eq!(h.peer.hellos(name), vec![None, Some(format!("peer-{name}"))], "the reconnect resumes");
    }
}

/// R6: a peer that never sends an identity never makes the instance Open; the
/// connect time-out closes it (408 before open: final under whatsapp).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_without_identity_never_opens_and_times_out() {
    let h = Harness::new(fast(Preset::Whatsapp)).await;
    h.peer.set_fault("anon", Fault::NoIdentity);
    h.engine.create("anon", h.spec()).await.expect("create");
    h.engine.connect("anon").await.expect("connect");
    let state =
        h.wait("anon", |s| matches!(s, State::Closed { .. }), h.policy.timeouts.connect + Duration::from_secs(2)).await;
    assert!(matches!(state, State::Closed { status: Some(s), .. } if s.0 == 408), "{state:?}");
    let history = h.engine.history("anon").await.expect("history");
    assert!(history.iter().all(|r| !matches!(r.to.state, State::Open { .. })));
}

/// Delete during a reconnect backoff; logout and delete at the same moment;
/// a cleanup step that hangs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_during_backoff_concurrent_logout_and_delete_and_a_hanging_cleanup() {
    let h = in_backoff("backoff", Duration::from_secs(5)).await;
    let start = Instant::now();
    assert!(removed(&h.engine.delete("backoff").await.expect("delete")));
    assert!(start.elapsed() < Duration::from_secs(2), "{:?}", start.elapsed());
    assert_eq!(h.peer.handshakes("backoff"), 1, "no reconnect after delete");

    h.open("both").await;
    let (logout, delete) = tokio::join!(h.engine.logout("both"), h.engine.delete("both"));
    assert!(logout.is_ok() && delete.is_ok(), "{logout:?} {delete:?}");
    assert!(removed(&delete.expect("delete")));

    h.open("hang").await;
    h.cleanup.behaviour.lock().expect("lock").insert(("hang".into(), "files".into()), StepBehaviour::Hang);
    let state = h.engine.delete("hang").await.expect("delete");
    let State::Removed { cleanup: instance_lifecycle::machine::CleanupOutcome::Finished { steps } } = state else {
        panic!("{state:?}")
    };
    let outcomes: Vec<_> = steps.iter().map(|s| (s.step.as_str(), s.outcome.clone())).collect();
    assert_eq!(
        outcomes,
        vec![("session-store", StepOutcome::Done), ("files", StepOutcome::TimedOut), ("cache", StepOutcome::Done)]
    );
}

/// R11: restart the engine on the same log. Open instances reconnect by the
/// rules (resuming), closed ones stay closed, removed ones never come back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn engine_restart_restores_states_and_reconnects_by_the_rules() {
    let policy = fast(Preset::Whatsapp);
    let h = Harness::new(policy.clone()).await;
    for n in ["open", "closed", "gone"] {
        h.open(n).await;
    }
    h.engine.logout("closed").await.expect("logout");
    h.engine.delete("gone").await.expect("delete");
    h.engine.shutdown().await.expect("shutdown");
    assert!(matches!(h.engine.connect("open").await, Err(EngineError::ShutDown)));
    let Harness { peer, engine, dir, cleanup, policy } = h;
    drop(engine); // releases the log's lock
    let engine = Engine::open(dir.path(), config(&policy, &cleanup)).await.expect("reopen");
    let h = Harness { peer, engine, dir, cleanup, policy };
    h.wait("open", |s| matches!(s, State::Open { .. }), Duration::from_secs(5)).await;
    assert_eq!(h.peer.hellos("open"), vec![None, Some("peer-open".into())]);
    assert!(h.inputs("open").await.contains(&InputKind::Recovered), "the recovery decision is logged");
    assert!(matches!(h.engine.state("closed"), Ok(State::Closed { .. })));
    assert_eq!(h.peer.handshakes("closed"), 1);
    assert!(matches!(h.engine.state("gone"), Err(EngineError::Removed { .. })));
    assert_eq!(h.peer.handshakes("gone"), 1);
    assert_eq!(h.engine.list().len(), 2);
    let report = h.engine.log().verify(&h.policy);
    assert!(report.is_clean(), "{:#?}", report.findings);
}

/// Evolution API #693, #765, #1302, #2655: restart while a reconnect is pending
/// and while the socket is still connecting: never two live sockets, no error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_while_pending_or_connecting_never_makes_two_sockets() {
    let h = in_backoff("r", Duration::from_secs(2)).await;
    h.engine.restart("r").await.expect("restart while backing off");
    h.wait("r", |s| matches!(s, State::Open { .. }), Duration::from_secs(5)).await;
    h.peer.set_fault("r", Fault::SlowAccept { delay: Duration::from_millis(300) });
    h.peer.set_default_fault(Fault::SlowAccept { delay: Duration::from_millis(300) });
    for _ in 0..3 {
        h.engine.restart("r").await.expect("restart while connecting");
        sleep(Duration::from_millis(50)).await;
    }
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(2) {
        assert!(h.peer.live("r") <= 1, "two live sockets");
        sleep(Duration::from_millis(5)).await;
    }
    h.wait("r", |s| matches!(s, State::Open { .. }), Duration::from_secs(5)).await;
    // The cancelled reconnect timer never fired a second attempt.
    assert!(h.inputs("r").await.iter().filter(|k| **k == InputKind::ReconnectTimer).count() == 0);
}

/// Evolution API #1576: the cleanup steps of one removal run in order, one at a time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cleanup_steps_run_in_order_one_at_a_time() {
    let h = Harness::new(fast(Preset::Whatsapp)).await;
    h.open("tidy").await;
    h.engine.delete("tidy").await.expect("delete");
    let events: Vec<_> = h
        .cleanup
        .events
        .lock()
        .expect("lock")
        .iter()
        .filter(|e| e.0 == "tidy")
        .map(|e| format!("{} {}", e.1, e.2))
        .collect();
    assert_eq!(
        events,
        ["session-store start", "session-store end", "files start", "files end", "cache start", "cache end"]
    );
}

/// R10: a host hook that panics for one instance, and a cleanup step that
/// panics for another, are caught and recorded; every other instance runs on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn r10_isolation() {
    let peer = TestPeer::start().await.expect("peer");
    let h = Harness::with(fast(Preset::Whatsapp), peer, |cfg| {
        cfg.on_transition = Some(Arc::new(|n: &instance_lifecycle::engine::Notification| {
            if n.instance.as_str() == "bad" && matches!(n.to, State::Open { .. }) {
                panic!("webhook handler bug");
            }
        }));
    })
    .await;
    for n in ["good-1", "good-2", "messy"] {
        h.open(n).await;
    }
    h.engine.create("bad", h.spec()).await.expect("create");
    h.engine.connect("bad").await.expect("connect");
    let state = h.wait("bad", |s| matches!(s, State::Closed { .. }), Duration::from_secs(5)).await;
    assert!(
        matches!(&state, State::Closed { cause: ClosedCause::Panicked { message }, .. } if message.contains("webhook handler bug")),
        "{state:?}"
    );
    assert!(h.inputs("bad").await.contains(&InputKind::Panicked), "the panic is in the log");

    h.cleanup.behaviour.lock().expect("lock").insert(("messy".into(), "files".into()), StepBehaviour::Panic);
    h.cleanup.behaviour.lock().expect("lock").insert(("messy".into(), "cache".into()), StepBehaviour::Fail);
    let state = h.engine.delete("messy").await.expect("delete");
    let State::Removed { cleanup: instance_lifecycle::machine::CleanupOutcome::Finished { steps } } = state else {
        panic!("{state:?}")
    };
    assert!(
        matches!(&steps[1].outcome, StepOutcome::Panicked { message } if message.contains("cleanup hook bug")),
        "{steps:?}"
    );
    assert!(matches!(&steps[2].outcome, StepOutcome::Failed { error } if error == "database said no"));
    let record = h.engine.history("messy").await.expect("history").pop().expect("record");
    assert_eq!(record.failures().len(), 2, "{:?}", record.failures());

    for n in ["good-1", "good-2"] {
        assert!(matches!(h.engine.state(n), Ok(State::Open { .. })), "{n}");
        assert_eq!(h.peer.handshakes(n), 1);
    }
    // The bad instance still takes commands.
    h.engine.connect("bad").await.expect("bad connects again");
}

/// A panic while the task handles a host command (here in the host's
/// transition hook) answers that command with `Interrupted`, once, after the
/// panic is recorded: the command is not sent again (which would repeat the
/// panic), the panic is recorded once, and the instance takes the next command.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_while_handling_a_command_interrupts_it_once() {
    let armed = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let trigger = armed.clone();
    let peer = TestPeer::start().await.expect("peer");
    let h = Harness::with(fast(Preset::Whatsapp), peer, |cfg| {
        cfg.on_transition = Some(Arc::new(move |n: &instance_lifecycle::engine::Notification| {
            if matches!(n.to, State::Connecting { .. }) && trigger.load(std::sync::atomic::Ordering::SeqCst) {
                panic!("webhook handler bug");
            }
        }));
    })
    .await;
    h.engine.create("boom", h.spec()).await.expect("create");
    let err = h.engine.connect("boom").await.expect_err("the command was interrupted");
    assert!(matches!(err, EngineError::Interrupted { command: "connect", .. }), "{err}");
    // The answer comes after the panic is recorded: the state already says so.
    let state = h.engine.state("boom");
    assert!(matches!(state, Ok(State::Closed { cause: ClosedCause::Panicked { .. }, .. })), "{state:?}");
    sleep(Duration::from_millis(200)).await;
    let panics = h.inputs("boom").await.iter().filter(|k| **k == InputKind::Panicked).count();
    assert_eq!(panics, 1, "the interrupted command was sent again");
    armed.store(false, std::sync::atomic::Ordering::SeqCst);
    h.engine.connect("boom").await.expect("the next command is served");
    h.wait("boom", |s| matches!(s, State::Open { .. }), Duration::from_secs(5)).await;
}

/// The engine compacts its own log: an instance's old records become a
/// snapshot while it stays `Open`, a removed instance is purged together
/// with its tombstone, the log still verifies, and the purged name can be
/// created again from sequence 1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_engine_compacts_its_log_periodically() {
    let retention = Retention { keep_records: 3, removed_after: Duration::ZERO };
    let peer = TestPeer::start().await.expect("peer");
    let h = Harness::with(fast(Preset::Whatsapp), peer, |cfg| {
        cfg.compaction = Some(Compaction { retention, every: Duration::from_secs(1) });
    })
    .await;
    h.open("busy").await;
    h.engine.logout("busy").await.expect("logout");
    h.engine.connect("busy").await.expect("connect");
    h.wait("busy", |s| matches!(s, State::Open { .. }), Duration::from_secs(5)).await;
    let before = h.history_len("busy").await;
    assert!(before > 4, "{before} records: too few to compact");
    h.engine.create("gone", h.spec()).await.expect("create");
    h.engine.delete("gone").await.expect("delete");

    let start = Instant::now();
    while !matches!(h.engine.state("gone"), Err(EngineError::UnknownInstance { .. })) {
        assert!(start.elapsed() < Duration::from_secs(10), "no compaction ran: {:?}", h.engine.state("gone"));
        sleep(Duration::from_millis(50)).await;
    }
    let purged = h.engine.history("gone").await;
    assert!(matches!(purged, Err(EngineError::UnknownInstance { .. })), "purged: {purged:?}");
    let history = h.engine.history("busy").await.expect("history");
    assert_eq!(history.len(), 4, "a snapshot and the last 3 records");
    assert!(matches!(history[0].event, Event::Snapshot { .. }), "{:?}", history[0].event.label());
    assert!(matches!(h.engine.state("busy"), Ok(State::Open { .. })), "compaction does not touch the instance");
    let report = h.engine.log().verify(&h.policy);
    assert!(report.is_clean(), "{:#?}", report.findings);

    h.engine.create("gone", h.spec()).await.expect("a purged name is free");
    assert_eq!(h.engine.history("gone").await.expect("history")[0].seq, 1);
    h.engine.logout("busy").await.expect("busy still takes commands");
}

/// Compaction on demand, and a configuration out of range is a typed error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compaction_on_demand_and_its_configuration() {
    let compaction = Some(Compaction { retention: Retention::default(), every: Duration::ZERO });
    let cfg = EngineConfig { compaction, ..EngineConfig::default() };
    let dir = tempfile::tempdir().expect("dir");
    let err = Engine::open(dir.path(), cfg).await.err().expect("a zero period is refused");
    assert!(matches!(err, EngineError::InvalidConfig { field: "compaction.every", .. }), "{err}");

    let h = Harness::new(fast(Preset::Whatsapp)).await;
    h.engine.create("old", h.spec()).await.expect("create");
    h.engine.delete("old").await.expect("delete");
    let keep_removed = Retention { keep_records: 3, removed_after: Duration::from_secs(3600) };
    let report = h.engine.compact(&keep_removed).await.expect("compact");
    assert!(report.purged.is_empty(), "removed an hour ago at the earliest");
    assert!(matches!(h.engine.state("old"), Err(EngineError::Removed { .. })));
    let report = h.engine.compact(&Retention { removed_after: Duration::ZERO, ..keep_removed }).await.expect("compact");
    assert_eq!(report.purged.iter().map(|n| n.as_str()).collect::<Vec<_>>(), ["old"]);
    assert!(matches!(h.engine.state("old"), Err(EngineError::UnknownInstance { .. })));
}

const TEST_CA: &[u8] = include_bytes!("../fixtures/test-ca.pem");
const PEER_CERT: &[u8] = include_bytes!("../fixtures/test-peer.pem");
const PEER_KEY: &[u8] = include_bytes!("../fixtures/test-peer.key");

/// `wss://`: with the peer's CA as the root, an instance opens, resumes and
/// logs out over TLS as over plain TCP; trusting only the public web PKI,
/// the same peer is refused, with the certificate problem as the close
/// reason in the log; bad root certificates are a typed error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wss_opens_with_a_private_ca_and_an_untrusted_certificate_is_a_logged_close() {
    let peer = TestPeer::start_tls(PEER_CERT, PEER_KEY).await.expect("tls peer");
    assert!(peer.url().starts_with("wss://127.0.0.1:"), "{}", peer.url());
    let transport = WsTransport::new(Arc::new(ReferenceProtocol), WsLimits::default())
        .with_root_certificates(TEST_CA)
        .expect("the test CA");
    let h = Harness::with(fast(Preset::Whatsapp), peer, |cfg| cfg.transport = Arc::new(transport)).await;
    h.open("secure").await;
    assert_eq!(h.peer.hellos("secure"), [None]);
    let state = h.engine.logout("secure").await.expect("logout");
    assert!(
        matches!(state, State::Closed { cause: ClosedCause::LoggedOut { logout: LogoutOutcome::Confirmed }, .. }),
        "{state:?}"
    );

    // The default transport trusts the web PKI only: the test CA is unknown.
    let dir = tempfile::tempdir().expect("dir");
    let untrusting = Engine::open(dir.path(), config(&h.policy, &h.cleanup)).await.expect("engine");
    untrusting.create("doubtful", h.spec()).await.expect("create");
    untrusting.connect("doubtful").await.expect("connect");
    let start = Instant::now();
    let reason = loop {
        let closed = untrusting.history("doubtful").await.expect("history").into_iter().find_map(|r| match r.event {
            Event::Transition { input: Input::TransportClosed { reason, .. }, .. } => Some(reason),
            _ => None,
        });
        if let Some(reason) = closed {
            break reason;
        }
        assert!(start.elapsed() < Duration::from_secs(5), "no close recorded");
        sleep(Duration::from_millis(20)).await;
    };
    assert!(reason.contains("certificate"), "{reason}");
    assert_eq!(h.peer.handshakes("doubtful"), 0, "no WebSocket session without trust");
    untrusting.shutdown().await.expect("shutdown");

    for bad in [&b"not a certificate"[..], b"-----BEGIN CERTIFICATE-----\nnot base64!\n-----END CERTIFICATE-----\n"] {
        let err = WsTransport::new(Arc::new(ReferenceProtocol), WsLimits::default())
            .with_root_certificates(bad)
            .err()
            .expect("refused");
        assert!(matches!(err, TlsConfigError::NoCertificates | TlsConfigError::Pem(_)), "{err}");
    }
}

/// Typed errors of the host API.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_api_errors_are_typed() {
    let h = Harness::new(fast(Preset::Whatsapp)).await;
    assert!(matches!(h.engine.create("../../etc", h.spec()).await, Err(EngineError::InvalidName(_))));
    assert!(matches!(
        h.engine.create("ok", InstanceSpec { url: "http://x".into() }).await,
        Err(EngineError::InvalidUrl { .. })
    ));
    assert!(matches!(h.engine.connect("nobody").await, Err(EngineError::UnknownInstance { .. })));
    h.engine.create("dup", h.spec()).await.expect("create");
    assert!(matches!(h.engine.create("dup", h.spec()).await, Err(EngineError::AlreadyExists { .. })));
    h.engine.delete("dup").await.expect("delete");
    assert!(matches!(h.engine.connect("dup").await, Err(EngineError::Removed { .. })));
    h.engine.create("dup", h.spec()).await.expect("a removed name is created anew");
    // Delete and create again at once, many times: the name is free as soon as delete returns.
    for _ in 0..20 {
        h.engine.delete("dup").await.expect("delete");
        h.engine.create("dup", h.spec()).await.expect("created again right after delete returned");
    }
    assert!(matches!(h.engine.state("dup"), Ok(State::Closed { cause: ClosedCause::Created, .. })));
    let history = h.engine.history("dup").await.expect("history");
    assert_eq!(history.iter().filter(|r| matches!(r.event, Event::Created { .. })).count(), 22);
    assert!(h.engine.log().verify(&h.policy).is_clean());
}

/// Fleet: 500 instances on one peer over real sockets; a tenth become
/// half-open zombies at once; each is detected within one heartbeat interval
/// + deadline (+ slack) and none of the healthy ones is marked. Heartbeats
/// are 500 ms here so 500 connections stay far from the deadline on a busy
/// 2-core machine; the benchmark runs 1,000 connections at 1 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fleet_zombies_are_detected_and_healthy_ones_are_not_marked() {
    raise_fd_limit(4096);
    let mut policy = fast(Preset::Whatsapp);
    policy.heartbeat = Heartbeat { interval: FLEET_HEARTBEAT, deadline: FLEET_DEADLINE };
    let h = Harness::new(policy).await;
    let n = 500;
    for i in 0..n {
        h.engine.create(&format!("f{i}"), h.spec()).await.expect("create");
        h.engine.connect(&format!("f{i}")).await.expect("connect");
    }
    for i in 0..n {
        h.wait(&format!("f{i}"), |s| matches!(s, State::Open { .. }), Duration::from_secs(10)).await;
    }
    let mut events = h.engine.subscribe();
    let zombies: Vec<String> = (0..n).step_by(10).map(|i| format!("f{i}")).collect();
    let start = Instant::now();
    for z in &zombies {
        h.peer.act(z, Action::Zombify);
    }
    let bound = FLEET_HEARTBEAT + FLEET_DEADLINE + Duration::from_millis(400);
    let mut detected = std::collections::HashMap::new();
    while detected.len() < zombies.len() && start.elapsed() < bound + Duration::from_secs(2) {
        if let Ok(Ok(note)) = tokio::time::timeout(Duration::from_millis(50), events.recv()).await
            && matches!(note.to, State::Zombie { .. })
        {
            detected.entry(note.instance.to_string()).or_insert(start.elapsed());
        }
    }
    for z in &zombies {
        let at = detected.get(z).unwrap_or_else(|| panic!("{z} not detected"));
        assert!(*at <= bound, "{z} detected after {at:?}");
    }
    for i in 0..n {
        let name = format!("f{i}");
        if !zombies.contains(&name) {
            assert!(!h.inputs(&name).await.contains(&InputKind::HeartbeatMissed), "{name} falsely marked");
        }
    }
}

const FLEET_HEARTBEAT: Duration = Duration::from_millis(500);
const FLEET_DEADLINE: Duration = Duration::from_millis(500);

/// A fleet test holds two descriptors per connection (engine and peer side);
/// raise the soft limit towards the hard one where it is lower (often 1,024).
fn raise_fd_limit(want: u64) {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit/setrlimit with a valid pointer to a local rlimit.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && limit.rlim_cur < want {
            limit.rlim_cur = want.min(limit.rlim_max);
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
}

/// R12 at the engine level: the previous connection's close arrives after the
/// next connection opened (a transport whose old socket reports late). It is
/// ignored: no transition, the instance stays Open on the new generation.
#[test]
fn a_late_close_of_the_previous_generation_is_ignored_by_the_engine() {
    use instance_lifecycle::machine::{Generation, StatusCode};
    use instance_lifecycle::testing::SimTransport;
    use instance_lifecycle::transport::{BoxFuture, ConnectSpec, Control, Signals, Transport};

    /// The simulated peer, except that generation 1 also reports a close 5 s late,
    /// from a task that outlives the connection (as a late socket event would).
    struct LateClose(SimTransport, Arc<std::sync::atomic::AtomicBool>);

    impl Transport for LateClose {
        fn run(&self, spec: ConnectSpec, control: tokio::sync::mpsc::Receiver<Control>, signals: Signals) -> BoxFuture {
            if spec.generation == Generation(1) {
                let (late, delivered) = (signals.clone(), self.1.clone());
                tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_secs(5)).await;
                    let sent =
                        late.closed(CloseInitiator::Peer, Some(StatusCode(1012)), "late close of the old socket").await;
                    delivered.store(sent, std::sync::atomic::Ordering::SeqCst);
                });
            }
            self.0.run(spec, control, signals)
        }
    }

    let runtime =
        tokio::runtime::Builder::new_current_thread().enable_all().start_paused(true).build().expect("runtime");
    runtime.block_on(async {
        let policy = fast(Preset::Whatsapp);
        let delivered = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let config = EngineConfig {
            policy: policy.clone(),
            transport: Arc::new(LateClose(SimTransport::new(), delivered.clone())),
            epoch: Some(instance_lifecycle::testing::EPOCH),
            ..EngineConfig::default()
        };
        let engine =
            Engine::with_log(instance_lifecycle::log::Log::in_memory().expect("log"), config).await.expect("engine");
        engine.create("late", InstanceSpec { url: "ws://sim/".into() }).await.expect("create");
        engine.connect("late").await.expect("connect");
        tokio::time::sleep(Duration::from_millis(100)).await;
        engine.restart("late").await.expect("restart");
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(matches!(engine.state("late"), Ok(State::Open { .. })));
        let before = engine.history("late").await.expect("history");
        assert_eq!(before.last().map(|r| r.to.generation), Some(Generation(2)));
        tokio::time::sleep(Duration::from_secs(10)).await; // the late close arrives meanwhile
        assert!(delivered.load(std::sync::atomic::Ordering::SeqCst), "the late close reached the instance's task");
        let after = engine.history("late").await.expect("history");
        assert_eq!(after.len(), before.len(), "the late close moved the instance: {:#?}", &after[before.len()..]);
        assert!(matches!(engine.state("late"), Ok(State::Open { .. })));
        instance_lifecycle::testing::assert_rules_hold(engine.log(), &policy);
        engine.shutdown().await.expect("shutdown");
    });
}

/// An instance at rest keeps no task: creating a fleet starts none, a
/// command wakes one, and it ends again once the instance is back in
/// `Closed` with nothing in flight — and a woken instance serves every
/// command sent while it was going back to rest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_instances_keep_no_task_and_wake_on_a_command() {
    let h = Harness::new(fast(Preset::Whatsapp)).await;
    for i in 0..20 {
        h.engine.create(&format!("idle-{i}"), h.spec()).await.expect("create");
    }
    assert_eq!(h.engine.running(), 0, "a created instance rests without a task");
    assert_eq!(h.engine.list().len(), 20);

    h.engine.connect("idle-3").await.expect("connect wakes it");
    h.wait("idle-3", |s| matches!(s, State::Open { .. }), Duration::from_secs(5)).await;
    assert_eq!(h.engine.running(), 1);
    h.engine.logout("idle-3").await.expect("logout");
    let start = Instant::now();
    while h.engine.running() != 0 {
        assert!(start.elapsed() < Duration::from_secs(5), "the task of a Closed instance did not end");
        sleep(Duration::from_millis(10)).await;
    }
    // Commands racing the task's return to rest: each is answered, none lost.
    for _ in 0..20 {
        let logout = h.engine.logout("idle-3").await.expect("logout of a closed instance");
        assert!(matches!(logout, State::Closed { .. }), "{logout:?}");
    }
    h.engine.connect("idle-3").await.expect("connect wakes it again");
    h.wait("idle-3", |s| matches!(s, State::Open { .. }), Duration::from_secs(5)).await;
    assert_eq!(
        h.engine.state("idle-0").expect("state"),
        State::Closed { cause: ClosedCause::Created, status: None, resume: None }
    );
    let deleted = h.engine.delete("idle-7").await.expect("delete of an idle instance");
    assert!(removed(&deleted), "{deleted:?}");
    assert!(matches!(h.engine.state("idle-7"), Err(EngineError::Removed { .. })));
    assert_eq!(h.engine.list().len(), 19);
}

/// A reconnect storm, small (the benchmark `storm` is the large one): every
/// connection of a fleet dropped at once, as a restarting server does. The
/// fleet is back within its first backoff window plus slack, the herd is
/// spread (no second of the window takes most of it), no instance retries
/// beyond its budget, and the log verifies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reconnect_storm_comes_back_spread_and_within_budget() {
    let mut policy = fast(Preset::Whatsapp);
    policy.backoff.base = Duration::from_millis(400);
    policy.backoff.cap = Duration::from_secs(2);
    let h = Harness::new(policy.clone()).await;
    let names: Vec<String> = (0..100).map(|i| format!("herd-{i:03}")).collect();
    for n in &names {
        h.open(n).await;
    }
    let before = h.engine.log().tip().0;
    let mut events = h.engine.subscribe();
    let dropped = h.peer.act_all(Action::Drop);
    assert_eq!(dropped, names.len());
    let start = Instant::now();
    let mut back = std::collections::HashMap::new();
    let bound = policy.backoff.base * policy.backoff.factor + Duration::from_secs(2);
    while back.len() < names.len() && start.elapsed() < bound {
        if let Ok(Ok(n)) = tokio::time::timeout(Duration::from_millis(50), events.recv()).await
            && matches!(n.to, State::Open { .. })
        {
            back.entry(n.instance.to_string()).or_insert(start.elapsed());
        }
    }
    assert_eq!(back.len(), names.len(), "not all back within {bound:?}");
    // Spread: the first retries land over base..base*factor, not all at base.
    let mut times: Vec<Duration> = back.values().copied().collect();
    times.sort();
    let spread = times[times.len() - 1] - times[0];
    assert!(spread >= policy.backoff.base / 2, "the herd came back within {spread:?}: not spread");
    let log = h.engine.log();
    for n in &names {
        let name = instance_lifecycle::InstanceName::new(n.as_str()).expect("name");
        let attempts = log
            .history(&name)
            .expect("history")
            .iter()
            .filter(|r| r.global > before)
            .filter(|r| matches!(&r.event, Event::Transition { effects, .. } if effects.iter().any(|e| matches!(e, Effect::OpenTransport { .. }))))
            .count();
        assert!((1..=policy.backoff.attempts_max as usize).contains(&attempts), "{n}: {attempts} attempts");
    }
    let report = log.verify_recorded(&policy);
    assert!(report.is_clean(), "{:#?}", report.findings);
}

/// The compaction schedule survives restarts (issue 33): an engine that
/// never lives a whole period — each life 10 minutes of virtual time, ended
/// without a shutdown — still compacts once a period, counted from the last
/// compaction the log records, and a removed instance past its retention is
/// gone after the crash loop. (Before, the first compaction came one period
/// after each start: such a host never compacted.)
#[test]
fn compaction_survives_a_crash_loop_and_runs_when_overdue() {
    let runtime =
        tokio::runtime::Builder::new_current_thread().enable_all().start_paused(true).build().expect("runtime");
    runtime.block_on(async {
        let dir = tempfile::tempdir().expect("dir");
        let (life, every) = (Duration::from_secs(600), Duration::from_secs(3600));
        let retention = Retention { keep_records: 1_000, removed_after: Duration::from_secs(1800) };
        let t0 = instance_lifecycle::testing::EPOCH;
        let open = |epoch: Timestamp| {
            let config = EngineConfig {
                epoch: Some(epoch),
                compaction: Some(Compaction { retention: retention.clone(), every }),
                log: LogConfig { durability: instance_lifecycle::log::Durability::Buffered, ..LogConfig::default() },
                ..EngineConfig::default()
            };
            Engine::open(dir.path(), config)
        };
        let mut compacted = Vec::new();
        for i in 0..7u32 {
            let epoch = t0.saturating_add(life * i);
            let engine = open(epoch).await.expect("open");
            if i == 0 {
                engine.create("gone", InstanceSpec { url: "ws://127.0.0.1:9/".into() }).await.expect("create");
                engine.delete("gone").await.expect("delete");
            }
            tokio::time::sleep(Duration::from_secs(2)).await;
            compacted.push(engine.log().last_compacted().expect("readable"));
            if i < 6 {
                assert!(matches!(engine.state("gone"), Err(EngineError::Removed { .. })), "life {i}: kept 30 min");
            }
            tokio::time::sleep(life - Duration::from_secs(2)).await;
            drop(engine); // a crash: no shutdown
        }
        let first = t0.saturating_add(Duration::from_secs(1));
        // Life 0 found no compaction recorded: overdue, run a second after the start.
        assert_eq!(compacted[0], Some(first));
        // Lives 1 to 5 start within the period: none of them compacts.
        assert!(compacted[1..6].iter().all(|c| *c == Some(first)), "{compacted:?}");
        // Life 6 starts a period after the last one: overdue, and the removed instance goes.
        assert_eq!(compacted[6], Some(t0.saturating_add(life * 6 + Duration::from_secs(1))));
        let engine = open(t0.saturating_add(life * 7)).await.expect("open");
        assert!(matches!(engine.state("gone"), Err(EngineError::UnknownInstance { .. })), "purged");
        engine.shutdown().await.expect("shutdown");
    });
}
