//! The cluster as one service: real `lifecycle serve --cluster` processes
//! on a real nats-server, asked over real HTTP as a load balancer would ask
//! them — any host for any instance. Every route answers the same through
//! every host; commands reach the owner once; webhooks, events and tokens
//! come from the log of record and survive the hosts that died; the stream
//! stays bounded under churn.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::http::{HeaderMap, StatusCode};
use instance_lifecycle::cluster::StreamEntry;
use instance_lifecycle::machine::InstanceName;
use instance_lifecycle::serve::{ClusterSettings, WebhookConfig};
use instance_lifecycle::testing::nats::NatsServer;
use instance_lifecycle::testing::peer::{Action, TestPeer};
use reqwest::Method;
use serde_json::{Value, json};
use tokio::time::sleep;

use crate::cluster::{HostProcess, RENEW, TTL, nats_server, observer, policy, wait_until};

/// One answer: the status and the JSON body (`Value::Null` for none).
async fn ask(host: &HostProcess, method: Method, path: &str, body: Option<Value>) -> (u16, Value) {
    let mut req = host.client.request(method, format!("{}{path}", host.base));
    if let Some(body) = body {
        req = req.header("content-type", "application/json").body(body.to_string());
    }
    let resp = req.send().await.expect("a request");
    let status = resp.status().as_u16();
    let text = resp.text().await.unwrap_or_default();
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

/// The same request through every host: every answer must be the first's.
async fn same_everywhere(hosts: &[&HostProcess], method: Method, path: &str, body: Option<Value>) -> (u16, Value) {
    let first = ask(hosts[0], method.clone(), path, body.clone()).await;
    for host in &hosts[1..] {
        let other = ask(host, method.clone(), path, body.clone()).await;
        assert_eq!(other, first, "{method} {path} through {} differs from {}", host.id, hosts[0].id);
    }
    first
}

/// An instance's records of one kind of input, as the stream holds them.
async fn inputs(nats: &NatsServer, name: &str, input: &str) -> usize {
    let entries = observer(nats).await.entries(&InstanceName::new(name).unwrap()).await.expect("entries");
    entries
        .iter()
        .filter_map(|(seq, _, e)| e.as_ref().ok()?.to_record(&InstanceName::new(name).unwrap(), *seq))
        .filter(|r| r.event.label() == input)
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_route_answers_the_same_through_every_host() {
    let Some(nats) = nats_server() else { return };
    let peer = TestPeer::start().await.expect("peer");
    let a = HostProcess::spawn(&nats, "host-a", &peer.url());
    let b = HostProcess::spawn(&nats, "host-b", &peer.url());
    let c = HostProcess::spawn(&nats, "host-c", &peer.url());
    let hosts = [&a, &b, &c];
    // Owned by host-a: one open, one closed, one removed.
    a.create_open(&["acme".to_owned()], &peer).await;
    assert_eq!(ask(&a, Method::POST, "/v1/instances", Some(json!({"name": "idle"}))).await.0, 201);
    assert_eq!(ask(&a, Method::POST, "/v1/instances", Some(json!({"name": "gone"}))).await.0, 201);
    assert_eq!(ask(&a, Method::DELETE, "/v1/instances/gone", None).await.0, 200);

    // Reads, answered from the stream on every host.
    for path in [
        "/v1/instances",
        "/v1/instances?state=open",
        "/v1/instances/acme",
        "/v1/instances/idle",
        "/v1/instances/gone",
        "/v1/instances/acme/history",
        "/v1/instances/gone/history?after=1",
        "/healthz",
        "/v1/webhooks",
        "/v1/webhooks/dead",
        "/instance/connectionState/acme",
        "/instance/fetchInstances",
        "/instance/fetchInstances?instanceName=idle",
    ] {
        let (status, _) = same_everywhere(&hosts, Method::GET, path, None).await;
        assert_eq!(status, 200, "GET {path}");
    }
    // Errors too: the same status, code and message through every host.
    for (path, status) in [
        ("/v1/instances/nope", 404),
        ("/v1/instances/nope/history", 404),
        ("/v1/instances/-bad", 422),
        ("/instance/connectionState/nope", 404),
        ("/instance/connectionState/gone", 404),
        ("/instance/fetchInstances?instanceName=nope", 404),
    ] {
        assert_eq!(same_everywhere(&hosts, Method::GET, path, None).await.0, status, "GET {path}");
    }
    let (status, body) = same_everywhere(&hosts, Method::POST, "/v1/instances", Some(json!({"name": "acme"}))).await;
    assert_eq!((status, body["error"]["code"].as_str()), (409, Some("already_exists")), "{body}");
    let (status, _) =
        same_everywhere(&hosts, Method::POST, "/instance/create", Some(json!({"instanceName": "acme"}))).await;
    assert_eq!(status, 403, "Evolution's answer to a taken name");
    let (status, body) = same_everywhere(&hosts, Method::POST, "/v1/instances/gone/connect", None).await;
    assert_eq!((status, body["error"]["code"].as_str()), (410, Some("removed")), "{body}");
    let (status, body) = same_everywhere(&hosts, Method::DELETE, "/v1/instances/gone", None).await;
    assert_eq!((status, body["kind"].as_str()), (200, Some("Removed")), "a repeated delete: {body}");
    let (status, body) = same_everywhere(&hosts, Method::POST, "/v1/instances/nope/logout", None).await;
    assert_eq!((status, body["error"]["code"].as_str()), (404, Some("unknown_instance")), "{body}");
    assert_eq!(same_everywhere(&hosts, Method::GET, "/instance/connect/nope", None).await.0, 404);
    assert_eq!(same_everywhere(&hosts, Method::DELETE, "/instance/logout/nope", None).await.0, 404);

    // Commands through a host that does not own the instance reach the owner, once.
    let (status, body) = ask(&b, Method::POST, "/v1/instances/idle/connect", None).await;
    assert_eq!((status, body["kind"].as_str()), (200, Some("Connecting")), "{body}");
    assert_eq!(inputs(&nats, "idle", "connect").await, 1, "one connect recorded for one request");
    // Read-your-writes: any host shows at least the state the command ended in.
    let (_, seen) = ask(&c, Method::GET, "/v1/instances/idle", None).await;
    assert_ne!(seen["kind"], "Closed", "host-c still shows idle closed after host-b's connect: {seen}");
    let (status, body) = ask(&c, Method::DELETE, "/instance/logout/acme", None).await;
    assert_eq!((status, body["status"].as_str()), (200, Some("SUCCESS")), "{body}");
    assert_eq!(inputs(&nats, "acme", "logout").await, 1, "one logout recorded for one request");
    let (_, acme) = ask(&b, Method::GET, "/v1/instances/acme", None).await;
    assert_eq!(acme["kind"], "Closed", "a logout answered through host-c, read through host-b: {acme}");
    assert_eq!(peer.logouts("acme"), 1, "the owner's socket sent one logout");
    wait_until("idle opens", Duration::from_secs(10), async || a.kind("idle").await.as_deref() == Some("open")).await;
    // Application frames go on the owner's socket: a host that does not own the instance says so.
    let send = Some(json!({"text": "{\"type\":\"hi\"}"}));
    let (status, body) = ask(&b, Method::POST, "/v1/instances/idle/send", send.clone()).await;
    assert_eq!((status, body["error"]["code"].as_str()), (409, Some("owned_elsewhere")), "{body}");
    assert_eq!(ask(&a, Method::POST, "/v1/instances/idle/send", send.clone()).await.0, 202, "the owner sends");
    assert_eq!(ask(&b, Method::POST, "/v1/instances/nope/send", send).await.0, 404, "unknown is unknown everywhere");
    for path in ["/v1/instances", "/v1/instances/acme", "/v1/instances/idle/history", "/instance/fetchInstances"] {
        same_everywhere(&hosts, Method::GET, path, None).await;
    }
    // The fleet view: every instance, with its owner, the same on every host but for "now" and who answered
    // (once every host has heard of the leases given back).
    wait_until("gone's lease given back, everywhere", Duration::from_secs(5), async || {
        let mut free = true;
        for host in hosts {
            let (_, fleet) = ask(host, Method::GET, "/v1/fleet", None).await;
            let rows = fleet["instances"].as_array().cloned().unwrap_or_default();
            free &= rows.iter().any(|r| r["name"] == "gone" && r.get("owner").is_none());
        }
        free
    })
    .await;
    let mut fleets = Vec::new();
    for host in hosts {
        let (status, mut fleet) = ask(host, Method::GET, "/v1/fleet", None).await;
        assert_eq!(status, 200);
        assert_eq!(fleet["host"].as_str(), Some(host.id.as_str()), "the fleet view says who answered");
        fleet["now"] = Value::Null;
        fleet["host"] = Value::Null;
        fleets.push(fleet);
    }
    assert!(fleets.iter().all(|f| *f == fleets[0]), "fleet views differ: {fleets:#?}");
    let rows = fleets[0]["instances"].as_array().expect("rows");
    let owner = |name: &str| rows.iter().find(|r| r["name"] == name).map(|r| r["owner"].clone());
    assert_eq!(owner("acme"), Some(json!("host-a")));
    assert_eq!(owner("gone"), Some(Value::Null), "a removed instance has no owner");
    assert_eq!(peer.overlaps(), 0, "two live connections for one name");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_resume_on_another_host_without_gap_or_duplicate() {
    let Some(nats) = nats_server() else { return };
    let peer = TestPeer::start().await.expect("peer");
    let a = HostProcess::spawn(&nats, "host-a", &peer.url());
    let b = HostProcess::spawn(&nats, "host-b", &peer.url());
    let names: Vec<String> = (0..4).map(|i| format!("ev{i}")).collect();
    a.create_open(&names[..2], &peer).await;
    b.create_open(&names[2..], &peer).await;
    for name in &names {
        assert_eq!(ask(&a, Method::POST, &format!("/v1/instances/{name}/restart"), None).await.0, 200);
    }
    wait_until("all open again", Duration::from_secs(10), async || {
        let mut all = true;
        for n in &names {
            all &= a.kind(n).await.as_deref() == Some("open");
        }
        all
    })
    .await;
    let client = b.client.clone();
    let all = crate::serve::read_sse(&client, &format!("{}/v1/events?after=0", a.base), None, 1000).await;
    let total = all.len();
    assert!(total >= 4 * 5, "created, connecting, open, restart, open for each: {total}");
    let half = total / 2;
    let first = crate::serve::read_sse(&client, &format!("{}/v1/events?after=0", a.base), None, half).await;
    let (last_id, _) = first.last().cloned().expect("a first half");
    let rest =
        crate::serve::read_sse(&client, &format!("{}/v1/events", b.base), Some(last_id), total - first.len()).await;
    let ids: Vec<u64> = first.iter().chain(&rest).map(|(id, _)| *id).collect();
    let expected: Vec<u64> = all.iter().map(|(id, _)| *id).collect();
    assert_eq!(ids, expected, "events read half from host-a, half from host-b after Last-Event-ID {last_id}");
    // The ids are the stream's sequence numbers: every record written, by either host, in one order.
    assert!(all.iter().any(|(_, e)| e["host"] == "host-a") && all.iter().any(|(_, e)| e["host"] == "host-b"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_made_on_one_host_opens_its_instance_on_another_after_the_first_dies() {
    let Some(nats) = nats_server() else { return };
    let peer = TestPeer::start().await.expect("peer");
    let key = "global-key-0123456789abcdef";
    let keyed = |s: &mut instance_lifecycle::serve::ServeConfig| s.api_key = Some(key.to_owned());
    let a = HostProcess::spawn_with(&nats, "host-a", &peer.url(), keyed);
    let c = HostProcess::spawn_with(&nats, "host-c", &peer.url(), keyed);
    let created = a
        .client
        .post(format!("{}/v1/instances", a.base))
        .header("apikey", key)
        .header("content-type", "application/json")
        .body(json!({"name": "tok"}).to_string())
        .send()
        .await
        .expect("create");
    assert_eq!(created.status(), reqwest::StatusCode::CREATED);
    let created: Value = serde_json::from_str(&created.text().await.expect("body")).expect("json");
    let token = created["token"].as_str().expect("a token").to_owned();
    a.signal("-KILL");
    let with = |token: &str, method: Method, path: &str| {
        c.client.request(method, format!("{}{path}", c.base)).header("apikey", token.to_owned()).send()
    };
    let seen = with(&token, Method::GET, "/v1/instances/tok").await.expect("get");
    assert_eq!(seen.status(), reqwest::StatusCode::OK, "the token opens its instance on host-c");
    // A command through host-c, after host-a's lease runs out: host-c takes the instance over.
    let connected = with(&token, Method::POST, "/v1/instances/tok/connect").await.expect("connect");
    assert_eq!(connected.status(), reqwest::StatusCode::OK, "{}", connected.text().await.unwrap_or_default());
    let obs = observer(&nats).await;
    let tok = InstanceName::new("tok").unwrap();
    wait_until("tok opens from host-c", TTL + Duration::from_secs(10), async || {
        peer.live("tok") == 1 && obs.owner_of(&tok).await.ok().flatten().as_deref() == Some("host-c")
    })
    .await;
    let wrong = with("not-a-token", Method::GET, "/v1/instances/tok").await.expect("get");
    assert_eq!(wrong.status(), reqwest::StatusCode::UNAUTHORIZED);
    let other = with(&token, Method::GET, "/v1/instances").await.expect("list");
    let rows: Value = serde_json::from_str(&other.text().await.expect("body")).expect("json");
    assert_eq!(rows.as_array().map(Vec::len), Some(1), "a token sees its own instance only: {rows}");
}

/// A receiver that answers 503 while `down`, and remembers who posted what.
#[derive(Clone, Default)]
struct Receiver {
    /// Delivered: (event id, instance, the host that posted it).
    got: Arc<Mutex<Vec<(u64, String, String)>>>,
    /// Hosts that tried while it was down, last attempt last.
    tried: Arc<Mutex<Vec<String>>>,
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
                        let header = |h: &str| headers.get(h).and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
                        let host = header("x-lifecycle-host");
                        if me.down.load(Ordering::SeqCst) {
                            me.tried.lock().expect("lock").push(host);
                            return StatusCode::SERVICE_UNAVAILABLE;
                        }
                        let event: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
                        let id = header("x-lifecycle-event-id").parse().unwrap_or(0);
                        let instance = event["instance"].as_str().unwrap_or("").to_owned();
                        me.got.lock().expect("lock").push((id, instance, host));
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
}

/// The receiver is down; every socket drops; the host delivering the
/// webhook is SIGKILLed, and so is the owner of another third of the
/// instances; the receiver comes back: every record of every instance's
/// stream reaches it, in order per instance. Deliveries driven by a host's
/// local log would lose what the killed hosts recorded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhooks_come_from_the_stream_and_outlive_the_hosts_that_died() {
    let Some(nats) = nats_server() else { return };
    let peer = TestPeer::start().await.expect("peer");
    let (receiver, url) = Receiver::start().await;
    receiver.down.store(true, Ordering::SeqCst);
    let hooked = |s: &mut instance_lifecycle::serve::ServeConfig| {
        s.webhooks = vec![WebhookConfig {
            max_attempts: 100,
            timeout: Duration::from_secs(2),
            ..WebhookConfig::new(url.clone())
        }];
        if let Some(c) = s.cluster.as_mut() {
            c.webhook_ack_wait = Duration::from_secs(3);
        }
    };
    let hosts: Vec<HostProcess> = ["host-a", "host-b", "host-c"]
        .iter()
        .map(|id| HostProcess::spawn_with(&nats, id, &peer.url(), hooked))
        .collect();
    let mut owned: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (h, host) in hosts.iter().enumerate() {
        let names: Vec<String> = (0..3).map(|i| format!("wh{h}{i}")).collect();
        host.create_open(&names, &peer).await;
        owned.insert(host.id.clone(), names);
    }
    let all: Vec<String> = owned.values().flatten().cloned().collect();
    // Every socket closes at once: each instance records the close, the backoff and the reconnect.
    let handshakes: HashMap<String, u32> = all.iter().map(|n| (n.clone(), peer.handshakes(n))).collect();
    peer.act_all(Action::Close(1012)); // "service restart": rfc6455 reconnects
    wait_until("every instance reconnected", Duration::from_secs(15), async || {
        all.iter().all(|n| peer.handshakes(n) > handshakes[n] && peer.live(n) == 1)
    })
    .await;
    // The host holding the webhook's event (retrying it) dies; then the owner of another third.
    wait_until("a host tries to deliver", Duration::from_secs(10), async || {
        !receiver.tried.lock().expect("lock").is_empty()
    })
    .await;
    let named = receiver.tried.lock().expect("lock").last().cloned().expect("a host");
    // (A delivery that names no host is not the cluster's: kill the first host then.)
    let delivering = hosts.iter().find(|h| h.id == named).unwrap_or(&hosts[0]).id.clone();
    let other = hosts.iter().find(|h| h.id != delivering).map(|h| h.id.clone()).expect("another host");
    for host in hosts.iter().filter(|h| h.id == delivering || h.id == other) {
        host.signal("-KILL");
    }
    let survivor = hosts.iter().find(|h| h.id != delivering && h.id != other).expect("a survivor");
    wait_until("the survivor owns every instance", TTL + RENEW + Duration::from_secs(10), async || {
        let mut all_owned = true;
        for n in &all {
            all_owned &= survivor.owner(n).await.as_deref() == Some(survivor.id.as_str());
        }
        all_owned
    })
    .await;
    receiver.down.store(false, Ordering::SeqCst);
    // Every record of every stream, as the log of record has it now.
    let obs = observer(&nats).await;
    let mut expected: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for name in &all {
        let n = InstanceName::new(name.as_str()).unwrap();
        let entries = obs.entries(&n).await.expect("entries");
        let records: Vec<u64> = entries
            .iter()
            .filter(|(_, _, e)| matches!(e, Ok(StreamEntry::Record { .. })))
            .map(|(seq, _, _)| *seq)
            .collect();
        expected.insert(name.clone(), records);
    }
    let killed_records: usize =
        [&delivering, &other].iter().flat_map(|h| &owned[h.as_str()]).map(|n| expected[n].len()).sum();
    assert!(killed_records >= 6 * 5, "the killed hosts' instances recorded their drop and reconnect: {killed_records}");
    let delivered_all = async || {
        let got = receiver.got.lock().expect("lock").clone();
        let seen: HashSet<u64> = got.iter().map(|(id, _, _)| *id).collect();
        expected.values().flatten().all(|id| seen.contains(id))
    };
    let start = Instant::now();
    while !delivered_all().await {
        let got = receiver.got.lock().expect("lock").len();
        assert!(start.elapsed() < Duration::from_secs(90), "not every record delivered: {got} deliveries so far");
        sleep(Duration::from_millis(100)).await;
    }
    // In order per instance: each record's first delivery after the one before it.
    let got = receiver.got.lock().expect("lock").clone();
    for (name, records) in &expected {
        let firsts: Vec<u64> = {
            let mut seen = HashSet::new();
            got.iter().filter(|(id, i, _)| i == name && seen.insert(*id)).map(|(id, _, _)| *id).collect()
        };
        let mine: Vec<u64> = firsts.into_iter().filter(|id| records.contains(id)).collect();
        assert_eq!(&mine, records, "{name}: delivered out of order (or not at all)");
    }
    let posters: HashSet<&str> = got.iter().map(|(_, _, h)| h.as_str()).collect();
    assert!(posters.contains(survivor.id.as_str()), "the survivor delivered what the dead hosts held: {posters:?}");
    assert_eq!(peer.overlaps(), 0, "two live connections for one name");
}

/// A long churn of instances created and deleted, and one instance that
/// keeps moving: with a small retention the stream holds a bounded number
/// of entries — the churned names' subjects purged, the busy one compacted
/// into a snapshot that verifies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_stream_stays_bounded_under_churn() {
    let Some(nats) = nats_server() else { return };
    let peer = TestPeer::start().await.expect("peer");
    let small = |s: &mut instance_lifecycle::serve::ServeConfig| {
        let c: &mut ClusterSettings = s.cluster.as_mut().expect("a cluster host");
        c.keep_records = 4;
        c.removed_after = Duration::from_secs(1);
        c.retention_every = Duration::from_millis(500);
    };
    let host = HostProcess::spawn_with(&nats, "host-a", &peer.url(), small);
    assert_eq!(ask(&host, Method::POST, "/v1/instances", Some(json!({"name": "busy", "connect": true}))).await.0, 201);
    let mut written = 0usize;
    for round in 0..15 {
        for i in 0..4 {
            let name = format!("churn-{round}-{i}");
            let (status, _) =
                ask(&host, Method::POST, "/v1/instances", Some(json!({"name": name, "connect": true}))).await;
            assert_eq!(status, 201, "{name}");
            assert_eq!(ask(&host, Method::DELETE, &format!("/v1/instances/{name}"), None).await.0, 200);
            written += 5;
        }
        assert_eq!(ask(&host, Method::POST, "/v1/instances/busy/restart", None).await.0, 200);
        written += 2;
    }
    let client = async_nats::connect(nats.url().as_str()).await.expect("nats");
    let mut stream = async_nats::jetstream::new(client).get_stream("lifecycle-log").await.expect("stream");
    let bound = 12;
    let start = Instant::now();
    loop {
        let messages = stream.info().await.expect("info").state.messages;
        if messages <= bound {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "the stream holds {messages} entries (> {bound}) after {written} records"
        );
        sleep(Duration::from_millis(200)).await;
    }
    let check =
        observer(&nats).await.verify(&InstanceName::new("busy").unwrap(), Some(&policy())).await.expect("verify");
    assert_eq!(check.violations, vec![], "a compacted subject verifies from its snapshot");
    assert!(check.from_snapshot.is_some(), "busy was compacted: {check:?}");
    assert_eq!((ask(&host, Method::GET, "/v1/instances/churn-0-0", None).await).0, 404, "purged: unknown again");
    // A purged name can be created again.
    assert_eq!(ask(&host, Method::POST, "/v1/instances", Some(json!({"name": "churn-0-0"}))).await.0, 201);
}
