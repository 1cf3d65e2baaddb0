//! Application traffic: the host's own frames on an instance's connection.
//!
//! Frames are traffic, not lifecycle: they are never recorded in the log.
//! Outbound, each connection has a bounded queue ([`Outlet`]) that
//! `Engine::send` fills and the transport drains in order, behind an
//! optional send budget ([`SendBudget`]). Inbound, every transport publishes
//! the frames its protocol calls application frames on one engine-wide
//! bounded ring; each host subscriber reads it through [`Inbound`], which
//! tells it how many frames it missed when it fell behind (the ring never
//! makes a socket reader wait) and drops a frame of a connection older than
//! one it already delivered for that instance (a reconnect never lets an old
//! generation's frame reach the host after a newer one's).

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::{broadcast, mpsc};
use tokio::time::Instant;

use crate::machine::{Generation, InstanceName};

/// One application frame.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Frame {
    /// A text frame.
    Text(String),
    /// A binary frame.
    Binary(Vec<u8>),
}

impl Frame {
    /// Its payload's length in bytes.
    pub fn len(&self) -> usize {
        match self {
            Self::Text(t) => t.len(),
            Self::Binary(b) => b.len(),
        }
    }

    /// Whether its payload is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A frame received on an instance's connection.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct InboundFrame {
    /// The instance (shared by all of its connection's frames).
    #[serde(serialize_with = "shared_name")]
    pub instance: Arc<InstanceName>,
    /// The connection it came on (R12: the generation of that connection).
    pub generation: Generation,
    /// The frame.
    pub frame: Frame,
}

fn shared_name<S: serde::Serializer>(name: &Arc<InstanceName>, s: S) -> Result<S::Ok, S::Error> {
    name.as_ref().serialize(s)
}

/// Why [`Inbound::recv`] returned no frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum InboundError {
    /// The subscriber fell behind: this many frames were dropped for it
    /// (the oldest first). Reading goes on with the oldest frame kept.
    #[error("fell behind: {frames} frame(s) missed")]
    Missed {
        /// How many.
        frames: u64,
    },
    /// The engine is gone.
    #[error("the engine is gone")]
    Closed,
}

/// A host's subscription to received application frames (`Engine::frames`).
#[derive(Debug)]
pub struct Inbound {
    rx: broadcast::Receiver<Arc<InboundFrame>>,
    newest: HashMap<Arc<InstanceName>, Generation>,
    /// The instance and generation of the last frame admitted: a burst of
    /// one connection is admitted without a map lookup.
    last: Option<(Arc<InstanceName>, Generation)>,
    stale: u64,
}

impl Inbound {
    pub(crate) fn new(rx: broadcast::Receiver<Arc<InboundFrame>>) -> Self {
        Self { rx, newest: HashMap::new(), last: None, stale: 0 }
    }

    /// The next frame, in the order the instance's connection received it.
    pub async fn recv(&mut self) -> Result<Arc<InboundFrame>, InboundError> {
        loop {
            let frame = match self.rx.recv().await {
                Ok(frame) => frame,
                Err(broadcast::error::RecvError::Lagged(frames)) => return Err(InboundError::Missed { frames }),
                Err(broadcast::error::RecvError::Closed) => return Err(InboundError::Closed),
            };
            if self.admit(&frame) {
                return Ok(frame);
            }
        }
    }

    /// A frame if one is waiting, without waiting.
    pub fn try_recv(&mut self) -> Result<Option<Arc<InboundFrame>>, InboundError> {
        loop {
            let frame = match self.rx.try_recv() {
                Ok(frame) => frame,
                Err(broadcast::error::TryRecvError::Empty) => return Ok(None),
                Err(broadcast::error::TryRecvError::Lagged(frames)) => return Err(InboundError::Missed { frames }),
                Err(broadcast::error::TryRecvError::Closed) => return Err(InboundError::Closed),
            };
            if self.admit(&frame) {
                return Ok(Some(frame));
            }
        }
    }

    /// Frames this subscriber dropped because a newer connection of their
    /// instance had already delivered one.
    pub fn stale(&self) -> u64 {
        self.stale
    }

    fn admit(&mut self, frame: &InboundFrame) -> bool {
        if let Some((instance, generation)) = &self.last
            && Arc::ptr_eq(instance, &frame.instance)
            && *generation == frame.generation
        {
            return true;
        }
        match self.newest.get_mut(&frame.instance) {
            Some(newest) if *newest > frame.generation => {
                self.stale += 1;
                return false;
            }
            Some(newest) => *newest = frame.generation,
            None => {
                self.newest.insert(frame.instance.clone(), frame.generation);
            }
        }
        self.last = Some((frame.instance.clone(), frame.generation));
        true
    }
}

/// Where a connection publishes the application frames it receives.
#[derive(Clone, Debug)]
pub struct FrameSink {
    instance: Arc<InstanceName>,
    tx: broadcast::Sender<Arc<InboundFrame>>,
    received: Arc<AtomicU64>,
}

impl FrameSink {
    pub(crate) fn new(
        instance: InstanceName,
        tx: broadcast::Sender<Arc<InboundFrame>>,
        received: Arc<AtomicU64>,
    ) -> Self {
        Self { instance: Arc::new(instance), tx, received }
    }

    /// Publishes a frame of connection `generation`; never waits (a slow
    /// subscriber loses the oldest frames and is told so).
    pub fn publish(&self, generation: Generation, frame: Frame) {
        self.received.fetch_add(1, Ordering::Relaxed);
        let inbound = InboundFrame { instance: self.instance.clone(), generation, frame };
        // No subscriber: nobody listens, the frame goes nowhere (it is traffic, not a record).
        let _ = self.tx.send(Arc::new(inbound));
    }
}

/// At most `frames` frames in any window of `per`, per connection: what a
/// gateway allows before it closes the connection (Discord: 120 per 60 s,
/// heartbeats included — leave them room).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SendBudget {
    /// Frames allowed in a window.
    pub frames: u32,
    /// The window.
    pub per: Duration,
}

/// The moments of the frames sent in the current window: exact, so no window
/// of `per` ever holds more than `frames` (a token bucket would allow a burst
/// of twice the budget across a refill).
#[derive(Debug)]
struct Window {
    budget: SendBudget,
    sent: VecDeque<Instant>,
}

impl Window {
    /// Takes one frame's room now, or says when there will be some.
    fn take(&mut self, now: Instant) -> Result<(), Duration> {
        while self.sent.front().is_some_and(|t| now.duration_since(*t) >= self.budget.per) {
            self.sent.pop_front();
        }
        if self.sent.len() < self.budget.frames as usize {
            self.sent.push_back(now);
            return Ok(());
        }
        let oldest = self.sent.front().copied().unwrap_or(now);
        Err((oldest + self.budget.per).saturating_duration_since(now))
    }
}

/// Why a frame was not queued.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Refused {
    /// The connection's queue is full.
    Full {
        /// Its capacity.
        capacity: usize,
    },
    /// The send budget is spent until this much later.
    Budget {
        /// When to try again.
        retry_after: Duration,
    },
    /// The connection ended (its end is on its way to the instance).
    Ended,
}

/// The sending side of one connection's outbound queue.
#[derive(Clone, Debug)]
pub(crate) struct Outlet {
    pub(crate) generation: Generation,
    tx: mpsc::Sender<Box<Frame>>,
    capacity: usize,
    window: Option<Arc<Mutex<Window>>>,
}

impl Outlet {
    /// A queue of `capacity` frames for connection `generation`, and its receiving end.
    pub(crate) fn new(generation: Generation, capacity: usize, budget: Option<SendBudget>) -> (Self, Outbound) {
        let (tx, rx) = mpsc::channel(capacity.max(1));
        let window = budget.map(|budget| Arc::new(Mutex::new(Window { budget, sent: VecDeque::new() })));
        (Self { generation, tx, capacity, window }, Outbound { rx: Some(rx) })
    }

    /// Queues a frame, in order behind the ones before it.
    pub(crate) fn send(&self, frame: Frame) -> Result<(), Refused> {
        // Room in the queue first: a frame refused for a full queue must not spend budget.
        let permit = self.tx.try_reserve().map_err(|e| match e {
            mpsc::error::TrySendError::Full(()) => Refused::Full { capacity: self.capacity },
            mpsc::error::TrySendError::Closed(()) => Refused::Ended,
        })?;
        if let Some(window) = &self.window {
            let mut window = window.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            window.take(Instant::now()).map_err(|retry_after| Refused::Budget { retry_after })?;
        }
        permit.send(Box::new(frame));
        Ok(())
    }
}

/// The receiving side of a connection's outbound queue: what the transport writes.
#[derive(Debug, Default)]
pub struct Outbound {
    rx: Option<mpsc::Receiver<Box<Frame>>>,
}

impl Outbound {
    /// A queue nobody fills (a transport run outside an engine, in tests).
    pub fn none() -> Self {
        Self { rx: None }
    }

    /// The next frame to write; pending forever when there is no queue or
    /// its engine side is gone (the connection's lifecycle ends it, not this).
    pub async fn recv(&mut self) -> Frame {
        match &mut self.rx {
            Some(rx) => match rx.recv().await {
                Some(frame) => *frame,
                None => {
                    self.rx = None;
                    std::future::pending().await
                }
            },
            None => std::future::pending().await,
        }
    }

    /// The next frame if one is queued now.
    pub fn try_recv(&mut self) -> Option<Frame> {
        self.rx.as_mut()?.try_recv().ok().map(|f| *f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(s: &str) -> InstanceName {
        InstanceName::new(s).expect("valid")
    }

    #[tokio::test(start_paused = true)]
    async fn the_budget_is_exact_over_any_window() {
        let budget = SendBudget { frames: 3, per: Duration::from_secs(10) };
        let (outlet, mut out) = Outlet::new(Generation(1), 16, Some(budget));
        for i in 0..3 {
            outlet.send(Frame::Text(format!("{i}"))).expect("within budget");
            tokio::time::advance(Duration::from_secs(1)).await;
        }
        // 3 s after the first: 7 s until it leaves the window.
        assert_eq!(outlet.send(Frame::Text("x".into())), Err(Refused::Budget { retry_after: Duration::from_secs(7) }));
        tokio::time::advance(Duration::from_secs(7)).await;
        outlet.send(Frame::Text("3".into())).expect("the first left the window");
        assert_eq!(
            outlet.send(Frame::Text("y".into())),
            Err(Refused::Budget { retry_after: Duration::from_secs(1) }),
            "the second is 9 s old"
        );
        let got: Vec<_> = std::iter::from_fn(|| out.try_recv()).collect();
        let want: Vec<_> = (0..4).map(|i| Frame::Text(format!("{i}"))).collect();
        assert_eq!(got, want, "queued in order, refused ones never");
    }

    #[tokio::test]
    async fn a_full_queue_refuses_without_spending_budget() {
        let budget = SendBudget { frames: 2, per: Duration::from_secs(60) };
        let (outlet, mut out) = Outlet::new(Generation(1), 1, Some(budget));
        outlet.send(Frame::Binary(vec![1])).expect("room");
        assert_eq!(outlet.send(Frame::Binary(vec![2])), Err(Refused::Full { capacity: 1 }));
        assert_eq!(out.try_recv(), Some(Frame::Binary(vec![1])));
        outlet.send(Frame::Binary(vec![3])).expect("the refused frame spent no budget");
        drop(out);
        assert_eq!(outlet.send(Frame::Binary(vec![4])), Err(Refused::Ended));
    }

    #[tokio::test]
    async fn inbound_reports_missed_frames_and_drops_older_generations() {
        let (tx, rx) = broadcast::channel(4);
        let mut inbound = Inbound::new(rx);
        let sink = FrameSink::new(name("a"), tx.clone(), Arc::default());
        let other = FrameSink::new(name("b"), tx, Arc::default());
        for i in 0..6 {
            sink.publish(Generation(1), Frame::Text(format!("{i}")));
        }
        assert_eq!(inbound.recv().await, Err(InboundError::Missed { frames: 2 }));
        for i in 2..6 {
            assert_eq!(inbound.recv().await.expect("kept").frame, Frame::Text(format!("{i}")));
        }
        sink.publish(Generation(2), Frame::Text("new".into()));
        sink.publish(Generation(1), Frame::Text("late".into()));
        other.publish(Generation(1), Frame::Text("b1".into()));
        assert_eq!(inbound.recv().await.expect("new").frame, Frame::Text("new".into()));
        let b = inbound.recv().await.expect("b's own generations are apart from a's");
        assert_eq!((b.instance.as_str(), &b.frame), ("b", &Frame::Text("b1".into())));
        assert_eq!(inbound.stale(), 1, "a's frame of generation 1 after one of 2 was dropped");
        assert_eq!(inbound.try_recv(), Ok(None));
    }
}
