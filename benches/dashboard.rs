//! `cargo bench --bench dashboard`: the dashboard in headless Chromium
//! beside plain clients of the same service, in the same run.
//!
//! 1. First view: from navigation to the complete fleet view (tiles counted,
//!    rows drawn: the page's `fleet-ready` mark) at 10,000 instances, beside
//!    `curl` fetching the same data (`/v1/fleet` and `/v1/table`).
//! 2. Live delay: transitions made at 100/s (connects of `external`
//!    instances), from each record's time to its change in the DOM (the
//!    Connecting tile's count, seen by a MutationObserver), beside a plain
//!    SSE client of `/v1/events` receiving the same records; p50 and p99.
//!
//! Both clocks are this machine's wall clock (records are stamped with it).
//! Needs chromium and chromedriver (`apt-get install chromium chromium-driver`).
//! Sizes scale with `BENCH_SCALE` (default 1.0).

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use instance_lifecycle::log::{Durability, Event, InstanceSpec, Log, LogConfig};
use instance_lifecycle::machine::{Instance, InstanceName, Timestamp};
use instance_lifecycle::serve::{ServeConfig, Service};
use serde_json::Value;

#[path = "support/browser.rs"]
mod browser;
#[path = "support/heap.rs"]
#[allow(dead_code)] // only BENCH_SCALE is used here
mod heap;

use browser::Browser;
use heap::scaled;

/// Transitions per second in the live-delay run, and for how long.
const RATE: u64 = 100;
const LIVE_FOR: Duration = Duration::from_secs(8);

fn wall_ms() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_secs_f64() * 1000.0
}

fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

/// A log with `n` external instances, written directly (seconds, not minutes of HTTP).
fn fleet_log(dir: &std::path::Path, n: usize) {
    let log = Log::open(dir, LogConfig { durability: Durability::Buffered, ..LogConfig::default() }).expect("log");
    let spec = InstanceSpec { url: "external:".into() };
    let now = Timestamp(wall_ms() as u64);
    for i in 0..n {
        let name = InstanceName::new(format!("inst-{i:05}")).expect("name");
        log.append(&name, 1, now, Event::Created { spec: spec.clone(), token: None }, &Instance::new())
            .expect("append");
    }
    log.sync().expect("sync");
}

/// Seconds `curl` takes to fetch what the page fetches first (median of 5).
fn curl_baseline(base: &str) -> Option<f64> {
    let mut runs = Vec::new();
    for _ in 0..5 {
        let out = std::process::Command::new("curl")
            .args(["-s", "-o", "/dev/null", "-o", "/dev/null", "-w", "%{time_total} "])
            .arg(format!("{base}/v1/fleet"))
            .arg(format!("{base}/v1/table"))
            .output()
            .ok()?;
        let total: f64 =
            String::from_utf8_lossy(&out.stdout).split_whitespace().filter_map(|s| s.parse::<f64>().ok()).sum();
        runs.push(total);
    }
    runs.sort_by(f64::total_cmp);
    Some(runs[runs.len() / 2])
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    runtime.block_on(async {
        let Some(browser) = Browser::start().await else {
            eprintln!("the dashboard benchmark needs chromium and chromedriver");
            std::process::exit(1);
        };
        let n = scaled(10_000);
        let dir = tempfile::tempdir().expect("dir");
        let data = dir.path().join("log");
        fleet_log(&data, n);
        let config = ServeConfig { data, listen: "127.0.0.1:0".parse().expect("addr"), ..ServeConfig::default() };
        let service = Service::start(config).await.expect("service");
        let base = format!("http://{}", service.local_addr());

        // 1. The first complete view, three loads (the median), beside curl.
        let mut loads = Vec::new();
        for _ in 0..3 {
            browser.client.goto("about:blank").await.expect("blank");
            browser.client.goto(&format!("{base}/")).await.expect("load");
            let mark = "return performance.getEntriesByName('fleet-ready')[0]?.startTime ?? null;";
            let at = browser.until("the first view", mark, |v| v.is_number(), Duration::from_secs(60)).await;
            let tiles = browser
                .client
                .execute("return Number(document.querySelector('#tiles [data-kind=Closed] .count').textContent)", vec![])
                .await
                .expect("tiles");
            assert_eq!(tiles.as_u64(), Some(n as u64), "every instance counted");
            loads.push(at.as_f64().expect("ms") / 1000.0);
        }
        loads.sort_by(f64::total_cmp);
        let first_view = loads[1];
        let curl = curl_baseline(&base);

        // 2. Live delay at RATE transitions per second.
        browser.client.goto("about:blank").await.expect("blank");
        browser.client.goto(&format!("{base}/")).await.expect("load");
        browser.until("ready", "return document.body.dataset.ready ?? null", |v| v == "fleet", Duration::from_secs(60)).await;
        browser
            .client
            .execute(
                "window.__seen = []; const c = document.querySelector('#tiles [data-kind=Connecting] .count');
                 new MutationObserver(() => window.__seen.push([Date.now(), Number(c.textContent)]))
                   .observe(c, { childList: true, characterData: true, subtree: true });
                 return true;",
                vec![],
            )
            .await
            .expect("observer");
        let client = reqwest::Client::new();
        let from = service.engine().log().committed();
        let events = {
            let mut response = client
                .get(format!("{base}/v1/events?after={from}"))
                .send()
                .await
                .expect("events");
            tokio::spawn(async move {
                // (record time, received) of each Connecting event, in order.
                let mut seen: Vec<(f64, f64)> = Vec::new();
                let mut buffer = String::new();
                while let Ok(Some(chunk)) = response.chunk().await {
                    let received = wall_ms();
                    buffer.push_str(&String::from_utf8_lossy(&chunk));
                    while let Some(end) = buffer.find("\n\n") {
                        let block: String = buffer.drain(..end + 2).collect();
                        let Some(data) = block.lines().find_map(|l| l.strip_prefix("data:")) else { continue };
                        let Ok(v) = serde_json::from_str::<Value>(data.trim()) else { continue };
                        if v["to"] == "Connecting" && v["from"] == "Closed" {
                            seen.push((v["at"].as_f64().unwrap_or(0.0), received));
                        }
                    }
                }
                seen
            })
        };
        let total = RATE * LIVE_FOR.as_secs();
        let start = Instant::now();
        for k in 0..total {
            let due = start + Duration::from_millis(k * 1000 / RATE);
            tokio::time::sleep_until(due.into()).await;
            let url = format!("{base}/v1/instances/inst-{k:05}/connect");
            let c = client.clone();
            tokio::spawn(async move { c.post(url).send().await.map(|r| r.status()) });
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
        let seen = browser.client.execute("return window.__seen", vec![]).await.expect("seen");
        let dom: Vec<(f64, u64)> = seen
            .as_array()
            .expect("array")
            .iter()
            .map(|p| (p[0].as_f64().unwrap_or(0.0), p[1].as_u64().unwrap_or(0)))
            .collect();
        service.shutdown().await.expect("shutdown");
        let sse = events.await.expect("join");
        assert_eq!(sse.len() as u64, total, "every connect reached the plain client");
        let mut sse_delay: Vec<f64> = sse.iter().map(|(at, got)| got - at).collect();
        // The k-th connect shows when the Connecting tile first reaches k.
        let mut dom_delay: Vec<f64> = sse
            .iter()
            .enumerate()
            .filter_map(|(k, (at, _))| dom.iter().find(|(_, count)| *count > k as u64).map(|(t, _)| t - at))
            .collect();
        assert_eq!(dom_delay.len(), sse.len(), "every connect reached the page");
        sse_delay.sort_by(f64::total_cmp);
        dom_delay.sort_by(f64::total_cmp);
        let (s50, s99, d50, d99) =
            (quantile(&sse_delay, 0.5), quantile(&sse_delay, 0.99), quantile(&dom_delay, 0.5), quantile(&dom_delay, 0.99));

        println!("## Dashboard (`cargo bench --bench dashboard`)");
        println!();
        println!("Headless Chromium over WebDriver, {n} instances, the service in this process.");
        println!();
        println!("| measurement | the dashboard | baseline, same run | ratio | target |");
        println!("|---|---|---|---|---|");
        match curl {
            Some(c) => println!(
                "| first complete view, {n} instances | {:.2} s | `curl` of /v1/fleet + /v1/table: {:.3} s | {:.1}× | ≤ 1.5 s |",
                first_view,
                c,
                first_view / c
            ),
            None => println!("| first complete view, {n} instances | {first_view:.2} s | (curl not found) | – | ≤ 1.5 s |"),
        }
        println!(
            "| record → DOM at {RATE}/s, p50 | {d50:.1} ms | plain SSE client: {s50:.1} ms | {:.2}× | – |",
            d50 / s50.max(0.5)
        );
        println!(
            "| record → DOM at {RATE}/s, p99 | {d99:.1} ms | plain SSE client: {s99:.1} ms | {:.2}× | ≤ 2× |",
            d99 / s99.max(0.5)
        );
    });
}
