//! `lifecycle peer`: the fault-injecting reference peer, controlled on stdin.

use std::path::PathBuf;
use std::process::ExitCode;

use instance_lifecycle::testing::discord::{FakeGateway, GatewayConfig};
use instance_lifecycle::testing::peer::TestPeer;
use tokio::io::AsyncBufReadExt;

use crate::output::{Failure, fail, say};

/// Longest control line read; a longer one is reported and skipped.
const LINE_LEN_MAX: usize = 4096;

pub async fn run(listen: std::net::SocketAddr, tls: Option<(PathBuf, PathBuf)>) -> Result<ExitCode, Failure> {
    // A peer is there to hold many connections: as many open files as the hard limit allows.
    if let Err(e) = rlimit::increase_nofile_limit(u64::MAX) {
        eprintln!("warning: cannot raise the open-file limit ({e}); large fleets may be refused");
    }
    let peer = match tls {
        None => TestPeer::start_on(listen).await.map_err(|e| fail(format!("cannot listen on {listen}: {e}")))?,
        Some((cert, key)) => {
            let read = |p: &PathBuf| std::fs::read(p).map_err(|e| fail(format!("{}: {e}", p.display())));
            TestPeer::start_tls_on(listen, &read(&cert)?, &read(&key)?)
                .await
                .map_err(|e| fail(format!("cannot serve wss:// on {listen}: {e}")))?
        }
    };
    say!("listening {}", peer.url());
    serve_lines(|line| peer.command(line)).await
}

/// `lifecycle peer --protocol discord`: the fake Discord gateway.
pub async fn run_discord(listen: std::net::SocketAddr, config: GatewayConfig) -> Result<ExitCode, Failure> {
    let gateway =
        FakeGateway::start_on(listen, config).await.map_err(|e| fail(format!("cannot listen on {listen}: {e}")))?;
    say!("listening {}", gateway.url());
    serve_lines(|line| gateway.command_line(line)).await
}

/// Reads control lines from stdin and prints each one's answer, until killed.
async fn serve_lines(command: impl Fn(&str) -> Result<String, String>) -> Result<ExitCode, Failure> {
    let mut stdin = tokio::io::BufReader::new(tokio::io::stdin());
    let mut buf = Vec::new();
    loop {
        match read_line(&mut stdin, &mut buf).await {
            // End of input: keep serving until killed (Ctrl-C).
            Ok(Line::End) => std::future::pending::<()>().await,
            Ok(Line::TooLong) => say!("error: line longer than {LINE_LEN_MAX} bytes; skipped"),
            Ok(Line::Read) => match std::str::from_utf8(&buf) {
                Err(e) => say!("error: line is not UTF-8 ({e}); skipped"),
                Ok(line) if line.trim().is_empty() => {}
                Ok(line) => match command(line.trim()) {
                    Ok(done) => say!("{done}"),
                    Err(e) => say!("error: {e}"),
                },
            },
            Err(e) => return Err(fail(format!("stdin: {e}"))),
        }
    }
}

enum Line {
    Read,
    TooLong,
    End,
}

/// Reads one line into `buf` (without its newline), keeping at most
/// [`LINE_LEN_MAX`] bytes: a longer line is consumed and reported, not stored.
async fn read_line(r: &mut (impl tokio::io::AsyncBufRead + Unpin), buf: &mut Vec<u8>) -> std::io::Result<Line> {
    buf.clear();
    let mut too_long = false;
    loop {
        let available = r.fill_buf().await?;
        if available.is_empty() {
            return Ok(if too_long {
                Line::TooLong
            } else if buf.is_empty() {
                Line::End
            } else {
                Line::Read
            });
        }
        let (chunk, done) = match available.iter().position(|&b| b == b'\n') {
            Some(i) => (&available[..i], i + 1),
            None => (available, available.len()),
        };
        if buf.len() + chunk.len() > LINE_LEN_MAX {
            too_long = true;
        } else {
            buf.extend_from_slice(chunk);
        }
        let newline = done > chunk.len();
        r.consume(done);
        if newline {
            return Ok(if too_long { Line::TooLong } else { Line::Read });
        }
    }
}
