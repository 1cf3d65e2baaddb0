//! The [`Store`] trait: ordered keys, atomic batches, flush and sync, and
//! the head kept beside the data.

use std::path::PathBuf;

use super::error::StoreError;
use super::head::{Head, HeadRead};
use super::journal::{Replayed, Write};

/// A key-value pair read from a store.
pub type Pair = (Vec<u8>, Vec<u8>);

/// Ordered key-value storage with atomic batches, and a head kept where a
/// rollback of the data cannot reach it.
pub trait Store: Send + Sync + 'static {
    /// Reads one key.
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError>;
    /// Applies every write or none, and readers see all of it or none.
    fn apply(&self, writes: Vec<Write>) -> Result<(), StoreError>;
    /// Applies every write or none as far as a crash goes (opening again
    /// finds all of it or none), but readers in this process may see the
    /// writes land one by one, in the order given: for a batch whose every
    /// key is written before any key that leads a reader to it (an append).
    /// Cheaper than [`Store::apply`] where the store can do it (sled, see
    /// `SledStore::apply_by_key`).
    fn append(&self, writes: Vec<Write>) -> Result<(), StoreError> {
        self.apply(writes)
    }
    /// Every pair whose key starts with `prefix`, in key order.
    fn scan(&self, prefix: &[u8]) -> Box<dyn Iterator<Item = Result<Pair, StoreError>> + Send + '_>;
    /// The last pair whose key starts with `prefix`.
    fn last(&self, prefix: &[u8]) -> Result<Option<Pair>, StoreError>;
    /// The first pair at or after `from` whose key starts with `prefix`.
    fn first_from(&self, from: &[u8], prefix: &[u8]) -> Result<Option<Pair>, StoreError>;
    /// Up to `limit` pairs at or after `from` whose keys start with
    /// `prefix`, in key order: one range read where the store can (a reader
    /// paging through the global index), `first_from` repeated where not.
    fn page_from(&self, from: &[u8], prefix: &[u8], limit: usize) -> Result<Vec<Pair>, StoreError> {
        let mut out: Vec<Pair> = Vec::new();
        let mut next = from.to_vec();
        while out.len() < limit {
            let Some(pair) = self.first_from(&next, prefix)? else { break };
            next.clone_from(&pair.0);
            next.push(0); // the first key after this one
            out.push(pair);
        }
        Ok(out)
    }
    /// Makes applied batches survive a crash of this process (written to the OS).
    fn flush(&self) -> Result<(), StoreError>;
    /// Makes flushed data survive a power loss (fsync of the files).
    fn sync(&self) -> Result<(), StoreError>;
    /// A commit: everything applied so far reaches the OS (and with `sync`
    /// the disk), and the head moves up to `head`, which covers it — never
    /// the other way round. By default `flush`, `sync`, then the head; a
    /// store with a journal does all of it with one write and one sync.
    fn commit(&self, head: &Head, sync: bool) -> Result<(), StoreError> {
        self.flush()?;
        if sync {
            self.sync()?;
        }
        self.write_head(head, sync)
    }
    /// Bytes used on disk (0 for memory).
    fn size_on_disk(&self) -> Result<u64, StoreError>;
    /// The head, as last made durable.
    fn read_head(&self) -> Result<HeadRead, StoreError> {
        Ok(HeadRead::NotKept)
    }
    /// Writes `head`, and with `sync` waits until it is on disk. Call only
    /// after the data it covers went as far (`flush`, and `sync` for a synced
    /// head): a head must never be ahead of the data. A head behind the last
    /// one written is skipped.
    fn write_head(&self, _head: &Head, _sync: bool) -> Result<(), StoreError> {
        Ok(())
    }
    /// Writes `head` durably even if it is behind the last one (accepting a loss).
    fn reset_head(&self, head: &Head) -> Result<(), StoreError> {
        self.write_head(head, true)
    }
    /// What opening found in the store's journal (`None`: it keeps none).
    fn replayed(&self) -> Option<Replayed> {
        None
    }
    /// Makes the store's own files hold everything applied (for a store
    /// with a journal: what lets the journal's older files go).
    fn checkpoint(&self) -> Result<(), StoreError> {
        self.flush()?;
        self.sync()
    }
    /// The last checkpoint of a writer that closes: the store's own files
    /// then hold everything, and nothing more is needed to read them (for a
    /// store with a journal: the head names no journal file).
    fn close(&self) -> Result<(), StoreError> {
        self.checkpoint()
    }
    /// After a loss is accepted: if opening's replay stopped before the end
    /// of the journal (damage, or a gap behind it), the journal files it
    /// found hold frames that were never applied — the records the loss is
    /// made of, or their neighbours. The next checkpoint moves those files
    /// into the returned directory (under the log's `kept/`) instead of
    /// deleting them: accepting a loss goes on without those records, it
    /// does not destroy the only bytes that hold them. `None`: nothing to keep.
    fn keep_unreplayed(&self) -> Option<PathBuf> {
        None
    }
}
