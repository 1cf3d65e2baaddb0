//! The one flush path: a *commit* makes everything appended so far durable
//! (sled flush, then fsync of its files) and then moves the head up to the
//! newest record it covers (one more `fdatasync`). A head is never written
//! before the data it covers is durable, and an append waiting for
//! durability is released only after the head covering it is written, so an
//! acknowledged record that later disappears is always detected.
//!
//! [`Flusher`] commits for `GroupCommit` and for `Buffered` (on a period):
//! a commit covers everything requested before it started, optionally after
//! gathering for `window`, the data and the head of consecutive commits
//! overlapping. In `GroupCommit` a commit is led by a *blocking* appender
//! when one is there to lead (leader/follower, as write groups in databases
//! do): the first appender to find no data stage running commits the group
//! itself, in its own thread (alone, it commits as `Strict` does, with no
//! hand-off). Appends that arrive meanwhile are taken by the flusher's data
//! thread when that data stage ends, so that under load groups follow each
//! other without waiting for a parked thread to be scheduled (handing the
//! next group to a waiting appender was measured: 16 writers fell from
//! ~10,500 to ~6,000 appends/s on 2 cores). Async waiters never lead: they
//! must not block a runtime thread on `fdatasync`. Blocking appends reach
//! the flusher in write groups (`combine.rs`): the thread that wrote a group
//! hands the others' appends over with [`Flusher::wake_when_durable`] and
//! then waits for (or leads) the commit of its own.

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
/// commit started, in two stages so that consecutive commits overlap: the
/// *data* thread makes the store durable (for sled with a journal: one write
/// and one `fdatasync` of the journal) and hands the point it reached to the
/// *head* thread, which writes the head there (one more `fdatasync`) and
/// releases the appends it covers. While the head of one group is being
/// synced, the data of the next already is: one sync period per group, not
/// two, and never a head ahead of its data. A blocking appender that leads
/// runs both stages itself, one after the other; the next group's data stage
/// (another leader's, or the data thread's) overlaps its head stage. Data
/// stages never overlap each other (`data_busy`), so the points they reach
/// only grow, and every head is written after the data stage that reached it.
pub(crate) struct Flusher {
    shared: Arc<FlushShared>,
    threads: Vec<JoinHandle<()>>,
}

struct FlushShared {
    state: Mutex<FlushState>,
    /// Blocking waiters lead their own commits (`GroupCommit`); otherwise
    /// the data thread commits every group (`Buffered`, on its period).
    leaders: bool,
    /// How long a commit gathers appends before it starts.
    window: Duration,
    /// Wakes the data thread: there is a group no one leads, or stop.
    data_work: Condvar,
    /// Wakes the head thread: the data thread reached a new point, finished, or failed.
    head_work: Condvar,
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
    /// Where the last completed data stage reached.
    data: (u64, Digest),
    /// A data stage is running (the data thread's or a leader's).
    data_busy: bool,
    /// Where the data thread's last data stage reached: the head thread's work
    /// (a leader writes its own head).
    head_owed: (u64, Digest),
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

    /// Everyone waiting for a global up to `durable`.
    fn take_covered(&mut self) -> Vec<Waiter> {
        let still = self.waiting.split_off(&(self.durable.saturating_add(1)));
        std::mem::replace(&mut self.waiting, still).into_values().flatten().collect()
    }

    /// Appends no data stage covers yet, and none is running: a group to lead.
    fn unled(&self) -> bool {
        !self.data_busy && self.requested.0 > self.data.0 && self.error.is_none()
    }
}

impl Flusher {
    /// Starts the threads; `window` is how long a commit gathers appends
    /// before it starts; with `leaders`, blocking waiters lead their commits.
    pub(crate) fn start(
        store: Arc<dyn Store>,
        log_id: LogId,
        durable: u64,
        window: Duration,
        reach: Reach,
        leaders: bool,
    ) -> Self {
        let state = FlushState {
            requested: (durable, Digest::ZERO),
            data: (durable, Digest::ZERO),
            durable,
            ..FlushState::default()
        };
        let shared = Arc::new(FlushShared {
            state: Mutex::new(state),
            leaders,
            window,
            data_work: Condvar::new(),
            head_work: Condvar::new(),
            store: store.clone(),
            log_id,
            reach,
        });
        let mut threads = Vec::new();
        let worker = shared.clone();
        let data = std::thread::Builder::new().name("lifecycle-log-flush".into()).spawn(move || worker.run_data());
        let worker = shared.clone();
        let head = std::thread::Builder::new().name("lifecycle-log-head".into()).spawn(move || worker.run_head());
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

    /// Says an append at `global` wants a commit. Without leaders the data
    /// thread is woken if it was idle (one that is gathering or committing
    /// looks at `requested` again before it waits); with leaders, whoever
    /// waits for the append starts its commit.
    pub(crate) fn request(&self, global: u64, link: Digest) {
        let mut s = self.shared.lock();
        let idle = s.requested.0 <= s.data.0 && !s.data_busy;
        if global > s.requested.0 {
            s.requested = (global, link);
        }
        if idle && !self.shared.leaders {
            self.shared.data_work.notify_one();
        }
    }

    /// Waits, blocking the thread, until `global` is durable; with leaders,
    /// commits the group itself when no data stage is running.
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
    /// blocking appends another thread wrote (`combine.rs`). Starts the data
    /// thread on them if no data stage is running.
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
            self.shared.data_work.notify_one();
        }
        drop(s);
        now.into_iter().for_each(|t| t.unpark());
    }

    /// Waits, without blocking a thread, until `global` is durable. An async
    /// waiter never leads: it wakes the data thread when no one else does.
    pub(crate) async fn wait_async(&self, global: u64) -> Result<(), String> {
        std::future::poll_fn(|cx| {
            let mut s = self.shared.lock();
            match s.outcome(global) {
                Some(done) => Poll::Ready(done),
                None => {
                    s.waiting.entry(global).or_default().push(Waiter::Task(cx.waker().clone()));
                    if s.unled() {
                        self.shared.data_work.notify_one();
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

    /// A blocking waiter's commit: the data stage (gathering for the window
    /// first), then the head stage, waking everyone it covers.
    fn lead(&self) {
        {
            let mut s = self.lock();
            if !s.unled() {
                return;
            }
            s.data_busy = true;
        }
        if !self.window.is_zero() {
            std::thread::sleep(self.window);
        }
        let Some(reached) = self.data_stage() else { return };
        self.head_stage(reached);
    }

    /// Runs one data stage (the caller set `data_busy`): everything requested
    /// before it starts becomes durable. Wakes the data thread for the
    /// appends that came meanwhile, and says where it reached (`None`: it
    /// failed, and everyone has heard).
    fn data_stage(&self) -> Option<(u64, Digest)> {
        let reached = self.lock().requested;
        if let Err(e) = commit_data(self.store.as_ref(), self.reach) {
            self.fail(format!("flush failed: {e}"));
            return None;
        }
        let mut s = self.lock();
        if reached.0 > s.data.0 {
            s.data = reached;
        }
        s.data_busy = false;
        let more = s.requested.0 > s.data.0 || s.stop;
        drop(s);
        if more {
            self.data_work.notify_one();
        }
        Some(reached)
    }

    /// Writes the head at `reached` (whose data is durable) and wakes everyone it covers.
    fn head_stage(&self, (global, link): (u64, Digest)) -> bool {
        let head = Head { log_id: self.log_id, global, link };
        if let Err(e) = self.store.write_head(&head, self.reach == Reach::Disk) {
            self.fail(format!("writing the head failed: {e}"));
            return false;
        }
        let mut s = self.lock();
        s.durable = s.durable.max(global);
        let covered = s.take_covered();
        drop(s);
        covered.into_iter().for_each(Waiter::wake);
        true
    }

    fn run_data(&self) {
        loop {
            {
                let mut s = self.lock();
                loop {
                    if s.error.is_some() {
                        drop(s);
                        return self.data_ended();
                    }
                    if s.unled() {
                        break;
                    }
                    if s.stop && !s.data_busy {
                        drop(s);
                        return self.data_ended(); // stopping with nothing left
                    }
                    s = self.data_work.wait(s).unwrap_or_else(std::sync::PoisonError::into_inner);
                }
                s.data_busy = true;
                if !self.window.is_zero() && !s.stop {
                    // Gather for the window; a stop cuts it short.
                    let (guard, _) = self
                        .data_work
                        .wait_timeout_while(s, self.window, |s| !s.stop)
                        .unwrap_or_else(std::sync::PoisonError::into_inner);
                    drop(guard);
                }
            }
            let Some(reached) = self.data_stage() else { return };
            let mut s = self.lock();
            if reached.0 > s.head_owed.0 {
                s.head_owed = reached;
            }
            drop(s);
            self.head_work.notify_one();
        }
    }

    fn data_ended(&self) {
        self.lock().data_ended = true;
        self.head_work.notify_one();
    }

    /// Writes the heads of the data thread's commits (a leader writes its own).
    fn run_head(&self) {
        loop {
            let reached = {
                let mut s = self.lock();
                while s.head_owed.0 <= s.durable && !s.data_ended && s.error.is_none() {
                    s = self.head_work.wait(s).unwrap_or_else(std::sync::PoisonError::into_inner);
                }
                if s.error.is_some() || s.head_owed.0 <= s.durable {
                    break; // failed, or the data thread ended and everything is covered
                }
                s.head_owed
            };
            if !self.head_stage(reached) {
                return;
            }
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
