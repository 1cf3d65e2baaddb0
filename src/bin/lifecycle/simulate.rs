//! `lifecycle simulate`: runs the library's simulation with a progress line,
//! stops it cleanly on Ctrl-C (the summary of what was done, exit code 130),
//! and prints the summary.

use std::io::{IsTerminal, Write};
use std::process::ExitCode;

use instance_lifecycle::testing::simulate::{self, Options, Progress, Stage, Summary};

use crate::output::{Failure, INTERRUPTED, say};

pub async fn run(options: Options, json: bool) -> Result<ExitCode, Failure> {
    let terminal = std::io::stderr().is_terminal();
    if !json {
        eprintln!(
            "simulating {} instances for {} s (seed {}, policy {}) → {}",
            options.instances,
            options.duration.as_secs(),
            options.seed,
            options.preset,
            options.data.display()
        );
    }
    let stop = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    let summary = simulate::run(&options, |p| show_progress(p, terminal), stop).await?;
    if terminal {
        eprintln!();
    }
    if json {
        say!("{}", serde_json::to_string_pretty(&summary)?);
    } else {
        print_summary(&summary)?;
    }
    Ok(match (summary.interrupted_after_s, summary.verification.clean) {
        (Some(_), _) => ExitCode::from(INTERRUPTED),
        (None, true) => ExitCode::SUCCESS,
        (None, false) => ExitCode::FAILURE,
    })
}

fn show_progress(p: &Progress, terminal: bool) {
    let states: Vec<String> = p.states.iter().map(|(k, n)| format!("{} {n}", k.as_str().to_lowercase())).collect();
    let (done, total) = (p.elapsed.as_secs(), p.total.as_secs().max(1));
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
        Stage::Verifying => eprintln!("shutting the engine down and verifying the log"),
    }
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
    say!("transitions: {}", s.transitions_total);
    for (kind, n) in &s.transitions {
        say!("  {kind:<18} {n}");
    }
    let closes: Vec<String> = s.closes.iter().map(|(by, n)| format!("{n} by {by}")).collect();
    say!("connections ended: {}", closes.join(", "));
    let finals: Vec<String> = s.final_states.iter().map(|(k, n)| format!("{k} {n}")).collect();
    say!("final states: {}", finals.join(", "));
    say!("zombies: {} detected, {} cleaned by delete", s.zombies_detected, s.zombies_cleaned);
    say!(
        "reconnects: {} made by the rules, {} suppressed (final status, give-up, pairing refused)",
        s.reconnects_made,
        s.reconnects_suppressed
    );
    say!("engine restarts: {}", s.engine_restarts);
    for (what, l) in [("deletes", &s.deletes), ("logouts", &s.logouts)] {
        say!("{what}: {} — p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms", l.count, l.p50_ms, l.p99_ms, l.max_ms);
    }
    if !s.refused.is_empty() {
        let refused: Vec<String> = s.refused.iter().map(|(k, n)| format!("{k} {n}")).collect();
        say!("commands refused (expected under chaos): {}", refused.join(", "));
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
    say!("log: {}  (try: lifecycle inspect {0}; lifecycle verify {0})", s.data);
    Ok(())
}
