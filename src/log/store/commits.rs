//! [`Commits`]: how an append written to the store becomes acknowledged,
//! per [`Durability`] mode — the one object the log holds for it. It owns
//! the flusher (`flush.rs`) and the write groups (`groups.rs`) and decides
//! which of them an append goes through:
//!
//! | mode | blocking append | async append | commits |
//! |---|---|---|---|
//! | `Buffered` | written alone, answered at once | written, answered at once | the flusher's thread, every `buffered_head_every`, to the OS |
//! | `GroupCommit` | written in a group, answered once a commit covers it | written, answered once a commit covers it | led by a blocking waiter, else the flusher's thread, to the disk |
//! | `Strict` | written alone, then a commit of its own in the caller's thread | the same, on a blocking thread | the appender's own |
//!
//! `Buffered` blocking appends are not written in groups: they wait for no
//! commit, so a group adds a park and an unpark to each (the writer's lock
//! alone lets a running thread take it again without sleeping). Measured on
//! 2 cores, `cargo bench --bench log`, each case twice, alternating: in
//! groups 16 writers made 41–46k appends/s against 53–55k alone, and 256
//! writers 38–40k against 42–44k.

use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::error::StoreError;
use super::flush::{Flusher, Reach};
use super::groups::{Covered, Groups, Submit};
use super::head::{Head, LogId};
use super::journal::Tip;
use super::kv::Store;

/// How durable an acknowledged append is. See the log's module docs for the table.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Durability {
    /// Return at once; a commit runs every `flush_every`.
    Buffered,
    /// Wait for a commit shared with every append of the window.
    #[default]
    GroupCommit,
    /// Wait for a commit started at once.
    Strict,
}

/// How a log's commits are paced (from its configuration).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Pace {
    /// The mode.
    pub(crate) durability: Durability,
    /// How long a `GroupCommit` commit gathers appends before it starts.
    pub(crate) max_delay: Duration,
    /// How often `Buffered` commits (to the OS).
    pub(crate) buffered_every: Duration,
    /// Whether a thread may be started for commits (a memory log used
    /// for deterministic simulation starts none).
    pub(crate) threads: bool,
}

/// The commits of one log: `T` is what an append is, `A` what it answers, `E` its error.
pub(crate) struct Commits<T, A, E> {
    store: Arc<dyn Store>,
    /// `None`: nothing is committed (a log opened to read, or a format-v1 one).
    log_id: Option<LogId>,
    durability: Durability,
    flusher: Option<Flusher>,
    groups: Groups<T, A, E>,
}

impl<T, A: Covered, E> Commits<T, A, E> {
    /// Commits for a log whose commits cover everything up to `durable`;
    /// `log_id: None` commits nothing (the log is read, not written).
    pub(crate) fn start(store: Arc<dyn Store>, log_id: Option<LogId>, durable: u64, pace: Pace) -> Self {
        let flusher = match (log_id, pace.durability) {
            (None, _) => None,
            // Every append commits for itself.
            (Some(_), Durability::Strict) => None,
            // Memory logs commit on sync and drop; a thread per simulated log is not worth it.
            (Some(_), Durability::Buffered) if !pace.threads => None,
            // Buffered appends wait for nothing: its commits are the flusher thread's alone.
            (Some(id), Durability::Buffered) => {
                Some(Flusher::start(store.clone(), id, durable, pace.buffered_every, Reach::Os, false))
            }
            (Some(id), Durability::GroupCommit) => {
                Some(Flusher::start(store.clone(), id, durable, pace.max_delay, Reach::Disk, true))
            }
        };
        Self { store, log_id, durability: pace.durability, flusher, groups: Groups::default() }
    }

    /// A blocking append: `write` writes a group of inputs (taking the
    /// writer's lock itself) and answers each; this returns `input`'s answer
    /// once it is as durable as the mode says. A failed commit's message
    /// goes through `fail`.
    pub(crate) fn append_blocking(
        &self,
        input: T,
        write: &dyn Fn(Vec<T>) -> Vec<Result<A, E>>,
        fail: &dyn Fn(String) -> E,
    ) -> Result<A, E> {
        if self.durability != Durability::GroupCommit || self.flusher.is_none() {
            // Alone, under the writer's lock: see the table above for why
            // `Buffered` is not written in groups.
            let answer = write(vec![input]).pop();
            let answer = answer.unwrap_or_else(|| Err(fail("the append was not written".into())))?;
            match self.durability {
                Durability::Strict => self.commit_now(answer.tip()).map_err(|e| fail(format!("commit failed: {e}")))?,
                Durability::Buffered | Durability::GroupCommit => self.written(answer.tip()),
            }
            return Ok(answer);
        }
        let how = Submit { write, fail, flusher: self.flusher.as_ref() };
        self.groups.submit(input, &how)
    }

    /// Says an append written outside a group (async, an import) wants a
    /// commit. Call outside the writer's lock: waiters woken by a commit
    /// take the flusher's lock, and a writer queued behind them would hold
    /// up every other writer. The flusher keeps the highest tip it saw, so
    /// the order calls arrive in does not matter.
    pub(crate) fn written(&self, (global, link): Tip) {
        if let Some(f) = &self.flusher {
            f.request(global, link);
        }
    }

    /// Waits, without blocking a thread, until the append at `tip`
    /// (already [`Commits::written`]) is as durable as the mode says.
    pub(crate) async fn durable(&self, tip: Tip) -> Result<(), String> {
        match (self.durability, &self.flusher) {
            (Durability::Strict, _) => {
                // A commit of its own blocks on the disk: not on a runtime thread.
                let (store, log_id) = (self.store.clone(), self.log_id);
                let done = tokio::task::spawn_blocking(move || commit_to(store.as_ref(), log_id, tip))
                    .await
                    .map_err(|e| format!("commit task: {e}"))?;
                done.map_err(|e| format!("commit failed: {e}"))
            }
            (Durability::GroupCommit, Some(f)) => f.wait_async(tip.0).await,
            _ => Ok(()),
        }
    }

    /// A commit of `tip`'s own, in this thread: everything applied so far
    /// reaches the disk and the head covers `tip`.
    pub(crate) fn commit_now(&self, tip: Tip) -> Result<(), StoreError> {
        commit_to(self.store.as_ref(), self.log_id, tip)
    }

    /// The newest global sequence number a completed commit covers:
    /// `GroupCommit`'s shared commits; the other modes keep none, so `tip`.
    pub(crate) fn committed(&self, tip: u64) -> u64 {
        match &self.flusher {
            Some(f) if self.durability == Durability::GroupCommit => f.durable(),
            _ => tip,
        }
    }

    /// Closes: the flusher commits what was requested and stops; then, for a
    /// log that did not fail (`tip` given), a last commit and a clean close
    /// (the store's own files hold everything, and no journal is needed to
    /// read them). Best effort: a log that failed is only flushed.
    pub(crate) fn close(&mut self, tip: Option<Tip>) {
        if let Some(f) = self.flusher.take() {
            f.stop();
        }
        match (self.log_id, tip) {
            (Some(_), Some(tip)) => {
                if self.commit_now(tip).is_ok() {
                    drop(self.store.close());
                }
            }
            _ => drop(self.store.flush()),
        }
    }
}

/// Makes everything applied so far reach the disk and the head cover
/// `tip`; without a log id (a format-v1 log) there is no head: flush and sync.
pub(crate) fn commit_to(store: &dyn Store, log_id: Option<LogId>, (global, link): Tip) -> Result<(), StoreError> {
    match log_id {
        Some(log_id) => store.commit(&Head { log_id, global, link }, true),
        None => {
            store.flush()?;
            store.sync()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::log::record::Digest;
    use crate::log::store::head::HeadRead;
    use crate::log::store::memory::MemoryStore;

    /// An append that answers its own tip.
    struct Put(Tip);

    impl Covered for Put {
        fn tip(&self) -> Tip {
            self.0
        }
    }

    type Test = Commits<u64, Put, String>;

    fn pace(durability: Durability, threads: bool) -> Pace {
        Pace { durability, max_delay: Duration::ZERO, buffered_every: Duration::from_millis(10), threads }
    }

    fn head(store: &MemoryStore) -> Option<u64> {
        match store.read_head().expect("head") {
            HeadRead::Found(h) => Some(h.global),
            _ => None,
        }
    }

    fn link(n: u8) -> Digest {
        Digest::of(&[n])
    }

    /// Waits (bounded) until the store's head reaches `global`.
    fn head_reaches(store: &MemoryStore, global: u64) -> bool {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while std::time::Instant::now() < deadline {
            if head(store) >= Some(global) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        false
    }

    /// `Buffered` with threads commits on its period, without anyone waiting;
    /// a memory log used for simulation starts no thread, so nothing moves
    /// until a commit is asked for.
    #[test]
    fn buffered_commits_on_its_period_only_where_threads_are_allowed() {
        let store = Arc::new(MemoryStore::new());
        let threaded: Test = Commits::start(store.clone(), Some(LogId::fresh()), 0, pace(Durability::Buffered, true));
        threaded.written((1, link(1)));
        assert!(head_reaches(&store, 1), "the flusher's thread moved the head");

        let store = Arc::new(MemoryStore::new());
        let simulated: Test = Commits::start(store.clone(), Some(LogId::fresh()), 0, pace(Durability::Buffered, false));
        simulated.written((1, link(1)));
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(head(&store), None, "no thread, no commit");
        simulated.commit_now((1, link(1))).expect("commit");
        assert_eq!(head(&store), Some(1));
    }

    /// How far commits lag: `GroupCommit` says what its shared commits
    /// covered; the other modes keep none and answer the tip.
    #[test]
    fn committed_is_the_shared_commits_reach_in_group_commit_and_the_tip_otherwise() {
        let store = Arc::new(MemoryStore::new());
        let group: Test = Commits::start(store.clone(), Some(LogId::fresh()), 5, pace(Durability::GroupCommit, true));
        assert_eq!(group.committed(9), 5, "nothing beyond 5 was committed yet");
        let strict: Test = Commits::start(store.clone(), Some(LogId::fresh()), 5, pace(Durability::Strict, true));
        assert_eq!(strict.committed(9), 9);
        let simulated: Test = Commits::start(store.clone(), Some(LogId::fresh()), 5, pace(Durability::Buffered, false));
        assert_eq!(simulated.committed(9), 9);
        // With its flusher's thread, Buffered still answers the tip: its commits are not waited for.
        let buffered: Test = Commits::start(store, Some(LogId::fresh()), 5, pace(Durability::Buffered, true));
        assert_eq!(buffered.committed(9), 9);
    }

    /// A `Strict` async append waits for a commit of its own: the head covers it when the wait ends.
    #[tokio::test]
    async fn a_strict_async_append_is_committed_when_its_wait_ends() {
        let store = Arc::new(MemoryStore::new());
        let strict: Test = Commits::start(store.clone(), Some(LogId::fresh()), 0, pace(Durability::Strict, true));
        strict.written((3, link(3)));
        assert_eq!(head(&store), None);
        strict.durable((3, link(3))).await.expect("durable");
        assert_eq!(head(&store), Some(3));
    }

    /// A blocking `Strict` append is written alone and committed before it is answered.
    #[test]
    fn a_strict_blocking_append_is_committed_before_its_answer() {
        let store = Arc::new(MemoryStore::new());
        let strict: Test = Commits::start(store.clone(), Some(LogId::fresh()), 0, pace(Durability::Strict, true));
        let seen = std::sync::Mutex::new(Vec::new());
        let write = |inputs: Vec<u64>| {
            seen.lock().expect("lock").push(inputs.len());
            inputs.into_iter().map(|i| Ok(Put((i, link(7))))).collect()
        };
        let answer = strict.append_blocking(4, &write, &|m| m).expect("answer");
        assert_eq!(answer.0.0, 4);
        assert_eq!(head(&store), Some(4));
        assert_eq!(*seen.lock().expect("lock"), vec![1], "alone");
    }

    /// Closing a log that did not fail commits its tip last; one that failed
    /// (no tip) moves no head.
    #[test]
    fn close_commits_the_tip_unless_the_log_failed() {
        let store = Arc::new(MemoryStore::new());
        let mut commits: Test =
            Commits::start(store.clone(), Some(LogId::fresh()), 0, pace(Durability::GroupCommit, true));
        commits.close(Some((8, link(8))));
        assert_eq!(head(&store), Some(8));

        let store = Arc::new(MemoryStore::new());
        let mut failed: Test =
            Commits::start(store.clone(), Some(LogId::fresh()), 0, pace(Durability::GroupCommit, true));
        failed.close(None);
        assert_eq!(head(&store), None);
    }
}
