//! `lifecycle`: the command-line tool. Thin: it parses arguments, calls the
//! library, and prints. Errors are one clear line and a non-zero exit code.

use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use instance_lifecycle::diagram::{Diagram, Format};

/// Explicit lifecycles for fleets of long-lived WebSocket sessions.
#[derive(Parser)]
#[command(name = "lifecycle", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print the state diagram generated from the transition table.
    Diagram {
        /// Output format.
        #[arg(long, value_enum, default_value_t = DiagramFormat::Mermaid)]
        format: DiagramFormat,
    },
    /// Run the fault-injecting reference peer. Prints its URL, then takes
    /// control lines on stdin: `zombify NAME`, `drop NAME`, `close NAME CODE`,
    /// `fault NAME ready|no-identity|hang-on-logout|refuse`.
    Peer {
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: std::net::SocketAddr,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum DiagramFormat {
    Mermaid,
    Dot,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Peer { listen } => run_async(peer(listen)),
        Command::Diagram { format } => {
            let format = match format {
                DiagramFormat::Mermaid => Format::Mermaid,
                DiagramFormat::Dot => Format::Dot,
            };
            print!("{}", Diagram::from_rules().render(format));
            ExitCode::SUCCESS
        }
    }
}

/// Runs an async command on a fresh runtime; errors are one line and exit code 1.
fn run_async(f: impl std::future::Future<Output = Result<(), String>>) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(f) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn peer(listen: std::net::SocketAddr) -> Result<(), String> {
    use tokio::io::AsyncBufReadExt;
    let peer = instance_lifecycle::peer::TestPeer::start_on(listen)
        .await
        .map_err(|e| format!("cannot listen on {listen}: {e}"))?;
    println!("listening {}", peer.url());
    let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
    loop {
        match lines.next_line().await {
            Ok(Some(line)) if line.trim().is_empty() => {}
            Ok(Some(line)) => match peer.command(&line) {
                Ok(done) => println!("{done}"),
                Err(e) => println!("error: {e}"),
            },
            // End of input: keep serving until killed (Ctrl-C).
            Ok(None) => std::future::pending::<()>().await,
            Err(e) => return Err(format!("stdin: {e}")),
        }
    }
}
