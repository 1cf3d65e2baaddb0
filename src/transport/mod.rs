//! Transports: how the engine holds one connection per instance.
//!
//! A transport runs one connection from start to end in its own task: it
//! connects, greets, reads, keeps heartbeats, obeys [`Control`] messages, and
//! reports everything that happens as core [`Input`]s tagged with the
//! connection's generation. It ends after reporting a terminal signal
//! (closed, heartbeat missed, write failed, logout failed) or when the engine
//! drops its control sender (an abort): the engine never waits on a dead socket.

mod protocol;
mod ws;

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use tokio::sync::mpsc;

pub use protocol::{PeerMessage, Protocol, ProtocolError, ReferenceProtocol};
pub use ws::{TlsConfigError, WsLimits, WsTransport, tls_trusting};

use crate::machine::{Generation, Heartbeat, Identity, Input, InstanceName, StatusCode};

/// Everything a transport needs to open one connection.
#[derive(Clone, Debug)]
pub struct ConnectSpec {
    /// The instance it belongs to.
    pub instance: InstanceName,
    /// The connection's generation: every signal carries it (R12).
    pub generation: Generation,
    /// Where to connect (`ws://` or `wss://`).
    pub url: String,
    /// The identity to resume, if any.
    pub resume: Option<Identity>,
    /// Heartbeat interval and pong deadline (R7).
    pub heartbeat: Heartbeat,
    /// Bound on the TCP + TLS + WebSocket handshake.
    pub connect_timeout: Duration,
}

/// What the engine asks of a live connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Control {
    /// Send the protocol's logout.
    SendLogout,
    /// Close gracefully with this status.
    Close {
        /// The status (the protocol maps it to a close code).
        status: StatusCode,
    },
}

/// Where a transport reports its signals. Inputs travel boxed: tokio's mpsc
/// allocates 32 slots per channel up front, and a fleet has a channel per instance.
#[derive(Clone, Debug)]
pub struct Signals {
    generation: Generation,
    tx: mpsc::Sender<Box<Input>>,
}

impl Signals {
    /// A sink for the connection of `generation`.
    pub fn new(generation: Generation, tx: mpsc::Sender<Box<Input>>) -> Self {
        Self { generation, tx }
    }

    /// The connection's generation.
    pub fn generation(&self) -> Generation {
        self.generation
    }

    /// Reports a signal; `false` when the instance no longer listens.
    pub async fn send(&self, input: Input) -> bool {
        self.tx.send(Box::new(input)).await.is_ok()
    }

    /// `TransportOpened`.
    pub async fn opened(&self, identity: Option<Identity>) -> bool {
        self.send(Input::TransportOpened { generation: self.generation, identity }).await
    }

    /// `TransportClosed`.
    pub async fn closed(&self, status: Option<StatusCode>, reason: impl Into<String>) -> bool {
        let reason = bounded(reason.into());
        self.send(Input::TransportClosed { generation: self.generation, status, reason }).await
    }

    /// `WriteFailed`.
    pub async fn write_failed(&self, error: impl Into<String>) -> bool {
        self.send(Input::WriteFailed { generation: self.generation, error: bounded(error.into()) }).await
    }
}

/// Longest reason or error text kept in a record: close reasons are at most
/// 123 bytes by RFC 6455; OS errors are short; a hostile peer gets no more.
pub const REASON_LEN_MAX: usize = 256;

/// Truncates a text to [`REASON_LEN_MAX`] bytes on a character boundary.
pub fn bounded(mut s: String) -> String {
    if s.len() > REASON_LEN_MAX {
        let mut end = REASON_LEN_MAX;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
    s
}

/// A boxed future a transport returns.
pub type BoxFuture = Pin<Box<dyn Future<Output = ()> + Send + 'static>>;

/// A way to hold connections. Implemented by [`WsTransport`] and, for
/// simulation, by the harness's scripted transport.
pub trait Transport: Send + Sync + 'static {
    /// Runs one connection until it ends (see the module docs).
    fn run(&self, spec: ConnectSpec, control: mpsc::Receiver<Control>, signals: Signals) -> BoxFuture;
}
