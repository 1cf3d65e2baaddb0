//! Webhooks that are never lost: the log is the outbox.
//!
//! A transition and the webhook event that reports it are the same record:
//! nothing is written "in the same step" because there is only one write.
//! Each configured webhook has a cursor — the global sequence number of the
//! last record it has passed — kept in the log's auxiliary space, and a
//! worker that reads committed records after it (a crash cannot take them
//! back), renders each as zero or more events, and posts them one at a time,
//! in log order (so in order per instance), each until it succeeds or its
//! attempts run out. Only then does the cursor move. A crash (even SIGKILL)
//! between a post and the cursor's move redelivers that event after the
//! restart, with the same event id: delivery is at least once.
//!
//! Bounds. Retries back off exponentially with jitter (`backon`), at most
//! `max_attempts` per event; then the event goes to the dead letters, which
//! `GET /v1/webhooks/dead` lists and `POST …/retry` sends again. Dead
//! letters are capped at `dead_letters_max` per webhook; past the cap the
//! oldest is discarded (and logged). The backlog is the log itself: the
//! outbox holds compaction back from records not yet passed, up to
//! `backlog_max` records behind the log's tip; past that, compaction may
//! take the oldest undelivered records (hourly; it keeps each instance's
//! last 1,000 records), and the webhook then skips what is gone.
//!
//! **In a cluster** the outbox is the cluster's stream, not a host's log.
//! Each webhook has one deliverer at a time, whichever host holds the
//! webhook's entry in the cluster's readers bucket (`<namespace>-readers`,
//! a [`ReaderCursor`](crate::cluster::ReaderCursor): the host and the
//! cursor, a stream sequence). The holder reads the stream in order from
//! the cursor (an ordered consumer) and posts each record's events, in
//! stream order — so in order per instance — and moves the cursor by
//! compare-and-set on the entry's revision every few hundred milliseconds,
//! or while it retries, at least every third of `ack_wait`: that write is
//! its lease. A host that finds the entry unchanged for `ack_wait` takes it
//! over from its cursor (what the dead holder delivered since its last
//! write is posted again: at least once, the same event ids); a host that
//! stops cleanly hands it over at once. A holder whose write is refused
//! stops at once: another host holds the webhook. Dead letters live in a KV
//! bucket of the cluster (`<namespace>-dead`), listed and retried from any
//! host. Compaction of the stream waits for every reader's cursor (see `cluster`).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_nats::jetstream::{consumer, kv, stream};
use backon::BackoffBuilder;
use futures_util::StreamExt;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use tokio::sync::watch;
use tracing::Instrument;
use utoipa::ToSchema;

use super::error::{ApiError, ServeError};
use super::events::EventBody;
use super::evolution;
use super::metrics::Metrics;
use crate::engine::Engine;
use crate::log::{Event, Log, LogError, Record};

/// Records read from the log at a time.
const PAGE: usize = 64;

/// The event body a webhook receives.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum WebhookFormat {
    /// One event per record: the shape of `/v1/events` (`created`, `transition`).
    #[default]
    Lifecycle,
    /// Evolution API's envelope `{event, instance, data, date_time, …}` for
    /// `connection.update`, `qrcode.updated`, `logout.instance`, `remove.instance`, `status.instance`.
    Evolution,
}

/// One webhook.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookConfig {
    /// Names the webhook's cursor and dead letters: keep it when the URL changes
    /// (default: the URL). At most 100 bytes of `[A-Za-z0-9._-]`.
    #[serde(default)]
    pub id: Option<String>,
    /// Where events are posted (`http://` or `https://`).
    pub url: String,
    /// Signs every body: `X-Lifecycle-Signature: sha256=HEX`, HMAC-SHA256 of the body with this secret.
    #[serde(default)]
    pub secret: Option<String>,
    /// The body format.
    #[serde(default)]
    pub format: WebhookFormat,
    /// Only these events (`transition`, `created`; or Evolution's names); empty: all.
    #[serde(default)]
    pub events: Vec<String>,
    /// Extra headers on every post.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// Attempts per event before it becomes a dead letter (1..=100).
    #[serde(default = "default_attempts")]
    pub max_attempts: u32,
    /// Bound on one post.
    #[serde(default = "default_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    /// A new webhook starts with the records written after it was added;
    /// `true` starts it at the beginning of the log instead.
    #[serde(default)]
    pub from_start: bool,
}

fn default_attempts() -> u32 {
    10
}

fn default_timeout() -> Duration {
    Duration::from_secs(10)
}

impl WebhookConfig {
    /// A webhook posting lifecycle events to `url`.
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            id: None,
            url: url.into(),
            secret: None,
            format: WebhookFormat::Lifecycle,
            events: Vec::new(),
            headers: BTreeMap::new(),
            max_attempts: default_attempts(),
            timeout: default_timeout(),
            from_start: false,
        }
    }

    /// The id that names its cursor.
    pub fn id(&self) -> String {
        self.id.clone().unwrap_or_else(|| self.url.clone())
    }

    pub(crate) fn check(&self) -> Result<(), ServeError> {
        let bad = |reason: String| Err(ServeError::Invalid { field: "webhooks", reason });
        let url = reqwest::Url::parse(&self.url)
            .map_err(|e| ServeError::Invalid { field: "webhooks.url", reason: format!("{}: {e}", self.url) })?;
        if !matches!(url.scheme(), "http" | "https") {
            return bad(format!("{}: must be http:// or https://", self.url));
        }
        if let Some(id) = &self.id
            && (id.is_empty()
                || id.len() > 100
                || !id.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b)))
        {
            return bad(format!("id {id:?}: 1 to 100 bytes of [A-Za-z0-9._-]"));
        }
        if !(1..=100).contains(&self.max_attempts) {
            return bad(format!("max_attempts {}: must be 1..=100", self.max_attempts));
        }
        if self.timeout.is_zero() {
            return bad("timeout: must be more than zero".into());
        }
        Ok(())
    }
}

/// One event to post.
#[derive(Clone, Debug)]
pub(crate) struct Outgoing {
    /// `GLOBAL` or `GLOBAL.K` for the K-th event of a record (K ≥ 1).
    pub(crate) id: String,
    pub(crate) event: String,
    pub(crate) instance: String,
    pub(crate) body: Vec<u8>,
}

/// An event given up on.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct DeadLetter {
    /// The webhook.
    pub webhook: String,
    /// The event id (as delivered in `X-Lifecycle-Event-Id`).
    pub id: String,
    /// The event name.
    pub event: String,
    /// The instance.
    pub instance: String,
    /// Attempts made.
    pub attempts: u32,
    /// The last failure.
    pub error: String,
    /// When it was given up on (ms since the Unix epoch).
    pub at: u64,
    /// The body, as it was (and will be) posted.
    #[schema(value_type = Object)]
    pub body: serde_json::Value,
}

/// A webhook's progress, for `GET /v1/webhooks`.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct WebhookStatus {
    /// The id.
    pub id: String,
    /// Where it posts.
    pub url: String,
    /// The format.
    pub format: WebhookFormat,
    /// The last record passed (global sequence number).
    pub cursor: u64,
    /// Records committed but not yet passed.
    pub depth: u64,
    /// Dead letters kept.
    pub dead: u64,
}

/// Settings every webhook shares.
#[derive(Clone, Debug)]
pub(crate) struct OutboxLimits {
    pub(crate) dead_letters_max: u64,
    pub(crate) backlog_max: u64,
    pub(crate) server_url: Option<String>,
    /// The engine's policy: what close statuses mean, in lifecycle-format events.
    pub(crate) policy: Arc<crate::machine::Policy>,
}

/// How long the server waits for a cluster host's word on an event before
/// it gives the event to another host (a host at work says so every third of
/// it): how long a host that died holding an event delays it.
pub(crate) const ACK_WAIT: Duration = Duration::from_secs(30);

/// Where the outbox's cursors and dead letters are.
#[derive(Clone)]
enum Backing {
    /// One host: the log (records, cursors and dead letters in its auxiliary space).
    Log(Log),
    /// A cluster: the stream (one deliverer per webhook, its cursor in the
    /// readers bucket), dead letters in a KV bucket.
    Stream(Arc<StreamBacking>),
}

/// A cluster's outbox.
struct StreamBacking {
    stream: stream::Stream,
    namespace: String,
    dead: kv::Store,
    readers: kv::Store,
    /// This host: named in `X-Lifecycle-Host` on every post it makes.
    host: String,
    /// How long a holder's silence makes its webhook another host's.
    ack_wait: Duration,
}

/// How often a holder writes its cursor while it delivers (and at most how
/// much is posted again after it dies): a few writes per second, not one per event.
const CURSOR_EVERY: Duration = Duration::from_millis(250);

/// Every webhook's worker.
pub(crate) struct Outbox {
    workers: Vec<Arc<Worker>>,
    backing: Backing,
    limits: OutboxLimits,
}

struct Worker {
    config: WebhookConfig,
    id: String,
    /// One host: the last record passed (global sequence number).
    cursor: AtomicU64,
    dead: AtomicU64,
    client: reqwest::Client,
    backing: Backing,
    metrics: Arc<Metrics>,
    limits: OutboxLimits,
    pairing: Arc<evolution::PairingCodes>,
}

fn key(id: &str, what: &str) -> Vec<u8> {
    format!("serve/webhook/{id}/{what}").into_bytes()
}

/// A webhook's id as NATS names allow it (consumer names and KV key
/// tokens: letters, digits, `-`, `_`): what can be kept of it, and a digest
/// of the whole, so two ids never share a name (an id defaults to its URL).
fn safe_id(id: &str) -> String {
    let kept: String =
        id.chars().take(40).map(|c| if c.is_ascii_alphanumeric() || c == '-' { c } else { '_' }).collect();
    format!("{kept}-{}", &blake3::hash(id.as_bytes()).to_hex()[..12])
}

/// A webhook's entry in the cluster's readers bucket.
fn reader_key(id: &str) -> String {
    format!("webhook-{}", safe_id(id))
}

/// A dead letter's key in the cluster's bucket: the webhook, then the event, sortable.
fn dead_key(webhook: &str, id: &str) -> String {
    format!("{}.{}", safe_id(webhook), sortable(id))
}

fn now_ms() -> u64 {
    let since = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    u64::try_from(since.as_millis()).unwrap_or(u64::MAX)
}

fn http_client() -> Result<reqwest::Client, ServeError> {
    reqwest::Client::builder()
        .user_agent(concat!("instance-lifecycle/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|e| ServeError::Client(e.to_string()))
}

fn unavailable(what: &str, e: impl std::fmt::Display) -> ApiError {
    ApiError::new(axum::http::StatusCode::SERVICE_UNAVAILABLE, "cluster_unavailable", format!("{what}: {e}"))
}

impl Outbox {
    /// Loads each webhook's cursor (a new one starts at the log's tip, or at its start with `from_start`).
    pub(crate) fn load(
        configs: &[WebhookConfig],
        log: &Log,
        metrics: &Arc<Metrics>,
        limits: OutboxLimits,
        pairing: &Arc<evolution::PairingCodes>,
    ) -> Result<Self, ServeError> {
        let client = http_client()?;
        let mut workers = Vec::new();
        for config in configs {
            let id = checked_id(config, &workers)?;
            let cursor = match log.aux_get(&key(&id, "cursor"))? {
                Some(bytes) => u64::from_be_bytes(bytes.as_slice().try_into().unwrap_or([0; 8])),
                None => {
                    let start = if config.from_start { 0 } else { log.committed() };
                    log.aux_apply(vec![(key(&id, "cursor"), Some(start.to_be_bytes().to_vec()))])?;
                    start
                }
            };
            let dead = log.aux_scan(&key(&id, "dead/"))?.len() as u64;
            workers.push(Arc::new(Worker {
                config: config.clone(),
                id,
                cursor: AtomicU64::new(cursor),
                dead: AtomicU64::new(dead),
                client: client.clone(),
                backing: Backing::Log(log.clone()),
                metrics: metrics.clone(),
                limits: limits.clone(),
                pairing: pairing.clone(),
            }));
        }
        let outbox = Self { workers, backing: Backing::Log(log.clone()), limits };
        outbox.hold();
        Ok(outbox)
    }

    /// A cluster's outbox: each webhook's entry in the readers bucket
    /// (made by the first host; a new one starts at the stream's end, or at
    /// its start with `from_start`), and the dead letters' bucket.
    pub(crate) async fn cluster(
        configs: &[WebhookConfig],
        cluster: &crate::cluster::Cluster,
        metrics: &Arc<Metrics>,
        limits: OutboxLimits,
        pairing: &Arc<evolution::PairingCodes>,
        ack_wait: Duration,
    ) -> Result<Self, ServeError> {
        let client = http_client()?;
        let failed = |what: &str, e: &dyn std::fmt::Display| ServeError::Invalid {
            field: "webhooks",
            reason: format!("{what} on the cluster's NATS: {e}"),
        };
        let dead = cluster
            .jetstream()
            .create_or_update_key_value(kv::Config {
                bucket: format!("{}-dead", cluster.namespace()),
                description: "instance-lifecycle: webhook events given up on (key: webhook.event)".into(),
                history: 1,
                storage: stream::StorageType::File,
                ..Default::default()
            })
            .await
            .map_err(|e| failed("creating the dead letters' bucket", &e))?;
        let stream = cluster.stream().clone();
        let readers = cluster.readers().clone();
        let backing = Backing::Stream(Arc::new(StreamBacking {
            stream: stream.clone(),
            namespace: cluster.namespace().to_owned(),
            dead,
            readers: readers.clone(),
            host: cluster.host().to_owned(),
            ack_wait,
        }));
        // Where a new webhook starts: the stream's end now (or its start).
        let end = {
            let all = crate::cluster::view::all_instances(cluster.namespace());
            match stream.get_last_raw_message_by_subject(&all).await {
                Ok(m) => m.sequence,
                Err(e) if e.kind() == stream::LastRawMessageErrorKind::NoMessageFound => 0,
                Err(e) => return Err(failed("reading the stream's end", &e)),
            }
        };
        let mut workers = Vec::new();
        for config in configs {
            let id = checked_id(config, &workers)?;
            let start =
                crate::cluster::ReaderCursor { host: String::new(), cursor: if config.from_start { 0 } else { end } };
            match readers.create(reader_key(&id), serde_json::to_vec(&start).unwrap_or_default().into()).await {
                Ok(_) => {}
                Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => {}
                Err(e) => return Err(failed("registering the webhook's cursor", &e)),
            }
            let worker = Worker {
                config: config.clone(),
                id,
                cursor: AtomicU64::new(0),
                dead: AtomicU64::new(0),
                client: client.clone(),
                backing: backing.clone(),
                metrics: metrics.clone(),
                limits: limits.clone(),
                pairing: pairing.clone(),
            };
            let kept = worker.dead_letters().await.map_or(0, |d| d.len() as u64);
            worker.dead.store(kept, Ordering::SeqCst);
            workers.push(Arc::new(worker));
        }
        Ok(Self { workers, backing, limits })
    }

    /// Starts the workers; they stop when `shutdown` turns true.
    pub(crate) fn start(
        self: &Arc<Self>,
        engine: &Engine,
        shutdown: &watch::Receiver<bool>,
    ) -> Vec<tokio::task::JoinHandle<()>> {
        self.workers
            .iter()
            .map(|w| {
                let span = tracing::info_span!("webhook", webhook = %w.id);
                match &w.backing {
                    Backing::Log(_) => {
                        tokio::spawn(w.clone().run(self.clone(), engine.clone(), shutdown.clone()).instrument(span))
                    }
                    Backing::Stream(b) => {
                        tokio::spawn(w.clone().run_stream(b.clone(), shutdown.clone()).instrument(span))
                    }
                }
            })
            .collect()
    }

    /// Holds compaction back from every record a webhook has yet to pass, within the backlog bound.
    fn hold(&self) {
        let Backing::Log(log) = &self.backing else { return };
        let Some(min) = self.workers.iter().map(|w| w.cursor.load(Ordering::SeqCst)).min() else {
            log.release_hold();
            return;
        };
        let floor = log.committed().saturating_sub(self.limits.backlog_max);
        log.hold_from(min.max(floor).saturating_add(1));
    }

    pub(crate) async fn status(&self) -> Result<Vec<WebhookStatus>, ApiError> {
        let mut out = Vec::new();
        for w in &self.workers {
            let (cursor, depth) = match &self.backing {
                Backing::Log(log) => {
                    let cursor = w.cursor.load(Ordering::SeqCst);
                    (cursor, log.committed().saturating_sub(cursor))
                }
                Backing::Stream(b) => {
                    let entry = b
                        .readers
                        .get(reader_key(&w.id))
                        .await
                        .map_err(|e| unavailable("reading a webhook's cursor", e))?;
                    let cursor = entry
                        .and_then(|v| serde_json::from_slice::<crate::cluster::ReaderCursor>(&v).ok())
                        .map_or(0, |r| r.cursor);
                    let all = crate::cluster::view::all_instances(&b.namespace);
                    let end = b.stream.get_last_raw_message_by_subject(&all).await.map_or(cursor, |m| m.sequence);
                    (cursor, end.saturating_sub(cursor))
                }
            };
            out.push(WebhookStatus {
                id: w.id.clone(),
                url: w.config.url.clone(),
                format: w.config.format,
                cursor,
                depth,
                dead: w.dead.load(Ordering::SeqCst),
            });
        }
        Ok(out)
    }

    /// Every dead letter of every webhook.
    pub(crate) async fn dead_letters(&self) -> Result<Vec<DeadLetter>, ApiError> {
        let mut out = Vec::new();
        for w in &self.workers {
            out.extend(w.dead_letters().await?.into_iter().map(|(_, letter)| letter));
        }
        Ok(out)
    }

    /// Posts a dead letter once more; removes it when delivered.
    pub(crate) async fn retry(&self, webhook: &str, id: &str) -> Result<(), ApiError> {
        let not_found = || {
            ApiError::new(
                axum::http::StatusCode::NOT_FOUND,
                "not_found",
                format!("no dead letter {id} of webhook {webhook}"),
            )
        };
        let w = self.workers.iter().find(|w| w.id == webhook).ok_or_else(not_found)?;
        let letter = w.dead_letter(id).await?.ok_or_else(not_found)?;
        let outgoing = Outgoing {
            id: letter.id.clone(),
            event: letter.event.clone(),
            instance: letter.instance.clone(),
            body: serde_json::to_vec(&letter.body).unwrap_or_default(),
        };
        match w.post(&outgoing, letter.attempts + 1).await {
            Ok(()) => {
                w.forget_dead(id).await?;
                w.metrics.delivered(&w.id);
                Ok(())
            }
            Err(failure) => {
                w.metrics.failed(&w.id);
                Err(ApiError::new(axum::http::StatusCode::BAD_GATEWAY, "delivery_failed", failure.message))
            }
        }
    }
}

/// A webhook's id, checked and unique among `workers`.
fn checked_id(config: &WebhookConfig, workers: &[Arc<Worker>]) -> Result<String, ServeError> {
    config.check()?;
    let id = config.id();
    if workers.iter().any(|w| w.id == id) {
        return Err(ServeError::Invalid { field: "webhooks", reason: format!("two webhooks with id {id}") });
    }
    Ok(id)
}

/// Dead-letter keys sort by event: `GLOBAL` zero-padded, then `.K`.
fn sortable(id: &str) -> String {
    let (global, k) = id.split_once('.').unwrap_or((id, "0"));
    format!("{:020}.{k}", global.parse::<u64>().unwrap_or(0))
}

/// Why a post failed, and whether trying again can help.
struct Failure {
    message: String,
    permanent: bool,
}

impl Worker {
    async fn run(self: Arc<Self>, outbox: Arc<Outbox>, engine: Engine, mut shutdown: watch::Receiver<bool>) {
        let Backing::Log(log) = self.backing.clone() else { return };
        let mut wake = engine.subscribe();
        loop {
            if *shutdown.borrow() {
                return;
            }
            let (reader, after) = (log.clone(), self.cursor.load(Ordering::SeqCst));
            let page = match tokio::task::spawn_blocking(move || reader.records_after(after, PAGE)).await {
                Ok(Ok(page)) => page,
                Ok(Err(e)) => {
                    tracing::error!(webhook = %self.id, error = %e, "cannot read the log; retrying in 1 s");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
                Err(_) => return,
            };
            self.report(log.committed().saturating_sub(self.cursor.load(Ordering::SeqCst)));
            if page.is_empty() {
                tokio::select! {
                    _ = wake.recv() => {}
                    () = tokio::time::sleep(Duration::from_secs(1)) => {}
                    _ = shutdown.changed() => return,
                }
                continue;
            }
            for record in &page {
                for outgoing in self.render(record).await {
                    if !self.deliver(&outgoing, &mut shutdown).await {
                        return; // shutting down: this record is redelivered after the restart
                    }
                }
                if let Err(e) = self.advance(&log, record.global) {
                    tracing::error!(webhook = %self.id, error = %e, "cannot save the cursor; retrying in 1 s");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    break;
                }
                outbox.hold();
            }
        }
    }

    /// A cluster host's worker: holds the webhook when no other host does,
    /// and delivers from its cursor while it holds it.
    async fn run_stream(self: Arc<Self>, backing: Arc<StreamBacking>, mut shutdown: watch::Receiver<bool>) {
        let mut watched: Option<(u64, tokio::time::Instant)> = None;
        loop {
            if *shutdown.borrow() {
                return;
            }
            match self.take(&backing, &mut watched).await {
                Some((revision, cursor)) => {
                    tracing::info!(webhook = %self.id, cursor, "delivering this webhook from this host");
                    if self.deliver_from(&backing, revision, cursor, &mut shutdown).await {
                        return;
                    }
                    watched = None;
                }
                None => {
                    tokio::select! {
                        () = tokio::time::sleep(backing.ack_wait / 6) => {}
                        _ = shutdown.changed() => return,
                    }
                }
            }
        }
    }

    /// Takes the webhook if nobody holds it (its entry names no host, or
    /// has not moved for `ack_wait`): the entry's revision and the cursor.
    async fn take(
        &self,
        backing: &StreamBacking,
        watched: &mut Option<(u64, tokio::time::Instant)>,
    ) -> Option<(u64, u64)> {
        use crate::cluster::ReaderCursor;
        let key = reader_key(&self.id);
        let entry = match backing.readers.entry(&key).await {
            Ok(Some(e)) if e.operation == kv::Operation::Put => e,
            Ok(_) => return None,
            Err(e) => {
                tracing::debug!(webhook = %self.id, error = %e, "cannot read the webhook's cursor");
                return None;
            }
        };
        let Ok(reader) = serde_json::from_slice::<ReaderCursor>(&entry.value) else { return None };
        let free = reader.host.is_empty() || reader.host == backing.host;
        let silent = match watched {
            Some((revision, since)) if *revision == entry.revision => since.elapsed() >= backing.ack_wait,
            _ => {
                *watched = Some((entry.revision, tokio::time::Instant::now()));
                false
            }
        };
        if !free && !silent {
            return None;
        }
        let mine = ReaderCursor { host: backing.host.clone(), cursor: reader.cursor };
        let value = serde_json::to_vec(&mine).unwrap_or_default();
        match backing.readers.update(&key, value.into(), entry.revision).await {
            Ok(revision) => Some((revision, reader.cursor)),
            Err(_) => None, // another host took it first
        }
    }

    /// Delivers from `cursor` while this host holds the webhook; true when
    /// shutting down (the webhook handed over), false when another host took it.
    async fn deliver_from(
        &self,
        backing: &StreamBacking,
        revision: u64,
        cursor: u64,
        shutdown: &mut watch::Receiver<bool>,
    ) -> bool {
        let held = std::sync::Mutex::new((revision, cursor, tokio::time::Instant::now()));
        // Writes the cursor (by compare-and-set): false when another host holds the webhook.
        let save = async |delivered: u64, host: &str| -> bool {
            let revision = held.lock().unwrap_or_else(std::sync::PoisonError::into_inner).0;
            let value = crate::cluster::ReaderCursor { host: host.to_owned(), cursor: delivered };
            let value = serde_json::to_vec(&value).unwrap_or_default();
            match backing.readers.update(reader_key(&self.id), value.into(), revision).await {
                Ok(revision) => {
                    *held.lock().unwrap_or_else(std::sync::PoisonError::into_inner) =
                        (revision, delivered, tokio::time::Instant::now());
                    true
                }
                Err(e) => {
                    tracing::warn!(webhook = %self.id, error = %e, "another host delivers this webhook now");
                    false
                }
            }
        };
        let config = consumer::pull::OrderedConfig {
            filter_subject: crate::cluster::view::all_instances(&backing.namespace),
            deliver_policy: consumer::DeliverPolicy::ByStartSequence { start_sequence: cursor.saturating_add(1) },
            ..Default::default()
        };
        let messages = match backing.stream.create_consumer(config).await {
            Ok(c) => c.messages().await.map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        let mut messages = match messages {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(webhook = %self.id, error = %e, "cannot read the stream; handing the webhook back");
                let _ = save(cursor, "").await;
                return false;
            }
        };
        let prefix = format!("{}.inst.", backing.namespace);
        let beat = backing.ack_wait / 3;
        let mut delivered = cursor;
        loop {
            let message = tokio::select! {
                m = tokio::time::timeout(beat, messages.next()) => m,
                _ = shutdown.changed() => {
                    save(delivered, "").await;
                    return true;
                }
            };
            let message = match message {
                // Nothing new: say this host is still here.
                Err(_) => {
                    if !save(delivered, &backing.host).await {
                        return false;
                    }
                    continue;
                }
                Ok(Some(Ok(m))) => m,
                Ok(Some(Err(e))) => {
                    tracing::debug!(webhook = %self.id, error = %e, "reading the stream failed; reading it again");
                    let _ = save(delivered, "").await;
                    return false;
                }
                Ok(None) => {
                    let _ = save(delivered, "").await;
                    return false;
                }
            };
            let Ok(info) = message.info() else { continue };
            let (seq, pending) = (info.stream_sequence, info.pending);
            let name = message.subject.as_str().strip_prefix(&prefix).and_then(crate::cluster::name_of);
            let entry = crate::cluster::StreamEntry::decode(&message.payload).ok();
            let record = name.zip(entry).and_then(|(n, e)| e.to_record(&n, seq));
            let outgoing = match &record {
                Some(r) => self.render(r).await,
                None => Vec::new(), // a takeover, or not one of ours: nothing to post
            };
            // While it retries, this host keeps saying it holds the webhook.
            let heartbeat = async {
                loop {
                    tokio::time::sleep(beat).await;
                    if !save(delivered, &backing.host).await {
                        return;
                    }
                }
            };
            let went = tokio::select! {
                d = self.deliver_all(&outgoing, shutdown) => Some(d),
                () = heartbeat => None,
            };
            match went {
                None => return false, // another host took it
                Some(false) => {
                    save(delivered, "").await; // shutting down: this event goes again, from another host
                    return true;
                }
                Some(true) => delivered = seq,
            }
            let since = held.lock().unwrap_or_else(std::sync::PoisonError::into_inner).2;
            if (pending == 0 || since.elapsed() >= CURSOR_EVERY) && !save(delivered, &backing.host).await {
                return false;
            }
            self.report(pending);
        }
    }

    async fn deliver_all(&self, outgoing: &[Outgoing], shutdown: &mut watch::Receiver<bool>) -> bool {
        for o in outgoing {
            if !self.deliver(o, shutdown).await {
                return false;
            }
        }
        true
    }

    fn report(&self, depth: u64) {
        self.metrics.webhook_state(&self.id, depth, self.dead.load(Ordering::SeqCst));
    }

    fn advance(&self, log: &Log, global: u64) -> Result<(), LogError> {
        log.aux_apply(vec![(key(&self.id, "cursor"), Some(global.to_be_bytes().to_vec()))])?;
        self.cursor.store(global, Ordering::SeqCst);
        Ok(())
    }

    /// The events a record makes for this webhook, filtered.
    async fn render(&self, record: &Record) -> Vec<Outgoing> {
        let all = match self.config.format {
            WebhookFormat::Lifecycle => match record.event {
                Event::Snapshot { .. } => Vec::new(),
                Event::Created { .. } | Event::Transition { .. } => {
                    let body = EventBody::of(record, &self.limits.policy);
                    vec![(body.event.to_owned(), serde_json::to_vec(&body).unwrap_or_default())]
                }
            },
            WebhookFormat::Evolution => {
                let pairing =
                    matches!(&record.event, Event::Transition { input: crate::machine::Input::PairingCode { .. }, .. });
                let code = if pairing { self.pairing.get(&record.instance).await } else { None };
                evolution::webhook_events(record, self.limits.server_url.as_deref(), &self.config.url, code)
                    .into_iter()
                    .map(|(event, body)| (event, serde_json::to_vec(&body).unwrap_or_default()))
                    .collect()
            }
        };
        all.into_iter()
            .enumerate()
            .filter(|(_, (event, _))| self.config.events.is_empty() || self.config.events.iter().any(|e| e == event))
            .map(|(k, (event, body))| Outgoing {
                id: if k == 0 { record.global.to_string() } else { format!("{}.{k}", record.global) },
                event,
                instance: record.instance.to_string(),
                body,
            })
            .collect()
    }

    /// Posts until delivered or out of attempts (then a dead letter). False when shutting down.
    async fn deliver(&self, outgoing: &Outgoing, shutdown: &mut watch::Receiver<bool>) -> bool {
        let mut delays = backon::ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(500))
            .with_max_delay(Duration::from_secs(60))
            .with_factor(2.0)
            .with_jitter()
            .with_max_times(self.config.max_attempts.saturating_sub(1) as usize)
            .build();
        let mut attempt = 1;
        loop {
            match self.post(outgoing, attempt).await {
                Ok(()) => {
                    self.metrics.delivered(&self.id);
                    return true;
                }
                Err(failure) => {
                    self.metrics.failed(&self.id);
                    let next = if failure.permanent { None } else { delays.next() };
                    let Some(delay) = next else {
                        self.bury(outgoing, attempt, failure.message).await;
                        return true;
                    };
                    tracing::debug!(webhook = %self.id, event = %outgoing.id, attempt, error = %failure.message, ?delay, "delivery failed; retrying");
                    tokio::select! {
                        () = tokio::time::sleep(delay) => {}
                        _ = shutdown.changed() => return false,
                    }
                }
            }
            attempt += 1;
        }
    }

    async fn post(&self, outgoing: &Outgoing, attempt: u32) -> Result<(), Failure> {
        let mut request = self
            .client
            .post(&self.config.url)
            .timeout(self.config.timeout)
            .header("content-type", "application/json")
            .header("x-lifecycle-event-id", &outgoing.id)
            .header("x-lifecycle-event", &outgoing.event)
            .header("x-lifecycle-instance", &outgoing.instance)
            .header("x-lifecycle-attempt", attempt.to_string());
        if let Backing::Stream(b) = &self.backing {
            request = request.header("x-lifecycle-host", &b.host);
        }
        for (name, value) in &self.config.headers {
            request = request.header(name, value);
        }
        if let Some(secret) = &self.config.secret {
            request = request.header("x-lifecycle-signature", signature(secret, &outgoing.body));
        }
        let response = request
            .body(outgoing.body.clone())
            .send()
            .await
            .map_err(|e| Failure { message: format!("{}: {e}", self.config.url), permanent: false })?;
        let status = response.status();
        if status.is_success() {
            return Ok(());
        }
        // A 4xx says the request itself is refused: trying again cannot help,
        // except for a time-out, "too early" and "too many requests".
        let permanent = status.is_client_error() && ![408, 425, 429].contains(&status.as_u16());
        Err(Failure { message: format!("{} answered {status}", self.config.url), permanent })
    }

    /// This webhook's dead letters, oldest first, with their keys.
    async fn dead_letters(&self) -> Result<Vec<(String, DeadLetter)>, ApiError> {
        let mut out = Vec::new();
        match &self.backing {
            Backing::Log(log) => {
                for (k, value) in log.aux_scan(&key(&self.id, "dead/"))? {
                    if let Ok(letter) = serde_json::from_slice::<DeadLetter>(&value) {
                        out.push((String::from_utf8_lossy(&k).into_owned(), letter));
                    }
                }
            }
            Backing::Stream(b) => {
                let dead = &b.dead;
                let prefix = format!("{}.", safe_id(&self.id));
                let mut keys: Vec<String> = Vec::new();
                let mut listed = dead.keys().await.map_err(|e| unavailable("listing dead letters", e))?;
                while let Some(k) = listed.next().await {
                    let k = k.map_err(|e| unavailable("listing dead letters", e))?;
                    if k.starts_with(&prefix) {
                        keys.push(k);
                    }
                }
                keys.sort();
                for k in keys {
                    if let Some(value) = dead.get(&k).await.map_err(|e| unavailable("reading a dead letter", e))?
                        && let Ok(letter) = serde_json::from_slice::<DeadLetter>(&value)
                    {
                        out.push((k, letter));
                    }
                }
            }
        }
        Ok(out)
    }

    async fn dead_letter(&self, id: &str) -> Result<Option<DeadLetter>, ApiError> {
        let value = match &self.backing {
            Backing::Log(log) => log.aux_get(&key(&self.id, &format!("dead/{}", sortable(id))))?,
            Backing::Stream(b) => b
                .dead
                .get(dead_key(&self.id, id))
                .await
                .map_err(|e| unavailable("reading a dead letter", e))?
                .map(|b| b.to_vec()),
        };
        value.map(|v| serde_json::from_slice(&v).map_err(|e| ApiError::internal(e.to_string()))).transpose()
    }

    async fn forget_dead(&self, id: &str) -> Result<(), ApiError> {
        match &self.backing {
            Backing::Log(log) => log.aux_apply(vec![(key(&self.id, &format!("dead/{}", sortable(id))), None)])?,
            Backing::Stream(b) => {
                let dead = &b.dead;
                dead.purge(dead_key(&self.id, id)).await.map_err(|e| unavailable("removing a dead letter", e))?;
            }
        }
        self.dead.fetch_sub(1, Ordering::SeqCst);
        Ok(())
    }

    async fn bury(&self, outgoing: &Outgoing, attempts: u32, error: String) {
        tracing::warn!(webhook = %self.id, event = %outgoing.id, instance = %outgoing.instance, attempts, %error, "webhook event given up on: kept as a dead letter");
        let letter = DeadLetter {
            webhook: self.id.clone(),
            id: outgoing.id.clone(),
            event: outgoing.event.clone(),
            instance: outgoing.instance.clone(),
            attempts,
            error,
            at: now_ms(),
            body: serde_json::from_slice(&outgoing.body).unwrap_or(serde_json::Value::Null),
        };
        let value = serde_json::to_vec(&letter).unwrap_or_default();
        let full = self.dead.load(Ordering::SeqCst) >= self.limits.dead_letters_max;
        let oldest = if full { self.dead_letters().await.ok().and_then(|d| d.into_iter().next()) } else { None };
        if full {
            tracing::warn!(webhook = %self.id, cap = self.limits.dead_letters_max, "dead letters at their cap: the oldest is discarded");
        }
        let kept = match &self.backing {
            Backing::Log(log) => {
                let mut writes = vec![(key(&self.id, &format!("dead/{}", sortable(&outgoing.id))), Some(value))];
                if let Some((old, _)) = &oldest {
                    writes.push((old.clone().into_bytes(), None));
                }
                log.aux_apply(writes).map_err(|e| e.to_string())
            }
            Backing::Stream(b) => {
                let dead = &b.dead;
                let put = dead.put(dead_key(&self.id, &outgoing.id), value.into()).await.map(|_| ());
                if let (Ok(()), Some((old, _))) = (&put, &oldest) {
                    let _ = dead.purge(old).await;
                }
                put.map_err(|e| e.to_string())
            }
        };
        match kept {
            Ok(()) if oldest.is_none() => {
                self.dead.fetch_add(1, Ordering::SeqCst);
            }
            Ok(()) => {}
            Err(e) => tracing::error!(webhook = %self.id, error = %e, "cannot keep the dead letter"),
        }
    }
}

/// `sha256=HEX` of the body, keyed with the webhook's secret.
pub fn signature(secret: &str, body: &[u8]) -> String {
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(secret.as_bytes())
        .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"));
    mac.update(body);
    let digest = mac.finalize().into_bytes();
    format!("sha256={}", digest.iter().map(|b| format!("{b:02x}")).collect::<String>())
}
