//! The log's errors: each says what failed, where, for which instance and sequence.

use std::path::{Path, PathBuf};

use super::integrity::HeadCheck;
use super::record::Corruption;
use super::store::{StoreError, rebase};
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
    #[error("{path}: the log is in use by {}", holder.as_deref().unwrap_or("another process (a running engine?)"))]
    InUse {
        /// The path given.
        path: PathBuf,
        /// Who holds it, when the system says (`process 1234 (lifecycle)`).
        holder: Option<String>,
    },
    /// Opening found that the log lost records or its head (see [`HeadCheck`]).
    /// A writer refuses such a log unless told to accept the loss.
    #[error(
        "{path}: {check}. Nothing was changed. `lifecycle verify {}` shows what is left; to go on from it, open the log with accept_loss (`lifecycle recover {} --accept-loss`), which records the loss in the log",
        path.display(),
        path.display()
    )]
    Damaged {
        /// The log's directory.
        path: PathBuf,
        /// What was found.
        check: Box<HeadCheck>,
    },
    /// An append to a log opened for reading (a copy for inspection).
    #[error("the log was opened for reading only")]
    ReadOnly,
    /// The store failed.
    #[error("log store: {0}")]
    Store(#[from] StoreError),
    /// The database could not be opened (sled failed or panicked on its files).
    #[error("{path}: cannot open the database: {source}")]
    Open {
        /// The path given.
        path: PathBuf,
        /// What went wrong.
        source: StoreError,
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
    /// The log of record outside this process (a cluster's stream) refused
    /// the append: this host no longer owns the instance. Nothing was
    /// appended here; the instance stops on this host.
    #[error("instance {instance}: append refused by the cluster: {reason}")]
    Fenced {
        /// The instance.
        instance: InstanceName,
        /// Why (a newer owner's takeover, a lease that ran out).
        reason: String,
    },
}

impl LogError {
    /// The same error with every path under `from` (a temporary copy) shown
    /// under `to` (the user's directory): errors name what the user gave.
    pub(crate) fn shown_as(self, from: &Path, to: &Path) -> Self {
        let r = |p: PathBuf| rebase(&p, from, to);
        match self {
            Self::NotADirectory { path } => Self::NotADirectory { path: r(path) },
            Self::NotALog { path } => Self::NotALog { path: r(path) },
            Self::Foreign { path, detail } => Self::Foreign { path: r(path), detail },
            Self::NewerFormat { path, found, expected } => Self::NewerFormat { path: r(path), found, expected },
            Self::InUse { path, holder } => Self::InUse { path: r(path), holder },
            Self::Damaged { path, check } => Self::Damaged { path: r(path), check },
            Self::Store(e) => Self::Store(e.shown_as(from, to)),
            Self::Open { path, source } => Self::Open { path: r(path), source: source.shown_as(from, to) },
            Self::Io { op, path, source } => Self::Io { op, path: r(path), source },
            other => other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_about_a_copy_name_the_original() {
        let (tmp, orig) = (Path::new("/tmp/.tmpX"), Path::new("data"));
        assert_eq!(rebase(Path::new("/tmp/.tmpX/db"), tmp, orig), Path::new("data/db"));
        assert_eq!(rebase(tmp, tmp, orig), orig);
        assert_eq!(rebase(Path::new("/elsewhere"), tmp, orig), Path::new("/elsewhere"));
        let e = LogError::Io {
            op: "open",
            path: tmp.join("db"),
            source: std::io::Error::from(std::io::ErrorKind::PermissionDenied),
        };
        let shown = e.shown_as(tmp, orig).to_string();
        assert!(shown.starts_with("open data/db:"), "{shown}");
    }
}
