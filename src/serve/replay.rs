//! `lifecycle replay DIR`: the dashboard over a production log, offline. It
//! opens a private copy of the log ([`Log::open_copy`]: the original is never
//! written, not even by sled's open), runs no engine and changes nothing:
//! every route that would is answered `405 read_only`. The fleet view's "now"
//! is the newest record's time, so times in state read as they did then.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use axum::Json;
use axum::Router;
use axum::extract::{Path as UrlPath, Query, State as AxumState};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use tokio::sync::{Semaphore, watch};

use super::api::{AfterQuery, Health, InstanceView};
use super::error::{ApiError, ServeError};
use super::events::{EventBody, Feed, Source, Subscription};
use super::fleet::{self, FleetView, SharedIndex};
use super::metrics::Metrics;
use crate::log::{Log, LogError};
use crate::machine::{InstanceName, Policy};

/// Streams a replay serves at once (each reads the copy at its own pace).
const SUBSCRIBERS: usize = 64;

#[derive(Clone)]
struct ReplayState {
    log: Log,
    policy: Arc<Policy>,
    index: SharedIndex,
    table: Arc<str>,
    diagram: Arc<str>,
    subscribers: Arc<Semaphore>,
    metrics: Arc<Metrics>,
    shutdown: watch::Receiver<bool>,
}

/// A running replay.
pub struct Replay {
    addr: SocketAddr,
    stop: watch::Sender<bool>,
    server: tokio::task::JoinHandle<Result<(), std::io::Error>>,
    in_use: bool,
    instances: usize,
    records: u64,
}

impl Replay {
    /// Copies the log at `dir`, reads it whole, and serves the dashboard on
    /// `listen` (loopback only: a replay has no API key).
    pub async fn start(dir: &Path, listen: SocketAddr) -> Result<Self, ServeError> {
        if !listen.ip().is_loopback() {
            return Err(ServeError::Invalid {
                field: "listen",
                reason: format!("{listen}: a replay serves a copy of a production log without a key; loopback only"),
            });
        }
        let dir = dir.to_path_buf();
        let (log, in_use, policy, index) = tokio::task::spawn_blocking(move || {
            let (log, in_use) = Log::open_copy(&dir)?;
            let policy = log.policy()?.unwrap_or_default();
            let index = fleet::build(&log, &policy)?;
            Ok::<_, LogError>((log, in_use, policy, index))
        })
        .await
        .map_err(|e| ServeError::Server(std::io::Error::other(e.to_string())))??;
        let (instances, records) = {
            let index = fleet::read(&index);
            (index.rows().count(), index.position())
        };
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .map_err(|source| ServeError::Listen { addr: listen, source })?;
        let addr = listener.local_addr().map_err(|source| ServeError::Listen { addr: listen, source })?;
        let (stop, shutdown) = watch::channel(false);
        let state = ReplayState {
            log,
            policy: Arc::new(policy),
            index,
            table: serde_json::to_string(&fleet::table()).unwrap_or_default().into(),
            diagram: crate::diagram::Diagram::from_rules().render(crate::diagram::Format::Mermaid).into(),
            subscribers: Arc::new(Semaphore::new(SUBSCRIBERS)),
            metrics: Arc::new(Metrics::new()),
            shutdown: shutdown.clone(),
        };
        let app = Router::new()
            .route("/v1/fleet", get(fleet_view))
            .route("/v1/table", get(table))
            .route("/v1/diagram", get(diagram))
            .route("/v1/instances", get(list))
            .route("/v1/instances/{name}", get(instance))
            .route("/v1/instances/{name}/history", get(history))
            .route("/v1/events", get(events))
            .route("/healthz", get(health))
            .merge(super::ui::routes())
            .fallback(read_only)
            .method_not_allowed_fallback(read_only)
            .with_state(state);
        let mut graceful = shutdown;
        let server = tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(async move {
                    let _ = graceful.wait_for(|s| *s).await;
                })
                .await
        });
        tracing::info!(%addr, instances, records, "replaying a copy of the log, read-only");
        Ok(Self { addr, stop, server, in_use, instances, records })
    }

    /// The address it listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Whether a running engine held the log when it was copied (the copy is then a snapshot of a moving log).
    pub fn was_in_use(&self) -> bool {
        self.in_use
    }

    /// Instances in the log (removed ones included) and its newest global sequence number.
    pub fn size(&self) -> (usize, u64) {
        (self.instances, self.records)
    }

    /// Stops serving; open streams end.
    pub async fn shutdown(self) -> Result<(), ServeError> {
        self.stop.send_replace(true);
        match self.server.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(ServeError::Server(e)),
            Err(e) => Err(ServeError::Server(std::io::Error::other(e.to_string()))),
        }
    }
}

async fn read_only(req: axum::extract::Request) -> ApiError {
    let (method, path) = (req.method().clone(), req.uri().path().to_owned());
    if method == axum::http::Method::GET {
        return ApiError::new(StatusCode::NOT_FOUND, "not_found", format!("no route GET {path} in a replay"));
    }
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "read_only",
        format!("{method} {path}: this is a read-only replay of a copied log; nothing can be changed"),
    )
}

async fn fleet_view(AxumState(s): AxumState<ReplayState>) -> Json<FleetView> {
    let index = fleet::read(&s.index);
    Json(index.view(index.newest(), true, &s.policy.name))
}

async fn table(AxumState(s): AxumState<ReplayState>) -> Response {
    ([(header::CONTENT_TYPE, "application/json")], s.table.to_string()).into_response()
}

async fn diagram(AxumState(s): AxumState<ReplayState>) -> Response {
    ([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], s.diagram.to_string()).into_response()
}

async fn records_of(s: &ReplayState, name: &str) -> Result<Vec<crate::log::Record>, ApiError> {
    let name = InstanceName::new(name).map_err(|e| ApiError::from(crate::engine::EngineError::InvalidName(e)))?;
    let log = s.log.clone();
    let n = name.clone();
    let history = tokio::task::spawn_blocking(move || log.history(&n))
        .await
        .map_err(|e| ApiError::internal(e.to_string()))?
        .map_err(|e| ApiError::from(crate::engine::EngineError::log(Some(name.clone()), e)))?;
    if history.is_empty() {
        return Err(ApiError::from(crate::engine::EngineError::UnknownInstance { name }));
    }
    Ok(history)
}

async fn instance(
    AxumState(s): AxumState<ReplayState>,
    UrlPath(name): UrlPath<String>,
) -> Result<Json<InstanceView>, ApiError> {
    let history = records_of(&s, &name).await?;
    let state = history.last().map(|r| r.to.state.clone()).ok_or_else(|| ApiError::internal("no records"))?;
    Ok(Json(InstanceView::of(&name, state)))
}

async fn list(AxumState(s): AxumState<ReplayState>) -> Result<Json<Vec<InstanceView>>, ApiError> {
    let log = s.log.clone();
    let latest = tokio::task::spawn_blocking(move || log.latest_all())
        .await
        .map_err(|e| ApiError::internal(e.to_string()))?
        .map_err(|e| ApiError::from(crate::engine::EngineError::log(None, e)))?;
    Ok(Json(
        latest
            .into_iter()
            .filter(|(_, l)| !matches!(l.instance.state, crate::machine::State::Removed { .. }))
            .map(|(name, l)| InstanceView::of(name.as_str(), l.instance.state))
            .collect(),
    ))
}

async fn history(
    AxumState(s): AxumState<ReplayState>,
    UrlPath(name): UrlPath<String>,
    Query(query): Query<AfterQuery>,
) -> Result<Json<Vec<EventBody>>, ApiError> {
    let after = query.after.unwrap_or(0);
    let history = records_of(&s, &name).await?;
    Ok(Json(history.iter().filter(|r| r.seq > after).map(|r| EventBody::of(r, &s.policy)).collect()))
}

async fn events(
    AxumState(s): AxumState<ReplayState>,
    headers: HeaderMap,
    Query(query): Query<AfterQuery>,
) -> Result<Response, ApiError> {
    let instance = match &query.instance {
        Some(n) => Some(InstanceName::new(n).map_err(|e| ApiError::from(crate::engine::EngineError::InvalidName(e)))?),
        None => None,
    };
    let after = super::api::resume_point(&headers, query.after)?.unwrap_or(0);
    let permit = s.subscribers.clone().try_acquire_owned().map_err(|_| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "too_many_subscribers",
            "too many event streams; try again later",
        )
    })?;
    let feed = Feed { source: Source::Log { log: s.log.clone(), wake: None }, policy: s.policy.clone() };
    Ok(super::events::stream(feed, Subscription { after, instance }, permit, s.shutdown.clone(), s.metrics.clone())
        .into_response())
}

async fn health(AxumState(s): AxumState<ReplayState>) -> Json<Health> {
    let index = fleet::read(&s.index);
    let instances = index.rows().filter(|r| r.kind != "Removed").count();
    Json(Health { status: "ok", instances, committed: s.log.committed() })
}
