//! The persisted event log: one record per transition, the truth about every
//! instance (R8) and the way back after a crash (R11).
//!
//! Write path of [`Log::append`], in order:
//! 1. Under the writer lock: check the sequence number the caller expects
//!    (a second writer or a lost update is [`LogError::SequenceConflict`]),
//!    assign the next global sequence number, chain the record to the
//!    instance's previous one (`prev`, see [`record`]).
//! 2. Apply the batch: the record, its global-index entry, and the
//!    instance's latest-state entry, all there after a crash or none
//!    ([`Store::append`]; readers in this process may see them land one by
//!    one, each before the entry that leads to it). Release the lock.
//! 3. Wait for durability as the [`Durability`] mode says: a *commit*
//!    covering this append. In the durable modes a commit is one write and
//!    one `fdatasync` of the journal (every batch is also a journal frame,
//!    and the commit's write ends with a commit frame naming the tip: the
//!    journal is the head between checkpoints, see `journal.rs`; sled is
//!    never flushed on the commit path). `Buffered` does not wait; its
//!    commits run on a period, flush sled, move the head file and stop at
//!    the OS (no fsync).
//! 4. Only then may the caller apply the transition in memory. If any step
//!    fails, the caller gets the error and the transition does not happen.
//!
//! Durability modes, and exactly what an acknowledged append survives:
//!
//! | mode | an append returns after | process crash | power loss |
//! |---|---|---|---|
//! | [`Durability::Buffered`] | the batch is in sled's memory (sled writes it out every `flush_every`; a commit to the OS, without fsync, moves the head every `buffered_head_every`, a minute) | loses ≤ `flush_every` | loses what the OS had not written back; the head then reports what it covered as lost |
//! | [`Durability::GroupCommit`] (default) | a shared commit covering it (one `fdatasync`): the next commit starts as soon as the last one's sync ends (plus `group_commit_max_delay`, zero by default) and covers every append before it | loses nothing acknowledged | loses nothing acknowledged (if the disk honours fsync) |
//! | [`Durability::Strict`] | a commit of its own, in the appending thread | loses nothing acknowledged | loses nothing acknowledged |
//!
//! After a crash, opening replays the journal frames sled's files lack
//! ([`Log::replayed`]); a checkpoint (sled flushed and synced, the head file
//! moved up, older journal files deleted) runs when a journal file reaches
//! [`LogConfig::journal_file_max`] and when a writer opens or closes the log.
//!
//! **Damage is noticed.** The head — the newer of the head file beside
//! sled's (`head.rs`, moved at checkpoints) and the journal's newest commit
//! frame — records the newest record a commit covered. Opening compares it with
//! the tip sled returns ([`HeadCheck`]): sled silently rolls back to an older
//! consistent state when it finds damage, and without the head that would
//! look like a clean, shorter log. A writer refuses a log that lost records
//! (or its head) unless [`LogConfig::accept_loss`] is set; then the loss is
//! recorded in the log ([`AcceptedLoss`]) and global sequence numbers go on
//! after the lost ones, never reused. Readers open a copy and report.

mod error;
mod integrity;
mod keys;
pub mod record;
mod recovery;
mod retention;
mod rewrite;
pub mod store;
mod verify;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use error::LogError;
pub use integrity::{AcceptedLoss, HeadCheck};
pub use record::{Corruption, Digest, Event, InstanceSpec, Latest, Record};
pub use recovery::{RecoveredInstance, Recovery, RecoveryMode, RecoveryOptions};
pub use retention::{CompactionReport, Retention};
pub use store::{
    Durability, Head, HeadRead, LOST_LISTED, LogId, MemoryStore, Pair, Replayed, SledStore, Store, StoreError,
    lock_holder, remove_copies,
};
#[cfg(feature = "cluster")]
pub(crate) use verify::replay;
pub use verify::{Finding, Note, Report, RulesChoice};

use crate::machine::{Instance, InstanceName, Pending, Policy, RulesVersion, Timestamp};
use store::{Commits, Covered, Pace, Scratch, Tip as CommitTip, commit_to};

/// How long opening waits for a lock that another handle is releasing.
const LOCK_WAIT: Duration = Duration::from_secs(1);

/// Log configuration. Every bound has a reason.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct LogConfig {
    /// Durability of acknowledged appends.
    pub durability: Durability,
    /// How long `GroupCommit` may gather appends before a commit. Zero (the
    /// default): commits are paced by the disk — the next starts as soon as
    /// the last ends and covers everything appended meanwhile, so a lone
    /// writer pays one commit and a busy fleet shares each. A host that
    /// prefers fewer fsyncs over latency sets a small delay (1–2 ms): each
    /// commit then waits that long first, and every append pays it.
    #[serde(alias = "group_commit_window")]
    pub group_commit_max_delay: Duration,
    /// sled's background flush interval: what `Buffered` may lose to a crash.
    pub flush_every: Duration,
    /// How often `Buffered` moves the head up. A commit to the OS makes sled
    /// write back and wait for everything since the last one, which under a
    /// full write load takes a second or more and slows appends meanwhile
    /// (measured: every 500 ms cost two thirds of the throughput), so it is
    /// rare: a minute costs about 2 % under full load. A rollback of records
    /// older than the last head is detected; newer ones are not.
    pub buffered_head_every: Duration,
    /// How large a journal file grows (durable modes) before a checkpoint
    /// flushes sled's files and starts a new one: 64 MiB, about 50,000
    /// appends, keeps replay after a crash well under a second and sled's
    /// flushes rare (appends go on during one; a compaction step waits for
    /// it). Floored at [`JOURNAL_FILE_MIN`].
    pub journal_file_max: u64,
    /// sled's page cache: 64 MiB holds the hot tail of a large fleet's log;
    /// sled's own default (1 GiB) is far more than a lifecycle log needs.
    pub cache_capacity: u64,
    /// Open a log that lost records or its head (see [`HeadCheck`]) anyway:
    /// the loss is recorded in the log and writing goes on from what is
    /// left. Journal files holding frames that could not be replayed are
    /// moved under the log's `kept/`, not deleted ([`Log::kept`]). Off by
    /// default: a writer refuses such a log and says what was lost.
    pub accept_loss: bool,
    /// sled's files are rewritten when a writer opens the log and finds them
    /// larger than this and more than 8× the bytes the last compaction
    /// counted (sled reuses deleted keys' space but rarely gives it back:
    /// see `rewrite.rs`). 64 MiB: smaller logs are never worth a copy.
    pub rewrite_above: u64,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            durability: Durability::GroupCommit,
            group_commit_max_delay: Duration::ZERO,
            flush_every: Duration::from_millis(500),
            buffered_head_every: Duration::from_secs(60),
            cache_capacity: 64 * 1024 * 1024,
            journal_file_max: 64 * 1024 * 1024,
            accept_loss: false,
            rewrite_above: 64 * 1024 * 1024,
        }
    }
}

/// The smallest [`LogConfig::journal_file_max`]: below it checkpoints, each
/// a flush of sled's files, would come every few hundred appends.
pub const JOURNAL_FILE_MIN: u64 = 256 * 1024;

/// An acknowledged append.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Appended {
    /// The record's per-instance sequence number.
    pub seq: u64,
    /// The record's global sequence number.
    pub global: u64,
    /// The record's link (its digest): what a head covering it records.
    pub link: Digest,
}

impl Covered for Appended {
    fn tip(&self) -> CommitTip {
        (self.global, self.link)
    }
}

/// One append as its caller asked for it: the record to write, before the
/// log numbers and chains it.
struct Entry {
    name: InstanceName,
    /// The sequence number the caller means to write.
    expected_seq: u64,
    at: Timestamp,
    event: Event,
    to: Instance,
}

/// What a log was opened for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Access {
    /// Appends allowed; damage refused unless accepted.
    Write,
    /// A copy (or a store) opened to look at: no appends, damage reported.
    Read,
}

/// The event log. Cheap to clone (shared).
#[derive(Clone)]
pub struct Log {
    inner: Arc<Inner>,
}

struct Inner {
    store: Arc<dyn Store>,
    path: Option<PathBuf>,
    config: LogConfig,
    access: Access,
    /// `None` for a format-v1 log opened for reading (it has no id yet).
    log_id: Option<LogId>,
    head_check: HeadCheck,
    writer: Mutex<Writer>,
    /// How appends become durable and acknowledged (`store::Commits`).
    commits: Commits<Entry, Appended, LogError>,
    /// The temporary directory the log lives in (a copy, or a temporary log), removed with it.
    _scratch: Option<Scratch>,
    /// Compaction keeps records from this global sequence number on ([`Log::hold_from`]).
    hold: std::sync::atomic::AtomicU64,
}

/// The newest record of one instance.
#[derive(Clone, Copy, Debug)]
struct Tip {
    seq: u64,
    link: record::Digest,
}

struct Writer {
    /// The last global sequence number written (0 for an empty log).
    last_global: u64,
    /// The link of the record at `last_global`: what the head will record.
    last_link: record::Digest,
    /// The newest record of every instance with records.
    tips: HashMap<InstanceName, Tip>,
    /// Set when a flush failed: no append is accepted after that.
    failed: Option<String>,
}

impl Log {
    /// Opens the log in directory `path` for writing, creating it if it does not exist.
    pub fn open(path: impl AsRef<Path>, config: LogConfig) -> Result<Self, LogError> {
        let path = path.as_ref();
        if path.exists() && !path.is_dir() {
            return Err(LogError::NotADirectory { path: path.to_path_buf() });
        }
        std::fs::create_dir_all(path).map_err(|source| LogError::Io {
            op: "create",
            path: path.to_path_buf(),
            source,
        })?;
        Self::open_sled(path, config, Access::Write, None)
    }

    /// Opens an existing log for writing; a directory without one is [`LogError::NotALog`].
    pub fn open_existing(path: impl AsRef<Path>, config: LogConfig) -> Result<Self, LogError> {
        let path = path.as_ref();
        check_existing(path)?;
        Self::open_sled(path, config, Access::Write, None)
    }

    /// Opens a copy of the log at `path` for reading, so that reading never
    /// writes to the original (sled writes on open; see `store/files.rs`). The copy
    /// is removed when the last clone is dropped. Damage is reported by
    /// [`Log::head_check`] and [`Log::verify`], never refused. Returns whether
    /// another process held the original at the time of the copy. Errors
    /// name `path`, never the copy.
    pub fn open_copy(path: impl AsRef<Path>) -> Result<(Self, bool), LogError> {
        let path = path.as_ref();
        check_existing(path)?;
        // A rewrite cut short after sled's old files went has no `db` yet: no one holds it.
        let db = path.join("db");
        let in_use = db.exists() && store::is_locked(&db)?;
        let copy = Scratch::copy_of(path)?;
        let at = copy.path().to_path_buf();
        let config = LogConfig { durability: Durability::Buffered, ..LogConfig::default() };
        let log = Self::open_sled(&at, config, Access::Read, Some(copy)).map_err(|e| e.shown_as(&at, path))?;
        Ok((log, in_use))
    }

    /// A log in a temporary directory, removed when the last clone is dropped.
    pub fn temporary(config: LogConfig) -> Result<Self, LogError> {
        let scratch = Scratch::new()?;
        let path = scratch.path().to_path_buf();
        Self::open_sled(&path, config, Access::Write, Some(scratch))
    }

    /// A log in memory (for deterministic simulation: no background thread).
    pub fn in_memory() -> Result<Self, LogError> {
        Self::with_store(
            Arc::new(MemoryStore::new()),
            LogConfig { durability: Durability::Buffered, ..LogConfig::default() },
        )
    }

    /// A log on any store, for writing.
    pub fn with_store(store: Arc<dyn Store>, config: LogConfig) -> Result<Self, LogError> {
        Self::init(store, None, config, Access::Write, None)
    }

    /// A log on any store, for reading: damage is reported, not refused, and appends are refused.
    pub fn inspect_store(store: Arc<dyn Store>) -> Result<Self, LogError> {
        let config = LogConfig { durability: Durability::Buffered, ..LogConfig::default() };
        Self::init(store, None, config, Access::Read, None)
    }

    fn open_sled(path: &Path, config: LogConfig, access: Access, scratch: Option<Scratch>) -> Result<Self, LogError> {
        // A rewrite of sled's files a crash cut short is finished (or undone) first.
        rewrite::finish(path)?;
        let log = Self::open_sled_once(path, config.clone(), access, scratch)?;
        if access != Access::Write || log.inner._scratch.is_some() {
            return Ok(log);
        }
        let (size, live) = (log.size_on_disk()?, log.live_bytes()?);
        if !rewrite::due(size, live, config.rewrite_above) {
            return Ok(log);
        }
        // Everything is in sled's files now (the open checkpointed what the
        // journal held): close, copy, swap, open again.
        drop(log);
        let open = |dir: &Path| open_db(&sled::Config::new().path(dir).flush_every_ms(None), dir);
        let done = rewrite::rewrite(path, size, &open)?;
        let log = Self::open_sled_once(path, config, access, None)?;
        if let Some(done) = done {
            tracing::info!(
                path = %path.display(),
                before_bytes = done.before,
                live_bytes = done.live,
                after_bytes = log.size_on_disk().unwrap_or(0),
                took_ms = done.took.as_millis() as u64,
                "sled's files held far more than the log keeps: rewritten"
            );
        }
        Ok(log)
    }

    fn open_sled_once(
        path: &Path,
        config: LogConfig,
        access: Access,
        scratch: Option<Scratch>,
    ) -> Result<Self, LogError> {
        // The durable modes commit through the journal; every mode replays what one left.
        let journaled = access == Access::Write && config.durability != Durability::Buffered;
        // Without a journal, sled's own periodic flush is what `Buffered`
        // may lose. With one, the journal holds every batch and sled's
        // periodic flush would only stop appends while it runs (it holds a
        // lock every `apply_batch` needs): sled writes a buffer when it
        // fills, and checkpoints (`journal.rs`) flush it.
        let flush_ms = u64::try_from(config.flush_every.as_millis()).unwrap_or(u64::MAX).max(1);
        let sled_config = sled::Config::new()
            .path(path)
            .cache_capacity(config.cache_capacity)
            .flush_every_ms((!journaled).then_some(flush_ms));
        let db = open_db(&sled_config, path)?;
        check_not_foreign(&db, path)?;
        let opened = |source| LogError::Open { path: path.to_path_buf(), source };
        let store = Arc::new(
            SledStore::new(db, path, journaled.then_some(config.journal_file_max.max(JOURNAL_FILE_MIN)))
                .map_err(opened)?,
        );
        let replayed = store.replayed().is_some_and(|r| r.files > 0 || r.completed.is_some());
        let log = Self::init(store.clone(), Some(path.to_path_buf()), config, access, scratch)?;
        // Only once the log is accepted (a refused one keeps its journal as
        // evidence): fold what was replayed into sled's files and let it go;
        // with a journal, always: the checkpoint starts the journal file the
        // head names as where the log goes on (so a journal deleted whole is
        // told from one never needed).
        if access == Access::Write && (replayed || journaled) {
            store.checkpoint().map_err(opened)?;
        }
        Ok(log)
    }

    fn init(
        store: Arc<dyn Store>,
        path: Option<PathBuf>,
        config: LogConfig,
        access: Access,
        scratch: Option<Scratch>,
    ) -> Result<Self, LogError> {
        let shown = path.clone().unwrap_or_else(|| PathBuf::from("<memory>"));
        let opened = Opening { store: store.as_ref(), path: &shown, config: &config, access };
        let (log_id, head_check) = opened.identify()?;
        // After an accepted loss the tip is past every lost number (see `Opening::accept`).
        let (last_global, last_link) = integrity::tip(store.as_ref())?;
        let writer = Writer { last_global, last_link, tips: load_tips(store.as_ref())?, failed: None };
        let pace = Pace {
            durability: config.durability,
            max_delay: config.group_commit_max_delay,
            buffered_every: config.buffered_head_every,
            threads: path.is_some(),
        };
        let committing = if access == Access::Write { log_id } else { None };
        let commits = Commits::start(store.clone(), committing, last_global, pace);
        let inner = Inner {
            store,
            path,
            config,
            access,
            log_id,
            head_check,
            writer: Mutex::new(writer),
            commits,
            _scratch: scratch,
            hold: std::sync::atomic::AtomicU64::new(u64::MAX),
        };
        Ok(Self { inner: Arc::new(inner) })
    }

    /// The directory of the log (`None` in memory).
    pub fn path(&self) -> Option<&Path> {
        self.inner.path.as_deref()
    }

    /// The directories where journal files were set aside when a loss was
    /// accepted ([`LogConfig::accept_loss`]), oldest first: the bytes of the
    /// frames opening could not replay, for whoever investigates the loss.
    /// Nothing reads them again (a copy for reading leaves them out);
    /// delete them once they are no longer needed.
    pub fn kept(&self) -> Vec<PathBuf> {
        self.path().map(kept_in).unwrap_or_default()
    }

    /// The configuration.
    pub fn config(&self) -> &LogConfig {
        &self.inner.config
    }

    /// What opening found when it compared the head with the log's tip. A
    /// writer only ever holds a log that was intact, behind, or accepted.
    pub fn head_check(&self) -> &HeadCheck {
        &self.inner.head_check
    }

    /// What opening replayed from the journal (`None` for a store without
    /// one): after a crash, the batches the journal held and sled's files
    /// did not; and where replay stopped, if it stopped early.
    pub fn replayed(&self) -> Option<Replayed> {
        self.inner.store.replayed()
    }

    /// The log's id (`None` for a format-v1 log opened for reading).
    pub fn id(&self) -> Option<LogId> {
        self.inner.log_id
    }

    /// The head as it would be written now: the newest record and its link.
    pub fn tip(&self) -> (u64, Digest) {
        let w = self.writer();
        (w.last_global, w.last_link)
    }

    /// The newest global sequence number a completed commit covers (in
    /// `Buffered` and `Strict`, which keep no shared commit, the tip): how far
    /// durability lags behind appends.
    pub fn committed(&self) -> u64 {
        self.inner.commits.committed(self.tip().0)
    }

    pub(crate) fn store(&self) -> &dyn Store {
        self.inner.store.as_ref()
    }

    fn writer(&self) -> MutexGuard<'_, Writer> {
        // A panic while holding this lock can only come from a bug in the few
        // lines below, which do no I/O that panics; recover the data either way.
        self.inner.writer.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Appends a record and waits for it to be durable as configured (blocking).
    /// `expected_seq` is the sequence number the caller means to write. In
    /// `GroupCommit`, concurrent callers write in groups: the record may be
    /// written by another caller's thread, and the answer (the append, or
    /// this call's own error) is this call's.
    pub fn append(
        &self,
        name: &InstanceName,
        expected_seq: u64,
        at: Timestamp,
        event: Event,
        to: &Instance,
    ) -> Result<Appended, LogError> {
        let entry = Entry { name: name.clone(), expected_seq, at, event, to: to.clone() };
        self.inner.commits.append_blocking(entry, &|group| self.write_group(group), &|message| self.fail(message))
    }

    /// [`Log::append`] for async callers: the wait for durability does not block a thread.
    pub async fn append_async(
        &self,
        name: &InstanceName,
        expected_seq: u64,
        at: Timestamp,
        event: Event,
        to: &Instance,
    ) -> Result<Appended, LogError> {
        let entry = Entry { name: name.clone(), expected_seq, at, event, to: to.clone() };
        let appended = self.write_locked(&mut self.writer(), entry)?;
        self.inner.commits.written(appended.tip());
        self.durable_async(appended).await?;
        Ok(appended)
    }

    /// Waits, without blocking a thread, until `appended` is as durable as configured.
    async fn durable_async(&self, appended: Appended) -> Result<(), LogError> {
        self.inner.commits.durable(appended.tip()).await.map_err(|e| self.fail(e))
    }

    /// Appends a transition the driver decided (`machine::Driver::feed`),
    /// blocking: the recorder of synchronous runtimes.
    pub fn append_pending(&self, name: &InstanceName, p: &Pending) -> Result<Appended, LogError> {
        self.append(name, p.seq, p.at, Event::of(p), &p.to)
    }

    /// [`Log::append_pending`] for async runtimes (the engine).
    pub async fn append_pending_async(&self, name: &InstanceName, p: &Pending) -> Result<Appended, LogError> {
        self.append_async(name, p.seq, p.at, Event::of(p), &p.to).await
    }

    fn fail(&self, message: String) -> LogError {
        self.writer().failed.get_or_insert_with(|| message.clone());
        LogError::Failed(message)
    }

    /// Steps 1 and 2 of the write path for a group of blocking appends, under
    /// one hold of the writer's lock: one answer per entry, in order.
    fn write_group(&self, group: Vec<Entry>) -> Vec<Result<Appended, LogError>> {
        let mut w = self.writer();
        group.into_iter().map(|entry| self.write_locked(&mut w, entry)).collect()
    }

    /// Checks and writes one record, holding the writer's lock (`w`); the
    /// caller asks for its commit (`Commits::written`).
    fn write_locked(&self, w: &mut Writer, entry: Entry) -> Result<Appended, LogError> {
        let Entry { name, expected_seq, at, event, to } = entry;
        if self.inner.access == Access::Read {
            return Err(LogError::ReadOnly);
        }
        if let Some(message) = &w.failed {
            return Err(LogError::Failed(message.clone()));
        }
        let tip = w.tips.get(&name).copied();
        // A log written elsewhere may hold any number: running out is an error, not a wrap.
        let actual = tip.map_or(0, |t| t.seq).checked_add(1);
        let actual = actual.ok_or_else(|| LogError::Exhausted { what: format!("instance {name}") })?;
        if expected_seq != actual {
            return Err(LogError::SequenceConflict { instance: name, expected: expected_seq, actual });
        }
        let global =
            w.last_global.checked_add(1).ok_or_else(|| LogError::Exhausted { what: "the global order".into() })?;
        // A create writes its spec and its token's digest beside the record
        // (a name created again without a token loses the old one's).
        let origin = match &event {
            Event::Created { spec, token } => Some((record::encode(spec), token.map(|t| t.0.to_vec()))),
            Event::Transition { .. } | Event::Snapshot { .. } => None,
        };
        let prev = tip.map_or(Digest::ZERO, |t| t.link);
        let latest = Latest { seq: actual, global, at, instance: to.clone() };
        let record = Record { instance: name, seq: actual, global, at, prev: Some(prev), replaced: None, event, to };
        let name = &record.instance;
        let bytes = record::encode_record(&record);
        let link = Digest::of(&bytes[4..]);
        // In this order: a reader in this process may see the keys of a batch
        // appear one by one (`SledStore::apply_by_key`), and each key is
        // written before any key that leads a reader to it.
        let mut writes = Vec::with_capacity(5);
        if let Some((spec, token)) = origin {
            writes.push((keys::spec(name), Some(spec)));
            writes.push((keys::token(name), token));
        }
        writes.extend([
            (keys::record(name, actual), Some(bytes)),
            (keys::global(global), Some(keys::record_suffix(name, actual))),
            (keys::latest(name), Some(record::encode(&latest))),
        ]);
        self.inner.store.append(writes)?;
        w.last_global = global;
        w.last_link = link;
        w.tips.insert(record.instance, Tip { seq: actual, link });
        Ok(Appended { seq: actual, global, link })
    }

    /// Takes in an instance whose history lives elsewhere (a cluster's
    /// stream, where it is at `seq` as `to`): the name's local records, a
    /// cache of an earlier ownership, are replaced by one snapshot at `seq`,
    /// in one batch, and appends go on from `seq + 1`. `replaced` is the
    /// digest of what the snapshot stands for (the stream entry's bytes),
    /// which the next record chains to. Waits for durability as an append does.
    pub async fn import(
        &self,
        name: &InstanceName,
        seq: u64,
        at: Timestamp,
        spec: InstanceSpec,
        to: &Instance,
        replaced: Digest,
    ) -> Result<Appended, LogError> {
        if self.inner.access == Access::Read {
            return Err(LogError::ReadOnly);
        }
        let appended = {
            let old = self.history(name)?;
            let mut w = self.writer();
            if let Some(message) = &w.failed {
                return Err(LogError::Failed(message.clone()));
            }
            let global =
                w.last_global.checked_add(1).ok_or_else(|| LogError::Exhausted { what: "the global order".into() })?;
            let record = Record {
                instance: name.clone(),
                seq,
                global,
                at,
                prev: Some(Digest::ZERO),
                replaced: Some(replaced),
                event: Event::Snapshot { spec: spec.clone(), token: None },
                to: to.clone(),
            };
            let latest = Latest { seq, global, at, instance: to.clone() };
            let mut writes: Vec<_> =
                old.iter().flat_map(|r| [(keys::record(name, r.seq), None), (keys::global(r.global), None)]).collect();
            writes.push((keys::record(name, seq), Some(record::encode_record(&record))));
            writes.push((keys::global(global), Some(keys::record_suffix(name, seq))));
            writes.push((keys::latest(name), Some(record::encode(&latest))));
            writes.push((keys::spec(name), Some(record::encode(&spec))));
            writes.push((keys::token(name), None));
            self.inner.store.apply(writes)?;
            w.last_global = global;
            w.last_link = replaced;
            w.tips.insert(name.clone(), Tip { seq, link: replaced });
            Appended { seq, global, link: replaced }
        };
        self.inner.commits.written(appended.tip());
        self.durable_async(appended).await?;
        Ok(appended)
    }

    /// The next sequence number `name` will get (1 for an unknown name).
    pub fn next_seq(&self, name: &InstanceName) -> u64 {
        self.writer().tips.get(name).map_or(0, |t| t.seq).saturating_add(1)
    }

    /// Records the policy the engine runs with, and the version of this
    /// build's rules ([`RulesVersion::CURRENT`]), each in force from the next
    /// record on (nothing is written for one already in force): verification
    /// replays each record under the policy and the rules it was written under.
    pub fn set_policy(&self, policy: &Policy) -> Result<(), LogError> {
        self.set_rules(RulesVersion::CURRENT)?;
        if self.policy()?.as_ref() == Some(policy) {
            return Ok(());
        }
        let json = serde_json::to_vec(policy).unwrap_or_default();
        let from = self.writer().last_global.saturating_add(1);
        self.inner.store.apply(vec![(keys::numbered(keys::POLICY, from), Some(json))])?;
        Ok(())
    }

    /// Records the version of the rules the next records are decided by
    /// (nothing is written when it is the one already in force).
    pub fn set_rules(&self, rules: RulesVersion) -> Result<(), LogError> {
        if self.inner.access == Access::Read {
            return Err(LogError::ReadOnly);
        }
        if self.rules_versions()?.last().map(|(_, v)| *v) == Some(rules) {
            return Ok(());
        }
        let from = self.writer().last_global.saturating_add(1);
        self.inner.store.apply(vec![(keys::numbered(keys::RULES, from), Some(rules.0.to_be_bytes().to_vec()))])?;
        Ok(())
    }

    /// Every rules version recorded, with the global sequence number from
    /// which it is in force, oldest first. Records older than the first were
    /// written before logs recorded it (versions 1 to 3).
    pub fn rules_versions(&self) -> Result<Vec<(u64, RulesVersion)>, LogError> {
        let mut out = Vec::new();
        for pair in self.inner.store.scan(&[keys::RULES]) {
            let (key, value) = pair?;
            let from = keys::parse_numbered(keys::RULES, &key).ok_or_else(|| corrupt_key("rules key", &key))?;
            let bytes: [u8; 2] = value.as_slice().try_into().map_err(|_| LogError::Corrupt {
                what: "rules version entry",
                instance: None,
                seq: None,
                problem: Corruption::Decode { message: format!("{} bytes, not 2", value.len()) },
            })?;
            out.push((from, RulesVersion(u16::from_be_bytes(bytes))));
        }
        Ok(out)
    }

    /// The policy in force now (the last one recorded), if any.
    pub fn policy(&self) -> Result<Option<Policy>, LogError> {
        Ok(self.policies()?.pop().map(|(_, p)| p))
    }

    /// Every policy recorded, with the global sequence number from which it is in force, oldest first.
    pub fn policies(&self) -> Result<Vec<(u64, Policy)>, LogError> {
        let decode = |bytes: &[u8]| {
            serde_json::from_slice::<Policy>(bytes).map_err(|e| LogError::Corrupt {
                what: "policy entry",
                instance: None,
                seq: None,
                problem: Corruption::Decode { message: e.to_string() },
            })
        };
        let mut out = Vec::new();
        if let Some(bytes) = self.inner.store.get(keys::META_POLICY_V1)? {
            out.push((0, decode(&bytes)?));
        }
        for pair in self.inner.store.scan(&[keys::POLICY]) {
            let (key, value) = pair?;
            let from = keys::parse_numbered(keys::POLICY, &key).ok_or_else(|| corrupt_key("policy key", &key))?;
            out.push((from, decode(&value)?));
        }
        Ok(out)
    }

    /// The losses writers were told to accept, oldest first.
    pub fn accepted_losses(&self) -> Result<Vec<AcceptedLoss>, LogError> {
        self.inner
            .store
            .scan(&[keys::LOSS])
            .map(|pair| {
                let (_, value) = pair?;
                record::decode(&value, false).map_err(|problem| LogError::Corrupt {
                    what: "accepted-loss entry",
                    instance: None,
                    seq: None,
                    problem,
                })
            })
            .collect()
    }

    /// Makes everything appended so far durable and moves the head up to it.
    pub fn sync(&self) -> Result<(), LogError> {
        if self.inner.access == Access::Read {
            return Ok(());
        }
        Ok(commit_to(self.store(), self.inner.log_id, self.tip())?)
    }

    /// Makes every auxiliary write so far durable: the store's data, not
    /// the head. Auxiliary data is outside the chain, and moving the head
    /// stays with the commits of appends, in their order (a head written
    /// from here could land after a newer one and move it back).
    pub fn sync_aux(&self) -> Result<(), LogError> {
        if self.inner.access == Access::Read {
            return Err(LogError::ReadOnly);
        }
        self.store().flush()?;
        self.store().sync()?;
        Ok(())
    }

    /// One instance's history, in sequence order.
    pub fn history(&self, name: &InstanceName) -> Result<Vec<Record>, LogError> {
        self.inner.store.scan(&keys::record_prefix(name)).map(|r| decode_pair(r?)).collect()
    }

    /// One instance's history with each record's digest.
    pub(crate) fn history_with_digests(&self, name: &InstanceName) -> Result<Vec<(Record, Digest)>, LogError> {
        self.inner.store.scan(&keys::record_prefix(name)).map(|r| decode_pair_with_digest(r?)).collect()
    }

    /// The spec the instance was created with.
    pub fn spec(&self, name: &InstanceName) -> Result<Option<InstanceSpec>, LogError> {
        let Some(bytes) = self.inner.store.get(&keys::spec(name))? else { return Ok(None) };
        record::decode(&bytes, false).map(Some).map_err(|problem| LogError::Corrupt {
            what: "spec entry",
            instance: Some(name.to_string()),
            seq: None,
            problem,
        })
    }

    /// Every instance's token digest, as its `Created` record committed it
    /// (instances created without one are not listed), in name order.
    pub fn tokens(&self) -> Result<Vec<(InstanceName, Digest)>, LogError> {
        let corrupt = |key: &[u8], message: String| LogError::Corrupt {
            what: "token entry",
            instance: Some(String::from_utf8_lossy(&key[1..]).into_owned()),
            seq: None,
            problem: record::Corruption::Decode { message },
        };
        self.inner
            .store
            .scan(&[keys::TOKEN])
            .map(|pair| {
                let (key, value) = pair?;
                let name = std::str::from_utf8(&key[1..])
                    .ok()
                    .and_then(|n| InstanceName::new(n).ok())
                    .ok_or_else(|| corrupt(&key, "not an instance name".into()))?;
                let digest: [u8; 32] =
                    value.as_slice().try_into().map_err(|_| corrupt(&key, format!("{} bytes, not 32", value.len())))?;
                Ok((name, Digest(digest)))
            })
            .collect()
    }

    /// One record.
    pub fn record(&self, name: &InstanceName, seq: u64) -> Result<Option<Record>, LogError> {
        let key = keys::record(name, seq);
        self.inner.store.get(&key)?.map(|v| decode_pair((key, v))).transpose()
    }

    /// Every instance name with records, in name order, without reading history.
    pub fn names(&self) -> Result<Vec<InstanceName>, LogError> {
        let store = self.store();
        let mut names = Vec::new();
        let mut from = vec![keys::RECORD];
        while let Some((key, _)) = store.first_from(&from, &[keys::RECORD])? {
            let Some((name, _)) = keys::parse_record(&key) else {
                return Err(corrupt_key("record key", &key));
            };
            from = keys::after_records_of(name);
            let name = std::str::from_utf8(name).ok().and_then(|n| InstanceName::new(n).ok());
            names.push(name.ok_or_else(|| corrupt_key("record key", &key))?);
        }
        Ok(names)
    }

    /// Every instance's latest-state entry, in name order.
    pub fn latest_all(&self) -> Result<Vec<(InstanceName, Latest)>, LogError> {
        self.inner
            .store
            .scan(&[keys::LATEST])
            .map(|r| {
                let (key, value) = r?;
                let name = std::str::from_utf8(&key[1..]).ok().and_then(|n| InstanceName::new(n).ok());
                let name = name.ok_or_else(|| corrupt_key("latest-state key", &key))?;
                let latest = record::decode(&value, false).map_err(|problem| LogError::Corrupt {
                    what: "latest-state entry",
                    instance: Some(name.to_string()),
                    seq: None,
                    problem,
                })?;
                Ok((name, latest))
            })
            .collect()
    }

    /// Every record in global order.
    pub fn records(&self) -> impl Iterator<Item = Result<Record, LogError>> + '_ {
        self.inner.store.scan(&[keys::GLOBAL]).map(move |r| {
            let (key, target) = r?;
            let mut record_key = vec![keys::RECORD];
            record_key.extend_from_slice(&target);
            let value = self.inner.store.get(&record_key)?.ok_or_else(|| LogError::Corrupt {
                what: "index entry",
                instance: None,
                seq: keys::parse_global(&key),
                problem: Corruption::Decode { message: "points to a missing record".into() },
            })?;
            decode_pair((record_key, value))
        })
    }

    /// Up to `limit` records with a global sequence number above `after`, in
    /// global order, and only those a completed commit covers
    /// ([`Log::committed`]): what a reader outside the process may be told
    /// (an SSE stream, a webhook), because a crash cannot take it back.
    pub fn records_after(&self, after: u64, limit: usize) -> Result<Vec<Record>, LogError> {
        let committed = self.committed();
        let store = self.store();
        let mut out = Vec::new();
        let mut from = after.checked_add(1);
        // The global index a page at a time (one range read), then each record.
        while let Some(next) = from.filter(|g| *g <= committed && out.len() < limit) {
            let page = store.page_from(&keys::global(next), &[keys::GLOBAL], limit - out.len())?;
            if page.is_empty() {
                break;
            }
            from = None;
            for (key, target) in page {
                let Some(global) = keys::parse_global(&key) else { return Err(corrupt_key("index key", &key)) };
                if global > committed {
                    return Ok(out);
                }
                let mut record_key = vec![keys::RECORD];
                record_key.extend_from_slice(&target);
                // Compaction may delete the record between the two reads: skip it, as if read a moment later.
                if let Some(value) = store.get(&record_key)? {
                    out.push(decode_pair((record_key, value))?);
                }
                from = global.checked_add(1);
            }
        }
        Ok(out)
    }

    /// Keeps every record with a global sequence number of `from` or more out
    /// of compaction's reach until [`Log::release_hold`]: a reader that has not
    /// yet passed them on (a webhook outbox) holds them. The hold is in memory;
    /// a holder sets it again after a restart.
    pub fn hold_from(&self, from: u64) {
        self.inner.hold.store(from, std::sync::atomic::Ordering::SeqCst);
    }

    /// Lets compaction take any record again.
    pub fn release_hold(&self) {
        self.hold_from(u64::MAX);
    }

    /// The lowest global sequence number compaction must keep (`u64::MAX`: none held).
    pub(crate) fn held_from(&self) -> u64 {
        self.inner.hold.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Reads a key of the auxiliary space: data a service keeps beside the
    /// log in the same database (webhook cursors, dead letters, tokens).
    /// Auxiliary data is not part of the chain: it is neither verified nor
    /// compacted, and is committed with the log's next commit.
    pub fn aux_get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, LogError> {
        Ok(self.store().get(&keys::aux(key))?)
    }

    /// Every auxiliary pair whose key starts with `prefix`, in key order (keys without the space's prefix).
    pub fn aux_scan(&self, prefix: &[u8]) -> Result<Vec<Pair>, LogError> {
        self.store()
            .scan(&keys::aux(prefix))
            .map(|r| r.map(|(k, v)| (k[1..].to_vec(), v)).map_err(LogError::from))
            .collect()
    }

    /// Applies auxiliary writes (`None` deletes) in one atomic batch. Refused
    /// on a log opened for reading. Durable once [`Log::sync_aux`] returns (or
    /// the next commit of an append).
    pub fn aux_apply(&self, writes: Vec<(Vec<u8>, Option<Vec<u8>>)>) -> Result<(), LogError> {
        if self.inner.access == Access::Read {
            return Err(LogError::ReadOnly);
        }
        Ok(self.store().apply(writes.into_iter().map(|(k, v)| (keys::aux(&k), v)).collect())?)
    }

    /// Bytes used on disk.
    pub fn size_on_disk(&self) -> Result<u64, LogError> {
        Ok(self.inner.store.size_on_disk()?)
    }

    /// The bytes of keys and values the log held when it was last compacted
    /// (or rewritten): what its files would need without sled's leftovers.
    /// `None` before either ran.
    pub fn live_bytes(&self) -> Result<Option<u64>, LogError> {
        self.meta_number(keys::META_LIVE, "live bytes")
    }

    /// A big-endian `u64` kept under a metadata key (`None`: never written).
    pub(crate) fn meta_number(&self, key: &[u8], what: &'static str) -> Result<Option<u64>, LogError> {
        let Some(bytes) = self.store().get(key)? else { return Ok(None) };
        let n: [u8; 8] = bytes.as_slice().try_into().map_err(|_| LogError::Corrupt {
            what,
            instance: None,
            seq: None,
            problem: record::Corruption::Decode { message: format!("{} bytes, not 8", bytes.len()) },
        })?;
        Ok(Some(u64::from_be_bytes(n)))
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        if self.access == Access::Write {
            // Best effort: make everything appended durable, head included, before the files close.
            let w = self.writer.get_mut().unwrap_or_else(std::sync::PoisonError::into_inner);
            let tip = w.failed.is_none().then_some((w.last_global, w.last_link));
            self.commits.close(tip);
        }
    }
}

/// What opening decides about an existing store before the log is built.
struct Opening<'a> {
    store: &'a dyn Store,
    path: &'a Path,
    config: &'a LogConfig,
    access: Access,
}

impl Opening<'_> {
    /// The log's id and what its head says.
    fn identify(&self) -> Result<(Option<LogId>, HeadCheck), LogError> {
        let marker = self.store.get(keys::META_FORMAT)?;
        let marker = marker.map(|m| String::from_utf8_lossy(&m).into_owned());
        match marker.as_deref() {
            None => self.create(),
            Some(keys::FORMAT_V1) if self.access == Access::Read => Ok((None, HeadCheck::Legacy)),
            Some(keys::FORMAT_V1) => self.upgrade(),
            Some(keys::FORMAT) => self.check(),
            Some(found) if found.starts_with(keys::FORMAT_FAMILY) => Err(LogError::NewerFormat {
                path: self.path.to_path_buf(),
                found: found.to_owned(),
                expected: keys::FORMAT.to_owned(),
            }),
            Some(found) => {
                Err(LogError::Foreign { path: self.path.to_path_buf(), detail: format!("format marker {found:?}") })
            }
        }
    }

    /// A new log: the head first (so that a crash in between leaves a head
    /// at global 0, adopted on the next open), then the marker and the id.
    fn create(&self) -> Result<(Option<LogId>, HeadCheck), LogError> {
        if let Some(Ok((key, _))) = self.store.scan(&[]).next() {
            let detail = format!("unmarked data, first key {:?}", String::from_utf8_lossy(&key));
            return Err(LogError::Foreign { path: self.path.to_path_buf(), detail });
        }
        if self.access == Access::Read {
            return Err(LogError::NotALog { path: self.path.to_path_buf() });
        }
        let (id, check) = match self.store.read_head()? {
            HeadRead::Found(h) if h.global == 0 => (h.log_id, HeadCheck::Intact { global: 0 }),
            // Every record is gone; the head remains.
            HeadRead::Found(h) | HeadRead::JournalMissing { head: h, .. } => {
                let check = HeadCheck::Lost { head: h.global, tip: 0 };
                self.accept(&check, h.log_id, h.global, h.link)?;
                (h.log_id, check)
            }
            HeadRead::Missing | HeadRead::NotKept | HeadRead::Unreadable { .. } => {
                let id = LogId::fresh();
                self.store.reset_head(&Head { log_id: id, global: 0, link: Digest::ZERO })?;
                (id, HeadCheck::Intact { global: 0 })
            }
        };
        // A new log's records are decided by this build: its rules are in force from the first.
        let rules = RulesVersion::CURRENT.0.to_be_bytes().to_vec();
        self.store.apply(vec![(keys::numbered(keys::RULES, 1), Some(rules))])?;
        self.mark(id)?;
        Ok((Some(id), check))
    }

    fn mark(&self, id: LogId) -> Result<(), LogError> {
        self.store.apply(vec![
            (keys::META_FORMAT.to_vec(), Some(keys::FORMAT.as_bytes().to_vec())),
            (keys::META_LOG_ID.to_vec(), Some(id.0.to_vec())),
        ])?;
        self.store.flush()?;
        self.store.sync()?;
        Ok(())
    }

    /// A format-v1 log opened by a writer: it gets an id and a head at its
    /// tip; its old records stay unchained, new ones chain to them.
    fn upgrade(&self) -> Result<(Option<LogId>, HeadCheck), LogError> {
        let id = LogId::fresh();
        let (global, link) = integrity::tip(self.store)?;
        self.store.flush()?;
        self.store.sync()?;
        self.store.reset_head(&Head { log_id: id, global, link })?;
        self.mark(id)?;
        tracing::info!(path = %self.path.display(), "log upgraded to format v2 (chained records and a head)");
        Ok((Some(id), HeadCheck::Intact { global }))
    }

    /// An existing log of this format: compare its head with its tip.
    fn check(&self) -> Result<(Option<LogId>, HeadCheck), LogError> {
        let id = match self.store.get(keys::META_LOG_ID)? {
            Some(v) if v.len() == 16 => LogId(v.try_into().unwrap_or_default()),
            _ => {
                return Err(LogError::Corrupt {
                    what: "log id",
                    instance: None,
                    seq: None,
                    problem: Corruption::Decode { message: "missing or not 16 bytes".into() },
                });
            }
        };
        let (global, link) = integrity::tip(self.store)?;
        let mut check = integrity::check(self.store, self.store.read_head()?, id, (global, link))?;
        if !check.is_damage()
            && let Some(replayed) = self.store.replayed().filter(|r| r.damaged)
        {
            check = HeadCheck::JournalDamaged { detail: replayed.stopped.unwrap_or_default() };
        }
        if self.access == Access::Read {
            return Ok((Some(id), check));
        }
        match &check {
            HeadCheck::Lost { head, .. } => {
                let head_link = match self.store.read_head()? {
                    HeadRead::Found(h) | HeadRead::JournalMissing { head: h, .. } => h.link,
                    _ => link,
                };
                self.accept(&check, id, *head, head_link)?;
            }
            damage if damage.is_damage() => self.accept(&check, id, global, link)?,
            // The records past the head were never acknowledged, but they are here: cover them.
            HeadCheck::Behind { .. } => commit_to(self.store, Some(id), (global, link))?,
            _ => {}
        }
        Ok((Some(id), check))
    }

    /// Refuses the damage, or (with `accept_loss`) records it, moves the tip
    /// past every global sequence number the head knew (none is reused) and
    /// resets the head there.
    fn accept(&self, check: &HeadCheck, id: LogId, head: u64, head_link: Digest) -> Result<(), LogError> {
        if !self.config.accept_loss {
            return Err(LogError::Damaged { path: self.path.to_path_buf(), check: Box::new(check.clone()) });
        }
        let (tip, tip_link) = integrity::tip(self.store)?;
        let (after, link) = if head > tip { (head, head_link) } else { (tip, tip_link) };
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        let loss = AcceptedLoss {
            at: Timestamp(u64::try_from(now.as_millis()).unwrap_or(u64::MAX)),
            check: check.clone(),
            resumed_after: after,
        };
        let index = match self.store.last(&[keys::LOSS])? {
            Some((key, _)) => keys::parse_numbered(keys::LOSS, &key).unwrap_or(0).saturating_add(1),
            None => 1,
        };
        self.store.apply(vec![
            (keys::numbered(keys::LOSS, index), Some(record::encode(&loss))),
            (keys::META_TIP.to_vec(), Some(integrity::tip_value(after, link))),
        ])?;
        self.store.flush()?;
        self.store.sync()?;
        self.store.reset_head(&Head { log_id: id, global: after, link })?;
        tracing::warn!(path = %self.path.display(), %check, resumed_after = after, "a loss was accepted and recorded in the log");
        if let Some(kept) = self.store.keep_unreplayed() {
            tracing::warn!(
                path = %self.path.display(),
                kept = %kept.display(),
                "the journal files holding what could not be replayed are moved there, not deleted"
            );
        }
        Ok(())
    }
}

/// [`Log::kept`] for the log directory `dir`, without opening it (a reader
/// that looks at a copy, which leaves them out, asks the original).
pub fn kept_in(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir.join(store::KEPT)) else { return Vec::new() };
    let mut kept: Vec<PathBuf> = entries.flatten().map(|e| e.path()).filter(|p| p.is_dir()).collect();
    kept.sort();
    kept
}

fn corrupt_key(what: &'static str, key: &[u8]) -> LogError {
    LogError::Corrupt {
        what,
        instance: None,
        seq: None,
        problem: Corruption::Decode { message: format!("malformed key {:?}", String::from_utf8_lossy(key)) },
    }
}

/// Decodes a record and checks it against its key.
pub(crate) fn decode_pair(pair: (Vec<u8>, Vec<u8>)) -> Result<Record, LogError> {
    decode_pair_with_digest(pair).map(|(r, _)| r)
}

/// Decodes a record, checks it against its key, and computes its digest.
pub(crate) fn decode_pair_with_digest((key, value): (Vec<u8>, Vec<u8>)) -> Result<(Record, Digest), LogError> {
    let (name, seq) = keys::parse_record(&key).ok_or_else(|| corrupt_key("record key", &key))?;
    let name = String::from_utf8_lossy(name).into_owned();
    let corrupt = |problem| LogError::Corrupt { what: "record", instance: Some(name.clone()), seq: Some(seq), problem };
    let (record, digest) = record::decode_record_with_digest(&value).map_err(corrupt)?;
    if record.instance.as_str() != name || record.seq != seq {
        return Err(corrupt(Corruption::KeyMismatch {
            expected: format!("{name}#{seq}"),
            found: format!("{}#{}", record.instance, record.seq),
        }));
    }
    Ok((record, digest))
}

/// Every instance's newest record: its sequence number and link.
fn load_tips(store: &dyn Store) -> Result<HashMap<InstanceName, Tip>, LogError> {
    let mut tips = HashMap::new();
    let mut from = vec![keys::RECORD];
    while let Some((key, _)) = store.first_from(&from, &[keys::RECORD])? {
        let (name_bytes, _) = keys::parse_record(&key).ok_or_else(|| corrupt_key("record key", &key))?;
        let name_bytes = name_bytes.to_vec();
        let name = std::str::from_utf8(&name_bytes).ok().and_then(|n| InstanceName::new(n).ok());
        let name = name.ok_or_else(|| corrupt_key("record key", &key))?;
        let (last, value) = store.last(&keys::record_prefix(&name))?.ok_or_else(|| corrupt_key("record key", &key))?;
        let (_, seq) = keys::parse_record(&last).ok_or_else(|| corrupt_key("record key", &last))?;
        // An undecodable last record still gets a link (its bytes'): recovery reports it, not opening.
        tips.insert(name, Tip { seq, link: integrity::link_of(&value) });
        from = keys::after_records_of(&name_bytes);
    }
    Ok(tips)
}

/// The errors opening an existing log gives before touching anything: no
/// such path, not a directory, unreadable (with the system's reason), no log.
fn check_existing(path: &Path) -> Result<(), LogError> {
    match std::fs::metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(LogError::NotALog { path: path.into() }),
        Err(source) => return Err(LogError::Io { op: "read", path: path.into(), source }),
        Ok(m) if !m.is_dir() => return Err(LogError::NotADirectory { path: path.into() }),
        Ok(_) => {}
    }
    std::fs::read_dir(path).map_err(|source| LogError::Io { op: "read", path: path.into(), source })?;
    if rewrite::interrupted(path) {
        return Ok(()); // a rewrite cut short after sled's old files went: opening finishes it
    }
    for file in ["db", "conf"] {
        let p = path.join(file);
        match std::fs::metadata(&p) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(LogError::NotALog { path: path.into() }),
            Err(source) => return Err(LogError::Io { op: "read", path: p, source }),
            Ok(m) if !m.is_file() => return Err(LogError::NotALog { path: path.into() }),
            Ok(_) => {
                std::fs::File::open(&p).map_err(|source| LogError::Io { op: "read", path: p.clone(), source })?;
            }
        }
    }
    Ok(())
}

fn check_not_foreign(db: &sled::Db, path: &Path) -> Result<(), LogError> {
    let ours = |name: &[u8]| name == store::TREE || name == b"__sled__default";
    let looked = crate::contain::quietly(|| (db.tree_names().into_iter().find(|n| !ours(n)), db.is_empty()));
    let (other, empty) = looked.map_err(|message| LogError::Open {
        path: path.to_path_buf(),
        source: StoreError::Panicked { op: "listing trees", message },
    })?;
    if let Some(other) = other {
        let detail = format!("it has a tree named {:?}", String::from_utf8_lossy(&other));
        return Err(LogError::Foreign { path: path.to_path_buf(), detail });
    }
    if !empty {
        return Err(LogError::Foreign { path: path.to_path_buf(), detail: "its default tree holds data".into() });
    }
    Ok(())
}

/// Opens sled at `path`. sled releases its lock a moment after the last
/// handle drops (its I/O threads finish first), so a log reopened in the same
/// process may find it still held: retried for a bounded time before it is
/// called in use. sled 0.34 can panic on damaged files (upstream #1527,
/// #1533): contained, as a typed error.
fn open_db(sled_config: &sled::Config, path: &Path) -> Result<sled::Db, LogError> {
    let deadline = std::time::Instant::now() + LOCK_WAIT;
    loop {
        match crate::contain::quietly(|| sled_config.open()) {
            Ok(Ok(db)) => return Ok(db),
            Ok(Err(sled::Error::Io(e))) if e.to_string().contains("could not acquire lock") => {
                if std::time::Instant::now() >= deadline {
                    let holder = store::lock_holder(&path.join("db"));
                    return Err(LogError::InUse { path: path.to_path_buf(), holder });
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            Ok(Err(e)) => {
                return Err(LogError::Open { path: path.to_path_buf(), source: StoreError::from_sled(e, path) });
            }
            Err(message) => {
                let source = StoreError::Panicked { op: "opening", message };
                return Err(LogError::Open { path: path.to_path_buf(), source });
            }
        }
    }
}
