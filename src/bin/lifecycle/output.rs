//! How the CLI talks: results on stdout, a failure as one line on stderr and
//! an exit code. A reader that goes away (`| head`) is an ordinary write
//! error that unwinds through every command — so temporary copies are
//! removed on the way out — and ends the program quietly.

use std::io::Write;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};

use instance_lifecycle::machine::StateKind;

static QUIET: AtomicBool = AtomicBool::new(false);

/// `-q`: notes and progress on stderr are left out; results and errors are not.
pub fn set_quiet(quiet: bool) {
    QUIET.store(quiet, Ordering::Relaxed);
}

/// Whether `-q` was given.
pub fn quiet() -> bool {
    QUIET.load(Ordering::Relaxed)
}

/// The colour of a state kind (the dashboard's palette, as terminals have it).
/// Written through [`line`], it shows only where colour is wanted.
pub fn paint(kind: StateKind) -> anstyle::Style {
    use anstyle::{AnsiColor, Style};
    let color = match kind {
        StateKind::Connecting => AnsiColor::Yellow,
        StateKind::Open => AnsiColor::Green,
        StateKind::Closing => AnsiColor::Cyan,
        StateKind::Closed => AnsiColor::BrightBlack,
        StateKind::Zombie => AnsiColor::Red,
        StateKind::Removed => AnsiColor::Magenta,
    };
    let style = Style::new().fg_color(Some(color.into()));
    if kind == StateKind::Zombie { style.bold() } else { style }
}

/// Why a command stopped.
pub enum Failure {
    /// One line for the person; exit code 1.
    Message(String),
    /// stdout was closed by its reader: stop quietly, exit code 0.
    Closed,
}

impl<E: std::fmt::Display> From<E> for Failure {
    fn from(e: E) -> Self {
        Self::Message(e.to_string())
    }
}

/// A failure from a message.
pub fn fail(message: impl Into<String>) -> Failure {
    Failure::Message(message.into())
}

/// Writes one line to stdout: colour codes are kept on a terminal, stripped
/// elsewhere, and follow `--color`, `NO_COLOR` and `CLICOLOR_FORCE`.
pub fn line(args: std::fmt::Arguments<'_>) -> Result<(), Failure> {
    let mut out = anstream::stdout().lock();
    out.write_fmt(args).and_then(|()| out.write_all(b"\n")).map_err(|_| Failure::Closed)
}

/// Writes bytes to stdout as they are (a script, a man page).
pub fn raw(bytes: &[u8]) -> Result<ExitCode, Failure> {
    let mut out = std::io::stdout().lock();
    out.write_all(bytes).and_then(|()| out.flush()).map(|()| ExitCode::SUCCESS).map_err(|_| Failure::Closed)
}

/// Prints a line to stdout; returns `Failure::Closed` from the calling command when nobody reads.
macro_rules! say {
    ($($arg:tt)*) => {
        $crate::output::line(format_args!($($arg)*))?
    };
}
pub(crate) use say;

/// The exit code of a command's result, printing a failure.
pub fn finish(result: Result<ExitCode, Failure>) -> ExitCode {
    match result {
        Ok(code) => code,
        Err(Failure::Closed) => ExitCode::SUCCESS,
        Err(Failure::Message(message)) => {
            eprintln!("error: {message}");
            ExitCode::FAILURE
        }
    }
}

/// Exit code of a command stopped by Ctrl-C (128 + SIGINT), as shells report it.
pub const INTERRUPTED: u8 = 130;

/// For commands that do not handle Ctrl-C themselves: on SIGINT or SIGTERM,
/// remove the temporary copies of logs this process made, then exit with
/// [`INTERRUPTED`]. Without it the copies would stay in the temporary directory.
pub fn clean_up_on_interrupt() {
    let watcher = std::thread::Builder::new().name("lifecycle-signals".into()).spawn(|| {
        let Ok(runtime) = tokio::runtime::Builder::new_current_thread().enable_io().build() else { return };
        runtime.block_on(async {
            let Ok(mut term) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) else {
                return;
            };
            tokio::select! {
                r = tokio::signal::ctrl_c() => if r.is_err() { return },
                _ = term.recv() => {}
            }
            instance_lifecycle::log::remove_copies();
            eprintln!("interrupted");
            std::process::exit(i32::from(INTERRUPTED));
        });
    });
    if let Err(e) = watcher {
        eprintln!(
            "warning: cannot watch for Ctrl-C ({e}); an interrupted read may leave a copy in the temporary directory"
        );
    }
}
