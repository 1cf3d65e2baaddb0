//! `lifecycle simulate`: a fleet driven through a seeded chaos schedule
//! against the built-in fault-injecting peer (or an external one), every
//! transition logged, then a summary read back from the log and verified.
//!
//! The same seed gives the same schedule (which instance, what fault, when).
//! Real sockets and real time make the resulting log differ in timing from
//! run to run; the deterministic, virtual-time simulation is in `testing`.
//!
//! Nothing that was there before is lost to a mistake: every option is
//! checked, the peer reached and the machine's limits checked before `--data`
//! is touched; the new log is written beside it (`<data>.simulating`) and
//! replaces the old one only at the end; a directory in use (an engine, or
//! another simulate) is refused with who holds it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Serialize;
use tokio::time::Instant;

use super::chaos::{Chaos, schedule_iter};
use super::peer::{Action, TestPeer};
use crate::engine::{Engine, EngineConfig, EngineError};
use crate::log::{Event, InstanceSpec, Log, LogConfig};
use crate::machine::{Backoff, ClosedCause, Effect, Heartbeat, Input, Policy, Preset, State, StateKind, Timeouts};
use crate::transport::{ReferenceProtocol, WsLimits, WsTransport};

/// File that marks a directory as written by `simulate` (so a rerun may replace it).
pub const MARKER: &str = "lifecycle-simulate.marker";

/// Largest fleet: each instance holds a live connection (about 13 KB in the
/// engine, as much again in the built-in peer, and two sockets); 100,000 is
/// a few GB and 200,000 descriptors, the most one simulation host should take.
pub const INSTANCES_MAX: usize = 100_000;
/// Longest schedule: a day. The schedule is generated second by second, so
/// its memory does not grow with the length; the log does.
pub const SECONDS_MAX: u64 = 86_400;
/// Memory assumed per instance for the pre-flight check: engine and peer
/// side of a live connection with their buffers, rounded up.
const BYTES_PER_INSTANCE: u64 = 48 * 1024;
/// Descriptors kept free for the log, the runtime and the terminal.
const FILES_SPARE: u64 = 256;

/// What to simulate.
#[derive(Clone, Debug)]
pub struct Options {
    /// Fleet size.
    pub instances: usize,
    /// Length of the chaos schedule.
    pub duration: Duration,
    /// Seed of the schedule.
    pub seed: u64,
    /// Where the log goes.
    pub data: PathBuf,
    /// The close-status preset.
    pub preset: Preset,
    /// An external peer speaking the reference protocol (then only the host's part of the schedule runs).
    pub peer: Option<String>,
    /// PEM file of the CA that signed a `wss://` peer's certificate, trusted
    /// instead of the public web PKI.
    pub ca: Option<PathBuf>,
    /// The wire protocol: the reference peer, or a fleet of Discord shards
    /// against the built-in fake gateway (`sim-0007` is shard 7).
    pub protocol: WireProtocol,
}

/// What the simulated fleet speaks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum WireProtocol {
    /// The reference protocol, against the built-in fault-injecting peer (or `peer`).
    #[default]
    Reference,
    /// The Discord gateway, against the built-in fake gateway, which
    /// enforces Discord's limits (identify concurrency, 120 frames per 60 s,
    /// the heartbeat schedule) and counts every breach.
    Discord,
}

/// The fake gateway's limits in a Discord simulation: Discord's, with the
/// identify window and heartbeat scaled down so a run of seconds shows them.
pub fn simulation_gateway(shards: usize) -> super::discord::GatewayConfig {
    let mut c = super::discord::GatewayConfig::new("Bot.simulate", u32::try_from(shards).unwrap_or(u32::MAX));
    c.heartbeat_interval = Duration::from_secs(1);
    c.beat_tolerance = Duration::from_millis(150);
    c.max_concurrency = 16;
    c.identify_window = Duration::from_secs(1);
    c
}

/// What the fake gateway saw in a Discord simulation.
#[derive(Clone, Debug, Default, Serialize, PartialEq, Eq)]
pub struct GatewaySummary {
    /// IDENTIFYs accepted.
    pub identifies: u64,
    /// RESUMEs accepted.
    pub resumes: u64,
    /// RESUMEs refused (the session was gone).
    pub resume_refused: u64,
    /// Heartbeats received.
    pub heartbeats: u64,
    /// Breaches of the limits: IDENTIFYs past the concurrency, connections
    /// closed 4008 for sending too fast, heartbeats out of schedule.
    pub identify_refused: u64,
    /// Connections closed with 4008.
    pub rate_limited: u64,
    /// Heartbeats out of schedule.
    pub early_beats: u64,
    /// No limit was breached.
    pub limits_kept: bool,
}

impl Options {
    /// Checks every option against its bound, before any work.
    pub fn validate(&self) -> Result<(), SimulateError> {
        let bad = |option, problem: String| Err(SimulateError::InvalidOption { option, problem });
        if !(1..=INSTANCES_MAX).contains(&self.instances) {
            return bad("--instances", format!("{} is out of range 1..={INSTANCES_MAX}", self.instances));
        }
        let seconds = self.duration.as_secs();
        if !(1..=SECONDS_MAX).contains(&seconds) {
            return bad("--seconds", format!("{seconds} is out of range 1..={SECONDS_MAX}"));
        }
        if let Some(url) = &self.peer
            && let Err(e) = crate::machine::WsUrl::parse(url)
        {
            return bad("--peer", e.to_string());
        }
        if self.data.file_name().is_none() {
            return bad("--data", format!("{} does not name a directory", self.data.display()));
        }
        if self.protocol == WireProtocol::Discord {
            if self.peer.is_some() {
                return bad("--peer", "--protocol discord runs against the built-in fake gateway".into());
            }
            if self.preset != Preset::Discord {
                return bad("--policy", format!("--protocol discord takes the discord policy, not {}", self.preset));
            }
        }
        Ok(())
    }
}

impl Default for Options {
    fn default() -> Self {
        Self {
            instances: 200,
            duration: Duration::from_secs(30),
            seed: 1,
            data: PathBuf::from("lifecycle-data"),
            preset: Preset::Whatsapp,
            peer: None,
            ca: None,
            protocol: WireProtocol::Reference,
        }
    }
}

/// An error that stops a simulation. Every one of them comes before
/// `--data` is touched, except a failure of the run itself.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SimulateError {
    /// An option is out of range or malformed.
    #[error("{option}: {problem}")]
    InvalidOption {
        /// The option, as typed.
        option: &'static str,
        /// What is wrong.
        problem: String,
    },
    /// The data directory holds something simulate did not write.
    #[error("{path} exists and was not written by `lifecycle simulate`; choose another --data")]
    DataInUse {
        /// The directory.
        path: PathBuf,
    },
    /// The data directory is in use: a running engine, or another simulate writing it.
    #[error("{path} is in use by {}; nothing was changed", holder.as_deref().unwrap_or("another process"))]
    Busy {
        /// The directory.
        path: PathBuf,
        /// Who holds it, when the system says.
        holder: Option<String>,
    },
    /// The machine cannot hold the fleet.
    #[error(
        "{instances} instances need about {needed_mb} MB of memory; {available_mb} MB are available (use fewer --instances)"
    )]
    NotEnoughMemory {
        /// The fleet.
        instances: usize,
        /// The estimate.
        needed_mb: u64,
        /// What the system reports available.
        available_mb: u64,
    },
    /// The process may not open enough sockets for the fleet.
    #[error(
        "{instances} instances need {needed} open files, the limit is {limit} (raise `ulimit -n` or use fewer --instances)"
    )]
    TooFewFiles {
        /// The fleet.
        instances: usize,
        /// Descriptors needed.
        needed: u64,
        /// The hard limit.
        limit: u64,
    },
    /// A file operation failed.
    #[error("{op} {path}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// On which path.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The engine failed.
    #[error(transparent)]
    Engine(#[from] EngineError),
    /// The CA file is not usable.
    #[error("--ca {path}: {source}")]
    Ca {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        source: crate::transport::TlsConfigError,
    },
    /// The external peer cannot be reached.
    #[error("peer {url} refuses connections: {reason}")]
    PeerUnreachable {
        /// Its URL.
        url: String,
        /// Why.
        reason: String,
    },
}

/// Latencies of one kind of command, in milliseconds.
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct Latency {
    /// Commands measured.
    pub count: usize,
    /// Median.
    pub p50_ms: f64,
    /// 99th percentile.
    pub p99_ms: f64,
    /// Slowest.
    pub max_ms: f64,
}

impl Latency {
    fn of(mut samples: Vec<Duration>) -> Self {
        if samples.is_empty() {
            return Self::default();
        }
        samples.sort();
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        let at = |q: usize| samples[(samples.len() * q / 100).min(samples.len() - 1)];
        Self { count: samples.len(), p50_ms: ms(at(50)), p99_ms: ms(at(99)), max_ms: ms(samples[samples.len() - 1]) }
    }
}

/// The verification of the log the simulation wrote.
#[derive(Clone, Debug, Default, Serialize, PartialEq, Eq)]
pub struct Verification {
    /// No finding.
    pub clean: bool,
    /// Instances checked.
    pub instances: u64,
    /// Records checked.
    pub records: u64,
    /// Every finding, printed.
    pub findings: Vec<String>,
}

/// What a simulation did, read back from its log.
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct Summary {
    /// The seed.
    pub seed: u64,
    /// The preset.
    pub policy: String,
    /// Fleet size.
    pub instances: usize,
    /// Schedule length.
    pub seconds: f64,
    /// The log's directory.
    pub data: String,
    /// The peer's URL, and whether it was the built-in one (or `simulated, in virtual time`).
    pub peer: String,
    /// Whether it ran in virtual time (`--virtual`): then the same seed gives the same log, record for record.
    pub virtual_time: bool,
    /// Records in the log: creates plus transitions (plus compaction snapshots, if any).
    pub records: u64,
    /// `Created` records: a name created again after it was removed counts again.
    pub creates: u64,
    /// Names in the log.
    pub names: u64,
    /// The log's head, `GLOBAL:LINK`: two logs with the same head hold the same records.
    pub head: String,
    /// Transitions by input kind.
    pub transitions: BTreeMap<String, u64>,
    /// Connections that ended, by who ended them (`peer`, `local`, `transport`).
    pub closes: BTreeMap<String, u64>,
    /// Total transitions.
    pub transitions_total: u64,
    /// Instances by state kind at the end (removed ones included).
    pub final_states: BTreeMap<String, u64>,
    /// Transitions into `Zombie`.
    pub zombies_detected: u64,
    /// Zombies that a delete removed.
    pub zombies_cleaned: u64,
    /// Connection attempts the rules started on their own (not a host command).
    pub reconnects_made: u64,
    /// Losses the rules ended in `Closed` instead of reconnecting (final status, give-up, pairing refused).
    pub reconnects_suppressed: u64,
    /// Engine restarts during the run.
    pub engine_restarts: u64,
    /// Delete latencies.
    pub deletes: Latency,
    /// Logout latencies.
    pub logouts: Latency,
    /// Host commands the engine refused, by error (expected under chaos: e.g. connect while closing).
    pub refused: BTreeMap<String, u64>,
    /// The log's verification.
    pub verification: Verification,
    /// When the run was stopped early (Ctrl-C): how far into the schedule.
    pub interrupted_after_s: Option<f64>,
    /// With `--protocol discord`: what the fake gateway saw.
    pub gateway: Option<GatewaySummary>,
}

/// The preset with durations short enough that a run of seconds shows every
/// kind of event: heartbeats of 1 s, time-outs of 1–3 s, backoff from 250 ms.
/// Its name says so (`whatsapp (tuned by simulate)`), and the log records it
/// whole, so `verify` replays the log under exactly this policy.
pub fn simulation_policy(preset: Preset) -> Policy {
    let mut p = Policy::preset(preset);
    p.name = format!("{} (tuned by simulate)", preset.as_str());
    p.heartbeat = Heartbeat { interval: Duration::from_secs(1), deadline: Duration::from_secs(1) };
    p.timeouts = Timeouts {
        connect: Duration::from_secs(3),
        pairing_code: Duration::from_secs(3),
        logout: Duration::from_secs(1),
        close: Duration::from_secs(1),
        cleanup: Duration::from_secs(2),
    };
    p.backoff = Backoff {
        base: Duration::from_millis(250),
        cap: Duration::from_secs(3),
        stable_period: Duration::from_secs(5),
        ..Backoff::default()
    };
    p
}

/// Progress, reported about once a second while the schedule runs, and once
/// for each stage after it.
#[derive(Clone, Debug, Default)]
pub struct Progress {
    /// Time into the schedule.
    pub elapsed: Duration,
    /// Schedule length.
    pub total: Duration,
    /// Instances by state kind now.
    pub states: BTreeMap<StateKind, usize>,
    /// What the run is doing.
    pub stage: Stage,
}

/// What a simulation is doing.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Stage {
    /// Running the schedule.
    #[default]
    Running,
    /// The schedule is over: letting deletes and logouts in flight finish (bounded by the policy).
    Finishing(Duration),
    /// Shutting the engine down and verifying the log.
    Verifying,
}

/// Where a simulation writes: beside `--data`, swapped in at the end.
struct Staging {
    data: PathBuf,
    staging: PathBuf,
}

/// `path` with `suffix` appended to its last component.
fn sibling(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(suffix);
    path.with_file_name(name)
}

impl Staging {
    /// Checks `data` and makes an empty staging directory beside it; refuses
    /// (changing nothing) a directory simulate did not write or one in use.
    fn prepare(data: &Path) -> Result<Self, SimulateError> {
        Self::refuse_foreign_or_busy(data)?;
        let staging = sibling(data, ".simulating");
        let io = |op, source| SimulateError::Io { op, path: staging.clone(), source };
        if staging.exists() {
            // Another simulate writing it right now, or the leftover of one that was killed.
            Self::refuse_foreign_or_busy(&staging)?;
            std::fs::remove_dir_all(&staging).map_err(|e| io("remove the leftover", e))?;
        }
        std::fs::create_dir_all(&staging).map_err(|e| io("create", e))?;
        std::fs::write(staging.join(MARKER), "written by `lifecycle simulate`; a rerun replaces this directory\n")
            .map_err(|e| io("write", e))?;
        Ok(Self { data: data.to_path_buf(), staging })
    }

    fn refuse_foreign_or_busy(dir: &Path) -> Result<(), SimulateError> {
        let io = |op, source| SimulateError::Io { op, path: dir.to_path_buf(), source };
        if !dir.exists() {
            return Ok(());
        }
        let empty = std::fs::read_dir(dir).map_err(|e| io("read", e))?.next().is_none();
        if !empty && !dir.join(MARKER).is_file() {
            return Err(SimulateError::DataInUse { path: dir.to_path_buf() });
        }
        let db = dir.join("db");
        if is_locked(&db) {
            return Err(SimulateError::Busy { path: dir.to_path_buf(), holder: crate::log::lock_holder(&db) });
        }
        Ok(())
    }

    /// Puts the new log in place of the old one (which is removed).
    fn commit(self) -> Result<(), SimulateError> {
        let io = |op, path: &Path, source| SimulateError::Io { op, path: path.to_path_buf(), source };
        if self.data.exists() {
            Self::refuse_foreign_or_busy(&self.data)?;
            let old = sibling(&self.data, ".simulate-old");
            if old.exists() {
                std::fs::remove_dir_all(&old).map_err(|e| io("remove", &old, e))?;
            }
            std::fs::rename(&self.data, &old).map_err(|e| io("move aside", &self.data, e))?;
            std::fs::rename(&self.staging, &self.data).map_err(|e| io("move into place", &self.staging, e))?;
            std::fs::remove_dir_all(&old).map_err(|e| io("remove", &old, e))
        } else {
            std::fs::rename(&self.staging, &self.data).map_err(|e| io("move into place", &self.staging, e))
        }
    }
}

/// Whether another process holds sled's lock on `db` (false when there is no such file).
fn is_locked(db: &Path) -> bool {
    let Ok(file) = std::fs::File::open(db) else { return false };
    matches!(file.try_lock(), Err(std::fs::TryLockError::WouldBlock))
}

/// The machine's limits against the fleet: memory, and open files (the soft
/// limit is raised to the hard one when that is enough).
fn preflight(instances: usize, builtin_peer: bool) -> Result<(), SimulateError> {
    let n = instances as u64;
    let needed = n.saturating_mul(BYTES_PER_INSTANCE) + 64 * 1024 * 1024;
    if let Some(available) = mem_available()
        && needed > available
    {
        return Err(SimulateError::NotEnoughMemory {
            instances,
            needed_mb: needed >> 20,
            available_mb: available >> 20,
        });
    }
    let files = n.saturating_mul(if builtin_peer { 2 } else { 1 }) + FILES_SPARE;
    raise_open_files(files).map_err(|limit| SimulateError::TooFewFiles { instances, needed: files, limit })
}

/// `MemAvailable` of `/proc/meminfo`, in bytes (Linux; `None` elsewhere).
fn mem_available() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Makes sure `wanted` descriptors may be open; `Err(hard limit)` when they may not.
fn raise_open_files(wanted: u64) -> Result<(), u64> {
    use rlimit::Resource;
    let Ok((soft, hard)) = Resource::NOFILE.get() else { return Ok(()) }; // unknown: let the run find out
    if soft >= wanted {
        return Ok(());
    }
    if hard < wanted {
        return Err(hard);
    }
    Resource::NOFILE.set(wanted, hard).map_err(|_| soft)
}

struct Run {
    /// `None` only while the engine restarts.
    engine: Option<Engine>,
    /// Chaos actions in flight; aborted when the engine restarts (they hold engine handles).
    actions: tokio::task::JoinSet<()>,
    peer: Option<TestPeer>,
    /// The fake Discord gateway, with `--protocol discord`.
    gateway: Option<super::discord::FakeGateway>,
    url: String,
    deletes: Arc<Mutex<Vec<Duration>>>,
    logouts: Arc<Mutex<Vec<Duration>>>,
    refused: Arc<Mutex<BTreeMap<String, u64>>>,
}

fn refusal(e: &EngineError) -> String {
    let kind = match e {
        EngineError::Removed { .. } => "removed",
        EngineError::Closing { .. } => "closing",
        EngineError::UnknownInstance { .. } => "unknown",
        EngineError::AlreadyExists { .. } => "already exists",
        EngineError::ShutDown => "engine restarting",
        _ => "other",
    };
    kind.to_owned()
}

/// Reads the CA file and builds a TLS configuration trusting it.
fn load_ca(path: &Path) -> Result<Arc<rustls::ClientConfig>, SimulateError> {
    let pem =
        std::fs::read(path).map_err(|source| SimulateError::Io { op: "read", path: path.to_path_buf(), source })?;
    crate::transport::tls_trusting(&pem).map_err(|source| SimulateError::Ca { path: path.to_path_buf(), source })
}

/// Runs a simulation and returns its summary. `stop` ends it early (the
/// CLI passes Ctrl-C): the chaos stops, the engine shuts down within its
/// bounds, and the summary covers what was done. Everything that can be
/// wrong with the options, the peer or the machine is found before `--data`
/// is touched; the new log replaces the old one only once it is complete.
pub async fn run(
    options: &Options,
    mut progress: impl FnMut(&Progress),
    stop: impl std::future::Future<Output = ()>,
) -> Result<Summary, SimulateError> {
    options.validate()?;
    let policy = simulation_policy(options.preset);
    let tls = options.ca.as_deref().map(load_ca).transpose()?;
    if let Some(url) = &options.peer {
        probe(url, tls.clone()).await?;
    }
    preflight(options.instances, options.peer.is_none())?;
    let staging = Staging::prepare(&options.data)?;
    let discord = options.protocol == WireProtocol::Discord;
    let listen_failed = |source| SimulateError::Io { op: "listen", path: "127.0.0.1".into(), source };
    let gateway = if discord {
        Some(super::discord::FakeGateway::start(simulation_gateway(options.instances)).await.map_err(listen_failed)?)
    } else {
        None
    };
    let (peer, url) = match (&options.peer, &gateway) {
        (_, Some(gateway)) => (None, gateway.url()),
        (Some(url), None) => (None, url.clone()),
        (None, None) => {
            let peer = TestPeer::start().await.map_err(|source| SimulateError::Io {
                op: "listen",
                path: "127.0.0.1".into(),
                source,
            })?;
            let url = peer.url();
            (Some(peer), url)
        }
    };
    let protocol: Arc<dyn crate::transport::Protocol> = match &gateway {
        None => Arc::new(ReferenceProtocol),
        Some(_) => {
            let g = simulation_gateway(options.instances);
            let mut c = crate::transport::discord::DiscordConfig::new(g.token.clone(), 513);
            (c.shards, c.max_concurrency, c.identify_window) = (g.shards, g.max_concurrency, g.identify_window);
            let discord = crate::transport::discord::DiscordProtocol::new(c)
                .map_err(|e| SimulateError::InvalidOption { option: "--instances", problem: e.to_string() })?;
            // A shard's wait for its IDENTIFY permit does not count against its
            // connect deadline (R15: the IDENTIFY sent restarts it).
            Arc::new(discord)
        }
    };
    let mut transport = WsTransport::new(protocol, WsLimits::default());
    if let Some(tls) = tls {
        transport = transport.with_tls(tls);
    }
    let config = EngineConfig {
        policy: policy.clone(),
        log: LogConfig::default(),
        transport: Arc::new(transport),
        ..EngineConfig::default()
    };
    let at = staging.staging.clone();
    let mut run = Run {
        engine: Some(Engine::open(&at, config.clone()).await?),
        actions: tokio::task::JoinSet::new(),
        url,
        peer,
        gateway,
        deletes: Arc::default(),
        logouts: Arc::default(),
        refused: Arc::default(),
    };
    let plan =
        schedule_iter(options.seed, options.instances, options.duration, run.peer.is_some() || run.gateway.is_some());
    let start = Instant::now();
    let mut next_report = Duration::ZERO;
    let mut restarts = 0;
    let mut interrupted = None;
    tokio::pin!(stop);
    'plan: for (at_offset, i, what) in plan {
        while start.elapsed() < at_offset {
            if start.elapsed() >= next_report
                && let Some(engine) = &run.engine
            {
                progress(&snapshot(engine, start.elapsed(), options.duration, Stage::Running));
                next_report += Duration::from_secs(1);
            }
            // Saturating: time moved on since the loop's check (the progress line takes a while).
            let pause = at_offset.saturating_sub(start.elapsed()).min(Duration::from_millis(100));
            tokio::select! {
                () = tokio::time::sleep(pause) => {}
                () = &mut stop => {
                    interrupted = Some(start.elapsed());
                    break 'plan;
                }
            }
        }
        if what == Chaos::EngineRestart {
            // Drop the old engine before reopening: the log allows one writer
            // (in-flight commands drop their clones as they fail with ShutDown).
            if let Some(old) = run.engine.take() {
                old.shutdown().await?;
            }
            run.actions.abort_all();
            while run.actions.join_next().await.is_some() {}
            run.engine = Some(Engine::open(&at, config.clone()).await?);
            restarts += 1;
            continue;
        }
        act(&mut run, &format!("sim-{i:04}"), what);
        while run.actions.try_join_next().is_some() {}
    }
    while interrupted.is_none() && start.elapsed() < options.duration {
        tokio::select! {
            () = tokio::time::sleep(Duration::from_millis(100)) => {}
            () = &mut stop => interrupted = Some(start.elapsed()),
        }
    }
    let Some(engine) = run.engine.clone() else { unreachable!("the engine is back after every restart") };
    if interrupted.is_some() {
        run.actions.abort_all();
    } else {
        // Let in-flight deletes and logouts finish (each is bounded by the policy).
        let t = &policy.timeouts;
        let settle = t.logout + t.close + t.cleanup;
        progress(&snapshot(&engine, options.duration, options.duration, Stage::Finishing(settle)));
        tokio::select! {
            () = tokio::time::sleep(settle) => {}
            () = &mut stop => {
                interrupted = Some(options.duration);
                run.actions.abort_all();
            }
        }
    }
    while run.actions.join_next().await.is_some() {}
    progress(&snapshot(&engine, start.elapsed().min(options.duration), options.duration, Stage::Verifying));
    engine.shutdown().await?;
    let log = engine.log().clone();
    let mut summary = summarize(&log, &policy, options, &run, restarts);
    summary.interrupted_after_s = interrupted.map(|d| d.as_secs_f64());
    // Close the log (every handle) before moving its directory into place.
    drop((log, engine, run));
    staging.commit()?;
    Ok(summary)
}

async fn probe(url: &str, tls: Option<Arc<rustls::ClientConfig>>) -> Result<(), SimulateError> {
    let connector = tls.map(tokio_tungstenite::Connector::Rustls);
    let connect = tokio_tungstenite::connect_async_tls_with_config(url, None, true, connector);
    let attempt = tokio::time::timeout(Duration::from_secs(5), connect).await;
    match attempt {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(SimulateError::PeerUnreachable { url: url.to_owned(), reason: e.to_string() }),
        Err(_) => Err(SimulateError::PeerUnreachable { url: url.to_owned(), reason: "no answer within 5 s".into() }),
    }
}

fn snapshot(engine: &Engine, elapsed: Duration, total: Duration, stage: Stage) -> Progress {
    let elapsed = elapsed.min(total);
    let mut states = BTreeMap::new();
    for (_, s) in engine.list() {
        *states.entry(s.kind()).or_default() += 1;
    }
    Progress { elapsed, total, states, stage }
}

fn act(run: &mut Run, name: &str, what: Chaos) {
    let Some(engine) = run.engine.clone() else { return };
    let (name, url) = (name.to_owned(), run.url.clone());
    let (deletes, logouts, refused) = (run.deletes.clone(), run.logouts.clone(), run.refused.clone());
    let peer_act = |a: Action| {
        if let Some(p) = &run.peer {
            p.act(&name, a);
        }
    };
    match &what {
        Chaos::Zombify | Chaos::DeleteZombie => peer_act(Action::Zombify),
        Chaos::Close(code) => peer_act(Action::Close(*code)),
        Chaos::Drop => peer_act(Action::Drop),
        Chaos::HangingLogout => peer_act(Action::IgnoreLogouts),
        _ => {}
    }
    if let Some(gateway) = &run.gateway {
        gateway_act(gateway, &name, &what);
    }
    let refuse = move |e: EngineError| {
        *refused.lock().unwrap_or_else(std::sync::PoisonError::into_inner).entry(refusal(&e)).or_default() += 1
    };
    let mut zombie_watch = (what == Chaos::DeleteZombie).then(|| engine.subscribe());
    run.actions.spawn(async move {
        if let Some(events) = &mut zombie_watch {
            // Wait (bounded) for the heartbeat to find the zombie, then delete it.
            let found = async {
                while let Ok(n) = events.recv().await {
                    if n.instance.as_str() == name && matches!(n.to, State::Zombie { .. }) {
                        return;
                    }
                }
            };
            let _ = tokio::time::timeout(Duration::from_secs(4), found).await;
        }
        let timed = |samples: Arc<Mutex<Vec<Duration>>>, t: Instant| {
            samples.lock().unwrap_or_else(std::sync::PoisonError::into_inner).push(t.elapsed());
        };
        let result = match what {
            Chaos::Create => match engine.create(&name, InstanceSpec { url }).await {
                Ok(()) | Err(EngineError::AlreadyExists { .. }) => engine.connect(&name).await.map(drop),
                Err(e) => Err(e),
            },
            // A removed name comes back as a new instance (R1: only by a create).
            Chaos::Connect => match engine.connect(&name).await {
                Err(EngineError::Removed { .. }) => match engine.create(&name, InstanceSpec { url }).await {
                    Ok(()) => engine.connect(&name).await.map(drop),
                    Err(e) => Err(e),
                },
                other => other.map(drop),
            },
            Chaos::Restart => engine.restart(&name).await.map(drop),
            Chaos::Logout | Chaos::HangingLogout => {
                let t = Instant::now();
                let r = engine.logout(&name).await.map(drop);
                timed(logouts, t);
                r
            }
            Chaos::Delete | Chaos::DeleteZombie => {
                let t = Instant::now();
                let r = engine.delete(&name).await.map(drop);
                timed(deletes, t);
                r
            }
            Chaos::Zombify | Chaos::Close(_) | Chaos::Drop | Chaos::EngineRestart => Ok(()),
        };
        if let Err(e) = result {
            refuse(e);
        }
    });
}

/// A peer fault, as the fake Discord gateway plays it. The schedule's close
/// codes (written for WhatsApp) become Discord's nearest events: 4401
/// (logged out) an invalid session, 4515 (restart required) op 9 resumable,
/// 4408 (connection lost) op 7, 4440 (replaced) a final 4004 (the host's next
/// connect brings the shard back), anything else a resumable 4000.
fn gateway_act(gateway: &super::discord::FakeGateway, name: &str, what: &Chaos) {
    let Ok(instance) = crate::machine::InstanceName::new(name) else { return };
    let shard = crate::transport::discord::DiscordProtocol::shard_of(&instance);
    let _ = match what {
        Chaos::Zombify | Chaos::DeleteZombie => gateway.set_silent(shard, true),
        Chaos::Drop => gateway.drop_connection(shard),
        Chaos::Close(4401) => gateway.invalidate(shard, false),
        Chaos::Close(4515) => gateway.invalidate(shard, true),
        Chaos::Close(4408) => gateway.reconnect(shard),
        Chaos::Close(4440) => gateway.close(shard, 4004),
        Chaos::Close(_) => gateway.close(shard, 4000),
        _ => false,
    };
}

/// `lifecycle simulate --virtual`: the same seeded schedule, its faults
/// played by the simulated transport, in virtual time
/// ([`super::virtual_time::simulate_virtual`]): the same seed gives the same
/// log, record for record (the summary's `head` says so at a glance). The
/// run is made in memory and then written to `data` as a sled log, as
/// `run` writes it (beside the old one, replacing it once complete).
/// Blocking: it runs its own paused runtime, so call it outside one.
pub fn run_virtual(options: &Options) -> Result<Summary, SimulateError> {
    options.validate()?;
    if options.peer.is_some() {
        return Err(SimulateError::InvalidOption {
            option: "--virtual",
            problem: "runs against the simulated transport; --peer needs real sockets".into(),
        });
    }
    let policy = simulation_policy(options.preset);
    let staging = Staging::prepare(&options.data)?;
    let memory =
        super::virtual_time::simulate_virtual(options.seed, options.instances, options.duration, policy.clone())?;
    let log_error = |e: crate::log::LogError| SimulateError::Engine(EngineError::log(None, e));
    let log =
        Log::open(&staging.staging, LogConfig { durability: crate::log::Durability::Buffered, ..LogConfig::default() })
            .map_err(log_error)?;
    let mut policies = memory.policies().map_err(log_error)?.into_iter().peekable();
    for record in memory.records() {
        let record = record.map_err(log_error)?;
        while let Some((_, p)) = policies.next_if(|(from, _)| *from <= record.global) {
            log.set_policy(&p).map_err(log_error)?;
        }
        log.append(&record.instance, record.seq, record.at, record.event, &record.to).map_err(log_error)?;
    }
    log.sync().map_err(log_error)?;
    let restarts = schedule_iter(options.seed, options.instances, options.duration, true)
        .filter(|(_, _, what)| *what == Chaos::EngineRestart)
        .count() as u64;
    let base = Summary {
        peer: "simulated, in virtual time".into(),
        virtual_time: true,
        engine_restarts: restarts,
        ..Summary::default()
    };
    let summary = summarize_log(&log, &policy, options, base);
    drop((log, memory));
    staging.commit()?;
    Ok(summary)
}

fn summarize(log: &Log, policy: &Policy, options: &Options, run: &Run, restarts: u64) -> Summary {
    let base = Summary {
        peer: if run.gateway.is_some() {
            format!("built-in fake Discord gateway ({})", run.url)
        } else if run.peer.is_some() {
            format!("built-in ({})", run.url)
        } else {
            run.url.clone()
        },
        engine_restarts: restarts,
        deletes: Latency::of(run.deletes.lock().map(|v| v.clone()).unwrap_or_default()),
        logouts: Latency::of(run.logouts.lock().map(|v| v.clone()).unwrap_or_default()),
        refused: run.refused.lock().map(|v| v.clone()).unwrap_or_default(),
        gateway: run.gateway.as_ref().map(|g| {
            let s = g.stats();
            GatewaySummary {
                identifies: s.identifies,
                resumes: s.resumes,
                resume_refused: s.resume_refused,
                heartbeats: s.heartbeats,
                identify_refused: s.identify_refused,
                rate_limited: s.rate_limited,
                early_beats: s.early_beats,
                limits_kept: s.identify_refused == 0 && s.rate_limited == 0 && s.early_beats == 0,
            }
        }),
        ..Summary::default()
    };
    summarize_log(log, policy, options, base)
}

/// Fills `s` with what the log says.
fn summarize_log(log: &Log, policy: &Policy, options: &Options, mut s: Summary) -> Summary {
    s.seed = options.seed;
    s.policy = policy.name.clone();
    s.instances = options.instances;
    s.seconds = options.duration.as_secs_f64();
    s.data = options.data.display().to_string();
    let (global, link) = log.tip();
    s.head = format!("{global}:{}", link.hex());
    let mut last: BTreeMap<String, State> = BTreeMap::new();
    for record in log.records().flatten() {
        s.records += 1;
        if matches!(record.event, Event::Created { .. }) {
            s.creates += 1;
        }
        if let Event::Transition { from, input, effects } = &record.event {
            s.transitions_total += 1;
            *s.transitions.entry(input.kind().as_str().to_owned()).or_default() += 1;
            if let Some((initiator, _, _)) = input.closed() {
                *s.closes.entry(initiator.as_str().to_owned()).or_default() += 1;
            }
            if matches!(record.to.state, State::Zombie { .. }) {
                s.zombies_detected += 1;
            }
            if matches!(from.state, State::Zombie { .. }) && *input == Input::Delete {
                s.zombies_cleaned += 1;
            }
            if !input.is_host_command() && effects.iter().any(|e| matches!(e, Effect::OpenTransport { .. })) {
                s.reconnects_made += 1;
            }
            let lost =
                matches!(input, Input::TransportClosed { .. } | Input::TimerFired { .. } | Input::PairingCode { .. });
            let suppressed = matches!(
                record.to.state,
                State::Closed {
                    cause: ClosedCause::FinalStatus | ClosedCause::GaveUp { .. } | ClosedCause::PairingRefused { .. },
                    ..
                }
            );
            if lost && suppressed && !matches!(from.state, State::Closed { .. }) {
                s.reconnects_suppressed += 1;
            }
        }
        last.insert(record.instance.to_string(), record.to.state);
    }
    s.names = last.len() as u64;
    for state in last.values() {
        *s.final_states.entry(state.kind().as_str().to_owned()).or_default() += 1;
    }
    let report = log.verify_recorded(policy);
    s.verification = Verification {
        clean: report.is_clean(),
        instances: report.instances,
        records: report.records,
        findings: report.findings.iter().map(ToString::to_string).collect(),
    };
    s
}
