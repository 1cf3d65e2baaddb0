//! Storage behind a small trait: ordered keys, atomic batches, flush and sync.
//! [`SledStore`] is the real one; [`MemoryStore`] is for deterministic
//! simulation (sled runs its own flusher thread, which virtual time cannot control).

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

/// An error of the storage layer.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// sled reported an error.
    #[error("sled: {0}")]
    Sled(#[from] sled::Error),
    /// A file operation failed.
    #[error("{op} {path}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// On which path.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The in-memory store was poisoned by a panic in another thread.
    #[error("memory store poisoned by a panic")]
    Poisoned,
}

/// One write of an atomic batch: a value to insert, or `None` to remove the key.
pub type Write = (Vec<u8>, Option<Vec<u8>>);

/// A key-value pair read from a store.
pub type Pair = (Vec<u8>, Vec<u8>);

/// Ordered key-value storage with atomic batches.
pub trait Store: Send + Sync + 'static {
    /// Reads one key.
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError>;
    /// Applies every write or none.
    fn apply(&self, writes: Vec<Write>) -> Result<(), StoreError>;
    /// Every pair whose key starts with `prefix`, in key order.
    fn scan(&self, prefix: &[u8]) -> Box<dyn Iterator<Item = Result<Pair, StoreError>> + Send + '_>;
    /// The last pair whose key starts with `prefix`.
    fn last(&self, prefix: &[u8]) -> Result<Option<Pair>, StoreError>;
    /// The first pair at or after `from` whose key starts with `prefix`.
    fn first_from(&self, from: &[u8], prefix: &[u8]) -> Result<Option<Pair>, StoreError>;
    /// Makes applied batches survive a crash of this process (written to the OS).
    fn flush(&self) -> Result<(), StoreError>;
    /// Makes flushed data survive a power loss (fsync of the files).
    fn sync(&self) -> Result<(), StoreError>;
    /// Bytes used on disk (0 for memory).
    fn size_on_disk(&self) -> Result<u64, StoreError>;
}

/// The sled-backed store: one tree, so every batch is atomic (`apply_batch`).
pub struct SledStore {
    db: sled::Db,
    tree: sled::Tree,
    dir: PathBuf,
}

/// The name of the one tree the log uses.
pub const TREE: &[u8] = b"instance-lifecycle/log";

impl SledStore {
    /// Wraps an opened sled database.
    pub(crate) fn new(db: sled::Db, dir: &Path) -> Result<Self, StoreError> {
        let tree = db.open_tree(TREE)?;
        Ok(Self { db, tree, dir: dir.to_path_buf() })
    }
}

impl Store for SledStore {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.tree.get(key)?.map(|v| v.to_vec()))
    }

    fn apply(&self, writes: Vec<Write>) -> Result<(), StoreError> {
        let mut batch = sled::Batch::default();
        for (k, v) in writes {
            match v {
                Some(v) => batch.insert(k, v),
                None => batch.remove(k),
            }
        }
        Ok(self.tree.apply_batch(batch)?)
    }

    fn scan(&self, prefix: &[u8]) -> Box<dyn Iterator<Item = Result<Pair, StoreError>> + Send + '_> {
        Box::new(self.tree.scan_prefix(prefix).map(|r| r.map(|(k, v)| (k.to_vec(), v.to_vec())).map_err(Into::into)))
    }

    fn last(&self, prefix: &[u8]) -> Result<Option<Pair>, StoreError> {
        Ok(self.tree.scan_prefix(prefix).next_back().transpose()?.map(|(k, v)| (k.to_vec(), v.to_vec())))
    }

    fn first_from(&self, from: &[u8], prefix: &[u8]) -> Result<Option<Pair>, StoreError> {
        match self.tree.range(from..).next().transpose()? {
            Some((k, v)) if k.starts_with(prefix) => Ok(Some((k.to_vec(), v.to_vec()))),
            _ => Ok(None),
        }
    }

    fn flush(&self) -> Result<(), StoreError> {
        self.db.flush()?;
        Ok(())
    }

    /// sled's `flush` is `pwrite` + `sync_file_range` on Linux, not fsync:
    /// after it, data survives a process crash but not a power loss. So we
    /// fsync the database files and the directory ourselves.
    fn sync(&self) -> Result<(), StoreError> {
        for name in ["db", "conf"] {
            let path = self.dir.join(name);
            match File::open(&path) {
                Ok(f) => f.sync_all().map_err(|source| StoreError::Io { op: "fsync", path, source })?,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(source) => return Err(StoreError::Io { op: "open", path, source }),
            }
        }
        let blobs = self.dir.join("blobs");
        if let Ok(entries) = std::fs::read_dir(&blobs) {
            for entry in entries.flatten() {
                let path = entry.path();
                let f =
                    File::open(&path).map_err(|source| StoreError::Io { op: "open", path: path.clone(), source })?;
                f.sync_all().map_err(|source| StoreError::Io { op: "fsync", path, source })?;
            }
        }
        let dir =
            File::open(&self.dir).map_err(|source| StoreError::Io { op: "open", path: self.dir.clone(), source })?;
        dir.sync_all().map_err(|source| StoreError::Io { op: "fsync", path: self.dir.clone(), source })
    }

    fn size_on_disk(&self) -> Result<u64, StoreError> {
        Ok(self.db.size_on_disk()?)
    }
}

type Map = BTreeMap<Vec<u8>, Vec<u8>>;

/// An in-memory store: a `BTreeMap` behind a mutex. Nothing survives the process.
#[derive(Default)]
pub struct MemoryStore {
    map: Mutex<Map>,
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> Result<MutexGuard<'_, Map>, StoreError> {
        self.map.lock().map_err(|_| StoreError::Poisoned)
    }

    /// Overwrites a raw key (tests use it to corrupt records).
    pub fn put_raw(&self, key: &[u8], value: &[u8]) -> Result<(), StoreError> {
        self.lock()?.insert(key.to_vec(), value.to_vec());
        Ok(())
    }
}

impl Store for MemoryStore {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.lock()?.get(key).cloned())
    }

    fn apply(&self, writes: Vec<Write>) -> Result<(), StoreError> {
        let mut map = self.lock()?;
        for (k, v) in writes {
            match v {
                Some(v) => map.insert(k, v),
                None => map.remove(&k),
            };
        }
        Ok(())
    }

    fn scan(&self, prefix: &[u8]) -> Box<dyn Iterator<Item = Result<Pair, StoreError>> + Send + '_> {
        match self.lock() {
            Ok(map) => {
                let pairs: Vec<_> = map
                    .range(prefix.to_vec()..)
                    .take_while(|(k, _)| k.starts_with(prefix))
                    .map(|(k, v)| Ok((k.clone(), v.clone())))
                    .collect();
                Box::new(pairs.into_iter())
            }
            Err(e) => Box::new(std::iter::once(Err(e))),
        }
    }

    fn last(&self, prefix: &[u8]) -> Result<Option<Pair>, StoreError> {
        let map = self.lock()?;
        Ok(map
            .range(prefix.to_vec()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .last()
            .map(|(k, v)| (k.clone(), v.clone())))
    }

    fn first_from(&self, from: &[u8], prefix: &[u8]) -> Result<Option<Pair>, StoreError> {
        let map = self.lock()?;
        Ok(map
            .range(from.to_vec()..)
            .next()
            .filter(|(k, _)| k.starts_with(prefix))
            .map(|(k, v)| (k.clone(), v.clone())))
    }

    fn flush(&self) -> Result<(), StoreError> {
        Ok(())
    }

    fn sync(&self) -> Result<(), StoreError> {
        Ok(())
    }

    fn size_on_disk(&self) -> Result<u64, StoreError> {
        Ok(0)
    }
}
