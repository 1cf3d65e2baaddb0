//! The dashboard in a real browser: headless Chromium driven over WebDriver
//! (`benches/support/browser.rs`, shared with the dashboard's benchmark),
//! against `lifecycle serve` on 127.0.0.1 with a fleet on the reference peer.
//!
//! Between the browser and the service sits a TCP proxy the test can cut,
//! to see the page notice a dropped event stream and catch up after it.
//!
//! Screenshots go to `target/ui-screenshots/`; `UPDATE_DOCS_SCREENSHOTS=1`
//! refreshes the README's (`docs/dashboard-*.png`) from the same run.
//!
//! `.ci/run` installs `chromium` and `chromium-driver`; without them these
//! tests fail under CI and say loudly that they did not run elsewhere.

use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use fantoccini::Locator;
use instance_lifecycle::machine::Preset;
use instance_lifecycle::testing::peer::Action;
use serde_json::{Value, json};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::time::sleep;

use crate::engine::fast;

#[path = "../../benches/support/browser.rs"]
mod browser;
use crate::serve::{JsonValue, KEY, Svc};
use crate::support::{copy_tree, digests};
use browser::Browser;

/// The counts per state of the tiles, and of `GET /v1/instances` (which leaves removed ones out).
const TILE_COUNTS: &str = "return Object.fromEntries([...document.querySelectorAll('#tiles [data-kind]')]
    .map(t => [t.dataset.kind, Number(t.querySelector('.count').textContent)]));";

fn api_counts(list: &Value) -> std::collections::BTreeMap<String, u64> {
    let mut counts = std::collections::BTreeMap::new();
    for i in list.as_array().expect("a list") {
        *counts.entry(i["kind"].as_str().expect("kind").to_owned()).or_insert(0) += 1;
    }
    counts
}

fn tiles_match(tiles: &Value, api: &std::collections::BTreeMap<String, u64>) -> bool {
    ["Connecting", "Open", "Closing", "Zombie", "Closed"]
        .iter()
        .all(|k| tiles[k].as_u64() == Some(api.get(*k).copied().unwrap_or(0)))
}

/// A TCP proxy the test can cut: `cut` drops every connection through it
/// and refuses new ones until `mend`.
pub(crate) struct Proxy {
    pub(crate) addr: std::net::SocketAddr,
    cut: Arc<AtomicBool>,
    epoch: watch::Sender<u64>,
}

impl Proxy {
    pub(crate) async fn start(upstream: std::net::SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("proxy");
        let addr = listener.local_addr().expect("proxy addr");
        let cut = Arc::new(AtomicBool::new(false));
        let (epoch, _) = watch::channel(0u64);
        let (cut2, epoch2) = (cut.clone(), epoch.clone());
        tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                if cut2.load(Ordering::SeqCst) {
                    let _ = inbound.shutdown().await;
                    continue;
                }
                let mut ended = epoch2.subscribe();
                tokio::spawn(async move {
                    let Ok(mut outbound) = TcpStream::connect(upstream).await else { return };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        _ = ended.changed() => {}
                    }
                });
            }
        });
        Self { addr, cut, epoch }
    }

    pub(crate) fn cut(&self) {
        self.cut.store(true, Ordering::SeqCst);
        self.epoch.send_modify(|e| *e += 1);
    }

    pub(crate) fn mend(&self) {
        self.cut.store(false, Ordering::SeqCst);
    }
}

/// The walk-through: tiles equal the API; a zombie shows without a
/// reload; the replay steps to the record R7 decided; delete from the page;
/// a cut event stream shows the banner and catches up after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_shows_the_fleet_live_in_a_real_browser() {
    let Some(browser) = Browser::start().await else { return };
    let mut policy = fast(Preset::Whatsapp);
    // A zombie waits a minute before it reconnects: long enough to be seen.
    policy.backoff.base = Duration::from_secs(60);
    policy.backoff.cap = Duration::from_secs(60);
    let svc = Svc::start(policy, |c| c.api_key = Some(KEY.to_owned())).await;
    let names: Vec<String> = (0..8).map(|i| format!("wa-{i:02}")).collect();
    for name in &names {
        let (status, body) = svc.post("/v1/instances", json!({"name": name, "connect": true})).await;
        assert_eq!(status.as_u16(), 201, "{body}");
    }
    svc.post("/v1/instances", json!({"name": "idle"})).await;
    svc.until(
        "/v1/instances?state=open",
        |v| v.as_array().is_some_and(|a| a.len() == names.len()),
        Duration::from_secs(10),
    )
    .await;
    let upstream = svc.base.trim_start_matches("http://").parse().expect("service addr");
    let proxy = Proxy::start(upstream).await;
    let page = format!("http://{}/", proxy.addr);
    let b = &browser.client;
    b.goto(&page).await.expect("load the dashboard");

    // The key is asked once.
    let key =
        b.wait().at_most(Duration::from_secs(10)).for_element(Locator::Css("#key-input")).await.expect("key dialog");
    key.send_keys(KEY).await.expect("type the key");
    browser.click("#key-ok").await;
    let stored = b.execute("return sessionStorage.getItem('instance-lifecycle.apikey')", vec![]).await.expect("js");
    assert_eq!(stored, json!(KEY), "kept for this tab");
    assert!(!b.current_url().await.expect("url").as_str().contains(KEY), "never in a URL");

    // The tiles count what the API lists.
    let (_, list) = svc.get("/v1/instances").await;
    let api = api_counts(&list);
    assert_eq!((api.get("Open"), api.get("Closed")), (Some(&8), Some(&1)), "{list}");
    let tiles = browser.until("tiles", TILE_COUNTS, |t| tiles_match(t, &api), Duration::from_secs(10)).await;
    assert_eq!(tiles["Open"], 8, "{tiles}");

    // A zombie: its row and the Zombie tile change without a reload, within 2 s of the engine's record.
    assert_eq!(svc.peer.act("wa-03", Action::Zombify), 1, "one live connection to zombify");
    svc.until("/v1/instances/wa-03", |v| v["kind"] == "Zombie", Duration::from_secs(10)).await;
    let row = "return (document.querySelector('#rows [data-name=\"wa-03\"]') || {}).dataset?.kind ?? null;";
    browser.until("zombie row", row, |v| v == "Zombie", Duration::from_secs(2)).await;
    browser.until("zombie tile", TILE_COUNTS, |t| t["Zombie"] == 1, Duration::from_secs(2)).await;
    browser.screenshot("fleet.png").await;

    // The instance view: step back to the record R7 decided.
    browser.click("#rows [data-name=\"wa-03\"] a").await;
    browser
        .until(
            "history loaded",
            "return document.getElementById('step-where').textContent",
            |v| v.as_str().is_some_and(|s| s.contains(" of ")),
            Duration::from_secs(5),
        )
        .await;
    let rule = "return document.querySelector('#step-rule [data-rule]')?.textContent ?? null;";
    let mut steps = 0;
    while browser.client.execute(rule, vec![]).await.expect("js") != json!("R7") {
        steps += 1;
        assert!(steps < 30, "no record decided by R7 in the replay");
        browser.click("#prev").await;
    }
    let shown = b
        .execute(
            "return [document.querySelector('#step-to .kind').textContent, document.getElementById('step-rule').textContent,
                     document.querySelector('#step-from .kind').textContent,
                     document.querySelector('#diagram .edge.taken')?.dataset.edge ?? null,
                     document.querySelector('#diagram .node.current')?.dataset.kind ?? null]",
            vec![],
        )
        .await
        .expect("js");
    assert_eq!(shown, json!(["Zombie", "R7 Zombie detection", "Open", "Open|Zombie", "Zombie"]), "{shown}");
    // The keyboard steps too.
    b.find(Locator::Css("body")).await.expect("body").send_keys("\u{E012}").await.expect("←");
    browser.until("stepped back", rule, |v| v != "R7", Duration::from_secs(2)).await;
    browser.screenshot("instance.png").await;

    // Commands the state forbids are disabled: a zombie cannot be connected twice, only reconnected… the table says which.
    let (_, view) = svc.get("/v1/instances/wa-03").await;
    let allowed: Vec<bool> =
        view["actions"].as_array().expect("actions").iter().map(|a| a["allowed"].as_bool().expect("bool")).collect();
    let disabled = "return [...document.querySelectorAll('#actions button')].map(b => !b.disabled);";
    browser.until("actions", disabled, |v| v == &json!(allowed), Duration::from_secs(2)).await;

    // Delete from the page, with a confirmation.
    browser.click("#actions [data-action=delete]").await;
    browser.click("#confirm-ok").await;
    svc.until("/v1/instances/wa-03", |v| v["kind"] == "Removed", Duration::from_secs(10)).await;
    b.goto(&format!("{page}#/")).await.expect("back to the fleet");
    let gone = "return document.querySelector('#rows [data-name=\"wa-03\"]') === null && document.querySelectorAll('#rows .row').length > 0;";
    browser.until("deleted row hidden", gone, |v| v == true, Duration::from_secs(5)).await;

    // Cut the event stream: the banner shows; what happens meanwhile is caught up after.
    let banner = "return !document.getElementById('banner').hidden;";
    browser.until("live before the cut", banner, |v| v == false, Duration::from_secs(5)).await;
    proxy.cut();
    browser.until("banner on a cut", banner, |v| v == true, Duration::from_secs(5)).await;
    svc.post("/v1/instances", json!({"name": "late-comer", "connect": true})).await;
    svc.until("/v1/instances/late-comer", |v| v["kind"] == "Open", Duration::from_secs(10)).await;
    assert_eq!(svc.peer.act("wa-05", Action::Close(4401)), 1);
    svc.until("/v1/instances/wa-05", |v| v["kind"] != "Open", Duration::from_secs(10)).await;
    sleep(Duration::from_millis(300)).await;
    proxy.mend();
    browser.until("banner gone after the catch-up", banner, |v| v == false, Duration::from_secs(10)).await;
    let late = "return (document.querySelector('#rows [data-name=\"late-comer\"]') || {}).dataset?.kind ?? null;";
    browser.until("the record made during the cut", late, |v| v == "Open", Duration::from_secs(5)).await;
    let (_, list) = svc.get("/v1/instances").await;
    let api = api_counts(&list);
    browser.until("tiles after the catch-up", TILE_COUNTS, |t| tiles_match(t, &api), Duration::from_secs(5)).await;
    let errors = b.execute("return document.getElementById('live').textContent", vec![]).await.expect("js");
    assert!(!errors.as_str().unwrap_or_default().contains("error"), "{errors}");
    browser.client.clone().close().await.expect("close the session");
    svc.stop().await;
}

/// `lifecycle replay` serves the dashboard over a log without an engine and
/// never writes a byte of it; anything that would change it is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_serves_a_log_read_only_and_writes_nothing() {
    let svc = Svc::start(fast(Preset::Whatsapp), |_| {}).await;
    for name in ["r1", "r2", "r3"] {
        svc.post("/v1/instances", json!({"name": name, "connect": true})).await;
    }
    svc.until("/v1/instances?state=open", |v| v.as_array().is_some_and(|a| a.len() == 3), Duration::from_secs(10))
        .await;
    svc.delete("/v1/instances/r3").await;
    let dir = tempfile::tempdir().expect("dir");
    let log_dir = dir.path().join("copied-log");
    // The service's log, as an operator would copy it off a host once the service stopped.
    let kept = svc.stop_keeping_the_log().await;
    copy_tree(&kept.path().join("log"), &log_dir);
    let before = digests(&log_dir);

    let mut child = Command::new(env!("CARGO_BIN_EXE_lifecycle"))
        .args(["replay"])
        .arg(&log_dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("lifecycle replay");
    let stdout = child.stdout.take().expect("stdout");
    let url = tokio::task::spawn_blocking(move || {
        use std::io::BufRead;
        std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
            .find_map(|l| l.split_whitespace().find(|w| w.starts_with("http://")).map(str::to_owned))
    })
    .await
    .expect("join")
    .expect("the replay prints its URL");
    let client = reqwest::Client::new();
    let fleet: Value = client.get(format!("{url}v1/fleet")).send().await.expect("fleet").json_value().await;
    assert_eq!(fleet["read_only"], true);
    let kinds: Vec<(&str, &str)> = fleet["instances"]
        .as_array()
        .expect("rows")
        .iter()
        .map(|r| (r["name"].as_str().expect("name"), r["kind"].as_str().expect("kind")))
        .collect();
    // As the log last saw them: a replay runs no recovery (an engine would now apply R11 to the open ones).
    assert_eq!(kinds, [("r1", "Open"), ("r2", "Open"), ("r3", "Removed")], "{fleet}");
    let history: Value =
        client.get(format!("{url}v1/instances/r1/history")).send().await.expect("history").json_value().await;
    let rules: Vec<&str> = history.as_array().expect("records").iter().filter_map(|r| r["rule"].as_str()).collect();
    assert_eq!(rules, ["R6"], "a first connect names no rule; opening with an identity is R6");
    let page = client.get(&url).send().await.expect("page");
    assert_eq!(page.status().as_u16(), 200);
    assert!(page.text().await.expect("html").contains("/ui/app.js"));
    for (method, path) in [("POST", "v1/instances/r1/connect"), ("DELETE", "v1/instances/r1"), ("POST", "v1/instances")]
    {
        let response =
            client.request(method.parse().expect("method"), format!("{url}{path}")).send().await.expect("request");
        assert_eq!(response.status().as_u16(), 405, "{method} {path}");
        let body: Value = response.json_value().await;
        assert_eq!(body["error"]["code"], "read_only", "{body}");
    }
    // Ctrl-C ends it cleanly.
    // SAFETY: signalling our own child process.
    unsafe { libc::kill(i32::try_from(child.id()).expect("pid"), libc::SIGINT) };
    let status = child.wait().expect("wait");
    assert!(status.success(), "{status:?}");
    assert_eq!(digests(&log_dir), before, "replay wrote to the log it read");
}

/// The page's modules in Node's own test runner (`tests/ui/`): its fold
/// replays the service's table of fold cases (`tests/fixtures/fleet-fold.json`,
/// checked against `FleetIndex::apply` by a unit test) — one source of truth
/// for both — and its diagram, laid out from the service's transition table
/// (`tests/fixtures/table.json`), has no edge count covering another.
#[test]
fn the_pages_modules_pass_their_node_tests() {
    let has_node = Command::new("node").arg("--version").output().is_ok_and(|o| o.status.success());
    assert!(has_node || std::env::var_os("CI").is_none(), "CI must have Node (.ci/run installs it)");
    if !has_node {
        eprintln!("\n*** SKIPPED: node not found: tests/ui/ is not run here ***\n");
        return;
    }
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/ui");
    let out = Command::new("node").arg("--test").arg(&dir).output().expect("node --test");
    assert!(
        out.status.success(),
        "node --test tests/ui failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
