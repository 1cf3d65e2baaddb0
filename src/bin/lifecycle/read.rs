//! The commands that read a log: inspect, verify, export, recover. They open
//! a copy (see `instance_lifecycle::log::Log::open_copy`), never the original,
//! except `recover --accept-loss`, which is asked to write.

use std::io::Write;
use std::path::Path;
use std::process::ExitCode;

use instance_lifecycle::log::{Digest, Event, Finding, HeadCheck, Log, LogConfig, Record, RecoveryOptions};
use instance_lifecycle::machine::{InstanceName, Policy, Preset, StateKind, Timestamp};

use crate::output::{Failure, fail, say};

/// Opens a copy of the log (never writing the original), saying if it is in
/// use and warning on stderr when its head says records were lost.
pub fn open_copy(dir: &Path) -> Result<Log, Failure> {
    let (log, in_use) = Log::open_copy(dir)?;
    if in_use {
        eprintln!(
            "note: {} is in use by a running engine; reading a copy taken now (a head finding on a live copy may be a race with the writer: stop it and look again)",
            dir.display()
        );
    }
    if log.head_check().is_damage() {
        eprintln!(
            "warning: {}: {}; `lifecycle verify {}` shows what is left",
            dir.display(),
            log.head_check(),
            dir.display()
        );
    }
    Ok(log)
}

fn parse_state(s: Option<String>) -> Result<Option<StateKind>, Failure> {
    s.map(|s| {
        StateKind::parse(&s).ok_or_else(|| {
            fail(format!("unknown state {s:?}; one of Connecting, Open, Closing, Closed, Zombie, Removed"))
        })
    })
    .transpose()
}

pub fn inspect(
    dir: &Path,
    instance: Option<String>,
    at: Option<u64>,
    state: Option<String>,
    since: Option<u64>,
    until: Option<u64>,
) -> Result<ExitCode, Failure> {
    let state = parse_state(state)?;
    let log = open_copy(dir)?;
    let in_time = |t: Timestamp| since.is_none_or(|s| t.0 >= s) && until.is_none_or(|u| t.0 <= u);
    let Some(name) = instance else {
        if at.is_some() {
            return Err(fail("--at needs --instance"));
        }
        say!("{:<24} {:<11} {:>7}  {:<23}  state", "instance", "kind", "records", "last transition (UTC)");
        for (name, latest) in log.latest_all()? {
            if state.is_some_and(|k| latest.instance.state.kind() != k) || !in_time(latest.at) {
                continue;
            }
            let records = log.history(&name)?.len();
            say!(
                "{:<24} {:<11} {:>7}  {:<23}  {}",
                name,
                latest.instance.state.kind(),
                records,
                latest.at.utc(),
                latest.instance.state
            );
        }
        return Ok(ExitCode::SUCCESS);
    };
    let name = InstanceName::new(&name)?;
    let history = log.history(&name)?;
    let (Some(first), Some(last)) = (history.first(), history.last()) else {
        return Err(fail(format!("no instance {name} in {}", dir.display())));
    };
    if let Some(seq) = at {
        let record = history
            .iter()
            .find(|r| r.seq == seq)
            .ok_or_else(|| fail(format!("{name} has no record {seq} (it has {}..={})", first.seq, last.seq)))?;
        say!("{name} after #{seq} ({}): {} ({})", record.at.utc(), record.to.state, record.to.generation);
        say!("{}", serde_json::to_string_pretty(&record.to)?);
        return Ok(ExitCode::SUCCESS);
    }
    say!("{:>5}  {:<23}  {:<18} {:<10} → {:<10} {:>6}  detail", "seq", "time (UTC)", "input", "from", "to", "status");
    for r in history.iter().filter(|r| in_time(r.at) && state.is_none_or(|k| r.to.state.kind() == k)) {
        timeline_row(r)?;
    }
    Ok(ExitCode::SUCCESS)
}

fn timeline_row(r: &Record) -> Result<(), Failure> {
    let (from, status, reason) = match &r.event {
        Event::Transition { from, input, .. } => {
            let (status, reason) = match input.closed() {
                Some((by, status, reason)) => {
                    let status = status.map(|s| s.to_string()).unwrap_or_default();
                    (Some(format!("{status} by {by}")), reason.to_string())
                }
                None => (None, String::new()),
            };
            (from.state.kind().to_string(), status, reason)
        }
        Event::Created { .. } | Event::Snapshot { .. } => ("-".to_owned(), None, String::new()),
    };
    let failures = r.failures();
    let mut detail = r.to.state.to_string();
    if !reason.is_empty() {
        detail = format!("{detail}; reason {reason:?}");
    }
    if !failures.is_empty() {
        detail = format!("{detail}; FAILED: {}", failures.join("; "));
    }
    say!(
        "{:>5}  {:<23}  {:<18} {:<10} → {:<10} {:>6}  {detail}",
        r.seq,
        r.at.utc(),
        r.event.label(),
        from,
        r.to.state.kind(),
        status.unwrap_or_default()
    );
    Ok(())
}

/// Parses `GLOBAL:LINK` (the link as 64 hex digits).
fn parse_head(s: &str) -> Result<(u64, Digest), Failure> {
    let bad = || fail(format!("--expect-head {s:?}: expected GLOBAL:LINK, as `lifecycle verify` prints it"));
    let (global, link) = s.split_once(':').ok_or_else(bad)?;
    Ok((global.parse().map_err(|_| bad())?, Digest::from_hex(link).ok_or_else(bad)?))
}

pub fn verify(dir: &Path, preset: Option<Preset>, expect_head: Option<&str>) -> Result<ExitCode, Failure> {
    let anchor = expect_head.map(parse_head).transpose()?;
    let log = open_copy(dir)?;
    let recorded = log.policy()?;
    let report = match (preset, &recorded) {
        (Some(p), recorded) => {
            let given = Policy::preset(p);
            say!("verifying {} against --policy {p} (every record replayed under it)", dir.display());
            if let Some(recorded) = recorded.as_ref().filter(|r| **r != given) {
                say!(
                    "note: --policy {p} is not the policy the log recorded ({:?}); divergences may come from that. It differs in:",
                    recorded.name
                );
                for d in recorded.differences(&given) {
                    say!("    {d} (recorded vs given)");
                }
            }
            log.verify(&given)
        }
        (None, Some(r)) => {
            say!("verifying {} against the policy the log recorded ({:?})", dir.display(), r.name);
            log.verify_recorded(r)
        }
        (None, None) => {
            let fallback = Policy::default();
            say!("verifying {} against policy {:?} (the log recorded none)", dir.display(), fallback.name);
            log.verify(&fallback)
        }
    };
    let mut report = report;
    if let Some(finding) = anchor.and_then(|(global, link)| log.check_anchor(global, link)) {
        report.findings.insert(0, finding);
    }
    for note in &report.notes {
        say!("note: {note}");
    }
    if report.is_clean() {
        let (global, link) = log.tip();
        say!("clean: {} records of {} instances follow the rules (R8)", report.records, report.instances);
        say!("head: {global}:{} (keep it to check a later copy with --expect-head)", link.hex());
        return Ok(ExitCode::SUCCESS);
    }
    say!("{} finding(s) in {} records of {} instances:", report.findings.len(), report.records, report.instances);
    for f in &report.findings {
        say!("- {f}");
    }
    if let Some(Finding::Divergence { instance, seq, global, .. }) = report.first_divergence() {
        say!(
            "first divergence: {instance}#{seq} (global {global}) — the first record where the current rules decide differently"
        );
    }
    if log.head_check().is_damage() {
        say!(
            "an engine will refuse this log; `lifecycle recover {} --accept-loss` opens it anyway and records the loss",
            dir.display()
        );
    }
    Ok(ExitCode::FAILURE)
}

pub fn recover(dir: &Path, accept_loss: bool) -> Result<ExitCode, Failure> {
    if !accept_loss {
        let log = open_copy(dir)?;
        let check = log.head_check();
        if check.is_damage() {
            say!("{}: {check}", dir.display());
            say!(
                "an engine refuses to open it; `lifecycle recover {} --accept-loss` opens it anyway, records the loss, and goes on from what is left",
                dir.display()
            );
            return Ok(ExitCode::FAILURE);
        }
        say!("{}: {check}; an engine can open it", dir.display());
        return Ok(ExitCode::SUCCESS);
    }
    let config = LogConfig { accept_loss: true, ..LogConfig::default() };
    let log = Log::open_existing(dir, config)?;
    match log.head_check() {
        check if check.is_damage() => {
            let (after, _) = log.tip();
            say!("accepted: {check}");
            say!("the loss is recorded in the log; global sequence numbers go on after {after}");
        }
        check @ HeadCheck::Behind { .. } => say!("{check}; the head now covers them"),
        check => say!("nothing to accept: {check}"),
    }
    let recovery = log.recover(RecoveryOptions { quarantine: true, ..RecoveryOptions::default() })?;
    let mut kinds = std::collections::BTreeMap::<StateKind, usize>::new();
    for r in recovery.instances.values() {
        *kinds.entry(r.instance.state.kind()).or_default() += 1;
    }
    let counts: Vec<String> = kinds.iter().map(|(k, n)| format!("{n} {}", k.as_str().to_lowercase())).collect();
    say!("{} instances as last recorded: {}", recovery.instances.len(), counts.join(", "));
    for (name, error) in &recovery.quarantined {
        say!("quarantined {name}: {error}");
    }
    Ok(ExitCode::SUCCESS)
}

pub fn export(dir: &Path) -> Result<ExitCode, Failure> {
    let log = open_copy(dir)?;
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    for record in log.records() {
        let record = record?;
        let mut value = serde_json::to_value(&record)?;
        if let Some(obj) = value.as_object_mut() {
            obj.insert("failures".into(), serde_json::json!(record.failures()));
        }
        writeln!(out, "{value}").map_err(|_| Failure::Closed)?;
    }
    out.flush().map_err(|_| Failure::Closed)?;
    Ok(ExitCode::SUCCESS)
}
