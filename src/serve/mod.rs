//! `lifecycle serve`: the engine as a service for hosts in any language.
//!
//! | route | what |
//! |---|---|
//! | `/v1/instances…` | our REST API (see `api`), OpenAPI at `/v1/openapi.json` |
//! | `/v1/events` | every transition as it is recorded (SSE, resumable with `Last-Event-ID`) |
//! | `/v1/instances/{name}/signals`, `/v1/effects` | host-driven sessions (see `external`) |
//! | `/v1/webhooks…` | webhook progress and dead letters (see `webhook`) |
//! | `/instance/…` | the Evolution-API-compatible subset (see `evolution`) |
//! | `/`, `/ui/…`, `/v1/fleet`, `/v1/table` | the dashboard (see `ui`, `fleet`) |
//! | `/healthz`, `/metrics` | liveness, Prometheus metrics |
//!
//! A thin layer over the engine's public API: it adds no lifecycle rule of
//! its own. Bounds: request bodies (`limits.body_bytes`), every request's
//! time (`limits.request_timeout`, above the engine's longest command), SSE
//! subscribers (`limits.sse_subscribers`; each reads the log at its own pace
//! and never holds the engine up), webhook retries and dead letters (see
//! `webhook`). It listens on 127.0.0.1 by default and refuses any other
//! address without an API key.

mod api;
mod auth;
mod error;
mod events;
mod evolution;
mod fleet;
mod instances;
mod metrics;
mod openapi;
mod replay;
mod ui;
mod webhook;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{DefaultBodyLimit, Request};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use serde::{Deserialize, Serialize};
use tokio::sync::{Semaphore, watch};

pub use crate::transport::{HostAction, HostEffect, HostSignal, Initiator};
pub use api::{AfterQuery, CreateInstance, Created, Health, InstanceView, ListQuery, TransportKind};
pub use error::{ApiError, ErrorBody, ErrorDetail, ServeError};
pub use events::{CloseView, EventBody, SLOW_SUBSCRIBER};
pub use fleet::{ActionView, EdgeCount, FleetIndex, FleetRow, FleetView, RECONNECT_WINDOW, TableEdge};
pub use openapi::ApiDoc;
pub use replay::Replay;
pub use webhook::{DeadLetter, WebhookConfig, WebhookFormat, WebhookStatus, signature};

use crate::engine::{Engine, EngineConfig};
use crate::log::LogConfig;
use crate::machine::{Policy, Preset};
use crate::transport::{Hub, ReferenceProtocol, Routed, WsLimits, WsTransport};

/// The service's settings: `lifecycle serve --config FILE` reads them as
/// TOML (durations as text: `"10s"`, `"2m"`); flags override the file.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServeConfig {
    /// The log's directory (created if missing).
    pub data: PathBuf,
    /// Where to listen. Anything but a loopback address needs `api_key`.
    pub listen: SocketAddr,
    /// The global API key: it opens everything. Without one, the API is open (loopback only).
    pub api_key: Option<String>,
    /// The close-status preset the policy starts from (`whatsapp`, `evolution`, `discord`, `rfc6455`).
    #[serde(with = "preset_name")]
    pub preset: Preset,
    /// A whole policy, instead of the preset's.
    pub policy: Option<Policy>,
    /// Where instances created without a `url` connect.
    pub default_url: Option<String>,
    /// This service's own URL, for Evolution's webhook envelope (`server_url`).
    pub server_url: Option<String>,
    /// The log's durability and sizes.
    pub log: LogConfig,
    /// Webhooks: each gets every event (or those it names), at least once, in order.
    pub webhooks: Vec<WebhookConfig>,
    /// Bounds on what clients can make the service do.
    pub limits: Limits,
    /// What the log keeps, and how often it is compacted.
    pub retention: RetentionSettings,
    /// Join a cluster of hosts on NATS JetStream (`[cluster]`; `--cluster`).
    pub cluster: Option<ClusterSettings>,
}

/// `[cluster]`: this service is one host of a cluster on NATS JetStream.
/// Each instance is owned by exactly one host; the cluster's stream is the
/// log of record and this host's log is a cache in a temporary directory.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClusterSettings {
    /// The NATS server.
    pub url: String,
    /// This host's id, unique in the cluster [default: the machine's host name and the process id].
    pub host: Option<String>,
    /// Prefix of the bucket, stream and subjects.
    pub namespace: String,
    /// How long a lease lives without renewal.
    #[serde(with = "humantime_serde")]
    pub lease_ttl: Duration,
    /// How often leases are renewed [default: a third of the TTL].
    #[serde(with = "humantime_serde")]
    pub renew_every: Option<Duration>,
    /// Replicas of the stream and the bucket.
    pub replicas: usize,
    /// Entries the stream keeps per instance after its last snapshot.
    pub keep_records: u64,
    /// How long a removed instance's subject is kept.
    #[serde(with = "humantime_serde")]
    pub removed_after: Duration,
    /// How often removed instances past `removed_after` are purged.
    #[serde(with = "humantime_serde")]
    pub retention_every: Duration,
    /// How long a host that died holding a webhook event delays it (the
    /// event then goes to another host).
    #[serde(with = "humantime_serde")]
    pub webhook_ack_wait: Duration,
}

impl Default for ClusterSettings {
    fn default() -> Self {
        let d = crate::cluster::ClusterConfig::new("nats://127.0.0.1:4222", "");
        let retention = d.retention.clone().unwrap_or_default();
        Self {
            url: d.url,
            host: None,
            namespace: d.namespace,
            lease_ttl: d.lease_ttl,
            renew_every: None,
            replicas: d.replicas,
            keep_records: retention.keep_records,
            removed_after: retention.removed_after,
            retention_every: d.retention_every,
            webhook_ack_wait: webhook::ACK_WAIT,
        }
    }
}

impl ClusterSettings {
    /// The cluster configuration these settings give.
    pub fn config(&self) -> crate::cluster::ClusterConfig {
        let host = self.host.clone().unwrap_or_else(|| {
            let machine = std::env::var("HOSTNAME").ok().filter(|h| crate::InstanceName::new(h.as_str()).is_ok());
            format!("{}-{}", machine.as_deref().unwrap_or("host"), std::process::id())
        });
        let mut c = crate::cluster::ClusterConfig::new(self.url.clone(), host);
        c.namespace = self.namespace.clone();
        c.lease_ttl = self.lease_ttl;
        c.renew_every = self.renew_every.unwrap_or(self.lease_ttl / 3);
        c.replicas = self.replicas;
        c.retention =
            Some(crate::log::Retention { keep_records: self.keep_records, removed_after: self.removed_after });
        c.retention_every = self.retention_every;
        c.backlog_max = 1_000_000;
        c
    }
}

/// A preset by its name, as the CLI takes it.
mod preset_name {
    use serde::{Deserialize, Deserializer, Serializer};

    use crate::machine::Preset;

    pub(super) fn serialize<S: Serializer>(preset: &Preset, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(preset.as_str())
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Preset, D::Error> {
        let name = String::deserialize(d)?;
        Preset::parse(&name).map_err(serde::de::Error::custom)
    }
}

/// `[retention]`: what the log keeps and how often it is compacted. The
/// schedule survives restarts (the log records when it last compacted): a
/// service restarted more often than `every` still compacts, soon after a
/// start that finds compaction overdue, in the background.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RetentionSettings {
    /// Records kept per instance after its last snapshot.
    pub keep_records: u64,
    /// How long a removed instance's history is kept.
    #[serde(with = "humantime_serde")]
    pub removed_after: Duration,
    /// How often the log is compacted (at least 1 s).
    #[serde(with = "humantime_serde")]
    pub every: Duration,
}

impl Default for RetentionSettings {
    fn default() -> Self {
        let engine = crate::engine::Compaction::default();
        Self {
            keep_records: engine.retention.keep_records,
            removed_after: engine.retention.removed_after,
            every: engine.every,
        }
    }
}

impl RetentionSettings {
    /// The engine's compaction with these settings.
    pub fn compaction(&self) -> crate::engine::Compaction {
        crate::engine::Compaction {
            retention: crate::log::Retention { keep_records: self.keep_records, removed_after: self.removed_after },
            every: self.every,
        }
    }
}

/// Bounds on what clients can make the service do.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Largest request body: the API's bodies are a few hundred bytes.
    pub body_bytes: usize,
    /// Bound on a request; absent: the engine's longest command (logout +
    /// close + clean-up + connect time-outs, plus slack) and 5 s.
    #[serde(with = "humantime_serde")]
    pub request_timeout: Option<Duration>,
    /// Open `/v1/events` streams at most; one more is answered 503.
    pub sse_subscribers: usize,
    /// Dead letters kept per webhook; past it the oldest is discarded.
    pub dead_letters_max: u64,
    /// Records the webhooks may lag behind the log's tip while holding compaction back.
    pub backlog_max: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            body_bytes: 64 * 1024,
            request_timeout: None,
            sse_subscribers: 256,
            dead_letters_max: 10_000,
            backlog_max: 1_000_000,
        }
    }
}

impl Default for ServeConfig {
    fn default() -> Self {
        Self {
            data: PathBuf::from("lifecycle-data"),
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            api_key: None,
            preset: Preset::Whatsapp,
            policy: None,
            default_url: None,
            server_url: None,
            log: LogConfig::default(),
            webhooks: Vec::new(),
            limits: Limits::default(),
            retention: RetentionSettings::default(),
            cluster: None,
        }
    }
}

impl ServeConfig {
    /// Reads a TOML file.
    pub fn from_file(path: &Path) -> Result<Self, ServeError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ServeError::Config { path: path.to_path_buf(), message: e.to_string() })?;
        toml::from_str(&text).map_err(|e| ServeError::Config { path: path.to_path_buf(), message: e.to_string() })
    }

    /// The policy the engine runs.
    pub fn policy(&self) -> Policy {
        self.policy.clone().unwrap_or_else(|| Policy::preset(self.preset))
    }

    fn check(&self) -> Result<(), ServeError> {
        if !self.listen.ip().is_loopback() && self.api_key.as_deref().is_none_or(str::is_empty) {
            return Err(ServeError::Unprotected { addr: self.listen });
        }
        if self.api_key.as_deref().is_some_and(|k| k.len() < 16) {
            return Err(ServeError::Invalid { field: "api_key", reason: "at least 16 characters".into() });
        }
        if let Some(url) = &self.default_url {
            crate::transport::Endpoint::parse(url)
                .map_err(|e| ServeError::Invalid { field: "default_url", reason: e.to_string() })?;
        }
        if self.retention.every < Duration::from_secs(1) || self.retention.keep_records == 0 {
            return Err(ServeError::Invalid {
                field: "retention",
                reason: "every must be at least 1 s and keep_records at least 1".into(),
            });
        }
        if self.limits.sse_subscribers == 0 || self.limits.body_bytes < 1024 {
            return Err(ServeError::Invalid {
                field: "limits",
                reason: "sse_subscribers must be at least 1 and body_bytes at least 1024".into(),
            });
        }
        Ok(())
    }
}

/// What every handler shares.
#[derive(Clone)]
pub(crate) struct AppState {
    /// This host's engine, or the cluster it is one host of: every route asks here.
    instances: instances::Instances,
    config: Arc<ServeConfig>,
    auth: Arc<auth::Auth>,
    hub: Arc<Hub>,
    metrics: Arc<metrics::Metrics>,
    outbox: Arc<webhook::Outbox>,
    pairing: Arc<evolution::PairingCodes>,
    subscribers: Arc<Semaphore>,
    diagram: Arc<str>,
    /// The transition table's edges as JSON (`/v1/table`).
    table: Arc<str>,
    /// The fleet view's rows, kept up to date by a follower of the log.
    fleet: fleet::SharedIndex,
    /// A single host's: up to which committed position the fleet view has read.
    fleet_covered: Option<watch::Receiver<u64>>,
    shutdown: watch::Receiver<bool>,
}

impl AppState {
    /// This host's engine (its policy, its clock, the instances it runs).
    pub(crate) fn engine(&self) -> &Engine {
        self.instances.engine()
    }

    /// The fleet view, once it covers at least what the log of record held
    /// when asked (read-your-writes; right after a start, when the fold of
    /// the log has caught up — within the request's bound).
    pub(crate) async fn fleet(&self) -> Result<std::sync::RwLockReadGuard<'_, fleet::FleetIndex>, ApiError> {
        let position = self.instances.position().await?;
        if let Some(mut covered) = self.fleet_covered.clone()
            && covered.wait_for(|&c| c >= position).await.is_err()
        {
            return Err(ApiError::new(
                axum::http::StatusCode::SERVICE_UNAVAILABLE,
                "shutting_down",
                "the service is stopping",
            ));
        }
        Ok(fleet::read(&self.fleet))
    }
}

/// A running service.
pub struct Service {
    addr: SocketAddr,
    engine: Engine,
    cluster: Option<crate::cluster::Cluster>,
    stop: watch::Sender<bool>,
    server: tokio::task::JoinHandle<Result<(), std::io::Error>>,
    workers: Vec<tokio::task::JoinHandle<()>>,
}

/// Effects queued for the cluster's NATS; past it, the newest are dropped
/// (and a subscriber that lagged reads each instance's state, as on one host).
const RELAY_BUFFER: usize = 4096;

/// The subject an instance's effects are published on in a cluster (`None`: every instance's).
pub(crate) fn effects_subject(namespace: &str, instance: Option<&crate::InstanceName>) -> String {
    match instance {
        Some(name) => format!("{namespace}.effects.{}", crate::cluster::token_of(name)),
        None => format!("{namespace}.effects.>"),
    }
}

/// In a cluster the host's client may be connected to any host, not the
/// owner: the owner publishes each effect on the cluster's NATS
/// (`<namespace>.effects.<instance>`, not stored: effects are live, as on
/// one host), in the order emitted, until the service is dropped, and
/// `/v1/effects` on every host streams them from there.
fn relay_effects(hub: &Hub, client: async_nats::Client, namespace: String) {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<crate::transport::HostEffect>(RELAY_BUFFER);
    hub.listen(Box::new(move |effect| {
        if tx.try_send(effect.clone()).is_err() {
            tracing::warn!(instance = %effect.instance, "the cluster's effect relay is full: an effect was dropped");
        }
    }));
    tokio::spawn(async move {
        while let Some(effect) = rx.recv().await {
            let subject = effects_subject(&namespace, Some(&effect.instance));
            let body = serde_json::to_vec(&effect).unwrap_or_default();
            if let Err(e) = client.publish(subject, body.into()).await {
                tracing::warn!(instance = %effect.instance, error = %e, "an effect was not relayed to the cluster");
            }
        }
    });
}

impl Service {
    /// Opens the engine on `config.data` (restoring every instance, R11),
    /// binds `config.listen` and starts serving and delivering webhooks.
    pub async fn start(config: ServeConfig) -> Result<Self, ServeError> {
        let starting = std::time::Instant::now();
        config.check()?;
        let metrics = Arc::new(metrics::Metrics::new());
        let hub = Hub::new();
        let hook = {
            let metrics = metrics.clone();
            Arc::new(move |n: &crate::engine::Notification| metrics.transition(n)) as crate::engine::TransitionHook
        };
        let ws = WsTransport::new(Arc::new(ReferenceProtocol), WsLimits::default());
        let engine_config = EngineConfig {
            policy: config.policy(),
            log: config.log.clone(),
            transport: Arc::new(Routed::new(ws, hub.clone())),
            on_transition: Some(hook),
            compaction: Some(config.retention.compaction()),
            ..EngineConfig::default()
        };
        // The fleet view is a fold of the log of record: in a cluster, fed by the
        // host's view of the stream as it reads it (from the first entry on).
        let index = fleet::SharedIndex::default();
        let limits = webhook::OutboxLimits {
            dead_letters_max: config.limits.dead_letters_max,
            backlog_max: config.limits.backlog_max,
            server_url: config.server_url.clone(),
            policy: Arc::new(engine_config.policy.clone()),
        };
        let (engine, cluster, (pairing, outbox, auth)) = match &config.cluster {
            Some(settings) => {
                let tap = Arc::new(fleet::StreamTap { index: index.clone(), policy: engine_config.policy.clone() });
                let (c, engine) =
                    crate::cluster::Cluster::join_with(settings.config(), engine_config, vec![tap]).await?;
                // In a cluster everything a user was promised lives in the cluster's NATS.
                relay_effects(&hub, c.client().clone(), c.namespace().to_owned());
                let pairing = Arc::new(evolution::PairingCodes::cluster(&c).await.map_err(|e| {
                    ServeError::Invalid { field: "cluster", reason: format!("the pairing codes' bucket: {e}") }
                })?);
                let ack_wait = settings.webhook_ack_wait;
                let outbox =
                    webhook::Outbox::cluster(&config.webhooks, &c, &metrics, limits, &pairing, ack_wait).await?;
                let parts = (pairing, outbox, auth::Auth::cluster(config.api_key.as_deref(), &c).await?);
                (engine, Some(c), parts)
            }
            None => {
                // The webhooks' hold on compaction is set before the engine starts,
                // so its first compaction (soon, when overdue) spares what they have
                // yet to deliver.
                let (path, log_config) = (config.data.clone(), config.log.clone());
                let log = tokio::task::spawn_blocking(move || crate::log::Log::open(path, log_config))
                    .await
                    .map_err(|e| ServeError::Server(std::io::Error::other(e.to_string())))??;
                let pairing = Arc::new(evolution::PairingCodes::default());
                let outbox = webhook::Outbox::load(&config.webhooks, &log, &metrics, limits, &pairing)?;
                let auth = Arc::new(auth::Auth::load(config.api_key.as_deref(), &log)?);
                (Engine::with_log(log, engine_config).await?, None, (pairing, outbox, auth))
            }
        };
        let listener = match tokio::net::TcpListener::bind(config.listen).await {
            Ok(l) => l,
            Err(source) => {
                match &cluster {
                    Some(c) => drop(c.leave().await),
                    None => drop(engine.shutdown().await),
                }
                return Err(ServeError::Listen { addr: config.listen, source });
            }
        };
        let addr = listener.local_addr().map_err(|source| ServeError::Listen { addr: config.listen, source })?;
        let outbox = Arc::new(outbox);
        let (stop, shutdown) = watch::channel(false);
        let mut workers = outbox.start(&engine, &shutdown);
        // A single host's fleet view is folded from its log in the background:
        // the service answers at once, `/v1/fleet` when the fold has caught up.
        let fleet_covered = match &cluster {
            Some(_) => None,
            None => {
                let (task, covered) = fleet::follow(&engine, index.clone(), shutdown.clone());
                workers.push(task);
                Some(covered)
            }
        };
        let timeout = config.limits.request_timeout.unwrap_or(engine.command_bound() + Duration::from_secs(5));
        let instances = match &cluster {
            Some(c) => instances::Instances::Cluster(c.clone()),
            None => instances::Instances::Local(engine.clone()),
        };
        metrics.started(starting.elapsed());
        let state = AppState {
            instances,
            subscribers: Arc::new(Semaphore::new(config.limits.sse_subscribers)),
            config: Arc::new(config),
            auth,
            hub,
            metrics,
            outbox,
            pairing,
            diagram: crate::diagram::Diagram::from_rules().render(crate::diagram::Format::Mermaid).into(),
            table: serde_json::to_string(&fleet::table()).unwrap_or_default().into(),
            fleet: index,
            fleet_covered,
            shutdown: shutdown.clone(),
        };
        let protection = if state.auth.enabled() { "API key" } else { "none (loopback only)" };
        let app = router(state, timeout);
        let mut graceful = shutdown.clone();
        let server = tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(async move {
                    let _ = graceful.wait_for(|s| *s).await;
                })
                .await
        });
        tracing::info!(%addr, auth = protection, "serving");
        Ok(Self { addr, engine, cluster, stop, server, workers })
    }

    /// The address it listens on (with the port, when 0 was asked for).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// This host's part in a cluster, when it is one.
    pub fn cluster(&self) -> Option<&crate::cluster::Cluster> {
        self.cluster.as_ref()
    }

    /// The engine it serves.
    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// Stops: no new requests, streams end, webhook workers stop (an event
    /// in flight is redelivered after the next start), then the engine shuts
    /// down within its bound and the log is synced.
    pub async fn shutdown(self) -> Result<(), ServeError> {
        self.stop.send_replace(true);
        for w in self.workers {
            let _ = w.await;
        }
        // Requests in flight finish within their time-out; the server then ends.
        let served = self.server.await;
        match &self.cluster {
            // Gives the leases back: other hosts take the instances at once.
            Some(cluster) => cluster.leave().await?,
            None => self.engine.shutdown().await?,
        }
        match served {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(ServeError::Server(e)),
            Err(e) => Err(ServeError::Server(std::io::Error::other(e.to_string()))),
        }
    }
}

/// Every route, with the bounds on bodies and time.
fn router(state: AppState, timeout: Duration) -> Router {
    let body_limit = state.config.limits.body_bytes;
    Router::new()
        .route("/v1/instances", post(api::create).get(api::list))
        .route("/v1/instances/{name}", get(api::get).delete(api::delete))
        .route("/v1/instances/{name}/connect", post(api::connect))
        .route("/v1/instances/{name}/logout", post(api::logout))
        .route("/v1/instances/{name}/restart", post(api::restart))
        .route("/v1/instances/{name}/history", get(api::history))
        .route("/v1/instances/{name}/signals", post(api::signal))
        .route("/v1/instances/{name}/send", post(api::send))
        .route("/v1/frames", get(api::frames))
        .route("/v1/effects", get(api::effects))
        .route("/v1/events", get(api::events))
        .route("/v1/diagram", get(api::diagram))
        .route("/v1/fleet", get(api::fleet))
        .route("/v1/table", get(api::table))
        .route("/v1/webhooks", get(api::webhooks))
        .route("/v1/webhooks/dead", get(api::dead_letters))
        .route("/v1/webhooks/dead/{webhook}/{id}/retry", post(api::retry_dead))
        .route("/v1/openapi.json", get(api::openapi))
        .route("/healthz", get(api::health))
        .route("/metrics", get(api::metrics))
        .route("/instance/create", post(evolution::create))
        .route("/instance/connect/{name}", get(evolution::connect))
        .route("/instance/connectionState/{name}", get(evolution::connection_state_route))
        .route("/instance/restart/{name}", post(evolution::restart))
        .route("/instance/logout/{name}", delete(evolution::logout))
        .route("/instance/delete/{name}", delete(evolution::delete))
        .route("/instance/fetchInstances", get(evolution::fetch_instances))
        .merge(ui::routes())
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(axum::middleware::from_fn(move |req: Request, next: Next| bounded(req, next, timeout)))
        .layer(axum::middleware::from_fn(same_origin))
        .layer(DefaultBodyLimit::max(body_limit))
        .with_state(state)
}

async fn not_found(req: Request) -> ApiError {
    ApiError::new(
        axum::http::StatusCode::NOT_FOUND,
        "not_found",
        format!("no route {} {}: see /v1/openapi.json", req.method(), req.uri().path()),
    )
}

async fn method_not_allowed(req: Request) -> ApiError {
    ApiError::new(
        axum::http::StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        format!("{} is not a method of {}: see /v1/openapi.json", req.method(), req.uri().path()),
    )
}

/// Refuses a command a web page of another origin sends through the
/// operator's browser (cross-site request forgery): browsers say where a
/// request comes from in `Origin`, and a page cannot forge it. Without an API
/// key (loopback only) nothing else would stop such a page; with one, this
/// is a second wall. Reads, and clients that are not browsers (no `Origin`),
/// are untouched.
async fn same_origin(req: Request, next: Next) -> Response {
    use axum::http::{Method, header};
    let reads = matches!(*req.method(), Method::GET | Method::HEAD | Method::OPTIONS);
    let origin = req.headers().get(header::ORIGIN).and_then(|v| v.to_str().ok());
    let host = req.headers().get(header::HOST).and_then(|v| v.to_str().ok());
    if let (false, Some(origin)) = (reads, origin) {
        let from = origin.split_once("://").map_or(origin, |(_, rest)| rest);
        if Some(from) != host {
            return ApiError::new(
                axum::http::StatusCode::FORBIDDEN,
                "cross_origin",
                format!("{} {} from a page of {origin}: commands are taken from this service's own pages and from clients that are not browsers", req.method(), req.uri().path()),
            )
            .into_response();
        }
    }
    next.run(req).await
}

/// Bounds a request's handling in time (a stream's body is not bounded: it has begun).
async fn bounded(req: Request, next: Next, timeout: Duration) -> Response {
    let what = format!("{} {}", req.method(), req.uri().path());
    match tokio::time::timeout(timeout, next.run(req)).await {
        Ok(response) => response,
        Err(_) => ApiError::new(
            axum::http::StatusCode::GATEWAY_TIMEOUT,
            "timed_out",
            format!("{what} took longer than {timeout:?}"),
        )
        .into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The README points at `examples/serve.toml`: it must stay a file the service reads.
    #[test]
    fn the_example_config_reads() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/serve.toml");
        let config = ServeConfig::from_file(&path).expect("examples/serve.toml reads");
        assert_eq!(config.listen, SocketAddr::from(([127, 0, 0, 1], 8080)));
        assert_eq!(config.preset, Preset::Whatsapp);
        assert_eq!(config.default_url.as_deref(), Some("ws://127.0.0.1:9001"));
        assert_eq!(config.limits, Limits::default(), "the file shows the defaults");
        let [crm, evolution] = &config.webhooks[..] else { panic!("two webhooks: {:?}", config.webhooks) };
        assert_eq!(
            (crm.id.as_deref(), crm.format, crm.timeout),
            (Some("crm"), WebhookFormat::Lifecycle, Duration::from_secs(10))
        );
        assert_eq!(crm.headers.get("x-tenant").map(String::as_str), Some("acme"));
        assert_eq!(evolution.format, WebhookFormat::Evolution);
        assert_eq!(evolution.events, ["connection.update", "remove.instance"]);
    }

    /// A misspelt setting is an error that names it, not a silently ignored line.
    #[test]
    fn an_unknown_setting_is_refused() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("serve.toml");
        std::fs::write(&path, "listen = \"127.0.0.1:8080\"\ndefault_ulr = \"ws://x\"\n").expect("write");
        let err = ServeConfig::from_file(&path).expect_err("unknown field");
        assert!(err.to_string().contains("default_ulr"), "{err}");
    }
}
