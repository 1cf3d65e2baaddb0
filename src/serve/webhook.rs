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

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use backon::BackoffBuilder;
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
    /// `connection.update`, `qrcode.updated`, `logout.instance`, `remove.instance`.
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

/// Every webhook's worker.
pub(crate) struct Outbox {
    workers: Vec<Arc<Worker>>,
    log: Log,
    limits: OutboxLimits,
}

struct Worker {
    config: WebhookConfig,
    id: String,
    cursor: AtomicU64,
    dead: AtomicU64,
    client: reqwest::Client,
    log: Log,
    metrics: Arc<Metrics>,
    limits: OutboxLimits,
    pairing: Arc<evolution::PairingCodes>,
}

fn key(id: &str, what: &str) -> Vec<u8> {
    format!("serve/webhook/{id}/{what}").into_bytes()
}

fn now_ms() -> u64 {
    let since = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    u64::try_from(since.as_millis()).unwrap_or(u64::MAX)
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
        let client = reqwest::Client::builder()
            .user_agent(concat!("instance-lifecycle/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| ServeError::Client(e.to_string()))?;
        let mut workers = Vec::new();
        for config in configs {
            config.check()?;
            let id = config.id();
            if workers.iter().any(|w: &Arc<Worker>| w.id == id) {
                return Err(ServeError::Invalid { field: "webhooks", reason: format!("two webhooks with id {id}") });
            }
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
                log: log.clone(),
                metrics: metrics.clone(),
                limits: limits.clone(),
                pairing: pairing.clone(),
            }));
        }
        let outbox = Self { workers, log: log.clone(), limits };
        outbox.hold();
        Ok(outbox)
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
                tokio::spawn(w.clone().run(self.clone(), engine.clone(), shutdown.clone()).instrument(span))
            })
            .collect()
    }

    /// Holds compaction back from every record a webhook has yet to pass, within the backlog bound.
    fn hold(&self) {
        let Some(min) = self.workers.iter().map(|w| w.cursor.load(Ordering::SeqCst)).min() else {
            self.log.release_hold();
            return;
        };
        let floor = self.log.committed().saturating_sub(self.limits.backlog_max);
        self.log.hold_from(min.max(floor).saturating_add(1));
    }

    pub(crate) fn status(&self) -> Vec<WebhookStatus> {
        let committed = self.log.committed();
        self.workers
            .iter()
            .map(|w| {
                let cursor = w.cursor.load(Ordering::SeqCst);
                WebhookStatus {
                    id: w.id.clone(),
                    url: w.config.url.clone(),
                    format: w.config.format,
                    cursor,
                    depth: committed.saturating_sub(cursor),
                    dead: w.dead.load(Ordering::SeqCst),
                }
            })
            .collect()
    }

    /// Every dead letter of every webhook.
    pub(crate) fn dead_letters(&self) -> Result<Vec<DeadLetter>, ApiError> {
        let mut out = Vec::new();
        for w in &self.workers {
            for (_, value) in self.log.aux_scan(&key(&w.id, "dead/"))? {
                if let Ok(letter) = serde_json::from_slice::<DeadLetter>(&value) {
                    out.push(letter);
                }
            }
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
        let dead_key = key(&w.id, &format!("dead/{}", sortable(id)));
        let value = self.log.aux_get(&dead_key)?.ok_or_else(not_found)?;
        let letter: DeadLetter = serde_json::from_slice(&value).map_err(|e| ApiError::internal(e.to_string()))?;
        let outgoing = Outgoing {
            id: letter.id.clone(),
            event: letter.event.clone(),
            instance: letter.instance.clone(),
            body: serde_json::to_vec(&letter.body).unwrap_or_default(),
        };
        match w.post(&outgoing, letter.attempts + 1).await {
            Ok(()) => {
                self.log.aux_apply(vec![(dead_key, None)])?;
                w.dead.fetch_sub(1, Ordering::SeqCst);
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
        let mut wake = engine.subscribe();
        loop {
            if *shutdown.borrow() {
                return;
            }
            let (log, after) = (self.log.clone(), self.cursor.load(Ordering::SeqCst));
            let page = match tokio::task::spawn_blocking(move || log.records_after(after, PAGE)).await {
                Ok(Ok(page)) => page,
                Ok(Err(e)) => {
                    tracing::error!(webhook = %self.id, error = %e, "cannot read the log; retrying in 1 s");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
                Err(_) => return,
            };
            self.report();
            if page.is_empty() {
                tokio::select! {
                    _ = wake.recv() => {}
                    () = tokio::time::sleep(Duration::from_secs(1)) => {}
                    _ = shutdown.changed() => return,
                }
                continue;
            }
            for record in &page {
                for outgoing in self.render(record) {
                    if !self.deliver(&outgoing, &mut shutdown).await {
                        return; // shutting down: this record is redelivered after the restart
                    }
                }
                if let Err(e) = self.advance(record.global) {
                    tracing::error!(webhook = %self.id, error = %e, "cannot save the cursor; retrying in 1 s");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    break;
                }
                outbox.hold();
            }
        }
    }

    fn report(&self) {
        let depth = self.log.committed().saturating_sub(self.cursor.load(Ordering::SeqCst));
        self.metrics.webhook_state(&self.id, depth, self.dead.load(Ordering::SeqCst));
    }

    fn advance(&self, global: u64) -> Result<(), LogError> {
        self.log.aux_apply(vec![(key(&self.id, "cursor"), Some(global.to_be_bytes().to_vec()))])?;
        self.cursor.store(global, Ordering::SeqCst);
        Ok(())
    }

    /// The events a record makes for this webhook, filtered.
    fn render(&self, record: &Record) -> Vec<Outgoing> {
        let all = match self.config.format {
            WebhookFormat::Lifecycle => match record.event {
                Event::Snapshot { .. } => Vec::new(),
                Event::Created { .. } | Event::Transition { .. } => {
                    let body = EventBody::of(record, &self.limits.policy);
                    vec![(body.event.to_owned(), serde_json::to_vec(&body).unwrap_or_default())]
                }
            },
            WebhookFormat::Evolution => {
                evolution::webhook_events(record, self.limits.server_url.as_deref(), &self.config.url, &self.pairing)
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
                        self.bury(outgoing, attempt, failure.message);
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

    fn bury(&self, outgoing: &Outgoing, attempts: u32, error: String) {
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
        let mut writes = vec![(
            key(&self.id, &format!("dead/{}", sortable(&outgoing.id))),
            Some(serde_json::to_vec(&letter).unwrap_or_default()),
        )];
        let kept = self.dead.load(Ordering::SeqCst);
        if kept >= self.limits.dead_letters_max
            && let Ok(oldest) = self.log.aux_scan(&key(&self.id, "dead/"))
            && let Some((old_key, _)) = oldest.into_iter().next()
        {
            tracing::warn!(webhook = %self.id, cap = self.limits.dead_letters_max, "dead letters at their cap: the oldest is discarded");
            writes.push((old_key, None));
        } else {
            self.dead.fetch_add(1, Ordering::SeqCst);
        }
        if let Err(e) = self.log.aux_apply(writes) {
            tracing::error!(webhook = %self.id, error = %e, "cannot keep the dead letter");
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
