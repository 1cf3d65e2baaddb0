//! Helpers shared by the test modules.

use instance_lifecycle::machine::{Effect, InstanceName, Outcome, State, TimerKind};

pub fn name(s: &str) -> InstanceName {
    InstanceName::new(s).expect("valid test name")
}

/// True when the effect starts a connection attempt.
pub fn opens(e: &Effect) -> bool {
    matches!(e, Effect::OpenTransport { .. })
}

/// True when the effect arms a reconnect timer.
pub fn arms_reconnect(e: &Effect) -> bool {
    matches!(e, Effect::ArmTimer { timer, .. } if timer.kind == TimerKind::Reconnect)
}

/// The transition's effects, or an empty list when the input changed nothing.
pub fn effects_of(o: &Outcome) -> Vec<Effect> {
    match o {
        Outcome::Transition(t) => t.effects.clone(),
        Outcome::Effects(e) => e.clone(),
        Outcome::Ignored(_) | Outcome::Rejected(_) => vec![],
    }
}

pub fn is_connecting(s: &State) -> bool {
    matches!(s, State::Connecting { .. })
}

/// Runs the `lifecycle` binary to completion.
pub fn lifecycle(args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_lifecycle")).args(args).output().expect("run lifecycle")
}

pub fn stdout(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A short `lifecycle simulate` into `data` (24 instances, 4 s), which must succeed.
pub fn simulated_log(data: &std::path::Path) {
    let d = data.to_str().expect("utf-8 path");
    let sim = lifecycle(&["simulate", "--instances", "24", "--seconds", "4", "--seed", "7", "--data", d, "--json"]);
    assert!(sim.status.success(), "simulate failed: {}{}", stdout(&sim), stderr(&sim));
}

/// Every file under `dir` with its BLAKE3, to show that nothing changed.
pub fn digests(dir: &std::path::Path) -> std::collections::BTreeMap<std::path::PathBuf, String> {
    let mut out = std::collections::BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).expect("read dir") {
            let path = entry.expect("entry").path();
            if path.is_dir() {
                stack.push(path);
            } else {
                let bytes = std::fs::read(&path).expect("read file");
                out.insert(
                    path.strip_prefix(dir).expect("under dir").to_path_buf(),
                    blake3::hash(&bytes).to_hex().to_string(),
                );
            }
        }
    }
    out
}

/// Stderr that shows no panic, no backtrace and no temporary path.
pub fn assert_no_crash_report(context: &str, err: &str) {
    for bad in ["panicked", "backtrace", "RUST_BACKTRACE", "lifecycle-"] {
        assert!(!err.contains(bad), "{context}: stderr shows {bad:?}:\n{err}");
    }
}

/// Copies a directory tree (a log, for damaging or comparing).
pub fn copy_tree(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for entry in std::fs::read_dir(from).expect("read dir") {
        let path = entry.expect("entry").path();
        let target = to.join(path.file_name().expect("name"));
        if path.is_dir() {
            copy_tree(&path, &target);
        } else {
            std::fs::copy(&path, &target).expect("copy");
        }
    }
}
