//! `lifecycle peer` in its own process, for the benchmarks: its memory and
//! CPU are not the engine's. Control lines go to its stdin; its answers come
//! back line by line.

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

pub struct PeerProcess {
    child: Child,
    stdin: ChildStdin,
    lines: mpsc::Receiver<String>,
    pub url: String,
}

impl PeerProcess {
    pub fn start() -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_lifecycle"))
            .arg("peer")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("start lifecycle peer");
        let stdin = child.stdin.take().expect("stdin");
        let mut out = BufReader::new(child.stdout.take().expect("stdout"));
        let mut line = String::new();
        out.read_line(&mut line).expect("peer url");
        let url = line.trim().strip_prefix("listening ").expect("listening line").to_owned();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in out.lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Self { child, stdin, lines, url }
    }

    /// Sends a control line without waiting for its answer.
    pub fn send(&mut self, line: &str) {
        writeln!(self.stdin, "{line}").expect("peer command");
    }

    /// Sends a control line and returns its answer (earlier answers are skipped).
    #[allow(dead_code)] // not every benchmark asks
    pub fn ask(&mut self, line: &str) -> String {
        while self.lines.try_recv().is_ok() {}
        self.send(line);
        self.lines.recv_timeout(Duration::from_secs(10)).expect("the peer answers")
    }
}

impl Drop for PeerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
