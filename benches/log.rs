//! `cargo bench --bench log`: the event log against raw sled doing the same
//! writes, in the same run, printed as ratios (a markdown section for
//! BENCHMARKS.md). Sizes scale with `BENCH_SCALE` (default 1.0; the report
//! uses 1.0 and finishes in a few minutes on 2 cores).

use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use instance_lifecycle::log::{Durability, Event, Log, LogConfig, RecoveryMode, RecoveryOptions};
use instance_lifecycle::machine::{
    Effect, Generation, Identity, Input, Instance, InstanceName, Phase, State, StatusCode, Timestamp,
};

fn scale() -> f64 {
    std::env::var("BENCH_SCALE").ok().and_then(|s| s.parse().ok()).unwrap_or(1.0)
}

fn scaled(n: usize) -> usize {
    ((n as f64 * scale()) as usize).max(10)
}

fn name(i: usize) -> InstanceName {
    InstanceName::new(format!("bench-{i:06}")).expect("valid name")
}

/// A typical record: an open session dropped, backing off. Record `seq`'s
/// "from" is record `seq - 1`'s "to", so histories chain as recovery requires
/// (the sizes are those of a real transition; the rules are not checked here).
fn transition(seq: u64) -> (Event, Instance) {
    let identity = Identity::new("5511999999999@s.whatsapp.net").expect("id");
    let backoff = |until| Instance {
        generation: Generation(3),
        state: State::Connecting {
            phase: Phase::Backoff { until: Timestamp(until) },
            retries: 1,
            resume: Some(identity.clone()),
        },
    };
    let from = backoff(seq - 1);
    let to = backoff(seq);
    let input = Input::TransportClosed {
        generation: Generation(3),
        initiator: instance_lifecycle::machine::CloseInitiator::Peer,
        status: Some(StatusCode(428)),
        reason: "connection closed".into(),
    };
    let effects = vec![Effect::ArmTimer {
        timer: instance_lifecycle::machine::Timer {
            kind: instance_lifecycle::machine::TimerKind::Reconnect,
            generation: Generation(3),
        },
        after: Duration::from_millis(1_234),
    }];
    (Event::Transition { from, input, effects }, to)
}

/// Appends `per_thread` records from each of `threads` threads; returns appends/s.
fn log_appends(durability: Durability, threads: usize, per_thread: usize) -> (f64, usize) {
    let log = Log::temporary(LogConfig { durability, ..LogConfig::default() }).expect("log");
    let start = Instant::now();
    std::thread::scope(|s| {
        for t in 0..threads {
            let log = log.clone();
            s.spawn(move || {
                let n = name(t);
                for seq in 1..=per_thread as u64 {
                    let (event, to) = transition(seq);
                    log.append(&n, seq, Timestamp(seq), event, &to).expect("append");
                }
            });
        }
    });
    let rate = (threads * per_thread) as f64 / start.elapsed().as_secs_f64();
    let bytes = log.size_on_disk().unwrap_or(0) as usize;
    (rate, bytes / (threads * per_thread).max(1))
}

/// Raw sled doing the same writes: the same three keys and value sizes per
/// append in one atomic batch, and the same flushing as the mode.
fn raw_appends(durability: Durability, threads: usize, per_thread: usize, window: Duration) -> f64 {
    let dir = tempfile::tempdir().expect("dir");
    let db =
        sled::Config::new().path(dir.path()).cache_capacity(64 << 20).flush_every_ms(Some(500)).open().expect("sled");
    let tree = db.open_tree("raw").expect("tree");
    let fsync = {
        let dir = dir.path().to_path_buf();
        move || {
            for f in ["db", "conf"] {
                std::fs::File::open(dir.join(f)).and_then(|f| f.sync_all()).expect("fsync");
            }
            std::fs::File::open(&dir).and_then(|f| f.sync_all()).expect("fsync dir");
        }
    };
    // The group-commit protocol, minimal: writers publish their batch number
    // and wait for a flusher that commits as soon as the last commit ended.
    let group = Arc::new((Mutex::new((0u64, 0u64, false)), Condvar::new()));
    let flusher = (durability == Durability::GroupCommit).then(|| {
        let (group, db, fsync) = (group.clone(), db.clone(), fsync.clone());
        std::thread::spawn(move || {
            loop {
                {
                    let (m, cv) = &*group;
                    let mut s = m.lock().expect("lock");
                    while s.0 <= s.1 && !s.2 {
                        s = cv.wait(s).expect("wait");
                    }
                    if s.2 && s.0 <= s.1 {
                        return;
                    }
                }
                if !window.is_zero() {
                    std::thread::sleep(window);
                }
                let target = group.0.lock().expect("lock").0;
                db.flush().expect("flush");
                fsync();
                let (m, cv) = &*group;
                m.lock().expect("lock").1 = target;
                cv.notify_all();
            }
        })
    });
    let counter = std::sync::atomic::AtomicU64::new(0);
    let start = Instant::now();
    std::thread::scope(|s| {
        for t in 0..threads {
            let (tree, db, group, counter, fsync) = (&tree, &db, &group, &counter, &fsync);
            s.spawn(move || {
                for seq in 1..=per_thread as u64 {
                    // Encode per append, as the log does.
                    let (event, to) = transition(seq);
                    let record = postcard::to_allocvec(&(&event, &to, seq, 2u64)).expect("encode");
                    let latest = postcard::to_allocvec(&(&to, seq)).expect("encode");
                    let g = counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
                    let mut batch = sled::Batch::default();
                    let key = format!("rbench-{t:06}\0{seq:08}");
                    batch.insert(key.as_bytes(), record.as_slice());
                    batch.insert(&g.to_be_bytes()[..], key.as_bytes());
                    batch.insert(format!("lbench-{t:06}").as_bytes(), latest.as_slice());
                    tree.apply_batch(batch).expect("batch");
                    match durability {
                        Durability::Buffered => {}
                        Durability::Strict => {
                            db.flush().expect("flush");
                            fsync();
                        }
                        Durability::GroupCommit => {
                            let (m, cv) = &**group;
                            let mut st = m.lock().expect("lock");
                            st.0 = st.0.max(g);
                            cv.notify_all();
                            while st.1 < g {
                                st = cv.wait(st).expect("wait");
                            }
                        }
                    }
                }
            });
        }
    });
    let rate = (threads * per_thread) as f64 / start.elapsed().as_secs_f64();
    {
        let (m, cv) = &*group;
        m.lock().expect("lock").2 = true;
        cv.notify_all();
    }
    if let Some(f) = flusher {
        f.join().expect("flusher");
    }
    rate
}

fn recovery(records: usize, per_instance: usize) -> (f64, f64, f64, usize) {
    let dir = tempfile::tempdir().expect("dir");
    {
        let log =
            Log::open(dir.path(), LogConfig { durability: Durability::Buffered, ..LogConfig::default() }).expect("log");
        let instances = records / per_instance;
        for i in 0..instances {
            let n = name(i);
            for seq in 1..=per_instance as u64 {
                let (event, to) = transition(seq);
                log.append(&n, seq, Timestamp(seq), event, &to).expect("append");
            }
        }
        log.sync().expect("sync");
    }
    let raw_scan = || {
        let t = Instant::now();
        let db = sled::Config::new().path(dir.path()).cache_capacity(64 << 20).open().expect("sled");
        let tree = db.open_tree(instance_lifecycle::log::store::TREE).expect("tree");
        let scanned = tree.iter().map(|r| r.expect("scan").1.len()).sum::<usize>();
        assert!(scanned > 0);
        drop(tree);
        drop(db);
        t.elapsed().as_secs_f64()
    };
    let recover = |mode| {
        let t = Instant::now();
        let log =
            Log::open_existing(dir.path(), LogConfig { durability: Durability::Buffered, ..LogConfig::default() })
                .expect("open");
        let r = log.recover(RecoveryOptions { mode, quarantine: false }).expect("recover");
        assert_eq!(r.instances.len(), records / per_instance);
        t.elapsed().as_secs_f64()
    };
    // Interleaved, best of two each: the first open of a fresh database pays
    // for sled's own recovery and a cold page cache, whoever goes first.
    let (mut raw, mut fast, mut replay) = (f64::MAX, f64::MAX, f64::MAX);
    for _ in 0..2 {
        raw = raw.min(raw_scan());
        fast = fast.min(recover(RecoveryMode::Fast));
        replay = replay.min(recover(RecoveryMode::Replay));
    }
    (raw, fast, replay, records)
}

/// The bytes of one record as the log encodes it (the baselines write these).
fn record_bytes(seq: u64) -> Vec<u8> {
    let (event, to) = transition(seq);
    let record = instance_lifecycle::log::Record {
        instance: name(0),
        seq,
        global: seq,
        at: Timestamp(seq),
        prev: Some(instance_lifecycle::log::Digest::ZERO),
        replaced: None,
        event,
        to,
    };
    instance_lifecycle::log::record::encode_record(&record)
}

/// The disk's own pace at this concurrency: `threads` threads append the
/// same record bytes to one plain file; whoever finds no sync running
/// becomes the leader and `fdatasync`s for everyone queued behind it (the
/// followers wait for it). What any design on this disk can reach with this
/// many writers; with one writer, one `fdatasync` per record.
fn plain_group_commit(threads: usize, per_thread: usize) -> f64 {
    use std::io::Write;
    struct Shared {
        file: std::fs::File,
        /// Records written, records covered by a finished sync, a sync running.
        written: u64,
        synced: u64,
        syncing: bool,
    }
    let dir = tempfile::tempdir().expect("dir");
    let file = std::fs::File::create(dir.path().join("plain")).expect("file");
    let group = (Mutex::new(Shared { file, written: 0, synced: 0, syncing: false }), Condvar::new());
    let start = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..threads {
            let group = &group;
            s.spawn(move || {
                let (m, cv) = group;
                for seq in 1..=per_thread as u64 {
                    let bytes = record_bytes(seq);
                    let mut g = m.lock().expect("lock");
                    g.file.write_all(&bytes).expect("write");
                    g.written += 1;
                    let mine = g.written;
                    while g.synced < mine {
                        if g.syncing {
                            g = cv.wait(g).expect("wait");
                            continue;
                        }
                        // The leader: everything written so far goes in this sync.
                        g.syncing = true;
                        let (target, file) = (g.written, g.file.try_clone().expect("clone"));
                        drop(g);
                        file.sync_data().expect("fdatasync");
                        g = m.lock().expect("lock");
                        g.synced = target;
                        g.syncing = false;
                        cv.notify_all();
                    }
                }
            });
        }
    });
    (threads * per_thread) as f64 / start.elapsed().as_secs_f64()
}

/// Best of two interleaved rounds of each side: a shared, noisy machine slows
/// whichever run it hits, and the best is the least disturbed.
fn best_of_two(mut ours: impl FnMut() -> f64, mut baseline: impl FnMut() -> f64) -> (f64, f64) {
    let (mut a, mut b) = (0f64, 0f64);
    for _ in 0..2 {
        b = b.max(baseline());
        a = a.max(ours());
    }
    (a, b)
}

fn row(what: &str, ours: f64, baseline_name: &str, baseline: f64, target: &str) {
    println!("| {what} | {ours:.0} | {baseline_name}: {baseline:.0} | {:.2}× | {target} |", ours / baseline);
}

fn main() {
    // `cargo bench` passes `--bench`; nothing else is parsed.
    println!("## Event log (`cargo bench --bench log`, BENCH_SCALE={})\n", scale());
    println!("| measurement | instance-lifecycle | baseline, same run | ratio | target |");
    println!("|---|---|---|---|---|");
    let delay = LogConfig::default().group_commit_max_delay;
    // BENCH_FILTER=strict (say) runs only the rows whose label contains it.
    let filter = std::env::var("BENCH_FILTER").unwrap_or_default().to_lowercase();
    let wanted = |label: &str| label.to_lowercase().contains(&filter);
    let mut bytes_per_record = 0;
    // The log beside raw sled doing the same writes and the same flushing.
    for (mode, threads, per) in [
        (Durability::Buffered, 1, scaled(200_000)),
        (Durability::GroupCommit, 16, scaled(1_500)),
        (Durability::Strict, 1, scaled(4_000)),
    ] {
        let label = format!("appends/s, {mode:?}, {threads} writer(s) × {per}");
        if !wanted(&label) {
            continue;
        }
        let mut bytes = 0;
        let (ours, raw) = best_of_two(
            || {
                let (rate, b) = log_appends(mode, threads, per);
                bytes = b;
                rate
            },
            || raw_appends(mode, threads, per, delay),
        );
        if mode == Durability::Buffered {
            bytes_per_record = bytes;
        }
        row(&label, ours, "raw sled, same writes", raw, "≥ 0.80×");
    }
    // Each mode against the disk's own pace at the same concurrency: a plain
    // file, the same record bytes, one leader's fdatasync for everyone queued.
    // GroupCommit is held to it; Strict and Buffered are shown beside it.
    for (threads, per) in [(1, scaled(3_000)), (16, scaled(1_500)), (256, scaled(100))] {
        let group = format!("appends/s, GroupCommit, {threads} writer(s) × {per}");
        if !wanted(&format!("{group} plain")) {
            continue;
        }
        let baseline = "plain file, same bytes, group fdatasync (the disk's pace)";
        let (ours, plain) =
            best_of_two(|| log_appends(Durability::GroupCommit, threads, per).0, || plain_group_commit(threads, per));
        row(&group, ours, baseline, plain, "≥ 0.70×");
        for mode in [Durability::Strict, Durability::Buffered] {
            let ours = log_appends(mode, threads, per).0;
            row(&format!("appends/s, {mode:?}, {threads} writer(s) × {per}"), ours, baseline, plain, "(shown)");
        }
    }
    if !wanted("recovery") {
        return;
    }
    let (raw, fast, replay, n) = recovery(scaled(1_000_000), 100);
    println!(
        "| recovery of {n} records (latest-state cache) | {fast:.2} s | scan {raw:.2} s | {:.2}× | ≤ 1.5× |",
        fast / raw
    );
    println!(
        "| recovery of {n} records (full replay) | {replay:.2} s | scan {raw:.2} s | {:.2}× | ≤ 1.5× |",
        replay / raw
    );
    println!("| bytes on disk per record (Buffered run, incl. index and cache) | {bytes_per_record} | | | |");
}
