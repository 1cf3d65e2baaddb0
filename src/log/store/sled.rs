//! [`SledStore`]: the real store, sled's one tree plus the journal and
//! the head file beside it.
//!
//! sled 0.34 can panic or return internal debug text on damaged files: every
//! call into it is contained (no panic crosses this module, and nothing is
//! printed for one) and its errors become plain [`StoreError`]s.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use super::error::StoreError;
use super::files::KEPT;
use super::head::{self, Head, HeadFile, HeadRead, LogId};
use super::journal::{self, Journal, Replayed, Write};
use super::kv::{Pair, Store};
use crate::contain::quietly;
use crate::log::keys;

/// The sled-backed store: one tree, so every batch is atomic (`apply_batch`).
/// With a journal (the durable modes), every batch is also a journal frame,
/// and `flush`/`sync` write and sync the journal instead of sled's files
/// (see `journal.rs`).
pub struct SledStore {
    db: sled::Db,
    tree: sled::Tree,
    dir: PathBuf,
    /// What `sync` covers, opened once: a commit should cost syncs, not opens.
    synced: Mutex<Synced>,
    head: Mutex<Option<HeadFile>>,
    journal: Option<Journal>,
    /// With a journal: the newest head a commit made durable (in a commit
    /// frame), or opening found in the journal. The head file moves up to
    /// it at each checkpoint; until then the journal holds it.
    committed: Mutex<Option<Head>>,
    /// The journal file number the head file names (written with it): a
    /// file numbered at least this must exist. 0 until a checkpoint starts
    /// a file, and after the checkpoint of a clean close.
    journal_from: std::sync::atomic::AtomicU64,
    replayed: Replayed,
    /// One checkpoint at a time; and, once a loss was accepted over a replay
    /// that stopped short, where the journal files found at open go instead
    /// of being deleted ([`Store::keep_unreplayed`]).
    checkpointing: Mutex<Option<PathBuf>>,
    /// Journal files numbered below this were there when the store opened
    /// (what its replay read); later ones were written by this process.
    found_below: u64,
    /// Without a journal (`Buffered`): the number of the next batch applied
    /// key by key, held across the batch so batches go in one at a time.
    /// The same numbers as the journal's JSNs (`mjournal` holds the last
    /// one sled has), so a log may move between the modes.
    unjournaled: Mutex<u64>,
    /// Set when a batch failed part-way through being applied key by key:
    /// sled's memory holds part of it, so nothing more is applied in this
    /// process (opening the log again completes the batch, see `apply_by_key`).
    broken: std::sync::OnceLock<String>,
}

/// The name of the one tree the log uses.
pub const TREE: &[u8] = b"instance-lifecycle/log";

/// Runs a sled call, containing a panic and mapping its error.
fn sled_call<T>(op: &'static str, dir: &Path, f: impl FnOnce() -> sled::Result<T>) -> Result<T, StoreError> {
    match quietly(f) {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(StoreError::from_sled(e, &dir.join("db"))),
        Err(message) => Err(StoreError::Panicked { op, message }),
    }
}

impl SledStore {
    /// Wraps an opened sled database: first applies the journal frames sled
    /// does not hold, then, given a file size for it, journals every batch from now on.
    pub(crate) fn new(db: sled::Db, dir: &Path, journal_file_max: Option<u64>) -> Result<Self, StoreError> {
        let tree = sled_call("opening the log's tree", dir, || db.open_tree(TREE))?;
        let mut held = match sled_call("reading", dir, || tree.get(keys::META_JOURNAL))? {
            Some(v) => v.as_ref().try_into().map(u64::from_be_bytes).map_err(|_| StoreError::Sled {
                detail: format!("the journal position is {} bytes, not 8", v.len()),
            })?,
            None => 0,
        };
        // A batch applied key by key that sled holds in part (or whole, short
        // of its `mjournal`): completed from its copy, in one atomic batch.
        let mut completed = None;
        if let Some(marker) = sled_call("reading", dir, || tree.get(keys::META_BATCH))? {
            let frame = journal::decode_frame(&marker).map_err(|why| StoreError::Sled {
                detail: format!("the copy of the batch being applied is damaged: {why}"),
            })?;
            if frame.jsn > held {
                sled_call("completing a batch", dir, || tree.apply_batch(batch_of(frame.writes, Some(frame.jsn))))?;
                tracing::info!(dir = %dir.display(), jsn = frame.jsn, "a batch the process was applying when it stopped was completed");
                held = frame.jsn;
                completed = Some(frame.jsn);
            }
        }
        let id = log_id(&tree, dir)?;
        let replay = journal::replay(dir, held, id, |jsn, writes| {
            sled_call("replaying the journal", dir, || tree.apply_batch(batch_of(writes, Some(jsn))))
        });
        let (mut replayed, resume) = replay.map_err(Self::io("read", &dir.join(journal::DIR)))??;
        replayed.completed = completed;
        if replayed.applied > 0 || replayed.stopped.is_some() {
            let stopped = replayed.stopped.as_deref().unwrap_or("");
            if replayed.damaged {
                tracing::warn!(dir = %dir.display(), applied = replayed.applied, stopped, "journal replay stopped at damage");
            } else {
                tracing::info!(dir = %dir.display(), applied = replayed.applied, stopped, "journal replayed");
            }
        }
        Ok(Self {
            db,
            tree,
            dir: dir.to_path_buf(),
            synced: Mutex::new(Synced::default()),
            head: Mutex::new(None),
            journal: journal_file_max.map(|max| Journal::new(dir, resume, max)),
            journal_from: std::sync::atomic::AtomicU64::new(0),
            committed: Mutex::new(id.zip(replayed.journal_head).map(|(id, (global, link))| Head {
                log_id: LogId(id),
                global,
                link,
            })),
            replayed,
            checkpointing: Mutex::new(None),
            found_below: resume.number,
            unjournaled: Mutex::new(resume.next_jsn),
            broken: std::sync::OnceLock::new(),
        })
    }

    fn io<'p>(op: &'static str, path: &'p Path) -> impl FnOnce(std::io::Error) -> StoreError + 'p {
        move |source| StoreError::Io { op, path: path.to_path_buf(), source }
    }

    /// fdatasync of `db`; fsync of `conf` once (sled writes it only when it
    /// creates the database); fsync of each blob file once (sled writes a blob
    /// once); fsync of a directory only when its entries changed since its
    /// last sync. A clean fsync still costs ~100 µs here: syncing what did not
    /// change would double the price of a commit.
    fn sync_files(&self) -> Result<(), StoreError> {
        let mut synced = self.synced.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let db = self.dir.join("db");
        if synced.db.is_none() {
            synced.db = Some(File::open(&db).map_err(Self::io("open", &db))?);
            let conf = self.dir.join("conf");
            match File::open(&conf) {
                Ok(f) => f.sync_all().map_err(Self::io("fsync", &conf))?,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(source) => return Err(StoreError::Io { op: "open", path: conf, source }),
            }
        }
        if let Some(f) = &synced.db {
            f.sync_data().map_err(Self::io("fdatasync", &db))?;
        }
        for dir in [self.dir.join("blobs"), self.dir.clone()] {
            let names = match std::fs::read_dir(&dir) {
                Ok(entries) => {
                    let mut names: Vec<_> = entries.flatten().map(|e| e.file_name()).collect();
                    names.sort();
                    names
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(source) => return Err(StoreError::Io { op: "read", path: dir, source }),
            };
            if synced.listings.get(&dir) == Some(&names) {
                continue;
            }
            if dir.ends_with("blobs") {
                let known = synced.listings.get(&dir).cloned().unwrap_or_default();
                for name in names.iter().filter(|n| !known.contains(n)) {
                    let path = dir.join(name);
                    File::open(&path).and_then(|f| f.sync_all()).map_err(Self::io("fsync", &path))?;
                }
            }
            File::open(&dir).and_then(|f| f.sync_all()).map_err(Self::io("fsync", &dir))?;
            synced.listings.insert(dir, names);
        }
        Ok(())
    }
}

/// What [`SledStore::sync_files`] has synced.
#[derive(Default)]
struct Synced {
    db: Option<File>,
    listings: std::collections::HashMap<PathBuf, Vec<std::ffi::OsString>>,
}

impl Store for SledStore {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        sled_call("reading", &self.dir, || self.tree.get(key)).map(|v| v.map(|v| v.to_vec()))
    }

    fn apply(&self, writes: Vec<Write>) -> Result<(), StoreError> {
        self.apply_journaled(writes, false)
    }

    fn append(&self, writes: Vec<Write>) -> Result<(), StoreError> {
        self.apply_journaled(writes, true)
    }

    fn scan(&self, prefix: &[u8]) -> Box<dyn Iterator<Item = Result<Pair, StoreError>> + Send + '_> {
        let dir = &self.dir;
        let mut inner = match sled_call("scanning", dir, || Ok(self.tree.scan_prefix(prefix))) {
            Ok(iter) => Some(iter),
            Err(e) => return Box::new(std::iter::once(Err(e))),
        };
        // A failed or panicking step ends the scan after reporting it.
        Box::new(std::iter::from_fn(move || {
            let iter = inner.as_mut()?;
            let item = match quietly(|| iter.next()) {
                Ok(None) => None,
                Ok(Some(Ok((k, v)))) => Some(Ok((k.to_vec(), v.to_vec()))),
                Ok(Some(Err(e))) => Some(Err(StoreError::from_sled(e, &dir.join("db")))),
                Err(message) => Some(Err(StoreError::Panicked { op: "scanning", message })),
            };
            if !matches!(item, Some(Ok(_))) {
                inner = None;
            }
            item
        }))
    }

    fn last(&self, prefix: &[u8]) -> Result<Option<Pair>, StoreError> {
        sled_call("reading", &self.dir, || self.tree.scan_prefix(prefix).next_back().transpose())
            .map(|p| p.map(|(k, v)| (k.to_vec(), v.to_vec())))
    }

    fn first_from(&self, from: &[u8], prefix: &[u8]) -> Result<Option<Pair>, StoreError> {
        match sled_call("reading", &self.dir, || self.tree.range(from..).next().transpose())? {
            Some((k, v)) if k.starts_with(prefix) => Ok(Some((k.to_vec(), v.to_vec()))),
            _ => Ok(None),
        }
    }

    fn page_from(&self, from: &[u8], prefix: &[u8], limit: usize) -> Result<Vec<Pair>, StoreError> {
        sled_call("reading", &self.dir, || {
            self.tree
                .range(from..)
                .take_while(|r| r.as_ref().map_or(true, |(k, _)| k.starts_with(prefix)))
                .take(limit)
                .map(|r| r.map(|(k, v)| (k.to_vec(), v.to_vec())))
                .collect()
        })
    }

    /// With a journal, writes its pending frames and syncs them (a write to
    /// the journal is never left unsynced: see `journal.rs`), with a
    /// checkpoint when the file is due for one; without, sled's `flush`.
    fn flush(&self) -> Result<(), StoreError> {
        match &self.journal {
            Some(_) => self.commit_journal(None),
            None => self.flush_sled(),
        }
    }

    /// With a journal, nothing more (`flush` synced); without, `fsync` of
    /// sled's files (sled's `flush` is `pwrite` + `sync_file_range` on
    /// Linux, not fsync: after it, data survives a process crash but not a
    /// power loss).
    fn sync(&self) -> Result<(), StoreError> {
        match &self.journal {
            Some(_) => Ok(()),
            None => self.sync_files(),
        }
    }

    /// With a journal: the frames and a commit frame naming `head`, one
    /// write and one `fdatasync`; the head file moves at the next
    /// checkpoint. Without: sled's flush (and sync), then the head file.
    fn commit(&self, head: &Head, sync: bool) -> Result<(), StoreError> {
        if self.journal.is_none() {
            self.flush_sled()?;
            if sync {
                self.sync_files()?;
            }
            return self.put_head(head, false, sync);
        }
        self.commit_journal(Some(head))
    }

    /// sled flushed and synced, the head file moved up; then the journal
    /// files they cover are deleted (without a journal: every file a replay left).
    fn checkpoint(&self) -> Result<(), StoreError> {
        self.checkpoint_then(false)
    }

    fn close(&self) -> Result<(), StoreError> {
        self.checkpoint_then(true)
    }

    fn keep_unreplayed(&self) -> Option<PathBuf> {
        self.replayed.stopped.as_ref()?;
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        let to = self.dir.join(KEPT).join(format!("journal-{}", now.as_millis()));
        *self.checkpointing.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(to.clone());
        Some(to)
    }

    fn replayed(&self) -> Option<Replayed> {
        Some(self.replayed.clone())
    }

    fn size_on_disk(&self) -> Result<u64, StoreError> {
        let sled = sled_call("measuring", &self.dir, || self.db.size_on_disk())?;
        Ok(sled + journal::size(&self.dir.join(journal::DIR)))
    }

    /// The head file, or the newest commit in the journal when that is
    /// newer (the journal is the head between checkpoints).
    fn read_head(&self) -> Result<HeadRead, StoreError> {
        let (file, from) = head::read_with_journal(&self.dir).map_err(Self::io("read", &self.dir.join(head::FILE)))?;
        if let (HeadRead::Found(head), true) = (&file, from > 0) {
            let jdir = self.dir.join(journal::DIR);
            let files = journal::files(&jdir).map_err(Self::io("read", &jdir))?;
            if files.last().is_none_or(|(n, _)| *n < from) {
                return Ok(HeadRead::JournalMissing { head: *head, from });
            }
        }
        let committed = *self.committed.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        Ok(match (file, committed) {
            (HeadRead::Found(h), Some(c)) if c.log_id == h.log_id && c.global > h.global => HeadRead::Found(c),
            (file, _) => file,
        })
    }

    fn write_head(&self, head: &Head, sync: bool) -> Result<(), StoreError> {
        self.put_head(head, false, sync)
    }

    fn reset_head(&self, head: &Head) -> Result<(), StoreError> {
        self.put_head(head, true, true)?;
        if self.journal.is_some() {
            *self.committed.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(*head);
        }
        Ok(())
    }
}

/// The log's id as sled holds it (`None` before the log is marked).
fn log_id(tree: &sled::Tree, dir: &Path) -> Result<Option<[u8; 16]>, StoreError> {
    let v = sled_call("reading", dir, || tree.get(keys::META_LOG_ID))?;
    Ok(v.and_then(|v| v.as_ref().try_into().ok()))
}

impl From<journal::Foreign> for StoreError {
    fn from(f: journal::Foreign) -> Self {
        Self::ForeignJournal { file: f.file, found: LogId(f.found).to_string(), ours: LogId(f.ours).to_string() }
    }
}

/// A sled batch of `writes`, with the JSN of the journal frame it is.
fn batch_of(writes: Vec<Write>, jsn: Option<u64>) -> sled::Batch {
    let mut batch = sled::Batch::default();
    for (k, v) in writes {
        match v {
            Some(v) => batch.insert(k, v),
            None => batch.remove(k),
        }
    }
    if let Some(jsn) = jsn {
        batch.insert(keys::META_JOURNAL, &jsn.to_be_bytes());
    }
    batch
}

impl SledStore {
    /// [`Store::apply`] (`by_key` false) and [`Store::append`] (true).
    fn apply_journaled(&self, writes: Vec<Write>, by_key: bool) -> Result<(), StoreError> {
        let removes = writes.iter().any(|(_, v)| v.is_none());
        let Some(journal) = &self.journal else {
            // Without a journal (`Buffered`) batches still go in one at a
            // time and numbered, so that a batch sled's background flush
            // caught half-way is completed from its copy (`mbatch`) and no
            // later batch is ever undone by that: sled keeps a prefix of its
            // writes, and this lock makes their order the batches' order.
            let mut next = self.unjournaled.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            if let Some(why) = self.broken.get() {
                return Err(StoreError::Sled { detail: why.clone() });
            }
            let jsn = *next;
            if !by_key || removes {
                sled_call("writing", &self.dir, || self.tree.apply_batch(batch_of(writes, Some(jsn))))?;
            } else {
                let mut frame = Vec::new();
                journal::encode_frame(jsn, 0, &writes, &mut frame);
                self.apply_by_key(jsn, frame, writes)?;
            }
            *next = jsn.saturating_add(1);
            return Ok(());
        };
        // Under the journal's lock: frames are in the order sled applies them.
        let mut pending = journal.pending();
        if let Some(why) = self.broken.get() {
            return Err(StoreError::Sled { detail: why.clone() });
        }
        let (jsn, before, crc) = pending.frame(&writes);
        let result = if !by_key || removes {
            sled_call("writing", &self.dir, || self.tree.apply_batch(batch_of(writes, Some(jsn))))
        } else {
            let frame = pending.buf[before..].to_vec();
            self.apply_by_key(jsn, frame, writes)
        };
        match result {
            Ok(()) => pending.keep(jsn, crc),
            Err(_) => pending.drop_from(before),
        }
        result
    }

    /// Applies a batch without removals key by key. sled's `apply_batch`
    /// writes out and `sync_file_range`s a buffer of its files for every
    /// batch (measured: 5x the CPU of the same keys inserted one by one;
    /// `Buffered` appended ~1.7x faster once it stopped using it), and
    /// sled's files need no durability of their own per batch: with a
    /// journal they get it at checkpoints, without one (`Buffered`) from
    /// sled's periodic flush. What `apply_batch` gave is kept another way: sled
    /// recovers a prefix of its writes, so the batch's frame goes in first
    /// (`mbatch`) and its JSN last (`mjournal`), and opening completes a
    /// batch held in part. Readers in this process may see the keys appear
    /// one by one, in the order given (the log writes a record before the
    /// index entries that point at it).
    fn apply_by_key(&self, jsn: u64, frame: Vec<u8>, writes: Vec<Write>) -> Result<(), StoreError> {
        let result = sled_call("writing", &self.dir, || {
            self.tree.insert(keys::META_BATCH, frame)?;
            for (key, value) in writes {
                if let Some(value) = value {
                    self.tree.insert(key, value)?;
                }
            }
            self.tree.insert(keys::META_JOURNAL, &jsn.to_be_bytes())?;
            Ok(())
        });
        if let Err(e) = &result {
            let _ = self.broken.set(format!(
                "a batch failed part-way ({e}); nothing more is written in this process, and opening the log again completes the batch"
            ));
        }
        result
    }

    /// The log's id, for a new journal file's header (read when a file is
    /// created: the log is marked before its first frame is written out).
    fn log_id(&self) -> Option<[u8; 16]> {
        log_id(&self.tree, &self.dir).ok().flatten()
    }

    /// A checkpoint: sled's files made durable, the head file moved up to
    /// the newest commit, then the journal files they cover deleted. When
    /// `closing`, the head names no journal file (none is needed to read
    /// what sled's files now hold); otherwise it names the file the log goes on in.
    fn checkpoint_then(&self, closing: bool) -> Result<(), StoreError> {
        let mut keep = self.checkpointing.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let jdir = self.dir.join(journal::DIR);
        // The newest commit, read before the rotation: its frames are in the
        // files the rotation ends, so sled's flush below makes them durable.
        let committed = *self.committed.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let below = match &self.journal {
            Some(j) => j.rotate(|| self.log_id()).map_err(Self::io("write", &jdir))?,
            None => u64::MAX,
        };
        self.flush_sled()?;
        self.sync_files()?;
        // The head file takes over from the commit frames before the files
        // holding them go, naming the file the log goes on in (none when closing).
        if let Some(j) = &self.journal {
            let from = if closing { 0 } else { j.start_file(|| self.log_id()).map_err(Self::io("write", &jdir))? };
            self.journal_from.store(from, std::sync::atomic::Ordering::SeqCst);
            self.move_head(committed)?;
        }
        if let Some(to) = &*keep {
            // The files replay read, moved; kept in mind until all are (a
            // failure leaves the rest for the next checkpoint to move).
            let found = below.min(self.found_below);
            journal::keep_before(&jdir, found, to).map_err(Self::io("move old files of", &jdir))?;
            *keep = None;
        }
        journal::remove_before(&jdir, below).map_err(Self::io("remove old files of", &jdir))
    }

    /// Writes the head file at the newer of `committed` and the head it
    /// holds, with the journal number of now (creating the file if need be).
    fn move_head(&self, committed: Option<Head>) -> Result<(), StoreError> {
        let path = self.dir.join(head::FILE);
        let from = self.journal_from.load(std::sync::atomic::Ordering::SeqCst);
        let mut slot = self.head.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if slot.is_none() && path.exists() {
            *slot = Some(HeadFile::open(&self.dir).map_err(Self::io("open", &path))?);
        }
        let last = slot.as_ref().and_then(HeadFile::last);
        let head = match (committed, last) {
            (Some(c), Some(l)) => Some(if c.global >= l.global { c } else { l }),
            (c, l) => c.or(l),
        };
        let Some(head) = head else { return Ok(()) };
        let written = match slot.as_mut() {
            Some(file) => file.write(&head, from, true),
            None => HeadFile::create(&self.dir, &head, from).map(|f| *slot = Some(f)),
        };
        written.map_err(Self::io("write", &path))
    }

    /// A journal commit (`head`: with a commit frame naming it), then the
    /// checkpoint the journal's size calls for.
    fn commit_journal(&self, head: Option<&Head>) -> Result<(), StoreError> {
        let Some(j) = &self.journal else { return Ok(()) };
        let tip = head.map(|h| (h.global, h.link));
        let due = j.commit(tip, || self.log_id()).map_err(Self::io("write", &self.dir.join(journal::DIR)))?;
        if let Some(head) = head {
            let mut committed = self.committed.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            if committed.is_none_or(|c| c.global < head.global) {
                *committed = Some(*head);
            }
        }
        if due {
            self.checkpoint()?;
        }
        Ok(())
    }

    fn flush_sled(&self) -> Result<(), StoreError> {
        sled_call("flushing", &self.dir, || self.db.flush()).map(drop)
    }

    /// Writes the head, creating its file for a new log.
    fn put_head(&self, head: &Head, reset: bool, sync: bool) -> Result<(), StoreError> {
        let path = self.dir.join(head::FILE);
        let io = Self::io("write", &path);
        let mut slot = self.head.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let from = self.journal_from.load(std::sync::atomic::Ordering::SeqCst);
        let write = |f: &mut HeadFile| if reset { f.reset(head, from) } else { f.write(head, from, sync) };
        let result = match slot.as_mut() {
            Some(file) => write(file),
            None if !path.exists() => HeadFile::create(&self.dir, head, from).map(|f| *slot = Some(f)),
            None => HeadFile::open(&self.dir).and_then(|mut f| {
                write(&mut f)?;
                *slot = Some(f);
                Ok(())
            }),
        };
        result.map_err(io)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open(dir: &Path) -> SledStore {
        SledStore::new(sled_db(dir), dir, Some(1 << 20)).expect("store")
    }

    /// sled at `dir`, as the durable modes open it. sled releases its lock a
    /// moment after the last handle drops (its I/O threads finish first), so
    /// a reopen right after a drop retries for a while, as `Log::open` does.
    fn sled_db(dir: &Path) -> sled::Db {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            match sled::Config::new().path(dir).flush_every_ms(None).open() {
                Err(sled::Error::Io(e))
                    if e.to_string().contains("could not acquire lock") && std::time::Instant::now() < deadline =>
                {
                    std::thread::sleep(std::time::Duration::from_millis(5));
                }
                other => return other.expect("sled"),
            }
        }
    }

    fn get(store: &SledStore, key: &[u8]) -> Option<Vec<u8>> {
        store.get(key).expect("get")
    }

    fn held(store: &SledStore) -> u64 {
        get(store, keys::META_JOURNAL).map_or(0, |v| u64::from_be_bytes(v.try_into().expect("8 bytes")))
    }

    /// What a process stopped in the middle of `apply_by_key` leaves in
    /// sled (a prefix of its writes: the batch's copy and its first key) is
    /// completed by the next open, from the copy, and the JSNs go on past it.
    #[test]
    fn a_batch_held_in_part_is_completed_when_the_store_opens() {
        let dir = tempfile::tempdir().expect("dir");
        let store = open(dir.path());
        store.append(vec![(b"k1".to_vec(), Some(b"one".to_vec()))]).expect("append");
        assert_eq!(held(&store), 1);
        // Batch 2, stopped after its first key.
        let writes = vec![(b"k2".to_vec(), Some(b"two".to_vec())), (b"k3".to_vec(), Some(b"three".to_vec()))];
        let mut frame = Vec::new();
        journal::encode_frame(2, 0, &writes, &mut frame);
        store.tree.insert(keys::META_BATCH, frame).expect("copy");
        store.tree.insert(b"k2", b"two").expect("first key");
        store.db.flush().expect("flush");
        drop(store);
        // The journal holds batch 1 only (batch 2 was never committed).
        let store = open(dir.path());
        assert_eq!(store.replayed().and_then(|r| r.completed), Some(2));
        assert_eq!(get(&store, b"k3").as_deref(), Some(&b"three"[..]), "the rest of the batch");
        assert_eq!(get(&store, b"k1").as_deref(), Some(&b"one"[..]));
        assert_eq!(held(&store), 2);
        store.append(vec![(b"k4".to_vec(), Some(b"four".to_vec()))]).expect("append");
        assert_eq!(held(&store), 3, "the next batch goes on past the completed one");
    }

    /// The copy of a batch already applied whole is never applied again:
    /// a later batch (here one that removes, which goes in as one sled batch
    /// and leaves the copy behind) is not undone by an older copy.
    #[test]
    fn a_copy_of_a_batch_sled_holds_whole_is_left_alone() {
        let dir = tempfile::tempdir().expect("dir");
        let store = open(dir.path());
        store.append(vec![(b"k".to_vec(), Some(b"old".to_vec()))]).expect("apply by key");
        assert!(get(&store, keys::META_BATCH).is_some(), "the copy of the batch is there");
        store.apply(vec![(b"k".to_vec(), None), (b"j".to_vec(), Some(b"new".to_vec()))]).expect("apply with a removal");
        assert_eq!(held(&store), 2);
        store.db.flush().expect("flush");
        drop(store);
        let store = open(dir.path());
        assert_eq!(store.replayed().and_then(|r| r.completed), None);
        assert_eq!(get(&store, b"k"), None, "the removal stands");
        assert_eq!(get(&store, b"j").as_deref(), Some(&b"new"[..]));
    }

    /// Without a journal (`Buffered`), appends go in key by key too and a
    /// batch held in part is completed the same way; a later batch that
    /// removes is numbered, so the copy of an earlier one never undoes it.
    #[test]
    fn without_a_journal_batches_are_numbered_and_completed_the_same_way() {
        let dir = tempfile::tempdir().expect("dir");
        let open = |dir: &Path| SledStore::new(sled_db(dir), dir, None).expect("store");
        let store = open(dir.path());
        store.append(vec![(b"k1".to_vec(), Some(b"one".to_vec()))]).expect("append");
        assert!(get(&store, keys::META_BATCH).is_some(), "applied key by key, with its copy");
        assert_eq!(held(&store), 1);
        store.apply(vec![(b"k1".to_vec(), None)]).expect("a removal, as one sled batch");
        assert_eq!(held(&store), 2, "numbered too");
        // Batch 3, stopped after its first key.
        let writes = vec![(b"k2".to_vec(), Some(b"two".to_vec())), (b"k3".to_vec(), Some(b"three".to_vec()))];
        let mut frame = Vec::new();
        journal::encode_frame(3, 0, &writes, &mut frame);
        store.tree.insert(keys::META_BATCH, frame).expect("copy");
        store.tree.insert(b"k2", b"two").expect("first key");
        store.db.flush().expect("flush");
        drop(store);
        let store = open(dir.path());
        assert_eq!(store.replayed().and_then(|r| r.completed), Some(3));
        assert_eq!(get(&store, b"k3").as_deref(), Some(&b"three"[..]), "the rest of the batch");
        assert_eq!(get(&store, b"k1"), None, "the removal stands");
        store.append(vec![(b"k4".to_vec(), Some(b"four".to_vec()))]).expect("append");
        assert_eq!(held(&store), 4, "the next batch goes on past the completed one");
        store.db.flush().expect("flush");
        drop(store);
        let store = open(dir.path());
        assert_eq!(store.replayed().and_then(|r| r.completed), None, "a whole batch is not applied again");
        assert_eq!(get(&store, b"k4").as_deref(), Some(&b"four"[..]));
    }

    /// A damaged copy is an error that says so, not a guess.
    #[test]
    fn a_damaged_copy_of_a_batch_refuses_with_a_typed_error() {
        let dir = tempfile::tempdir().expect("dir");
        let store = open(dir.path());
        let mut frame = Vec::new();
        journal::encode_frame(1, 0, &[(b"k".to_vec(), Some(b"v".to_vec()))], &mut frame);
        let last = frame.len() - 1;
        frame[last] ^= 1;
        store.tree.insert(keys::META_BATCH, frame).expect("copy");
        store.db.flush().expect("flush");
        drop(store);
        let db = sled_db(dir.path());
        match SledStore::new(db, dir.path(), Some(1 << 20)) {
            Err(StoreError::Sled { detail }) => assert!(detail.contains("damaged"), "{detail}"),
            Err(e) => panic!("another error: {e}"),
            Ok(_) => panic!("a damaged copy was taken"),
        }
    }
}
