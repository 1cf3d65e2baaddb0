//! Recovery after a restart (R11): every instance back to its last recorded
//! state, from the latest-state cache (fast) or from the records alone
//! (replay). The cache is only a cache: an entry that cannot be decoded or
//! disagrees with the records is reported and the instance is replayed. A
//! record that cannot be decoded fails recovery, unless quarantine is asked
//! for, which sets that instance aside and brings up the rest.

use std::collections::BTreeMap;

use super::record::{self, Event, Latest, Record};
use super::{Log, LogError, decode_pair, decode_pair_with_digest, keys};
use crate::machine::{Instance, InstanceName, Timestamp};

/// How to rebuild the states.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum RecoveryMode {
    /// From the latest-state entries, checked against each instance's last record.
    #[default]
    Fast,
    /// From every record, ignoring the latest-state entries.
    Replay,
}

/// Recovery options.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RecoveryOptions {
    /// How to rebuild the states.
    pub mode: RecoveryMode,
    /// Set aside instances with undecodable records instead of failing.
    pub quarantine: bool,
}

/// One recovered instance.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecoveredInstance {
    /// The instance as last recorded.
    pub instance: Instance,
    /// Sequence number of its last record.
    pub seq: u64,
    /// Time of its last record.
    pub at: Timestamp,
}

/// What recovery found.
#[derive(Debug, Default)]
pub struct Recovery {
    /// Every instance with records, including removed ones (which never come back).
    pub instances: BTreeMap<InstanceName, RecoveredInstance>,
    /// Cache entries that were wrong or unreadable, and what was done instead.
    pub notes: Vec<String>,
    /// Instances set aside in quarantine mode, with the reason.
    pub quarantined: Vec<(InstanceName, LogError)>,
}

impl Log {
    /// Restores every instance to its last recorded state.
    pub fn recover(&self, options: RecoveryOptions) -> Result<Recovery, LogError> {
        let mut out = Recovery::default();
        let mut latest: BTreeMap<InstanceName, Result<Latest, String>> = BTreeMap::new();
        if options.mode == RecoveryMode::Fast {
            for pair in self.store().scan(&[keys::LATEST]) {
                let (key, value) = pair?;
                let name = std::str::from_utf8(&key[1..]).ok().and_then(|n| InstanceName::new(n).ok());
                let Some(name) = name else {
                    out.notes.push(format!(
                        "latest-state key {:?} is not an instance name; ignored",
                        String::from_utf8_lossy(&key)
                    ));
                    continue;
                };
                latest.insert(name, record::decode::<Latest>(&value, false).map_err(|e| e.to_string()));
            }
        }
        for name in self.names()? {
            let result = match (options.mode, latest.remove(&name)) {
                (RecoveryMode::Fast, Some(Ok(entry))) => self.check_latest(&name, entry, &mut out.notes),
                (RecoveryMode::Fast, Some(Err(e))) => {
                    out.notes.push(format!("{name}: latest-state entry unreadable ({e}); replayed its records"));
                    self.replay(&name)
                }
                (RecoveryMode::Fast, None) => {
                    out.notes.push(format!("{name}: no latest-state entry; replayed its records"));
                    self.replay(&name)
                }
                (RecoveryMode::Replay, _) => self.replay(&name),
            };
            match result {
                Ok(r) => {
                    out.instances.insert(name, r);
                }
                Err(e) if options.quarantine => out.quarantined.push((name, e)),
                Err(e) => return Err(e),
            }
        }
        for (name, _) in latest {
            out.notes.push(format!("{name}: latest-state entry without records; ignored"));
        }
        Ok(out)
    }

    fn check_latest(
        &self,
        name: &InstanceName,
        entry: Latest,
        notes: &mut Vec<String>,
    ) -> Result<RecoveredInstance, LogError> {
        let last = self.store().last(&keys::record_prefix(name))?.map(decode_pair).transpose()?;
        match last {
            Some(r) if r.seq == entry.seq && r.to == entry.instance => {
                Ok(RecoveredInstance { instance: entry.instance, seq: entry.seq, at: entry.at })
            }
            _ => {
                notes.push(format!("{name}: latest-state entry disagrees with the last record; replayed its records"));
                self.replay(name)
            }
        }
    }

    /// Rebuilds one instance from its records alone, checking that they chain.
    fn replay(&self, name: &InstanceName) -> Result<RecoveredInstance, LogError> {
        let mut last: Option<(Record, record::Digest)> = None;
        for pair in self.store().scan(&keys::record_prefix(name)) {
            let (r, digest) = decode_pair_with_digest(pair?)?;
            let broken = |message: &str| LogError::Corrupt {
                what: "record",
                instance: Some(name.to_string()),
                seq: Some(r.seq),
                problem: record::Corruption::Decode { message: message.into() },
            };
            if let Some((prev, prev_digest)) = &last {
                if let Event::Transition { from, .. } = &r.event
                    && *from != prev.to
                {
                    return Err(broken("its from-state is not the previous record's to-state"));
                }
                if r.prev.is_some_and(|p| p != prev.link(*prev_digest)) && !matches!(r.event, Event::Snapshot { .. }) {
                    return Err(broken("it does not chain to the previous record (its prev digest differs)"));
                }
            }
            last = Some((r, digest));
        }
        let last = last.map(|(r, _)| r);
        let r = last.ok_or_else(|| LogError::Corrupt {
            what: "record",
            instance: Some(name.to_string()),
            seq: None,
            problem: record::Corruption::Decode { message: "instance has no records".into() },
        })?;
        Ok(RecoveredInstance { instance: r.to, seq: r.seq, at: r.at })
    }
}
