//! Beyond one host: every instance has exactly one owner across a fleet of
//! hosts, on NATS JetStream (feature `cluster`).
//!
//! - **Ownership** is a key per instance in a JetStream KV bucket. A host
//!   claims a name with create-if-absent and renews it by compare-and-set on
//!   the revision it holds; the bucket's `max_age` is the lease's TTL (a
//!   renewal writes a new revision, whose age starts again). The revision of
//!   the winning claim is the instance's **epoch**, its fencing token.
//! - **The log of record** is a stream with one subject per instance. The
//!   engine writes every record through a [`Fence`]: it is published with
//!   `Nats-Expected-Last-Subject-Sequence` (the last entry this owner wrote
//!   or read) and the epoch in a header, so once a newer owner has appended
//!   its `Takeover`, every append of the older one is refused by the server
//!   — not by us. Only then does the record reach the local log (a cache,
//!   which this host keeps in a temporary directory) and the instance move.
//! - **Leases end locally too**: a host drops an instance's socket when its
//!   own deadline for the lease passes (it starts before the server's clock
//!   for the same lease), on its first refused append, or when a renewal
//!   finds the key gone or taken — whichever is first.
//! - **Placement**: a host takes instances that have no live owner — on
//!   create, and, twice per renewal period, any instance whose lease ran
//!   out (the first host to claim it wins).
//!
//! The engine's rules (R1–R12) hold per instance on whichever host owns it;
//! a new owner takes the instance as start-up recovery does (R11).

pub mod entry;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream::{self, kv, stream};
use futures_util::StreamExt;
use tokio::time::Instant;
use tracing::{Instrument, debug, info, warn};

use crate::engine::{Engine, EngineConfig, EngineError, Fence, FenceFuture, Offered, Refused};
use crate::log::{Digest, InstanceSpec, Log, LogError};
use crate::machine::{InstanceName, Policy, State};
pub use entry::{StreamCheck, StreamEntry, StreamViolation, check, name_of, token_of};

/// How a host joins a cluster.
#[derive(Clone, Debug)]
pub struct ClusterConfig {
    /// The NATS server (`nats://127.0.0.1:4222`).
    pub url: String,
    /// This host's id, unique in the cluster (a safe name: letters, digits, `-`, `_`, `.`).
    pub host: String,
    /// Prefix of the bucket, the stream and the subjects, so that several
    /// clusters can share one NATS server: `lifecycle` gives bucket
    /// `lifecycle-owners`, stream `lifecycle-log`, subjects `lifecycle.inst.<name>`.
    pub namespace: String,
    /// How long a lease lives without renewal: how long an instance of a
    /// dead host stays without owner. 10 s: a short stall does not move
    /// instances, a dead host's instances move within seconds.
    pub lease_ttl: Duration,
    /// How often leases are renewed and orphans looked for: a third of the
    /// TTL gives two chances to renew before a lease runs out.
    pub renew_every: Duration,
    /// Replicas of the stream and the bucket (1 on a single server; 3 on a
    /// three-node cluster).
    pub replicas: usize,
    /// Whether appends carry the expected last subject sequence and leases
    /// are checked. Only for showing what breaks without it: never turn it off.
    pub fencing: bool,
    /// How long a request to NATS may take before it counts as failed.
    pub request_timeout: Duration,
}

impl ClusterConfig {
    /// A host `host` of the cluster at `url`, with the defaults.
    pub fn new(url: impl Into<String>, host: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            host: host.into(),
            namespace: "lifecycle".into(),
            lease_ttl: Duration::from_secs(10),
            renew_every: Duration::from_secs(10) / 3,
            replicas: 1,
            fencing: true,
            request_timeout: Duration::from_secs(5),
        }
    }

    fn validate(&self) -> Result<(), ClusterError> {
        let bad = |field, reason: &str| Err(ClusterError::Config { field, reason: reason.into() });
        if InstanceName::new(self.host.as_str()).is_err() {
            return bad(
                "host",
                "must be a safe name (letters, digits, '-', '_', '.'; starting with a letter or digit)",
            );
        }
        if self.namespace.is_empty()
            || !self.namespace.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return bad("namespace", "must be letters, digits, '-' or '_'");
        }
        if self.lease_ttl < Duration::from_secs(1) {
            return bad("lease_ttl", "must be at least 1 s (the server expires keys on whole seconds' timers)");
        }
        if self.renew_every.is_zero() || self.renew_every * 2 > self.lease_ttl {
            return bad("renew_every", "must be above zero and at most half the lease TTL");
        }
        if self.replicas == 0 {
            return bad("replicas", "must be at least 1");
        }
        Ok(())
    }

    fn bucket(&self) -> String {
        format!("{}-owners", self.namespace)
    }

    fn stream(&self) -> String {
        format!("{}-log", self.namespace)
    }

    fn subject(&self, name: &InstanceName) -> String {
        format!("{}.inst.{}", self.namespace, token_of(name))
    }

    /// How often the host looks at its leases: often enough that a socket
    /// is dropped close to its local deadline.
    fn tick(&self) -> Duration {
        (self.renew_every / 4).max(Duration::from_millis(20))
    }
}

/// An error of the cluster.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClusterError {
    /// A setting that cannot work.
    #[error("invalid cluster configuration: {field} {reason}")]
    Config {
        /// The field.
        field: &'static str,
        /// Why.
        reason: String,
    },
    /// NATS could not be reached or answered with an error.
    #[error("NATS at {url}: {op}: {message}")]
    Nats {
        /// The server.
        url: String,
        /// What was being done.
        op: &'static str,
        /// What NATS said.
        message: String,
    },
    /// No cluster in that namespace on that server.
    #[error(
        "no instance-lifecycle cluster in namespace {namespace:?} at {url} (no {namespace}-owners bucket or {namespace}-log stream)"
    )]
    NoCluster {
        /// The server.
        url: String,
        /// The namespace asked for.
        namespace: String,
    },
    /// Another host owns the instance.
    #[error("instance {name} is owned by host {owner}")]
    OwnedElsewhere {
        /// The instance.
        name: InstanceName,
        /// Its owner.
        owner: String,
    },
    /// The engine refused.
    #[error(transparent)]
    Engine(#[from] EngineError),
}

/// One owned instance.
#[derive(Clone, Debug)]
struct Owned {
    /// The fencing token: the revision of the winning claim.
    epoch: u64,
    /// The lease's current revision (what the next renewal compares with).
    revision: u64,
    /// The stream sequence of the last entry of the instance's subject.
    last: u64,
    /// When this host stops trusting the lease.
    deadline: Instant,
    /// What the instance connects to (every entry carries it).
    spec: InstanceSpec,
}

/// What a host did, for the simulator's summary and tests.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ClusterStats {
    /// Instances this host owns now.
    pub owned: usize,
    /// Leases won.
    pub claims: u64,
    /// Takeovers appended (one per lease won).
    pub takeovers: u64,
    /// Takeovers of instances another host owned before (failovers).
    pub failovers: u64,
    /// Appends the stream refused (a newer owner wrote).
    pub refused: u64,
    /// Leases lost (deadline passed, key gone or taken).
    pub lost: u64,
}

struct Inner {
    config: ClusterConfig,
    js: jetstream::Context,
    reader: ClusterReader,
    owned: Mutex<HashMap<InstanceName, Owned>>,
    engine: OnceLock<Engine>,
    stats: Mutex<ClusterStats>,
}

impl Inner {
    fn owned(&self) -> MutexGuard<'_, HashMap<InstanceName, Owned>> {
        self.owned.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn stats(&self) -> MutexGuard<'_, ClusterStats> {
        self.stats.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn nats(&self, op: &'static str, e: impl std::fmt::Display) -> ClusterError {
        ClusterError::Nats { url: self.config.url.clone(), op, message: e.to_string() }
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

    /// Publishes an entry expecting `last` as the subject's last sequence;
    /// returns the new entry's stream sequence, or `Err(None)` when the
    /// stream refused it for a newer entry (a newer owner).
    async fn publish(
        &self,
        name: &InstanceName,
        epoch: u64,
        last: u64,
        entry: &StreamEntry,
    ) -> Result<u64, Option<String>> {
        let headers = self.headers(epoch, Some(last));
        let published = self.js.publish_with_headers(self.config.subject(name), headers, entry.encode().into()).await;
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
    async fn claim(&self, name: &InstanceName) -> Result<Result<u64, String>, ClusterError> {
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
    async fn release(&self, name: &InstanceName, revision: u64) {
        if let Err(e) = self.reader.kv.delete_expect_revision(token_of(name), Some(revision)).await {
            debug!(instance = %name, error = %e, "lease not released (already gone or taken)");
        }
    }

    /// Becomes the owner of `name` with `epoch`: appends the takeover (after
    /// whatever the subject holds now) and hands the instance to the engine.
    /// Returns the state the engine holds it in, or `None` for a name with
    /// no history yet (a create goes on from there).
    async fn take_over(
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
            let stream_seq = match self.publish(name, epoch, last_seq, &takeover).await {
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
            let owned = Owned {
                epoch,
                revision: epoch,
                last: stream_seq,
                deadline: claimed_at + self.local_ttl(),
                spec: spec.clone(),
            };
            self.owned().insert(name.clone(), owned);
            let Some(previous) = previous else { return Ok(None) };
            let Some(to) = previous.instance().cloned() else { return Ok(None) };
            let engine = self.engine.get().ok_or_else(|| self.nats("taking over", "the engine is not started"))?;
            engine.relinquish(name);
            let anchor = Digest::of(&takeover.encode());
            let state = engine.adopt(name.as_str(), spec, to, previous.seq(), anchor).await?;
            info!(instance = %name, epoch, from = previous.host(), state = %state.kind(), "took over");
            return Ok(Some(state));
        }
        Err(self.nats("appending a takeover", "the subject kept changing; the previous owner is still writing"))
    }

    /// The local deadline of a lease renewed now: the TTL less one tick,
    /// so the socket is dropped before the server lets another host claim.
    fn local_ttl(&self) -> Duration {
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

    /// One round: renew the leases that are due (all at once), and take
    /// instances without a live owner.
    async fn round(self: &Arc<Self>, renewed: &mut HashMap<InstanceName, Instant>, scan: bool) {
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
        if !scan {
            return;
        }
        if let Err(e) = self.adopt_orphans().await {
            debug!(error = %e, "looking for instances without an owner failed; trying next round");
        }
    }

    /// Takes every instance whose subject has entries, that is not removed,
    /// and whose lease is free.
    async fn adopt_orphans(self: &Arc<Self>) -> Result<(), ClusterError> {
        for name in self.reader.names().await? {
            if self.owned().contains_key(&name) {
                continue;
            }
            match self.reader.kv.entry(token_of(&name)).await {
                Ok(Some(e)) if e.operation == kv::Operation::Put => continue,
                Ok(_) => {}
                Err(e) => return Err(self.nats("reading a lease", e)),
            }
            // Removed instances need no owner.
            if let Some((_, bytes)) = self.reader.last_entry(&name).await?
                && StreamEntry::decode(&bytes).is_ok_and(|e| e.removed())
            {
                continue;
            }
            // The lease's clock starts before the claim is sent, never after.
            let claimed_at = Instant::now();
            let Ok(epoch) = self.claim(&name).await? else { continue };
            let span = tracing::info_span!("takeover", instance = %name, epoch);
            match self.take_over(&name, epoch, claimed_at, None).instrument(span).await {
                Ok(Some(_)) => {}
                // A claim whose creator died before its first record: nothing to own.
                Ok(None) => {
                    self.owned().remove(&name);
                    self.release(&name, epoch).await;
                }
                Err(e) => {
                    warn!(instance = %name, error = %e, "takeover failed; giving the lease back");
                    self.owned().remove(&name);
                    self.release(&name, epoch).await;
                }
            }
        }
        Ok(())
    }
}

/// The fence the engine writes through.
struct StreamFence(Arc<Inner>);

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
            match inner.publish(name, o.epoch, o.last, &entry).await {
                Ok(stream_seq) => {
                    if let Some(mine) = inner.owned().get_mut(name).filter(|m| m.epoch == o.epoch) {
                        mine.last = stream_seq;
                    }
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

/// A host of the cluster: an engine whose records go through the cluster's
/// stream, and the loop that keeps its leases. Cheap to clone.
#[derive(Clone)]
pub struct Cluster {
    inner: Arc<Inner>,
    engine: Engine,
    stop: Arc<tokio::sync::watch::Sender<bool>>,
}

impl Cluster {
    /// Joins the cluster: connects, makes sure the bucket and the stream
    /// exist, starts an engine on a temporary local log (a cache: the
    /// stream is the log of record) with `engine` as its configuration, and
    /// starts keeping leases.
    pub async fn join(config: ClusterConfig, mut engine: EngineConfig) -> Result<(Self, Engine), ClusterError> {
        config.validate()?;
        let nats =
            |op, e: &dyn std::fmt::Display| ClusterError::Nats { url: config.url.clone(), op, message: e.to_string() };
        let client = async_nats::ConnectOptions::new()
            .name(format!("lifecycle-{}", config.host))
            .connection_timeout(config.request_timeout)
            .request_timeout(Some(config.request_timeout))
            .connect(config.url.as_str())
            .await
            .map_err(|e| nats("connecting", &e))?;
        let js = jetstream::new(client);
        // Every host must count leases with the bucket's TTL: a host that
        // trusted a longer one could hold a socket past the server's expiry.
        if let Ok(existing) = js.get_key_value(config.bucket()).await {
            let status = existing.status().await.map_err(|e| nats("reading the lease bucket", &e))?;
            if status.max_age() != config.lease_ttl {
                return Err(ClusterError::Config {
                    field: "lease_ttl",
                    reason: format!(
                        "is {:?}, but the cluster's bucket {} expires leases after {:?}: every host must use the same TTL",
                        config.lease_ttl,
                        config.bucket(),
                        status.max_age()
                    ),
                });
            }
        }
        let kv = js
            .create_or_update_key_value(kv::Config {
                bucket: config.bucket(),
                description: "instance-lifecycle: the owner of each instance (key: instance, value: host)".into(),
                history: 1,
                max_age: config.lease_ttl,
                storage: jetstream::stream::StorageType::File,
                num_replicas: config.replicas,
                ..Default::default()
            })
            .await
            .map_err(|e| nats("creating the lease bucket", &e))?;
        let stream = js
            .get_or_create_stream(stream::Config {
                name: config.stream(),
                description: Some("instance-lifecycle: every instance's records, one subject each".into()),
                subjects: vec![format!("{}.inst.>", config.namespace)],
                storage: stream::StorageType::File,
                num_replicas: config.replicas,
                allow_direct: true,
                // History is the point: nobody deletes from it.
                deny_delete: true,
                deny_purge: true,
                ..Default::default()
            })
            .await
            .map_err(|e| nats("creating the stream", &e))?;
        let reader = ClusterReader { url: config.url.clone(), namespace: config.namespace.clone(), kv, stream };
        let inner = Arc::new(Inner {
            config,
            js,
            reader,
            owned: Mutex::default(),
            engine: OnceLock::new(),
            stats: Mutex::default(),
        });
        engine.fence = Some(Arc::new(StreamFence(inner.clone())));
        let log = Log::temporary(engine.log.clone()).map_err(|e| EngineError::log(None, e))?;
        let started = Engine::with_log(log, engine).await?;
        let _ = inner.engine.set(started.clone());
        let (stop, stopped) = tokio::sync::watch::channel(false);
        tokio::spawn(keep_leases(Arc::downgrade(&inner), stopped.clone()));
        tokio::spawn(watch_deadlines(Arc::downgrade(&inner), stopped));
        let stop = Arc::new(stop);
        Ok((Self { inner, engine: started.clone(), stop }, started))
    }

    /// The fence this host's engine writes through: whoever records
    /// transitions for an instance this host owns (a benchmark of the write
    /// path, a host with its own recorder) appends through the same checks.
    pub fn fence(&self) -> Arc<dyn Fence> {
        Arc::new(StreamFence(self.inner.clone()))
    }

    /// This host's id.
    pub fn host(&self) -> &str {
        &self.inner.config.host
    }

    /// Creates an instance owned by this host: claims its lease, appends the
    /// takeover, then creates it in the engine. A name another host owns is
    /// [`ClusterError::OwnedElsewhere`]. A removed name is taken over first
    /// and created again; a name with a live history but no owner is taken
    /// over and `AlreadyExists`.
    pub async fn create(&self, name: &str, spec: InstanceSpec) -> Result<(), ClusterError> {
        let name = InstanceName::new(name).map_err(EngineError::from)?;
        let engine = self.engine();
        if !self.inner.owned().contains_key(&name) {
            // The lease's clock starts before the claim is sent, never after.
            let claimed_at = Instant::now();
            let epoch = match self.inner.claim(&name).await? {
                Ok(epoch) => epoch,
                Err(owner) => return Err(ClusterError::OwnedElsewhere { name, owner }),
            };
            let span = tracing::info_span!("takeover", instance = %name, epoch);
            match self.inner.take_over(&name, epoch, claimed_at, Some(&spec)).instrument(span).await {
                Ok(Some(State::Removed { .. }) | None) => {}
                Ok(Some(_)) => return Err(EngineError::AlreadyExists { name }.into()),
                Err(e) => {
                    self.inner.owned().remove(&name);
                    self.inner.release(&name, epoch).await;
                    return Err(e);
                }
            }
        }
        engine.create(name.as_str(), spec).await?;
        Ok(())
    }

    /// The engine this host runs (commands for instances it owns).
    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// The instances this host owns now, with their epochs.
    pub fn owned(&self) -> Vec<(InstanceName, u64)> {
        let mut out: Vec<_> = self.inner.owned().iter().map(|(n, o)| (n.clone(), o.epoch)).collect();
        out.sort();
        out
    }

    /// What this host did so far.
    pub fn stats(&self) -> ClusterStats {
        let mut s = self.inner.stats().clone();
        s.owned = self.inner.owned().len();
        s
    }

    /// Reads the cluster's leases and streams.
    pub fn reader(&self) -> &ClusterReader {
        &self.inner.reader
    }

    /// Leaves the cluster gracefully: stops keeping leases, stops the
    /// engine (sockets dropped, states kept) and gives every lease back, so
    /// other hosts take the instances at once rather than after the TTL.
    pub async fn leave(&self) -> Result<(), ClusterError> {
        self.stop.send_replace(true);
        self.engine().shutdown().await?;
        let owned: Vec<_> = self.inner.owned().drain().collect();
        for (name, o) in owned {
            self.inner.release(&name, o.revision).await;
        }
        Ok(())
    }

    /// Stops as a crashed host would, for tests and the simulator: no more
    /// renewals, every socket dropped, no lease given back (others take the
    /// instances when the leases run out).
    pub fn halt(&self) {
        self.stop.send_replace(true);
        let engine = self.engine();
        let owned: Vec<_> = self.inner.owned().drain().map(|(n, _)| n).collect();
        for name in owned {
            engine.relinquish(&name);
        }
    }
}

/// Reads a cluster's leases and streams without taking part in it (an
/// operator's view: `lifecycle cluster`). Cheap to clone.
#[derive(Clone)]
pub struct ClusterReader {
    url: String,
    namespace: String,
    kv: kv::Store,
    stream: stream::Stream,
}

impl ClusterReader {
    /// Connects to the cluster in `namespace` at `url`; a server without
    /// one there is [`ClusterError::NoCluster`] (nothing is created).
    pub async fn connect(url: &str, namespace: &str) -> Result<Self, ClusterError> {
        let nats =
            |op, e: &dyn std::fmt::Display| ClusterError::Nats { url: url.to_owned(), op, message: e.to_string() };
        let client = async_nats::ConnectOptions::new()
            .name("lifecycle-reader")
            .connection_timeout(Duration::from_secs(5))
            .connect(url)
            .await
            .map_err(|e| nats("connecting", &e))?;
        let js = jetstream::new(client);
        let absent = || ClusterError::NoCluster { url: url.to_owned(), namespace: namespace.to_owned() };
        let kv = js.get_key_value(format!("{namespace}-owners")).await.map_err(|_| absent())?;
        let stream = js.get_stream(format!("{namespace}-log")).await.map_err(|_| absent())?;
        Ok(Self { url: url.to_owned(), namespace: namespace.to_owned(), kv, stream })
    }

    fn nats(&self, op: &'static str, e: impl std::fmt::Display) -> ClusterError {
        ClusterError::Nats { url: self.url.clone(), op, message: e.to_string() }
    }

    fn subject(&self, name: &InstanceName) -> String {
        format!("{}.inst.{}", self.namespace, token_of(name))
    }

    /// Every instance name the stream has entries for, sorted.
    pub async fn names(&self) -> Result<Vec<InstanceName>, ClusterError> {
        let filter = format!("{}.inst.>", self.namespace);
        let mut subjects =
            self.stream.info_with_subjects(filter).await.map_err(|e| self.nats("listing subjects", e))?;
        let mut names = Vec::new();
        while let Some(s) = subjects.next().await {
            let (subject, _) = s.map_err(|e| self.nats("listing subjects", e))?;
            names.extend(subject.rsplit('.').next().and_then(name_of));
        }
        names.sort();
        Ok(names)
    }

    /// The owner of `name` as the bucket says now (`None`: no live owner).
    pub async fn owner_of(&self, name: &InstanceName) -> Result<Option<String>, ClusterError> {
        match self.kv.get(token_of(name)).await {
            Ok(v) => Ok(v.map(|v| String::from_utf8_lossy(&v).into_owned())),
            Err(e) => Err(self.nats("reading a lease", e)),
        }
    }

    /// The last entry of an instance's subject: its stream sequence and its bytes.
    async fn last_entry(&self, name: &InstanceName) -> Result<Option<(u64, Vec<u8>)>, ClusterError> {
        match self.stream.get_last_raw_message_by_subject(&self.subject(name)).await {
            Ok(m) => Ok(Some((m.sequence, m.payload.to_vec()))),
            Err(e) if e.kind() == stream::LastRawMessageErrorKind::NoMessageFound => Ok(None),
            Err(e) => Err(self.nats("reading the last entry", e)),
        }
    }

    /// Every entry of `name`'s subject, in order, checked (see [`check`]);
    /// with a policy, every transition is replayed through the rules too.
    pub async fn verify(&self, name: &InstanceName, policy: Option<&Policy>) -> Result<StreamCheck, ClusterError> {
        let subject = self.subject(name);
        let mut entries = Vec::new();
        let mut from = 1u64;
        loop {
            let got = self.stream.raw_message_builder().sequence(from).next_by_subject(subject.clone()).send().await;
            let m = match got {
                Ok(m) => m,
                Err(e) if e.kind() == stream::RawMessageErrorKind::NoMessageFound => break,
                Err(e) => return Err(self.nats("reading a subject", e)),
            };
            let header = m.headers.get(entry::EPOCH_HEADER).map(|v| v.as_str().to_owned());
            entries.push((m.sequence, header, StreamEntry::decode(&m.payload).map_err(|e| e.to_string())));
            from = m.sequence.saturating_add(1);
        }
        Ok(check(name, &entries, policy))
    }
}

/// The loop that keeps a host's leases, until the host stops or is dropped.
async fn keep_leases(inner: std::sync::Weak<Inner>, mut stop: tokio::sync::watch::Receiver<bool>) {
    let mut renewed = HashMap::new();
    // Orphans are looked for twice per renewal period: a dead host's
    // instances move within the TTL and half a period of its last renewal.
    let (tick, every) = match inner.upgrade() {
        Some(i) => (i.config.tick(), i.config.renew_every / 2),
        None => return,
    };
    let mut scanned = Instant::now();
    loop {
        tokio::select! {
            _ = stop.wait_for(|s| *s) => return,
            () = tokio::time::sleep(tick) => {}
        }
        let Some(inner) = inner.upgrade() else { return };
        let scan = scanned.elapsed() >= every;
        if scan {
            scanned = Instant::now();
        }
        inner.round(&mut renewed, scan).await;
    }
}

/// The watchdog: drops instances past their lease deadline, on its own
/// timer, whatever the renewals are waiting for.
async fn watch_deadlines(inner: std::sync::Weak<Inner>, mut stop: tokio::sync::watch::Receiver<bool>) {
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

impl From<LogError> for ClusterError {
    fn from(e: LogError) -> Self {
        Self::Engine(EngineError::log(None, e))
    }
}
