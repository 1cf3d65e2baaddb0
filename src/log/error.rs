//! The log's errors: each says what failed, where, for which instance and sequence.

use std::path::PathBuf;

use super::record::Corruption;
use super::store::StoreError;
use crate::machine::InstanceName;

/// An error of the event log.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LogError {
    /// The path exists and is not a directory.
    #[error("{path}: not a directory (a log is a directory)")]
    NotADirectory {
        /// The path given.
        path: PathBuf,
    },
    /// Opening an existing log, but there is none at the path.
    #[error(
        "{path}: no instance-lifecycle log here (expected a directory written by an engine or `lifecycle simulate`)"
    )]
    NotALog {
        /// The path given.
        path: PathBuf,
    },
    /// A sled database that another program wrote.
    #[error("{path}: a sled database that is not an instance-lifecycle log ({detail})")]
    Foreign {
        /// The path given.
        path: PathBuf,
        /// What gave it away.
        detail: String,
    },
    /// A log written by a newer release.
    #[error("{path}: log format {found:?} is newer than this build reads ({expected:?}); upgrade instance-lifecycle")]
    NewerFormat {
        /// The path given.
        path: PathBuf,
        /// The format marker found.
        found: String,
        /// The marker this build writes.
        expected: String,
    },
    /// Another process (a running engine) holds the log.
    #[error("{path}: the log is in use by another process (a running engine?)")]
    InUse {
        /// The path given.
        path: PathBuf,
    },
    /// The store failed.
    #[error("log store: {0}")]
    Store(#[from] StoreError),
    /// The database could not be opened (sled failed or panicked on its files).
    #[error("{path}: cannot open the database: {detail}")]
    Open {
        /// The path given.
        path: PathBuf,
        /// sled's message.
        detail: String,
    },
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
    /// A stored record or cache entry cannot be decoded.
    #[error("corrupt {what} of instance {instance:?} seq {seq:?}: {problem}")]
    Corrupt {
        /// `record`, `latest-state entry` or `index entry`.
        what: &'static str,
        /// The instance, when the key names one.
        instance: Option<String>,
        /// The sequence number, when the key has one.
        seq: Option<u64>,
        /// What is wrong.
        problem: Corruption,
    },
    /// An append expected another sequence number: a second writer or a lost update.
    #[error("instance {instance}: append expected seq {expected}, but the log is at {actual}")]
    SequenceConflict {
        /// The instance.
        instance: InstanceName,
        /// The sequence the writer meant to write.
        expected: u64,
        /// The sequence the log would assign.
        actual: u64,
    },
    /// The next sequence number would not fit in a `u64` (only a damaged or
    /// hostile log gets there).
    #[error("no sequence number left for {what}; the log holds the largest one")]
    Exhausted {
        /// `instance <name>` or `the global order`.
        what: String,
    },
    /// An earlier flush failed; the log accepts no more appends.
    #[error("the log failed earlier and accepts no appends: {0}")]
    Failed(String),
}
