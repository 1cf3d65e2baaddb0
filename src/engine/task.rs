//! One task per live instance: a short async loop around the instance's
//! sans-IO [`Driver`] — host commands and transport signals in, the driver's
//! deadline as the only timer — that records each transition in the log
//! through the driver, then carries out its I/O effects. It never holds a
//! shared lock across an await and never waits on another instance. A
//! supervisor catches a panic in the task (or in a host hook it calls),
//! records it through the rules (R10), and goes on.

use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Weak};

use futures_util::FutureExt;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::sleep_until;
use tracing::{Instrument, debug, error, trace};

use super::error::EngineError;
use super::registry::{Carrier, CarrierSlot, Msg, Registry, Reply, View};
use super::shared::{Notification, Shared};
use super::signal::{SignalOutcome, Signaled};
use crate::log::{Event, InstanceSpec};
use crate::machine::{Driver, Effect, Fed, Generation, Ignored, Input, Reason, State};
use crate::panic_message;
use crate::transport::{ConnectSpec, Control, Endpoint, FrameSink, Outbound, Outlet, Signals};

/// What a waiting command waits for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Goal {
    /// `Closed` (or `Removed`, if a delete took over).
    Closed,
    /// `Removed`.
    Removed,
}

struct Waiter {
    goal: Goal,
    reply: oneshot::Sender<Result<State, EngineError>>,
}

struct Conn {
    generation: Generation,
    control: mpsc::Sender<Control>,
    task: JoinHandle<()>,
    /// The rules asked it to close (a close is in its control queue).
    closing: bool,
}

/// A connection never outlives its holder: however the instance's task ends
/// (aborted by `Engine::relinquish` included), its socket goes with it; a
/// retired one closing in the background, when its close time-out ends.
impl Drop for Conn {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Control messages queued per connection: a logout, a close and a ping at most.
const CONTROL_CAPACITY: usize = 4;

pub(crate) struct Task {
    driver: Driver,
    spec: InstanceSpec,
    view: watch::Sender<View>,
    shared: Arc<Shared>,
    registry: Weak<Registry>,
    signals_tx: mpsc::Sender<Box<Input>>,
    /// Tells this task's registry entry from a later incarnation's.
    token: u64,
    /// The command being handled, until it is answered or parked as a waiter.
    in_flight: Option<(&'static str, Reply)>,
    conn: Option<Conn>,
    waiters: Vec<Waiter>,
    cleanup: Option<JoinHandle<()>>,
    /// The log of record refused a record: another host owns the instance.
    fenced: bool,
    /// Who carries the current connection's frames (read by `Engine::send`).
    carrier: CarrierSlot,
}

/// Messages are boxed: tokio's mpsc allocates a block of 32 slots up front per
/// channel, so small slots keep an instance small.
pub(crate) struct Channels {
    pub(crate) inbox: mpsc::Receiver<Box<Msg>>,
    pub(crate) signals: mpsc::Receiver<Box<Input>>,
}

/// What a new task starts from.
pub(crate) struct Start {
    pub(crate) driver: Driver,
    pub(crate) spec: InstanceSpec,
    pub(crate) view: watch::Sender<View>,
    pub(crate) shared: Arc<Shared>,
    pub(crate) registry: Weak<Registry>,
    pub(crate) signals_tx: mpsc::Sender<Box<Input>>,
    pub(crate) token: u64,
    pub(crate) carrier: CarrierSlot,
}

impl Task {
    pub(crate) fn new(s: Start) -> Self {
        Self {
            driver: s.driver,
            spec: s.spec,
            view: s.view,
            shared: s.shared,
            registry: s.registry,
            signals_tx: s.signals_tx,
            token: s.token,
            in_flight: None,
            conn: None,
            waiters: Vec::new(),
            cleanup: None,
            fenced: false,
            carrier: s.carrier,
        }
    }

    /// Runs the instance until it is removed, parked, shut down, or the
    /// engine is dropped, carrying out `initial` first (what recovery decided).
    pub(crate) async fn supervise(mut self, mut ch: Channels, initial: Vec<Effect>) {
        let span = tracing::info_span!("instance", instance = %self.driver.name());
        async move {
            self.carry_out(initial.iter());
            loop {
                match AssertUnwindSafe(self.run(&mut ch)).catch_unwind().await {
                    Ok(()) => break,
                    Err(panic) => {
                        let message = Reason::new(panic_message(&panic));
                        error!(%message, "instance task panicked; recording it and going on (R10)");
                        self.abort_conn();
                        // Boxed: this rare path must not grow every task's future.
                        if let Err(e) = Box::pin(self.handle(Input::Panicked { message })).await {
                            error!(error = %e, "could not record the panic; stopping this instance");
                            break;
                        }
                        // The command whose handling panicked learns it now, after the record.
                        if let Some((command, reply)) = self.in_flight.take() {
                            let name = self.driver.name().clone();
                            let _ = reply.send(Err(EngineError::Interrupted { name, command }));
                        }
                    }
                }
            }
            self.finish();
        }
        .instrument(span)
        .await;
    }

    fn removed(&self) -> bool {
        matches!(self.driver.state(), State::Removed { .. })
    }

    /// At rest: `Closed` with nothing in flight. Every input a `Closed`
    /// instance could still get (a stale timer, a late signal) is ignored by
    /// the rules, so the task can end and leave only a registry entry.
    fn resting(&self) -> bool {
        matches!(self.driver.state(), State::Closed { .. })
            && self.conn.is_none()
            && self.waiters.is_empty()
            && self.cleanup.as_ref().is_none_or(JoinHandle::is_finished)
    }

    fn park(&self, ch: &Channels) -> bool {
        let Some(registry) = self.registry.upgrade() else { return false };
        let view = self.view.borrow().clone();
        registry.park(self.driver.name(), self.token, view, self.spec.clone(), || {
            ch.inbox.is_empty() && ch.signals.is_empty()
        })
    }

    /// The driver loop: inbox, signals, and the driver's next deadline.
    async fn run(&mut self, ch: &mut Channels) {
        loop {
            if self.fenced {
                error!("the cluster refused a record: another host owns this instance; dropping its socket");
                self.abort_conn();
                return;
            }
            if self.removed() || (self.resting() && self.park(ch)) {
                return;
            }
            let due = self.driver.poll_timeout().map(|at| self.shared.clock.instant(at));
            tokio::select! {
                biased;
                // The handlers are boxed so the idle loop's future stays small.
                msg = ch.inbox.recv() => match msg.map(|m| *m) {
                    None | Some(Msg::Shutdown) => {
                        self.abort_conn();
                        return;
                    }
                    Some(Msg::Command { input, command, reply }) => Box::pin(self.command(input, command, reply)).await,
                    Some(Msg::Signal { input, reply }) => Box::pin(self.reported(input, reply)).await,
                },
                Some(input) = ch.signals.recv() => {
                    if let Err(e) = Box::pin(self.signal(*input)).await {
                        error!(error = %e, "transition not recorded; the instance did not move (R8)");
                    }
                }
                () = sleep_until(due.unwrap_or_else(tokio::time::Instant::now)), if due.is_some() => {
                    Box::pin(self.fire_timers()).await
                }
            }
        }
    }

    async fn command(&mut self, input: Input, command: &'static str, reply: Reply) {
        let goal = match input {
            Input::Logout => Some(Goal::Closed),
            Input::Delete => Some(Goal::Removed),
            _ => None,
        };
        // Held by the task while the command runs: if handling it panics, the
        // supervisor answers it once the panic is recorded.
        self.in_flight = Some((command, reply));
        let fed = self.handle(input).await;
        let Some((_, reply)) = self.in_flight.take() else { return };
        match fed {
            Err(e) => {
                let _ = reply.send(Err(e));
            }
            Ok(Fed::Rejected(r)) => {
                let _ = reply.send(Err(EngineError::rejected(self.driver.name(), r)));
            }
            Ok(_) => match goal {
                Some(goal) if !self.reached(goal) => self.waiters.push(Waiter { goal, reply }),
                _ => {
                    let _ = reply.send(Ok(self.driver.state().clone()));
                }
            },
        }
    }

    fn reached(&self, goal: Goal) -> bool {
        matches!((self.driver.state(), goal), (State::Removed { .. }, _) | (State::Closed { .. }, Goal::Closed))
    }

    async fn signal(&mut self, input: Input) -> Result<Fed, EngineError> {
        // A connection that reported its end is over: forget it (its task ends by itself).
        if input.ends_connection() && self.conn.as_ref().map(|c| c.generation) == input.generation() {
            self.conn = None;
            self.set_carrier(None);
        }
        self.handle(input).await
    }

    /// A signal a host reported for a connection it holds: handled as the
    /// engine's own transports' signals are, then answered.
    async fn reported(&mut self, input: Input, reply: oneshot::Sender<Result<Signaled, EngineError>>) {
        let answer = self.signal(input).await.and_then(|fed| {
            let outcome = match fed {
                Fed::Moved(p) => SignalOutcome::Moved { seq: p.seq, effects: p.effects },
                Fed::Upkeep(effects) => SignalOutcome::Upkeep { effects },
                Fed::Ignored(reason) => SignalOutcome::Ignored { reason },
                Fed::Rejected(r) => return Err(EngineError::rejected(self.driver.name(), r)),
            };
            let instance = self.driver.instance();
            Ok(Signaled { state: instance.state.clone(), generation: instance.generation, outcome })
        });
        let _ = reply.send(answer);
    }

    async fn fire_timers(&mut self) {
        while let Some(input) = self.driver.on_timeout(self.shared.clock.now()) {
            if let Err(e) = self.handle(input).await {
                error!(error = %e, "transition not recorded; the instance did not move (R8)");
            }
        }
    }

    /// Feeds one input through the driver (which records a transition in
    /// the log before applying it), then tells the world and carries out the
    /// I/O effects.
    async fn handle(&mut self, input: Input) -> Result<Fed, EngineError> {
        // Every transition and effect of this input is in a span with the generation it concerns.
        let span = tracing::debug_span!("input", generation = %self.driver.instance().generation);
        Box::pin(self.handle_in(input)).instrument(span).await
    }

    async fn handle_in(&mut self, input: Input) -> Result<Fed, EngineError> {
        let now = self.shared.clock.now();
        let (shared, name) = (self.shared.clone(), self.driver.name().clone());
        let kind = input.kind();
        let record = async |p: &crate::machine::Pending| {
            shared.append(&name, p.seq, p.at, Event::of(p), &p.to).await.map(|a| a.seq)
        };
        let fed = self.driver.feed(&shared.policy, input, now, record).await.map_err(|source| {
            if matches!(source, crate::log::LogError::Fenced { .. }) {
                // Another host owns the instance now: stop here, at once.
                self.fenced = true;
            }
            EngineError::log(Some(name.clone()), source)
        })?;
        match &fed {
            Fed::Moved(p) => {
                let generation = p.to.generation;
                debug!(seq = p.seq, %generation, input = %kind, from = %p.from.state, to = %p.to.state, "transition");
                let view = View { instance: p.to.clone(), seq: self.driver.seq() };
                self.view.send_replace(view.clone());
                if matches!(p.to.state, State::Removed { .. })
                    && let Some(registry) = self.registry.upgrade()
                {
                    registry.tombstone(&name, view);
                }
                self.carry_out(fed.io());
                let notification = Notification {
                    instance: name,
                    seq: p.seq,
                    at: p.at,
                    input: kind,
                    from: p.from.state.kind(),
                    to: p.to.state.clone(),
                };
                let _ = shared.notifications.send(notification.clone());
                if let Some(hook) = &shared.on_transition {
                    hook(&notification);
                }
                self.resolve_waiters();
            }
            Fed::Upkeep(_) => {
                trace!(input = %kind, "upkeep");
                self.carry_out(fed.io());
            }
            // R12 and friends: nothing moves; say why in the trace.
            Fed::Ignored(why @ Ignored::Stale { .. }) => {
                debug!(input = %kind, reason = %why, "stale input ignored (R12)")
            }
            Fed::Ignored(why) => trace!(input = %kind, reason = %why, "input ignored"),
            Fed::Rejected(why) => debug!(input = %kind, reason = %why, "command rejected"),
        }
        Ok(fed)
    }

    fn resolve_waiters(&mut self) {
        let state = self.driver.state().clone();
        let waiters = std::mem::take(&mut self.waiters);
        for w in waiters {
            if self.reached(w.goal) {
                let _ = w.reply.send(Ok(state.clone()));
            } else {
                self.waiters.push(w);
            }
        }
    }

    /// The runtime's side of the effects: sockets and cleanup (the driver keeps the timers).
    fn carry_out<'e>(&mut self, effects: impl Iterator<Item = &'e Effect>) {
        for effect in effects {
            match effect {
                Effect::OpenTransport { generation, resume } => self.open(*generation, resume.clone()),
                Effect::SendLogout { generation } => self.control(*generation, Control::SendLogout),
                Effect::SendPing { generation } => self.control(*generation, Control::Ping),
                Effect::CloseTransport { generation, status } => {
                    self.control(*generation, Control::Close { status: *status })
                }
                Effect::AbortTransport { generation } => {
                    if self.conn.as_ref().is_some_and(|c| c.generation == *generation) {
                        self.abort_conn();
                    }
                }
                Effect::RunCleanup => {
                    let run = super::cleanup::run(
                        self.shared.cleanup.clone(),
                        self.driver.name().clone(),
                        self.shared.cleanup_step_timeout,
                        self.signals_tx.clone(),
                    );
                    if let Some(old) = self.cleanup.replace(tokio::spawn(run)) {
                        old.abort();
                    }
                }
                Effect::ArmTimer { .. } | Effect::CancelTimer { .. } => {}
            }
        }
    }

    /// R9: one transport per instance; a new generation replaces the old.
    fn open(&mut self, generation: Generation, resume: Option<crate::machine::Identity>) {
        self.retire_conn();
        let signals = Signals::new(generation, self.signals_tx.clone());
        let endpoint = match Endpoint::parse(&self.spec.url) {
            Ok(endpoint) => endpoint,
            Err(e) => {
                // A spec from an old log that today's rules refuse: a connect that fails.
                let input = Input::TransportClosed {
                    generation,
                    initiator: crate::machine::CloseInitiator::Transport,
                    status: None,
                    reason: Reason::new(e.to_string()),
                };
                let _ = self.signals_tx.try_send(Box::new(input));
                return;
            }
        };
        let (control, control_rx) = mpsc::channel(CONTROL_CAPACITY);
        let traffic = &self.shared.traffic;
        let (carrier, outbound) = match endpoint {
            Endpoint::External => (Carrier::Host, Outbound::none()),
            Endpoint::Ws(_) => {
                let (outlet, outbound) = Outlet::new(generation, traffic.send_queue, traffic.send_budget);
                (Carrier::Engine(outlet), outbound)
            }
        };
        self.set_carrier(Some(carrier));
        let signals = signals.with_frames(FrameSink::new(
            self.driver.name().clone(),
            traffic.frames.clone(),
            traffic.received.clone(),
        ));
        let spec = ConnectSpec {
            instance: self.driver.name().clone(),
            generation,
            endpoint,
            resume,
            connect_timeout: self.shared.policy.timeouts.connect,
            outbound,
        };
        let run = self.shared.transport.run(spec, control_rx, signals);
        self.conn = Some(Conn { generation, control, task: tokio::spawn(run), closing: false });
    }

    fn control(&mut self, generation: Generation, ctl: Control) {
        let Some(c) = self.conn.as_mut().filter(|c| c.generation == generation) else { return };
        let close = matches!(ctl, Control::Close { .. });
        match c.control.try_send(ctl) {
            Ok(()) => c.closing |= close,
            // The connection already ended; its end is queued as a signal.
            Err(_) => debug!(%generation, "control message for an ended connection dropped"),
        }
    }

    /// Makes way for a new connection (R9: one per instance). One the rules
    /// just asked to close (R13: the peer asked for a reconnect, and the
    /// next connection starts at once) finishes its close in the background
    /// within the policy's close time-out, so the peer gets the close frame
    /// the rules chose (1012: Discord keeps the session resumable, where a
    /// dropped socket is only a loss); then it is dropped. Its signals come
    /// from an older generation and change nothing (R12). Any other
    /// connection is dropped at once.
    fn retire_conn(&mut self) {
        if let Some(mut c) = self.conn.take_if(|c| c.closing && !c.task.is_finished()) {
            let bound = self.shared.policy.timeouts.close;
            tokio::spawn(async move {
                let _ = tokio::time::timeout(bound, &mut c.task).await;
            });
        }
        self.abort_conn();
    }

    fn abort_conn(&mut self) {
        if let Some(c) = self.conn.take() {
            c.task.abort();
        }
        self.set_carrier(None);
    }

    fn set_carrier(&self, carrier: Option<Carrier>) {
        *self.carrier.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = carrier;
    }

    /// The task ends: drop what it owns; at rest, leave the instance `Idle`.
    /// (A removed instance's tombstone was set at its `Removed` transition;
    /// setting it here could overwrite a new incarnation created meanwhile.)
    fn finish(&mut self) {
        self.abort_conn();
        if let Some(c) = self.cleanup.take() {
            c.abort();
        }
        let state = self.driver.state().clone();
        if self.fenced {
            let name = self.driver.name().clone();
            for w in self.waiters.drain(..) {
                let refused = crate::log::LogError::Fenced { instance: name.clone(), reason: "owned elsewhere".into() };
                let _ = w.reply.send(Err(EngineError::log(Some(name.clone()), refused)));
            }
            if let Some(registry) = self.registry.upgrade() {
                registry.forget(&name, self.token);
            }
            return;
        }
        for w in self.waiters.drain(..) {
            let result =
                if matches!(state, State::Removed { .. }) { Ok(state.clone()) } else { Err(EngineError::ShutDown) };
            let _ = w.reply.send(result);
        }
        if let Some(registry) = self.registry.upgrade() {
            registry.leave(self.driver.name(), self.token, self.view.borrow().clone(), self.spec.clone());
        }
    }
}
