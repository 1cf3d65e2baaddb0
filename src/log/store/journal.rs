//! The journal: what makes a commit cheap. Every batch applied to sled is
//! also appended, as one frame, to a file of our own in `journal/`; a commit
//! writes the frames appended since the last one, and a *commit frame*
//! naming the tip it covers, with one `write`, and makes them durable with
//! one `fdatasync`: the only sync an acknowledgement waits for. sled itself
//! is never flushed on the commit path, which matters twice: sled's `flush`
//! holds a process-wide lock that stops every `apply_batch` until its I/O
//! completes (measured: groups of 7 appends out of 256 writers, because
//! writers could not append while a flush ran), and a journal commit is one
//! sync of one file. For the same reason appends go into sled key by key
//! (`SledStore::apply_by_key`): an `apply_batch` also writes out a buffer of
//! sled's files for every batch.
//!
//! **The journal is the head between checkpoints.** The head file
//! (`head.rs`) moves only at a checkpoint and at a clean close; in between,
//! the newest intact commit frame says how far the log was acknowledged, as
//! PostgreSQL's WAL does until `pg_control` moves at its checkpoint. Opening
//! takes the newer of the two ([`Replayed::journal_head`]).
//!
//! sled still writes its files on its own (whenever a buffer fills). A
//! *checkpoint* makes sled's files durable, moves the head file up to the
//! newest commit, and then deletes the journal files it covers: when the
//! current file passes `LogConfig::journal_file_max`, and when the log is
//! opened or closed by a writer.
//!
//! **Replay is exact.** Each batch carries its journal sequence number (JSN)
//! into sled (key `mjournal`, in the same sled batch, or written last after
//! the batch's keys with a copy of the batch written first: sled recovers
//! a prefix of its writes, and opening completes a batch held in part from
//! that copy before replaying), so opening knows
//! which batches sled already holds: frames at or below sled's JSN are
//! skipped, the one after is applied, and so on. A frame is never applied
//! over a newer state (that would move some keys back), and never out of
//! order: a gap (sled rolled back to before the journal's oldest frame) or a
//! damaged frame stops the replay unless the next intact frame proves by its
//! number that nothing sled lacks was in the damaged bytes, and the head
//! check then reports what is missing, as it does for sled's own damage.
//!
//! **What a damaged frame was.** Writes to a file never overlap a sync: the
//! next write waits until the last one is synced (the file's lock is held
//! across both). So only the *last* write before a crash can be torn, and a
//! write ends with at most one commit frame. Past damage, replay looks for
//! the next intact frame (a frame checks out alone: length, CRC, number) and
//! reads on: if it finds a commit frame followed by more frames, the damaged
//! bytes were synced before a later write — damage, and the commit frames
//! after it count (the head then says what was lost). Otherwise the damage
//! may be a torn last write: in the newest file that is where a crash
//! stopped (never acknowledged), and the commit frame of that write does not
//! count. Which is also the limit: a journal tail lost whole (a disk that
//! lied about `fdatasync`, files deleted by hand) cannot be told from writes
//! never acknowledged, as with PostgreSQL's WAL; the head file, moved at
//! every checkpoint and clean close, catches everything older.
//!
//! File layout: `journal/<number, 16 hex digits>`, starting with the 8-byte
//! magic `ILJRNL\0\x02` and the 16-byte id of the log it belongs to, then
//! frames (little-endian):
//!
//! | bytes | field |
//! |---|---|
//! | 0..4 | payload length |
//! | 4..8 | CRC-32 of bytes 8.. (chain, JSN and payload) |
//! | 8..12 | the CRC of the frame written before it (the chain; a file's first frame names the last one the same process wrote, or 0) |
//! | 12..20 | JSN (a commit frame: the newest batch's before it) |
//! | 20.. | payload: per write, a tag (1 insert, 0 remove), key length (u32) and key, and for an insert value length (u32) and value; a commit frame: tag 2, the tip's global sequence number (u64) and its link (32 bytes) |
//!
//! Files of format 1 (magic `ILJRNL\0\x01`, written before one sync per
//! commit: 16-byte frame header without the chain, no commit frames, the
//! head file moved by every commit) are still replayed; a writer only ever
//! starts new files, in format 2.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::log::keys;
use crate::log::record::Digest;

/// One write of an atomic batch: a value to insert, or `None` to remove the key.
pub type Write = (Vec<u8>, Option<Vec<u8>>);

/// The journal's directory inside the log's.
pub(crate) const DIR: &str = "journal";
const MAGIC: &[u8; 8] = b"ILJRNL\x00\x02";
/// Format 1: no chain, no commit frames (still read).
const MAGIC_V1: &[u8; 8] = b"ILJRNL\x00\x01";
/// A file's header: the magic, then the id of the log it belongs to (zeros
/// when the log had none yet), so that a journal copied in from another log
/// is refused, never replayed into this one.
const HEADER: usize = MAGIC.len() + 16;
/// The payload tag of a commit frame (a batch's writes are tagged 0 and 1).
const COMMIT_TAG: u8 = 2;
/// A commit frame's payload: the tag, the global sequence number and the link.
const COMMIT_PAYLOAD: usize = 1 + 8 + 32;
/// How far ahead of its frames a file is written with zeros. Overwriting
/// blocks a file already has makes `fdatasync` a data sync alone; appending
/// also changes the file's size, which costs a filesystem journal commit:
/// measured here, 220 µs against 450–490 µs per write + `fdatasync`. The
/// zeros are written (and synced with the frames) a chunk at a time, as
/// PostgreSQL fills its WAL segments; sparse space (`set_len`, `fallocate`)
/// would need the metadata commit on first write all the same.
const ZEROED_AHEAD: u64 = 1 << 20;
/// The largest payload a frame may claim: anything longer is damage, not a
/// batch (a batch is one append, or one compaction step of a few thousand keys).
const FRAME_MAX: usize = 1 << 30;
/// Looking for the next intact frame past damage, a candidate's JSN must lie
/// within this distance past the last one read: a filter that lets through
/// one random header in 2^24 before its CRC is even computed.
const RESYNC_JSN_SPAN: u64 = 1 << 40;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A commit's tip: the global sequence number of the newest record it
/// covers, and that record's link.
pub(crate) type Tip = (u64, Digest);

/// A journal file's format, from its magic.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Format {
    /// `ILJRNL\0\x01`: length, CRC, JSN.
    V1,
    /// `ILJRNL\0\x02`: length, CRC, chain, JSN; commit frames.
    V2,
}

impl Format {
    fn of(magic: &[u8]) -> Option<Self> {
        match magic {
            m if m == MAGIC => Some(Self::V2),
            m if m == MAGIC_V1 => Some(Self::V1),
            _ => None,
        }
    }

    /// Bytes before a frame's payload.
    fn header(self) -> usize {
        match self {
            Self::V1 => 16,
            Self::V2 => 20,
        }
    }
}

/// Appends one frame holding `writes` (and the JSN) to `out`, chained to
/// the frame whose CRC is `prev`. Returns the frame's CRC: the next frame's `prev`.
pub(crate) fn encode_frame(jsn: u64, prev: u32, writes: &[Write], out: &mut Vec<u8>) -> u32 {
    let start = begin_frame(jsn, prev, out);
    for (key, value) in writes {
        out.push(u8::from(value.is_some()));
        put_bytes(out, key);
        if let Some(value) = value {
            put_bytes(out, value);
        }
    }
    end_frame(start, out)
}

/// Appends a commit frame: the commit covers every record up to `global`,
/// whose link is `link`; `jsn` is the newest batch's before it.
pub(crate) fn encode_commit(jsn: u64, prev: u32, (global, link): Tip, out: &mut Vec<u8>) -> u32 {
    let start = begin_frame(jsn, prev, out);
    out.push(COMMIT_TAG);
    out.extend_from_slice(&global.to_le_bytes());
    out.extend_from_slice(&link.0);
    end_frame(start, out)
}

fn begin_frame(jsn: u64, prev: u32, out: &mut Vec<u8>) -> usize {
    let start = out.len();
    out.extend_from_slice(&[0; 8]);
    out.extend_from_slice(&prev.to_le_bytes());
    out.extend_from_slice(&jsn.to_le_bytes());
    start
}

fn end_frame(start: usize, out: &mut [u8]) -> u32 {
    let payload = out.len() - start - Format::V2.header();
    let len = u32::try_from(payload).unwrap_or(u32::MAX);
    out[start..start + 4].copy_from_slice(&len.to_le_bytes());
    let crc = crc32fast::hash(&out[start + 8..]);
    out[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
    crc
}

fn put_bytes(out: &mut Vec<u8>, bytes: &[u8]) {
    out.extend_from_slice(&u32::try_from(bytes.len()).unwrap_or(u32::MAX).to_le_bytes());
    out.extend_from_slice(bytes);
}

/// A frame's payload: a batch's writes, or a commit's tip.
fn decode_payload(mut payload: &[u8]) -> Option<(Vec<Write>, Option<Tip>)> {
    fn take<'a>(p: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
        let (head, rest) = (p.get(..n)?, p.get(n..)?);
        *p = rest;
        Some(head)
    }
    fn bytes(p: &mut &[u8]) -> Option<Vec<u8>> {
        let len = u32::from_le_bytes(take(p, 4)?.try_into().ok()?) as usize;
        take(p, len).map(<[u8]>::to_vec)
    }
    if payload.first() == Some(&COMMIT_TAG) {
        if payload.len() != COMMIT_PAYLOAD {
            return None;
        }
        let global = u64::from_le_bytes(payload[1..9].try_into().ok()?);
        let link = Digest(payload[9..].try_into().ok()?);
        return Some((Vec::new(), Some((global, link))));
    }
    let mut writes = Vec::new();
    while !payload.is_empty() {
        let tag = take(&mut payload, 1)?[0];
        let key = bytes(&mut payload)?;
        let value = match tag {
            1 => Some(bytes(&mut payload)?),
            0 => None,
            _ => return None,
        };
        writes.push((key, value));
    }
    Some((writes, None))
}

/// One frame read back.
#[derive(Debug, PartialEq)]
pub(crate) struct Frame {
    pub(crate) jsn: u64,
    /// A batch's writes (none for a commit frame).
    pub(crate) writes: Vec<Write>,
    /// A commit frame: the tip the commit covered (global, link).
    pub(crate) tip: Option<Tip>,
}

impl Frame {
    /// Whether the frame is a batch a replay may apply (not a commit frame).
    fn is_batch(&self) -> bool {
        self.tip.is_none()
    }
}

/// A frame cut short or failing its check, `at` this offset.
#[derive(Debug, PartialEq)]
pub(crate) struct Damage {
    pub(crate) at: u64,
    pub(crate) detail: String,
}

/// How reading a file's frames ended (tests).
#[cfg(test)]
#[derive(Debug, PartialEq)]
pub(crate) enum FileEnd {
    /// At the end of the file, after a whole frame.
    Clean,
    /// A frame cut short or failing its check, `at` this offset.
    Damaged { at: u64, detail: String },
}

/// Reads every whole, intact frame of one journal file held in memory, in
/// order, up to the first damage.
#[cfg(test)]
pub(crate) fn read_file(bytes: &[u8]) -> (Vec<Frame>, FileEnd) {
    let mut frames = Vec::new();
    let end = match Frames::new(io::Cursor::new(bytes), bytes.len() as u64) {
        Ok(Ok(mut reader)) => loop {
            match reader.next_frame() {
                Ok(Some(Ok(frame))) => frames.push(frame),
                Ok(Some(Err(Damage { at, detail }))) => break FileEnd::Damaged { at, detail },
                Ok(None) => break FileEnd::Clean,
                Err(e) => break FileEnd::Damaged { at: reader.at, detail: e.to_string() },
            }
        },
        Ok(Err(Damage { at, detail })) => FileEnd::Damaged { at, detail },
        Err(e) => FileEnd::Damaged { at: 0, detail: e.to_string() },
    };
    (frames, end)
}

/// Where reading goes on past damage ([`Frames::resync`]).
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Resynced {
    /// The offset of the next intact frame.
    pub(crate) at: u64,
    /// Whether a later write than the damaged one was synced: a commit frame
    /// followed by more frames lies past the damage. Then the damaged bytes
    /// were synced too (writes never overlap a sync) and cannot be a torn
    /// last write.
    pub(crate) synced_after: bool,
}

/// Reads a journal file's frames one at a time: memory holds one frame,
/// never the file (a file of any size, or one claiming any frame length,
/// costs at most one frame of [`FRAME_MAX`] bytes, and only if the file
/// holds that many).
pub(crate) struct Frames<R> {
    src: R,
    format: Format,
    /// Offset of the next frame.
    at: u64,
    /// The file's length.
    len: u64,
    /// The CRC of the frame read last, when the next one must chain to it
    /// (none before the file's first frame, or past damage).
    chain: Option<u32>,
    /// The JSN of the last frame read (resync candidates must not go back).
    last_jsn: u64,
    /// The file ended right after a frame, with no zeros after it.
    cut: bool,
}

/// What reading one frame at an offset found.
enum Read1 {
    /// No bytes but zeros from here to the end: the file's end.
    End,
    Frame(Frame, u32),
    Damaged(&'static str),
}

impl<R: Read + Seek> Frames<R> {
    /// Checks the header of a file of `len` bytes read from `src`.
    pub(crate) fn new(mut src: R, len: u64) -> io::Result<Result<Self, Damage>> {
        let mut header = [0; HEADER];
        let no_magic = || Ok(Err(Damage { at: 0, detail: "no journal magic".into() }));
        if len < HEADER as u64 {
            return no_magic();
        }
        src.read_exact(&mut header)?;
        let Some(format) = Format::of(&header[..MAGIC.len()]) else { return no_magic() };
        Ok(Ok(Self { src, format, at: HEADER as u64, len, chain: None, last_jsn: 0, cut: false }))
    }

    /// The next frame; `None` at a clean end; a damaged frame is reported
    /// where it starts, and reading stops there unless [`Frames::resync`]
    /// finds where to go on.
    pub(crate) fn next_frame(&mut self) -> io::Result<Option<Result<Frame, Damage>>> {
        let at = self.at;
        match self.read_at(at, true)? {
            Read1::End => Ok(None),
            Read1::Frame(frame, crc) => {
                self.chain = Some(crc);
                self.last_jsn = self.last_jsn.max(frame.jsn);
                Ok(Some(Ok(frame)))
            }
            Read1::Damaged(detail) => {
                self.at = self.len; // nothing more unless a resync finds it
                Ok(Some(Err(Damage { at, detail: detail.to_owned() })))
            }
        }
    }

    /// Reads the frame at `at` (the source is positioned there), moving
    /// `self.at` past it. `chained`: the frame must follow `self.chain`.
    fn read_at(&mut self, at: u64, chained: bool) -> io::Result<Read1> {
        let hl = self.format.header();
        let remaining = self.len.saturating_sub(at);
        if remaining == 0 {
            self.cut = at > HEADER as u64;
            return Ok(Read1::End);
        }
        let mut header = [0; 20];
        let got = usize::try_from(remaining).map_or(hl, |r| r.min(hl));
        self.src.read_exact(&mut header[..got])?;
        self.at = at + got as u64;
        // The file is zeroed ahead of its frames (see `ZEROED_AHEAD`): zeros to the end are its end.
        if header[..got].iter().all(|&b| b == 0) && self.rest_is_zeros()? {
            return Ok(Read1::End);
        }
        if got < hl {
            return Ok(Read1::Damaged("a frame header cut short"));
        }
        let len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]) as usize;
        let crc = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
        if len > FRAME_MAX {
            return Ok(Read1::Damaged("a frame longer than any batch"));
        }
        if len as u64 > self.len.saturating_sub(self.at) {
            return Ok(Read1::Damaged("a frame cut short"));
        }
        let mut body = vec![0; hl - 8 + len];
        body[..hl - 8].copy_from_slice(&header[8..hl]);
        self.src.read_exact(&mut body[hl - 8..])?;
        self.at += len as u64;
        if crc32fast::hash(&body) != crc {
            return Ok(Read1::Damaged("a frame failing its CRC"));
        }
        let (prev, jsn) = match self.format {
            Format::V1 => (None, u64::from_le_bytes(body[..8].try_into().unwrap_or_default())),
            Format::V2 => (
                Some(u32::from_le_bytes(body[..4].try_into().unwrap_or_default())),
                u64::from_le_bytes(body[4..12].try_into().unwrap_or_default()),
            ),
        };
        if let (true, Some(prev), Some(chain)) = (chained, prev, self.chain)
            && prev != chain
        {
            return Ok(Read1::Damaged("a frame that does not follow the one before it (the chain is broken)"));
        }
        match decode_payload(&body[hl - 8..]) {
            Some((writes, tip)) => Ok(Read1::Frame(Frame { jsn, writes, tip }, crc)),
            None => Ok(Read1::Damaged("a frame whose payload does not decode")),
        }
    }

    /// Reads the rest of the file a chunk at a time: whether it is all zeros.
    fn rest_is_zeros(&mut self) -> io::Result<bool> {
        let mut chunk = vec![0; 64 << 10];
        while self.at < self.len {
            let n = usize::try_from(self.len - self.at).map_or(chunk.len(), |r| r.min(chunk.len()));
            self.src.read_exact(&mut chunk[..n])?;
            self.at += n as u64;
            if chunk[..n].iter().any(|&b| b != 0) {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// After damage at `damaged`: finds the next offset where an intact frame
    /// starts (one that checks out alone: its length fits, its JSN does not
    /// go back, its CRC and payload are right), positions the reader there
    /// and says whether a later write was synced (see [`Resynced`]). `None`:
    /// nothing intact follows. Reads a window at a time, never the file.
    pub(crate) fn resync(&mut self, damaged: u64) -> io::Result<Option<Resynced>> {
        let hl = self.format.header() as u64;
        let mut window = vec![0u8; 64 << 10];
        let mut base = damaged.saturating_add(1);
        while base.saturating_add(hl) <= self.len {
            let n = usize::try_from((self.len - base).min(window.len() as u64)).unwrap_or(window.len());
            self.src.seek(SeekFrom::Start(base))?;
            self.src.read_exact(&mut window[..n])?;
            let last = n.saturating_sub(hl as usize);
            for i in 0..=last {
                if !self.plausible(&window[i..], base + i as u64) {
                    continue;
                }
                let at = base + i as u64;
                self.src.seek(SeekFrom::Start(at))?;
                if let Read1::Frame(..) = self.read_at(at, false)? {
                    let synced_after = self.synced_after(at)?;
                    self.src.seek(SeekFrom::Start(at))?;
                    self.at = at;
                    self.chain = None;
                    return Ok(Some(Resynced { at, synced_after }));
                }
            }
            // The next window starts where no whole header fitted in this one.
            base += last as u64 + 1;
        }
        self.at = self.len;
        Ok(None)
    }

    /// A cheap look at a candidate header (before any CRC): a length that
    /// fits the file and a JSN that does not go back.
    fn plausible(&self, h: &[u8], at: u64) -> bool {
        let hl = self.format.header();
        if h.len() < hl {
            return false;
        }
        let len = u64::from(u32::from_le_bytes([h[0], h[1], h[2], h[3]]));
        let jsn_at = hl - 8;
        let jsn = u64::from_le_bytes(h[jsn_at..jsn_at + 8].try_into().unwrap_or_default());
        len <= FRAME_MAX as u64
            && at.saturating_add(hl as u64).saturating_add(len) <= self.len
            && jsn >= self.last_jsn
            && jsn - self.last_jsn <= RESYNC_JSN_SPAN
            && h[..hl].iter().any(|&b| b != 0)
    }

    /// Reads on from the intact frame at `at` (without keeping anything):
    /// whether a commit frame is followed by another intact frame.
    fn synced_after(&mut self, at: u64) -> io::Result<bool> {
        self.src.seek(SeekFrom::Start(at))?;
        self.chain = None;
        let mut committed = false;
        loop {
            let here = self.at;
            match self.read_at(here, true)? {
                Read1::Frame(frame, crc) => {
                    if committed {
                        return Ok(true);
                    }
                    committed = frame.tip.is_some();
                    self.chain = Some(crc);
                }
                Read1::End | Read1::Damaged(_) => return Ok(false),
            }
        }
    }
}

/// Exactly one frame (as `encode_frame` wrote it into a buffer of its own:
/// the copy of a batch sled holds while applying it key by key). Either
/// format: a copy written before format 2 has the shorter header.
pub(crate) fn decode_frame(bytes: &[u8]) -> Result<Frame, String> {
    let len = bytes.get(..4).map_or(0, |b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize);
    let format = if bytes.len() == Format::V1.header() + len { Format::V1 } else { Format::V2 };
    let mut one = Frames {
        src: io::Cursor::new(bytes),
        format,
        at: 0,
        len: bytes.len() as u64,
        chain: None,
        last_jsn: 0,
        cut: false,
    };
    match one.next_frame() {
        Ok(Some(Ok(frame))) if one.at == one.len && frame.is_batch() => Ok(frame),
        Ok(Some(Ok(_))) if one.at != one.len => Err("bytes after the frame".into()),
        Ok(Some(Ok(_))) => Err("a commit frame, not a batch".into()),
        Ok(Some(Err(Damage { detail, .. }))) => Err(detail),
        Ok(None) => Err("no frame".into()),
        Err(e) => Err(e.to_string()),
    }
}

/// The log id in a file's header (`None`: no header, or written before the log had an id).
fn file_id(bytes: &[u8]) -> Option<[u8; 16]> {
    let id: [u8; 16] = bytes.get(MAGIC.len()..HEADER)?.try_into().ok()?;
    (id != [0; 16]).then_some(id)
}

/// The journal's files in `dir`, oldest first, with their numbers.
pub(crate) fn files(dir: &Path) -> io::Result<Vec<(u64, PathBuf)>> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut out = Vec::new();
    for entry in entries {
        let entry = entry?;
        let name = entry.file_name();
        // Anything else in the directory is not ours and is left alone.
        if let Some(n) = name.to_str().filter(|n| n.len() == 16).and_then(|n| u64::from_str_radix(n, 16).ok()) {
            out.push((n, entry.path()));
        }
    }
    out.sort();
    Ok(out)
}

fn file_name(number: u64) -> String {
    format!("{number:016x}")
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// What opening found in the journal.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Replayed {
    /// Journal files found.
    pub files: usize,
    /// Frames applied to sled (sled did not hold them).
    pub applied: u64,
    /// Frames skipped: sled already held them.
    pub skipped: u64,
    /// Why replay stopped before the end, if it did: a frame cut short or
    /// failing its check, or a gap between sled and the journal.
    pub stopped: Option<String>,
    /// Whether the stop is damage whatever the head says: a gap, a bad frame
    /// in a file older than the newest, or one a later synced write follows.
    /// A bad frame in the newest file's last write is where a crash
    /// interrupts a write; whether it took anything acknowledged with it is
    /// the head check's to say ([`super::HeadCheck`]).
    pub damaged: bool,
    /// A batch sled held in part (the process stopped while it was being
    /// applied key by key), completed from its copy in sled before the
    /// replay: its JSN. Never acknowledged (its commit had not begun).
    pub completed: Option<u64>,
    /// Damage replay read past because continuity was proven: the next
    /// intact frame carries the very next number sled needed (or a number
    /// sled holds), so the damaged bytes held nothing it lacked — a frame a
    /// crash tore before its commit (its number then used again), or bytes
    /// past a file's last frame. One line per bridge, saying where.
    pub bridged: Vec<String>,
    /// The newest tip an intact commit frame recorded (global sequence
    /// number and link), leaving out the commit frame of a write that may
    /// have been torn: how far the log was acknowledged since the head file
    /// last moved. Opening takes the newer of this and the head file.
    pub journal_head: Option<(u64, Digest)>,
    /// Records in intact frames past where replay stopped, which sled does
    /// not hold and replay could not apply (never over a hole): instance
    /// name and sequence number, in frame order, the first
    /// [`LOST_LISTED`]. What the damaged bytes themselves held cannot be named.
    pub lost: Vec<(String, u64)>,
    /// How many more such records there were than `lost` lists.
    pub lost_unlisted: u64,
}

/// At most this many records are listed in [`Replayed::lost`].
pub const LOST_LISTED: usize = 10_000;

impl Replayed {
    /// Notes the records of a batch replay could not apply.
    fn lose(&mut self, writes: &[Write]) {
        for (key, value) in writes {
            let Some((name, seq)) = value.as_ref().and_then(|_| keys::parse_record(key)) else { continue };
            if self.lost.len() < LOST_LISTED {
                self.lost.push((String::from_utf8_lossy(name).into_owned(), seq));
            } else {
                self.lost_unlisted += 1;
            }
        }
    }
}

/// Where appending goes on after [`replay`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Resume {
    /// The number of the next file (past every file there).
    pub(crate) number: u64,
    /// The next JSN (past sled's and every frame's).
    pub(crate) next_jsn: u64,
}

/// A journal file of another log.
#[derive(Debug)]
pub(crate) struct Foreign {
    pub(crate) file: PathBuf,
    pub(crate) found: [u8; 16],
    pub(crate) ours: [u8; 16],
}

/// Damage replay has read past, not yet decided: the next batch tells
/// whether it held anything sled lacks.
struct Undecided {
    /// Where, and what.
    text: String,
    /// It may be the newest file's torn last write (no synced write after it).
    torn: bool,
    /// It is in the newest file.
    newest: bool,
}

impl Undecided {
    /// Why replay stops at it, and whether that is damage.
    fn verdict(self) -> (String, bool) {
        match (self.torn, self.newest) {
            (true, _) => (
                format!(
                    "{}, the newest file's last write: where a crash interrupts a write (the head check tells whether anything acknowledged is missing)",
                    self.text
                ),
                false,
            ),
            (false, true) => {
                (format!("{}, in the newest file, before writes that were synced: damage", self.text), true)
            }
            (false, false) => (format!("{}, not the newest: damage", self.text), true),
        }
    }
}

/// Applies, in order, every frame of the journal in `log_dir` that sled
/// (which holds every batch up to `held`, and belongs to log `id` if it
/// has one yet) does not hold, through `apply`. A file of another log
/// stops everything before anything is applied.
pub(crate) fn replay<E: From<Foreign>>(
    log_dir: &Path,
    held: u64,
    id: Option<[u8; 16]>,
    mut apply: impl FnMut(u64, Vec<Write>) -> Result<(), E>,
) -> Result<Result<(Replayed, Resume), E>, io::Error> {
    let found = files(&log_dir.join(DIR))?;
    let mut report = Replayed { files: found.len(), ..Replayed::default() };
    let number = found.last().map_or(1, |(n, _)| n.saturating_add(1));
    let mut resume = Resume { number, next_jsn: held };
    let mut held = held;
    let count = found.len();
    // Every file's header first (a few bytes each): another log's file
    // refuses the replay before anything is applied.
    for (_, path) in &found {
        let mut header = Vec::with_capacity(HEADER);
        Read::read_to_end(&mut Read::take(File::open(path)?, HEADER as u64), &mut header)?;
        if let (Some(ours), Some(theirs)) = (id, file_id(&header))
            && ours != theirs
        {
            return Ok(Err(E::from(Foreign { file: path.clone(), found: theirs, ours })));
        }
    }
    // Then frame by frame: memory holds one frame, whatever the files hold.
    // Past damage, reading goes on at the next intact frame (in the same
    // file, or the next); the damage stops the replay unless that frame
    // proves, by its number, that nothing sled lacks was in the damaged bytes.
    let mut damage: Option<Undecided> = None;
    for (i, (_, path)) in found.iter().enumerate() {
        let newest = i + 1 == count;
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let file = File::open(path)?;
        let len = file.metadata()?.len();
        // Commit frames count toward the journal's head, except those that
        // may belong to a torn last write (past damage no synced write follows).
        let mut tips_count = true;
        let mut frames = match Frames::new(io::BufReader::with_capacity(1 << 20, file), len)? {
            Ok(frames) => Some(frames),
            Err(Damage { at, detail }) => {
                let text = format!("{detail} at offset {at} of journal file {name}");
                if report.stopped.is_none() {
                    damage = Some(merge(damage.take(), text, newest, newest));
                }
                None
            }
        };
        while let Some(reader) = frames.as_mut() {
            let frame = match reader.next_frame()? {
                None => {
                    // The writer zeroes a file ahead of its frames a whole chunk at a
                    // time, before writing them (a crash can cut the zeros short,
                    // never leave a frame last in a file of odd length): the newest
                    // file ending right after a frame was cut at a frame boundary.
                    if newest && reader.cut && len % ZEROED_AHEAD != 0 && report.stopped.is_none() && damage.is_none() {
                        report.stopped = Some(format!(
                            "journal file {name} ends right after a frame, {len} bytes long, without the zeros written ahead of its frames: it was cut at a frame boundary, and what came after is lost (how much cannot be told)"
                        ));
                        report.damaged = true;
                    }
                    break;
                }
                Some(Ok(frame)) => frame,
                Some(Err(Damage { at, detail })) => {
                    let text = format!("{detail} at offset {at} of journal file {name}");
                    let resynced = reader.resync(at)?;
                    let synced = resynced.as_ref().is_some_and(|r| r.synced_after);
                    tips_count &= synced;
                    if report.stopped.is_none() {
                        damage = Some(merge(damage.take(), text, newest && !synced, newest));
                    }
                    if resynced.is_none() {
                        break;
                    }
                    continue;
                }
            };
            resume.next_jsn = resume.next_jsn.max(frame.jsn);
            if let Some(tip) = frame.tip {
                if tips_count && report.journal_head.is_none_or(|(g, _)| tip.0 >= g) {
                    report.journal_head = Some(tip);
                }
                // A commit frame proves continuity only for batches sled holds
                // already (its number is the newest batch's before it).
                if frame.jsn <= held
                    && let Some(d) = damage.take()
                {
                    report.bridged.push(format!(
                        "{}; a commit frame after it shows sled holds every batch up to {}: nothing lost",
                        d.text, frame.jsn
                    ));
                }
                continue;
            }
            if report.stopped.is_some() {
                // Past the stop: counting for the next JSN and the head, and naming what is lost.
                if frame.jsn > held {
                    report.lose(&frame.writes);
                }
                continue;
            }
            if let Some(d) = damage.take() {
                if frame.jsn > held.saturating_add(1) {
                    // Frames sled lacks may have been in the damaged bytes: a hole.
                    let (why, damaged) = d.verdict();
                    report.stopped = Some(why);
                    report.damaged = damaged;
                    report.lose(&frame.writes);
                    continue;
                }
                report.bridged.push(format!(
                    "{}; the journal goes on at frame {} where sled needed {}: nothing lost",
                    d.text,
                    frame.jsn,
                    held.saturating_add(1)
                ));
            }
            if frame.jsn <= held {
                report.skipped += 1;
            } else if Some(frame.jsn) == held.checked_add(1) {
                if let Err(e) = apply(frame.jsn, frame.writes) {
                    return Ok(Err(e));
                }
                held = frame.jsn;
                report.applied += 1;
            } else {
                report.stopped =
                    Some(format!("sled holds batches up to {held} and the journal goes on at {}: a gap", frame.jsn));
                report.damaged = true;
                report.lose(&frame.writes);
            }
        }
    }
    if let Some(d) = damage {
        // No intact batch after it: nothing proves continuity.
        let (why, damaged) = d.verdict();
        report.stopped = Some(why);
        report.damaged = damaged;
    }
    resume.next_jsn = resume.next_jsn.saturating_add(1);
    Ok(Ok((report, resume)))
}

/// Damage found while earlier damage is still undecided: one stretch.
fn merge(earlier: Option<Undecided>, text: String, torn: bool, newest: bool) -> Undecided {
    match earlier {
        Some(e) => Undecided { text: format!("{}; then {text}", e.text), torn: e.torn && torn, newest },
        None => Undecided { text, torn, newest },
    }
}

/// The journal of a writable log: frames waiting to be written, and the file they go to.
pub(crate) struct Journal {
    dir: PathBuf,
    /// Frames appended since the last write, the next JSN and the chain.
    /// Held while a batch is applied to sled, so frames are in sled's order.
    pending: Mutex<Pending>,
    /// The file; held across a write and the sync after it, so that no
    /// write ever overlaps a sync (only the last write before a crash can be torn).
    out: Mutex<Out>,
    /// The size at which a file is due for a checkpoint.
    file_max: u64,
}

pub(crate) struct Pending {
    pub(crate) buf: Vec<u8>,
    pub(crate) next_jsn: u64,
    /// The CRC of the newest frame: the next one chains to it.
    pub(crate) chain: u32,
}

impl Pending {
    /// Appends the frame of batch `writes` and returns its JSN and where it
    /// starts in `buf`; [`Pending::keep`] or [`Pending::drop_from`] follows.
    pub(crate) fn frame(&mut self, writes: &[Write]) -> (u64, usize, u32) {
        let (jsn, start) = (self.next_jsn, self.buf.len());
        let crc = encode_frame(jsn, self.chain, writes, &mut self.buf);
        (jsn, start, crc)
    }

    /// The batch was applied: its frame stays, and the next goes on after it.
    pub(crate) fn keep(&mut self, jsn: u64, crc: u32) {
        self.next_jsn = jsn.saturating_add(1);
        self.chain = crc;
    }

    /// The batch failed: its frame goes.
    pub(crate) fn drop_from(&mut self, start: usize) {
        self.buf.truncate(start);
    }
}

struct Out {
    /// `None` until the first write after opening or a rotation creates it.
    file: Option<Arc<File>>,
    number: u64,
    len: u64,
    /// Bytes of the file written so far, zeros ahead of the frames included.
    zeroed: u64,
    /// The other buffer, swapped with `pending.buf` (keeps its allocation).
    spare: Vec<u8>,
    /// The newest tip a commit frame was written for.
    tip: u64,
}

impl Journal {
    /// A journal that goes on where [`replay`] left it (its first frame chains to nothing: 0).
    pub(crate) fn new(log_dir: &Path, resume: Resume, file_max: u64) -> Self {
        Self {
            dir: log_dir.join(DIR),
            pending: Mutex::new(Pending { buf: Vec::new(), next_jsn: resume.next_jsn, chain: 0 }),
            out: Mutex::new(Out { file: None, number: resume.number, len: 0, zeroed: 0, spare: Vec::new(), tip: 0 }),
            file_max,
        }
    }

    /// The frames waiting; hold it while applying the batch they describe.
    pub(crate) fn pending(&self) -> MutexGuard<'_, Pending> {
        lock(&self.pending)
    }

    /// A commit: writes every frame appended so far and, given the tip they
    /// reach (global, link), a commit frame naming it, with one write, then
    /// makes them durable with one `fdatasync`. `id` is asked for the log's
    /// id when a file is created. Returns whether the file is due for a
    /// checkpoint.
    pub(crate) fn commit(&self, tip: Option<Tip>, id: impl FnOnce() -> Option<[u8; 16]>) -> io::Result<bool> {
        self.commit_locked(&mut lock(&self.out), tip, id)
    }

    fn commit_locked(
        &self,
        out: &mut Out,
        tip: Option<Tip>,
        id: impl FnOnce() -> Option<[u8; 16]>,
    ) -> io::Result<bool> {
        let mut buf = std::mem::take(&mut out.spare);
        {
            let mut pending = lock(&self.pending);
            std::mem::swap(&mut buf, &mut pending.buf);
            // A commit behind one already written (another thread's, newer) adds nothing.
            if let Some(tip) = tip.filter(|t| t.0 > out.tip) {
                let jsn = pending.next_jsn.saturating_sub(1);
                pending.chain = encode_commit(jsn, pending.chain, tip, &mut buf);
                out.tip = tip.0;
            }
        }
        let written = self.write_buf(out, &buf, id);
        let wrote = !buf.is_empty();
        buf.clear();
        out.spare = buf;
        written?;
        if wrote && let Some(f) = &out.file {
            // Under the lock: the next write waits for this sync.
            f.sync_data()?;
        }
        Ok(out.len >= self.file_max)
    }

    fn write_buf(&self, out: &mut Out, buf: &[u8], id: impl FnOnce() -> Option<[u8; 16]>) -> io::Result<()> {
        if buf.is_empty() {
            return Ok(());
        }
        let file = match &out.file {
            Some(f) => f.clone(),
            None => self.open_file(out, id)?,
        };
        let end = out.len + buf.len() as u64;
        if end > out.zeroed {
            // Whole chunks past the frames' end, so the next writes overwrite.
            let target = end.div_ceil(ZEROED_AHEAD).saturating_add(1).saturating_mul(ZEROED_AHEAD);
            let zeros = vec![0; usize::try_from(target - out.zeroed).unwrap_or(0)];
            file.write_all_at(&zeros, out.zeroed)?;
            out.zeroed = target;
        }
        file.write_all_at(buf, out.len)?;
        out.len = end;
        Ok(())
    }

    /// Creates file `out.number` with its header, durably (the new name too,
    /// before any frame in it can be acknowledged).
    fn open_file(&self, out: &mut Out, id: impl FnOnce() -> Option<[u8; 16]>) -> io::Result<Arc<File>> {
        if !self.dir.exists() {
            std::fs::create_dir_all(&self.dir)?;
            if let Some(parent) = self.dir.parent() {
                sync_dir(parent)?;
            }
        }
        let path = self.dir.join(file_name(out.number));
        let f = OpenOptions::new().write(true).create_new(true).open(path)?;
        let mut header = [0; HEADER];
        header[..MAGIC.len()].copy_from_slice(MAGIC);
        header[MAGIC.len()..].copy_from_slice(&id().unwrap_or_default());
        f.write_all_at(&header, 0)?;
        f.sync_data()?;
        sync_dir(&self.dir)?;
        let f = Arc::new(f);
        out.file = Some(f.clone());
        out.len = HEADER as u64;
        out.zeroed = out.len;
        Ok(f)
    }

    /// Creates the current file if no frame created it yet (durably, name
    /// and header), so that the head can name it as where the log goes on.
    /// Returns its number.
    pub(crate) fn start_file(&self, id: impl FnOnce() -> Option<[u8; 16]>) -> io::Result<u64> {
        let mut out = lock(&self.out);
        if out.file.is_none() {
            self.open_file(&mut out, id)?;
        }
        Ok(out.number)
    }

    /// Ends the current file: writes what is pending, syncs it, and sends
    /// later frames to a new file. Returns that new file's number: every
    /// batch applied before the rotation is in a file below it, so those
    /// files may go once sled's files are durable.
    pub(crate) fn rotate(&self, id: impl FnOnce() -> Option<[u8; 16]>) -> io::Result<u64> {
        let mut out = lock(&self.out);
        self.commit_locked(&mut out, None, id)?;
        if out.file.take().is_some() {
            out.number += 1;
            out.len = 0;
            out.zeroed = 0;
        }
        Ok(out.number)
    }
}

/// Deletes every journal file in `dir` numbered below `number` (sled holds what they held).
pub(crate) fn remove_before(dir: &Path, number: u64) -> io::Result<()> {
    let old: Vec<_> = files(dir)?.into_iter().filter(|(n, _)| *n < number).collect();
    for (_, path) in &old {
        std::fs::remove_file(path)?;
    }
    if !old.is_empty() {
        sync_dir(dir)?;
    }
    Ok(())
}

/// Moves every journal file in `dir` numbered below `number` into `to`
/// (created if need be) instead of deleting it: frames a replay could not
/// apply, kept for whoever investigates the loss that was accepted, and out
/// of every later replay's way. Each move is a rename within the log's
/// directory; the directories are synced after.
pub(crate) fn keep_before(dir: &Path, number: u64, to: &Path) -> io::Result<()> {
    let old: Vec<_> = files(dir)?.into_iter().filter(|(n, _)| *n < number).collect();
    if old.is_empty() {
        return Ok(());
    }
    std::fs::create_dir_all(to)?;
    for (_, path) in &old {
        if let Some(name) = path.file_name() {
            std::fs::rename(path, to.join(name))?;
        }
    }
    sync_dir(to)?;
    if let Some(parent) = to.parent() {
        sync_dir(parent)?;
    }
    sync_dir(dir)
}

/// Bytes in the journal's files in `dir`.
pub(crate) fn size(dir: &Path) -> u64 {
    files(dir).unwrap_or_default().iter().filter_map(|(_, p)| std::fs::metadata(p).ok()).map(|m| m.len()).sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(id: Option<[u8; 16]>) -> [u8; HEADER] {
        let mut h = [0; HEADER];
        h[..MAGIC.len()].copy_from_slice(MAGIC);
        h[MAGIC.len()..].copy_from_slice(&id.unwrap_or_default());
        h
    }

    /// A replay refused (in these tests: only for a foreign file).
    #[derive(Debug)]
    struct Refused(PathBuf);

    impl From<Foreign> for Refused {
        fn from(f: Foreign) -> Self {
            Self(f.file)
        }
    }

    #[test]
    fn a_journal_of_another_log_is_refused_before_anything_is_applied() {
        let dir = journal_of(&[&[1, 2]]);
        let refused = replay(dir.path(), 0, Some([8; 16]), |_, _| -> Result<(), Refused> {
            panic!("nothing of another log's journal is applied")
        });
        let Ok(Err(Refused(file))) = refused else { panic!("not refused: {refused:?}") };
        assert_eq!(file.file_name().and_then(|n| n.to_str()), Some("0000000000000001"));
        // A log without an id yet (its first batch is in the journal) takes it.
        let mut applied = Vec::new();
        replay(dir.path(), 0, None, |jsn, _| {
            applied.push(jsn);
            Ok::<(), Refused>(())
        })
        .expect("read")
        .expect("apply");
        assert_eq!(applied, vec![1, 2]);
    }

    fn write(k: &str, v: Option<&str>) -> Write {
        (k.as_bytes().to_vec(), v.map(|v| v.as_bytes().to_vec()))
    }

    fn batch(jsn: u64, writes: Vec<Write>) -> Frame {
        Frame { jsn, writes, tip: None }
    }

    #[test]
    fn frames_read_back_and_damage_is_found_where_it_is() {
        let mut bytes = header(None).to_vec();
        let a = vec![write("ra", Some("one")), write("ga", None)];
        let b = vec![write("rb", Some(""))];
        let crc = encode_frame(7, 0, &a, &mut bytes);
        let second = bytes.len();
        let crc = encode_frame(8, crc, &b, &mut bytes);
        let third = bytes.len();
        encode_commit(8, crc, (42, Digest::of(b"tip")), &mut bytes);
        let (frames, end) = read_file(&bytes);
        assert_eq!(end, FileEnd::Clean);
        let commit = Frame { jsn: 8, writes: Vec::new(), tip: Some((42, Digest::of(b"tip"))) };
        assert_eq!(frames, vec![batch(7, a.clone()), batch(8, b), commit]);

        // Every cut inside the second frame keeps the first and names the offset.
        for cut in second + 1..third {
            let (frames, end) = read_file(&bytes[..cut]);
            assert_eq!(frames.len(), 1, "cut at {cut}");
            assert!(matches!(end, FileEnd::Damaged { at, .. } if at == second as u64), "cut at {cut}: {end:?}");
        }
        // A flipped bit anywhere in the second frame (its chain included) fails it.
        for i in second..third {
            let mut flipped = bytes.clone();
            flipped[i] ^= 0x10;
            let (frames, end) = read_file(&flipped);
            assert_eq!(frames, vec![batch(7, a.clone())], "bit at {i}");
            assert!(matches!(end, FileEnd::Damaged { .. }), "bit at {i}");
        }
        assert!(matches!(read_file(b"garbage!").1, FileEnd::Damaged { at: 0, .. }));
        assert_eq!(read_file(&header(None)), (Vec::new(), FileEnd::Clean));
        assert!(matches!(read_file(MAGIC).1, FileEnd::Damaged { at: 0, .. }), "a header cut short");
    }

    /// A frame that checks out alone but does not follow the frame before it
    /// (one moved, or dropped, between two others) is damage where it starts.
    #[test]
    fn a_frame_that_breaks_the_chain_is_damage() {
        let mut bytes = header(None).to_vec();
        let crc = encode_frame(1, 0, &[write("a", Some("1"))], &mut bytes);
        let _dropped = encode_frame(2, crc, &[write("b", Some("2"))], &mut Vec::new());
        let at = bytes.len();
        encode_frame(3, 0xdead_beef, &[write("c", Some("3"))], &mut bytes);
        let (frames, end) = read_file(&bytes);
        assert_eq!(frames.len(), 1);
        assert!(
            matches!(end, FileEnd::Damaged { at: a, ref detail } if a == at as u64 && detail.contains("chain")),
            "{end:?}"
        );
    }

    /// A reader that says how much it was asked for at once.
    struct Counting<'a> {
        bytes: io::Cursor<&'a [u8]>,
        largest: usize,
    }

    impl Read for Counting<'_> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            self.largest = self.largest.max(buf.len());
            self.bytes.read(buf)
        }
    }

    impl Seek for Counting<'_> {
        fn seek(&mut self, to: SeekFrom) -> io::Result<u64> {
            self.bytes.seek(to)
        }
    }

    /// Opening reads a journal file a frame at a time, never whole: a
    /// file of any size (a damaged or foreign one included) costs one frame
    /// of memory. The zeros ahead of the frames end the file; anything
    /// after them is damage where the zeros began.
    #[test]
    fn a_journal_file_is_read_a_frame_at_a_time() {
        let mut bytes = header(None).to_vec();
        let mut crc = 0;
        for jsn in 1..=200 {
            crc = encode_frame(jsn, crc, &[write("record", Some("value"))], &mut bytes);
        }
        let frames_end = bytes.len();
        bytes.resize(frames_end + (4 << 20), 0);
        let mut src = Counting { bytes: io::Cursor::new(&bytes), largest: 0 };
        let mut frames = Frames::new(&mut src, bytes.len() as u64).expect("read").expect("header");
        let mut read = 0;
        while let Some(frame) = frames.next_frame().expect("read") {
            assert_eq!(frame.expect("intact").jsn, read + 1);
            read += 1;
        }
        assert_eq!(read, 200);
        assert!(src.largest <= 64 << 10, "asked for {} bytes at once", src.largest);

        // One stray byte far into the zeros: the file does not end cleanly,
        // and looking past it for a frame reads a window at a time.
        bytes[frames_end + (3 << 20)] = 1;
        let (frames, end) = read_file(&bytes);
        assert_eq!(frames.len(), 200);
        assert!(matches!(end, FileEnd::Damaged { at, .. } if at == frames_end as u64), "{end:?}");
        let mut src = Counting { bytes: io::Cursor::new(&bytes), largest: 0 };
        let mut frames = Frames::new(&mut src, bytes.len() as u64).expect("read").expect("header");
        while let Some(Ok(_)) = frames.next_frame().expect("read") {}
        assert_eq!(frames.resync(frames_end as u64).expect("read"), None, "nothing intact after the stray byte");
        assert!(src.largest <= 64 << 10, "asked for {} bytes at once", src.largest);

        // A header claiming a huge frame the file does not hold: no allocation, damage.
        let mut claim = header(None).to_vec();
        claim.extend_from_slice(&(FRAME_MAX as u32).to_le_bytes());
        claim.extend_from_slice(&[1; 16]);
        let (frames, end) = read_file(&claim);
        assert!(frames.is_empty());
        assert!(matches!(end, FileEnd::Damaged { ref detail, .. } if detail == "a frame cut short"), "{end:?}");
    }

    /// A commit writes the pending frames and one commit frame naming the
    /// tip, chained; a commit behind one already written adds no commit
    /// frame; a rotation sends later frames to the next file.
    #[test]
    fn commits_and_rotations_keep_frames_in_order_across_files() {
        let dir = tempfile::tempdir().expect("dir");
        let j = Journal::new(dir.path(), Resume { number: 1, next_jsn: 1 }, 1 << 20);
        let push = |k: &str| {
            let mut p = j.pending();
            let (jsn, _, crc) = p.frame(&[write(k, Some("v"))]);
            p.keep(jsn, crc);
        };
        let tip = |g: u64| Some((g, Digest::of(&g.to_le_bytes())));
        push("a");
        push("b");
        assert!(!j.commit(tip(2), || None).expect("commit"), "a small file is not due");
        push("c");
        j.commit(tip(1), || None).expect("a commit behind adds no commit frame");
        assert_eq!(j.rotate(|| None).expect("rotate"), 2);
        push("d");
        j.commit(tip(4), || None).expect("commit");
        let found = files(&dir.path().join(DIR)).expect("files");
        assert_eq!(found.iter().map(|(n, _)| *n).collect::<Vec<_>>(), vec![1, 2]);
        let frames: Vec<Vec<Frame>> =
            found.iter().map(|(_, p)| read_file(&std::fs::read(p).expect("read")).0).collect();
        let shape = |fs: &[Frame]| fs.iter().map(|f| (f.jsn, f.tip.map(|t| t.0))).collect::<Vec<_>>();
        assert_eq!(shape(&frames[0]), vec![(1, None), (2, None), (2, Some(2)), (3, None)]);
        assert_eq!(shape(&frames[1]), vec![(4, None), (4, Some(4))]);
        remove_before(&dir.path().join(DIR), 2).expect("remove");
        let found = files(&dir.path().join(DIR)).expect("files");
        assert_eq!(found.iter().map(|(n, _)| *n).collect::<Vec<_>>(), vec![2]);
        // Nothing pending: a rotation of an empty journal keeps the number.
        j.commit(None, || None).expect("nothing to write");
        assert_eq!(j.rotate(|| None).expect("rotate"), 3);
        assert_eq!(j.rotate(|| None).expect("rotate again, nothing written"), 3);
    }

    /// One frame of a journal file written by a test: a batch, a commit, or
    /// (format 1) a batch with the shorter header.
    #[derive(Clone, Copy)]
    enum F {
        B(u64),
        C(u64),
    }

    /// Writes files of frames into a journal directory (format 2, chained),
    /// each file ending with zeros written ahead.
    fn journal_with(files: &[&[F]]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().expect("dir");
        std::fs::create_dir(dir.path().join(DIR)).expect("mkdir");
        let (mut chain, mut last) = (0, 0);
        for (i, frames) in files.iter().enumerate() {
            let mut bytes = header(Some([9; 16])).to_vec();
            for f in *frames {
                chain = match *f {
                    F::B(jsn) => {
                        last = jsn;
                        encode_frame(jsn, chain, &[write(&format!("k{jsn}"), Some("v"))], &mut bytes)
                    }
                    F::C(global) => encode_commit(last, chain, (global, Digest::of(&global.to_le_bytes())), &mut bytes),
                };
            }
            bytes.extend_from_slice(&[0; 64]); // zeros written ahead
            std::fs::write(dir.path().join(DIR).join(file_name(i as u64 + 1)), bytes).expect("write");
        }
        dir
    }

    /// Files of batches only.
    fn journal_of(files: &[&[u64]]) -> tempfile::TempDir {
        let files: Vec<Vec<F>> = files.iter().map(|f| f.iter().map(|&j| F::B(j)).collect()).collect();
        journal_with(&files.iter().map(Vec::as_slice).collect::<Vec<_>>())
    }

    fn replayed(dir: &Path, held: u64) -> (Vec<u64>, Replayed, Resume) {
        let mut applied = Vec::new();
        let (report, resume) = replay(dir, held, Some([9; 16]), |jsn, writes| {
            assert_eq!(writes, vec![write(&format!("k{jsn}"), Some("v"))]);
            applied.push(jsn);
            Ok::<(), Refused>(())
        })
        .expect("read")
        .expect("apply");
        (applied, report, resume)
    }

    /// Where the `n`th frame (from 0) of journal file `number` starts.
    fn frame_offset(dir: &Path, number: u64, n: usize) -> usize {
        let bytes = std::fs::read(dir.join(DIR).join(file_name(number))).expect("read");
        let mut at = HEADER;
        for _ in 0..n {
            at += Format::V2.header() + u32::from_le_bytes(bytes[at..at + 4].try_into().expect("4")) as usize;
        }
        at
    }

    fn flip(dir: &Path, number: u64, at: usize) {
        let path = dir.join(DIR).join(file_name(number));
        let mut bytes = std::fs::read(&path).expect("read");
        bytes[at] ^= 1;
        std::fs::write(&path, &bytes).expect("damage");
    }

    #[test]
    fn replay_applies_what_sled_lacks_in_order_and_stops_at_a_hole() {
        let dir = journal_of(&[&[1, 2, 3], &[4, 5]]);
        // sled holds up to 2: 3, 4, 5 are applied, 1 and 2 skipped.
        let (applied, report, resume) = replayed(dir.path(), 2);
        assert_eq!(applied, vec![3, 4, 5]);
        assert_eq!((report.files, report.applied, report.skipped, report.stopped), (2, 3, 2, None));
        assert_eq!(resume, Resume { number: 3, next_jsn: 6 });
        // sled ahead of the whole journal (it wrote more than the journal kept): nothing to do.
        let (applied, report, resume) = replayed(dir.path(), 9);
        assert!(applied.is_empty() && report.stopped.is_none());
        assert_eq!(resume.next_jsn, 10);
        // sled rolled back to before the journal's first frame: a gap, nothing applied over it.
        let dir = journal_of(&[&[4, 5]]);
        let (applied, report, _) = replayed(dir.path(), 1);
        assert!(applied.is_empty());
        assert!(report.damaged && report.stopped.as_deref().is_some_and(|s| s.contains("gap")), "{report:?}");
    }

    #[test]
    fn replay_stops_at_damage_and_calls_only_the_newest_files_tail_interrupted() {
        let dir = journal_of(&[&[1, 2, 3], &[4, 5]]);
        // Damage the second frame of the older file: 3, 4, 5 must not be applied over the hole.
        flip(dir.path(), 1, frame_offset(dir.path(), 1, 1) + Format::V2.header());
        let (applied, report, resume) = replayed(dir.path(), 0);
        assert_eq!(applied, vec![1]);
        assert!(report.damaged, "{report:?}");
        assert_eq!(resume.next_jsn, 6, "numbers past the damage are never reused");
        assert!(report.bridged.is_empty());

        // The same damage in the newest file, with no commit after it: it may be the torn last write.
        let dir = journal_of(&[&[1, 2, 3]]);
        flip(dir.path(), 1, frame_offset(dir.path(), 1, 1) + Format::V2.header());
        let (applied, report, _) = replayed(dir.path(), 0);
        assert_eq!(applied, vec![1]);
        assert!(!report.damaged && report.stopped.as_deref().is_some_and(|s| s.contains("the newest")), "{report:?}");
    }

    /// The journal is the head between checkpoints: the newest intact commit
    /// frame is [`Replayed::journal_head`], wherever replay stopped.
    #[test]
    fn the_newest_commit_frame_is_the_journals_head() {
        let dir = journal_with(&[&[F::B(1), F::C(10), F::B(2), F::C(11)], &[F::B(3), F::C(12)]]);
        let (applied, report, _) = replayed(dir.path(), 0);
        assert_eq!(applied, vec![1, 2, 3]);
        assert_eq!(report.journal_head.map(|h| h.0), Some(12));
        assert_eq!(report.journal_head.map(|h| h.1), Some(Digest::of(&12u64.to_le_bytes())));
        let dir = journal_of(&[&[1, 2]]);
        assert_eq!(replayed(dir.path(), 0).1.journal_head, None, "format-1 style: no commit frames");
    }

    /// Damage followed by a commit frame and more frames was synced before
    /// a later write (writes never overlap a sync), so it cannot be a torn
    /// last write: damage, even in the newest file, and the commits after
    /// it count — the head then says what was lost.
    #[test]
    fn damage_before_a_later_synced_write_is_damage_and_its_commits_count() {
        let frames = [F::B(1), F::C(1), F::B(2), F::C(2), F::B(3), F::C(3)];
        let dir = journal_with(&[&frames]);
        flip(dir.path(), 1, frame_offset(dir.path(), 1, 2) + Format::V2.header() + 2);
        let (applied, report, resume) = replayed(dir.path(), 0);
        assert_eq!(applied, vec![1]);
        assert!(report.damaged, "{report:?}");
        assert!(report.stopped.as_deref().is_some_and(|s| s.contains("synced")), "{report:?}");
        assert_eq!(report.journal_head.map(|h| h.0), Some(3), "the commits after the damage count");
        assert_eq!(resume.next_jsn, 4);
    }

    /// Damage with at most one write after it (its frames and one commit
    /// frame at its end) may be the write a crash tore: in the newest file,
    /// not damage, and that write's commit frame does not count.
    #[test]
    fn a_torn_last_write_is_not_damage_and_its_commit_does_not_count() {
        let dir = journal_with(&[&[F::B(1), F::C(1), F::B(2), F::B(3), F::C(3)]]);
        flip(dir.path(), 1, frame_offset(dir.path(), 1, 2) + Format::V2.header() + 2);
        let (applied, report, _) = replayed(dir.path(), 0);
        assert_eq!(applied, vec![1]);
        assert!(!report.damaged && report.stopped.as_deref().is_some_and(|s| s.contains("last write")), "{report:?}");
        assert_eq!(report.journal_head.map(|h| h.0), Some(1), "the torn write's commit is not the head");

        // The same damage in an older file is damage (that file was synced when it was rotated).
        let dir = journal_with(&[&[F::B(1), F::C(1), F::B(2), F::B(3), F::C(3)], &[F::B(4), F::C(4)]]);
        flip(dir.path(), 1, frame_offset(dir.path(), 1, 2) + Format::V2.header() + 2);
        let (applied, report, _) = replayed(dir.path(), 0);
        assert_eq!(applied, vec![1]);
        assert!(report.damaged, "{report:?}");
        assert_eq!(report.journal_head.map(|h| h.0), Some(4), "the later file's commits count");
    }

    /// A damaged commit frame loses nothing: the batch after it goes on at
    /// the number sled needs, and a commit frame whose number sled holds
    /// proves continuity too.
    #[test]
    fn a_damaged_commit_frame_is_read_past() {
        let frames = [F::B(1), F::C(1), F::B(2), F::C(2), F::B(3), F::C(3)];
        let dir = journal_with(&[&frames]);
        flip(dir.path(), 1, frame_offset(dir.path(), 1, 1) + Format::V2.header() + 3);
        let (applied, report, _) = replayed(dir.path(), 0);
        assert_eq!(applied, vec![1, 2, 3]);
        assert!(!report.damaged && report.stopped.is_none() && report.bridged.len() == 1, "{report:?}");
        assert_eq!(report.journal_head.map(|h| h.0), Some(3));
        // sled holds everything: the commit frame after the damage decides.
        let dir = journal_with(&[&[F::B(1), F::B(2), F::C(2)]]);
        flip(dir.path(), 1, frame_offset(dir.path(), 1, 1) + Format::V2.header() + 2);
        let (applied, report, _) = replayed(dir.path(), 2);
        assert!(applied.is_empty());
        assert!(!report.damaged && report.stopped.is_none() && report.bridged.len() == 1, "{report:?}");
    }

    /// Files of format 1 (no chain, no commit frames; written before one
    /// sync per commit) replay as they always did, before files of format 2.
    #[test]
    fn format_one_files_are_still_replayed() {
        let dir = journal_of(&[&[], &[3, 4]]);
        let mut old = MAGIC_V1.to_vec();
        old.extend_from_slice(&[9; 16]);
        for jsn in 1..=2u64 {
            let mut body = jsn.to_le_bytes().to_vec();
            body.push(1);
            for part in [format!("k{jsn}"), "v".to_owned()] {
                body.extend_from_slice(&(part.len() as u32).to_le_bytes());
                body.extend_from_slice(part.as_bytes());
            }
            old.extend_from_slice(&((body.len() - 8) as u32).to_le_bytes());
            old.extend_from_slice(&crc32fast::hash(&body).to_le_bytes());
            old.extend_from_slice(&body);
        }
        // A copy of a format-1 batch (what sled held while applying it key by key) decodes too.
        let first_len = u32::from_le_bytes(old[HEADER..HEADER + 4].try_into().expect("4")) as usize;
        let copy = decode_frame(&old[HEADER..HEADER + 16 + first_len]).expect("a format-1 copy");
        assert_eq!(copy, batch(1, vec![write("k1", Some("v"))]));
        old.extend_from_slice(&[0; 64]);
        std::fs::write(dir.path().join(DIR).join(file_name(1)), old).expect("write");
        let (applied, report, _) = replayed(dir.path(), 0);
        assert_eq!(applied, vec![1, 2, 3, 4]);
        assert!(report.stopped.is_none(), "{report:?}");
    }

    /// Damage at the end of an older file is read past when the next file
    /// goes on exactly where sled needs it (continuity proven by number): a
    /// frame a crash tore, its number used again after the restart, or
    /// bytes past a file's last frame. When the next number is beyond, it
    /// stays a hole.
    #[test]
    fn replay_reads_past_damage_when_the_next_file_proves_continuity() {
        // The third of three frames of file 1 torn by a crash: cut short after a few bytes.
        let tear_third = |dir: &Path| {
            let first = dir.join(DIR).join(file_name(1));
            let third = frame_offset(dir, 1, 2);
            let mut bytes = std::fs::read(&first).expect("read");
            bytes.truncate(third + Format::V2.header() + 3);
            std::fs::write(&first, &bytes).expect("tear");
        };
        // Frame 3 torn; after the restart frame 3 is written again, in the next file.
        let dir = journal_of(&[&[1, 2, 3], &[3, 4]]);
        tear_third(dir.path());
        let (applied, report, resume) = replayed(dir.path(), 0);
        assert_eq!(applied, vec![1, 2, 3, 4]);
        assert!(!report.damaged && report.stopped.is_none(), "{report:?}");
        assert_eq!(report.bridged.len(), 1, "{report:?}");
        assert!(report.bridged[0].contains("journal file 0000000000000001") && report.bridged[0].contains("frame 3"));
        assert_eq!(resume.next_jsn, 5);

        // Bytes past the last frame of an older file.
        let dir = journal_of(&[&[1, 2], &[3]]);
        let first = dir.path().join(DIR).join(file_name(1));
        let mut bytes = std::fs::read(&first).expect("read");
        let end = bytes.len() - 64;
        bytes[end + 10] = 0xff;
        std::fs::write(&first, &bytes).expect("garbage");
        let (applied, report, _) = replayed(dir.path(), 0);
        assert_eq!(applied, vec![1, 2, 3]);
        assert!(!report.damaged && report.bridged.len() == 1, "{report:?}");

        // Sled already holds what the damage could have held: read past too.
        let (applied, report, _) = replayed(dir.path(), 2);
        assert_eq!(applied, vec![3]);
        assert!(!report.damaged && report.bridged.len() == 1, "{report:?}");

        // The next file goes on past a number sled lacks: a hole, as before.
        let dir = journal_of(&[&[1, 2, 3], &[5]]);
        tear_third(dir.path());
        let (applied, report, _) = replayed(dir.path(), 0);
        assert_eq!(applied, vec![1, 2]);
        assert!(report.damaged && report.bridged.is_empty(), "{report:?}");
        assert!(report.stopped.as_deref().is_some_and(|s| s.contains("not the newest")), "{report:?}");
    }
}
