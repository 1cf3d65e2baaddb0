//! Our REST API under `/v1`: JSON in and out, unknown fields refused, typed
//! errors with their HTTP status (see [`ApiError`]).

use std::time::Instant;

use axum::Json;
use axum::extract::{Path, Query, State as AxumState};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::AppState;
use super::auth::{Caller, new_token};
use super::error::{ApiError, ErrorBody};
use super::events::{EventBody, Subscription};
use super::fleet::{ActionView, FleetView, TableEdge, actions};
use super::webhook::{DeadLetter, WebhookStatus};
use crate::engine::{Command, Signaled};
use crate::log::InstanceSpec;
use crate::machine::{InstanceName, State, StateKind};
use crate::transport::Endpoint;
use crate::transport::{HostEffect, HostSignal};

/// How an instance's connection is held.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum TransportKind {
    /// The service opens a WebSocket to `url`.
    #[default]
    Websocket,
    /// The host holds the connection and reports its signals (`/signals`).
    External,
}

/// `POST /v1/instances`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateInstance {
    /// The name: 1 to 64 bytes of `[A-Za-z0-9._-]`, starting with a letter or digit.
    pub name: String,
    /// Where it connects (`ws://…` or `wss://…`); absent: the service's `default_url`.
    /// Not used with `transport: external`.
    #[serde(default)]
    pub url: Option<String>,
    /// `websocket` (the default) or `external`.
    #[serde(default)]
    pub transport: TransportKind,
    /// The instance's own API key (it opens only this instance); absent: one is made.
    #[serde(default)]
    pub token: Option<String>,
    /// Connect right away.
    #[serde(default)]
    pub connect: bool,
}

/// An instance, as the API shows it.
#[derive(Debug, Serialize, ToSchema)]
pub struct InstanceView {
    /// The name.
    pub name: String,
    /// The state's kind: `Connecting`, `Open`, `Closing`, `Closed`, `Zombie`, `Removed`.
    pub kind: String,
    /// The coarse status: `open`, `connecting` or `close` (a zombie is `connecting`).
    pub status: &'static str,
    /// The state in words.
    pub state: String,
    /// The state, in full (the log's own structure).
    #[schema(value_type = Object)]
    pub detail: State,
    /// The session's identity, when open.
    pub identity: Option<String>,
    /// One instance's answer only (not in lists): which host commands its
    /// state allows, as the transition table answers them.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub actions: Option<Vec<ActionView>>,
}

impl InstanceView {
    pub(crate) fn of(name: &str, state: State) -> Self {
        Self {
            name: name.to_owned(),
            kind: state.kind().to_string(),
            status: state.coarse().as_str(),
            state: state.to_string(),
            identity: state.identity().map(|i| i.as_str().to_owned()),
            detail: state,
            actions: None,
        }
    }

    fn with_actions(mut self, app: &AppState) -> Self {
        if let Ok(name) = InstanceName::new(self.name.as_str()) {
            let engine = app.engine();
            self.actions = Some(actions(&name, &self.detail, engine.policy(), engine.now()));
        }
        self
    }
}

/// The answer to a create: the instance and its token (shown only here).
#[derive(Debug, Serialize, ToSchema)]
pub struct Created {
    /// The instance.
    pub instance: InstanceView,
    /// Its own API key: it opens this instance only. Kept as a digest; not shown again.
    pub token: String,
}

/// `GET /v1/instances` filters.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    /// Only instances in this state kind (`zombie`, `open`, …; any case).
    pub state: Option<String>,
}

/// `GET /v1/instances/{name}/history` and `GET /v1/events` position.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct AfterQuery {
    /// Only records after this sequence number (history: the instance's; events: the global one).
    pub after: Option<u64>,
    /// `/v1/events` only: one instance's records.
    pub instance: Option<String>,
}

/// Liveness and the log's position.
#[derive(Debug, Serialize, ToSchema)]
pub struct Health {
    /// `ok`.
    pub status: &'static str,
    /// Instances that are not removed.
    pub instances: usize,
    /// The newest global sequence number a commit covers.
    pub committed: u64,
}

fn timed<T>(app: &AppState, command: &str, started: Instant, result: T) -> T {
    app.metrics.command(command, started.elapsed());
    result
}

fn name_of(name: &str) -> Result<InstanceName, ApiError> {
    InstanceName::new(name).map_err(|e| ApiError::from(crate::engine::EngineError::InvalidName(e)))
}

fn json_body<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(bytes).map_err(|e| ApiError::body(e.to_string()))
}

/// Create an instance.
#[utoipa::path(post, path = "/v1/instances", request_body = CreateInstance,
    responses((status = 201, body = Created), (status = 409, body = ErrorBody), (status = 422, body = ErrorBody)))]
pub(crate) async fn create(
    AxumState(app): AxumState<AppState>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<(StatusCode, Json<Created>), ApiError> {
    app.auth.global(&headers, "instance creation").await?;
    let body: CreateInstance = json_body(&body)?;
    let name = name_of(&body.name)?;
    let url = match body.transport {
        TransportKind::External if body.url.is_some() => {
            return Err(ApiError::body("an external instance has no url: its host holds the connection"));
        }
        TransportKind::External => Endpoint::EXTERNAL.to_owned(),
        TransportKind::Websocket => body
            .url
            .or_else(|| app.config.default_url.clone())
            .ok_or_else(|| ApiError::body("no url given and the service has no default_url"))?,
    };
    let token = match body.token {
        Some(t) if t.is_empty() => return Err(ApiError::body("token: empty")),
        Some(t) if app.auth.token_taken(&t).await? => {
            return Err(ApiError::new(StatusCode::CONFLICT, "token_taken", "this token is already in use"));
        }
        Some(t) => t,
        None => new_token()?,
    };
    let started = Instant::now();
    app.instances.create(name.as_str(), InstanceSpec { url }, &token).await?;
    app.auth.created(&name, &token).await?;
    let state = if body.connect {
        app.instances.command(name.as_str(), Command::Connect).await?
    } else {
        app.instances.state(name.as_str()).await?
    };
    let instance = timed(&app, "create", started, InstanceView::of(name.as_str(), state));
    Ok((StatusCode::CREATED, Json(Created { instance, token })))
}

/// Every instance that is not removed, by name.
#[utoipa::path(get, path = "/v1/instances", params(ListQuery),
    responses((status = 200, body = [InstanceView]), (status = 422, body = ErrorBody)))]
pub(crate) async fn list(
    AxumState(app): AxumState<AppState>,
    headers: HeaderMap,
    Query(query): Query<ListQuery>,
) -> Result<Json<Vec<InstanceView>>, ApiError> {
    let caller = app.auth.caller(&headers).await?;
    let kind = match query.state.as_deref() {
        None => None,
        Some(s) => Some(StateKind::parse(s).ok_or_else(|| {
            ApiError::body(format!("state {s:?}: one of connecting, open, closing, closed, zombie, removed"))
        })?),
    };
    let out = app
        .instances
        .list()
        .await?
        .into_iter()
        .filter(|(name, _)| {
            matches!(&caller, Caller::Global) || matches!(&caller, Caller::Instance(own) if own == name)
        })
        .filter(|(_, state)| kind.is_none_or(|k| state.kind() == k))
        .map(|(name, state)| InstanceView::of(name.as_str(), state))
        .collect();
    Ok(Json(out))
}

/// One instance (a removed one too, until compaction purges it).
#[utoipa::path(get, path = "/v1/instances/{name}",
    responses((status = 200, body = InstanceView), (status = 404, body = ErrorBody)))]
pub(crate) async fn get(
    AxumState(app): AxumState<AppState>,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> Result<Json<InstanceView>, ApiError> {
    app.auth.instance(&headers, &name).await?;
    // Removed too: the recorded state is what a host wants to see.
    let state = app.instances.recorded(&name).await?;
    Ok(Json(InstanceView::of(&name, state).with_actions(&app)))
}

async fn command(
    app: &AppState,
    headers: &HeaderMap,
    name: &str,
    command: Command,
) -> Result<Json<InstanceView>, ApiError> {
    app.auth.instance(headers, name).await?;
    let started = Instant::now();
    let result = app.instances.command(name, command).await;
    let state = timed(app, command.as_str(), started, result)?;
    Ok(Json(InstanceView::of(name, state)))
}

/// Connect (or reconnect now); answers once the attempt has started.
#[utoipa::path(post, path = "/v1/instances/{name}/connect",
    responses((status = 200, body = InstanceView), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody), (status = 410, body = ErrorBody)))]
pub(crate) async fn connect(
    AxumState(app): AxumState<AppState>,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> Result<Json<InstanceView>, ApiError> {
    command(&app, &headers, &name, Command::Connect).await
}

/// Log out; answers once the instance is `Closed`, within the policy's bounds, whatever the socket does (R5).
#[utoipa::path(post, path = "/v1/instances/{name}/logout",
    responses((status = 200, body = InstanceView), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody), (status = 410, body = ErrorBody)))]
pub(crate) async fn logout(
    AxumState(app): AxumState<AppState>,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> Result<Json<InstanceView>, ApiError> {
    command(&app, &headers, &name, Command::Logout).await
}

/// Drop the connection, if any, and start a fresh attempt.
#[utoipa::path(post, path = "/v1/instances/{name}/restart",
    responses((status = 200, body = InstanceView), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody), (status = 410, body = ErrorBody)))]
pub(crate) async fn restart(
    AxumState(app): AxumState<AppState>,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> Result<Json<InstanceView>, ApiError> {
    command(&app, &headers, &name, Command::Restart).await
}

/// Delete: always reaches `Removed`, within the policy's bounds (R2); a repeated delete answers the same.
#[utoipa::path(delete, path = "/v1/instances/{name}",
    responses((status = 200, body = InstanceView), (status = 404, body = ErrorBody)))]
pub(crate) async fn delete(
    AxumState(app): AxumState<AppState>,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> Result<Json<InstanceView>, ApiError> {
    command(&app, &headers, &name, Command::Delete).await
}

/// An instance's recorded history (after `after`, if given).
#[utoipa::path(get, path = "/v1/instances/{name}/history", params(AfterQuery),
    responses((status = 200, body = [EventBody]), (status = 404, body = ErrorBody)))]
pub(crate) async fn history(
    AxumState(app): AxumState<AppState>,
    headers: HeaderMap,
    Path(name): Path<String>,
    Query(query): Query<AfterQuery>,
) -> Result<Json<Vec<EventBody>>, ApiError> {
    app.auth.instance(&headers, &name).await?;
    if query.instance.is_some() {
        return Err(ApiError::body("instance: not a parameter of history (the name is in the path)"));
    }
    let after = query.after.unwrap_or(0);
    let history = app.instances.history(&name, app.engine().policy()).await?;
    Ok(Json(history.into_iter().filter(|e| e.seq > after).collect()))
}

/// Report a signal of a connection the host holds (`transport: external`).
#[utoipa::path(post, path = "/v1/instances/{name}/signals", request_body = HostSignal,
    responses((status = 200, description = "What the rules made of it: the transition and its effects, or why it was ignored (a stale generation: R12)", body = Object),
        (status = 404, body = ErrorBody), (status = 422, body = ErrorBody)))]
pub(crate) async fn signal(
    AxumState(app): AxumState<AppState>,
    headers: HeaderMap,
    Path(name): Path<String>,
    body: axum::body::Bytes,
) -> Result<Json<Signaled>, ApiError> {
    app.auth.instance(&headers, &name).await?;
    let signal: HostSignal = json_body(&body)?;
    let instance = name_of(&name)?;
    let input = signal.input();
    if let HostSignal::Pairing { code: Some(code), .. } = &signal {
        app.pairing.set(&instance, code.clone()).await;
    }
    app.hub.reported(&instance, &input);
    Ok(Json(app.instances.signal(&name, input).await?))
}

/// An application frame to send: exactly one of `text` and `binary` (bytes as numbers).
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct SendFrame {
    text: Option<String>,
    binary: Option<Vec<u8>>,
}

/// Send an application frame on an `Open` instance's connection (the
/// engine holds the socket): queued in order, written by the connection;
/// never logged. 429 carries `Retry-After` (the send budget).
#[utoipa::path(post, path = "/v1/instances/{name}/send", request_body = SendFrame,
    responses((status = 202, description = "queued"),
        (status = 409, description = "not open (the state is in the message), host-driven, or the connection just ended", body = ErrorBody),
        (status = 429, description = "over the send budget; Retry-After says when to retry", body = ErrorBody),
        (status = 503, description = "the connection's queue is full", body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 410, body = ErrorBody), (status = 422, body = ErrorBody)))]
pub(crate) async fn send(
    AxumState(app): AxumState<AppState>,
    headers: HeaderMap,
    Path(name): Path<String>,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    app.auth.instance(&headers, &name).await?;
    let frame = match json_body::<SendFrame>(&body)? {
        SendFrame { text: Some(text), binary: None } => crate::transport::Frame::Text(text),
        SendFrame { text: None, binary: Some(bytes) } => crate::transport::Frame::Binary(bytes),
        _ => return Err(ApiError::body("give exactly one of text and binary")),
    };
    if let Some(cluster) = app.instances.cluster()
        && !cluster.owns(&name_of(&name)?)
    {
        // Frames go on the owner's socket; this host holds none for it.
        app.instances.state(&name).await?;
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "owned_elsewhere",
            format!("{name} is held by another host of the cluster: send through its owner (the fleet view's `owner`)"),
        ));
    }
    match app.engine().send(&name, frame) {
        Ok(()) => Ok((StatusCode::ACCEPTED, Json(serde_json::json!({ "queued": true }))).into_response()),
        Err(e @ crate::engine::EngineError::RateLimited { retry_after, .. }) => {
            // Whole seconds, rounded up: a client that waits that long finds room.
            let seconds = retry_after.as_secs() + u64::from(retry_after.subsec_nanos() > 0);
            let mut response = ApiError::from(e).into_response();
            if let Ok(value) = header::HeaderValue::from_str(&seconds.to_string()) {
                response.headers_mut().insert(header::RETRY_AFTER, value);
            }
            Ok(response)
        }
        Err(e) => Err(e.into()),
    }
}

/// The `?instance=NAME` of a live stream, checked: that instance's token
/// (or the global key) opens it; without it, only the global key opens
/// `everything`. Any other parameter is refused.
async fn instance_filter(
    app: &AppState,
    headers: &HeaderMap,
    query: &std::collections::HashMap<String, String>,
    everything: &str,
) -> Result<Option<String>, ApiError> {
    let filter = query.get("instance").cloned();
    match &filter {
        Some(name) => {
            app.auth.instance(headers, name).await?;
        }
        None => app.auth.global(headers, everything).await?,
    }
    if let Some(unknown) = query.keys().find(|k| *k != "instance") {
        return Err(ApiError::body(format!("unknown parameter {unknown}")));
    }
    Ok(filter)
}

/// A live stream of the application frames the engine's connections
/// receive (SSE, event `frame`: `{"instance","generation","frame":{"text"|"binary"}}`;
/// event `missed` when this reader fell behind, with how many it lost).
#[utoipa::path(get, path = "/v1/frames", params(("instance" = Option<String>, Query, description = "only this instance's")),
    responses((status = 200, description = "text/event-stream of received application frames")))]
pub(crate) async fn frames(
    AxumState(app): AxumState<AppState>,
    headers: HeaderMap,
    Query(query): Query<std::collections::HashMap<String, String>>,
) -> Result<Response, ApiError> {
    let filter = instance_filter(&app, &headers, &query, "every instance's frames").await?;
    let inbound = app.engine().frames();
    let stream = futures_util::stream::unfold((inbound, app.shutdown.clone()), move |(mut inbound, mut shutdown)| {
        let filter = filter.clone();
        async move {
            loop {
                let received = tokio::select! {
                    r = inbound.recv() => r,
                    _ = shutdown.wait_for(|s| *s) => return None,
                };
                let event = match received {
                    Ok(f) if filter.as_deref().is_some_and(|n| n != f.instance.as_str()) => continue,
                    Ok(f) => axum::response::sse::Event::default()
                        .event("frame")
                        .data(serde_json::to_string(&*f).unwrap_or_default()),
                    Err(crate::transport::InboundError::Missed { frames }) => {
                        axum::response::sse::Event::default().event("missed").data(format!("{{\"frames\":{frames}}}"))
                    }
                    Err(crate::transport::InboundError::Closed) => return None,
                };
                return Some((Ok::<_, std::convert::Infallible>(event), (inbound, shutdown)));
            }
        }
    });
    let sse = axum::response::sse::Sse::new(stream)
        .keep_alive(axum::response::sse::KeepAlive::new().interval(std::time::Duration::from_secs(15)));
    Ok(sse.into_response())
}

/// A live stream of the effects hosts must carry out for their `external` instances (SSE, event `effect`).
#[utoipa::path(get, path = "/v1/effects", params(("instance" = Option<String>, Query, description = "only this instance's")),
    responses((status = 200, description = "text/event-stream of HostEffect", body = HostEffect)))]
pub(crate) async fn effects(
    AxumState(app): AxumState<AppState>,
    headers: HeaderMap,
    Query(query): Query<std::collections::HashMap<String, String>>,
) -> Result<Response, ApiError> {
    let filter = instance_filter(&app, &headers, &query, "every instance's effects").await?;
    let source = match app.instances.cluster() {
        // In a cluster the owner may be another host: its effects come over NATS.
        Some(cluster) => {
            let instance = filter.as_deref().map(name_of).transpose()?;
            let subject = super::effects_subject(cluster.namespace(), instance.as_ref());
            let subscriber = cluster.client().subscribe(subject).await.map_err(|e| {
                ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "cluster_unavailable", format!("effects: {e}"))
            })?;
            Effects::Cluster(subscriber)
        }
        None => Effects::Local(app.hub.subscribe()),
    };
    // The stream ends when the service shuts down: a graceful shutdown waits for
    // every open connection, and this one would otherwise never end.
    let stream = futures_util::stream::unfold((source, app.shutdown.clone()), move |(mut source, mut shutdown)| {
        let filter = filter.clone();
        async move {
            loop {
                let received = tokio::select! {
                    r = source.next() => r?,
                    _ = shutdown.wait_for(|s| *s) => return None,
                };
                match received {
                    Ok(e) if filter.as_deref().is_some_and(|f| f != e.instance.as_str()) => continue,
                    Ok(e) => {
                        let data = serde_json::to_string(&e).unwrap_or_default();
                        let event =
                            axum::response::sse::Event::default().id(e.id.to_string()).event("effect").data(data);
                        return Some((Ok::<_, std::convert::Infallible>(event), (source, shutdown)));
                    }
                    Err(n) => {
                        let event = axum::response::sse::Event::default().event("lagged").data(format!(
                            "{{\"missed\":{n},\"what_to_do\":\"read each instance's state and reconnect\"}}"
                        ));
                        return Some((Ok(event), (source, shutdown)));
                    }
                }
            }
        }
    });
    let sse = axum::response::sse::Sse::new(stream)
        .keep_alive(axum::response::sse::KeepAlive::new().interval(std::time::Duration::from_secs(15)));
    Ok(sse.into_response())
}

/// Where `/v1/effects` reads: this host's hub, or the cluster's NATS.
enum Effects {
    Local(tokio::sync::broadcast::Receiver<HostEffect>),
    Cluster(async_nats::Subscriber),
}

impl Effects {
    /// The next effect, or how many were missed; `None` when the source ended.
    async fn next(&mut self) -> Option<Result<HostEffect, u64>> {
        use futures_util::StreamExt;
        match self {
            Self::Local(rx) => match rx.recv().await {
                Ok(e) => Some(Ok(e)),
                Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => Some(Err(n)),
                Err(tokio::sync::broadcast::error::RecvError::Closed) => None,
            },
            Self::Cluster(subscriber) => loop {
                let message = subscriber.next().await?;
                if let Ok(effect) = serde_json::from_slice(&message.payload) {
                    return Some(Ok(effect));
                }
            },
        }
    }
}

/// The transitions of every instance as they are recorded (SSE; the id is
/// the global sequence number: reconnect with `Last-Event-ID` to resume).
#[utoipa::path(get, path = "/v1/events", params(AfterQuery),
    responses((status = 200, description = "text/event-stream of EventBody (events `created`, `transition`, `snapshot`; a last `dropped` for a subscriber too slow)", body = EventBody),
        (status = 503, body = ErrorBody)))]
pub(crate) async fn events(
    AxumState(app): AxumState<AppState>,
    headers: HeaderMap,
    Query(query): Query<AfterQuery>,
) -> Result<Response, ApiError> {
    let instance = match &query.instance {
        Some(name) => {
            app.auth.instance(&headers, name).await?;
            Some(name_of(name)?)
        }
        None => {
            app.auth.global(&headers, "every instance's events").await?;
            None
        }
    };
    let after = resume_point(&headers, query.after)?;
    let permit = app.subscribers.clone().try_acquire_owned().map_err(|_| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "too_many_subscribers",
            "the service has as many event streams as it allows; try again later",
        )
    })?;
    // Without a position, the stream starts now.
    let after = match after {
        Some(after) => after,
        None => app.instances.position().await?,
    };
    let sub = Subscription { after, instance };
    let feed = super::events::Feed::of(&app.instances);
    Ok(super::events::stream(feed, sub, permit, app.shutdown.clone(), app.metrics.clone()).into_response())
}

/// Where an event stream resumes: `Last-Event-ID` (a reconnecting client's
/// last id) wins over `?after=`.
pub(crate) fn resume_point(headers: &HeaderMap, after: Option<u64>) -> Result<Option<u64>, ApiError> {
    match headers.get("last-event-id").and_then(|v| v.to_str().ok()) {
        Some(id) => id
            .trim()
            .parse::<u64>()
            .map(Some)
            .map_err(|_| ApiError::body(format!("Last-Event-ID {id:?}: not a sequence number"))),
        None => Ok(after),
    }
}

/// The transition table as a Mermaid state diagram.
#[utoipa::path(get, path = "/v1/diagram", responses((status = 200, description = "text/plain Mermaid", body = String)))]
pub(crate) async fn diagram(AxumState(app): AxumState<AppState>, headers: HeaderMap) -> Result<Response, ApiError> {
    app.auth.caller(&headers).await?;
    Ok(([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], app.diagram.to_string()).into_response())
}

/// The fleet at a glance: every instance's row and the edges the fleet took,
/// with the global position they cover (follow `/v1/events?after=` it).
#[utoipa::path(get, path = "/v1/fleet", responses((status = 200, body = FleetView)))]
pub(crate) async fn fleet(
    AxumState(app): AxumState<AppState>,
    headers: HeaderMap,
) -> Result<Json<FleetView>, ApiError> {
    app.auth.global(&headers, "the fleet view").await?;
    let engine = app.engine();
    let mut view = app.fleet().await?.view(engine.now().0, false, &engine.policy().name);
    if let Some(cluster) = app.instances.cluster() {
        view.host = Some(cluster.host().to_owned());
        let owners = cluster.view().owners();
        for row in &mut view.instances {
            row.owner = InstanceName::new(row.name.as_str()).ok().and_then(|n| owners.get(&n).cloned());
        }
    }
    Ok(Json(view))
}

/// The transition table's edges (what `/v1/diagram` draws), as JSON.
#[utoipa::path(get, path = "/v1/table", responses((status = 200, body = [TableEdge])))]
pub(crate) async fn table(AxumState(app): AxumState<AppState>, headers: HeaderMap) -> Result<Response, ApiError> {
    app.auth.caller(&headers).await?;
    Ok(([(header::CONTENT_TYPE, "application/json")], app.table.to_string()).into_response())
}

/// Liveness: always open, no key needed.
#[utoipa::path(get, path = "/healthz", responses((status = 200, body = Health)))]
pub(crate) async fn health(AxumState(app): AxumState<AppState>) -> Result<Json<Health>, ApiError> {
    let committed = app.instances.position().await?;
    let instances = app.instances.list().await?.len();
    Ok(Json(Health { status: "ok", instances, committed }))
}

/// Prometheus metrics (text exposition).
#[utoipa::path(get, path = "/metrics", responses((status = 200, description = "text/plain; version=0.0.4", body = String)))]
pub(crate) async fn metrics(AxumState(app): AxumState<AppState>, headers: HeaderMap) -> Result<Response, ApiError> {
    app.auth.global(&headers, "metrics").await?;
    let mut counts: Vec<(StateKind, usize)> = StateKind::ALL.iter().map(|k| (*k, 0)).collect();
    // This host's engine: in a cluster, the instances it owns (each host reports its own).
    for (_, state) in app.engine().list() {
        if let Some(c) = counts.iter_mut().find(|(k, _)| *k == state.kind()) {
            c.1 += 1;
        }
    }
    let log = app.engine().log().clone();
    // Reads of the store (its files' sizes, one key): off the async threads.
    let (bytes, compacted) = tokio::task::spawn_blocking(move || (log.size_on_disk(), log.last_compacted()))
        .await
        .map_err(|e| ApiError::internal(e.to_string()))?;
    app.metrics.log_state(bytes.unwrap_or(0), compacted.ok().flatten().map(|t| t.0));
    let text = app.metrics.render(&counts, app.engine().traffic());
    Ok(([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], text).into_response())
}

/// Every webhook's progress.
#[utoipa::path(get, path = "/v1/webhooks", responses((status = 200, body = [WebhookStatus])))]
pub(crate) async fn webhooks(
    AxumState(app): AxumState<AppState>,
    headers: HeaderMap,
) -> Result<Json<Vec<WebhookStatus>>, ApiError> {
    app.auth.global(&headers, "webhooks").await?;
    Ok(Json(app.outbox.status().await?))
}

/// Events given up on, oldest first, per webhook.
#[utoipa::path(get, path = "/v1/webhooks/dead", responses((status = 200, body = [DeadLetter])))]
pub(crate) async fn dead_letters(
    AxumState(app): AxumState<AppState>,
    headers: HeaderMap,
) -> Result<Json<Vec<DeadLetter>>, ApiError> {
    app.auth.global(&headers, "webhooks").await?;
    Ok(Json(app.outbox.dead_letters().await?))
}

/// Post a dead letter once more; it is removed when delivered.
#[utoipa::path(post, path = "/v1/webhooks/dead/{webhook}/{id}/retry",
    responses((status = 204), (status = 404, body = ErrorBody), (status = 502, body = ErrorBody)))]
pub(crate) async fn retry_dead(
    AxumState(app): AxumState<AppState>,
    headers: HeaderMap,
    Path((webhook, id)): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    app.auth.global(&headers, "webhooks").await?;
    app.outbox.retry(&webhook, &id).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// The OpenAPI document of `/v1`, `/healthz` and `/metrics`.
pub(crate) async fn openapi() -> Response {
    use utoipa::OpenApi;
    Json(super::openapi::ApiDoc::openapi()).into_response()
}
