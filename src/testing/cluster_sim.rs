//! `lifecycle simulate --cluster N`: N hosts in one process, each with its
//! own NATS connection and engine, against a `nats-server` spawned for the
//! run and the reference peer; a seeded chaos of dropped connections,
//! restarts, logouts and connects — and host kills, each host killed
//! replaced by a new one. At the end every instance's stream is verified
//! (one owner at a time, epochs that never go back, gapless records) and
//! the peer is asked whether it ever saw two live connections for one name.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::cluster::{Cluster, ClusterConfig, ClusterError, ClusterStats, StreamViolation};
use crate::engine::{Engine, EngineConfig};
use crate::log::{InstanceSpec, LogConfig};
use crate::machine::{InstanceName, Policy, Preset, SplitMix64, StateKind};
use crate::testing::nats::{NatsServer, NatsServerError};
use crate::testing::peer::{Action, TestPeer};

/// What to run.
#[derive(Clone, Debug)]
pub struct ClusterOptions {
    /// Hosts at any time (a killed one is replaced).
    pub hosts: usize,
    /// Instances, created round-robin on the hosts.
    pub instances: usize,
    /// Length of the chaos.
    pub duration: Duration,
    /// Seed of the chaos.
    pub seed: u64,
    /// Close-status preset.
    pub preset: Preset,
    /// Lease TTL (renewals every third of it).
    pub lease_ttl: Duration,
    /// Entries each instance's subject keeps after its last snapshot
    /// (compaction; small in a simulation, so that a long run shows the
    /// stream level off).
    pub keep_records: u64,
}

/// One host, as the run ends.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostSummary {
    /// Its id.
    pub host: String,
    /// Killed during the run.
    pub killed: bool,
    /// What it did.
    pub stats: ClusterStats,
}

/// What a run did and found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ClusterSummary {
    /// Every host that took part, in order of joining.
    pub hosts: Vec<HostSummary>,
    /// Host kills.
    pub kills: u32,
    /// Chaos events applied (drops, restarts, logouts, connects).
    pub events: u64,
    /// Instances with a stream.
    pub streams: usize,
    /// Records in all streams.
    pub records: u64,
    /// Takeovers in all streams.
    pub takeovers: u64,
    /// Instances by their last state's kind (`open`, `closed`, …).
    pub states: BTreeMap<String, usize>,
    /// Everything the verification found wrong (none expected).
    pub violations: Vec<(InstanceName, StreamViolation)>,
    /// Handshakes the peer saw while another connection of the same name was live (none expected).
    pub overlaps: u32,
    /// The stream's size through the run: (second, entries, bytes), ten samples and the end.
    pub stream: Vec<(u64, u64, u64)>,
}

/// Why a run could not be done.
#[derive(Debug, thiserror::Error)]
pub enum ClusterSimError {
    /// The options.
    #[error("{0}")]
    Options(String),
    /// The NATS server.
    #[error(transparent)]
    Nats(#[from] NatsServerError),
    /// A host.
    #[error(transparent)]
    Cluster(#[from] ClusterError),
    /// The peer.
    #[error("the reference peer: {0}")]
    Peer(std::io::Error),
}

struct Host {
    cluster: Cluster,
    engine: Engine,
    killed: bool,
}

/// The stream's entries and bytes now, at `second` of the run.
async fn stream_size(cluster: &Cluster, second: u64) -> Result<(u64, u64, u64), ClusterSimError> {
    let mut stream = cluster.stream().clone();
    let info = stream.info().await.map_err(|e| ClusterError::Nats {
        url: cluster.url().to_owned(),
        op: "reading the stream's size",
        message: e.to_string(),
    })?;
    Ok((second, info.state.messages, info.state.bytes))
}

/// Runs the simulation; `progress` hears what it is doing.
pub async fn run_cluster(options: &ClusterOptions, progress: impl Fn(&str)) -> Result<ClusterSummary, ClusterSimError> {
    if !(1..=16).contains(&options.hosts) {
        return Err(ClusterSimError::Options("--cluster takes 1 to 16 hosts".into()));
    }
    if options.instances == 0 {
        return Err(ClusterSimError::Options("a cluster simulation needs at least one instance".into()));
    }
    if options.lease_ttl < Duration::from_secs(1) {
        return Err(ClusterSimError::Options("the lease TTL must be at least 1 s".into()));
    }
    progress("starting nats-server (JetStream, fsync on every write) and the reference peer");
    let nats = NatsServer::start()?;
    let peer = TestPeer::start().await.map_err(ClusterSimError::Peer)?;
    let policy = Policy::preset(options.preset);
    let join = async |id: usize| -> Result<Host, ClusterSimError> {
        let mut config = ClusterConfig::new(nats.url(), format!("host-{id}"));
        config.namespace = "sim".into();
        config.lease_ttl = options.lease_ttl;
        config.renew_every = options.lease_ttl / 3;
        config.retention =
            Some(crate::log::Retention { keep_records: options.keep_records, ..crate::log::Retention::default() });
        let engine = EngineConfig {
            policy: policy.clone(),
            log: LogConfig::default(),
            compaction: None,
            ..EngineConfig::default()
        };
        let (cluster, engine) = Cluster::join(config, engine).await?;
        Ok(Host { cluster, engine, killed: false })
    };
    let mut hosts = Vec::new();
    for id in 0..options.hosts {
        hosts.push(join(id).await?);
    }
    progress(&format!("{} hosts joined; creating {} instances round-robin", options.hosts, options.instances));
    let names: Vec<String> = (0..options.instances).map(|i| format!("sim-{i:04}")).collect();
    let spec = InstanceSpec { url: peer.url() };
    for (i, name) in names.iter().enumerate() {
        let host = &hosts[i % hosts.len()];
        host.cluster.create(name, spec.clone()).await?;
        let _ = host.engine.connect(name).await;
    }
    let mut rng = SplitMix64::new(options.seed);
    let mut summary = ClusterSummary::default();
    let seconds = options.duration.as_secs().max(1);
    // Kills at a third and two thirds of the run (one for a short run).
    let kills: Vec<u64> = if seconds >= 6 { vec![seconds / 3, 2 * seconds / 3] } else { vec![seconds / 2] };
    let sample_every = (seconds / 10).max(1);
    for second in 0..seconds {
        progress(&format!("chaos: second {}/{seconds}", second + 1));
        if second % sample_every == 0
            && let Some(host) = hosts.iter().find(|h| !h.killed)
        {
            summary.stream.push(stream_size(&host.cluster, second).await?);
        }
        if kills.contains(&second) && hosts.iter().filter(|h| !h.killed).count() > 1 {
            // The host owning the most instances: the kill that moves the most.
            let victim = (0..hosts.len())
                .filter(|&i| !hosts[i].killed)
                .max_by_key(|&i| (hosts[i].cluster.owned().len(), rng.next_u64()))
                .unwrap_or(0);
            hosts[victim].cluster.halt();
            hosts[victim].killed = true;
            summary.kills += 1;
            progress(&format!("killed {}; a new host joins", hosts[victim].cluster.host()));
            let id = hosts.len();
            hosts.push(join(id).await?);
        }
        let events = (names.len() / 10).max(1);
        for _ in 0..events {
            let name = &names[usize::try_from(rng.next_u64() % names.len() as u64).unwrap_or(0)];
            let Some(owner) = hosts.iter().find(|h| !h.killed && h.engine.state(name).is_ok()) else { continue };
            let engine = &owner.engine;
            summary.events += 1;
            match rng.next_u64() % 10 {
                0..=4 => drop(peer.act(name, Action::Drop)),
                5..=6 => drop(engine.restart(name).await),
                7 => drop(engine.logout(name).await),
                _ => drop(engine.connect(name).await),
            }
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    progress("settling: waiting for every orphan to find an owner");
    let settle = options.lease_ttl + options.lease_ttl / 3 + Duration::from_secs(2);
    tokio::time::sleep(settle).await;
    progress("verifying every instance's stream");
    let observer = &hosts.iter().find(|h| !h.killed).map(|h| h.cluster.clone());
    let Some(observer) = observer else { return Err(ClusterSimError::Options("no host left".into())) };
    summary.stream.push(stream_size(observer, seconds).await?);
    for name in observer.reader().names().await? {
        let check = observer.reader().verify(&name, Some(&policy)).await?;
        summary.streams += 1;
        summary.records += check.records;
        summary.takeovers += check.takeovers;
        let kind = check.last.as_ref().map_or("none".to_owned(), |i| i.state.kind().to_string().to_lowercase());
        *summary.states.entry(kind).or_default() += 1;
        summary.violations.extend(check.violations.into_iter().map(|v| (name.clone(), v)));
    }
    summary.overlaps = peer.overlaps();
    for host in &hosts {
        summary.hosts.push(HostSummary {
            host: host.cluster.host().to_owned(),
            killed: host.killed,
            stats: host.cluster.stats(),
        });
    }
    for host in hosts.iter().filter(|h| !h.killed) {
        let _ = host.cluster.leave().await;
    }
    let open_now = summary.states.get(&StateKind::Open.to_string().to_lowercase()).copied().unwrap_or(0);
    progress(&format!("done: {open_now} instances open at the end"));
    Ok(summary)
}
