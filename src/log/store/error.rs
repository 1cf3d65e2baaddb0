//! The write path's errors: what failed in storage, and on which file.

use std::path::{Path, PathBuf};

/// An error of the storage layer.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// sled found damaged data in its files.
    #[error("the database files are damaged{}", offset.map(|o| format!(" (at file offset {o})")).unwrap_or_default())]
    Damaged {
        /// Where sled found it, when it says.
        offset: Option<u64>,
    },
    /// sled failed in a way that is not damage (an internal error, an unsupported use).
    #[error("the database failed: {detail}")]
    Sled {
        /// What sled said, without its debug decorations.
        detail: String,
    },
    /// sled panicked (contained; it does so on some damaged files).
    #[error("the database failed while {op} (sled panicked: {message}); its files are probably damaged")]
    Panicked {
        /// What was being done.
        op: &'static str,
        /// The panic message.
        message: String,
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
    /// A journal file in the log's directory belongs to another log.
    #[error(
        "{file} belongs to another log (id {found}), not to this one (id {ours}): refusing to replay it; move it out of the way"
    )]
    ForeignJournal {
        /// The file.
        file: PathBuf,
        /// The id in its header.
        found: String,
        /// This log's id.
        ours: String,
    },
    /// The in-memory store was poisoned by a panic in another thread.
    #[error("memory store poisoned by a panic")]
    Poisoned,
}

impl StoreError {
    /// Maps sled's error to ours; `path` names the database for I/O errors.
    pub(crate) fn from_sled(e: sled::Error, path: &Path) -> Self {
        match e {
            sled::Error::Corruption { at, .. } => Self::Damaged { offset: at.map(|p| p.lid()) },
            sled::Error::Io(source) => Self::Io { op: "read or write", path: path.to_path_buf(), source },
            sled::Error::CollectionNotFound(_) => Self::Sled { detail: "a tree of the log is missing".into() },
            sled::Error::Unsupported(detail) => Self::Sled { detail },
            sled::Error::ReportableBug(detail) => Self::Sled { detail: format!("internal error: {detail}") },
        }
    }

    /// The same error with `from` (a temporary copy) shown as `to` (the original).
    pub(crate) fn shown_as(self, from: &Path, to: &Path) -> Self {
        match self {
            Self::Io { op, path, source } => Self::Io { op, path: rebase(&path, from, to), source },
            Self::ForeignJournal { file, found, ours } => {
                Self::ForeignJournal { file: rebase(&file, from, to), found, ours }
            }
            other => other,
        }
    }
}

/// `path` with its prefix `from` replaced by `to` (a temporary copy shown as the original).
pub(crate) fn rebase(path: &Path, from: &Path, to: &Path) -> PathBuf {
    match path.strip_prefix(from) {
        Ok(rest) if rest.as_os_str().is_empty() => to.to_path_buf(),
        Ok(rest) => to.join(rest),
        Err(_) => path.to_path_buf(),
    }
}
