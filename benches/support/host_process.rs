//! `lifecycle serve` in its own process, for the benchmarks: a host of a
//! cluster (or one host alone), asked over real HTTP, killed for real.

use std::io::BufRead;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use instance_lifecycle::serve::ServeConfig;

pub struct HostProcess {
    child: Child,
    pub base: String,
    pub client: reqwest::Client,
    _dir: tempfile::TempDir,
}

impl HostProcess {
    /// Starts one with these settings (`listen` is set to a free port here).
    pub fn start(mut config: ServeConfig) -> Self {
        let _ = tokio_rustls::rustls::crypto::ring::default_provider().install_default();
        let dir = tempfile::tempdir().expect("dir");
        config.listen = "127.0.0.1:0".parse().expect("addr");
        let path = dir.path().join("serve.toml");
        std::fs::write(&path, toml::to_string(&config).expect("settings as TOML")).expect("write settings");
        let mut child = Command::new(env!("CARGO_BIN_EXE_lifecycle"))
            .args(["serve", "--config"])
            .arg(&path)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn lifecycle serve");
        let mut lines = std::io::BufReader::new(child.stdout.take().expect("stdout")).lines().map_while(Result::ok);
        let line = lines.find(|l| l.contains("serving http://")).expect("the host says where it serves");
        std::thread::spawn(move || lines.for_each(drop));
        let addr = line.split("http://").nth(1).and_then(|r| r.split_whitespace().next()).expect("address");
        let client = reqwest::Client::builder().timeout(Duration::from_secs(30)).build().expect("client");
        Self { child, base: format!("http://{addr}"), client, _dir: dir }
    }

    /// A request; its status and body as JSON.
    pub async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> (u16, serde_json::Value) {
        let mut req = self.client.request(method, format!("{}{path}", self.base));
        if let Some(body) = body {
            req = req.header("content-type", "application/json").body(body.to_string());
        }
        let resp = req.send().await.expect("a request");
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap_or_default();
        (status, serde_json::from_str(&text).unwrap_or(serde_json::Value::Null))
    }

    /// SIGKILL.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Sends a signal (`KILL`, `TERM`) without waiting: the process may be shared.
    #[allow(dead_code)] // not every benchmark signals
    pub fn signal(&self, signal: &str) {
        let _ = Command::new("kill").args([&format!("-{signal}"), &self.child.id().to_string()]).status();
    }

    /// SIGTERM, and the wait for a clean stop (leases given back, log synced).
    #[allow(dead_code)] // not every benchmark stops its hosts cleanly
    pub fn stop(&mut self) {
        self.signal("TERM");
        let _ = self.child.wait();
    }
}

impl Drop for HostProcess {
    fn drop(&mut self) {
        self.kill();
    }
}
