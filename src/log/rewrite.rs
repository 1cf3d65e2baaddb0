//! Rewriting sled's files when they hold far more than the log keeps.
//!
//! sled 0.34 reuses the space of deleted keys inside its file but rarely
//! gives it back, and fragments as it goes: its file is the high-water mark
//! of what was ever written, not what is kept. Measured after 430 SIGKILLs
//! of `lifecycle serve` under churn (`benches/crash_loop.rs`): 9 MB of keys
//! and values in a 435 MB file, which sled took 250 ms to open. Compaction
//! records how many bytes the log holds (`mlive`); a writer that opens a log
//! whose files are more than [`RATIO`] times that (and above
//! [`LogConfig::rewrite_above`](super::LogConfig::rewrite_above)) copies
//! every key into a fresh sled in `rewrite.new/` and puts its files in place
//! of the old ones, before it answers anything.
//!
//! **The swap survives a crash at any point.** The head and the journal are
//! not touched (the copy holds the same keys, so the same tip); only sled's
//! own files (`conf`, `db`, `snap.*`, `blobs/`) change, in steps each of
//! which the next open finishes or undoes ([`finish`]):
//!
//! 1. the copy is built in `rewrite.new/` and made durable — a crash leaves
//!    the old files whole, and the directory is removed;
//! 2. `rewrite.new/` is renamed `rewrite.ready/` — the copy is complete;
//! 3. the old files are deleted, then the marker `rewrite.swapping` is made —
//!    from here the old files are gone and the copy's are the store;
//! 4. the copy's files are moved in, then `rewrite.ready/` and the marker go.
//!
//! A copy of the log for reading finishes the same steps in the copy first.

use std::fs::File;
use std::path::Path;
use std::time::Duration;

use super::{LogError, keys};

/// How many times the bytes a log keeps its files may hold before a writer
/// rewrites them at open: sled's own space amplification is about 3× (see
/// `dependency-notes.md`), so this leaves room for it and for churn.
pub(crate) const RATIO: u64 = 8;

const NEW: &str = "rewrite.new";
const READY: &str = "rewrite.ready";
const SWAPPING: &str = "rewrite.swapping";

fn io<'p>(op: &'static str, path: &'p Path) -> impl FnOnce(std::io::Error) -> LogError + 'p {
    move |source| LogError::Io { op, path: path.to_path_buf(), source }
}

/// Whether a rewrite was cut short after sled's old files may have gone
/// (the copy is complete and waits to be moved in).
pub(crate) fn interrupted(dir: &Path) -> bool {
    dir.join(READY).is_dir()
}

/// Whether `name` (an entry of the log's directory) is one of sled's files.
fn is_sleds(name: &str) -> bool {
    name == "conf" || name == "db" || name == "blobs" || name.starts_with("snap.")
}

/// Whether files of `size` bytes holding `live` bytes of keys and values
/// (as the last compaction counted them) are due for a rewrite.
pub(crate) fn due(size: u64, live: Option<u64>, above: u64) -> bool {
    live.is_some_and(|live| size > above && size > live.saturating_mul(RATIO))
}

fn sync_dir(dir: &Path) -> Result<(), LogError> {
    File::open(dir).and_then(|f| f.sync_all()).map_err(io("fsync", dir))
}

/// Every file under `dir` made durable, then `dir` itself.
fn sync_tree(dir: &Path) -> Result<(), LogError> {
    for entry in std::fs::read_dir(dir).map_err(io("read", dir))? {
        let path = entry.map_err(io("read", dir))?.path();
        if path.is_dir() {
            sync_tree(&path)?;
        } else {
            File::open(&path).and_then(|f| f.sync_all()).map_err(io("fsync", &path))?;
        }
    }
    sync_dir(dir)
}

/// Waits until no process holds sled's lock on `dir`'s database: sled lets
/// it go only once its own I/O threads have finished with the files.
fn wait_released(dir: &Path) -> Result<(), LogError> {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while let Some(holder) = super::store::lock_holder(&dir.join("db")) {
        if std::time::Instant::now() >= deadline {
            return Err(LogError::InUse { path: dir.to_path_buf(), holder: Some(holder) });
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok(())
}

/// Finishes or undoes a rewrite a crash interrupted (see the module doc).
pub(crate) fn finish(dir: &Path) -> Result<(), LogError> {
    let new = dir.join(NEW);
    if new.exists() {
        std::fs::remove_dir_all(&new).map_err(io("remove", &new))?;
        sync_dir(dir)?;
    }
    // Only a directory is a complete copy: a stray file of that name never
    // makes sled's files go.
    if interrupted(dir) {
        swap(dir)?;
    }
    let marker = dir.join(SWAPPING);
    if marker.exists() {
        std::fs::remove_file(&marker).map_err(io("remove", &marker))?;
        sync_dir(dir)?;
    }
    Ok(())
}

/// Steps 3 and 4: the old files out, the copy's in.
fn swap(dir: &Path) -> Result<(), LogError> {
    let (ready, marker) = (dir.join(READY), dir.join(SWAPPING));
    if !marker.exists() {
        for entry in std::fs::read_dir(dir).map_err(io("read", dir))? {
            let entry = entry.map_err(io("read", dir))?;
            if entry.file_name().to_str().is_some_and(is_sleds) {
                let path = entry.path();
                let removed = if path.is_dir() { std::fs::remove_dir_all(&path) } else { std::fs::remove_file(&path) };
                removed.map_err(io("remove", &path))?;
            }
        }
        sync_dir(dir)?;
        File::create(&marker).map_err(io("create", &marker))?;
        sync_dir(dir)?;
    }
    for entry in std::fs::read_dir(&ready).map_err(io("read", &ready))? {
        let from = entry.map_err(io("read", &ready))?.path();
        let to = dir.join(from.file_name().unwrap_or_default());
        std::fs::rename(&from, &to).map_err(io("move", &from))?;
    }
    sync_dir(dir)?;
    std::fs::remove_dir(&ready).map_err(io("remove", &ready))?;
    std::fs::remove_file(&marker).map_err(io("remove", &marker))?;
    sync_dir(dir)
}

/// What a rewrite did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Rewritten {
    /// sled's files before.
    pub(crate) before: u64,
    /// The bytes of keys and values copied.
    pub(crate) live: u64,
    /// How long it took.
    pub(crate) took: Duration,
}

/// Steps 1 and 2: every key of the (closed) store at `dir` copied into a
/// fresh sled in `rewrite.new/`, made durable and marked complete. `open`
/// opens a sled database as the log does (with its bounded lock retry).
fn copy(dir: &Path, open: &dyn Fn(&Path) -> Result<sled::Db, LogError>) -> Result<u64, LogError> {
    let new_dir = dir.join(NEW);
    let failed = |path: &Path| {
        let path = path.to_path_buf();
        move |e: sled::Error| LogError::Open { source: super::store::StoreError::from_sled(e, &path.join("db")), path }
    };
    let old = open(dir)?;
    let new = open(&new_dir)?;
    // sled 0.34 can panic on damaged files (upstream #1527, #1533): contained.
    let copied = crate::contain::quietly(|| -> Result<u64, LogError> {
        let mut live = 0u64;
        for name in old.tree_names() {
            let from = old.open_tree(&name).map_err(failed(dir))?;
            let to =
                if name == old.name() { (*new).clone() } else { new.open_tree(&name).map_err(failed(&new_dir))? };
            let mut batch = sled::Batch::default();
            let mut in_batch = 0;
            for pair in from.iter() {
                let (k, v) = pair.map_err(failed(dir))?;
                live += (k.len() + v.len()) as u64;
                batch.insert(k, v);
                in_batch += 1;
                if in_batch == 10_000 {
                    to.apply_batch(std::mem::take(&mut batch)).map_err(failed(&new_dir))?;
                    in_batch = 0;
                }
            }
            to.apply_batch(batch).map_err(failed(&new_dir))?;
        }
        let tree = new.open_tree(super::store::TREE).map_err(failed(&new_dir))?;
        tree.insert(keys::META_LIVE, &live.to_be_bytes()).map_err(failed(&new_dir))?;
        new.flush().map_err(failed(&new_dir))?;
        Ok(live)
    });
    drop((new, old));
    let live = copied.map_err(|message| LogError::Open {
        path: dir.to_path_buf(),
        source: super::store::StoreError::Panicked { op: "copying", message },
    })??;
    wait_released(&new_dir)?;
    wait_released(dir)?;
    sync_tree(&new_dir)?;
    let ready = dir.join(READY);
    std::fs::rename(&new_dir, &ready).map_err(io("rename", &new_dir))?;
    sync_dir(dir)?;
    Ok(live)
}

/// Rewrites the closed store at `dir` (see the module doc). A copy that
/// fails (a full disk, say) is thrown away and the old files stay the store:
/// `Ok(None)`, with the reason logged — the rewrite only saves space, and a
/// log must not stop opening for it. A failure once the old files may be
/// gone is an error: the next open finishes the swap.
pub(crate) fn rewrite(
    dir: &Path,
    before: u64,
    open: &dyn Fn(&Path) -> Result<sled::Db, LogError>,
) -> Result<Option<Rewritten>, LogError> {
    let started = std::time::Instant::now();
    finish(dir)?;
    let live = match copy(dir, open) {
        Ok(live) => live,
        Err(error) if !interrupted(dir) => {
            tracing::warn!(%error, "rewriting sled's files failed: the log opens with the files it had");
            let new = dir.join(NEW);
            if new.exists() {
                std::fs::remove_dir_all(&new).map_err(io("remove", &new))?;
            }
            return Ok(None);
        }
        Err(error) => return Err(error),
    };
    swap(dir)?;
    Ok(Some(Rewritten { before, live, took: started.elapsed() }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::log::{Durability, Event, HeadCheck, Log, LogConfig};
    use crate::machine::{Instance, InstanceName, Policy, Preset, Timestamp};

    fn config() -> LogConfig {
        LogConfig { durability: Durability::GroupCommit, ..LogConfig::default() }
    }

    /// A closed log of 50 instances with one record each.
    fn sample(dir: &Path) {
        let log = Log::open(dir, config()).expect("open");
        for i in 0..50 {
            let name = InstanceName::new(format!("i{i:02}")).expect("name");
            log.append(&name, 1, Timestamp(i), Event::created("ws://127.0.0.1:9/"), &Instance::new()).expect("append");
        }
    }

    fn open_db_for_test(dir: &Path) -> Result<sled::Db, LogError> {
        super::super::open_db(&sled::Config::new().path(dir).flush_every_ms(None), dir)
    }

    /// The log at `dir` has its 50 instances, verifies clean, and its head
    /// covers its tip.
    fn whole(dir: &Path) {
        let log = Log::open_existing(dir, config()).expect("open");
        assert_eq!(log.names().expect("names").len(), 50);
        assert!(matches!(log.head_check(), HeadCheck::Intact { global: 50 }), "{:?}", log.head_check());
        let report = log.verify(&Policy::preset(Preset::Whatsapp));
        assert!(report.is_clean(), "{:#?}", report.findings);
        drop(log);
        assert!(!dir.join(NEW).exists() && !dir.join(READY).exists() && !dir.join(SWAPPING).exists());
    }

    /// sled's files in `dir` deleted, as step 3 does before its marker.
    fn remove_sleds(dir: &Path) {
        for entry in std::fs::read_dir(dir).expect("read") {
            let entry = entry.expect("entry");
            if entry.file_name().to_str().is_some_and(is_sleds) {
                let p = entry.path();
                if p.is_dir() { std::fs::remove_dir_all(&p) } else { std::fs::remove_file(&p) }.expect("rm");
            }
        }
    }

    fn inode(path: &Path) -> u64 {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(path).expect("metadata").ino()
    }

    /// A crash at each step of a rewrite leaves a log the next open finishes
    /// (or undoes), whole; a copy for reading taken in the middle reads it
    /// whole too.
    #[test]
    fn a_rewrite_cut_short_at_any_step_is_finished_or_undone_by_the_next_open() {
        // Step 1 cut short: a partial copy is thrown away, the old files stay.
        let dir = tempfile::tempdir().expect("dir");
        sample(dir.path());
        let old = inode(&dir.path().join("db"));
        std::fs::create_dir(dir.path().join(NEW)).expect("new");
        std::fs::write(dir.path().join(NEW).join("db"), b"half a copy").expect("junk");
        whole(dir.path());
        assert_eq!(inode(&dir.path().join("db")), old, "not swapped");

        // After step 2, and after each part of steps 3 and 4.
        type Cut = fn(&Path);
        let cuts: [(&str, Cut); 4] = [
            ("the copy complete, the old files all there", |_| {}),
            ("the old db deleted, not yet the rest", |d| std::fs::remove_file(d.join("db")).expect("rm db")),
            ("the old files gone, the marker made", |d| {
                remove_sleds(d);
                std::fs::File::create(d.join(SWAPPING)).expect("marker");
            }),
            ("the copy's db moved in, not yet the rest", |d| {
                remove_sleds(d);
                std::fs::File::create(d.join(SWAPPING)).expect("marker");
                std::fs::rename(d.join(READY).join("db"), d.join("db")).expect("move db");
            }),
        ];
        for (what, cut) in cuts {
            let dir = tempfile::tempdir().expect("dir");
            sample(dir.path());
            copy(dir.path(), &open_db_for_test).expect("copy");
            let copied = inode(&dir.path().join(READY).join("db"));
            cut(dir.path());
            // A reader's copy first: it finishes the swap in the copy, never in the original.
            let (reader, _) = Log::open_copy(dir.path()).unwrap_or_else(|e| panic!("{what}: copy: {e}"));
            assert_eq!(reader.names().expect("names").len(), 50, "{what}: the reader's copy");
            assert!(reader.verify(&Policy::preset(Preset::Whatsapp)).is_clean(), "{what}");
            drop(reader);
            assert!(interrupted(dir.path()), "{what}: the original untouched by the reader");
            whole(dir.path());
            assert_eq!(inode(&dir.path().join("db")), copied, "{what}: the copy is the store");
        }
    }

    /// A stray file named like the rewrite's complete copy is not one: the
    /// store's files stay, and a rewrite that cannot put its copy there gives
    /// up and leaves the store as it was.
    #[test]
    fn a_stray_file_named_like_the_copy_never_makes_the_store_go() {
        let dir = tempfile::tempdir().expect("dir");
        sample(dir.path());
        let old = inode(&dir.path().join("db"));
        std::fs::write(dir.path().join(READY), b"not a copy").expect("stray file");
        finish(dir.path()).expect("finish");
        assert_eq!(inode(&dir.path().join("db")), old);
        assert_eq!(rewrite(dir.path(), 0, &open_db_for_test).expect("not an error"), None);
        assert_eq!(inode(&dir.path().join("db")), old);
        assert_eq!(std::fs::read(dir.path().join(READY)).expect("left alone"), b"not a copy");
        assert!(!dir.path().join(NEW).exists());
        let log = Log::open_existing(dir.path(), config()).expect("open");
        assert_eq!(log.names().expect("names").len(), 50);
    }

    /// A copy that fails (here: the new database cannot be opened) is thrown
    /// away; the old files stay the store, untouched.
    #[test]
    fn a_failed_copy_leaves_the_old_files_the_store() {
        let dir = tempfile::tempdir().expect("dir");
        sample(dir.path());
        let old = inode(&dir.path().join("db"));
        let refuse_new = |d: &Path| {
            if d.ends_with(NEW) {
                std::fs::create_dir_all(d).expect("the half-made copy");
                return Err(LogError::Io {
                    op: "open",
                    path: d.to_path_buf(),
                    source: std::io::Error::other("disk full"),
                });
            }
            open_db_for_test(d)
        };
        assert_eq!(rewrite(dir.path(), 0, &refuse_new).expect("not an error"), None);
        assert_eq!(inode(&dir.path().join("db")), old);
        whole(dir.path());
        // And a copy that works swaps.
        let done = rewrite(dir.path(), 7, &open_db_for_test).expect("rewrite").expect("rewritten");
        assert!(done.before == 7 && done.live > 0);
        assert_ne!(inode(&dir.path().join("db")), old);
        whole(dir.path());
    }

    #[test]
    fn a_rewrite_is_due_only_past_the_floor_and_the_ratio_and_once_counted() {
        assert!(!due(1 << 30, None, 64 << 20), "never counted: no rewrite");
        assert!(!due(60 << 20, Some(1 << 20), 64 << 20), "under the floor");
        assert!(!due(100 << 20, Some(13 << 20), 64 << 20), "within 8×");
        assert!(due(100 << 20, Some(12 << 20), 64 << 20));
        assert!(!due(u64::MAX, Some(u64::MAX), 0), "no overflow");
    }
}
