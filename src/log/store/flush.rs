//! The one flush path: a *commit* makes everything appended so far durable
//! and moves the head up to the newest record it covers
//! ([`Store::commit`]): for sled with a journal, one write and one
//! `fdatasync` of the journal, ending with a commit frame that *is* the head
//! until the next checkpoint; otherwise sled's flush (and fsync), then the
//! head file. A head is never ahead of the data it covers, and an append
//! waiting for durability is released only after the commit covering it, so
//! an acknowledged record that later disappears is detected.
//!
//! [`Flusher`] commits for `GroupCommit` and for `Buffered` (on a period):
//! a commit covers everything requested before it started, optionally after
//! gathering for `window`. In `GroupCommit` a commit is led by a *blocking*
//! appender when one is there to lead (leader/follower, as write groups in
//! databases do): the first appender to find no commit running commits the
//! group itself, in its own thread (alone, it commits as `Strict` does, with
//! no hand-off). Appends that arrive meanwhile are taken by the flusher's
//! thread when that commit ends, so that under load groups follow each
//! other without waiting for a parked thread to be scheduled (handing the
//! next group to a waiting appender was measured: 16 writers fell from
//! ~10,500 to ~6,000 appends/s on 2 cores). Async waiters never lead: they
//! must not block a runtime thread on `fdatasync`. Blocking appends reach
//! the flusher in write groups (`groups.rs`): the thread that wrote a group
//! hands the others' appends over with [`Flusher::wake_when_durable`] and
//! then waits for (or leads) the commit of its own.

use std::collections::BTreeMap;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::task::{Poll, Waker};
use std::thread::JoinHandle;
use std::time::Duration;

use super::head::{Head, LogId};
use super::kv::Store;
use crate::log::record::Digest;

/// How far a commit goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Reach {
    /// To the operating system: survives a crash of this process (`Buffered`).
    Os,
    /// To the disk: survives a power loss, if the disk honours fsync (the durable modes).
    Disk,
}

/// The flusher: commits on request, each covering every append made before
/// it started. Commits never overlap each other (`busy`), so the points
/// they reach only grow. A blocking appender that leads runs the commit in
/// its own thread; otherwise the flusher's thread does.
pub(crate) struct Flusher {
    shared: Arc<FlushShared>,
    thread: Option<JoinHandle<()>>,
}

struct FlushShared {
    state: Mutex<FlushState>,
    /// Blocking waiters lead their own commits (`GroupCommit`); otherwise
    /// the flusher's thread commits every group (`Buffered`, on its period).
    leaders: bool,
    /// How long a commit gathers appends before it starts.
    window: Duration,
    /// Wakes the flusher's thread: there is a group no one leads, or stop.
    work: Condvar,
    store: Arc<dyn Store>,
    log_id: LogId,
    reach: Reach,
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
    /// A commit is running (the flusher thread's or a leader's).
    busy: bool,
    /// Every global up to this one is durable and covered by the head.
    durable: u64,
    /// Who waits for which global; only those a commit covers are woken
    /// (waking all of them made every waiter of a busy log run once per commit).
    waiting: BTreeMap<u64, Vec<Waiter>>,
    error: Option<String>,
    stop: bool,
    /// The flusher's thread has ended.
    ended: bool,
}

impl FlushState {
    fn wake_all(&mut self) -> Vec<Waiter> {
        std::mem::take(&mut self.waiting).into_values().flatten().collect()
    }

    /// Everyone waiting for a global up to `durable`.
    fn take_covered(&mut self) -> Vec<Waiter> {
        let still = self.waiting.split_off(&(self.durable.saturating_add(1)));
        std::mem::replace(&mut self.waiting, still).into_values().flatten().collect()
    }

    /// Appends no commit covers yet, and none is running: a group to lead.
    fn unled(&self) -> bool {
        !self.busy && self.requested.0 > self.durable && self.error.is_none()
    }

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

impl Flusher {
    /// Starts the flusher's thread; `window` is how long a commit gathers
    /// appends before it starts; with `leaders`, blocking waiters lead their commits.
    pub(crate) fn start(
        store: Arc<dyn Store>,
        log_id: LogId,
        durable: u64,
        window: Duration,
        reach: Reach,
        leaders: bool,
    ) -> Self {
        let state = FlushState { requested: (durable, Digest::ZERO), durable, ..FlushState::default() };
        let shared = Arc::new(FlushShared {
            state: Mutex::new(state),
            leaders,
            window,
            work: Condvar::new(),
            store,
            log_id,
            reach,
        });
        let worker = shared.clone();
        let thread = std::thread::Builder::new().name("lifecycle-log-flush".into()).spawn(move || worker.run());
        let thread = match thread {
            Ok(t) => Some(t),
            Err(_) => {
                // Without it, nothing is ever acknowledged: say so to every waiter.
                shared.fail("the flusher thread could not be started".into());
                None
            }
        };
        Self { shared, thread }
    }

    /// Says an append at `global` wants a commit. Without leaders the
    /// flusher's thread is woken if it was idle (one that is gathering or
    /// committing looks at `requested` again before it waits); with
    /// leaders, whoever waits for the append starts its commit.
    pub(crate) fn request(&self, global: u64, link: Digest) {
        let mut s = self.shared.lock();
        let idle = s.requested.0 <= s.durable && !s.busy;
        if global > s.requested.0 {
            s.requested = (global, link);
        }
        if idle && !self.shared.leaders {
            self.shared.work.notify_one();
        }
    }

    /// Waits, blocking the thread, until `global` is durable; with leaders,
    /// commits the group itself when no commit is running.
    pub(crate) fn wait_blocking(&self, global: u64) -> Result<(), String> {
        loop {
            {
                let mut s = self.shared.lock();
                if let Some(done) = s.outcome(global) {
                    return done;
                }
                if self.shared.leaders && s.unled() && !s.stop {
                    drop(s);
                    self.shared.lead();
                    continue;
                }
                s.waiting.entry(global).or_default().push(Waiter::Thread(std::thread::current()));
            }
            // A wake-up that came before the park makes the park return at once.
            std::thread::park();
        }
    }

    /// Wakes each thread once its global is durable (or the flusher failed):
    /// blocking appends another thread wrote (`groups.rs`). Starts the
    /// flusher's thread on them if no commit is running.
    pub(crate) fn wake_when_durable(&self, waiters: Vec<(u64, std::thread::Thread)>) {
        if waiters.is_empty() {
            return;
        }
        let mut s = self.shared.lock();
        let mut now = Vec::new();
        for (global, thread) in waiters {
            match s.outcome(global) {
                Some(_) => now.push(thread),
                None => s.waiting.entry(global).or_default().push(Waiter::Thread(thread)),
            }
        }
        if s.unled() {
            self.shared.work.notify_one();
        }
        drop(s);
        now.into_iter().for_each(|t| t.unpark());
    }

    /// Waits, without blocking a thread, until `global` is durable. An async
    /// waiter never leads: it wakes the flusher's thread when no one else does.
    pub(crate) async fn wait_async(&self, global: u64) -> Result<(), String> {
        std::future::poll_fn(|cx| {
            let mut s = self.shared.lock();
            match s.outcome(global) {
                Some(done) => Poll::Ready(done),
                None => {
                    s.waiting.entry(global).or_default().push(Waiter::Task(cx.waker().clone()));
                    if s.unled() {
                        self.shared.work.notify_one();
                    }
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

    /// Commits what was requested, then ends the thread.
    pub(crate) fn stop(mut self) {
        self.shared.lock().stop = true;
        self.shared.work.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
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
        s.ended = true;
        let woken = s.wake_all();
        drop(s);
        self.work.notify_all();
        woken.into_iter().for_each(Waiter::wake);
    }

    /// A blocking waiter's commit (gathering for the window first).
    fn lead(&self) {
        {
            let mut s = self.lock();
            if !s.unled() {
                return;
            }
            s.busy = true;
        }
        if !self.window.is_zero() {
            std::thread::sleep(self.window);
        }
        self.commit();
    }

    /// Runs one commit (the caller set `busy`): everything requested before
    /// it starts becomes durable, and everyone it covers is woken. Wakes the
    /// flusher's thread for the appends that came meanwhile. `false`: it
    /// failed, and everyone has heard.
    fn commit(&self) -> bool {
        let (global, link) = self.lock().requested;
        let head = Head { log_id: self.log_id, global, link };
        if let Err(e) = self.store.commit(&head, self.reach == Reach::Disk) {
            self.fail(format!("commit failed: {e}"));
            return false;
        }
        let mut s = self.lock();
        s.durable = s.durable.max(global);
        s.busy = false;
        let covered = s.take_covered();
        let more = s.requested.0 > s.durable || s.stop;
        drop(s);
        if more {
            self.work.notify_one();
        }
        covered.into_iter().for_each(Waiter::wake);
        true
    }

    fn run(&self) {
        loop {
            {
                let mut s = self.lock();
                loop {
                    if s.error.is_some() {
                        return;
                    }
                    if s.unled() {
                        break;
                    }
                    if s.stop && !s.busy {
                        // Stopping with nothing left: whoever still waits hears so.
                        s.ended = true;
                        let woken = s.wake_all();
                        drop(s);
                        woken.into_iter().for_each(Waiter::wake);
                        return;
                    }
                    s = self.work.wait(s).unwrap_or_else(std::sync::PoisonError::into_inner);
                }
                s.busy = true;
                if !self.window.is_zero() && !s.stop {
                    // Gather for the window; a stop cuts it short.
                    let (guard, _) = self
                        .work
                        .wait_timeout_while(s, self.window, |s| !s.stop)
                        .unwrap_or_else(std::sync::PoisonError::into_inner);
                    drop(guard);
                }
            }
            if !self.commit() {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::log::store::memory::MemoryStore;

    /// A commit that completes while no one waits must still be seen by a
    /// waiter that comes a moment later (an append acknowledged after its
    /// commit already ran). With `watch::Sender::send` the value was dropped
    /// when no receiver existed, and such a waiter waited forever.
    #[test]
    fn a_commit_nobody_waited_for_is_seen_by_a_later_waiter() {
        let flusher = Flusher::start(Arc::new(MemoryStore::new()), LogId::fresh(), 0, Duration::ZERO, Reach::Os, false);
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
