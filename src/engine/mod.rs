//! The engine a host service embeds: a registry of named instances, each
//! driven by the pure core in its own task, each with a real connection,
//! every transition logged before it happens.
//!
//! ```no_run
//! use std::sync::Arc;
//! use instance_lifecycle::engine::{Engine, EngineConfig};
//! use instance_lifecycle::log::InstanceSpec;
//!
//! # async fn host() -> Result<(), instance_lifecycle::engine::EngineError> {
//! let engine = Engine::open("./lifecycle-data", EngineConfig::default()).await?;
//! let mut events = engine.subscribe();                   // → your webhooks
//! engine.create("customer-42", InstanceSpec { url: "wss://gateway.example/ws".into() }).await?;
//! engine.connect("customer-42").await?;
//! // …
//! engine.delete("customer-42").await?;                    // always reaches Removed (R2)
//! engine.shutdown().await?;
//! # Ok(()) }
//! ```

pub(crate) mod cleanup;
mod task;

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use serde::Serialize;
use tokio::sync::{broadcast, mpsc, oneshot, watch};

pub use cleanup::{Cleanup, NoCleanup, StepFuture};

use crate::log::{
    CompactionReport, Event, InstanceSpec, Log, LogConfig, LogError, Record, RecoveryMode, RecoveryOptions, Retention,
    resume_after_restart,
};
use crate::machine::{
    Effect, Input, InputKind, Instance, InstanceName, Intent, NameError, Policy, PolicyError, Rejection, State,
    StateKind, Timestamp,
};
use crate::transport::{ReferenceProtocol, Transport, WsLimits, WsTransport};
use task::{Channels, Msg, Task};

/// A host hook called after every transition, inside the instance's task.
/// A panic in it is caught and recorded (R10).
pub type TransitionHook = Arc<dyn Fn(&Notification) + Send + Sync>;

/// Engine configuration.
#[derive(Clone)]
pub struct EngineConfig {
    /// The rules' parameters.
    pub policy: Policy,
    /// The log's durability and sizes.
    pub log: LogConfig,
    /// How connections are made.
    pub transport: Arc<dyn Transport>,
    /// The host's cleanup steps for a delete.
    pub cleanup: Arc<dyn Cleanup>,
    /// Bound on each cleanup step: 10 s covers a slow database call; the
    /// whole cleanup is bounded by the policy's `timeouts.cleanup`.
    pub cleanup_step_timeout: Duration,
    /// Bound on `shutdown()`.
    pub shutdown_timeout: Duration,
    /// Notifications buffered per subscriber; a slower subscriber misses the
    /// oldest (it never blocks an instance).
    pub notifications_capacity: usize,
    /// Called after every transition.
    pub on_transition: Option<TransitionHook>,
    /// Set aside instances whose records cannot be decoded instead of failing to open.
    pub quarantine: bool,
    /// The wall-clock time at engine start; `None` reads the system clock. A
    /// fixed epoch with `tokio::time::pause` makes runs reproducible.
    pub epoch: Option<Timestamp>,
    /// Compacts the log periodically (on by default, so a long-running host's
    /// log stays bounded); `None` leaves it to the host ([`Engine::compact`]).
    pub compaction: Option<Compaction>,
}

/// The engine's periodic log compaction.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Compaction {
    /// What is kept (records per instance, how long removed instances stay).
    pub retention: Retention,
    /// How often, at least 1 s; the first run is one period after start.
    /// Hourly keeps the log near its retained size at negligible cost.
    pub every: Duration,
}

impl Default for Compaction {
    fn default() -> Self {
        Self { retention: Retention::default(), every: Duration::from_secs(3600) }
    }
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            policy: Policy::default(),
            log: LogConfig::default(),
            transport: Arc::new(WsTransport::new(Arc::new(ReferenceProtocol), WsLimits::default())),
            cleanup: Arc::new(NoCleanup),
            cleanup_step_timeout: Duration::from_secs(10),
            shutdown_timeout: Duration::from_secs(5),
            notifications_capacity: 1024,
            on_transition: None,
            quarantine: false,
            epoch: None,
            compaction: Some(Compaction::default()),
        }
    }
}

/// An error of the engine's API.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EngineError {
    /// The name is not a valid instance name.
    #[error("invalid instance name: {0}")]
    InvalidName(#[from] NameError),
    /// The URL is not a `ws://` or `wss://` URL.
    #[error("invalid url {url:?}: {reason}")]
    InvalidUrl {
        /// The URL given.
        url: String,
        /// What is wrong.
        reason: &'static str,
    },
    /// The policy is out of range.
    #[error("invalid policy: {0}")]
    Policy(#[from] PolicyError),
    /// A setting of the engine's configuration is out of range.
    #[error("invalid engine configuration: {field} {reason}")]
    InvalidConfig {
        /// The field.
        field: &'static str,
        /// What is wrong.
        reason: &'static str,
    },
    /// No instance has this name.
    #[error("unknown instance {name}")]
    UnknownInstance {
        /// The name.
        name: InstanceName,
    },
    /// An instance with this name exists.
    #[error("instance {name} already exists")]
    AlreadyExists {
        /// The name.
        name: InstanceName,
    },
    /// The instance was removed (R1): create it again to use the name.
    #[error("instance {name} was removed; create it again to reuse the name")]
    Removed {
        /// The name.
        name: InstanceName,
    },
    /// The instance is being logged out or deleted.
    #[error("instance {name} is closing ({intent:?}); wait until it is Closed")]
    Closing {
        /// The name.
        name: InstanceName,
        /// Why it is closing.
        intent: Intent,
    },
    /// The log failed: the transition did not happen (R8).
    #[error("log failure{}: {source}", instance.as_ref().map(|n| format!(" for instance {n}")).unwrap_or_default())]
    Log {
        /// The instance, if one was concerned.
        instance: Option<InstanceName>,
        /// The log's error.
        source: Box<LogError>,
    },
    /// A command did not complete in time (a bug: every wait is bounded by the policy).
    #[error("{command} of {name} did not complete within {waited:?}")]
    TimedOut {
        /// The name.
        name: InstanceName,
        /// The command.
        command: &'static str,
        /// How long it waited.
        waited: Duration,
    },
    /// The engine was shut down.
    #[error("the engine is shut down")]
    ShutDown,
    /// The instance's task stopped while handling the command (a caught
    /// panic, recorded in the log); the command may have been carried out in part.
    #[error("{command} of {name} was interrupted; see its history")]
    Interrupted {
        /// The name.
        name: InstanceName,
        /// The command.
        command: &'static str,
    },
}

impl EngineError {
    pub(crate) fn log(instance: Option<InstanceName>, source: LogError) -> Self {
        Self::Log { instance, source: Box::new(source) }
    }

    fn rejected(name: &InstanceName, r: Rejection) -> Self {
        match r {
            Rejection::Removed => Self::Removed { name: name.clone() },
            Rejection::Closing { intent } => Self::Closing { name: name.clone(), intent },
        }
    }
}

impl From<LogError> for EngineError {
    fn from(source: LogError) -> Self {
        Self::log(None, source)
    }
}

/// A transition, as subscribers see it (turn it into a webhook).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Notification {
    /// The instance.
    pub instance: InstanceName,
    /// The record's sequence number.
    pub seq: u64,
    /// When.
    pub at: Timestamp,
    /// What caused it.
    pub input: InputKind,
    /// The state kind before.
    pub from: StateKind,
    /// The state after.
    pub to: State,
}

/// An instance's current state and last sequence number.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct View {
    pub(crate) instance: Instance,
    pub(crate) seq: u64,
}

/// What every instance task shares.
pub(crate) struct Shared {
    pub(crate) log: Log,
    pub(crate) policy: Policy,
    pub(crate) transport: Arc<dyn Transport>,
    pub(crate) cleanup: Arc<dyn Cleanup>,
    pub(crate) cleanup_step_timeout: Duration,
    pub(crate) notifications: broadcast::Sender<Notification>,
    pub(crate) on_transition: Option<TransitionHook>,
    pub(crate) clock: Clock,
}

/// Wall-clock time from the tokio clock: a fixed epoch plus tokio's elapsed
/// time, so virtual time (`tokio::time::pause`) drives the core too.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Clock {
    epoch: Timestamp,
    start: tokio::time::Instant,
}

impl Clock {
    fn new(epoch: Option<Timestamp>) -> Self {
        let epoch = epoch.unwrap_or_else(|| {
            let since = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
            Timestamp(u64::try_from(since.as_millis()).unwrap_or(u64::MAX))
        });
        Self { epoch, start: tokio::time::Instant::now() }
    }

    pub(crate) fn now(&self) -> Timestamp {
        self.epoch.saturating_add(self.start.elapsed())
    }
}

enum Entry {
    /// Reserved by a `create` in progress.
    Creating,
    /// At rest (`Closed`, nothing in flight): no task, no channels — a fleet of
    /// idle instances costs only this entry. A command wakes it.
    Idle {
        view: View,
        spec: InstanceSpec,
    },
    /// Driven by its task; `token` tells this task's entry from a later one's.
    Live {
        commands: mpsc::Sender<Box<Msg>>,
        view: watch::Receiver<View>,
        task: tokio::task::JoinHandle<()>,
        token: u64,
    },
    Removed,
}

/// The registry of instances. Its lock is never held across an await.
#[derive(Default)]
pub(crate) struct Registry {
    entries: Mutex<HashMap<InstanceName, Entry>>,
}

impl Registry {
    fn lock(&self) -> MutexGuard<'_, HashMap<InstanceName, Entry>> {
        // Only our own short critical sections hold it; none can panic midway.
        self.entries.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub(crate) fn tombstone(&self, name: &InstanceName) {
        self.lock().insert(name.clone(), Entry::Removed);
    }

    /// Puts a resting instance back to `Idle` if its entry still belongs to
    /// the task holding `token`, and the task's inbox is empty. Returns
    /// whether it did; the task then ends.
    pub(crate) fn park(
        &self,
        name: &InstanceName,
        token: u64,
        view: View,
        spec: InstanceSpec,
        inbox_empty: impl Fn() -> bool,
    ) -> bool {
        let mut entries = self.lock();
        let ours = matches!(entries.get(name), Some(Entry::Live { token: t, .. }) if *t == token);
        if !ours || !inbox_empty() {
            return false;
        }
        entries.insert(name.clone(), Entry::Idle { view, spec });
        true
    }
}

/// Where a command went.
enum Delivery {
    /// The answer, without a task (unknown, removed).
    Answer(Result<State, EngineError>),
    /// Queued in the inbox of the task holding `token`, woken for it.
    Queued(u64),
    /// To be sent on the inbox of the live task holding `token`.
    Send(mpsc::Sender<Box<Msg>>, Box<Msg>, u64),
}

/// How often a command is sent again after racing a task that parked itself.
const PARK_RACE_RETRIES: usize = 8;

/// Host commands queued per instance: a host that sends more waits.
const COMMAND_CAPACITY: usize = 16;
/// Transport signals queued per instance.
const SIGNAL_CAPACITY: usize = 32;

/// The engine. Cheap to clone.
#[derive(Clone)]
pub struct Engine {
    shared: Arc<Shared>,
    registry: Arc<Registry>,
    shutdown_timeout: Duration,
    shut: Arc<std::sync::atomic::AtomicBool>,
}

impl Engine {
    /// Opens the engine on the log in `path`: restores every instance (R11),
    /// lets the rules decide about those that were not at rest, and starts them.
    pub async fn open(path: impl AsRef<Path>, config: EngineConfig) -> Result<Self, EngineError> {
        let path = path.as_ref().to_path_buf();
        let log_config = config.log.clone();
        let log = tokio::task::spawn_blocking(move || Log::open(path, log_config))
            .await
            .map_err(|e| EngineError::log(None, LogError::Failed(e.to_string())))??;
        Self::with_log(log, config).await
    }

    /// Starts the engine on an opened log (e.g. `Log::in_memory()` for simulation).
    pub async fn with_log(log: Log, config: EngineConfig) -> Result<Self, EngineError> {
        config.policy.validate()?;
        if config.compaction.as_ref().is_some_and(|c| c.every < Duration::from_secs(1)) {
            return Err(EngineError::InvalidConfig { field: "compaction.every", reason: "must be at least 1 s" });
        }
        let clock = Clock::new(config.epoch);
        let (notifications, _) = broadcast::channel(config.notifications_capacity.max(1));
        let shared = Arc::new(Shared {
            log: log.clone(),
            policy: config.policy.clone(),
            transport: config.transport.clone(),
            cleanup: config.cleanup.clone(),
            cleanup_step_timeout: config.cleanup_step_timeout,
            notifications,
            on_transition: config.on_transition.clone(),
            clock,
        });
        let (policy, quarantine, now) = (config.policy.clone(), config.quarantine, clock.now());
        let restored = tokio::task::spawn_blocking(move || -> Result<_, LogError> {
            log.set_policy(&policy)?;
            let mut recovery = log.recover(RecoveryOptions { mode: RecoveryMode::Fast, quarantine })?;
            for (name, error) in &recovery.quarantined {
                tracing::error!(instance = %name, %error, "instance quarantined: its records cannot be read");
            }
            let resumed = resume_after_restart(&log, &mut recovery, &policy, now)?;
            let mut out = Vec::new();
            for (name, r) in recovery.instances {
                let spec = log.spec(&name)?;
                let effects =
                    resumed.iter().find(|(n, _)| *n == name).map(|(_, t)| t.effects.clone()).unwrap_or_default();
                out.push((name, r.instance, r.seq, spec, effects));
            }
            Ok(out)
        })
        .await
        .map_err(|e| EngineError::log(None, LogError::Failed(e.to_string())))??;
        let engine = Self {
            shared,
            registry: Arc::new(Registry::default()),
            shutdown_timeout: config.shutdown_timeout,
            shut: Arc::default(),
        };
        for (name, instance, seq, spec, effects) in restored {
            let view = View { instance, seq };
            match (&view.instance.state, spec) {
                (State::Removed { .. }, _) => engine.registry.tombstone(&name),
                (State::Closed { .. }, Some(spec)) if effects.is_empty() => {
                    engine.registry.lock().insert(name, Entry::Idle { view, spec });
                }
                (_, Some(spec)) => {
                    let (entry, _) = engine.spawn(name.clone(), spec, view, effects, None);
                    engine.registry.lock().insert(name, entry);
                }
                (_, None) => tracing::error!(instance = %name, "no spec recorded; instance not started"),
            }
        }
        if let Some(compaction) = config.compaction {
            tokio::spawn(compact_periodically(
                Arc::downgrade(&engine.shared),
                Arc::downgrade(&engine.registry),
                engine.shut.clone(),
                compaction,
            ));
        }
        Ok(engine)
    }

    /// Spawns the task of an instance, with `first` already in its inbox (so a
    /// woken task cannot park before it has served the command that woke it);
    /// the caller puts the entry in the registry. Returns it with its token.
    fn spawn(
        &self,
        name: InstanceName,
        spec: InstanceSpec,
        view: View,
        effects: Vec<Effect>,
        first: Option<Box<Msg>>,
    ) -> (Entry, u64) {
        static TOKENS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        let token = TOKENS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let (commands_tx, commands) = mpsc::channel(COMMAND_CAPACITY);
        if let Some(msg) = first {
            // A new channel has room: this cannot fail.
            let _ = commands_tx.try_send(msg);
        }
        let (signals_tx, signals) = mpsc::channel(SIGNAL_CAPACITY);
        let (view_tx, view_rx) = watch::channel(view);
        let registry = Arc::downgrade(&self.registry);
        let task = Task::new(name, spec, view_tx, self.shared.clone(), registry, signals_tx, token);
        let handle = tokio::spawn(task.supervise(Channels { commands, signals }, effects));
        (Entry::Live { commands: commands_tx, view: view_rx, task: handle, token }, token)
    }

    /// Delivers a command: an idle instance is woken with it in its inbox; a
    /// live one's sender is returned for the caller to send on.
    fn deliver(&self, name: &InstanceName, input: &Input, msg: Box<Msg>) -> Delivery {
        let mut entries = self.registry.lock();
        match entries.get(name) {
            None | Some(Entry::Creating) => {
                return Delivery::Answer(Err(EngineError::UnknownInstance { name: name.clone() }));
            }
            Some(Entry::Removed) => return Delivery::Answer(removed_answer(name.clone(), input)),
            Some(Entry::Live { commands, token, .. }) => return Delivery::Send(commands.clone(), msg, *token),
            Some(Entry::Idle { .. }) => {}
        }
        // Idle: wake it, under the same lock.
        match entries.remove(name) {
            Some(Entry::Idle { view, spec }) => {
                let (entry, token) = self.spawn(name.clone(), spec, view, Vec::new(), Some(msg));
                entries.insert(name.clone(), entry);
                Delivery::Queued(token)
            }
            _ => Delivery::Answer(Err(EngineError::UnknownInstance { name: name.clone() })),
        }
    }

    fn check_open(&self) -> Result<(), EngineError> {
        if self.shut.load(std::sync::atomic::Ordering::SeqCst) { Err(EngineError::ShutDown) } else { Ok(()) }
    }

    /// Creates an instance (in `Closed`, not connected). A removed name can be
    /// created again, as a new instance.
    pub async fn create(&self, name: &str, spec: InstanceSpec) -> Result<(), EngineError> {
        self.check_open()?;
        let name = InstanceName::new(name)?;
        validate_url(&spec.url)?;
        let was_removed = {
            let mut entries = self.registry.lock();
            if matches!(entries.get(&name), Some(Entry::Live { .. } | Entry::Idle { .. } | Entry::Creating)) {
                return Err(EngineError::AlreadyExists { name });
            }
            matches!(entries.insert(name.clone(), Entry::Creating), Some(Entry::Removed))
        };
        let instance = Instance::new();
        // A compaction may purge the removed incarnation's records between
        // reading the next sequence number and appending: then read it again.
        let mut retried = false;
        let appended = loop {
            let seq = self.shared.log.next_seq(&name);
            let event = Event::Created { spec: spec.clone() };
            match self.shared.log.append_async(&name, seq, self.shared.clock.now(), event, &instance).await {
                Err(LogError::SequenceConflict { .. }) if !retried => retried = true,
                other => break other,
            }
        };
        match appended {
            Ok(a) => {
                // A new instance rests in Closed: no task until a command wakes it.
                self.registry.lock().insert(name, Entry::Idle { view: View { instance, seq: a.seq }, spec });
                Ok(())
            }
            Err(source) => {
                let mut entries = self.registry.lock();
                if was_removed {
                    entries.insert(name.clone(), Entry::Removed);
                } else {
                    entries.remove(&name);
                }
                Err(EngineError::log(Some(name), source))
            }
        }
    }

    /// Connects (or reconnects now). Returns once the attempt has started.
    pub async fn connect(&self, name: &str) -> Result<State, EngineError> {
        self.command(name, Input::Connect, "connect").await
    }

    /// Logs out; returns once the instance is `Closed` — within the logout and
    /// close time-outs, whatever the socket does (R5).
    pub async fn logout(&self, name: &str) -> Result<State, EngineError> {
        self.command(name, Input::Logout, "logout").await
    }

    /// Drops the connection, if any, and starts a fresh attempt.
    pub async fn restart(&self, name: &str) -> Result<State, EngineError> {
        self.command(name, Input::Restart, "restart").await
    }

    /// Deletes; returns once the instance is `Removed` — within the logout,
    /// close and cleanup time-outs, whatever the socket does (R2). Deleting a
    /// removed instance returns the same success and does nothing.
    pub async fn delete(&self, name: &str) -> Result<State, EngineError> {
        self.command(name, Input::Delete, "delete").await
    }

    fn command_bound(&self) -> Duration {
        let t = &self.shared.policy.timeouts;
        // Every wait the command can cause, plus slack for a loaded host.
        t.logout + t.close + t.cleanup + t.connect + Duration::from_secs(5)
    }

    async fn command(&self, name: &str, input: Input, command: &'static str) -> Result<State, EngineError> {
        self.check_open()?;
        let name = InstanceName::new(name)?;
        let waited = self.command_bound();
        // A task that parks itself (goes idle) drops messages it never read;
        // such a command was not carried out, so it is sent again, to a task
        // woken for it. Parking needs an empty inbox, so this ends quickly.
        // A command whose handling panicked is answered `Interrupted` by its
        // task once the panic is recorded; a reply dropped by a task that is
        // still the instance's running task is treated the same way.
        for _ in 0..PARK_RACE_RETRIES {
            let (reply, answer) = oneshot::channel();
            let msg = Box::new(Msg::Command { input: input.clone(), command, reply });
            let token = match self.deliver(&name, &input, msg) {
                Delivery::Answer(answer) => return answer,
                Delivery::Queued(token) => token,
                Delivery::Send(sender, msg, token) => {
                    if sender.send(msg).await.is_err() {
                        self.check_open()?;
                        continue;
                    }
                    token
                }
            };
            match tokio::time::timeout(waited, answer).await {
                Ok(Ok(result)) => return result,
                Ok(Err(_)) => {
                    self.check_open()?;
                    match self.registry.lock().get(&name) {
                        Some(Entry::Removed) => return removed_answer(name, &input),
                        Some(Entry::Live { token: t, task, .. }) if *t == token && !task.is_finished() => {
                            return Err(EngineError::Interrupted { name, command });
                        }
                        _ => continue,
                    }
                }
                Err(_) => return Err(EngineError::TimedOut { name, command, waited }),
            }
        }
        Err(EngineError::Interrupted { name, command })
    }

    /// The current state of an instance.
    pub fn state(&self, name: &str) -> Result<State, EngineError> {
        let name = InstanceName::new(name)?;
        match self.registry.lock().get(&name) {
            Some(Entry::Live { view, .. }) => Ok(view.borrow().instance.state.clone()),
            Some(Entry::Idle { view, .. }) => Ok(view.instance.state.clone()),
            Some(Entry::Removed) => Err(EngineError::Removed { name }),
            None | Some(Entry::Creating) => Err(EngineError::UnknownInstance { name }),
        }
    }

    /// Every instance that is not removed, with its state, by name.
    pub fn list(&self) -> Vec<(InstanceName, State)> {
        let mut out: Vec<_> = self
            .registry
            .lock()
            .iter()
            .filter_map(|(n, e)| match e {
                Entry::Live { view, .. } => Some((n.clone(), view.borrow().instance.state.clone())),
                Entry::Idle { view, .. } => Some((n.clone(), view.instance.state.clone())),
                Entry::Creating | Entry::Removed => None,
            })
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    /// How many instances have a running task. An instance at rest (`Closed`,
    /// nothing in flight) has none: it wakes when a command arrives. A host
    /// can watch this to see that idle customers cost no task.
    pub fn running(&self) -> usize {
        self.registry.lock().values().filter(|e| matches!(e, Entry::Live { task, .. } if !task.is_finished())).count()
    }

    /// An instance's recorded history (also for removed instances, until
    /// compaction purges them: then the name is unknown).
    pub async fn history(&self, name: &str) -> Result<Vec<Record>, EngineError> {
        let name = InstanceName::new(name)?;
        let log = self.shared.log.clone();
        let (n, history) = tokio::task::spawn_blocking(move || {
            let h = log.history(&name);
            (name, h)
        })
        .await
        .map_err(|e| EngineError::log(None, LogError::Failed(e.to_string())))?;
        let history = history.map_err(|source| EngineError::log(Some(n.clone()), source))?;
        if history.is_empty() { Err(EngineError::UnknownInstance { name: n }) } else { Ok(history) }
    }

    /// A stream of transitions, for webhooks. A subscriber that falls more than
    /// `notifications_capacity` behind misses the oldest (and is told so).
    pub fn subscribe(&self) -> broadcast::Receiver<Notification> {
        self.shared.notifications.subscribe()
    }

    /// Compacts the log now (see [`Log::compact`]): old records of each
    /// instance become a snapshot, and removed instances past
    /// `retention.removed_after` are purged — their names are then unknown,
    /// not `Removed`. Safe while instances run.
    pub async fn compact(&self, retention: &Retention) -> Result<CompactionReport, EngineError> {
        compact(&self.shared, &self.registry, retention.clone()).await
    }

    /// The log the engine writes.
    pub fn log(&self) -> &Log {
        &self.shared.log
    }

    /// The policy the engine runs.
    pub fn policy(&self) -> &Policy {
        &self.shared.policy
    }

    /// Stops every instance (sockets dropped, recorded states kept: the next
    /// open recovers them), waits at most `shutdown_timeout`, and syncs the log.
    /// Later commands fail with [`EngineError::ShutDown`]. The log stays open
    /// until the last clone of the engine is dropped.
    pub async fn shutdown(&self) -> Result<(), EngineError> {
        if self.shut.swap(true, std::sync::atomic::Ordering::SeqCst) {
            return Ok(());
        }
        let mut live: Vec<_> = self
            .registry
            .lock()
            .drain()
            .filter_map(|(_, e)| match e {
                Entry::Live { commands, task, .. } => Some((commands, Some(task))),
                Entry::Creating | Entry::Idle { .. } | Entry::Removed => None,
            })
            .collect();
        let stop = async {
            for (commands, _) in &live {
                // The task answers by ending; its reply channel is not needed.
                let (done, _) = oneshot::channel();
                let _ = commands.send(Box::new(Msg::Shutdown(done))).await;
            }
            for (_, task) in &mut live {
                if let Some(t) = task.as_mut() {
                    let _ = t.await;
                    *task = None;
                }
            }
        };
        if tokio::time::timeout(self.shutdown_timeout, stop).await.is_err() {
            // Past the bound (a task stuck in a slow append): stop them where they are.
            // Their records are in the log or not; recovery reads what is there.
            tracing::warn!(bound = ?self.shutdown_timeout, "shutdown bound reached; aborting the tasks still running");
        }
        // Every task has ended (or been aborted) before shutdown returns: none writes after it.
        for task in live.into_iter().filter_map(|(_, t)| t) {
            task.abort();
            let _ = task.await;
        }
        let log = self.shared.log.clone();
        tokio::task::spawn_blocking(move || log.sync())
            .await
            .map_err(|e| EngineError::log(None, LogError::Failed(e.to_string())))??;
        Ok(())
    }
}

async fn compact(shared: &Shared, registry: &Registry, retention: Retention) -> Result<CompactionReport, EngineError> {
    let (log, now) = (shared.log.clone(), shared.clock.now());
    let report = tokio::task::spawn_blocking(move || log.compact(now, &retention))
        .await
        .map_err(|e| EngineError::log(None, LogError::Failed(e.to_string())))?
        .map_err(|e| EngineError::log(None, e))?;
    // A purged instance leaves no tombstone behind: churn of names costs nothing forever.
    let mut entries = registry.lock();
    for name in &report.purged {
        if matches!(entries.get(name), Some(Entry::Removed)) {
            entries.remove(name);
        }
    }
    Ok(report)
}

/// The engine's compaction task: holds the engine only while it compacts, so
/// dropping every clone of the engine (or shutting it down) ends it.
async fn compact_periodically(
    shared: std::sync::Weak<Shared>,
    registry: std::sync::Weak<Registry>,
    shut: Arc<std::sync::atomic::AtomicBool>,
    compaction: Compaction,
) {
    let start = tokio::time::Instant::now() + compaction.every;
    let mut ticks = tokio::time::interval_at(start, compaction.every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        let (Some(shared), Some(registry)) = (shared.upgrade(), registry.upgrade()) else { return };
        if shut.load(std::sync::atomic::Ordering::SeqCst) {
            return;
        }
        match compact(&shared, &registry, compaction.retention.clone()).await {
            Ok(r) => tracing::info!(
                snapshotted = r.snapshotted,
                records_deleted = r.records_deleted,
                purged = r.purged.len(),
                "log compacted"
            ),
            Err(e) => tracing::error!(error = %e, "log compaction failed; trying again next period"),
        }
    }
}

fn removed_answer(name: InstanceName, input: &Input) -> Result<State, EngineError> {
    match input {
        // R2: deleting twice is the same success, and does nothing.
        Input::Delete => Ok(State::Removed { cleanup: crate::machine::CleanupOutcome::Finished { steps: Vec::new() } }),
        _ => Err(EngineError::Removed { name }),
    }
}

/// Longest URL accepted.
const URL_LEN_MAX: usize = 2048;

pub(crate) fn validate_url(url: &str) -> Result<(), EngineError> {
    let bad = |reason| Err(EngineError::InvalidUrl { url: url.chars().take(URL_LEN_MAX).collect(), reason });
    if url.len() > URL_LEN_MAX {
        return bad("longer than 2048 bytes");
    }
    let Some(rest) = url.strip_prefix("ws://").or_else(|| url.strip_prefix("wss://")) else {
        return bad("must start with ws:// or wss://");
    };
    if rest.is_empty() || rest.starts_with('/') {
        return bad("has no host");
    }
    if url.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return bad("contains whitespace or control characters");
    }
    Ok(())
}
