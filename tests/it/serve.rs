//! `lifecycle serve` over real HTTP on 127.0.0.1: a real client (reqwest),
//! a real webhook receiver (axum), the reference peer behind the engine.
//! The seed scenarios and Evolution's issues replayed over HTTP, webhooks
//! through a receiver that is down for a while and through a SIGKILL of
//! the service, SSE resumed with `Last-Event-ID`, API keys, and a host that
//! holds its own connection (`transport: external`).

use std::collections::BTreeMap;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::http::{HeaderMap, StatusCode};
use instance_lifecycle::machine::{Policy, Preset};
use instance_lifecycle::serve::{ServeConfig, Service, WebhookConfig, WebhookFormat, signature};
use instance_lifecycle::testing::peer::{Action, Fault, TestPeer};
use serde_json::{Value, json};
use tokio::time::{Instant, sleep};

use crate::engine::fast;

pub(crate) const KEY: &str = "global-key-for-tests-0123456789";

/// A running service with its peer, a client and (optionally) a key.
pub(crate) struct Svc {
    service: Option<Service>,
    pub(crate) base: String,
    client: reqwest::Client,
    pub(crate) peer: TestPeer,
    key: Option<String>,
    _dir: tempfile::TempDir,
}

impl Svc {
    pub(crate) async fn start(policy: Policy, tweak: impl FnOnce(&mut ServeConfig)) -> Self {
        let peer = TestPeer::start().await.expect("peer");
        let dir = tempfile::tempdir().expect("dir");
        let mut config = ServeConfig {
            data: dir.path().join("log"),
            listen: "127.0.0.1:0".parse().expect("addr"),
            policy: Some(policy),
            default_url: Some(peer.url()),
            ..ServeConfig::default()
        };
        tweak(&mut config);
        let key = config.api_key.clone();
        let service = Service::start(config).await.expect("service");
        let base = format!("http://{}", service.local_addr());
        Self { service: Some(service), base, client: client(), peer, key, _dir: dir }
    }

    pub(crate) async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
        key: Option<&str>,
    ) -> (StatusCode, Value) {
        let mut req = self.client.request(method, format!("{}{path}", self.base));
        if let Some(k) = key.or(self.key.as_deref()) {
            req = req.header("apikey", k);
        }
        if let Some(b) = body {
            req = req.header("content-type", "application/json").body(b.to_string());
        }
        let resp = req.send().await.unwrap_or_else(|e| panic!("{path}: {e}"));
        let status = StatusCode::from_u16(resp.status().as_u16()).expect("status");
        let text = resp.text().await.expect("body");
        (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
    }

    pub(crate) async fn get(&self, path: &str) -> (StatusCode, Value) {
        self.call(reqwest::Method::GET, path, None, None).await
    }

    pub(crate) async fn post(&self, path: &str, body: Value) -> (StatusCode, Value) {
        self.call(reqwest::Method::POST, path, Some(body), None).await
    }

    pub(crate) async fn delete(&self, path: &str) -> (StatusCode, Value) {
        self.call(reqwest::Method::DELETE, path, None, None).await
    }

    /// Polls `GET path` until `ok` holds for the body; fails with the last body.
    pub(crate) async fn until(&self, path: &str, ok: impl Fn(&Value) -> bool, within: Duration) -> Value {
        let start = Instant::now();
        loop {
            let (_, body) = self.get(path).await;
            if ok(&body) {
                return body;
            }
            assert!(start.elapsed() < within, "{path}: condition not reached within {within:?}; last: {body}");
            sleep(Duration::from_millis(20)).await;
        }
    }

    /// Stops the service and hands its log's directory over (the log is at `log` in it).
    pub(crate) async fn stop_keeping_the_log(mut self) -> tempfile::TempDir {
        if let Some(s) = self.service.take() {
            tokio::time::timeout(Duration::from_secs(20), s.shutdown())
                .await
                .expect("stopped in 20 s")
                .expect("shutdown");
        }
        self._dir
    }

    pub(crate) async fn stop(mut self) {
        if let Some(s) = self.service.take() {
            // Open streams (SSE, effects) must not hold a graceful shutdown up.
            let stopped = tokio::time::timeout(Duration::from_secs(20), s.shutdown()).await;
            stopped.expect("the service did not stop within 20 s").expect("shutdown");
        }
    }
}

/// A client that gives up when nothing arrives for 30 s, so a hang fails with a message
/// (a read timeout, not a total one: SSE streams send a keep-alive every 15 s).
fn client() -> reqwest::Client {
    crypto_provider();
    reqwest::Client::builder().read_timeout(Duration::from_secs(30)).build().expect("client")
}

/// reqwest is built without a TLS provider of its own (the crate's is ring);
/// a test that builds a client before any service started installs it.
fn crypto_provider() {
    let _ = tokio_rustls::rustls::crypto::ring::default_provider().install_default();
}

/// A client that sends `key` with every request.
fn keyed_client(key: &str) -> reqwest::Client {
    crypto_provider();
    let mut headers = reqwest::header::HeaderMap::new();
    headers.insert("apikey", reqwest::header::HeaderValue::from_str(key).expect("key"));
    reqwest::Client::builder().read_timeout(Duration::from_secs(30)).default_headers(headers).build().expect("client")
}

/// A webhook receiver: records every post; answers 503 while `down`.
#[derive(Clone, Default)]
struct Receiver {
    got: Arc<Mutex<Vec<(HeaderMap, Value)>>>,
    down: Arc<AtomicBool>,
}

impl Receiver {
    async fn start() -> (Self, String) {
        let me = Self::default();
        let app = axum::Router::new().route(
            "/hook",
            axum::routing::post({
                let me = me.clone();
                move |headers: HeaderMap, body: axum::body::Bytes| {
                    let me = me.clone();
                    async move {
                        if me.down.load(Ordering::SeqCst) {
                            return StatusCode::SERVICE_UNAVAILABLE;
                        }
                        let value = serde_json::from_slice(&body).unwrap_or(Value::Null);
                        let sig = headers.get("x-lifecycle-signature").and_then(|v| v.to_str().ok()).unwrap_or("");
                        if !sig.is_empty() && sig != signature("s3cret", &body) {
                            return StatusCode::UNAUTHORIZED;
                        }
                        me.got.lock().expect("lock").push((headers, value));
                        StatusCode::OK
                    }
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let url = format!("http://{}/hook", listener.local_addr().expect("addr"));
        tokio::spawn(async move { axum::serve(listener, app).await });
        (me, url)
    }

    fn events(&self) -> Vec<Value> {
        self.got.lock().expect("lock").iter().map(|(_, v)| v.clone()).collect()
    }

    fn named(&self, event: &str, instance: &str) -> Vec<Value> {
        self.events().into_iter().filter(|v| v["event"] == event && v["instance"] == instance).collect()
    }

    async fn until(&self, ok: impl Fn(&[Value]) -> bool, within: Duration) {
        let start = Instant::now();
        while !ok(&self.events()) {
            assert!(start.elapsed() < within, "webhooks: not received within {within:?}: {:#?}", self.events());
            sleep(Duration::from_millis(20)).await;
        }
    }
}

fn state(v: &Value) -> &str {
    v["instance"]["state"].as_str().unwrap_or("")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_rest_walkthrough_and_typed_errors() {
    let svc = Svc::start(fast(Preset::Whatsapp), |_| {}).await;
    let (status, created) = svc.post("/v1/instances", json!({"name": "alice"})).await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    assert_eq!(created["instance"]["status"], "close", "a new instance is not open (#1407)");
    assert_eq!(created["token"].as_str().map(str::len), Some(32));
    let (status, body) = svc.post("/v1/instances", json!({"name": "alice"})).await;
    assert_eq!((status, body["error"]["code"].as_str()), (StatusCode::CONFLICT, Some("already_exists")));
    let (status, body) = svc.post("/v1/instances", json!({"name": "bad name"})).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(body["error"]["message"].as_str().is_some_and(|m| m.contains("' ' at byte 3")), "{body}");
    let (status, body) = svc.post("/v1/instances", json!({"name": "x", "policy": "fast"})).await;
    assert_eq!((status, body["error"]["code"].as_str()), (StatusCode::UNPROCESSABLE_ENTITY, Some("invalid_body")));
    let (status, body) = svc.post("/v1/instances", json!({"name": "y", "url": "http://typo"})).await;
    assert_eq!((status, body["error"]["code"].as_str()), (StatusCode::UNPROCESSABLE_ENTITY, Some("invalid_url")));
    let (status, body) = svc.get("/v1/instances/nobody").await;
    assert_eq!((status, body["error"]["code"].as_str()), (StatusCode::NOT_FOUND, Some("unknown_instance")));
    let (status, _) = svc.post("/v1/instances/alice/connect", json!({})).await;
    assert_eq!(status, StatusCode::OK);
    svc.until("/v1/instances/alice", |v| v["status"] == "open", Duration::from_secs(5)).await;
    let (status, list) = svc.get("/v1/instances?state=open").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(list.as_array().map(Vec::len), Some(1), "{list}");
    let (status, body) = svc.get("/v1/instances?state=sleepy").await;
    assert_eq!((status, body["error"]["code"].as_str()), (StatusCode::UNPROCESSABLE_ENTITY, Some("invalid_body")));
    let (status, removed) = svc.delete("/v1/instances/alice").await;
    assert_eq!((status, removed["kind"].as_str()), (StatusCode::OK, Some("Removed")));
    let (status, again) = svc.delete("/v1/instances/alice").await;
    assert_eq!(
        (status, again["kind"].as_str()),
        (StatusCode::OK, Some("Removed")),
        "deleting twice changes nothing (R2)"
    );
    let (status, body) = svc.post("/v1/instances/alice/connect", json!({})).await;
    assert_eq!((status, body["error"]["code"].as_str()), (StatusCode::GONE, Some("removed")));
    let (status, shown) = svc.get("/v1/instances/alice").await;
    assert_eq!((status, shown["kind"].as_str()), (StatusCode::OK, Some("Removed")));
    let (_, history) = svc.get("/v1/instances/alice/history").await;
    let seqs: Vec<u64> = history.as_array().expect("array").iter().filter_map(|r| r["seq"].as_u64()).collect();
    assert_eq!(seqs, (1..=seqs.len() as u64).collect::<Vec<_>>(), "history without gaps");
    let (_, later) = svc.get("/v1/instances/alice/history?after=3").await;
    assert_eq!(later.as_array().map(Vec::len), Some(seqs.len() - 3));
    let (status, doc) = svc.get("/v1/openapi.json").await;
    assert_eq!(status, StatusCode::OK);
    for path in ["/v1/instances", "/v1/instances/{name}/signals", "/v1/events", "/metrics"] {
        assert!(doc["paths"].get(path).is_some(), "OpenAPI lacks {path}");
    }
    let (status, diagram) = svc.get("/v1/diagram").await;
    assert_eq!(status, StatusCode::OK);
    assert!(diagram.as_str().is_some_and(|d| d.starts_with("stateDiagram-v2")), "{diagram}");
    let metrics =
        svc.client.get(format!("{}/metrics", svc.base)).send().await.expect("metrics").text().await.expect("text");
    assert!(metrics.contains("lifecycle_transitions_total{input=\"connect\"} 1"), "{metrics}");
    assert!(metrics.contains("lifecycle_command_duration_seconds_count{command=\"delete\"} 2"), "{metrics}");
    let (status, body) = svc.get("/no/such/route").await;
    assert_eq!((status, body["error"]["code"].as_str()), (StatusCode::NOT_FOUND, Some("not_found")));
    let big = "x".repeat(100 * 1024);
    let (status, _) = svc.post("/v1/instances", json!({"name": big})).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    svc.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_refuses_to_listen_beyond_loopback_without_a_key() {
    let config = ServeConfig { listen: "0.0.0.0:0".parse().expect("addr"), ..ServeConfig::default() };
    let err = Service::start(config).await.err().expect("refused");
    assert!(err.to_string().contains("without an API key"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_global_key_instance_tokens_and_none() {
    let svc = Svc::start(fast(Preset::Whatsapp), |c| c.api_key = Some(KEY.into())).await;
    let (_, a) = svc.post("/v1/instances", json!({"name": "a", "token": "token-of-a"})).await;
    assert_eq!(a["token"], "token-of-a");
    svc.post("/v1/instances", json!({"name": "b"})).await;
    let none = svc.client.get(format!("{}/v1/instances/a", svc.base)).send().await.expect("request");
    assert_eq!(none.status().as_u16(), 401, "no key");
    let (status, _) = svc.call(reqwest::Method::GET, "/v1/instances/a", None, Some("not-a-key")).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "a key nobody holds");
    let (status, _) = svc.call(reqwest::Method::GET, "/v1/instances/a", None, Some("token-of-a")).await;
    assert_eq!(status, StatusCode::OK, "an instance's token opens it");
    let (status, body) = svc.call(reqwest::Method::GET, "/v1/instances/b", None, Some("token-of-a")).await;
    assert_eq!((status, body["error"]["code"].as_str()), (StatusCode::FORBIDDEN, Some("forbidden")), "and no other");
    let (status, _) =
        svc.call(reqwest::Method::POST, "/v1/instances", Some(json!({"name": "c"})), Some("token-of-a")).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "creating takes the global key");
    let (status, list) = svc.call(reqwest::Method::GET, "/v1/instances", None, Some("token-of-a")).await;
    assert_eq!((status, list.as_array().map(Vec::len)), (StatusCode::OK, Some(1)), "a token lists its own instance");
    let bearer = svc.client.get(format!("{}/v1/instances/b", svc.base)).bearer_auth(KEY).send().await.expect("req");
    assert_eq!(bearer.status().as_u16(), 200, "Authorization: Bearer works too");
    let (status, fetched) = svc.call(reqwest::Method::GET, "/instance/fetchInstances", None, Some("token-of-a")).await;
    assert_eq!((status, fetched.as_array().map(Vec::len)), (StatusCode::OK, Some(1)));
    let (status, evo) = svc.call(reqwest::Method::GET, "/instance/connectionState/b", None, Some("token-of-a")).await;
    assert_eq!(
        (status, evo["status"].as_u64()),
        (StatusCode::FORBIDDEN, Some(403)),
        "Evolution routes, Evolution's envelope: {evo}"
    );
    let health = svc.client.get(format!("{}/healthz", svc.base)).send().await.expect("health");
    assert_eq!(health.status().as_u16(), 200, "liveness needs no key");
    let (status, _) =
        svc.call(reqwest::Method::POST, "/v1/instances", Some(json!({"name": "d", "token": "token-of-a"})), None).await;
    assert_eq!(status, StatusCode::CONFLICT, "a token names one instance");
    svc.stop().await;
}

/// Seed PR 2520 over HTTP: the zombie is `connecting`, never `open`; its
/// delete succeeds and `remove.instance` is sent — Evolution answered 400 and sent nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seed_pr2520_delete_of_a_zombie_over_the_evolution_api() {
    let (receiver, hook) = Receiver::start().await;
    let svc = Svc::start(fast(Preset::Evolution), |c| {
        c.webhooks.push(WebhookConfig { format: WebhookFormat::Evolution, ..WebhookConfig::new(hook) });
    })
    .await;
    let (status, created) = svc
        .post(
            "/instance/create",
            json!({"instanceName": "zed", "qrcode": true, "integration": "WHATSAPP-BAILEYS", "rejectCall": true}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    assert!(created["hash"].as_str().is_some_and(|h| !h.is_empty()), "{created}");
    svc.until("/instance/connectionState/zed", |v| state(v) == "open", Duration::from_secs(5)).await;
    svc.peer.act("zed", Action::Zombify);
    // The heartbeat finds it; the coarse state is never `open` for a dead socket.
    svc.until("/v1/instances/zed", |v| v["kind"] != "Open", Duration::from_secs(5)).await;
    let (_, shown) = svc.get("/instance/connectionState/zed").await;
    assert_ne!(state(&shown), "open", "{shown}");
    let (status, body) = svc.delete("/instance/delete/zed").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body, json!({"status": "SUCCESS", "error": false, "response": {"message": "Instance deleted"}}));
    receiver.until(|e| e.iter().any(|v| v["event"] == "remove.instance"), Duration::from_secs(10)).await;
    let (status, gone) = svc.get("/instance/connectionState/zed").await;
    assert_eq!((status, gone["status"].as_u64()), (StatusCode::NOT_FOUND, Some(404)), "{gone}");
    let updates = receiver.named("connection.update", "zed");
    assert_eq!(updates.first().map(|v| v["data"]["state"].clone()), Some(json!("connecting")), "{updates:#?}");
    assert!(updates.iter().any(|v| v["data"]["state"] == "open"), "{updates:#?}");
    let envelope = &receiver.named("remove.instance", "zed")[0];
    for field in ["event", "instance", "data", "destination", "date_time", "sender", "server_url", "apikey"] {
        assert!(envelope.get(field).is_some(), "Evolution's envelope has {field}: {envelope}");
    }
    svc.stop().await;
}

/// Seed PR 2501 over HTTP: a logout on a dead socket answers at once, ends
/// `close`, and never reconnects — Evolution threw, or looped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seed_pr2501_logout_on_a_dead_socket_over_http() {
    let (receiver, hook) = Receiver::start().await;
    let svc = Svc::start(fast(Preset::Evolution), |c| {
        c.webhooks.push(WebhookConfig { format: WebhookFormat::Evolution, ..WebhookConfig::new(hook) });
    })
    .await;
    svc.post("/instance/create", json!({"instanceName": "dana", "qrcode": true})).await;
    svc.until("/instance/connectionState/dana", |v| state(v) == "open", Duration::from_secs(5)).await;
    svc.peer.act("dana", Action::IgnoreLogouts);
    let started = Instant::now();
    let (status, body) = svc.delete("/instance/logout/dana").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(started.elapsed() < Duration::from_secs(3), "bounded by the logout and close time-outs (R5)");
    let (_, shown) = svc.get("/instance/connectionState/dana").await;
    assert_eq!(state(&shown), "close");
    let handshakes = svc.peer.handshakes("dana");
    sleep(Duration::from_millis(800)).await;
    assert_eq!(svc.peer.handshakes("dana"), handshakes, "no reconnect after a logout (R3)");
    assert_eq!(svc.peer.live("dana"), 0, "the socket is gone: the logout did not lie (#2567)");
    receiver.until(|_| !receiver.named("logout.instance", "dana").is_empty(), Duration::from_secs(10)).await;
    // Evolution #2560: a connect after a logout connects again.
    let (status, _) = svc.get("/instance/connect/dana").await;
    assert_eq!(status, StatusCode::OK);
    svc.until("/instance/connectionState/dana", |v| state(v) == "open", Duration::from_secs(5)).await;
    svc.stop().await;
}

/// Evolution #765 and the seeds' 401/408: a final close never becomes a
/// reconnect loop; #1407: a new instance is `close`, not `open`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn evolution_765_and_1407_over_http() {
    let svc = Svc::start(fast(Preset::Evolution), |_| {}).await;
    let (_, created) = svc.post("/instance/create", json!({"instanceName": "loop"})).await;
    assert_eq!(created["instance"]["status"], "close", "#1407: {created}");
    let (_, fetched) = svc.get("/instance/fetchInstances?instanceName=loop").await;
    assert_eq!(fetched[0]["connectionStatus"], "close", "{fetched}");
    for code in [4408, 4401] {
        svc.get("/instance/connect/loop").await;
        svc.until("/instance/connectionState/loop", |v| state(v) == "open", Duration::from_secs(5)).await;
        let before = svc.peer.handshakes("loop");
        svc.peer.act("loop", Action::Close(code));
        svc.until("/v1/instances/loop", |v| v["kind"] == "Closed", Duration::from_secs(5)).await;
        sleep(Duration::from_millis(600)).await;
        assert_eq!(svc.peer.handshakes("loop"), before, "close {code}: no reconnect (#765)");
    }
    let (_, history) = svc.get("/v1/instances/loop/history").await;
    assert!(history.as_array().map_or(0, Vec::len) < 20, "a handful of records, not a loop: {history}");
    svc.stop().await;
}

/// Every status in Evolution's envelopes and routes comes from the recorded
/// transition (PR 2501's reviewers): a logout reports 401, as Baileys'
/// `DisconnectReason.loggedOut`, not a hard-coded 200; a peer's close
/// reports its own status; `status.instance` and `fetchInstances` carry the
/// code and when the session ended.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn evolution_reports_the_real_close_reason() {
    let (receiver, hook) = Receiver::start().await;
    let svc = Svc::start(fast(Preset::Whatsapp), |c| {
        c.webhooks.push(WebhookConfig { format: WebhookFormat::Evolution, ..WebhookConfig::new(hook) });
    })
    .await;
    for name in ["out", "replaced"] {
        let (status, _) = svc.post("/instance/create", json!({"instanceName": name, "qrcode": true})).await;
        assert_eq!(status, StatusCode::CREATED);
        svc.until(&format!("/instance/connectionState/{name}"), |v| state(v) == "open", Duration::from_secs(5)).await;
    }
    let (status, body) = svc.delete("/instance/logout/out").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    svc.peer.act("replaced", Action::Close(4440));
    svc.until("/v1/instances/replaced", |v| v["kind"] == "Closed", Duration::from_secs(5)).await;
    let closed = |name: &'static str| {
        move |e: &[Value]| {
            e.iter().any(|v| v["event"] == "status.instance" && v["instance"] == name)
                && e.iter().any(|v| {
                    v["event"] == "connection.update" && v["instance"] == name && v["data"]["state"] == "close"
                })
        }
    };
    receiver.until(closed("out"), Duration::from_secs(10)).await;
    receiver.until(closed("replaced"), Duration::from_secs(10)).await;
    for (name, code) in [("out", 401), ("replaced", 440)] {
        let updates = receiver.named("connection.update", name);
        let close: Vec<&Value> = updates.iter().filter(|v| v["data"]["state"] == "close").collect();
        assert!(!close.is_empty() && close.iter().all(|v| v["data"]["statusReason"] == code), "{name}: {updates:#?}");
        let opened: Vec<&Value> = updates.iter().filter(|v| v["data"]["state"] == "open").collect();
        assert!(opened.iter().all(|v| v["data"]["statusReason"] == 200), "{name}: {opened:#?}");
        let status = &receiver.named("status.instance", name)[0]["data"];
        assert_eq!(
            (status["status"].as_str(), status["disconnectionReasonCode"].as_u64()),
            (Some("closed"), Some(code)),
            "{status}"
        );
        assert!(status["disconnectionAt"].as_str().is_some_and(|t| t.ends_with('Z')), "{status}");
        let (_, fetched) = svc.get(&format!("/instance/fetchInstances?instanceName={name}")).await;
        assert_eq!(fetched[0]["disconnectionReasonCode"], code, "{fetched}");
        assert!(fetched[0]["disconnectionAt"].as_str().is_some_and(|t| t.ends_with('Z')), "{fetched}");
    }
    let (_, both) = svc.get("/instance/fetchInstances").await;
    assert_eq!(both.as_array().map(Vec::len), Some(2), "{both}");
    let (status, _) = svc.delete("/instance/delete/out").await;
    assert_eq!(status, StatusCode::OK);
    receiver.until(|e| e.iter().any(|v| v["event"] == "remove.instance"), Duration::from_secs(10)).await;
    let last = receiver.named("connection.update", "out").last().cloned().unwrap_or_default();
    assert_eq!(
        (last["data"]["state"].as_str(), last["data"]["statusReason"].as_u64()),
        (Some("close"), Some(401)),
        "{last}"
    );
    svc.stop().await;
}

/// Webhooks while the receiver is down, then up: every event arrives (at
/// least once), in order per instance, signed; none is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhooks_outlast_a_receiver_that_is_down() {
    let (receiver, hook) = Receiver::start().await;
    receiver.down.store(true, Ordering::SeqCst);
    let svc = Svc::start(fast(Preset::Whatsapp), |c| {
        c.webhooks.push(WebhookConfig { secret: Some("s3cret".into()), ..WebhookConfig::new(hook) });
    })
    .await;
    for name in ["w1", "w2", "w3"] {
        svc.post("/v1/instances", json!({"name": name, "connect": true})).await;
    }
    for name in ["w1", "w2", "w3"] {
        svc.until(&format!("/v1/instances/{name}"), |v| v["status"] == "open", Duration::from_secs(5)).await;
        svc.post(&format!("/v1/instances/{name}/logout"), json!({})).await;
    }
    sleep(Duration::from_millis(1500)).await;
    assert!(receiver.events().is_empty(), "down: nothing received");
    let (_, status) = svc.get("/v1/webhooks").await;
    assert!(status[0]["depth"].as_u64().unwrap_or(0) > 0, "the outbox holds them: {status}");
    receiver.down.store(false, Ordering::SeqCst);
    let mut expected = BTreeMap::new();
    for name in ["w1", "w2", "w3"] {
        let (_, h) = svc.get(&format!("/v1/instances/{name}/history")).await;
        expected.insert(name.to_owned(), h.as_array().expect("history").len());
    }
    receiver
        .until(
            |events| {
                expected.iter().all(|(n, len)| events.iter().filter(|v| v["instance"] == n.as_str()).count() >= *len)
            },
            Duration::from_secs(20),
        )
        .await;
    for (name, len) in &expected {
        let mut seqs: Vec<u64> = receiver
            .events()
            .iter()
            .filter(|v| v["instance"] == name.as_str())
            .filter_map(|v| v["seq"].as_u64())
            .collect();
        seqs.dedup();
        assert_eq!(seqs, (1..=*len as u64).collect::<Vec<_>>(), "{name}: every record, in order");
    }
    let signed = receiver.got.lock().expect("lock").iter().all(|(h, _)| h.get("x-lifecycle-signature").is_some());
    assert!(signed, "every delivery is signed");
    svc.stop().await;
}

/// A webhook receiver that refuses (4xx) sends events to the dead letters,
/// which can be retried once it accepts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_are_listed_and_retried() {
    let (receiver, hook) = Receiver::start().await;
    // A wrong secret: the receiver answers 401, a permanent refusal.
    let svc = Svc::start(fast(Preset::Whatsapp), |c| {
        c.webhooks.push(WebhookConfig {
            id: Some("main".into()),
            secret: Some("wrong".into()),
            ..WebhookConfig::new(hook)
        });
    })
    .await;
    svc.post("/v1/instances", json!({"name": "dl"})).await;
    let dead =
        svc.until("/v1/webhooks/dead", |v| v.as_array().is_some_and(|a| !a.is_empty()), Duration::from_secs(10)).await;
    assert_eq!(dead[0]["webhook"], "main");
    assert_eq!(dead[0]["instance"], "dl");
    assert!(dead[0]["error"].as_str().is_some_and(|e| e.contains("401")), "{dead}");
    let id = dead[0]["id"].as_str().expect("id").to_owned();
    let (status, _) = svc.post(&format!("/v1/webhooks/dead/main/{id}/retry"), json!({})).await;
    assert_eq!(status, StatusCode::BAD_GATEWAY, "still refused");
    assert!(receiver.events().is_empty());
    svc.stop().await;
}

/// Reads an SSE stream until `n` events with ids (or the time is up).
pub(crate) async fn read_sse(client: &reqwest::Client, url: &str, last_id: Option<u64>, n: usize) -> Vec<(u64, Value)> {
    let mut req = client.get(url);
    if let Some(id) = last_id {
        req = req.header("last-event-id", id.to_string());
    }
    let mut resp = req.send().await.expect("sse");
    assert_eq!(resp.status().as_u16(), 200);
    let mut buf = String::new();
    let mut out = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while out.len() < n && Instant::now() < deadline {
        let Ok(Ok(Some(chunk))) = tokio::time::timeout(Duration::from_millis(500), resp.chunk()).await else {
            continue;
        };
        buf.push_str(&String::from_utf8_lossy(&chunk));
        while let Some(end) = buf.find("\n\n") {
            let block: String = buf.drain(..end + 2).collect();
            let id = block.lines().find_map(|l| l.strip_prefix("id: ")).and_then(|i| i.parse().ok());
            let data = block.lines().find_map(|l| l.strip_prefix("data: ")).and_then(|d| serde_json::from_str(d).ok());
            if let (Some(id), Some(data)) = (id, data) {
                out.push((id, data));
            }
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sse_resumes_with_last_event_id_without_gap_or_duplicate() {
    let svc = Svc::start(fast(Preset::Whatsapp), |_| {}).await;
    for name in ["s1", "s2"] {
        svc.post("/v1/instances", json!({"name": name, "connect": true})).await;
    }
    for name in ["s1", "s2"] {
        svc.until(&format!("/v1/instances/{name}"), |v| v["status"] == "open", Duration::from_secs(5)).await;
    }
    let url = format!("{}/v1/events?after=0", svc.base);
    let first = read_sse(&svc.client, &url, None, 4).await;
    assert_eq!(first.len(), 4, "{first:?}");
    // Gone for a while: more happens.
    for name in ["s1", "s2"] {
        svc.post(&format!("/v1/instances/{name}/logout"), json!({})).await;
    }
    let last = first.last().map(|(id, _)| *id);
    let (_, h1) = svc.get("/v1/instances/s1/history").await;
    let (_, h2) = svc.get("/v1/instances/s2/history").await;
    let total = h1.as_array().map_or(0, Vec::len) + h2.as_array().map_or(0, Vec::len);
    let rest = read_sse(&svc.client, &format!("{}/v1/events", svc.base), last, total - 4).await;
    let ids: Vec<u64> = first.iter().chain(rest.iter()).map(|(id, _)| *id).collect();
    assert_eq!(ids, (1..=total as u64).collect::<Vec<_>>(), "every record once, in order");
    let one = read_sse(&svc.client, &format!("{}/v1/events?after=0&instance=s2", svc.base), None, 2).await;
    assert!(one.iter().all(|(_, v)| v["instance"] == "s2"), "{one:?}");
    svc.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sse_subscribers_are_bounded() {
    let svc = Svc::start(fast(Preset::Whatsapp), |c| c.limits.sse_subscribers = 1).await;
    let first = svc.client.get(format!("{}/v1/events", svc.base)).send().await.expect("sse");
    assert_eq!(first.status().as_u16(), 200);
    let (status, body) = svc.get("/v1/events").await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (StatusCode::SERVICE_UNAVAILABLE, Some("too_many_subscribers"))
    );
    drop(first);
    // The place is freed once the first stream's producer notices the client left.
    svc.post("/v1/instances", json!({"name": "wake"})).await;
    let start = Instant::now();
    loop {
        let resp = svc.client.get(format!("{}/v1/events", svc.base)).send().await.expect("sse");
        if resp.status().as_u16() == 200 {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(5), "the place was never freed");
        sleep(Duration::from_millis(50)).await;
    }
    svc.stop().await;
}

/// Reads host effects from `/v1/effects` until one satisfies `ok`.
struct Effects {
    resp: reqwest::Response,
    buf: String,
}

impl Effects {
    async fn open(svc: &Svc, instance: &str) -> Self {
        let resp =
            svc.client.get(format!("{}/v1/effects?instance={instance}", svc.base)).send().await.expect("effects");
        assert_eq!(resp.status().as_u16(), 200);
        Self { resp, buf: String::new() }
    }

    async fn next(&mut self, effect: &str) -> Value {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            while let Some(end) = self.buf.find("\n\n") {
                let block: String = self.buf.drain(..end + 2).collect();
                if let Some(data) = block.lines().find_map(|l| l.strip_prefix("data: "))
                    && let Ok(v) = serde_json::from_str::<Value>(data)
                    && v["effect"] == effect
                {
                    return v;
                }
            }
            assert!(Instant::now() < deadline, "no {effect} effect within 10 s; left: {:?}", self.buf);
            if let Ok(Ok(Some(chunk))) = tokio::time::timeout(Duration::from_millis(500), self.resp.chunk()).await {
                self.buf.push_str(&String::from_utf8_lossy(&chunk));
            }
        }
    }
}

/// A host that holds its own connection (Baileys in Node, say) drives an
/// instance through open → 408 → reconnect → 401 → closed → connect →
/// logout → delete; the engine decides every step, a stale signal is ignored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn external_host_drives_a_session_through_the_rules() {
    let svc = Svc::start(fast(Preset::Whatsapp), |_| {}).await;
    let mut effects = Effects::open(&svc, "ext").await;
    let (status, created) = svc.post("/v1/instances", json!({"name": "ext", "transport": "external"})).await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    let (status, body) =
        svc.post("/v1/instances", json!({"name": "ext2", "transport": "external", "url": "ws://x"})).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    svc.post("/v1/instances/ext/connect", json!({})).await;
    let open1 = effects.next("open").await;
    let g1 = open1["generation"].as_u64().expect("generation");
    let signal = |s: Value| svc.post("/v1/instances/ext/signals", s);
    let (status, answer) =
        signal(json!({"signal": "opened", "generation": g1, "identity": "5511999@s.whatsapp.net"})).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!(answer["outcome"]["outcome"], "moved", "{answer}");
    assert!(answer["state"].get("Open").is_some(), "{answer}");
    // 408 while open: WhatsApp's preset reconnects (a timed-out session, not a refusal).
    let (_, answer) = signal(json!({"signal": "closed", "generation": g1, "status": 408, "reason": "timed out"})).await;
    assert!(answer["state"].get("Connecting").is_some(), "{answer}");
    let open2 = effects.next("open").await;
    let g2 = open2["generation"].as_u64().expect("generation");
    assert!(g2 > g1);
    assert_eq!(open2["resume"], "5511999@s.whatsapp.net", "the session is resumed");
    // A late signal of the old connection changes nothing (R12).
    let (_, stale) = signal(json!({"signal": "opened", "generation": g1, "identity": "old"})).await;
    assert_eq!(stale["outcome"]["outcome"], "ignored", "{stale}");
    assert!(stale["outcome"]["reason"].get("Stale").is_some(), "{stale}");
    signal(json!({"signal": "opened", "generation": g2, "identity": "5511999@s.whatsapp.net"})).await;
    // 401: logged out elsewhere, final.
    let (_, answer) =
        signal(json!({"signal": "closed", "generation": g2, "status": 401, "reason": "logged out"})).await;
    assert!(answer["state"].get("Closed").is_some(), "401 is final: {answer}");
    sleep(Duration::from_millis(400)).await;
    let (_, shown) = svc.get("/v1/instances/ext").await;
    assert_eq!(shown["kind"], "Closed", "no reconnect after a final close: {shown}");
    // The host connects it again, then logs out.
    svc.post("/v1/instances/ext/connect", json!({})).await;
    let g3 = effects.next("open").await["generation"].as_u64().expect("generation");
    signal(json!({"signal": "opened", "generation": g3, "identity": "5511999@s.whatsapp.net"})).await;
    let logout = {
        let svc_base = svc.base.clone();
        let client = svc.client.clone();
        tokio::spawn(async move { client.post(format!("{svc_base}/v1/instances/ext/logout")).send().await })
    };
    let send_logout = effects.next("send_logout").await;
    assert_eq!(send_logout["generation"].as_u64(), Some(g3));
    signal(json!({"signal": "logout_confirmed", "generation": g3})).await;
    let close = effects.next("close").await;
    assert_eq!(close["generation"].as_u64(), Some(g3));
    signal(json!({"signal": "closed", "generation": g3, "status": close["status"], "initiator": "local"})).await;
    let logged_out = logout.await.expect("join").expect("logout");
    assert_eq!(logged_out.status().as_u16(), 200);
    let (_, shown) = svc.get("/v1/instances/ext").await;
    assert_eq!(shown["kind"], "Closed");
    let (status, removed) = svc.delete("/v1/instances/ext").await;
    assert_eq!((status, removed["kind"].as_str()), (StatusCode::OK, Some("Removed")));
    let (status, body) =
        svc.post("/v1/instances/ext/signals", json!({"signal": "opened", "generation": g3, "bogus": 1})).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    svc.stop().await;
}

/// A host whose protocol lets the peer steer the session (Discord, over
/// `transport: external`): a reconnect the peer asks for closes the old
/// connection with 1012 and resumes (R13); an invalid session starts anew
/// after the wait the host gives (R14); an acknowledgement that sets the
/// heartbeat schedule brings the next ping then (R7). A wait past an hour is a 422.
#[tokio::test]
async fn a_host_reports_what_the_peer_asks_of_the_session() {
    // The policy's own beat is a minute away: a ping within the test came from the peer's schedule.
    let mut policy = fast(Preset::Whatsapp);
    policy.heartbeat.interval = Duration::from_secs(60);
    let svc = Svc::start(policy, |_| {}).await;
    let mut effects = Effects::open(&svc, "shard-0").await;
    svc.post("/v1/instances", json!({"name": "shard-0", "transport": "external"})).await;
    svc.post("/v1/instances/shard-0/connect", json!({})).await;
    let g1 = effects.next("open").await["generation"].as_u64().expect("generation");
    let signal = |s: Value| svc.post("/v1/instances/shard-0/signals", s);
    signal(json!({"signal": "opened", "generation": g1, "identity": "session-1"})).await;

    let (status, answer) = signal(json!({"signal": "reconnect_requested", "generation": g1})).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    let close = effects.next("close").await;
    assert_eq!((close["generation"].as_u64(), close["status"].as_u64()), (Some(g1), Some(1012)), "{close}");
    let open2 = effects.next("open").await;
    let g2 = open2["generation"].as_u64().expect("generation");
    assert_eq!(open2["resume"], "session-1", "the session is resumed: {open2}");
    signal(json!({"signal": "opened", "generation": g2, "identity": "session-1"})).await;

    let (status, answer) = signal(json!({"signal": "heartbeat_due", "generation": g2, "after_ms": 50})).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    let ping = effects.next("ping").await;
    assert_eq!(ping["generation"].as_u64(), Some(g2), "{ping}");

    let (status, body) =
        signal(json!({"signal": "session_invalid", "generation": g2, "retry_after_ms": 3_600_001})).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert!(body.to_string().contains("an hour"), "{body}");
    let (status, answer) = signal(json!({"signal": "session_invalid", "generation": g2, "retry_after_ms": 100})).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    let open3 = effects.next("open").await;
    assert!(open3["generation"].as_u64() > Some(g2), "{open3}");
    assert_eq!(open3["resume"], Value::Null, "an invalid session is never resumed: {open3}");
    // Queued behind the fleet for its IDENTIFY: the connect deadline counts from the step (R15).
    let g3 = open3["generation"].as_u64().expect("generation");
    let (status, answer) = signal(json!({"signal": "handshake_step", "generation": g3})).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!(answer["outcome"]["outcome"], "upkeep", "{answer}");
    assert_eq!(answer["outcome"]["effects"][0]["ArmTimer"]["timer"]["kind"], "Connect", "{answer}");
    svc.stop().await;
}

fn lifecycle_serve(data: &std::path::Path, port: u16, peer: &str, hook: &str) -> Child {
    Command::new(env!("CARGO_BIN_EXE_lifecycle"))
        .args(["serve", "--data"])
        .arg(data)
        .args(["--listen", &format!("127.0.0.1:{port}"), "--default-url", peer, "--webhook", hook])
        .env("LIFECYCLE_API_KEY", KEY)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("lifecycle serve")
}

pub(crate) fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("port")
}

async fn wait_http(client: &reqwest::Client, base: &str) {
    let start = Instant::now();
    while client.get(format!("{base}/healthz")).send().await.is_err() {
        assert!(start.elapsed() < Duration::from_secs(20), "the service did not come up");
        sleep(Duration::from_millis(50)).await;
    }
}

/// SIGKILL the service while its webhook receiver is down, start it again:
/// every transition recorded before the kill is delivered after the restart.
/// (An outbox kept in memory loses all of them: the receiver was down.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhooks_survive_a_sigkill_of_the_service() {
    let peer = TestPeer::start().await.expect("peer");
    peer.set_default_fault(Fault::Ready);
    let (receiver, hook) = Receiver::start().await;
    receiver.down.store(true, Ordering::SeqCst);
    let dir = tempfile::tempdir().expect("dir");
    let data = dir.path().join("log");
    let port = free_port();
    let base = format!("http://127.0.0.1:{port}");
    let client = keyed_client(KEY);
    let mut child = lifecycle_serve(&data, port, &peer.url(), &hook);
    wait_http(&client, &base).await;
    for i in 0..5 {
        let body = json!({"name": format!("k{i}"), "connect": true}).to_string();
        let r = client
            .post(format!("{base}/v1/instances"))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .expect("create");
        assert_eq!(r.status().as_u16(), 201);
    }
    let start = Instant::now();
    loop {
        let list: Value =
            client.get(format!("{base}/v1/instances?state=open")).send().await.expect("list").json_value().await;
        if list.as_array().map_or(0, Vec::len) == 5 {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(10), "not all open: {list}");
        sleep(Duration::from_millis(20)).await;
    }
    sleep(Duration::from_millis(300)).await; // a retry or two fail meanwhile
    child.kill().expect("SIGKILL");
    let _ = child.wait();
    receiver.down.store(false, Ordering::SeqCst);
    let mut child = lifecycle_serve(&data, port, &peer.url(), &hook);
    wait_http(&client, &base).await;
    let mut expected = Vec::new();
    for i in 0..5 {
        let h: Value =
            client.get(format!("{base}/v1/instances/k{i}/history")).send().await.expect("history").json_value().await;
        // What the first run recorded (before the restart's recovery record).
        for r in h.as_array().expect("history") {
            expected.push(r["id"].as_str().expect("id").to_owned());
        }
    }
    receiver
        .until(
            |events| expected.iter().all(|id| events.iter().any(|v| v["id"].as_str() == Some(id.as_str()))),
            Duration::from_secs(30),
        )
        .await;
    let _ = child.kill();
    let _ = child.wait();
}

pub(crate) trait JsonValue {
    async fn json_value(self) -> Value;
}

impl JsonValue for reqwest::Response {
    async fn json_value(self) -> Value {
        serde_json::from_str(&self.text().await.unwrap_or_default()).unwrap_or(Value::Null)
    }
}

/// `examples/host.mjs` — the README's host in plain Node — walks a session
/// through the rules against a real service. CI installs Node and requires it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_node_host_example_runs() {
    let has_node = Command::new("node").arg("--version").output().is_ok_and(|o| o.status.success());
    assert!(has_node || std::env::var_os("CI").is_none(), "CI must have Node (.ci/run installs it)");
    if !has_node {
        eprintln!("node not found: examples/host.mjs is not run here");
        return;
    }
    let svc = Svc::start(fast(Preset::Whatsapp), |c| c.api_key = Some(KEY.into())).await;
    let example = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/host.mjs");
    let run = tokio::process::Command::new("node")
        .arg(&example)
        .args([svc.base.as_str(), "from-node"])
        .env("LIFECYCLE_API_KEY", KEY)
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(60), run).await.expect("node ran within 60 s").expect("node");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(stdout.lines().filter(|l| l.starts_with("ok  ")).count(), 6, "{stdout}");
    // What the example says happened is what the log says happened.
    let (_, history) = svc.get("/v1/instances/from-node/history").await;
    let inputs: Vec<&str> = history.as_array().expect("history").iter().filter_map(|e| e["input"].as_str()).collect();
    assert_eq!(inputs.iter().filter(|i| **i == "opened").count(), 2, "opened, then reopened after 408: {inputs:?}");
    assert!(
        inputs.contains(&"reconnect timer") && inputs.contains(&"logout") && inputs.contains(&"delete"),
        "{inputs:?}"
    );
    svc.stop().await;
}

/// An instance's token is durable when create answers: a SIGKILL right
/// after it does not lock the client out of its own instance. Its digest is
/// in the `Created` record itself (one commit, in the chain).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_token_survives_a_sigkill() {
    let peer = TestPeer::start().await.expect("peer");
    let (_receiver, hook) = Receiver::start().await;
    let dir = tempfile::tempdir().expect("dir");
    let data = dir.path().join("log");
    let port = free_port();
    let base = format!("http://127.0.0.1:{port}");
    let admin = keyed_client(KEY);
    let mut child = lifecycle_serve(&data, port, &peer.url(), &hook);
    wait_http(&admin, &base).await;
    let created: Value = admin
        .post(format!("{base}/v1/instances"))
        .header("content-type", "application/json")
        .body(json!({"name": "mine"}).to_string())
        .send()
        .await
        .expect("create")
        .json_value()
        .await;
    let token = created["token"].as_str().expect("token").to_owned();
    child.kill().expect("SIGKILL");
    let _ = child.wait();
    let mut child = lifecycle_serve(&data, port, &peer.url(), &hook);
    wait_http(&admin, &base).await;
    let own = keyed_client(&token);
    let status = own.get(format!("{base}/v1/instances/mine")).send().await.expect("get").status();
    assert_eq!(status.as_u16(), 200, "the token still opens its instance after a SIGKILL");
    let _ = child.kill();
    let _ = child.wait();
    let (log, _) = instance_lifecycle::log::Log::open_copy(&data).expect("copy");
    let history = log.history(&instance_lifecycle::machine::InstanceName::new("mine").expect("name")).expect("history");
    let digest = instance_lifecycle::log::Digest::of(token.as_bytes());
    assert!(
        matches!(&history[0].event, instance_lifecycle::log::Event::Created { token: Some(d), .. } if *d == digest),
        "{:?}",
        history[0].event
    );
}

/// A page of another origin cannot command the service through the
/// operator's browser (CSRF): a command with a foreign `Origin` is refused;
/// the dashboard's own origin, clients without one, and reads pass.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_from_a_foreign_origin_are_refused() {
    let svc = Svc::start(fast(Preset::Whatsapp), |_| {}).await;
    let create = |origin: Option<String>| {
        let mut req = svc.client.post(format!("{}/v1/instances", svc.base)).header("content-type", "text/plain");
        if let Some(o) = origin {
            req = req.header("origin", o);
        }
        req.body(json!({"name": format!("o{}", rand_suffix())}).to_string()).send()
    };
    let foreign = create(Some("http://evil.example".into())).await.expect("send");
    assert_eq!(foreign.status().as_u16(), 403);
    assert_eq!(foreign.json_value().await["error"]["code"], "cross_origin");
    let own = create(Some(svc.base.clone())).await.expect("send");
    assert_eq!(own.status().as_u16(), 201, "the dashboard's own origin");
    let plain = create(None).await.expect("send");
    assert_eq!(plain.status().as_u16(), 201, "a client that is not a browser");
    let read =
        svc.client.get(format!("{}/v1/instances", svc.base)).header("origin", "http://evil.example").send().await;
    assert_eq!(read.expect("send").status().as_u16(), 200, "reads are not commands");
    svc.stop().await;
}

fn rand_suffix() -> u64 {
    use std::sync::atomic::AtomicU64;
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::SeqCst)
}

/// The fleet view after a restart is the one before it (issue 33): a
/// service folds its log into the view in the background, answering at
/// once, and `/v1/fleet` waits until the fold covers the log — so the first
/// answer after the start already holds every row and every edge count.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fleet_view_after_a_restart_is_the_one_before() {
    let svc = Svc::start(fast(Preset::Whatsapp), |_| {}).await;
    for name in ["kept", "restarted", "gone"] {
        let (status, body) = svc.post("/v1/instances", json!({"name": name, "connect": true})).await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        svc.until(&format!("/v1/instances/{name}"), |v| v["status"] == "open", Duration::from_secs(5)).await;
    }
    for _ in 0..3 {
        let (status, _) = svc.post("/v1/instances/restarted/restart", json!({})).await;
        assert_eq!(status, StatusCode::OK);
        svc.until("/v1/instances/restarted", |v| v["status"] == "open", Duration::from_secs(5)).await;
    }
    // At rest before the stop: nothing reconnects after the start to change the view.
    for name in ["kept", "restarted"] {
        let (status, body) = svc.post(&format!("/v1/instances/{name}/logout"), json!({})).await;
        assert_eq!(status, StatusCode::OK, "{body}");
    }
    let (status, _) = svc.delete("/v1/instances/gone").await;
    assert_eq!(status, StatusCode::OK);
    let (_, before) = svc.get("/v1/fleet").await;
    let dir = svc.stop_keeping_the_log().await;
    let data = dir.path().join("log");
    let svc = Svc::start(fast(Preset::Whatsapp), |c| c.data = data).await;
    let (status, after) = svc.get("/v1/fleet").await;
    assert_eq!(status, StatusCode::OK, "{after}");
    assert_eq!(before["instances"].as_array().map(Vec::len), Some(3), "{before}");
    assert!(before["edges"].as_array().is_some_and(|e| e.len() > 5), "{before}");
    for field in ["position", "instances", "edges"] {
        assert_eq!(after[field], before[field], "{field} differs after the restart");
    }
    // What bounds the restart and the log's size, as metrics: the start's
    // time, the log's size, and the compaction this start found overdue
    // (none was ever recorded) a second after it.
    let gauge = |text: &str, name: &str| {
        text.lines().find_map(|l| l.strip_prefix(name)?.trim().parse::<f64>().ok()).unwrap_or(-1.0)
    };
    let start = Instant::now();
    let metrics = loop {
        let text = svc.client.get(format!("{}/metrics", svc.base)).send().await.expect("metrics").text().await;
        let text = text.expect("text");
        if gauge(&text, "lifecycle_log_last_compaction_timestamp_seconds") > 1e9 {
            break text;
        }
        assert!(start.elapsed() < Duration::from_secs(10), "no compaction after the restart: {text}");
        sleep(Duration::from_millis(100)).await;
    };
    assert!(gauge(&metrics, "lifecycle_log_size_bytes") > 0.0, "{metrics}");
    assert!(gauge(&metrics, "lifecycle_start_seconds") > 0.0, "{metrics}");
    svc.stop().await;
    drop(dir);
}

/// Application frames over HTTP: `POST /v1/instances/NAME/send` queues a
/// frame on an open instance (the reference peer echoes it), `/v1/frames`
/// streams what the connection receives, a closed instance answers 409 with
/// its state, a bad body 422, and /metrics counts the traffic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frames_are_sent_and_streamed_over_http() {
    let svc = Svc::start(fast(Preset::Whatsapp), |_| {}).await;
    let (status, _) = svc.post("/v1/instances", json!({"name": "chat"})).await;
    assert_eq!(status, StatusCode::CREATED);
    let (status, body) = svc.post("/v1/instances/chat/send", json!({"text": "{\"type\":\"hi\"}"})).await;
    assert_eq!((status, body["error"]["code"].as_str()), (StatusCode::CONFLICT, Some("not_open")), "{body}");
    assert!(body["error"]["message"].as_str().is_some_and(|m| m.contains("Closed")), "{body}");
    svc.post("/v1/instances/chat/connect", json!({})).await;
    svc.until("/v1/instances/chat", |v| v["status"] == "open", Duration::from_secs(5)).await;

    let mut stream =
        svc.client.get(format!("{}/v1/frames?instance=chat", svc.base)).send().await.expect("frames stream");
    assert_eq!(stream.status().as_u16(), 200);
    for n in 0..3 {
        let (status, body) =
            svc.post("/v1/instances/chat/send", json!({"text": format!("{{\"type\":\"hi\",\"n\":{n}}}")})).await;
        assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    }
    let (status, body) = svc.post("/v1/instances/chat/send", json!({"text": "a", "binary": [1]})).await;
    assert_eq!((status, body["error"]["code"].as_str()), (StatusCode::UNPROCESSABLE_ENTITY, Some("invalid_body")));

    let (mut buf, mut seen) = (String::new(), Vec::new());
    let deadline = Instant::now() + Duration::from_secs(10);
    while seen.len() < 3 {
        assert!(Instant::now() < deadline, "3 echoed frames within 10 s; got {seen:?}, left {buf:?}");
        if let Ok(Ok(Some(chunk))) = tokio::time::timeout(Duration::from_millis(500), stream.chunk()).await {
            buf.push_str(&String::from_utf8_lossy(&chunk));
        }
        while let Some(end) = buf.find("\n\n") {
            let block: String = buf.drain(..end + 2).collect();
            if block.lines().any(|l| l == "event: frame")
                && let Some(data) = block.lines().find_map(|l| l.strip_prefix("data: "))
            {
                let v: Value = serde_json::from_str(data).expect("json");
                assert_eq!(v["instance"], "chat");
                seen.push(v["frame"]["text"].as_str().expect("text").to_owned());
            }
        }
    }
    let want: Vec<String> = (0..3).map(|n| format!("{{\"type\":\"hi\",\"n\":{n}}}")).collect();
    assert_eq!(seen, want, "echoed in order");
    let (_, metrics) = svc.get("/metrics").await;
    let metrics = metrics.as_str().expect("text").to_owned();
    assert!(metrics.contains("lifecycle_frames_total{direction=\"sent\"} 3"), "{metrics}");
    assert!(metrics.contains("lifecycle_frames_total{direction=\"received\"} 3"), "{metrics}");
    drop(stream);
    svc.stop().await;
}
