//! The durable write path: everything between a batch of key writes and an
//! acknowledged, recoverable commit — the store and its journal, the head,
//! commits and write groups, and the log's files. The rest of the log (what
//! a record is, verification, recovery, retention) reaches it only through
//! what this file exports.
//!
//! Inside, each part imports only the parts listed before it, so there is
//! no import cycle:
//!
//! | part | what it is | imports |
//! |---|---|---|
//! | `error.rs` | [`StoreError`] | — |
//! | `head.rs` | [`Head`], the head file beside sled's | — |
//! | `journal.rs` | frames, commit frames, replay ([`Replayed`]) | — |
//! | `kv.rs` | the [`Store`] trait | error, head, journal |
//! | `files.rs` | the directory: copies for reading, who holds the lock | error, head, journal |
//! | `memory.rs` | [`MemoryStore`] | error, head, journal, kv |
//! | `sled.rs` | [`SledStore`]: sled plus journal plus head | error, head, journal, kv, files |
//! | `flush.rs` | the flusher: shared commits, leaders and followers | error, head, kv |
//! | `groups.rs` | write groups of blocking appends | flush, journal |
//! | `commits.rs` | [`Durability`] and `Commits`, what the log holds | all of the above |
//!
//! Below this module sit only the log's key layout (`keys.rs`) and record
//! digests (`record.rs`), which import nothing of the log's.
//!
//! sled 0.34 can panic or return internal debug text on damaged files: every
//! call into it is contained (no panic crosses this module, and nothing is
//! printed for one) and its errors become plain [`StoreError`]s.

mod commits;
mod error;
mod files;
mod flush;
mod groups;
mod head;
mod journal;
mod kv;
mod memory;
mod sled;

pub use commits::Durability;
pub use error::StoreError;
pub use files::{lock_holder, remove_copies};
pub use head::{Head, HeadRead, LogId};
pub use journal::{LOST_LISTED, Replayed, Write};
pub use kv::{Pair, Store};
pub use memory::MemoryStore;
pub use sled::{SledStore, TREE};

pub(crate) use commits::{Commits, Pace, commit_to};
pub(crate) use error::rebase;
pub(crate) use files::{KEPT, Scratch, is_locked};
pub(crate) use groups::Covered;
pub(crate) use journal::Tip;
