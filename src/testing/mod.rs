//! The property-test harness for test authors (feature `testing`).
//!
//! - [`Driver`]: a simulated runtime around the pure core. It keeps the timers
//!   the core arms, tracks the one live transport, advances virtual time only
//!   when asked, and records every transition — no tokio, no sockets, no clock.
//! - [`strategy`]: proptest strategies for states, inputs and policies.
//! - [`SimTransport`]: a transport without sockets whose faults are scripted.
//! - [`sim_engine`]: an engine on an in-memory log with the simulated
//!   transport and a fixed epoch, for `tokio::time::pause`.
//! - [`simulate_virtual`]: the seeded chaos schedule in virtual time;
//!   the same seed gives the same log, record for record.
//! - [`assert_rules_hold`]: every rule checked on a whole log.
//!
//! Everything is deterministic: the same inputs give the same records.

mod sim;
pub mod strategy;
mod virtual_time;

pub use sim::{SimAction, SimBehaviour, SimTransport};
pub use virtual_time::{
    EPOCH, assert_rules_hold, check_rules, sim_engine, sim_engine_on, simulate_virtual, simulate_virtual_on,
};

use std::collections::BTreeMap;

use crate::machine::{
    ClosingStep, Effect, Generation, Input, Instance, InstanceName, Outcome, Phase, Policy, State, Timer, TimerKind,
    Timestamp, step,
};

/// Appends a driver's history to `log`: a `Created` record (when the driver
/// started from a new instance) and then one record per transition, each at
/// the virtual time it happened. Returns the last sequence number written.
pub fn append_to_log(log: &crate::log::Log, driver: &Driver) -> Result<u64, crate::log::LogError> {
    use crate::log::Event;
    let name = &driver.name;
    let mut seq = log.next_seq(name);
    if driver.steps.first().is_none_or(|s| s.from == Instance::new()) {
        log.append(name, seq, Timestamp(0), Event::created("ws://127.0.0.1:9/"), &Instance::new())?;
        seq += 1;
    }
    for s in &driver.steps {
        let event = Event::Transition { from: s.from.clone(), input: s.input.clone(), effects: s.effects.clone() };
        log.append(name, seq, s.at, event, &s.to)?;
        seq += 1;
    }
    Ok(seq - 1)
}

/// One recorded transition, as the driver saw it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Step {
    /// Virtual time of the input.
    pub at: Timestamp,
    /// The instance before.
    pub from: Instance,
    /// What happened.
    pub input: Input,
    /// The instance after.
    pub to: Instance,
    /// The effects decided.
    pub effects: Vec<Effect>,
}

/// A rule the driver saw broken while carrying out effects.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DriverViolation {
    /// A waiting state without the timer that bounds its wait.
    #[error("{state} waits without its {kind:?} timer armed")]
    UnboundedWait {
        /// The state, printed.
        state: String,
        /// The timer it should have.
        kind: TimerKind,
    },
    /// R9: a transport was opened while another was live.
    #[error("R9: opened {opened} while {live} was live")]
    TwoLiveTransports {
        /// The live generation.
        live: Generation,
        /// The generation opened on top of it.
        opened: Generation,
    },
}

/// A simulated runtime for one instance.
#[derive(Clone, Debug)]
pub struct Driver {
    /// The instance's name (seeds jitter).
    pub name: InstanceName,
    /// The policy.
    pub policy: Policy,
    /// The instance.
    pub instance: Instance,
    /// Virtual time.
    pub now: Timestamp,
    /// Armed timers and when they are due.
    pub timers: BTreeMap<Timer, Timestamp>,
    /// The generation of the live transport, if any.
    pub live: Option<Generation>,
    /// Every transition so far.
    pub steps: Vec<Step>,
    /// Rules seen broken while carrying out effects (must stay empty).
    pub violations: Vec<DriverViolation>,
}

impl Driver {
    /// A driver for a freshly created instance at time 0.
    pub fn new(name: InstanceName, policy: Policy) -> Self {
        Self::with_instance(name, policy, Instance::new())
    }

    /// A driver starting from any instance, as if the runtime had reached it:
    /// a state with a socket has a live transport, and a waiting state has the
    /// timer that bounds its wait armed (due after the policy's time-out).
    pub fn with_instance(name: InstanceName, policy: Policy, instance: Instance) -> Self {
        // A socket whose close was already requested no longer counts as live (R9).
        let closing = matches!(instance.state, State::Closing { step: ClosingStep::ClosingSocket { .. }, .. });
        let live = (instance.state.has_socket() && !closing).then_some(instance.generation);
        let mut timers = BTreeMap::new();
        if let Some(kind) = waits_on(&instance.state) {
            let t = &policy.timeouts;
            let after = match kind {
                TimerKind::Reconnect => policy.backoff.base,
                TimerKind::Connect => t.connect,
                TimerKind::Logout => t.logout,
                TimerKind::Close => t.close,
                TimerKind::Cleanup => t.cleanup,
            };
            timers.insert(Timer { kind, generation: instance.generation }, Timestamp(0).saturating_add(after));
        }
        Self { name, policy, instance, now: Timestamp(0), timers, live, steps: Vec::new(), violations: Vec::new() }
    }

    /// Feeds one input at the current virtual time and carries out the effects.
    pub fn feed(&mut self, input: Input) -> Outcome {
        let outcome = step(&self.name, &self.instance, &input, &self.policy, self.now);
        // `Recovered` models a new process: no socket or timer of the old one survives.
        if input == Input::Recovered {
            self.live = None;
            self.timers.clear();
        }
        // A transport that reported its end is gone, whatever the core decides.
        if let Input::TransportClosed { generation, .. } | Input::CloseFinished { generation } = &input
            && self.live == Some(*generation)
        {
            self.live = None;
        }
        if let Outcome::Transition(t) = &outcome {
            let from = self.instance.clone();
            self.instance.apply(t);
            for effect in &t.effects {
                self.carry_out(effect);
            }
            if let Some(kind) = waits_on(&self.instance.state)
                && !self.timers.contains_key(&Timer { kind, generation: self.instance.generation })
            {
                self.violations.push(DriverViolation::UnboundedWait { state: self.instance.state.to_string(), kind });
            }
            self.steps.push(Step { at: self.now, from, input, to: self.instance.clone(), effects: t.effects.clone() });
        }
        outcome
    }

    fn carry_out(&mut self, effect: &Effect) {
        match effect {
            Effect::OpenTransport { generation, .. } => {
                if let Some(live) = self.live {
                    self.violations.push(DriverViolation::TwoLiveTransports { live, opened: *generation });
                }
                self.live = Some(*generation);
            }
            Effect::CloseTransport { generation, .. } | Effect::AbortTransport { generation } => {
                if self.live == Some(*generation) {
                    self.live = None;
                }
            }
            Effect::ArmTimer { timer, after } => {
                self.timers.insert(*timer, self.now.saturating_add(*after));
            }
            Effect::CancelTimer { timer } => {
                self.timers.remove(timer);
            }
            Effect::SendLogout { .. } | Effect::RunCleanup => {}
        }
    }

    /// Advances virtual time to the earliest armed timer and fires it.
    /// Returns `None` when no timer is armed.
    pub fn fire_next_timer(&mut self) -> Option<Outcome> {
        let (&timer, &due) = self.timers.iter().min_by_key(|&(t, due)| (*due, *t))?;
        self.timers.remove(&timer);
        self.now = self.now.max(due);
        Some(self.feed(Input::TimerFired { timer }))
    }

    /// Fires timers until none is armed or `max` have fired; returns how many fired.
    pub fn run_timers(&mut self, max: usize) -> usize {
        let mut fired = 0;
        while fired < max && self.fire_next_timer().is_some() {
            fired += 1;
        }
        fired
    }

    /// Every effect decided so far, in order.
    pub fn effects(&self) -> impl Iterator<Item = &Effect> {
        self.steps.iter().flat_map(|s| s.effects.iter())
    }
}

/// The timer that bounds the wait of a state, if it waits on one. Every state
/// but `Open`, `Closed` and `Removed` waits for something, and every such wait
/// must be bounded by a timer of the current generation (the driver checks it).
pub fn waits_on(state: &State) -> Option<TimerKind> {
    match state {
        State::Connecting { phase: Phase::Backoff { .. }, .. } | State::Zombie { .. } => Some(TimerKind::Reconnect),
        State::Connecting { .. } => Some(TimerKind::Connect),
        State::Closing { step: ClosingStep::LoggingOut, .. } => Some(TimerKind::Logout),
        State::Closing { step: ClosingStep::ClosingSocket { .. }, .. } => Some(TimerKind::Close),
        State::Closing { step: ClosingStep::CleaningUp, .. } => Some(TimerKind::Cleanup),
        State::Open { .. } | State::Closed { .. } | State::Removed { .. } => None,
    }
}

/// `input` re-tagged with generation `g` (host commands and runtime events are
/// returned unchanged). Strategies draw signals for some generation; tests
/// re-target most of them at the instance's current one so they are not all stale.
pub fn retarget(input: &Input, g: Generation) -> Input {
    let mut input = input.clone();
    match &mut input {
        Input::TransportOpened { generation, .. }
        | Input::PairingCode { generation }
        | Input::TransportClosed { generation, .. }
        | Input::WriteFailed { generation, .. }
        | Input::HeartbeatMissed { generation }
        | Input::LogoutConfirmed { generation }
        | Input::LogoutFailed { generation, .. }
        | Input::CloseFinished { generation } => *generation = g,
        Input::TimerFired { timer } => timer.generation = g,
        Input::Connect
        | Input::Logout
        | Input::Delete
        | Input::Restart
        | Input::CleanupFinished { .. }
        | Input::Recovered
        | Input::Panicked { .. } => {}
    }
    input
}
