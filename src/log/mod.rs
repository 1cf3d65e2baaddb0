//! The persisted event log: one record per transition, the truth about every
//! instance (R8) and the way back after a crash (R11).
//!
//! Write path of [`Log::append`], in order:
//! 1. Under the writer lock: check the sequence number the caller expects
//!    (a second writer or a lost update is [`LogError::SequenceConflict`]),
//!    assign the next global sequence number.
//! 2. Apply one atomic batch: the record, its global-index entry, and the
//!    instance's latest-state entry. Release the lock.
//! 3. Wait for durability as the [`Durability`] mode says.
//! 4. Only then may the caller apply the transition in memory. If any step
//!    fails, the caller gets the error and the transition does not happen.
//!
//! Durability modes, and exactly what an acknowledged append survives (sled
//! 0.34's `flush` is `pwrite` + `sync_file_range` on Linux, not an fsync):
//!
//! | mode | an append returns after | process crash | power loss |
//! |---|---|---|---|
//! | [`Durability::Buffered`] | the batch is in sled's memory | loses ≤ `flush_every` | loses ≤ `flush_every` |
//! | [`Durability::GroupCommit`] (default) | a shared flush + fsync, started at most `group_commit_window` later, covering every append before it | loses nothing acknowledged | loses nothing acknowledged (if the disk honours fsync) |
//! | [`Durability::Strict`] | a flush + fsync started at once for it | loses nothing acknowledged | loses nothing acknowledged |
//!
//! The default is `GroupCommit`: a delete the host was told succeeded must not
//! come back after a power cut, and sharing the fsync keeps a busy fleet fast.

mod error;
mod keys;
pub mod record;
mod recovery;
mod retention;
pub mod store;
mod verify;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use error::LogError;
pub use record::{Corruption, Event, InstanceSpec, Latest, Record, RecordV1};
pub use recovery::{RecoveredInstance, Recovery, RecoveryMode, RecoveryOptions, resume_after_restart};
pub use retention::{CompactionReport, Retention};
pub use store::{MemoryStore, SledStore, Store, StoreError};
pub use verify::{Finding, Report};

use crate::machine::{Instance, InstanceName, Policy, Timestamp};

/// How long opening waits for a lock that another handle is releasing.
const LOCK_WAIT: Duration = Duration::from_secs(1);

/// How durable an acknowledged append is. See the module docs for the table.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Durability {
    /// Return at once; sled's background flush writes every `flush_every`.
    Buffered,
    /// Wait for a flush + fsync shared with every append of the window.
    #[default]
    GroupCommit,
    /// Wait for a flush + fsync started at once.
    Strict,
}

/// Log configuration. Every bound has a reason.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogConfig {
    /// Durability of acknowledged appends.
    pub durability: Durability,
    /// How long `GroupCommit` waits to gather appends before flushing: 2 ms
    /// adds little latency to a transition and amortises one fsync over many.
    pub group_commit_window: Duration,
    /// sled's background flush interval (what `Buffered` may lose).
    pub flush_every: Duration,
    /// sled's page cache: 64 MiB holds the hot tail of a large fleet's log;
    /// sled's own default (1 GiB) is far more than a lifecycle log needs.
    pub cache_capacity: u64,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            durability: Durability::GroupCommit,
            group_commit_window: Duration::from_millis(2),
            flush_every: Duration::from_millis(500),
            cache_capacity: 64 * 1024 * 1024,
        }
    }
}

/// An acknowledged append.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Appended {
    /// The record's per-instance sequence number.
    pub seq: u64,
    /// The record's global sequence number.
    pub global: u64,
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
    writer: Mutex<Writer>,
    flusher: Option<Flusher>,
    _temp: Option<tempfile::TempDir>,
}

struct Writer {
    /// The last global sequence number written (0 for an empty log).
    last_global: u64,
    /// The last sequence number of every instance with records.
    seqs: HashMap<InstanceName, u64>,
    /// Set when a flush failed: no append is accepted after that.
    failed: Option<String>,
}

impl Log {
    /// Opens the log in directory `path`, creating it if it does not exist.
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
        Self::open_sled(path, config, None)
    }

    /// Opens an existing log; a directory without one is [`LogError::NotALog`].
    pub fn open_existing(path: impl AsRef<Path>, config: LogConfig) -> Result<Self, LogError> {
        let path = path.as_ref();
        check_existing(path)?;
        Self::open_sled(path, config, None)
    }

    /// Opens a copy of the log at `path` in a temporary directory, so that
    /// reading never writes to the original (sled writes on open). Returns
    /// whether another process held the original at the time of the copy.
    pub fn open_copy(path: impl AsRef<Path>) -> Result<(Self, bool), LogError> {
        let path = path.as_ref();
        // Validate the original first, for the same clear errors as `open_existing`.
        check_existing(path)?;
        let in_use = is_locked(&path.join("db"))?;
        let temp = temp_dir()?;
        copy_dir(path, temp.path())?;
        let config = LogConfig { durability: Durability::Buffered, ..LogConfig::default() };
        let copy = temp.path().to_path_buf();
        let log = Self::open_sled(&copy, config, Some(temp))?;
        Ok((log, in_use))
    }

    /// A log in a temporary directory, removed when the last clone is dropped.
    pub fn temporary(config: LogConfig) -> Result<Self, LogError> {
        let temp = temp_dir()?;
        let path = temp.path().to_path_buf();
        Self::open_sled(&path, config, Some(temp))
    }

    /// A log in memory (for deterministic simulation: no background thread).
    pub fn in_memory() -> Result<Self, LogError> {
        Self::with_store(
            Arc::new(MemoryStore::new()),
            LogConfig { durability: Durability::Buffered, ..LogConfig::default() },
        )
    }

    /// A log on any store.
    pub fn with_store(store: Arc<dyn Store>, config: LogConfig) -> Result<Self, LogError> {
        Self::init(store, None, config, None)
    }

    fn open_sled(path: &Path, config: LogConfig, temp: Option<tempfile::TempDir>) -> Result<Self, LogError> {
        let flush_ms = u64::try_from(config.flush_every.as_millis()).unwrap_or(u64::MAX).max(1);
        let sled_config =
            sled::Config::new().path(path).cache_capacity(config.cache_capacity).flush_every_ms(Some(flush_ms));
        // sled releases its lock a moment after the last handle drops (its I/O
        // threads finish first), so a log reopened in the same process may find
        // it still held: retry for a bounded time before calling it in use.
        let deadline = std::time::Instant::now() + LOCK_WAIT;
        let db = loop {
            // sled 0.34 can panic on damaged files (upstream #1527, #1533): contain it.
            let opened = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| sled_config.open()));
            match opened {
                Ok(Ok(db)) => break db,
                Ok(Err(sled::Error::Io(e))) if e.to_string().contains("could not acquire lock") => {
                    if std::time::Instant::now() >= deadline {
                        return Err(LogError::InUse { path: path.to_path_buf() });
                    }
                    std::thread::sleep(Duration::from_millis(5));
                }
                Ok(Err(e)) => return Err(LogError::Open { path: path.to_path_buf(), detail: e.to_string() }),
                Err(panic) => {
                    return Err(LogError::Open { path: path.to_path_buf(), detail: crate::panic_message(&panic) });
                }
            }
        };
        check_not_foreign(&db, path)?;
        let store = SledStore::new(db, path).map_err(LogError::Store)?;
        Self::init(Arc::new(store), Some(path.to_path_buf()), config, temp)
    }

    fn init(
        store: Arc<dyn Store>,
        path: Option<PathBuf>,
        config: LogConfig,
        temp: Option<tempfile::TempDir>,
    ) -> Result<Self, LogError> {
        let shown = path.clone().unwrap_or_else(|| PathBuf::from("<memory>"));
        match store.get(keys::META_FORMAT)? {
            Some(found) if found == keys::FORMAT.as_bytes() => {}
            Some(found) => {
                let found = String::from_utf8_lossy(&found).into_owned();
                return Err(if found.starts_with("instance-lifecycle log") {
                    LogError::NewerFormat { path: shown, found, expected: keys::FORMAT.to_owned() }
                } else {
                    LogError::Foreign { path: shown, detail: format!("format marker {found:?}") }
                });
            }
            None => {
                if let Some(Ok((key, _))) = store.scan(&[]).next() {
                    let detail = format!("unmarked data, first key {:?}", String::from_utf8_lossy(&key));
                    return Err(LogError::Foreign { path: shown, detail });
                }
                store.apply(vec![(keys::META_FORMAT.to_vec(), Some(keys::FORMAT.as_bytes().to_vec()))])?;
                store.flush()?;
            }
        }
        let writer =
            Writer { last_global: last_global(store.as_ref())?, seqs: last_seqs(store.as_ref())?, failed: None };
        let flusher = match config.durability {
            Durability::Buffered => None,
            Durability::GroupCommit => Some(Flusher::start(store.clone(), config.group_commit_window)),
            Durability::Strict => Some(Flusher::start(store.clone(), Duration::ZERO)),
        };
        Ok(Self { inner: Arc::new(Inner { store, path, config, writer: Mutex::new(writer), flusher, _temp: temp }) })
    }

    /// The directory of the log (`None` in memory).
    pub fn path(&self) -> Option<&Path> {
        self.inner.path.as_deref()
    }

    /// The configuration.
    pub fn config(&self) -> &LogConfig {
        &self.inner.config
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
    /// `expected_seq` is the sequence number the caller means to write.
    pub fn append(
        &self,
        name: &InstanceName,
        expected_seq: u64,
        at: Timestamp,
        event: Event,
        to: &Instance,
    ) -> Result<Appended, LogError> {
        let appended = self.write(name, expected_seq, at, event, to)?;
        if let Some(f) = &self.inner.flusher {
            f.wait_blocking(appended.global).map_err(|e| self.fail(e))?;
        }
        Ok(appended)
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
        let appended = self.write(name, expected_seq, at, event, to)?;
        if let Some(f) = &self.inner.flusher {
            f.wait_async(appended.global).await.map_err(|e| self.fail(e))?;
        }
        Ok(appended)
    }

    fn fail(&self, message: String) -> LogError {
        self.writer().failed.get_or_insert_with(|| message.clone());
        LogError::Failed(message)
    }

    /// Steps 1 and 2 of the write path.
    fn write(
        &self,
        name: &InstanceName,
        expected_seq: u64,
        at: Timestamp,
        event: Event,
        to: &Instance,
    ) -> Result<Appended, LogError> {
        let mut w = self.writer();
        if let Some(message) = &w.failed {
            return Err(LogError::Failed(message.clone()));
        }
        // A log written elsewhere may hold any number: running out is an error, not a wrap.
        let actual = w.seqs.get(name).copied().unwrap_or(0).checked_add(1);
        let actual = actual.ok_or_else(|| LogError::Exhausted { what: format!("instance {name}") })?;
        if expected_seq != actual {
            return Err(LogError::SequenceConflict { instance: name.clone(), expected: expected_seq, actual });
        }
        let global =
            w.last_global.checked_add(1).ok_or_else(|| LogError::Exhausted { what: "the global order".into() })?;
        let spec = match &event {
            Event::Created { spec } => Some(record::encode(spec)),
            Event::Transition { .. } | Event::Snapshot { .. } => None,
        };
        let record = Record::V1(RecordV1 { instance: name.clone(), seq: actual, global, at, event, to: to.clone() });
        let latest = Latest { seq: actual, global, at, instance: to.clone() };
        let mut index = name.as_str().as_bytes().to_vec();
        index.push(0);
        index.extend_from_slice(&actual.to_be_bytes());
        let mut writes = vec![
            (keys::record(name, actual), Some(record::encode_record(&record))),
            (keys::global(global), Some(index)),
            (keys::latest(name), Some(record::encode(&latest))),
        ];
        if let Some(spec) = spec {
            writes.push((keys::spec(name), Some(spec)));
        }
        self.inner.store.apply(writes)?;
        w.last_global = global;
        w.seqs.insert(name.clone(), actual);
        if let Some(f) = &self.inner.flusher {
            f.request(global);
        }
        Ok(Appended { seq: actual, global })
    }

    /// The next sequence number `name` will get (1 for an unknown name).
    pub fn next_seq(&self, name: &InstanceName) -> u64 {
        self.writer().seqs.get(name).copied().unwrap_or(0).saturating_add(1)
    }

    /// Records the policy the engine runs with, for verification and replay.
    pub fn set_policy(&self, policy: &Policy) -> Result<(), LogError> {
        let json = serde_json::to_vec(policy).unwrap_or_default();
        self.inner.store.apply(vec![(keys::META_POLICY.to_vec(), Some(json))])?;
        Ok(())
    }

    /// The policy recorded by the last engine, if any.
    pub fn policy(&self) -> Result<Option<Policy>, LogError> {
        let Some(bytes) = self.inner.store.get(keys::META_POLICY)? else { return Ok(None) };
        serde_json::from_slice(&bytes).map(Some).map_err(|e| LogError::Corrupt {
            what: "policy entry",
            instance: None,
            seq: None,
            problem: Corruption::Decode { message: e.to_string() },
        })
    }

    /// Flushes and fsyncs everything appended so far.
    pub fn sync(&self) -> Result<(), LogError> {
        self.inner.store.flush()?;
        self.inner.store.sync()?;
        Ok(())
    }

    /// One instance's history, in sequence order.
    pub fn history(&self, name: &InstanceName) -> Result<Vec<RecordV1>, LogError> {
        self.inner.store.scan(&keys::record_prefix(name)).map(|r| decode_pair(r?)).collect()
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

    /// One record.
    pub fn record(&self, name: &InstanceName, seq: u64) -> Result<Option<RecordV1>, LogError> {
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
    pub fn records(&self) -> impl Iterator<Item = Result<RecordV1, LogError>> + '_ {
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

    /// Bytes used on disk.
    pub fn size_on_disk(&self) -> Result<u64, LogError> {
        Ok(self.inner.store.size_on_disk()?)
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        if let Some(f) = self.flusher.take() {
            f.stop();
        }
        // Best effort: make everything appended durable before the files close.
        let _ = self.store.flush();
    }
}

/// The errors `open_existing` and `open_copy` give before touching anything.
fn check_existing(path: &Path) -> Result<(), LogError> {
    if !path.exists() {
        return Err(LogError::NotALog { path: path.to_path_buf() });
    }
    if !path.is_dir() {
        return Err(LogError::NotADirectory { path: path.to_path_buf() });
    }
    if !path.join("db").is_file() || !path.join("conf").is_file() {
        return Err(LogError::NotALog { path: path.to_path_buf() });
    }
    Ok(())
}

fn temp_dir() -> Result<tempfile::TempDir, LogError> {
    tempfile::tempdir().map_err(|source| LogError::Io { op: "create temp dir", path: std::env::temp_dir(), source })
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
pub(crate) fn decode_pair((key, value): (Vec<u8>, Vec<u8>)) -> Result<RecordV1, LogError> {
    let (name, seq) = keys::parse_record(&key).ok_or_else(|| corrupt_key("record key", &key))?;
    let name = String::from_utf8_lossy(name).into_owned();
    let corrupt = |problem| LogError::Corrupt { what: "record", instance: Some(name.clone()), seq: Some(seq), problem };
    let Record::V1(record) = record::decode_record(&value).map_err(corrupt)?;
    if record.instance.as_str() != name || record.seq != seq {
        return Err(corrupt(Corruption::KeyMismatch {
            expected: format!("{name}#{seq}"),
            found: format!("{}#{}", record.instance, record.seq),
        }));
    }
    Ok(record)
}

fn last_global(store: &dyn Store) -> Result<u64, LogError> {
    match store.last(&[keys::GLOBAL])? {
        None => Ok(0),
        Some((key, _)) => keys::parse_global(&key).ok_or_else(|| corrupt_key("index key", &key)),
    }
}

fn last_seqs(store: &dyn Store) -> Result<HashMap<InstanceName, u64>, LogError> {
    let mut seqs = HashMap::new();
    let mut from = vec![keys::RECORD];
    while let Some((key, _)) = store.first_from(&from, &[keys::RECORD])? {
        let (name_bytes, _) = keys::parse_record(&key).ok_or_else(|| corrupt_key("record key", &key))?;
        let name_bytes = name_bytes.to_vec();
        let name = std::str::from_utf8(&name_bytes).ok().and_then(|n| InstanceName::new(n).ok());
        let name = name.ok_or_else(|| corrupt_key("record key", &key))?;
        let (last, _) = store.last(&keys::record_prefix(&name))?.ok_or_else(|| corrupt_key("record key", &key))?;
        let (_, seq) = keys::parse_record(&last).ok_or_else(|| corrupt_key("record key", &last))?;
        seqs.insert(name, seq);
        from = keys::after_records_of(&name_bytes);
    }
    Ok(seqs)
}

fn check_not_foreign(db: &sled::Db, path: &Path) -> Result<(), LogError> {
    let ours = |name: &[u8]| name == store::TREE || name == b"__sled__default";
    if let Some(other) = db.tree_names().into_iter().find(|n| !ours(n)) {
        let detail = format!("it has a tree named {:?}", String::from_utf8_lossy(&other));
        return Err(LogError::Foreign { path: path.to_path_buf(), detail });
    }
    if !db.is_empty() {
        return Err(LogError::Foreign { path: path.to_path_buf(), detail: "its default tree holds data".into() });
    }
    Ok(())
}

/// Whether another process holds sled's lock on `db` (sled takes an exclusive `flock`).
fn is_locked(db: &Path) -> Result<bool, LogError> {
    let file = std::fs::File::open(db).map_err(|source| LogError::Io { op: "open", path: db.to_path_buf(), source })?;
    match file.try_lock() {
        Ok(()) => Ok(false),
        Err(std::fs::TryLockError::WouldBlock) => Ok(true),
        Err(std::fs::TryLockError::Error(source)) => Err(LogError::Io { op: "lock", path: db.to_path_buf(), source }),
    }
}

fn copy_dir(from: &Path, to: &Path) -> Result<(), LogError> {
    fn io<'p>(op: &'static str, path: &'p Path) -> impl FnOnce(std::io::Error) -> LogError + 'p {
        move |source| LogError::Io { op, path: path.to_path_buf(), source }
    }
    for entry in std::fs::read_dir(from).map_err(io("read", from))? {
        let entry = entry.map_err(io("read", from))?;
        let target = to.join(entry.file_name());
        let kind = entry.file_type().map_err(io("stat", &entry.path()))?;
        if kind.is_dir() {
            std::fs::create_dir_all(&target).map_err(io("create", &target))?;
            copy_dir(&entry.path(), &target)?;
        } else if kind.is_file() {
            std::fs::copy(entry.path(), &target).map_err(io("copy", &entry.path()))?;
        }
    }
    Ok(())
}

/// The group-commit flusher: one thread that flushes + fsyncs on request,
/// covering every append made before the flush started.
struct Flusher {
    shared: Arc<FlushShared>,
    thread: Option<JoinHandle<()>>,
}

struct FlushShared {
    state: Mutex<FlushState>,
    wake: Condvar,
    durable: tokio::sync::watch::Sender<u64>,
}

#[derive(Default)]
struct FlushState {
    requested: u64,
    durable: u64,
    error: Option<String>,
    stop: bool,
}

impl Flusher {
    fn start(store: Arc<dyn Store>, window: Duration) -> Self {
        let (durable, _) = tokio::sync::watch::channel(0);
        let shared = Arc::new(FlushShared { state: Mutex::new(FlushState::default()), wake: Condvar::new(), durable });
        let worker = shared.clone();
        let thread = std::thread::Builder::new()
            .name("lifecycle-log-flush".into())
            .spawn(move || worker.run(store.as_ref(), window))
            .ok();
        Self { shared, thread }
    }

    fn request(&self, global: u64) {
        let mut s = self.shared.lock();
        s.requested = s.requested.max(global);
        self.shared.wake.notify_all();
    }

    fn wait_blocking(&self, global: u64) -> Result<(), String> {
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
            s = self.shared.wake.wait(s).unwrap_or_else(std::sync::PoisonError::into_inner);
        }
    }

    async fn wait_async(&self, global: u64) -> Result<(), String> {
        if self.thread.is_none() {
            return Err("the flusher thread could not be started".into());
        }
        let mut rx = self.shared.durable.subscribe();
        // A failed flush publishes u64::MAX to wake everyone; the error is checked below.
        let reached = rx.wait_for(|&d| d >= global).await.is_ok();
        match self.shared.lock().error.clone() {
            Some(e) => Err(e),
            None if reached => Ok(()),
            None => Err("the log is closing".into()),
        }
    }

    fn stop(mut self) {
        self.shared.lock().stop = true;
        self.shared.wake.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl FlushShared {
    fn lock(&self) -> MutexGuard<'_, FlushState> {
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn run(&self, store: &dyn Store, window: Duration) {
        loop {
            {
                let mut s = self.lock();
                while s.requested <= s.durable && !s.stop {
                    s = self.wake.wait(s).unwrap_or_else(std::sync::PoisonError::into_inner);
                }
                if s.requested <= s.durable && s.stop {
                    break;
                }
            }
            if !window.is_zero() {
                std::thread::sleep(window);
            }
            // Everything requested before the flush starts is covered by it.
            let target = self.lock().requested;
            let result = store.flush().and_then(|()| store.sync());
            let mut s = self.lock();
            match result {
                Ok(()) => {
                    s.durable = s.durable.max(target);
                    let _ = self.durable.send(s.durable);
                }
                Err(e) => {
                    s.error = Some(format!("flush failed: {e}"));
                    let _ = self.durable.send(u64::MAX);
                    self.wake.notify_all();
                    break;
                }
            }
            self.wake.notify_all();
        }
        self.lock().stop = true;
        self.wake.notify_all();
    }
}
