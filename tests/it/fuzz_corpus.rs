//! Replays every checked-in fuzz corpus file through the same function its
//! fuzz target calls, so CI runs the corpora on stable without fuzz tooling.

use std::path::Path;

use instance_lifecycle::testing::fuzz as fuzzing;

fn replay(target: &str, run: fn(&[u8])) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus").join(target);
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.expect("corpus entry").path())
        .collect();
    files.sort();
    assert!(!files.is_empty(), "{target}: empty corpus");
    for file in files {
        let data = std::fs::read(&file).expect("corpus file");
        let outcome = std::panic::catch_unwind(|| run(&data));
        assert!(
            outcome.is_ok(),
            "{} breaks an invariant (reproduce: cargo fuzz run --sanitizer none {target} {})",
            file.display(),
            file.display()
        );
    }
}

#[test]
fn corpus_record_decode() {
    replay("record_decode", fuzzing::record_decode);
}

#[test]
fn corpus_core_step() {
    replay("core_step", fuzzing::core_sequence);
}

#[test]
fn corpus_log_open_verify() {
    replay("log_open_verify", fuzzing::log_contents);
}

#[test]
fn corpus_protocol_frame() {
    replay("protocol_frame", fuzzing::protocol_frame);
}
