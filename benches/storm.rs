//! `cargo bench --bench storm`: a reconnect storm. A fleet (10,000 by
//! default, `BENCH_SCALE` scales it) is connected to `lifecycle peer` in its
//! own process on 127.0.0.1; the peer drops every connection at once, as a
//! restarting server does, and keeps accepting. Measured: how long until the
//! fleet is back (50 / 99 / 100 % Open again), how hard the herd hits the
//! peer (connections accepted per second, beside the rate of a perfectly
//! spread herd over the first backoff's jitter window), the log's peak
//! append rate and how far commits lag, the engine process's peak RSS, that
//! no instance retried beyond its budget, and that the log verifies with
//! every transition the engine reported in it.

#[path = "support/peer_process.rs"]
mod peer_process;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use instance_lifecycle::engine::{Engine, EngineConfig};
use instance_lifecycle::log::{Event, InstanceSpec, LogConfig};
use instance_lifecycle::machine::{Effect, Policy, Preset, State};
use peer_process::PeerProcess;

fn scaled(n: usize) -> usize {
    let scale: f64 = std::env::var("BENCH_SCALE").ok().and_then(|s| s.parse().ok()).unwrap_or(1.0);
    ((n as f64 * scale) as usize).max(10)
}

fn name(i: usize) -> String {
    format!("storm-{i:05}")
}

/// Peak resident set of this process (`VmHWM`), in MiB.
fn peak_rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let kb: f64 = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0);
    kb / 1024.0
}

/// Instances that connect one at a time first, to measure an unloaded connect.
const PROBES: usize = 50;

fn quantile(sorted: &[Duration], q: f64) -> Duration {
    sorted[((sorted.len() as f64 * q).ceil() as usize).clamp(1, sorted.len()) - 1]
}

async fn storm(n: usize) {
    rlimit::increase_nofile_limit(u64::MAX).expect("open-file limit");
    let mut peer = PeerProcess::start();
    let policy = Policy::preset(Preset::Whatsapp);
    let dir = tempfile::tempdir().expect("dir");
    let config = EngineConfig {
        policy: policy.clone(),
        log: LogConfig::default(),
        notifications_capacity: 1 << 20,
        compaction: None,
        ..EngineConfig::default()
    };
    let engine = Engine::open(dir.path(), config).await.expect("engine");
    let spec = InstanceSpec { url: peer.url.clone() };
    let mut events = engine.subscribe();
    // The connect time the bound allows for: the first instances connect one
    // at a time, on an idle engine and peer (the fleet coming up all at once
    // measures queueing, not a connect).
    let probes = PROBES.min(n);
    let mut unloaded = Vec::new();
    for i in 0..probes {
        engine.create(&name(i), spec.clone()).await.expect("create");
        let t = Instant::now();
        engine.connect(&name(i)).await.expect("connect");
        loop {
            let note = tokio::time::timeout(Duration::from_secs(30), events.recv()).await.expect("open").expect("note");
            if note.instance.as_str() == name(i) && matches!(note.to, State::Open { .. }) {
                break;
            }
        }
        unloaded.push(t.elapsed());
    }
    unloaded.sort();
    let connect_p99 = quantile(&unloaded, 0.99);
    // The rest of the fleet comes up at once; each connect's time to Open under that load.
    let started = Instant::now();
    let mut asked = HashMap::new();
    for chunk in (probes..n).collect::<Vec<_>>().chunks(500) {
        for &i in chunk {
            engine.create(&name(i), spec.clone()).await.expect("create");
            asked.insert(name(i), Instant::now());
            if let Err(e) = engine.connect(&name(i)).await {
                panic!("connect {}: {e}", name(i));
            }
        }
        tokio::task::yield_now().await;
    }
    let mut connect_times = Vec::new();
    while connect_times.len() < n - probes && started.elapsed() < Duration::from_secs(120) {
        if let Ok(Ok(note)) = tokio::time::timeout(Duration::from_millis(200), events.recv()).await
            && matches!(note.to, State::Open { .. })
            && let Some(t) = asked.remove(note.instance.as_str())
        {
            connect_times.push(t.elapsed());
        }
    }
    assert_eq!(connect_times.len(), n - probes, "the fleet did not come up");
    connect_times.sort();
    let loaded_p99 = quantile(&connect_times, 0.99);
    let log = engine.log().clone();
    let before = log.tip().0;

    // The storm.
    let accepts = |stats: &serde_json::Value| -> HashMap<u64, u64> {
        stats["accepts_per_second"]
            .as_array()
            .expect("array")
            .iter()
            .map(|p| (p[0].as_u64().unwrap_or(0), p[1].as_u64().unwrap_or(0)))
            .collect()
    };
    let before_storm = accepts(&serde_json::from_str(&peer.ask("stats")).expect("stats json"));
    let mut events = engine.subscribe();
    let dropped_at = Instant::now();
    let reply = peer.ask("drop-all");
    assert!(reply.starts_with("dropped"), "{reply}");
    let mut back: HashMap<String, Duration> = HashMap::new();
    let mut samples = vec![(Duration::ZERO, log.tip().0, log.committed())];
    let mut next_sample = Duration::from_millis(100);
    let give_up = Duration::from_secs(60);
    while back.len() < n && dropped_at.elapsed() < give_up {
        if let Ok(Ok(note)) = tokio::time::timeout(Duration::from_millis(20), events.recv()).await
            && matches!(note.to, State::Open { .. })
        {
            back.entry(note.instance.to_string()).or_insert(dropped_at.elapsed());
        }
        if dropped_at.elapsed() >= next_sample {
            samples.push((dropped_at.elapsed(), log.tip().0, log.committed()));
            next_sample += Duration::from_millis(100);
        }
    }
    let all_back = dropped_at.elapsed();
    let rss = peak_rss_mib();
    let stats: serde_json::Value = serde_json::from_str(&peer.ask("stats")).expect("stats json");
    engine.shutdown().await.expect("shutdown");

    // How hard the herd hit the peer: its accepts per second, minus those before the drop.
    let after_storm = accepts(&stats);
    let storm_seconds: Vec<u64> =
        after_storm.iter().map(|(sec, c)| c - before_storm.get(sec).copied().unwrap_or(0)).filter(|&c| c > 0).collect();
    let total: u64 = after_storm.values().sum();
    let storm_accepts: u64 = storm_seconds.iter().sum();
    let peak = storm_seconds.iter().copied().max().unwrap_or(0);
    let window = policy.backoff.base * (policy.backoff.factor - 1);
    let spread_rate = n as f64 / window.as_secs_f64();
    let mean = storm_accepts as f64 / all_back.as_secs_f64().max(1.0);

    let mut times: Vec<Duration> = back.values().copied().collect();
    times.sort();
    let log_peak =
        samples.windows(2).map(|w| (w[1].1 - w[0].1) as f64 / (w[1].0 - w[0].0).as_secs_f64()).fold(0.0, f64::max);
    let lag = samples.iter().map(|s| s.1.saturating_sub(s.2)).max().unwrap_or(0);

    // Budgets and the log.
    let reopened = &log;
    let mut over_budget = 0;
    for i in 0..n {
        let attempts = reopened
            .history(&instance_lifecycle::machine::InstanceName::new(name(i)).expect("name"))
            .expect("history")
            .iter()
            .filter(|r| r.global > before)
            .filter(|r| matches!(&r.event, Event::Transition { effects, .. } if effects.iter().any(|e| matches!(e, Effect::OpenTransport { .. }))))
            .count();
        if attempts > policy.backoff.attempts_max as usize {
            over_budget += 1;
        }
    }
    let report = reopened.verify_recorded(&policy);
    let bound = policy.backoff.base * policy.backoff.factor + connect_p99 + Duration::from_secs(2);
    let row = |what: &str, ours: String, base: String, ratio: String, target: &str| {
        println!("| {what} | {ours} | {base} | {ratio} | {target} |");
    };
    println!("## Storm (`cargo bench --bench storm`, {n} instances)\n");
    println!("| measurement | engine | baseline, same run | ratio | target |");
    println!("|---|---|---|---|---|");
    assert!(!times.is_empty(), "nobody came back");
    let t100 = if times.len() == n { all_back.min(*times.last().expect("some")) } else { give_up };
    row(
        &format!("time until the fleet is back: 50 / 99 / 100 % Open ({} of {n} back)", times.len()),
        format!(
            "{:.2} / {:.2} / {:.2} s",
            quantile(&times, 0.5).as_secs_f64(),
            quantile(&times, 0.99).as_secs_f64(),
            t100.as_secs_f64()
        ),
        format!(
            "first backoff at most {:.1} s + unloaded connect p99 {:.0} ms ({probes} one at a time; {:.0} ms with the fleet connecting at once) + 2 s = {:.2} s",
            (policy.backoff.base * policy.backoff.factor).as_secs_f64(),
            connect_p99.as_secs_f64() * 1000.0,
            loaded_p99.as_secs_f64() * 1000.0,
            bound.as_secs_f64()
        ),
        format!("{:.2}×", t100.as_secs_f64() / bound.as_secs_f64()),
        "≤ 1.00×",
    );
    row(
        "connections accepted by the peer per second during the storm: peak (mean)",
        format!("{peak} ({mean:.0})"),
        format!("a perfectly spread herd: {n} over {:.1} s = {spread_rate:.0}/s", window.as_secs_f64()),
        format!("{:.2}×", peak as f64 / spread_rate),
        "≤ 2.00×",
    );
    row(
        "log appends/s at the peak of the storm; commits behind appends at most",
        format!("{log_peak:.0}/s; {lag} records"),
        format!("{storm_accepts} reconnects, {total} accepts in all"),
        String::new(),
        "(shown)",
    );
    row(
        "peak RSS of the engine process",
        format!("{rss:.0} MiB"),
        format!("{n} live connections"),
        format!("{:.1} KiB/instance", rss * 1024.0 / n as f64),
        "(shown)",
    );
    row(
        "instances that retried beyond their budget; log verification",
        format!("{over_budget}; {}", if report.is_clean() { "clean" } else { "FINDINGS" }),
        format!("{} records of {} instances", report.records, report.instances),
        String::new(),
        "0; clean",
    );
    for f in report.findings.iter().take(5) {
        println!("<!-- finding: {f} -->");
    }
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    rt.block_on(storm(scaled(10_000)));
}
