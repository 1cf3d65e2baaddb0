//! `cargo bench --bench start`: how long `lifecycle serve` takes to answer
//! on a big log, against the engine's own recovery of the same log in the
//! same run. The log: 1,000,000 records of 10,000 live instances (20
//! records each, at rest) and 100,000 removed ones (8 records each), written
//! through the rules (`machine::step`), so every record is a real transition.
//!
//! Rows: spawn → the first successful request (`/healthz`), and → the fleet
//! view (`/v1/fleet`, folded from the log in the background), each against
//! `Engine::open` of the same directory. Best of three, interleaved (the
//! first open of a directory pays for a cold page cache).
//! `BENCH_SCALE` scales the log (default 1.0: about a minute to write);
//! `LIFECYCLE_BIN` runs another build of `lifecycle` (e.g. an older one) for
//! a before/after; `START_LOG_DIR` keeps the log there. Not part of CI.

use std::io::{BufRead, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use instance_lifecycle::engine::{Engine, EngineConfig};
use instance_lifecycle::log::{Durability, Event, InstanceSpec, Log, LogConfig};
use instance_lifecycle::machine::{
    CloseInitiator, Generation, Identity, Input, Instance, InstanceName, Outcome, Policy, Preset, Reason, StatusCode,
    Timestamp, step,
};

fn scaled(n: usize) -> usize {
    let scale: f64 = std::env::var("BENCH_SCALE").ok().and_then(|s| s.parse().ok()).unwrap_or(1.0);
    ((n as f64 * scale) as usize).max(10)
}

/// Drives one instance through `inputs` with the rules, appending each record.
fn drive(log: &Log, policy: &Policy, name: &InstanceName, t: &mut u64, inputs: &[Input]) -> usize {
    let mut inst = Instance::new();
    let mut seq = log.next_seq(name);
    let spec = InstanceSpec { url: "ws://127.0.0.1:9/start-bench".into() };
    log.append(name, seq, Timestamp(*t), Event::Created { spec, token: None }, &inst).expect("create");
    let mut n = 1;
    for input in inputs {
        *t += 10;
        // Signals carry the current generation.
        let input = match input.clone() {
            Input::TransportOpened { identity, .. } => Input::TransportOpened { generation: inst.generation, identity },
            Input::TransportClosed { initiator, status, reason, .. } => {
                Input::TransportClosed { generation: inst.generation, initiator, status, reason }
            }
            other => other,
        };
        if let Outcome::Transition(tr) = step(name, &inst, &input, policy, Timestamp(*t)) {
            let from = inst.clone();
            inst.apply(&tr);
            seq += 1;
            let event = Event::Transition { from, input, effects: tr.effects };
            log.append(name, seq, Timestamp(*t), event, &inst).expect("append");
            n += 1;
        }
    }
    n
}

/// Writes the log; returns (records, live, removed).
fn write_log(dir: &Path, live: usize, removed: usize) -> (usize, usize, usize) {
    let log = Log::open(dir, LogConfig { durability: Durability::Buffered, ..LogConfig::default() }).expect("log");
    let policy = Policy::preset(Preset::Whatsapp);
    log.set_policy(&policy).expect("policy");
    let opened = Input::TransportOpened {
        generation: Generation(0),
        identity: Some(Identity::new("5511999999999@s.whatsapp.net").expect("id")),
    };
    let logged_out = Input::TransportClosed {
        generation: Generation(0),
        initiator: CloseInitiator::Peer,
        status: Some(StatusCode(401)),
        reason: Reason::from("logged out"),
    };
    let session = |restarts: usize| {
        let mut inputs = vec![Input::Connect, opened.clone()];
        for _ in 0..restarts {
            inputs.extend([Input::Restart, opened.clone()]);
        }
        inputs.push(logged_out.clone()); // at rest: nothing connects at start
        inputs
    };
    // Recent times: the removed instances are within their retention.
    let now = u64::try_from(SystemTime::now().duration_since(UNIX_EPOCH).expect("clock").as_millis()).expect("ms");
    let mut t = now - 3_600_000;
    let mut records = 0;
    let (live_inputs, mut removed_inputs) = (session(8), session(1));
    removed_inputs.extend([Input::Delete, Input::CleanupFinished { steps: vec![] }]);
    for i in 0..removed {
        let name = InstanceName::new(format!("gone-{i:06}")).expect("name");
        records += drive(&log, &policy, &name, &mut t, &removed_inputs);
    }
    for i in 0..live {
        let name = InstanceName::new(format!("live-{i:05}")).expect("name");
        records += drive(&log, &policy, &name, &mut t, &live_inputs);
    }
    log.sync().expect("sync");
    (records, live, removed)
}

/// One HTTP/1.1 GET on a fresh connection; the status, or `None` when refused.
fn get(addr: &str, path: &str) -> Option<u16> {
    let mut s = TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(120))).ok()?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    out.split_whitespace().nth(1)?.parse().ok()
}

/// Spawns `lifecycle serve` on `dir`; returns (→ /healthz, → /v1/fleet).
fn serve_start(bin: &str, dir: &Path) -> (Duration, Duration) {
    let config = dir.with_extension("toml");
    // Only the settings every version knows: an older build can be compared.
    std::fs::write(&config, format!("data = {:?}\nlisten = \"127.0.0.1:0\"\n", dir.display().to_string()))
        .expect("settings");
    let spawned = Instant::now();
    let mut child = Command::new(bin)
        .args(["serve", "--config"])
        .arg(&config)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn lifecycle serve");
    let mut lines = std::io::BufReader::new(child.stdout.take().expect("stdout")).lines().map_while(Result::ok);
    let line = lines.find(|l| l.contains("serving http://")).expect("the service says where it serves");
    let addr = line.split("http://").nth(1).and_then(|r| r.split_whitespace().next()).expect("address").to_owned();
    while get(&addr, "/healthz") != Some(200) {
        std::thread::sleep(Duration::from_millis(2));
    }
    let healthy = spawned.elapsed();
    assert_eq!(get(&addr, "/v1/fleet"), Some(200), "the fleet view answers");
    let fleet = spawned.elapsed();
    let _ = Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
    let _ = child.wait();
    drop(lines);
    (healthy, fleet)
}

fn engine_open(runtime: &tokio::runtime::Runtime, dir: &Path, live: usize) -> Duration {
    runtime.block_on(async {
        let t = Instant::now();
        let engine =
            Engine::open(dir, EngineConfig { policy: Policy::preset(Preset::Whatsapp), ..EngineConfig::default() })
                .await
                .expect("engine opens");
        let took = t.elapsed();
        assert_eq!(engine.list().len(), live, "every live instance restored");
        engine.shutdown().await.expect("shutdown");
        took
    })
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("runtime");
    let bin = std::env::var("LIFECYCLE_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_lifecycle").to_owned());
    let root = tempfile::tempdir().expect("dir");
    // START_LOG_DIR keeps the log for a look afterwards (a profile, `lifecycle inspect`).
    let dir = std::env::var_os("START_LOG_DIR").map_or_else(|| root.path().join("log"), std::path::PathBuf::from);
    let written = Instant::now();
    let (records, live, removed) = write_log(&dir, scaled(10_000), scaled(100_000));
    eprintln!("wrote {records} records in {:.1} s", written.elapsed().as_secs_f64());
    let (mut engine, mut healthy, mut fleet) = (Duration::MAX, Duration::MAX, Duration::MAX);
    for _ in 0..3 {
        engine = engine.min(engine_open(&runtime, &dir, live));
        let (h, f) = serve_start(&bin, &dir);
        (healthy, fleet) = (healthy.min(h), fleet.min(f));
    }
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    println!("## Start on a big log: {records} records, {live} live and {removed} removed instances");
    println!();
    println!("| measurement | ours | baseline | ratio | target |");
    println!("|---|---|---|---|---|");
    println!(
        "| `lifecycle serve`: spawn → first successful request | {:.0} ms | `Engine::open` of the same log: {:.0} ms | {:.2}× | ≤ 1.5× |",
        ms(healthy),
        ms(engine),
        ms(healthy) / ms(engine)
    );
    println!(
        "| `lifecycle serve`: spawn → the fleet view (folded in the background) | {:.0} ms | `Engine::open`: {:.0} ms | {:.2}× | (shown) |",
        ms(fleet),
        ms(engine),
        ms(fleet) / ms(engine)
    );
}
