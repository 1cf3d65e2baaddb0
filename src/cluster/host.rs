//! One host's part in the cluster: the leases it holds, the takeovers it
//! makes, the fence its engine writes through (with compaction of the
//! instance's subject), the loops that keep all of it, and the commands it
//! serves for other hosts.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, Weak};
use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream::{self, kv, stream};
use futures_util::StreamExt;
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{Instrument, debug, info, warn};

use super::entry::{self, StreamEntry, token_of};
use super::rpc::{Answers, Envelope, Reply, Request, Seen};
use super::view::{View, subject_of};
use super::{ClusterConfig, ClusterError, ClusterReader, ClusterStats};
use crate::engine::{Engine, EngineError, Fence, FenceFuture, Offered, Refused};
use crate::log::{Digest, InstanceSpec};
use crate::machine::{InstanceName, State};

/// One owned instance.
#[derive(Clone, Debug)]
pub(super) struct Owned {
    /// The fencing token: the revision of the winning claim.
    pub(super) epoch: u64,
    /// The lease's current revision (what the next renewal compares with).
    pub(super) revision: u64,
    /// The stream sequence of the last entry of the instance's subject.
    pub(super) last: u64,
    /// Entries the subject holds (since its last snapshot): compaction's trigger.
    pub(super) entries: u64,
    /// When this host stops trusting the lease.
    pub(super) deadline: Instant,
    /// What the instance connects to (every entry carries it).
    pub(super) spec: InstanceSpec,
}

pub(super) struct Inner {
    pub(super) config: ClusterConfig,
    pub(super) js: jetstream::Context,
    pub(super) client: async_nats::Client,
    pub(super) reader: ClusterReader,
    pub(super) view: Arc<View>,
    pub(super) owned: Mutex<HashMap<InstanceName, Owned>>,
    pub(super) engine: OnceLock<Engine>,
    pub(super) stats: Mutex<ClusterStats>,
    /// Whether this host compacts subjects (the stream allows roll-ups and retention is set).
    pub(super) compacting: bool,
    /// Compaction keeps every entry from this stream sequence on: what a
    /// reader (a webhook) has not read yet, within the backlog bound.
    pub(super) hold: AtomicU64,
    /// The forwarded requests this host ran or runs, so that a repeat is run once.
    pub(super) answers: Mutex<Answers>,
    /// Numbers this host's forwarded requests.
    pub(super) asked: AtomicU64,
    /// The readers compaction waits for.
    pub(super) readers: kv::Store,
    /// Set when the host leaves or halts: it takes nothing over from then on.
    pub(super) stopped: std::sync::atomic::AtomicBool,
}

impl Inner {
    pub(super) fn owned(&self) -> MutexGuard<'_, HashMap<InstanceName, Owned>> {
        self.owned.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub(super) fn owns(&self, name: &InstanceName) -> bool {
        self.owned().contains_key(name)
    }

    fn stopping(&self) -> bool {
        self.stopped.load(Ordering::SeqCst)
    }

    pub(super) fn answers(&self) -> MutexGuard<'_, Answers> {
        self.answers.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub(super) fn stats(&self) -> MutexGuard<'_, ClusterStats> {
        self.stats.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub(super) fn nats(&self, op: &'static str, e: impl std::fmt::Display) -> ClusterError {
        ClusterError::Nats { url: self.config.url.clone(), op, message: e.to_string() }
    }

    pub(super) fn engine(&self) -> Result<&Engine, ClusterError> {
        self.engine.get().ok_or_else(|| self.nats("starting", "the engine is not started"))
    }

    fn headers(&self, epoch: u64, expected_last: Option<u64>) -> HeaderMap {
        let mut h = HeaderMap::new();
        if let Some(last) = expected_last.filter(|_| self.config.fencing) {
            h.insert("Nats-Expected-Last-Subject-Sequence", last.to_string().as_str());
        }
        h.insert(entry::EPOCH_HEADER, epoch.to_string().as_str());
        h.insert(entry::HOST_HEADER, self.config.host.as_str());
        h
    }

    /// Publishes an entry expecting `last` as the subject's last sequence
    /// (as a roll-up of the subject with `rollup`); returns the new entry's
    /// stream sequence, or `Err(None)` when the stream refused it for a
    /// newer entry (a newer owner).
    async fn publish(
        &self,
        name: &InstanceName,
        epoch: u64,
        last: u64,
        entry: &StreamEntry,
        rollup: bool,
    ) -> Result<u64, Option<String>> {
        let mut headers = self.headers(epoch, Some(last));
        if rollup {
            headers.insert("Nats-Rollup", "sub");
        }
        let subject = subject_of(&self.config.namespace, name);
        let published = self.js.publish_with_headers(subject, headers, entry.encode().into()).await;
        let ack = match published {
            Ok(ack) => ack.await,
            Err(e) => Err(e),
        };
        match ack {
            Ok(ack) => Ok(ack.sequence),
            Err(e) if e.kind() == jetstream::context::PublishErrorKind::WrongLastSequence => Err(None),
            Err(e) => Err(Some(e.to_string())),
        }
    }

    /// Claims the lease of `name` (create-if-absent): the epoch, or the owner.
    pub(super) async fn claim(&self, name: &InstanceName) -> Result<Result<u64, String>, ClusterError> {
        let key = token_of(name);
        let value = self.config.host.clone().into_bytes();
        let won = if self.config.fencing {
            self.reader
                .kv
                .create(&key, value.into())
                .await
                .map_err(|e| (e.kind() == kv::CreateErrorKind::AlreadyExists, e.to_string()))
        } else {
            // Without fencing a claim is a plain write: the last writer thinks it owns.
            self.reader.kv.put(&key, value.into()).await.map_err(|e| (false, e.to_string()))
        };
        match won {
            Ok(epoch) => {
                self.stats().claims += 1;
                debug!(instance = %name, epoch, "lease claimed");
                Ok(Ok(epoch))
            }
            Err((true, _)) => {
                let owner = match self.reader.kv.get(&key).await {
                    Ok(Some(v)) => String::from_utf8_lossy(&v).into_owned(),
                    _ => "another host".into(),
                };
                Ok(Err(owner))
            }
            Err((false, e)) => Err(self.nats("claiming a lease", e)),
        }
    }

    /// Gives a lease back (its key is deleted if it is still our revision).
    pub(super) async fn release(&self, name: &InstanceName, revision: u64) {
        match self.reader.kv.delete_expect_revision(token_of(name), Some(revision)).await {
            Ok(()) => debug!(instance = %name, revision, "lease given back"),
            Err(e) => debug!(instance = %name, error = %e, "lease not released (already gone or taken)"),
        }
    }

    /// How many entries `name`'s subject holds now (1 when it cannot say).
    async fn entries_of(&self, name: &InstanceName) -> u64 {
        let subject = subject_of(&self.config.namespace, name);
        let Ok(mut subjects) = self.reader.stream.info_with_subjects(subject.clone()).await else { return 1 };
        while let Some(Ok((s, count))) = subjects.next().await {
            if s == subject {
                return u64::try_from(count).unwrap_or(u64::MAX);
            }
        }
        1
    }

    /// Becomes the owner of `name` with `epoch`: appends the takeover (after
    /// whatever the subject holds now) and hands the instance to the engine.
    /// Returns the state the engine holds it in, or `None` for a name with
    /// no history yet (a create goes on from there).
    pub(super) async fn take_over(
        self: &Arc<Self>,
        name: &InstanceName,
        epoch: u64,
        claimed_at: Instant,
        spec_if_new: Option<&InstanceSpec>,
    ) -> Result<Option<State>, ClusterError> {
        for _attempt in 0..5 {
            let last = self.reader.last_entry(name).await?;
            let (last_seq, previous) = match &last {
                Some((seq, bytes)) => {
                    let entry = StreamEntry::decode(bytes).map_err(|e| self.nats("decoding an entry", e))?;
                    (*seq, Some(entry))
                }
                None => (0, None),
            };
            let spec = match (&previous, spec_if_new) {
                (Some(p), _) => p.spec().clone(),
                (None, Some(spec)) => spec.clone(),
                (None, None) => return Ok(None),
            };
            let takeover = StreamEntry::Takeover {
                epoch,
                host: self.config.host.clone(),
                from_host: previous.as_ref().map(|p| p.host().to_owned()),
                seq: previous.as_ref().map_or(0, StreamEntry::seq),
                at: self.engine.get().map_or(crate::machine::Timestamp(0), Engine::now),
                to: previous.as_ref().and_then(|p| p.instance().cloned()),
                spec: spec.clone(),
            };
            let stream_seq = match self.publish(name, epoch, last_seq, &takeover, false).await {
                Ok(seq) => seq,
                // The old owner wrote meanwhile (its lease ran out unnoticed): read again.
                Err(None) => continue,
                Err(Some(e)) => return Err(self.nats("appending a takeover", e)),
            };
            {
                let mut stats = self.stats();
                stats.takeovers += 1;
                if previous.as_ref().is_some_and(|p| p.host() != self.config.host) {
                    stats.failovers += 1;
                }
            }
            let entries = if previous.is_some() { self.entries_of(name).await } else { 1 };
            let owned = Owned {
                epoch,
                revision: epoch,
                last: stream_seq,
                entries,
                deadline: claimed_at + self.local_ttl(),
                spec: spec.clone(),
            };
            self.owned().insert(name.clone(), owned);
            let Some(previous) = previous else { return Ok(None) };
            let Some(to) = previous.instance().cloned() else { return Ok(None) };
            let engine = self.engine()?;
            engine.relinquish(name);
            let anchor = Digest::of(&takeover.encode());
            // A host that stopped meanwhile must not start a socket nobody will watch over.
            if self.stopping() {
                return Err(self.nats("taking over", "the host is stopping"));
            }
            let state = engine.adopt(name.as_str(), spec, to, previous.seq(), anchor).await?;
            if self.stopping() {
                engine.relinquish(name);
                return Err(self.nats("taking over", "the host is stopping"));
            }
            info!(instance = %name, epoch, from = previous.host(), state = %state.kind(), "took over");
            return Ok(Some(state));
        }
        Err(self.nats("appending a takeover", "the subject kept changing; the previous owner is still writing"))
    }

    /// Takes an instance that has no live owner (and is not removed): claims
    /// its lease and takes it over from its stream. Whether this host owns it now.
    pub(super) async fn adopt(self: &Arc<Self>, name: &InstanceName) -> Result<bool, ClusterError> {
        if self.owns(name) {
            return Ok(true);
        }
        if self.stopping() {
            return Ok(false);
        }
        // Removed instances need no owner.
        if let Some((_, bytes)) = self.reader.last_entry(name).await?
            && StreamEntry::decode(&bytes).is_ok_and(|e| e.removed())
        {
            return Ok(false);
        }
        // The lease's clock starts before the claim is sent, never after.
        let claimed_at = Instant::now();
        let Ok(epoch) = self.claim(name).await? else { return Ok(false) };
        let span = tracing::info_span!("takeover", instance = %name, epoch);
        match self.take_over(name, epoch, claimed_at, None).instrument(span).await {
            Ok(Some(_)) => Ok(true),
            // A claim whose creator died before its first record: nothing to own.
            Ok(None) => {
                self.owned().remove(name);
                self.release(name, epoch).await;
                Ok(false)
            }
            Err(e) => {
                warn!(instance = %name, error = %e, "takeover failed; giving the lease back");
                self.owned().remove(name);
                self.release(name, epoch).await;
                Err(e)
            }
        }
    }

    /// The local deadline of a lease renewed now: the TTL less one tick,
    /// so the socket is dropped before the server lets another host claim.
    pub(super) fn local_ttl(&self) -> Duration {
        self.config.lease_ttl.saturating_sub(self.config.tick())
    }

    /// Lets go of an instance: forgets the lease and, unless the instance's
    /// own task is the caller (it stops by itself on the refusal), drops its
    /// task and socket at once.
    fn lose(&self, name: &InstanceName, why: &str, drop_task: bool) {
        if self.owned().remove(name).is_some() {
            self.stats().lost += 1;
            warn!(instance = %name, why, "lease lost; dropping the instance");
        }
        if drop_task && let Some(engine) = self.engine.get() {
            engine.relinquish(name);
        }
    }

    /// Drops every instance whose lease is past this host's deadline for
    /// it. Never waits on NATS: it runs on its own timer, so a host cut off
    /// from NATS still closes its sockets in time.
    fn enforce_deadlines(&self) {
        if !self.config.fencing {
            return;
        }
        let now = Instant::now();
        let expired: Vec<InstanceName> =
            self.owned().iter().filter(|(_, o)| now >= o.deadline).map(|(n, _)| n.clone()).collect();
        for name in expired {
            self.lose(&name, "its local deadline passed before a renewal", true);
        }
    }

    /// Gives back the leases of instances removed here: a removed instance
    /// needs no owner (R1), and its name is free for a create on any host.
    async fn release_removed(&self) {
        let Some(engine) = self.engine.get() else { return };
        let removed: Vec<(InstanceName, u64)> = self
            .owned()
            .iter()
            .filter(|(n, _)| matches!(engine.state(n.as_str()), Err(EngineError::Removed { .. })))
            .map(|(n, o)| (n.clone(), o.revision))
            .collect();
        for (name, revision) in removed {
            self.owned().remove(&name);
            // Not ours any more: a later create may happen on any host.
            engine.relinquish(&name);
            self.release(&name, revision).await;
        }
    }

    /// Renews one lease, if this host still holds it.
    async fn renew(&self, name: InstanceName, o: Owned) -> Option<InstanceName> {
        let start = Instant::now();
        let value = self.config.host.clone().into_bytes();
        let update = self.reader.kv.update(token_of(&name), value.into(), o.revision);
        // A renewal that takes longer than the period is as good as failed.
        match tokio::time::timeout(self.config.renew_every, update).await {
            Ok(Ok(revision)) => {
                debug!(instance = %name, revision, "lease renewed");
                if let Some(mine) = self.owned().get_mut(&name).filter(|m| m.epoch == o.epoch) {
                    mine.revision = revision;
                    mine.deadline = start + self.local_ttl();
                }
                Some(name)
            }
            Ok(Err(e)) if e.kind() == kv::UpdateErrorKind::WrongLastRevision && self.config.fencing => {
                self.lose(&name, "another host holds the lease", true);
                None
            }
            Ok(Err(e)) => {
                debug!(instance = %name, error = %e, "renewal failed; retrying until the deadline");
                None
            }
            Err(_) => {
                debug!(instance = %name, "renewal timed out; retrying until the deadline");
                None
            }
        }
    }

    /// One round: renew the leases that are due (all at once).
    async fn round(self: &Arc<Self>, renewed: &mut HashMap<InstanceName, Instant>) {
        self.enforce_deadlines();
        self.release_removed().await;
        let now = Instant::now();
        let due: Vec<(InstanceName, Owned)> = self
            .owned()
            .iter()
            .filter(|(n, _)| renewed.get(*n).is_none_or(|at| now.duration_since(*at) >= self.config.renew_every))
            .map(|(n, o)| (n.clone(), o.clone()))
            .collect();
        let renewals = futures_util::future::join_all(due.into_iter().map(|(n, o)| self.renew(n, o))).await;
        for name in renewals.into_iter().flatten() {
            renewed.insert(name, now);
        }
        renewed.retain(|n, _| self.owned().contains_key(n));
    }

    /// Compacts `name`'s subject after its record at `stream_seq`, if it is
    /// due: a snapshot of the instance as that record left it, published as
    /// a roll-up that replaces every earlier entry — fenced like any append
    /// (a newer owner's entry makes the server refuse it). Not while a
    /// reader (a webhook) has entries of the subject to read.
    async fn compact(&self, name: &InstanceName, o: &Owned, stream_seq: u64, record: &Offered<'_>) {
        let Some(retention) = self.config.retention.as_ref().filter(|_| self.compacting) else { return };
        if o.entries <= retention.keep_records || stream_seq >= self.hold.load(Ordering::SeqCst) {
            return;
        }
        let snapshot = StreamEntry::Snapshot {
            epoch: o.epoch,
            host: self.config.host.clone(),
            seq: record.seq,
            at: record.at,
            to: record.to.clone(),
            spec: o.spec.clone(),
        };
        let rolled = self.publish(name, o.epoch, stream_seq, &snapshot, true).await;
        let mut owned = self.owned();
        let Some(mine) = owned.get_mut(name).filter(|m| m.epoch == o.epoch) else { return };
        match rolled {
            Ok(seq) => {
                mine.last = seq;
                mine.entries = 1;
                drop(owned);
                self.stats().snapshots += 1;
                debug!(instance = %name, seq = record.seq, stream_seq = seq, "subject compacted");
            }
            // A newer owner wrote: this host's next record is refused, and it lets go then.
            Err(None) => {}
            // Unknown whether the server rolled it up: the next record finds out (a refusal
            // then hands the instance over from whatever the stream holds).
            Err(Some(e)) => debug!(instance = %name, error = %e, "compaction not confirmed"),
        }
    }

    /// What readers (webhooks) and durable consumers still have to read:
    /// compaction keeps every entry from the oldest unread one on, but never
    /// more than `backlog_max` entries behind the stream's end. Without a
    /// reader nothing is held.
    async fn refresh_hold(&self) {
        let mut stream = self.reader.stream.clone();
        let last = match stream.info().await {
            Ok(info) => info.state.last_sequence,
            Err(e) => return debug!(error = %e, "cannot read the stream's end; the hold stays"),
        };
        let mut floor = u64::MAX;
        let mut consumers = stream.consumers();
        while let Some(c) = consumers.next().await {
            match c {
                Ok(c) if c.config.durable_name.is_some() => {
                    floor = floor.min(c.ack_floor.stream_sequence.saturating_add(1));
                }
                Ok(_) => {}
                Err(e) => return debug!(error = %e, "cannot list the stream's consumers; the hold stays"),
            }
        }
        let mut keys = match self.readers.keys().await {
            Ok(keys) => keys,
            Err(e) => return debug!(error = %e, "cannot list the stream's readers; the hold stays"),
        };
        while let Some(key) = keys.next().await {
            let Ok(key) = key else { return debug!("cannot list the stream's readers; the hold stays") };
            match self.readers.get(&key).await {
                Ok(Some(value)) => {
                    if let Ok(reader) = serde_json::from_slice::<super::ReaderCursor>(&value) {
                        floor = floor.min(reader.cursor.saturating_add(1));
                    }
                }
                Ok(None) => {}
                Err(e) => return debug!(error = %e, "cannot read a reader's cursor; the hold stays"),
            }
        }
        let bound = last.saturating_sub(self.config.backlog_max);
        self.hold.store(floor.max(bound), Ordering::SeqCst);
    }

    /// Deletes the subjects of instances removed longer than the retention's
    /// `removed_after` ago; each under a claim of its lease, so a create of
    /// the name on another host meanwhile is never wiped.
    async fn purge_removed(self: &Arc<Self>) {
        let Some(retention) = self.config.retention.as_ref() else { return };
        let Ok(engine) = self.engine() else { return };
        let now = engine.now();
        let due: Vec<_> = self
            .view
            .rows()
            .into_iter()
            .filter(|(_, r)| r.removed() && now.saturating_since(r.at) >= retention.removed_after)
            .collect();
        for (name, row) in due {
            if self.owns(&name) {
                continue;
            }
            let Ok(Ok(epoch)) = self.claim(&name).await else { continue };
            let last = self.reader.last_entry(&name).await;
            match last {
                Ok(None) => self.view.forget(&name),
                Ok(Some((seq, bytes)))
                    if seq == row.stream_seq && StreamEntry::decode(&bytes).is_ok_and(|e| e.removed()) =>
                {
                    if !self.compacting {
                        self.release(&name, epoch).await;
                        continue;
                    }
                    let subject = subject_of(&self.config.namespace, &name);
                    match self.reader.stream.purge().filter(subject).await {
                        Ok(_) => {
                            self.view.forget(&name);
                            self.stats().purged += 1;
                            info!(instance = %name, "removed instance purged from the stream");
                        }
                        Err(e) => warn!(instance = %name, error = %e, "cannot purge a removed instance's subject"),
                    }
                }
                // Created again meanwhile, or unreadable now: leave it.
                Ok(Some(_)) | Err(_) => {}
            }
            self.release(&name, epoch).await;
        }
    }

    /// Runs a request another host forwarded, if this host owns the instance.
    pub(super) async fn serve(&self, request: Request) -> Reply {
        if !self.owns(request.name()) {
            return Reply::NotOwner;
        }
        let Ok(engine) = self.engine() else { return Reply::NotOwner };
        match request {
            Request::Command { name, command } => match engine.command(name.as_str(), command).await {
                Ok(state) => Reply::State(state),
                Err(e) => Reply::failed(&e),
            },
            Request::Create { name, spec } => match engine.create(name.as_str(), spec).await {
                Ok(()) => Reply::Created,
                Err(e) => Reply::failed(&e),
            },
            Request::Signal { name, input } => match engine.signal(name.as_str(), input).await {
                Ok(signaled) => Reply::Signaled(signaled),
                Err(e) => Reply::failed(&e),
            },
        }
    }
}

/// The loop that keeps a host's leases, until the host stops or is dropped;
/// and, every renewal period, the compaction hold.
pub(super) async fn keep_leases(inner: Weak<Inner>, mut stop: watch::Receiver<bool>) {
    let mut renewed = HashMap::new();
    let (tick, every) = match inner.upgrade() {
        Some(i) => (i.config.tick(), i.config.renew_every),
        None => return,
    };
    let mut held = Instant::now() - every;
    loop {
        tokio::select! {
            _ = stop.wait_for(|s| *s) => return,
            () = tokio::time::sleep(tick) => {}
        }
        let Some(inner) = inner.upgrade() else { return };
        inner.round(&mut renewed).await;
        if inner.compacting && held.elapsed() >= every {
            held = Instant::now();
            inner.refresh_hold().await;
        }
    }
}

/// The watchdog: drops instances past their lease deadline, on its own
/// timer, whatever the renewals are waiting for.
pub(super) async fn watch_deadlines(inner: Weak<Inner>, mut stop: watch::Receiver<bool>) {
    let Some(tick) = inner.upgrade().map(|i| i.config.tick()) else { return };
    loop {
        tokio::select! {
            _ = stop.wait_for(|s| *s) => return,
            () = tokio::time::sleep(tick) => {}
        }
        let Some(inner) = inner.upgrade() else { return };
        inner.enforce_deadlines();
    }
}

/// Takes instances without a live owner: once at start (every instance the
/// view holds without a lease), then as leases announce their end (a
/// release, or the server's marker when one runs out) — never by listing
/// the stream, so the work does not grow with the fleet.
pub(super) async fn find_orphans(inner: Weak<Inner>, mut stop: watch::Receiver<bool>) {
    let Some(first) = inner.upgrade() else { return };
    let every = first.config.renew_every;
    let mut candidates = first.view.unowned();
    drop(first);
    loop {
        for name in candidates {
            let Some(inner) = inner.upgrade() else { return };
            if *stop.borrow() {
                return;
            }
            if let Err(e) = inner.adopt(&name).await {
                debug!(instance = %name, error = %e, "taking an orphan failed; it stays a candidate");
            }
        }
        let Some(view) = inner.upgrade().map(|i| i.view.clone()) else { return };
        tokio::select! {
            () = view.orphan_found(every) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        candidates = view.take_orphans();
    }
}

/// Purges removed instances past their retention, every `retention_every`.
pub(super) async fn keep_retention(inner: Weak<Inner>, mut stop: watch::Receiver<bool>) {
    let Some(every) = inner.upgrade().map(|i| i.config.retention_every) else { return };
    loop {
        tokio::select! {
            _ = stop.wait_for(|s| *s) => return,
            () = tokio::time::sleep(every) => {}
        }
        let Some(inner) = inner.upgrade() else { return };
        inner.purge_removed().await;
    }
}

/// Serves the requests other hosts forward to this one, each in its own
/// task (a logout may take its whole bound), until `stop`: says "accepted"
/// at once, runs each request id once, and answers every copy of it.
pub(super) async fn serve_requests(
    inner: Weak<Inner>,
    mut requests: async_nats::Subscriber,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        let message = tokio::select! {
            m = requests.next() => m,
            _ = stop.wait_for(|s| *s) => return,
        };
        let Some(message) = message else { return };
        let Some(inner) = inner.upgrade() else { return };
        let Some(inbox) = message.reply.as_ref().map(ToString::to_string) else { continue };
        tokio::spawn(async move {
            let send = async |to: &str, reply: &Reply| {
                if let Err(e) = inner.client.publish(to.to_owned(), reply.encode().into()).await {
                    debug!(error = %e, "an answer to a forwarded request was not sent");
                }
            };
            let envelope = match serde_json::from_slice::<Envelope>(&message.payload) {
                Ok(e) => e,
                Err(e) => {
                    let reply = Reply::Failed { code: "invalid_body".into(), message: format!("not a request: {e}") };
                    return send(&inbox, &reply).await;
                }
            };
            if !inner.owns(envelope.request.name()) {
                return send(&inbox, &Reply::NotOwner).await;
            }
            send(&inbox, &Reply::Accepted).await;
            let seen = inner.answers().arrived(&envelope.id, &inbox);
            match seen {
                Seen::Done(reply) => send(&inbox, &reply).await,
                Seen::Running => {}
                Seen::New => {
                    let span = tracing::info_span!("forwarded", instance = %envelope.request.name());
                    let reply = inner.serve(envelope.request).instrument(span).await;
                    let repeats = inner.answers().finished(&envelope.id, &reply);
                    for to in std::iter::once(inbox).chain(repeats) {
                        send(&to, &reply).await;
                    }
                }
            }
        });
    }
}

/// The fence the engine writes through.
pub(super) struct StreamFence(pub(super) Arc<Inner>);

impl Fence for StreamFence {
    fn record<'a>(&'a self, name: &'a InstanceName, record: Offered<'a>) -> FenceFuture<'a> {
        Box::pin(async move {
            let inner = &self.0;
            let Some(o) = inner.owned().get(name).cloned() else {
                return Err(Refused("this host does not own the instance".into()));
            };
            if inner.config.fencing && Instant::now() >= o.deadline {
                inner.lose(name, "its local deadline passed", false);
                return Err(Refused("the lease's local deadline passed".into()));
            }
            let entry = StreamEntry::Record {
                epoch: o.epoch,
                host: inner.config.host.clone(),
                seq: record.seq,
                at: record.at,
                event: record.event.clone(),
                to: record.to.clone(),
                spec: o.spec.clone(),
            };
            match inner.publish(name, o.epoch, o.last, &entry, false).await {
                Ok(stream_seq) => {
                    if matches!(record.to.state, State::Removed { .. }) {
                        // A removed instance needs no owner (R1): its name is free for a
                        // create on any host at once. The engine keeps it as removed.
                        let mine = inner.owned().remove(name);
                        if let Some(mine) = mine {
                            inner.release(name, mine.revision).await;
                        }
                        return Ok(());
                    }
                    let now = {
                        let mut owned = inner.owned();
                        let Some(mine) = owned.get_mut(name).filter(|m| m.epoch == o.epoch) else { return Ok(()) };
                        mine.last = stream_seq;
                        mine.entries += 1;
                        mine.clone()
                    };
                    inner.compact(name, &now, stream_seq, &record).await;
                    Ok(())
                }
                Err(None) => {
                    inner.stats().refused += 1;
                    // Not `lose`: the task that called us stops by itself on this answer.
                    inner.owned().remove(name);
                    Err(Refused("the stream holds a newer entry: another host took the instance over".into()))
                }
                Err(Some(e)) => {
                    // Unknown whether the stream has it: this host stops the instance (the
                    // task does, on this answer) and gives the lease back, so that an owner
                    // — this host or another — takes it over from what the stream holds.
                    let removed = inner.owned().remove(name);
                    if let Some(mine) = removed {
                        inner.stats().lost += 1;
                        let (inner, name) = (inner.clone(), name.clone());
                        tokio::spawn(async move { inner.release(&name, mine.revision).await });
                    }
                    Err(Refused(format!("the stream did not take the record: {e}")))
                }
            }
        })
    }
}

/// The stream the cluster's records go to: created if missing; an existing
/// one is taken as it is. Whether it allows compaction (roll-ups need the
/// purge permission; a stream made by an earlier version denies it, and
/// JetStream never lifts that).
pub(super) async fn open_stream(
    js: &jetstream::Context,
    config: &ClusterConfig,
) -> Result<(stream::Stream, bool), String> {
    if let Ok(mut existing) = js.get_stream(config.stream()).await {
        let info = existing.info().await.map_err(|e| e.to_string())?;
        let rollups = info.config.allow_rollup && !info.config.deny_purge;
        if !rollups && config.retention.is_some() {
            warn!(
                stream = %config.stream(),
                "the stream denies roll-ups (made by an earlier version): it will not be compacted; \
                 copy it to a new namespace to bound it"
            );
        }
        return Ok((existing, rollups));
    }
    let stream = js
        .get_or_create_stream(stream::Config {
            name: config.stream(),
            description: Some("instance-lifecycle: every instance's records, one subject each".into()),
            subjects: vec![super::view::all_instances(&config.namespace)],
            storage: stream::StorageType::File,
            num_replicas: config.replicas,
            allow_direct: true,
            // Nobody deletes a single record. Roll-ups (compaction) need the purge
            // permission: keep hosts' NATS users from purging with NATS permissions.
            deny_delete: true,
            deny_purge: false,
            allow_rollup: true,
            ..Default::default()
        })
        .await
        .map_err(|e| e.to_string())?;
    Ok((stream, true))
}
