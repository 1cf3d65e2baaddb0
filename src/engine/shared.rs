//! What every instance task shares, and the clock they all read.

use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use tokio::sync::broadcast;

use super::cleanup::Cleanup;
use super::fence::{Fence, Offered};
use crate::log::{Appended, Event, Log, LogError};
use crate::machine::{InputKind, Instance, InstanceName, Policy, State, StateKind, Timestamp};
use crate::transport::{InboundFrame, SendBudget, Transport};
use std::sync::atomic::AtomicU64;

/// A transition, as subscribers see it (turn it into a webhook).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Notification {
    /// The instance.
    pub instance: InstanceName,
    /// The record's sequence number.
    pub seq: u64,
    /// When.
    pub at: Timestamp,
    /// What caused it.
    pub input: InputKind,
    /// The state kind before.
    pub from: StateKind,
    /// The state after.
    pub to: State,
}

/// A host hook called after every transition, inside the instance's task.
/// A panic in it is caught and recorded (R10).
pub type TransitionHook = Arc<dyn Fn(&Notification) + Send + Sync>;

/// What every instance task shares.
pub(crate) struct Shared {
    pub(crate) log: Log,
    pub(crate) policy: Policy,
    pub(crate) transport: Arc<dyn Transport>,
    pub(crate) cleanup: Arc<dyn Cleanup>,
    pub(crate) cleanup_step_timeout: Duration,
    pub(crate) notifications: broadcast::Sender<Notification>,
    pub(crate) on_transition: Option<TransitionHook>,
    pub(crate) clock: Clock,
    pub(crate) fence: Option<Arc<dyn Fence>>,
    pub(crate) traffic: Traffic,
}

/// Application traffic: where received frames go, how sent ones queue, and its counters.
pub(crate) struct Traffic {
    pub(crate) frames: broadcast::Sender<Arc<InboundFrame>>,
    pub(crate) send_queue: usize,
    pub(crate) send_budget: Option<SendBudget>,
    pub(crate) sent: AtomicU64,
    pub(crate) refused: AtomicU64,
    pub(crate) received: Arc<AtomicU64>,
}

/// Application frames through the engine since it started (not lifecycle: never logged).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct TrafficStats {
    /// Frames queued by `Engine::send`.
    pub sent: u64,
    /// Frames `Engine::send` refused (not open, queue full, over budget, …)
    /// for a valid instance name.
    pub refused: u64,
    /// Application frames received on the engine's connections.
    pub received: u64,
}

impl Shared {
    /// The one way the engine writes a record: through the fence, if any
    /// (the log of record), then into the local log.
    pub(crate) async fn append(
        &self,
        name: &InstanceName,
        seq: u64,
        at: Timestamp,
        event: Event,
        to: &Instance,
    ) -> Result<Appended, LogError> {
        if let Some(fence) = &self.fence {
            let offered = Offered { seq, at, event: &event, to };
            fence
                .record(name, offered)
                .await
                .map_err(|refused| LogError::Fenced { instance: name.clone(), reason: refused.0 })?;
        }
        self.log.append_async(name, seq, at, event, to).await
    }
}

/// Wall-clock time from the tokio clock: a fixed epoch plus tokio's elapsed
/// time, so virtual time (`tokio::time::pause`) drives the core too, and the
/// core's deadlines (timestamps) map back to tokio instants.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Clock {
    epoch: Timestamp,
    start: tokio::time::Instant,
}

impl Clock {
    pub(crate) fn new(epoch: Option<Timestamp>) -> Self {
        let epoch = epoch.unwrap_or_else(|| {
            let since = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
            Timestamp(u64::try_from(since.as_millis()).unwrap_or(u64::MAX))
        });
        Self { epoch, start: tokio::time::Instant::now() }
    }

    pub(crate) fn now(&self) -> Timestamp {
        self.epoch.saturating_add(self.start.elapsed())
    }

    /// The tokio instant of a timestamp (at least the start).
    pub(crate) fn instant(&self, at: Timestamp) -> tokio::time::Instant {
        self.start + at.saturating_since(self.epoch)
    }
}
