//! Retention: the log must not grow without bound on a long-running host.
//! Per instance, the history beyond the last `keep_records` records is
//! replaced by a snapshot (which starts a new chain, so verification stays
//! valid); a removed instance's history is deleted `removed_after` its
//! removal — the whole name's when it was not created again, the removed
//! incarnations' (up to a snapshot of the new one's first record) when it was.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::record::{Digest, Event, Record, encode_record};
use super::{Log, LogError, integrity, keys};
use crate::machine::{State, Timestamp};

/// Retention settings.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Retention {
    /// Records kept per instance after the snapshot: 1,000 covers days of an
    /// instance's history at normal rates, enough to debug with.
    pub keep_records: u64,
    /// How long a removed instance's history is kept: a week gives operators
    /// time to investigate a complaint about a deletion.
    pub removed_after: Duration,
}

impl Default for Retention {
    fn default() -> Self {
        Self { keep_records: 1_000, removed_after: Duration::from_secs(7 * 24 * 3600) }
    }
}

/// What a compaction did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CompactionReport {
    /// Instances whose old records became a snapshot.
    pub snapshotted: usize,
    /// Records deleted.
    pub records_deleted: u64,
    /// Removed instances whose history was deleted.
    pub purged: Vec<crate::machine::InstanceName>,
}

impl Log {
    /// Applies `retention` as of `now`. Safe while the log is appended to:
    /// it only rewrites records older than the kept tail, in one batch per instance.
    pub fn compact(&self, now: Timestamp, retention: &Retention) -> Result<CompactionReport, LogError> {
        let mut report = CompactionReport::default();
        for name in self.names()? {
            let chained = self.history_with_digests(&name)?;
            let history: Vec<&Record> = chained.iter().map(|(r, _)| r).collect();
            let Some(&last) = history.last() else { continue };
            // Records a reader holds (see `Log::hold_from`) stay, whatever their age.
            let held = self.held_from();
            if matches!(last.to.state, State::Removed { .. })
                && now.saturating_since(last.at) >= retention.removed_after
                && last.global < held
            {
                // Hold the writer lock: the name's sequence restarts at 1 for a new incarnation.
                let mut w = self.writer();
                if w.tips.get(&name).map(|t| t.seq) != Some(last.seq) {
                    continue; // re-created meanwhile: keep it
                }
                let mut writes: Vec<_> = history.iter().flat_map(|r| deletes(r)).collect();
                writes.push((keys::latest(&name), None));
                writes.push((keys::spec(&name), None));
                writes.push((keys::token(&name), None));
                if last.global == w.last_global {
                    // The newest record of the log goes: the tip (which the head is checked against) stays.
                    writes.push((keys::META_TIP.to_vec(), Some(integrity::tip_value(w.last_global, w.last_link))));
                }
                self.store().apply(writes)?;
                w.tips.remove(&name);
                report.records_deleted += history.len() as u64;
                report.purged.push(name);
                continue;
            }
            let keep = usize::try_from(retention.keep_records).unwrap_or(usize::MAX);
            let by_length = history.len().saturating_sub(keep.saturating_add(1));
            // An earlier incarnation of a name created again is a removed
            // instance too: it goes `removed_after` its removal, whatever the
            // length (a name reused all day would otherwise keep every
            // incarnation up to `keep_records`). The cut is then the new
            // incarnation's first record.
            let by_removal = history
                .iter()
                .rposition(|r| {
                    matches!(r.to.state, State::Removed { .. }) && now.saturating_since(r.at) >= retention.removed_after
                })
                .map_or(0, |i| i + 1);
            // The snapshot replaces the record at `cut` too: it must be below the hold.
            let below_hold = history.partition_point(|r| r.global < held);
            let cut = by_length.max(by_removal).min(below_hold.saturating_sub(1)).min(history.len() - 1);
            if cut == 0 {
                continue;
            }
            let (base, base_digest) = &chained[cut];
            // The spec comes from the start of this incarnation: its Created record or a snapshot.
            let origin = history[..=cut].iter().rev().find_map(|r| r.event.origin());
            let Some((spec, token)) = origin.map(|(s, t)| (s.clone(), t)) else { continue };
            // The snapshot links as the record it replaces, so the records after it still chain
            // (its own `prev` points into the history it replaces and is not checked).
            let snapshot = Record {
                event: Event::Snapshot { spec, token },
                prev: Some(base.prev.unwrap_or(Digest::ZERO)),
                replaced: Some(base.link(*base_digest)),
                ..(*base).clone()
            };
            let mut writes: Vec<_> = history[..cut].iter().flat_map(|r| deletes(r)).collect();
            writes.push((keys::record(&name, base.seq), Some(encode_record(&snapshot))));
            self.store().apply(writes)?;
            report.snapshotted += 1;
            report.records_deleted += cut as u64;
        }
        // What the log holds now, for the next writer's open to tell whether
        // sled's files are worth rewriting (`rewrite.rs`).
        let live =
            self.store().scan(&[]).try_fold(0u64, |sum, pair| pair.map(|(k, v)| sum + (k.len() + v.len()) as u64))?;
        // Written last: a compaction cut short by a crash is not recorded as
        // done (what it did stays done, and the next start finds it overdue).
        self.store().apply(vec![
            (keys::META_LIVE.to_vec(), Some(live.to_be_bytes().to_vec())),
            (keys::META_COMPACTED.to_vec(), Some(now.0.to_be_bytes().to_vec())),
        ])?;
        Ok(report)
    }

    /// When the log was last compacted to the end (`None`: never, or by a
    /// version that did not record it). The time is the compacting clock's
    /// `now`: a schedule that survives restarts reads it.
    pub fn last_compacted(&self) -> Result<Option<Timestamp>, LogError> {
        Ok(self.meta_number(keys::META_COMPACTED, "compaction time")?.map(Timestamp))
    }
}

fn deletes(r: &Record) -> [(Vec<u8>, Option<Vec<u8>>); 2] {
    [(keys::record(&r.instance, r.seq), None), (keys::global(r.global), None)]
}
