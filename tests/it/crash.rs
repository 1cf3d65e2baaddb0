//! Crash tests, for real: a child process appends transitions for many
//! instances and prints an `ack` line after each append returns; the parent
//! kills it with SIGKILL at random moments, reopens the log, and checks that
//! every acknowledged append is there, without gaps, and verification passes.
//! One mode has 16 threads appending at once in group commit paced by the
//! disk: acknowledgements from many writers sharing commits.
//!
//! The child is this very test binary, re-run with an environment variable
//! (`LIFECYCLE_CRASH_WRITER`). Without it, the same function runs the writer
//! in-process for a bounded number of appends and checks the same things.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use instance_lifecycle::log::{Durability, Event, Log, LogConfig, RecoveryOptions};
use instance_lifecycle::machine::{CloseInitiator, Identity, Input, Instance, Policy, Preset, StatusCode, Timestamp};
use instance_lifecycle::testing::Driver;

use crate::support::name;

const WRITER_ENV: &str = "LIFECYCLE_CRASH_WRITER";
const INSTANCES: usize = 40;

fn policy() -> Policy {
    Policy::preset(Preset::Whatsapp)
}

/// A mode of the child: its durability and how many threads write at once.
fn mode(s: &str) -> (Durability, usize) {
    match s {
        "strict" => (Durability::Strict, 1),
        "buffered" => (Durability::Buffered, 1),
        // Group commit paced by the disk with many concurrent writers: what a fleet does.
        "group16" => (Durability::GroupCommit, 16),
        _ => (Durability::GroupCommit, 1),
    }
}

/// `writers` threads each append transitions round-robin over their share
/// of the fleet, acknowledging each on stdout, forever (until killed).
fn write_concurrently(dir: &Path, durability: Durability, writers: usize) {
    let log = Log::open(dir, LogConfig { durability, ..LogConfig::default() }).expect("open");
    let out = std::sync::Mutex::new(std::io::stdout());
    std::thread::scope(|s| {
        for w in 0..writers {
            let (log, out) = (&log, &out);
            s.spawn(move || {
                let mine: Vec<usize> = (0..INSTANCES).filter(|i| i % writers == w).collect();
                let mut acks = Vec::new();
                write_instances(log, &mine, usize::MAX, &mut |line| {
                    acks.clear();
                    acks.extend_from_slice(line.as_bytes());
                    let mut o = out.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                    o.write_all(&acks).and_then(|()| o.flush()).expect("ack");
                });
            });
        }
    });
}

/// Appends transitions round-robin over the fleet, acknowledging each on `out`,
/// until `limit` appends (or forever when killed first).
fn write_fleet(dir: &Path, durability: Durability, limit: usize, out: &mut dyn Write) {
    let log = Log::open(dir, LogConfig { durability, ..LogConfig::default() }).expect("open");
    let all: Vec<usize> = (0..INSTANCES).collect();
    write_instances(&log, &all, limit, &mut |line| {
        out.write_all(line.as_bytes()).and_then(|()| out.flush()).expect("ack");
    });
}

/// The writer's loop over `instances` (indices into the fleet), acknowledging with `ack(line)`.
pub(crate) fn write_instances(log: &Log, instances: &[usize], limit: usize, ack: &mut dyn FnMut(&str)) {
    let recovery = log.recover(RecoveryOptions::default()).expect("recover");
    let mut drivers: Vec<Driver> = instances
        .iter()
        .map(|&i| {
            let n = name(&format!("crash-{i:02}"));
            let instance = recovery.instances.get(&n).map(|r| r.instance.clone()).unwrap_or_default();
            Driver::with_instance(n, policy(), instance)
        })
        .collect();
    for d in &drivers {
        if log.next_seq(d.name()) == 1 {
            let a = log
                .append(d.name(), 1, Timestamp(0), Event::created("ws://127.0.0.1:9/"), &Instance::new())
                .expect("created");
            ack(&format!("ack {} {}\n", d.name(), a.seq));
        }
    }
    let id = Identity::new("peer").ok();
    for n in 0..limit {
        let d = &mut drivers[n % instances.len()];
        let g = d.instance().generation;
        d.now = Timestamp(d.now.0 + 1_000);
        // A lifecycle that never ends: connect, open, drop, back off, reconnect…
        let input = match n / instances.len() % 4 {
            0 => Input::Connect,
            1 => Input::TransportOpened { generation: g, identity: id.clone() },
            2 => Input::TransportClosed {
                initiator: CloseInitiator::Peer,
                generation: g,
                status: Some(StatusCode(428)),
                reason: "drop".into(),
            },
            _ => Input::TimerFired {
                timer: instance_lifecycle::machine::Timer {
                    kind: instance_lifecycle::machine::TimerKind::Reconnect,
                    generation: g,
                },
            },
        };
        let before = d.steps.len();
        d.feed(input);
        if d.steps.len() == before {
            continue;
        }
        let s = d.steps.last().expect("step");
        let event = Event::Transition { from: s.from.clone(), input: s.input.clone(), effects: s.effects.clone() };
        let a = log.append(d.name(), log.next_seq(d.name()), s.at, event, &s.to).expect("append");
        ack(&format!("ack {} {}\n", d.name(), a.seq));
    }
}

fn check(dir: &Path, acked: &BTreeMap<String, u64>) {
    let log = Log::open_existing(dir, LogConfig::default()).expect("reopen after the crash must not fail");
    let report = log.verify(&policy());
    assert!(report.is_clean(), "{:#?}", report.findings);
    for (instance, &seq) in acked {
        let n = name(instance);
        let history = log.history(&n).expect("history");
        assert!(history.len() as u64 >= seq, "{instance}: acknowledged seq {seq} but the log has {}", history.len());
    }
    log.recover(RecoveryOptions::default()).expect("recovery after the crash");
}

/// In a child (env set): write until killed. Otherwise: a bounded in-process run.
#[test]
fn crash_writer() {
    if let Ok(spec) = std::env::var(WRITER_ENV) {
        let (name, dir) = spec.split_once(':').expect("mode:dir");
        let (durability, writers) = mode(name);
        write_concurrently(Path::new(dir), durability, writers);
        return;
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let mut out = Vec::new();
    write_fleet(dir.path(), Durability::GroupCommit, 400, &mut out);
    check(dir.path(), &parse_acks(&String::from_utf8_lossy(&out)));
}

fn parse_acks(text: &str) -> BTreeMap<String, u64> {
    let mut acked = BTreeMap::new();
    for line in text.lines() {
        let mut parts = line.split_whitespace();
        if let (Some("ack"), Some(instance), Some(seq)) = (parts.next(), parts.next(), parts.next())
            && let Ok(seq) = seq.parse::<u64>()
        {
            let e = acked.entry(instance.to_owned()).or_insert(0);
            *e = (*e).max(seq);
        }
    }
    acked
}

/// Runs the writer of `mode` on `dir` in a child process for `run_for`,
/// kills it with SIGKILL, and returns what it printed (its acknowledgements).
fn kill_writer(mode: &str, dir: &Path, run_for: Duration) -> String {
    let exe = std::env::current_exe().expect("test binary");
    let mut child = Command::new(&exe)
        .args(["--exact", "crash::crash_writer", "--nocapture", "--test-threads=1"])
        .env(WRITER_ENV, format!("{mode}:{}", dir.display()))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn writer");
    let stdout = child.stdout.take().expect("piped stdout");
    let reader = std::thread::spawn(move || {
        let mut lines = String::new();
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            lines.push_str(&line);
            lines.push('\n');
        }
        lines
    });
    let start = Instant::now();
    while start.elapsed() < run_for {
        if let Ok(Some(status)) = child.try_wait() {
            panic!("writer exited early with {status}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    child.kill().expect("SIGKILL");
    child.wait().expect("reap");
    reader.join().expect("reader")
}

/// Several rounds per mode that promises process-crash safety: kill at a
/// random moment, reopen, check, and go on writing into the same log.
#[test]
fn sigkill_loses_no_acknowledged_append() {
    let mut seed = 0x9e37_79b9_u64 ^ u64::from(std::process::id());
    for mode in ["group", "group16", "strict"] {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut acked = BTreeMap::new();
        for round in 0..3 {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            let run_for = Duration::from_millis(150 + (seed >> 33) % 450);
            let text = kill_writer(mode, dir.path(), run_for);
            for (k, v) in parse_acks(&text) {
                let e = acked.entry(k).or_insert(0);
                *e = std::cmp::max(*e, v);
            }
            assert!(!acked.is_empty(), "{mode} round {round}: the writer acknowledged nothing in {run_for:?}");
            check(dir.path(), &acked);
        }
    }
}

/// `Buffered` promises less (a crash loses what sled had not written out,
/// up to `flush_every`), but never a batch in part: killed at a random
/// moment of appending key by key under sled's periodic flush, the log
/// reopens whole (verification clean, recovery works), keeps what was
/// flushed, and goes on being written.
#[test]
fn sigkill_leaves_a_buffered_log_whole() {
    let mut seed = 0x51_7cc1_b727_u64 ^ u64::from(std::process::id());
    let dir = tempfile::tempdir().expect("temp dir");
    let mut kept = 0;
    for round in 0..3 {
        seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        // Past sled's 500 ms flush more than once (a loaded machine starts
        // the child slowly), killed at a random point of a later one.
        let run_for = Duration::from_millis(1_200 + (seed >> 33) % 600);
        let text = kill_writer("buffered", dir.path(), run_for);
        assert!(!parse_acks(&text).is_empty(), "round {round}: the writer appended nothing in {run_for:?}");
        check(dir.path(), &BTreeMap::new());
        let log = Log::open_existing(dir.path(), LogConfig::default()).expect("reopen");
        let records = log.records().count();
        assert!(
            records > kept,
            "round {round}: {records} records after the crash, {kept} before: sled's flush kept none"
        );
        kept = records;
    }
}
