//! A whole fleet in virtual time without a runtime: one core
//! [`Driver`](crate::machine::Driver) per instance, a scripted peer per
//! instance, the seeded chaos schedule of `lifecycle simulate`, and the
//! rules checked after every step. No tokio, no sockets, no log store: a
//! day of a large fleet takes seconds, and the same seed gives the same
//! report, step for step.
//!
//! Checked after every step: the per-step invariants of the table
//! ([`check_step`](super::fuzz::check_step): R1, R6, R7, R9's generations,
//! R12, timers of the current generation); one live transport at a time
//! (R9); sequence numbers without gaps (R8); no automatic reconnect after a
//! logout until the host connects (R3); a delete reaches `Removed` within
//! its bound (R2); every waiting state has its bounding timer.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::time::Duration;

use super::chaos::{Chaos, schedule_iter};
use super::fuzz::check_step;
use super::harness::waits_on;
use crate::machine::{
    CloseInitiator, Driver, Effect, Fed, Generation, Identity, Input, InstanceName, Outcome, Policy, State, Timer,
    Timestamp, Transition,
};
use crate::transport::{Protocol, ReferenceProtocol};

/// What a fleet-day did, and every rule it saw broken (none, if all is well).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FleetReport {
    /// Instances in the fleet.
    pub instances: usize,
    /// Virtual time simulated.
    pub simulated: Duration,
    /// Inputs fed to drivers (every one checked).
    pub steps: u64,
    /// Transitions (what a log would record).
    pub transitions: u64,
    /// Upkeep steps (heartbeats): checked, not recorded.
    pub upkeep: u64,
    /// Chaos events applied.
    pub chaos: u64,
    /// Rules seen broken, each with where; capped at [`VIOLATIONS_KEPT`].
    pub violations: Vec<String>,
}

/// Violations kept in a report: enough to debug, bounded for a broken build.
pub const VIOLATIONS_KEPT: usize = 100;

/// How long the simulated peer takes to answer anything: a fast network.
const PEER_DELAY: Duration = Duration::from_millis(1);

/// One instance and its simulated peer.
struct Slot {
    driver: Driver,
    /// The connection stopped answering (half-open) until the next one opens.
    silent: bool,
    /// The peer ignores logouts on the current connection.
    hangs_logouts: bool,
    /// After a logout, no automatic move to Connecting until a connect (R3).
    logged_out: bool,
    /// When a delete began, to check its bound (R2).
    deleting_since: Option<Timestamp>,
    /// The deadline last put on the queue for this instance.
    queued: Option<Timestamp>,
}

/// What the queue holds: a timer of an instance is due, or its peer answers.
#[derive(Clone, Debug)]
enum Due {
    Timer,
    Deliver(Box<Input>),
}

/// A queue entry, ordered by time, then by when it was queued (determinism).
struct Queued {
    at: Timestamp,
    order: u64,
    instance: usize,
    due: Due,
}

impl PartialEq for Queued {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.order) == (other.at, other.order)
    }
}

impl Eq for Queued {}

impl PartialOrd for Queued {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Queued {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.at, self.order).cmp(&(other.at, other.order))
    }
}

/// The fleet's state while it runs.
struct Fleet<'p> {
    policy: &'p Policy,
    slots: Vec<Option<Slot>>,
    queue: BinaryHeap<Reverse<Queued>>,
    order: u64,
    now: Timestamp,
    report: FleetReport,
    delete_bound: Duration,
}

/// Runs `instances` through `duration` of the chaos schedule of `seed`
/// under `policy`, checking the rules after every step.
pub fn fleet_day(seed: u64, instances: usize, duration: Duration, policy: &Policy) -> FleetReport {
    fleet_shard(seed, instances, duration, policy, 0, 1)
}

/// The instances `i` with `i % shards == shard` of [`fleet_day`]: shards are
/// independent, so a fleet-day splits across threads (reports add up).
pub fn fleet_shard(
    seed: u64,
    instances: usize,
    duration: Duration,
    policy: &Policy,
    shard: usize,
    shards: usize,
) -> FleetReport {
    let t = &policy.timeouts;
    let mut fleet = Fleet {
        policy,
        slots: (0..instances).map(|_| None).collect(),
        queue: BinaryHeap::new(),
        order: 0,
        now: Timestamp(0),
        report: FleetReport { instances, simulated: duration, ..FleetReport::default() },
        // Logout, close and cleanup, plus the peer's answers on the way.
        delete_bound: t.logout + t.close + t.cleanup + PEER_DELAY * 4,
    };
    let end = Timestamp(0).saturating_add(duration);
    let mut chaos = schedule_iter(seed, instances, duration, true)
        .filter(|(_, i, what)| i % shards.max(1) == shard || *what == Chaos::EngineRestart);
    let mut next = chaos.next();
    loop {
        let queued = fleet.queue.peek().map(|Reverse(q)| q.at);
        match (next.as_ref().map(|(at, ..)| Timestamp(0).saturating_add(*at)), queued) {
            (Some(c), q) if q.is_none_or(|q| c <= q) => {
                if let Some((_, i, what)) = next.take() {
                    fleet.now = c;
                    fleet.report.chaos += 1;
                    fleet.chaos(i, what, shard, shards);
                }
                next = chaos.next();
            }
            (_, Some(q)) if q <= end => {
                let Some(Reverse(q)) = fleet.queue.pop() else { break };
                fleet.now = q.at;
                fleet.due(q.instance, q.due);
            }
            _ => break,
        }
    }
    fleet.report
}

/// Where a violation happened, for its message (formatted only then).
fn at(i: usize, now: Timestamp) -> String {
    format!("{}@{}ms", name(i), now.0)
}

fn name(i: usize) -> InstanceName {
    InstanceName::new(format!("sim-{i:04}")).unwrap_or_else(|_| unreachable!("a valid generated name"))
}

impl Fleet<'_> {
    fn violation(&mut self, what: String) {
        if self.report.violations.len() < VIOLATIONS_KEPT {
            self.report.violations.push(what);
        }
    }

    fn push(&mut self, at: Timestamp, instance: usize, due: Due) {
        self.order += 1;
        self.queue.push(Reverse(Queued { at, order: self.order, instance, due }));
    }

    fn deliver(&mut self, i: usize, input: Input) {
        self.push(self.now.saturating_add(PEER_DELAY), i, Due::Deliver(Box::new(input)));
    }

    fn chaos(&mut self, i: usize, what: Chaos, shard: usize, shards: usize) {
        if what == Chaos::EngineRestart {
            // A new process: every instance of this shard that was not at rest is recovered.
            for k in (0..self.slots.len()).filter(|k| k % shards.max(1) == shard) {
                if let Some(slot) = self.slots[k].as_mut() {
                    slot.silent = false;
                    slot.hangs_logouts = false;
                    slot.queued = None;
                    self.feed(k, Input::Recovered);
                }
            }
            return;
        }
        let live = self.slots[i].as_ref().and_then(|s| s.driver.live());
        match what {
            Chaos::Create => {
                if self.slots[i].is_none() {
                    self.slots[i] = Some(Slot {
                        driver: Driver::new(name(i)),
                        silent: false,
                        hangs_logouts: false,
                        logged_out: false,
                        deleting_since: None,
                        queued: None,
                    });
                }
                self.feed(i, Input::Connect);
            }
            Chaos::Connect => {
                let removed = self.slots[i].as_ref().is_some_and(|s| matches!(s.driver.state(), State::Removed { .. }));
                if removed {
                    self.slots[i] = None;
                    self.chaos(i, Chaos::Create, shard, shards);
                } else {
                    self.feed(i, Input::Connect);
                }
            }
            Chaos::Logout => self.feed(i, Input::Logout),
            Chaos::Delete => self.feed(i, Input::Delete),
            Chaos::Restart => self.feed(i, Input::Restart),
            Chaos::Zombify | Chaos::DeleteZombie => {
                if let Some(slot) = self.slots[i].as_mut().filter(|_| live.is_some()) {
                    slot.silent = true;
                }
                if what == Chaos::DeleteZombie {
                    // The host deletes once the heartbeat has had its time to find it.
                    let hb = self.policy.heartbeat;
                    let at = self.now.saturating_add(hb.interval + hb.deadline);
                    self.push(at, i, Due::Deliver(Box::new(Input::Delete)));
                }
            }
            Chaos::Close(code) => {
                if let Some(generation) = live.filter(|_| !self.silent(i)) {
                    let status = Some(ReferenceProtocol.status_of(code));
                    let reason = "closed by the peer".into();
                    self.deliver(
                        i,
                        Input::TransportClosed { generation, initiator: CloseInitiator::Peer, status, reason },
                    );
                }
            }
            Chaos::Drop => {
                if let Some(generation) = live {
                    let reason = "connection lost".into();
                    let input = Input::TransportClosed {
                        generation,
                        initiator: CloseInitiator::Transport,
                        status: None,
                        reason,
                    };
                    self.deliver(i, input);
                }
            }
            Chaos::HangingLogout => {
                if let Some(slot) = self.slots[i].as_mut() {
                    slot.hangs_logouts = true;
                }
                self.feed(i, Input::Logout);
            }
            Chaos::EngineRestart => {}
        }
    }

    fn silent(&self, i: usize) -> bool {
        self.slots[i].as_ref().is_some_and(|s| s.silent)
    }

    fn due(&mut self, i: usize, due: Due) {
        match due {
            Due::Deliver(input) => self.feed(i, *input),
            Due::Timer => {
                if let Some(slot) = self.slots[i].as_mut() {
                    slot.queued = None;
                }
                while let Some(input) = self.slots[i].as_mut().and_then(|s| s.driver.on_timeout(self.now)) {
                    self.feed(i, input);
                }
                self.queue_timer(i);
            }
        }
    }

    /// Puts the instance's next deadline on the queue, unless an earlier one is there.
    fn queue_timer(&mut self, i: usize) {
        let Some(slot) = self.slots[i].as_mut() else { return };
        let Some(deadline) = slot.driver.poll_timeout() else { return };
        if slot.queued.is_some_and(|q| q <= deadline) {
            return;
        }
        slot.queued = Some(deadline);
        self.push(deadline.max(self.now), i, Due::Timer);
    }

    /// One step: feed, check, carry out what the peer would answer.
    fn feed(&mut self, i: usize, input: Input) {
        let Some(slot) = self.slots[i].as_mut() else { return };
        self.report.steps += 1;
        let (from, live_before, seq_before) = (slot.driver.instance().clone(), slot.driver.live(), slot.driver.seq());
        // The recorder of a log that never fails: it records at the sequence number asked.
        let fed =
            slot.driver.feed_now(self.policy, input.clone(), self.now, |p| Ok::<_, std::convert::Infallible>(p.seq));
        let Ok(fed) = fed;
        let outcome = match &fed {
            Fed::Moved(p) => Outcome::Transition(Transition {
                generation: p.to.generation,
                to: p.to.state.clone(),
                effects: p.effects.clone(),
            }),
            Fed::Upkeep(e) => Outcome::Effects(e.clone()),
            Fed::Ignored(why) => Outcome::Ignored(why.clone()),
            Fed::Rejected(why) => Outcome::Rejected(why.clone()),
        };
        if let Err(panic) = std::panic::catch_unwind(|| check_step(&from, &input, &outcome)) {
            let message = crate::panic_message(&panic);
            let at = at(i, self.now);
            self.violation(format!("{at}: {message} ({input:?} from {})", from.state));
        }
        match &fed {
            Fed::Moved(p) => {
                self.report.transitions += 1;
                if p.seq != seq_before + 1 {
                    let at = at(i, self.now);
                    self.violation(format!("{at}: R8: a gap, seq {} after {seq_before}", p.seq));
                }
                self.after_move(i, &input, p, live_before);
            }
            Fed::Upkeep(_) => self.report.upkeep += 1,
            Fed::Ignored(_) | Fed::Rejected(_) => {}
        }
        for effect in fed.io() {
            self.answer(i, effect);
        }
        self.queue_timer(i);
    }

    /// The rules a single step cannot see: R9 (one live transport), R8
    /// (sequence numbers), R3, R2, and the bound on every wait.
    fn after_move(&mut self, i: usize, input: &Input, p: &crate::machine::Pending, live_before: Option<Generation>) {
        let now = self.now;
        let at = || at(i, now);
        let mut live = if input.ends_connection() && input.generation() == live_before { None } else { live_before };
        if *input == Input::Recovered {
            live = None;
        }
        for e in &p.effects {
            match e {
                Effect::OpenTransport { generation, .. } => {
                    if let Some(old) = live {
                        self.violation(format!("{}: R9: opened {generation} while {old} was live", at()));
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
        let delete_bound = self.delete_bound;
        let mut broken = Vec::new();
        if let Some(slot) = self.slots[i].as_mut() {
            if slot.driver.seq() != p.seq {
                broken.push(format!("{}: R8: recorded as {}, the driver is at {}", at(), p.seq, slot.driver.seq()));
            }
            match input {
                Input::Connect | Input::Restart => slot.logged_out = false,
                Input::Logout => slot.logged_out = true,
                _ => {}
            }
            if slot.logged_out && !input.is_host_command() && matches!(p.to.state, State::Connecting { .. }) {
                broken.push(format!("{}: R3: reconnected on {} after a logout", at(), input.kind()));
            }
            if matches!(p.to.state, State::Closing { intent: crate::machine::Intent::Delete, .. }) {
                slot.deleting_since.get_or_insert(now);
            }
            if let Some(since) = slot.deleting_since.filter(|since| now.saturating_since(*since) > delete_bound) {
                broken.push(format!("{}: R2: a delete still going after {:?}", at(), now.saturating_since(since)));
            }
            if matches!(p.to.state, State::Removed { .. }) {
                slot.deleting_since = None;
            }
            if let Some(kind) = waits_on(&p.to.state)
                && !slot.driver.timers().contains_key(&Timer { kind, generation: p.to.generation })
            {
                broken.push(format!("{}: {} waits without its {kind:?} timer", at(), p.to.state));
            }
        }
        for b in broken {
            self.violation(b);
        }
    }

    /// What the simulated peer does about an effect.
    fn answer(&mut self, i: usize, effect: &Effect) {
        let (silent, hangs) = self.slots[i].as_ref().map_or((true, false), |s| (s.silent, s.hangs_logouts));
        match effect {
            Effect::OpenTransport { generation, resume } => {
                if let Some(slot) = self.slots[i].as_mut() {
                    slot.silent = false;
                    slot.hangs_logouts = false;
                }
                let identity = resume.clone().or_else(|| Identity::new(format!("peer-{i}")).ok());
                self.deliver(i, Input::TransportOpened { generation: *generation, identity });
            }
            Effect::SendPing { generation } if !silent => self.deliver(i, Input::Pong { generation: *generation }),
            Effect::SendLogout { generation } if !silent && !hangs => {
                self.deliver(i, Input::LogoutConfirmed { generation: *generation });
            }
            Effect::CloseTransport { generation, status } if !silent => {
                let reason = "closed".into();
                let input = Input::TransportClosed {
                    generation: *generation,
                    initiator: CloseInitiator::Local,
                    status: Some(*status),
                    reason,
                };
                self.deliver(i, input);
            }
            Effect::RunCleanup => self.deliver(i, Input::CleanupFinished { steps: Vec::new() }),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::machine::Preset;

    #[test]
    fn an_hour_of_a_small_fleet_keeps_every_rule_and_is_reproducible() {
        let policy = Policy::preset(Preset::Whatsapp);
        let report = fleet_day(7, 100, Duration::from_secs(3_600), &policy);
        assert!(report.violations.is_empty(), "{:#?}", report.violations);
        assert!(report.transitions > 10_000 && report.upkeep > 1_000, "{report:?}");
        assert_eq!(report, fleet_day(7, 100, Duration::from_secs(3_600), &policy), "same seed, same day");
        let shards: Vec<FleetReport> =
            (0..2).map(|k| fleet_shard(7, 100, Duration::from_secs(3_600), &policy, k, 2)).collect();
        assert_eq!(shards.iter().map(|r| r.transitions).sum::<u64>(), report.transitions, "shards add up");
    }
}
