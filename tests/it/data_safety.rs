//! No command destroys data it was not asked to destroy, and the log notices
//! its own damage: one test per finding of the issue that asked for it
//! (numbered as there), each through the real binary.

use std::io::{BufRead, BufReader, Read, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use instance_lifecycle::log::{HeadCheck, Log, LogConfig, LogError};

use crate::support::{assert_no_crash_report, copy_tree, digests, lifecycle, simulated_log, stderr, stdout};

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// sled's own files (everything but the head and simulate's marker).
fn sled_files(dir: &Path) -> Vec<std::path::PathBuf> {
    std::fs::read_dir(dir)
        .expect("read dir")
        .map(|e| e.expect("entry").path())
        .filter(|p| !matches!(p.file_name().and_then(|n| n.to_str()), Some("head" | "lifecycle-simulate.marker")))
        .collect()
}

/// Finding 1: sled rolled back (its files replaced by an earlier state, the
/// head kept) — `verify` said "clean". Now it names the loss, an engine
/// refuses the log, `recover --accept-loss` records the loss, and numbering
/// never reuses a lost global sequence number.
#[test]
fn finding_01_a_rolled_back_log_is_never_clean() {
    let dir = tempfile::tempdir().expect("dir");
    let (data, earlier) = (dir.path().join("data"), dir.path().join("earlier"));
    let policy = instance_lifecycle::machine::Policy::preset(instance_lifecycle::machine::Preset::Whatsapp);
    let config = LogConfig { durability: instance_lifecycle::log::Durability::Buffered, ..LogConfig::default() };
    let log = Log::open(&data, config.clone()).expect("open");
    let log = instance_lifecycle::testing::simulate_virtual_on(log, 1, 10, Duration::from_secs(20), policy.clone())
        .expect("first run");
    drop(log);
    copy_tree(&data, &earlier);
    let log = Log::open(&data, config.clone()).expect("reopen");
    let log = instance_lifecycle::testing::simulate_virtual_on(log, 2, 10, Duration::from_secs(20), policy.clone())
        .expect("second run");
    let (tip, link) = log.tip();
    drop(log);
    // sled's files go back to the earlier state; the head stays.
    for f in sled_files(&data) {
        if f.is_dir() {
            std::fs::remove_dir_all(&f).expect("rm");
        } else {
            std::fs::remove_file(&f).expect("rm");
        }
    }
    for f in sled_files(&earlier) {
        let target = data.join(f.file_name().expect("name"));
        if f.is_dir() {
            copy_tree(&f, &target);
        } else {
            std::fs::copy(&f, &target).expect("copy");
        }
    }

    let v = lifecycle(&["verify", s(&data)]);
    assert_eq!(v.status.code(), Some(1), "{}{}", stdout(&v), stderr(&v));
    let out = stdout(&v);
    assert!(!out.contains("clean:"), "{out}");
    assert!(out.contains("acknowledged record(s)") && out.contains(&format!("up to {tip}")), "{out}");
    assert_no_crash_report("verify", &stderr(&v));

    match Log::open_existing(&data, config.clone()) {
        Err(LogError::Damaged { check, .. }) => assert!(matches!(*check, HeadCheck::Lost { head, .. } if head == tip)),
        Err(e) => panic!("expected Damaged, got {e}"),
        Ok(_) => panic!("a writer opened a log that lost records"),
    }
    let before = digests(&data);
    let refused = lifecycle(&["recover", s(&data)]);
    assert_eq!(refused.status.code(), Some(1));
    let said = lifecycle(&["recover", s(&data), "--json"]);
    assert_eq!(said.status.code(), Some(1));
    let said: serde_json::Value = serde_json::from_str(stdout(&said).trim()).expect("one JSON object");
    assert_eq!(said["engine_opens"], false, "{said}");
    assert!(said["head_check"].as_str().is_some_and(|c| c.contains(&tip.to_string())), "{said}");
    assert_eq!(digests(&data), before, "recover without --accept-loss writes nothing");

    let accepted = lifecycle(&["recover", s(&data), "--accept-loss"]);
    assert!(accepted.status.success(), "{}{}", stdout(&accepted), stderr(&accepted));
    assert!(stdout(&accepted).contains(&format!("go on after {tip}")), "{}", stdout(&accepted));
    let v = lifecycle(&["verify", s(&data)]);
    assert!(v.status.success(), "{}", stdout(&v));
    assert!(stdout(&v).contains("note: a loss was accepted"), "{}", stdout(&v));
    let again = lifecycle(&["recover", s(&data), "--accept-loss", "--json"]);
    assert!(again.status.success(), "{}{}", stdout(&again), stderr(&again));
    let again: serde_json::Value = serde_json::from_str(stdout(&again).trim()).expect("one JSON object");
    assert_eq!((&again["accepted"], &again["resumed_after"]), (&serde_json::json!(false), &serde_json::Value::Null));
    assert!(again["instances"].as_u64().is_some_and(|n| n > 0) && again["states"].is_object(), "{again}");
    // The next record takes the next number after every lost one.
    let log = Log::open_existing(&data, config).expect("opens after accepting");
    let n = instance_lifecycle::InstanceName::new("after-loss").expect("name");
    let a = log
        .append(
            &n,
            1,
            instance_lifecycle::machine::Timestamp(0),
            instance_lifecycle::log::Event::created("ws://x/"),
            &Default::default(),
        )
        .expect("append");
    assert_eq!(a.global, tip + 1);
    drop(log);

    // A restore of the whole directory (head included) is consistent in itself:
    // only a head kept elsewhere tells it, and verify --expect-head does.
    let whole = dir.path().join("whole");
    copy_tree(&earlier, &whole);
    let anchor = format!("{tip}:{}", link.hex());
    let v = lifecycle(&["verify", s(&whole), "--expect-head", &anchor]);
    assert_eq!(v.status.code(), Some(1), "{}", stdout(&v));
    assert!(stdout(&v).contains("restored from an older copy"), "{}", stdout(&v));
}

/// Findings 2 and 9: a second `simulate` on a directory a first one is
/// writing is refused (naming the holder) and changes nothing; Ctrl-C in the
/// first prints the summary of what was done and exits 130, its log in place.
#[test]
fn finding_02_and_09_a_busy_directory_is_refused_and_ctrl_c_summarises() {
    let dir = tempfile::tempdir().expect("dir");
    let data = dir.path().join("data");
    let mut first = Command::new(env!("CARGO_BIN_EXE_lifecycle"))
        .args(["simulate", "--instances", "10", "--seconds", "60", "--data", s(&data)])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("first simulate");
    let staging = dir.path().join("data.simulating").join("db");
    let start = Instant::now();
    while !staging.exists() && start.elapsed() < Duration::from_secs(20) {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(staging.exists(), "the first run writes beside --data");
    std::thread::sleep(Duration::from_millis(500));
    let second = lifecycle(&["simulate", "--instances", "4", "--seconds", "2", "--data", s(&data)]);
    assert!(!second.status.success());
    let err = stderr(&second);
    assert!(err.contains("in use by process") && err.contains("nothing was changed"), "{err}");
    assert!(staging.exists(), "the second run left the first one's log alone");

    // SAFETY: kill(2) with a valid pid of our own child.
    let pid = i32::try_from(first.id()).expect("pid");
    assert_eq!(unsafe { libc::kill(pid, libc::SIGINT) }, 0);
    let mut out = String::new();
    first.stdout.take().expect("stdout").read_to_string(&mut out).expect("read");
    let status = first.wait().expect("wait");
    assert_eq!(status.code(), Some(130), "{out}");
    assert!(out.contains("interrupted after") && out.contains("verification: clean"), "{out}");
    let v = lifecycle(&["verify", s(&data)]);
    assert!(v.status.success(), "the interrupted run's log is in place and clean: {}", stdout(&v));
    assert!(!dir.path().join("data.simulating").exists());
}

/// Finding 3: a mistake in the options (a typo in --peer, an unreachable
/// peer, a missing --ca) fails before --data is touched.
#[test]
fn finding_03_a_typo_destroys_nothing() {
    let dir = tempfile::tempdir().expect("dir");
    let data = dir.path().join("data");
    simulated_log(&data);
    let before = digests(&data);
    for args in [
        vec!["--peer", "http://typo"],
        vec!["--peer", "ws://127.0.0.1:1/"],
        vec!["--peer", "wss://127.0.0.1:1/", "--ca", "/nonexistent/ca.pem"],
    ] {
        let o = lifecycle(&[&["simulate", "--seconds", "2", "--data", s(&data)][..], &args].concat());
        assert!(!o.status.success(), "{args:?} succeeded");
        assert_eq!(stderr(&o).lines().filter(|l| l.starts_with("error: ")).count(), 1, "{}", stderr(&o));
        assert_eq!(digests(&data), before, "{args:?} changed the earlier log");
    }
}

/// Finding 4: damage that makes sled fail or panic is one plain line naming
/// the user's directory: no panic message, no backtrace, no temporary path,
/// no sled debug text. (The corruption matrix covers every offset.)
#[test]
fn finding_04_a_damaged_database_is_one_plain_line() {
    let dir = tempfile::tempdir().expect("dir");
    let data = dir.path().join("data");
    simulated_log(&data);
    let size = std::fs::metadata(data.join("db")).expect("db").len();
    let mut seen_error = false;
    for pct in [5, 15, 30, 50, 70, 85] {
        let case = dir.path().join(format!("case-{pct}"));
        copy_tree(&data, &case);
        let mut f = std::fs::OpenOptions::new().write(true).open(case.join("db")).expect("db");
        use std::io::Seek;
        f.seek(std::io::SeekFrom::Start(size * pct / 100)).expect("seek");
        f.write_all(&[0xA5; 4096]).expect("overwrite");
        drop(f);
        for cmd in ["inspect", "verify", "export"] {
            let o = lifecycle(&[cmd, s(&case)]);
            let err = stderr(&o);
            assert_no_crash_report(&format!("{cmd} at {pct}%"), &err);
            assert!(!err.contains("Some(") && !err.contains("Inline"), "sled debug text: {err}");
            if let Some(line) = err.lines().find(|l| l.starts_with("error: ")) {
                seen_error = true;
                assert!(line.contains(s(&case)), "the error names the user's directory: {line}");
            }
        }
    }
    assert!(seen_error, "no case made sled fail: the test does not reach the error path");
}

/// Finding 5: arguments that would take unbounded memory or do nothing are
/// refused at once, saying the range.
#[test]
fn finding_05_arguments_out_of_bounds_are_refused_before_any_work() {
    let dir = tempfile::tempdir().expect("dir");
    let data = dir.path().join("data");
    for (flag, value) in
        [("--instances", "10000000"), ("--instances", "0"), ("--seconds", "18446744073709551615"), ("--seconds", "0")]
    {
        let start = Instant::now();
        let o = lifecycle(&["simulate", flag, value, "--data", s(&data)]);
        assert_eq!(o.status.code(), Some(2), "{flag} {value}: {}", stderr(&o));
        assert!(stderr(&o).contains("not in"), "{flag} {value}: {}", stderr(&o));
        assert!(start.elapsed() < Duration::from_secs(10), "{flag} {value} did work first");
        assert!(!data.exists(), "{flag} {value} created --data");
    }
    let help = lifecycle(&["simulate", "--help"]);
    assert!(stdout(&help).contains("1..=100000") && stdout(&help).contains("1..=86400"), "{}", stdout(&help));
    // The library says the same to a program.
    let options = instance_lifecycle::testing::simulate::Options { instances: 0, ..Default::default() };
    assert!(options.validate().is_err());
}

/// Finding 6: a reader that closes the pipe (`| head -1`) or a Ctrl-C leaves
/// no copy of the log behind in the temporary directory.
#[test]
fn finding_06_no_copy_is_left_behind() {
    let dir = tempfile::tempdir().expect("dir");
    let data = dir.path().join("data");
    simulated_log(&data);
    let tmp = dir.path().join("tmp");
    std::fs::create_dir(&tmp).expect("tmp");
    let leftovers = || std::fs::read_dir(&tmp).expect("tmp").count();
    for cmd in ["inspect", "verify", "export"] {
        let mut child = Command::new(env!("CARGO_BIN_EXE_lifecycle"))
            .args([cmd, s(&data)])
            .env("TMPDIR", &tmp)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn");
        // The reader is gone before the first line (like `| true`): every write fails.
        drop(child.stdout.take());
        let status = child.wait().expect("wait");
        assert_eq!(status.code(), Some(0), "{cmd}: a closed pipe is not an error");
        assert_eq!(leftovers(), 0, "{cmd} left a copy after its reader went away");
    }
    // Ctrl-C while export is blocked on a full pipe nobody reads.
    let mut child = Command::new(env!("CARGO_BIN_EXE_lifecycle"))
        .args(["export", s(&data)])
        .env("TMPDIR", &tmp)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn");
    let start = Instant::now();
    while leftovers() == 0 && start.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(10));
    }
    std::thread::sleep(Duration::from_millis(300));
    // SAFETY: kill(2) with a valid pid of our own child.
    assert_eq!(unsafe { libc::kill(i32::try_from(child.id()).expect("pid"), libc::SIGINT) }, 0);
    let status = child.wait().expect("wait");
    assert_eq!(status.code(), Some(130));
    assert_eq!(leftovers(), 0, "Ctrl-C left a copy");
}

/// Finding 7: a read-only log can be read by a user who cannot write it, and
/// an unreadable directory says why. Run as another user when we are root
/// (root reads everything), as ourselves otherwise.
#[test]
fn finding_07_a_read_only_log_is_readable_and_an_unreadable_one_says_why() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().expect("dir");
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let data = dir.path().join("data");
    simulated_log(&data);
    let chmod = |p: &Path, mode| std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).expect("chmod");
    for entry in std::fs::read_dir(&data).expect("dir") {
        let p = entry.expect("entry").path();
        chmod(&p, if p.is_dir() { 0o555 } else { 0o444 });
    }
    chmod(&data, 0o555);
    let tmp = dir.path().join("tmp");
    std::fs::create_dir(&tmp).expect("tmp");
    chmod(&tmp, 0o1777);
    let root = unsafe { libc::geteuid() } == 0;
    let run = |args: &[&str]| {
        let mut c = if root {
            let mut c = Command::new("setpriv");
            c.args(["--reuid=65534", "--regid=65534", "--clear-groups", env!("CARGO_BIN_EXE_lifecycle")]);
            c
        } else {
            Command::new(env!("CARGO_BIN_EXE_lifecycle"))
        };
        c.args(args).env("TMPDIR", &tmp).output().expect("run (setpriv is part of util-linux)")
    };
    let v = run(&["verify", s(&data)]);
    assert!(v.status.success(), "read-only log: {}{}", stdout(&v), stderr(&v));
    assert!(stdout(&v).contains("clean:"), "{}", stdout(&v));
    chmod(&data, 0o000);
    let v = run(&["inspect", s(&data)]);
    chmod(&data, 0o755);
    assert!(!v.status.success());
    let err = stderr(&v);
    assert!(err.contains("ermission denied") && err.contains(s(&data)), "{err}");
    assert!(!err.contains("no instance-lifecycle log here"), "{err}");
}

/// Finding 8: plain `verify` and `verify --policy NAME` no longer contradict
/// each other silently: the log records the tuned policy by a name that says
/// so, and an explicit other policy says first how it differs.
#[test]
fn finding_08_verify_with_another_policy_says_how_it_differs() {
    let dir = tempfile::tempdir().expect("dir");
    let data = dir.path().join("data");
    simulated_log(&data);
    let plain = lifecycle(&["verify", s(&data)]);
    assert!(plain.status.success(), "{}", stdout(&plain));
    assert!(stdout(&plain).contains("\"whatsapp (tuned by simulate)\""), "{}", stdout(&plain));
    let given = lifecycle(&["verify", s(&data), "--policy", "whatsapp"]);
    let out = stdout(&given);
    let second_line = out.lines().nth(1).unwrap_or_default();
    assert!(second_line.contains("is not the policy the log recorded"), "{out}");
    assert!(out.contains("heartbeat.interval: 1s vs 30s"), "{out}");
}

/// Finding 10: one bad stdin line of `lifecycle peer` is reported and skipped.
#[test]
fn finding_10_a_bad_stdin_line_does_not_stop_the_peer() {
    let mut peer = Command::new(env!("CARGO_BIN_EXE_lifecycle"))
        .args(["peer"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("peer");
    let mut stdin = peer.stdin.take().expect("stdin");
    let mut lines = BufReader::new(peer.stdout.take().expect("stdout")).lines();
    assert!(lines.next().expect("a line").expect("utf-8").starts_with("listening ws://127.0.0.1:"));
    stdin.write_all(b"zombify \xff\xfe\n").expect("write");
    stdin.write_all(&[b'x'; 10_000]).expect("write");
    stdin.write_all(b"\nzombify nobody\n").expect("write");
    stdin.flush().expect("flush");
    let replies: Vec<String> = lines.by_ref().take(3).map(|l| l.expect("utf-8")).collect();
    assert!(replies[0].contains("not UTF-8"), "{replies:?}");
    assert!(replies[1].contains("longer than"), "{replies:?}");
    assert_eq!(replies[2], "zombified 0 connection(s)", "{replies:?}");
    assert!(peer.try_wait().expect("status").is_none(), "the peer is still serving");
    let _ = peer.kill();
    let _ = peer.wait();
}
