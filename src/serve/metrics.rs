//! Prometheus metrics (`GET /metrics`), on `prometheus-client`: an explicit
//! registry per service, no global recorder, so a host can run several
//! services (or tests) in one process.

use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::engine::Notification;
use crate::machine::{ClosedCause, InputKind, State, StateKind};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct InputLabel {
    input: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct StateLabel {
    state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct CommandLabel {
    command: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct DirectionLabel {
    direction: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct WebhookLabel {
    webhook: String,
}

pub(crate) struct Metrics {
    registry: Registry,
    instances: Family<StateLabel, Gauge>,
    transitions: Family<InputLabel, Counter>,
    zombies: Counter,
    reconnects: Counter,
    suppressed: Counter,
    commands: Family<CommandLabel, Histogram>,
    recorded: Histogram,
    delivered: Family<WebhookLabel, Counter>,
    failed: Family<WebhookLabel, Counter>,
    dead: Family<WebhookLabel, Gauge>,
    depth: Family<WebhookLabel, Gauge>,
    subscribers: Gauge,
    frames: Family<DirectionLabel, Counter>,
    log_bytes: Gauge,
    compacted_at: Gauge,
    start: Gauge<f64, std::sync::atomic::AtomicU64>,
}

fn latency_histogram() -> Histogram {
    // 1 ms to ~65 s.
    Histogram::new(exponential_buckets(0.001, 2.0, 17))
}

impl Metrics {
    pub(crate) fn new() -> Self {
        let mut registry = Registry::with_prefix("lifecycle");
        let m = Self {
            instances: Family::default(),
            transitions: Family::default(),
            zombies: Counter::default(),
            reconnects: Counter::default(),
            suppressed: Counter::default(),
            commands: Family::new_with_constructor(latency_histogram),
            recorded: latency_histogram(),
            delivered: Family::default(),
            failed: Family::default(),
            dead: Family::default(),
            depth: Family::default(),
            subscribers: Gauge::default(),
            frames: Family::default(),
            log_bytes: Gauge::default(),
            compacted_at: Gauge::default(),
            start: Gauge::default(),
            registry: Registry::default(),
        };
        registry.register("instances", "Instances by state (removed ones are not counted)", m.instances.clone());
        registry.register("transitions", "Transitions recorded, by input", m.transitions.clone());
        registry.register("zombies_detected", "Open sessions found dead (R7)", m.zombies.clone());
        registry.register(
            "reconnects",
            "Automatic reconnect attempts started (a backoff timer fired)",
            m.reconnects.clone(),
        );
        registry.register(
            "reconnects_suppressed",
            "Sessions closed for good instead of reconnecting: a final status (R4), the retry limit, refused pairing",
            m.suppressed.clone(),
        );
        registry.register("command_duration_seconds", "Host commands over the API, until answered", m.commands.clone());
        registry.register(
            "transition_recorded_seconds",
            "From the decision to the record being durable and announced (log append latency; 1 ms resolution)",
            m.recorded.clone(),
        );
        registry.register("webhook_deliveries", "Webhook events delivered (2xx)", m.delivered.clone());
        registry.register("webhook_failures", "Webhook delivery attempts that failed", m.failed.clone());
        registry.register("webhook_dead_letters", "Webhook events given up on, kept for retry", m.dead.clone());
        registry.register(
            "webhook_outbox_depth",
            "Records committed but not yet passed by the webhook",
            m.depth.clone(),
        );
        registry.register("sse_subscribers", "Open /v1/events streams", m.subscribers.clone());
        registry.register(
            "frames",
            "Application frames (traffic, not lifecycle: never logged): sent (queued), refused, received",
            m.frames.clone(),
        );
        registry.register(
            "log_size_bytes",
            "This host's log on disk (bounded by [retention]: records kept per instance, removed instances kept for removed_after)",
            m.log_bytes.clone(),
        );
        registry.register(
            "log_last_compaction_timestamp_seconds",
            "When the log was last compacted, by any run of the service (0: never); the next is one [retention] period later",
            m.compacted_at.clone(),
        );
        registry.register(
            "start_seconds",
            "How long this service's start took, from opening the log to answering (the fleet view follows in the background)",
            m.start.clone(),
        );
        Self { registry, ..m }
    }

    /// Called after every transition (the engine's hook).
    pub(crate) fn transition(&self, n: &Notification) {
        self.transitions.get_or_create(&InputLabel { input: n.input.to_string() }).inc();
        if n.from != StateKind::Zombie && n.to.kind() == StateKind::Zombie {
            self.zombies.inc();
        }
        if n.input == InputKind::ReconnectTimer && n.to.kind() == StateKind::Connecting {
            self.reconnects.inc();
        }
        let gave_up = matches!(
            n.to,
            State::Closed {
                cause: ClosedCause::FinalStatus | ClosedCause::GaveUp { .. } | ClosedCause::PairingRefused { .. },
                ..
            }
        );
        if gave_up && n.from != StateKind::Closed {
            self.suppressed.inc();
        }
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        let took = u64::try_from(now.as_millis()).unwrap_or(u64::MAX).saturating_sub(n.at.0);
        self.recorded.observe(took as f64 / 1000.0);
    }

    pub(crate) fn command(&self, command: &str, took: Duration) {
        self.commands.get_or_create(&CommandLabel { command: command.to_owned() }).observe(took.as_secs_f64());
    }

    pub(crate) fn delivered(&self, webhook: &str) {
        self.delivered.get_or_create(&WebhookLabel { webhook: webhook.to_owned() }).inc();
    }

    pub(crate) fn failed(&self, webhook: &str) {
        self.failed.get_or_create(&WebhookLabel { webhook: webhook.to_owned() }).inc();
    }

    pub(crate) fn webhook_state(&self, webhook: &str, depth: u64, dead: u64) {
        let label = WebhookLabel { webhook: webhook.to_owned() };
        self.depth.get_or_create(&label).set(i64::try_from(depth).unwrap_or(i64::MAX));
        self.dead.get_or_create(&label).set(i64::try_from(dead).unwrap_or(i64::MAX));
    }

    /// The log's size and when it was last compacted (ms since the Unix epoch), as of a scrape.
    pub(crate) fn log_state(&self, bytes: u64, compacted_at: Option<u64>) {
        self.log_bytes.set(i64::try_from(bytes).unwrap_or(i64::MAX));
        self.compacted_at.set(i64::try_from(compacted_at.unwrap_or(0) / 1000).unwrap_or(i64::MAX));
    }

    /// How long the start took.
    pub(crate) fn started(&self, took: Duration) {
        self.start.set(took.as_secs_f64());
    }

    pub(crate) fn subscribers(&self, delta: i64) {
        self.subscribers.inc_by(delta);
    }

    /// The text exposition, with the instance counts and the engine's traffic taken now.
    pub(crate) fn render(&self, counts: &[(StateKind, usize)], traffic: crate::engine::TrafficStats) -> String {
        for (direction, total) in [("sent", traffic.sent), ("refused", traffic.refused), ("received", traffic.received)]
        {
            let counter = self.frames.get_or_create(&DirectionLabel { direction });
            counter.inc_by(total.saturating_sub(counter.get()));
        }
        for (kind, n) in counts {
            let label = StateLabel { state: kind.as_str().to_lowercase() };
            self.instances.get_or_create(&label).set(i64::try_from(*n).unwrap_or(i64::MAX));
        }
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}
