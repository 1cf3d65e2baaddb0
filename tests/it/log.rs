//! The event log: R8 and R11 as properties over fleets of random runs, typed
//! errors for every kind of bad log, verification findings, retention.

use std::path::Path;

use instance_lifecycle::log::{
    Digest, Durability, Event, Finding, InstanceSpec, Log, LogConfig, LogError, RecoveryMode, RecoveryOptions,
    Retention,
};
use instance_lifecycle::machine::{
    self, CloseInitiator, Generation, Input, Instance, InstanceName, Policy, Preset, State, Timestamp,
};
use instance_lifecycle::testing::{self, Driver, append_to_log, strategy};
use proptest::prelude::*;

use crate::support::name;

/// `n` rounds of connect → open → logout → logout confirmed → closed.
fn open_and_log_out(d: &mut Driver, n: usize) {
    for _ in 0..n {
        d.feed(Input::Connect);
        let g = d.instance().generation;
        d.feed(Input::TransportOpened { generation: g, identity: machine::Identity::new("peer").ok() });
        d.feed(Input::Logout);
        d.feed(Input::LogoutConfirmed { generation: g });
        d.feed(Input::CloseFinished { generation: g });
    }
}

/// A delete, with its cleanup done.
fn delete(d: &mut Driver) {
    d.feed(Input::Delete);
    d.feed(Input::CleanupFinished { steps: vec![] });
}

/// Appends the driver's steps as records from `seq` on, all at `at`;
/// returns the sequence number of the last.
fn append_steps(log: &Log, d: &Driver, seq: u64, at: Timestamp) -> u64 {
    for (i, s) in d.steps.iter().enumerate() {
        let event = Event::Transition { from: s.from.clone(), input: s.input.clone(), effects: s.effects.clone() };
        log.append(d.name(), seq + i as u64, at, event, &s.to).expect("append");
    }
    seq + d.steps.len() as u64 - 1
}

const FLEET: usize = 5;

fn buffered() -> LogConfig {
    LogConfig { durability: Durability::Buffered, ..LogConfig::default() }
}

/// Runs a random fleet: each op drives one instance; every transition is
/// appended to `log` as it happens (so global order interleaves instances).
fn run_fleet(log: &Log, policy: &Policy, ops: &[(usize, Input, u64)]) -> Vec<Driver> {
    let mut drivers: Vec<Driver> =
        (0..FLEET).map(|i| Driver::new(name(&format!("inst-{i}")), policy.clone())).collect();
    for d in &drivers {
        log.append(d.name(), 1, Timestamp(0), Event::created("ws://127.0.0.1:9/"), &Instance::new())
            .expect("append created");
    }
    for (i, input, dt) in ops {
        let d = &mut drivers[*i];
        d.now = Timestamp(d.now.0 + dt);
        let input = testing::retarget(input, d.instance().generation);
        let before = d.steps.len();
        d.feed(input);
        if d.steps.len() > before {
            let s = d.steps.last().expect("a step was recorded");
            let event = Event::Transition { from: s.from.clone(), input: s.input.clone(), effects: s.effects.clone() };
            let seq = log.next_seq(d.name());
            log.append(d.name(), seq, s.at, event, &s.to).expect("append transition");
        }
    }
    drivers
}

fn fleet_ops() -> impl Strategy<Value = Vec<(usize, Input, u64)>> {
    prop::collection::vec((0..FLEET, strategy::input(Generation(1)), 0u64..90_000), 1..120)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    /// R8: every transition has exactly one record, sequence numbers have no
    /// gaps, records chain, replay reproduces the states — across a reopen.
    #[test]
    fn r8_log_is_the_truth(policy in strategy::policy(), ops in fleet_ops()) {
        let dir = tempfile::tempdir().expect("temp dir");
        let drivers = {
            let log = Log::open(dir.path(), buffered()).expect("open");
            run_fleet(&log, &policy, &ops)
        };
        let log = Log::open_existing(dir.path(), buffered()).expect("reopen");
        let mut total = 0;
        for d in &drivers {
            let history = log.history(d.name()).expect("history");
            prop_assert_eq!(history.len(), d.steps.len() + 1, "one record per transition plus created");
            for (i, r) in history.iter().enumerate() {
                prop_assert_eq!(r.seq, i as u64 + 1);
            }
            for (r, s) in history[1..].iter().zip(&d.steps) {
                prop_assert_eq!(&r.to, &s.to);
                prop_assert_eq!(&r.event, &Event::Transition { from: s.from.clone(), input: s.input.clone(), effects: s.effects.clone() });
            }
            total += history.len();
        }
        let globals: Vec<u64> = log.records().map(|r| r.expect("record").global).collect();
        prop_assert_eq!(globals.len(), total);
        prop_assert!(globals.windows(2).all(|w| w[0] < w[1]), "global order");
        let report = log.verify(&policy);
        prop_assert!(report.is_clean(), "{:#?}", report.findings);
        prop_assert_eq!(report.records as usize, total);
    }

    /// R11: reopening restores every instance to its last recorded state, by
    /// cache and by replay alike; after `Recovered`, nothing removed comes
    /// back, closed ones stay closed, and no instance is assumed connected.
    #[test]
    fn r11_recovery_restores_last_state(policy in strategy::policy(), ops in fleet_ops()) {
        let dir = tempfile::tempdir().expect("temp dir");
        let drivers = {
            let log = Log::open(dir.path(), buffered()).expect("open");
            run_fleet(&log, &policy, &ops)
        };
        let log = Log::open_existing(dir.path(), buffered()).expect("reopen");
        for mode in [RecoveryMode::Fast, RecoveryMode::Replay] {
            let recovery = log.recover(RecoveryOptions { mode, quarantine: false }).expect("recover");
            prop_assert!(recovery.notes.is_empty(), "{:?}", recovery.notes);
            for d in &drivers {
                prop_assert_eq!(&recovery.instances[d.name()].instance, d.instance(), "{:?}", mode);
            }
        }
        // What the engine does at start-up: feed `Recovered` through each driver, recorded in the log.
        let recovery = log.recover(RecoveryOptions::default()).expect("recover");
        let mut resumed = Vec::new();
        for (n, r) in &recovery.instances {
            if matches!(r.instance.state, State::Closed { .. } | State::Removed { .. }) {
                continue;
            }
            let mut restored = machine::Driver::restored(n.clone(), r.instance.clone(), r.seq);
            let fed = restored
                .feed_now(&policy, Input::Recovered, Timestamp(10_000_000), |p| log.append_pending(n, p).map(|a| a.seq))
                .expect("resume");
            if matches!(fed, machine::Fed::Moved(_)) {
                resumed.push((n.clone(), restored.instance().clone()));
            }
        }
        for d in &drivers {
            let recovered = &recovery.instances[d.name()].instance;
            let now = resumed.iter().find(|(n, _)| n == d.name()).map_or(recovered, |(_, i)| i);
            let was_resting = matches!(d.instance().state, State::Closed { .. } | State::Removed { .. });
            prop_assert_eq!(was_resting, !resumed.iter().any(|(n, _)| n == d.name()), "{}", d.instance().state);
            if was_resting {
                prop_assert_eq!(now, d.instance(), "resting instances are untouched");
            } else {
                prop_assert!(!matches!(now.state, State::Open { .. } | State::Zombie { .. }), "assumed alive: {}", now.state);
                let last = log.history(d.name()).expect("history").pop().expect("a record");
                prop_assert!(matches!(last.event, Event::Transition { input: Input::Recovered, .. }), "the decision is logged");
            }
        }
        prop_assert!(log.verify(&policy).is_clean());
    }
}

#[test]
fn append_with_the_wrong_sequence_is_a_conflict_not_a_fork() {
    let log = Log::in_memory().expect("log");
    let n = name("acme");
    log.append(&n, 1, Timestamp(0), Event::created("ws://127.0.0.1:9/"), &Instance::new()).expect("created");
    let err = log
        .append(&n, 1, Timestamp(1), Event::created("ws://127.0.0.1:9/"), &Instance::new())
        .expect_err("seq 1 again");
    assert!(matches!(err, LogError::SequenceConflict { expected: 1, actual: 2, .. }), "{err}");
    let err =
        log.append(&n, 5, Timestamp(1), Event::created("ws://127.0.0.1:9/"), &Instance::new()).expect_err("seq 5");
    assert!(matches!(err, LogError::SequenceConflict { expected: 5, actual: 2, .. }), "{err}");
    assert_eq!(log.history(&n).expect("history").len(), 1, "nothing was written");
}

#[test]
fn every_durability_mode_appends_and_reopens() {
    for durability in [Durability::Buffered, Durability::GroupCommit, Durability::Strict] {
        let dir = tempfile::tempdir().expect("temp dir");
        let config = LogConfig { durability, ..LogConfig::default() };
        {
            let log = Log::open(dir.path(), config.clone()).expect("open");
            let mut d = Driver::new(name("acme"), Policy::preset(Preset::Whatsapp));
            d.feed(Input::Connect);
            d.feed(Input::TransportOpened { generation: Generation(1), identity: None });
            d.feed(Input::PairingCode { generation: Generation(1) });
            append_to_log(&log, &d).expect("append");
        }
        let log = Log::open_existing(dir.path(), config).expect("reopen");
        assert_eq!(log.history(&name("acme")).expect("history").len(), 3, "{durability:?}");
    }
}

#[tokio::test]
async fn async_appends_wait_for_group_commit() {
    let log = Log::temporary(LogConfig::default()).expect("log");
    let mut tasks = Vec::new();
    for i in 0..20 {
        let log = log.clone();
        tasks.push(tokio::spawn(async move {
            let n = name(&format!("t{i}"));
            log.append_async(&n, 1, Timestamp(0), Event::created("ws://127.0.0.1:9/"), &Instance::new()).await
        }));
    }
    for t in tasks {
        t.await.expect("task").expect("append");
    }
    assert_eq!(log.names().expect("names").len(), 20);
}

fn write_sample_log(dir: &Path) -> Policy {
    let policy = Policy::preset(Preset::Whatsapp);
    let log = Log::open(dir, buffered()).expect("open");
    for i in 0..3 {
        let mut d = Driver::new(name(&format!("i{i}")), policy.clone());
        d.feed(Input::Connect);
        d.feed(Input::TransportOpened {
            generation: Generation(1),
            identity: instance_lifecycle::machine::Identity::new("peer").ok(),
        });
        d.feed(Input::HeartbeatMissed { generation: Generation(1) });
        append_to_log(&log, &d).expect("append");
    }
    log.set_policy(&policy).expect("policy");
    policy
}

/// Rewrites one stored value with sled directly, as damage or another program would.
/// Opens the log's sled database directly. sled releases its lock a moment
/// after the last handle drops (its I/O threads finish first): retry for a
/// bounded time, as `Log::open` does.
fn sled_open(dir: &Path) -> sled::Db {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        match sled::open(dir) {
            Err(sled::Error::Io(e)) if e.to_string().contains("could not acquire lock") => {
                assert!(std::time::Instant::now() < deadline, "sled's lock still held after 10 s: {e}");
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            opened => return opened.expect("sled open"),
        }
    }
}

fn tamper(dir: &Path, f: impl FnOnce(&sled::Tree)) {
    let db = sled_open(dir);
    let tree = db.open_tree(instance_lifecycle::log::store::TREE).expect("tree");
    f(&tree);
    db.flush().expect("flush");
}

fn record_key(name: &str, seq: u64) -> Vec<u8> {
    let mut k = vec![b'r'];
    k.extend_from_slice(name.as_bytes());
    k.push(0);
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

#[test]
fn flipped_and_truncated_records_are_typed_errors_naming_instance_and_seq() {
    for damage in ["flip", "truncate"] {
        let dir = tempfile::tempdir().expect("temp dir");
        let policy = write_sample_log(dir.path());
        tamper(dir.path(), |tree| {
            let key = record_key("i1", 2);
            let mut value = tree.get(&key).expect("get").expect("record exists").to_vec();
            if damage == "flip" {
                let mid = value.len() / 2;
                value[mid] ^= 0x5a;
            } else {
                value.truncate(value.len() / 3);
            }
            tree.insert(key, value).expect("insert");
        });
        let log = Log::open_existing(dir.path(), buffered()).expect("the log opens; the damage is in one record");
        let report = log.verify(&policy);
        let named = report.findings.iter().any(|f| {
            matches!(f, Finding::Corrupt { error: LogError::Corrupt { instance: Some(i), seq: Some(2), .. } } if i == "i1")
        });
        assert!(named, "{damage}: {:#?}", report.findings);
        let err = log
            .recover(RecoveryOptions { mode: RecoveryMode::Replay, quarantine: false })
            .expect_err("recovery fails loudly");
        assert!(err.to_string().contains("\"i1\"") && err.to_string().contains("Some(2)"), "{err}");
        let recovery =
            log.recover(RecoveryOptions { mode: RecoveryMode::Replay, quarantine: true }).expect("quarantine");
        assert_eq!(recovery.quarantined.len(), 1);
        assert_eq!(recovery.quarantined[0].0.as_str(), "i1");
        assert_eq!(recovery.instances.len(), 2, "the rest come up");
    }
}

/// Found by the `log_open_verify` fuzz target: a log holding the largest
/// sequence numbers (global or per instance) opened with an overflow panic.
/// It opens, verification reports the damage, and appends are refused with
/// a typed error instead of wrapping around.
#[test]
fn a_log_at_the_largest_sequence_numbers_refuses_appends_without_a_panic() {
    let dir = tempfile::tempdir().expect("temp dir");
    let policy = write_sample_log(dir.path());
    tamper(dir.path(), |tree| {
        let first = tree.get(record_key("i1", 1)).expect("get").expect("record exists");
        tree.insert(record_key("i1", u64::MAX), first).expect("insert");
        let mut global = vec![b'g'];
        global.extend_from_slice(&u64::MAX.to_be_bytes());
        tree.insert(global, b"i1\0\xff\xff\xff\xff\xff\xff\xff\xff".to_vec()).expect("insert");
    });
    let log = Log::open_existing(dir.path(), buffered()).expect("the log opens");
    let report = log.verify(&policy);
    assert!(!report.is_clean(), "the forged records are findings");
    let mismatch = report.findings.iter().any(|f| {
        matches!(f, Finding::Corrupt { error: LogError::Corrupt { instance: Some(i), seq: Some(u64::MAX), .. } } if i == "i1")
    });
    assert!(mismatch, "{:#?}", report.findings);
    for n in ["i1", "i0", "new"] {
        let name = name(n);
        let err = log
            .append(&name, log.next_seq(&name), Timestamp(1), Event::created("ws://127.0.0.1:9/"), &Instance::new())
            .expect_err("no sequence number is left");
        assert!(matches!(err, LogError::Exhausted { .. }), "{n}: {err}");
    }
    let recovered = log.recover(RecoveryOptions { mode: RecoveryMode::Fast, quarantine: true });
    assert!(recovered.is_ok(), "{:?}", recovered.err());
}

#[test]
fn a_wrong_latest_state_entry_is_noted_and_replayed() {
    let dir = tempfile::tempdir().expect("temp dir");
    write_sample_log(dir.path());
    tamper(dir.path(), |tree| {
        tree.insert(b"li0", b"garbage".to_vec()).expect("insert");
        tree.remove(b"li2").expect("remove");
    });
    let log = Log::open_existing(dir.path(), buffered()).expect("open");
    let recovery = log.recover(RecoveryOptions::default()).expect("recover");
    assert_eq!(recovery.notes.len(), 2, "{:?}", recovery.notes);
    for i in 0..3 {
        assert!(matches!(recovery.instances[&name(&format!("i{i}"))].instance.state, State::Zombie { .. }));
    }
}

#[test]
fn foreign_empty_file_and_newer_logs_are_typed_errors() {
    // Another program's sled database.
    let dir = tempfile::tempdir().expect("temp dir");
    {
        let db = sled_open(dir.path());
        db.open_tree("users").expect("tree").insert("alice", "x").expect("insert");
        db.flush().expect("flush");
    }
    let err = Log::open(dir.path(), buffered()).err().expect("foreign");
    assert!(matches!(err, LogError::Foreign { .. }), "{err}");
    // An empty directory is not a log to read...
    let empty = tempfile::tempdir().expect("temp dir");
    let err = Log::open_existing(empty.path(), buffered()).err().expect("empty");
    assert!(matches!(err, LogError::NotALog { .. }), "{err}");
    assert!(matches!(Log::open_copy(empty.path()).err(), Some(LogError::NotALog { .. })));
    // ...but a fine place to start one.
    assert!(Log::open(empty.path(), buffered()).is_ok());
    // A path that is a file.
    let file = tempfile::NamedTempFile::new().expect("temp file");
    for err in [Log::open(file.path(), buffered()).err(), Log::open_existing(file.path(), buffered()).err()] {
        assert!(matches!(err, Some(LogError::NotADirectory { .. })), "{err:?}");
    }
    // A log from a newer format.
    let newer = tempfile::tempdir().expect("temp dir");
    write_sample_log(newer.path());
    tamper(newer.path(), |tree| {
        tree.insert(b"mformat", b"instance-lifecycle log v9".to_vec()).expect("insert");
    });
    let err = Log::open_existing(newer.path(), buffered()).err().expect("newer");
    assert!(matches!(err, LogError::NewerFormat { .. }), "{err}");
    assert!(err.to_string().contains("upgrade"), "{err}");
}

#[test]
fn a_log_in_use_is_reported_and_can_still_be_read_as_a_copy() {
    let dir = tempfile::tempdir().expect("temp dir");
    write_sample_log(dir.path());
    let running = Log::open_existing(dir.path(), buffered()).expect("the engine's handle");
    let err = Log::open_existing(dir.path(), buffered()).err().expect("second writer");
    assert!(matches!(err, LogError::InUse { .. }), "{err}");
    let (copy, in_use) = Log::open_copy(dir.path()).expect("copy");
    assert!(in_use);
    assert_eq!(copy.names().expect("names").len(), 3);
    drop(running);
    let (_, in_use) = Log::open_copy(dir.path()).expect("copy");
    assert!(!in_use);
}

#[test]
fn damaged_database_files_never_panic() {
    let dir = tempfile::tempdir().expect("temp dir");
    let policy = write_sample_log(dir.path());
    let db_file = std::fs::read(dir.path().join("db")).expect("db file");
    for (i, offset) in [0usize, 7, 64, 512, db_file.len() / 2, db_file.len().saturating_sub(9)].into_iter().enumerate()
    {
        let copy = tempfile::tempdir().expect("temp dir");
        for f in ["db", "conf"] {
            std::fs::copy(dir.path().join(f), copy.path().join(f)).expect("copy");
        }
        let mut bytes = db_file.clone();
        if let Some(b) = bytes.get_mut(offset) {
            *b ^= 0xff;
        }
        if i % 2 == 1 {
            bytes.truncate(offset.max(1));
        }
        std::fs::write(copy.path().join("db"), &bytes).expect("write");
        // Either a typed error, or a log whose verification reports rather than panics.
        if let Ok(log) = Log::open_existing(copy.path(), buffered()) {
            let _report = log.verify(&policy);
            let _ = log.recover(RecoveryOptions { mode: RecoveryMode::Replay, quarantine: true });
        }
    }
}

#[test]
fn verify_names_the_first_record_where_new_rules_decide_differently() {
    let dir = tempfile::tempdir().expect("temp dir");
    let old = Policy::preset(Preset::Evolution);
    {
        let log = Log::open(dir.path(), buffered()).expect("open");
        let mut d = Driver::new(name("acme"), old.clone());
        d.feed(Input::Connect);
        d.feed(Input::TransportOpened {
            generation: Generation(1),
            identity: instance_lifecycle::machine::Identity::new("peer").ok(),
        });
        d.feed(Input::TransportClosed {
            initiator: CloseInitiator::Peer,
            generation: Generation(1),
            status: Some(instance_lifecycle::machine::StatusCode(408)),
            reason: "blip".into(),
        });
        append_to_log(&log, &d).expect("append");
    }
    let log = Log::open_existing(dir.path(), buffered()).expect("open");
    assert!(log.verify(&old).is_clean());
    let report = log.verify(&Policy::preset(Preset::Whatsapp));
    let Some(Finding::Divergence { instance, seq, recorded, recomputed, .. }) = report.first_divergence() else {
        panic!("no divergence: {:#?}", report.findings)
    };
    assert_eq!((instance.as_str(), *seq), ("acme", 4), "the 408 after open");
    assert!(recorded.contains("Closed"), "{recorded}");
    assert!(recomputed.contains("Connecting"), "{recomputed}");
}

#[test]
fn compaction_keeps_a_snapshot_and_the_tail_and_purges_removed_instances() {
    let log = Log::in_memory().expect("log");
    let policy = Policy::preset(Preset::Whatsapp);
    let mut d = Driver::new(name("busy"), policy.clone());
    open_and_log_out(&mut d, 20);
    append_to_log(&log, &d).expect("append");
    let mut gone = Driver::new(name("gone"), policy.clone());
    gone.feed(Input::Delete);
    gone.feed(Input::CleanupFinished { steps: vec![] });
    append_to_log(&log, &gone).expect("append");

    let retention = Retention { keep_records: 5, removed_after: std::time::Duration::from_secs(3600) };
    let report = log.compact(Timestamp(1_000), &retention).expect("compact");
    assert_eq!((report.snapshotted, report.purged.len()), (1, 0), "removed too recently to purge");
    let history = log.history(&name("busy")).expect("history");
    assert_eq!(history.len(), 6);
    assert!(matches!(history[0].event, Event::Snapshot { .. }));
    assert_eq!(&history.last().expect("tail").to, d.instance());
    assert!(log.verify(&policy).is_clean(), "{:#?}", log.verify(&policy).findings);

    let report = log.compact(Timestamp(3_600_000 + 1_000), &retention).expect("compact");
    assert_eq!(report.purged.len(), 1);
    assert_eq!(log.names().expect("names"), vec![name("busy")]);
    // The name can be created again, as a new instance from seq 1.
    assert_eq!(log.next_seq(&name("gone")), 1);
    log.append(&name("gone"), 1, Timestamp(5_000_000), Event::created("ws://127.0.0.1:9/"), &Instance::new())
        .expect("re-create");
    let recovery = log.recover(RecoveryOptions::default()).expect("recover");
    assert_eq!(&recovery.instances[&name("busy")].instance, d.instance());
    assert!(log.verify(&policy).is_clean());
}

/// A name deleted and created again, over and over: each removed
/// incarnation goes `removed_after` its removal, as a removed instance does,
/// and the current one's first record becomes the snapshot its chain starts
/// from (without this, a reused name kept every incarnation up to
/// `keep_records`: the crash-loop benchmark's log grew by 8 MB a round).
#[test]
fn compaction_drops_removed_incarnations_of_a_name_created_again() {
    let log = Log::in_memory().expect("log");
    let policy = Policy::preset(Preset::Whatsapp);
    let n = name("reused");
    let mut seq = 0;
    for life in 0..3u64 {
        let created = Timestamp(life * 10_000);
        seq += 1;
        log.append(&n, seq, created, Event::created("ws://127.0.0.1:9/"), &Instance::new()).expect("create");
        if life < 2 {
            let mut d = Driver::new(n.clone(), policy.clone());
            delete(&mut d);
            seq = append_steps(&log, &d, seq + 1, Timestamp(created.0 + 1_000));
        }
    }
    let retention = Retention { keep_records: 1_000, removed_after: std::time::Duration::from_secs(5) };
    let before = log.history(&n).expect("history");
    // At 12 s only the first incarnation was removed 5 s ago or more (at 1 s; the second at 11 s).
    let report = log.compact(Timestamp(12_000), &retention).expect("compact");
    assert_eq!((report.snapshotted, report.purged.len()), (1, 0));
    let history = log.history(&n).expect("history");
    assert_eq!(history.len(), before.len() - before.iter().position(|r| r.at.0 == 10_000).expect("second life"));
    assert!(matches!(history[0].event, Event::Snapshot { .. }), "{:?}", history[0].event);
    assert_eq!(history[0].at, Timestamp(10_000));
    assert!(log.verify(&policy).is_clean(), "{:#?}", log.verify(&policy).findings);
    // At 20 s the second incarnation goes too; the third, alive, stays.
    log.compact(Timestamp(20_000), &retention).expect("compact");
    let history = log.history(&n).expect("history");
    assert_eq!(history.len(), 1);
    assert_eq!((history[0].at, history[0].to.clone()), (Timestamp(20_000), Instance::new()));
    assert!(matches!(history[0].event, Event::Snapshot { .. }));
    assert!(log.verify(&policy).is_clean(), "{:#?}", log.verify(&policy).findings);
    let recovery = log.recover(RecoveryOptions::default()).expect("recover");
    assert_eq!(recovery.instances[&n].instance, Instance::new());
    // The name goes on from where it was.
    assert_eq!(log.next_seq(&n), seq + 1);
}

/// A token's digest committed with a `Created` record is listed beside the
/// spec, survives its instance's snapshot, is replaced (or cleared) when the
/// name is created again, and goes when the instance is purged.
#[test]
fn a_created_records_token_lives_and_goes_with_its_instance() {
    let log = Log::in_memory().expect("log");
    let policy = Policy::preset(Preset::Whatsapp);
    let spec = || InstanceSpec { url: "ws://127.0.0.1:9/".into() };
    let (a, b) = (name("a"), name("b"));
    let (ta, tb) = (Digest::of(b"token-a"), Digest::of(b"token-b"));
    log.append(&a, 1, Timestamp(0), Event::Created { spec: spec(), token: Some(ta) }, &Instance::new()).expect("a");
    log.append(&b, 1, Timestamp(0), Event::Created { spec: spec(), token: Some(tb) }, &Instance::new()).expect("b");
    assert_eq!(log.tokens().expect("tokens"), vec![(a.clone(), ta), (b.clone(), tb)]);
    // b is deleted and purged; a gets a long history and is snapshotted.
    let mut d = Driver::new(b.clone(), policy.clone());
    delete(&mut d);
    append_steps(&log, &d, 2, Timestamp(1));
    let mut d = Driver::new(a.clone(), policy.clone());
    open_and_log_out(&mut d, 3);
    assert!(d.steps.len() > 3);
    append_steps(&log, &d, 2, Timestamp(1));
    let retention = Retention { keep_records: 2, removed_after: std::time::Duration::from_secs(1) };
    let report = log.compact(Timestamp(10_000), &retention).expect("compact");
    assert_eq!((report.snapshotted, report.purged.clone()), (1, vec![b.clone()]));
    assert_eq!(log.tokens().expect("tokens"), vec![(a.clone(), ta)], "b's token went with b");
    let first = log.history(&a).expect("history").remove(0);
    assert_eq!(first.event.origin().map(|(_, t)| t), Some(Some(ta)), "the snapshot carries the token");
    assert!(log.verify(&policy).is_clean(), "{:#?}", log.verify(&policy).findings);
    // b created again without a token has none; with one, the new one.
    log.append(&b, 1, Timestamp(20_000), Event::created("ws://127.0.0.1:9/"), &Instance::new()).expect("b again");
    assert_eq!(log.tokens().expect("tokens"), vec![(a.clone(), ta)]);
    let mut d = Driver::new(b.clone(), policy.clone());
    delete(&mut d);
    append_steps(&log, &d, 2, Timestamp(20_001));
    let again = Digest::of(b"token-b2");
    let seq = log.next_seq(&b);
    log.append(&b, seq, Timestamp(20_002), Event::Created { spec: spec(), token: Some(again) }, &Instance::new())
        .expect("b a third time");
    assert_eq!(log.tokens().expect("tokens"), vec![(a, ta), (b, again)]);
}

/// sled keeps the space of deleted keys for itself: after a churn of
/// instances its files hold far more than the log keeps. A writer that opens
/// such a log rewrites them (past `rewrite_above` and 8× what the last
/// compaction counted), and the log is the same log after it.
#[test]
fn sled_files_far_larger_than_the_log_are_rewritten_when_a_writer_opens_it() {
    use std::os::unix::fs::MetadataExt;
    let dir = tempfile::tempdir().expect("dir");
    let config = LogConfig { rewrite_above: 1 << 20, ..buffered() };
    let policy = Policy::preset(Preset::Whatsapp);
    let (before, kept) = {
        let log = Log::open(dir.path(), config.clone()).expect("open");
        for i in 0..150 {
            let mut d = Driver::new(name(&format!("churn-{i:03}")), policy.clone());
            open_and_log_out(&mut d, 10);
            if i >= 10 {
                delete(&mut d);
            }
            append_to_log(&log, &d).expect("append");
        }
        log.sync().expect("sync");
        let retention = Retention { keep_records: 5, removed_after: std::time::Duration::ZERO };
        let report = log.compact(Timestamp(u64::MAX / 2), &retention).expect("compact");
        assert_eq!(report.purged.len(), 140);
        log.sync().expect("sync");
        let live = log.live_bytes().expect("live").expect("counted by the compaction");
        let size = log.size_on_disk().expect("size");
        assert!(size > 8 * live && size > 1 << 20, "the test needs a bloated store: {size} bytes for {live}");
        let kept = log.recover(RecoveryOptions::default()).expect("recover").instances;
        (size, kept)
    };
    let db = |d: &Path| std::fs::metadata(d.join("db")).expect("db").ino();
    let old = db(dir.path());
    let log = Log::open(dir.path(), config).expect("reopen");
    assert_ne!(db(dir.path()), old, "sled's files were rewritten");
    let after = log.size_on_disk().expect("size");
    assert!(after * 4 < before, "{after} bytes after, {before} before");
    assert_eq!(log.recover(RecoveryOptions::default()).expect("recover").instances, kept);
    assert!(log.verify(&policy).is_clean(), "{:#?}", log.verify(&policy).findings);
    assert!(matches!(log.head_check(), instance_lifecycle::log::HeadCheck::Intact { .. }), "{:?}", log.head_check());
    // And it takes appends on from where it was.
    let fresh = name("fresh");
    log.append(&fresh, 1, Timestamp(u64::MAX / 2), Event::created("ws://127.0.0.1:9/"), &Instance::new())
        .expect("append after the rewrite");
    assert!(log.verify(&policy).is_clean());
}

#[test]
fn a_name_can_be_created_again_after_removal_as_a_new_instance() {
    let log = Log::in_memory().expect("log");
    let policy = Policy::preset(Preset::Whatsapp);
    let n: InstanceName = name("reused");
    let mut d = Driver::new(n.clone(), policy.clone());
    d.feed(Input::Delete);
    d.feed(Input::CleanupFinished { steps: vec![] });
    let last = append_to_log(&log, &d).expect("first incarnation");
    log.append(&n, last + 1, Timestamp(9), Event::created("ws://127.0.0.1:9/"), &Instance::new())
        .expect("second incarnation");
    assert!(log.verify(&policy).is_clean());
    let recovery = log.recover(RecoveryOptions::default()).expect("recover");
    assert_eq!(recovery.instances[&n].instance, Instance::new());
}

/// A record replaced by a valid one (its checksum right, its content another
/// history's) is caught by the chain: the next record's `prev` no longer
/// matches, named by instance and sequence number.
#[test]
fn a_valid_record_swapped_in_breaks_the_chain() {
    use instance_lifecycle::log::record::{decode_record, encode_record};
    let dir = tempfile::tempdir().expect("temp dir");
    let policy = write_sample_log(dir.path());
    tamper(dir.path(), |tree| {
        let key = record_key("i1", 2);
        let value = tree.get(&key).expect("get").expect("record exists").to_vec();
        let mut record = decode_record(&value).expect("a valid record");
        record.at = Timestamp(record.at.0 + 1);
        tree.insert(key, encode_record(&record)).expect("insert");
    });
    let (log, _) = Log::open_copy(dir.path()).expect("copy");
    let report = log.verify(&policy);
    let broken: Vec<_> = report
        .findings
        .iter()
        .filter_map(|f| match f {
            Finding::BrokenLink { instance, seq, expected, found } => {
                Some((instance.as_str(), *seq, expected != found))
            }
            _ => None,
        })
        .collect();
    assert_eq!(broken, vec![("i1", 3, true)], "{:#?}", report.findings);
    let text = report.findings.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n");
    assert!(text.contains("i1#3") && text.contains("broken chain"), "{text}");
    // The other instances chain as they should.
    assert!(report.records >= 9);
}

/// Every finding and note says what is wrong and where, in words.
#[test]
fn every_finding_and_note_reads_as_a_sentence() {
    use instance_lifecycle::log::{AcceptedLoss, Digest, HeadCheck, Note};
    let i = name("acme");
    let d = |b: &[u8]| Digest::of(b);
    let (short_a, short_b) = (d(b"a").short(), d(b"b").short());
    let findings = [
        (
            Finding::Head { check: HeadCheck::Lost { head: 9, tip: 4 } },
            vec!["head", "5 acknowledged", "up to 9", "ends at 4"],
        ),
        (
            Finding::BrokenLink { instance: i.clone(), seq: 3, expected: d(b"a"), found: d(b"b") },
            vec!["acme#3", "broken chain", &short_a, &short_b],
        ),
        (Finding::BadStart { instance: i.clone(), seq: 2, event: "connect" }, vec!["acme", "seq 2", "connect"]),
        (Finding::Gap { instance: i.clone(), expected: 3, found: 5 }, vec!["acme", "gap", "3", "5"]),
        (
            Finding::BrokenChain {
                instance: i.clone(),
                seq: 4,
                previous_to: Box::new(Instance::new()),
                from: Box::new(Instance::new()),
            },
            vec!["acme#4", "broken chain", "Closed"],
        ),
        (Finding::Misplaced { instance: i.clone(), seq: 6, event: "snapshot" }, vec!["acme#6", "snapshot", "middle"]),
        (
            Finding::Divergence {
                instance: i.clone(),
                seq: 7,
                global: 70,
                input: "Connect".into(),
                recorded: "→ A".into(),
                recomputed: "→ B".into(),
                rules: instance_lifecycle::machine::RulesVersion::V2,
            },
            vec!["acme#7", "global 70", "Connect", "→ A", "→ B", "rules v2"],
        ),
        (Finding::GlobalOrder { instance: i.clone(), seq: 8 }, vec!["acme#8", "global"]),
        (
            Finding::UnknownRules { version: instance_lifecycle::machine::RulesVersion(9), from: 12 },
            vec!["global 12", "rules v9", "does not know"],
        ),
        (
            Finding::LatestMismatch { instance: i.clone(), detail: "is missing".into() },
            vec!["acme", "latest-state", "is missing"],
        ),
        (Finding::Index { detail: "2 records not indexed".into() }, vec!["global index", "2 records"]),
        (Finding::Anchor { expected: 12, detail: "ends at 10".into() }, vec!["expected head 12", "ends at 10"]),
    ];
    for (finding, words) in findings {
        let text = finding.to_string();
        for w in words {
            assert!(text.contains(w), "{text:?} lacks {w:?}");
        }
    }
    let loss = AcceptedLoss { at: Timestamp(0), check: HeadCheck::Missing, resumed_after: 41 };
    let notes = [
        (Note::HeadBehind { check: HeadCheck::Behind { head: 3, tip: 5 } }, vec!["2 record", "4..=5", "not a loss"]),
        (Note::Unchained { records: 17 }, vec!["17 record", "not checked"]),
        (Note::Legacy, vec!["head", "rollback"]),
        (Note::AcceptedLoss(loss), vec!["accepted", "1970-01-01", "missing", "after global 41"]),
    ];
    for (note, words) in notes {
        let text = note.to_string();
        for w in words {
            assert!(text.contains(w), "{text:?} lacks {w:?}");
        }
    }
}

/// Each kind of defect `verify` knows, forged one at a time into a clean log
/// (with sled, as damage or another program would write it), is found as its
/// own finding naming the instance and sequence number — and nothing else is.
#[test]
fn each_defect_is_found_as_what_it_is() {
    use instance_lifecycle::log::record::{decode_record, encode_record};
    type Forge = fn(&sled::Tree);
    type Expect = fn(&Finding) -> bool;
    fn global_key(g: u64) -> Vec<u8> {
        let mut k = vec![b'g'];
        k.extend_from_slice(&g.to_be_bytes());
        k
    }
    fn rewrite(tree: &sled::Tree, name: &str, seq: u64, f: impl FnOnce(&mut instance_lifecycle::log::Record)) {
        let key = record_key(name, seq);
        let mut r = decode_record(&tree.get(&key).expect("get").expect("record")).expect("valid");
        f(&mut r);
        tree.insert(key, encode_record(&r)).expect("insert");
    }
    let cases: Vec<(&str, Forge, Expect)> = vec![
        (
            "a record gone from the middle",
            |t| {
                let r = decode_record(&t.get(record_key("i1", 2)).expect("get").expect("r")).expect("valid");
                t.remove(record_key("i1", 2)).expect("rm");
                t.remove(global_key(r.global)).expect("rm index");
            },
            |f| matches!(f, Finding::Gap { instance, expected: 2, found: 3 } if instance.as_str() == "i1"),
        ),
        (
            "the first record gone",
            |t| {
                let r = decode_record(&t.get(record_key("i1", 1)).expect("get").expect("r")).expect("valid");
                t.remove(record_key("i1", 1)).expect("rm");
                t.remove(global_key(r.global)).expect("rm index");
            },
            |f| matches!(f, Finding::BadStart { instance, seq: 2, .. } if instance.as_str() == "i1"),
        ),
        (
            "a global number going back",
            |t| rewrite(t, "i1", 3, |r| r.global = 1),
            |f| matches!(f, Finding::GlobalOrder { instance, seq: 3 } if instance.as_str() == "i1"),
        ),
        (
            "a created record mid-history",
            |t| rewrite(t, "i1", 3, |r| r.event = Event::created("ws://x/")),
            |f| matches!(f, Finding::Misplaced { instance, seq: 3, event: "created" } if instance.as_str() == "i1"),
        ),
        (
            "a snapshot mid-history",
            |t| {
                rewrite(t, "i1", 3, |r| {
                    r.event = Event::Snapshot { spec: InstanceSpec { url: "ws://x/".into() }, token: None };
                    r.replaced = Some(instance_lifecycle::log::Digest::ZERO);
                })
            },
            |f| matches!(f, Finding::Misplaced { instance, seq: 3, event: "snapshot" } if instance.as_str() == "i1"),
        ),
        (
            "a snapshot without the digest it replaced",
            |t| {
                rewrite(t, "i1", 1, |r| {
                    r.event = Event::Snapshot { spec: InstanceSpec { url: "ws://x/".into() }, token: None };
                })
            },
            |f| matches!(f, Finding::Misplaced { instance, seq: 1, event } if instance.as_str() == "i1" && event.contains("without")),
        ),
        (
            "a replaced digest on a transition",
            |t| rewrite(t, "i1", 2, |r| r.replaced = Some(instance_lifecycle::log::Digest::ZERO)),
            |f| matches!(f, Finding::Misplaced { instance, seq: 2, event } if instance.as_str() == "i1" && event.contains("not a snapshot")),
        ),
        (
            "a created record not in the initial state",
            |t| rewrite(t, "i1", 1, |r| r.to.generation = Generation(9)),
            |f| matches!(f, Finding::Misplaced { instance, seq: 1, event } if instance.as_str() == "i1" && event.contains("non-initial")),
        ),
        (
            "a from-state that is not the previous to-state",
            |t| {
                rewrite(t, "i1", 3, |r| {
                    if let Event::Transition { from, .. } = &mut r.event {
                        from.generation = Generation(7)
                    }
                })
            },
            |f| matches!(f, Finding::BrokenChain { instance, seq: 3, .. } if instance.as_str() == "i1"),
        ),
        (
            "recorded effects the rules do not produce",
            |t| {
                rewrite(t, "i1", 2, |r| {
                    if let Event::Transition { effects, .. } = &mut r.event {
                        assert!(!effects.is_empty(), "connect has effects");
                        effects.clear();
                    }
                })
            },
            |f| matches!(f, Finding::Divergence { instance, seq: 2, .. } if instance.as_str() == "i1"),
        ),
        (
            "a recorded generation the rules do not produce",
            |t| rewrite(t, "i1", 2, |r| r.to.generation = Generation(5)),
            |f| matches!(f, Finding::Divergence { instance, seq: 2, .. } if instance.as_str() == "i1"),
        ),
        (
            "a latest-state entry gone",
            |t| drop(t.remove(b"li1").expect("rm")),
            |f| matches!(f, Finding::LatestMismatch { instance, detail } if instance.as_str() == "i1" && detail.contains("missing")),
        ),
        (
            "a latest-state entry of garbage",
            |t| drop(t.insert(b"li1", b"garbage".to_vec()).expect("insert")),
            |f| matches!(f, Finding::LatestMismatch { instance, detail } if instance.as_str() == "i1" && detail.contains("corrupt")),
        ),
        (
            "a latest-state entry ahead of the last record",
            |t| {
                let last = record_key("i1", 4);
                assert!(t.get(&last).expect("get").is_some(), "i1 has 4 records");
                t.remove(last).expect("rm");
            },
            |f| matches!(f, Finding::LatestMismatch { instance, detail } if instance.as_str() == "i1" && detail.contains("says seq 4")),
        ),
        (
            "a latest-state entry at the right seq with another state",
            |t| rewrite(t, "i1", 4, |r| r.to.generation = Generation(9)),
            |f| matches!(f, Finding::LatestMismatch { instance, detail } if instance.as_str() == "i1" && detail.contains("says seq 4")),
        ),
        (
            "an index entry gone",
            |t| {
                let r = decode_record(&t.get(record_key("i2", 2)).expect("get").expect("r")).expect("valid");
                t.remove(global_key(r.global)).expect("rm");
            },
            |f| matches!(f, Finding::Index { detail } if detail.contains("not indexed")),
        ),
        (
            "an index entry pointing at nothing",
            |t| drop(t.insert(global_key(999), b"i9\0\0\0\0\0\0\0\0\x01".to_vec()).expect("insert")),
            |f| matches!(f, Finding::Index { detail } if detail.contains("point at no record")),
        ),
    ];
    for (what, forge, expected) in cases {
        let dir = tempfile::tempdir().expect("temp dir");
        let policy = write_sample_log(dir.path());
        {
            let (clean, _) = Log::open_copy(dir.path()).expect("copy");
            assert!(clean.verify(&policy).is_clean(), "the sample log is clean");
        }
        tamper(dir.path(), forge);
        let (log, _) = Log::open_copy(dir.path()).expect("copy");
        let report = log.verify(&policy);
        assert!(report.findings.iter().any(expected), "{what}: not found as expected: {:#?}", report.findings);
        assert!(!report.is_clean(), "{what}");
    }
}

/// Policies by time: a log written under one policy and then another
/// verifies clean record by record under the policies it recorded, and
/// shows a divergence under a single one.
#[test]
fn each_record_replays_under_the_policy_it_was_written_under() {
    let log = Log::in_memory().expect("log");
    let (evolution, whatsapp) = (Policy::preset(Preset::Evolution), Policy::preset(Preset::Whatsapp));
    let blip = |g| Input::TransportClosed {
        initiator: CloseInitiator::Peer,
        generation: g,
        status: Some(instance_lifecycle::machine::StatusCode(408)),
        reason: "blip".into(),
    };
    let open =
        |g| Input::TransportOpened { generation: g, identity: instance_lifecycle::machine::Identity::new("p").ok() };
    log.set_policy(&evolution).expect("policy");
    let mut old = Driver::new(name("old"), evolution.clone());
    old.feed(Input::Connect);
    old.feed(open(Generation(1)));
    old.feed(blip(Generation(1)));
    append_to_log(&log, &old).expect("append");
    log.set_policy(&whatsapp).expect("policy");
    log.set_policy(&whatsapp).expect("the same policy again records nothing");
    assert_eq!(log.policies().expect("policies").len(), 2);
    let mut new = Driver::new(name("new"), whatsapp.clone());
    new.feed(Input::Connect);
    new.feed(open(Generation(1)));
    new.feed(blip(Generation(1)));
    append_to_log(&log, &new).expect("append");
    assert_eq!(log.policy().expect("policy"), Some(whatsapp.clone()));
    let recorded = log.verify_recorded(&Policy::default());
    assert!(recorded.is_clean(), "{:#?}", recorded.findings);
    for single in [&evolution, &whatsapp] {
        let report = log.verify(single);
        assert_eq!(report.findings.len(), 1, "{}: {:#?}", single.name, report.findings);
        assert!(matches!(report.first_divergence(), Some(Finding::Divergence { seq: 4, .. })));
    }
}

/// A head kept elsewhere: the log reaches it (nothing to say), or it does
/// not (the log ends before it, or has another record there).
#[test]
fn a_head_kept_elsewhere_is_checked() {
    let log = Log::in_memory().expect("log");
    let policy = Policy::preset(Preset::Whatsapp);
    let mut d = Driver::new(name("a"), policy);
    d.feed(Input::Connect);
    append_to_log(&log, &d).expect("append");
    let (tip, link) = log.tip();
    assert_eq!(tip, 2);
    assert!(log.check_anchor(tip, link).is_none());
    assert!(log.check_anchor(1, log.tip().1).is_some(), "record 1 has another link");
    let ahead = log.check_anchor(5, link).expect("the log ends before");
    assert!(ahead.to_string().contains("3 record(s)"), "{ahead}");
}

/// A clean log says nothing beyond "clean": no note either. Each note
/// appears exactly when its condition holds: a head behind the tip (records
/// never acknowledged), a log written before heads and chains (v1).
#[test]
fn notes_appear_exactly_when_their_condition_holds() {
    use instance_lifecycle::log::record::{decode_record, encode_record};
    use instance_lifecycle::log::{HeadCheck, Note};
    let dir = tempfile::tempdir().expect("temp dir");
    let policy = write_sample_log(dir.path());
    {
        let (clean, _) = Log::open_copy(dir.path()).expect("copy");
        let report = clean.verify(&policy);
        assert!(report.is_clean() && report.notes.is_empty(), "{:#?}", report.notes);
        assert_eq!((report.instances, report.records), (3, 12));
        let recorded = clean.verify_recorded(&policy);
        assert!(recorded.is_clean() && recorded.notes.is_empty(), "{:#?}", recorded.notes);
        assert_eq!((recorded.instances, recorded.records), (3, 12), "verify_recorded reads every record");
    }

    // The head as it was, then one more instance appended and acknowledged:
    // putting the old head back leaves records after it, never acknowledged.
    let head = std::fs::read(dir.path().join("head")).expect("head");
    {
        let log = Log::open(dir.path(), buffered()).expect("open");
        let mut d = Driver::new(name("late"), policy.clone());
        d.feed(Input::Connect);
        append_to_log(&log, &d).expect("append");
    }
    std::fs::write(dir.path().join("head"), &head).expect("old head back");
    {
        let (behind, _) = Log::open_copy(dir.path()).expect("copy");
        let report = behind.verify(&policy);
        assert!(report.is_clean(), "behind is not a loss: {:#?}", report.findings);
        assert!(
            matches!(report.notes[..], [Note::HeadBehind { check: HeadCheck::Behind { head: 12, tip: 14 } }]),
            "{:#?}",
            report.notes
        );
    }

    // As a v1 build wrote it: the v1 marker, records without links, no head.
    tamper(dir.path(), |t| {
        t.insert(b"mformat", b"instance-lifecycle log v1".to_vec()).expect("marker");
        for item in t.scan_prefix(b"r") {
            let (k, v) = item.expect("scan");
            let mut r = decode_record(&v).expect("record");
            r.prev = None;
            t.insert(k, encode_record(&r)).expect("v1 record");
        }
    });
    std::fs::remove_file(dir.path().join("head")).expect("no head");
    let (legacy, _) = Log::open_copy(dir.path()).expect("copy");
    let report = legacy.verify(&policy);
    assert!(report.is_clean(), "{:#?}", report.findings);
    assert!(report.notes.contains(&Note::Legacy), "{:#?}", report.notes);
    assert!(report.notes.contains(&Note::Unchained { records: 14 }), "{:#?}", report.notes);
    assert_eq!(report.notes.len(), 2, "{:#?}", report.notes);
}

/// An instance's history starts with its creation at seq 1, or with a
/// snapshot. A creation further on (a name created again) is not a start
/// when what came before it is gone.
#[test]
fn a_history_starting_with_a_later_creation_is_a_bad_start() {
    let dir = tempfile::tempdir().expect("temp dir");
    let policy = Policy::preset(Preset::Whatsapp);
    {
        let log = Log::open(dir.path(), buffered()).expect("open");
        let mut d = Driver::new(name("again"), policy.clone());
        d.feed(Input::Delete);
        d.feed(Input::CleanupFinished { steps: vec![] });
        let removed = append_to_log(&log, &d).expect("append");
        log.append(&name("again"), removed + 1, Timestamp(9), Event::created("ws://x/"), &Instance::new())
            .expect("created again");
    }
    {
        let (clean, _) = Log::open_copy(dir.path()).expect("copy");
        let report = clean.verify(&policy);
        assert!(report.is_clean(), "created again is fine: {:#?}", report.findings);
    }
    // Everything before the second creation gone (records and their index).
    tamper(dir.path(), |t| {
        let mut doomed = Vec::new();
        for item in t.scan_prefix(b"r") {
            let (k, v) = item.expect("scan");
            let r = instance_lifecycle::log::record::decode_record(&v).expect("record");
            if !matches!(r.event, Event::Created { .. }) || r.seq == 1 {
                doomed.push((k, r.global));
            }
        }
        for (k, global) in doomed {
            t.remove(k).expect("rm");
            let mut g = vec![b'g'];
            g.extend_from_slice(&global.to_be_bytes());
            t.remove(g).expect("rm index");
        }
    });
    let (log, _) = Log::open_copy(dir.path()).expect("copy");
    let report = log.verify(&policy);
    assert!(
        report.findings.iter().any(|f| matches!(f, Finding::BadStart { event: "created", .. })),
        "{:#?}",
        report.findings
    );
}
