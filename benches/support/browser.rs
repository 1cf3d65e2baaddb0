//! A headless Chromium session driven over WebDriver (chromedriver) with
//! `fantoccini`, for the dashboard's browser test and its benchmark.
//! WebDriver rather than CDP (`chromiumoxide`): a W3C standard, Debian ships
//! `chromium-driver` at the browser's own version, and the client is small
//! to build.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{Value, json};
use tokio::time::{Instant, sleep};

/// A headless Chromium session; chromedriver is stopped on drop.
pub struct Browser {
    pub client: Client,
    /// The browser's profile, removed with the session.
    _profile: tempfile::TempDir,
    driver: Child,
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

fn find_program(names: &[&str]) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    names.iter().find_map(|n| std::env::split_paths(&path).map(|d| d.join(n)).find(|p| p.is_file()))
}

impl Browser {
    /// Starts chromedriver and a browser session, or says why it cannot
    /// (and fails under CI, which installs both).
    pub async fn start() -> Option<Self> {
        let (Some(driver), Some(chromium)) =
            (find_program(&["chromedriver"]), find_program(&["chromium", "chromium-browser", "google-chrome"]))
        else {
            let why = "chromium and chromedriver are not installed (apt-get install chromium chromium-driver)";
            assert!(std::env::var_os("CI").is_none(), "{why}: CI must install them (.ci/run does)");
            eprintln!("\n*** SKIPPED: the dashboard's browser test did not run: {why} ***\n");
            return None;
        };
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("a free port");
        let mut child = Command::new(driver)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver starts");
        let profile = tempfile::tempdir().expect("profile dir");
        let mut caps = serde_json::Map::new();
        caps.insert(
            "goog:chromeOptions".into(),
            json!({
                "binary": chromium,
                "args": [
                    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                    "--disable-quic", "--no-first-run", "--disable-background-networking",
                    "--disable-component-update", "--disable-sync", "--window-size=1400,1000",
                    format!("--user-data-dir={}", profile.path().display()),
                ],
            }),
        );
        let start = Instant::now();
        let client = loop {
            let mut builder = ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new());
            match builder.capabilities(caps.clone()).connect(&format!("http://127.0.0.1:{port}")).await {
                Ok(c) => break c,
                Err(e) if start.elapsed() < Duration::from_secs(30) => {
                    let _ = e;
                    sleep(Duration::from_millis(100)).await;
                }
                Err(e) => {
                    let _ = child.kill();
                    panic!("no WebDriver session within 30 s: {e}");
                }
            }
        };
        Some(Self { client, driver: child, _profile: profile })
    }

    /// Runs `script` (a function body; `return` its value) until `ok` holds; fails with the last value.
    pub async fn until(&self, what: &str, script: &str, ok: impl Fn(&Value) -> bool, within: Duration) -> Value {
        let start = Instant::now();
        loop {
            let v = self.client.execute(script, vec![]).await.unwrap_or_else(|e| panic!("{what}: {e}"));
            if ok(&v) {
                return v;
            }
            assert!(start.elapsed() < within, "{what}: not within {within:?}; last: {v}");
            sleep(Duration::from_millis(25)).await;
        }
    }

    #[allow(dead_code)] // the benchmark clicks nothing
    pub async fn click(&self, css: &str) {
        let e = self.client.wait().at_most(Duration::from_secs(10)).for_element(Locator::Css(css)).await;
        e.unwrap_or_else(|e| panic!("{css}: {e}")).click().await.unwrap_or_else(|e| panic!("click {css}: {e}"));
    }

    #[allow(dead_code)] // the benchmark takes none
    pub async fn screenshot(&self, name: &str) -> PathBuf {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/ui-screenshots");
        std::fs::create_dir_all(&dir).expect("screenshot dir");
        let png = self.client.screenshot().await.expect("screenshot");
        let path = dir.join(name);
        std::fs::write(&path, &png).expect("write screenshot");
        // The README's pictures: refreshed on request, never by a plain test run.
        if std::env::var_os("UPDATE_DOCS_SCREENSHOTS").is_some() {
            let docs = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs").join(format!("dashboard-{name}"));
            std::fs::write(docs, &png).expect("write the docs screenshot");
        }
        path
    }
}
