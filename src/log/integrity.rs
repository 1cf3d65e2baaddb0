//! Does the log still hold everything it acknowledged? Opening compares the
//! head (kept outside sled: the newer of the head file, `head.rs`, and the
//! journal's newest commit frame, `journal.rs`) with the tip sled returns:
//! the newest record's global sequence number and link.
//!
//! How far the head may trail the tip, exactly: in the durable modes each
//! commit's one synced write ends with the commit frame that moves the head,
//! before any append it covers is acknowledged, so after a crash the log may
//! hold records beyond the head only if they were *not yet acknowledged*
//! (appended, written by sled on its own, then the process died before the
//! commit) — or if the commit frame of the last write could not count (see
//! `journal.rs`: a torn last write) — with the engine, at
//! most one per instance that had a transition in flight. In `Buffered` mode
//! the head trails by whatever the last `flush_every` period appended. A head
//! ahead of the tip means records the log once made durable are gone.

use std::fmt;

use serde::{Deserialize, Serialize};

use super::record::{Digest, decode_record_with_digest};
use super::store::{Head, HeadRead, LogId};
use super::{LogError, Store, keys};
use crate::machine::Timestamp;

/// What opening found when it compared the head with the log's tip.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum HeadCheck {
    /// The head matches the tip.
    Intact {
        /// The tip's global sequence number.
        global: u64,
    },
    /// The head trails the tip: records appended after the last durable point
    /// and never acknowledged (a crash between an append and its head write).
    /// Not a loss; a writer moves the head up when it opens.
    Behind {
        /// Where the head is.
        head: u64,
        /// Where the log ends.
        tip: u64,
    },
    /// Records the log once made durable are gone: the head covers up to
    /// `head`, the log now ends at `tip` (sled rolled its files back).
    Lost {
        /// Where the head is.
        head: u64,
        /// Where the log ends.
        tip: u64,
    },
    /// The record at the head's position is not the one the head recorded:
    /// the log was rolled back and written again, or replaced.
    Diverged {
        /// The position.
        global: u64,
        /// The link the head recorded.
        head: Digest,
        /// The link of the record found there.
        found: Digest,
    },
    /// A log of this format always has a head file; it is gone.
    Missing,
    /// The head names the journal file the log goes on in, and the journal
    /// holds no file from there on: it was deleted (or never copied), and
    /// with it whatever was acknowledged since the head file last moved —
    /// how much cannot be told.
    JournalMissing {
        /// The journal file number the head names.
        from: u64,
    },
    /// The head shows no loss, but the journal is damaged where no crash
    /// could have damaged it (see [`super::Replayed::damaged`]): what the
    /// damage held may have been acknowledged.
    JournalDamaged {
        /// Where replay stopped, and why.
        detail: String,
    },
    /// The head file is there but neither of its slots can be read.
    Unreadable {
        /// Why.
        detail: String,
    },
    /// The head file belongs to another log (copied or swapped in).
    Foreign {
        /// The id the head names.
        head: LogId,
        /// This log's id.
        log: LogId,
    },
    /// A log written before heads existed (format v1): nothing to compare
    /// until a writer opens it, which upgrades it.
    Legacy,
    /// The store keeps no head.
    NotKept,
}

impl HeadCheck {
    /// True when records or the head are lost or foreign: a writer refuses
    /// to open without `accept_loss`, and verification is never clean.
    pub fn is_damage(&self) -> bool {
        matches!(
            self,
            Self::Lost { .. }
                | Self::Diverged { .. }
                | Self::Missing
                | Self::JournalMissing { .. }
                | Self::JournalDamaged { .. }
                | Self::Unreadable { .. }
                | Self::Foreign { .. }
        )
    }
}

impl fmt::Display for HeadCheck {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Intact { global } => write!(f, "the head matches the log (global {global})"),
            Self::Behind { head, tip } => write!(
                f,
                "the head trails the log by {} record(s) (global {}..={tip}, appended after the last commit the log can count before the last stop: never acknowledged, or in a last write whose commit frame could not be read; all here, not a loss)",
                tip - head,
                head + 1
            ),
            Self::Lost { head, tip } => write!(
                f,
                "the log lost {} acknowledged record(s): its head covers global sequence numbers up to {head}, but the log ends at {tip} (the database was rolled back to an older state)",
                head - tip
            ),
            Self::Diverged { global, head, found } => write!(
                f,
                "the log was replaced or rewritten: the record at global {global} has link {found}, the head recorded {head}"
            ),
            Self::Missing => {
                f.write_str("the head file is missing (it is what tells a complete log from a rolled-back one)")
            }
            Self::JournalMissing { from } => write!(
                f,
                "the journal is missing: the head says the log goes on in journal file {from:016x} and there is no such file or later one (the journal was deleted or not copied; what it held since the last checkpoint is lost, and how much cannot be told)"
            ),
            Self::JournalDamaged { detail } => write!(f, "the journal is damaged: {detail}"),
            Self::Unreadable { detail } => write!(f, "the head file is unreadable: {detail}"),
            Self::Foreign { head, log } => {
                write!(f, "the head file belongs to another log (head of log {head}, this is log {log})")
            }
            Self::Legacy => {
                f.write_str("a log written before heads existed: rollback detection starts when a writer opens it")
            }
            Self::NotKept => f.write_str("the store keeps no head"),
        }
    }
}

/// A loss a writer was told to accept, as the log records it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AcceptedLoss {
    /// When it was accepted (wall clock).
    pub at: Timestamp,
    /// What opening found.
    pub check: HeadCheck,
    /// Global sequence numbers start again after this one (none is ever reused).
    pub resumed_after: u64,
}

/// The newest record's global sequence number and link (0 and zero for an empty log).
pub(crate) fn tip(store: &dyn Store) -> Result<(u64, Digest), LogError> {
    let indexed = match store.last(&[keys::GLOBAL])? {
        None => (0, Digest::ZERO),
        Some((key, _)) => {
            let global = keys::parse_global(&key).ok_or_else(|| super::corrupt_key("index key", &key))?;
            (global, link_at(store, global)?.unwrap_or(Digest::ZERO))
        }
    };
    let kept = match store.get(keys::META_TIP)? {
        Some(v) if v.len() == 40 => {
            let global = u64::from_be_bytes(v[..8].try_into().unwrap_or_default());
            Some((global, Digest(v[8..].try_into().unwrap_or_default())))
        }
        _ => None,
    };
    Ok(match kept {
        Some(k) if k.0 > indexed.0 => k,
        _ => indexed,
    })
}

/// The value of [`keys::META_TIP`].
pub(crate) fn tip_value(global: u64, link: Digest) -> Vec<u8> {
    let mut v = global.to_be_bytes().to_vec();
    v.extend_from_slice(&link.0);
    v
}

/// The link of the record at `global`, if the index has it.
pub(crate) fn link_at(store: &dyn Store, global: u64) -> Result<Option<Digest>, LogError> {
    let Some(target) = store.get(&keys::global(global))? else { return Ok(None) };
    let mut key = vec![keys::RECORD];
    key.extend_from_slice(&target);
    let Some(value) = store.get(&key)? else { return Ok(None) };
    Ok(Some(link_of(&value)))
}

/// A stored record's link; for bytes that do not decode, the digest of what is there.
pub(crate) fn link_of(value: &[u8]) -> Digest {
    match decode_record_with_digest(value) {
        Ok((record, digest)) => record.link(digest),
        Err(_) => Digest::of(value.get(4..).unwrap_or_default()),
    }
}

/// Compares the head with the tip.
pub(crate) fn check(
    store: &dyn Store,
    read: HeadRead,
    log_id: LogId,
    tip: (u64, Digest),
) -> Result<HeadCheck, LogError> {
    let head = match read {
        HeadRead::NotKept => return Ok(HeadCheck::NotKept),
        HeadRead::Missing => return Ok(HeadCheck::Missing),
        HeadRead::Unreadable { detail } => return Ok(HeadCheck::Unreadable { detail }),
        HeadRead::JournalMissing { head, from } => {
            return Ok(match compare(store, &head, log_id, tip)? {
                foreign @ HeadCheck::Foreign { .. } => foreign,
                _ => HeadCheck::JournalMissing { from },
            });
        }
        HeadRead::Found(head) => head,
    };
    compare(store, &head, log_id, tip)
}

fn compare(
    store: &dyn Store,
    head: &Head,
    log_id: LogId,
    (tip, tip_link): (u64, Digest),
) -> Result<HeadCheck, LogError> {
    if head.log_id != log_id {
        return Ok(HeadCheck::Foreign { head: head.log_id, log: log_id });
    }
    if head.global > tip {
        return Ok(HeadCheck::Lost { head: head.global, tip });
    }
    let found = if head.global == tip { Some(tip_link) } else { link_at(store, head.global)? };
    match found {
        // The head's record may have been compacted away since: nothing left to compare.
        None if head.global < tip => Ok(HeadCheck::Behind { head: head.global, tip }),
        Some(found) if found != head.link && head.global > 0 => {
            Ok(HeadCheck::Diverged { global: head.global, head: head.link, found })
        }
        _ if head.global == tip => Ok(HeadCheck::Intact { global: tip }),
        _ => Ok(HeadCheck::Behind { head: head.global, tip }),
    }
}
