//! Beyond one host: every instance has exactly one owner across a fleet of
//! hosts, on NATS JetStream (feature `cluster`), and any host answers for
//! any instance.
//!
//! - **Ownership** is a key per instance in a JetStream KV bucket. A host
//!   claims a name with create-if-absent and renews it by compare-and-set on
//!   the revision it holds; the bucket's `max_age` is the lease's TTL (a
//!   renewal writes a new revision, whose age starts again). The revision of
//!   the winning claim is the instance's **epoch**, its fencing token.
//! - **The log of record** is a stream with one subject per instance. The
//!   engine writes every record through a [`Fence`](crate::engine::Fence):
//!   it is published with `Nats-Expected-Last-Subject-Sequence` (the last
//!   entry this owner wrote or read) and the epoch in a header, so once a
//!   newer owner has appended its `Takeover`, every append of the older one
//!   is refused by the server — not by us. Only then does the record reach
//!   the local log (a cache, which this host keeps in a temporary
//!   directory) and the instance move.
//! - **Any host answers** ([`Cluster::command`], [`Cluster::create`],
//!   [`Cluster::signal`]): a command for an instance another host owns is
//!   forwarded to the owner over NATS request–reply and answered with what
//!   the owner's engine said (module `rpc`); reads ([`Cluster::state`],
//!   [`Cluster::list`], [`Cluster::history`]) come from the stream, through
//!   a [`View`] each host folds from it, with read-your-writes.
//! - **Leases end locally too**: a host drops an instance's socket when its
//!   own deadline for the lease passes (it starts before the server's clock
//!   for the same lease), on its first refused append, or when a renewal
//!   finds the key gone or taken — whichever is first.
//! - **Placement**: a host takes instances that have no live owner — on
//!   create, when a lease announces its end (released, or run out: the
//!   bucket's limit markers), and when a command finds one.
//! - **A bounded stream**: an owner compacts its instance's subject when it
//!   holds more than `retention.keep_records` entries — a snapshot written
//!   as a roll-up, fenced like any append — and removed instances' subjects
//!   are purged `retention.removed_after` their removal; never past what a
//!   reader (a webhook: [`ReaderCursor`]) or a durable consumer has yet to read.
//!
//! The engine's rules (R1–R12) hold per instance on whichever host owns it;
//! a new owner takes the instance as start-up recovery does (R11).

pub mod entry;
mod host;
mod rpc;
pub mod view;

use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use async_nats::jetstream::{self, consumer, kv, stream};
use futures_util::StreamExt;
use tokio::time::Instant;
use tracing::Instrument;

use crate::engine::{Command, Engine, EngineConfig, EngineError, Signaled, at_rest};
use crate::log::{InstanceSpec, Log, LogError, Record, Retention};
use crate::machine::{Input, InstanceName, Policy, State};
pub use entry::{StreamCheck, StreamEntry, StreamViolation, check, name_of, token_of};
use host::{Inner, StreamFence};
use rpc::{Envelope, Reply, Request};
pub use view::{Row, Tap, View};

/// How long a joining host waits for its view to read the stream and the
/// leases: reading a stream of a million entries takes tens of seconds.
const CATCH_UP_MAX: Duration = Duration::from_secs(300);

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
    /// How often leases are renewed: a third of the TTL gives two chances
    /// to renew before a lease runs out.
    pub renew_every: Duration,
    /// Replicas of the stream and the bucket (1 on a single server; 3 on a
    /// three-node cluster).
    pub replicas: usize,
    /// Whether appends carry the expected last subject sequence and leases
    /// are checked. Only for showing what breaks without it: never turn it off.
    pub fencing: bool,
    /// How long a request to NATS may take before it counts as failed.
    pub request_timeout: Duration,
    /// What the stream keeps: per instance, a snapshot and at most
    /// `keep_records` entries after it; a removed instance's subject for
    /// `removed_after`. `None`: everything, for ever.
    pub retention: Option<Retention>,
    /// How often removed instances past their retention are looked for: an
    /// hour, as the local log's compaction.
    pub retention_every: Duration,
    /// Entries compaction may leave unread behind a reader (a
    /// webhook that is down) before it compacts anyway: a million entries
    /// hold a receiver that is down for days at normal rates.
    pub backlog_max: u64,
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
            retention: Some(Retention::default()),
            retention_every: Duration::from_secs(3600),
            backlog_max: 1_000_000,
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
        if self.retention.as_ref().is_some_and(|r| r.keep_records == 0) {
            return bad("retention.keep_records", "must be at least 1");
        }
        if self.retention_every.is_zero() {
            return bad("retention_every", "must be above zero");
        }
        Ok(())
    }

    fn bucket(&self) -> String {
        format!("{}-owners", self.namespace)
    }

    fn stream(&self) -> String {
        format!("{}-log", self.namespace)
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
    /// The instance's owner (another host) answered with its engine's error.
    #[error("{message}")]
    Remote {
        /// The host that answered.
        owner: String,
        /// The engine's error code ([`EngineError::code`]).
        code: String,
        /// The engine's message.
        message: String,
    },
    /// No answer within the bound (the owner may have carried the command out).
    #[error("{what} of {name} got no answer within {waited:?}")]
    TimedOut {
        /// The instance.
        name: InstanceName,
        /// What was asked.
        what: &'static str,
        /// How long it waited.
        waited: Duration,
    },
    /// The engine refused.
    #[error(transparent)]
    Engine(#[from] EngineError),
}

impl ClusterError {
    /// A stable, machine-readable name for the error: the engine's code for
    /// the engine's errors (this host's or the owner's), `timed_out`, or
    /// `cluster_unavailable`.
    pub fn code(&self) -> &str {
        match self {
            Self::Engine(e) => e.code(),
            Self::Remote { code, .. } => code,
            Self::TimedOut { .. } => "timed_out",
            Self::Config { .. } | Self::Nats { .. } | Self::NoCluster { .. } => "cluster_unavailable",
        }
    }
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
    /// Subjects this host compacted into a snapshot.
    pub snapshots: u64,
    /// Removed instances this host purged from the stream.
    pub purged: u64,
    /// Commands this host forwarded to another host's instance.
    pub forwarded: u64,
}

/// A reader of the stream that compaction must wait for (a webhook's
/// deliverer): its entry in the cluster's `<namespace>-readers` bucket. The
/// host holding it writes it by compare-and-set on the entry's revision, so
/// that two hosts never both believe they hold it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ReaderCursor {
    /// The host that reads now (empty: nobody; the next host to look takes it).
    pub host: String,
    /// The stream sequence of the last entry it is done with.
    pub cursor: u64,
}

/// What a routed request was answered with.
enum Answer {
    State(State),
    Created,
    Signaled(Signaled),
}

/// A host of the cluster: an engine whose records go through the cluster's
/// stream, the loops that keep its leases and its view of the cluster, and
/// the subject on which it runs commands for other hosts. Cheap to clone.
#[derive(Clone)]
pub struct Cluster {
    inner: Arc<Inner>,
    engine: Engine,
    stop: Arc<tokio::sync::watch::Sender<bool>>,
}

impl Cluster {
    /// Joins the cluster: connects, makes sure the bucket and the stream
    /// exist, starts an engine on a temporary local log (a cache: the
    /// stream is the log of record) with `engine` as its configuration,
    /// reads the stream and the leases into its view, and starts keeping
    /// leases and serving forwarded commands.
    pub async fn join(config: ClusterConfig, engine: EngineConfig) -> Result<(Self, Engine), ClusterError> {
        Self::join_with(config, engine, Vec::new()).await
    }

    /// [`Cluster::join`], with taps that see every entry of the stream as
    /// the view applies it — from the first on, before `join` returns.
    pub async fn join_with(
        config: ClusterConfig,
        mut engine: EngineConfig,
        taps: Vec<Arc<dyn Tap>>,
    ) -> Result<(Self, Engine), ClusterError> {
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
        let js = jetstream::new(client.clone());
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
                // A lease that runs out leaves a marker: every host's view hears of it.
                limit_markers: Some(config.lease_ttl),
                storage: jetstream::stream::StorageType::File,
                num_replicas: config.replicas,
                ..Default::default()
            })
            .await
            .map_err(|e| nats("creating the lease bucket", &e))?;
        let (stream, rollups) = host::open_stream(&js, &config).await.map_err(|e| nats("creating the stream", &e))?;
        let readers = js
            .create_or_update_key_value(kv::Config {
                bucket: format!("{}-readers", config.namespace),
                description: "instance-lifecycle: readers of the stream compaction waits for (value: host, cursor)"
                    .into(),
                history: 1,
                storage: jetstream::stream::StorageType::File,
                num_replicas: config.replicas,
                ..Default::default()
            })
            .await
            .map_err(|e| nats("creating the readers' bucket", &e))?;
        let reader = ClusterReader { url: config.url.clone(), namespace: config.namespace.clone(), kv, stream };
        let view = View::new(&config.namespace, config.lease_ttl, config.renew_every);
        for tap in taps {
            view.tap(tap);
        }
        let requests = client
            .subscribe(rpc::subject(&config.namespace, &config.host))
            .await
            .map_err(|e| nats("subscribing", &e))?;
        let inner = Arc::new(Inner {
            compacting: rollups && config.retention.is_some(),
            config,
            js,
            client,
            reader,
            view,
            owned: Mutex::default(),
            engine: OnceLock::new(),
            stats: Mutex::default(),
            hold: AtomicU64::new(0),
            answers: Mutex::default(),
            asked: AtomicU64::new(0),
            readers,
            stopped: std::sync::atomic::AtomicBool::new(false),
        });
        engine.fence = Some(Arc::new(StreamFence(inner.clone())));
        let log = Log::temporary(engine.log.clone()).map_err(|e| EngineError::log(None, e))?;
        let started = Engine::with_log(log, engine).await?;
        let _ = inner.engine.set(started.clone());
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let cluster = Self { inner: inner.clone(), engine: started.clone(), stop: Arc::new(stop) };
        let weak = Arc::downgrade(&inner);
        let (stream, ns, kv) = (inner.reader.stream.clone(), inner.config.namespace.clone(), inner.reader.kv.clone());
        tokio::spawn(view::follow_stream(Arc::downgrade(&inner.view), stream, ns, stopped.clone()));
        tokio::spawn(view::follow_leases(Arc::downgrade(&inner.view), kv, stopped.clone()));
        if let Err(e) = cluster.catch_up().await {
            cluster.halt();
            return Err(e);
        }
        tokio::spawn(host::keep_leases(weak.clone(), stopped.clone()));
        tokio::spawn(host::watch_deadlines(weak.clone(), stopped.clone()));
        tokio::spawn(host::find_orphans(weak.clone(), stopped.clone()));
        tokio::spawn(host::keep_retention(weak.clone(), stopped.clone()));
        tokio::spawn(host::serve_requests(weak, requests, stopped));
        Ok((cluster, started))
    }

    /// Waits until the view has read every lease and every entry the stream holds now.
    async fn catch_up(&self) -> Result<(), ClusterError> {
        let view = &self.inner.view;
        if !view.leases_read(CATCH_UP_MAX).await {
            return Err(self.inner.nats("reading the leases", format!("not done within {CATCH_UP_MAX:?}")));
        }
        let last = self.last_stream_seq(None).await?;
        if !view.applied_through(last, CATCH_UP_MAX).await {
            return Err(self.inner.nats("reading the stream", format!("not done within {CATCH_UP_MAX:?}")));
        }
        Ok(())
    }

    /// The stream sequence of the newest entry (of one instance, or of all).
    async fn last_stream_seq(&self, name: Option<&InstanceName>) -> Result<u64, ClusterError> {
        let ns = &self.inner.config.namespace;
        let subject = name.map_or_else(|| view::all_instances(ns), |n| view::subject_of(ns, n));
        match self.inner.reader.stream.get_last_raw_message_by_subject(&subject).await {
            Ok(m) => Ok(m.sequence),
            Err(e) if e.kind() == stream::LastRawMessageErrorKind::NoMessageFound => Ok(0),
            Err(e) => Err(self.inner.nats("reading the newest entry", e)),
        }
    }

    /// Waits until this host's view holds everything the stream holds now
    /// (of one instance, or of all): a read after it shows at least the
    /// state any command answered before it ended in, on any host.
    pub async fn sync(&self, name: Option<&InstanceName>) -> Result<(), ClusterError> {
        let last = self.last_stream_seq(name).await?;
        let bound = self.inner.config.request_timeout;
        if self.inner.view.applied_through(last, bound).await {
            Ok(())
        } else {
            Err(self.inner.nats("reading the stream", format!("the view did not reach entry {last} within {bound:?}")))
        }
    }

    /// The fence this host's engine writes through: whoever records
    /// transitions for an instance this host owns (a benchmark of the write
    /// path, a host with its own recorder) appends through the same checks.
    pub fn fence(&self) -> Arc<dyn crate::engine::Fence> {
        Arc::new(StreamFence(self.inner.clone()))
    }

    /// This host's id.
    pub fn host(&self) -> &str {
        &self.inner.config.host
    }

    /// The cluster's namespace (its bucket, stream and subjects are named after it).
    pub fn namespace(&self) -> &str {
        &self.inner.config.namespace
    }

    /// The JetStream context of this host's NATS connection (for a
    /// service's own buckets beside the cluster's).
    pub fn jetstream(&self) -> &jetstream::Context {
        &self.inner.js
    }

    /// This host's NATS connection.
    pub fn client(&self) -> &async_nats::Client {
        &self.inner.client
    }

    /// The NATS server's URL.
    pub fn url(&self) -> &str {
        &self.inner.config.url
    }

    /// The readers of the stream that compaction waits for ([`ReaderCursor`] by reader).
    pub fn readers(&self) -> &kv::Store {
        &self.inner.readers
    }

    /// The stream of record.
    pub fn stream(&self) -> &stream::Stream {
        &self.inner.reader.stream
    }

    /// This host's view of the cluster.
    pub fn view(&self) -> &View {
        &self.inner.view
    }

    /// Creates an instance, on any host: a name no host owns is claimed
    /// here (its takeover appended, then `Created`); a name another host
    /// owns is created by that host, which answers — `already_exists` for a
    /// live one, or it creates a removed one again. A removed name nobody
    /// owns is taken over here and created again.
    pub async fn create(&self, name: &str, spec: InstanceSpec) -> Result<(), ClusterError> {
        let name = InstanceName::new(name).map_err(EngineError::from)?;
        let deadline = Instant::now() + self.engine.command_bound();
        let mut pause = Pause::new(self.inner.config.renew_every);
        let envelope = self.envelope(Request::Create { name: name.clone(), spec: spec.clone() });
        loop {
            if self.inner.owns(&name) {
                return Ok(self.engine.create(name.as_str(), spec).await?);
            }
            // The lease's clock starts before the claim is sent, never after.
            let claimed_at = Instant::now();
            match self.inner.claim(&name).await? {
                Ok(epoch) => {
                    let span = tracing::info_span!("takeover", instance = %name, epoch);
                    return match self.inner.take_over(&name, epoch, claimed_at, Some(&spec)).instrument(span).await {
                        Ok(Some(State::Removed { .. }) | None) => Ok(self.engine.create(name.as_str(), spec).await?),
                        Ok(Some(_)) => Err(EngineError::AlreadyExists { name }.into()),
                        Err(e) => {
                            self.inner.owned().remove(&name);
                            self.inner.release(&name, epoch).await;
                            Err(e)
                        }
                    };
                }
                Err(owner) if owner != self.host() => {
                    if let Some(answer) = self.ask(&owner, &envelope, deadline).await? {
                        return answer.map(|_| ());
                    }
                }
                // The bucket names this host, which holds no lease: a takeover of its own is under way.
                Err(_) => {}
            }
            pause.wait(&name, "create", deadline).await?;
        }
    }

    /// Runs a host command for an instance, on any host: here if this host
    /// owns it, on its owner otherwise (forwarded once; its answer is this
    /// answer). An instance without a live owner is taken over here first; a
    /// removed one is answered as the engine answers a removed instance.
    /// Returns once the owner's engine has answered, within its command bound.
    pub async fn command(&self, name: &str, command: Command) -> Result<State, ClusterError> {
        let name = InstanceName::new(name).map_err(EngineError::from)?;
        match self.route(Request::Command { name, command }).await? {
            Answer::State(state) => Ok(state),
            Answer::Created | Answer::Signaled(_) => Err(self.inner.nats("forwarding", "an answer of another kind")),
        }
    }

    /// Connects (or reconnects now), on whichever host owns the instance.
    pub async fn connect(&self, name: &str) -> Result<State, ClusterError> {
        self.command(name, Command::Connect).await
    }

    /// Logs out, on whichever host owns the instance (ends `Closed`, R5).
    pub async fn logout(&self, name: &str) -> Result<State, ClusterError> {
        self.command(name, Command::Logout).await
    }

    /// Restarts, on whichever host owns the instance.
    pub async fn restart(&self, name: &str) -> Result<State, ClusterError> {
        self.command(name, Command::Restart).await
    }

    /// Deletes, on whichever host owns the instance (ends `Removed`, R2).
    pub async fn delete(&self, name: &str) -> Result<State, ClusterError> {
        self.command(name, Command::Delete).await
    }

    /// Reports a signal of a connection the host holds itself (see
    /// [`Engine::signal`]), to whichever host owns the instance.
    pub async fn signal(&self, name: &str, input: Input) -> Result<Signaled, ClusterError> {
        let name = InstanceName::new(name).map_err(EngineError::from)?;
        match self.route(Request::Signal { name, input }).await? {
            Answer::Signaled(signaled) => Ok(signaled),
            Answer::Created | Answer::State(_) => Err(self.inner.nats("forwarding", "an answer of another kind")),
        }
    }

    /// Runs `request` where its instance is owned (see [`Cluster::command`]).
    async fn route(&self, request: Request) -> Result<Answer, ClusterError> {
        let (name, what) = (request.name().clone(), request.what());
        let deadline = Instant::now() + self.engine.command_bound();
        let mut pause = Pause::new(self.inner.config.renew_every);
        let envelope = self.envelope(request);
        loop {
            if self.inner.owns(&name) {
                return self.here(envelope.request).await;
            }
            match self.inner.view.owner(&name) {
                Some(owner) if owner != self.host() => {
                    if let Some(answer) = self.ask(&owner, &envelope, deadline).await? {
                        return answer;
                    }
                }
                // The bucket names this host, which holds no lease: a takeover of its own is under way.
                Some(_) => {}
                None => {
                    if let Some(answer) = self.unowned(&envelope.request).await? {
                        return answer;
                    }
                }
            }
            pause.wait(&name, what, deadline).await?;
        }
    }

    /// Runs a request on this host's engine.
    async fn here(&self, request: Request) -> Result<Answer, ClusterError> {
        let engine = &self.engine;
        Ok(match request {
            Request::Command { name, command } => Answer::State(engine.command(name.as_str(), command).await?),
            Request::Create { name, spec } => {
                engine.create(name.as_str(), spec).await?;
                Answer::Created
            }
            Request::Signal { name, input } => Answer::Signaled(engine.signal(name.as_str(), input).await?),
        })
    }

    /// A request for an instance no host holds a lease on: unknown,
    /// removed (the table answers, nothing moves: R1), or an orphan, which
    /// this host takes over (`None`: run it now that it is here, or ask again).
    async fn unowned(&self, request: &Request) -> Result<Option<Result<Answer, ClusterError>>, ClusterError> {
        let name = request.name();
        self.sync(Some(name)).await?;
        let Some(row) = self.inner.view.row(name) else {
            return Ok(Some(Err(EngineError::UnknownInstance { name: name.clone() }.into())));
        };
        if row.removed() {
            let (input, signal) = match request {
                Request::Command { command, .. } => (command.input(), false),
                Request::Signal { input, .. } => (input.clone(), true),
                Request::Create { .. } => return Ok(None),
            };
            let policy = self.engine.policy();
            let answer = match at_rest(name, &row.instance, &input, policy, self.engine.now()) {
                Some(Ok((instance, why))) if signal => Ok(Answer::Signaled(Signaled::ignored(&instance, why))),
                Some(Ok((instance, _))) => Ok(Answer::State(instance.state)),
                Some(Err(e)) => Err(e.into()),
                // R1: the table never moves a removed instance.
                None => Err(EngineError::Removed { name: name.clone() }.into()),
            };
            return Ok(Some(answer));
        }
        if let Err(e) = self.inner.adopt(name).await {
            tracing::debug!(instance = %name, error = %e, "taking over an orphan for a command failed; asking again");
        }
        Ok(None)
    }

    /// Asks `owner` to run `request` (once: see module `rpc`); `None` when it
    /// does not own the instance (any more), or nobody took the request in
    /// a renewal period (the owner is gone): look again, and ask again with the same id.
    async fn ask(
        &self,
        owner: &str,
        envelope: &Envelope,
        deadline: Instant,
    ) -> Result<Option<Result<Answer, ClusterError>>, ClusterError> {
        let client = &self.inner.client;
        let inbox = client.new_inbox();
        let mut answers =
            client.subscribe(inbox.clone()).await.map_err(|e| self.inner.nats("forwarding a command", e))?;
        let payload = serde_json::to_vec(envelope).unwrap_or_default();
        let subject = rpc::subject(&self.inner.config.namespace, owner);
        self.inner.stats().forwarded += 1;
        client
            .publish_with_reply(subject, inbox, payload.into())
            .await
            .map_err(|e| self.inner.nats("forwarding a command", e))?;
        let request = &envelope.request;
        let accept_by = (Instant::now() + self.inner.config.renew_every).min(deadline);
        let mut accepted = false;
        loop {
            let by = if accepted { deadline } else { accept_by };
            let message = match tokio::time::timeout_at(by, answers.next()).await {
                Ok(Some(m)) => m,
                Ok(None) => return Err(self.inner.nats("forwarding a command", "the answer's subscription ended")),
                // Nobody took it: a host that died (look again).
                Err(_) if !accepted => return Ok(None),
                Err(_) => {
                    let waited = self.engine.command_bound();
                    return Err(ClusterError::TimedOut { name: request.name().clone(), what: request.what(), waited });
                }
            };
            if message.status == Some(async_nats::StatusCode::NO_RESPONDERS) {
                return Ok(None);
            }
            let reply: Reply = serde_json::from_slice(&message.payload)
                .map_err(|e| self.inner.nats("reading an owner's answer", e))?;
            return Ok(match reply {
                Reply::Accepted => {
                    accepted = true;
                    continue;
                }
                Reply::NotOwner => None,
                Reply::State(state) => Some(Ok(Answer::State(state))),
                Reply::Created => Some(Ok(Answer::Created)),
                Reply::Signaled(s) => Some(Ok(Answer::Signaled(s))),
                Reply::Failed { code, message } => {
                    Some(Err(ClusterError::Remote { owner: owner.to_owned(), code, message }))
                }
            });
        }
    }

    /// A new request of this host's, with its id.
    fn envelope(&self, request: Request) -> Envelope {
        let n = self.inner.asked.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Envelope { id: format!("{}-{}-{n}", self.host(), std::process::id()), request }
    }

    /// An instance's state, from the log of record, on any host (removed:
    /// [`EngineError::Removed`]; unknown: [`EngineError::UnknownInstance`]).
    pub async fn state(&self, name: &str) -> Result<State, ClusterError> {
        let name = InstanceName::new(name).map_err(EngineError::from)?;
        match self.row(&name).await? {
            Some(row) if row.removed() => Err(EngineError::Removed { name }.into()),
            Some(row) => Ok(row.instance.state),
            None => Err(EngineError::UnknownInstance { name }.into()),
        }
    }

    /// An instance's row of the view (removed ones too, until purged), read-your-writes.
    pub async fn row(&self, name: &InstanceName) -> Result<Option<Row>, ClusterError> {
        self.sync(Some(name)).await?;
        Ok(self.inner.view.row(name))
    }

    /// Every instance that is not removed, with its state, by name, from
    /// the log of record, read-your-writes.
    pub async fn list(&self) -> Result<Vec<(InstanceName, State)>, ClusterError> {
        self.sync(None).await?;
        Ok(self
            .inner
            .view
            .rows()
            .into_iter()
            .filter(|(_, r)| !r.removed())
            .map(|(n, r)| (n, r.instance.state))
            .collect())
    }

    /// An instance's records as the stream holds them (since its last
    /// snapshot, if compacted), numbered by stream sequence.
    pub async fn history(&self, name: &str) -> Result<Vec<Record>, ClusterError> {
        let name = InstanceName::new(name).map_err(EngineError::from)?;
        let entries = self.inner.reader.entries(&name).await?;
        let records: Vec<Record> = entries
            .iter()
            .filter_map(|(seq, _, entry)| entry.as_ref().ok().and_then(|e| e.to_record(&name, *seq)))
            .collect();
        if entries.is_empty() { Err(EngineError::UnknownInstance { name }.into()) } else { Ok(records) }
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

    /// Whether this host owns `name` now.
    pub fn owns(&self, name: &InstanceName) -> bool {
        self.inner.owns(name)
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

    /// Leaves the cluster gracefully: stops keeping leases and serving
    /// forwarded commands, stops the engine (sockets dropped, states kept)
    /// and gives every lease back, so other hosts take the instances at
    /// once rather than after the TTL.
    pub async fn leave(&self) -> Result<(), ClusterError> {
        self.inner.stopped.store(true, std::sync::atomic::Ordering::SeqCst);
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
        self.inner.stopped.store(true, std::sync::atomic::Ordering::SeqCst);
        self.stop.send_replace(true);
        let engine = self.engine();
        // Every socket goes: the leases' and any a takeover under way started.
        let owned: Vec<_> = self.inner.owned().drain().map(|(n, _)| n).collect();
        for name in owned.into_iter().chain(engine.list().into_iter().map(|(n, _)| n)) {
            engine.relinquish(&name);
        }
    }
}

/// The pause between looks for an instance's owner (a takeover under way,
/// a lease about to run out): short at first, at most half a renewal period.
struct Pause {
    next: Duration,
    max: Duration,
}

impl Pause {
    fn new(renew_every: Duration) -> Self {
        Self { next: Duration::from_millis(5), max: renew_every / 2 }
    }

    async fn wait(&mut self, name: &InstanceName, what: &'static str, deadline: Instant) -> Result<(), ClusterError> {
        let now = Instant::now();
        if now + self.next >= deadline {
            let waited = self.max.max(deadline.saturating_duration_since(now));
            return Err(ClusterError::TimedOut { name: name.clone(), what, waited });
        }
        tokio::time::sleep(self.next).await;
        self.next = (self.next * 2).min(self.max);
        Ok(())
    }
}

/// Reads a cluster's leases and streams without taking part in it (an
/// operator's view: `lifecycle cluster`). Cheap to clone.
#[derive(Clone)]
pub struct ClusterReader {
    url: String,
    namespace: String,
    pub(crate) kv: kv::Store,
    pub(crate) stream: stream::Stream,
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
        view::subject_of(&self.namespace, name)
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
    pub(crate) async fn last_entry(&self, name: &InstanceName) -> Result<Option<(u64, Vec<u8>)>, ClusterError> {
        match self.stream.get_last_raw_message_by_subject(&self.subject(name)).await {
            Ok(m) => Ok(Some((m.sequence, m.payload.to_vec()))),
            Err(e) if e.kind() == stream::LastRawMessageErrorKind::NoMessageFound => Ok(None),
            Err(e) => Err(self.nats("reading the last entry", e)),
        }
    }

    /// Every entry of `name`'s subject, in order: its stream sequence, its
    /// epoch header, and the entry (or why it is not one of ours). Read with
    /// one ordered consumer; when the server cannot make one (a replicated
    /// stream electing its leader), an entry at a time by direct gets, which
    /// any replica answers.
    pub async fn entries(
        &self,
        name: &InstanceName,
    ) -> Result<Vec<(u64, Option<String>, Result<StreamEntry, String>)>, ClusterError> {
        let Some((last, _)) = self.last_entry(name).await? else { return Ok(Vec::new()) };
        match self.entries_by_consumer(name, last).await {
            Ok(entries) => Ok(entries),
            Err(e) => {
                tracing::debug!(instance = %name, error = %e, "reading a subject by direct gets");
                self.entries_one_by_one(name).await
            }
        }
    }

    async fn entries_by_consumer(
        &self,
        name: &InstanceName,
        last: u64,
    ) -> Result<Vec<(u64, Option<String>, Result<StreamEntry, String>)>, ClusterError> {
        let config = consumer::pull::OrderedConfig { filter_subject: self.subject(name), ..Default::default() };
        let consumer = self.stream.create_consumer(config).await.map_err(|e| self.nats("reading a subject", e))?;
        let mut messages = consumer.messages().await.map_err(|e| self.nats("reading a subject", e))?;
        let mut entries = Vec::new();
        while let Some(m) = messages.next().await {
            let m = m.map_err(|e| self.nats("reading a subject", e))?;
            let seq = m.info().map_err(|e| self.nats("reading a subject", e))?.stream_sequence;
            let header = m.headers.as_ref().and_then(|h| h.get(entry::EPOCH_HEADER)).map(|v| v.as_str().to_owned());
            entries.push((seq, header, StreamEntry::decode(&m.payload).map_err(|e| e.to_string())));
            if seq >= last {
                break;
            }
        }
        Ok(entries)
    }

    async fn entries_one_by_one(
        &self,
        name: &InstanceName,
    ) -> Result<Vec<(u64, Option<String>, Result<StreamEntry, String>)>, ClusterError> {
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
        Ok(entries)
    }

    /// Every entry of `name`'s subject, in order, checked (see [`check`]);
    /// with a policy, every transition is replayed through the rules too.
    pub async fn verify(&self, name: &InstanceName, policy: Option<&Policy>) -> Result<StreamCheck, ClusterError> {
        Ok(check(name, &self.entries(name).await?, policy))
    }
}

impl From<LogError> for ClusterError {
    fn from(e: LogError) -> Self {
        Self::Engine(EngineError::log(None, e))
    }
}
