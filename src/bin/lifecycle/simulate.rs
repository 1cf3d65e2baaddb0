//! `lifecycle simulate`: runs the library's simulation with a progress line,
//! stops it cleanly on Ctrl-C (the summary of what was done, exit code 130),
//! and prints the summary.

use std::io::{IsTerminal, Write};
use std::process::ExitCode;

use instance_lifecycle::testing::simulate::{self, Options, Progress, Stage, Summary};

use crate::output::{Failure, INTERRUPTED, quiet, say};

/// `--virtual`: the schedule in virtual time (seconds of wall time for the whole run).
pub fn run_virtual(options: &Options, json: bool) -> Result<ExitCode, Failure> {
    announce(options, " of virtual time", json);
    let summary = simulate::run_virtual(options)?;
    report(&summary, json)?;
    Ok(if summary.verification.clean { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

/// The first line, on stderr: what is about to run.
fn announce(options: &Options, time: &str, json: bool) {
    if !json && !quiet() {
        eprintln!(
            "simulating {} instances for {} s{time} (seed {}, policy {}) → {}",
            options.instances,
            options.duration.as_secs(),
            options.seed,
            options.preset,
            options.data.display()
        );
    }
}

/// The summary, as JSON or for people.
fn report(summary: &Summary, json: bool) -> Result<(), Failure> {
    if json {
        say!("{}", serde_json::to_string_pretty(summary)?);
        Ok(())
    } else {
        print_summary(summary)
    }
}

pub async fn run(options: Options, json: bool) -> Result<ExitCode, Failure> {
    let terminal = std::io::stderr().is_terminal();
    announce(&options, "", json);
    let stop = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    let summary = simulate::run(
        &options,
        |p| {
            if !json && !quiet() {
                show_progress(p, terminal)
            }
        },
        stop,
    )
    .await?;
    if terminal && !json && !quiet() {
        eprintln!();
    }
    report(&summary, json)?;
    Ok(match (summary.interrupted_after_s, summary.verification.clean) {
        (Some(_), _) => ExitCode::from(INTERRUPTED),
        (None, true) if summary.gateway.as_ref().is_none_or(|g| g.limits_kept) => ExitCode::SUCCESS,
        (None, _) => ExitCode::FAILURE,
    })
}

fn show_progress(p: &Progress, terminal: bool) {
    let states: Vec<String> = p.states.iter().map(|(k, n)| format!("{} {n}", k.as_str().to_lowercase())).collect();
    let (done, total) = (p.elapsed.as_secs(), p.total.as_secs().max(1));
    if matches!(p.stage, Stage::Running) && states.is_empty() {
        // Nothing created yet (the first second): an empty line says nothing.
        return;
    }
    match p.stage {
        Stage::Running if terminal => {
            let width = 30;
            let filled = usize::try_from(done.min(total) * width / total).unwrap_or(width as usize);
            let bar = format!("{}{}", "█".repeat(filled), "░".repeat(width as usize - filled));
            eprint!("\r{bar} {done:>3}/{total} s  {}   ", states.join(", "));
            let _ = std::io::stderr().flush();
        }
        Stage::Running => eprintln!("{done}/{total} s: {}", states.join(", ")),
        Stage::Finishing(bound) => {
            let end = if terminal { "\n" } else { "" };
            eprintln!(
                "{end}schedule done; letting deletes and logouts in flight finish (at most {} s)",
                bound.as_secs()
            );
        }
        Stage::Verifying => eprintln!("shutting the engine down, syncing the log, then verifying every record (R8)"),
    }
}

/// How to run `lifecycle` the way this process was started: under `cargo
/// run` the binary is not on PATH.
fn invocation() -> String {
    let exe = std::env::current_exe().ok();
    let in_target = exe.as_ref().is_some_and(|p| p.components().any(|c| c.as_os_str() == "target"));
    if std::env::var_os("CARGO").is_some() || in_target {
        let release = exe.as_ref().is_some_and(|p| p.components().any(|c| c.as_os_str() == "release"));
        return if release { "cargo run --release --".into() } else { "cargo run --".into() };
    }
    "lifecycle".into()
}

fn print_summary(s: &Summary) -> Result<(), Failure> {
    say!(
        "\n== summary: seed {}, policy {}, {} instances, {} s, peer {}",
        s.seed,
        s.policy,
        s.instances,
        s.seconds,
        s.peer
    );
    if let Some(after) = s.interrupted_after_s {
        say!("interrupted after {after:.1} s of {} s (Ctrl-C): the summary covers what was done", s.seconds);
    }
    say!(
        "records: {} = {} creates ({} names; a removed name created again counts again) + {} transitions",
        s.records,
        s.creates,
        s.names,
        s.transitions_total
    );
    for (kind, n) in &s.transitions {
        say!("  {kind:<18} {n}");
    }
    let closes: Vec<String> = s.closes.iter().map(|(by, n)| format!("{n} by {by}")).collect();
    say!("connections ended: {}", closes.join(", "));
    let finals: Vec<String> = s.final_states.iter().map(|(k, n)| format!("{k} {n}")).collect();
    say!("final states: {} (one per name)", finals.join(", "));
    let delete_transitions = s.transitions.get("delete").copied().unwrap_or(0);
    let removed = s.final_states.get("Removed").copied().unwrap_or(0);
    if !s.virtual_time {
        say!(
            "deletes: {} asked, {delete_transitions} moved an instance (a delete of one already deleting or removed changes nothing), {removed} names end Removed ({} were created again after a delete)",
            s.deletes.count,
            s.creates.saturating_sub(s.names)
        );
    }
    say!("zombies: {} detected, {} cleaned by delete", s.zombies_detected, s.zombies_cleaned);
    say!(
        "reconnects: {} made by the rules, {} suppressed (final status, give-up, pairing refused)",
        s.reconnects_made,
        s.reconnects_suppressed
    );
    say!("engine restarts: {}", s.engine_restarts);
    if !s.virtual_time {
        for (what, l) in [("deletes", &s.deletes), ("logouts", &s.logouts)] {
            say!("{what}: {} — p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms", l.count, l.p50_ms, l.p99_ms, l.max_ms);
        }
    }
    if !s.refused.is_empty() {
        let refused: Vec<String> = s.refused.iter().map(|(k, n)| format!("{k} {n}")).collect();
        say!("commands refused (expected under chaos): {}", refused.join(", "));
    }
    if let Some(g) = &s.gateway {
        say!(
            "gateway: {} identifies, {} resumes ({} refused: session gone), {} heartbeats",
            g.identifies,
            g.resumes,
            g.resume_refused,
            g.heartbeats
        );
        if g.limits_kept {
            say!("gateway limits: kept — no IDENTIFY past the concurrency, no 4008, no heartbeat out of schedule");
        } else {
            say!(
                "gateway limits: BROKEN — {} IDENTIFYs past the concurrency, {} closed 4008, {} heartbeats out of schedule",
                g.identify_refused,
                g.rate_limited,
                g.early_beats
            );
        }
    }
    let v = &s.verification;
    if v.clean {
        say!("verification: clean — {} records of {} instances follow the rules (R8)", v.records, v.instances);
    } else {
        say!("verification: {} finding(s)", v.findings.len());
        for f in &v.findings {
            say!("  {f}");
        }
    }
    say!("head: {}", s.head);
    if s.virtual_time {
        say!("virtual time: the same seed gives this head again, record for record");
    } else {
        say!(
            "the seed fixes the schedule (which command or fault reaches which instance, when); over real sockets what it leads to depends on timing, so two runs differ in a few records. `--virtual` runs it in virtual time, record for record the same"
        );
    }
    let run = invocation();
    say!("log: {}  (next: {run} inspect {0}; {run} verify {0}; {run} replay {0})", s.data);
    Ok(())
}

/// `--cluster N`: N hosts against a nats-server spawned for the run.
pub async fn run_cluster(options: &Options, hosts: usize, json: bool) -> Result<ExitCode, Failure> {
    use instance_lifecycle::testing::cluster_sim::{self, ClusterOptions};
    let cluster = ClusterOptions {
        hosts,
        instances: options.instances,
        duration: options.duration,
        seed: options.seed,
        preset: options.preset,
        lease_ttl: std::time::Duration::from_secs(3),
        keep_records: 20,
    };
    if !json && !quiet() {
        eprintln!(
            "simulating a cluster of {hosts} hosts: {} instances for {} s (seed {}, policy {}, lease TTL {:?}), host kills included",
            cluster.instances,
            cluster.duration.as_secs(),
            cluster.seed,
            cluster.preset,
            cluster.lease_ttl
        );
    }
    let progress = |line: &str| {
        if !json && !quiet() {
            eprintln!("  {line}");
        }
    };
    let s = cluster_sim::run_cluster(&cluster, progress).await.map_err(|e| crate::output::fail(e.to_string()))?;
    let clean = s.violations.is_empty() && s.overlaps == 0;
    if json {
        let hosts: Vec<_> = s
            .hosts
            .iter()
            .map(|h| {
                serde_json::json!({
                    "host": h.host, "killed": h.killed, "owned": h.stats.owned, "claims": h.stats.claims,
                    "takeovers": h.stats.takeovers, "failovers": h.stats.failovers,
                    "refused": h.stats.refused, "lost": h.stats.lost, "snapshots": h.stats.snapshots,
                })
            })
            .collect();
        let violations: Vec<String> = s.violations.iter().map(|(n, v)| format!("{n}: {v}")).collect();
        let out = serde_json::json!({
            "hosts": hosts, "kills": s.kills, "events": s.events, "streams": s.streams, "records": s.records,
            "takeovers": s.takeovers, "states": s.states, "violations": violations, "overlaps": s.overlaps, "clean": clean,
            "stream": s.stream.iter().map(|(second, entries, bytes)| serde_json::json!({"second": second, "entries": entries, "bytes": bytes})).collect::<Vec<_>>(),
        });
        say!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        say!(
            "{:<10} {:>7} {:>6} {:>7} {:>10} {:>10} {:>8} {:>5}",
            "host",
            "",
            "owned",
            "claims",
            "takeovers",
            "failovers",
            "refused",
            "lost"
        );
        for h in &s.hosts {
            let st = &h.stats;
            let status = if h.killed { "killed" } else { "alive" };
            say!(
                "{:<10} {:>7} {:>6} {:>7} {:>10} {:>10} {:>8} {:>5}",
                h.host,
                status,
                st.owned,
                st.claims,
                st.takeovers,
                st.failovers,
                st.refused,
                st.lost
            );
        }
        let states: Vec<String> = s.states.iter().map(|(k, n)| format!("{n} {k}")).collect();
        say!("host kills: {}; chaos events: {}", s.kills, s.events);
        say!(
            "streams: {} instances ({}), {} records and {} takeovers kept (each subject compacted past 20 entries)",
            s.streams,
            states.join(", "),
            s.records,
            s.takeovers
        );
        let sizes: Vec<String> =
            s.stream.iter().map(|(second, entries, bytes)| format!("{second}s {entries}/{}K", bytes / 1024)).collect();
        say!("stream size (entries/bytes) through the run: {}", sizes.join(", "));
        say!(
            "verification: {} (one owner at a time, epochs never going back, gapless records, every transition replayed through the rules); peer: {} overlapping connections",
            if s.violations.is_empty() {
                "every stream clean".to_owned()
            } else {
                format!("{} violations", s.violations.len())
            },
            s.overlaps
        );
        for (name, v) in s.violations.iter().take(20) {
            say!("  {name}: {v}");
        }
    }
    Ok(if clean { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}
