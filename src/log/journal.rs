//! The journal: what makes a commit cheap. Every batch applied to sled is
//! also appended, as one frame, to a file of our own in `journal/`; a commit
//! writes the frames appended since the last one with one `write` and makes
//! them durable with one `fdatasync`. sled itself is never flushed on the
//! commit path, which matters twice: sled's `flush` holds a process-wide lock
//! that stops every `apply_batch` until its I/O completes (measured: groups of
//! 7 appends out of 256 writers, because writers could not append while a
//! flush ran), and a journal commit is one sync of one file. For the same
//! reason appends go into sled key by key (`SledStore::apply_by_key`): an
//! `apply_batch` also writes out a buffer of sled's files for every batch.
//!
//! sled still writes its files on its own (whenever a buffer fills). A
//! *checkpoint* makes sled's files durable, after which the
//! journal files it covers are deleted: when the current file passes
//! `LogConfig::journal_file_max`, and when the log is opened or closed by a writer.
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
//! damaged frame stops the replay, and the head check then reports what is
//! missing, as it does for sled's own damage.
//!
//! File layout: `journal/<number, 16 hex digits>`, starting with the 8-byte
//! magic `ILJRNL\0\x01` and the 16-byte id of the log it belongs to, then
//! frames (little-endian):
//!
//! | bytes | field |
//! |---|---|
//! | 0..4 | payload length |
//! | 4..8 | CRC-32 of bytes 8.. (JSN and payload) |
//! | 8..16 | JSN |
//! | 16.. | payload: per write, a tag (1 insert, 0 remove), key length (u32) and key, and for an insert value length (u32) and value |
//!
//! A frame is written whole and made durable before any append it holds is
//! acknowledged, so a frame cut short or failing its CRC at the end of the
//! last file is a write the crash interrupted: never acknowledged.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use super::store::Write;

/// The journal's directory inside the log's.
pub(crate) const DIR: &str = "journal";
const MAGIC: &[u8; 8] = b"ILJRNL\x00\x01";
/// A file's header: the magic, then the id of the log it belongs to (zeros
/// when the log had none yet), so that a journal copied in from another log
/// is refused, never replayed into this one.
const HEADER: usize = MAGIC.len() + 16;
const FRAME_HEADER: usize = 16;
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

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Appends one frame holding `writes` (and the JSN) to `out`.
pub(crate) fn encode_frame(jsn: u64, writes: &[Write], out: &mut Vec<u8>) {
    let start = out.len();
    out.extend_from_slice(&[0; 8]);
    out.extend_from_slice(&jsn.to_le_bytes());
    for (key, value) in writes {
        out.push(u8::from(value.is_some()));
        put_bytes(out, key);
        if let Some(value) = value {
            put_bytes(out, value);
        }
    }
    let payload = out.len() - start - FRAME_HEADER;
    let len = u32::try_from(payload).unwrap_or(u32::MAX);
    out[start..start + 4].copy_from_slice(&len.to_le_bytes());
    let crc = crc32fast::hash(&out[start + 8..]);
    out[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
}

fn put_bytes(out: &mut Vec<u8>, bytes: &[u8]) {
    out.extend_from_slice(&u32::try_from(bytes.len()).unwrap_or(u32::MAX).to_le_bytes());
    out.extend_from_slice(bytes);
}

/// The writes of a frame's payload.
fn decode_payload(mut payload: &[u8]) -> Option<Vec<Write>> {
    fn take<'a>(p: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
        let (head, rest) = (p.get(..n)?, p.get(n..)?);
        *p = rest;
        Some(head)
    }
    fn bytes(p: &mut &[u8]) -> Option<Vec<u8>> {
        let len = u32::from_le_bytes(take(p, 4)?.try_into().ok()?) as usize;
        take(p, len).map(<[u8]>::to_vec)
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
    Some(writes)
}

/// One frame read back.
#[derive(Debug, PartialEq)]
pub(crate) struct Frame {
    pub(crate) jsn: u64,
    pub(crate) writes: Vec<Write>,
}

/// How reading a file's frames ended.
#[derive(Debug, PartialEq)]
pub(crate) enum FileEnd {
    /// At the end of the file, after a whole frame.
    Clean,
    /// A frame cut short or failing its check, `at` this offset.
    Damaged { at: u64, detail: String },
}

/// Reads every whole, intact frame of one journal file held in memory, in order.
#[cfg(test)]
pub(crate) fn read_file(bytes: &[u8]) -> (Vec<Frame>, FileEnd) {
    let mut frames = Vec::new();
    let end = match Frames::new(bytes, bytes.len() as u64) {
        Ok(Ok(mut reader)) => loop {
            match reader.next_frame() {
                Ok(Some(Ok(frame))) => frames.push(frame),
                Ok(Some(Err(end))) => break end,
                Ok(None) => break FileEnd::Clean,
                Err(e) => break FileEnd::Damaged { at: reader.at, detail: e.to_string() },
            }
        },
        Ok(Err(end)) => end,
        Err(e) => FileEnd::Damaged { at: 0, detail: e.to_string() },
    };
    (frames, end)
}

/// Reads a journal file's frames one at a time: memory holds one frame,
/// never the file (a file of any size, or one claiming any frame length,
/// costs at most one frame of [`FRAME_MAX`] bytes, and only if the file
/// holds that many).
pub(crate) struct Frames<R> {
    src: R,
    /// Offset of the next frame.
    at: u64,
    /// The file's length.
    len: u64,
}

impl<R: io::Read> Frames<R> {
    /// Checks the header of a file of `len` bytes read from `src`.
    pub(crate) fn new(mut src: R, len: u64) -> io::Result<Result<Self, FileEnd>> {
        let mut header = [0; HEADER];
        if len < HEADER as u64 {
            return Ok(Err(FileEnd::Damaged { at: 0, detail: "no journal magic".into() }));
        }
        src.read_exact(&mut header)?;
        if header[..MAGIC.len()] != MAGIC[..] {
            return Ok(Err(FileEnd::Damaged { at: 0, detail: "no journal magic".into() }));
        }
        Ok(Ok(Self { src, at: HEADER as u64, len }))
    }

    /// The next frame; `None` at a clean end; a damaged end stops the file.
    pub(crate) fn next_frame(&mut self) -> io::Result<Option<Result<Frame, FileEnd>>> {
        let at = self.at;
        let remaining = self.len.saturating_sub(at);
        if remaining == 0 {
            return Ok(None);
        }
        let damaged = |detail: &str| Ok(Some(Err(FileEnd::Damaged { at, detail: detail.to_owned() })));
        let mut header = [0; FRAME_HEADER];
        let got = usize::try_from(remaining).map_or(FRAME_HEADER, |r| r.min(FRAME_HEADER));
        self.src.read_exact(&mut header[..got])?;
        self.at += got as u64;
        // The file is zeroed ahead of its frames (see `ZEROED_AHEAD`): zeros to the end are its end.
        if header[..got].iter().all(|&b| b == 0) && self.rest_is_zeros()? {
            return Ok(None);
        }
        if got < FRAME_HEADER {
            return damaged("a frame header cut short");
        }
        let len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]) as usize;
        let crc = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
        if len > FRAME_MAX {
            return damaged("a frame longer than any batch");
        }
        if len as u64 > self.len.saturating_sub(self.at) {
            return damaged("a frame cut short");
        }
        let mut body = vec![0; 8 + len];
        body[..8].copy_from_slice(&header[8..]);
        self.src.read_exact(&mut body[8..])?;
        self.at += len as u64;
        if crc32fast::hash(&body) != crc {
            return damaged("a frame failing its CRC");
        }
        let jsn = u64::from_le_bytes(header[8..].try_into().unwrap_or_default());
        match decode_payload(&body[8..]) {
            Some(writes) => Ok(Some(Ok(Frame { jsn, writes }))),
            None => damaged("a frame whose payload does not decode"),
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
}

/// Exactly one frame (as `encode_frame` wrote it into a buffer of its own).
pub(crate) fn decode_frame(bytes: &[u8]) -> Result<Frame, String> {
    let mut one = Frames { src: bytes, at: 0, len: bytes.len() as u64 };
    match one.next_frame() {
        Ok(Some(Ok(frame))) if one.at == one.len => Ok(frame),
        Ok(Some(Ok(_))) => Err("bytes after the frame".into()),
        Ok(Some(Err(FileEnd::Damaged { detail, .. }))) => Err(detail),
        Ok(Some(Err(FileEnd::Clean)) | None) => Err("no frame".into()),
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
    /// Whether the stop is damage whatever the head says: a gap, or a bad
    /// frame in a file older than the newest. A bad frame in the newest file
    /// is where a crash interrupts a write; whether it took anything
    /// acknowledged with it is the head check's to say ([`super::HeadCheck`]).
    pub damaged: bool,
    /// A batch sled held in part (the process stopped while it was being
    /// applied key by key), completed from its copy in sled before the
    /// replay: its JSN. Never acknowledged (its commit had not begun).
    pub completed: Option<u64>,
    /// Damage replay read past because continuity was proven: the next
    /// intact frame (in a later file) carries the very next number sled
    /// needed, so the damaged bytes held nothing it lacked — a frame a crash
    /// tore before its commit (its number then used again), or bytes past a
    /// file's last frame. One line per bridge, saying where.
    pub bridged: Vec<String>,
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
    let mut resume = Resume { number: found.last().map_or(1, |(n, _)| n.saturating_add(1)), next_jsn: held };
    let mut held = held;
    let count = found.len();
    // Every file's header first (a few bytes each): another log's file
    // refuses the replay before anything is applied.
    for (_, path) in &found {
        let mut header = Vec::with_capacity(HEADER);
        io::Read::read_to_end(&mut io::Read::take(File::open(path)?, HEADER as u64), &mut header)?;
        if let (Some(ours), Some(theirs)) = (id, file_id(&header))
            && ours != theirs
        {
            return Ok(Err(E::from(Foreign { file: path.clone(), found: theirs, ours })));
        }
    }
    // Then frame by frame: memory holds one frame, whatever the files hold.
    // Damage at the end of a file stops the replay unless the next intact
    // frame proves, by its number, that nothing sled lacks was lost in it.
    let mut damage: Option<String> = None;
    for (i, (_, path)) in found.iter().enumerate() {
        let file = File::open(path)?;
        let len = file.metadata()?.len();
        let end = match Frames::new(io::BufReader::with_capacity(1 << 20, file), len)? {
            Err(end) => end,
            Ok(mut frames) => loop {
                let frame = match frames.next_frame()? {
                    None => break FileEnd::Clean,
                    Some(Err(end)) => break end,
                    Some(Ok(frame)) => frame,
                };
                resume.next_jsn = resume.next_jsn.max(frame.jsn);
                if report.stopped.is_some() {
                    continue; // only counting past the stop, for the next JSN
                }
                if let Some(detail) = damage.take() {
                    if frame.jsn > held.saturating_add(1) {
                        // Frames sled lacks may have been in the damaged bytes: a hole.
                        report.stopped = Some(format!("{detail}, not the newest: damage"));
                        report.damaged = true;
                        continue;
                    }
                    report.bridged.push(format!(
                        "{detail}; the next file goes on at frame {} where sled needed {}: nothing lost",
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
                    report.stopped = Some(format!(
                        "sled holds batches up to {held} and the journal goes on at {}: a gap",
                        frame.jsn
                    ));
                    report.damaged = true;
                }
            },
        };
        if let (FileEnd::Damaged { at, detail }, None) = (end, &report.stopped) {
            let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            let at = format!("{detail} at offset {at} of journal file {name}");
            if i + 1 == count {
                report.stopped = Some(format!(
                    "{at}, the newest: where a crash interrupts a write (the head check tells whether anything acknowledged is missing)"
                ));
            } else {
                // Decided by the next intact frame, in a later file.
                damage = Some(match damage.take() {
                    Some(earlier) => format!("{earlier}; then {at}"),
                    None => at,
                });
            }
        }
    }
    if let Some(detail) = damage {
        // No intact frame after it: nothing proves continuity.
        report.stopped = Some(format!("{detail}, not the newest: damage"));
        report.damaged = true;
    }
    resume.next_jsn = resume.next_jsn.saturating_add(1);
    Ok(Ok((report, resume)))
}

/// The journal of a writable log: frames waiting to be written, and the file they go to.
pub(crate) struct Journal {
    dir: PathBuf,
    /// Frames appended since the last write-out, and the next JSN. Held
    /// while a batch is applied to sled, so frames are in sled's order.
    pending: Mutex<Pending>,
    /// The file; held across a write-out so that write-outs keep their order.
    out: Mutex<Out>,
    /// The size at which a file is due for a checkpoint.
    file_max: u64,
}

pub(crate) struct Pending {
    pub(crate) buf: Vec<u8>,
    pub(crate) next_jsn: u64,
}

struct Out {
    /// `None` until the first write-out after opening or a rotation creates it.
    file: Option<Arc<File>>,
    number: u64,
    len: u64,
    /// Bytes of the file written so far, zeros ahead of the frames included.
    zeroed: u64,
    /// The other buffer, swapped with `pending.buf` (keeps its allocation).
    spare: Vec<u8>,
}

impl Journal {
    /// A journal whose next file is `number` and next frame `next_jsn`.
    pub(crate) fn new(log_dir: &Path, number: u64, next_jsn: u64, file_max: u64) -> Self {
        Self {
            dir: log_dir.join(DIR),
            pending: Mutex::new(Pending { buf: Vec::new(), next_jsn }),
            out: Mutex::new(Out { file: None, number, len: 0, zeroed: 0, spare: Vec::new() }),
            file_max,
        }
    }

    /// The frames waiting; hold it while applying the batch they describe.
    pub(crate) fn pending(&self) -> MutexGuard<'_, Pending> {
        lock(&self.pending)
    }

    /// Writes every frame appended so far to the current file (to the OS,
    /// no sync). `id` is asked for the log's id when a file is created.
    pub(crate) fn write_out(&self, id: impl FnOnce() -> Option<[u8; 16]>) -> io::Result<()> {
        self.write_pending(&mut lock(&self.out), id)
    }

    /// Takes the pending frames (leaving the spare buffer in their place) and writes them.
    fn write_pending(&self, out: &mut Out, id: impl FnOnce() -> Option<[u8; 16]>) -> io::Result<()> {
        let mut buf = std::mem::take(&mut out.spare);
        std::mem::swap(&mut buf, &mut lock(&self.pending).buf);
        let result = self.write_buf(out, &buf, id);
        buf.clear();
        out.spare = buf;
        result
    }

    fn write_buf(&self, out: &mut Out, buf: &[u8], id: impl FnOnce() -> Option<[u8; 16]>) -> io::Result<()> {
        if buf.is_empty() {
            return Ok(());
        }
        let file = match &out.file {
            Some(f) => f.clone(),
            None => {
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
                // The new name is durable before any frame in the file can be
                // acknowledged (here, under the lock, rather than in a sync
                // that another thread's sync could skip while this one runs).
                sync_dir(&self.dir)?;
                let f = Arc::new(f);
                out.file = Some(f.clone());
                out.len = HEADER as u64;
                out.zeroed = out.len;
                f
            }
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

    /// Makes everything written out so far durable (`fdatasync` of the
    /// file). Returns whether the file is due for a checkpoint.
    pub(crate) fn sync(&self) -> io::Result<bool> {
        let (file, due) = {
            let out = lock(&self.out);
            (out.file.clone(), out.len >= self.file_max)
        };
        // Outside the lock: write-outs go on meanwhile. A rotation in between
        // synced the old file itself before letting go of it.
        file.map_or(Ok(()), |f| f.sync_data())?;
        Ok(due)
    }

    /// Ends the current file: writes out what is pending, syncs it, and
    /// sends later frames to a new file. Returns that new file's number:
    /// every batch applied before the rotation is in a file below it, so
    /// those files may go once sled's files are durable.
    pub(crate) fn rotate(&self, id: impl FnOnce() -> Option<[u8; 16]>) -> io::Result<u64> {
        let mut out = lock(&self.out);
        self.write_pending(&mut out, id)?;
        if let Some(f) = out.file.take() {
            f.sync_data()?;
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
        let (applied, _, _) = {
            let mut applied = Vec::new();
            let (r, s) = replay(dir.path(), 0, None, |jsn, _| {
                applied.push(jsn);
                Ok::<(), Refused>(())
            })
            .expect("read")
            .expect("apply");
            (applied, r, s)
        };
        assert_eq!(applied, vec![1, 2]);
    }

    fn write(k: &str, v: Option<&str>) -> Write {
        (k.as_bytes().to_vec(), v.map(|v| v.as_bytes().to_vec()))
    }

    #[test]
    fn frames_read_back_and_damage_is_found_where_it_is() {
        let mut bytes = header(None).to_vec();
        let a = vec![write("ra", Some("one")), write("ga", None)];
        let b = vec![write("rb", Some(""))];
        encode_frame(7, &a, &mut bytes);
        let second = bytes.len();
        encode_frame(8, &b, &mut bytes);
        let (frames, end) = read_file(&bytes);
        assert_eq!(end, FileEnd::Clean);
        assert_eq!(frames, vec![Frame { jsn: 7, writes: a.clone() }, Frame { jsn: 8, writes: b }]);

        // Every cut inside the second frame keeps the first and names the offset.
        for cut in second + 1..bytes.len() {
            let (frames, end) = read_file(&bytes[..cut]);
            assert_eq!(frames.len(), 1, "cut at {cut}");
            assert!(matches!(end, FileEnd::Damaged { at, .. } if at == second as u64), "cut at {cut}: {end:?}");
        }
        // A flipped bit anywhere in the second frame fails it.
        for i in second..bytes.len() {
            let mut flipped = bytes.clone();
            flipped[i] ^= 0x10;
            let (frames, end) = read_file(&flipped);
            assert_eq!(frames, vec![Frame { jsn: 7, writes: a.clone() }], "bit at {i}");
            assert!(matches!(end, FileEnd::Damaged { .. }), "bit at {i}");
        }
        assert!(matches!(read_file(b"garbage!").1, FileEnd::Damaged { at: 0, .. }));
        assert_eq!(read_file(&header(None)), (Vec::new(), FileEnd::Clean));
        assert!(matches!(read_file(MAGIC).1, FileEnd::Damaged { at: 0, .. }), "a header cut short");
    }

    /// A reader that says how much it was asked for at once.
    struct Counting<'a> {
        bytes: &'a [u8],
        largest: usize,
    }

    impl std::io::Read for Counting<'_> {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            self.largest = self.largest.max(buf.len());
            std::io::Read::read(&mut self.bytes, buf)
        }
    }

    /// Opening reads a journal file a frame at a time, never whole: a
    /// file of any size (a damaged or foreign one included) costs one frame
    /// of memory. The zeros ahead of the frames end the file; anything
    /// after them is damage where the zeros began.
    #[test]
    fn a_journal_file_is_read_a_frame_at_a_time() {
        let mut bytes = header(None).to_vec();
        for jsn in 1..=200 {
            encode_frame(jsn, &[write("record", Some("value"))], &mut bytes);
        }
        let frames_end = bytes.len();
        bytes.resize(frames_end + (4 << 20), 0);
        let mut src = Counting { bytes: &bytes, largest: 0 };
        let mut frames = Frames::new(&mut src, bytes.len() as u64).expect("read").expect("header");
        let mut read = 0;
        while let Some(frame) = frames.next_frame().expect("read") {
            assert_eq!(frame.expect("intact").jsn, read + 1);
            read += 1;
        }
        assert_eq!(read, 200);
        assert!(src.largest <= 64 << 10, "asked for {} bytes at once", src.largest);

        // One stray byte far into the zeros: the file does not end cleanly.
        bytes[frames_end + (3 << 20)] = 1;
        let (frames, end) = read_file(&bytes);
        assert_eq!(frames.len(), 200);
        assert!(matches!(end, FileEnd::Damaged { at, .. } if at == frames_end as u64), "{end:?}");

        // A header claiming a huge frame the file does not hold: no allocation, damage.
        let mut claim = header(None).to_vec();
        claim.extend_from_slice(&(FRAME_MAX as u32).to_le_bytes());
        claim.extend_from_slice(&[1; 12]);
        let (frames, end) = read_file(&claim);
        assert!(frames.is_empty());
        assert!(matches!(end, FileEnd::Damaged { ref detail, .. } if detail == "a frame cut short"), "{end:?}");
    }

    #[test]
    fn write_out_sync_and_rotate_keep_frames_in_order_across_files() {
        let dir = tempfile::tempdir().expect("dir");
        let j = Journal::new(dir.path(), 1, 1, 1 << 20);
        let push = |k: &str| {
            let mut p = j.pending();
            let jsn = p.next_jsn;
            encode_frame(jsn, &[write(k, Some("v"))], &mut p.buf);
            p.next_jsn += 1;
        };
        push("a");
        push("b");
        j.write_out(|| None).expect("write out");
        assert!(!j.sync().expect("sync"), "a small file is not due");
        push("c");
        assert_eq!(j.rotate(|| None).expect("rotate"), 2);
        push("d");
        j.write_out(|| None).expect("write out");
        j.sync().expect("sync");
        let found = files(&dir.path().join(DIR)).expect("files");
        assert_eq!(found.iter().map(|(n, _)| *n).collect::<Vec<_>>(), vec![1, 2]);
        let jsns: Vec<u64> =
            found.iter().flat_map(|(_, p)| read_file(&std::fs::read(p).expect("read")).0).map(|f| f.jsn).collect();
        assert_eq!(jsns, vec![1, 2, 3, 4]);
        remove_before(&dir.path().join(DIR), 2).expect("remove");
        let found = files(&dir.path().join(DIR)).expect("files");
        assert_eq!(found.iter().map(|(n, _)| *n).collect::<Vec<_>>(), vec![2]);
        // Nothing pending: a rotation of an empty journal keeps the number.
        j.write_out(|| None).expect("nothing to write");
        assert_eq!(j.rotate(|| None).expect("rotate"), 3);
        assert_eq!(j.rotate(|| None).expect("rotate again, nothing written"), 3);
    }

    /// Writes files of frames (each a list of JSNs) into a journal directory.
    fn journal_of(files: &[&[u64]]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().expect("dir");
        std::fs::create_dir(dir.path().join(DIR)).expect("mkdir");
        for (i, jsns) in files.iter().enumerate() {
            let mut bytes = header(Some([9; 16])).to_vec();
            for &jsn in *jsns {
                encode_frame(jsn, &[write(&format!("k{jsn}"), Some("v"))], &mut bytes);
            }
            bytes.extend_from_slice(&[0; 64]); // zeros written ahead
            std::fs::write(dir.path().join(DIR).join(file_name(i as u64 + 1)), bytes).expect("write");
        }
        dir
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
        let first = dir.path().join(DIR).join(file_name(1));
        let mut bytes = std::fs::read(&first).expect("read");
        let (frames, _) = read_file(&bytes);
        assert_eq!(frames.len(), 3);
        // Damage the second frame of the older file: 3, 4, 5 must not be applied over the hole.
        let second = HEADER + (bytes.len() - HEADER - 64) / 3;
        bytes[second + FRAME_HEADER] ^= 1;
        std::fs::write(&first, &bytes).expect("damage");
        let (applied, report, resume) = replayed(dir.path(), 0);
        assert_eq!(applied, vec![1]);
        assert!(report.damaged, "{report:?}");
        assert_eq!(resume.next_jsn, 6, "numbers past the damage are never reused");

        assert!(report.bridged.is_empty());

        // The same damage in the newest file is a write the crash interrupted.
        let dir = journal_of(&[&[1, 2, 3]]);
        let only = dir.path().join(DIR).join(file_name(1));
        std::fs::write(&only, &bytes).expect("damage");
        let (applied, report, _) = replayed(dir.path(), 0);
        assert_eq!(applied, vec![1]);
        assert!(!report.damaged && report.stopped.as_deref().is_some_and(|s| s.contains("the newest")));
    }

    /// Damage at the end of an older file is read past when the next file
    /// goes on exactly where sled needs it (continuity proven by number): a
    /// frame a crash tore, its number used again after the restart, or
    /// bytes past a file's last frame. When the next number is beyond, it
    /// stays a hole.
    #[test]
    fn replay_reads_past_damage_when_the_next_file_proves_continuity() {
        // The third of three equal frames of file 1 torn by a crash: cut short after a few bytes.
        let tear_third = |dir: &Path| {
            let first = dir.join(DIR).join(file_name(1));
            let mut bytes = std::fs::read(&first).expect("read");
            let third = HEADER + 2 * (bytes.len() - HEADER - 64) / 3;
            bytes.truncate(third + FRAME_HEADER + 3);
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
