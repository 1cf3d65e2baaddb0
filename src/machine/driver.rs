//! One instance's lifecycle, sans I/O: the instance, its sequence number, its
//! timers and its live connection, around [`step`]. Every runtime drives its
//! instances through a `Driver` — the engine's task, recovery at start-up,
//! the harness's virtual time — so the write path (decide → record → apply →
//! carry out) and the timer table exist once (in the spirit of quinn-proto's
//! `Connection`: inputs go in with `now`, effects and the next deadline come out).
//!
//! - [`Driver::feed`] is the write path: [`step`] decides; a transition is
//!   handed to the caller's recorder (the log) and applied only once it is
//!   recorded (R8); timer effects go into the driver's own table; what is left
//!   are the I/O effects for the runtime (open, send logout, close, abort,
//!   ping, cleanup). Upkeep (a heartbeat's ping, a pong) is not recorded.
//! - [`Driver::poll_timeout`] is the next deadline; [`Driver::on_timeout`]
//!   turns a due timer into its input. Deadlines are [`Timestamp`]s on the
//!   same clock `step` is given, so there is one notion of time.

use std::collections::BTreeMap;

use super::effect::Effect;
use super::input::{Input, Timer};
use super::policy::Policy;
use super::rules::{Ignored, Outcome, Rejection, Transition, step};
use super::state::{Instance, State};
use super::types::{Generation, InstanceName, Timestamp};

/// One instance, driven.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Driver {
    name: InstanceName,
    instance: Instance,
    /// The sequence number of the instance's last record (0: none yet).
    seq: u64,
    /// Armed timers and when they are due.
    timers: BTreeMap<Timer, Timestamp>,
    /// The connection that may still become (or is) a usable session: set by
    /// opening one, cleared by closing or aborting it or by its end (R9: at
    /// most one at a time).
    live: Option<Generation>,
}

/// A transition decided and not yet recorded: what the recorder writes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pending {
    /// The sequence number the record must get.
    pub seq: u64,
    /// The time of the input.
    pub at: Timestamp,
    /// The instance before.
    pub from: Instance,
    /// What happened.
    pub input: Input,
    /// The instance after.
    pub to: Instance,
    /// Everything the transition asks for, timers included, in order.
    pub effects: Vec<Effect>,
}

/// What feeding an input did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Fed {
    /// A transition, recorded and applied: carry out the I/O effects of `effects`.
    Moved(Pending),
    /// No state change, but effects to carry out (the driver already kept the timers).
    Upkeep(Vec<Effect>),
    /// Nothing changes, for a stated reason.
    Ignored(Ignored),
    /// A host command the state does not allow.
    Rejected(Rejection),
}

impl Fed {
    /// The effects the runtime carries out on the world, in order.
    pub fn io(&self) -> impl Iterator<Item = &Effect> {
        let effects = match self {
            Self::Moved(p) => p.effects.as_slice(),
            Self::Upkeep(e) => e.as_slice(),
            Self::Ignored(_) | Self::Rejected(_) => &[],
        };
        effects.iter().filter(|e| e.is_io())
    }
}

impl Driver {
    /// A new instance, never recorded.
    pub fn new(name: InstanceName) -> Self {
        Self::restored(name, Instance::new(), 0)
    }

    /// An instance as the log last recorded it (`seq` is its last record's).
    /// No timer is armed and no connection is live: a new process starts
    /// without any of the last one's (R11).
    pub fn restored(name: InstanceName, instance: Instance, seq: u64) -> Self {
        Self { name, instance, seq, timers: BTreeMap::new(), live: None }
    }

    /// An instance as a runtime holds it mid-flight: these timers armed,
    /// this connection live (the harness starts drivers from any state so).
    pub fn in_flight(
        name: InstanceName,
        instance: Instance,
        seq: u64,
        timers: BTreeMap<Timer, Timestamp>,
        live: Option<Generation>,
    ) -> Self {
        Self { name, instance, seq, timers, live }
    }

    /// The instance's name.
    pub fn name(&self) -> &InstanceName {
        &self.name
    }

    /// The instance now.
    pub fn instance(&self) -> &Instance {
        &self.instance
    }

    /// The state now.
    pub fn state(&self) -> &State {
        &self.instance.state
    }

    /// The sequence number of the last record.
    pub fn seq(&self) -> u64 {
        self.seq
    }

    /// The armed timers and when each is due.
    pub fn timers(&self) -> &BTreeMap<Timer, Timestamp> {
        &self.timers
    }

    /// The connection that may still become (or is) a usable session.
    pub fn live(&self) -> Option<Generation> {
        self.live
    }

    /// The earliest deadline of an armed timer.
    pub fn poll_timeout(&self) -> Option<Timestamp> {
        self.timers.values().min().copied()
    }

    /// The input of the earliest timer due at `now`, if any (it is disarmed).
    /// Timers due at the same moment fire in [`Timer`] order.
    pub fn on_timeout(&mut self, now: Timestamp) -> Option<Input> {
        let (&timer, _) = self.timers.iter().filter(|&(_, &due)| due <= now).min_by_key(|&(t, due)| (*due, *t))?;
        self.timers.remove(&timer);
        Some(Input::TimerFired { timer })
    }

    /// The write path: decide on `input` at `now`; a transition is given to
    /// `record` (which returns the sequence number it was recorded as) and
    /// applied only after it returns `Ok`. If recording fails, nothing
    /// changes and the error is returned (R8: the transition did not happen).
    pub async fn feed<E>(
        &mut self,
        policy: &Policy,
        input: Input,
        now: Timestamp,
        record: impl AsyncFnOnce(&Pending) -> Result<u64, E>,
    ) -> Result<Fed, E> {
        self.observe(&input);
        match step(&self.name, &self.instance, &input, policy, now) {
            Outcome::Transition(t) => {
                let pending = self.pending(input, now, t);
                let seq = record(&pending).await?;
                self.commit(&pending, seq);
                Ok(Fed::Moved(pending))
            }
            Outcome::Effects(effects) => {
                self.keep(&effects, now);
                Ok(Fed::Upkeep(effects))
            }
            Outcome::Ignored(why) => Ok(Fed::Ignored(why)),
            Outcome::Rejected(why) => Ok(Fed::Rejected(why)),
        }
    }

    /// [`Driver::feed`] with a recorder that does not wait (an in-memory
    /// history, a blocking log append).
    pub fn feed_now<E>(
        &mut self,
        policy: &Policy,
        input: Input,
        now: Timestamp,
        record: impl FnOnce(&Pending) -> Result<u64, E>,
    ) -> Result<Fed, E> {
        use std::future::Future;
        use std::task::{Context, Poll, Waker};
        let fed = self.feed(policy, input, now, async move |p: &Pending| record(p));
        let mut fed = std::pin::pin!(fed);
        // Nothing in `feed` waits but the recorder, and this one returns at once.
        match fed.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
            Poll::Ready(result) => result,
            Poll::Pending => unreachable!("a synchronous recorder never waits"),
        }
    }

    /// A connection that reported its end is gone, whatever the rules decide;
    /// after a restart nothing of the last process is.
    fn observe(&mut self, input: &Input) {
        if *input == Input::Recovered {
            self.live = None;
            self.timers.clear();
        } else if input.ends_connection() && input.generation() == self.live {
            self.live = None;
        }
    }

    fn pending(&self, input: Input, now: Timestamp, t: Transition) -> Pending {
        let mut to = self.instance.clone();
        to.apply(&t);
        Pending { seq: self.seq.saturating_add(1), at: now, from: self.instance.clone(), input, to, effects: t.effects }
    }

    fn commit(&mut self, pending: &Pending, seq: u64) {
        self.instance = pending.to.clone();
        self.seq = seq;
        self.keep(&pending.effects, pending.at);
    }

    /// Timers go into the table; opening and closing move `live`.
    fn keep(&mut self, effects: &[Effect], now: Timestamp) {
        for effect in effects {
            match effect {
                Effect::ArmTimer { timer, after } => {
                    self.timers.insert(*timer, now.saturating_add(*after));
                }
                Effect::CancelTimer { timer } => {
                    self.timers.remove(timer);
                }
                Effect::OpenTransport { generation, .. } => self.live = Some(*generation),
                Effect::CloseTransport { generation, .. } | Effect::AbortTransport { generation } => {
                    if self.live == Some(*generation) {
                        self.live = None;
                    }
                }
                Effect::SendLogout { .. } | Effect::SendPing { .. } | Effect::RunCleanup => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::machine::{Identity, Preset, TimerKind};

    fn name() -> InstanceName {
        InstanceName::new("driven").expect("valid")
    }

    fn counted(n: &mut u64) -> impl FnOnce(&Pending) -> Result<u64, ()> + '_ {
        |p| {
            *n += 1;
            Ok(p.seq)
        }
    }

    #[test]
    fn a_transition_is_applied_only_once_recorded() {
        let policy = Policy::preset(Preset::Whatsapp);
        let mut d = Driver::new(name());
        let refused = d.feed_now(&policy, Input::Connect, Timestamp(0), |_| Err::<u64, _>("disk full"));
        assert_eq!(refused, Err("disk full"));
        assert_eq!(d.instance(), &Instance::new(), "R8: nothing happened");
        assert!(d.timers().is_empty() && d.live().is_none() && d.seq() == 0);
        let mut records = 0;
        let fed = d.feed_now(&policy, Input::Connect, Timestamp(0), counted(&mut records)).expect("recorded");
        assert_eq!(records, 1);
        assert!(matches!(d.state(), State::Connecting { .. }));
        assert_eq!((d.seq(), d.live()), (1, Some(Generation(1))));
        assert!(fed.io().all(Effect::is_io) && fed.io().count() == 1, "the connect timer stays in the driver");
        assert_eq!(d.poll_timeout(), Some(Timestamp(0).saturating_add(policy.timeouts.connect)));
    }

    #[test]
    fn heartbeats_are_upkeep_and_a_missing_pong_makes_a_zombie() {
        let policy = Policy::preset(Preset::Whatsapp);
        let mut d = Driver::new(name());
        let mut records = 0;
        d.feed_now(&policy, Input::Connect, Timestamp(0), counted(&mut records)).expect("connect");
        let identity = Identity::new("peer").ok();
        let opened = Input::TransportOpened { generation: Generation(1), identity };
        d.feed_now(&policy, opened, Timestamp(10), counted(&mut records)).expect("open");
        let interval = policy.heartbeat.interval;
        let ping_at = Timestamp(10).saturating_add(interval);
        assert_eq!(d.poll_timeout(), Some(ping_at));
        assert_eq!(d.on_timeout(Timestamp(9)), None, "nothing is due yet");
        let tick = d.on_timeout(ping_at).expect("the heartbeat is due");
        let fed = d.feed_now(&policy, tick, ping_at, counted(&mut records)).expect("upkeep");
        assert!(matches!(&fed, Fed::Upkeep(e) if e.contains(&Effect::SendPing { generation: Generation(1) })));
        assert_eq!(records, 2, "a ping is not a record");
        let pong = d.feed_now(&policy, Input::Pong { generation: Generation(1) }, ping_at, counted(&mut records));
        assert!(matches!(pong, Ok(Fed::Upkeep(_))));
        assert!(!d.timers().keys().any(|t| t.kind == TimerKind::PongDeadline), "the pong cancelled its deadline");
        // The next ping goes unanswered.
        let next = ping_at.saturating_add(interval);
        let tick = d.on_timeout(next).expect("the next heartbeat");
        d.feed_now(&policy, tick, next, counted(&mut records)).expect("ping");
        let deadline = next.saturating_add(policy.heartbeat.deadline);
        let missed = d.on_timeout(deadline).expect("the pong deadline");
        d.feed_now(&policy, missed, deadline, counted(&mut records)).expect("zombie");
        assert!(matches!(d.state(), State::Zombie { .. }), "{:?}", d.state());
        assert_eq!(d.live(), None, "the dead socket was aborted");
        assert!(deadline.saturating_since(Timestamp(10)) <= interval * 2 + policy.heartbeat.deadline);
        let _ = Duration::ZERO;
    }

    #[test]
    fn the_end_of_the_live_connection_is_noticed_whatever_the_rules_decide() {
        let policy = Policy::preset(Preset::Whatsapp);
        let mut d = Driver::new(name());
        d.feed_now(&policy, Input::Connect, Timestamp(0), |p| Ok::<_, ()>(p.seq)).expect("connect");
        let stale = Input::CloseFinished { generation: Generation(7) };
        d.feed_now(&policy, stale, Timestamp(1), |p| Ok::<_, ()>(p.seq)).expect("ignored");
        assert_eq!(d.live(), Some(Generation(1)), "another generation's end is not this one's");
        let ended = Input::CloseFinished { generation: Generation(1) };
        let fed = d.feed_now(&policy, ended, Timestamp(2), |p| Ok::<_, ()>(p.seq)).expect("fed");
        assert!(matches!(fed, Fed::Ignored(_)), "connecting does not expect a close to finish");
        assert_eq!(d.live(), None, "but the connection is gone");
    }
}
