//! [`MemoryStore`]: the store of deterministic simulation (sled runs its
//! own I/O threads, which virtual time cannot control). Nothing survives the process.

use std::collections::BTreeMap;
use std::sync::{Mutex, MutexGuard};

use super::error::StoreError;
use super::head::{Head, HeadRead};
use super::journal::Write;
use super::kv::{Pair, Store};

type Map = BTreeMap<Vec<u8>, Vec<u8>>;

/// An in-memory store: a `BTreeMap` behind a mutex, and the head beside it.
/// Nothing survives the process.
#[derive(Default)]
pub struct MemoryStore {
    map: Mutex<Map>,
    head: Mutex<Option<Head>>,
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> Result<MutexGuard<'_, Map>, StoreError> {
        self.map.lock().map_err(|_| StoreError::Poisoned)
    }

    fn head_lock(&self) -> Result<MutexGuard<'_, Option<Head>>, StoreError> {
        self.head.lock().map_err(|_| StoreError::Poisoned)
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

    fn page_from(&self, from: &[u8], prefix: &[u8], limit: usize) -> Result<Vec<Pair>, StoreError> {
        let map = self.lock()?;
        Ok(map
            .range(from.to_vec()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .take(limit)
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect())
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

    fn read_head(&self) -> Result<HeadRead, StoreError> {
        Ok(self.head_lock()?.map_or(HeadRead::Missing, HeadRead::Found))
    }

    fn write_head(&self, head: &Head, _sync: bool) -> Result<(), StoreError> {
        let mut current = self.head_lock()?;
        if current.is_none_or(|c| c.global <= head.global) {
            *current = Some(*head);
        }
        Ok(())
    }

    fn reset_head(&self, head: &Head) -> Result<(), StoreError> {
        *self.head_lock()? = Some(*head);
        Ok(())
    }
}
