//! The head: where the log's tip was at its last durable point, kept outside
//! sled's files so that sled rolling its files back to an older consistent
//! state (which it does, silently, when it finds damage) cannot take the
//! head back with it. Opening compares the head with the tip sled returns.
//!
//! The file holds two fixed slots of [`SLOT_LEN`] bytes; a write goes to the
//! older slot and is made durable with one `fdatasync` (the file never changes
//! size, so no metadata needs syncing). A torn write damages only the slot
//! being written: reading takes the valid slot with the higher counter.
//! Slot layout (little-endian):
//!
//! | bytes | field |
//! |---|---|
//! | 0..8 | magic `ILHEAD\0\x02` |
//! | 8..24 | the log's id (a head from another log is refused) |
//! | 24..32 | write counter |
//! | 32..40 | global sequence number of the tip |
//! | 40..72 | the tip record's link (its digest; for a snapshot, the replaced record's) |
//! | 72..80 | the journal file the log goes on in: a file numbered at least this must exist (0: none needed, after a clean close) |
//! | 80..84 | CRC-32 of bytes 0..80 |
//!
//! Slots of format 1 (`ILHEAD\0\x01`: no journal number, CRC at 72..76)
//! are still read. With the journal the head file moves only at
//! checkpoints and at a clean close (the journal's commit frames are the
//! head in between, see `journal.rs`); the journal number is what tells a
//! journal deleted whole from one that was never needed.

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

use crate::log::record::Digest;

/// The head file's name inside the log directory.
pub(crate) const FILE: &str = "head";
/// Bytes per slot.
pub(crate) const SLOT_LEN: usize = 128;
const MAGIC: &[u8; 8] = b"ILHEAD\x00\x02";
const MAGIC_V1: &[u8; 8] = b"ILHEAD\x00\x01";
const USED: usize = 84;
const USED_V1: usize = 76;

/// A log's identity, chosen when it is created: tells a head (or a copy)
/// of one log from another's.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default, serde::Serialize, serde::Deserialize)]
pub struct LogId(pub [u8; 16]);

impl LogId {
    /// A fresh id: BLAKE3 of the time, the process id and a counter. Not a
    /// secret, only distinct from every other log's.
    pub fn fresh() -> Self {
        static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let mut h = blake3::Hasher::new();
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        h.update(&now.as_nanos().to_le_bytes());
        h.update(&std::process::id().to_le_bytes());
        h.update(&COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed).to_le_bytes());
        let mut id = [0; 16];
        id.copy_from_slice(&h.finalize().as_bytes()[..16]);
        Self(id)
    }
}

impl fmt::Debug for LogId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl fmt::Display for LogId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0[..6].iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}

/// Where the log's tip was at a durable point.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Head {
    /// Which log.
    pub log_id: LogId,
    /// The global sequence number of the last record covered (0: none yet).
    pub global: u64,
    /// That record's link ([`Digest::ZERO`] when `global` is 0).
    pub link: Digest,
}

/// What reading a head found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HeadRead {
    /// The store keeps no head (in memory: nothing outside it can roll back).
    NotKept,
    /// No head file.
    Missing,
    /// Neither slot is valid.
    Unreadable {
        /// Why.
        detail: String,
    },
    /// The newest valid slot.
    Found(Head),
    /// The head names journal file `from` as where the log goes on, and the
    /// journal holds no file numbered that or later: it was deleted, and
    /// with it whatever was acknowledged since the head last moved.
    JournalMissing {
        /// The head file's newest slot.
        head: Head,
        /// The number it names.
        from: u64,
    },
}

/// One slot as read: the head, the write counter and the journal number.
#[derive(Clone, Copy)]
struct Slot {
    head: Head,
    counter: u64,
    journal: u64,
}

fn encode_slot(head: &Head, counter: u64, journal: u64) -> [u8; SLOT_LEN] {
    let mut slot = [0u8; SLOT_LEN];
    slot[..8].copy_from_slice(MAGIC);
    slot[8..24].copy_from_slice(&head.log_id.0);
    slot[24..32].copy_from_slice(&counter.to_le_bytes());
    slot[32..40].copy_from_slice(&head.global.to_le_bytes());
    slot[40..72].copy_from_slice(&head.link.0);
    slot[72..80].copy_from_slice(&journal.to_le_bytes());
    let crc = crc32fast::hash(&slot[..80]);
    slot[80..USED].copy_from_slice(&crc.to_le_bytes());
    slot
}

fn decode_slot(slot: &[u8]) -> Option<Slot> {
    let (used, v1) = match slot.get(..8)? {
        m if m == MAGIC => (USED, false),
        m if m == MAGIC_V1 => (USED_V1, true),
        _ => return None,
    };
    let slot = slot.get(..used)?;
    let crc = u32::from_le_bytes(slot[used - 4..used].try_into().ok()?);
    if crc != crc32fast::hash(&slot[..used - 4]) {
        return None;
    }
    let u64_at = |at: usize| slot[at..at + 8].try_into().ok().map(u64::from_le_bytes);
    let log_id = LogId(slot[8..24].try_into().ok()?);
    let link = Digest(slot[40..72].try_into().ok()?);
    let journal = if v1 { 0 } else { u64_at(72)? };
    Some(Slot { head: Head { log_id, global: u64_at(32)?, link }, counter: u64_at(24)?, journal })
}

/// Reads the head file in `dir`.
#[cfg(test)]
pub(crate) fn read(dir: &Path) -> io::Result<HeadRead> {
    read_with_journal(dir).map(|(read, _)| read)
}

/// Reads the head file in `dir`, and the journal file number it names.
pub(crate) fn read_with_journal(dir: &Path) -> io::Result<(HeadRead, u64)> {
    let bytes = match std::fs::read(dir.join(FILE)) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok((HeadRead::Missing, 0)),
        Err(e) => return Err(e),
    };
    Ok(match newest(&bytes) {
        Some(slot) => (HeadRead::Found(slot.head), slot.journal),
        None => (
            HeadRead::Unreadable {
                detail: format!(
                    "{} bytes, no valid slot (expected {} bytes: two checksummed slots)",
                    bytes.len(),
                    2 * SLOT_LEN
                ),
            },
            0,
        ),
    })
}

fn newest(bytes: &[u8]) -> Option<Slot> {
    (0..2).filter_map(|i| bytes.get(i * SLOT_LEN..(i + 1) * SLOT_LEN).and_then(decode_slot)).max_by_key(|s| s.counter)
}

/// The open head file of a writable log.
#[derive(Debug)]
pub(crate) struct HeadFile {
    file: File,
    /// Counter of the newest slot on disk.
    counter: u64,
    /// The global of the newest head written: heads only move forward.
    written: u64,
    /// The newest head on disk.
    last: Option<Head>,
}

impl HeadFile {
    /// Creates the head file of a new log holding `head`, durably (file and directory).
    pub(crate) fn create(dir: &Path, head: &Head, journal: u64) -> io::Result<Self> {
        let path = dir.join(FILE);
        let file = OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&path)?;
        let mut both = [0u8; 2 * SLOT_LEN];
        both[..SLOT_LEN].copy_from_slice(&encode_slot(head, 1, journal));
        file.write_all_at(&both, 0)?;
        file.sync_all()?;
        File::open(dir)?.sync_all()?;
        Ok(Self { file, counter: 1, written: head.global, last: Some(*head) })
    }

    /// Opens the existing head file for writing (its newest slot is `current`).
    pub(crate) fn open(dir: &Path) -> io::Result<Self> {
        let path = dir.join(FILE);
        let file = OpenOptions::new().read(true).write(true).open(&path)?;
        let mut bytes = Vec::new();
        io::Read::read_to_end(&mut &file, &mut bytes)?;
        let slot = newest(&bytes);
        let (written, counter) = slot.map_or((0, 0), |s| (s.head.global, s.counter));
        if bytes.len() < 2 * SLOT_LEN {
            file.set_len((2 * SLOT_LEN) as u64)?;
        }
        Ok(Self { file, counter, written, last: slot.map(|s| s.head) })
    }

    /// The newest head on disk (`None`: neither slot was valid when opened).
    pub(crate) fn last(&self) -> Option<Head> {
        self.last
    }

    /// Writes `head` (the log going on in journal file `journal`) into the
    /// older slot; with `sync`, waits until it is on disk. A head behind the
    /// one already written is not written (heads only move forward).
    pub(crate) fn write(&mut self, head: &Head, journal: u64, sync: bool) -> io::Result<()> {
        if head.global < self.written {
            return Ok(());
        }
        let counter = self.counter.wrapping_add(1);
        let offset = (counter % 2) * SLOT_LEN as u64;
        self.file.write_all_at(&encode_slot(head, counter, journal), offset)?;
        if sync {
            self.file.sync_data()?;
        }
        self.counter = counter;
        self.written = head.global;
        self.last = Some(*head);
        Ok(())
    }

    /// Writes `head` even if it is behind the last one (accepting a loss resets the head).
    pub(crate) fn reset(&mut self, head: &Head, journal: u64) -> io::Result<()> {
        self.written = 0;
        self.write(head, journal, true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(global: u64) -> Head {
        Head { log_id: LogId([7; 16]), global, link: Digest::of(&global.to_le_bytes()) }
    }

    #[test]
    fn the_newest_valid_slot_wins_and_a_torn_slot_leaves_the_other() {
        let dir = tempfile::tempdir().expect("dir");
        let mut f = HeadFile::create(dir.path(), &head(0), 0).expect("create");
        assert_eq!(read(dir.path()).expect("read"), HeadRead::Found(head(0)));
        for g in 1..=5 {
            f.write(&head(g), 0, true).expect("write");
            assert_eq!(read(dir.path()).expect("read"), HeadRead::Found(head(g)));
        }
        f.write(&head(3), 0, true).expect("a head behind is skipped");
        assert_eq!(read(dir.path()).expect("read"), HeadRead::Found(head(5)));
        // Tear the newest slot: the previous head is read.
        let mut bytes = std::fs::read(dir.path().join(FILE)).expect("bytes");
        let newest_slot = (f.counter % 2) as usize * SLOT_LEN;
        bytes[newest_slot + 40] ^= 1;
        std::fs::write(dir.path().join(FILE), &bytes).expect("tear");
        assert_eq!(read(dir.path()).expect("read"), HeadRead::Found(head(4)));
        // Reopened, it goes on from the valid slot.
        let mut f = HeadFile::open(dir.path()).expect("open");
        f.write(&head(6), 0, false).expect("write");
        assert_eq!(read(dir.path()).expect("read"), HeadRead::Found(head(6)));
        std::fs::write(dir.path().join(FILE), b"garbage").expect("garbage");
        assert!(matches!(read(dir.path()).expect("read"), HeadRead::Unreadable { .. }));
        std::fs::remove_file(dir.path().join(FILE)).expect("rm");
        assert_eq!(read(dir.path()).expect("read"), HeadRead::Missing);
    }
}
