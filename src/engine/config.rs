//! The engine's configuration: every bound a field, with its reason.

use std::sync::Arc;
use std::time::Duration;

use super::cleanup::{Cleanup, NoCleanup};
use super::fence::Fence;
use super::shared::TransitionHook;
use crate::log::{LogConfig, Retention};
use crate::machine::{Policy, Timestamp};
use crate::transport::{ReferenceProtocol, SendBudget, Transport, WsLimits, WsTransport};

/// Engine configuration.
#[derive(Clone)]
pub struct EngineConfig {
    /// The rules' parameters.
    pub policy: Policy,
    /// The log's durability and sizes (and whether to accept a damaged log: `accept_loss`).
    pub log: LogConfig,
    /// How connections are made.
    pub transport: Arc<dyn Transport>,
    /// The host's cleanup steps for a delete.
    pub cleanup: Arc<dyn Cleanup>,
    /// Bound on each cleanup step: 10 s covers a slow database call; the
    /// whole cleanup is bounded by the policy's `timeouts.cleanup`.
    pub cleanup_step_timeout: Duration,
    /// Bound on `shutdown()`: tasks still running after it are stopped where they are.
    pub shutdown_timeout: Duration,
    /// Notifications buffered per subscriber; a slower subscriber misses the
    /// oldest (it never blocks an instance).
    pub notifications_capacity: usize,
    /// Called after every transition.
    pub on_transition: Option<TransitionHook>,
    /// Set aside instances whose records cannot be decoded instead of failing to open.
    pub quarantine: bool,
    /// The wall-clock time at engine start; `None` reads the system clock. A
    /// fixed epoch with `tokio::time::pause` makes runs reproducible.
    pub epoch: Option<Timestamp>,
    /// Compacts the log periodically (on by default, so a long-running host's
    /// log stays bounded); `None` leaves it to the host (`Engine::compact`).
    pub compaction: Option<Compaction>,
    /// A log of record outside this process that every record goes through
    /// first (clustering); `None` for a single host.
    pub fence: Option<Arc<dyn Fence>>,
    /// Application frames queued per connection by `Engine::send`; a full
    /// queue refuses the next frame (it never waits on a slow socket).
    pub send_queue: usize,
    /// At most this many frames per window on one connection (`None`: no
    /// budget). A frame past it is refused with when to retry.
    pub send_budget: Option<SendBudget>,
    /// Received application frames buffered per subscriber (`Engine::frames`);
    /// a slower subscriber misses the oldest and is told how many.
    pub frames_capacity: usize,
}

/// The engine's periodic log compaction.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Compaction {
    /// What is kept (records per instance, how long removed instances stay).
    pub retention: Retention,
    /// How often, at least 1 s. Counted from the last compaction the log
    /// records, across restarts: a start that finds one overdue runs it a
    /// second later, in the background. Hourly keeps the log near its
    /// retained size at negligible cost.
    pub every: Duration,
}

impl Default for Compaction {
    fn default() -> Self {
        Self { retention: Retention::default(), every: Duration::from_secs(3600) }
    }
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            policy: Policy::default(),
            log: LogConfig::default(),
            transport: Arc::new(WsTransport::new(Arc::new(ReferenceProtocol), WsLimits::default())),
            cleanup: Arc::new(NoCleanup),
            cleanup_step_timeout: Duration::from_secs(10),
            shutdown_timeout: Duration::from_secs(5),
            notifications_capacity: 1024,
            on_transition: None,
            quarantine: false,
            epoch: None,
            compaction: Some(Compaction::default()),
            fence: None,
            send_queue: 64,
            send_budget: None,
            frames_capacity: 4096,
        }
    }
}
