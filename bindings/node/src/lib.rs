//! The engine in a Node host's own process: the native half of the
//! `instance-lifecycle` Node package. `index.js` wraps it in the API a
//! TypeScript host uses (`index.d.ts`); nothing here is meant to be called
//! from JavaScript directly.
//!
//! Across the boundary:
//! - every call that can fail answers a JS `Error` whose message starts with
//!   `[code] ` — the REST API's error codes (`invalid_name`, `unknown_instance`,
//!   `removed`, `closing`, …); `index.js` moves the code to `error.code`;
//! - a panic in Rust becomes a JS `Error` (`catch_unwind`; without a code), never an abort;
//! - JavaScript callbacks (effects, transitions) are called through *weak*
//!   threadsafe functions: a subscription never keeps Node alive, and a
//!   callback runs on Node's thread after the engine moved on, so nothing a
//!   callback does (throwing included) can hold up or break an instance;
//! - signals are put in their instance's inbox in the order JavaScript
//!   reported them (one queue, one task delivering), whatever order their
//!   answers settle in.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use instance_lifecycle::engine::{Engine as Core, EngineConfig, EngineError, Notification, SignalOutcome, Signaled};
use instance_lifecycle::log::{Durability, LogConfig};
use instance_lifecycle::machine::{Input, Policy, Preset, State};
use instance_lifecycle::transport::{
    Frame, HOST_WAIT_MAX_MS, HostEffect, HostSignal, Hub, Inbound, InboundError, Initiator, ReferenceProtocol, Routed,
    WsLimits, WsTransport,
};
use napi::bindgen_prelude::*;
use napi::threadsafe_function::{ThreadsafeFunction, ThreadsafeFunctionCallMode};
use napi_derive::napi;
use serde_json::{Value, json};
use tokio::sync::mpsc;

/// A JavaScript callback that never keeps Node alive (weak) and takes one JSON value.
type Callback = ThreadsafeFunction<Value, (), Value, Status, false, true>;

/// A JS error carrying `code` in its message (`index.js` moves it to `error.code`).
fn coded(code: &str, message: impl std::fmt::Display) -> Error {
    Error::new(Status::GenericFailure, format!("[{code}] {message}"))
}

fn engine_error(e: EngineError) -> Error {
    coded(e.code(), e)
}

/// How `Engine.open` is configured from JavaScript.
#[napi(object)]
pub struct OpenOptions {
    /// `whatsapp` (the default), `evolution`, `discord` or `rfc6455`.
    pub policy: Option<String>,
    /// `group-commit` (the default), `strict` or `buffered`.
    pub durability: Option<String>,
    /// Bound on `close()`, in milliseconds (default 5,000).
    pub close_timeout_ms: Option<u32>,
    /// Open a log that lost records anyway, recording the loss (as `lifecycle recover --accept-loss`).
    pub accept_loss: Option<bool>,
    /// The preset's timings, changed (milliseconds; each one optional).
    pub timing: Option<Timing>,
}

/// Timings of the rules, in milliseconds: what a test or a host with its own needs changes.
#[napi(object)]
pub struct Timing {
    /// How often an open session is pinged.
    pub heartbeat_interval_ms: Option<u32>,
    /// How long a pong may take before the session is a zombie (R7).
    pub heartbeat_deadline_ms: Option<u32>,
    /// The first reconnect delay.
    pub backoff_base_ms: Option<u32>,
    /// The longest reconnect delay.
    pub backoff_cap_ms: Option<u32>,
    /// How long a session stays open before its retry counter resets.
    pub stable_period_ms: Option<u32>,
    /// Bound on opening a connection.
    pub connect_timeout_ms: Option<u32>,
    /// Bound on waiting for the next pairing code.
    pub pairing_code_timeout_ms: Option<u32>,
    /// Bound on a logout.
    pub logout_timeout_ms: Option<u32>,
    /// Bound on closing a connection.
    pub close_connection_timeout_ms: Option<u32>,
    /// Bound on the whole cleanup of a delete.
    pub cleanup_timeout_ms: Option<u32>,
}

impl Timing {
    fn apply(&self, p: &mut Policy) {
        let ms = |v: Option<u32>, into: &mut Duration| {
            if let Some(v) = v {
                *into = Duration::from_millis(u64::from(v));
            }
        };
        ms(self.heartbeat_interval_ms, &mut p.heartbeat.interval);
        ms(self.heartbeat_deadline_ms, &mut p.heartbeat.deadline);
        ms(self.backoff_base_ms, &mut p.backoff.base);
        ms(self.backoff_cap_ms, &mut p.backoff.cap);
        ms(self.stable_period_ms, &mut p.backoff.stable_period);
        ms(self.connect_timeout_ms, &mut p.timeouts.connect);
        ms(self.pairing_code_timeout_ms, &mut p.timeouts.pairing_code);
        ms(self.logout_timeout_ms, &mut p.timeouts.logout);
        ms(self.close_connection_timeout_ms, &mut p.timeouts.close);
        ms(self.cleanup_timeout_ms, &mut p.timeouts.cleanup);
    }
}

/// What `create` is given: a WebSocket the engine holds, or a connection the host holds.
#[napi(object)]
pub struct CreateSpec {
    /// `ws://…` or `wss://…`: the engine's own transport holds the connection.
    pub url: Option<String>,
    /// `true`: the host holds the connection (Baileys, say) and reports signals.
    pub external: Option<bool>,
}

/// A state as the REST API shows it: `{ name, kind, state, identity, detail }`.
fn view(name: &str, state: &State) -> Value {
    json!({
        "name": name,
        "kind": state.kind().to_string(),
        "state": state.to_string(),
        "identity": state.identity().map(|i| i.as_str().to_owned()),
        "detail": serde_json::to_value(state).unwrap_or(Value::Null),
    })
}

fn transition(n: &Notification) -> Value {
    json!({
        "instance": n.instance.as_str(),
        "seq": n.seq,
        "at": n.at.0,
        "input": n.input.to_string(),
        "from": n.from.to_string(),
        "to": view(n.instance.as_str(), &n.to),
    })
}

/// Callbacks registered from JavaScript, by subscription id.
#[derive(Default)]
struct Listeners {
    next: AtomicU32,
    callbacks: Mutex<HashMap<u32, Arc<Callback>>>,
}

impl Listeners {
    fn lock(&self) -> MutexGuard<'_, HashMap<u32, Arc<Callback>>> {
        self.callbacks.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn add(&self, callback: Callback) -> u32 {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        self.lock().insert(id, Arc::new(callback));
        id
    }

    /// Queues `value` for every callback (non-blocking: Node calls them on its thread, in order).
    fn call(&self, value: &Value) {
        let callbacks: Vec<_> = self.lock().values().cloned().collect();
        for callback in callbacks {
            callback.call(value.clone(), ThreadsafeFunctionCallMode::NonBlocking);
        }
    }
}

/// One reported signal on its way to the engine, and where its answer goes.
struct Queued {
    ticket: u32,
    name: String,
    input: Input,
}

/// What the rules made of a signal, for `index.js` to settle the promise of `ticket` with.
struct Answer {
    ticket: u32,
    result: std::result::Result<Signaled, EngineError>,
}

/// State kinds by index, as `index.js` reads them from [`Answers::numbers`].
const KINDS: [&str; 6] = ["Connecting", "Open", "Closing", "Closed", "Zombie", "Removed"];

/// A batch of answers, packed for the crossing: per answer four numbers
/// (ticket; 0 applied, 1 ignored, 2 failed; the state kind's index in
/// `KINDS`, or the index of its message in `errors`; the generation), and
/// the messages of the failed ones (`[code] message`). No object per answer.
#[napi(object)]
pub struct Answers {
    /// Four numbers per answer.
    pub numbers: Float64Array,
    /// The failed answers' messages.
    pub errors: Vec<String>,
}

impl Answers {
    fn pack(batch: Vec<Answer>) -> Self {
        let mut numbers = Vec::with_capacity(batch.len() * 4);
        let mut errors = Vec::new();
        for Answer { ticket, result } in batch {
            numbers.push(f64::from(ticket));
            match result {
                Ok(signaled) => {
                    let ignored = matches!(signaled.outcome, SignalOutcome::Ignored { .. });
                    let kind = signaled.state.kind().to_string();
                    numbers.push(if ignored { 1.0 } else { 0.0 });
                    numbers.push(KINDS.iter().position(|k| *k == kind).unwrap_or(0) as f64);
                    numbers.push(signaled.generation.0 as f64);
                }
                Err(e) => {
                    numbers.extend([2.0, errors.len() as f64, 0.0]);
                    errors.push(format!("[{}] {e}", e.code()));
                }
            }
        }
        Self { numbers: Float64Array::new(numbers), errors }
    }
}

/// The kinds of signal, by the index `index.js` packs them as.
const SIGNAL_KINDS: [&str; 13] = [
    "opened",
    "pairing",
    "closed",
    "writeFailed",
    "heartbeatMissed",
    "pong",
    "logoutConfirmed",
    "logoutFailed",
    "closeFinished",
    "reconnectRequested",
    "sessionInvalid",
    "heartbeatDue",
    "handshakeStep",
];

/// What a signal carries beyond its kind and generation (`null` for a kind that carries nothing).
#[napi(object)]
pub struct SignalExtra {
    /// `opened`: the peer's identity.
    pub identity: Option<String>,
    /// `pairing`: the code.
    pub code: Option<String>,
    /// `closed`: the status.
    pub status: Option<f64>,
    /// `closed`: why, in words.
    pub reason: Option<String>,
    /// `closed`: `peer` (default), `local` or `transport`.
    pub initiator: Option<String>,
    /// `writeFailed`, `logoutFailed`: the error.
    pub error: Option<String>,
    /// `sessionInvalid`: how long to wait before the next attempt, in ms.
    pub retry_after_ms: Option<f64>,
    /// `heartbeatDue`: when the next heartbeat is due, in ms from now.
    pub after_ms: Option<f64>,
}

/// Signals taken in line: the accepted ones carry tickets `first`, `first + 1`, …
/// in order; `refused` says which were not, and why.
#[napi(object)]
pub struct Taken {
    /// The first accepted signal's ticket.
    pub first: u32,
    /// The refused signals: their index in the batch and `[code] message`.
    pub refused: Vec<Refused>,
}

/// A signal refused at once.
#[napi(object)]
pub struct Refused {
    /// Its index in the batch.
    pub index: u32,
    /// `[code] message`.
    pub error: String,
}

/// The one mapping of host signals ([`HostSignal`]), from the packed shape
/// `index.js` sends (the kind's index in [`SIGNAL_KINDS`], the generation,
/// and what else it carries).
fn host_signal(kind: u8, generation: f64, extra: Option<SignalExtra>) -> Result<HostSignal> {
    if !(generation.is_finite() && generation >= 0.0 && generation.fract() == 0.0 && generation < 9.007e15) {
        return Err(coded("invalid_body", "signal: generation must be the integer the open effect carried"));
    }
    let generation = generation as u64;
    let extra = extra.unwrap_or(SignalExtra {
        identity: None,
        code: None,
        status: None,
        reason: None,
        initiator: None,
        error: None,
        retry_after_ms: None,
        after_ms: None,
    });
    let text = |v: Option<String>| v.unwrap_or_default();
    Ok(match SIGNAL_KINDS.get(usize::from(kind)).copied().unwrap_or("") {
        "opened" => HostSignal::Opened { generation, identity: extra.identity },
        "pairing" => HostSignal::Pairing { generation, code: extra.code },
        "closed" => {
            let status = match extra.status {
                None => None,
                Some(s) if s.fract() == 0.0 && (0.0..=65535.0).contains(&s) => Some(s as u16),
                Some(s) => return Err(coded("invalid_body", format!("signal: status {s} is not a status code"))),
            };
            let initiator = match extra.initiator.as_deref() {
                None | Some("peer") => Initiator::Peer,
                Some("local") => Initiator::Local,
                Some("transport") => Initiator::Transport,
                Some(other) => {
                    return Err(coded(
                        "invalid_body",
                        format!("signal: initiator {other:?}: peer, local or transport"),
                    ));
                }
            };
            HostSignal::Closed { generation, status, reason: text(extra.reason), initiator }
        }
        "writeFailed" => HostSignal::WriteFailed { generation, error: text(extra.error) },
        "heartbeatMissed" => HostSignal::HeartbeatMissed { generation },
        "pong" => HostSignal::Pong { generation },
        "logoutConfirmed" => HostSignal::LogoutConfirmed { generation },
        "logoutFailed" => HostSignal::LogoutFailed { generation, error: text(extra.error) },
        "closeFinished" => HostSignal::CloseFinished { generation },
        "reconnectRequested" => HostSignal::ReconnectRequested { generation },
        "handshakeStep" => HostSignal::HandshakeStep { generation },
        "sessionInvalid" => {
            HostSignal::SessionInvalid { generation, retry_after_ms: wait_ms("retryAfterMs", extra.retry_after_ms)? }
        }
        "heartbeatDue" => match extra.after_ms {
            Some(_) => HostSignal::HeartbeatDue { generation, after_ms: wait_ms("afterMs", extra.after_ms)? },
            None => {
                return Err(coded(
                    "invalid_body",
                    "signal heartbeatDue: afterMs, the milliseconds until the next beat",
                ));
            }
        },
        _ => return Err(coded("invalid_body", format!("signal kind #{kind}: one of {}", SIGNAL_KINDS.join(", ")))),
    })
}

/// A wait a signal asks for, in whole milliseconds up to an hour
/// ([`HOST_WAIT_MAX_MS`]); none is no wait.
fn wait_ms(field: &str, ms: Option<f64>) -> Result<u64> {
    match ms {
        None => Ok(0),
        Some(ms) if ms.fract() == 0.0 && (0.0..=HOST_WAIT_MAX_MS as f64).contains(&ms) => Ok(ms as u64),
        Some(ms) => Err(coded(
            "invalid_body",
            format!("signal: {field} {ms} is not whole milliseconds from 0 to {HOST_WAIT_MAX_MS} (an hour)"),
        )),
    }
}

/// The answers' way back to JavaScript: one threadsafe function for every
/// answer, called with whatever answers are ready (one call per batch, not
/// a promise's own threadsafe function per signal). Weak: `index.js` keeps
/// Node alive while any signal waits for its answer, and not otherwise.
type AnswerFn = ThreadsafeFunction<Answers, (), Answers, Status, false, true>;

/// A cleanup step run by JavaScript: called with `{ instance, step }`, it
/// answers a promise of `null` (done) or the error's message (`index.js`
/// turns a throw or a rejection into that, so nothing JavaScript does can
/// end the process or keep a delete from finishing). Weak: it never keeps
/// Node alive.
type CleanupFn = ThreadsafeFunction<CleanupCall, Promise<Option<String>>, CleanupCall, Status, false, true>;

/// One cleanup step to run: what the JavaScript function is called with.
#[napi(object)]
pub struct CleanupCall {
    /// The instance being deleted.
    pub instance: String,
    /// The step's name.
    pub step: String,
}

/// The host's cleanup steps, run by JavaScript (`Engine.open(dir, { cleanup })`).
struct JsCleanup {
    steps: Vec<String>,
    run: Arc<CleanupFn>,
}

impl instance_lifecycle::engine::Cleanup for JsCleanup {
    fn steps(&self) -> Vec<String> {
        self.steps.clone()
    }

    fn run(&self, instance: instance_lifecycle::InstanceName, step: &str) -> instance_lifecycle::engine::StepFuture {
        let (run, step) = (self.run.clone(), step.to_owned());
        Box::pin(async move {
            // Called on Node's thread; the promise it answers is awaited here
            // (the engine bounds the step with its time-out).
            let call = CleanupCall { instance: instance.to_string(), step };
            let answered = run.call_async(call).await.map_err(|e| e.reason.clone())?;
            match answered.await.map_err(|e| e.reason.clone())? {
                None => Ok(()),
                Some(error) => Err(error),
            }
        })
    }
}

/// The engine, opened on a log directory.
#[napi]
pub struct NativeEngine {
    /// Taken by `close`: the log is released when the last clone of the engine goes.
    open: Mutex<Option<Open>>,
    hub: Arc<Hub>,
    effects: Arc<Listeners>,
    transitions: Arc<Listeners>,
    /// Listeners of the application frames of engine-held connections.
    frames: Arc<Listeners>,
    close_timeout: Duration,
    /// The next signal's ticket.
    tickets: AtomicU32,
    /// Where answers go (`on_answers`).
    answers: Arc<Mutex<Option<AnswerFn>>>,
}

/// What an open engine holds.
struct Open {
    core: Core,
    signals: mpsc::UnboundedSender<Vec<Queued>>,
    delivering: tokio::task::JoinHandle<()>,
    /// Hands received application frames to `frames`, from the first `on_frame` on.
    reading: Option<tokio::task::JoinHandle<()>>,
}

fn parse_options(options: Option<OpenOptions>) -> Result<(Policy, LogConfig, Duration)> {
    let options = options.unwrap_or(OpenOptions {
        policy: None,
        durability: None,
        close_timeout_ms: None,
        accept_loss: None,
        timing: None,
    });
    let preset = Preset::parse(options.policy.as_deref().unwrap_or("whatsapp"))
        .map_err(|e| coded("invalid_option", format!("policy: {e}")))?;
    let durability = match options.durability.as_deref().unwrap_or("group-commit") {
        "group-commit" => Durability::GroupCommit,
        "strict" => Durability::Strict,
        "buffered" => Durability::Buffered,
        other => {
            return Err(coded(
                "invalid_option",
                format!("durability {other:?}: one of group-commit, strict, buffered"),
            ));
        }
    };
    let log = LogConfig { durability, accept_loss: options.accept_loss.unwrap_or(false), ..LogConfig::default() };
    let close_timeout = Duration::from_millis(u64::from(options.close_timeout_ms.unwrap_or(5_000)));
    let mut policy = Policy::preset(preset);
    if let Some(timing) = &options.timing {
        timing.apply(&mut policy);
    }
    policy.validate().map_err(|e| coded("invalid_option", format!("timing: {e}")))?;
    Ok((policy, log, close_timeout))
}

/// Delivers reported signals to the engine one at a time, in the order
/// JavaScript reported them; each answer is awaited apart (a slow commit of
/// one instance's signal does not hold up the next one's delivery).
async fn deliver(core: Core, mut queue: mpsc::UnboundedReceiver<Vec<Queued>>, answers: mpsc::UnboundedSender<Answer>) {
    use futures_util::StreamExt;
    let mut waiting = futures_util::stream::FuturesUnordered::new();
    loop {
        tokio::select! {
            batch = queue.recv() => {
                let Some(batch) = batch else { break };
                for Queued { ticket, name, input } in batch {
                    match core.deliver_signal(&name, input).await {
                        Ok(answer) => waiting.push(async move { Answer { ticket, result: answer.answer().await } }),
                        Err(e) => {
                            let _ = answers.send(Answer { ticket, result: Err(e) });
                        }
                    }
                }
            }
            Some(answer) = waiting.next(), if !waiting.is_empty() => {
                let _ = answers.send(answer);
            }
        }
    }
    // No more signals: the answers still owed are awaited and handed over.
    while let Some(answer) = waiting.next().await {
        let _ = answers.send(answer);
    }
}

/// Hands answers to JavaScript in batches: every answer ready when the
/// function is called goes in one call.
async fn answer(mut answers: mpsc::UnboundedReceiver<Answer>, to: Arc<Mutex<Option<AnswerFn>>>) {
    while let Some(first) = answers.recv().await {
        let mut batch = vec![first];
        while let Ok(more) = answers.try_recv() {
            batch.push(more);
        }
        let to = to.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(f) = to.as_ref() {
            f.call(Answers::pack(batch), ThreadsafeFunctionCallMode::NonBlocking);
        }
    }
}

#[napi]
impl NativeEngine {
    /// Opens the engine on the log in `dir` (created if missing), restoring every instance (R11).
    #[napi(catch_unwind)]
    #[allow(clippy::type_complexity)]
    pub async fn open(
        dir: String,
        options: Option<OpenOptions>,
        cleanup_steps: Option<Vec<String>>,
        cleanup: Option<CleanupFn>,
    ) -> Result<NativeEngine> {
        let (policy, log, close_timeout) = parse_options(options)?;
        let cleanup: Arc<dyn instance_lifecycle::engine::Cleanup> = match (cleanup_steps, cleanup) {
            (Some(steps), Some(run)) if !steps.is_empty() => Arc::new(JsCleanup { steps, run: Arc::new(run) }),
            _ => Arc::new(instance_lifecycle::engine::NoCleanup),
        };
        let hub = Hub::new();
        let effects = Arc::new(Listeners::default());
        let transitions = Arc::new(Listeners::default());
        let on_effect = effects.clone();
        hub.listen(Box::new(move |e: &HostEffect| {
            on_effect.call(&serde_json::to_value(e).unwrap_or(Value::Null));
        }));
        let on_transition = transitions.clone();
        let ws = WsTransport::new(Arc::new(ReferenceProtocol), WsLimits::default());
        let config = EngineConfig {
            policy,
            log,
            transport: Arc::new(Routed::new(ws, hub.clone())),
            on_transition: Some(Arc::new(move |n: &Notification| on_transition.call(&transition(n)))),
            shutdown_timeout: close_timeout,
            cleanup,
            ..EngineConfig::default()
        };
        let core = Core::open(PathBuf::from(dir), config).await.map_err(engine_error)?;
        let (signals, queue) = mpsc::unbounded_channel();
        let (answered, answers_rx) = mpsc::unbounded_channel();
        let answers = Arc::new(Mutex::new(None));
        let delivering = tokio::spawn(deliver(core.clone(), queue, answered));
        tokio::spawn(answer(answers_rx, answers.clone()));
        let open = Mutex::new(Some(Open { core, signals, delivering, reading: None }));
        let frames = Arc::new(Listeners::default());
        Ok(NativeEngine { open, hub, effects, transitions, frames, close_timeout, tickets: AtomicU32::new(0), answers })
    }

    fn lock(&self) -> MutexGuard<'_, Option<Open>> {
        self.open.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The engine, while it is open.
    fn core(&self) -> Result<Core> {
        self.lock().as_ref().map(|o| o.core.clone()).ok_or_else(|| coded("shutting_down", "the engine is closed"))
    }

    /// Creates an instance; its state after.
    #[napi(catch_unwind)]
    pub async fn create(&self, name: String, spec: CreateSpec) -> Result<Value> {
        let url = match (spec.url, spec.external.unwrap_or(false)) {
            (Some(_), true) => {
                return Err(coded("invalid_body", "an external instance has no url: the host holds its connection"));
            }
            (Some(url), false) => url,
            (None, true) => instance_lifecycle::transport::Endpoint::EXTERNAL.to_owned(),
            (None, false) => return Err(coded("invalid_body", "give a url, or external: true")),
        };
        let core = self.core()?;
        core.create(&name, instance_lifecycle::log::InstanceSpec { url }).await.map_err(engine_error)?;
        let state = core.state(&name).map_err(engine_error)?;
        Ok(view(&name, &state))
    }

    /// `connect`, `logout`, `restart` or `delete`; the state it ended in.
    #[napi(catch_unwind)]
    pub async fn command(&self, name: String, command: String) -> Result<Value> {
        let core = self.core()?;
        let state = match command.as_str() {
            "connect" => core.connect(&name).await,
            "logout" => core.logout(&name).await,
            "restart" => core.restart(&name).await,
            "delete" => core.delete(&name).await,
            other => return Err(coded("invalid_body", format!("unknown command {other:?}"))),
        }
        .map_err(engine_error)?;
        Ok(view(&name, &state))
    }

    /// An instance's state.
    #[napi(catch_unwind)]
    pub fn state(&self, name: String) -> Result<Value> {
        let state = self.core()?.state(&name).map_err(engine_error)?;
        Ok(view(&name, &state))
    }

    /// Every instance that is not removed.
    #[napi(catch_unwind)]
    pub fn list(&self) -> Result<Value> {
        Ok(Value::Array(self.core()?.list().iter().map(|(name, state)| view(name.as_str(), state)).collect()))
    }

    /// An instance's recorded history, oldest first.
    #[napi(catch_unwind)]
    pub async fn history(&self, name: String) -> Result<Value> {
        let records = self.core()?.history(&name).await.map_err(engine_error)?;
        serde_json::to_value(records).map_err(|e| coded("internal", e))
    }

    /// Reports signals of connections the host holds, in order: before this
    /// returns, each is in the one queue the delivering task takes them from
    /// to their instances' inboxes (so signals are applied in the order
    /// given, across calls too). Packed by `index.js`,
    /// which gathers the signals of one turn of Node's event loop into one
    /// call: per signal its instance, its kind's index in [`SIGNAL_KINDS`],
    /// its generation, and what else it carries (or `null`). Answers which
    /// tickets the accepted ones' answers will carry (`on_answers`) and why
    /// the others were refused.
    #[napi(catch_unwind)]
    pub fn signals(
        &self,
        names: Vec<String>,
        kinds: Uint8Array,
        generations: Float64Array,
        extras: Vec<Option<SignalExtra>>,
    ) -> Result<Taken> {
        if kinds.len() != names.len() || generations.len() != names.len() || extras.len() != names.len() {
            return Err(coded("invalid_body", "signals: one kind, generation and extra per name"));
        }
        let mut queued = Vec::with_capacity(names.len());
        let mut refused = Vec::new();
        for (index, ((name, extra), (kind, generation))) in
            names.into_iter().zip(extras).zip(kinds.iter().zip(generations.iter())).enumerate()
        {
            let input = match host_signal(*kind, *generation, extra) {
                Ok(s) => s.input(),
                Err(e) => {
                    refused.push(Refused { index: index as u32, error: e.reason.clone() });
                    continue;
                }
            };
            if input.ends_connection()
                && let Ok(instance) = instance_lifecycle::InstanceName::new(&name)
            {
                self.hub.reported(&instance, &input);
            }
            queued.push(Queued { ticket: 0, name, input });
        }
        let count = u32::try_from(queued.len()).unwrap_or(u32::MAX);
        let first = self.tickets.fetch_add(count, Ordering::Relaxed);
        for (k, q) in queued.iter_mut().enumerate() {
            q.ticket = first.wrapping_add(k as u32);
        }
        let sent = self.lock().as_ref().map(|o| o.signals.send(queued));
        if !matches!(sent, Some(Ok(()))) {
            return Err(coded("shutting_down", "the engine is closed"));
        }
        Ok(Taken { first, refused })
    }

    /// Where answers to signals go: `callback(answers)`, a batch at a time.
    #[napi(catch_unwind, ts_args_type = "callback: (answers: Answers) => void")]
    pub fn on_answers(&self, callback: Function<Answers, ()>) -> Result<()> {
        let f = callback.build_threadsafe_function::<Answers>().callee_handled::<false>().weak::<true>().build()?;
        *self.answers.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(f);
        Ok(())
    }

    /// Calls `callback(effect)` for every effect of a host-held connection,
    /// in order; returns the subscription's id.
    #[napi(catch_unwind, ts_args_type = "callback: (effect: unknown) => void")]
    pub fn on_effect(&self, callback: Function<Value, ()>) -> Result<u32> {
        Ok(self.effects.add(weak(&callback)?))
    }

    /// Calls `callback(transition)` after every transition; returns the subscription's id.
    #[napi(catch_unwind, ts_args_type = "callback: (transition: unknown) => void")]
    pub fn on_transition(&self, callback: Function<Value, ()>) -> Result<u32> {
        Ok(self.transitions.add(weak(&callback)?))
    }

    /// Sends an application frame on an engine-held connection that is
    /// `Open`: `text`, or else `binary`. Never waits on the socket; refused
    /// with `not_open`, `send_queue_full`, `rate_limited`, `host_driven`, …
    #[napi(catch_unwind)]
    pub fn send(&self, name: String, text: Option<String>, binary: Option<Buffer>) -> Result<()> {
        let frame = match (text, binary) {
            (Some(text), None) => Frame::Text(text),
            (None, Some(bytes)) => Frame::Binary(bytes.to_vec()),
            _ => return Err(coded("invalid_body", "send: a string or a Buffer")),
        };
        self.core()?.send(&name, frame).map_err(engine_error)
    }

    /// Calls `callback(frame)` for every application frame received on an
    /// engine-held connection — `{instance, generation, text}` or
    /// `{instance, generation, binary}` — and `{missed}` when the callbacks
    /// fell behind the engine's ring; returns the subscription's id.
    #[napi(catch_unwind, ts_args_type = "callback: (frame: unknown) => void")]
    pub fn on_frame(&self, callback: Function<Value, ()>) -> Result<u32> {
        let id = self.frames.add(weak(&callback)?);
        let mut open = self.lock();
        let Some(open) = open.as_mut() else { return Err(coded("shutting_down", "the engine is closed")) };
        if open.reading.is_none() {
            open.reading = Some(napi::bindgen_prelude::spawn(read_frames(open.core.frames(), self.frames.clone())));
        }
        Ok(id)
    }

    /// Ends a subscription (`true` if it was there).
    #[napi(catch_unwind)]
    pub fn unsubscribe(&self, id: u32) -> bool {
        self.effects.lock().remove(&id).is_some()
            || self.transitions.lock().remove(&id).is_some()
            || self.frames.lock().remove(&id).is_some()
    }

    /// Stops every instance and closes the log, within the close bound
    /// (tasks still running then are stopped where they are). Every
    /// subscription ends, and the log's directory is released for another
    /// engine or `lifecycle` to open. Idempotent.
    #[napi(catch_unwind)]
    pub async fn close(&self) -> Result<()> {
        let Some(Open { core, signals, delivering, reading }) = self.lock().take() else { return Ok(()) };
        if let Some(reading) = reading {
            reading.abort();
        }
        let bound = self.close_timeout + Duration::from_secs(1);
        let stopped = tokio::time::timeout(bound, core.shutdown()).await;
        // No more signals: the delivering task ends, and with it its clone of the engine.
        drop(signals);
        let _ = delivering.await;
        self.effects.lock().clear();
        self.transitions.lock().clear();
        self.frames.lock().clear();
        // Answers still owed were sent before the delivering task ended; the
        // function goes once they are handed over (its queue is drained).
        // The last clone: the log closes cleanly here (a last commit, sled's files released).
        tokio::task::spawn_blocking(move || drop(core)).await.map_err(|e| coded("internal", e))?;
        match stopped {
            Ok(r) => r.map_err(engine_error),
            Err(_) => Err(coded("timed_out", format!("close did not finish within {bound:?}"))),
        }
    }
}

/// Hands every received application frame to the listeners, in order (the
/// ring never waits for them: a reader that falls behind is told what it missed).
async fn read_frames(mut inbound: Inbound, to: Arc<Listeners>) {
    loop {
        let value = match inbound.recv().await {
            Ok(f) => match &f.frame {
                Frame::Text(text) => {
                    serde_json::json!({ "instance": f.instance.as_str(), "generation": f.generation.0, "text": text })
                }
                Frame::Binary(bytes) => {
                    serde_json::json!({ "instance": f.instance.as_str(), "generation": f.generation.0, "binary": bytes })
                }
            },
            Err(InboundError::Missed { frames }) => serde_json::json!({ "missed": frames }),
            Err(InboundError::Closed) => return,
        };
        to.call(&value);
    }
}

/// A weak threadsafe function of `callback`: it never keeps Node alive.
fn weak(callback: &Function<Value, ()>) -> Result<Callback> {
    callback.build_threadsafe_function::<Value>().callee_handled::<false>().weak::<true>().build()
}
