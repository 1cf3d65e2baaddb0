//! Transitions as the outside world sees them — one JSON shape for the SSE
//! stream, the history endpoint and lifecycle-format webhooks — and the SSE
//! stream itself: read from the log, so a client that reconnects with
//! `Last-Event-ID` (the global sequence number) misses nothing and sees
//! nothing twice.
//!
//! Each subscriber has a producer task that reads committed records from the
//! log and hands them over a small channel; the engine never waits for a
//! subscriber. One that leaves its channel full for [`SLOW_SUBSCRIBER`] is
//! dropped: its producer stops (freeing its place among the bounded
//! subscribers) and the stream ends with a last `dropped` event that says
//! where to resume.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use futures_util::Stream;
use serde::Serialize;
use tokio::sync::{OwnedSemaphorePermit, broadcast, mpsc, oneshot, watch};
use utoipa::ToSchema;

use super::metrics::Metrics;
use crate::engine::Notification;
use crate::log::{Event, Log, Record};
use crate::machine::{ClosePhase, ClosedCause, InstanceName, Policy, State, StateKind, Timestamp, rule_of};

/// How long a subscriber may leave its stream unread, with events waiting, before it is dropped.
pub const SLOW_SUBSCRIBER: Duration = Duration::from_secs(30);
/// Events buffered per subscriber.
const BUFFER: usize = 64;
/// Records read from the log at a time.
const PAGE: usize = 256;

/// A record of the log as JSON: the shape of `/v1/events`, history and lifecycle webhooks.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct EventBody {
    /// The global sequence number, as text: the SSE id, the webhook event id.
    pub id: String,
    /// `created`, `transition` or `snapshot`.
    pub event: &'static str,
    /// The instance.
    #[schema(value_type = String)]
    pub instance: InstanceName,
    /// The record's sequence number within the instance.
    pub seq: u64,
    /// The global sequence number.
    pub global: u64,
    /// When, in milliseconds since the Unix epoch.
    pub at: u64,
    /// When, as RFC 3339 (UTC).
    pub time: String,
    /// The input's kind (`Connect`, `Opened`, `Closed`, `ConnectTimeout`, …); absent for created/snapshot.
    pub input: Option<String>,
    /// The state's kind before; absent for created/snapshot.
    pub from: Option<String>,
    /// The state's kind after.
    pub to: String,
    /// The coarse status after: `open`, `connecting` or `close`.
    pub status: &'static str,
    /// The state after, in words.
    pub state: String,
    /// The connection generation after.
    pub generation: u64,
    /// The rule of the design (`R1` … `R12`) that decided this transition;
    /// absent for created/snapshot and for steps no rule constrains (a first connect).
    pub rule: Option<&'static str>,
    /// The rule's title (`Zombie detection`).
    pub rule_title: Option<&'static str>,
    /// The connection's end, when this record is one: the close status and what it means.
    pub close: Option<CloseView>,
    /// A new connection attempt after a loss or a restart (not a first connect from `Closed`).
    pub reconnect: bool,
    /// The full record: input, effects, the states before and after (the log's own structure).
    #[schema(value_type = Object)]
    pub detail: serde_json::Value,
    /// In a cluster: the host that recorded it (the instance's owner then).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
}

/// A connection's end as people read it: `401 logged out — final`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, ToSchema)]
pub struct CloseView {
    /// The close status, if there was one (a broken connection has none).
    pub code: Option<u16>,
    /// What the status means, from the policy's close table (`logged out`),
    /// or what happened when no row names it.
    pub meaning: String,
    /// Whether it ended the instance's connecting for good (R4): it is `Closed` now, by this status.
    #[serde(rename = "final")]
    pub is_final: bool,
    /// Who ended it: `peer`, `local` (this engine: a time-out or a violation) or `transport` (it broke).
    pub by: &'static str,
}

impl CloseView {
    /// The close a transition records, if it is one: a transport's close, or
    /// a connect time-out (the 408 the engine raises itself).
    fn of(from: &State, input: &crate::machine::Input, to: &State, policy: &Policy) -> Option<Self> {
        use crate::machine::{CloseInitiator, InputKind, StatusCode};
        let (by, status) = match input.closed() {
            Some((initiator, status, _)) => (initiator, status),
            None if input.kind() == InputKind::ConnectTimeout => (CloseInitiator::Local, Some(StatusCode::TIMEOUT)),
            None => return None,
        };
        let phase = if from.kind() == StateKind::Open { ClosePhase::AfterOpen } else { ClosePhase::BeforeOpen };
        let meaning = match (policy.close_rule(status, phase), status) {
            (Some(rule), _) => rule.label.clone(),
            (None, Some(s)) => websocket_close_name(s.0)
                .map_or_else(|| format!("not in the {} close table", policy.name), str::to_owned),
            (None, None) => "the connection broke without a close status".to_owned(),
        };
        let is_final = matches!(to, State::Closed { cause: ClosedCause::FinalStatus, .. });
        Some(Self { code: status.map(|s| s.0), meaning, is_final, by: by.as_str() })
    }
}

/// RFC 3339 in UTC, to the millisecond.
pub(crate) fn rfc3339(at: Timestamp) -> String {
    format!("{}Z", at.utc().replacen(' ', "T", 1))
}

/// The close codes of RFC 6455 and the IANA registry, for statuses the policy has no row for.
fn websocket_close_name(code: u16) -> Option<&'static str> {
    Some(match code {
        1000 => "normal closure",
        1001 => "going away",
        1002 => "protocol error",
        1003 => "unsupported data",
        1005 => "no status received",
        1006 => "abnormal closure",
        1007 => "invalid payload data",
        1008 => "policy violation",
        1009 => "message too big",
        1010 => "mandatory extension",
        1011 => "internal error",
        1012 => "service restart",
        1013 => "try again later",
        1014 => "bad gateway",
        1015 => "TLS handshake failure",
        _ => return None,
    })
}

impl EventBody {
    /// The JSON view of a record; `policy` gives close statuses their meaning.
    pub fn of(r: &Record, policy: &Policy) -> Self {
        let detail = match &r.event {
            // The token's digest stays in the log: a weak token could be guessed from it.
            Event::Created { spec, .. } | Event::Snapshot { spec, .. } => {
                serde_json::json!({ "spec": spec, "to": r.to })
            }
            Event::Transition { from, input, effects } => {
                serde_json::json!({ "input": input, "effects": effects, "from": from, "to": r.to })
            }
        };
        Self { time: rfc3339(r.at), detail, ..Self::folded(r, policy) }
    }

    /// What the fleet fold reads of a record ([`super::FleetIndex::apply`]):
    /// the body without its `detail` and `time`, which are most of its cost
    /// (a service folds its whole log into the fleet view at start).
    pub(crate) fn folded(r: &Record, policy: &Policy) -> Self {
        let (mut rule, mut close, mut reconnect) = (None, None, false);
        let (event, input, from) = match &r.event {
            Event::Created { .. } => ("created", None, None),
            Event::Snapshot { .. } => ("snapshot", None, None),
            Event::Transition { from, input, .. } => {
                rule = rule_of(&from.state, input, &r.to.state);
                close = CloseView::of(&from.state, input, &r.to.state, policy);
                reconnect = r.to.generation > from.generation && from.state.kind() != StateKind::Closed;
                ("transition", Some(input.kind().to_string()), Some(from.state.kind().to_string()))
            }
        };
        Self {
            id: r.global.to_string(),
            event,
            instance: r.instance.clone(),
            seq: r.seq,
            global: r.global,
            at: r.at.0,
            time: String::new(),
            input,
            from,
            to: r.to.state.kind().to_string(),
            status: r.to.state.coarse().as_str(),
            state: r.to.state.to_string(),
            generation: r.to.generation.0,
            rule: rule.map(|r| r.id()),
            rule_title: rule.map(|r| r.title()),
            close,
            reconnect,
            detail: serde_json::Value::Null,
            host: None,
        }
    }

    /// The JSON view of a cluster stream's entry at `stream_seq` (its id and
    /// `global`), with the host that wrote it; `None` for a takeover, which
    /// is not a record.
    pub fn of_entry(
        name: &InstanceName,
        stream_seq: u64,
        entry: &crate::cluster::StreamEntry,
        policy: &Policy,
    ) -> Option<Self> {
        let record = entry.to_record(name, stream_seq)?;
        Some(Self { host: Some(entry.host().to_owned()), ..Self::of(&record, policy) })
    }
}

/// Which records a subscriber wants, from where.
pub(crate) struct Subscription {
    pub(crate) after: u64,
    pub(crate) instance: Option<InstanceName>,
}

/// Where a stream's records come from, and the policy that gives them meaning.
pub(crate) struct Feed {
    pub(crate) source: Source,
    pub(crate) policy: Arc<Policy>,
}

/// The log of record a feed reads.
pub(crate) enum Source {
    /// A local log, and — from a running engine — the wake-up on each new
    /// record (without one, as in a replay of a copied log, the log is polled each second).
    Log { log: Log, wake: Option<broadcast::Receiver<Notification>> },
    /// A cluster's stream (ids are stream sequences, the same on every host).
    Stream { stream: Box<async_nats::jetstream::stream::Stream>, namespace: String },
}

impl Feed {
    /// The service's feed: its engine's log, or its cluster's stream.
    pub(crate) fn of(instances: &super::instances::Instances) -> Self {
        let engine = instances.engine();
        let policy = Arc::new(engine.policy().clone());
        let source = match instances.cluster() {
            Some(cluster) => {
                Source::Stream { stream: Box::new(cluster.stream().clone()), namespace: cluster.namespace().to_owned() }
            }
            None => Source::Log { log: engine.log().clone(), wake: Some(engine.subscribe()) },
        };
        Self { source, policy }
    }
}

/// The SSE response for a subscription; `permit` is its place among the bounded subscribers.
pub(crate) fn stream(
    feed: Feed,
    subscription: Subscription,
    permit: OwnedSemaphorePermit,
    shutdown: watch::Receiver<bool>,
    metrics: Arc<Metrics>,
) -> Sse<impl Stream<Item = Result<SseEvent, Infallible>>> {
    let (tx, rx) = mpsc::channel(BUFFER);
    let (last_tx, last_rx) = oneshot::channel();
    let place = Place { _permit: permit, metrics };
    place.metrics.subscribers(1);
    tokio::spawn(produce(feed, subscription, tx, last_tx, place, shutdown));
    let events = futures_util::stream::unfold((rx, Some(last_rx)), |(mut rx, last)| async move {
        if let Some(event) = rx.recv().await {
            return Some((Ok(event), (rx, last)));
        }
        // The producer ended: a last word if it dropped us, then the end.
        let last = last?.await.ok()?;
        Some((Ok(last), (rx, None)))
    });
    Sse::new(events).keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
}

/// A subscriber's place: freed (and counted out) when its producer ends.
struct Place {
    _permit: OwnedSemaphorePermit,
    metrics: Arc<Metrics>,
}

impl Drop for Place {
    fn drop(&mut self) {
        self.metrics.subscribers(-1);
    }
}

fn sse_event(body: &EventBody) -> SseEvent {
    let data = serde_json::to_string(body).unwrap_or_default();
    SseEvent::default().id(body.id.clone()).event(body.event).data(data)
}

/// Hands one event to the subscriber: false when the stream is over (the
/// client left, or was too slow and was told where to resume).
async fn hand_over(
    tx: &mpsc::Sender<SseEvent>,
    last: &mut Option<oneshot::Sender<SseEvent>>,
    body: &EventBody,
) -> bool {
    match tokio::time::timeout(SLOW_SUBSCRIBER, tx.send(sse_event(body))).await {
        Ok(Ok(())) => true,
        Ok(Err(_)) => false, // the client left
        Err(_) => {
            let data = serde_json::json!({
                "reason": format!("the stream was not read for {} s with events waiting", SLOW_SUBSCRIBER.as_secs()),
                "resume": "reconnect with Last-Event-ID set to the last id received",
            });
            if let Some(last) = last.take() {
                let _ = last.send(SseEvent::default().event("dropped").data(data.to_string()));
            }
            false
        }
    }
}

/// Reads the log from the subscription's point on and feeds the channel,
/// waiting for new records when it has caught up.
async fn produce(
    feed: Feed,
    mut sub: Subscription,
    tx: mpsc::Sender<SseEvent>,
    last: oneshot::Sender<SseEvent>,
    place: Place,
    mut shutdown: watch::Receiver<bool>,
) {
    let _place = place;
    let mut last = Some(last);
    let Feed { source, policy } = feed;
    let (log, mut wake) = match source {
        Source::Log { log, wake } => (Arc::new(log), wake),
        Source::Stream { stream, namespace } => {
            return produce_stream(*stream, namespace, policy, sub, tx, last, shutdown).await;
        }
    };
    loop {
        let (reader, after) = (log.clone(), sub.after);
        let page = match tokio::task::spawn_blocking(move || reader.records_after(after, PAGE)).await {
            Ok(Ok(page)) => page,
            Ok(Err(e)) => {
                if let Some(last) = last.take() {
                    let _ =
                        last.send(SseEvent::default().event("error").data(format!("the log could not be read: {e}")));
                }
                return;
            }
            Err(_) => return,
        };
        if page.is_empty() {
            let woken = async {
                match wake.as_mut() {
                    Some(w) => drop(w.recv().await),
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                // Any transition (or a lagged notice) means there may be more to read.
                () = woken => {}
                () = tokio::time::sleep(Duration::from_secs(1)) => {}
                _ = shutdown.changed() => return,
                () = tx.closed() => return,
            }
            continue;
        }
        for r in &page {
            sub.after = r.global;
            if sub.instance.as_ref().is_some_and(|n| *n != r.instance) {
                continue;
            }
            if !hand_over(&tx, &mut last, &EventBody::of(r, &policy)).await {
                return;
            }
        }
    }
}

/// [`produce`] from a cluster's stream: an ordered consumer from the
/// subscription's point (a stream sequence: the same on every host, so a
/// client that reconnects to another host with `Last-Event-ID` misses
/// nothing and sees nothing twice). Takeovers are not records and are not sent.
async fn produce_stream(
    stream: async_nats::jetstream::stream::Stream,
    namespace: String,
    policy: Arc<Policy>,
    sub: Subscription,
    tx: mpsc::Sender<SseEvent>,
    mut last: Option<oneshot::Sender<SseEvent>>,
    mut shutdown: watch::Receiver<bool>,
) {
    use async_nats::jetstream::consumer;
    use futures_util::StreamExt;
    let filter_subject = match &sub.instance {
        Some(name) => crate::cluster::view::subject_of(&namespace, name),
        None => crate::cluster::view::all_instances(&namespace),
    };
    let config = consumer::pull::OrderedConfig {
        filter_subject,
        deliver_policy: consumer::DeliverPolicy::ByStartSequence { start_sequence: sub.after.saturating_add(1) },
        ..Default::default()
    };
    let fail = |last: &mut Option<oneshot::Sender<SseEvent>>, e: String| {
        if let Some(last) = last.take() {
            let _ = last.send(SseEvent::default().event("error").data(format!("the stream could not be read: {e}")));
        }
    };
    let mut messages = match stream.create_consumer(config).await {
        Ok(c) => match c.messages().await {
            Ok(m) => m,
            Err(e) => return fail(&mut last, e.to_string()),
        },
        Err(e) => return fail(&mut last, e.to_string()),
    };
    let prefix = format!("{namespace}.inst.");
    loop {
        let message = tokio::select! {
            m = messages.next() => m,
            _ = shutdown.changed() => return,
            () = tx.closed() => return,
        };
        let m = match message {
            Some(Ok(m)) => m,
            Some(Err(e)) => return fail(&mut last, e.to_string()),
            None => return,
        };
        let Ok(info) = m.info() else { continue };
        let seq = info.stream_sequence;
        let name = m.subject.as_str().strip_prefix(&prefix).and_then(crate::cluster::name_of);
        let entry = crate::cluster::StreamEntry::decode(&m.payload).ok();
        let Some(body) = name.zip(entry).and_then(|(n, e)| EventBody::of_entry(&n, seq, &e, &policy)) else {
            continue;
        };
        if !hand_over(&tx, &mut last, &body).await {
            return;
        }
    }
}
