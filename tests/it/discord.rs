//! The Discord gateway, for real: the engine's Discord protocol against the
//! fake gateway of `testing::discord`, which enforces Discord's limits.
//! Each behaviour of the protocol's documentation is a test here; the
//! gateway runs with a short heartbeat and short windows so they take
//! seconds, not minutes.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use instance_lifecycle::engine::{Engine, EngineConfig, EngineError};
use instance_lifecycle::log::{Event, InstanceSpec, Record};
use instance_lifecycle::machine::{
    ClosedCause, Heartbeat, Input, InputKind, Phase, Policy, Preset, State, StatusCode, Timeouts, ZombieCause,
};
use instance_lifecycle::testing::discord::{FakeGateway, GatewayConfig, Handshake};
use instance_lifecycle::transport::discord::{DiscordConfig, DiscordProtocol, ResumeData};
use instance_lifecycle::transport::{Frame, Inbound, SendBudget, WsLimits, WsTransport};
use tokio::time::{Instant, sleep, timeout};

const TOKEN: &str = "Bot.test-token";
const INTERVAL: Duration = Duration::from_millis(300);

/// The gateway most tests use: `shards` shards, a 300 ms heartbeat, an
/// identify window of 200 ms for `max_concurrency` buckets (the shards pace
/// at 225 ms), 40 frames per second.
fn gateway_config(shards: u32, max_concurrency: u32) -> GatewayConfig {
    let mut c = GatewayConfig::new(TOKEN, shards);
    c.heartbeat_interval = INTERVAL;
    // Beats are judged by when they arrive: on a loaded machine one can be
    // delivered late and the next on time, closer than the interval.
    c.beat_tolerance = Duration::from_millis(100);
    c.max_concurrency = max_concurrency;
    c.identify_window = Duration::from_millis(200);
    c.frame_limit = 40;
    c.frame_window = Duration::from_secs(1);
    c
}

/// The `discord` preset with test time-outs: an ACK is due within 250 ms.
fn policy() -> Policy {
    let mut p = Policy::preset(Preset::Discord);
    p.heartbeat = Heartbeat { interval: Duration::from_secs(30), deadline: Duration::from_millis(250) };
    p.timeouts = Timeouts {
        connect: Duration::from_secs(5),
        pairing_code: Duration::from_secs(5),
        logout: Duration::from_millis(500),
        close: Duration::from_millis(500),
        cleanup: Duration::from_secs(1),
    };
    p.backoff.base = Duration::from_millis(50);
    p.backoff.cap = Duration::from_millis(200);
    p.backoff.stable_period = Duration::from_millis(500);
    p
}

fn protocol(gateway: &GatewayConfig) -> DiscordProtocol {
    let mut c = DiscordConfig::new(TOKEN, 513);
    c.shards = gateway.shards;
    c.max_concurrency = gateway.max_concurrency;
    // The pacer's margin for the path is 2 % of the window, 4 ms here (100 ms
    // for Discord's 5 s): on a loaded machine an IDENTIFY can take longer than
    // that to arrive, so the shards pace with 25 ms more than the gateway enforces.
    c.identify_window = gateway.identify_window + Duration::from_millis(25);
    DiscordProtocol::new(c).expect("discord config")
}

fn engine_config(gateway: &GatewayConfig, policy: Policy) -> EngineConfig {
    let transport = WsTransport::new(Arc::new(protocol(gateway)), WsLimits::default());
    EngineConfig { policy, transport: Arc::new(transport), ..EngineConfig::default() }
}

struct Fleet {
    gateway: FakeGateway,
    engine: Engine,
    _dir: tempfile::TempDir,
}

impl Fleet {
    async fn start(config: GatewayConfig) -> Self {
        Self::start_with(config, |_| {}).await
    }

    async fn start_with(config: GatewayConfig, tweak: impl FnOnce(&mut EngineConfig)) -> Self {
        let dir = tempfile::tempdir().expect("dir");
        let mut cfg = engine_config(&config, policy());
        tweak(&mut cfg);
        let gateway = FakeGateway::start(config).await.expect("gateway");
        let engine = Engine::open(dir.path(), cfg).await.expect("engine");
        Self { gateway, engine, _dir: dir }
    }

    async fn shard(&self, n: u32) -> String {
        let name = format!("shard-{n}");
        self.engine.create(&name, InstanceSpec { url: self.gateway.url() }).await.expect("create");
        self.engine.connect(&name).await.expect("connect");
        self.wait(&name, |s| matches!(s, State::Open { .. })).await;
        name
    }

    async fn wait(&self, name: &str, ok: impl Fn(&State) -> bool) -> State {
        wait_for(&self.engine, name, ok).await
    }

    async fn inputs(&self, name: &str) -> Vec<InputKind> {
        let history = self.engine.history(name).await.expect("history");
        history.iter().filter_map(|r| input_of(r).map(Input::kind)).collect()
    }
}

async fn wait_for(engine: &Engine, name: &str, ok: impl Fn(&State) -> bool) -> State {
    let start = Instant::now();
    loop {
        if let Ok(s) = engine.state(name)
            && ok(&s)
        {
            return s;
        }
        assert!(start.elapsed() < Duration::from_secs(10), "{name} stuck in {:?}", engine.state(name));
        sleep(Duration::from_millis(10)).await;
    }
}

/// The newest `Open` the log recorded for the instance (what its session
/// resumes from), whatever the live state has become since.
async fn last_open(engine: &Engine, name: &str) -> State {
    let history = engine.history(name).await.expect("history");
    let open = history.into_iter().rev().map(|r| r.to.state).find(|s| matches!(s, State::Open { .. }));
    open.expect("an Open record")
}

fn resume_of(state: &State) -> ResumeData {
    match state {
        State::Open { identity, .. } => ResumeData::from_identity(identity).expect("resume data in the identity"),
        other => panic!("not open: {other:?}"),
    }
}

fn input_of(record: &Record) -> Option<&Input> {
    match &record.event {
        Event::Transition { input, .. } => Some(input),
        _ => None,
    }
}

/// The generation of the instance's connection: its newest record's.
async fn generation(engine: &Engine, name: &str) -> u64 {
    engine.history(name).await.expect("history").last().map(|r| r.to.generation.0).expect("a record")
}

/// Waits until the instance's newest record is an `Open` on a newer
/// connection than `before`, and returns that state (the live state may have
/// moved on since: a beat acknowledged late on a loaded machine is a zombie).
async fn reopened(engine: &Engine, name: &str, before: u64) -> State {
    let start = Instant::now();
    loop {
        let newest = engine.history(name).await.expect("history").pop().expect("a record").to;
        if newest.generation.0 > before && matches!(newest.state, State::Open { .. }) {
            return newest.state;
        }
        assert!(start.elapsed() < Duration::from_secs(10), "{name} not open again: {:?}", engine.state(name));
        sleep(Duration::from_millis(10)).await;
    }
}

/// The next frame the host receives, as JSON.
async fn next_json(inbound: &mut Inbound) -> serde_json::Value {
    let frame = timeout(Duration::from_secs(5), inbound.recv()).await.expect("a frame").expect("a frame");
    match &frame.frame {
        Frame::Text(t) => serde_json::from_str(t).expect("json"),
        Frame::Binary(_) => panic!("binary"),
    }
}

/// IDENTIFY → READY opens the shard; its identity is the session's resume
/// data; dispatches reach the host in order with their sequence numbers.
#[tokio::test]
async fn identify_then_ready_opens_and_dispatches_reach_the_host_in_order() {
    let fleet = Fleet::start(gateway_config(2, 1)).await;
    let mut inbound = fleet.engine.frames();
    let name = fleet.shard(1).await;
    let ready = next_json(&mut inbound).await;
    assert_eq!((ready["t"].as_str(), ready["s"].as_u64()), (Some("READY"), Some(1)), "{ready}");
    let resume = resume_of(&last_open(&fleet.engine, &name).await);
    assert_eq!(Some(resume.session_id.as_str()), ready["d"]["session_id"].as_str());
    assert_eq!(resume.seq, 1);
    assert_eq!(fleet.gateway.handshakes(), [Handshake::Identify { shard: 1 }]);
    for n in 0..20 {
        assert!(fleet.gateway.dispatch(1, "MESSAGE_CREATE", serde_json::json!({ "n": n })));
    }
    for n in 0..20u64 {
        let event = next_json(&mut inbound).await;
        assert_eq!((event["s"].as_u64(), event["d"]["n"].as_u64()), (Some(n + 2), Some(n)), "{event}");
    }
    assert_eq!(fleet.inputs(&name).await, [InputKind::Connect, InputKind::Opened], "dispatches are not lifecycle");
}

/// Heartbeats follow HELLO's interval (the policy's 30 s is never used),
/// each ACK is a pong, nothing of it is recorded, and the gateway never
/// sees a beat out of schedule — also after it asked for one (op 1).
#[tokio::test]
async fn heartbeats_follow_the_gateways_interval_and_acks_keep_the_shard_open() {
    // The schedule is under test, not the deadline: a loaded machine may take
    // longer than the other tests' 250 ms to hear an ACK.
    let fleet = Fleet::start_with(gateway_config(1, 1), |c| c.policy.heartbeat.deadline = Duration::from_secs(2)).await;
    let name = fleet.shard(0).await;
    sleep(INTERVAL * 4).await;
    assert!(fleet.gateway.request_beat(0));
    sleep(INTERVAL * 4).await;
    let stats = fleet.gateway.stats();
    assert!(stats.heartbeats >= 6, "{stats:?}");
    assert_eq!(stats.early_beats, 0, "{stats:?}");
    let inputs = fleet.inputs(&name).await;
    assert!(matches!(fleet.engine.state(&name), Ok(State::Open { .. })), "{inputs:?}");
    assert_eq!(inputs, [InputKind::Connect, InputKind::Opened], "heartbeats are upkeep");
}

/// A missed ACK makes a Zombie through the table's pong deadline (R7);
/// the zombie then resumes its session.
#[tokio::test]
async fn a_missed_ack_is_a_zombie_and_the_zombie_resumes() {
    let fleet = Fleet::start(gateway_config(1, 1)).await;
    let name = fleet.shard(0).await;
    let session = resume_of(&last_open(&fleet.engine, &name).await).session_id;
    assert!(fleet.gateway.set_silent(0, true));
    fleet.wait(&name, |s| matches!(s, State::Zombie { cause: ZombieCause::HeartbeatMissed, .. })).await;
    assert_eq!(fleet.inputs(&name).await.last(), Some(&InputKind::PongDeadline));
    fleet.wait(&name, |s| matches!(s, State::Open { .. })).await;
    let handshakes = fleet.gateway.handshakes();
    assert!(
        matches!(handshakes.last(), Some(Handshake::Resume { session_id, .. }) if *session_id == session),
        "{handshakes:?}"
    );
    assert_eq!(fleet.gateway.stats().identifies, 1);
}

/// op 7 RECONNECT: the shard closes (not with 1000/1001), resumes with the
/// session id and the last sequence number, and the events it missed are
/// replayed to the host before RESUMED; no new IDENTIFY (R13).
#[tokio::test]
async fn op7_reconnect_resumes_with_the_last_sequence() {
    let fleet = Fleet::start(gateway_config(1, 1)).await;
    let mut inbound = fleet.engine.frames();
    let name = fleet.shard(0).await;
    let session = resume_of(&last_open(&fleet.engine, &name).await).session_id;
    for n in 0..5 {
        fleet.gateway.dispatch(0, "TYPING_START", serde_json::json!({ "n": n }));
    }
    for _ in 0..6 {
        next_json(&mut inbound).await;
    }
    let before = generation(&fleet.engine, &name).await;
    assert!(fleet.gateway.reconnect(0));
    reopened(&fleet.engine, &name, before).await;
    assert_eq!(
        fleet.gateway.handshakes(),
        [Handshake::Identify { shard: 0 }, Handshake::Resume { session_id: session.clone(), seq: 6 }]
    );
    let resumed = next_json(&mut inbound).await;
    assert_eq!(resumed["t"].as_str(), Some("RESUMED"), "{resumed}");
    // The old connection was closed with 1012 (not dropped, and never 1000/1001, which end the session).
    wait_until(|| !fleet.gateway.stats().shard_closes.is_empty()).await;
    assert_eq!(fleet.gateway.stats().shard_closes, [Some(1012)]);
    let inputs = fleet.inputs(&name).await;
    assert!(inputs.contains(&InputKind::ReconnectRequested), "{inputs:?}");
    assert_eq!(resume_of(&last_open(&fleet.engine, &name).await).session_id, session);
}

/// R15: shards queued for their IDENTIFY permit far longer than the connect
/// time-out all open, each on its first attempt: the wait is the fleet's,
/// and the IDENTIFY sent after it restarts the connect deadline.
#[tokio::test]
async fn a_queue_for_identify_longer_than_the_connect_timeout_times_out_no_shard() {
    const SHARDS: u32 = 8;
    let config = gateway_config(SHARDS, 1);
    // One IDENTIFY per 225 ms: the last shard waits 1.6 s, more than twice its 600 ms connect time-out.
    let fleet = Fleet::start_with(config, |c| c.policy.timeouts.connect = Duration::from_millis(600)).await;
    let names: Vec<String> = (0..SHARDS).map(|n| format!("shard-{n}")).collect();
    for name in &names {
        fleet.engine.create(name, InstanceSpec { url: fleet.gateway.url() }).await.expect("create");
    }
    for name in &names {
        fleet.engine.connect(name).await.expect("connect");
    }
    for name in &names {
        fleet.wait(name, |s| matches!(s, State::Open { .. })).await;
    }
    for name in &names {
        let inputs = fleet.inputs(name).await;
        assert!(!inputs.contains(&InputKind::ConnectTimeout), "{name} timed out in the queue: {inputs:?}");
        assert_eq!(generation(&fleet.engine, name).await, 1, "{name} opened on its first attempt: {inputs:?}");
    }
    let stats = fleet.gateway.stats();
    assert_eq!(
        (stats.identifies, stats.identify_refused, stats.connections),
        (u64::from(SHARDS), 0, u64::from(SHARDS))
    );
}

async fn wait_until(ok: impl Fn() -> bool) {
    let start = Instant::now();
    while !ok() {
        assert!(start.elapsed() < Duration::from_secs(10), "condition not met within 10 s");
        sleep(Duration::from_millis(10)).await;
    }
}

/// op 9 with `d: true` resumes at once; with `d: false` the session is
/// dropped and the shard identifies anew after 1–5 s (R14).
#[tokio::test]
async fn op9_resumable_resumes_and_not_resumable_identifies_after_one_to_five_seconds() {
    let fleet = Fleet::start(gateway_config(1, 1)).await;
    let name = fleet.shard(0).await;
    let session = resume_of(&last_open(&fleet.engine, &name).await).session_id;

    let before = generation(&fleet.engine, &name).await;
    assert!(fleet.gateway.invalidate(0, true));
    reopened(&fleet.engine, &name, before).await;
    assert!(
        matches!(fleet.gateway.handshakes().last(), Some(Handshake::Resume { session_id, .. }) if *session_id == session)
    );

    assert!(fleet.gateway.invalidate(0, false));
    let backoff = fleet.wait(&name, |s| matches!(s, State::Connecting { phase: Phase::Backoff { .. }, .. })).await;
    let State::Connecting { resume: None, .. } = backoff else { panic!("the session was kept: {backoff:?}") };
    let history = fleet.engine.history(&name).await.expect("history");
    let invalid = history.last().expect("record");
    let Some(Input::SessionInvalid { retry_after, .. }) = input_of(invalid) else { panic!("{:?}", invalid.event) };
    assert!((Duration::from_secs(1)..=Duration::from_secs(5)).contains(retry_after), "{retry_after:?}");
    let open =
        timeout(Duration::from_secs(8), fleet.wait(&name, |s| matches!(s, State::Open { .. }))).await.expect("open");
    assert_ne!(resume_of(&open).session_id, session, "a new session");
    let handshakes = fleet.gateway.handshakes();
    assert_eq!(handshakes.last(), Some(&Handshake::Identify { shard: 0 }), "{handshakes:?}");
    assert_eq!(fleet.gateway.stats().identifies, 2);
}

/// Close codes: 4000 resumes, 4009 identifies anew (R14), 4004 stops for good (R4).
#[tokio::test]
async fn close_codes_resume_identify_anew_or_stop() {
    let fleet = Fleet::start(gateway_config(1, 1)).await;
    let name = fleet.shard(0).await;
    let session = resume_of(&last_open(&fleet.engine, &name).await).session_id;

    let before = generation(&fleet.engine, &name).await;
    assert!(fleet.gateway.close(0, 4000));
    reopened(&fleet.engine, &name, before).await;
    assert!(
        matches!(fleet.gateway.handshakes().last(), Some(Handshake::Resume { session_id, .. }) if *session_id == session)
    );

    let before = generation(&fleet.engine, &name).await;
    assert!(fleet.gateway.close(0, 4009));
    let open = reopened(&fleet.engine, &name, before).await;
    assert_eq!(fleet.gateway.handshakes().last(), Some(&Handshake::Identify { shard: 0 }));
    assert_ne!(resume_of(&open).session_id, session);

    let handshakes = fleet.gateway.handshakes().len();
    assert!(fleet.gateway.close(0, 4004));
    let closed = fleet.wait(&name, |s| matches!(s, State::Closed { .. })).await;
    assert!(
        matches!(closed, State::Closed { cause: ClosedCause::FinalStatus, status: Some(StatusCode(4004)), .. }),
        "{closed:?}"
    );
    sleep(Duration::from_millis(500)).await;
    assert_eq!(fleet.gateway.handshakes().len(), handshakes, "a final code never reconnects");
}

/// A wrong token is 4004 at IDENTIFY: the shard stops before it ever opens.
#[tokio::test]
async fn a_wrong_token_stops_the_shard() {
    let config = gateway_config(1, 1);
    let dir = tempfile::tempdir().expect("dir");
    let gateway = FakeGateway::start(config.clone()).await.expect("gateway");
    let mut c = DiscordConfig::new("Bot.wrong", 1);
    c.identify_window = config.identify_window;
    let transport = WsTransport::new(Arc::new(DiscordProtocol::new(c).expect("config")), WsLimits::default());
    let engine = Engine::open(
        dir.path(),
        EngineConfig { policy: policy(), transport: Arc::new(transport), ..EngineConfig::default() },
    )
    .await
    .expect("engine");
    engine.create("shard-0", InstanceSpec { url: gateway.url() }).await.expect("create");
    engine.connect("shard-0").await.expect("connect");
    let closed =
        wait_for(&engine, "shard-0", |s| matches!(s, State::Closed { cause: ClosedCause::FinalStatus, .. })).await;
    assert!(matches!(closed, State::Closed { status: Some(StatusCode(4004)), .. }), "{closed:?}");
    assert_eq!(gateway.stats().bad_token, 1);
}

/// A logout is a close with 1000: the session ends, the shard is Closed
/// without resume data, and a later connect identifies anew.
#[tokio::test]
async fn logout_ends_the_session_and_the_next_connect_identifies() {
    let fleet = Fleet::start(gateway_config(1, 1)).await;
    let name = fleet.shard(0).await;
    fleet.engine.logout(&name).await.expect("logout");
    let closed = fleet.wait(&name, |s| matches!(s, State::Closed { .. })).await;
    assert!(matches!(closed, State::Closed { cause: ClosedCause::LoggedOut { .. }, resume: None, .. }), "{closed:?}");
    sleep(Duration::from_millis(250)).await;
    fleet.engine.connect(&name).await.expect("connect");
    fleet.wait(&name, |s| matches!(s, State::Open { .. })).await;
    assert_eq!(fleet.gateway.handshakes(), [Handshake::Identify { shard: 0 }, Handshake::Identify { shard: 0 }]);
}

/// The engine's `send` writes the host's own gateway commands, and a send
/// budget under the gateway's frame limit keeps a host that sends as fast
/// as it can from ever being closed with 4008.
#[tokio::test]
async fn a_send_budget_under_the_limit_is_never_closed_with_4008() {
    let fleet = Fleet::start_with(gateway_config(1, 1), |c| {
        // 40 frames per second at the gateway; heartbeats take ~4 of them.
        c.send_budget = Some(SendBudget { frames: 30, per: Duration::from_secs(1) });
    })
    .await;
    let name = fleet.shard(0).await;
    let presence = Frame::Text(r#"{"op":3,"d":{"since":null,"activities":[],"status":"online","afk":false}}"#.into());
    let (mut sent, mut limited) = (0u64, 0u64);
    let end = Instant::now() + Duration::from_secs(3);
    while Instant::now() < end {
        match fleet.engine.send(&name, presence.clone()) {
            Ok(()) => sent += 1,
            Err(EngineError::RateLimited { .. }) => limited += 1,
            Err(e) => panic!("{e}"),
        }
        sleep(Duration::from_millis(5)).await;
    }
    sleep(Duration::from_millis(200)).await;
    let stats = fleet.gateway.stats();
    assert_eq!(stats.rate_limited, 0, "{stats:?}");
    assert!(limited > 0 && sent >= 60, "the budget was reached: sent {sent}, refused {limited}");
    assert_eq!(stats.app_frames, sent, "every accepted frame reached the gateway");
    assert!(matches!(fleet.engine.state(&name), Ok(State::Open { .. })));
}

/// Without a budget, the same host is closed with 4008 — and resumes: the
/// gateway's limit is real, and 4008 is resumable.
#[tokio::test]
async fn without_a_budget_the_gateway_closes_with_4008_and_the_shard_resumes() {
    let fleet = Fleet::start(gateway_config(1, 1)).await;
    let name = fleet.shard(0).await;
    let session = resume_of(&last_open(&fleet.engine, &name).await).session_id;
    let before = generation(&fleet.engine, &name).await;
    for _ in 0..60 {
        let _ = fleet.engine.send(&name, Frame::Text(r#"{"op":3,"d":{}}"#.into()));
    }
    wait_until(|| fleet.gateway.stats().rate_limited == 1).await;
    reopened(&fleet.engine, &name, before).await;
    let closed = fleet.engine.history(&name).await.expect("history");
    assert!(closed.iter().any(|r| matches!(input_of(r).and_then(Input::closed), Some((_, Some(StatusCode(4008)), _)))));
    assert!(
        matches!(fleet.gateway.handshakes().last(), Some(Handshake::Resume { session_id, .. }) if *session_id == session)
    );
}

/// Chaos over a fleet of shards: closes with every kind of code, op 7, op 9
/// both ways, silence, dispatches, and a host sending within its budget.
/// The gateway never sees its identify concurrency or its frame limit
/// exceeded, nor a heartbeat out of schedule, and every shard ends Open.
#[tokio::test]
async fn chaos_never_exceeds_the_identify_concurrency_or_the_frame_limit() {
    const SHARDS: u32 = 8;
    let fleet = Fleet::start_with(gateway_config(SHARDS, 2), |c| {
        c.send_budget = Some(SendBudget { frames: 25, per: Duration::from_secs(1) });
    })
    .await;
    for n in 0..SHARDS {
        let name = format!("shard-{n}");
        fleet.engine.create(&name, InstanceSpec { url: fleet.gateway.url() }).await.expect("create");
        fleet.engine.connect(&name).await.expect("connect");
    }
    for n in 0..SHARDS {
        fleet.wait(&format!("shard-{n}"), |s| matches!(s, State::Open { .. })).await;
    }
    let mut rng = 0x2545_f491_4f6c_dd1d_u64;
    let mut next = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    for round in 0..60 {
        let shard = u32::try_from(next() % u64::from(SHARDS)).expect("shard");
        match next() % 10 {
            0 => drop(
                fleet.gateway.close(shard, [4000, 4001, 4002, 4003, 4005, 4008, 4007, 4009][(next() % 8) as usize]),
            ),
            1 => drop(fleet.gateway.reconnect(shard)),
            2 => drop(fleet.gateway.invalidate(shard, next() % 2 == 0)),
            3 => drop(fleet.gateway.request_beat(shard)),
            _ => {
                fleet.gateway.dispatch(shard, "MESSAGE_CREATE", serde_json::json!({ "round": round }));
                for _ in 0..8 {
                    let _ = fleet.engine.send(&format!("shard-{shard}"), Frame::Text(r#"{"op":3,"d":{}}"#.into()));
                }
            }
        }
        sleep(Duration::from_millis(50)).await;
    }
    for n in 0..SHARDS {
        let name = format!("shard-{n}");
        timeout(Duration::from_secs(15), fleet.wait(&name, |s| matches!(s, State::Open { .. })))
            .await
            .expect("every shard open again");
    }
    let stats = fleet.gateway.stats();
    assert_eq!((stats.identify_refused, stats.rate_limited, stats.early_beats), (0, 0, 0), "{stats:?}");
    assert!(stats.resumes > 0 && stats.identifies > u64::from(SHARDS), "the chaos did reconnect: {stats:?}");
    let report = fleet.engine.log().verify_recorded(fleet.engine.policy());
    assert!(report.is_clean(), "{:?}", report.findings);
}

/// The child of `sigkill_mid_session_then_restart_resumes_with_the_recorded_session`.
const CHILD_ENV: &str = "LIFECYCLE_DISCORD_CHILD";

/// SIGKILL of the engine mid-session, restart on the same log: the next
/// connection is a RESUME with the session id and sequence number recorded
/// at READY (no IDENTIFY), and the events dispatched since reach the host.
#[test]
fn sigkill_mid_session_then_restart_resumes_with_the_recorded_session() {
    if let Ok(spec) = std::env::var(CHILD_ENV) {
        return child(&spec);
    }
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        let config = gateway_config(1, 1);
        let gateway = FakeGateway::start(config.clone()).await.expect("gateway");
        let dir = tempfile::tempdir().expect("dir");
        let mut child = KillOnDrop(
            Command::new(std::env::current_exe().expect("exe"))
                .args([
                    "--exact",
                    "discord::sigkill_mid_session_then_restart_resumes_with_the_recorded_session",
                    "--nocapture",
                    "--test-threads=1",
                ])
                .env(CHILD_ENV, format!("{}|{}", dir.path().display(), gateway.url()))
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .spawn()
                .expect("spawn the child engine"),
        );
        let stdout = child.0.stdout.take().expect("stdout");
        let opened = tokio::task::spawn_blocking(move || {
            // libtest prints the test's name without a newline before the child's own line.
            BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
                .find_map(|l| l.split_once("open ").map(|(_, id)| id.to_owned()))
        });
        let session = timeout(Duration::from_secs(20), opened)
            .await
            .expect("the child opened")
            .expect("join")
            .expect("open line");
        for n in 0..4 {
            assert!(gateway.dispatch(0, "MESSAGE_CREATE", serde_json::json!({ "n": n })));
        }
        wait_until(|| gateway.seq_of(0) == Some(5)).await;
        sleep(Duration::from_millis(100)).await;
        // SIGKILL: no shutdown, no close frame, nothing flushed but what the log committed.
        child.0.kill().expect("kill");
        let _ = child.0.wait();

        let engine = Engine::open(dir.path(), engine_config(&config, policy())).await.expect("reopen");
        let mut inbound = engine.frames();
        wait_for(&engine, "shard-0", |s| matches!(s, State::Open { .. })).await;
        assert_eq!(
            gateway.handshakes(),
            [Handshake::Identify { shard: 0 }, Handshake::Resume { session_id: session.clone(), seq: 1 }],
            "resumed with the recorded session and sequence, no second IDENTIFY"
        );
        // The four events the killed engine never recorded are replayed, then RESUMED.
        for n in 0..4u64 {
            let event = next_json(&mut inbound).await;
            assert_eq!((event["s"].as_u64(), event["d"]["n"].as_u64()), (Some(n + 2), Some(n)), "{event}");
        }
        assert_eq!(next_json(&mut inbound).await["t"].as_str(), Some("RESUMED"));
        let inputs: Vec<InputKind> = engine
            .history("shard-0")
            .await
            .expect("history")
            .iter()
            .filter_map(|r| input_of(r).map(Input::kind))
            .collect();
        assert_eq!(inputs, [InputKind::Connect, InputKind::Opened, InputKind::Recovered, InputKind::Opened]);
    });
}

/// A child process killed when the test ends, passed or not.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The killed engine: opens shard 0, prints `open <session_id>`, and runs until killed.
fn child(spec: &str) {
    let (dir, url) = spec.split_once('|').expect("dir|url");
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        let engine = Engine::open(std::path::Path::new(dir), engine_config(&gateway_config(1, 1), policy()))
            .await
            .expect("engine");
        engine.create("shard-0", InstanceSpec { url: url.to_owned() }).await.expect("create");
        engine.connect("shard-0").await.expect("connect");
        let open = wait_for(&engine, "shard-0", |s| matches!(s, State::Open { .. })).await;
        println!("open {}", resume_of(&open).session_id);
        std::future::pending::<()>().await;
    });
}
