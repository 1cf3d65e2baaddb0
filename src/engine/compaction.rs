//! Log compaction from the engine: on demand, and periodically on its own task.

use std::sync::{Arc, Weak};
use std::time::Duration;

use super::config::Compaction;
use super::error::EngineError;
use super::registry::{Entry, Registry};
use super::shared::Shared;
use crate::log::{CompactionReport, Retention};
use crate::machine::Timestamp;

/// Compacts the log; a purged instance leaves no tombstone behind, so churn
/// of names costs nothing forever.
pub(crate) async fn compact(
    shared: &Shared,
    registry: &Registry,
    retention: Retention,
) -> Result<CompactionReport, EngineError> {
    let (log, now) = (shared.log.clone(), shared.clock.now());
    let report = tokio::task::spawn_blocking(move || log.compact(now, &retention))
        .await
        .map_err(EngineError::join)?
        .map_err(|e| EngineError::log(None, e))?;
    let mut entries = registry.lock();
    for name in &report.purged {
        if matches!(entries.get(name), Some(Entry::Removed { .. })) {
            entries.remove(name);
        }
    }
    Ok(report)
}

/// How long after a start an overdue compaction waits: the start's own
/// reads go first, then compaction runs in the background while the host
/// already answers.
pub(crate) const OVERDUE_AFTER: Duration = Duration::from_secs(1);

/// When the first compaction of this process is due: one period after the
/// last one the log records, whichever process ran it — so a host restarted
/// more often than the period still compacts — and never sooner than
/// [`OVERDUE_AFTER`] (a log that never recorded one is overdue).
pub(crate) fn first_due(last: Option<Timestamp>, now: Timestamp, every: Duration) -> Duration {
    let since = last.map_or(Duration::MAX, |last| now.saturating_since(last));
    every.saturating_sub(since).max(OVERDUE_AFTER)
}

/// The periodic compaction task: holds the engine only while it compacts, so
/// dropping every clone of the engine (or shutting it down) ends it.
pub(crate) async fn periodically(
    shared: Weak<Shared>,
    registry: Weak<Registry>,
    shut: Arc<std::sync::atomic::AtomicBool>,
    compaction: Compaction,
) {
    let Some(first) = shared.upgrade().map(|s| {
        let last = s.log.last_compacted().unwrap_or_else(|e| {
            tracing::warn!(error = %e, "the last compaction's time is unreadable: compacting soon");
            None
        });
        first_due(last, s.clock.now(), compaction.every)
    }) else {
        return;
    };
    tracing::debug!(in_s = first.as_secs(), "first compaction scheduled");
    let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + first, compaction.every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        let (Some(shared), Some(registry)) = (shared.upgrade(), registry.upgrade()) else { return };
        if shut.load(std::sync::atomic::Ordering::SeqCst) {
            return;
        }
        match compact(&shared, &registry, compaction.retention.clone()).await {
            Ok(r) => tracing::info!(
                snapshotted = r.snapshotted,
                records_deleted = r.records_deleted,
                purged = r.purged.len(),
                "log compacted"
            ),
            Err(e) => tracing::error!(error = %e, "log compaction failed; trying again next period"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOUR: Duration = Duration::from_secs(3600);

    #[test]
    fn the_schedule_counts_from_the_last_compaction_the_log_records() {
        let now = Timestamp(10 * 3_600_000);
        // Never compacted (or by a version that did not say): overdue.
        assert_eq!(first_due(None, now, HOUR), OVERDUE_AFTER);
        // 20 minutes ago: due in 40 minutes, whichever process ran it.
        assert_eq!(first_due(Some(Timestamp(now.0 - 20 * 60_000)), now, HOUR), Duration::from_secs(40 * 60));
        // Longer ago than a period: overdue, but the start goes first.
        assert_eq!(first_due(Some(Timestamp(now.0 - 5 * 3_600_000)), now, HOUR), OVERDUE_AFTER);
        // A clock that went back: no later than one period from now.
        assert_eq!(first_due(Some(Timestamp(now.0 + 60_000)), now, HOUR), HOUR);
    }
}
