//! `lifecycle simulate`: a fleet driven through a seeded chaos schedule
//! against the built-in fault-injecting peer (or an external one), every
//! transition logged, then a summary read back from the log and verified.
//!
//! The same seed gives the same schedule (which instance, what fault, when).
//! Real sockets and real time make the resulting log differ in timing from
//! run to run; the deterministic, virtual-time simulation is in `testing`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Serialize;
use tokio::time::Instant;

use crate::engine::{Engine, EngineConfig, EngineError};
use crate::log::{Event, InstanceSpec, Log, LogConfig};
use crate::machine::{Backoff, ClosedCause, Effect, Heartbeat, Input, Policy, Preset, State, StateKind, Timeouts};
use crate::peer::{Action, TestPeer};
use crate::transport::{ReferenceProtocol, WsLimits, WsTransport};

/// File that marks a directory as written by `simulate` (so a rerun may replace it).
pub const MARKER: &str = "lifecycle-simulate.marker";

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
        }
    }
}

/// An error that stops a simulation.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SimulateError {
    /// The data directory holds something simulate did not write.
    #[error("{path} exists and was not written by `lifecycle simulate`; choose another --data")]
    DataInUse {
        /// The directory.
        path: PathBuf,
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
    /// The peer's URL, and whether it was the built-in one.
    pub peer: String,
    /// Transitions by input kind.
    pub transitions: BTreeMap<String, u64>,
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
}

/// One step of the chaos schedule.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Chaos {
    /// Create and connect.
    Create,
    /// Host: connect.
    Connect,
    /// Host: logout.
    Logout,
    /// Host: delete.
    Delete,
    /// Host: restart the instance.
    Restart,
    /// Peer: the connection goes half-open.
    Zombify,
    /// Peer: close with this wire code.
    Close(u16),
    /// Peer: drop TCP without a close frame.
    Drop,
    /// Peer: stop answering logouts, then the host logs out.
    HangingLogout,
    /// Peer: the connection goes half-open; the host deletes the instance as
    /// soon as the heartbeat finds the zombie (PR 2520).
    DeleteZombie,
    /// Restart the whole engine on the same log.
    EngineRestart,
}

impl Chaos {
    fn is_peer_fault(&self) -> bool {
        matches!(self, Self::Zombify | Self::Close(_) | Self::Drop | Self::HangingLogout | Self::DeleteZombie)
    }
}

/// The schedule: (offset, instance index, what), in time order. Pure function of its arguments.
pub fn schedule(seed: u64, instances: usize, duration: Duration, with_faults: bool) -> Vec<(Duration, usize, Chaos)> {
    let mut rng = SplitMix(seed);
    let ms = u64::try_from(duration.as_millis()).unwrap_or(u64::MAX).max(1_000);
    let mut out = Vec::new();
    // Creates spread over the first tenth of the run.
    for i in 0..instances {
        out.push((Duration::from_millis(rng.below(ms / 10)), i, Chaos::Create));
    }
    // About one event per instance every ten seconds, after the fleet is up.
    let events = (instances as u64 * ms / 10_000).max(1);
    for _ in 0..events {
        let at = ms / 10 + rng.below(ms - ms / 10);
        let i = usize::try_from(rng.below(instances as u64)).unwrap_or(0);
        let what = match rng.below(100) {
            0..=11 => Chaos::Zombify,
            12..=17 => Chaos::Close(4401),
            18..=25 => Chaos::Close(4408),
            26..=29 => Chaos::Close(4440),
            30..=35 => Chaos::Close(4515),
            36..=41 => Chaos::Close(1011),
            42..=53 => Chaos::Drop,
            54..=59 => Chaos::HangingLogout,
            60..=67 => Chaos::DeleteZombie,
            68..=75 => Chaos::Logout,
            76..=81 => Chaos::Delete,
            82..=89 => Chaos::Restart,
            _ => Chaos::Connect,
        };
        if with_faults || !what.is_peer_fault() {
            out.push((Duration::from_millis(at), i, what));
        }
    }
    for third in [1, 2] {
        out.push((Duration::from_millis(ms * third / 3), 0, Chaos::EngineRestart));
    }
    out.sort_by_key(|(at, i, _)| (*at, *i));
    out
}

/// SplitMix64: a tiny, well-known seeded generator (no dependency needed).
struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        if n == 0 { 0 } else { self.next() % n }
    }
}

/// The preset with durations short enough that a run of seconds shows every
/// kind of event: heartbeats of 1 s, time-outs of 1–3 s, backoff from 250 ms.
pub fn simulation_policy(preset: Preset) -> Policy {
    let mut p = Policy::preset(preset);
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

/// Progress, reported about once a second.
#[derive(Clone, Debug, Default)]
pub struct Progress {
    /// Time into the schedule.
    pub elapsed: Duration,
    /// Schedule length.
    pub total: Duration,
    /// Instances by state kind now.
    pub states: BTreeMap<StateKind, usize>,
}

fn prepare(data: &Path) -> Result<(), SimulateError> {
    let io = |op, source| SimulateError::Io { op, path: data.to_path_buf(), source };
    if data.exists() {
        let empty = std::fs::read_dir(data).map_err(|e| io("read", e))?.next().is_none();
        if !empty {
            if !data.join(MARKER).is_file() {
                return Err(SimulateError::DataInUse { path: data.to_path_buf() });
            }
            std::fs::remove_dir_all(data).map_err(|e| io("remove", e))?;
        }
    }
    std::fs::create_dir_all(data).map_err(|e| io("create", e))?;
    std::fs::write(data.join(MARKER), "written by `lifecycle simulate`; a rerun replaces this directory\n")
        .map_err(|e| io("write", e))
}

struct Run {
    /// `None` only while the engine restarts.
    engine: Option<Engine>,
    /// Chaos actions in flight; aborted when the engine restarts (they hold engine handles).
    actions: tokio::task::JoinSet<()>,
    peer: Option<TestPeer>,
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

/// Runs a simulation and returns its summary.
pub async fn run(options: &Options, mut progress: impl FnMut(&Progress)) -> Result<Summary, SimulateError> {
    prepare(&options.data)?;
    let policy = simulation_policy(options.preset);
    let tls = match &options.ca {
        Some(path) => {
            let pem =
                std::fs::read(path).map_err(|source| SimulateError::Io { op: "read", path: path.clone(), source })?;
            let tls = crate::transport::tls_trusting(&pem)
                .map_err(|source| SimulateError::Ca { path: path.clone(), source })?;
            Some(tls)
        }
        None => None,
    };
    let (peer, url) = match &options.peer {
        Some(url) => {
            probe(url, tls.clone()).await?;
            (None, url.clone())
        }
        None => {
            let peer = TestPeer::start().await.map_err(|source| SimulateError::Io {
                op: "listen",
                path: "127.0.0.1".into(),
                source,
            })?;
            let url = peer.url();
            (Some(peer), url)
        }
    };
    let mut transport = WsTransport::new(Arc::new(ReferenceProtocol), WsLimits::default());
    if let Some(tls) = tls {
        transport = transport.with_tls(tls);
    }
    let config = EngineConfig {
        policy: policy.clone(),
        log: LogConfig::default(),
        transport: Arc::new(transport),
        ..EngineConfig::default()
    };
    let mut run = Run {
        engine: Some(Engine::open(&options.data, config.clone()).await?),
        actions: tokio::task::JoinSet::new(),
        url,
        peer,
        deletes: Arc::default(),
        logouts: Arc::default(),
        refused: Arc::default(),
    };
    let plan = schedule(options.seed, options.instances, options.duration, run.peer.is_some());
    let start = Instant::now();
    let mut next_report = Duration::ZERO;
    let mut restarts = 0;
    for (at, i, what) in plan {
        while start.elapsed() < at {
            if start.elapsed() >= next_report
                && let Some(engine) = &run.engine
            {
                progress(&snapshot(engine, start.elapsed(), options.duration));
                next_report += Duration::from_secs(1);
            }
            tokio::time::sleep((at - start.elapsed()).min(Duration::from_millis(100))).await;
        }
        if what == Chaos::EngineRestart {
            // Drop the old engine before reopening: the log allows one writer
            // (in-flight commands drop their clones as they fail with ShutDown).
            if let Some(old) = run.engine.take() {
                old.shutdown().await?;
            }
            run.actions.abort_all();
            while run.actions.join_next().await.is_some() {}
            run.engine = Some(Engine::open(&options.data, config.clone()).await?);
            restarts += 1;
            continue;
        }
        act(&mut run, &format!("sim-{i:04}"), what);
        while run.actions.try_join_next().is_some() {}
    }
    while start.elapsed() < options.duration {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    while run.actions.join_next().await.is_some() {}
    let Some(engine) = run.engine.clone() else { unreachable!("the engine is back after every restart") };
    progress(&snapshot(&engine, options.duration, options.duration));
    // Let in-flight deletes and logouts finish (each is bounded by the policy).
    let t = &policy.timeouts;
    tokio::time::sleep(t.logout + t.close + t.cleanup).await;
    engine.shutdown().await?;
    let log = engine.log().clone();
    let summary = summarize(&log, &policy, options, &run, restarts);
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

fn snapshot(engine: &Engine, elapsed: Duration, total: Duration) -> Progress {
    let elapsed = elapsed.min(total);
    let mut states = BTreeMap::new();
    for (_, s) in engine.list() {
        *states.entry(s.kind()).or_default() += 1;
    }
    Progress { elapsed, total, states }
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

fn summarize(log: &Log, policy: &Policy, options: &Options, run: &Run, restarts: u64) -> Summary {
    let mut s = Summary {
        seed: options.seed,
        policy: options.preset.as_str().to_owned(),
        instances: options.instances,
        seconds: options.duration.as_secs_f64(),
        data: options.data.display().to_string(),
        peer: if run.peer.is_some() { format!("built-in ({})", run.url) } else { run.url.clone() },
        engine_restarts: restarts,
        deletes: Latency::of(run.deletes.lock().map(|v| v.clone()).unwrap_or_default()),
        logouts: Latency::of(run.logouts.lock().map(|v| v.clone()).unwrap_or_default()),
        refused: run.refused.lock().map(|v| v.clone()).unwrap_or_default(),
        ..Summary::default()
    };
    let mut last: BTreeMap<String, State> = BTreeMap::new();
    for record in log.records().flatten() {
        if let Event::Transition { from, input, effects } = &record.event {
            s.transitions_total += 1;
            *s.transitions.entry(input.kind().as_str().to_owned()).or_default() += 1;
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
    for state in last.values() {
        *s.final_states.entry(state.kind().as_str().to_owned()).or_default() += 1;
    }
    let report = log.verify(policy);
    s.verification = Verification {
        clean: report.is_clean(),
        instances: report.instances,
        records: report.records,
        findings: report.findings.iter().map(ToString::to_string).collect(),
    };
    s
}
