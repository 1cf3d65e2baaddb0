//! The log's directory as files: checking that one is there, copying it for
//! reading, and telling who holds it.
//!
//! Why reads copy: sled 0.34 has no read-only mode, and opening a database
//! recovers it — it rewrites its snapshot and may cut a damaged tail off the
//! file — so opening the original to look at it could change, or destroy the
//! evidence of, the very damage being investigated. A copy is opened instead;
//! it lives in the temporary directory, named `lifecycle-*`, and is
//! removed when the log is dropped, and by [`remove_copies`] for a program
//! that exits from a signal handler.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use super::error::StoreError;
use super::{head, journal};

/// The directory, inside a log's, where journal files a replay could not
/// apply are kept after a loss is accepted (`Store::keep_unreplayed`).
/// Nothing reads it again; a copy for reading leaves it out.
pub(crate) const KEPT: &str = "kept";

/// Copies alive in this process (removed on drop; [`remove_copies`] for signal handlers).
static LIVE: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

fn live() -> std::sync::MutexGuard<'static, Vec<PathBuf>> {
    LIVE.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Removes every copy of a log this process made and still holds. For a
/// program about to exit without unwinding (a SIGINT handler): the copies
/// would otherwise stay in the temporary directory.
pub fn remove_copies() {
    remove_copies_where(|_| true);
}

/// Removes the copies `which` picks (a test picks its own: other tests of
/// the process hold copies too).
fn remove_copies_where(which: impl Fn(&Path) -> bool) {
    let mut live = live();
    let (gone, kept) = std::mem::take(&mut *live).into_iter().partition(|p| which(p));
    *live = kept;
    drop(live);
    for path in gone {
        let _ = std::fs::remove_dir_all(path);
    }
}

/// A directory of ours in the temporary directory (a log's copy, or a
/// temporary log), removed on drop.
#[derive(Debug)]
pub(crate) struct Scratch {
    dir: tempfile::TempDir,
}

impl Scratch {
    /// An empty one.
    pub(crate) fn new() -> Result<Self, StoreError> {
        let dir = tempfile::Builder::new().prefix("lifecycle-").tempdir().map_err(|source| StoreError::Io {
            op: "create a directory in",
            path: std::env::temp_dir(),
            source,
        })?;
        live().push(dir.path().to_path_buf());
        Ok(Self { dir })
    }

    /// A copy of the log at `from`. The head first: a head copied after the
    /// data could cover records the data copy does not have. Then the
    /// journal, then sled's files: a writer deletes journal files only once
    /// sled's files hold what they held, so whatever the journal copy misses
    /// the later sled copy has (replay skips what sled holds, so the
    /// overlap does no harm).
    pub(crate) fn copy_of(from: &Path) -> Result<Self, StoreError> {
        let copy = Self::new()?;
        let head = from.join(head::FILE);
        if head.exists() {
            copy_file(&head, &copy.path().join(head::FILE))?;
        }
        let journal = from.join(journal::DIR);
        if journal.is_dir() {
            let target = copy.path().join(journal::DIR);
            make_dir(&target)?;
            copy_dir(&journal, &target, false)?;
        }
        copy_dir(from, copy.path(), true)?;
        Ok(copy)
    }

    pub(crate) fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        live().retain(|p| p != self.dir.path());
    }
}

fn io<'p>(op: &'static str, path: &'p Path) -> impl FnOnce(std::io::Error) -> StoreError + 'p {
    move |source| StoreError::Io { op, path: path.to_path_buf(), source }
}

/// Copies a file and makes the copy writable by us (sled opens read-write,
/// and the original may be read-only: a log kept for investigation).
fn copy_file(from: &Path, to: &Path) -> Result<(), StoreError> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::copy(from, to).map_err(io("copy", from))?;
    std::fs::set_permissions(to, std::fs::Permissions::from_mode(0o600)).map_err(io("set permissions of", to))
}

fn make_dir(target: &Path) -> Result<(), StoreError> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(target).map_err(io("create", target))?;
    std::fs::set_permissions(target, std::fs::Permissions::from_mode(0o700)).map_err(io("set permissions of", target))
}

fn copy_dir(from: &Path, to: &Path, top: bool) -> Result<(), StoreError> {
    for entry in std::fs::read_dir(from).map_err(io("read", from))? {
        let entry = entry.map_err(io("read", from))?;
        if top && (entry.file_name() == head::FILE || entry.file_name() == journal::DIR) {
            continue; // copied first
        }
        if top && entry.file_name() == KEPT {
            continue; // not the log's: what an accepted loss set aside
        }
        let target = to.join(entry.file_name());
        let kind = entry.file_type().map_err(io("stat", &entry.path()))?;
        if kind.is_dir() {
            make_dir(&target)?;
            copy_dir(&entry.path(), &target, false)?;
        } else if kind.is_file() {
            copy_file(&entry.path(), &target)?;
        }
    }
    Ok(())
}

/// Whether another process holds sled's lock on `db` (sled takes an exclusive `flock`).
pub(crate) fn is_locked(db: &Path) -> Result<bool, StoreError> {
    let file = std::fs::File::open(db).map_err(io("open", db))?;
    match file.try_lock() {
        Ok(()) => Ok(false),
        Err(std::fs::TryLockError::WouldBlock) => Ok(true),
        Err(std::fs::TryLockError::Error(source)) => Err(StoreError::Io { op: "lock", path: db.to_path_buf(), source }),
    }
}

/// Who holds a lock on `file`, when the system says: `process 1234 (lifecycle)`.
/// Linux only (`/proc/locks`); `None` elsewhere or when nobody does.
pub fn lock_holder(file: &Path) -> Option<String> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(file).ok()?;
    let (major, minor, ino) = (dev_major(meta.dev()), dev_minor(meta.dev()), meta.ino());
    let locks = std::fs::read_to_string("/proc/locks").ok()?;
    // Lines look like `1: FLOCK  ADVISORY  WRITE 1234 fd:01:5678 0 EOF`: the
    // pid comes just before `major:minor:inode` (hex, hex, decimal).
    let pid = locks.lines().find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let at = fields.iter().position(|f| same_file(f, major, minor, ino))?;
        fields.get(at.checked_sub(1)?)?.parse::<u32>().ok()
    })?;
    let name = std::fs::read_to_string(format!("/proc/{pid}/comm")).ok();
    Some(match name {
        Some(n) => format!("process {pid} ({})", n.trim()),
        None => format!("process {pid}"),
    })
}

fn same_file(field: &str, major: u64, minor: u64, ino: u64) -> bool {
    let mut parts = field.split(':');
    let (Some(ma), Some(mi), Some(i)) = (parts.next(), parts.next(), parts.next()) else { return false };
    u64::from_str_radix(ma, 16).ok() == Some(major)
        && u64::from_str_radix(mi, 16).ok() == Some(minor)
        && i.parse::<u64>().ok() == Some(ino)
}

/// Linux's `major()` of a `dev_t` (glibc's encoding).
fn dev_major(dev: u64) -> u64 {
    ((dev >> 32) & 0xffff_f000) | ((dev >> 8) & 0x0000_0fff)
}

/// Linux's `minor()` of a `dev_t` (glibc's encoding).
fn dev_minor(dev: u64) -> u64 {
    ((dev >> 12) & 0xffff_ff00) | (dev & 0x0000_00ff)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_holder_of_a_lock_is_this_process() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("db");
        std::fs::write(&path, b"x").expect("write");
        assert_eq!(lock_holder(&path), None);
        let f = std::fs::File::open(&path).expect("open");
        f.lock().expect("lock");
        if std::path::Path::new("/proc/locks").exists() {
            let holder = lock_holder(&path).expect("a holder");
            assert!(holder.starts_with(&format!("process {}", std::process::id())), "{holder}");
        }
    }

    #[test]
    fn a_copy_is_writable_and_gone_after_drop_or_remove_copies() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("dir");
        for f in ["db", "conf", "head"] {
            std::fs::write(dir.path().join(f), f).expect("write");
            std::fs::set_permissions(dir.path().join(f), std::fs::Permissions::from_mode(0o444)).expect("chmod");
        }
        let copy = Scratch::copy_of(dir.path()).expect("copy");
        let mode = std::fs::metadata(copy.path().join("db")).expect("stat").permissions().mode();
        assert_eq!(mode & 0o600, 0o600);
        let path = copy.path().to_path_buf();
        drop(copy);
        assert!(!path.exists());
        let copy = Scratch::copy_of(dir.path()).expect("copy");
        let path = copy.path().to_path_buf();
        // Not `remove_copies` itself: it would remove the copies of tests running beside this one.
        remove_copies_where(|p| p == path);
        assert!(!path.exists());
        drop(copy);
    }
}
