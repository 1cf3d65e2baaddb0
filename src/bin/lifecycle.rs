//! `lifecycle`: the command-line tool. Thin: it parses arguments, calls the
//! library, and prints. Errors are one clear line and a non-zero exit code.

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};
use instance_lifecycle::diagram::{Diagram, Format};
use instance_lifecycle::log::{Event, Finding, Log, Record};
use instance_lifecycle::machine::{InstanceName, Policy, Preset, StateKind, Timestamp};
use instance_lifecycle::simulate::{self, Options, Progress, Summary};

/// Explicit lifecycles for fleets of long-lived WebSocket sessions.
#[derive(Parser)]
#[command(name = "lifecycle", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a fleet through a seeded chaos schedule against the built-in peer, log every transition, verify the log.
    Simulate {
        /// Fleet size.
        #[arg(long, default_value_t = 200)]
        instances: usize,
        /// Length of the chaos schedule, in seconds.
        #[arg(long, default_value_t = 30)]
        seconds: u64,
        /// Seed of the schedule: the same seed gives the same schedule.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Where the log goes (replaced if a previous simulate wrote it).
        #[arg(long, default_value = "lifecycle-data")]
        data: PathBuf,
        /// Close-status preset.
        #[arg(long, value_enum, default_value_t = PresetArg::Whatsapp)]
        policy: PresetArg,
        /// An external peer speaking the reference protocol (faults then come from it).
        #[arg(long)]
        peer: Option<String>,
        /// With a wss:// --peer: PEM file of the CA that signed its certificate
        /// (trusted instead of the public web PKI).
        #[arg(long, requires = "peer")]
        ca: Option<PathBuf>,
        /// Print the summary as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show a log: every instance, or one instance's timeline. Reads a copy; never writes the log.
    Inspect {
        /// The log's directory.
        dir: PathBuf,
        /// One instance's timeline.
        #[arg(long)]
        instance: Option<String>,
        /// With --instance: the state after this sequence number.
        #[arg(long)]
        at: Option<u64>,
        /// Only instances (or records) in this state.
        #[arg(long)]
        state: Option<String>,
        /// Only records at or after this time (milliseconds since the Unix epoch).
        #[arg(long)]
        since: Option<u64>,
        /// Only records at or before this time (milliseconds since the Unix epoch).
        #[arg(long)]
        until: Option<u64>,
    },
    /// Check a log against the rules of this build (R8); exit code 1 on any finding.
    Verify {
        /// The log's directory.
        dir: PathBuf,
        /// Check against this preset instead of the policy the log recorded.
        #[arg(long, value_enum)]
        policy: Option<PresetArg>,
    },
    /// Print every record in global order, one JSON object per line.
    Export {
        /// The log's directory.
        dir: PathBuf,
        /// Output format.
        #[arg(long, value_enum, default_value_t = ExportFormat::Jsonl)]
        format: ExportFormat,
    },
    /// Print the state diagram generated from the transition table.
    Diagram {
        /// Output format.
        #[arg(long, value_enum, default_value_t = DiagramFormat::Mermaid)]
        format: DiagramFormat,
        /// Annotate each edge with how often a log took it (and mark edges never taken).
        #[arg(long)]
        from_log: Option<PathBuf>,
        /// Render to an SVG file with Graphviz `dot`.
        #[arg(long, conflicts_with = "png")]
        svg: Option<PathBuf>,
        /// Render to a PNG file with Graphviz `dot`.
        #[arg(long)]
        png: Option<PathBuf>,
    },
    /// Run the fault-injecting reference peer. Prints its URL, then takes
    /// control lines on stdin: `zombify NAME`, `drop NAME`, `close NAME CODE`,
    /// `fault NAME ready|no-identity|hang-on-logout|refuse`.
    Peer {
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: std::net::SocketAddr,
        /// Serve wss:// with this certificate chain (PEM); needs --tls-key.
        #[arg(long, requires = "tls_key")]
        tls_cert: Option<PathBuf>,
        /// The private key (PEM) of --tls-cert.
        #[arg(long, requires = "tls_cert")]
        tls_key: Option<PathBuf>,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum DiagramFormat {
    Mermaid,
    Dot,
}

#[derive(Clone, Copy, ValueEnum)]
enum ExportFormat {
    Jsonl,
}

#[derive(Clone, Copy, ValueEnum)]
enum PresetArg {
    Whatsapp,
    Evolution,
    Discord,
    Rfc6455,
}

impl From<PresetArg> for Preset {
    fn from(p: PresetArg) -> Self {
        match p {
            PresetArg::Whatsapp => Preset::Whatsapp,
            PresetArg::Evolution => Preset::Evolution,
            PresetArg::Discord => Preset::Discord,
            PresetArg::Rfc6455 => Preset::Rfc6455,
        }
    }
}

/// Prints a line to stdout; a reader that went away (`| head`) ends the program quietly.
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        if writeln!(std::io::stdout(), $($arg)*).is_err() {
            std::process::exit(0);
        }
    }};
}

/// A command's failure: one line for the person, and the exit code.
struct Failure(String);

impl<E: std::fmt::Display> From<E> for Failure {
    fn from(e: E) -> Self {
        Self(e.to_string())
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Simulate { instances, seconds, seed, data, policy, peer, ca, json } => {
            let duration = Duration::from_secs(seconds);
            let options = Options { instances, duration, seed, data, preset: policy.into(), peer, ca };
            run_async(simulate(options, json))
        }
        Command::Inspect { dir, instance, at, state, since, until } => inspect(&dir, instance, at, state, since, until),
        Command::Verify { dir, policy } => verify(&dir, policy),
        Command::Export { dir, format: ExportFormat::Jsonl } => export(&dir),
        Command::Diagram { format, from_log, svg, png } => diagram(format, from_log, svg, png),
        Command::Peer { listen, tls_cert, tls_key } => run_async(peer(listen, tls_cert.zip(tls_key))),
    };
    match result {
        Ok(code) => code,
        Err(Failure(message)) => {
            eprintln!("error: {message}");
            ExitCode::FAILURE
        }
    }
}

/// Runs an async command on a fresh runtime.
fn run_async(f: impl std::future::Future<Output = Result<ExitCode, Failure>>) -> Result<ExitCode, Failure> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| Failure(format!("cannot start the runtime: {e}")))?;
    runtime.block_on(f)
}

async fn simulate(options: Options, json: bool) -> Result<ExitCode, Failure> {
    let terminal = std::io::stderr().is_terminal();
    if !json {
        eprintln!(
            "simulating {} instances for {} s (seed {}, policy {}) → {}",
            options.instances,
            options.duration.as_secs(),
            options.seed,
            options.preset,
            options.data.display()
        );
    }
    let summary = simulate::run(&options, |p| show_progress(p, terminal)).await?;
    if terminal {
        eprintln!();
    }
    if json {
        say!("{}", serde_json::to_string_pretty(&summary)?);
    } else {
        print_summary(&summary);
    }
    Ok(if summary.verification.clean { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

fn show_progress(p: &Progress, terminal: bool) {
    let states: Vec<String> = p.states.iter().map(|(k, n)| format!("{} {n}", k.as_str().to_lowercase())).collect();
    let (done, total) = (p.elapsed.as_secs(), p.total.as_secs().max(1));
    if terminal {
        let width = 30;
        let filled = usize::try_from(done.min(total) * width / total).unwrap_or(width as usize);
        let bar = format!("{}{}", "█".repeat(filled), "░".repeat(width as usize - filled));
        eprint!("\r{bar} {done:>3}/{total} s  {}   ", states.join(", "));
        let _ = std::io::stderr().flush();
    } else {
        eprintln!("{done}/{total} s: {}", states.join(", "));
    }
}

fn print_summary(s: &Summary) {
    say!(
        "\n== summary: seed {}, policy {}, {} instances, {} s, peer {}",
        s.seed,
        s.policy,
        s.instances,
        s.seconds,
        s.peer
    );
    say!("transitions: {}", s.transitions_total);
    for (kind, n) in &s.transitions {
        say!("  {kind:<18} {n}");
    }
    let finals: Vec<String> = s.final_states.iter().map(|(k, n)| format!("{k} {n}")).collect();
    say!("final states: {}", finals.join(", "));
    say!("zombies: {} detected, {} cleaned by delete", s.zombies_detected, s.zombies_cleaned);
    say!(
        "reconnects: {} made by the rules, {} suppressed (final status, give-up, pairing refused)",
        s.reconnects_made,
        s.reconnects_suppressed
    );
    say!("engine restarts: {}", s.engine_restarts);
    for (what, l) in [("deletes", &s.deletes), ("logouts", &s.logouts)] {
        say!("{what}: {} — p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms", l.count, l.p50_ms, l.p99_ms, l.max_ms);
    }
    if !s.refused.is_empty() {
        let refused: Vec<String> = s.refused.iter().map(|(k, n)| format!("{k} {n}")).collect();
        say!("commands refused (expected under chaos): {}", refused.join(", "));
    }
    let v = &s.verification;
    if v.clean {
        say!("verification: clean — {} records of {} instances follow the rules (R8)", v.records, v.instances);
    } else {
        say!("verification: {} finding(s)", v.findings.len());
        for f in &v.findings {
            say!("  {f}");
        }
    }
    say!("log: {}  (try: lifecycle inspect {0}; lifecycle verify {0})", s.data);
}

/// Opens a copy of the log (never writing the original), saying if it is in use.
fn open_copy(dir: &Path) -> Result<Log, Failure> {
    let (log, in_use) = Log::open_copy(dir)?;
    if in_use {
        eprintln!("note: {} is in use by a running engine; reading a copy taken now", dir.display());
    }
    Ok(log)
}

fn parse_state(s: Option<String>) -> Result<Option<StateKind>, Failure> {
    s.map(|s| {
        StateKind::parse(&s).ok_or_else(|| {
            Failure(format!("unknown state {s:?}; one of Connecting, Open, Closing, Closed, Zombie, Removed"))
        })
    })
    .transpose()
}

fn time(t: Timestamp) -> String {
    t.utc()
}

fn inspect(
    dir: &Path,
    instance: Option<String>,
    at: Option<u64>,
    state: Option<String>,
    since: Option<u64>,
    until: Option<u64>,
) -> Result<ExitCode, Failure> {
    let log = open_copy(dir)?;
    let state = parse_state(state)?;
    let in_time = |t: Timestamp| since.is_none_or(|s| t.0 >= s) && until.is_none_or(|u| t.0 <= u);
    let Some(name) = instance else {
        if at.is_some() {
            return Err(Failure("--at needs --instance".into()));
        }
        say!("{:<24} {:<11} {:>7}  {:<23}  state", "instance", "kind", "records", "last transition (UTC)");
        for (name, latest) in log.latest_all()? {
            if state.is_some_and(|k| latest.instance.state.kind() != k) || !in_time(latest.at) {
                continue;
            }
            let records = log.history(&name)?.len();
            say!(
                "{:<24} {:<11} {:>7}  {:<23}  {}",
                name,
                latest.instance.state.kind(),
                records,
                time(latest.at),
                latest.instance.state
            );
        }
        return Ok(ExitCode::SUCCESS);
    };
    let name = InstanceName::new(&name)?;
    let history = log.history(&name)?;
    if history.is_empty() {
        return Err(Failure(format!("no instance {name} in {}", dir.display())));
    }
    if let Some(seq) = at {
        let record = history.iter().find(|r| r.seq == seq).ok_or_else(|| {
            Failure(format!(
                "{name} has no record {seq} (it has {}..={})",
                history[0].seq,
                history[history.len() - 1].seq
            ))
        })?;
        say!("{name} after #{seq} ({}): {} ({})", time(record.at), record.to.state, record.to.generation);
        say!("{}", serde_json::to_string_pretty(&record.to)?);
        return Ok(ExitCode::SUCCESS);
    }
    say!("{:>5}  {:<23}  {:<18} {:<10} → {:<10} {:>6}  detail", "seq", "time (UTC)", "input", "from", "to", "status");
    for r in history.iter().filter(|r| in_time(r.at) && state.is_none_or(|k| r.to.state.kind() == k)) {
        print_timeline_row(r);
    }
    Ok(ExitCode::SUCCESS)
}

fn print_timeline_row(r: &Record) {
    let (from, status, reason) = match &r.event {
        Event::Transition { from, input, .. } => {
            let (status, reason) = match input {
                instance_lifecycle::machine::Input::TransportClosed { status, reason, .. } => {
                    (status.map(|s| s.to_string()), reason.clone())
                }
                _ => (None, String::new()),
            };
            (from.state.kind().to_string(), status, reason)
        }
        Event::Created { .. } | Event::Snapshot { .. } => ("-".to_owned(), None, String::new()),
    };
    let failures = r.failures();
    let mut detail = r.to.state.to_string();
    if !reason.is_empty() {
        detail = format!("{detail}; reason {reason:?}");
    }
    if !failures.is_empty() {
        detail = format!("{detail}; FAILED: {}", failures.join("; "));
    }
    say!(
        "{:>5}  {:<23}  {:<18} {:<10} → {:<10} {:>6}  {detail}",
        r.seq,
        time(r.at),
        r.event.label(),
        from,
        r.to.state.kind(),
        status.unwrap_or_default()
    );
}

fn verify(dir: &Path, preset: Option<PresetArg>) -> Result<ExitCode, Failure> {
    let log = open_copy(dir)?;
    let (policy, source) = match preset {
        Some(p) => (Policy::preset(p.into()), "given on the command line"),
        None => match log.policy()? {
            Some(p) => (p, "recorded in the log"),
            None => (Policy::default(), "default (none recorded in the log)"),
        },
    };
    say!("verifying {} against policy {:?} ({source})", dir.display(), policy.name);
    let report = log.verify(&policy);
    if report.is_clean() {
        say!("clean: {} records of {} instances follow the rules (R8)", report.records, report.instances);
        return Ok(ExitCode::SUCCESS);
    }
    say!("{} finding(s) in {} records of {} instances:", report.findings.len(), report.records, report.instances);
    for f in &report.findings {
        say!("- {f}");
    }
    if let Some(Finding::Divergence { instance, seq, global, .. }) = report.first_divergence() {
        say!(
            "first divergence: {instance}#{seq} (global {global}) — the first record where the current rules decide differently"
        );
    }
    Ok(ExitCode::FAILURE)
}

fn export(dir: &Path) -> Result<ExitCode, Failure> {
    let log = open_copy(dir)?;
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    for record in log.records() {
        let record = record?;
        let mut value = serde_json::to_value(&record)?;
        if let Some(obj) = value.as_object_mut() {
            obj.insert("failures".into(), serde_json::json!(record.failures()));
        }
        if writeln!(out, "{value}").is_err() {
            break; // the reader went away (e.g. `| head`): not an error
        }
    }
    let _ = out.flush();
    Ok(ExitCode::SUCCESS)
}

fn diagram(
    format: DiagramFormat,
    from_log: Option<PathBuf>,
    svg: Option<PathBuf>,
    png: Option<PathBuf>,
) -> Result<ExitCode, Failure> {
    let mut d = Diagram::from_rules();
    if let Some(dir) = from_log {
        d.annotated = true;
        let log = open_copy(&dir)?;
        for record in log.records() {
            let record = record?;
            if let Event::Transition { from, input, .. } = &record.event {
                d.count(from.state.kind(), record.to.state.kind(), input.kind());
            }
        }
    }
    let render = match (svg, png) {
        (Some(path), _) => Some(("svg", path)),
        (None, Some(path)) => Some(("png", path)),
        (None, None) => None,
    };
    let Some((kind, path)) = render else {
        let text = d.render(match format {
            DiagramFormat::Mermaid => Format::Mermaid,
            DiagramFormat::Dot => Format::Dot,
        });
        say!("{}", text.trim_end());
        return Ok(ExitCode::SUCCESS);
    };
    let mut child = std::process::Command::new("dot")
        .arg(format!("-T{kind}"))
        .arg("-o")
        .arg(&path)
        .stdin(std::process::Stdio::piped())
        .spawn()
        .map_err(|_| Failure("Graphviz `dot` is not installed; install it (Debian/Ubuntu: apt-get install graphviz; macOS: brew install graphviz) or use --format dot".into()))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(d.render(Format::Dot).as_bytes())?;
    }
    let status = child.wait()?;
    if !status.success() {
        return Err(Failure(format!("dot failed with {status}")));
    }
    eprintln!("wrote {}", path.display());
    Ok(ExitCode::SUCCESS)
}

async fn peer(listen: std::net::SocketAddr, tls: Option<(PathBuf, PathBuf)>) -> Result<ExitCode, Failure> {
    use instance_lifecycle::peer::TestPeer;
    use tokio::io::AsyncBufReadExt;
    let peer = match tls {
        None => TestPeer::start_on(listen).await.map_err(|e| Failure(format!("cannot listen on {listen}: {e}")))?,
        Some((cert, key)) => {
            let read = |p: &PathBuf| std::fs::read(p).map_err(|e| Failure(format!("{}: {e}", p.display())));
            TestPeer::start_tls_on(listen, &read(&cert)?, &read(&key)?)
                .await
                .map_err(|e| Failure(format!("cannot serve wss:// on {listen}: {e}")))?
        }
    };
    say!("listening {}", peer.url());
    let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
    loop {
        match lines.next_line().await {
            Ok(Some(line)) if line.trim().is_empty() => {}
            Ok(Some(line)) => match peer.command(&line) {
                Ok(done) => say!("{done}"),
                Err(e) => say!("error: {e}"),
            },
            // End of input: keep serving until killed (Ctrl-C).
            Ok(None) => std::future::pending::<()>().await,
            Err(e) => return Err(Failure(format!("stdin: {e}"))),
        }
    }
}
