//! The commands that read a log: verify, export, recover (inspect has its
//! own module). They open
//! a copy (see `instance_lifecycle::log::Log::open_copy`), never the original,
//! except `recover --accept-loss`, which is asked to write.

use std::io::Write;
use std::path::Path;
use std::process::ExitCode;

use instance_lifecycle::log::{Digest, Finding, HeadCheck, Log, LogConfig, RecoveryOptions, RulesChoice};
use instance_lifecycle::machine::{Policy, Preset, StateKind};

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

/// Parses `GLOBAL:LINK` (the link as 64 hex digits).
fn parse_head(s: &str) -> Result<(u64, Digest), Failure> {
    let bad = || fail(format!("--expect-head {s:?}: expected GLOBAL:LINK, as `lifecycle verify` prints it"));
    let (global, link) = s.split_once(':').ok_or_else(bad)?;
    Ok((global.parse().map_err(|_| bad())?, Digest::from_hex(link).ok_or_else(bad)?))
}

pub fn verify(
    dir: &Path,
    preset: Option<Preset>,
    rules: RulesChoice,
    expect_head: Option<&str>,
    json: bool,
) -> Result<ExitCode, Failure> {
    let anchor = expect_head.map(parse_head).transpose()?;
    let log = open_copy(dir)?;
    let recorded = log.policy()?;
    // What the log is checked against, said first (in JSON: `against` and `notes`).
    let mut preamble = Vec::new();
    let (against, mut report) = match (preset, &recorded) {
        (Some(p), recorded) => {
            let given = Policy::preset(p);
            if let Some(recorded) = recorded.as_ref().filter(|r| **r != given) {
                preamble.push(format!(
                    "--policy {p} is not the policy the log recorded ({:?}); divergences may come from that. It differs in:",
                    recorded.name
                ));
                preamble.extend(recorded.differences(&given).iter().map(|d| format!("    {d} (recorded vs given)")));
            }
            (format!("--policy {p} (every record replayed under it)"), log.verify_under(Some(&given), &given, rules))
        }
        (None, Some(r)) => (format!("the policy the log recorded ({:?})", r.name), log.verify_under(None, r, rules)),
        (None, None) => {
            let fallback = Policy::default();
            let report = log.verify_under(Some(&fallback), &fallback, rules);
            (format!("policy {:?} (the log recorded none)", fallback.name), report)
        }
    };
    if let Some(finding) = anchor.and_then(|(global, link)| log.check_anchor(global, link)) {
        report.findings.insert(0, finding);
    }
    preamble.extend(report.notes.iter().map(ToString::to_string));
    preamble.extend(instance_lifecycle::log::kept_in(dir).iter().map(|k| {
        format!(
            "{} holds journal files an accepted loss set aside (the bytes opening could not replay); nothing reads them, delete them once they are no longer needed",
            k.display()
        )
    }));
    let (global, link) = log.tip();
    let divergence = match report.first_divergence() {
        Some(Finding::Divergence { instance, seq, global, .. }) => Some((instance.to_string(), *seq, *global)),
        _ => None,
    };
    let refused = log.head_check().is_damage();
    let code = if report.is_clean() { ExitCode::SUCCESS } else { ExitCode::FAILURE };
    if json {
        let value = serde_json::json!({
            "log": dir.display().to_string(),
            "against": against,
            "clean": report.is_clean(),
            "records": report.records,
            "instances": report.instances,
            "head": format!("{global}:{}", link.hex()),
            "findings": report.findings.iter().map(ToString::to_string).collect::<Vec<_>>(),
            "notes": preamble,
            "first_divergence": divergence.map(|(instance, seq, global)| serde_json::json!({"instance": instance, "seq": seq, "global": global})),
            "engine_refuses": refused,
        });
        say!("{value}");
        return Ok(code);
    }
    say!("verifying {} against {against}", dir.display());
    for note in &preamble {
        say!("note: {note}");
    }
    if report.is_clean() {
        say!("clean: {} records of {} instances follow the rules (R8)", report.records, report.instances);
        say!("head: {global}:{} (keep it to check a later copy with --expect-head)", link.hex());
        return Ok(code);
    }
    say!("{} finding(s) in {} records of {} instances:", report.findings.len(), report.records, report.instances);
    for f in &report.findings {
        say!("- {f}");
    }
    if let Some((instance, seq, global)) = divergence {
        say!(
            "first divergence: {instance}#{seq} (global {global}) — the first record where the rules decide differently"
        );
    }
    if refused {
        say!(
            "an engine will refuse this log; `lifecycle recover {} --accept-loss` opens it anyway and records the loss",
            dir.display()
        );
    }
    Ok(code)
}

pub fn recover(dir: &Path, accept_loss: bool, json: bool) -> Result<ExitCode, Failure> {
    let shown = dir.display().to_string();
    if !accept_loss {
        let log = open_copy(dir)?;
        let check = log.head_check();
        let damage = check.is_damage();
        if json {
            say!("{}", serde_json::json!({"log": shown, "head_check": check.to_string(), "engine_opens": !damage}));
        } else if damage {
            say!("{shown}: {check}");
            say!(
                "an engine refuses to open it; `lifecycle recover {shown} --accept-loss` opens it anyway, records the loss, and goes on from what is left"
            );
        } else {
            say!("{shown}: {check}; an engine can open it");
        }
        return Ok(if damage { ExitCode::FAILURE } else { ExitCode::SUCCESS });
    }
    let config = LogConfig { accept_loss: true, ..LogConfig::default() };
    let log = Log::open_existing(dir, config)?;
    let check = log.head_check().clone();
    let (after, _) = log.tip();
    if !json {
        // Said before the recovery, which can fail: the loss is recorded already.
        match &check {
            check if check.is_damage() => {
                say!("accepted: {check}");
                say!("the loss is recorded in the log; global sequence numbers go on after {after}");
            }
            check @ HeadCheck::Behind { .. } => say!("{check}; the head now covers them"),
            check => say!("nothing to accept: {check}"),
        }
        for kept in log.kept() {
            say!(
                "kept: {} (journal files set aside by an accepted loss: the bytes opening could not replay; nothing reads them again)",
                kept.display()
            );
        }
        let (lost, unlisted) = lost_records(&log);
        for (instance, seqs) in &lost {
            say!("lost: {instance} {} (in journal frames past the damage, which replay could not apply)", ranges(seqs));
        }
        if unlisted > 0 {
            say!("lost: {unlisted} more record(s) past those listed");
        }
    }
    let recovery = log.recover(RecoveryOptions { quarantine: true, ..RecoveryOptions::default() })?;
    let mut kinds = std::collections::BTreeMap::<StateKind, usize>::new();
    for r in recovery.instances.values() {
        *kinds.entry(r.instance.state.kind()).or_default() += 1;
    }
    if json {
        let states: serde_json::Map<_, _> =
            kinds.iter().map(|(k, n)| (k.as_str().to_string(), serde_json::json!(n))).collect();
        let quarantined: Vec<_> = recovery
            .quarantined
            .iter()
            .map(|(name, error)| serde_json::json!({"instance": name.to_string(), "error": error.to_string()}))
            .collect();
        say!(
            "{}",
            serde_json::json!({
                "log": shown,
                "head_check": check.to_string(),
                "accepted": check.is_damage(),
                "resumed_after": check.is_damage().then_some(after),
                "instances": recovery.instances.len(),
                "states": states,
                "quarantined": quarantined,
                "kept": log.kept().iter().map(|p| p.display().to_string()).collect::<Vec<_>>(),
                "lost": lost_records(&log).0.iter().map(|(instance, seqs)| serde_json::json!({"instance": instance, "seqs": seqs})).collect::<Vec<_>>(),
                "lost_unlisted": lost_records(&log).1,
            })
        );
        return Ok(ExitCode::SUCCESS);
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

/// Which instances lost which records, as the journal frames past the
/// damage name them (`Replayed::lost`), by instance; and how many more there were.
fn lost_records(log: &Log) -> (std::collections::BTreeMap<String, Vec<u64>>, u64) {
    let mut by = std::collections::BTreeMap::<String, Vec<u64>>::new();
    let Some(replayed) = log.replayed() else { return (by, 0) };
    for (instance, seq) in replayed.lost {
        by.entry(instance).or_default().push(seq);
    }
    by.values_mut().for_each(|seqs| {
        seqs.sort_unstable();
        seqs.dedup();
    });
    (by, replayed.lost_unlisted)
}

/// `seq 3, 5..9` for sequence numbers in order.
fn ranges(seqs: &[u64]) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut i = 0;
    while i < seqs.len() {
        let mut j = i;
        while j + 1 < seqs.len() && seqs[j + 1] == seqs[j] + 1 {
            j += 1;
        }
        parts.push(if i == j { seqs[i].to_string() } else { format!("{}..{}", seqs[i], seqs[j]) });
        i = j + 1;
    }
    format!("seq {}", parts.join(", "))
}
