//! `lifecycle`: the command-line tool. Thin: it parses arguments, calls the
//! library, and prints. Errors are one clear line and a non-zero exit code.

mod cluster;
mod diagram;
mod inspect;
mod output;
mod peer;
mod read;
mod serve;
mod simulate;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use instance_lifecycle::log::RulesChoice;
use instance_lifecycle::machine::Preset;
use instance_lifecycle::testing::simulate::{INSTANCES_MAX, SECONDS_MAX};

use output::{Failure, finish};

/// Explicit lifecycles for fleets of long-lived WebSocket sessions.
#[derive(Parser)]
#[command(name = "lifecycle", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Colour: on a terminal only (auto), always, or never. NO_COLOR is honoured.
    #[arg(long, global = true, value_enum, default_value_t = ColorArg::Auto)]
    color: ColorArg,
    /// Only results and errors: no notes or progress on stderr.
    #[arg(short, long, global = true, conflicts_with = "verbose")]
    quiet: bool,
    /// Say more about what the engine does (-v info, -vv debug, -vvv trace); RUST_LOG wins.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    verbose: u8,
}

#[derive(Clone, Copy, ValueEnum)]
enum ColorArg {
    Auto,
    Always,
    Never,
}

#[derive(Subcommand)]
enum Command {
    /// Run a fleet through a seeded chaos schedule against the built-in peer, log every transition, verify the log.
    Simulate {
        /// Fleet size, 1..=100000: each instance holds a live connection
        /// (about 50 KB of memory and two sockets with the built-in peer).
        #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u32).range(1..=INSTANCES_MAX as i64))]
        instances: u32,
        /// Length of the chaos schedule in seconds, 1..=86400 (a day).
        #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=SECONDS_MAX))]
        seconds: u64,
        /// Seed of the schedule: the same seed gives the same schedule.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Where the log goes. A log an earlier simulate wrote there is
        /// replaced once the new one is complete (it is written beside it,
        /// in DATA.simulating); anything else there is refused.
        #[arg(long, default_value = "lifecycle-data")]
        data: PathBuf,
        /// Close-status preset [default: whatsapp; discord with --protocol discord].
        #[arg(long, value_enum)]
        policy: Option<PresetArg>,
        /// What the fleet speaks: the reference protocol against the built-in
        /// peer, or Discord shards (`sim-0007` is shard 7) against the built-in
        /// fake gateway, which enforces Discord's limits and counts every breach.
        #[arg(long, value_enum, default_value_t = ProtocolArg::Reference, conflicts_with_all = ["peer", "ca", "virtual_time", "cluster"])]
        protocol: ProtocolArg,
        /// An external peer speaking the reference protocol (faults then come from it).
        #[arg(long)]
        peer: Option<String>,
        /// With a wss:// --peer: PEM file of the CA that signed its certificate
        /// (trusted instead of the public web PKI).
        #[arg(long, requires = "peer")]
        ca: Option<PathBuf>,
        /// Run the same schedule in virtual time against the simulated
        /// transport (no sockets, no waiting): the same seed gives the same
        /// log, record for record.
        #[arg(long = "virtual", conflicts_with_all = ["peer", "ca"])]
        virtual_time: bool,
        /// Run N hosts as a cluster on NATS JetStream (a nats-server on the
        /// PATH is started for the run), with host kills in the chaos; prints
        /// each host's ownership and verifies every instance's stream.
        #[arg(long, value_name = "N", conflicts_with_all = ["peer", "ca", "virtual_time"],
              value_parser = clap::value_parser!(u8).range(1..=16))]
        cluster: Option<u8>,
        /// Print the summary as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show a log: every instance (state, how long ago it moved, a count at
    /// the end), or one instance's timeline with the rule of each step.
    /// Reads a copy; never writes the log.
    Inspect {
        /// The log's directory.
        dir: PathBuf,
        /// One instance's timeline.
        #[arg(long, allow_hyphen_values = true)]
        instance: Option<String>,
        /// With --instance: the state after this sequence number.
        #[arg(long)]
        at: Option<u64>,
        /// Only instances (or records) in this state: connecting, open, closing, closed, zombie, removed.
        #[arg(long)]
        state: Option<String>,
        /// Only instances whose name starts with this, or matches it as a glob (`*`, `?`).
        #[arg(long, value_name = "PREFIX|GLOB")]
        name: Option<String>,
        /// Only records of this input (`closed`, `heartbeat missed`, …); in the list, instances with such a record.
        #[arg(long, value_name = "KIND")]
        input: Option<String>,
        /// Only records at or after this time: RFC 3339 (2026-11-30T03:12:00Z), a duration ago (10m, 2h, 3d) or epoch ms.
        #[arg(long, value_name = "TIME")]
        since: Option<String>,
        /// Only records at or before this time (as --since).
        #[arg(long, value_name = "TIME")]
        until: Option<String>,
        /// JSON Lines: one object per instance, or per record (the shape of the service's /v1/events).
        #[arg(long)]
        json: bool,
        /// Print new records as they are appended (by a running engine or `serve`) until Ctrl-C.
        #[arg(long, short)]
        follow: bool,
    },
    /// Check a log against the rules of this build (R8) and its head (nothing
    /// acknowledged lost); exit code 1 on any finding. Reads a copy.
    Verify {
        /// The log's directory.
        dir: PathBuf,
        /// Replay every record under this preset instead of the policies the log recorded.
        #[arg(long, value_enum)]
        policy: Option<PresetArg>,
        /// Which rules to replay under: `recorded` (each record under the
        /// rules version it was written under) or `current` (this build's, for
        /// every record: where do today's rules part from an old log?).
        #[arg(long, value_enum, default_value = "recorded")]
        rules: RulesArg,
        /// A head recorded earlier (`GLOBAL:LINK`, as verify prints it): also
        /// fail when the log no longer reaches it — which is how a restore of
        /// the whole directory from an older copy shows.
        #[arg(long, value_name = "GLOBAL:LINK")]
        expect_head: Option<String>,
        /// The report as one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Say whether a writer (an engine) can open a log; with --accept-loss,
    /// open a log that lost records or its head anyway, recording the loss in it.
    Recover {
        /// The log's directory.
        dir: PathBuf,
        /// Accept what was lost: record it in the log and go on from what is left.
        #[arg(long)]
        accept_loss: bool,
        /// The outcome as one JSON object.
        #[arg(long)]
        json: bool,
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
    /// Serve the engine over HTTP: REST (/v1), SSE (/v1/events), webhooks,
    /// metrics, an Evolution-API-compatible subset (/instance) and host-driven
    /// sessions, until Ctrl-C or SIGTERM. OpenAPI at /v1/openapi.json.
    Serve(serve::Flags),
    /// Show a cluster on NATS JetStream: every instance's owner now, its
    /// last state, who owned it, and the verification of its stream (one
    /// owner at a time, epochs never going back, gapless records). Reads only.
    Cluster {
        /// The NATS server (nats://host:port).
        url: String,
        /// The cluster's namespace (bucket NAMESPACE-owners, stream NAMESPACE-log).
        #[arg(long, default_value = "lifecycle")]
        namespace: String,
        /// Replay every transition through the rules under this preset (the hosts' policy).
        #[arg(long, value_enum)]
        policy: Option<PresetArg>,
        /// One JSON object per instance (JSON Lines).
        #[arg(long)]
        json: bool,
    },
    /// Serve the dashboard over a copy of a log, read-only, without an engine:
    /// the fleet as the log last saw it and every instance's history, step by
    /// step. The log itself is never written. Prints the URL; Ctrl-C stops.
    Replay {
        /// The log's directory.
        dir: PathBuf,
        /// Address to listen on (loopback only).
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: std::net::SocketAddr,
        /// Open the dashboard in the desktop's browser.
        #[arg(long)]
        open: bool,
    },
    /// Print a shell completion script: `lifecycle completions bash > /etc/bash_completion.d/lifecycle`.
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// Print the man page (roff): `lifecycle man | man -l -`.
    Man,
    /// Run the fault-injecting reference peer. Prints its URL, then takes
    /// control lines on stdin: `zombify NAME`, `drop NAME`, `close NAME CODE`,
    /// `fault NAME ready|no-identity|hang-on-logout|refuse`, `drop-all`, `stats`.
    /// With `--protocol discord`, a fake Discord gateway instead, with
    /// Discord's limits: `dispatch SHARD TYPE [JSON]`, `reconnect SHARD`,
    /// `invalidate SHARD true|false`, `beat SHARD`, `close SHARD CODE`,
    /// `drop SHARD`, `silent SHARD true|false`, `stats`.
    Peer {
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: std::net::SocketAddr,
        /// The protocol it serves.
        #[arg(long, value_enum, default_value_t = ProtocolArg::Reference)]
        protocol: ProtocolArg,
        /// With --protocol discord: the shard count IDENTIFY must name.
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
        shards: u32,
        /// With --protocol discord: the token IDENTIFY and RESUME must carry.
        #[arg(long, default_value = "Bot.test")]
        token: String,
        /// With --protocol discord: IDENTIFYs allowed per 5 s (one per bucket).
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
        max_concurrency: u32,
        /// Serve wss:// with this certificate chain (PEM); needs --tls-key.
        #[arg(long, requires = "tls_key")]
        tls_cert: Option<PathBuf>,
        /// The private key (PEM) of --tls-cert.
        #[arg(long, requires = "tls_cert")]
        tls_key: Option<PathBuf>,
    },
}

/// The wire protocol of `simulate` and `peer`.
#[derive(Clone, Copy, ValueEnum)]
enum ProtocolArg {
    /// The reference protocol (README).
    Reference,
    /// The Discord gateway (v10, JSON).
    Discord,
}

impl From<ProtocolArg> for instance_lifecycle::testing::simulate::WireProtocol {
    fn from(p: ProtocolArg) -> Self {
        match p {
            ProtocolArg::Reference => Self::Reference,
            ProtocolArg::Discord => Self::Discord,
        }
    }
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
enum RulesArg {
    Recorded,
    Current,
}

#[derive(Clone, Copy, ValueEnum)]
pub(crate) enum PresetArg {
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

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.color {
        ColorArg::Auto => {}
        ColorArg::Always => anstream::ColorChoice::Always.write_global(),
        ColorArg::Never => anstream::ColorChoice::Never.write_global(),
    }
    output::set_quiet(cli.quiet);
    // RUST_LOG=debug (or instance_lifecycle=trace, …) shows what the engine does; warnings by default.
    let level = match (cli.quiet, cli.verbose) {
        (true, _) => "error",
        (false, 0) => "warn",
        (false, 1) => "info",
        (false, 2) => "debug",
        (false, _) => "trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
    let result = match cli.command {
        Command::Simulate {
            instances,
            seconds,
            seed,
            data,
            policy,
            protocol,
            peer,
            ca,
            virtual_time,
            cluster,
            json,
        } => {
            let default = match protocol {
                ProtocolArg::Reference => PresetArg::Whatsapp,
                ProtocolArg::Discord => PresetArg::Discord,
            };
            let options = instance_lifecycle::testing::simulate::Options {
                instances: instances as usize,
                duration: std::time::Duration::from_secs(seconds),
                seed,
                data,
                preset: policy.unwrap_or(default).into(),
                peer,
                ca,
                protocol: protocol.into(),
            };
            match cluster {
                Some(hosts) => run_async(async move { simulate::run_cluster(&options, hosts.into(), json).await }),
                None if virtual_time => simulate::run_virtual(&options, json),
                None => run_async(simulate::run(options, json)),
            }
        }
        Command::Inspect { dir, instance, at, state, name, input, since, until, json, follow } => {
            let query = inspect::Query { instance, at, state, name, input, since, until, json };
            if follow {
                run_async(inspect::follow(&dir, query))
            } else {
                output::clean_up_on_interrupt();
                inspect::run(&dir, query)
            }
        }
        Command::Verify { dir, policy, rules, expect_head, json } => {
            output::clean_up_on_interrupt();
            let rules = match rules {
                RulesArg::Recorded => RulesChoice::Recorded,
                RulesArg::Current => RulesChoice::Current,
            };
            read::verify(&dir, policy.map(Preset::from), rules, expect_head.as_deref(), json)
        }
        Command::Recover { dir, accept_loss, json } => {
            output::clean_up_on_interrupt();
            read::recover(&dir, accept_loss, json)
        }
        Command::Export { dir, format: ExportFormat::Jsonl } => {
            output::clean_up_on_interrupt();
            read::export(&dir)
        }
        Command::Diagram { format, from_log, svg, png } => {
            output::clean_up_on_interrupt();
            diagram::run(matches!(format, DiagramFormat::Dot), from_log, svg, png)
        }
        Command::Serve(flags) => run_async(serve::run(flags)),
        Command::Cluster { url, namespace, policy, json } => {
            run_async(async move { cluster::run(&url, &namespace, policy.map(Preset::from), json).await })
        }
        Command::Replay { dir, listen, open } => run_async(serve::replay(dir, listen, open)),
        Command::Completions { shell } => {
            // Into a buffer first: the generator panics on a closed stdout (`| head`).
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut <Cli as clap::CommandFactory>::command(), "lifecycle", &mut script);
            output::raw(&script)
        }
        Command::Man => {
            let mut page = Vec::new();
            clap_mangen::Man::new(<Cli as clap::CommandFactory>::command())
                .render(&mut page)
                .map_err(|e| output::fail(format!("cannot render the man page: {e}")))
                .and_then(|()| output::raw(&page))
        }
        Command::Peer {
            listen,
            protocol: ProtocolArg::Discord,
            shards,
            token,
            max_concurrency,
            tls_cert: None,
            ..
        } => {
            let mut config = instance_lifecycle::testing::discord::GatewayConfig::new(token, shards);
            config.max_concurrency = max_concurrency;
            run_async(peer::run_discord(listen, config))
        }
        Command::Peer { protocol: ProtocolArg::Discord, .. } => {
            Err(output::fail("--protocol discord serves ws:// only (no --tls-cert)"))
        }
        Command::Peer { listen, tls_cert, tls_key, .. } => run_async(peer::run(listen, tls_cert.zip(tls_key))),
    };
    finish(result)
}

/// Runs an async command on a fresh runtime.
fn run_async(f: impl std::future::Future<Output = Result<ExitCode, Failure>>) -> Result<ExitCode, Failure> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| output::fail(format!("cannot start the runtime: {e}")))?;
    runtime.block_on(f)
}
