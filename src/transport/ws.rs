//! The WebSocket transport on tokio-tungstenite, for `ws://` and `wss://` (rustls).

use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio::sync::mpsc;
use tokio::time::timeout;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tracing::{Instrument, debug, trace};

use super::pacing::Pacer;
use super::protocol::{Beat, Logout, ProtocolSession, Reading, Write};
use super::{BoxFuture, ConnectSpec, Control, Endpoint, Frame, Outbound, PeerMessage, Protocol, Signals, Transport};
use crate::machine::{CloseInitiator, Input, InstanceName, Reason};

/// Frame and buffer limits per connection, so a fleet of thousands fits in memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WsLimits {
    /// Largest message accepted; larger is closed with 1009. Lifecycle
    /// messages are tiny; 64 KiB leaves room for a product's own payloads.
    pub max_message: usize,
    /// Largest frame accepted.
    pub max_frame: usize,
    /// Read buffer allocated per connection (tungstenite's default is 128 KiB).
    pub read_buffer: usize,
    /// Write buffer per connection.
    pub write_buffer: usize,
}

impl Default for WsLimits {
    fn default() -> Self {
        Self { max_message: 64 * 1024, max_frame: 64 * 1024, read_buffer: 4 * 1024, write_buffer: 4 * 1024 }
    }
}

impl WsLimits {
    /// The tungstenite configuration for these limits.
    pub fn config(self) -> WebSocketConfig {
        WebSocketConfig::default()
            .max_message_size(Some(self.max_message))
            .max_frame_size(Some(self.max_frame))
            .read_buffer_size(self.read_buffer)
            .write_buffer_size(self.write_buffer)
            .max_write_buffer_size(self.write_buffer.saturating_mul(16).max(self.max_message + self.write_buffer))
    }
}

/// The WebSocket transport.
#[derive(Clone)]
pub struct WsTransport {
    protocol: Arc<dyn Protocol>,
    limits: WsLimits,
    /// `None`: the public web PKI (webpki roots).
    tls: Option<Arc<rustls::ClientConfig>>,
    /// Fleet-wide pacing of new sockets, if any.
    connects: Option<Arc<Pacer>>,
}

/// Why a TLS configuration for `wss://` could not be built.
#[derive(Debug, thiserror::Error)]
pub enum TlsConfigError {
    /// The bytes are not PEM certificates.
    #[error("root certificates: {0}")]
    Pem(String),
    /// No certificate in the PEM.
    #[error("root certificates: no certificate in the PEM")]
    NoCertificates,
    /// rustls refused a certificate or the configuration.
    #[error("TLS configuration: {0}")]
    Rustls(String),
}

impl WsTransport {
    /// A transport speaking `protocol`; `wss://` trusts the public web PKI.
    /// Installs rustls' `ring` provider once per process (without one,
    /// tungstenite panics on TLS).
    pub fn new(protocol: Arc<dyn Protocol>, limits: WsLimits) -> Self {
        let _ = rustls::crypto::ring::default_provider().install_default();
        Self { protocol, limits, tls: None, connects: None }
    }

    /// Opens sockets no faster than `pacer` allows, fleet-wide (each
    /// instance in its own bucket of it, by name): a restart of a large
    /// fleet, or a reconnect storm after an outage, reaches the peer at a
    /// rate it will not read as abuse. The wait counts against the connect timer.
    #[must_use]
    pub fn with_connect_pacing(mut self, pacer: Arc<Pacer>) -> Self {
        self.connects = Some(pacer);
        self
    }

    /// `wss://` with this rustls client configuration (client certificates,
    /// pinned roots, …).
    #[must_use]
    pub fn with_tls(mut self, config: Arc<rustls::ClientConfig>) -> Self {
        self.tls = Some(config);
        self
    }

    /// `wss://` trusting exactly the CA certificates in `pem` (a private CA
    /// of the gateway's peers) instead of the public web PKI.
    pub fn with_root_certificates(self, pem: &[u8]) -> Result<Self, TlsConfigError> {
        Ok(self.with_tls(tls_trusting(pem)?))
    }
}

/// A rustls client configuration (ring) that trusts exactly the CA
/// certificates in `pem`.
pub fn tls_trusting(pem: &[u8]) -> Result<Arc<rustls::ClientConfig>, TlsConfigError> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(pem) {
        let cert = cert.map_err(|e| TlsConfigError::Pem(e.to_string()))?;
        roots.add(cert).map_err(|e| TlsConfigError::Rustls(e.to_string()))?;
    }
    if roots.is_empty() {
        return Err(TlsConfigError::NoCertificates);
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsConfigError::Rustls(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

impl Transport for WsTransport {
    fn run(&self, spec: ConnectSpec, control: mpsc::Receiver<Control>, signals: Signals) -> BoxFuture {
        let setup = Setup {
            protocol: self.protocol.clone(),
            limits: self.limits,
            tls: self.tls.clone(),
            connects: self.connects.clone(),
        };
        let span = tracing::debug_span!("connection", instance = %spec.instance, generation = %spec.generation);
        Box::pin(run(setup, spec, control, signals).instrument(span))
    }
}

type Ws = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// What every connection of one transport shares.
struct Setup {
    protocol: Arc<dyn Protocol>,
    limits: WsLimits,
    tls: Option<Arc<rustls::ClientConfig>>,
    connects: Option<Arc<Pacer>>,
}

async fn run(setup: Setup, mut spec: ConnectSpec, mut control: mpsc::Receiver<Control>, signals: Signals) {
    let outbound = std::mem::take(&mut spec.outbound);
    // The handshake (TCP, TLS, HTTP upgrade) runs in its own allocation, freed
    // once the socket is open: its future is several times the size of the
    // session's, and a task is as large as its largest stage, so a fleet of
    // live connections would otherwise each keep ~10 KB it never uses again.
    let Some(ws) = Box::pin(handshake(&setup, &spec, &mut control, &signals)).await else { return };
    let session = setup.protocol.open(&spec.instance, spec.resume.as_ref());
    let connect_timeout = spec.connect_timeout;
    let mut s =
        Session { protocol: setup.protocol, session, ws, control, outbound, signals, opened: false, connect_timeout };
    let mut greeting = Vec::new();
    s.session.greet(tokio::time::Instant::now(), &mut greeting);
    if let Flow::Continue = s.write_all(greeting, "greeting").await {
        s.serve().await;
    }
}

/// Waits for a permit of bucket `key` of `pacer`, telling the engine at
/// least twice per connect time-out that the handshake is queued behind the
/// fleet, not stalled (R15: each report restarts the connect deadline). A
/// transport that dies while queued stops reporting, and the deadline
/// catches it as before.
async fn acquire_reporting(pacer: &Pacer, key: u64, signals: &Signals, connect_timeout: Duration) {
    let every = (connect_timeout / 2).max(Duration::from_millis(1));
    let acquire = pacer.acquire(key);
    tokio::pin!(acquire);
    let mut reports = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    loop {
        tokio::select! {
            () = &mut acquire => return,
            _ = reports.tick() => {
                signals.handshake_step().await;
            }
        }
    }
}

/// A bucket of the connect pacer for an instance: its name, hashed (FNV-1a).
fn bucket_of(instance: &InstanceName) -> u64 {
    instance.as_str().bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3))
}

/// Connects; `None` after reporting why it could not.
async fn handshake(
    setup: &Setup,
    spec: &ConnectSpec,
    control: &mut mpsc::Receiver<Control>,
    signals: &Signals,
) -> Option<Ws> {
    let lost = CloseInitiator::Transport;
    let Endpoint::Ws(configured) = &spec.endpoint else {
        signals.closed(lost, None, "a host-driven (external:) session needs a host to hold its connection").await;
        return None;
    };
    if let Some(pacer) = &setup.connects {
        tokio::select! {
            // The wait was the fleet's: the connect deadline counts from now (R15).
            () = acquire_reporting(pacer, bucket_of(&spec.instance), signals, spec.connect_timeout) => {
                signals.handshake_step().await;
            }
            // The engine gave up on this attempt while it waited for its turn:
            // no socket is opened, and no permit spent.
            ctl = control.recv() => {
                if let Some(Control::Close { .. }) = ctl {
                    signals.send(Input::CloseFinished { generation: signals.generation() }).await;
                }
                return None;
            }
        }
    }
    let url = setup.protocol.url(configured, spec.resume.as_ref());
    let connector = setup.tls.clone().map(tokio_tungstenite::Connector::Rustls);
    let connect =
        tokio_tungstenite::connect_async_tls_with_config(url.as_str(), Some(setup.limits.config()), true, connector);
    let ws = match timeout(spec.connect_timeout, connect).await {
        Ok(Ok((ws, _))) => ws,
        Ok(Err(e)) => {
            signals.closed(lost, None, format!("connect failed: {e}")).await;
            return None;
        }
        Err(_) => {
            signals.closed(lost, None, format!("connect timed out after {:?}", spec.connect_timeout)).await;
            return None;
        }
    };
    Some(ws)
}

struct Session {
    protocol: Arc<dyn Protocol>,
    session: Box<dyn ProtocolSession>,
    ws: Ws,
    control: mpsc::Receiver<Control>,
    outbound: Outbound,
    signals: Signals,
    /// A `ready` was already reported: later ones are ignored (a peer flooding
    /// "ready" costs one signal).
    opened: bool,
    /// The policy's connect time-out: a wait for a fleet-wide permit reports
    /// itself more often than this (R15).
    connect_timeout: Duration,
}

/// What reading a frame left to do.
enum Read {
    /// What the protocol read, and the frames it answered with.
    Reading(Reading, Vec<Write>),
    /// A frame that breaks the protocol.
    Invalid(super::protocol::ProtocolError),
    /// Not a data frame: a control frame, an error, the end.
    Other(Option<Result<Message, WsError>>),
}

/// Whether the session goes on after handling an event.
enum Flow {
    Continue,
    End,
}

impl Session {
    /// Pumps frames and control messages until the connection ends. Pings
    /// go out when the core asks (`Control::Ping`); pongs are reported.
    async fn serve(mut self) {
        loop {
            // Handlers are boxed: the idle connection's future stays small in a large fleet.
            let flow = tokio::select! {
                frame = self.ws.next() => match self.read(frame) {
                    None => Flow::Continue,
                    Some(read) => Box::pin(self.on_read(read)).await,
                },
                ctl = self.control.recv() => match ctl {
                    Some(ctl) => Box::pin(self.on_control(ctl)).await,
                    // The engine dropped us (abort): drop the socket without a handshake.
                    None => Flow::End,
                },
                frame = self.outbound.recv() => Box::pin(self.write(frame)).await,
            };
            if let Flow::End = flow {
                return;
            }
        }
    }

    /// Reads what the socket gave, without awaiting: a text or binary frame
    /// goes through the protocol, and a frame for the host is published.
    /// Most frames end here (traffic, nothing to write back); whatever
    /// needs more (a lifecycle message, frames to write, anything that is
    /// not a data frame) is returned for [`Session::on_read`], whose future
    /// is boxed: the hot path allocates no future per frame.
    fn read(&mut self, frame: Option<Result<Message, WsError>>) -> Option<Read> {
        let mut out = Vec::new();
        let now = tokio::time::Instant::now();
        let reading = match frame {
            Some(Ok(Message::Text(text))) => self.session.read_text(text.as_str(), now, &mut out).inspect(|r| {
                if r.to_host {
                    self.signals.frame(Frame::Text(text.as_str().to_owned()));
                }
            }),
            Some(Ok(Message::Binary(bytes))) => self.session.read_binary(&bytes, now, &mut out).inspect(|r| {
                if r.to_host {
                    self.signals.frame(Frame::Binary(bytes.to_vec()));
                }
            }),
            other => return Some(Read::Other(other)),
        };
        match reading {
            Ok(Reading { message: PeerMessage::Application | PeerMessage::Handled, .. }) if out.is_empty() => None,
            Ok(reading) => Some(Read::Reading(reading, out)),
            Err(e) => Some(Read::Invalid(e)),
        }
    }

    /// What [`Session::read`] left.
    async fn on_read(&mut self, read: Read) -> Flow {
        match read {
            Read::Reading(reading, out) => self.on_reading(reading, out).await,
            Read::Invalid(e) => self.protocol_error(1002, e.to_string()).await,
            Read::Other(frame) => self.on_frame(frame).await,
        }
    }

    /// Everything but a data frame: control frames, errors, the end.
    async fn on_frame(&mut self, frame: Option<Result<Message, WsError>>) -> Flow {
        match frame {
            // `read` takes every data frame; none comes here.
            Some(Ok(Message::Text(_) | Message::Binary(_))) => Flow::Continue,
            Some(Ok(Message::Pong(_))) => {
                self.signals.pong().await;
                Flow::Continue
            }
            // tungstenite queues the pong; flushing sends it now.
            Some(Ok(Message::Ping(_))) => match self.ws.flush().await {
                Ok(()) => Flow::Continue,
                Err(e) => {
                    self.signals.write_failed(format!("pong: {e}")).await;
                    Flow::End
                }
            },
            Some(Ok(Message::Close(frame))) => {
                let (status, reason) = match frame {
                    Some(f) => (Some(self.protocol.status_of(u16::from(f.code))), f.reason.as_str().to_owned()),
                    None => (None, "close frame without a code".to_owned()),
                };
                // tungstenite answers the close; drain until the socket ends, bounded.
                let _ = timeout(Duration::from_secs(1), async { while self.ws.next().await.is_some() {} }).await;
                self.signals.closed(CloseInitiator::Peer, status, reason).await;
                Flow::End
            }
            Some(Ok(Message::Frame(_))) => Flow::Continue,
            Some(Err(WsError::Capacity(e))) => self.protocol_error(1009, format!("message too big: {e}")).await,
            Some(Err(WsError::Utf8(e))) => {
                self.protocol_error(1007, format!("invalid UTF-8 in a text frame: {e}")).await
            }
            Some(Err(WsError::Protocol(e))) => {
                // tungstenite closes with 1002 on a protocol violation itself.
                let status = Some(self.protocol.status_of(1002));
                self.signals.closed(CloseInitiator::Local, status, format!("protocol error: {e}")).await;
                Flow::End
            }
            Some(Err(e)) => {
                self.signals.closed(CloseInitiator::Transport, None, format!("connection lost: {e}")).await;
                Flow::End
            }
            None => {
                self.signals.closed(CloseInitiator::Transport, None, "connection ended without a close frame").await;
                Flow::End
            }
        }
    }

    /// Writes what the protocol answered, then acts on what the frame meant.
    async fn on_reading(&mut self, reading: Reading, out: Vec<Write>) -> Flow {
        if out.is_empty() {
            return self.on_message(reading.message).await;
        }
        match self.write_all(out, "protocol frame").await {
            Flow::Continue => self.on_message(reading.message).await,
            Flow::End => Flow::End,
        }
    }

    /// Writes the protocol's frames in order; a paced one waits for its
    /// permit first. A control message that arrives during the wait is
    /// obeyed and the paced frame given up (the connection is being closed
    /// or dropped: nothing is worth a permit now).
    async fn write_all(&mut self, writes: Vec<Write>, what: &str) -> Flow {
        for write in writes {
            let (frame, paced) = match write {
                Write::Now(frame) => (frame, false),
                Write::Paced { pacer, key, frame } => {
                    tokio::select! {
                        () = acquire_reporting(&pacer, key, &self.signals, self.connect_timeout) => (frame, true),
                        ctl = self.control.recv() => {
                            debug!("a paced frame given up: the engine asked for something else first");
                            return match ctl {
                                Some(ctl) => Box::pin(self.on_control(ctl)).await,
                                None => Flow::End,
                            };
                        }
                    }
                }
            };
            if let Err(e) = self.ws.send(message(frame)).await {
                self.signals.write_failed(format!("{what}: {e}")).await;
                return Flow::End;
            }
            if paced {
                // Sent after the fleet's wait: the peer must answer from now (R15).
                self.signals.handshake_step().await;
            }
        }
        Flow::Continue
    }

    /// Writes the host's frames: this one and whatever else is queued now
    /// (up to a bound), in one flush.
    async fn write(&mut self, first: Frame) -> Flow {
        const BATCH: usize = 64;
        let mut result = self.ws.feed(message(first)).await;
        for _ in 1..BATCH {
            if result.is_err() {
                break;
            }
            let Some(next) = self.outbound.try_recv() else { break };
            result = self.ws.feed(message(next)).await;
        }
        match result.and(self.ws.flush().await) {
            Ok(()) => Flow::Continue,
            Err(e) => {
                self.signals.write_failed(format!("application frame: {e}")).await;
                Flow::End
            }
        }
    }

    async fn on_message(&mut self, message: PeerMessage) -> Flow {
        let generation = self.signals.generation();
        match message {
            PeerMessage::Application | PeerMessage::Handled => Flow::Continue,
            PeerMessage::Ready { identity } => {
                if self.opened {
                    trace!("duplicate ready ignored");
                } else {
                    // R6: the core decides; without an identity this does not open.
                    self.opened = identity.is_some();
                    self.signals.opened(identity).await;
                    // A protocol that sets its own heartbeat schedule says when the first beat is due.
                    if self.opened
                        && let Some(after) = self.session.next_beat(tokio::time::Instant::now())
                    {
                        self.signals.send(Input::HeartbeatDue { generation, after }).await;
                    }
                }
                Flow::Continue
            }
            PeerMessage::HeartbeatAck => {
                match self.session.next_beat(tokio::time::Instant::now()) {
                    Some(after) => self.signals.send(Input::HeartbeatDue { generation, after }).await,
                    None => self.signals.pong().await,
                };
                Flow::Continue
            }
            PeerMessage::ReconnectRequested => {
                self.signals.send(Input::ReconnectRequested { generation }).await;
                Flow::Continue
            }
            PeerMessage::SessionInvalid { retry_after } => {
                self.signals.send(Input::SessionInvalid { generation, retry_after }).await;
                Flow::Continue
            }
            PeerMessage::Pairing => {
                self.signals.send(Input::PairingCode { generation: self.signals.generation() }).await;
                Flow::Continue
            }
            PeerMessage::LoggedOut => {
                self.signals.send(Input::LogoutConfirmed { generation: self.signals.generation() }).await;
                Flow::Continue
            }
            PeerMessage::Unknown { kind } => {
                debug!(kind, "unknown message type ignored");
                Flow::Continue
            }
        }
    }

    /// Closes with `code` (best effort, bounded) and reports it as our close,
    /// its status mapped as a peer's would be: the policy decides on it.
    async fn protocol_error(&mut self, code: u16, reason: String) -> Flow {
        let frame = CloseFrame { code: CloseCode::from(code), reason: "protocol error".into() };
        let _ = timeout(Duration::from_secs(1), self.ws.close(Some(frame))).await;
        let status = Some(self.protocol.status_of(code));
        self.signals.closed(CloseInitiator::Local, status, reason).await;
        Flow::End
    }

    async fn on_control(&mut self, ctl: Control) -> Flow {
        match ctl {
            Control::SendLogout => {
                let generation = self.signals.generation();
                let (sent, by_close) = match self.session.logout() {
                    Logout::Frame(frame) => (self.ws.send(message(frame)).await, false),
                    Logout::Close(status) => {
                        let code = CloseCode::from(self.protocol.close_code_of(status));
                        (self.ws.close(Some(CloseFrame { code, reason: "logout".into() })).await, true)
                    }
                };
                match sent {
                    Ok(()) => {
                        // A logout by close is confirmed once the close is written: the close ends the session.
                        if by_close {
                            self.signals.send(Input::LogoutConfirmed { generation }).await;
                        }
                        Flow::Continue
                    }
                    Err(e) => {
                        let error = Reason::new(e.to_string());
                        self.signals.send(Input::LogoutFailed { generation, error }).await;
                        Flow::End
                    }
                }
            }
            Control::Ping => match self.session.heartbeat(tokio::time::Instant::now()) {
                Beat::Ping => self.ping().await,
                Beat::Frame(frame) => match self.ws.send(message(frame)).await {
                    Ok(()) => Flow::Continue,
                    Err(e) => {
                        self.signals.write_failed(format!("heartbeat: {e}")).await;
                        Flow::End
                    }
                },
            },
            Control::Close { status } => {
                let frame =
                    CloseFrame { code: CloseCode::from(self.protocol.close_code_of(status)), reason: "".into() };
                if let Err(e) = self.ws.close(Some(frame)).await {
                    // Already closed or broken: the close is as finished as it will get.
                    debug!(error = %e, "close failed");
                    self.signals.send(Input::CloseFinished { generation: self.signals.generation() }).await;
                    return Flow::End;
                }
                // Go on reading: the peer's close frame (or the socket's end) reports the real status.
                Flow::Continue
            }
        }
    }

    async fn ping(&mut self) -> Flow {
        match self.ws.send(Message::Ping(Vec::new().into())).await {
            Ok(()) => Flow::Continue,
            Err(e) => {
                self.signals.write_failed(format!("ping: {e}")).await;
                Flow::End
            }
        }
    }
}

/// A frame as a WebSocket message.
fn message(frame: Frame) -> Message {
    match frame {
        Frame::Text(t) => Message::text(t),
        Frame::Binary(b) => Message::binary(b),
    }
}
