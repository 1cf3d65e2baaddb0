//! Application frames through the engine, against bare tokio-tungstenite on
//! the same peer in the same run:
//! - inbound: frames/s from the peer to the host through `Engine::frames`,
//!   vs a bare reader of the same connection kind (target ≥ 0.8×);
//! - send: the round trip of `Engine::send` to the peer's echo back through
//!   `Engine::frames`, p50 and p99, vs a bare writer awaiting the same echo.
//!
//! - a 1,000-shard Discord storm against the fake gateway with identify
//!   pacing on: the time to all READY vs the pacing's own lower bound.
//!
//! Rounds alternate (engine, bare, engine, …) and the median of each side is
//! compared. `BENCH_SCALE` scales the counts. Prints Markdown tables. An
//! argument picks one part: `cargo bench --bench traffic -- frames` (or `storm`).

use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use instance_lifecycle::engine::{Engine, EngineConfig, EngineError};
use instance_lifecycle::log::InstanceSpec;
use instance_lifecycle::machine::{Policy, Preset, State};
use instance_lifecycle::testing::peer::{Action, TestPeer};
use instance_lifecycle::transport::{Frame, Inbound};
use tokio_tungstenite::tungstenite::Message;

fn scaled(n: usize) -> usize {
    let scale: f64 = std::env::var("BENCH_SCALE").ok().and_then(|s| s.parse().ok()).unwrap_or(1.0);
    ((n as f64 * scale) as usize).max(1)
}

const ROUNDS: usize = 5;
/// Inbound rounds: short and many, so that one unlucky schedule moves the median little.
const INBOUND_ROUNDS: usize = 61;
const PAD: usize = 64;

type Bare = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// A bare client of the reference peer: hello, then the peer's `ready`.
async fn bare(peer: &TestPeer, name: &str) -> Bare {
    // As the engine connects: Nagle off.
    let (mut ws, _) = tokio_tungstenite::connect_async_with_config(peer.url(), None, true).await.expect("connect");
    ws.send(Message::text(format!(r#"{{"type":"hello","instance":"{name}","resume":null}}"#))).await.expect("hello");
    match ws.next().await {
        Some(Ok(Message::Text(t))) if t.as_str().contains("ready") => ws,
        other => panic!("no ready: {other:?}"),
    }
}

async fn engine_inbound(peer: &TestPeer, inbound: &mut Inbound, frames: u32) -> f64 {
    let start = Instant::now();
    peer.act("eng", Action::Send { count: frames, pad: PAD });
    let mut got = 0;
    while got < frames {
        match inbound.recv().await {
            Ok(_) => got += 1,
            Err(e) => panic!("the bench's reader fell behind: {e}"),
        }
    }
    f64::from(frames) / start.elapsed().as_secs_f64()
}

async fn bare_inbound(peer: &TestPeer, ws: &mut Bare, frames: u32) -> f64 {
    let start = Instant::now();
    peer.act("bare", Action::Send { count: frames, pad: PAD });
    let mut got = 0;
    while got < frames {
        match ws.next().await {
            Some(Ok(Message::Text(_))) => got += 1,
            Some(Ok(_)) => {}
            other => panic!("bare reader: {other:?}"),
        }
    }
    f64::from(frames) / start.elapsed().as_secs_f64()
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

async fn engine_round_trips(engine: &Engine, inbound: &mut Inbound, n: usize) -> Vec<Duration> {
    let mut out = Vec::with_capacity(n);
    let frame = Frame::Text(format!(r#"{{"type":"rt","pad":"{}"}}"#, "x".repeat(PAD)));
    for _ in 0..n {
        let start = Instant::now();
        loop {
            match engine.send("eng", frame.clone()) {
                Ok(()) => break,
                Err(EngineError::SendQueueFull { .. }) => tokio::task::yield_now().await,
                Err(e) => panic!("send: {e}"),
            }
        }
        inbound.recv().await.expect("echo");
        out.push(start.elapsed());
    }
    out
}

async fn bare_round_trips(ws: &mut Bare, n: usize) -> Vec<Duration> {
    let mut out = Vec::with_capacity(n);
    let text = format!(r#"{{"type":"rt","pad":"{}"}}"#, "x".repeat(PAD));
    for _ in 0..n {
        let start = Instant::now();
        ws.send(Message::text(text.clone())).await.expect("send");
        loop {
            if let Some(Ok(Message::Text(_))) = ws.next().await {
                break;
            }
        }
        out.push(start.elapsed());
    }
    out
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    // cargo passes `--bench`; any other argument names the one part to run.
    let only: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with('-')).collect();
    let wants = |part: &str| only.is_empty() || only.iter().any(|o| part.contains(o.as_str()));
    if wants("frames") {
        frames();
    }
    if wants("storm") {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
        rt.block_on(discord_storm());
    }
}

/// The reference peer in a runtime of its own, on a thread of its own, and
/// what stops it. Where its tasks run does not change from run to run.
fn peer_on_its_own_thread() -> (TestPeer, tokio::sync::oneshot::Sender<()>, std::thread::JoinHandle<()>) {
    let (peer_tx, peer_rx) = std::sync::mpsc::channel();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let thread = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("peer runtime");
        rt.block_on(async move {
            peer_tx.send(TestPeer::start().await.expect("peer")).expect("hand over the peer");
            let _ = stopped.await;
        });
    });
    (peer_rx.recv().expect("the peer"), stop, thread)
}

/// Inbound frames/s and send round trips, engine vs bare. The peer runs
/// on its own thread; the engine, the host's reader and the bare reader
/// share one other (a runtime of one thread), so both sides are measured
/// under the same schedule: what the engine adds is its own work (the
/// protocol's parse, the handoff to the host's reader), not where the
/// scheduler happened to put a task. With tasks free to move between two
/// workers, the same build measured anywhere from 0.55x to 2.1x.
fn frames() {
    let (peer, stop, thread) = peer_on_its_own_thread();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    rt.block_on(frames_against(&peer));
    drop(rt);
    drop(peer);
    let _ = stop.send(());
    thread.join().expect("the peer's thread");
}

async fn frames_against(peer: &TestPeer) {
    let (frames, trips) = (scaled(2_000) as u32, scaled(4_000));
    let dir = tempfile::tempdir().expect("dir");
    let config = EngineConfig {
        policy: Policy::preset(Preset::Whatsapp),
        frames_capacity: 1 << 16,
        compaction: None,
        ..EngineConfig::default()
    };
    let engine = Engine::open(dir.path(), config).await.expect("engine");
    engine.create("eng", InstanceSpec { url: peer.url() }).await.expect("create");
    engine.connect("eng").await.expect("connect");
    while !matches!(engine.state("eng"), Ok(State::Open { .. })) {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let mut inbound = engine.frames();
    let mut ws = bare(peer, "bare").await;

    let (mut eng_rates, mut bare_rates) = (Vec::new(), Vec::new());
    // One warm-up round each, not counted.
    engine_inbound(peer, &mut inbound, frames / 10).await;
    bare_inbound(peer, &mut ws, frames / 10).await;
    for _ in 0..INBOUND_ROUNDS {
        eng_rates.push(engine_inbound(peer, &mut inbound, frames).await);
        bare_rates.push(bare_inbound(peer, &mut ws, frames).await);
    }
    if std::env::var_os("TRAFFIC_ROUNDS").is_some() {
        eprintln!("engine {eng_rates:.0?}\nbare   {bare_rates:.0?}");
    }
    let (eng_in, bare_in) = (median(eng_rates), median(bare_rates));

    let (mut eng_trips, mut bare_trips) = (Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        eng_trips.extend(engine_round_trips(&engine, &mut inbound, trips / ROUNDS).await);
        bare_trips.extend(bare_round_trips(&mut ws, trips / ROUNDS).await);
    }
    eng_trips.sort();
    bare_trips.sort();
    let (e50, e99) = (percentile(&eng_trips, 0.5), percentile(&eng_trips, 0.99));
    let (b50, b99) = (percentile(&bare_trips, 0.5), percentile(&bare_trips, 0.99));
    let stats = engine.traffic();
    assert!(matches!(engine.state("eng"), Ok(State::Open { .. })), "still open after the run");

    println!("## Application frames\n");
    println!(
        "The reference peer in process on a thread of its own; the engine, the host's reader and the bare reader on one other. {PAD}-byte pad; {frames} frames x {INBOUND_ROUNDS} rounds inbound; {trips} send round trips.\n"
    );
    println!("| measure | engine | bare tokio-tungstenite | ratio |");
    println!("|---|---|---|---|");
    println!(
        "| inbound frames/s to the host (median of {INBOUND_ROUNDS}) | {eng_in:.0} | {bare_in:.0} | {:.2}x (target >= 0.8x) |",
        eng_in / bare_in
    );
    println!(
        "| send → echo round trip p50 | {e50:?} | {b50:?} | {:.2}x the bare time |",
        e50.as_secs_f64() / b50.as_secs_f64()
    );
    println!(
        "| send → echo round trip p99 | {e99:?} | {b99:?} | {:.2}x the bare time |",
        e99.as_secs_f64() / b99.as_secs_f64()
    );
    println!("\nFrames through the engine: {} sent, {} received.", stats.sent, stats.received);
    println!(
        "The engine parses every frame (JSON: the reference protocol tells its lifecycle frames from the host's), \
         copies it out of tungstenite's buffer and hands it to the host's task through the bounded ring; the bare \
         reader does none of that. With the parse skipped (an experiment, not this build), the ratio was 0.75-0.85x."
    );
    engine.shutdown().await.expect("shutdown");
}

/// A fleet of Discord shards connected at once against the fake gateway,
/// with identify pacing on: the time until every shard is READY (Open,
/// recorded), beside the pacing's own lower bound (the rounds of
/// `max_concurrency` IDENTIFYs one window apart), and the gateway's
/// count of IDENTIFYs it had to refuse (none, if the pacing holds).
async fn discord_storm() {
    use instance_lifecycle::testing::discord::{FakeGateway, GatewayConfig};
    use instance_lifecycle::transport::discord::{DiscordConfig, DiscordProtocol};
    use instance_lifecycle::transport::{WsLimits, WsTransport};
    use std::sync::Arc;
    let _ = rlimit::increase_nofile_limit(u64::MAX);
    let shards = scaled(1_000);
    let (max_concurrency, window) = (16, Duration::from_millis(250));
    let mut gateway = GatewayConfig::new("Bot.bench", u32::try_from(shards).expect("shards"));
    gateway.max_concurrency = max_concurrency;
    gateway.identify_window = window;
    let gateway = FakeGateway::start(gateway).await.expect("gateway");
    let mut discord = DiscordConfig::new("Bot.bench", 513);
    (discord.shards, discord.max_concurrency, discord.identify_window) =
        (u32::try_from(shards).expect("shards"), max_concurrency, window);
    let discord = DiscordProtocol::new(discord).expect("config");
    let bound = discord.identify_pacer().lower_bound(shards);
    // A connect time-out of 5 s, a third of the queue: a shard's wait for its
    // IDENTIFY permit does not count against it (R15), however long the queue.
    let mut policy = Policy::preset(Preset::Discord);
    policy.timeouts.connect = Duration::from_secs(5);
    let connect_timeout = policy.timeouts.connect;
    let dir = tempfile::tempdir().expect("dir");
    let transport = WsTransport::new(Arc::new(discord), WsLimits::default());
    let config = EngineConfig { policy, transport: Arc::new(transport), compaction: None, ..EngineConfig::default() };
    let engine = Engine::open(dir.path(), config).await.expect("engine");
    let names: Vec<String> = (0..shards).map(|i| format!("shard-{i}")).collect();
    for name in &names {
        engine.create(name, InstanceSpec { url: gateway.url() }).await.expect("create");
    }
    let start = std::time::Instant::now();
    for name in &names {
        engine.connect(name).await.expect("connect");
    }
    loop {
        let open = engine.list().iter().filter(|(_, s)| matches!(s, State::Open { .. })).count();
        if open == shards {
            break;
        }
        assert!(
            start.elapsed() < bound * 3 + Duration::from_secs(60),
            "the storm did not settle: {open}/{shards} open"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let took = start.elapsed();
    // R15: a shard queued for its IDENTIFY is not timed out, however long the queue.
    let mut timed_out = 0;
    for name in &names {
        let history = engine.history(name).await.expect("history");
        let timeout = |r: &instance_lifecycle::log::Record| match &r.event {
            instance_lifecycle::log::Event::Transition { input, .. } => {
                input.kind() == instance_lifecycle::machine::InputKind::ConnectTimeout
            }
            _ => false,
        };
        timed_out += usize::from(history.iter().any(timeout));
    }
    let stats = gateway.stats();
    println!("\n## Discord shard storm\n");
    println!(
        "{shards} shards connected at once against the fake gateway (in process), max_concurrency {max_concurrency}, identify window {window:?} (Discord's 5 s scaled down).\n"
    );
    println!("| measure | result | baseline | ratio |");
    println!("|---|---|---|---|");
    println!(
        "| time until every shard is READY | {took:.2?} | pacing lower bound {bound:.2?} | {:.2}x (target <= 1.2x) |",
        took.as_secs_f64() / bound.as_secs_f64().max(f64::EPSILON)
    );
    println!("| IDENTIFYs refused by the gateway (concurrency exceeded) | {} | 0 | — |", stats.identify_refused);
    println!("| shards timed out while queued (connect time-out {connect_timeout:?}, R15) | {timed_out} | 0 | — |");
    println!("\nThe gateway saw {} IDENTIFYs and {} connections.", stats.identifies, stats.connections);
    engine.shutdown().await.expect("shutdown");
}
