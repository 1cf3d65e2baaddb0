//! `cargo bench --bench serve`: `lifecycle serve` beside the engine it wraps,
//! in the same run. Commands (create, connect, state, delete) over HTTP
//! against the same calls on `Service::engine()` directly, each with 32 in
//! flight; webhook delivery to a local receiver against plain sequential
//! posts of the same bodies to it; heap per idle instance under the service
//! against the log's own. The peer runs in its own process. Sizes scale with
//! `BENCH_SCALE` (default 1.0).

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use instance_lifecycle::log::{Durability, Event, InstanceSpec, Log, LogConfig};
use instance_lifecycle::machine::{Instance, InstanceName, Preset, Timestamp};
use instance_lifecycle::serve::{ServeConfig, Service, WebhookConfig};

#[path = "support/peer_process.rs"]
mod peer_process;

use peer_process::PeerProcess as Peer;

#[path = "support/heap.rs"]
mod heap;

use heap::{Counting, heap, scaled};

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Requests in flight at once, for both sides: one (latency alone) and 32 (load).
const IN_FLIGHT: [usize; 2] = [1, 32];

/// What one kind of command did: calls per second and latency quantiles.
struct Measured {
    per_second: f64,
    p50: Duration,
    p99: Duration,
}

/// Runs `call` once per name, `in_flight` at a time; every call must succeed.
async fn measure<F, Fut>(names: &[String], in_flight: usize, call: F) -> Measured
where
    F: Fn(String) -> Fut,
    Fut: Future<Output = Result<(), String>>,
{
    let start = Instant::now();
    let mut took: Vec<Duration> = futures_util::stream::iter(names.iter().cloned())
        .map(|n| {
            let fut = call(n.clone());
            async move {
                let t = Instant::now();
                fut.await.unwrap_or_else(|e| panic!("{n}: {e}"));
                t.elapsed()
            }
        })
        .buffer_unordered(in_flight)
        .collect()
        .await;
    let wall = start.elapsed();
    took.sort();
    let at = |q: f64| took[((took.len() as f64 * q) as usize).min(took.len() - 1)];
    Measured { per_second: names.len() as f64 / wall.as_secs_f64(), p50: at(0.50), p99: at(0.99) }
}

fn config(dir: &std::path::Path, peer: &str) -> ServeConfig {
    ServeConfig {
        data: dir.to_path_buf(),
        listen: "127.0.0.1:0".parse().expect("addr"),
        preset: Preset::Whatsapp,
        default_url: Some(peer.to_owned()),
        ..ServeConfig::default()
    }
}

/// Expects a 2xx.
async fn http(req: reqwest::RequestBuilder) -> Result<(), String> {
    let resp = req.send().await.map_err(|e| e.to_string())?;
    if resp.status().is_success() {
        Ok(())
    } else {
        Err(format!("{}: {}", resp.status(), resp.text().await.unwrap_or_default()))
    }
}

struct Commands {
    create: Measured,
    connect: Measured,
    state: Measured,
    delete: Measured,
}

async fn direct(peer: &str, n: usize, in_flight: usize) -> Commands {
    let dir = tempfile::tempdir().expect("dir");
    let service = Service::start(config(dir.path(), peer)).await.expect("service");
    let engine = service.engine().clone();
    let names: Vec<String> = (0..n).map(|i| format!("direct-{i:05}")).collect();
    let spec = InstanceSpec { url: peer.to_owned() };
    let create = measure(&names, in_flight, |n| {
        let (e, spec) = (engine.clone(), spec.clone());
        async move { e.create(&n, spec).await.map_err(|e| e.to_string()) }
    })
    .await;
    let connect = measure(&names, in_flight, |n| {
        let e = engine.clone();
        async move { e.connect(&n).await.map(drop).map_err(|e| e.to_string()) }
    })
    .await;
    let state = measure(&names, in_flight, |n| {
        let e = engine.clone();
        async move { e.state(&n).map(drop).map_err(|e| e.to_string()) }
    })
    .await;
    let delete = measure(&names, in_flight, |n| {
        let e = engine.clone();
        async move { e.delete(&n).await.map(drop).map_err(|e| e.to_string()) }
    })
    .await;
    drop(engine);
    service.shutdown().await.expect("shutdown");
    Commands { create, connect, state, delete }
}

async fn over_http(peer: &str, n: usize, in_flight: usize) -> Commands {
    let dir = tempfile::tempdir().expect("dir");
    let service = Service::start(config(dir.path(), peer)).await.expect("service");
    let base = format!("http://{}", service.local_addr());
    let client = reqwest::Client::builder().pool_max_idle_per_host(in_flight).build().expect("client");
    let names: Vec<String> = (0..n).map(|i| format!("http-{i:05}")).collect();
    let create = measure(&names, in_flight, |n| {
        let req = client
            .post(format!("{base}/v1/instances"))
            .header("content-type", "application/json")
            .body(format!("{{\"name\":\"{n}\"}}"));
        http(req)
    })
    .await;
    let connect = measure(&names, in_flight, |n| http(client.post(format!("{base}/v1/instances/{n}/connect")))).await;
    let state = measure(&names, in_flight, |n| http(client.get(format!("{base}/v1/instances/{n}")))).await;
    let delete = measure(&names, in_flight, |n| http(client.delete(format!("{base}/v1/instances/{n}")))).await;
    service.shutdown().await.expect("shutdown");
    Commands { create, connect, state, delete }
}

/// A receiver that answers 200 and counts what it got.
async fn receiver() -> (Arc<AtomicUsize>, String) {
    let got = Arc::new(AtomicUsize::new(0));
    let counter = got.clone();
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move |_body: axum::body::Bytes| {
            let counter = counter.clone();
            async move {
                counter.fetch_add(1, Ordering::SeqCst);
                axum::http::StatusCode::OK
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let url = format!("http://{}/hook", listener.local_addr().expect("addr"));
    tokio::spawn(async move { axum::serve(listener, app).await });
    (got, url)
}

/// Records written first (create, connect, delete: about five per
/// instance); then a service starts on the log with a webhook from its
/// start: events per second until the receiver has them all,
/// beside the same number of sequential posts of an event-sized body.
async fn webhooks(peer: &str, n: usize) -> (usize, f64, f64) {
    let dir = tempfile::tempdir().expect("dir");
    let service = Service::start(config(dir.path(), peer)).await.expect("service");
    let engine = service.engine().clone();
    let names: Vec<String> = (0..n).map(|i| format!("hook-{i:05}")).collect();
    measure(&names, 32, |n| {
        let e = engine.clone();
        let spec = InstanceSpec { url: peer.to_owned() };
        async move {
            e.create(&n, spec).await.map_err(|e| e.to_string())?;
            e.connect(&n).await.map_err(|e| e.to_string())?;
            // Removed: nothing for the restarted service to reconnect while it delivers.
            e.delete(&n).await.map(drop).map_err(|e| e.to_string())
        }
    })
    .await;
    let records = usize::try_from(engine.log().committed()).expect("records");
    drop(engine); // a clone of the engine holds the log open
    service.shutdown().await.expect("shutdown");

    let (got, url) = receiver().await;
    let mut with_hook = config(dir.path(), peer);
    with_hook.webhooks.push(WebhookConfig { from_start: true, ..WebhookConfig::new(url.clone()) });
    let start = Instant::now();
    let service = Service::start(with_hook).await.expect("service");
    while got.load(Ordering::SeqCst) < records {
        assert!(
            start.elapsed() < Duration::from_secs(600),
            "webhooks: {} of {records} in 10 min",
            got.load(Ordering::SeqCst)
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let delivered = records as f64 / start.elapsed().as_secs_f64();
    service.shutdown().await.expect("shutdown");

    let (_, url) = receiver().await;
    let client = reqwest::Client::new();
    let body = vec![b'x'; 900]; // about an event's JSON
    let start = Instant::now();
    for _ in 0..records {
        http(client.post(&url).header("content-type", "application/json").body(body.clone())).await.expect("post");
    }
    let plain = records as f64 / start.elapsed().as_secs_f64();
    (records, delivered, plain)
}

/// Heap per idle instance created over HTTP: everything the process holds
/// for it (service, engine and log); and, apart, the log's own per record.
async fn idle_heap(peer: &str, n: usize) -> (f64, f64) {
    let log_config = LogConfig { durability: Durability::Buffered, cache_capacity: 8 << 20, ..LogConfig::default() };
    let log = Log::temporary(log_config.clone()).expect("log");
    let spec = InstanceSpec { url: peer.to_owned() };
    let before = heap();
    for i in 0..n {
        let nm = InstanceName::new(format!("idle-{i:06}")).expect("name");
        log.append(&nm, 1, Timestamp(0), Event::Created { spec: spec.clone(), token: None }, &Instance::new())
            .expect("append");
    }
    let log_only = (heap() - before) as f64 / n as f64;
    drop(log);

    let dir = tempfile::tempdir().expect("dir");
    let service = Service::start(ServeConfig { log: log_config, ..config(dir.path(), peer) }).await.expect("service");
    let base = format!("http://{}", service.local_addr());
    let client = reqwest::Client::new();
    // Warm up the server's and client's connection state before counting.
    http(client.get(format!("{base}/healthz"))).await.expect("health");
    tokio::time::sleep(Duration::from_millis(200)).await;
    let before = heap();
    for i in 0..n {
        let body = format!("{{\"name\":\"idle-{i:06}\"}}");
        http(client.post(format!("{base}/v1/instances")).header("content-type", "application/json").body(body))
            .await
            .expect("create");
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let served = (heap() - before) as f64 / n as f64;
    service.shutdown().await.expect("shutdown");
    (served, log_only)
}

fn ms(d: Duration) -> String {
    if d < Duration::from_millis(1) {
        format!("{} µs", d.as_micros())
    } else {
        format!("{:.2} ms", d.as_secs_f64() * 1e3)
    }
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    let peer = Peer::start();
    let n = scaled(1000);
    runtime.block_on(async {
        println!("## Service (`cargo bench --bench serve`)");
        println!();
        println!("| measurement | over HTTP | the engine called directly, same service | ratio | target |");
        println!("|---|---|---|---|---|");
        for in_flight in IN_FLIGHT {
            let direct = direct(&peer.url, n, in_flight).await;
            let http = over_http(&peer.url, n, in_flight).await;
            for (what, h, d) in [
                ("create", &http.create, &direct.create),
                ("connect", &http.connect, &direct.connect),
                ("state", &http.state, &direct.state),
                ("delete", &http.delete, &direct.delete),
            ] {
                let target = if what == "state" { "" } else { "≥ 0.50× at p50" };
                println!(
                    "| {what}, {n} instances, {in_flight} in flight: calls/s; p50; p99 | {:.0}/s; {}; {} | {:.0}/s; {}; {} | {:.2}× calls/s, {:.2}× at p50 | {target} |",
                    h.per_second,
                    ms(h.p50),
                    ms(h.p99),
                    d.per_second,
                    ms(d.p50),
                    ms(d.p99),
                    h.per_second / d.per_second,
                    d.p50.as_secs_f64() / h.p50.as_secs_f64().max(1e-9),
                );
            }
        }
        let (records, delivered, plain) = webhooks(&peer.url, n).await;
        println!(
            "| webhook delivery, {records} events from the log to a local receiver | {delivered:.0}/s | sequential posts of a 900-byte body to it: {plain:.0}/s | {:.2}× | |",
            delivered / plain
        );
        let idle = scaled(10_000);
        let (served, log_only) = idle_heap(&peer.url, idle).await;
        println!(
            "| heap per idle instance, {idle} created over HTTP: service + engine + log (sled, 8 MiB cache) | {served:.0} B | the log alone, same records appended directly: {log_only:.0} B | {:.2}× | ≤ 2048 B, log included |",
            served / log_only
        );
    });
}
