//! `lifecycle inspect`: a log as an operator reads it at 3 a.m. — every
//! instance in columns with its state in words and how long ago it last
//! moved, or one instance's timeline; filters by state, name, input and
//! time (`--since 2h`, RFC 3339, or epoch ms); `--json` for scripts (JSON
//! Lines, the shapes of the service's API); `--follow` for records as a
//! running engine appends them. Reads copies, never the log itself.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use instance_lifecycle::log::{Log, Record};
use instance_lifecycle::machine::{InputKind, InstanceName, Policy, State, StateKind, Timestamp};
use instance_lifecycle::serve::EventBody;
use serde_json::json;

use crate::output::{Failure, fail, paint, quiet, say};
use crate::read::open_copy;

/// What to show.
pub struct Query {
    pub instance: Option<String>,
    pub at: Option<u64>,
    pub state: Option<String>,
    pub name: Option<String>,
    pub input: Option<String>,
    pub since: Option<String>,
    pub until: Option<String>,
    pub json: bool,
}

/// The filters, parsed.
struct Filter {
    state: Option<StateKind>,
    name: Option<String>,
    input: Option<InputKind>,
    since: Option<Timestamp>,
    until: Option<Timestamp>,
}

fn now_ms() -> u64 {
    let since = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
    u64::try_from(since.as_millis()).unwrap_or(u64::MAX)
}

/// A time as people type it: RFC 3339 (`2026-11-30T03:12:00Z`, `2026-11-30 03:12`),
/// a duration ago (`10m`, `2h`, `3d`, `1h 30m`), or milliseconds since the epoch.
pub fn parse_time(flag: &str, s: &str, now: u64) -> Result<Timestamp, Failure> {
    let t = s.trim();
    if !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit()) {
        return t.parse().map(Timestamp).map_err(|_| fail(format!("{flag} {s:?}: too large")));
    }
    if let Ok(ago) = humantime::parse_duration(t) {
        let ms = u64::try_from(ago.as_millis()).unwrap_or(u64::MAX);
        return Ok(Timestamp(now.saturating_sub(ms)));
    }
    if let Ok(at) = humantime::parse_rfc3339_weak(t) {
        let ms = at.duration_since(UNIX_EPOCH).map_err(|_| fail(format!("{flag} {s:?}: before 1970")))?.as_millis();
        return Ok(Timestamp(u64::try_from(ms).unwrap_or(u64::MAX)));
    }
    Err(fail(format!(
        "{flag} {s:?}: expected a time (2026-11-30T03:12:00Z), a duration ago (10m, 2h, 3d) or milliseconds since the epoch"
    )))
}

/// `prefix` or a glob with `*` and `?`.
pub fn name_matches(pattern: &str, name: &str) -> bool {
    if !pattern.contains(['*', '?']) {
        return name.starts_with(pattern);
    }
    // Iterative wildcard match: the last `*` absorbs as much as it must.
    let (p, n): (Vec<char>, Vec<char>) = (pattern.chars().collect(), name.chars().collect());
    let (mut i, mut j, mut star, mut mark) = (0, 0, None, 0);
    while j < n.len() {
        if i < p.len() && (p[i] == '?' || p[i] == n[j]) {
            i += 1;
            j += 1;
        } else if i < p.len() && p[i] == '*' {
            star = Some(i);
            mark = j;
            i += 1;
        } else if let Some(s) = star {
            i = s + 1;
            mark += 1;
            j = mark;
        } else {
            return false;
        }
    }
    p[i..].iter().all(|&c| c == '*')
}

impl Filter {
    fn of(q: &Query, now: u64) -> Result<Self, Failure> {
        let state = q
            .state
            .as_deref()
            .map(|s| {
                StateKind::parse(s).ok_or_else(|| {
                    fail(format!("--state {s:?}: one of connecting, open, closing, closed, zombie, removed"))
                })
            })
            .transpose()?;
        let input = q
            .input
            .as_deref()
            .map(|s| {
                InputKind::parse(s).ok_or_else(|| {
                    let kinds: Vec<&str> = InputKind::ALL.iter().map(|k| k.as_str()).collect();
                    fail(format!("--input {s:?}: one of {}", kinds.join(", ")))
                })
            })
            .transpose()?;
        let since = q.since.as_deref().map(|s| parse_time("--since", s, now)).transpose()?;
        let until = q.until.as_deref().map(|s| parse_time("--until", s, now)).transpose()?;
        if let (Some(a), Some(b)) = (since, until)
            && a > b
        {
            return Err(fail("--since is after --until: nothing can match"));
        }
        Ok(Self { state, name: q.name.clone(), input, since, until })
    }

    fn in_time(&self, t: Timestamp) -> bool {
        self.since.is_none_or(|s| t >= s) && self.until.is_none_or(|u| t <= u)
    }

    /// A record of a timeline (or of a followed log).
    fn record(&self, r: &Record) -> bool {
        self.in_time(r.at)
            && self.state.is_none_or(|k| r.to.state.kind() == k)
            && self.name.as_deref().is_none_or(|p| name_matches(p, r.instance.as_str()))
            && self.input.is_none_or(|k| input_of(r) == Some(k))
    }
}

fn input_of(r: &Record) -> Option<InputKind> {
    match &r.event {
        instance_lifecycle::log::Event::Transition { input, .. } => Some(input.kind()),
        _ => None,
    }
}

/// `3 s ago`, `12 min ago`, `2 h ago`, `4 d ago`.
pub fn ago(then: Timestamp, now: u64) -> String {
    let s = now.saturating_sub(then.0) / 1000;
    match s {
        0..60 => format!("{s} s ago"),
        60..3600 => format!("{} min ago", s / 60),
        3600..86_400 => format!("{} h ago", s / 3600),
        _ => format!("{} d ago", s / 86_400),
    }
}

/// `201 instances: 86 open, 58 closed, 56 removed, 1 zombie` (largest first).
pub fn count_line(kinds: &BTreeMap<StateKind, usize>) -> String {
    let total: usize = kinds.values().sum();
    let mut parts: Vec<(&StateKind, &usize)> = kinds.iter().filter(|(_, n)| **n > 0).collect();
    parts.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
    let parts: Vec<String> = parts.iter().map(|(k, n)| format!("{n} {}", k.as_str().to_lowercase())).collect();
    let noun = if total == 1 { "instance" } else { "instances" };
    if parts.is_empty() { format!("0 {noun}") } else { format!("{total} {noun}: {}", parts.join(", ")) }
}

fn policy_of(log: &Log) -> Policy {
    log.policy().ok().flatten().unwrap_or_default()
}

pub fn run(dir: &Path, q: Query) -> Result<ExitCode, Failure> {
    let now = now_ms();
    let filter = Filter::of(&q, now)?;
    let log = open_copy(dir)?;
    match q.instance.clone() {
        None if q.at.is_some() => Err(fail("--at needs --instance")),
        None => list(&log, &filter, q.json, now),
        Some(name) => timeline(&log, dir, &name, q.at, &filter, q.json),
    }
}

fn list(log: &Log, filter: &Filter, json: bool, now: u64) -> Result<ExitCode, Failure> {
    let mut kinds = BTreeMap::new();
    if !json {
        say!("{:<24} {:<10} {:>7}  {:<13} {:<23}  state", "instance", "status", "records", "last moved", "(UTC)");
    }
    for (name, latest) in log.latest_all()? {
        let state = &latest.instance.state;
        if filter.state.is_some_and(|k| state.kind() != k)
            || filter.name.as_deref().is_some_and(|p| !name_matches(p, name.as_str()))
            || !filter.in_time(latest.at)
        {
            continue;
        }
        let history = log.history(&name)?;
        if let Some(k) = filter.input
            && !history.iter().any(|r| input_of(r) == Some(k) && filter.in_time(r.at))
        {
            continue;
        }
        *kinds.entry(state.kind()).or_insert(0) += 1;
        if json {
            let row = json!({
                "instance": name.as_str(),
                "kind": state.kind().as_str(),
                "status": state.coarse().as_str(),
                "state": state.to_string(),
                "records": history.len(),
                "last_at": latest.at.0,
                "last_time": rfc3339(latest.at),
                "generation": latest.instance.generation.0,
                "detail": state,
            });
            say!("{row}");
        } else {
            say!(
                "{:<24} {:<10} {:>7}  {:<13} {:<23}  {}",
                name,
                state.coarse().as_str(),
                history.len(),
                ago(latest.at, now),
                latest.at.utc(),
                painted(state)
            );
        }
    }
    if !json {
        say!("{}", count_line(&kinds));
    }
    Ok(ExitCode::SUCCESS)
}

fn rfc3339(at: Timestamp) -> String {
    format!("{}Z", at.utc().replacen(' ', "T", 1))
}

/// The state in words, its kind in its colour (on a terminal that wants colour).
fn painted(state: &State) -> String {
    let style = paint(state.kind());
    let words = state.to_string();
    match words.split_once(" — ") {
        Some((kind, rest)) => format!("{style}{kind}{style:#} — {rest}"),
        None => format!("{style}{words}{style:#}"),
    }
}

fn timeline(
    log: &Log,
    dir: &Path,
    name: &str,
    at: Option<u64>,
    filter: &Filter,
    json: bool,
) -> Result<ExitCode, Failure> {
    let name = InstanceName::new(name)?;
    let history = log.history(&name)?;
    let (Some(first), Some(last)) = (history.first(), history.last()) else {
        return Err(fail(format!("no instance {name} in {}", dir.display())));
    };
    if let Some(seq) = at {
        let record = history
            .iter()
            .find(|r| r.seq == seq)
            .ok_or_else(|| fail(format!("{name} has no record {seq} (it has {}..={})", first.seq, last.seq)))?;
        if json {
            let value = json!({
                "instance": name.as_str(), "seq": seq, "at": record.at.0, "time": rfc3339(record.at),
                "kind": record.to.state.kind().as_str(), "state": record.to.state.to_string(),
                "generation": record.to.generation.0, "detail": record.to.state,
            });
            say!("{value}");
        } else {
            say!("{name} after #{seq} ({}): {} ({})", record.at.utc(), painted(&record.to.state), record.to.generation);
            say!("{}", serde_json::to_string_pretty(&record.to)?);
        }
        return Ok(ExitCode::SUCCESS);
    }
    let policy = policy_of(log);
    let shown: Vec<&Record> = history.iter().filter(|r| filter.record(r)).collect();
    if json {
        for r in &shown {
            say!("{}", serde_json::to_string(&EventBody::of(r, &policy))?);
        }
        return Ok(ExitCode::SUCCESS);
    }
    timeline_header(false)?;
    for r in &shown {
        timeline_row(r, &policy, false)?;
    }
    if shown.len() < history.len() && !quiet() {
        eprintln!("{} of {} records shown (filters)", shown.len(), history.len());
    }
    Ok(ExitCode::SUCCESS)
}

fn timeline_header(with_name: bool) -> Result<(), Failure> {
    let who = if with_name { format!("{:<20} ", "instance") } else { String::new() };
    say!("{who}{:>5}  {:<23}  {:<17} {:<10} → {:<10} {:<4} detail", "seq", "time (UTC)", "input", "from", "to", "rule");
    Ok(())
}

fn timeline_row(r: &Record, policy: &Policy, with_name: bool) -> Result<(), Failure> {
    let body = EventBody::of(r, policy);
    let mut detail = painted(&r.to.state);
    if let Some(close) = &body.close {
        let code = close.code.map_or_else(|| "no status".to_owned(), |c| c.to_string());
        let last = if close.is_final { " — final" } else { "" };
        detail = format!("{detail}; closed by {}: {code} {}{last}", close.by, close.meaning);
    }
    if let Some((_, _, reason)) = match &r.event {
        instance_lifecycle::log::Event::Transition { input, .. } => input.closed(),
        _ => None,
    } && !reason.as_str().is_empty()
    {
        detail = format!("{detail} (reason {:?})", reason.as_str());
    }
    let failures = r.failures();
    if !failures.is_empty() {
        detail = format!("{detail}; FAILED: {}", failures.join("; "));
    }
    let who = if with_name { format!("{:<20} ", r.instance.as_str()) } else { String::new() };
    say!(
        "{who}{:>5}  {:<23}  {:<17} {:<10} → {:<10} {:<4} {detail}",
        r.seq,
        r.at.utc(),
        r.event.label(),
        body.from.as_deref().unwrap_or("-"),
        body.to,
        body.rule.unwrap_or("")
    );
    Ok(())
}

/// What the log's files look like now: a change means new records may be there.
fn fingerprint(dir: &Path) -> Vec<(std::path::PathBuf, u64, Option<SystemTime>)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else { continue };
        for e in entries.flatten() {
            let Ok(meta) = e.metadata() else { continue };
            if meta.is_dir() {
                stack.push(e.path());
            } else {
                out.push((e.path(), meta.len(), meta.modified().ok()));
            }
        }
    }
    out.sort();
    out
}

/// `--follow`: the records appended from now on, as a running engine (or
/// `serve`) writes them, until Ctrl-C. The log is held by its writer, so
/// each change is read from a fresh copy (taken only when its files change).
pub async fn follow(dir: &Path, q: Query) -> Result<ExitCode, Failure> {
    if q.at.is_some() {
        return Err(fail("--follow shows new records; --at shows one past state"));
    }
    let mut filter = Filter::of(&q, now_ms())?;
    if let Some(name) = &q.instance {
        InstanceName::new(name.as_str())?;
        // One instance: its exact name, not a prefix.
        filter.name = None;
    }
    let only = q.instance.clone();
    let (mut after, policy) = {
        let log = open_copy(dir)?;
        (log.committed(), policy_of(&log))
    };
    if !q.json {
        if !quiet() {
            eprintln!("following {} from record #{after} (Ctrl-C stops)", dir.display());
        }
        timeline_header(true)?;
    }
    let mut seen = fingerprint(dir);
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    // One listener for the whole run: a Ctrl-C that arrives while a page is
    // being read is kept until the loop looks again (a listener made anew
    // each turn missed it, and the process ran on).
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = &mut ctrl_c => return Ok(ExitCode::SUCCESS),
        }
        let now = fingerprint(dir);
        if now == seen {
            continue;
        }
        seen = now;
        let dir = dir.to_path_buf();
        let from = after;
        let page = tokio::task::spawn_blocking(move || -> Result<Vec<Record>, Failure> {
            let (log, _) = Log::open_copy(&dir)?;
            Ok(log.records_after(from, usize::MAX)?)
        })
        .await
        .map_err(|e| fail(e.to_string()))??;
        for r in &page {
            after = after.max(r.global);
            if only.as_deref().is_some_and(|n| n != r.instance.as_str()) || !filter.record(r) {
                continue;
            }
            if q.json {
                say!("{}", serde_json::to_string(&EventBody::of(r, &policy))?);
            } else {
                timeline_row(r, &policy, true)?;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_as_people_type_them() {
        let now = 1_800_000_000_000;
        assert_eq!(parse_time("--since", "10m", now).ok().map(|t| t.0), Some(now - 600_000));
        assert_eq!(parse_time("--since", "3d", now).ok().map(|t| t.0), Some(now - 3 * 86_400_000));
        assert_eq!(parse_time("--since", "1h 30m", now).ok().map(|t| t.0), Some(now - 5_400_000));
        assert_eq!(parse_time("--since", "2026-11-30T03:12:00Z", now).ok().map(|t| t.0), Some(1_796_008_320_000));
        assert_eq!(parse_time("--since", "1796008320000", now).ok().map(|t| t.0), Some(1_796_008_320_000));
        assert!(parse_time("--since", "yesterday-ish", now).is_err());
    }

    #[test]
    fn names_match_by_prefix_or_glob() {
        assert!(name_matches("sim-00", "sim-0012"));
        assert!(!name_matches("sim-00", "xsim-00"));
        assert!(name_matches("sim-*-eu", "sim-12-eu"));
        assert!(name_matches("*eu", "sim-12-eu"));
        assert!(name_matches("sim-?2*", "sim-12-eu"));
        assert!(!name_matches("sim-?2", "sim-12-eu"));
        assert!(name_matches("*", "anything"));
        assert!(name_matches("a*b*c", "a-b-b-c"));
        assert!(!name_matches("a*b*c", "a-b-b-d"));
    }

    #[test]
    fn the_count_line_adds_up_largest_first() {
        let kinds = BTreeMap::from([
            (StateKind::Open, 86),
            (StateKind::Closed, 58),
            (StateKind::Removed, 56),
            (StateKind::Zombie, 1),
        ]);
        assert_eq!(count_line(&kinds), "201 instances: 86 open, 58 closed, 56 removed, 1 zombie");
        assert_eq!(count_line(&BTreeMap::new()), "0 instances");
    }

    #[test]
    fn ago_reads_as_people_say_it() {
        let now = 10_000_000;
        assert_eq!(ago(Timestamp(now - 3_000), now), "3 s ago");
        assert_eq!(ago(Timestamp(now - 720_000), now), "12 min ago");
        assert_eq!(ago(Timestamp(now - 7_200_000), now + 1), "2 h ago");
    }
}
