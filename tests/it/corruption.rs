//! The corruption matrix: a real log written by the engine, damaged in every
//! way the issue lists — 4 KiB of random bytes at every 5 % of sled's `db`
//! file, the file truncated at every 5 %, the head deleted, another log's
//! head swapped in, sled's files rolled back to an earlier copy, the whole
//! directory rolled back (checked with `--expect-head`) — and `lifecycle
//! verify` run on each. Every case: no panic, no backtrace, no temporary
//! path on stderr; a typed finding or a one-line error; and never "clean"
//! unless every record is still there, unchanged.
//!
//! `LIFECYCLE_MATRIX_SEEDS=N` adds N seeded random cases (random offsets
//! and lengths); `scripts/corruption-matrix` runs a long version.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use instance_lifecycle::log::{Log, LogConfig, Record};
use instance_lifecycle::machine::{Policy, Preset};
use instance_lifecycle::testing::simulate_virtual_on;

use crate::support::{assert_no_crash_report, copy_tree, lifecycle, stderr, stdout};

struct Pristine {
    _dir: tempfile::TempDir,
    log: PathBuf,
    earlier: PathBuf,
    other: PathBuf,
    records: BTreeMap<(String, u64), Record>,
    anchor: String,
}

fn records_of(dir: &Path) -> Result<BTreeMap<(String, u64), Record>, String> {
    let (log, _) = Log::open_copy(dir).map_err(|e| e.to_string())?;
    let mut out = BTreeMap::new();
    for r in log.records() {
        let r = r.map_err(|e| e.to_string())?;
        out.insert((r.instance.to_string(), r.seq), r);
    }
    Ok(out)
}

/// Two engine runs into one sled log, a copy taken between them, and a second log.
fn pristine() -> Pristine {
    let dir = tempfile::tempdir().expect("dir");
    let (log, earlier, other) = (dir.path().join("log"), dir.path().join("earlier"), dir.path().join("other"));
    let policy = Policy::preset(Preset::Whatsapp);
    let run = |at: &Path, seed| {
        let l = Log::open(at, buffered()).expect("open");
        let l = simulate_virtual_on(l, seed, 30, Duration::from_secs(60), policy.clone()).expect("run");
        let (global, link) = l.tip();
        drop(l);
        format!("{global}:{}", link.hex())
    };
    run(&log, 1);
    copy_tree(&log, &earlier);
    let anchor = run(&log, 2);
    run(&other, 3);
    let records = records_of(&log).expect("the pristine log reads");
    assert!(records.len() > 500, "a log of some size: {}", records.len());
    Pristine { _dir: dir, log, earlier, other, records, anchor }
}

/// Engine runs in virtual time write `Buffered` (see `simulate_virtual_on`).
fn buffered() -> LogConfig {
    LogConfig { durability: instance_lifecycle::log::Durability::Buffered, ..LogConfig::default() }
}

/// SplitMix64, for the seeded random cases.
fn next(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

enum Damage {
    Overwrite { at: u64, len: usize, seed: u64 },
    Truncate { at: u64 },
    DeleteHead,
    ForeignHead,
    RollBackSled,
    RollBackWhole,
}

impl Damage {
    fn name(&self, size: u64) -> String {
        let pct = |at: u64| at * 100 / size.max(1);
        match self {
            Self::Overwrite { at, len, .. } => format!("overwrite {len} B at {}% ({at})", pct(*at)),
            Self::Truncate { at } => format!("truncate at {}% ({at})", pct(*at)),
            Self::DeleteHead => "delete the head".into(),
            Self::ForeignHead => "another log's head".into(),
            Self::RollBackSled => "sled's files rolled back".into(),
            Self::RollBackWhole => "whole directory rolled back (--expect-head)".into(),
        }
    }

    fn apply(&self, p: &Pristine, case: &Path) {
        use std::io::{Seek, Write};
        let db = case.join("db");
        match self {
            Self::Overwrite { at, len, seed } => {
                let mut state = *seed;
                let bytes: Vec<u8> = (0..*len).map(|_| next(&mut state) as u8).collect();
                let mut f = std::fs::OpenOptions::new().write(true).open(&db).expect("db");
                f.seek(std::io::SeekFrom::Start(*at)).expect("seek");
                f.write_all(&bytes).expect("write");
            }
            Self::Truncate { at } => {
                std::fs::OpenOptions::new().write(true).open(&db).expect("db").set_len(*at).expect("truncate")
            }
            Self::DeleteHead => std::fs::remove_file(case.join("head")).expect("rm head"),
            Self::ForeignHead => {
                std::fs::copy(p.other.join("head"), case.join("head")).expect("swap head");
            }
            Self::RollBackSled => {
                for entry in std::fs::read_dir(&p.earlier).expect("earlier") {
                    let path = entry.expect("entry").path();
                    if path.file_name().is_some_and(|n| n != "head") {
                        let target = case.join(path.file_name().expect("name"));
                        if path.is_dir() {
                            copy_tree(&path, &target);
                        } else {
                            std::fs::copy(&path, &target).expect("copy");
                        }
                    }
                }
            }
            Self::RollBackWhole => {
                std::fs::remove_dir_all(case).expect("rm");
                copy_tree(&p.earlier, case);
            }
        }
    }
}

/// One case: damage a copy, run `verify`, check the verdict. Returns the table row.
fn run_case(p: &Pristine, n: usize, damage: &Damage, size: u64) -> String {
    let case = p.log.with_file_name(format!("case-{n}"));
    copy_tree(&p.log, &case);
    damage.apply(p, &case);
    let path = case.to_str().expect("utf-8");
    let o = match damage {
        Damage::RollBackWhole => lifecycle(&["verify", path, "--expect-head", &p.anchor]),
        _ => lifecycle(&["verify", path]),
    };
    let (out, err) = (stdout(&o), stderr(&o));
    let name = damage.name(size);
    assert_no_crash_report(&name, &err);
    assert!(matches!(o.status.code(), Some(0 | 1)), "{name}: exit {:?}\n{out}{err}", o.status.code());
    let verdict = if o.status.success() {
        // "Clean" is only allowed when nothing was lost or changed.
        let now = records_of(&case).unwrap_or_else(|e| panic!("{name}: verify said clean, reading says {e}"));
        assert_eq!(now.len(), p.records.len(), "{name}: verify said clean, but records were lost\n{out}");
        assert!(now == p.records, "{name}: verify said clean, but records changed\n{out}");
        "clean (every record present and unchanged)".to_owned()
    } else if let Some(line) = err.lines().find(|l| l.starts_with("error: ")) {
        assert_eq!(err.lines().filter(|l| l.starts_with("error: ")).count(), 1, "{name}: {err}");
        assert!(line.contains(path), "{name}: the error names the directory: {line}");
        line.trim_start_matches("error: ").replace(path, "DIR")
    } else {
        let first = out.lines().find(|l| l.starts_with("- ")).unwrap_or_else(|| panic!("{name}: no finding\n{out}"));
        first.trim_start_matches("- ").to_owned()
    };
    let _ = std::fs::remove_dir_all(&case);
    format!("| {name} | {} |", verdict.chars().take(140).collect::<String>())
}

#[test]
fn corruption_matrix_never_calls_a_damaged_log_clean() {
    let p = pristine();
    let size = std::fs::metadata(p.log.join("db")).expect("db").len();
    let mut cases: Vec<Damage> = Vec::new();
    for k in 0..20 {
        cases.push(Damage::Overwrite { at: size * k / 20, len: 4096, seed: k });
    }
    for k in 0..20 {
        cases.push(Damage::Truncate { at: size * k / 20 });
    }
    cases.extend([Damage::DeleteHead, Damage::ForeignHead, Damage::RollBackSled, Damage::RollBackWhole]);
    let extra: u64 = std::env::var("LIFECYCLE_MATRIX_SEEDS").ok().and_then(|s| s.parse().ok()).unwrap_or(0);
    let mut state = 0x00c0_ffee_u64;
    for _ in 0..extra {
        let at = next(&mut state) % size;
        let len = 1 + (next(&mut state) % 8192) as usize;
        cases.push(if next(&mut state).is_multiple_of(4) {
            Damage::Truncate { at }
        } else {
            Damage::Overwrite { at, len, seed: next(&mut state) }
        });
    }
    // Two at a time: the machine has two cores.
    let rows: Vec<String> = std::thread::scope(|s| {
        let (p, cases) = (&p, &cases);
        let halves: Vec<_> = (0..2)
            .map(|half| {
                s.spawn(move || {
                    cases
                        .iter()
                        .enumerate()
                        .filter(|(n, _)| n % 2 == half)
                        .map(|(n, d)| (n, run_case(p, n, d, size)))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        let mut rows: Vec<(usize, String)> =
            halves.into_iter().flat_map(|h| h.join().expect("no case panics")).collect();
        rows.sort();
        rows.into_iter().map(|(_, r)| r).collect()
    });
    println!("| case | verdict |\n|---|---|\n{}", rows.join("\n"));
}
