//! The `lifecycle` binary itself: simulate a small fleet for a few seconds,
//! then inspect, verify, export and diagram what it wrote, checking the output;
//! and the one-line errors a person gets for bad input.

use std::path::Path;
use std::process::{Command, Output};

use crate::support::{lifecycle, stderr, stdout};

#[test]
fn simulate_then_inspect_verify_export_and_diagram_what_it_wrote() {
    let dir = tempfile::tempdir().expect("dir");
    let data = dir.path().join("data");
    let data_s = data.to_str().expect("utf-8 path");
    let sim =
        lifecycle(&["simulate", "--instances", "24", "--seconds", "6", "--seed", "7", "--data", data_s, "--json"]);
    assert!(sim.status.success(), "simulate failed: {}{}", stdout(&sim), stderr(&sim));
    let summary: serde_json::Value = serde_json::from_str(&stdout(&sim)).expect("--json prints JSON");
    assert_eq!(summary["verification"]["clean"], true, "{summary:#}");
    assert_eq!(summary["seed"], 7);
    assert_eq!(summary["policy"], "whatsapp (tuned by simulate)");
    assert_eq!(summary["engine_restarts"], 2);
    let total = summary["transitions_total"].as_u64().expect("a count");
    assert!(total >= 24 * 2, "{total} transitions for 24 instances");
    assert!(summary["transitions"]["connect"].as_u64().unwrap_or(0) >= 24);
    let closes = summary["closes"].as_object().expect("closes by initiator");
    assert!(
        closes.contains_key("peer") && closes.keys().all(|k| ["peer", "local", "transport"].contains(&k.as_str())),
        "{closes:?}"
    );

    let list = lifecycle(&["inspect", data_s]);
    assert!(list.status.success(), "{}", stderr(&list));
    let rows = stdout(&list).lines().filter(|l| l.starts_with("sim-")).count();
    assert_eq!(rows, 24, "{}", stdout(&list));

    let timeline = lifecycle(&["inspect", data_s, "--instance", "sim-0000"]);
    assert!(timeline.status.success(), "{}", stderr(&timeline));
    let text = stdout(&timeline);
    assert!(text.contains("created") && text.contains("connect"), "{text}");
    let at = lifecycle(&["inspect", data_s, "--instance", "sim-0000", "--at", "1"]);
    assert!(
        stdout(&at).contains("after #1") && stdout(&at).contains("Closed — created, never connected"),
        "{}",
        stdout(&at)
    );

    let verify = lifecycle(&["verify", data_s]);
    assert!(verify.status.success(), "{}", stdout(&verify));
    assert!(stdout(&verify).contains("clean"), "{}", stdout(&verify));

    let export = lifecycle(&["export", data_s, "--format", "jsonl"]);
    assert!(export.status.success(), "{}", stderr(&export));
    let lines: Vec<serde_json::Value> =
        stdout(&export).lines().map(|l| serde_json::from_str(l).expect("one JSON object per line")).collect();
    let records: u64 = summary["verification"]["records"].as_u64().expect("records");
    assert_eq!(lines.len() as u64, records);
    let globals: Vec<u64> = lines.iter().map(|v| v["global"].as_u64().expect("global")).collect();
    assert!(globals.windows(2).all(|w| w[0] < w[1]), "global order");

    let diagram = lifecycle(&["diagram", "--from-log", data_s]);
    assert!(diagram.status.success(), "{}", stderr(&diagram));
    let text = stdout(&diagram);
    assert!(text.contains("Connecting --> Open : opened ×"), "{text}");
    assert!(text.contains("never taken"), "{text}");

    // A rerun with the same --data replaces what simulate wrote.
    let again = lifecycle(&["simulate", "--instances", "4", "--seconds", "2", "--data", data_s]);
    assert!(again.status.success(), "{}", stderr(&again));
}

#[test]
fn the_same_seed_gives_the_same_schedule() {
    use instance_lifecycle::testing::chaos::schedule;
    let d = std::time::Duration::from_secs(30);
    assert_eq!(schedule(42, 100, d, true), schedule(42, 100, d, true));
    assert_ne!(schedule(42, 100, d, true), schedule(43, 100, d, true));
    let host_only = schedule(42, 100, d, false);
    assert!(host_only.len() < schedule(42, 100, d, true).len(), "--peer drops the peer's faults");
}

fn assert_one_line_error(o: &Output, contains: &str) {
    assert!(!o.status.success());
    let err = stderr(o);
    let errors: Vec<&str> = err.lines().filter(|l| l.starts_with("error: ")).collect();
    assert_eq!(errors.len(), 1, "one error line: {err}");
    assert!(errors[0].contains(contains), "{err}");
    assert!(!err.contains("panicked") && !err.contains("backtrace"), "{err}");
}

#[test]
fn errors_are_one_clear_line() {
    let dir = tempfile::tempdir().expect("dir");
    let d = dir.path().to_str().expect("utf-8");
    assert_one_line_error(&lifecycle(&["inspect", d]), "no instance-lifecycle log here");
    assert_one_line_error(&lifecycle(&["verify", &format!("{d}/missing")]), "no instance-lifecycle log here");
    let file = dir.path().join("file");
    std::fs::write(&file, "x").expect("write");
    assert_one_line_error(&lifecycle(&["export", file.to_str().expect("utf-8")]), "not a directory");
    // Not a log: someone's own files.
    let other = dir.path().join("other");
    std::fs::create_dir(&other).expect("mkdir");
    std::fs::write(other.join("notes.txt"), "mine").expect("write");
    let o = other.to_str().expect("utf-8");
    assert_one_line_error(
        &lifecycle(&["simulate", "--data", o, "--seconds", "1"]),
        "was not written by `lifecycle simulate`",
    );
    assert!(Path::new(&other.join("notes.txt")).exists(), "nothing of the user's was removed");
    assert_one_line_error(
        &lifecycle(&["simulate", "--peer", "ws://127.0.0.1:1/", "--data", &format!("{d}/x"), "--seconds", "1"]),
        "refuses connections",
    );
}

/// `diagram --svg/--png` renders through Graphviz `dot` when it is on the
/// PATH (CI installs it and requires it), and says how to install it when
/// it is not, with a non-zero exit and no file.
#[test]
fn diagram_renders_svg_and_png_with_graphviz_and_explains_its_absence() {
    let dir = tempfile::tempdir().expect("dir");
    let has_dot = Command::new("dot").arg("-V").output().is_ok_and(|o| o.status.success());
    assert!(has_dot || std::env::var_os("CI").is_none(), "CI must have Graphviz (.ci/run installs it)");
    if has_dot {
        let svg = dir.path().join("rules.svg");
        let out = lifecycle(&["diagram", "--svg", svg.to_str().expect("utf-8 path")]);
        assert!(out.status.success(), "{}", stderr(&out));
        let text = std::fs::read_to_string(&svg).expect("svg written");
        assert!(text.contains("<svg") && text.contains("Zombie") && text.contains("Removed"), "{text}");
        let png = dir.path().join("rules.png");
        let out = lifecycle(&["diagram", "--png", png.to_str().expect("utf-8 path")]);
        assert!(out.status.success(), "{}", stderr(&out));
        assert!(std::fs::read(&png).expect("png written").starts_with(b"\x89PNG"), "not a PNG");
    } else {
        eprintln!("Graphviz `dot` not found: only the error path of diagram --svg is checked here");
    }

    let empty_path = dir.path().join("no-tools");
    std::fs::create_dir(&empty_path).expect("dir");
    let missing = dir.path().join("missing.svg");
    let out = Command::new(env!("CARGO_BIN_EXE_lifecycle"))
        .args(["diagram", "--svg", missing.to_str().expect("utf-8 path")])
        .env("PATH", &empty_path)
        .output()
        .expect("run lifecycle");
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains("Graphviz `dot` is not installed") && err.contains("apt-get install graphviz"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "one line, no backtrace: {err}");
    assert!(!missing.exists());
}

/// `lifecycle peer --tls-cert/--tls-key` serves wss://, and `simulate --peer
/// wss://… --ca FILE` runs a fleet against it trusting that CA; without
/// `--ca` the same peer is refused in one line that names the certificate.
#[test]
fn simulate_against_a_wss_peer_with_a_private_ca() {
    use std::io::BufRead;
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let path = |f: &str| fixtures.join(f).to_str().expect("utf-8 path").to_owned();
    let mut peer = Command::new(env!("CARGO_BIN_EXE_lifecycle"))
        .args(["peer", "--tls-cert", &path("test-peer.pem"), "--tls-key", &path("test-peer.key")])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("start lifecycle peer");
    let mut line = String::new();
    std::io::BufReader::new(peer.stdout.take().expect("stdout")).read_line(&mut line).expect("read");
    let url = line.trim().strip_prefix("listening ").expect("the peer prints its URL").to_owned();
    assert!(url.starts_with("wss://127.0.0.1:"), "{url}");

    let dir = tempfile::tempdir().expect("dir");
    let data = dir.path().join("data");
    let data_s = data.to_str().expect("utf-8 path");
    let base = ["simulate", "--peer", &url, "--instances", "6", "--seconds", "3", "--data", data_s, "--json"];
    let sim = lifecycle(&[&base[..], &["--ca", &path("test-ca.pem")]].concat());
    let refused = lifecycle(&base);
    let _ = peer.kill();
    let _ = peer.wait();

    assert!(sim.status.success(), "simulate over wss failed: {}{}", stdout(&sim), stderr(&sim));
    let summary: serde_json::Value = serde_json::from_str(&stdout(&sim)).expect("--json prints JSON");
    assert_eq!(summary["verification"]["clean"], true, "{summary:#}");
    assert!(
        summary["transitions"]["opened"].as_u64().is_some_and(|n| n >= 6),
        "every instance opened over TLS: {summary:#}"
    );

    assert!(!refused.status.success());
    let err = stderr(&refused);
    assert!(err.contains("refuses connections") && err.contains("certificate"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "one line: {err}");

    let missing = lifecycle(&[&base[..], &["--ca", "/nonexistent/ca.pem"]].concat());
    assert!(!missing.status.success());
    assert!(stderr(&missing).contains("/nonexistent/ca.pem"), "{}", stderr(&missing));
}
