//! Log compaction from the engine: on demand, and periodically on its own task.

use std::sync::{Arc, Weak};

use super::config::Compaction;
use super::error::EngineError;
use super::registry::{Entry, Registry};
use super::shared::Shared;
use crate::log::{CompactionReport, Retention};

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

/// The periodic compaction task: holds the engine only while it compacts, so
/// dropping every clone of the engine (or shutting it down) ends it.
pub(crate) async fn periodically(
    shared: Weak<Shared>,
    registry: Weak<Registry>,
    shut: Arc<std::sync::atomic::AtomicBool>,
    compaction: Compaction,
) {
    let start = tokio::time::Instant::now() + compaction.every;
    let mut ticks = tokio::time::interval_at(start, compaction.every);
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
