//! One task per instance: it owns the instance's state machine, takes host
//! commands and transport signals through channels, asks the core what to do,
//! logs the transition, applies it, then carries out the effects. It never
//! holds a shared lock across an await and never waits on another instance.
//! A supervisor catches a panic in the task (or in a host hook it calls),
//! records it through the rules (R10), and goes on.

use std::collections::BTreeMap;
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Weak};

use futures_util::FutureExt;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::{Instant, sleep_until};
use tracing::{Instrument, debug, error, trace};

use super::{EngineError, Notification, Registry, Shared, View};
use crate::log::{Event, InstanceSpec};
use crate::machine::{Effect, Ignored, Input, InstanceName, Outcome, State, Timer, step};
use crate::panic_message;
use crate::transport::{ConnectSpec, Control, Signals};

/// A message to an instance task.
pub(crate) enum Msg {
    /// A host command (named for errors) and where to send its result.
    Command { input: Input, command: &'static str, reply: Reply },
    /// Stop: drop the socket, keep the recorded state.
    Shutdown(oneshot::Sender<()>),
}

/// Where a command's result goes.
pub(crate) type Reply = oneshot::Sender<Result<State, EngineError>>;

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
    generation: crate::machine::Generation,
    control: mpsc::Sender<Control>,
    task: JoinHandle<()>,
}

/// Control messages queued per connection: a logout and a close at most.
const CONTROL_CAPACITY: usize = 4;

pub(crate) struct Task {
    pub(crate) name: InstanceName,
    pub(crate) spec: InstanceSpec,
    pub(crate) view: watch::Sender<View>,
    pub(crate) shared: Arc<Shared>,
    pub(crate) registry: Weak<Registry>,
    pub(crate) signals_tx: mpsc::Sender<Box<Input>>,
    /// Tells this task's registry entry from a later incarnation's.
    token: u64,
    /// The command being handled, until it is answered or parked as a waiter.
    in_flight: Option<(&'static str, Reply)>,
    conn: Option<Conn>,
    timers: BTreeMap<Timer, Instant>,
    waiters: Vec<Waiter>,
    cleanup: Option<JoinHandle<()>>,
}

/// Messages are boxed: tokio's mpsc allocates a block of 32 slots up front per
/// channel, so small slots keep an idle instance small.
pub(crate) struct Channels {
    pub(crate) commands: mpsc::Receiver<Box<Msg>>,
    pub(crate) signals: mpsc::Receiver<Box<Input>>,
}

impl Task {
    pub(crate) fn new(
        name: InstanceName,
        spec: InstanceSpec,
        view: watch::Sender<View>,
        shared: Arc<Shared>,
        registry: Weak<Registry>,
        signals_tx: mpsc::Sender<Box<Input>>,
        token: u64,
    ) -> Self {
        Self {
            name,
            spec,
            view,
            shared,
            registry,
            signals_tx,
            token,
            in_flight: None,
            conn: None,
            timers: BTreeMap::new(),
            waiters: Vec::new(),
            cleanup: None,
        }
    }

    /// Runs the instance until it is removed, shut down, or the engine is dropped.
    pub(crate) async fn supervise(mut self, mut ch: Channels, initial: Vec<Effect>) {
        let span = tracing::info_span!("instance", instance = %self.name);
        async move {
            self.carry_out(&initial);
            loop {
                match AssertUnwindSafe(self.run(&mut ch)).catch_unwind().await {
                    Ok(()) => break,
                    Err(panic) => {
                        let message = crate::transport::bounded(panic_message(&panic));
                        error!(%message, "instance task panicked; recording it and going on (R10)");
                        self.abort_conn();
                        self.timers.clear();
                        // Boxed: this rare path must not grow every idle task's future.
                        if let Err(e) = Box::pin(self.feed(Input::Panicked { message })).await {
                            error!(error = %e, "could not record the panic; stopping this instance");
                            break;
                        }
                        // The command whose handling panicked learns it now, after the record.
                        if let Some((command, reply)) = self.in_flight.take() {
                            let _ = reply.send(Err(EngineError::Interrupted { name: self.name.clone(), command }));
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
        matches!(self.view.borrow().instance.state, State::Removed { .. })
    }

    /// At rest: `Closed` with nothing in flight. Every input a `Closed`
    /// instance could still get (a stale timer, a late signal) is ignored by
    /// the rules, so the task can end and leave only a registry entry.
    fn resting(&self) -> bool {
        matches!(self.view.borrow().instance.state, State::Closed { .. })
            && self.conn.is_none()
            && self.waiters.is_empty()
            && self.cleanup.as_ref().is_none_or(JoinHandle::is_finished)
    }

    fn park(&self, ch: &Channels) -> bool {
        let Some(registry) = self.registry.upgrade() else { return false };
        let view = self.view.borrow().clone();
        registry
            .park(&self.name, self.token, view, self.spec.clone(), || ch.commands.is_empty() && ch.signals.is_empty())
    }

    async fn run(&mut self, ch: &mut Channels) {
        loop {
            if self.removed() || (self.resting() && self.park(ch)) {
                return;
            }
            let due = self.timers.values().min().copied();
            tokio::select! {
                biased;
                // The handlers are boxed so the idle loop's future stays small.
                msg = ch.commands.recv() => match msg.map(|m| *m) {
                    None => return,
                    Some(Msg::Shutdown(done)) => {
                        self.abort_conn();
                        let _ = done.send(());
                        return;
                    }
                    Some(Msg::Command { input, command, reply }) => Box::pin(self.command(input, command, reply)).await,
                },
                Some(input) = ch.signals.recv() => Box::pin(self.signal(*input)).await,
                () = sleep_until(due.unwrap_or_else(Instant::now)), if due.is_some() => Box::pin(self.fire_timers()).await,
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
        let fed = self.feed(input).await;
        let Some((_, reply)) = self.in_flight.take() else { return };
        match fed {
            Err(e) => {
                let _ = reply.send(Err(e));
            }
            Ok(Outcome::Rejected(r)) => {
                let _ = reply.send(Err(EngineError::rejected(&self.name, r)));
            }
            Ok(_) => match goal {
                Some(goal) if !self.reached(goal) => self.waiters.push(Waiter { goal, reply }),
                _ => {
                    let _ = reply.send(Ok(self.view.borrow().instance.state.clone()));
                }
            },
        }
    }

    fn reached(&self, goal: Goal) -> bool {
        matches!(
            (&self.view.borrow().instance.state, goal),
            (State::Removed { .. }, _) | (State::Closed { .. }, Goal::Closed)
        )
    }

    async fn signal(&mut self, input: Input) {
        // A connection that reported its end is over: forget it (its task ends by itself).
        let terminal = matches!(
            input,
            Input::TransportClosed { .. }
                | Input::HeartbeatMissed { .. }
                | Input::WriteFailed { .. }
                | Input::LogoutFailed { .. }
                | Input::CloseFinished { .. }
        );
        if terminal && self.conn.as_ref().map(|c| Some(c.generation)) == Some(input.generation()) {
            self.conn = None;
        }
        if let Err(e) = self.feed(input).await {
            error!(error = %e, "transition not recorded; the instance did not move (R8)");
        }
    }

    async fn fire_timers(&mut self) {
        let now = Instant::now();
        let due: Vec<Timer> = self.timers.iter().filter(|&(_, &at)| at <= now).map(|(t, _)| *t).collect();
        for timer in due {
            self.timers.remove(&timer);
            if let Err(e) = self.feed(Input::TimerFired { timer }).await {
                error!(error = %e, "transition not recorded; the instance did not move (R8)");
            }
        }
    }

    /// Asks the rules; on a transition, logs it, then applies it, then carries out its effects.
    async fn feed(&mut self, input: Input) -> Result<Outcome, EngineError> {
        let now = self.shared.clock.now();
        let (from, seq) = {
            let v = self.view.borrow();
            (v.instance.clone(), v.seq)
        };
        let outcome = step(&self.name, &from, &input, &self.shared.policy, now);
        match &outcome {
            Outcome::Transition(t) => {
                let mut to = from.clone();
                to.apply(t);
                let event = Event::Transition { from: from.clone(), input: input.clone(), effects: t.effects.clone() };
                let appended = self
                    .shared
                    .log
                    .append_async(&self.name, seq.saturating_add(1), now, event, &to)
                    .await
                    .map_err(|source| EngineError::log(Some(self.name.clone()), source))?;
                debug!(seq = appended.seq, input = %input.kind(), from = %from.state, to = %to.state, "transition");
                let notification = Notification {
                    instance: self.name.clone(),
                    seq: appended.seq,
                    at: now,
                    input: input.kind(),
                    from: from.state.kind(),
                    to: to.state.clone(),
                };
                let removed = matches!(to.state, State::Removed { .. });
                self.view.send_replace(View { instance: to, seq: appended.seq });
                if removed && let Some(registry) = self.registry.upgrade() {
                    // Before any waiter hears "removed": a create that follows at once finds the name free.
                    registry.tombstone(&self.name);
                }
                self.carry_out(&t.effects);
                let _ = self.shared.notifications.send(notification.clone());
                if let Some(hook) = &self.shared.on_transition {
                    hook(&notification);
                }
                self.resolve_waiters();
            }
            // R12 and friends: nothing moves; say why in the trace.
            Outcome::Ignored(why @ Ignored::Stale { .. }) => {
                debug!(input = %input.kind(), reason = %why, "stale input ignored (R12)")
            }
            Outcome::Ignored(why) => trace!(input = %input.kind(), reason = %why, "input ignored"),
            Outcome::Rejected(why) => debug!(input = %input.kind(), reason = %why, "command rejected"),
        }
        Ok(outcome)
    }

    fn resolve_waiters(&mut self) {
        let state = self.view.borrow().instance.state.clone();
        let waiters = std::mem::take(&mut self.waiters);
        for w in waiters {
            if self.reached(w.goal) {
                let _ = w.reply.send(Ok(state.clone()));
            } else {
                self.waiters.push(w);
            }
        }
    }

    fn carry_out(&mut self, effects: &[Effect]) {
        for effect in effects {
            match effect {
                Effect::OpenTransport { generation, resume } => {
                    // R9: one transport per instance; a new generation replaces the old.
                    self.abort_conn();
                    let (control, control_rx) = mpsc::channel(CONTROL_CAPACITY);
                    let spec = ConnectSpec {
                        instance: self.name.clone(),
                        generation: *generation,
                        url: self.spec.url.clone(),
                        resume: resume.clone(),
                        heartbeat: self.shared.policy.heartbeat,
                        connect_timeout: self.shared.policy.timeouts.connect,
                    };
                    let run =
                        self.shared.transport.run(spec, control_rx, Signals::new(*generation, self.signals_tx.clone()));
                    self.conn = Some(Conn { generation: *generation, control, task: tokio::spawn(run) });
                }
                Effect::SendLogout { generation } => self.control(*generation, Control::SendLogout),
                Effect::CloseTransport { generation, status } => {
                    self.control(*generation, Control::Close { status: *status })
                }
                Effect::AbortTransport { generation } => {
                    if self.conn.as_ref().is_some_and(|c| c.generation == *generation) {
                        self.abort_conn();
                    }
                }
                Effect::ArmTimer { timer, after } => {
                    self.timers.insert(*timer, Instant::now() + *after);
                }
                Effect::CancelTimer { timer } => {
                    self.timers.remove(timer);
                }
                Effect::RunCleanup => {
                    let run = super::cleanup::run(
                        self.shared.cleanup.clone(),
                        self.name.clone(),
                        self.shared.cleanup_step_timeout,
                        self.signals_tx.clone(),
                    );
                    if let Some(old) = self.cleanup.replace(tokio::spawn(run)) {
                        old.abort();
                    }
                }
            }
        }
    }

    fn control(&mut self, generation: crate::machine::Generation, ctl: Control) {
        if let Some(c) = self.conn.as_ref().filter(|c| c.generation == generation)
            && c.control.try_send(ctl).is_err()
        {
            // The connection already ended; its end is queued as a signal.
            debug!(%generation, "control message for an ended connection dropped");
        }
    }

    fn abort_conn(&mut self) {
        if let Some(c) = self.conn.take() {
            c.task.abort();
        }
    }

    /// The task ends: drop what it owns. (A removed instance's tombstone was
    /// set at its `Removed` transition; setting it here could overwrite a new
    /// incarnation created meanwhile.)
    fn finish(&mut self) {
        self.abort_conn();
        if let Some(c) = self.cleanup.take() {
            c.abort();
        }
        let state = self.view.borrow().instance.state.clone();
        for w in self.waiters.drain(..) {
            let result =
                if matches!(state, State::Removed { .. }) { Ok(state.clone()) } else { Err(EngineError::ShutDown) };
            let _ = w.reply.send(result);
        }
    }
}
