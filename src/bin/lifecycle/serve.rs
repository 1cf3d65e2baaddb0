//! `lifecycle serve`: the engine as a service until SIGINT or SIGTERM.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use instance_lifecycle::machine::Preset;
use instance_lifecycle::serve::{ClusterSettings, Replay, ServeConfig, Service, WebhookConfig, WebhookFormat};

use crate::output::{Failure, fail, say};

/// What the command line sets (over the file's settings).
#[derive(clap::Args)]
pub struct Flags {
    /// The log's directory (created if missing) [default: lifecycle-data].
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Address to listen on; beyond loopback an API key is required [default: 127.0.0.1:8080].
    #[arg(long)]
    pub listen: Option<std::net::SocketAddr>,
    /// Settings file (TOML; see the README); flags override it.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Close-status preset [default: whatsapp].
    #[arg(long, value_enum)]
    pub policy: Option<crate::PresetArg>,
    /// The global API key (or LIFECYCLE_API_KEY); without one the API is open, on loopback only.
    #[arg(long)]
    pub api_key: Option<String>,
    /// Where instances created without a url connect.
    #[arg(long)]
    pub default_url: Option<String>,
    /// Post every transition to this URL (lifecycle format); repeatable.
    #[arg(long = "webhook", value_name = "URL")]
    pub webhooks: Vec<String>,
    /// Post Evolution API lifecycle events to this URL; repeatable.
    #[arg(long = "evolution-webhook", value_name = "URL")]
    pub evolution_webhooks: Vec<String>,
    /// Be one host of a cluster on this NATS JetStream server (nats://host:port):
    /// each instance has exactly one owner; the stream is the log of record.
    #[arg(long, value_name = "NATS_URL")]
    pub cluster: Option<String>,
    /// This host's id in the cluster [default: host name and process id].
    #[arg(long, value_name = "ID")]
    pub host_id: Option<String>,
    /// How long an instance's lease lives without renewal (`10s`) [default: 10s].
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    pub lease_ttl: Option<std::time::Duration>,
}

pub async fn run(flags: Flags) -> Result<ExitCode, Failure> {
    let mut config = match &flags.config {
        Some(path) => ServeConfig::from_file(path).map_err(|e| fail(e.to_string()))?,
        None => ServeConfig::default(),
    };
    if let (Some(data), true) = (&flags.data, flags.cluster.is_some() || config.cluster.is_some()) {
        // Said before anything starts: a directory the operator named and
        // nothing wrote to would look like a log that lost everything.
        return Err(fail(format!(
            "--data {} has no effect in a cluster: the stream is the log of record, and each host keeps its cache in a temporary directory; drop --data, or drop --cluster (and [cluster] in the settings file) to serve from {}",
            data.display(),
            data.display()
        )));
    }
    if let Some(data) = flags.data {
        config.data = data;
    }
    if let Some(listen) = flags.listen {
        config.listen = listen;
    }
    if let Some(preset) = flags.policy {
        config.preset = Preset::from(preset);
        config.policy = None;
    }
    if let Some(key) = flags.api_key.or_else(|| std::env::var("LIFECYCLE_API_KEY").ok().filter(|k| !k.is_empty())) {
        config.api_key = Some(key);
    }
    if let Some(url) = flags.default_url {
        config.default_url = Some(url);
    }
    for url in flags.webhooks {
        config.webhooks.push(WebhookConfig::new(url));
    }
    for url in flags.evolution_webhooks {
        config.webhooks.push(WebhookConfig { format: WebhookFormat::Evolution, ..WebhookConfig::new(url) });
    }
    if flags.cluster.is_some() || flags.host_id.is_some() || flags.lease_ttl.is_some() {
        let settings = config.cluster.get_or_insert_with(ClusterSettings::default);
        if let Some(url) = flags.cluster {
            settings.url = url;
        }
        if let Some(host) = flags.host_id {
            settings.host = Some(host);
        }
        if let Some(ttl) = flags.lease_ttl {
            settings.lease_ttl = ttl;
        }
    }
    let data = config.data.clone();
    let service = Service::start(config).await.map_err(|e| fail(e.to_string()))?;
    match service.cluster() {
        Some(cluster) => say!(
            "serving http://{} as host {} of the cluster (the stream is the log of record; local cache in a temporary directory); Ctrl-C stops",
            service.local_addr(),
            cluster.host()
        ),
        None => say!("serving http://{} (log in {}); Ctrl-C stops", service.local_addr(), data.display()),
    }
    say!("dashboard: http://{}/", service.local_addr());
    wait_for_signal().await;
    say!("stopping: closing streams, shutting the engine down, syncing the log (in a cluster: giving the leases back)");
    service.shutdown().await.map_err(|e| fail(e.to_string()))?;
    say!("stopped");
    Ok(ExitCode::SUCCESS)
}

/// `lifecycle replay`: the dashboard over a copy of a log, read-only, until Ctrl-C.
pub async fn replay(dir: PathBuf, listen: SocketAddr, open: bool) -> Result<ExitCode, Failure> {
    let replay = Replay::start(&dir, listen).await.map_err(|e| match e {
        // The log's own error names the directory; "service data" would mislead here.
        instance_lifecycle::serve::ServeError::Log(e) => fail(e.to_string()),
        e => fail(e.to_string()),
    })?;
    if replay.was_in_use() {
        eprintln!("note: {} is in use by a running engine; replaying a copy taken now", dir.display());
    }
    let (instances, newest) = replay.size();
    let url = format!("http://{}/", replay.local_addr());
    say!("replaying {} read-only: {instances} instances, records up to #{newest}", dir.display());
    say!("dashboard: {url}  (Ctrl-C stops; the log is never written)");
    if open {
        open_browser(&url);
    }
    wait_for_signal().await;
    replay.shutdown().await.map_err(|e| fail(e.to_string()))?;
    Ok(ExitCode::SUCCESS)
}

/// Opens `url` with the desktop's opener, if there is one.
fn open_browser(url: &str) {
    let openers: &[&str] = if cfg!(target_os = "macos") { &["open"] } else { &["xdg-open", "sensible-browser"] };
    for opener in openers {
        if std::process::Command::new(opener)
            .arg(url)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .is_ok()
        {
            return;
        }
    }
    eprintln!("note: no browser opener found ({}); open {url} yourself", openers.join(", "));
}

async fn wait_for_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let term = async {
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(mut s) => {
                    s.recv().await;
                }
                Err(_) => std::future::pending::<()>().await,
            }
        };
        tokio::select! {
            _ = ctrl_c => {}
            () = term => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}
