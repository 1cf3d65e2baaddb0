//! What an acknowledgement means, checked on the order of events: an
//! instrumented store records every batch applied, every flush and sync,
//! every head written, and the writers record each acknowledgement. In the
//! durable modes, with many concurrent writers: a head never covers more
//! than the last completed sync covered, and an append is acknowledged only
//! after a head covering it was written. Who runs the commits is checked
//! too: a blocking appender leads its group's commit in its own thread, an
//! async one never blocks its runtime thread on a sync.

use std::sync::{Arc, Mutex};

use instance_lifecycle::log::store::{Pair, Write};
use instance_lifecycle::log::{
    Durability, Event, Head, HeadRead, Log, LogConfig, LogError, MemoryStore, Store, StoreError,
};
use instance_lifecycle::machine::{Instance, Timestamp};

use crate::support::name;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Ev {
    /// A batch holding the record of this global sequence number was applied.
    Applied(u64),
    /// A flush started; everything applied so far is what it can cover.
    FlushStarted(u64),
    /// A sync finished; it covers what the flush before it could.
    Synced(u64),
    /// A head was written (and, in the durable modes, synced).
    Head(u64),
    /// A writer was told its append is durable.
    Acked(u64),
}

#[derive(Default)]
struct Recorder {
    inner: MemoryStore,
    events: Mutex<Vec<Ev>>,
    /// The newest global applied, and what the last flush could cover.
    applied: Mutex<(u64, u64)>,
    /// The name of the thread each sync ran on.
    sync_threads: Mutex<Vec<String>>,
    /// The global of each record applied, and the name of the thread that applied it.
    apply_threads: Mutex<Vec<(u64, String)>>,
}

impl Recorder {
    fn push(&self, e: Ev) {
        self.events.lock().expect("lock").push(e);
    }
}

impl Store for Recorder {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        self.inner.get(key)
    }
    fn apply(&self, writes: Vec<Write>) -> Result<(), StoreError> {
        let global = writes.iter().find_map(|(k, v)| {
            (k.first() == Some(&b'g') && k.len() == 9 && v.is_some())
                .then(|| u64::from_be_bytes(k[1..].try_into().expect("8 bytes")))
        });
        // Under one lock with the event: the order of events is the order of applies.
        let mut applied = self.applied.lock().expect("lock");
        self.inner.apply(writes)?;
        if let Some(g) = global {
            applied.0 = applied.0.max(g);
            self.push(Ev::Applied(g));
            let thread = std::thread::current().name().unwrap_or("unnamed").to_string();
            self.apply_threads.lock().expect("lock").push((g, thread));
        }
        Ok(())
    }
    fn scan(&self, prefix: &[u8]) -> Box<dyn Iterator<Item = Result<Pair, StoreError>> + Send + '_> {
        self.inner.scan(prefix)
    }
    fn last(&self, prefix: &[u8]) -> Result<Option<Pair>, StoreError> {
        self.inner.last(prefix)
    }
    fn first_from(&self, from: &[u8], prefix: &[u8]) -> Result<Option<Pair>, StoreError> {
        self.inner.first_from(from, prefix)
    }
    fn page_from(&self, from: &[u8], prefix: &[u8], limit: usize) -> Result<Vec<Pair>, StoreError> {
        self.inner.page_from(from, prefix, limit)
    }
    fn flush(&self) -> Result<(), StoreError> {
        let mut applied = self.applied.lock().expect("lock");
        applied.1 = applied.0;
        self.push(Ev::FlushStarted(applied.0));
        Ok(())
    }
    fn sync(&self) -> Result<(), StoreError> {
        std::thread::sleep(std::time::Duration::from_micros(200)); // a disk's pace
        let covered = self.applied.lock().expect("lock").1;
        self.push(Ev::Synced(covered));
        let thread = std::thread::current().name().unwrap_or("unnamed").to_string();
        self.sync_threads.lock().expect("lock").push(thread);
        Ok(())
    }
    fn size_on_disk(&self) -> Result<u64, StoreError> {
        Ok(0)
    }
    fn read_head(&self) -> Result<HeadRead, StoreError> {
        self.inner.read_head()
    }
    fn write_head(&self, head: &Head, sync: bool) -> Result<(), StoreError> {
        self.inner.write_head(head, sync)?;
        self.push(Ev::Head(head.global));
        Ok(())
    }
}

/// Walks the events: every head is covered by a completed sync, every acknowledgement by a head.
fn check(events: &[Ev]) -> Result<usize, String> {
    let (mut synced, mut head, mut acks) = (0, 0, 0);
    for (i, e) in events.iter().enumerate() {
        match *e {
            Ev::Synced(c) => synced = synced.max(c),
            Ev::Head(h) if h > synced => return Err(format!("event {i}: head {h} written, but only {synced} synced")),
            Ev::Head(h) => head = head.max(h),
            Ev::Acked(g) if g > head => return Err(format!("event {i}: {g} acknowledged, but the head covers {head}")),
            Ev::Acked(_) => acks += 1,
            Ev::Applied(_) | Ev::FlushStarted(_) => {}
        }
    }
    Ok(acks)
}

fn run(durability: Durability, writers: usize, per_writer: usize) -> (Arc<Recorder>, Log) {
    let store = Arc::new(Recorder::default());
    let log = Log::with_store(store.clone(), LogConfig { durability, ..LogConfig::default() }).expect("log");
    std::thread::scope(|s| {
        for w in 0..writers {
            let (log, store) = (log.clone(), store.clone());
            s.spawn(move || {
                let n = name(&format!("w{w}"));
                for seq in 1..=per_writer as u64 {
                    let event = Event::created("ws://x/");
                    let a = log.append(&n, seq, Timestamp(seq), event, &Instance::new()).expect("append");
                    store.push(Ev::Acked(a.global));
                }
            });
        }
    });
    (store, log)
}

#[test]
fn an_append_is_acknowledged_only_after_a_commit_covers_it() {
    for (durability, writers) in [(Durability::GroupCommit, 16), (Durability::GroupCommit, 1), (Durability::Strict, 8)]
    {
        let (store, log) = run(durability, writers, 40);
        let events = store.events.lock().expect("lock").clone();
        let acks = check(&events).unwrap_or_else(|e| panic!("{durability:?} × {writers}: {e}"));
        assert_eq!(acks, writers * 40);
        let heads = events.iter().filter(|e| matches!(e, Ev::Head(_))).count();
        if durability == Durability::GroupCommit && writers > 1 {
            assert!(heads < acks, "commits are shared: {heads} heads for {acks} appends");
        }
        // One sync per commit: every head written after exactly one sync,
        // never a flush or sync of its own outside a commit.
        let syncs = events.iter().filter(|e| matches!(e, Ev::Synced(_))).count();
        assert_eq!(syncs, heads, "{durability:?} × {writers}: {syncs} syncs for {heads} commits");
        assert_eq!(log.tip().0, (writers * 40) as u64);
    }
}

/// The check itself notices an acknowledgement that came too early (so a
/// mode that did not wait would fail the test above).
#[test]
fn the_order_check_fails_on_an_early_acknowledgement() {
    let (store, _log) = run(Durability::Buffered, 4, 20);
    let events = store.events.lock().expect("lock").clone();
    assert!(check(&events).is_err(), "Buffered acknowledges before any commit: the check must say so");
    let early = [Ev::Applied(1), Ev::FlushStarted(1), Ev::Acked(1), Ev::Synced(1), Ev::Head(1)];
    assert!(check(&early).is_err());
    let ahead = [Ev::Applied(1), Ev::Applied(2), Ev::FlushStarted(1), Ev::Synced(1), Ev::Head(2)];
    assert!(check(&ahead).is_err(), "a head ahead of the synced data");
    let good = [Ev::Applied(1), Ev::FlushStarted(1), Ev::Synced(1), Ev::Head(1), Ev::Acked(1)];
    assert_eq!(check(&good), Ok(1));
}

/// Where the syncs ran: the names of the threads, counted.
fn sync_threads(store: &Recorder) -> std::collections::BTreeMap<String, usize> {
    let mut counted = std::collections::BTreeMap::new();
    for t in store.sync_threads.lock().expect("lock").iter() {
        let t = if t.starts_with("blocking-") { "blocking-writer" } else { t.as_str() };
        *counted.entry(t.to_string()).or_insert(0) += 1;
    }
    counted
}

/// Leader/follower: a blocking appender that finds no commit running leads
/// one in its own thread — alone, it commits every append itself, as Strict
/// does, without handing off to the flusher (under load the flusher's data
/// thread chains the groups); async appenders never sync on a runtime
/// thread; with both at once, the order still holds.
#[test]
fn a_blocking_appender_leads_its_commit_and_async_ones_never_sync_on_the_runtime() {
    // One blocking writer, named so that its syncs are told apart.
    let store = Arc::new(Recorder::default());
    let log = Log::with_store(store.clone(), LogConfig::default()).expect("log");
    store.sync_threads.lock().expect("lock").clear(); // opening's own commit
    std::thread::scope(|s| {
        let (log, store) = (log.clone(), store.clone());
        std::thread::Builder::new()
            .name("blocking-0".into())
            .spawn_scoped(s, move || {
                let n = name("b0");
                for seq in 1..=60u64 {
                    let a = log.append(&n, seq, Timestamp(seq), Event::created("ws://x/"), &Instance::new());
                    store.push(Ev::Acked(a.expect("append").global));
                }
            })
            .expect("thread");
    });
    let threads = sync_threads(&store);
    assert_eq!(threads, [("blocking-writer".to_string(), 60)].into(), "who synced");
    assert_eq!(check(&store.events.lock().expect("lock")), Ok(60));

    // Async only, then both at once, on a runtime with named worker threads.
    for blocking in [0, 4] {
        let store = Arc::new(Recorder::default());
        let log = Log::with_store(store.clone(), LogConfig::default()).expect("log");
        store.sync_threads.lock().expect("lock").clear();
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("runtime-worker")
            .build()
            .expect("runtime");
        std::thread::scope(|s| {
            for w in 0..blocking {
                let (log, store) = (log.clone(), store.clone());
                std::thread::Builder::new()
                    .name(format!("blocking-{w}"))
                    .spawn_scoped(s, move || {
                        let n = name(&format!("b{w}"));
                        for seq in 1..=30u64 {
                            let a = log.append(&n, seq, Timestamp(seq), Event::created("ws://x/"), &Instance::new());
                            store.push(Ev::Acked(a.expect("append").global));
                        }
                    })
                    .expect("thread");
            }
            runtime.block_on(async {
                let tasks: Vec<_> = (0..8)
                    .map(|w| {
                        let (log, store) = (log.clone(), store.clone());
                        tokio::spawn(async move {
                            let n = name(&format!("a{w}"));
                            for seq in 1..=30u64 {
                                let event = Event::created("ws://x/");
                                let a = log.append_async(&n, seq, Timestamp(seq), event, &Instance::new()).await;
                                store.push(Ev::Acked(a.expect("append").global));
                            }
                        })
                    })
                    .collect();
                for t in tasks {
                    t.await.expect("task");
                }
            });
        });
        let threads = sync_threads(&store);
        assert!(!threads.contains_key("runtime-worker"), "a sync ran on a runtime thread: {threads:?}");
        assert!(threads.contains_key("lifecycle-log-flush"), "async waiters are led by the data thread: {threads:?}");
        let acks = 240 + blocking * 30;
        assert_eq!(
            check(&store.events.lock().expect("lock")),
            Ok(acks),
            "{blocking} blocking writers beside async ones"
        );
        assert_eq!(log.tip().0, acks as u64);
    }
}

/// Blocking appenders write in groups: the first to find no one writing
/// writes every append queued behind it. Each caller still gets its own
/// answer: its own record, or its own error (a stale sequence number here)
/// without failing anyone else's; and the order check holds.
#[test]
fn grouped_blocking_appends_answer_each_caller_with_its_own_result() {
    let store = Arc::new(Recorder::default());
    let log = Log::with_store(store.clone(), LogConfig::default()).expect("log");
    let (writers, per_writer) = (32, 30u64);
    let made_by = Mutex::new(std::collections::HashMap::new());
    std::thread::scope(|s| {
        for w in 0..writers {
            let (log, store, made_by) = (&log, &store, &made_by);
            std::thread::Builder::new()
                .name(format!("blocking-{w}"))
                .spawn_scoped(s, move || {
                    let n = name(&format!("g{w}"));
                    for seq in 1..=per_writer {
                        if seq % 7 == 3 {
                            let stale =
                                log.append(&n, seq + 1, Timestamp(seq), Event::created("ws://x/"), &Instance::new());
                            assert!(
                                matches!(&stale, Err(LogError::SequenceConflict { instance, expected, actual })
                                    if *instance == n && *expected == seq + 1 && *actual == seq),
                                "writer {w}: {stale:?}"
                            );
                        }
                        let a = log.append(&n, seq, Timestamp(seq), Event::created("ws://x/"), &Instance::new());
                        let a = a.expect("append");
                        assert_eq!(a.seq, seq, "writer {w} got another append's answer");
                        store.push(Ev::Acked(a.global));
                        made_by.lock().expect("lock").insert(a.global, format!("blocking-{w}"));
                    }
                })
                .expect("thread");
        }
    });
    let appends = writers * per_writer as usize;
    assert_eq!(check(&store.events.lock().expect("lock")), Ok(appends));
    assert_eq!(log.tip().0, appends as u64);
    for w in 0..writers {
        let history = log.history(&name(&format!("g{w}"))).expect("history");
        let seqs: Vec<u64> = history.iter().map(|r| r.seq).collect();
        assert_eq!(seqs, (1..=per_writer).collect::<Vec<_>>(), "writer {w}'s records");
    }
    // Groups formed: some appends were written by a thread other than the one that made them.
    let made_by = made_by.into_inner().expect("lock");
    let applied = store.apply_threads.lock().expect("lock");
    let by_others = applied.iter().filter(|(g, t)| made_by.get(g).is_some_and(|m| m != t)).count();
    assert!(by_others > 0, "no append of {appends} was written by another thread: no groups");
}
