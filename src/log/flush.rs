//! The one flush path: a *commit* makes everything appended so far durable
//! (sled flush, then fsync of its files) and then moves the head up to the
//! newest record it covers (one more `fdatasync`). A head is never written
//! before the data it covers is durable, and an append waiting for
//! durability is released only after the head covering it is written, so an
//! acknowledged record that later disappears is always detected.
//!
//! [`Flusher`] commits for `GroupCommit` and for `Buffered` (on a period):
//! it waits for a request, optionally gathers for `window`, then commits
//! everything requested before the commit started, the data and the head
//! of consecutive commits overlapping.

use std::collections::BTreeMap;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::task::{Poll, Waker};
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
    commit_data(store, reach)?;
    store.write_head(&Head { log_id, global, link }, reach == Reach::Disk)
}

/// The first half of a commit: everything applied so far reaches `reach`.
fn commit_data(store: &dyn Store, reach: Reach) -> Result<(), StoreError> {
    store.flush()?;
    if reach == Reach::Disk {
        store.sync()?;
    }
    Ok(())
}

/// The flusher: commits on request, covering every append made before the
/// commit started, in two stages on two threads so that they overlap: the
/// *data* thread makes the store durable (for sled with a journal: one write
/// and one `fdatasync` of the journal) and hands the point it reached to the
/// *head* thread, which writes the head there (one more `fdatasync`) and
/// releases the appends it covers. While the head of one group is being
/// synced, the data of the next already is: one sync period per group, not
/// two, and never a head ahead of its data.
pub(crate) struct Flusher {
    shared: Arc<FlushShared>,
    threads: Vec<JoinHandle<()>>,
}

struct FlushShared {
    state: Mutex<FlushState>,
    /// Wakes the data thread: an append was requested (only when it was idle) or stop.
    data_work: Condvar,
    /// Wakes the head thread: the data thread reached a new point, finished, or failed.
    head_work: Condvar,
}

/// Someone waiting for a global to be durable.
enum Waiter {
    Thread(std::thread::Thread),
    Task(Waker),
}

impl Waiter {
    fn wake(self) {
        match self {
            Self::Thread(t) => t.unpark(),
            Self::Task(w) => w.wake(),
        }
    }
}

#[derive(Default)]
struct FlushState {
    /// The newest append: its global and link.
    requested: (u64, Digest),
    /// Where the data thread's last completed commit reached.
    data: (u64, Digest),
    /// Every global up to this one is durable and covered by the head.
    durable: u64,
    /// Who waits for which global; only those a commit covers are woken
    /// (waking all of them made every waiter of a busy log run once per commit).
    waiting: BTreeMap<u64, Vec<Waiter>>,
    error: Option<String>,
    stop: bool,
    /// The data thread has ended: the head thread ends once it caught up.
    data_ended: bool,
    /// Both threads have ended.
    ended: bool,
}

impl FlushState {
    fn wake_all(&mut self) -> Vec<Waiter> {
        std::mem::take(&mut self.waiting).into_values().flatten().collect()
    }
}

impl Flusher {
    /// Starts the threads; `window` is how long the data thread gathers appends before each commit.
    pub(crate) fn start(store: Arc<dyn Store>, log_id: LogId, durable: u64, window: Duration, reach: Reach) -> Self {
        let state = FlushState {
            requested: (durable, Digest::ZERO),
            data: (durable, Digest::ZERO),
            durable,
            ..FlushState::default()
        };
        let shared =
            Arc::new(FlushShared { state: Mutex::new(state), data_work: Condvar::new(), head_work: Condvar::new() });
        let mut threads = Vec::new();
        let (worker, data_store) = (shared.clone(), store.clone());
        let data = std::thread::Builder::new()
            .name("lifecycle-log-flush".into())
            .spawn(move || worker.run_data(data_store.as_ref(), window, reach));
        let worker = shared.clone();
        let head = std::thread::Builder::new()
            .name("lifecycle-log-head".into())
            .spawn(move || worker.run_head(store.as_ref(), log_id, reach));
        match (data, head) {
            (Ok(d), Ok(h)) => threads.extend([d, h]),
            (d, h) => {
                // Without both, nothing is ever acknowledged: say so to every waiter.
                let mut s = shared.lock();
                s.error = Some("the flusher threads could not be started".into());
                s.stop = true;
                s.ended = true;
                drop(s);
                shared.data_work.notify_all();
                shared.head_work.notify_all();
                threads.extend(d.into_iter().chain(h));
            }
        }
        Self { shared, threads }
    }

    /// Asks for a commit covering the append at `global`.
    pub(crate) fn request(&self, global: u64, link: Digest) {
        let mut s = self.shared.lock();
        // Only an idle data thread needs waking: one that is gathering or
        // committing looks at `requested` again before it waits.
        let idle = s.requested.0 <= s.data.0;
        if global > s.requested.0 {
            s.requested = (global, link);
        }
        if idle {
            self.shared.data_work.notify_one();
        }
    }

    /// Waits, blocking the thread, until `global` is durable.
    pub(crate) fn wait_blocking(&self, global: u64) -> Result<(), String> {
        loop {
            {
                let mut s = self.shared.lock();
                if let Some(done) = s.outcome(global) {
                    return done;
                }
                s.waiting.entry(global).or_default().push(Waiter::Thread(std::thread::current()));
            }
            // A wake-up that came before the park makes the park return at once.
            std::thread::park();
        }
    }

    /// Waits, without blocking a thread, until `global` is durable.
    pub(crate) async fn wait_async(&self, global: u64) -> Result<(), String> {
        std::future::poll_fn(|cx| {
            let mut s = self.shared.lock();
            match s.outcome(global) {
                Some(done) => Poll::Ready(done),
                None => {
                    s.waiting.entry(global).or_default().push(Waiter::Task(cx.waker().clone()));
                    Poll::Pending
                }
            }
        })
        .await
    }

    /// The newest global sequence number a completed commit covers.
    pub(crate) fn durable(&self) -> u64 {
        self.shared.lock().durable
    }

    /// Commits what was requested, then ends the threads.
    pub(crate) fn stop(mut self) {
        self.shared.lock().stop = true;
        self.shared.data_work.notify_all();
        self.shared.head_work.notify_all();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl FlushState {
    /// `Some` once waiting for `global` is over: durable, or never will be.
    fn outcome(&self, global: u64) -> Option<Result<(), String>> {
        if let Some(e) = &self.error {
            return Some(Err(e.clone()));
        }
        if self.durable >= global {
            return Some(Ok(()));
        }
        self.ended.then(|| Err("the log is closing".into()))
    }
}

impl FlushShared {
    fn lock(&self) -> MutexGuard<'_, FlushState> {
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Records a failure: nothing is acknowledged after it, and everyone waiting hears it.
    fn fail(&self, message: String) {
        let mut s = self.lock();
        s.error.get_or_insert(message);
        s.stop = true;
        s.data_ended = true;
        s.ended = true;
        let woken = s.wake_all();
        drop(s);
        self.data_work.notify_all();
        self.head_work.notify_all();
        woken.into_iter().for_each(Waiter::wake);
    }

    fn run_data(&self, store: &dyn Store, window: Duration, reach: Reach) {
        loop {
            {
                let mut s = self.lock();
                while s.requested.0 <= s.data.0 && !s.stop && s.error.is_none() {
                    s = self.data_work.wait(s).unwrap_or_else(std::sync::PoisonError::into_inner);
                }
                if s.error.is_some() || s.requested.0 <= s.data.0 {
                    break; // failed, or stopping with nothing left
                }
                if !window.is_zero() && !s.stop {
                    // Gather for the window; a stop cuts it short.
                    let (guard, _) = self
                        .data_work
                        .wait_timeout_while(s, window, |s| !s.stop)
                        .unwrap_or_else(std::sync::PoisonError::into_inner);
                    drop(guard);
                }
            }
            // Everything requested before the commit starts is covered by it.
            let reached = self.lock().requested;
            if let Err(e) = commit_data(store, reach) {
                self.fail(format!("flush failed: {e}"));
                return;
            }
            let mut s = self.lock();
            if reached.0 > s.data.0 {
                s.data = reached;
            }
            drop(s);
            self.head_work.notify_one();
        }
        self.lock().data_ended = true;
        self.head_work.notify_one();
    }

    fn run_head(&self, store: &dyn Store, log_id: LogId, reach: Reach) {
        loop {
            let (global, link) = {
                let mut s = self.lock();
                while s.data.0 <= s.durable && !s.data_ended && s.error.is_none() {
                    s = self.head_work.wait(s).unwrap_or_else(std::sync::PoisonError::into_inner);
                }
                if s.error.is_some() || s.data.0 <= s.durable {
                    break; // failed, or the data thread ended and everything is covered
                }
                s.data
            };
            if let Err(e) = store.write_head(&Head { log_id, global, link }, reach == Reach::Disk) {
                self.fail(format!("writing the head failed: {e}"));
                return;
            }
            let mut s = self.lock();
            s.durable = s.durable.max(global);
            let durable = s.durable;
            let still = s.waiting.split_off(&(durable.saturating_add(1)));
            let covered = std::mem::replace(&mut s.waiting, still);
            drop(s);
            covered.into_values().flatten().for_each(Waiter::wake);
        }
        let mut s = self.lock();
        s.ended = true;
        let woken = s.wake_all();
        drop(s);
        woken.into_iter().for_each(Waiter::wake);
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
