//! Verification of R8 over a whole log: the head matches the tip (nothing
//! acknowledged was lost, see [`HeadCheck`]), per-instance sequence numbers
//! start at 1 (or at a snapshot) without gaps, each record chains to the
//! previous one (its `prev` digest, and its "from" is the previous "to"),
//! replaying each input through the rules reproduces the recorded "to" and
//! effects, the latest-state cache agrees with the records, and the global
//! index points at every record. It returns a report, never panics, and goes
//! on past a bad instance to the next.

use std::collections::BTreeSet;
use std::fmt;

use super::integrity::{AcceptedLoss, HeadCheck};
use super::record::{Digest, Event, Latest, Record};
use super::{Log, LogError, decode_pair_with_digest, keys};
use std::collections::BTreeMap;

use crate::machine::{Effect, Instance, InstanceName, Outcome, Policy, RulesVersion, State, step_under};

/// One problem found in a log.
#[derive(Debug)]
#[non_exhaustive]
pub enum Finding {
    /// The head says records are lost, or the head itself is lost or foreign.
    Head {
        /// What opening found.
        check: HeadCheck,
    },
    /// A record does not chain to its instance's previous record: its `prev`
    /// is not that record's link (a record replaced, or one from another history).
    BrokenLink {
        /// The instance.
        instance: InstanceName,
        /// The record's sequence.
        seq: u64,
        /// The previous record's link.
        expected: Digest,
        /// This record's `prev`.
        found: Digest,
    },
    /// A record or entry could not be read.
    Corrupt {
        /// The error, naming instance and sequence.
        error: LogError,
    },
    /// The first record of a chain is neither `Created` at seq 1 nor a snapshot.
    BadStart {
        /// The instance.
        instance: InstanceName,
        /// Its first sequence number.
        seq: u64,
        /// What that record is.
        event: &'static str,
    },
    /// A sequence number was skipped.
    Gap {
        /// The instance.
        instance: InstanceName,
        /// The sequence expected.
        expected: u64,
        /// The sequence found.
        found: u64,
    },
    /// A record's "from" is not the previous record's "to".
    BrokenChain {
        /// The instance.
        instance: InstanceName,
        /// The record's sequence.
        seq: u64,
        /// The previous record's "to".
        previous_to: Box<Instance>,
        /// This record's "from".
        from: Box<Instance>,
    },
    /// A `Created` record in the middle of a live history (only allowed after `Removed`),
    /// or a snapshot that is not the first record.
    Misplaced {
        /// The instance.
        instance: InstanceName,
        /// The record's sequence.
        seq: u64,
        /// What it is.
        event: &'static str,
    },
    /// The current rules decide differently from what was recorded: the first
    /// such record of the instance (later ones usually follow from it).
    Divergence {
        /// The instance.
        instance: InstanceName,
        /// The record's sequence.
        seq: u64,
        /// The record's global sequence.
        global: u64,
        /// The input, printed.
        input: String,
        /// The recorded decision: state and effects.
        recorded: String,
        /// What the rules decide.
        recomputed: String,
        /// The rules version it was replayed under (for a record from before
        /// versions were recorded: the newest one tried).
        rules: RulesVersion,
    },
    /// Global sequence numbers do not increase along an instance's history.
    GlobalOrder {
        /// The instance.
        instance: InstanceName,
        /// The record's sequence.
        seq: u64,
    },
    /// The latest-state cache disagrees with the last record (recovery would replay).
    LatestMismatch {
        /// The instance.
        instance: InstanceName,
        /// What is wrong.
        detail: String,
    },
    /// The global index is missing an entry or points at nothing.
    Index {
        /// What is wrong.
        detail: String,
    },
    /// Replaying the journal stopped at damage that no crash explains (a gap
    /// between sled and the journal, or a bad frame in a file older than the
    /// newest): batches after it were not applied.
    Journal {
        /// Where and why replay stopped.
        detail: String,
    },
    /// The log says a stretch of records was written under rules this build
    /// does not know (a newer build's): they are replayed under this build's.
    UnknownRules {
        /// The version recorded.
        version: RulesVersion,
        /// From which global sequence number.
        from: u64,
    },
    /// The log does not reach a head recorded elsewhere (see [`Log::check_anchor`]):
    /// the whole directory was restored from an older copy, or replaced.
    Anchor {
        /// The global sequence number of the expected head.
        expected: u64,
        /// What is wrong.
        detail: String,
    },
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Head { check } => write!(f, "head: {check}"),
            Self::BrokenLink { instance, seq, expected, found } => write!(
                f,
                "{instance}#{seq}: broken chain: its prev digest is {found}, the previous record's link is {expected}"
            ),
            Self::Corrupt { error } => write!(f, "corrupt: {error}"),
            Self::BadStart { instance, seq, event } => {
                write!(
                    f,
                    "{instance}: history starts at seq {seq} with {event}, not with created at seq 1 or a snapshot"
                )
            }
            Self::Gap { instance, expected, found } => {
                write!(f, "{instance}: gap: expected seq {expected}, found {found}")
            }
            Self::BrokenChain { instance, seq, previous_to, from } => write!(
                f,
                "{instance}#{seq}: broken chain: previous record ended in {} ({}), this one starts from {} ({})",
                previous_to.state, previous_to.generation, from.state, from.generation
            ),
            Self::Misplaced { instance, seq, event } => {
                write!(f, "{instance}#{seq}: {event} in the middle of a history")
            }
            Self::Divergence { instance, seq, global, input, recorded, recomputed, rules } => write!(
                f,
                "{instance}#{seq} (global {global}): the rules ({rules}) decide differently on {input}\n    recorded:   {recorded}\n    {rules}:   {recomputed}"
            ),
            Self::GlobalOrder { instance, seq } => write!(f, "{instance}#{seq}: global sequence does not increase"),
            Self::LatestMismatch { instance, detail } => write!(f, "{instance}: latest-state entry {detail}"),
            Self::Index { detail } => write!(f, "global index: {detail}"),
            Self::Anchor { expected, detail } => write!(f, "expected head {expected}: {detail}"),
            Self::Journal { detail } => write!(f, "journal: {detail}"),
            Self::UnknownRules { version, from } => write!(
                f,
                "records from global {from} on were written under {version}, which this build does not know (a newer build's?): replayed under {}",
                RulesVersion::CURRENT
            ),
        }
    }
}

/// Something a person should know about a log that is not a fault.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Note {
    /// The head trails the log (records never acknowledged before a stop; not a loss).
    HeadBehind {
        /// What opening found.
        check: HeadCheck,
    },
    /// Records written before records were chained (format v1): their chain is not checked.
    Unchained {
        /// How many.
        records: u64,
    },
    /// A format-v1 log: it has no head yet.
    Legacy,
    /// Records written before logs recorded their rules version, each
    /// replayed under the newest version that decides it as recorded.
    UnversionedRules {
        /// How many records each version explained.
        by_version: BTreeMap<RulesVersion, u64>,
    },
    /// Every record was replayed under this build's rules (`verify --rules current`),
    /// not the rules it was written under.
    CurrentRules,
    /// A writer was told to accept a loss, and did.
    AcceptedLoss(AcceptedLoss),
    /// The journal held batches sled's files did not (the writer stopped
    /// before a checkpoint: a crash, or a copy of a live log), replayed at open.
    JournalReplayed {
        /// Batches applied.
        applied: u64,
        /// Where replay stopped short of the journal's end, at a write a crash interrupted.
        stopped: Option<String>,
        /// A batch sled held in part, completed at open (its JSN): the writer
        /// stopped while putting it in, before its commit began.
        completed: Option<u64>,
        /// Damage replay read past, continuity proven by the next frame's
        /// number (see [`super::Replayed::bridged`]).
        bridged: Vec<String>,
    },
}

impl fmt::Display for Note {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::HeadBehind { check } => write!(f, "{check}"),
            Self::Unchained { records } => {
                write!(f, "{records} record(s) were written before records were chained; their chain is not checked")
            }
            Self::UnversionedRules { by_version } => {
                let by: Vec<String> = by_version.iter().map(|(v, n)| format!("{n} under {v}")).collect();
                write!(
                    f,
                    "written before logs recorded their rules version: each record replayed under the newest rules that decide it as recorded ({})",
                    by.join(", ")
                )
            }
            Self::CurrentRules => write!(
                f,
                "every record replayed under this build's rules ({}), not the rules it was written under",
                RulesVersion::CURRENT
            ),
            Self::Legacy => f.write_str(
                "written before logs had a head: a rollback of its database cannot be detected until a writer opens it",
            ),
            Self::JournalReplayed { applied, stopped, completed, bridged } => {
                write!(
                    f,
                    "the journal held {applied} batch(es) sled's files did not (a stop before a checkpoint): replayed"
                )?;
                if let Some(jsn) = completed {
                    write!(f, "; batch {jsn}, which the writer stopped in the middle of putting in, was completed")?;
                }
                for b in bridged {
                    write!(f, "; read past {b}")?;
                }
                stopped.as_ref().map_or(Ok(()), |s| write!(f, "; it ends in {s}"))
            }
            Self::AcceptedLoss(loss) => write!(
                f,
                "a loss was accepted at {} UTC: {}; numbering went on after global {}",
                loss.at.utc(),
                loss.check,
                loss.resumed_after
            ),
        }
    }
}

/// The result of verifying a log.
#[derive(Debug, Default)]
pub struct Report {
    /// Instances checked.
    pub instances: u64,
    /// Records checked.
    pub records: u64,
    /// Everything wrong, instance by instance.
    pub findings: Vec<Finding>,
    /// What is worth knowing and not wrong.
    pub notes: Vec<Note>,
}

/// Which rules `verify` replays each record under.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum RulesChoice {
    /// The version the log recorded as in force when the record was
    /// written; a record older than every recorded version is replayed under
    /// the newest version that decides it as recorded (logs did not record
    /// it before version 3, and versions 1–3 are all this build can replay).
    #[default]
    Recorded,
    /// This build's rules for every record: after an upgrade, where do
    /// today's rules part from what was recorded (the first divergence).
    Current,
}

/// The rules versions each record is replayed under.
enum Versions {
    Current,
    /// The recorded versions, each from its global sequence number on.
    Recorded(Vec<(u64, RulesVersion)>),
}

/// Newest first: what an unversioned record is tried under.
const UNVERSIONED: [RulesVersion; 3] = [RulesVersion::V3, RulesVersion::V2, RulesVersion::V1];

impl Versions {
    /// The versions to try for the record at `global`, and whether the
    /// log recorded it (`false`: inferred).
    fn at(&self, global: u64) -> (&[RulesVersion], bool) {
        match self {
            Self::Current => (std::slice::from_ref(&RulesVersion::CURRENT), true),
            Self::Recorded(recorded) => match recorded.iter().rev().find(|(from, _)| *from <= global) {
                Some((_, v)) if v.is_known() => (std::slice::from_ref(v), true),
                Some(_) => (std::slice::from_ref(&RulesVersion::CURRENT), true),
                None => (&UNVERSIONED, false),
            },
        }
    }
}

/// The policy each record is replayed under.
enum Rules<'a> {
    /// One policy for every record (the caller's choice).
    Fixed(&'a Policy),
    /// The policies the log recorded, each from its global sequence number on;
    /// `fallback` before the first.
    Recorded { policies: Vec<(u64, Policy)>, fallback: &'a Policy },
}

impl Rules<'_> {
    fn at(&self, global: u64) -> &Policy {
        match self {
            Self::Fixed(p) => p,
            Self::Recorded { policies, fallback } => {
                policies.iter().rev().find(|(from, _)| *from <= global).map_or(*fallback, |(_, p)| p)
            }
        }
    }
}

/// What one instance's records are replayed under.
struct Replay<'r, 'a> {
    policies: &'r Rules<'a>,
    versions: &'r Versions,
    /// Unversioned records, by the version that explained them.
    inferred: &'r mut BTreeMap<RulesVersion, u64>,
}

impl Replay<'_, '_> {
    /// `None` when the rules decide as recorded, else (recorded, decided by
    /// the newest version tried).
    fn record(
        &mut self,
        name: &InstanceName,
        from: &Instance,
        input: &crate::machine::Input,
        effects: &[Effect],
        r: &Record,
    ) -> Option<(String, String, RulesVersion)> {
        let policy = self.policies.at(r.global);
        let (versions, versioned) = self.versions.at(r.global);
        let mut first = None;
        for &version in versions {
            match replay((version, policy), name, from, input, effects, &r.to, r.at) {
                None => {
                    if !versioned {
                        *self.inferred.entry(version).or_default() += 1;
                    }
                    return None;
                }
                Some((recorded, recomputed)) => {
                    first.get_or_insert((recorded, recomputed, version));
                }
            }
        }
        first
    }
}

impl Report {
    /// True when nothing was found.
    pub fn is_clean(&self) -> bool {
        self.findings.is_empty()
    }

    /// The divergence with the lowest global sequence: the first record where
    /// the current rules decide differently.
    pub fn first_divergence(&self) -> Option<&Finding> {
        self.findings
            .iter()
            .filter(|f| matches!(f, Finding::Divergence { .. }))
            .min_by_key(|f| if let Finding::Divergence { global, .. } = f { *global } else { u64::MAX })
    }
}

fn describe(state: &State, generation: crate::machine::Generation, effects: &[Effect]) -> String {
    format!("→ {state} ({generation}), effects {effects:?}")
}

/// Replays one recorded transition under a version of the rules and a
/// policy: `None` when they decide the same, else (what was recorded, what they decide).
pub(crate) fn replay(
    (rules, policy): (RulesVersion, &Policy),
    name: &InstanceName,
    from: &Instance,
    input: &crate::machine::Input,
    effects: &[Effect],
    to: &Instance,
    at: crate::machine::Timestamp,
) -> Option<(String, String)> {
    let recomputed = match step_under(rules, name, from, input, policy, at) {
        Outcome::Transition(t) if t.to == to.state && t.generation == to.generation && t.effects == effects => {
            return None;
        }
        Outcome::Transition(t) => describe(&t.to, t.generation, &t.effects),
        Outcome::Effects(effects) => format!("no transition, only upkeep {effects:?}"),
        Outcome::Ignored(why) => format!("ignored: {why}"),
        Outcome::Rejected(why) => format!("rejected: {why}"),
    };
    Some((describe(&to.state, to.generation, effects), recomputed))
}

impl Log {
    /// Verifies the whole log, replaying every record under `policy` and
    /// under the rules version the log recorded for it.
    pub fn verify(&self, policy: &Policy) -> Report {
        self.verify_under(Some(policy), policy, RulesChoice::Recorded)
    }

    /// Verifies the whole log, replaying each record under the policy the
    /// log recorded as in force when it was written (`fallback` for records
    /// older than every recorded policy).
    pub fn verify_recorded(&self, fallback: &Policy) -> Report {
        self.verify_under(None, fallback, RulesChoice::Recorded)
    }

    /// Verifies the whole log: each record replayed under `policy` (or, with
    /// `None`, the policy the log recorded for it, `fallback` before the
    /// first) and under the rules `rules` chooses.
    pub fn verify_under(&self, policy: Option<&Policy>, fallback: &Policy, rules: RulesChoice) -> Report {
        let mut early = Vec::new();
        let policies = match policy {
            Some(p) => Rules::Fixed(p),
            None => match self.policies() {
                Ok(policies) => Rules::Recorded { policies, fallback },
                Err(error) => {
                    early.push(Finding::Corrupt { error });
                    Rules::Fixed(fallback)
                }
            },
        };
        let versions = match rules {
            RulesChoice::Current => Versions::Current,
            RulesChoice::Recorded => match self.rules_versions() {
                Ok(recorded) => {
                    early.extend(
                        recorded
                            .iter()
                            .filter(|(_, v)| !v.is_known())
                            .map(|&(from, version)| Finding::UnknownRules { version, from }),
                    );
                    Versions::Recorded(recorded)
                }
                Err(error) => {
                    early.push(Finding::Corrupt { error });
                    Versions::Current
                }
            },
        };
        let mut report = self.verify_with(&policies, &versions);
        if rules == RulesChoice::Current {
            report.notes.push(Note::CurrentRules);
        }
        early.append(&mut report.findings);
        report.findings = early;
        report
    }

    /// Checks that the log still reaches a head recorded outside it (by
    /// monitoring, a deploy script, the operator: `Log::tip` when all was
    /// well). The head file lives in the log's directory, so a restore of the
    /// whole directory from an older copy takes it back too; only a head
    /// kept elsewhere can tell. `None` when the log reaches it (or compaction
    /// removed the record it names, so it cannot tell).
    pub fn check_anchor(&self, global: u64, link: Digest) -> Option<Finding> {
        let (tip, _) = self.tip();
        if global > tip {
            let detail = format!(
                "the log ends at global {tip}: {} record(s) it once had are missing (was the directory restored from an older copy?)",
                global - tip
            );
            return Some(Finding::Anchor { expected: global, detail });
        }
        match super::integrity::link_at(self.store(), global) {
            Err(error) => Some(Finding::Corrupt { error }),
            Ok(Some(found)) if found != link => Some(Finding::Anchor {
                expected: global,
                detail: format!(
                    "the record at global {global} has link {found}, not {link}: the log was replaced or rewritten"
                ),
            }),
            Ok(_) => None,
        }
    }

    fn verify_with(&self, rules: &Rules<'_>, versions: &Versions) -> Report {
        let mut report = Report::default();
        let mut inferred = BTreeMap::new();
        match self.head_check() {
            // The journal's own finding (below) says the same, where it is.
            HeadCheck::JournalDamaged { .. } => {}
            check if check.is_damage() => report.findings.push(Finding::Head { check: check.clone() }),
            check @ HeadCheck::Behind { .. } => report.notes.push(Note::HeadBehind { check: check.clone() }),
            HeadCheck::Legacy => report.notes.push(Note::Legacy),
            _ => {}
        }
        judge_replay(self.replayed(), &mut report);
        match self.accepted_losses() {
            Ok(losses) => report.notes.extend(losses.into_iter().map(Note::AcceptedLoss)),
            Err(error) => report.findings.push(Finding::Corrupt { error }),
        }
        let names = match self.names() {
            Ok(n) => n,
            Err(error) => {
                report.findings.push(Finding::Corrupt { error });
                return report;
            }
        };
        let mut globals = BTreeSet::new();
        let mut unchained = 0;
        for name in &names {
            report.instances += 1;
            let replay = Replay { policies: rules, versions, inferred: &mut inferred };
            let last = self.verify_instance(name, replay, &mut report, &mut globals, &mut unchained);
            self.verify_latest(name, last.as_ref(), &mut report);
        }
        if unchained > 0 {
            report.notes.push(Note::Unchained { records: unchained });
        }
        if !inferred.is_empty() {
            report.notes.push(Note::UnversionedRules { by_version: inferred });
        }
        self.verify_index(&globals, &mut report);
        report
    }

    fn verify_instance(
        &self,
        name: &InstanceName,
        mut replay: Replay<'_, '_>,
        report: &mut Report,
        globals: &mut BTreeSet<u64>,
        unchained: &mut u64,
    ) -> Option<Record> {
        let mut prev: Option<(Record, Digest)> = None;
        let mut diverged = false;
        for pair in self.store().scan(&keys::record_prefix(name)) {
            let (r, digest) = match pair.map_err(LogError::from).and_then(decode_pair_with_digest) {
                Ok(r) => r,
                Err(error) => {
                    report.findings.push(Finding::Corrupt { error });
                    return None; // the rest of this chain cannot be trusted
                }
            };
            report.records += 1;
            globals.insert(r.global);
            let instance = || name.clone();
            self.check_link(&r, prev.as_ref(), report, unchained);
            match prev.as_ref().map(|(p, _)| p) {
                None => {
                    let ok = matches!(r.event, Event::Snapshot { .. })
                        || (r.seq == 1 && matches!(r.event, Event::Created { .. }));
                    if !ok {
                        report.findings.push(Finding::BadStart {
                            instance: instance(),
                            seq: r.seq,
                            event: r.event.label(),
                        });
                    }
                }
                Some(p) => {
                    if p.seq.checked_add(1) != Some(r.seq) {
                        let expected = p.seq.saturating_add(1);
                        report.findings.push(Finding::Gap { instance: instance(), expected, found: r.seq });
                    }
                    if r.global <= p.global {
                        report.findings.push(Finding::GlobalOrder { instance: instance(), seq: r.seq });
                    }
                    match &r.event {
                        Event::Created { .. } if !matches!(p.to.state, State::Removed { .. }) => {
                            report.findings.push(Finding::Misplaced {
                                instance: instance(),
                                seq: r.seq,
                                event: "created",
                            });
                        }
                        Event::Snapshot { .. } => {
                            report.findings.push(Finding::Misplaced {
                                instance: instance(),
                                seq: r.seq,
                                event: "snapshot",
                            });
                        }
                        Event::Transition { from, .. } if *from != p.to => report.findings.push(Finding::BrokenChain {
                            instance: instance(),
                            seq: r.seq,
                            previous_to: Box::new(p.to.clone()),
                            from: Box::new(from.clone()),
                        }),
                        _ => {}
                    }
                }
            }
            if let Event::Created { .. } = r.event
                && r.to != Instance::new()
            {
                report.findings.push(Finding::Misplaced {
                    instance: instance(),
                    seq: r.seq,
                    event: "created with a non-initial state",
                });
            }
            if let Event::Transition { from, input, effects } = &r.event
                && !diverged
                && let Some((recorded, recomputed, rules)) = replay.record(name, from, input, effects, &r)
            {
                diverged = true;
                report.findings.push(Finding::Divergence {
                    instance: instance(),
                    seq: r.seq,
                    global: r.global,
                    input: format!("{input:?} from {} ({})", from.state, from.generation),
                    recorded,
                    recomputed,
                    rules,
                });
            }
            prev = Some((r, digest));
        }
        prev.map(|(r, _)| r)
    }

    /// The chain: a record's `prev` is its predecessor's link (an instance's
    /// first record: zero), and only a snapshot replaces a record.
    fn check_link(&self, r: &Record, prev: Option<&(Record, Digest)>, report: &mut Report, unchained: &mut u64) {
        let snapshot = matches!(r.event, Event::Snapshot { .. });
        if r.replaced.is_some() != snapshot && r.prev.is_some() {
            let event = if snapshot {
                "snapshot without the digest it replaced"
            } else {
                "replaced digest on a record that is not a snapshot"
            };
            report.findings.push(Finding::Misplaced { instance: r.instance.clone(), seq: r.seq, event });
        }
        let Some(found) = r.prev else {
            *unchained += 1;
            return;
        };
        let expected = match prev {
            // A snapshot starts the kept history: its own `prev` points into what it replaced.
            _ if snapshot => return,
            Some((p, digest)) => p.link(*digest),
            None => Digest::ZERO,
        };
        if found != expected {
            report.findings.push(Finding::BrokenLink { instance: r.instance.clone(), seq: r.seq, expected, found });
        }
    }

    fn verify_latest(&self, name: &InstanceName, last: Option<&Record>, report: &mut Report) {
        let Some(last) = last else { return };
        let detail = match self.store().get(&keys::latest(name)) {
            Err(e) => Some(format!("unreadable: {e}")),
            Ok(None) => Some("is missing".to_owned()),
            Ok(Some(bytes)) => match super::record::decode::<Latest>(&bytes, false) {
                Err(e) => Some(format!("is corrupt: {e}")),
                Ok(l) if l.seq != last.seq || l.instance != last.to => Some(format!(
                    "says seq {} {}, the last record says seq {} {}",
                    l.seq, l.instance.state, last.seq, last.to.state
                )),
                Ok(_) => None,
            },
        };
        if let Some(detail) = detail {
            report.findings.push(Finding::LatestMismatch { instance: name.clone(), detail });
        }
    }

    fn verify_index(&self, globals: &BTreeSet<u64>, report: &mut Report) {
        let mut indexed = BTreeSet::new();
        for pair in self.store().scan(&[keys::GLOBAL]) {
            match pair {
                Err(e) => report.findings.push(Finding::Index { detail: format!("unreadable: {e}") }),
                Ok((key, _)) => match keys::parse_global(&key) {
                    Some(g) => {
                        indexed.insert(g);
                    }
                    None => report.findings.push(Finding::Index { detail: format!("malformed key {key:?}") }),
                },
            }
        }
        if let Some(g) = globals.difference(&indexed).next() {
            let missing = globals.difference(&indexed).count();
            report
                .findings
                .push(Finding::Index { detail: format!("{missing} records not indexed (first: global {g})") });
        }
        if let Some(g) = indexed.difference(globals).next() {
            let dangling = indexed.difference(globals).count();
            report
                .findings
                .push(Finding::Index { detail: format!("{dangling} entries point at no record (first: global {g})") });
        }
    }
}

/// The journal replay's verdict at open: a stop no crash explains (a gap, a
/// bad frame in an older file) is a finding; a replay that applied,
/// stopped at the tail or completed a batch is a note; one that found
/// everything in sled already says nothing.
fn judge_replay(replayed: Option<super::Replayed>, report: &mut Report) {
    match replayed {
        Some(r) if r.damaged => report.findings.push(Finding::Journal { detail: r.stopped.unwrap_or_default() }),
        Some(r) if r.applied > 0 || r.stopped.is_some() || r.completed.is_some() || !r.bridged.is_empty() => {
            report.notes.push(Note::JournalReplayed {
                applied: r.applied,
                stopped: r.stopped,
                completed: r.completed,
                bridged: r.bridged,
            });
        }
        _ => {}
    }
}

#[cfg(test)]
mod journal_verdicts {
    use super::*;
    use crate::log::Replayed;

    fn judged(r: Option<Replayed>) -> Report {
        let mut report = Report::default();
        judge_replay(r, &mut report);
        report
    }

    fn quiet() -> Replayed {
        Replayed { files: 2, skipped: 5, ..Replayed::default() }
    }

    #[test]
    fn a_replay_that_found_everything_in_sled_says_nothing() {
        for r in [None, Some(quiet())] {
            let report = judged(r);
            assert!(report.findings.is_empty() && report.notes.is_empty(), "{report:?}");
        }
    }

    #[test]
    fn damage_no_crash_explains_is_a_finding_not_a_note() {
        let stopped = Some("a gap after frame 7".to_owned());
        for applied in [0, 3] {
            let report = judged(Some(Replayed { damaged: true, applied, stopped: stopped.clone(), ..quiet() }));
            assert!(
                matches!(report.findings.as_slice(), [Finding::Journal { detail }] if detail == "a gap after frame 7"),
                "{report:?}"
            );
            assert!(report.notes.is_empty(), "{report:?}");
        }
        let report = judged(Some(Replayed { damaged: true, ..quiet() }));
        assert!(matches!(report.findings.as_slice(), [Finding::Journal { detail }] if detail.is_empty()), "{report:?}");
    }

    #[test]
    fn each_thing_a_replay_did_is_a_note_on_its_own() {
        let cases = [
            Replayed { applied: 1, ..quiet() },
            Replayed { stopped: Some("frame 9 cut short".into()), ..quiet() },
            Replayed { completed: Some(4), ..quiet() },
            Replayed { bridged: vec!["a frame cut short at offset 90 of journal file 1".into()], ..quiet() },
        ];
        for r in cases {
            let expected = Note::JournalReplayed {
                applied: r.applied,
                stopped: r.stopped.clone(),
                completed: r.completed,
                bridged: r.bridged.clone(),
            };
            let report = judged(Some(r));
            assert!(report.findings.is_empty(), "{report:?}");
            assert_eq!(report.notes, vec![expected]);
        }
    }
}
