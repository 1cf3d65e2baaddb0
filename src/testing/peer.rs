//! A fault-injecting peer: a real tokio-tungstenite server on 127.0.0.1 that
//! speaks the reference protocol, with a switchable fault per instance for
//! new connections, and actions on live ones. The integration tests and
//! `lifecycle simulate` play the other side of the engine with it.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde::Deserialize;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{CloseCode, Control, Data, OpCode};
use tokio_tungstenite::tungstenite::protocol::frame::{Frame, FrameHeader};

/// How the peer treats a new connection of an instance.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Accept, say `ready` with an identity, answer pings and logouts.
    Ready,
    /// Say `ready` without an identity (R6).
    NoIdentity,
    /// Issue `codes` pairing codes, 10 ms apart, and never say `ready`.
    Pairing {
        /// How many.
        codes: u32,
    },
    /// Say `ready`, then close at once with `code` (a wire close code, e.g. 4408).
    CloseAfterReady {
        /// The close code.
        code: u16,
    },
    /// Close with `code` before saying anything.
    CloseBeforeReady {
        /// The close code.
        code: u16,
    },
    /// Say `ready`, then drop TCP without a close frame.
    DropAfterReady,
    /// Say `ready`, then never answer a logout.
    HangOnLogout,
    /// Close TCP as soon as it is accepted.
    Refuse,
    /// Wait before the WebSocket handshake, then behave as `Ready`.
    SlowAccept {
        /// The wait.
        delay: Duration,
    },
    /// Accept TCP and never complete the WebSocket handshake.
    NeverHandshake,
    /// Say `ready`, then send a binary frame of garbage.
    BinaryGarbage,
    /// Say `ready`, then send a text message of `bytes` bytes.
    Oversized {
        /// Its size.
        bytes: usize,
    },
    /// Say `ready` `count` times.
    ReadyFlood {
        /// How many.
        count: u32,
    },
    /// Say `ready`, then send `count` pings.
    PingFlood {
        /// How many.
        count: u32,
    },
    /// Say `ready`, then send text that is not JSON.
    NotJson,
    /// Say `ready`, then send a text frame whose bytes are not UTF-8.
    InvalidUtf8,
    /// Say `ready`, then send a close frame with the invalid code 999.
    BadCloseCode,
}

/// What to do to a live connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Stop reading and answering pings, keep TCP open: a half-open zombie.
    Zombify,
    /// Drop TCP without a close frame.
    Drop,
    /// Close with this wire code.
    Close(u16),
    /// From now on, ignore logout requests (the socket stays up).
    IgnoreLogouts,
    /// Send `count` application frames at once:
    /// `{"type":"app","n":<0..count>,"pad":"<pad bytes>"}`, in order.
    Send {
        /// How many.
        count: u32,
        /// Filler bytes per frame.
        pad: usize,
    },
}

#[derive(Default)]
struct State {
    faults: HashMap<String, Fault>,
    default: Option<Fault>,
    live: HashMap<String, Vec<(u64, mpsc::UnboundedSender<Action>)>>,
    handshakes: HashMap<String, u32>,
    /// Connections silent (no frame, not even a ping) for this long are dropped,
    /// as a server with its own keep-alive does.
    idle_timeout: Option<Duration>,
    /// Handshakes that came while another connection of the same instance was live.
    overlaps: HashMap<String, u32>,
    hellos: HashMap<String, Vec<Option<String>>>,
    logouts: HashMap<String, u32>,
    next_id: u64,
    /// TCP connections accepted, by second since the peer started (the last [`ACCEPT_SECONDS_KEPT`]).
    accepts: std::collections::BTreeMap<u64, u32>,
}

/// Seconds of accept counts kept for `stats`: an hour of a herd's history.
const ACCEPT_SECONDS_KEPT: usize = 3_600;

/// Why a `wss://` peer could not start.
#[derive(Debug, thiserror::Error)]
pub enum PeerTlsError {
    /// The certificate or key is not valid PEM.
    #[error("peer certificate or key: {0}")]
    Pem(String),
    /// rustls refused the certificate and key.
    #[error("peer TLS configuration: {0}")]
    Config(String),
    /// The listening socket.
    #[error("peer socket: {0}")]
    Io(#[from] std::io::Error),
}

/// The running peer. Dropping it stops the server and every connection.
pub struct TestPeer {
    addr: SocketAddr,
    tls: bool,
    state: Arc<Mutex<State>>,
    server: JoinHandle<()>,
}

#[derive(Deserialize)]
struct Hello {
    #[serde(rename = "type")]
    kind: String,
    instance: String,
    resume: Option<String>,
}

impl TestPeer {
    /// Starts a peer on an ephemeral port of 127.0.0.1.
    pub async fn start() -> std::io::Result<Self> {
        Self::start_on("127.0.0.1:0".parse().unwrap_or_else(|_| unreachable!("a literal address"))).await
    }

    /// Starts a peer listening on `addr`.
    pub async fn start_on(addr: SocketAddr) -> std::io::Result<Self> {
        Self::listen(addr, None).await
    }

    /// Starts a `wss://` peer on an ephemeral port of 127.0.0.1 with this
    /// certificate chain and private key (PEM). A TLS handshake that fails
    /// ends that connection only.
    pub async fn start_tls(cert_chain_pem: &[u8], key_pem: &[u8]) -> Result<Self, PeerTlsError> {
        let addr = "127.0.0.1:0".parse().unwrap_or_else(|_| unreachable!("a literal address"));
        Self::start_tls_on(addr, cert_chain_pem, key_pem).await
    }

    /// [`TestPeer::start_tls`] listening on `addr`.
    pub async fn start_tls_on(addr: SocketAddr, cert_chain_pem: &[u8], key_pem: &[u8]) -> Result<Self, PeerTlsError> {
        use tokio_rustls::rustls::pki_types::pem::PemObject;
        use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let chain = CertificateDer::pem_slice_iter(cert_chain_pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| PeerTlsError::Pem(e.to_string()))?;
        let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| PeerTlsError::Pem(e.to_string()))?;
        let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
        let config = tokio_rustls::rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .and_then(|b| b.with_no_client_auth().with_single_cert(chain, key))
            .map_err(|e| PeerTlsError::Config(e.to_string()))?;
        Ok(Self::listen(addr, Some(tokio_rustls::TlsAcceptor::from(Arc::new(config)))).await?)
    }

    async fn listen(addr: SocketAddr, tls: Option<tokio_rustls::TlsAcceptor>) -> std::io::Result<Self> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let state = Arc::new(Mutex::new(State::default()));
        let shared = state.clone();
        let is_tls = tls.is_some();
        let started = tokio::time::Instant::now();
        let server = tokio::spawn(async move {
            let mut connections = tokio::task::JoinSet::new();
            while let Ok((stream, _)) = listener.accept().await {
                // As a gateway would: a batch of frames goes out when flushed, its
                // tail not held back by Nagle for the peer's delayed ACK (40 ms).
                let _ = stream.set_nodelay(true);
                {
                    let mut s = shared.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                    *s.accepts.entry(started.elapsed().as_secs()).or_default() += 1;
                    while s.accepts.len() > ACCEPT_SECONDS_KEPT {
                        s.accepts.pop_first();
                    }
                }
                let state = shared.clone();
                match tls.clone() {
                    None => connections.spawn(serve(stream, state)),
                    Some(acceptor) => connections.spawn(async move {
                        if let Ok(Ok(stream)) =
                            tokio::time::timeout(Duration::from_secs(5), acceptor.accept(stream)).await
                        {
                            serve(stream, state).await;
                        }
                    }),
                };
                while connections.try_join_next().is_some() {}
            }
        });
        Ok(Self { addr, tls: is_tls, state, server })
    }

    /// `ws://127.0.0.1:<port>/`, or `wss://` for a peer started with TLS.
    pub fn url(&self) -> String {
        format!("{}://{}/", if self.tls { "wss" } else { "ws" }, self.addr)
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The fault for new connections of `instance`.
    pub fn set_fault(&self, instance: &str, fault: Fault) {
        self.lock().faults.insert(instance.to_owned(), fault);
    }

    /// The fault for new connections of instances without their own.
    pub fn set_default_fault(&self, fault: Fault) {
        self.lock().default = Some(fault);
    }

    /// Acts on every live connection of `instance`; returns how many.
    pub fn act(&self, instance: &str, action: Action) -> usize {
        let s = self.lock();
        let conns = s.live.get(instance).map(Vec::as_slice).unwrap_or_default();
        conns.iter().filter(|(_, tx)| tx.send(action.clone()).is_ok()).count()
    }

    /// Acts on every live connection of every instance; returns how many.
    pub fn act_all(&self, action: Action) -> usize {
        let s = self.lock();
        s.live.values().flatten().filter(|(_, tx)| tx.send(action.clone()).is_ok()).count()
    }

    /// TCP connections accepted per second since the peer started, `(second, count)`,
    /// for the last hour: how hard a herd hit it.
    pub fn accepts_per_second(&self) -> Vec<(u64, u32)> {
        self.lock().accepts.iter().map(|(&s, &n)| (s, n)).collect()
    }

    /// Live connections of every instance now.
    pub fn live_total(&self) -> usize {
        self.lock().live.values().map(Vec::len).sum()
    }

    /// Drops connections that send nothing (not even a ping) for `timeout`,
    /// as a server with its own keep-alive does; `None` keeps them.
    pub fn set_idle_timeout(&self, timeout: Option<Duration>) {
        self.lock().idle_timeout = timeout;
    }

    /// Handshakes of any instance that came while another connection of the
    /// same instance was live: two owners at once. Every instance's, summed.
    pub fn overlaps(&self) -> u32 {
        self.lock().overlaps.values().sum()
    }

    /// Completed handshakes (hello received) of `instance` so far.
    pub fn handshakes(&self, instance: &str) -> u32 {
        self.lock().handshakes.get(instance).copied().unwrap_or(0)
    }

    /// Live connections of `instance` now.
    pub fn live(&self, instance: &str) -> usize {
        self.lock().live.get(instance).map_or(0, Vec::len)
    }

    /// The `resume` of every hello of `instance`, in order.
    pub fn hellos(&self, instance: &str) -> Vec<Option<String>> {
        self.lock().hellos.get(instance).cloned().unwrap_or_default()
    }

    /// Applies one control line: `zombify NAME`, `drop NAME`, `close NAME CODE`,
    /// `send NAME COUNT` (that many application frames, at once),
    /// `fault NAME ready|no-identity|hang-on-logout|refuse`, `drop-all` (every
    /// connection dropped at once, as when the server restarts) or `stats`
    /// (live connections and accepts per second, as JSON). Returns what it did.
    pub fn command(&self, line: &str) -> Result<String, String> {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["drop-all"] => Ok(format!("dropped {} connection(s)", self.act_all(Action::Drop))),
            ["stats"] => {
                let stats =
                    serde_json::json!({ "live": self.live_total(), "accepts_per_second": self.accepts_per_second() });
                Ok(stats.to_string())
            }
            ["zombify", name] => Ok(format!("zombified {} connection(s)", self.act(name, Action::Zombify))),
            ["drop", name] => Ok(format!("dropped {} connection(s)", self.act(name, Action::Drop))),
            ["send", name, count] => {
                let count: u32 = count.parse().map_err(|_| format!("not a count: {count}"))?;
                Ok(format!("sent on {} connection(s)", self.act(name, Action::Send { count, pad: 0 })))
            }
            ["close", name, code] => {
                let code: u16 = code.parse().map_err(|_| format!("not a close code: {code}"))?;
                Ok(format!("closed {} connection(s)", self.act(name, Action::Close(code))))
            }
            ["fault", name, fault] => {
                let fault = match *fault {
                    "ready" => Fault::Ready,
                    "no-identity" => Fault::NoIdentity,
                    "hang-on-logout" => Fault::HangOnLogout,
                    "refuse" => Fault::Refuse,
                    other => return Err(format!("unknown fault {other:?}")),
                };
                self.set_fault(name, fault);
                Ok("fault set".to_owned())
            }
            _ => Err(format!(
                "unknown command {line:?}; try: zombify NAME | drop NAME | close NAME CODE | fault NAME FAULT | drop-all | stats"
            )),
        }
    }

    /// Logout frames received from `instance`.
    pub fn logouts(&self, instance: &str) -> u32 {
        self.lock().logouts.get(instance).copied().unwrap_or(0)
    }
}

impl Drop for TestPeer {
    fn drop(&mut self) {
        self.server.abort();
    }
}

/// What a connection runs on: TCP, or TLS over TCP.
trait Stream: AsyncRead + AsyncWrite + Unpin + Send + 'static {}
impl<S: AsyncRead + AsyncWrite + Unpin + Send + 'static> Stream for S {}

type Ws<S> = WebSocketStream<S>;

async fn close<S: Stream>(ws: &mut Ws<S>, code: u16) {
    let frame = CloseFrame { code: CloseCode::from(code), reason: "peer".into() };
    let _ = tokio::time::timeout(Duration::from_secs(1), ws.close(Some(frame))).await;
    let _ = tokio::time::timeout(Duration::from_secs(1), async { while ws.next().await.is_some() {} }).await;
}

async fn serve<S: Stream>(stream: S, state: Arc<Mutex<State>>) {
    let lock = || state.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let default = lock().default.clone().unwrap_or(Fault::Ready);
    match default {
        Fault::Refuse => return,
        Fault::NeverHandshake => {
            // Hold the TCP connection open until the peer is dropped.
            let _held = stream;
            return std::future::pending::<()>().await;
        }
        Fault::SlowAccept { delay } => tokio::time::sleep(delay).await,
        _ => {}
    }
    let config = crate::transport::WsLimits { max_message: 1 << 20, max_frame: 1 << 20, ..Default::default() }.config();
    let Ok(mut ws) = tokio_tungstenite::accept_async_with_config(stream, Some(config)).await else { return };
    let hello = match ws.next().await {
        Some(Ok(Message::Text(t))) => serde_json::from_str::<Hello>(t.as_str()).ok().filter(|h| h.kind == "hello"),
        _ => None,
    };
    let Some(hello) = hello else {
        close(&mut ws, 1002).await;
        return;
    };
    let name = hello.instance;
    let (tx, mut actions) = mpsc::unbounded_channel();
    let (id, fault) = {
        let mut s = lock();
        *s.handshakes.entry(name.clone()).or_default() += 1;
        s.hellos.entry(name.clone()).or_default().push(hello.resume.clone());
        s.next_id += 1;
        let id = s.next_id;
        let live = s.live.entry(name.clone()).or_default();
        let overlapping = !live.is_empty();
        live.push((id, tx));
        if overlapping {
            *s.overlaps.entry(name.clone()).or_default() += 1;
        }
        (id, s.faults.get(&name).cloned().or_else(|| s.default.clone()).unwrap_or(Fault::Ready))
    };
    let identity = hello.resume.unwrap_or_else(|| format!("peer-{name}"));
    run_fault(&mut ws, &fault, &identity, &mut actions, &state, &name).await;
    if let Some(conns) = lock().live.get_mut(&name) {
        conns.retain(|(i, _)| *i != id);
    }
}

fn ready(identity: &str) -> Message {
    Message::text(serde_json::json!({ "type": "ready", "id": identity }).to_string())
}

async fn run_fault<S: Stream>(
    ws: &mut Ws<S>,
    fault: &Fault,
    identity: &str,
    actions: &mut mpsc::UnboundedReceiver<Action>,
    state: &Arc<Mutex<State>>,
    name: &str,
) {
    let sent = match fault {
        Fault::NoIdentity => ws.send(Message::text(r#"{"type":"ready"}"#)).await,
        Fault::Pairing { codes } => {
            for i in 0..*codes {
                let _ = ws.send(Message::text(format!(r#"{{"type":"pairing","code":"code-{i}"}}"#))).await;
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            Ok(())
        }
        Fault::CloseBeforeReady { code } => {
            close(ws, *code).await;
            return;
        }
        Fault::ReadyFlood { count } => {
            for _ in 0..*count {
                if ws.feed(ready(identity)).await.is_err() {
                    break;
                }
            }
            ws.flush().await
        }
        _ => ws.send(ready(identity)).await,
    };
    if sent.is_err() {
        return;
    }
    match fault {
        Fault::CloseAfterReady { code } => return close(ws, *code).await,
        Fault::DropAfterReady => return,
        Fault::BinaryGarbage => drop(ws.send(Message::binary(vec![0xde, 0xad, 0xbe, 0xef, 0, 0xff])).await),
        Fault::Oversized { bytes } => drop(ws.send(Message::text("x".repeat(*bytes))).await),
        Fault::NotJson => drop(ws.send(Message::text("this is not json {")).await),
        Fault::InvalidUtf8 => {
            let frame = Frame::message(vec![b'{', 0xff, 0xfe, b'}'], OpCode::Data(Data::Text), true);
            drop(ws.send(Message::Frame(frame)).await);
        }
        Fault::BadCloseCode => {
            let header = FrameHeader { opcode: OpCode::Control(Control::Close), ..FrameHeader::default() };
            let frame = Frame::from_payload(header, vec![0x03, 0xe7, b'x'].into());
            drop(ws.send(Message::Frame(frame)).await);
            return;
        }
        Fault::PingFlood { count } => {
            for _ in 0..*count {
                if ws.feed(Message::Ping(Vec::new().into())).await.is_err() {
                    break;
                }
            }
            let _ = ws.flush().await;
        }
        _ => {}
    }
    let mut ignore_logouts = *fault == Fault::HangOnLogout;
    let idle_timeout = state.lock().unwrap_or_else(std::sync::PoisonError::into_inner).idle_timeout;
    let idle = tokio::time::sleep(idle_timeout.unwrap_or(Duration::MAX / 4));
    tokio::pin!(idle);
    loop {
        if let Some(timeout) = idle_timeout {
            idle.as_mut().reset(tokio::time::Instant::now() + timeout);
        }
        tokio::select! {
            () = &mut idle => return,
            msg = ws.next() => match msg {
                Some(Ok(Message::Text(t))) if !t.as_str().contains(r#""logout""#) => {
                    // An application frame: the reference peer echoes it.
                    if ws.send(Message::Text(t)).await.is_err() {
                        return;
                    }
                }
                Some(Ok(Message::Text(t))) if t.as_str().contains(r#""logout""#) => {
                    *state.lock().unwrap_or_else(std::sync::PoisonError::into_inner).logouts.entry(name.to_owned()).or_default() += 1;
                    if !ignore_logouts {
                        let _ = ws.send(Message::text(r#"{"type":"logged_out"}"#)).await;
                        return close(ws, 1000).await;
                    }
                }
                Some(Ok(_)) => {}
                Some(Err(_)) | None => return,
            },
            action = actions.recv() => match action {
                Some(Action::Zombify) => {
                    // Hold the socket without reading: no pongs, TCP stays open.
                    while let Some(a) = actions.recv().await {
                        if a == Action::Drop {
                            return;
                        }
                    }
                    return;
                }
                Some(Action::Drop) | None => return,
                Some(Action::Close(code)) => return close(ws, code).await,
                Some(Action::IgnoreLogouts) => ignore_logouts = true,
                Some(Action::Send { count, pad }) => {
                    let pad = "x".repeat(pad);
                    for n in 0..count {
                        // `pad` is all `x`: nothing to escape.
                        let frame = format!(r#"{{"type":"app","n":{n},"pad":"{pad}"}}"#);
                        if ws.feed(Message::text(frame)).await.is_err() {
                            return;
                        }
                    }
                    if ws.flush().await.is_err() {
                        return;
                    }
                }
            },
        }
    }
}
