//! The harness's driver: the core's driver in virtual time, with the checks
//! a runtime owes the rules, and what tests need around it.

use std::collections::BTreeMap;

use crate::machine::{
    self, ClosingStep, Effect, Fed, Generation, Input, Instance, InstanceName, Outcome, Phase, Policy, State, Timer,
    TimerKind, Timestamp, Transition,
};

/// Appends a driver's history to `log`: a `Created` record (when the driver
/// started from a new instance) and then one record per transition, each at
/// the virtual time it happened. Returns the last sequence number written.
pub fn append_to_log(log: &crate::log::Log, driver: &Driver) -> Result<u64, crate::log::LogError> {
    use crate::log::Event;
    let name = driver.name();
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

/// The core's driver in virtual time, for one instance: it feeds inputs at
/// [`Driver::now`], fires the timers the core arms, records every
/// transition, and checks the runtime-level rules after each.
#[derive(Clone, Debug)]
pub struct Driver {
    inner: machine::Driver,
    /// The policy.
    pub policy: Policy,
    /// Virtual time.
    pub now: Timestamp,
    /// Every transition so far.
    pub steps: Vec<Step>,
    /// Rules seen broken while carrying out effects (must stay empty).
    pub violations: Vec<DriverViolation>,
    /// Whether the simulated peer answers each ping at once (a healthy
    /// connection; the default). Set it to `false` to let the heartbeat
    /// find a half-open one (R7).
    pub answers_pings: bool,
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
                TimerKind::Heartbeat => policy.heartbeat.interval,
                TimerKind::PongDeadline => policy.heartbeat.deadline,
            };
            timers.insert(Timer { kind, generation: instance.generation }, Timestamp(0).saturating_add(after));
        }
        if matches!(instance.state, State::Open { .. }) {
            let timer = Timer { kind: TimerKind::Heartbeat, generation: instance.generation };
            timers.insert(timer, Timestamp(0).saturating_add(policy.heartbeat.interval));
        }
        let inner = machine::Driver::in_flight(name, instance, 0, timers, live);
        Self { inner, policy, now: Timestamp(0), steps: Vec::new(), violations: Vec::new(), answers_pings: true }
    }

    /// The instance's name.
    pub fn name(&self) -> &InstanceName {
        self.inner.name()
    }

    /// The instance now.
    pub fn instance(&self) -> &Instance {
        self.inner.instance()
    }

    /// Armed timers and when they are due.
    pub fn timers(&self) -> &BTreeMap<Timer, Timestamp> {
        self.inner.timers()
    }

    /// The generation of the live transport, if any.
    pub fn live(&self) -> Option<Generation> {
        self.inner.live()
    }

    /// Feeds one input at the current virtual time through the core's
    /// driver, records a transition, and checks the runtime-level rules.
    pub fn feed(&mut self, input: Input) -> Outcome {
        let live_before = match &input {
            Input::Recovered => None,
            i if i.ends_connection() && i.generation() == self.inner.live() => None,
            _ => self.inner.live(),
        };
        let fed = self.inner.feed_now(&self.policy, input, self.now, |p| Ok::<_, std::convert::Infallible>(p.seq));
        let Ok(fed) = fed;
        match fed {
            Fed::Moved(p) => {
                self.check_one_live(live_before, &p.effects);
                if let Some(kind) = waits_on(&p.to.state)
                    && !self.timers().contains_key(&Timer { kind, generation: p.to.generation })
                {
                    self.violations.push(DriverViolation::UnboundedWait { state: p.to.state.to_string(), kind });
                }
                let t = Transition { generation: p.to.generation, to: p.to.state.clone(), effects: p.effects.clone() };
                self.steps.push(Step { at: p.at, from: p.from, input: p.input, to: p.to, effects: p.effects });
                Outcome::Transition(t)
            }
            Fed::Upkeep(effects) => {
                let pinged = effects.iter().find_map(|e| match e {
                    Effect::SendPing { generation } => Some(*generation),
                    _ => None,
                });
                if let Some(generation) = pinged.filter(|_| self.answers_pings) {
                    self.feed(Input::Pong { generation });
                }
                Outcome::Effects(effects)
            }
            Fed::Ignored(why) => Outcome::Ignored(why),
            Fed::Rejected(why) => Outcome::Rejected(why),
        }
    }

    /// R9, checked apart from the driver's own bookkeeping: in effect order,
    /// a transport is opened only when none is live.
    fn check_one_live(&mut self, mut live: Option<Generation>, effects: &[Effect]) {
        for effect in effects {
            match effect {
                Effect::OpenTransport { generation, .. } => {
                    if let Some(live) = live {
                        self.violations.push(DriverViolation::TwoLiveTransports { live, opened: *generation });
                    }
                    live = Some(*generation);
                }
                Effect::CloseTransport { generation, .. } | Effect::AbortTransport { generation }
                    if live == Some(*generation) =>
                {
                    live = None;
                }
                _ => {}
            }
        }
    }

    /// Advances virtual time to the earliest armed timer and fires it.
    /// Returns `None` when no timer is armed.
    pub fn fire_next_timer(&mut self) -> Option<Outcome> {
        let due = self.inner.poll_timeout()?;
        self.now = self.now.max(due);
        let input = self.inner.on_timeout(self.now)?;
        Some(self.feed(input))
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
        | Input::TransportClosedV1 { generation, .. }
        | Input::Pong { generation }
        | Input::ReconnectRequested { generation }
        | Input::SessionInvalid { generation, .. }
        | Input::HeartbeatDue { generation, .. }
        | Input::HandshakeStep { generation }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::machine::Preset;

    #[test]
    fn an_open_instance_starts_with_its_heartbeat() {
        let name = InstanceName::new("h").expect("valid");
        let open = Instance {
            generation: Generation(2),
            state: State::Open {
                identity: crate::machine::Identity::new("p").expect("id"),
                since: Timestamp(0),
                retries: 0,
            },
        };
        let d = Driver::with_instance(name, Policy::preset(Preset::Whatsapp), open);
        assert!(d.timers().keys().any(|t| t.kind == TimerKind::Heartbeat));
        assert_eq!(d.live(), Some(Generation(2)));
    }
}
