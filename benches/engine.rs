//! `cargo bench --bench engine`: the engine's memory, throughput and zombie
//! detection, each beside a baseline from the same run. Heap is counted by a
//! global allocator; the peer runs in its own process (`lifecycle peer`), so
//! its memory is not counted. Sizes scale with `BENCH_SCALE` (default 1.0).

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use instance_lifecycle::engine::{Engine, EngineConfig};
use instance_lifecycle::log::store::{Pair, Write as StoreWrite};
use instance_lifecycle::log::{Durability, Event, InstanceSpec, Log, LogConfig, Store, StoreError};
use instance_lifecycle::machine::{Heartbeat, Instance, InstanceName, Policy, Preset, State, Timestamp};
use instance_lifecycle::testing::SimTransport;
use instance_lifecycle::transport::WsLimits;

#[path = "support/peer_process.rs"]
mod peer_process;

use peer_process::PeerProcess as Peer;

#[path = "support/heap.rs"]
mod heap;

use heap::{Counting, heap, scaled};

#[global_allocator]
static GLOBAL: Counting = Counting;

fn name(prefix: &str, i: usize) -> String {
    format!("{prefix}-{i:06}")
}

/// A store that keeps nothing: the engine's own memory, without the log's.
struct NullStore;

impl Store for NullStore {
    fn get(&self, _: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(None)
    }
    fn apply(&self, _: Vec<StoreWrite>) -> Result<(), StoreError> {
        Ok(())
    }
    fn scan(&self, _: &[u8]) -> Box<dyn Iterator<Item = Result<Pair, StoreError>> + Send + '_> {
        Box::new(std::iter::empty())
    }
    fn last(&self, _: &[u8]) -> Result<Option<Pair>, StoreError> {
        Ok(None)
    }
    fn first_from(&self, _: &[u8], _: &[u8]) -> Result<Option<Pair>, StoreError> {
        Ok(None)
    }
    fn flush(&self) -> Result<(), StoreError> {
        Ok(())
    }
    fn sync(&self) -> Result<(), StoreError> {
        Ok(())
    }
    fn size_on_disk(&self) -> Result<u64, StoreError> {
        Ok(0)
    }
}

fn null_log() -> Log {
    Log::with_store(Arc::new(NullStore), buffered()).expect("null log")
}

fn buffered() -> LogConfig {
    LogConfig { durability: Durability::Buffered, cache_capacity: 8 << 20, ..LogConfig::default() }
}

fn engine_config(policy: Policy, transport: Option<SimTransport>, log: LogConfig) -> EngineConfig {
    let mut c = EngineConfig { policy, log, notifications_capacity: 65_536, ..EngineConfig::default() };
    if let Some(t) = transport {
        c.transport = Arc::new(t);
    }
    c
}

async fn idle_instances(n: usize) -> (f64, f64) {
    let spec = InstanceSpec { url: "ws://127.0.0.1:9/".into() };
    let log = Log::temporary(buffered()).expect("log");
    let before = heap();
    for i in 0..n {
        let nm = InstanceName::new(name("idle", i)).expect("name");
        log.append(&nm, 1, Timestamp(0), Event::Created { spec: spec.clone(), token: None }, &Instance::new())
            .expect("append");
    }
    let log_only = (heap() - before) as f64 / n as f64;
    drop(log);
    let engine = Engine::with_log(null_log(), engine_config(Policy::default(), Some(SimTransport::new()), buffered()))
        .await
        .expect("engine");
    tokio::time::sleep(Duration::from_millis(200)).await;
    let before = heap();
    for i in 0..n {
        engine.create(&name("idle", i), spec.clone()).await.expect("create");
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let with_engine = (heap() - before) as f64 / n as f64;
    engine.shutdown().await.expect("shutdown");
    (with_engine, log_only)
}

async fn live_connections(n: usize) -> (f64, f64) {
    let mut peer = Peer::start();
    let limits = WsLimits::default();
    // Baseline: bare tokio-tungstenite clients with the same limits, each in a task that keeps reading.
    let before = heap();
    let mut bare = Vec::new();
    for i in 0..n {
        let (mut ws, _) = tokio_tungstenite::connect_async_with_config(peer.url.as_str(), Some(limits.config()), true)
            .await
            .expect("bare connect");
        let hello = format!(r#"{{"type":"hello","instance":"{}","resume":null}}"#, name("bare", i));
        futures_util::SinkExt::send(&mut ws, tokio_tungstenite::tungstenite::Message::text(hello))
            .await
            .expect("hello");
        bare.push(tokio::spawn(async move { while ws.next().await.is_some() {} }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let per_bare = (heap() - before) as f64 / n as f64;
    for t in bare {
        t.abort();
    }
    tokio::time::sleep(Duration::from_millis(500)).await;

    let engine = Engine::with_log(null_log(), engine_config(Policy::preset(Preset::Whatsapp), None, buffered()))
        .await
        .expect("engine");
    let spec = InstanceSpec { url: peer.url.clone() };
    let before = heap();
    for chunk in (0..n).collect::<Vec<_>>().chunks(200) {
        for &i in chunk {
            engine.create(&name("live", i), spec.clone()).await.expect("create");
            engine.connect(&name("live", i)).await.expect("connect");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    while engine.list().iter().filter(|(_, s)| matches!(s, State::Open { .. })).count() < n && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let per_live = (heap() - before) as f64 / n as f64;
    engine.shutdown().await.expect("shutdown");
    peer.send("noop");
    (per_live, per_bare)
}

/// Transitions/s through the engine and appends/s of the log alone (same
/// count, same concurrency), each the best of three runs interleaved: one
/// run of either is about a second, and this machine's pace moves by more
/// than the gap between them from one second to the next.
async fn throughput(instances: usize, cycles: usize) -> (f64, f64, usize) {
    let (mut engine, mut log, mut records) = (0f64, 0f64, 0);
    for _ in 0..3 {
        let (rate, n) = engine_throughput(instances, cycles).await;
        engine = engine.max(rate);
        records = n;
        log = log.max(log_throughput(instances, n / instances).await);
    }
    (engine, log, records)
}

/// Connect/logout cycles on the simulated transport, every transition logged: transitions/s and how many.
async fn engine_throughput(instances: usize, cycles: usize) -> (f64, usize) {
    let engine = Engine::with_log(
        Log::temporary(LogConfig::default()).expect("log"),
        engine_config(Policy::preset(Preset::Whatsapp), Some(SimTransport::new()), LogConfig::default()),
    )
    .await
    .expect("engine");
    let spec = InstanceSpec { url: "ws://sim/".into() };
    for i in 0..instances {
        engine.create(&name("tp", i), spec.clone()).await.expect("create");
    }
    let records_before = engine.log().records().count();
    let start = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..instances {
        let engine = engine.clone();
        tasks.push(tokio::spawn(async move {
            for _ in 0..cycles {
                engine.connect(&name("tp", i)).await.expect("connect");
                engine.logout(&name("tp", i)).await.expect("logout");
            }
        }));
    }
    for t in tasks {
        t.await.expect("cycle task");
    }
    let elapsed = start.elapsed().as_secs_f64();
    let records = engine.log().records().count() - records_before;
    let engine_rate = records as f64 / elapsed;
    engine.shutdown().await.expect("shutdown");
    (engine_rate, records)
}

/// The log alone: `per` appends from each of `instances` tasks, GroupCommit; appends/s.
async fn log_throughput(instances: usize, per: usize) -> f64 {
    let log = Log::temporary(LogConfig::default()).expect("log");
    let start = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..instances {
        let log = log.clone();
        tasks.push(tokio::spawn(async move {
            let nm = InstanceName::new(name("tp", i)).expect("name");
            let spec = InstanceSpec { url: "ws://sim/".into() };
            for seq in 1..=per as u64 {
                log.append_async(
                    &nm,
                    seq,
                    Timestamp(seq),
                    Event::Created { spec: spec.clone(), token: None },
                    &Instance::new(),
                )
                .await
                .expect("append");
            }
        }));
    }
    for t in tasks {
        t.await.expect("append task");
    }
    (per * instances) as f64 / start.elapsed().as_secs_f64()
}

async fn zombie_detection(n: usize, zombies: usize, heartbeat: Heartbeat) -> Vec<Duration> {
    let mut peer = Peer::start();
    let mut policy = Policy::preset(Preset::Whatsapp);
    policy.heartbeat = heartbeat;
    let engine = Engine::with_log(Log::temporary(buffered()).expect("log"), engine_config(policy, None, buffered()))
        .await
        .expect("engine");
    let spec = InstanceSpec { url: peer.url.clone() };
    for chunk in (0..n).collect::<Vec<_>>().chunks(200) {
        for &i in chunk {
            engine.create(&name("zd", i), spec.clone()).await.expect("create");
            engine.connect(&name("zd", i)).await.expect("connect");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    while engine.list().iter().filter(|(_, s)| matches!(s, State::Open { .. })).count() < n {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut events = engine.subscribe();
    let targets: Vec<String> = (0..zombies).map(|k| name("zd", k * (n / zombies))).collect();
    let start = Instant::now();
    for t in &targets {
        peer.send(&format!("zombify {t}"));
    }
    let mut latencies = std::collections::HashMap::new();
    let give_up = heartbeat.interval * 3 + heartbeat.deadline * 3;
    while latencies.len() < targets.len() && start.elapsed() < give_up {
        if let Ok(Ok(note)) = tokio::time::timeout(Duration::from_millis(100), events.recv()).await
            && matches!(note.to, State::Zombie { .. })
        {
            latencies.entry(note.instance.to_string()).or_insert(start.elapsed());
        }
    }
    let false_marks = engine
        .list()
        .iter()
        .filter(|(nm, s)| matches!(s, State::Zombie { .. }) && !targets.contains(&nm.to_string()))
        .count();
    assert_eq!(false_marks, 0, "healthy instances marked as zombies");
    assert_eq!(latencies.len(), targets.len(), "zombies not detected within {give_up:?}");
    engine.shutdown().await.expect("shutdown");
    let mut v: Vec<Duration> = latencies.into_values().collect();
    v.sort();
    v
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    rt.block_on(async {
        println!("## Engine (`cargo bench --bench engine`)\n");
        println!("| measurement | engine | baseline, same run | ratio | target |");
        println!("|---|---|---|---|---|");
        let n = scaled(100_000);
        let (engine, log) = idle_instances(n).await;
        println!(
            "| heap per idle instance, {n} instances, no sockets (engine, log kept apart) | {engine:.0} B | the log's own heap per instance record (sled, 8 MiB cache): {log:.0} B | {:.2}× | ≤ 2048 B |",
            engine / log
        );
        let n = scaled(5_000);
        let (live, bare) = live_connections(n).await;
        println!("| heap per live connection, {n} loopback connections, heartbeats on (engine + transport, log kept apart) | {live:.0} B | bare tokio-tungstenite client: {bare:.0} B | {:.2}× | ≤ 16384 B |", live / bare);
        let (instances, cycles) = (200, scaled(20));
        let (engine, log, records) = throughput(instances, cycles).await;
        println!("| transitions/s through the engine, {instances} instances, {records} transitions, GroupCommit | {engine:.0} | the log alone, same appends: {log:.0} | {:.2}× | ≥ 0.70× |", engine / log);
        let hb = Heartbeat { interval: Duration::from_secs(1), deadline: Duration::from_secs(1) };
        let n = scaled(1_000);
        let v = zombie_detection(n, (n / 10).max(1), hb).await;
        let bound = hb.interval + hb.deadline;
        let (p50, p99, max) = (v[v.len() / 2], v[(v.len() * 99 / 100).min(v.len() - 1)], v[v.len() - 1]);
        println!(
            "| zombie detection, {} of {n} connections go half-open (interval 1 s, deadline 1 s) | p50 {:.2} s, p99 {:.2} s, max {:.2} s | bound interval + deadline: {:.2} s | max {:.2}× | ≤ 1.10× |",
            v.len(), p50.as_secs_f64(), p99.as_secs_f64(), max.as_secs_f64(), bound.as_secs_f64(), max.as_secs_f64() / bound.as_secs_f64()
        );
    });
}
