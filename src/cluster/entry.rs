//! What the cluster's stream holds, one subject per instance, and the check
//! of one instance's entries. Pure: no NATS here.
//!
//! An instance's subject is a sequence of [`StreamEntry`]s: a `Takeover` by
//! every host that comes to own it (the first owner included, before its
//! `Created`), then that owner's `Record`s. Compaction replaces everything
//! before a point with a `Snapshot` of the instance there (a JetStream
//! roll-up), so a compacted subject starts with one. The entries are JSON,
//! so a host in another language (or `nats stream view`) reads them as they are.

use serde::{Deserialize, Serialize};

use crate::log::{Event, InstanceSpec, Record};
use crate::machine::{Instance, InstanceName, Policy, State, Timestamp};

/// The header every entry carries with the epoch it was written under.
pub const EPOCH_HEADER: &str = "Lifecycle-Epoch";
/// The header naming the host that wrote an entry.
pub const HOST_HEADER: &str = "Lifecycle-Host";

/// One entry of an instance's subject.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum StreamEntry {
    /// A host became the owner: from here on, records carry its `epoch`.
    /// Written before the host opens a socket for the instance.
    Takeover {
        /// The lease revision that won the claim: the fencing token.
        epoch: u64,
        /// The new owner.
        host: String,
        /// The previous owner, when there was one.
        from_host: Option<String>,
        /// The sequence number of the last record before it (0 for none).
        seq: u64,
        /// When.
        at: Timestamp,
        /// The instance as the new owner takes it (none before its first record).
        to: Option<Instance>,
        /// What it connects to.
        spec: InstanceSpec,
    },
    /// A record of the engine's, as its local log has it.
    Record {
        /// The epoch it was written under.
        epoch: u64,
        /// The host that wrote it.
        host: String,
        /// Its sequence number.
        seq: u64,
        /// When.
        at: Timestamp,
        /// What happened.
        event: Event,
        /// The instance afterwards.
        to: Instance,
        /// What it connects to (so a new owner needs only the last entry).
        spec: InstanceSpec,
    },
    /// Compaction: the instance as its record `seq` left it, written by its
    /// owner as a roll-up that replaces every earlier entry of the subject.
    /// Verification of a compacted subject starts here.
    Snapshot {
        /// The owner's epoch.
        epoch: u64,
        /// The owner.
        host: String,
        /// The sequence number of the record it stands for.
        seq: u64,
        /// That record's time.
        at: Timestamp,
        /// The instance as that record left it.
        to: Instance,
        /// What it connects to.
        spec: InstanceSpec,
    },
}

impl StreamEntry {
    /// The epoch it was written under.
    pub fn epoch(&self) -> u64 {
        match self {
            Self::Takeover { epoch, .. } | Self::Record { epoch, .. } | Self::Snapshot { epoch, .. } => *epoch,
        }
    }

    /// The host that wrote it.
    pub fn host(&self) -> &str {
        match self {
            Self::Takeover { host, .. } | Self::Record { host, .. } | Self::Snapshot { host, .. } => host,
        }
    }

    /// The instance's last sequence number as of this entry.
    pub fn seq(&self) -> u64 {
        match self {
            Self::Takeover { seq, .. } | Self::Record { seq, .. } | Self::Snapshot { seq, .. } => *seq,
        }
    }

    /// When it was written (a snapshot: when the record it stands for was).
    pub fn at(&self) -> Timestamp {
        match self {
            Self::Takeover { at, .. } | Self::Record { at, .. } | Self::Snapshot { at, .. } => *at,
        }
    }

    /// The instance as of this entry (`None` before its first record).
    pub fn instance(&self) -> Option<&Instance> {
        match self {
            Self::Takeover { to, .. } => to.as_ref(),
            Self::Record { to, .. } | Self::Snapshot { to, .. } => Some(to),
        }
    }

    /// What the instance connects to.
    pub fn spec(&self) -> &InstanceSpec {
        match self {
            Self::Takeover { spec, .. } | Self::Record { spec, .. } | Self::Snapshot { spec, .. } => spec,
        }
    }

    /// The entry as a record of the log, numbered by its stream sequence
    /// (the cluster's global order): what history, events and webhooks show.
    /// A takeover is not a record (`None`); a snapshot is one, as compaction
    /// writes them in a local log. The chain's links are the local logs' own
    /// and are not carried.
    pub fn to_record(&self, name: &InstanceName, stream_seq: u64) -> Option<Record> {
        let (event, to) = match self {
            Self::Takeover { .. } => return None,
            Self::Record { event, to, .. } => (event.clone(), to.clone()),
            Self::Snapshot { to, spec, .. } => (Event::Snapshot { spec: spec.clone(), token: None }, to.clone()),
        };
        Some(Record {
            instance: name.clone(),
            seq: self.seq(),
            global: stream_seq,
            at: self.at(),
            prev: None,
            replaced: None,
            event,
            to,
        })
    }

    /// Whether the instance is removed as of this entry (it needs no owner).
    pub fn removed(&self) -> bool {
        self.instance().is_some_and(|i| matches!(i.state, State::Removed { .. }))
    }

    /// The entry's bytes on the stream.
    pub fn encode(&self) -> Vec<u8> {
        // Plain data with string keys: serialising it cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Reads an entry from the stream's bytes.
    pub fn decode(bytes: &[u8]) -> Result<Self, serde_json::Error> {
        serde_json::from_slice(bytes)
    }
}

/// The subject token of an instance name. Names may hold `.`, a subject's
/// token separator; they never hold `=`, which subjects and KV keys allow:
/// so `.` becomes `=`, one to one.
pub fn token_of(name: &InstanceName) -> String {
    name.as_str().replace('.', "=")
}

/// The instance name of a subject token (`None` when it is not one).
pub fn name_of(token: &str) -> Option<InstanceName> {
    InstanceName::new(token.replace('=', ".")).ok()
}

/// What is wrong with one instance's entries.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum StreamViolation {
    /// An entry that is not one of ours.
    #[error("stream sequence {stream_seq}: not a lifecycle entry: {problem}")]
    Undecodable {
        /// Where.
        stream_seq: u64,
        /// What the decoder said.
        problem: String,
    },
    /// The header's epoch and the entry's differ.
    #[error("stream sequence {stream_seq}: epoch header {header:?} but entry epoch {entry}")]
    EpochHeader {
        /// Where.
        stream_seq: u64,
        /// The header.
        header: Option<String>,
        /// The entry.
        entry: u64,
    },
    /// A record without a takeover before it.
    #[error("record {seq} has no takeover before it")]
    NoOwner {
        /// The record.
        seq: u64,
    },
    /// An epoch lower than one before it: an older owner wrote after a newer one.
    #[error("entry at seq {seq} has epoch {epoch} after epoch {before}")]
    EpochBackwards {
        /// The instance's sequence number.
        seq: u64,
        /// Its epoch.
        epoch: u64,
        /// The epoch before it.
        before: u64,
    },
    /// A record under another epoch than the current owner's, or by another host.
    #[error("record {seq} written by {host} under epoch {epoch}, but {owner} owns it under epoch {current}")]
    NotTheOwner {
        /// The record.
        seq: u64,
        /// Who wrote it.
        host: String,
        /// Under which epoch.
        epoch: u64,
        /// The owner at that point.
        owner: String,
        /// The owner's epoch.
        current: u64,
    },
    /// Records whose sequence numbers are not one gapless run.
    #[error("expected seq {expected}, found {found}")]
    Gap {
        /// The number that should have come.
        expected: u64,
        /// The one that came.
        found: u64,
    },
    /// A snapshot that is not the subject's first entry: a roll-up replaces
    /// everything before it, so one after other entries was not written by compaction.
    #[error("snapshot of record {seq} at stream sequence {stream_seq} is not the subject's first entry")]
    MisplacedSnapshot {
        /// The record it claims to stand for.
        seq: u64,
        /// Where it is.
        stream_seq: u64,
    },
    /// A transition that does not start where the previous entry left the instance.
    #[error("record {seq} starts from another state than the entry before it left")]
    BrokenChain {
        /// The record.
        seq: u64,
    },
    /// A transition the rules of this build decide differently under the
    /// policy given (a rule broken, or hosts running different policies).
    #[error("record {seq}: recorded {recorded}, but the rules decide {recomputed}")]
    Divergence {
        /// The record.
        seq: u64,
        /// What the record says.
        recorded: String,
        /// What `step` decides.
        recomputed: String,
    },
}

/// What one instance's entries add up to.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StreamCheck {
    /// Records (after the snapshot it starts from, if compacted).
    pub records: u64,
    /// The sequence number of the snapshot a compacted subject starts from.
    pub from_snapshot: Option<u64>,
    /// Takeovers (the first owner's included).
    pub takeovers: u64,
    /// The hosts that owned it, in order.
    pub owners: Vec<String>,
    /// The instance as its last entry leaves it.
    pub last: Option<Instance>,
    /// Everything wrong.
    pub violations: Vec<StreamViolation>,
}

/// Checks one instance's entries, in stream order, each with its stream
/// sequence and epoch header: one gapless run of records, epochs that
/// never go back, and every record written by the owner of the latest
/// takeover, under its epoch — what fencing guarantees. A compacted subject
/// starts from its snapshot, which stands in for its owner's takeover and
/// the records before it. With a policy,
/// every transition is also replayed through the rules (`machine::step`),
/// as `lifecycle verify` does for a local log: R1–R12 per instance, across
/// hosts.
pub fn check(
    name: &InstanceName,
    entries: &[(u64, Option<String>, Result<StreamEntry, String>)],
    policy: Option<&Policy>,
) -> StreamCheck {
    let mut out = StreamCheck::default();
    let mut owner: Option<(String, u64)> = None;
    let mut seq = 0u64;
    for (stream_seq, header, entry) in entries {
        let entry = match entry {
            Ok(e) => e,
            Err(problem) => {
                out.violations.push(StreamViolation::Undecodable { stream_seq: *stream_seq, problem: problem.clone() });
                continue;
            }
        };
        if header.as_deref() != Some(entry.epoch().to_string().as_str()) {
            out.violations.push(StreamViolation::EpochHeader {
                stream_seq: *stream_seq,
                header: header.clone(),
                entry: entry.epoch(),
            });
        }
        if let Some((_, before)) = &owner
            && entry.epoch() < *before
        {
            out.violations.push(StreamViolation::EpochBackwards {
                seq: entry.seq(),
                epoch: entry.epoch(),
                before: *before,
            });
        }
        match entry {
            StreamEntry::Snapshot { epoch, host, seq: s, to, .. } => {
                // A roll-up replaces every earlier entry of its subject: it is always the first.
                let first = out.takeovers == 0 && out.records == 0 && out.from_snapshot.is_none();
                if first {
                    out.from_snapshot = Some(*s);
                    out.owners.push(host.clone());
                } else {
                    out.violations.push(StreamViolation::MisplacedSnapshot { seq: *s, stream_seq: *stream_seq });
                }
                owner = Some((host.clone(), *epoch));
                seq = *s;
                out.last = Some(to.clone());
            }
            StreamEntry::Takeover { epoch, host, .. } => {
                out.takeovers += 1;
                if entry.seq() != seq {
                    out.violations.push(StreamViolation::Gap { expected: seq, found: entry.seq() });
                }
                if out.owners.last() != Some(host) {
                    out.owners.push(host.clone());
                }
                owner = Some((host.clone(), *epoch));
            }
            StreamEntry::Record { epoch, host, seq: s, event, to, at, .. } => {
                out.records += 1;
                match &owner {
                    None => out.violations.push(StreamViolation::NoOwner { seq: *s }),
                    Some((o, current)) if o != host || current != epoch => {
                        out.violations.push(StreamViolation::NotTheOwner {
                            seq: *s,
                            host: host.clone(),
                            epoch: *epoch,
                            owner: o.clone(),
                            current: *current,
                        });
                    }
                    Some(_) => {}
                }
                let expected = seq.saturating_add(1);
                if *s != expected {
                    out.violations.push(StreamViolation::Gap { expected, found: *s });
                }
                if let Event::Transition { from, input, effects } = event {
                    if out.last.as_ref().is_some_and(|last| last != from) {
                        out.violations.push(StreamViolation::BrokenChain { seq: *s });
                    }
                    if let Some(policy) = policy
                        && let Some((recorded, recomputed)) = crate::log::replay(
                            (crate::machine::RulesVersion::CURRENT, policy),
                            name,
                            from,
                            input,
                            effects,
                            to,
                            *at,
                        )
                    {
                        out.violations.push(StreamViolation::Divergence { seq: *s, recorded, recomputed });
                    }
                }
                seq = *s;
                out.last = Some(to.clone());
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name() -> InstanceName {
        InstanceName::new("x").unwrap()
    }

    fn spec() -> InstanceSpec {
        InstanceSpec { url: "ws://127.0.0.1:1/x".into() }
    }

    fn takeover(epoch: u64, host: &str, seq: u64) -> StreamEntry {
        StreamEntry::Takeover {
            epoch,
            host: host.into(),
            from_host: None,
            seq,
            at: Timestamp(0),
            to: None,
            spec: spec(),
        }
    }

    fn created(epoch: u64, host: &str) -> StreamEntry {
        StreamEntry::Record {
            epoch,
            host: host.into(),
            seq: 1,
            at: Timestamp(0),
            event: Event::Created { spec: spec(), token: None },
            to: Instance::new(),
            spec: spec(),
        }
    }

    fn with_headers(entries: Vec<StreamEntry>) -> Vec<(u64, Option<String>, Result<StreamEntry, String>)> {
        entries.into_iter().enumerate().map(|(i, e)| (i as u64 + 1, Some(e.epoch().to_string()), Ok(e))).collect()
    }

    #[test]
    fn names_map_to_subject_tokens_one_to_one() {
        for raw in ["acme-prod.01", "a_b", "a.b.c", "x"] {
            let name = InstanceName::new(raw).unwrap();
            let token = token_of(&name);
            assert!(!token.contains('.') && !token.contains('*') && !token.contains('>'), "{token}");
            assert_eq!(name_of(&token), Some(name));
        }
    }

    #[test]
    fn an_owners_run_checks_clean() {
        let c = check(&name(), &with_headers(vec![takeover(3, "a", 0), created(3, "a"), takeover(9, "b", 1)]), None);
        assert_eq!(c.violations, vec![]);
        assert_eq!((c.records, c.takeovers), (1, 2));
        assert_eq!(c.owners, vec!["a".to_string(), "b".to_string()]);
    }

    #[test]
    fn a_stale_owners_record_after_a_takeover_is_found() {
        let c = check(&name(), &with_headers(vec![takeover(3, "a", 0), takeover(9, "b", 0), created(3, "a")]), None);
        assert!(c.violations.iter().any(|v| matches!(v, StreamViolation::NotTheOwner { .. })), "{c:?}");
        assert!(c.violations.iter().any(|v| matches!(v, StreamViolation::EpochBackwards { .. })), "{c:?}");
    }

    #[test]
    fn a_second_created_is_a_gap() {
        let c = check(&name(), &with_headers(vec![takeover(3, "a", 0), created(3, "a"), created(3, "a")]), None);
        assert_eq!(c.violations, vec![StreamViolation::Gap { expected: 2, found: 1 }]);
    }

    #[test]
    fn a_record_without_an_owner_or_a_header_is_found() {
        let mut entries = with_headers(vec![created(3, "a")]);
        entries[0].1 = None;
        let c = check(&name(), &entries, None);
        assert!(c.violations.contains(&StreamViolation::NoOwner { seq: 1 }));
        assert!(c.violations.iter().any(|v| matches!(v, StreamViolation::EpochHeader { .. })));
    }

    #[test]
    fn a_transition_the_rules_decide_otherwise_is_a_divergence() {
        use crate::machine::{Input, Outcome, step};
        let policy = Policy::default();
        let closed = Instance::new();
        let Outcome::Transition(t) = step(&name(), &closed, &Input::Connect, &policy, Timestamp(5)) else {
            panic!("connect from Closed moves")
        };
        let to = Instance { state: t.to.clone(), generation: t.generation };
        let record = |to: Instance, effects| StreamEntry::Record {
            epoch: 3,
            host: "a".into(),
            seq: 2,
            at: Timestamp(5),
            event: Event::Transition { from: closed.clone(), input: Input::Connect, effects },
            to,
            spec: spec(),
        };
        let honest = vec![takeover(3, "a", 0), created(3, "a"), record(to.clone(), t.effects.clone())];
        assert_eq!(check(&name(), &with_headers(honest), Some(&policy)).violations, vec![]);
        // The same input recorded as leading straight to Removed: not what the table decides.
        let forged = Instance {
            state: State::Removed { cleanup: crate::machine::CleanupOutcome::Finished { steps: vec![] } },
            ..to
        };
        let lying = vec![takeover(3, "a", 0), created(3, "a"), record(forged, t.effects)];
        let c = check(&name(), &with_headers(lying), Some(&policy));
        assert!(matches!(c.violations.as_slice(), [StreamViolation::Divergence { seq: 2, .. }]), "{c:?}");
    }

    #[test]
    fn entries_read_back_as_written() {
        let e = created(7, "h");
        assert_eq!(StreamEntry::decode(&e.encode()).unwrap(), e);
        assert!(StreamEntry::decode(b"{\"kind\":\"other\"}").is_err());
    }
}
