//! The engine a host service embeds: a registry of named instances, each
//! driven by the pure core through its sans-IO driver in its own task, each
//! with a real connection, every transition logged before it happens.
//!
//! ```no_run
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
//!
//! Layout: `config` (the settings), `error`, `shared` (what tasks share, the
//! clock, notifications), `registry` (entries and inboxes; parking without
//! races), `task` (the async loop around a driver), `cleanup` (the host's
//! steps of a delete), `compaction`; this file is the host's API.

mod cleanup;
mod compaction;
mod config;
mod error;
mod fence;
mod registry;
mod shared;
mod signal;
mod task;

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::sync::{broadcast, mpsc, oneshot, watch};

pub use cleanup::{Cleanup, NoCleanup, StepFuture};
pub use config::{Compaction, EngineConfig};
pub use error::EngineError;
pub use fence::{Fence, FenceFuture, Offered, Refused};
pub use shared::{Notification, TrafficStats, TransitionHook};
pub use signal::{SignalOutcome, Signaled};

use crate::log::{
    CompactionReport, Event, InstanceSpec, Log, LogError, Record, RecoveryMode, RecoveryOptions, Retention,
};
use crate::machine::{Driver, Effect, Ignored, Input, Instance, InstanceName, Outcome, Policy, State, Timestamp, step};
use crate::transport::{Endpoint, Frame, Inbound};
use registry::{Carrier, Entry, Msg, Registry, View};
use shared::{Clock, Shared};
use task::{Channels, Start, Task};

/// Transport signals queued per instance.
const SIGNAL_CAPACITY: usize = 32;

/// A host command, as a value (what a cluster host forwards to the owner).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Command {
    /// Connect (or reconnect now).
    Connect,
    /// Log out (ends `Closed`, R5).
    Logout,
    /// Drop the connection and start a fresh attempt.
    Restart,
    /// Delete (ends `Removed`, R2).
    Delete,
}

impl Command {
    /// The engine's input for it.
    pub fn input(self) -> Input {
        match self {
            Self::Connect => Input::Connect,
            Self::Logout => Input::Logout,
            Self::Restart => Input::Restart,
            Self::Delete => Input::Delete,
        }
    }

    /// Its name (`connect`, …).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Connect => "connect",
            Self::Logout => "logout",
            Self::Restart => "restart",
            Self::Delete => "delete",
        }
    }
}

/// The engine. Cheap to clone.
#[derive(Clone)]
pub struct Engine {
    shared: Arc<Shared>,
    registry: Arc<Registry>,
    shutdown_timeout: Duration,
    shut: Arc<AtomicBool>,
}

/// An instance restored at start-up: its driver after recovery, and what recovery asked for.
struct Restored {
    driver: Driver,
    spec: Option<InstanceSpec>,
    effects: Vec<Effect>,
}

/// A signal in an instance's inbox ([`Engine::deliver_signal`]): what the rules make of it, to wait for.
pub struct SignalAnswer(Answer);

enum Answer {
    Ready(Box<Signaled>),
    Queued { engine: Engine, name: InstanceName, answer: oneshot::Receiver<Result<Signaled, EngineError>> },
}

impl SignalAnswer {
    /// Waits (within the command bound) for what the rules made of the signal.
    pub async fn answer(self) -> Result<Signaled, EngineError> {
        match self.0 {
            Answer::Ready(signaled) => Ok(*signaled),
            Answer::Queued { engine, name, answer } => engine.answer(name, "signal", answer).await,
        }
    }
}

/// Where a command went.
enum Delivery {
    /// Answered without a task: the table ignored the input at rest (the
    /// instance as it rests, and why), or an error (an unknown name, a rejection).
    Answered(Result<(Instance, Ignored), EngineError>),
    /// In the inbox of the live task (woken for it if it was at rest).
    Queued,
    /// The live task's inbox is full: wait for room on it, then deliver again.
    Full { inbox: mpsc::Sender<Box<Msg>>, token: u64, msg: Box<Msg> },
}

impl Engine {
    /// Opens the engine on the log in `path`: restores every instance (R11),
    /// lets the rules decide about those that were not at rest, and starts them.
    /// A log that lost records is refused (`LogError::Damaged` inside
    /// [`EngineError::Log`]) unless `config.log.accept_loss` is set.
    pub async fn open(path: impl AsRef<Path>, config: EngineConfig) -> Result<Self, EngineError> {
        let path = path.as_ref().to_path_buf();
        let log_config = config.log.clone();
        let log =
            tokio::task::spawn_blocking(move || Log::open(path, log_config)).await.map_err(EngineError::join)??;
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
        if config.send_queue == 0 {
            return Err(EngineError::InvalidConfig { field: "send_queue", reason: "must be at least 1" });
        }
        if config.send_budget.is_some_and(|b| b.frames == 0 || b.per.is_zero()) {
            return Err(EngineError::InvalidConfig { field: "send_budget", reason: "needs frames > 0 and per > 0" });
        }
        let (frames, _) = broadcast::channel(config.frames_capacity.max(1));
        let traffic = shared::Traffic {
            frames,
            send_queue: config.send_queue,
            send_budget: config.send_budget,
            sent: Default::default(),
            refused: Default::default(),
            received: Default::default(),
        };
        let shared = Arc::new(Shared {
            log: log.clone(),
            policy: config.policy.clone(),
            transport: config.transport.clone(),
            cleanup: config.cleanup.clone(),
            cleanup_step_timeout: config.cleanup_step_timeout,
            notifications,
            on_transition: config.on_transition.clone(),
            clock,
            fence: config.fence.clone(),
            traffic,
        });
        let (policy, quarantine, now) = (config.policy.clone(), config.quarantine, clock.now());
        let restored = tokio::task::spawn_blocking(move || restore(&log, &policy, quarantine, now))
            .await
            .map_err(EngineError::join)??;
        let engine = Self {
            shared,
            registry: Arc::new(Registry::default()),
            shutdown_timeout: config.shutdown_timeout,
            shut: Arc::default(),
        };
        for Restored { driver, spec, effects } in restored {
            let name = driver.name().clone();
            let view = View { instance: driver.instance().clone(), seq: driver.seq() };
            let entry = match (driver.state(), spec) {
                (State::Removed { .. }, _) => Entry::Removed { view },
                (State::Closed { .. }, Some(spec)) if effects.is_empty() => Entry::Idle { view, spec },
                (_, Some(spec)) => engine.spawn(driver, spec, effects, None),
                (_, None) => {
                    tracing::error!(instance = %name, "no spec recorded; instance not started");
                    continue;
                }
            };
            engine.registry.lock().insert(name, entry);
        }
        if let Some(compaction) = config.compaction {
            tokio::spawn(compaction::periodically(
                Arc::downgrade(&engine.shared),
                Arc::downgrade(&engine.registry),
                engine.shut.clone(),
                compaction,
            ));
        }
        Ok(engine)
    }

    /// Spawns the task of an instance, with `first` already in its inbox (so a
    /// woken task cannot park before it has served the command that woke it).
    fn spawn(&self, driver: Driver, spec: InstanceSpec, effects: Vec<Effect>, first: Option<Box<Msg>>) -> Entry {
        static TOKENS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        let token = TOKENS.fetch_add(1, Ordering::Relaxed);
        let (inbox_tx, inbox) = mpsc::channel(registry::COMMAND_CAPACITY);
        if let Some(msg) = first {
            // A new channel has room: this cannot fail.
            let _ = inbox_tx.try_send(msg);
        }
        let (signals_tx, signals) = mpsc::channel(SIGNAL_CAPACITY);
        let (view_tx, view) = watch::channel(View { instance: driver.instance().clone(), seq: driver.seq() });
        let carrier = registry::CarrierSlot::default();
        let start = Start {
            carrier: carrier.clone(),
            driver,
            spec,
            view: view_tx,
            shared: self.shared.clone(),
            registry: Arc::downgrade(&self.registry),
            signals_tx,
            token,
        };
        let task = tokio::spawn(Task::new(start).supervise(Channels { inbox, signals }, effects));
        Entry::Live { inbox: inbox_tx, view, task, token, carrier }
    }

    /// Delivers a command. At rest (idle or removed) the table answers, and
    /// only a command that moves the instance wakes a task for it.
    fn deliver(&self, name: &InstanceName, msg: Box<Msg>) -> Delivery {
        let mut entries = self.registry.lock();
        let Some(input) = msg.input() else { return Delivery::Answered(Err(EngineError::ShutDown)) };
        match entries.get(name) {
            None | Some(Entry::Creating) => {
                Delivery::Answered(Err(EngineError::UnknownInstance { name: name.clone() }))
            }
            Some(Entry::Idle { view, .. } | Entry::Removed { view }) => {
                match at_rest(name, &view.instance, input, &self.shared.policy, self.shared.clock.now()) {
                    Some(answer) => Delivery::Answered(answer),
                    None => match entries.remove(name) {
                        Some(Entry::Idle { view, spec }) => {
                            let driver = Driver::restored(name.clone(), view.instance, view.seq);
                            let entry = self.spawn(driver, spec, Vec::new(), Some(msg));
                            entries.insert(name.clone(), entry);
                            Delivery::Queued
                        }
                        // R1: nothing moves a removed instance; the table never gets here.
                        Some(removed) => {
                            entries.insert(name.clone(), removed);
                            Delivery::Answered(Err(EngineError::Removed { name: name.clone() }))
                        }
                        None => Delivery::Answered(Err(EngineError::UnknownInstance { name: name.clone() })),
                    },
                }
            }
            Some(Entry::Live { inbox, token, view, .. }) => match inbox.try_send(msg) {
                Ok(()) => Delivery::Queued,
                Err(mpsc::error::TrySendError::Full(msg)) => {
                    Delivery::Full { inbox: inbox.clone(), token: *token, msg }
                }
                Err(mpsc::error::TrySendError::Closed(msg)) => {
                    // The task ended without leaving its entry (it could not record a
                    // panic): the instance rests as last recorded and the command wakes it.
                    let view = view.borrow().clone();
                    let spec = self.shared.log.spec(name).ok().flatten();
                    match spec {
                        Some(spec) => {
                            entries.insert(name.clone(), Entry::Idle { view, spec });
                            drop(entries);
                            self.deliver(name, msg)
                        }
                        None => {
                            Delivery::Answered(Err(EngineError::Interrupted { name: name.clone(), command: "command" }))
                        }
                    }
                }
            },
        }
    }

    fn check_open(&self) -> Result<(), EngineError> {
        if self.shut.load(Ordering::SeqCst) { Err(EngineError::ShutDown) } else { Ok(()) }
    }

    /// Creates an instance (in `Closed`, not connected). A removed name can be
    /// created again, as a new instance.
    pub async fn create(&self, name: &str, spec: InstanceSpec) -> Result<(), EngineError> {
        self.create_with_token(name, spec, None).await
    }

    /// [`Engine::create`], with the digest of the instance's own API token
    /// committed in its `Created` record — one commit for both, and the
    /// token in the chain (`lifecycle serve` creates this way). The log
    /// keeps the digest beside the spec ([`crate::log::Log::tokens`]) until
    /// the instance is created again or purged.
    pub async fn create_with_token(
        &self,
        name: &str,
        spec: InstanceSpec,
        token: Option<crate::log::Digest>,
    ) -> Result<(), EngineError> {
        self.check_open()?;
        let name = InstanceName::new(name)?;
        Endpoint::parse(&spec.url)?;
        let previous = {
            let mut entries = self.registry.lock();
            if matches!(entries.get(&name), Some(Entry::Live { .. } | Entry::Idle { .. } | Entry::Creating)) {
                return Err(EngineError::AlreadyExists { name });
            }
            entries.insert(name.clone(), Entry::Creating)
        };
        let instance = Instance::new();
        // A compaction may purge the removed incarnation's records between
        // reading the next sequence number and appending: then read it again.
        let mut retried = false;
        let appended = loop {
            let seq = self.shared.log.next_seq(&name);
            let event = Event::Created { spec: spec.clone(), token };
            match self.shared.append(&name, seq, self.shared.clock.now(), event, &instance).await {
                Err(LogError::SequenceConflict { .. }) if !retried => retried = true,
                other => break other,
            }
        };
        let mut entries = self.registry.lock();
        match appended {
            Ok(a) => {
                // A new instance rests in Closed: no task until a command wakes it.
                entries.insert(name, Entry::Idle { view: View { instance, seq: a.seq }, spec });
                Ok(())
            }
            Err(source) => {
                match previous {
                    Some(removed @ Entry::Removed { .. }) => entries.insert(name.clone(), removed),
                    _ => entries.remove(&name),
                };
                Err(EngineError::log(Some(name), source))
            }
        }
    }

    /// Takes in an instance whose history lives in the log of record (a
    /// cluster's stream) and that this host now owns: `to` at `seq` is its
    /// last recorded state. The local log gets a snapshot of it (replacing
    /// what it held for the name), and the rules decide as at start-up
    /// (R11): an instance that was not at rest is fed `Recovered` — through
    /// the fence — and started; `Closed` stays closed, `Removed` removed.
    /// `anchor` is the digest of what the snapshot stands for (the stream
    /// entry it was taken from); the next local record chains to it.
    /// Returns the state it is in afterwards.
    pub async fn adopt(
        &self,
        name: &str,
        spec: InstanceSpec,
        to: Instance,
        seq: u64,
        anchor: crate::log::Digest,
    ) -> Result<State, EngineError> {
        self.check_open()?;
        let name = InstanceName::new(name)?;
        {
            let mut entries = self.registry.lock();
            if matches!(entries.get(&name), Some(Entry::Live { .. } | Entry::Idle { .. } | Entry::Creating)) {
                return Err(EngineError::AlreadyExists { name });
            }
            entries.insert(name.clone(), Entry::Creating);
        }
        let adopted = self.adopt_in(&name, spec, to, seq, anchor).await;
        let mut entries = self.registry.lock();
        match adopted {
            Ok((entry, state)) => {
                entries.insert(name, entry);
                Ok(state)
            }
            Err(e) => {
                entries.remove(&name);
                Err(e)
            }
        }
    }

    async fn adopt_in(
        &self,
        name: &InstanceName,
        spec: InstanceSpec,
        to: Instance,
        seq: u64,
        anchor: crate::log::Digest,
    ) -> Result<(Entry, State), EngineError> {
        let shared = &self.shared;
        let now = shared.clock.now();
        let fail = |source| EngineError::log(Some(name.clone()), source);
        shared.log.import(name, seq, now, spec.clone(), &to, anchor).await.map_err(fail)?;
        let mut driver = Driver::restored(name.clone(), to, seq);
        let view = |d: &Driver| View { instance: d.instance().clone(), seq: d.seq() };
        match driver.state() {
            State::Removed { .. } => {
                let state = driver.state().clone();
                Ok((Entry::Removed { view: view(&driver) }, state))
            }
            State::Closed { .. } => {
                let state = driver.state().clone();
                Ok((Entry::Idle { view: view(&driver), spec }, state))
            }
            _ => {
                let record = async |p: &crate::machine::Pending| {
                    shared.append(name, p.seq, p.at, Event::of(p), &p.to).await.map(|a| a.seq)
                };
                let fed = driver.feed(&shared.policy, Input::Recovered, now, record).await.map_err(fail)?;
                let effects: Vec<Effect> = fed.io().cloned().collect();
                let state = driver.state().clone();
                Ok((self.spawn(driver, spec, effects, None), state))
            }
        }
    }

    /// Lets go of an instance at once, without recording anything: its task
    /// and its socket are dropped and the engine forgets it (another host
    /// owns it now, or this host's lease on it ran out). Returns whether the
    /// engine had it.
    pub fn relinquish(&self, name: &InstanceName) -> bool {
        let entry = self.registry.lock().remove(name);
        if let Some(Entry::Live { task, .. }) = &entry {
            // The task owns the connection; dropping it (abort) drops the socket.
            task.abort();
        }
        entry.is_some()
    }

    /// Connects (or reconnects now). Returns once the attempt has started.
    pub async fn connect(&self, name: &str) -> Result<State, EngineError> {
        self.command(name, Command::Connect).await
    }

    /// Logs out; returns once the instance is `Closed` — within the logout and
    /// close time-outs, whatever the socket does (R5).
    pub async fn logout(&self, name: &str) -> Result<State, EngineError> {
        self.command(name, Command::Logout).await
    }

    /// Drops the connection, if any, and starts a fresh attempt.
    pub async fn restart(&self, name: &str) -> Result<State, EngineError> {
        self.command(name, Command::Restart).await
    }

    /// Deletes; returns once the instance is `Removed` — within the logout,
    /// close and cleanup time-outs, whatever the socket does (R2). Deleting a
    /// removed instance returns its recorded `Removed` state and does nothing.
    pub async fn delete(&self, name: &str) -> Result<State, EngineError> {
        self.command(name, Command::Delete).await
    }

    /// The longest a command can take: every wait it can cause (logout,
    /// close, clean-up, connect) plus slack for a loaded host. A service
    /// puts its request time-out above it.
    pub fn command_bound(&self) -> Duration {
        let t = &self.shared.policy.timeouts;
        // Every wait the command can cause, plus slack for a loaded host.
        t.logout + t.close + t.cleanup + t.connect + Duration::from_secs(5)
    }

    /// Runs a host command: [`Engine::connect`], [`Engine::logout`],
    /// [`Engine::restart`] or [`Engine::delete`], named by a value.
    pub async fn command(&self, name: &str, command: Command) -> Result<State, EngineError> {
        self.check_open()?;
        let name = InstanceName::new(name)?;
        let (reply, answer) = oneshot::channel();
        let msg = Msg::Command { input: command.input(), command: command.as_str(), reply };
        if let Some((instance, _)) = self.post(&name, Box::new(msg)).await? {
            return Ok(instance.state);
        }
        self.answer(name, command.as_str(), answer).await
    }

    /// Reports a signal of a connection the host holds itself (an instance
    /// created with [`Endpoint::EXTERNAL`]): the connection with `generation`
    /// opened, closed, failed a write, answered a ping, finished a logout.
    /// The rules decide as for the engine's own transports — a signal of an
    /// older generation is ignored (R12) — and the answer says what they
    /// did: the transition and its effects, which the host carries out for
    /// its connection. Host commands, timers and runtime events are not
    /// signals ([`EngineError::NotASignal`]).
    pub async fn signal(&self, name: &str, input: Input) -> Result<Signaled, EngineError> {
        self.deliver_signal(name, input).await?.answer().await
    }

    /// [`Engine::signal`] in two steps, for a host that reports signals in
    /// order from one place (the Node package): this returns once the
    /// signal is in the instance's inbox (or answered at rest), and
    /// [`SignalAnswer::answer`] waits for what the rules made of it. Signals
    /// delivered one after the other are applied in that order, however
    /// their answers are awaited.
    pub async fn deliver_signal(&self, name: &str, input: Input) -> Result<SignalAnswer, EngineError> {
        self.check_open()?;
        let name = InstanceName::new(name)?;
        if !signal::is_reportable(&input) {
            return Err(EngineError::NotASignal { name, input: input.kind() });
        }
        let (reply, answer) = oneshot::channel();
        if let Some((instance, reason)) = self.post(&name, Box::new(Msg::Signal { input, reply })).await? {
            return Ok(SignalAnswer(Answer::Ready(Box::new(Signaled::ignored(&instance, reason)))));
        }
        Ok(SignalAnswer(Answer::Queued { engine: self.clone(), name, answer }))
    }

    /// Puts a command or signal in the instance's inbox (waking it if it
    /// rests and the input moves it). `Some` when the table ignored it at rest.
    async fn post(&self, name: &InstanceName, mut msg: Box<Msg>) -> Result<Option<(Instance, Ignored)>, EngineError> {
        loop {
            match self.deliver(name, msg) {
                Delivery::Answered(result) => return result.map(Some),
                Delivery::Queued => return Ok(None),
                Delivery::Full { inbox, token, msg: back } => {
                    msg = back;
                    // Wait for room, then put it in under the lock if the task is still the one we waited for.
                    let Ok(permit) = inbox.reserve_owned().await else { continue };
                    let entries = self.registry.lock();
                    if matches!(entries.get(name), Some(Entry::Live { token: t, .. }) if *t == token) {
                        permit.send(msg);
                        return Ok(None);
                    }
                }
            }
        }
    }

    /// Waits for the task's answer to a queued command or signal, within the command bound.
    async fn answer<T>(
        &self,
        name: InstanceName,
        command: &'static str,
        answer: oneshot::Receiver<Result<T, EngineError>>,
    ) -> Result<T, EngineError> {
        let waited = self.command_bound();
        match tokio::time::timeout(waited, answer).await {
            Ok(Ok(result)) => result,
            // The task ended without answering: it was stopped (shutdown) or could not go on.
            Ok(Err(_)) => {
                self.check_open()?;
                Err(EngineError::Interrupted { name, command })
            }
            Err(_) => Err(EngineError::TimedOut { name, command, waited }),
        }
    }

    /// The current state of an instance.
    pub fn state(&self, name: &str) -> Result<State, EngineError> {
        let name = InstanceName::new(name)?;
        match self.registry.lock().get(&name) {
            Some(Entry::Removed { .. }) => Err(EngineError::Removed { name }),
            Some(entry) => entry.state().ok_or(EngineError::UnknownInstance { name }),
            None => Err(EngineError::UnknownInstance { name }),
        }
    }

    /// Every instance that is not removed, with its state, by name.
    pub fn list(&self) -> Vec<(InstanceName, State)> {
        let mut out: Vec<_> = self
            .registry
            .lock()
            .iter()
            .filter(|(_, e)| !matches!(e, Entry::Removed { .. }))
            .filter_map(|(n, e)| Some((n.clone(), e.state()?)))
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
        .map_err(EngineError::join)?;
        let history = history.map_err(|source| EngineError::log(Some(n.clone()), source))?;
        if history.is_empty() { Err(EngineError::UnknownInstance { name: n }) } else { Ok(history) }
    }

    /// Sends an application frame on the instance's connection: queued in
    /// order behind the frames sent before it and written by the connection's
    /// task (a failed write is a `WriteFailed` signal, as any write's). Only an
    /// `Open` instance takes frames; the answer never waits on the socket.
    ///
    /// Errors: [`EngineError::NotOpen`] with the state it is in,
    /// [`EngineError::SendQueueFull`], [`EngineError::RateLimited`] with when
    /// to retry (`EngineConfig::send_budget`), [`EngineError::HostDriven`]
    /// for an `external:` instance (the host holds that socket), and the
    /// usual unknown, removed and invalid names.
    pub fn send(&self, name: &str, frame: Frame) -> Result<(), EngineError> {
        let name = InstanceName::new(name)?;
        let traffic = &self.shared.traffic;
        let result = self.queue(&name, frame);
        let counter = if result.is_ok() { &traffic.sent } else { &traffic.refused };
        counter.fetch_add(1, Ordering::Relaxed);
        result
    }

    fn queue(&self, name: &InstanceName, frame: Frame) -> Result<(), EngineError> {
        use crate::transport::Refused;
        let not_open = |state: &State| EngineError::NotOpen { name: name.clone(), state: state.kind() };
        let outlet = {
            let entries = self.registry.lock();
            let (view, carrier) = match entries.get(name) {
                None | Some(Entry::Creating) => return Err(EngineError::UnknownInstance { name: name.clone() }),
                Some(Entry::Removed { .. }) => return Err(EngineError::Removed { name: name.clone() }),
                Some(Entry::Idle { view, .. }) => return Err(not_open(&view.instance.state)),
                Some(Entry::Live { view, carrier, .. }) => (view.borrow().instance.clone(), carrier.clone()),
            };
            drop(entries);
            if !matches!(view.state, State::Open { .. }) {
                return Err(not_open(&view.state));
            }
            let carrier = carrier.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone();
            match carrier {
                Some(Carrier::Engine(outlet)) if outlet.generation == view.generation => outlet,
                Some(Carrier::Host) => return Err(EngineError::HostDriven { name: name.clone() }),
                // Open, but its connection already ended: its end is on its way.
                _ => return Err(EngineError::ConnectionEnded { name: name.clone() }),
            }
        };
        outlet.send(frame).map_err(|refused| match refused {
            Refused::Full { capacity } => EngineError::SendQueueFull { name: name.clone(), capacity },
            Refused::Budget { retry_after } => EngineError::RateLimited { name: name.clone(), retry_after },
            Refused::Ended => EngineError::ConnectionEnded { name: name.clone() },
        })
    }

    /// A subscription to the application frames every instance's connection
    /// receives, in order per connection, each with its instance and
    /// generation. A subscriber that falls more than
    /// `EngineConfig::frames_capacity` behind misses the oldest and is told
    /// how many; it never slows a socket. Frames are traffic: never logged.
    pub fn frames(&self) -> Inbound {
        Inbound::new(self.shared.traffic.frames.subscribe())
    }

    /// Application frames sent and refused since the engine started.
    pub fn traffic(&self) -> TrafficStats {
        let t = &self.shared.traffic;
        TrafficStats {
            sent: t.sent.load(Ordering::Relaxed),
            refused: t.refused.load(Ordering::Relaxed),
            received: t.received.load(Ordering::Relaxed),
        }
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
        compaction::compact(&self.shared, &self.registry, retention.clone()).await
    }

    /// The time the engine stamps records with now (the wall clock, unless
    /// the config set an `epoch` for virtual time).
    pub fn now(&self) -> Timestamp {
        self.shared.clock.now()
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
    /// open recovers them), waits at most `shutdown_timeout` — tasks still
    /// running then are stopped where they are — and syncs the log. Every
    /// task has ended when it returns. Later commands fail with
    /// [`EngineError::ShutDown`]. The log stays open until the last clone of
    /// the engine is dropped.
    pub async fn shutdown(&self) -> Result<(), EngineError> {
        if self.shut.swap(true, Ordering::SeqCst) {
            return Ok(());
        }
        let mut live: Vec<_> = self
            .registry
            .lock()
            .drain()
            .filter_map(|(_, e)| match e {
                Entry::Live { inbox, task, .. } => Some((inbox, Some(task))),
                Entry::Creating | Entry::Idle { .. } | Entry::Removed { .. } => None,
            })
            .collect();
        let stop = async {
            for (inbox, _) in &live {
                let _ = inbox.send(Box::new(Msg::Shutdown)).await;
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
        tokio::task::spawn_blocking(move || log.sync()).await.map_err(EngineError::join)??;
        Ok(())
    }
}

/// What the table answers an instance at rest without moving it: the
/// instance as it rests and why the input changed nothing, or the rejection
/// (a connect of a removed instance: R1) — `None` when the input moves it
/// (then a task must carry it out). A removed instance is always answered
/// here: nothing moves it.
pub fn at_rest(
    name: &InstanceName,
    instance: &Instance,
    input: &Input,
    policy: &Policy,
    now: Timestamp,
) -> Option<Result<(Instance, Ignored), EngineError>> {
    match step(name, instance, input, policy, now) {
        Outcome::Ignored(why) => Some(Ok((instance.clone(), why))),
        Outcome::Rejected(r) => Some(Err(EngineError::rejected(name, r))),
        Outcome::Transition(_) | Outcome::Effects(_) => None,
    }
}

/// Recovery at start-up (R11), blocking: every instance back to its last
/// recorded state; those that were not at rest are fed `Recovered` through
/// their driver — the one write path — so the decision is logged before the
/// engine starts them (no socket of the last run is assumed alive).
fn restore(
    log: &Log,
    policy: &Policy,
    quarantine: bool,
    now: crate::machine::Timestamp,
) -> Result<Vec<Restored>, LogError> {
    log.set_policy(policy)?;
    let recovery = log.recover(RecoveryOptions { mode: RecoveryMode::Fast, quarantine })?;
    for (name, error) in &recovery.quarantined {
        tracing::error!(instance = %name, %error, "instance quarantined: its records cannot be read");
    }
    let mut out = Vec::with_capacity(recovery.instances.len());
    for (name, r) in recovery.instances {
        let spec = log.spec(&name)?;
        let mut driver = Driver::restored(name.clone(), r.instance, r.seq);
        let effects = if matches!(driver.state(), State::Removed { .. } | State::Closed { .. }) {
            Vec::new()
        } else {
            let fed =
                driver.feed_now(policy, Input::Recovered, now, |p| log.append_pending(&name, p).map(|a| a.seq))?;
            fed.io().cloned().collect()
        };
        out.push(Restored { driver, spec, effects });
    }
    Ok(out)
}
