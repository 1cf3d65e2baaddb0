//! The journal the durable modes commit through: what a crash leaves (sled's
//! files behind, the journal holding the rest) comes back whole; a damaged
//! journal is reported and kept, never skipped; a write a crash interrupted
//! is not damage.
//!
//! "What a crash leaves" is a copy of a live log's directory, the journal
//! holding everything acknowledged, with sled's files set back to how they
//! were when the log opened: in the durable modes sled flushes only when a
//! buffer fills or at a checkpoint, so what it wrote by the time of the copy
//! varies from run to run, and "nothing yet" is a state a crash can leave.

use std::path::{Path, PathBuf};

use instance_lifecycle::log::{HeadCheck, Log, LogConfig, LogError, Note, Record};

use crate::crash::write_instances;
use crate::support::{copy_tree, lifecycle, stderr, stdout};

const WRITERS: usize = 8;
const INSTANCES: usize = 24;
const APPENDS_PER_WRITER: usize = 150;

/// A log in `dir` after every writer's appends were acknowledged (GroupCommit,
/// the default), still open, and every record it holds. With `opened`, a
/// copy of the directory right after opening, before any append.
fn live_log(dir: &Path, opened: Option<&Path>) -> (Log, Vec<Record>) {
    let log = Log::open(dir, LogConfig::default()).expect("open");
    if let Some(opened) = opened {
        copy_tree(dir, opened);
    }
    std::thread::scope(|s| {
        for w in 0..WRITERS {
            let log = &log;
            s.spawn(move || {
                let mine: Vec<usize> = (0..INSTANCES).filter(|i| i % WRITERS == w).collect();
                write_instances(log, &mine, APPENDS_PER_WRITER, &mut |_| {});
            });
        }
    });
    let records: Vec<Record> = log.records().collect::<Result<_, _>>().expect("records");
    assert!(records.len() > WRITERS * APPENDS_PER_WRITER / 2, "a log of some size: {}", records.len());
    (log, records)
}

/// What a crash of a live log in `dir/log` leaves, in `dir/crashed`: a copy
/// of the directory taken while the log is open, with sled's files as they
/// were right after opening. sled may write out a buffer on its own at any
/// time (how much it writes depends on its buffers), so the copy's files are
/// set back to a state a crash could leave: sled wrote nothing since opening,
/// the journal holds every append, and replay must bring each one back.
/// Returns the log, still open, the copy and the records acknowledged.
fn crash_of_a_live_log(dir: &Path) -> (Log, PathBuf, Vec<Record>) {
    let (src, copy, opened) = (dir.join("log"), dir.join("crashed"), dir.join("opened"));
    let (log, expected) = live_log(&src, Some(&opened));
    copy_tree(&src, &copy);
    for entry in std::fs::read_dir(&opened).expect("opened") {
        let path = entry.expect("entry").path();
        let name = path.file_name().expect("name").to_owned();
        if name != "head" && name != "journal" && path.is_file() {
            std::fs::copy(&path, copy.join(&name)).expect("sled's files as they were");
        }
    }
    (log, copy, expected)
}

/// [`crash_of_a_live_log`] in a temporary directory, the log closed.
fn crash_copy() -> (tempfile::TempDir, PathBuf, Vec<Record>) {
    let dir = tempfile::tempdir().expect("dir");
    let (log, copy, expected) = crash_of_a_live_log(dir.path());
    drop(log);
    (dir, copy, expected)
}

fn journal_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = match std::fs::read_dir(dir.join("journal")) {
        Ok(entries) => entries.map(|e| e.expect("entry").path()).collect(),
        Err(_) => Vec::new(),
    };
    files.sort();
    files
}

/// Where the frames of a journal file end (the zeros written ahead start),
/// read with the layout `journal.rs` documents: an 8-byte magic and the
/// 16-byte log id, then frames of a 20-byte header (payload length first)
/// and the payload.
fn end_of_frames(bytes: &[u8]) -> usize {
    let mut at = 24;
    while at < bytes.len() && bytes[at..].iter().any(|&b| b != 0) {
        let len = u32::from_le_bytes(bytes[at..at + 4].try_into().expect("4 bytes")) as usize;
        at += 20 + len;
    }
    at
}

/// Flips a bit in the payload of the first batch frame (not a commit frame,
/// whose payload starts with tag 2) halfway through the frames of the first
/// journal file in `dir`: the journal files there were (the damaged one
/// first) and its bytes now.
fn damage_the_middle(dir: &Path) -> (Vec<PathBuf>, Vec<u8>) {
    let files = journal_files(dir);
    let file = files.first().expect("a journal file");
    let mut bytes = std::fs::read(file).expect("read");
    let middle = end_of_frames(&bytes) / 2;
    let mut at = 24;
    loop {
        let len = u32::from_le_bytes(bytes[at..at + 4].try_into().expect("4 bytes")) as usize;
        assert!(len > 0, "a batch frame past the middle");
        if at >= middle && bytes[at + 20] != 2 {
            break;
        }
        at += 20 + len;
    }
    bytes[at + 20 + 3] ^= 0x40;
    std::fs::write(file, &bytes).expect("damage");
    (files, bytes)
}

/// Opening `dir` for writing is refused because acknowledged records are lost.
fn refused_as_lost(dir: &Path, what: &str) {
    match Log::open(dir, LogConfig::default()) {
        Err(LogError::Damaged { check, .. }) => assert!(matches!(*check, HeadCheck::Lost { .. }), "{what}: {check}"),
        Err(e) => panic!("{what}: expected a refusal for lost records, got {e}"),
        Ok(log) => panic!("{what}: opened as if nothing was lost: {:?} {}", log.replayed(), log.head_check()),
    }
}

/// A journal file's number (its name, 16 hex digits).
fn file_number(path: &Path) -> u64 {
    let name = path.file_name().and_then(|n| n.to_str()).expect("a name");
    u64::from_str_radix(name, 16).expect("a journal file's name is its number")
}

fn records(log: &Log) -> Vec<Record> {
    log.records().collect::<Result<_, _>>().expect("records")
}

#[test]
fn what_a_crash_leaves_comes_back_whole_from_the_journal() {
    let dir = tempfile::tempdir().expect("dir");
    let (src, sled_only) = (dir.path().join("log"), dir.path().join("sled-only"));
    let (log, crashed, expected) = crash_of_a_live_log(dir.path());
    assert!(!journal_files(&src).is_empty(), "a durable log commits through its journal");
    copy_tree(&crashed, &sled_only);
    std::fs::remove_dir_all(sled_only.join("journal")).expect("rm journal");
    drop(log);
    assert!(journal_files(&src).is_empty(), "a clean close folds the journal into sled's files");

    // sled's files alone fall short of what was acknowledged; the head names
    // the journal file the log went on in, so a journal deleted whole is damage.
    match Log::open(&sled_only, LogConfig::default()) {
        Err(LogError::Damaged { check, .. }) => {
            assert!(matches!(*check, HeadCheck::JournalMissing { .. }), "{check}")
        }
        Err(e) => panic!("expected a refusal for a missing journal, got {e}"),
        Ok(_) => panic!("sled's files alone opened as if nothing was lost"),
    }

    // An operator's look first: `lifecycle verify` (on a copy) says what the journal brought back.
    let verify = lifecycle(&["verify", crashed.to_str().expect("utf-8")]);
    assert!(verify.status.success(), "{}{}", stdout(&verify), stderr(&verify));
    assert!(stdout(&verify).contains("the journal held"), "{}", stdout(&verify));
    assert!(journal_files(&crashed).len() == 1, "reading changed nothing");

    let log = Log::open(&crashed, LogConfig::default()).expect("reopen after the crash");
    let replayed = log.replayed().expect("sled keeps a journal");
    assert!(replayed.applied > 0, "sled's files lacked appends the journal had: {replayed:?}");
    assert_eq!(replayed.stopped, None);
    assert!(matches!(log.head_check(), HeadCheck::Intact { .. }), "{}", log.head_check());
    assert_eq!(records(&log), expected, "every acknowledged record, unchanged, in order");
    let report = log
        .verify_recorded(&instance_lifecycle::machine::Policy::preset(instance_lifecycle::machine::Preset::Whatsapp));
    assert!(report.is_clean(), "{report:?}");
    assert!(
        report
            .notes
            .iter()
            .any(|n| matches!(n, Note::JournalReplayed { applied, stopped: None, .. } if *applied == replayed.applied)),
        "{:?}",
        report.notes
    );
    let left = journal_files(&crashed);
    assert_eq!(left.len(), 1, "opening folded the replayed journal into sled's files and started one file");
    assert_eq!(std::fs::metadata(&left[0]).expect("file").len(), 24, "a header, no frame: {left:?}");

    // Writing goes on after the replay, and survives the next crash as well.
    let (tip, _) = log.tip();
    let names: Vec<usize> = (0..INSTANCES).collect();
    write_instances(&log, &names, 100, &mut |_| {});
    let more = records(&log);
    assert!(more.len() > expected.len() && more.iter().any(|r| r.global > tip));
    let again = dir.path().join("again");
    copy_tree(&crashed, &again);
    drop(log);
    let log = Log::open(&again, LogConfig::default()).expect("reopen after the second crash");
    assert_eq!(records(&log), more);
}

#[test]
fn a_damaged_journal_is_reported_and_kept_never_skipped() {
    let (_dir, damaged, expected) = crash_copy();
    let (files, bytes) = damage_the_middle(&damaged);
    let file = &files[0];

    refused_as_lost(&damaged, "a journal damaged in its middle");
    assert_eq!(journal_files(&damaged), files, "a refused open keeps the journal as evidence");
    assert_eq!(std::fs::read(file).expect("read"), bytes, "and leaves it as it was");

    // Reading reports it too, without changing anything. The bad frame is in
    // the newest file, where a crash could have cut a write short: the head,
    // which covers the records after it, is what makes it a loss.
    let (copy, _) = Log::open_copy(&damaged).expect("open a copy");
    let replayed = copy.replayed().expect("journal");
    // Which check the flipped bit fails depends on where it lands (length, CRC, payload): any, at the frame.
    assert!(replayed.stopped.as_deref().is_some_and(|s| s.contains("at offset") && !s.contains("gap")), "{replayed:?}");
    assert!(matches!(copy.head_check(), HeadCheck::Lost { .. }), "{}", copy.head_check());
    // The records in the intact frames past the damage are named: each one acknowledged, none left.
    assert!(!replayed.lost.is_empty(), "{replayed:?}");
    drop(copy);

    // Accepted, the loss is recorded; what is left is what came before the damage.
    let config = LogConfig { accept_loss: true, ..LogConfig::default() };
    let log = Log::open(&damaged, config).expect("open, accepting the loss");
    assert_eq!(log.accepted_losses().expect("losses").len(), 1);
    let left = records(&log);
    assert!(left.len() < expected.len());
    assert_eq!(left[..], expected[..left.len()], "the records before the damage, unchanged");
    for (instance, seq) in &replayed.lost {
        assert!(
            expected.iter().any(|r| r.instance.to_string() == *instance && r.seq == *seq),
            "{instance} {seq} was acknowledged"
        );
        assert!(!left.iter().any(|r| r.instance.to_string() == *instance && r.seq == *seq), "{instance} {seq} is gone");
    }
    // The journal it could not replay is set aside whole, not deleted.
    assert_kept(&log, &files, file, &bytes);
    drop(log);
    let log = Log::open(&damaged, LogConfig::default()).expect("reopen: the loss is behind it");
    assert!(matches!(log.head_check(), HeadCheck::Intact { .. }), "{}", log.head_check());
    assert_eq!(log.kept().len(), 1, "still kept, and not replayed again");
    let (copy, _) = Log::open_copy(&damaged).expect("a copy for reading");
    let copied = copy.path().expect("a directory").to_path_buf();
    assert!(!copied.join("kept").exists(), "a copy for reading leaves the kept files out");
}

/// After the loss is accepted, `log.kept()` names one directory holding every
/// journal file there was (`before`), the damaged one (`file`) byte for byte
/// as it was (`bytes`); none of them is left in the journal.
fn assert_kept(log: &Log, before: &[PathBuf], file: &Path, bytes: &[u8]) {
    let kept = log.kept();
    assert_eq!(kept.len(), 1, "{kept:?}");
    let name = file.file_name().expect("a name");
    assert_eq!(std::fs::read(kept[0].join(name)).expect("the damaged file, kept"), bytes, "kept as it was");
    for f in before {
        assert!(kept[0].join(f.file_name().expect("a name")).is_file(), "{f:?} kept");
    }
    let there = std::fs::read_dir(&kept[0]).expect("kept").count();
    assert_eq!(there, before.len(), "only the files replay read (not the one the acceptance was written to)");
    let dir = log.path().expect("a directory").to_path_buf();
    assert!(journal_files(&dir).iter().all(|f| !before.contains(f)), "no longer in the journal");
}

/// `lifecycle recover --accept-loss --json` says where the journal it could
/// not replay went; the damaged file is there as it was.
#[test]
fn recover_keeps_the_journal_it_could_not_replay_and_says_where() {
    let (_dir, damaged, _) = crash_copy();
    let (files, bytes) = damage_the_middle(&damaged);
    let file = &files[0];

    let out = lifecycle(&["recover", damaged.to_str().expect("utf-8"), "--accept-loss", "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let v: serde_json::Value = serde_json::from_str(stdout(&out).trim()).expect("one JSON object");
    assert_eq!(v["accepted"], true, "{v}");
    let kept = v["kept"].as_array().expect("kept").clone();
    assert_eq!(kept.len(), 1, "{v}");
    let kept = PathBuf::from(kept[0].as_str().expect("a path"));
    assert!(kept.starts_with(damaged.join("kept")), "{}", kept.display());
    let name = file.file_name().expect("a name");
    assert_eq!(std::fs::read(kept.join(name)).expect("kept"), bytes);
    let lost = v["lost"].as_array().expect("lost");
    assert!(!lost.is_empty() && lost.iter().all(|l| l["instance"].is_string() && l["seqs"].is_array()), "{v}");

    // An intact log has nothing to keep.
    let out = lifecycle(&["recover", damaged.to_str().expect("utf-8"), "--accept-loss", "--json"]);
    let v: serde_json::Value = serde_json::from_str(stdout(&out).trim()).expect("one JSON object");
    assert_eq!(v["accepted"], false, "{v}");
    assert_eq!(v["kept"].as_array().map(Vec::len), Some(1), "the earlier one, still there: {v}");

    // `verify` (which reads a copy without them) says they are there.
    let out = lifecycle(&["verify", damaged.to_str().expect("utf-8")]);
    let said = stdout(&out);
    assert!(said.contains(&format!("note: {} holds journal files", kept.display())), "{said}");
}

#[test]
fn a_write_the_crash_interrupted_is_not_damage() {
    let (_dir, torn, expected) = crash_copy();
    let last = journal_files(&torn).pop().expect("a journal file");
    let mut bytes = std::fs::read(&last).expect("read");
    let end = end_of_frames(&bytes);
    // The start of a frame that never finished: a header claiming more than was written.
    let torn_frame = [&2_000u32.to_le_bytes()[..], &[0xAB; 20]].concat();
    if bytes.len() < end + torn_frame.len() {
        bytes.resize(end + torn_frame.len(), 0);
    }
    bytes[end..end + torn_frame.len()].copy_from_slice(&torn_frame);
    std::fs::write(&last, &bytes).expect("tear");

    let log = Log::open(&torn, LogConfig::default()).expect("an interrupted write does not stop a writer");
    let replayed = log.replayed().expect("journal");
    assert!(!replayed.damaged, "{replayed:?}");
    assert!(replayed.stopped.as_deref().is_some_and(|s| s.contains("the newest")), "{replayed:?}");
    assert!(matches!(log.head_check(), HeadCheck::Intact { .. }), "{}", log.head_check());
    assert_eq!(records(&log), expected);
}

/// Checkpoints under load: with small journal files, sled is flushed and old
/// files deleted many times while eight writers append and a reader copies
/// the live log again and again (`Log::open_copy`: the head, the journal,
/// then sled's files). Every copy holds everything committed before it
/// began, and reports no loss; the journal never keeps more than the files
/// since the last checkpoint.
#[test]
fn checkpoints_under_load_keep_everything_and_live_copies_stay_whole() {
    let dir = tempfile::tempdir().expect("dir");
    let src = dir.path().join("log");
    let config = LogConfig { journal_file_max: instance_lifecycle::log::JOURNAL_FILE_MIN, ..LogConfig::default() };
    let log = Log::open(&src, config.clone()).expect("open");
    let done = std::sync::atomic::AtomicBool::new(false);
    let (copies, most_files, newest) = std::thread::scope(|s| {
        let writers: Vec<_> = (0..WRITERS)
            .map(|w| {
                let log = &log;
                s.spawn(move || {
                    let mine: Vec<usize> = (0..INSTANCES).filter(|i| i % WRITERS == w).collect();
                    write_instances(log, &mine, 2_000, &mut |_| {});
                })
            })
            .collect();
        let reader = s.spawn(|| {
            let (mut copies, mut most_files, mut newest) = (0, 0, 0);
            while !done.load(std::sync::atomic::Ordering::SeqCst) {
                let committed = log.committed();
                let files = journal_files(&src);
                most_files = most_files.max(files.len());
                newest = newest.max(files.last().map_or(0, |f| file_number(f)));
                let (copy, in_use) = Log::open_copy(&src).expect("copy of a live log");
                assert!(in_use);
                assert!(!copy.head_check().is_damage(), "copy {copies}: {}", copy.head_check());
                let globals: std::collections::BTreeSet<u64> = records(&copy).iter().map(|r| r.global).collect();
                let missing = (1..=committed).find(|g| !globals.contains(g));
                assert_eq!(missing, None, "copy {copies}: a record committed before the copy began is missing");
                copies += 1;
            }
            (copies, most_files, newest)
        });
        for w in writers {
            w.join().expect("writer");
        }
        done.store(true, std::sync::atomic::Ordering::SeqCst);
        reader.join().expect("reader")
    });
    assert!(copies >= 2, "the reader copied the live log {copies} times");
    let expected = records(&log);
    let newest = newest.max(journal_files(&src).last().map_or(0, |f| file_number(f)));
    assert!(
        newest >= 4,
        "several checkpoints while the copies ran: the newest journal file is {newest}, {} records",
        expected.len()
    );
    assert!(most_files <= 3, "old journal files go at each checkpoint: at most {most_files} seen at once");
    let crashed = dir.path().join("crashed");
    copy_tree(&src, &crashed);
    drop(log);
    let log = Log::open(&crashed, config).expect("reopen");
    assert_eq!(records(&log), expected);
}

/// A journal directory from another log is refused by name, for writing and
/// for reading, and nothing is replayed or deleted.
#[test]
fn a_journal_of_another_log_is_refused_and_left_alone() {
    let (_dir, crashed, _) = crash_copy();
    let (_other_dir, other, _) = crash_copy();
    std::fs::remove_dir_all(crashed.join("journal")).expect("rm");
    copy_tree(&other.join("journal"), &crashed.join("journal"));
    let files = journal_files(&crashed);
    let before: Vec<Vec<u8>> = files.iter().map(|f| std::fs::read(f).expect("read")).collect();
    let refusal = |e: LogError| {
        let text = e.to_string();
        assert!(text.contains("belongs to another log"), "{text}");
        assert!(text.contains(&crashed.join("journal").display().to_string()), "names the file: {text}");
    };
    refusal(Log::open(&crashed, LogConfig::default()).err().expect("a foreign journal is refused"));
    refusal(Log::open_copy(&crashed).err().expect("also when reading"));
    let verify = lifecycle(&["verify", crashed.to_str().expect("utf-8")]);
    assert!(!verify.status.success());
    assert!(stderr(&verify).contains("belongs to another log"), "{}", stderr(&verify));
    let after: Vec<Vec<u8>> = journal_files(&crashed).iter().map(|f| std::fs::read(f).expect("read")).collect();
    assert_eq!(after, before, "the foreign journal is left as it was");
}

/// sled's files rolled back to before the journal's oldest frame (the
/// checkpoints that deleted the frames between had made them durable in
/// sled's files, which are now older): replay finds a gap, applies nothing
/// over it, and `verify` reports it as a finding beside the lost records.
#[test]
fn sled_rolled_back_behind_the_journal_is_a_gap_and_a_finding() {
    let dir = tempfile::tempdir().expect("dir");
    let (src, earlier, rolled) = (dir.path().join("log"), dir.path().join("earlier"), dir.path().join("rolled"));
    let config = LogConfig { journal_file_max: instance_lifecycle::log::JOURNAL_FILE_MIN, ..LogConfig::default() };
    let log = Log::open(&src, config.clone()).expect("open");
    let all: Vec<usize> = (0..INSTANCES).collect();
    write_instances(&log, &all, 200, &mut |_| {});
    // Closed, sled's files hold the first 200 (sled writes its own files
    // lazily between checkpoints): the earlier state they roll back to.
    drop(log);
    copy_tree(&src, &earlier);
    let log = Log::open(&src, config).expect("reopen");
    write_instances(&log, &all, 6_000, &mut |_| {});
    copy_tree(&src, &rolled);
    drop(log);
    let first = journal_files(&rolled).first().map(|f| file_number(f)).expect("a journal file");
    assert!(first > 1, "checkpoints deleted the journal's older files");
    for entry in std::fs::read_dir(&earlier).expect("earlier") {
        let path = entry.expect("entry").path();
        let name = path.file_name().expect("name").to_owned();
        if name != "head" && name != "journal" && path.is_file() {
            std::fs::copy(&path, rolled.join(&name)).expect("roll back");
        }
    }
    let (copy, _) = Log::open_copy(&rolled).expect("a copy reads");
    let replayed = copy.replayed().expect("journal");
    assert!(replayed.damaged && replayed.applied == 0, "{replayed:?}");
    assert!(matches!(copy.head_check(), HeadCheck::Lost { .. }), "{}", copy.head_check());
    let report = copy
        .verify_recorded(&instance_lifecycle::machine::Policy::preset(instance_lifecycle::machine::Preset::Whatsapp));
    let journal = report.findings.iter().map(ToString::to_string).find(|f| f.starts_with("journal:"));
    assert!(journal.as_deref().is_some_and(|f| f.contains("a gap")), "{:?}", report.findings);
    drop(copy);
    refused_as_lost(&rolled, "sled's files behind the journal");
}

/// The frames of a journal file of format 2: (offset, length with header, is a commit frame).
fn frames_of(bytes: &[u8]) -> Vec<(usize, usize, bool)> {
    let (mut at, end, mut out) = (24, end_of_frames(bytes), Vec::new());
    while at < end {
        let len = u32::from_le_bytes(bytes[at..at + 4].try_into().expect("4 bytes")) as usize;
        out.push((at, 20 + len, bytes[at + 20] == 2));
        at += 20 + len;
    }
    out
}

/// What a reader and a writer make of a damaged copy: one row of the matrix.
struct Verdict {
    /// `Log::open_copy`'s head check says damage (verify is not clean).
    damage: bool,
    /// A writer without `accept_loss` opened it.
    opened: bool,
    /// Every acknowledged record is there, unchanged.
    whole: bool,
    said: String,
}

fn verdict(dir: &Path, expected: &[Record]) -> Verdict {
    let (copy, _) = Log::open_copy(dir).expect("a damaged journal is read, not refused");
    let damage = copy.head_check().is_damage();
    let said = format!("{}; replay: {:?}", copy.head_check(), copy.replayed().and_then(|r| r.stopped));
    let whole = records(&copy) == expected;
    drop(copy);
    let opened = Log::open(dir, LogConfig::default()).is_ok();
    Verdict { damage, opened, whole, said }
}

/// The corruption matrix for the journal's own format (one sync per commit,
/// #29): a commit frame's tip damaged, the last frame torn, the newest file
/// cut at a frame boundary, the head file one checkpoint behind. No case
/// panics; a case that lost an acknowledged record is never clean and
/// never opened by a writer; a case that lost nothing opens whole.
#[test]
fn journal_matrix_never_calls_a_lost_acknowledgement_clean() {
    let mut rows = Vec::new();
    let mut row = |name: &str, v: &Verdict| {
        rows.push(format!(
            "| {name} | damage: {} | writer opened: {} | every record: {} | {} |",
            v.damage, v.opened, v.whole, v.said
        ))
    };

    // A commit frame's tip damaged (one with frames after it): the frame
    // fails its CRC and the batch after it proves nothing was lost.
    let (_dir, log, expected) = crash_copy();
    let file = journal_files(&log).pop().expect("a journal file");
    let mut bytes = std::fs::read(&file).expect("read");
    let frames = frames_of(&bytes);
    let (at, _, _) = frames[..frames.len() - 1].iter().rev().find(|f| f.2).copied().expect("a commit frame");
    bytes[at + 20 + 1 + 8 + 5] ^= 0x01; // a byte of its link
    std::fs::write(&file, &bytes).expect("damage");
    let v = verdict(&log, &expected);
    row("a commit frame's tip damaged", &v);
    assert!(!v.damage && v.opened && v.whole, "{}", v.said);

    // The last frame torn (half of it written): the write a crash interrupts.
    let (_dir, log, expected) = crash_copy();
    let file = journal_files(&log).pop().expect("a journal file");
    let bytes = std::fs::read(&file).expect("read");
    let &(at, len, commit) = frames_of(&bytes).last().expect("frames");
    assert!(commit, "a commit ends with its commit frame");
    let mut torn = bytes[..at + len / 2].to_vec();
    torn.resize(bytes.len(), 0);
    std::fs::write(&file, &torn).expect("tear");
    let v = verdict(&log, &expected);
    row("the last frame torn", &v);
    assert!(!v.damage && v.opened && v.whole, "{}", v.said);

    // The newest file cut at a frame boundary (its zeros gone with its tail):
    // acknowledged frames are gone, and the cut shows.
    let (_dir, log, expected) = crash_copy();
    let file = journal_files(&log).pop().expect("a journal file");
    let bytes = std::fs::read(&file).expect("read");
    let frames = frames_of(&bytes);
    let (at, _, _) = frames[frames.len() / 2];
    std::fs::write(&file, &bytes[..at]).expect("cut");
    let v = verdict(&log, &expected);
    row("the newest journal file cut at a frame boundary", &v);
    assert!(v.damage && !v.opened && !v.whole, "{}", v.said);
    assert!(v.said.contains("cut at a frame boundary"), "{}", v.said);
    let out = lifecycle(&["verify", log.to_str().expect("utf-8")]);
    let said = stdout(&out);
    let findings: Vec<&str> = said.lines().filter(|l| l.starts_with("- ")).collect();
    assert!(!out.status.success(), "{said}");
    assert_eq!(findings.len(), 1, "said once: {findings:?}");
    assert!(findings[0].contains("cut at a frame boundary"), "{findings:?}");

    // The head file one checkpoint behind (put back from before the last
    // checkpoint): the journal's commit frames and sled's files hold the
    // rest; nothing is lost and nothing is called lost.
    let dir = tempfile::tempdir().expect("dir");
    let (src, crashed) = (dir.path().join("log"), dir.path().join("crashed"));
    let config = LogConfig { journal_file_max: instance_lifecycle::log::JOURNAL_FILE_MIN, ..LogConfig::default() };
    let live = Log::open(&src, config.clone()).expect("open");
    let all: Vec<usize> = (0..INSTANCES).collect();
    write_instances(&live, &all, 3_000, &mut |_| {});
    let first = journal_files(&src).first().map(|f| file_number(f)).expect("a journal file");
    let old_head = std::fs::read(src.join("head")).expect("head");
    write_instances(&live, &all, 3_000, &mut |_| {});
    let later = journal_files(&src).first().map(|f| file_number(f)).expect("a journal file");
    assert!(later > first, "a checkpoint between the two copies of the head: {first} then {later}");
    let expected = records(&live);
    copy_tree(&src, &crashed);
    drop(live);
    std::fs::write(crashed.join("head"), &old_head).expect("the head one checkpoint behind");
    let v = verdict(&crashed, &expected);
    row("the head one checkpoint behind", &v);
    assert!(!v.damage && v.opened && v.whole, "{}", v.said);

    println!("| case | verdict | | | |\n|---|---|---|---|---|\n{}", rows.join("\n"));
}

/// A log written before one sync per commit (journal files of format 1,
/// the head moved by every commit; `tests/fixtures/log-v3-journal-v1`, left
/// by a writer that exited without closing) opens, verifies clean, replays
/// its journal, and is upgraded by the first write: new journal files are
/// of format 2, and it reopens whole after a crash and after a clean close.
#[test]
fn a_log_of_the_previous_journal_format_opens_verifies_and_is_upgraded() {
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/log-v3-journal-v1");
    let dir = tempfile::tempdir().expect("dir");
    let log_dir = dir.path().join("log");
    copy_tree(&fixture, &log_dir);
    let magic = |p: &Path| std::fs::read(p).expect("read")[..8].to_vec();
    assert_eq!(journal_files(&log_dir).iter().map(|f| magic(f)).collect::<Vec<_>>(), vec![b"ILJRNL\x00\x01".to_vec()]);

    let out = lifecycle(&["verify", log_dir.to_str().expect("utf-8")]);
    assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
    assert!(stdout(&out).contains("clean: 44 records of 4 instances"), "{}", stdout(&out));
    assert!(stdout(&out).contains("head: 44:2b2bda8dca47e4d5"), "{}", stdout(&out));

    let log = Log::open(&log_dir, LogConfig::default()).expect("a writer opens it");
    assert!(matches!(log.head_check(), HeadCheck::Intact { global: 44 }), "{}", log.head_check());
    assert!(log.replayed().expect("journal").applied > 0);
    let before = records(&log);
    assert_eq!(before.len(), 44);
    let names: Vec<usize> = (0..4).collect();
    write_instances(&log, &names, 40, &mut |_| {});
    let after = records(&log);
    assert!(after.len() > 44 && after[..44] == before[..]);
    let files = journal_files(&log_dir);
    assert!(!files.is_empty() && files.iter().all(|f| magic(f) == b"ILJRNL\x00\x02"), "{files:?}");
    let crashed = dir.path().join("crashed");
    copy_tree(&log_dir, &crashed);
    drop(log);
    for d in [&crashed, &log_dir] {
        let log = Log::open(d, LogConfig::default()).expect("reopen");
        assert!(!log.head_check().is_damage(), "{}", log.head_check());
        assert_eq!(records(&log), after);
    }
}
