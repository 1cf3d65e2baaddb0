//! The engine in a Node host's own process: the native half of the
//! `instance-lifecycle` Node package. `index.js` wraps it in the API a
//! TypeScript host uses (`index.d.ts`); nothing here is meant to be called
//! from JavaScript directly.
//!
//! Across the boundary:
//! - every call that can fail answers a JS `Error` whose message starts with
//!   `[code] ` — the REST API's error codes (`invalid_name`, `not_found`,
//!   `removed`, `closing`, …); `index.js` moves the code to `error.code`;
//! - a panic in Rust becomes such an error (`catch_unwind`), never an abort;
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

use instance_lifecycle::engine::{Engine as Core, EngineConfig, EngineError, Notification, SignalOutcome};
use instance_lifecycle::log::{Durability, LogConfig};
use instance_lifecycle::machine::{Input, Policy, Preset, State};
use instance_lifecycle::transport::{HostEffect, HostSignal, Hub, ReferenceProtocol, Routed, WsLimits, WsTransport};
use napi::bindgen_prelude::*;
use napi::threadsafe_function::{ThreadsafeFunction, ThreadsafeFunctionCallMode};
use napi_derive::napi;
use serde_json::{Value, json};
use tokio::sync::{mpsc, oneshot};

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
    name: String,
    input: Input,
    reply: oneshot::Sender<std::result::Result<instance_lifecycle::engine::Signaled, EngineError>>,
}

/// The engine, opened on a log directory.
#[napi]
pub struct NativeEngine {
    /// Taken by `close`: the log is released when the last clone of the engine goes.
    open: Mutex<Option<Open>>,
    hub: Arc<Hub>,
    effects: Arc<Listeners>,
    transitions: Arc<Listeners>,
    close_timeout: Duration,
}

/// What an open engine holds.
struct Open {
    core: Core,
    signals: mpsc::UnboundedSender<Queued>,
    delivering: tokio::task::JoinHandle<()>,
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
async fn deliver(core: Core, mut queue: mpsc::UnboundedReceiver<Queued>) {
    while let Some(Queued { name, input, reply }) = queue.recv().await {
        match core.deliver_signal(&name, input).await {
            Ok(answer) => {
                tokio::spawn(async move {
                    let _ = reply.send(answer.answer().await);
                });
            }
            Err(e) => {
                let _ = reply.send(Err(e));
            }
        }
    }
}

#[napi]
impl NativeEngine {
    /// Opens the engine on the log in `dir` (created if missing), restoring every instance (R11).
    #[napi(catch_unwind)]
    pub async fn open(dir: String, options: Option<OpenOptions>) -> Result<NativeEngine> {
        let (policy, log, close_timeout) = parse_options(options)?;
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
            ..EngineConfig::default()
        };
        let core = Core::open(PathBuf::from(dir), config).await.map_err(engine_error)?;
        let (signals, queue) = mpsc::unbounded_channel();
        let delivering = tokio::spawn(deliver(core.clone(), queue));
        let open = Mutex::new(Some(Open { core, signals, delivering }));
        Ok(NativeEngine { open, hub, effects, transitions, close_timeout })
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

    /// Reports a signal of a connection the host holds. Put in the instance's
    /// inbox in the order of calls; the promise settles with what the rules
    /// made of it.
    #[napi(catch_unwind, ts_return_type = "Promise<unknown>")]
    pub fn signal<'env>(&self, env: &'env Env, name: String, signal: Value) -> Result<PromiseRaw<'env, Value>> {
        let signal: HostSignal =
            serde_json::from_value(signal).map_err(|e| coded("invalid_body", format!("signal: {e}")))?;
        let input = signal.input();
        if let Ok(instance) = instance_lifecycle::InstanceName::new(&name) {
            self.hub.reported(&instance, &input);
        }
        let (reply, answer) = oneshot::channel();
        let sent = self.lock().as_ref().map(|o| o.signals.send(Queued { name, input, reply }));
        if !matches!(sent, Some(Ok(()))) {
            return Err(coded("shutting_down", "the engine is closed"));
        }
        env.spawn_future(async move {
            let signaled = answer.await.map_err(|_| coded("shutting_down", "the engine closed before answering"))?;
            let signaled = signaled.map_err(engine_error)?;
            let outcome = match &signaled.outcome {
                SignalOutcome::Ignored { .. } => "ignored",
                SignalOutcome::Moved { .. } | SignalOutcome::Upkeep { .. } => "applied",
            };
            Ok(json!({
                "outcome": outcome,
                "state": signaled.state.kind().to_string(),
                "generation": signaled.generation.0,
                "detail": serde_json::to_value(&signaled).unwrap_or(Value::Null),
            }))
        })
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

    /// Ends a subscription (`true` if it was there).
    #[napi(catch_unwind)]
    pub fn unsubscribe(&self, id: u32) -> bool {
        self.effects.lock().remove(&id).is_some() || self.transitions.lock().remove(&id).is_some()
    }

    /// Stops every instance and closes the log, within the close bound
    /// (tasks still running then are stopped where they are). Every
    /// subscription ends, and the log's directory is released for another
    /// engine or `lifecycle` to open. Idempotent.
    #[napi(catch_unwind)]
    pub async fn close(&self) -> Result<()> {
        let Some(Open { core, signals, delivering }) = self.lock().take() else { return Ok(()) };
        let bound = self.close_timeout + Duration::from_secs(1);
        let stopped = tokio::time::timeout(bound, core.shutdown()).await;
        // No more signals: the delivering task ends, and with it its clone of the engine.
        drop(signals);
        let _ = delivering.await;
        self.effects.lock().clear();
        self.transitions.lock().clear();
        // The last clone: the log closes cleanly here (a last commit, sled's files released).
        tokio::task::spawn_blocking(move || drop(core)).await.map_err(|e| coded("internal", e))?;
        match stopped {
            Ok(r) => r.map_err(engine_error),
            Err(_) => Err(coded("timed_out", format!("close did not finish within {bound:?}"))),
        }
    }
}

/// A weak threadsafe function of `callback`: it never keeps Node alive.
fn weak(callback: &Function<Value, ()>) -> Result<Callback> {
    callback.build_threadsafe_function::<Value>().callee_handled::<false>().weak::<true>().build()
}
