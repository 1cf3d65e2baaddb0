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
}

#[derive(Clone, Copy, ValueEnum)]
enum DiagramFormat {
    Mermaid,
    Dot,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
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
