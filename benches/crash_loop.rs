//! `cargo bench --bench crash_loop`: `lifecycle serve` SIGKILLed again and
//! again on one log directory while HTTP clients keep creating, connecting
//! and deleting instances — does the next start get slower, does the log
//! grow? Per round: spawn → first successful request, the directory's size,
//! then `lifecycle verify` after the kill, and every acknowledged create and
//! delete checked after the restart. Prints the first and the last rounds
//! side by side (a markdown section for BENCHMARKS.md).
//!
//! `CRASH_ROUNDS` (default 500; about half an hour) and `CRASH_CLIENTS`
//! (default 8) set the size; retention is set short (removed instances kept
//! 20 s, compaction every 30 s) so that many rounds cover several periods.
//! The log holds what retention keeps — about 50 s of this traffic — so its
//! size and the restart time are compared with the rounds just after that
//! span has passed (the rounds before it are shown too: the log is still
//! filling then, and a smaller log opens faster).
//! Not part of CI.

#[path = "support/host_process.rs"]
mod host_process;
#[path = "support/peer_process.rs"]
mod peer_process;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use host_process::HostProcess;
use instance_lifecycle::serve::{RetentionSettings, ServeConfig};
use peer_process::PeerProcess;
use reqwest::Method;

/// What the clients were told about a name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Acked {
    /// Its create was answered 201 (and no delete since).
    Exists,
    /// Its delete was answered, or it was never created.
    Absent,
    /// A request about it was in flight at the kill: either outcome is right.
    Unknown,
}

struct Round {
    start: Duration,
    bytes: u64,
    ops: u64,
    /// Since the first spawn, at the end of the round.
    elapsed: Duration,
}

fn env(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|s| s.parse().ok()).unwrap_or(default)
}

fn dir_size(path: &std::path::Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(path) else { return 0 };
    entries
        .filter_map(Result::ok)
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => dir_size(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

/// A small deterministic generator per client (xorshift).
struct Rng(u64);
impl Rng {
    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % n as u64) as usize
    }
}

/// One client's loop until `until`: create (and connect) an absent name,
/// delete an existing one, now and then restart one. Returns the operations answered.
async fn client(
    host: Arc<HostProcess>,
    names: Vec<String>,
    acked: Arc<Mutex<HashMap<String, Acked>>>,
    until: Instant,
    seed: u64,
) -> u64 {
    let mut rng = Rng(seed | 1);
    let mut ops = 0;
    while Instant::now() < until {
        let name = &names[rng.below(names.len())];
        let known = acked.lock().expect("acked")[name];
        let exists = known == Acked::Exists;
        acked.lock().expect("acked").insert(name.clone(), Acked::Unknown);
        let req = if exists && rng.below(4) == 0 {
            host.client.post(format!("{}/v1/instances/{name}/restart", host.base))
        } else if exists {
            host.client.delete(format!("{}/v1/instances/{name}", host.base))
        } else {
            host.client
                .post(format!("{}/v1/instances", host.base))
                .header("content-type", "application/json")
                .body(serde_json::json!({ "name": name, "connect": true }).to_string())
        };
        let Ok(resp) = req.send().await else {
            return ops; // killed: this name stays Unknown
        };
        let status = resp.status().as_u16();
        let now = match (exists, status) {
            (true, 200..=299) if resp.url().path().ends_with("/restart") => Acked::Exists,
            (true, 200..=299) => Acked::Absent,
            (false, 200..=299) => Acked::Exists,
            _ => Acked::Unknown, // a refusal (e.g. 409 while closing): looked up after the restart
        };
        if resp.bytes().await.is_err() {
            return ops;
        }
        acked.lock().expect("acked").insert(name.clone(), now);
        ops += 1;
    }
    ops
}

/// After a restart: every acknowledged create is there, no acknowledged
/// delete came back; unknown names take what the service says. Returns the violations.
async fn check(host: &HostProcess, acked: &Mutex<HashMap<String, Acked>>) -> Vec<String> {
    let names: Vec<(String, Acked)> = acked.lock().expect("acked").iter().map(|(n, a)| (n.clone(), *a)).collect();
    let mut lost = Vec::new();
    for (name, was) in names {
        let (status, body) = host.call(Method::GET, &format!("/v1/instances/{name}"), None).await;
        let there = status == 200 && body["kind"] != "Removed";
        match (was, there) {
            (Acked::Exists, false) => lost.push(format!("{name}: acknowledged create lost ({status})")),
            (Acked::Absent, true) => lost.push(format!("{name}: acknowledged delete came back")),
            _ => {}
        }
        acked.lock().expect("acked").insert(name, if there { Acked::Exists } else { Acked::Absent });
    }
    lost
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("runtime");
    runtime.block_on(bench());
}

async fn bench() {
    let rounds = env("CRASH_ROUNDS", 500).max(20);
    let clients = env("CRASH_CLIENTS", 8).max(1);
    let peer = PeerProcess::start();
    let data = tempfile::tempdir().expect("data dir");
    let config = ServeConfig {
        data: data.path().to_path_buf(),
        default_url: Some(peer.url.clone()),
        retention: RetentionSettings {
            removed_after: Duration::from_secs(20),
            every: Duration::from_secs(30),
            ..RetentionSettings::default()
        },
        ..ServeConfig::default()
    };
    // 75 names per client: about half exist at any time.
    let names: Vec<Vec<String>> = (0..clients).map(|c| (0..75).map(|i| format!("c{c}-{i:02}")).collect()).collect();
    let acked: Arc<Mutex<HashMap<String, Acked>>> =
        Arc::new(Mutex::new(names.iter().flatten().map(|n| (n.clone(), Acked::Absent)).collect()));
    let (mut results, mut lost, mut unverified) = (Vec::new(), Vec::new(), 0);
    let began = Instant::now();
    for round in 0..rounds {
        let spawned = Instant::now();
        let host = Arc::new(HostProcess::start(config.clone()));
        // Spawn → the first successful request.
        loop {
            let ok = host.client.get(format!("{}/healthz", host.base)).send().await;
            if ok.is_ok_and(|r| r.status().is_success()) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let start = spawned.elapsed();
        lost.extend(check(&host, &acked).await);
        // 1 to 3 s of traffic, then SIGKILL in the middle of it.
        let until = Instant::now() + Duration::from_millis(1_000 + (round as u64 * 7919) % 2_000);
        let tasks: Vec<_> = names
            .iter()
            .enumerate()
            .map(|(c, names)| {
                tokio::spawn(client(host.clone(), names.clone(), acked.clone(), until, (round * 131 + c) as u64 + 7))
            })
            .collect();
        tokio::time::sleep_until(until.into()).await;
        // The clients are mid-request: killed under their feet.
        host.signal("KILL");
        let mut ops = 0;
        for t in tasks {
            ops += t.await.unwrap_or(0);
        }
        drop(host);
        let verify = std::process::Command::new(env!("CARGO_BIN_EXE_lifecycle"))
            .arg("verify")
            .arg(data.path())
            .output()
            .expect("lifecycle verify");
        if !verify.status.success() {
            unverified += 1;
            eprintln!("round {round}: verify: {}", String::from_utf8_lossy(&verify.stdout));
        }
        let bytes = dir_size(data.path());
        eprintln!("round {round}: start {:.3} s, {} MB, {ops} ops", start.as_secs_f64(), bytes as f64 / 1e6);
        results.push(Round { start, bytes, ops, elapsed: began.elapsed() });
    }
    let window = 10.min(rounds / 2);
    // The log holds what retention keeps: the records of the last
    // `removed_after`, plus up to one period until the next compaction. Until
    // that much time has passed it is filling, not growing; the size is
    // compared from then on (and, for the record, with the very first rounds).
    let filled = config.retention.removed_after + config.retention.every;
    let settled = results.iter().position(|r| r.elapsed >= filled).unwrap_or(0).min(results.len() - 2 * window);
    let first = &results[..window];
    let steady = &results[settled..settled + window];
    let last = &results[results.len() - window..];
    let start_of = |rs: &[Round]| median(rs.iter().map(|r| r.start.as_secs_f64()).collect());
    let size_of = |rs: &[Round]| median(rs.iter().map(|r| r.bytes as f64 / 1e6).collect());
    let ops: u64 = results.iter().map(|r| r.ops).sum();
    println!("## Crash loop: `lifecycle serve` SIGKILLed {rounds} times under {clients} HTTP clients");
    println!();
    println!("| measurement | last {window} rounds (median) | baseline (median of {window} rounds) | ratio | target |");
    println!("|---|---|---|---|---|");
    let (s0, s1) = (start_of(steady), start_of(last));
    println!(
        "| spawn → first successful request | {s1:.3} s | rounds {settled}–{}, once retention's span has passed: {s0:.3} s | {:.2}× | ≤ 1.5× |",
        settled + window - 1,
        s1 / s0
    );
    let s00 = start_of(first);
    println!(
        "| spawn → first successful request | {s1:.3} s | the first rounds (a smaller log): {s00:.3} s | {:.2}× | (shown) |",
        s1 / s00
    );
    let (b0, b1) = (size_of(steady), size_of(last));
    println!(
        "| log directory size | {b1:.1} MB | rounds {settled}–{}, once retention's span ({} s) has passed: {b0:.1} MB | {:.2}× | ≤ 1.5× |",
        settled + window - 1,
        filled.as_secs(),
        b1 / b0
    );
    let b00 = size_of(first);
    println!(
        "| log directory size | {b1:.1} MB | the first rounds (still filling): {b00:.1} MB | {:.2}× | (shown) |",
        b1 / b00
    );
    println!();
    println!(
        "{ops} operations acknowledged over the run; acknowledged operations lost: {} (target 0); kills after which `lifecycle verify` failed: {unverified} (target 0).",
        lost.len()
    );
    for l in lost.iter().take(20) {
        println!("- {l}");
    }
}
