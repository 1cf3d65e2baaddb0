//! The fleet at a glance, for the dashboard: one row per instance — its
//! state in words, since when, its generation, its last close and what it
//! meant, its reconnects in the last hour — and how often the fleet took each
//! edge of the transition table.
//!
//! The rows are a fold of the log's events ([`EventBody`]) kept by one
//! follower task, so a page load costs a copy of the rows, never a scan of
//! the log. `GET /v1/fleet` answers the rows with the global position they
//! cover; the dashboard then follows `/v1/events` from that position and
//! applies each event with the same fold ([`FleetIndex::apply`] is the
//! reference; `ui/fleet.js` mirrors its few lines). The same index serves a
//! read-only replay of a copied log (`lifecycle replay`).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use serde::Serialize;
use tokio::sync::watch;
use utoipa::ToSchema;

use super::events::{CloseView, EventBody};
use crate::engine::Engine;
use crate::log::{Log, LogError};
use crate::machine::{Generation, Input, Instance, InstanceName, Outcome, Policy, State, Timestamp, step};

/// Reconnects older than this (before the newest record) are not counted.
pub const RECONNECT_WINDOW: Duration = Duration::from_secs(3600);
/// Reconnect times kept per instance: a storm is visible long before this.
const RECONNECTS_KEPT: usize = 256;
/// Records read from the log at a time.
const PAGE: usize = 1024;

/// One instance, as the fleet view shows it.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct FleetRow {
    /// The name.
    pub name: String,
    /// The state's kind.
    pub kind: String,
    /// The coarse status: `open`, `connecting` or `close`.
    pub status: &'static str,
    /// The state in words.
    pub state: String,
    /// When it entered its current kind of state (ms since the Unix epoch).
    pub since: u64,
    /// The connection generation.
    pub generation: u64,
    /// The last connection's end, and what its status meant.
    pub close: Option<CloseView>,
    /// When it reconnected within the last hour (ms since the Unix epoch), oldest first.
    #[schema(value_type = Vec<u64>)]
    pub reconnects: VecDeque<u64>,
    /// The global sequence number of its newest record.
    pub global: u64,
    /// In a cluster: the host holding its lease now (none: no live owner —
    /// removed, or between owners).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
}

/// How often the fleet took one edge of the table, by one kind of input.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct EdgeCount {
    /// The state kind before.
    pub from: String,
    /// The state kind after.
    pub to: String,
    /// The input's kind.
    pub input: String,
    /// Times taken (since the oldest record the log keeps).
    pub count: u64,
}

/// `GET /v1/fleet`.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct FleetView {
    /// The newest global sequence number the rows cover: follow `/v1/events?after=` this.
    pub position: u64,
    /// A replay of a copied log: nothing can be changed, and nothing new will come.
    pub read_only: bool,
    /// "Now" for times in state: the wall clock, or in a replay the newest record's time.
    pub now: u64,
    /// The policy's name.
    pub policy: String,
    /// Every instance the log holds, removed ones included, by name.
    pub instances: Vec<FleetRow>,
    /// The edges the fleet took, with their counts.
    pub edges: Vec<EdgeCount>,
    /// In a cluster: the host that answered (rows then carry their `owner`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
}

/// The rows and edge counts, folded from events.
#[derive(Debug, Default)]
pub struct FleetIndex {
    rows: HashMap<InstanceName, FleetRow>,
    edges: BTreeMap<(String, String, String), u64>,
    position: u64,
    newest: u64,
}

impl FleetIndex {
    /// Applies one event. A `created` event starts the row afresh (a name
    /// can be created again after it was removed).
    pub fn apply(&mut self, e: &EventBody) {
        self.position = self.position.max(e.global);
        self.newest = self.newest.max(e.at);
        let row = self.rows.entry(e.instance.clone()).or_insert_with(|| FleetRow {
            name: e.instance.as_str().to_owned(),
            kind: String::new(),
            status: e.status,
            state: String::new(),
            since: e.at,
            generation: e.generation,
            close: None,
            reconnects: VecDeque::new(),
            global: e.global,
            owner: None,
        });
        if e.event == "created" {
            row.close = None;
            row.reconnects.clear();
            row.since = e.at;
        } else if e.from.as_deref() != Some(e.to.as_str()) {
            row.since = e.at;
        }
        row.kind.clone_from(&e.to);
        row.status = e.status;
        row.state.clone_from(&e.state);
        row.generation = e.generation;
        row.global = e.global;
        if e.host.is_some() {
            row.owner.clone_from(&e.host);
        }
        if e.close.is_some() {
            row.close.clone_from(&e.close);
        }
        if e.reconnect {
            if row.reconnects.len() == RECONNECTS_KEPT {
                row.reconnects.pop_front();
            }
            row.reconnects.push_back(e.at);
        }
        if let (Some(from), Some(input)) = (&e.from, &e.input) {
            *self.edges.entry((from.clone(), e.to.clone(), input.clone())).or_insert(0) += 1;
        }
    }

    /// Every row, in no order (reconnects not yet aged out: see [`FleetIndex::view`]).
    pub fn rows(&self) -> impl Iterator<Item = &FleetRow> {
        self.rows.values()
    }

    /// The newest global sequence number applied.
    pub fn position(&self) -> u64 {
        self.position
    }

    /// The view as of `now` (reconnects older than the window are left out).
    pub fn view(&self, now: u64, read_only: bool, policy: &str) -> FleetView {
        let cutoff = now.saturating_sub(u64::try_from(RECONNECT_WINDOW.as_millis()).unwrap_or(u64::MAX));
        let mut instances: Vec<FleetRow> = self
            .rows
            .values()
            .map(|r| {
                let mut row = r.clone();
                row.reconnects.retain(|&at| at >= cutoff);
                row
            })
            .collect();
        instances.sort_unstable_by(|a, b| a.name.cmp(&b.name));
        let edges = self
            .edges
            .iter()
            .map(|((from, to, input), &count)| EdgeCount {
                from: from.clone(),
                to: to.clone(),
                input: input.clone(),
                count,
            })
            .collect();
        FleetView { position: self.position, read_only, now, policy: policy.to_owned(), instances, edges, host: None }
    }

    /// Reads the log's records after the index's position and applies them;
    /// returns how many. Blocking: call it off the async threads.
    pub fn catch_up(&mut self, log: &Log, policy: &Policy) -> Result<usize, LogError> {
        let mut n = 0;
        loop {
            let page = log.records_after(self.position, PAGE)?;
            if page.is_empty() {
                return Ok(n);
            }
            for r in &page {
                self.apply(&EventBody::folded(r, policy));
            }
            n += page.len();
        }
    }

    /// The newest record's time (ms since the Unix epoch): "now" in a replay.
    pub fn newest(&self) -> u64 {
        self.newest
    }
}

/// The index shared between its follower and the handlers.
pub(crate) type SharedIndex = Arc<RwLock<FleetIndex>>;

pub(crate) fn read(index: &SharedIndex) -> std::sync::RwLockReadGuard<'_, FleetIndex> {
    index.read().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn write(index: &SharedIndex) -> std::sync::RwLockWriteGuard<'_, FleetIndex> {
    index.write().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Builds the index from the whole log (blocking), for a replay.
pub(crate) fn build(log: &Log, policy: &Policy) -> Result<SharedIndex, LogError> {
    let index = SharedIndex::default();
    catch_up(&index, log, policy)?;
    Ok(index)
}

/// Brings a shared index up to the log's end (blocking).
pub(crate) fn catch_up(index: &SharedIndex, log: &Log, policy: &Policy) -> Result<usize, LogError> {
    write(index).catch_up(log, policy)
}

/// Keeps the index up to date with a running engine until shutdown: woken
/// by each transition, and once a second regardless (a notification can lag).
/// It starts from an empty index and folds the log in the background, so a
/// service answers before its fleet view is built; the returned watch says
/// up to which committed position the index has read (`/v1/fleet` waits for
/// the position it was asked at).
pub(crate) fn follow(
    engine: &Engine,
    index: SharedIndex,
    mut shutdown: watch::Receiver<bool>,
) -> (tokio::task::JoinHandle<()>, watch::Receiver<u64>) {
    let log = engine.log().clone();
    let policy = Arc::new(engine.policy().clone());
    let mut wake = engine.subscribe();
    let (covered_tx, covered) = watch::channel(0);
    let task = tokio::spawn(async move {
        loop {
            let (log, policy, index) = (log.clone(), policy.clone(), index.clone());
            // Reads into a private copy of the position, then applies under the lock: handlers never wait on the log.
            let caught = tokio::task::spawn_blocking(move || {
                // Everything committed by now is read once a page comes back short.
                let committed = log.committed();
                let after = read(&index).position();
                let page = log.records_after(after, PAGE)?;
                let full = page.len() == PAGE;
                let bodies: Vec<EventBody> = page.iter().map(|r| EventBody::folded(r, &policy)).collect();
                let mut guard = write(&index);
                for b in &bodies {
                    if b.global > guard.position() {
                        guard.apply(b);
                    }
                }
                Ok::<Option<u64>, LogError>((!full).then_some(committed))
            })
            .await;
            match caught {
                Ok(Ok(None)) => continue,
                Ok(Ok(Some(committed))) => {
                    covered_tx.send_if_modified(|c| {
                        let newer = committed > *c;
                        *c = (*c).max(committed);
                        newer
                    });
                }
                Ok(Err(e)) => tracing::warn!(error = %e, "the fleet view could not read the log; retrying"),
                Err(_) => return,
            }
            tokio::select! {
                _ = wake.recv() => {}
                () = tokio::time::sleep(Duration::from_secs(1)) => {}
                _ = shutdown.wait_for(|s| *s) => return,
            }
        }
    });
    (task, covered)
}

/// The fleet view of a cluster: folded from every entry of the stream as
/// this host's view of the cluster applies it (so a read that waited for
/// the view covers the index too).
pub(crate) struct StreamTap {
    pub(crate) index: SharedIndex,
    pub(crate) policy: Policy,
}

impl crate::cluster::Tap for StreamTap {
    fn entry(&self, stream_seq: u64, name: &InstanceName, entry: &crate::cluster::StreamEntry) {
        if let Some(body) = EventBody::of_entry(name, stream_seq, entry, &self.policy) {
            write(&self.index).apply(&body);
        }
    }
}

/// Whether a host command is allowed in a state, and if not, why: the
/// table's own answer (a command the state rejects or ignores is not offered).
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct ActionView {
    /// `connect`, `logout`, `restart` or `delete`.
    pub action: &'static str,
    /// Whether it would change anything.
    pub allowed: bool,
    /// Why not, in the table's words (`the instance was removed`, `already connecting or open`).
    pub why: Option<String>,
}

/// The four host commands, asked of the transition table for this state.
pub(crate) fn actions(name: &InstanceName, state: &State, policy: &Policy, now: Timestamp) -> Vec<ActionView> {
    // Host commands carry no generation: any generation gives the same answer.
    let instance = Instance { generation: Generation(0), state: state.clone() };
    [("connect", Input::Connect), ("logout", Input::Logout), ("restart", Input::Restart), ("delete", Input::Delete)]
        .into_iter()
        .map(|(action, input)| {
            let why = match step(name, &instance, &input, policy, now) {
                Outcome::Transition(_) | Outcome::Effects(_) => None,
                Outcome::Rejected(r) => Some(r.to_string()),
                Outcome::Ignored(i) => Some(i.to_string()),
            };
            ActionView { action, allowed: why.is_none(), why }
        })
        .collect()
}

/// The transition table's edges, for drawing the diagram: each with the inputs that take it.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct TableEdge {
    /// The state kind before.
    pub from: String,
    /// The state kind after.
    pub to: String,
    /// The kinds of input that take it.
    pub inputs: Vec<String>,
}

/// The edges of [`crate::diagram::Diagram::from_rules`].
pub(crate) fn table() -> Vec<TableEdge> {
    crate::diagram::Diagram::from_rules()
        .edges
        .iter()
        .map(|((from, to), inputs)| TableEdge {
            from: from.to_string(),
            to: to.to_string(),
            inputs: inputs.keys().map(|k| k.as_str().to_owned()).collect(),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::log::{Event, InstanceSpec};
    use crate::machine::{CloseInitiator, Reason, StatusCode};

    fn name(s: &str) -> InstanceName {
        InstanceName::new(s).expect("name")
    }

    /// A log with one instance that opens, is closed by a 401 (final under
    /// the whatsapp preset) after two reconnects, and one removed.
    fn fleet_log() -> (Log, Policy) {
        let log = Log::in_memory().expect("log");
        let policy = Policy::preset(crate::machine::Preset::Whatsapp);
        let mut t = 1_000;
        let mut drive = |n: &InstanceName, inputs: Vec<Input>| {
            let spec = InstanceSpec { url: "ws://127.0.0.1:1".into() };
            let mut inst = Instance::new();
            let mut seq = log.next_seq(n);
            log.append(n, seq, Timestamp(t), Event::Created { spec, token: None }, &inst).expect("create");
            for input in inputs {
                t += 1_000;
                let input = match input {
                    // Signals take the current generation.
                    Input::TransportOpened { identity, .. } => {
                        Input::TransportOpened { generation: inst.generation, identity }
                    }
                    Input::TransportClosed { initiator, status, reason, .. } => {
                        Input::TransportClosed { generation: inst.generation, initiator, status, reason }
                    }
                    other => other,
                };
                if let Outcome::Transition(tr) = step(n, &inst, &input, &policy, Timestamp(t)) {
                    let from = inst.clone();
                    inst.apply(&tr);
                    seq += 1;
                    let event = Event::Transition { from, input, effects: tr.effects };
                    log.append(n, seq, Timestamp(t), event, &inst).expect("append");
                }
            }
        };
        let opened = || Input::TransportOpened {
            generation: Generation(0),
            identity: Some(crate::machine::Identity::new("me@x").expect("id")),
        };
        let closed = |code: u16| Input::TransportClosed {
            generation: Generation(0),
            initiator: CloseInitiator::Peer,
            status: Some(StatusCode(code)),
            reason: Reason::from("bye"),
        };
        drive(
            &name("alpha"),
            vec![Input::Connect, opened(), Input::Restart, opened(), Input::Restart, opened(), closed(401)],
        );
        drive(&name("beta"), vec![Input::Delete, Input::CleanupFinished { steps: vec![] }]);
        (log, policy)
    }

    #[test]
    fn the_fold_shows_state_close_meaning_reconnects_and_edges() {
        let (log, policy) = fleet_log();
        let index = build(&log, &policy).expect("build");
        let index = read(&index);
        assert_eq!(index.position(), log.committed());
        let view = index.view(index.newest(), false, &policy.name);
        let [alpha, beta] = &view.instances[..] else { panic!("two rows: {:?}", view.instances) };
        assert_eq!((alpha.name.as_str(), alpha.kind.as_str(), alpha.status), ("alpha", "Closed", "close"));
        let close = alpha.close.as_ref().expect("a close");
        assert_eq!(
            (close.code, close.meaning.as_str(), close.is_final, close.by),
            (Some(401), "logged out", true, "peer")
        );
        assert_eq!(alpha.reconnects.len(), 2, "two restarts of an open session");
        assert_eq!(alpha.since, 8_000, "closed by its seventh input, a second apart from 1 s");
        assert_eq!((beta.kind.as_str(), beta.close.is_none()), ("Removed", true));
        let count = |from: &str, to: &str, input: &str| {
            view.edges.iter().find(|e| e.from == from && e.to == to && e.input == input).map_or(0, |e| e.count)
        };
        assert_eq!(count("Open", "Connecting", "restart"), 2);
        assert_eq!(count("Open", "Closed", "closed"), 1);
        assert_eq!(count("Closed", "Closing", "delete"), 1);
        assert_eq!(count("Closing", "Removed", "cleanup finished"), 1);
        // An hour later the reconnects age out of the view.
        let later = index.view(index.newest() + 3_600_001, false, &policy.name);
        assert!(later.instances.iter().all(|r| r.reconnects.is_empty()));
    }

    /// The one table of fold cases: events as `/v1/events` sends them, and
    /// the rows the service's fold makes of them. The page's fold replays the
    /// same file (`tests/ui/fleet-fold.test.mjs`); `LIFECYCLE_BLESS=1` writes
    /// it again after a deliberate change of either.
    #[test]
    fn the_fold_cases_the_page_replays_are_the_services() {
        let (log, policy) = fleet_log();
        let mut events: Vec<EventBody> =
            log.records_after(0, usize::MAX).expect("records").iter().map(|r| EventBody::of(r, &policy)).collect();
        // As in a cluster: beta's records were written by a host, which the fold keeps as its owner.
        for e in events.iter_mut().filter(|e| e.instance.as_str() == "beta") {
            e.host = Some("gw-2".into());
        }
        let mut index = FleetIndex::default();
        for e in &events {
            index.apply(e);
        }
        let mut rows: Vec<&FleetRow> = index.rows().collect();
        rows.sort_by(|a, b| a.name.cmp(&b.name));
        let table = serde_json::json!({ "events": events, "rows": rows });
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/fleet-fold.json");
        if std::env::var_os("LIFECYCLE_BLESS").is_some() {
            let text = serde_json::to_string_pretty(&table).expect("json") + "\n";
            std::fs::write(&path, text).expect("write the fold cases");
        }
        let kept: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).expect("tests/fixtures/fleet-fold.json"))
                .expect("json");
        assert_eq!(kept, table, "the fold cases changed: check, then LIFECYCLE_BLESS=1 cargo test fold_cases");
        assert_eq!(rows.iter().find(|r| r.name == "beta").and_then(|r| r.owner.as_deref()), Some("gw-2"));
    }

    /// The transition table as `/v1/table` serves it, for the page's tests
    /// (`tests/ui/diagram.test.mjs` lays the diagram out from it).
    #[test]
    fn the_table_the_page_draws_is_the_services() {
        let table = serde_json::to_value(table()).expect("json");
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/table.json");
        if std::env::var_os("LIFECYCLE_BLESS").is_some() {
            std::fs::write(&path, serde_json::to_string_pretty(&table).expect("json") + "\n").expect("write");
        }
        let kept: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).expect("tests/fixtures/table.json")).expect("json");
        assert_eq!(kept, table, "the table changed: check, then LIFECYCLE_BLESS=1 cargo test table_the_page");
    }

    #[test]
    fn a_name_created_again_starts_a_fresh_row() {
        let (log, policy) = fleet_log();
        let mut index = FleetIndex::default();
        index.catch_up(&log, &policy).expect("catch up");
        let at = Timestamp(index.newest() + 1);
        let (beta, spec) = (name("beta"), InstanceSpec { url: "ws://127.0.0.1:1".into() });
        log.append(&beta, log.next_seq(&beta), at, Event::Created { spec, token: None }, &Instance::new())
            .expect("recreate");
        assert_eq!(index.catch_up(&log, &policy).expect("catch up"), 1);
        let view = index.view(at.0, false, "p");
        let beta = view.instances.iter().find(|r| r.name == "beta").expect("beta");
        assert_eq!((beta.kind.as_str(), beta.since), ("Closed", at.0));
    }

    #[test]
    fn actions_are_the_tables_answer() {
        let policy = Policy::default();
        let n = name("a");
        let allowed = |state: &State| -> Vec<(&'static str, bool)> {
            actions(&n, state, &policy, Timestamp(0)).iter().map(|a| (a.action, a.allowed)).collect()
        };
        let removed = State::Removed { cleanup: crate::machine::CleanupOutcome::TimedOut };
        assert_eq!(allowed(&removed), [("connect", false), ("logout", false), ("restart", false), ("delete", false)]);
        let why = actions(&n, &removed, &policy, Timestamp(0));
        assert_eq!(why[0].why.as_deref(), Some("the instance was removed"));
        let created = Instance::new().state;
        // A fresh instance can connect or be deleted; it has nothing to log out of.
        assert_eq!(allowed(&created), [("connect", true), ("logout", false), ("restart", true), ("delete", true)]);
    }
}
