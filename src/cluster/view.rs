//! The cluster as every host reads it: a fold of the stream (every
//! instance's last entry) and of the owners bucket (every live lease), each
//! kept by one follower per host. Any host answers a read for any instance
//! from it, and learns of an instance without an owner from the lease's own
//! event (a delete, or the server's marker when a lease runs out), not by
//! listing the stream.
//!
//! **Read-your-writes.** A command is answered after its record is in the
//! stream; the view applies entries a moment later. [`View::sync`] closes
//! that gap: it asks the stream for its newest entry (one direct get) and
//! waits until the view has applied it, so a read after any answered
//! command, on any host, shows at least the state that command ended in.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use async_nats::jetstream::{consumer, kv, stream};
use futures_util::StreamExt;
use tokio::sync::{Notify, watch};
use tokio::time::Instant;
use tracing::{debug, warn};

use super::entry::{StreamEntry, name_of, token_of};
use crate::log::InstanceSpec;
use crate::machine::{Instance, InstanceName, State, Timestamp};

/// An instance as the stream's newest entry for it leaves it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Row {
    /// The instance (state and generation).
    pub instance: Instance,
    /// Its sequence number as of that entry.
    pub seq: u64,
    /// When that entry's record was made.
    pub at: Timestamp,
    /// What it connects to.
    pub spec: InstanceSpec,
    /// The host that wrote the entry.
    pub host: String,
    /// The stream sequence of the entry.
    pub stream_seq: u64,
}

impl Row {
    /// Whether the instance is removed (it needs no owner).
    pub fn removed(&self) -> bool {
        matches!(self.instance.state, State::Removed { .. })
    }
}

/// Something that wants every entry, in stream order, as the view applies
/// it (the service's fleet view). Called with the view's lock held: keep it short.
pub trait Tap: Send + Sync + 'static {
    /// One entry of `name`'s subject at `stream_seq`.
    fn entry(&self, stream_seq: u64, name: &InstanceName, entry: &StreamEntry);
}

/// A live lease, as the owners bucket last said.
#[derive(Clone, Debug)]
struct Lease {
    host: String,
    /// When this host saw its last renewal: a lease not renewed for a TTL
    /// (and a renewal period) is presumed gone even if its marker was missed.
    seen: Instant,
}

#[derive(Default)]
struct Folded {
    rows: HashMap<InstanceName, Row>,
    leases: HashMap<InstanceName, Lease>,
    /// Presumed expiries, soonest first: `(seen + ttl + slack, name)`.
    expiries: BTreeSet<(Instant, InstanceName)>,
    /// Names whose lease went away: each is looked at once by the orphan worker.
    orphans: HashSet<InstanceName>,
}

/// The view. Shared by the host's followers (writers) and its readers.
pub struct View {
    state: Mutex<Folded>,
    /// The newest stream sequence applied.
    applied: watch::Sender<u64>,
    /// Whether the owners bucket's initial values have all been read.
    leases_read: watch::Sender<bool>,
    taps: Mutex<Vec<Arc<dyn Tap>>>,
    orphan_found: Notify,
    /// How long after its last renewal a lease is presumed gone.
    presumed_gone: Duration,
    prefix: String,
}

impl View {
    pub(crate) fn new(namespace: &str, lease_ttl: Duration, renew_every: Duration) -> Arc<Self> {
        Arc::new(Self {
            state: Mutex::default(),
            applied: watch::channel(0).0,
            leases_read: watch::channel(false).0,
            taps: Mutex::default(),
            orphan_found: Notify::new(),
            presumed_gone: lease_ttl + renew_every,
            prefix: format!("{namespace}.inst."),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Folded> {
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Adds a tap: it gets every entry applied from now on.
    pub fn tap(&self, tap: Arc<dyn Tap>) {
        self.taps.lock().unwrap_or_else(std::sync::PoisonError::into_inner).push(tap);
    }

    /// The newest stream sequence applied.
    pub fn applied(&self) -> u64 {
        *self.applied.borrow()
    }

    /// An instance's row (removed ones too, until they are purged).
    pub fn row(&self, name: &InstanceName) -> Option<Row> {
        self.lock().rows.get(name).cloned()
    }

    /// Every row, by name.
    pub fn rows(&self) -> Vec<(InstanceName, Row)> {
        let mut out: Vec<_> = self.lock().rows.iter().map(|(n, r)| (n.clone(), r.clone())).collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    /// The host holding `name`'s lease, as the bucket last said (`None`: no live owner).
    pub fn owner(&self, name: &InstanceName) -> Option<String> {
        self.lock().leases.get(name).map(|l| l.host.clone())
    }

    /// Every live lease's holder, by instance.
    pub fn owners(&self) -> HashMap<InstanceName, String> {
        self.lock().leases.iter().map(|(n, l)| (n.clone(), l.host.clone())).collect()
    }

    /// Waits until the view has applied everything up to `stream_seq`, within `bound`.
    pub(crate) async fn applied_through(&self, stream_seq: u64, bound: Duration) -> bool {
        let mut rx = self.applied.subscribe();
        tokio::time::timeout(bound, rx.wait_for(|a| *a >= stream_seq)).await.is_ok_and(|r| r.is_ok())
    }

    /// Forgets a row whose subject is gone (a purged removed instance).
    pub(crate) fn forget(&self, name: &InstanceName) {
        self.lock().rows.remove(name);
    }

    fn apply(&self, stream_seq: u64, subject: &str, payload: &[u8]) {
        let Some(name) = subject.strip_prefix(&self.prefix).and_then(name_of) else {
            debug!(subject, "an entry outside the instances' subjects; skipped");
            return;
        };
        let entry = match StreamEntry::decode(payload) {
            Ok(e) => e,
            Err(e) => {
                warn!(instance = %name, stream_seq, error = %e, "an entry that is not one of ours; skipped");
                return;
            }
        };
        {
            let mut state = self.lock();
            if let Some(instance) = entry.instance() {
                let row = Row {
                    instance: instance.clone(),
                    seq: entry.seq(),
                    at: entry.at(),
                    spec: entry.spec().clone(),
                    host: entry.host().to_owned(),
                    stream_seq,
                };
                state.rows.insert(name.clone(), row);
            }
            for tap in self.taps.lock().unwrap_or_else(std::sync::PoisonError::into_inner).iter() {
                tap.entry(stream_seq, &name, &entry);
            }
        }
        self.applied.send_if_modified(|a| {
            let moved = stream_seq > *a;
            *a = (*a).max(stream_seq);
            moved
        });
    }

    fn lease(&self, key: &str, operation: kv::Operation, value: &[u8]) {
        let Some(name) = name_of(key) else { return };
        let mut state = self.lock();
        if let Some(old) = state.leases.remove(&name) {
            state.expiries.remove(&(old.seen + self.presumed_gone, name.clone()));
        }
        match operation {
            kv::Operation::Put => {
                let seen = Instant::now();
                state.expiries.insert((seen + self.presumed_gone, name.clone()));
                state.leases.insert(name, Lease { host: String::from_utf8_lossy(value).into_owned(), seen });
            }
            kv::Operation::Delete | kv::Operation::Purge => {
                state.orphans.insert(name);
                drop(state);
                self.orphan_found.notify_one();
            }
        }
    }

    /// Names that may be without a live owner now: those whose lease went
    /// away since the last call, and those whose lease was not renewed for
    /// a TTL. The caller checks each (a claim is the only real test).
    pub(crate) fn take_orphans(&self) -> Vec<InstanceName> {
        let now = Instant::now();
        let mut state = self.lock();
        let mut out: Vec<InstanceName> = state.orphans.drain().collect();
        while let Some((at, _)) = state.expiries.first()
            && *at <= now
        {
            if let Some((_, name)) = state.expiries.pop_first() {
                state.leases.remove(&name);
                out.push(name);
            }
        }
        out.retain(|n| state.rows.get(n).is_some_and(|r| !r.removed()) && !state.leases.contains_key(n));
        out.sort();
        out.dedup();
        out
    }

    /// Every instance that is not removed and has no lease: read once, when
    /// a host joins (later, leases announce their own end).
    pub(crate) fn unowned(&self) -> Vec<InstanceName> {
        let state = self.lock();
        let mut out: Vec<_> = state
            .rows
            .iter()
            .filter(|(n, r)| !r.removed() && !state.leases.contains_key(*n))
            .map(|(n, _)| n.clone())
            .collect();
        out.sort();
        out
    }

    /// Waits until an orphan may have been found, or `within` passes.
    pub(crate) async fn orphan_found(&self, within: Duration) {
        let _ = tokio::time::timeout(within, self.orphan_found.notified()).await;
    }

    /// Waits until the owners bucket's initial values are read, within `bound`.
    pub(crate) async fn leases_read(&self, bound: Duration) -> bool {
        let mut rx = self.leases_read.subscribe();
        tokio::time::timeout(bound, rx.wait_for(|r| *r)).await.is_ok_and(|r| r.is_ok())
    }
}

/// The subject of every instance, as a filter.
pub(crate) fn all_instances(namespace: &str) -> String {
    format!("{namespace}.inst.>")
}

/// Applies the stream to the view from its start, in order, until `stop`
/// (or the view is dropped). An ordered consumer: a gap or a lost consumer
/// is re-created from the next sequence by the client itself; a failure it
/// gives up on is re-created here after a pause.
pub(crate) async fn follow_stream(
    view: Weak<View>,
    stream: stream::Stream,
    namespace: String,
    mut stop: watch::Receiver<bool>,
) {
    let mut pause = Duration::from_millis(100);
    loop {
        let Some(next) = view.upgrade().map(|v| v.applied() + 1) else { return };
        let config = consumer::pull::OrderedConfig {
            filter_subject: all_instances(&namespace),
            deliver_policy: if next <= 1 {
                consumer::DeliverPolicy::All
            } else {
                consumer::DeliverPolicy::ByStartSequence { start_sequence: next }
            },
            ..Default::default()
        };
        let messages = match stream.create_consumer(config).await {
            Ok(c) => c.messages().await.map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        match messages {
            Ok(mut messages) => loop {
                let got = tokio::select! {
                    m = messages.next() => m,
                    _ = stop.wait_for(|s| *s) => return,
                };
                let Some(view) = view.upgrade() else { return };
                match got {
                    Some(Ok(m)) => {
                        pause = Duration::from_millis(100);
                        let Ok(info) = m.info() else { continue };
                        view.apply(info.stream_sequence, m.subject.as_str(), &m.payload);
                    }
                    Some(Err(e)) => {
                        warn!(error = %e, "following the stream failed; following it again");
                        break;
                    }
                    None => break,
                }
            },
            Err(e) => warn!(error = %e, "cannot follow the stream; trying again"),
        }
        tokio::select! {
            () = tokio::time::sleep(pause) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        pause = (pause * 2).min(Duration::from_secs(5));
    }
}

/// Applies the owners bucket to the view until `stop`: every lease taken,
/// renewed, given back or run out (the server's marker, with limit markers on).
pub(crate) async fn follow_leases(view: Weak<View>, kv: kv::Store, mut stop: watch::Receiver<bool>) {
    let mut from = 0u64;
    let mut pause = Duration::from_millis(100);
    loop {
        // Every lease there is first (the last value of each key), then each change.
        let watched = if from == 0 { kv.watch_with_history(">").await } else { kv.watch_all_from_revision(from).await };
        match watched {
            Ok(mut entries) => loop {
                let got = tokio::select! {
                    e = entries.next() => Some(e),
                    () = tokio::time::sleep(Duration::from_millis(250)), if from == 0 => None,
                    _ = stop.wait_for(|s| *s) => return,
                };
                let Some(got) = got else {
                    // An empty bucket has no initial values to wait for.
                    if kv.status().await.is_ok_and(|s| s.values() == 0)
                        && let Some(v) = view.upgrade()
                    {
                        v.leases_read.send_replace(true);
                    }
                    continue;
                };
                let Some(view) = view.upgrade() else { return };
                match got {
                    Some(Ok(e)) => {
                        pause = Duration::from_millis(100);
                        from = e.revision + 1;
                        view.lease(&e.key, e.operation, &e.value);
                        if e.delta == 0 || e.seen_current {
                            view.leases_read.send_replace(true);
                        }
                    }
                    Some(Err(e)) => {
                        warn!(error = %e, "watching the leases failed; watching them again");
                        break;
                    }
                    None => break,
                }
            },
            Err(e) => warn!(error = %e, "cannot watch the leases; trying again"),
        }
        tokio::select! {
            () = tokio::time::sleep(pause) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        pause = (pause * 2).min(Duration::from_secs(5));
    }
}

/// The subject of one instance.
pub(crate) fn subject_of(namespace: &str, name: &InstanceName) -> String {
    format!("{namespace}.inst.{}", token_of(name))
}
