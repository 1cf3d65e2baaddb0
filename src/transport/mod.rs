//! Transports: how the engine holds one connection per instance.
//!
//! A transport runs one connection from start to end in its own task: it
//! connects, greets, reads, obeys [`Control`] messages (logout, close, ping),
//! and reports everything that happens as core [`Input`]s tagged with the
//! connection's generation — pongs included. It decides nothing: when to
//! ping and when a missing pong makes a zombie are the core's timers (R7).
//! It ends after reporting a signal that ends a connection
//! ([`Input::ends_connection`]) or when the engine drops its control sender
//! (an abort): the engine never waits on a dead socket.

pub mod discord;
mod external;
mod pacing;
mod protocol;
mod traffic;
mod ws;

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use tokio::sync::mpsc;

pub use external::{EffectListener, HOST_WAIT_MAX_MS, HostAction, HostEffect, HostSignal, Hub, Initiator, Routed};
pub use pacing::{Pacer, PacerError};
pub use protocol::{
    Beat, Logout, PeerMessage, Protocol, ProtocolError, ProtocolSession, Reading, ReferenceProtocol, Write,
};
pub use traffic::{Frame, FrameSink, Inbound, InboundError, InboundFrame, Outbound, SendBudget};
pub(crate) use traffic::{Outlet, Refused};
pub use ws::{TlsConfigError, WsLimits, WsTransport, tls_trusting};

use crate::machine::{CloseInitiator, Generation, Identity, Input, InstanceName, Reason, StatusCode, UrlError, WsUrl};

/// Where an instance's connection is held: what its spec's `url` names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Endpoint {
    /// A WebSocket the engine's transport opens (`ws://…`, `wss://…`).
    Ws(WsUrl),
    /// A connection the host holds in its own process and reports on
    /// ([`Endpoint::EXTERNAL`]): the engine decides, the host carries out
    /// (`lifecycle serve`'s host-driven sessions).
    External,
}

impl Endpoint {
    /// The spec URL of a host-driven session.
    pub const EXTERNAL: &'static str = "external:";

    /// Reads a spec's `url`.
    ///
    /// ```
    /// use instance_lifecycle::transport::Endpoint;
    /// assert_eq!(Endpoint::parse("external:").unwrap(), Endpoint::External);
    /// assert!(matches!(Endpoint::parse("wss://gw.example/ws").unwrap(), Endpoint::Ws(_)));
    /// assert!(Endpoint::parse("external").is_err());
    /// ```
    pub fn parse(url: &str) -> Result<Self, UrlError> {
        if url == Self::EXTERNAL {
            return Ok(Self::External);
        }
        WsUrl::parse(url).map(Self::Ws).map_err(|e| match url.split_once(':') {
            None | Some(("external", _)) if url.starts_with("external") => {
                UrlError { reason: "a host-driven session is written `external:` exactly", ..e }
            }
            _ => e,
        })
    }
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Ws(url) => f.write_str(url.as_str()),
            Self::External => f.write_str(Self::EXTERNAL),
        }
    }
}

/// Everything a transport needs to open one connection.
#[derive(Debug)]
pub struct ConnectSpec {
    /// The instance it belongs to.
    pub instance: InstanceName,
    /// The connection's generation: every signal carries it (R12).
    pub generation: Generation,
    /// Where to connect.
    pub endpoint: Endpoint,
    /// The identity to resume, if any.
    pub resume: Option<Identity>,
    /// Bound on the TCP + TLS + WebSocket handshake.
    pub connect_timeout: Duration,
    /// The application frames the host queued (`Engine::send`), to write in
    /// order while the connection lasts.
    pub outbound: Outbound,
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
    /// Send a ping; report its pong (R7).
    Ping,
}

/// Where a transport reports its signals. Inputs travel boxed: tokio's mpsc
/// allocates 32 slots per channel up front, and a fleet has a channel per instance.
#[derive(Clone, Debug)]
pub struct Signals {
    generation: Generation,
    tx: mpsc::Sender<Box<Input>>,
    frames: Option<FrameSink>,
}

impl Signals {
    /// A sink for the connection of `generation`.
    pub fn new(generation: Generation, tx: mpsc::Sender<Box<Input>>) -> Self {
        Self { generation, tx, frames: None }
    }

    /// Also publishes the connection's application frames to `frames`.
    #[must_use]
    pub fn with_frames(mut self, frames: FrameSink) -> Self {
        self.frames = Some(frames);
        self
    }

    /// Hands an application frame received on this connection to the host
    /// (never waits; dropped when nobody listens). Not a signal: it moves no state.
    pub fn frame(&self, frame: Frame) {
        if let Some(sink) = &self.frames {
            sink.publish(self.generation, frame);
        }
    }

    /// The connection's generation.
    pub fn generation(&self) -> Generation {
        self.generation
    }

    /// Reports a signal; `false` when the instance no longer listens.
    pub async fn send(&self, input: Input) -> bool {
        self.tx.send(Box::new(input)).await.is_ok()
    }

    /// `HandshakeStep`: a step taken after a fleet-wide wait, or a report
    /// that one goes on (R15).
    pub async fn handshake_step(&self) -> bool {
        self.send(Input::HandshakeStep { generation: self.generation }).await
    }

    /// `TransportOpened`.
    pub async fn opened(&self, identity: Option<Identity>) -> bool {
        self.send(Input::TransportOpened { generation: self.generation, identity }).await
    }

    /// `TransportClosed`: who ended it, with what status, why.
    pub async fn closed(
        &self,
        initiator: CloseInitiator,
        status: Option<StatusCode>,
        reason: impl Into<Reason>,
    ) -> bool {
        let reason = reason.into();
        self.send(Input::TransportClosed { generation: self.generation, initiator, status, reason }).await
    }

    /// `WriteFailed`.
    pub async fn write_failed(&self, error: impl Into<Reason>) -> bool {
        self.send(Input::WriteFailed { generation: self.generation, error: error.into() }).await
    }

    /// `Pong`.
    pub async fn pong(&self) -> bool {
        self.send(Input::Pong { generation: self.generation }).await
    }
}

/// A boxed future a transport returns.
pub type BoxFuture = Pin<Box<dyn Future<Output = ()> + Send + 'static>>;

/// A way to hold connections. Implemented by [`WsTransport`] and, for
/// simulation, by the harness's scripted transport.
pub trait Transport: Send + Sync + 'static {
    /// Runs one connection until it ends (see the module docs).
    fn run(&self, spec: ConnectSpec, control: mpsc::Receiver<Control>, signals: Signals) -> BoxFuture;
}
