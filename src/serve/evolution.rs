//! The Evolution-API-compatible subset under `/instance/…`, so an existing
//! Evolution client can point at the service, and Evolution's webhook
//! envelope for lifecycle events.
//!
//! Held against Evolution's source (`whatsapp.baileys.service.ts`,
//! `connectionUpdate`; `instance.controller.ts`; the `Instance` model):
//!
//! - Faithful: the routes, `apikey` auth (global key or the instance's
//!   token), the response shapes of create / connect / connectionState /
//!   restart / logout / delete / fetchInstances, the error envelope
//!   `{status, error, response: {message}}`, and the webhook envelope
//!   `{event, instance, data, destination, date_time, sender, server_url,
//!   apikey}` for `connection.update` (`{instance, state, statusReason,
//!   wuid}`), `qrcode.updated`, `logout.instance`, `remove.instance` and
//!   `status.instance` (`{instance, status: "closed", disconnectionAt,
//!   disconnectionReasonCode}`, when an instance closes for good, as
//!   Evolution sends it when it will not reconnect).
//! - Every status comes from the recorded transition, never a constant
//!   ([`status_reason`]): a close's own status (Baileys' `statusCode`: 408,
//!   428, 440, 515, …), 401 (`DisconnectReason.loggedOut`) for a logout —
//!   what Baileys reports for one, whatever close code the socket ended
//!   with — and 200 for a state that is not a close (Evolution's `?? 200`).
//!   `fetchInstances` rows carry `disconnectionReasonCode` and
//!   `disconnectionAt` (when the instance last entered `close`) from the log,
//!   which knows them better than Evolution's database row does.
//! - Different, on purpose: a zombie is `connecting`, never `open`
//!   (Evolution #1153, #2443); logout succeeds on any instance and always
//!   ends `close` (R5; Evolution answers 400 when the socket is already
//!   gone); delete always removes and always sends `remove.instance` (R2;
//!   Evolution answers 400 and sends nothing when its logout throws).
//! - Accepted and ignored at create: the WhatsApp settings (`rejectCall`,
//!   `msgCall`, `groupsIgnore`, `alwaysOnline`, `readMessages`,
//!   `readStatus`, `syncFullHistory`), `number`, `integration`, and the
//!   per-instance `webhook` (configure webhooks on the service).
//! - Not filled: `apikey` in the webhook envelope (tokens are kept only as
//!   digests), profile names and pictures (`profileName`,
//!   `profilePictureUrl`), QR images (`base64`), `disconnectionObject`
//!   (Baileys' error object; the log keeps the close's reason in words,
//!   in `/v1/instances/NAME/history`).

use std::collections::HashMap;
use std::sync::Mutex;

use axum::Json;
use axum::extract::{Path, Query, State as AxumState};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Value, json};

use super::AppState;
use super::auth::{Caller, new_token};
use super::error::ApiError;
use super::events::rfc3339;
use crate::engine::Command;
use crate::log::{Event, InstanceSpec, Record};
use crate::machine::{ClosedCause, Input, InstanceName, State, StateKind};

/// The latest pairing code each instance's host reported (not recorded in
/// the log): what `qrcode.updated` and `connect` show. In a cluster they
/// are kept in a KV bucket of its NATS too (`<namespace>-pairing`, for an
/// hour), so that any host shows them and any host's webhook sends them.
#[derive(Default)]
pub(crate) struct PairingCodes {
    local: Mutex<HashMap<InstanceName, String>>,
    bucket: Option<async_nats::jetstream::kv::Store>,
}

/// How long a pairing code is kept in a cluster: WhatsApp's QR codes live a minute.
const PAIRING_KEPT: std::time::Duration = std::time::Duration::from_secs(3600);

impl PairingCodes {
    /// A cluster's codes, in its `<namespace>-pairing` bucket (created if missing).
    pub(crate) async fn cluster(
        cluster: &crate::cluster::Cluster,
    ) -> Result<Self, async_nats::jetstream::context::CreateKeyValueError> {
        let bucket = cluster
            .jetstream()
            .create_or_update_key_value(async_nats::jetstream::kv::Config {
                bucket: format!("{}-pairing", cluster.namespace()),
                description: "instance-lifecycle: the latest pairing code of each instance".into(),
                history: 1,
                max_age: PAIRING_KEPT,
                storage: async_nats::jetstream::stream::StorageType::File,
                ..Default::default()
            })
            .await?;
        Ok(Self { local: Mutex::default(), bucket: Some(bucket) })
    }

    fn local(&self) -> std::sync::MutexGuard<'_, HashMap<InstanceName, String>> {
        self.local.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub(crate) async fn set(&self, name: &InstanceName, code: String) {
        self.local().insert(name.clone(), code.clone());
        if let Some(bucket) = &self.bucket
            && let Err(e) = bucket.put(crate::cluster::token_of(name), code.into()).await
        {
            tracing::warn!(instance = %name, error = %e, "the pairing code is kept on this host only");
        }
    }

    pub(crate) async fn get(&self, name: &InstanceName) -> Option<String> {
        if let Some(bucket) = &self.bucket
            && let Ok(Some(code)) = bucket.get(crate::cluster::token_of(name)).await
        {
            return Some(String::from_utf8_lossy(&code).into_owned());
        }
        self.local().get(name).cloned()
    }
}

/// An error in Evolution's envelope: `{status, error, response: {message: [..]}}`.
pub(crate) struct EvoError(ApiError);

impl From<ApiError> for EvoError {
    fn from(e: ApiError) -> Self {
        Self(e)
    }
}

impl From<crate::engine::EngineError> for EvoError {
    fn from(e: crate::engine::EngineError) -> Self {
        Self(e.into())
    }
}

impl IntoResponse for EvoError {
    fn into_response(self) -> Response {
        let ApiError { status, message, .. } = self.0;
        let body = json!({
            "status": status.as_u16(),
            "error": status.canonical_reason().unwrap_or("Error"),
            "response": { "message": [message] },
        });
        (status, Json(body)).into_response()
    }
}

/// The body of `POST /instance/create`: Evolution's fields, loosely typed as
/// its clients send them; unknown fields are accepted (and ignored) as Evolution does.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct CreateBody {
    instance_name: Option<String>,
    token: Option<String>,
    /// Connect right away (Evolution: and wait for a QR code).
    #[serde(default)]
    qrcode: bool,
    integration: Option<String>,
    /// Ours: where the instance connects (`ws://…`, `wss://…` or `external:`);
    /// absent: the service's `default_url`.
    url: Option<String>,
}

fn state_of(state: &State) -> &'static str {
    state.coarse().as_str()
}

/// Baileys' `DisconnectReason.loggedOut`: what Evolution reports for a logout.
const LOGGED_OUT: u16 = 401;

/// The status Evolution reports for a state, from the record that led to
/// it: the close's own status, 401 for a logout (or the logout a delete
/// starts with), 200 for a state that is not a close (or a close without a
/// status: a lost connection).
pub(crate) fn status_reason(input: Option<&Input>, to: &State) -> u16 {
    match to {
        State::Closed { cause: ClosedCause::LoggedOut { .. }, .. } | State::Closing { .. } => LOGGED_OUT,
        State::Closed { status: Some(s), .. } => s.0,
        _ => input.and_then(|i| i.closed()).and_then(|(_, status, _)| status).map_or(200, |s| s.0),
    }
}

fn connection_state(name: &str, state: &State) -> Value {
    json!({ "instance": { "instanceName": name, "state": state_of(state) } })
}

fn success(message: &str) -> Value {
    json!({ "status": "SUCCESS", "error": false, "response": { "message": message } })
}

/// `POST /instance/create`.
pub(crate) async fn create(
    AxumState(app): AxumState<AppState>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<(StatusCode, Json<Value>), EvoError> {
    app.auth.global(&headers, "instance creation").await?;
    let body: CreateBody = serde_json::from_slice(&body)
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "invalid_body", e.to_string()))?;
    let Some(name) = body.instance_name.filter(|n| !n.is_empty()) else {
        return Err(ApiError::new(StatusCode::BAD_REQUEST, "invalid_body", "instanceName is required").into());
    };
    if let Some(integration) = body.integration.as_deref().filter(|i| *i != "WHATSAPP-BAILEYS") {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_body",
            format!("integration {integration}: only WHATSAPP-BAILEYS sessions are lifecycle sessions"),
        )
        .into());
    }
    let url = body.url.or_else(|| app.config.default_url.clone()).ok_or_else(|| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_body",
            "no url given and the service has no default_url: send \"url\" (ws://, wss:// or external:)",
        )
    })?;
    // Evolution answers a taken name with 403 "already in use".
    if app.instances.state(&name).await.is_ok() {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "already_exists",
            format!("This name \"{name}\" is already in use."),
        )
        .into());
    }
    let token = match body.token.filter(|t| !t.is_empty()) {
        Some(t) if app.auth.token_taken(&t).await? => {
            return Err(ApiError::new(StatusCode::FORBIDDEN, "token_taken", "this token is already in use").into());
        }
        Some(t) => t,
        None => new_token()?,
    };
    let started = std::time::Instant::now();
    app.instances.create(&name, InstanceSpec { url }, &token).await?;
    let instance = InstanceName::new(name.as_str()).map_err(|e| ApiError::body(e.to_string()))?;
    app.auth.created(&instance, &token).await?;
    let state = if body.qrcode {
        app.instances.command(&name, Command::Connect).await?
    } else {
        app.instances.state(&name).await?
    };
    app.metrics.command("create", started.elapsed());
    let body = json!({
        "instance": {
            "instanceName": name,
            "instanceId": name,
            "integration": "WHATSAPP-BAILEYS",
            "status": state_of(&state),
        },
        "hash": token,
        "settings": {},
    });
    Ok((StatusCode::CREATED, Json(body)))
}

/// Evolution's guard: an unknown (or removed) name is 404 "does not exist". The state, otherwise.
async fn check(app: &AppState, headers: &HeaderMap, name: &str) -> Result<State, EvoError> {
    app.auth.instance(headers, name).await?;
    match app.instances.state(name).await {
        Err(e) if e.code == "unknown_instance" || e.code == "removed" => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "unknown_instance",
            format!("The \"{name}\" instance does not exist"),
        )
        .into()),
        Err(e) => Err(e.into()),
        Ok(state) => Ok(state),
    }
}

/// `GET /instance/connect/{name}`: connects a closed instance; answers the
/// pairing state (or, when open, the connection state).
pub(crate) async fn connect(
    AxumState(app): AxumState<AppState>,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> Result<Json<Value>, EvoError> {
    check(&app, &headers, &name).await?;
    let started = std::time::Instant::now();
    let state = app.instances.command(&name, Command::Connect).await?;
    app.metrics.command("connect", started.elapsed());
    if state.kind() == StateKind::Open {
        return Ok(Json(connection_state(&name, &state)));
    }
    let instance = InstanceName::new(name.as_str()).map_err(|e| ApiError::body(e.to_string()))?;
    let codes = match &state {
        State::Connecting { phase: crate::machine::Phase::Pairing { codes }, .. } => *codes,
        _ => 0,
    };
    Ok(Json(json!({ "pairingCode": app.pairing.get(&instance).await, "code": null, "count": codes })))
}

/// `GET /instance/connectionState/{name}`.
pub(crate) async fn connection_state_route(
    AxumState(app): AxumState<AppState>,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> Result<Json<Value>, EvoError> {
    let state = check(&app, &headers, &name).await?;
    Ok(Json(connection_state(&name, &state)))
}

/// `POST /instance/restart/{name}`.
pub(crate) async fn restart(
    AxumState(app): AxumState<AppState>,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> Result<Json<Value>, EvoError> {
    check(&app, &headers, &name).await?;
    let started = std::time::Instant::now();
    let state = app.instances.command(&name, Command::Restart).await?;
    app.metrics.command("restart", started.elapsed());
    Ok(Json(connection_state(&name, &state)))
}

/// `DELETE /instance/logout/{name}`: ends `close`, whatever the socket does (R5).
pub(crate) async fn logout(
    AxumState(app): AxumState<AppState>,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> Result<Json<Value>, EvoError> {
    check(&app, &headers, &name).await?;
    let started = std::time::Instant::now();
    app.instances.command(&name, Command::Logout).await?;
    app.metrics.command("logout", started.elapsed());
    Ok(Json(success("Instance logged out")))
}

/// `DELETE /instance/delete/{name}`: always removes (R2) — even when the
/// logout fails, the seed's fix — and `remove.instance` always follows.
pub(crate) async fn delete(
    AxumState(app): AxumState<AppState>,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> Result<Json<Value>, EvoError> {
    check(&app, &headers, &name).await?;
    let started = std::time::Instant::now();
    app.instances.command(&name, Command::Delete).await?;
    app.metrics.command("delete", started.elapsed());
    Ok(Json(success("Instance deleted")))
}

/// The query of `GET /instance/fetchInstances`.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct FetchQuery {
    instance_name: Option<String>,
}

/// `GET /instance/fetchInstances[?instanceName=]`: every instance for the
/// global key; an instance's own token sees only its instance.
pub(crate) async fn fetch_instances(
    AxumState(app): AxumState<AppState>,
    headers: HeaderMap,
    Query(query): Query<FetchQuery>,
) -> Result<Json<Value>, EvoError> {
    let caller = app.auth.caller(&headers).await?;
    let list = app.instances.list().await?;
    let fleet: HashMap<InstanceName, u64> =
        app.fleet().await?.rows().filter_map(|r| Some((InstanceName::new(r.name.as_str()).ok()?, r.since))).collect();
    let wanted = |name: &InstanceName| {
        query.instance_name.as_deref().is_none_or(|q| q == name.as_str())
            && match &caller {
                Caller::Global => true,
                Caller::Instance(own) => own == name,
            }
    };
    let out: Vec<Value> = list
        .iter()
        .filter(|(name, _)| wanted(name))
        .map(|(name, state)| {
            // When it last entered `close`, from the fleet view (the log's fold).
            let closed_at = (state.coarse() == crate::machine::CoarseStatus::Close)
                .then(|| fleet.get(name).map(|since| rfc3339(crate::machine::Timestamp(*since))))
                .flatten();
            let code =
                matches!(state, State::Closed { .. } | State::Removed { .. }).then(|| status_reason(None, state));
            json!({
                "id": name.as_str(),
                "name": name.as_str(),
                "connectionStatus": state_of(state),
                "ownerJid": state.identity().map(|i| i.as_str().to_owned()),
                "integration": "WHATSAPP-BAILEYS",
                "disconnectionReasonCode": code,
                "disconnectionAt": closed_at,
                "state": state.to_string(),
            })
        })
        .collect();
    if let Some(q) = query.instance_name.as_deref()
        && out.is_empty()
    {
        return Err(
            ApiError::new(StatusCode::NOT_FOUND, "unknown_instance", format!("Instance \"{q}\" not found")).into()
        );
    }
    Ok(Json(Value::Array(out)))
}

/// The Evolution webhook events a record makes (event name, envelope).
/// `pairing_code` is the instance's latest code, for a record of one.
pub(crate) fn webhook_events(
    record: &Record,
    server_url: Option<&str>,
    destination: &str,
    pairing_code: Option<String>,
) -> Vec<(String, Value)> {
    let Event::Transition { from, input, .. } = &record.event else { return Vec::new() };
    let to = &record.to.state;
    let name = record.instance.as_str();
    let envelope = |event: &str, data: Value| {
        json!({
            "event": event,
            "instance": name,
            "data": data,
            "destination": destination,
            "date_time": rfc3339(record.at),
            "sender": to.identity().map(|i| i.as_str()),
            "server_url": server_url,
            "apikey": null,
        })
    };
    let mut out = Vec::new();
    if matches!(input, Input::PairingCode { .. }) {
        let data = json!({ "qrcode": { "instance": name, "pairingCode": pairing_code, "code": null, "base64": null } });
        out.push(("qrcode.updated".to_owned(), envelope("qrcode.updated", data)));
    }
    // A removal reports how the instance's last session ended: a logout (what a
    // delete starts with), or, for one that rested closed, the close it rested after.
    let reported = if to.kind() == StateKind::Removed { &from.state } else { to };
    let status = status_reason(Some(input), reported);
    if from.state.coarse() != to.coarse() || to.kind() == StateKind::Removed {
        let mut data = json!({ "instance": name, "state": state_of(to), "statusReason": status });
        if let Some(identity) = to.identity() {
            data["wuid"] = json!(identity.as_str());
        }
        out.push(("connection.update".to_owned(), envelope("connection.update", data)));
    }
    if to.kind() == StateKind::Closed && from.state.kind() != StateKind::Closed {
        let data = json!({
            "instance": name,
            "status": "closed",
            "disconnectionAt": rfc3339(record.at),
            "disconnectionReasonCode": status,
        });
        out.push(("status.instance".to_owned(), envelope("status.instance", data)));
    }
    if matches!(to, State::Closed { cause: ClosedCause::LoggedOut { .. }, .. })
        && from.state.kind() != StateKind::Closed
    {
        out.push(("logout.instance".to_owned(), envelope("logout.instance", json!({ "instance": name }))));
    }
    if to.kind() == StateKind::Removed && from.state.kind() != StateKind::Removed {
        out.push(("remove.instance".to_owned(), envelope("remove.instance", json!({ "instance": name }))));
    }
    out
}
