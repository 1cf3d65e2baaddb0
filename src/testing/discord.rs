//! A fake Discord gateway, written here from Discord's public gateway
//! documentation: a real tokio-tungstenite server on 127.0.0.1 that plays
//! Discord's side of the handshake, heartbeats, resumes and limits, so the
//! engine's Discord protocol is tested against something that says no.
//!
//! Per connection it sends HELLO with its interval; checks IDENTIFY (token,
//! `shard: [id, count]`, intents) and RESUME (token, a known session, a
//! sequence number it has reached); answers READY with a `session_id` and a
//! `resume_gateway_url`, dispatches with sequence numbers, replays what a
//! resume missed, then RESUMED; acknowledges heartbeats. On command it
//! sends events, op 7, op 9 either way, a heartbeat request, or closes with
//! a code. And it *enforces* the limits, counting every breach:
//!
//! - more than `frame_limit` frames from a connection within `frame_window`
//!   (Discord: 120 per 60 s) closes it with 4008;
//! - an IDENTIFY within `identify_window` of the last one of its bucket
//!   (`shard % max_concurrency`; Discord: 5 s) is refused with op 9
//!   `d: false`;
//! - a heartbeat sooner than the interval after the one before (less a
//!   tolerance), unless the gateway asked for it, is counted as out of schedule.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

use crate::transport::discord::op;

/// How the fake gateway behaves.
#[derive(Clone, Debug)]
pub struct GatewayConfig {
    /// The token IDENTIFY and RESUME must carry (else 4004).
    pub token: String,
    /// The shard count IDENTIFY must name (else 4010).
    pub shards: u32,
    /// HELLO's `heartbeat_interval`.
    pub heartbeat_interval: Duration,
    /// How much sooner than the interval a beat may come and still be on schedule.
    pub beat_tolerance: Duration,
    /// IDENTIFYs allowed per window, one per bucket.
    pub max_concurrency: u32,
    /// The identify window (Discord: 5 s).
    pub identify_window: Duration,
    /// Frames a connection may send per `frame_window` (Discord: 120).
    pub frame_limit: usize,
    /// The frame window (Discord: 60 s).
    pub frame_window: Duration,
}

impl GatewayConfig {
    /// Discord's limits, with `shards` shards and a short heartbeat for tests.
    pub fn new(token: impl Into<String>, shards: u32) -> Self {
        Self {
            token: token.into(),
            shards,
            heartbeat_interval: Duration::from_millis(41_250),
            beat_tolerance: Duration::from_millis(250),
            max_concurrency: 1,
            identify_window: Duration::from_secs(5),
            frame_limit: 120,
            frame_window: Duration::from_secs(60),
        }
    }
}

/// What the gateway saw, in total.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GatewayStats {
    /// WebSocket connections accepted.
    pub connections: u64,
    /// IDENTIFYs accepted (a READY followed).
    pub identifies: u64,
    /// IDENTIFYs refused for the concurrency limit (op 9 `d: false`).
    pub identify_refused: u64,
    /// RESUMEs accepted (RESUMED followed).
    pub resumes: u64,
    /// RESUMEs refused (unknown session or sequence: op 9 `d: false`).
    pub resume_refused: u64,
    /// Heartbeats received.
    pub heartbeats: u64,
    /// Heartbeats out of schedule (too soon, not asked for).
    pub early_beats: u64,
    /// Connections closed with 4008 for sending too fast.
    pub rate_limited: u64,
    /// Connections closed with 4004 (wrong token).
    pub bad_token: u64,
    /// Frames from shards that were neither a handshake nor a heartbeat.
    pub app_frames: u64,
    /// The close codes shards closed with, in order (none for a close frame without a code).
    pub shard_closes: Vec<Option<u16>>,
}

/// A handshake a shard made, in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Handshake {
    /// IDENTIFY (accepted or refused), of this shard.
    Identify {
        /// `shard[0]`.
        shard: u32,
    },
    /// RESUME of a session from a sequence number.
    Resume {
        /// The session id.
        session_id: String,
        /// The `seq` it sent.
        seq: u64,
    },
}

/// A command for a shard's live connection.
#[derive(Clone, Debug)]
enum Command {
    Dispatch {
        kind: String,
        data: Value,
    },
    Reconnect,
    Invalidate {
        resumable: bool,
    },
    RequestBeat,
    Close {
        code: u16,
    },
    /// Drop TCP without a close frame.
    Drop,
    /// Stop (or go on) acknowledging this connection's heartbeats.
    Silent(bool),
}

#[derive(Default)]
struct Session {
    shard: u32,
    seq: u64,
    /// The events sent, for a resume to replay (the newest 1,000).
    events: Vec<(u64, String, Value)>,
}

#[derive(Default)]
struct State {
    stats: GatewayStats,
    handshakes: Vec<Handshake>,
    sessions: HashMap<String, Session>,
    /// The newest connection of each shard.
    live: HashMap<u32, mpsc::UnboundedSender<Command>>,
    /// The last IDENTIFY of each bucket.
    identified: HashMap<u32, Instant>,
    next_session: u64,
}

struct Shared {
    config: GatewayConfig,
    url: String,
    state: Mutex<State>,
}

impl Shared {
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// The running fake gateway; stops when dropped.
pub struct FakeGateway {
    shared: Arc<Shared>,
    addr: SocketAddr,
    accept: JoinHandle<()>,
}

impl Drop for FakeGateway {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

impl FakeGateway {
    /// Listens on 127.0.0.1 (a free port).
    pub async fn start(config: GatewayConfig) -> std::io::Result<Self> {
        Self::start_on(SocketAddr::from(([127, 0, 0, 1], 0)), config).await
    }

    /// Listens on `addr`.
    pub async fn start_on(addr: SocketAddr, config: GatewayConfig) -> std::io::Result<Self> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared { config, url: format!("ws://{addr}"), state: Mutex::new(State::default()) });
        let accept = tokio::spawn(accept_loop(listener, shared.clone()));
        Ok(Self { shared, addr, accept })
    }

    /// The URL shards connect to, with Discord's query.
    pub fn url(&self) -> String {
        format!("{}/?v=10&encoding=json", self.shared.url)
    }

    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The counters so far.
    pub fn stats(&self) -> GatewayStats {
        self.shared.state().stats.clone()
    }

    /// Every handshake so far, in order.
    pub fn handshakes(&self) -> Vec<Handshake> {
        self.shared.state().handshakes.clone()
    }

    /// The sequence number a shard's newest session reached.
    pub fn seq_of(&self, shard: u32) -> Option<u64> {
        let state = self.shared.state();
        state.sessions.values().filter(|s| s.shard == shard).map(|s| s.seq).max()
    }

    /// Whether `shard` has a live connection.
    pub fn is_live(&self, shard: u32) -> bool {
        self.shared.state().live.get(&shard).is_some_and(|tx| !tx.is_closed())
    }

    /// Sends an event to a shard's live connection; `false` when it has none.
    pub fn dispatch(&self, shard: u32, kind: &str, data: Value) -> bool {
        self.command(shard, Command::Dispatch { kind: kind.to_owned(), data })
    }

    /// Sends op 7 RECONNECT.
    pub fn reconnect(&self, shard: u32) -> bool {
        self.command(shard, Command::Reconnect)
    }

    /// Sends op 9 INVALID SESSION; `resumable: false` also forgets the session.
    pub fn invalidate(&self, shard: u32, resumable: bool) -> bool {
        self.command(shard, Command::Invalidate { resumable })
    }

    /// Sends op 1: the shard must beat at once.
    pub fn request_beat(&self, shard: u32) -> bool {
        self.command(shard, Command::RequestBeat)
    }

    /// Closes the shard's connection with `code`.
    pub fn close(&self, shard: u32, code: u16) -> bool {
        self.command(shard, Command::Close { code })
    }

    /// Stops (or goes on) acknowledging the heartbeats of the shard's live
    /// connection: it goes half-open (a new connection acknowledges again).
    pub fn set_silent(&self, shard: u32, silent: bool) -> bool {
        self.command(shard, Command::Silent(silent))
    }

    /// Drops the shard's connection without a close frame.
    pub fn drop_connection(&self, shard: u32) -> bool {
        self.command(shard, Command::Drop)
    }

    /// A command line, for `lifecycle peer --protocol discord`:
    /// `dispatch SHARD TYPE [JSON]`, `reconnect SHARD`, `invalidate SHARD true|false`,
    /// `beat SHARD`, `close SHARD CODE`, `drop SHARD`, `silent SHARD true|false`, `stats`.
    pub fn command_line(&self, line: &str) -> Result<String, String> {
        let words: Vec<&str> = line.split_whitespace().collect();
        let shard = |i: usize| -> Result<u32, String> {
            words.get(i).and_then(|w| w.parse().ok()).ok_or_else(|| format!("`{line}`: a shard number expected"))
        };
        let flag = |i: usize| match words.get(i) {
            Some(&"true") => Ok(true),
            Some(&"false") => Ok(false),
            _ => Err(format!("`{line}`: true or false expected")),
        };
        let sent = |ok: bool| if ok { Ok("sent".to_owned()) } else { Err("that shard has no live connection".into()) };
        match words.first().copied() {
            Some("dispatch") => {
                let kind = words.get(2).ok_or_else(|| format!("`{line}`: an event type expected"))?;
                let data = match line.splitn(4, char::is_whitespace).nth(3) {
                    Some(json) => serde_json::from_str(json).map_err(|e| format!("event data: {e}"))?,
                    None => json!({}),
                };
                sent(self.dispatch(shard(1)?, kind, data))
            }
            Some("reconnect") => sent(self.reconnect(shard(1)?)),
            Some("invalidate") => sent(self.invalidate(shard(1)?, flag(2)?)),
            Some("beat") => sent(self.request_beat(shard(1)?)),
            Some("close") => {
                let code = words.get(2).and_then(|w| w.parse().ok()).ok_or("a close code expected")?;
                sent(self.close(shard(1)?, code))
            }
            Some("drop") => sent(self.drop_connection(shard(1)?)),
            Some("silent") => sent(self.set_silent(shard(1)?, flag(2)?)),
            Some("stats") => Ok(format!("{:?}", self.stats())),
            _ => Err(format!(
                "unknown command `{line}`; known: dispatch, reconnect, invalidate, beat, close, drop, silent, stats"
            )),
        }
    }

    fn command(&self, shard: u32, command: Command) -> bool {
        self.shared.state().live.get(&shard).is_some_and(|tx| tx.send(command).is_ok())
    }
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            // Out of descriptors, say: wait a moment rather than spin.
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        // Frames go out when flushed, not held back by Nagle.
        let _ = tcp.set_nodelay(true);
        let shared = shared.clone();
        tokio::spawn(async move {
            if let Ok(ws) = tokio_tungstenite::accept_async(tcp).await {
                shared.state().stats.connections += 1;
                Connection::new(shared, ws).run().await;
            }
        });
    }
}

type Ws = tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>;

/// What a shard's first frames carry (IDENTIFY or RESUME); the rest of `d` is not read.
#[derive(Deserialize)]
struct Handshaking {
    op: u8,
    #[serde(default)]
    d: Value,
}

struct Connection {
    shared: Arc<Shared>,
    ws: Ws,
    commands: mpsc::UnboundedReceiver<Command>,
    tx: mpsc::UnboundedSender<Command>,
    /// The session and shard, once identified or resumed.
    session: Option<(String, u32)>,
    received: std::collections::VecDeque<Instant>,
    last_beat: Option<Instant>,
    beat_requested: bool,
    /// Heartbeats go unacknowledged (half-open).
    silent: bool,
}

enum Next {
    Go,
    Stop,
    /// Drop TCP at once, without a close handshake.
    Drop,
}

impl Connection {
    fn new(shared: Arc<Shared>, ws: Ws) -> Self {
        let (tx, commands) = mpsc::unbounded_channel();
        Self {
            shared,
            ws,
            commands,
            tx,
            session: None,
            received: std::collections::VecDeque::new(),
            last_beat: None,
            beat_requested: false,
            silent: false,
        }
    }

    async fn run(mut self) {
        let interval = u64::try_from(self.shared.config.heartbeat_interval.as_millis()).unwrap_or(u64::MAX);
        if self.send(json!({"op": op::HELLO, "d": {"heartbeat_interval": interval}})).await.is_err() {
            return;
        }
        loop {
            let next = tokio::select! {
                frame = self.ws.next() => match frame {
                    Some(Ok(Message::Text(text))) => self.on_frame(text.as_str()).await,
                    Some(Ok(Message::Close(frame))) => {
                        self.shared.state().stats.shard_closes.push(frame.map(|f| u16::from(f.code)));
                        Next::Stop
                    }
                    Some(Err(_)) | None => Next::Stop,
                    Some(Ok(_)) => Next::Go,
                },
                Some(command) = self.commands.recv() => self.on_command(command).await,
            };
            match next {
                Next::Go => {}
                Next::Stop => break,
                Next::Drop => return,
            }
        }
        // Let the close handshake finish, bounded.
        let _ = tokio::time::timeout(Duration::from_secs(1), async { while self.ws.next().await.is_some() {} }).await;
    }

    async fn send(&mut self, payload: Value) -> Result<(), ()> {
        self.ws.send(Message::text(payload.to_string())).await.map_err(|_| ())
    }

    async fn close(&mut self, code: u16, reason: &str) -> Next {
        let frame = CloseFrame { code: CloseCode::from(code), reason: reason.to_owned().into() };
        let _ = self.ws.close(Some(frame)).await;
        Next::Stop
    }

    /// Sends a dispatch with the session's next sequence number, keeping it for resumes.
    async fn dispatch(&mut self, kind: &str, data: Value) -> Next {
        let Some((id, _)) = &self.session else { return Next::Go };
        let seq = {
            let mut state = self.shared.state();
            let Some(session) = state.sessions.get_mut(id) else { return Next::Go };
            session.seq += 1;
            if session.events.len() >= 1_000 {
                session.events.remove(0);
            }
            session.events.push((session.seq, kind.to_owned(), data.clone()));
            session.seq
        };
        match self.send(json!({"op": op::DISPATCH, "s": seq, "t": kind, "d": data})).await {
            Ok(()) => Next::Go,
            Err(()) => Next::Stop,
        }
    }

    async fn on_command(&mut self, command: Command) -> Next {
        let sent = match command {
            Command::Dispatch { kind, data } => return self.dispatch(&kind, data).await,
            Command::Reconnect => self.send(json!({"op": op::RECONNECT, "d": null})).await,
            Command::Invalidate { resumable } => {
                if !resumable && let Some((id, _)) = &self.session {
                    self.shared.state().sessions.remove(id);
                }
                self.send(json!({"op": op::INVALID_SESSION, "d": resumable})).await
            }
            Command::RequestBeat => {
                self.beat_requested = true;
                self.send(json!({"op": op::HEARTBEAT, "d": null})).await
            }
            Command::Close { code } => return self.close(code, "closed on command").await,
            Command::Drop => return Next::Drop,
            Command::Silent(silent) => {
                self.silent = silent;
                return Next::Go;
            }
        };
        if sent.is_ok() { Next::Go } else { Next::Stop }
    }

    async fn on_frame(&mut self, text: &str) -> Next {
        let config = &self.shared.config;
        let now = Instant::now();
        self.received.push_back(now);
        while self.received.front().is_some_and(|t| now.duration_since(*t) > config.frame_window) {
            self.received.pop_front();
        }
        if self.received.len() > config.frame_limit {
            self.shared.state().stats.rate_limited += 1;
            return self.close(4008, "rate limited").await;
        }
        let Ok(payload) = serde_json::from_str::<Handshaking>(text) else {
            return self.close(4002, "decode error").await;
        };
        match payload.op {
            op::HEARTBEAT => self.on_heartbeat(now).await,
            op::IDENTIFY if self.session.is_none() => self.on_identify(&payload.d, now).await,
            op::RESUME if self.session.is_none() => self.on_resume(&payload.d).await,
            op::IDENTIFY | op::RESUME => self.close(4005, "already authenticated").await,
            _ if self.session.is_none() => self.close(4003, "not authenticated").await,
            _ => {
                self.shared.state().stats.app_frames += 1;
                Next::Go
            }
        }
    }

    async fn on_heartbeat(&mut self, now: Instant) -> Next {
        let config = &self.shared.config;
        {
            let mut state = self.shared.state();
            state.stats.heartbeats += 1;
            if let Some(last) = self.last_beat
                && !self.beat_requested
                && now.duration_since(last) + config.beat_tolerance < config.heartbeat_interval
            {
                state.stats.early_beats += 1;
            }
        }
        self.last_beat = Some(now);
        self.beat_requested = false;
        if self.silent {
            return Next::Go;
        }
        match self.send(json!({"op": op::HEARTBEAT_ACK})).await {
            Ok(()) => Next::Go,
            Err(()) => Next::Stop,
        }
    }

    fn token_ok(&self, d: &Value) -> bool {
        d.get("token").and_then(Value::as_str) == Some(self.shared.config.token.as_str())
    }

    async fn on_identify(&mut self, d: &Value, now: Instant) -> Next {
        let config = self.shared.config.clone();
        if !self.token_ok(d) {
            self.shared.state().stats.bad_token += 1;
            return self.close(4004, "authentication failed").await;
        }
        let shard = d.get("shard").and_then(Value::as_array).and_then(|a| match a.as_slice() {
            [id, count] => Some((id.as_u64()?, count.as_u64()?)),
            _ => None,
        });
        let Some((id, count)) = shard.and_then(|(id, count)| Some((u32::try_from(id).ok()?, count))) else {
            return self.close(4010, "invalid shard").await;
        };
        if count != u64::from(config.shards) || id >= config.shards {
            return self.close(4010, "invalid shard").await;
        }
        if d.get("intents").and_then(Value::as_u64).is_none() {
            return self.close(4013, "invalid intents").await;
        }
        let session_id = {
            let mut state = self.shared.state();
            state.handshakes.push(Handshake::Identify { shard: id });
            let bucket = id % config.max_concurrency.max(1);
            let refused =
                state.identified.get(&bucket).is_some_and(|last| now.duration_since(*last) < config.identify_window);
            if refused {
                state.stats.identify_refused += 1;
                None
            } else {
                state.identified.insert(bucket, now);
                state.stats.identifies += 1;
                state.next_session += 1;
                let session_id = format!("{:016x}{:016x}", state.next_session, u64::from(id).wrapping_mul(0x9e37_79b9));
                state.sessions.insert(session_id.clone(), Session { shard: id, ..Session::default() });
                state.live.insert(id, self.tx.clone());
                Some(session_id)
            }
        };
        let Some(session_id) = session_id else {
            return match self.send(json!({"op": op::INVALID_SESSION, "d": false})).await {
                Ok(()) => Next::Go,
                Err(()) => Next::Stop,
            };
        };
        self.session = Some((session_id.clone(), id));
        let ready = json!({
            "v": 10,
            "user": {"id": "1", "username": "fake", "bot": true},
            "guilds": [],
            "session_id": session_id,
            "resume_gateway_url": self.shared.url,
            "shard": [id, count],
            "application": {"id": "1", "flags": 0},
        });
        self.dispatch("READY", ready).await
    }

    async fn on_resume(&mut self, d: &Value) -> Next {
        if !self.token_ok(d) {
            self.shared.state().stats.bad_token += 1;
            return self.close(4004, "authentication failed").await;
        }
        let session_id = d.get("session_id").and_then(Value::as_str).unwrap_or_default().to_owned();
        let seq = d.get("seq").and_then(Value::as_u64);
        let replay = {
            let mut state = self.shared.state();
            state.handshakes.push(Handshake::Resume { session_id: session_id.clone(), seq: seq.unwrap_or(0) });
            let found = state.sessions.get(&session_id).and_then(|s| {
                let seq = seq?;
                (seq <= s.seq && s.events.first().is_none_or(|(first, ..)| *first <= seq + 1)).then(|| {
                    let missed: Vec<(u64, String, Value)> =
                        s.events.iter().filter(|(n, ..)| *n > seq).cloned().collect();
                    (s.shard, missed)
                })
            });
            match found {
                Some((shard, missed)) => {
                    state.stats.resumes += 1;
                    state.live.insert(shard, self.tx.clone());
                    Some((shard, missed))
                }
                None => {
                    state.stats.resume_refused += 1;
                    None
                }
            }
        };
        let Some((shard, missed)) = replay else {
            return match self.send(json!({"op": op::INVALID_SESSION, "d": false})).await {
                Ok(()) => Next::Go,
                Err(()) => Next::Stop,
            };
        };
        self.session = Some((session_id, shard));
        for (n, kind, data) in missed {
            if self.send(json!({"op": op::DISPATCH, "s": n, "t": kind, "d": data})).await.is_err() {
                return Next::Stop;
            }
        }
        self.dispatch("RESUMED", json!({})).await
    }
}
