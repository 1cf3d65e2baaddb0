//! The one flush path: a *commit* makes everything appended so far durable
//! (sled flush, then fsync of its files) and then moves the head up to the
//! newest record it covers (one more `fdatasync`). A head is never written
//! before the data it covers is durable, and an append waiting for
//! durability is released only after the head covering it is written, so an
//! acknowledged record that later disappears is always detected.
//!
//! [`Flusher`] is the thread that commits for the durable modes and for
//! `Buffered` (on a period): it waits for a request, optionally gathers for
//! `window`, then commits everything requested before the commit started.

use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use super::head::{Head, LogId};
use super::record::Digest;
use super::store::{Store, StoreError};

/// How far a commit goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Reach {
    /// To the operating system: survives a crash of this process (`Buffered`).
    Os,
    /// To the disk: survives a power loss, if the disk honours fsync (the durable modes).
    Disk,
}

/// Makes everything applied so far reach `reach`, then the head covering
/// `(global, link)` — never the other way round.
pub(crate) fn commit(
    store: &dyn Store,
    log_id: LogId,
    global: u64,
    link: Digest,
    reach: Reach,
) -> Result<(), StoreError> {
    store.flush()?;
    if reach == Reach::Disk {
        store.sync()?;
    }
    store.write_head(&Head { log_id, global, link }, reach == Reach::Disk)
}

/// The flusher: one thread that commits on request, covering every append
/// made before the commit started.
pub(crate) struct Flusher {
    shared: Arc<FlushShared>,
    thread: Option<JoinHandle<()>>,
}

struct FlushShared {
    state: Mutex<FlushState>,
    /// Wakes the flusher: work arrived (only when it was idle) or stop.
    work: Condvar,
    /// Wakes blocking waiters: a commit finished or failed.
    done: Condvar,
    durable: tokio::sync::watch::Sender<u64>,
}

#[derive(Default)]
struct FlushState {
    /// The newest append: its global and link.
    requested: (u64, Digest),
    /// Every global up to this one is durable and covered by the head.
    durable: u64,
    error: Option<String>,
    stop: bool,
}

impl Flusher {
    /// Starts the thread; `window` is how long it gathers appends before each commit.
    pub(crate) fn start(store: Arc<dyn Store>, log_id: LogId, durable: u64, window: Duration, reach: Reach) -> Self {
        let (tx, _) = tokio::sync::watch::channel(durable);
        let state = FlushState { requested: (durable, Digest::ZERO), durable, ..FlushState::default() };
        let shared =
            Arc::new(FlushShared { state: Mutex::new(state), work: Condvar::new(), done: Condvar::new(), durable: tx });
        let worker = shared.clone();
        let thread = std::thread::Builder::new()
            .name("lifecycle-log-flush".into())
            .spawn(move || worker.run(store.as_ref(), log_id, window, reach))
            .ok();
        Self { shared, thread }
    }

    /// Asks for a commit covering the append at `global` (called in append order).
    pub(crate) fn request(&self, global: u64, link: Digest) {
        let mut s = self.shared.lock();
        // Only an idle flusher needs waking: one that is gathering or
        // committing looks at `requested` again before it waits.
        let idle = s.requested.0 <= s.durable;
        if global > s.requested.0 {
            s.requested = (global, link);
        }
        if idle {
            self.shared.work.notify_one();
        }
    }

    pub(crate) fn wait_blocking(&self, global: u64) -> Result<(), String> {
        if self.thread.is_none() {
            return Err("the flusher thread could not be started".into());
        }
        let mut s = self.shared.lock();
        loop {
            if let Some(e) = &s.error {
                return Err(e.clone());
            }
            if s.durable >= global {
                return Ok(());
            }
            if s.stop {
                return Err("the log is closing".into());
            }
            s = self.shared.done.wait(s).unwrap_or_else(std::sync::PoisonError::into_inner);
        }
    }

    pub(crate) async fn wait_async(&self, global: u64) -> Result<(), String> {
        if self.thread.is_none() {
            return Err("the flusher thread could not be started".into());
        }
        let mut rx = self.shared.durable.subscribe();
        // A failed commit publishes u64::MAX to wake everyone; the error is checked below.
        let reached = rx.wait_for(|&d| d >= global).await.is_ok();
        match self.shared.lock().error.clone() {
            Some(e) => Err(e),
            None if reached => Ok(()),
            None => Err("the log is closing".into()),
        }
    }

    /// The newest global sequence number a completed commit covers.
    pub(crate) fn durable(&self) -> u64 {
        self.shared.lock().durable
    }

    /// Commits what was requested, then ends the thread.
    pub(crate) fn stop(mut self) {
        self.shared.lock().stop = true;
        self.shared.work.notify_all();
        self.shared.done.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl FlushShared {
    fn lock(&self) -> MutexGuard<'_, FlushState> {
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn run(&self, store: &dyn Store, log_id: LogId, window: Duration, reach: Reach) {
        loop {
            {
                let mut s = self.lock();
                while s.requested.0 <= s.durable && !s.stop {
                    s = self.work.wait(s).unwrap_or_else(std::sync::PoisonError::into_inner);
                }
                if s.requested.0 <= s.durable {
                    break; // stopping, nothing left
                }
                if !window.is_zero() && !s.stop {
                    // Gather for the window; a stop cuts it short.
                    let (guard, _) = self
                        .work
                        .wait_timeout_while(s, window, |s| !s.stop)
                        .unwrap_or_else(std::sync::PoisonError::into_inner);
                    drop(guard);
                }
            }
            // Everything requested before the commit starts is covered by it.
            let (global, link) = self.lock().requested;
            let result = commit(store, log_id, global, link, reach);
            let mut s = self.lock();
            match result {
                Ok(()) => {
                    s.durable = s.durable.max(global);
                    // `send_replace`, never `send`: `send` does not store the
                    // value when no one is subscribed at this instant, and a
                    // waiter that subscribes a moment later would then see an
                    // old value and wait for a commit that already happened.
                    self.durable.send_replace(s.durable);
                }
                Err(e) => {
                    s.error = Some(format!("flush failed: {e}"));
                    self.durable.send_replace(u64::MAX);
                    self.done.notify_all();
                    break;
                }
            }
            self.done.notify_all();
        }
        self.lock().stop = true;
        self.done.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::log::store::MemoryStore;

    /// A commit that completes while no one waits must still be seen by a
    /// waiter that comes a moment later (an append acknowledged after its
    /// commit already ran). With `watch::Sender::send` the value was dropped
    /// when no receiver existed, and such a waiter waited forever.
    #[test]
    fn a_commit_nobody_waited_for_is_seen_by_a_later_waiter() {
        let flusher = Flusher::start(Arc::new(MemoryStore::new()), LogId::fresh(), 0, Duration::ZERO, Reach::Os);
        flusher.request(1, Digest::ZERO);
        flusher.wait_blocking(1).expect("committed");
        assert_eq!(flusher.durable(), 1);
        let runtime = tokio::runtime::Builder::new_current_thread().enable_time().build().expect("runtime");
        let waited =
            runtime.block_on(async { tokio::time::timeout(Duration::from_secs(10), flusher.wait_async(1)).await });
        assert_eq!(waited, Ok(Ok(())), "the later waiter sees the commit that already happened");
        flusher.stop();
    }
}
