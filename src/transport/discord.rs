//! The Discord gateway (API v10, JSON encoding, no compression), written
//! from Discord's public gateway documentation.
//!
//! Each instance is one shard: its shard id is the number its name ends
//! with (`shard-7` → 7; a name without one is shard 0), out of
//! [`DiscordConfig::shards`]. Per connection:
//!
//! - the gateway sends HELLO (op 10) with `heartbeat_interval`; the shard
//!   answers IDENTIFY (op 2) — paced fleet-wide, one per bucket
//!   `shard_id % max_concurrency` per `identify_window` — or, with resume
//!   data, RESUME (op 6) with the session id and the last sequence number;
//! - READY (op 0, `t: "READY"`) opens the instance; its identity is the
//!   resume data, `"<session_id> <seq> <resume_gateway_url>"`, recorded with
//!   the transition (so a restart of the engine resumes: R11). RESUMED opens
//!   it again with the same session. Both also reach the host, as every
//!   dispatch does (`Engine::frames`); the sequence number of each is kept
//!   in memory, and a reconnect in the same process resumes from the newest;
//! - heartbeats are op 1 frames carrying the last sequence number. The first
//!   is due `heartbeat_interval × jitter` after HELLO, each next one an
//!   interval after the last; the ACK (op 11) is the pong. A zombie is the
//!   table's decision (no ACK within the policy's deadline, R7). An op 1
//!   from the gateway is answered at once;
//! - op 7 RECONNECT and op 9 INVALID SESSION with `d: true` ask for a resume
//!   (R13); op 9 with `d: false` drops the session, and the next attempt
//!   identifies after 1–5 s (R14);
//! - close codes are statuses as they are: the `discord` policy preset
//!   resumes on 4000–4003, 4005, 4008 and on a close without a code,
//!   identifies anew on 4007 and 4009, and stops on 4004 and 4010–4014. The
//!   engine's own closes never use 1000 or 1001 unless the session is to
//!   end (a logout is a close with 1000).
//!
//! The resume URL comes from the gateway: it is used only with the scheme
//! of the configured URL (a `wss://` gateway cannot move a shard to `ws://`),
//! and keeps the configured URL's query (`?v=10&encoding=json`).

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Deserialize;
use serde::de::IgnoredAny;
use tokio::time::Instant;

use super::pacing::{Pacer, PacerError};
use super::protocol::{Beat, Logout, PeerMessage, Protocol, ProtocolError, ProtocolSession, Reading, Write};
use super::traffic::Frame;
use crate::machine::{Identity, InstanceName, StatusCode, WsUrl};

/// Op codes (Discord's "Gateway Opcodes" table).
pub mod op {
    /// An event, with a sequence number (`s`) and a type (`t`).
    pub const DISPATCH: u8 = 0;
    /// A heartbeat (either way: the gateway may ask for one).
    pub const HEARTBEAT: u8 = 1;
    /// Start a new session.
    pub const IDENTIFY: u8 = 2;
    /// Resume a session.
    pub const RESUME: u8 = 6;
    /// The gateway asks for a reconnect and resume.
    pub const RECONNECT: u8 = 7;
    /// The session is invalid; `d` says whether it may be resumed.
    pub const INVALID_SESSION: u8 = 9;
    /// The first frame: the heartbeat interval.
    pub const HELLO: u8 = 10;
    /// A heartbeat acknowledged.
    pub const HEARTBEAT_ACK: u8 = 11;
}

/// The limits a gateway's HELLO interval must be within to be used.
const INTERVAL_MIN: Duration = Duration::from_millis(10);
const INTERVAL_MAX: Duration = Duration::from_secs(600);

/// How a fleet of shards identifies.
#[derive(Clone, Debug)]
pub struct DiscordConfig {
    /// The bot token (sent in IDENTIFY and RESUME; never logged).
    pub token: String,
    /// The gateway intents bitfield.
    pub intents: u64,
    /// The total number of shards (`shard: [id, shards]`).
    pub shards: u32,
    /// IDENTIFYs allowed at once (`session_start_limit.max_concurrency`).
    pub max_concurrency: u32,
    /// The window of the identify limit: 5 s on Discord.
    pub identify_window: Duration,
}

impl DiscordConfig {
    /// One shard, `max_concurrency` 1, Discord's 5 s window.
    pub fn new(token: impl Into<String>, intents: u64) -> Self {
        Self { token: token.into(), intents, shards: 1, max_concurrency: 1, identify_window: Duration::from_secs(5) }
    }
}

/// Why a Discord protocol could not be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DiscordConfigError {
    /// No shard.
    #[error("a Discord fleet has at least one shard")]
    NoShards,
    /// The identify pacing is not a pacing.
    #[error("identify pacing: {0}")]
    Pacing(#[from] PacerError),
    /// A token with characters that cannot travel in JSON unescaped or a header.
    #[error("the bot token is empty or contains whitespace or control characters")]
    Token,
}

/// The resume data of a session, as recorded in its identity.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResumeData {
    /// The session id from READY.
    pub session_id: String,
    /// The last sequence number seen.
    pub seq: u64,
    /// Where to resume (READY's `resume_gateway_url`).
    pub url: String,
}

impl ResumeData {
    /// As an identity: `"<session_id> <seq> <url>"`; `None` when it does not
    /// fit one (an identity is at most 256 bytes without control characters).
    pub fn to_identity(&self) -> Option<Identity> {
        if self.session_id.is_empty() || self.session_id.contains(' ') || self.url.contains(' ') {
            return None;
        }
        Identity::new(format!("{} {} {}", self.session_id, self.seq, self.url)).ok()
    }

    /// Reads an identity written by [`ResumeData::to_identity`].
    pub fn from_identity(identity: &Identity) -> Option<Self> {
        let mut parts = identity.as_str().splitn(3, ' ');
        let (session_id, seq, url) = (parts.next()?, parts.next()?, parts.next()?);
        Some(Self { session_id: session_id.to_owned(), seq: seq.parse().ok()?, url: url.to_owned() })
    }
}

/// The Discord gateway protocol for a fleet of shards (see the module docs).
pub struct DiscordProtocol {
    config: DiscordConfig,
    identify: Arc<Pacer>,
    /// The newest sequence number of each instance's session, kept as
    /// dispatches arrive, so a reconnect in this process resumes from it
    /// rather than from the one recorded at READY.
    latest: Arc<Mutex<HashMap<InstanceName, Arc<Latest>>>>,
}

#[derive(Debug)]
struct Latest {
    session_id: String,
    seq: AtomicU64,
}

impl std::fmt::Debug for DiscordProtocol {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DiscordProtocol")
            .field("shards", &self.config.shards)
            .field("max_concurrency", &self.config.max_concurrency)
            .field("identify_window", &self.config.identify_window)
            .finish_non_exhaustive()
    }
}

impl DiscordProtocol {
    /// The protocol for `config`; its identify pacing is shared by every
    /// connection this protocol opens.
    pub fn new(config: DiscordConfig) -> Result<Self, DiscordConfigError> {
        if config.shards == 0 {
            return Err(DiscordConfigError::NoShards);
        }
        if config.token.is_empty() || config.token.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(DiscordConfigError::Token);
        }
        let buckets = usize::try_from(config.max_concurrency).unwrap_or(usize::MAX);
        let identify = Arc::new(Pacer::new(buckets, config.identify_window)?);
        Ok(Self { config, identify, latest: Arc::default() })
    }

    /// The identify pacing (for the lower bound of a storm: [`Pacer::lower_bound`]).
    pub fn identify_pacer(&self) -> &Arc<Pacer> {
        &self.identify
    }

    /// The shard an instance is: the number its name ends with.
    pub fn shard_of(name: &InstanceName) -> u32 {
        let s = name.as_str();
        let digits = s.len() - s.trim_end_matches(|c: char| c.is_ascii_digit()).len();
        s[s.len() - digits..].parse().unwrap_or(0)
    }
}

type LatestMap = Arc<Mutex<HashMap<InstanceName, Arc<Latest>>>>;

fn lock(map: &LatestMap) -> std::sync::MutexGuard<'_, HashMap<InstanceName, Arc<Latest>>> {
    // Plain data: a panic elsewhere while holding it leaves nothing half-done.
    map.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Protocol for DiscordProtocol {
    fn open(&self, instance: &InstanceName, resume: Option<&Identity>) -> Box<dyn ProtocolSession> {
        let mut resume = resume.and_then(ResumeData::from_identity);
        if let Some(r) = &mut resume
            && let Some(latest) = lock(&self.latest).get(instance)
            && latest.session_id == r.session_id
        {
            r.seq = r.seq.max(latest.seq.load(Ordering::Relaxed));
        }
        let shard = Self::shard_of(instance);
        let seed =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
        Box::new(DiscordSession {
            identify: self.identify.clone(),
            key: u64::from(shard) % u64::from(self.config.max_concurrency.max(1)),
            identify_frame: identify_frame(&self.config, shard),
            token: self.config.token.clone(),
            instance: instance.clone(),
            latest: self.latest.clone(),
            cell: None,
            seq: resume.as_ref().map(|r| r.seq),
            resume,
            interval: None,
            first_beat: None,
            last_beat: None,
            rng: Rng((seed ^ (u64::from(shard) << 32)) | 1),
        })
    }

    fn url<'a>(&self, configured: &'a WsUrl, resume: Option<&Identity>) -> Cow<'a, WsUrl> {
        let Some(r) = resume.and_then(ResumeData::from_identity) else { return Cow::Borrowed(configured) };
        let scheme = |u: &str| u.split_once("://").map(|(s, _)| s.to_owned());
        if scheme(&r.url) != scheme(configured.as_str()) {
            return Cow::Borrowed(configured);
        }
        let query = configured.as_str().split_once('?').map(|(_, q)| q);
        let url = match query {
            Some(q) if !r.url.contains('?') => format!("{}/?{q}", r.url.trim_end_matches('/')),
            _ => r.url,
        };
        WsUrl::parse(&url).map_or(Cow::Borrowed(configured), Cow::Owned)
    }

    fn status_of(&self, close_code: u16) -> StatusCode {
        StatusCode(close_code)
    }

    fn close_code_of(&self, status: StatusCode) -> u16 {
        if (1000..=4999).contains(&status.0) { status.0 } else { 4000 + status.0 % 1000 }
    }
}

fn identify_frame(config: &DiscordConfig, shard: u32) -> String {
    serde_json::json!({
        "op": op::IDENTIFY,
        "d": {
            "token": config.token,
            "intents": config.intents,
            "properties": { "os": std::env::consts::OS, "browser": "instance-lifecycle", "device": "instance-lifecycle" },
            "shard": [shard, config.shards],
        }
    })
    .to_string()
}

/// A small xorshift generator for the jitter of the first beat and the
/// wait after an invalid session (not for anything secret).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    /// Uniform in [0, 1).
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// One shard's connection.
struct DiscordSession {
    identify: Arc<Pacer>,
    key: u64,
    identify_frame: String,
    token: String,
    instance: InstanceName,
    latest: LatestMap,
    /// This session's entry in `latest`, once READY or RESUMED named it.
    cell: Option<Arc<Latest>>,
    /// The session to resume, if any (dropped by an invalid session).
    resume: Option<ResumeData>,
    /// The last sequence number seen.
    seq: Option<u64>,
    interval: Option<Duration>,
    first_beat: Option<Instant>,
    last_beat: Option<Instant>,
    rng: Rng,
}

/// What every gateway payload has; `d` is read again, typed, only where it matters.
#[derive(Deserialize)]
struct Envelope<'a> {
    op: u8,
    #[serde(default)]
    s: Option<u64>,
    #[serde(default, borrow)]
    t: Option<Cow<'a, str>>,
    #[serde(default)]
    #[allow(dead_code)]
    d: IgnoredAny,
}

#[derive(Deserialize)]
struct WithData<T> {
    d: T,
}

#[derive(Deserialize)]
struct Hello {
    heartbeat_interval: u64,
}

#[derive(Deserialize)]
struct Ready {
    session_id: String,
    resume_gateway_url: String,
}

fn malformed(e: serde_json::Error) -> ProtocolError {
    ProtocolError::Malformed { reason: e.to_string() }
}

impl DiscordSession {
    fn beat_frame(&self) -> Frame {
        match self.seq {
            Some(seq) => Frame::Text(format!(r#"{{"op":1,"d":{seq}}}"#)),
            None => Frame::Text(r#"{"op":1,"d":null}"#.to_owned()),
        }
    }

    fn resume_frame(&self, r: &ResumeData) -> String {
        serde_json::json!({
            "op": op::RESUME,
            "d": { "token": self.token, "session_id": r.session_id, "seq": r.seq }
        })
        .to_string()
    }

    /// The session is (again) READY as `session_id`: the identity it opens with.
    fn opened(&mut self, session_id: String, url: String) -> Option<Identity> {
        let seq = self.seq.unwrap_or(0);
        let data = ResumeData { session_id, seq, url };
        let cell = Arc::new(Latest { session_id: data.session_id.clone(), seq: AtomicU64::new(seq) });
        lock(&self.latest).insert(self.instance.clone(), cell.clone());
        self.cell = Some(cell);
        let identity = data.to_identity();
        self.resume = Some(data);
        identity
    }

    fn on_hello(&mut self, text: &str, now: Instant, out: &mut Vec<Write>) -> Result<Reading, ProtocolError> {
        let hello: WithData<Hello> = serde_json::from_str(text).map_err(malformed)?;
        let interval = Duration::from_millis(hello.d.heartbeat_interval);
        if !(INTERVAL_MIN..=INTERVAL_MAX).contains(&interval) {
            return Err(ProtocolError::Violation {
                what: format!("HELLO's heartbeat_interval {interval:?} is outside {INTERVAL_MIN:?}..={INTERVAL_MAX:?}"),
            });
        }
        if self.interval.is_some() {
            return Err(ProtocolError::Violation { what: "a second HELLO on one connection".into() });
        }
        self.interval = Some(interval);
        self.first_beat = Some(now + interval.mul_f64(self.rng.unit()));
        match &self.resume {
            Some(r) => out.push(Write::Now(Frame::Text(self.resume_frame(r)))),
            None => out.push(Write::Paced {
                pacer: self.identify.clone(),
                key: self.key,
                frame: Frame::Text(self.identify_frame.clone()),
            }),
        }
        Ok(PeerMessage::Handled.into())
    }

    fn on_dispatch(&mut self, text: &str, kind: Option<&str>) -> Result<Reading, ProtocolError> {
        let message = match kind {
            Some("READY") => {
                let ready: WithData<Ready> = serde_json::from_str(text).map_err(malformed)?;
                PeerMessage::Ready { identity: self.opened(ready.d.session_id, ready.d.resume_gateway_url) }
            }
            Some("RESUMED") => match self.resume.take() {
                Some(r) => PeerMessage::Ready { identity: self.opened(r.session_id, r.url) },
                None => return Err(ProtocolError::Violation { what: "RESUMED without a RESUME".into() }),
            },
            _ => PeerMessage::Application,
        };
        Ok(Reading { message, to_host: true })
    }
}

impl ProtocolSession for DiscordSession {
    fn greet(&mut self, _now: Instant, _out: &mut Vec<Write>) {
        // The gateway speaks first (HELLO).
    }

    fn read_text(&mut self, text: &str, now: Instant, out: &mut Vec<Write>) -> Result<Reading, ProtocolError> {
        let envelope: Envelope<'_> = serde_json::from_str(text).map_err(malformed)?;
        if let Some(s) = envelope.s {
            self.seq = Some(self.seq.map_or(s, |seq| seq.max(s)));
            if let Some(cell) = &self.cell {
                cell.seq.fetch_max(s, Ordering::Relaxed);
            }
        }
        if self.interval.is_none() && envelope.op != op::HELLO {
            return Err(ProtocolError::Violation { what: format!("op {} before HELLO", envelope.op) });
        }
        match envelope.op {
            op::HELLO => self.on_hello(text, now, out),
            op::DISPATCH => self.on_dispatch(text, envelope.t.as_deref()),
            op::HEARTBEAT => {
                // The gateway asks for a beat now.
                out.push(Write::Now(self.beat_frame()));
                self.last_beat = Some(now);
                Ok(PeerMessage::Handled.into())
            }
            op::HEARTBEAT_ACK => Ok(PeerMessage::HeartbeatAck.into()),
            op::RECONNECT => Ok(PeerMessage::ReconnectRequested.into()),
            op::INVALID_SESSION => {
                let resumable: WithData<Option<bool>> = serde_json::from_str(text).map_err(malformed)?;
                if resumable.d == Some(true) && self.resume.is_some() {
                    return Ok(PeerMessage::ReconnectRequested.into());
                }
                // Not resumable: forget the session; identify again after 1–5 s.
                self.resume = None;
                lock(&self.latest).remove(&self.instance);
                let retry_after = Duration::from_millis(1_000 + self.rng.next() % 4_001);
                Ok(PeerMessage::SessionInvalid { retry_after }.into())
            }
            other => Ok(PeerMessage::Unknown { kind: format!("op {other}") }.into()),
        }
    }

    fn heartbeat(&mut self, now: Instant) -> Beat {
        self.last_beat = Some(now);
        Beat::Frame(self.beat_frame())
    }

    fn next_beat(&mut self, now: Instant) -> Option<Duration> {
        let due = match (self.last_beat, self.interval) {
            (Some(last), Some(interval)) => last + interval,
            _ => self.first_beat?,
        };
        Some(due.saturating_duration_since(now))
    }

    fn logout(&mut self) -> Logout {
        // Discord has no logout frame: a close with 1000 ends the session.
        lock(&self.latest).remove(&self.instance);
        Logout::Close(StatusCode::NORMAL)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(s: &str) -> InstanceName {
        InstanceName::new(s).expect("name")
    }

    fn protocol() -> DiscordProtocol {
        let mut c = DiscordConfig::new("Bot.t", 513);
        c.shards = 16;
        c.max_concurrency = 4;
        DiscordProtocol::new(c).expect("config")
    }

    fn text(w: &Write) -> &str {
        match w {
            Write::Now(Frame::Text(t)) | Write::Paced { frame: Frame::Text(t), .. } => t,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn shards_come_from_names_and_bad_configs_are_refused() {
        assert_eq!(DiscordProtocol::shard_of(&name("shard-7")), 7);
        assert_eq!(DiscordProtocol::shard_of(&name("bot12")), 12);
        assert_eq!(DiscordProtocol::shard_of(&name("bot")), 0);
        let mut c = DiscordConfig::new("Bot.t", 1);
        c.shards = 0;
        assert_eq!(DiscordProtocol::new(c).err(), Some(DiscordConfigError::NoShards));
        let mut c = DiscordConfig::new("Bot.t", 1);
        c.max_concurrency = 0;
        assert_eq!(DiscordProtocol::new(c).err(), Some(DiscordConfigError::Pacing(PacerError::NoBuckets)));
        for token in ["", "a b", "a\nb"] {
            assert_eq!(DiscordProtocol::new(DiscordConfig::new(token, 1)).err(), Some(DiscordConfigError::Token));
        }
    }

    #[test]
    fn resume_data_round_trips_through_an_identity() {
        let data = ResumeData { session_id: "abc".into(), seq: 42, url: "wss://g.example".into() };
        let identity = data.to_identity().expect("fits");
        assert_eq!(identity.as_str(), "abc 42 wss://g.example");
        assert_eq!(ResumeData::from_identity(&identity), Some(data));
        let long = ResumeData { session_id: "x".repeat(300), seq: 1, url: "wss://g".into() };
        assert_eq!(long.to_identity(), None);
        let spaced = ResumeData { session_id: "a b".into(), seq: 1, url: "wss://g".into() };
        assert_eq!(spaced.to_identity(), None);
        for bad in ["abc", "abc x wss://g", "5511@s.whatsapp.net"] {
            assert_eq!(ResumeData::from_identity(&Identity::new(bad).expect("identity")), None, "{bad}");
        }
    }

    #[test]
    fn a_resume_connects_to_the_resume_url_of_the_same_scheme_with_the_configured_query() {
        let p = protocol();
        let configured = WsUrl::parse("wss://gateway.discord.gg/?v=10&encoding=json").expect("url");
        let resume = |url: &str| ResumeData { session_id: "s".into(), seq: 1, url: url.into() }.to_identity();
        assert_eq!(p.url(&configured, None).as_str(), configured.as_str());
        let moved = resume("wss://gateway-us-east1-b.discord.gg");
        assert_eq!(
            p.url(&configured, moved.as_ref()).as_str(),
            "wss://gateway-us-east1-b.discord.gg/?v=10&encoding=json"
        );
        let downgraded = resume("ws://evil.example");
        assert_eq!(p.url(&configured, downgraded.as_ref()).as_str(), configured.as_str(), "never to another scheme");
        let whatsapp = Identity::new("5511@s.whatsapp.net").ok();
        assert_eq!(p.url(&configured, whatsapp.as_ref()).as_str(), configured.as_str());
    }

    #[test]
    fn close_codes_are_statuses_as_they_are_and_ours_never_end_the_session_by_accident() {
        let p = protocol();
        for code in [1000, 1006, 4000, 4004, 4014] {
            assert_eq!(p.status_of(code), StatusCode(code));
            assert_eq!(p.close_code_of(StatusCode(code)), code);
        }
        assert_eq!(p.close_code_of(StatusCode::RESTART), 1012, "a restart keeps the session resumable");
        assert_eq!(p.close_code_of(StatusCode::TIMEOUT), 4408);
    }

    #[tokio::test(start_paused = true)]
    async fn hello_then_identify_ready_beats_and_acks() {
        let p = protocol();
        let mut s = p.open(&name("shard-5"), None);
        let (now, mut out) = (Instant::now(), Vec::new());
        s.greet(now, &mut out);
        assert!(out.is_empty(), "the gateway speaks first");
        let early = s.read_text(r#"{"op":11}"#, now, &mut out);
        assert!(matches!(early, Err(ProtocolError::Violation { .. })), "{early:?}");
        for bad in [r#"{"op":10,"d":{"heartbeat_interval":0}}"#, r#"{"op":10,"d":{}}"#, "[]", "{"] {
            assert!(s.read_text(bad, now, &mut out).is_err(), "{bad}");
        }
        let hello = s.read_text(r#"{"op":10,"d":{"heartbeat_interval":41250}}"#, now, &mut out).expect("hello");
        assert_eq!(hello.message, PeerMessage::Handled);
        let [Write::Paced { key, .. }] = &out[..] else { panic!("{out:?}") };
        assert_eq!(*key, 1, "shard 5 of max_concurrency 4 is bucket 1");
        let identify: serde_json::Value = serde_json::from_str(text(&out[0])).expect("json");
        assert_eq!(identify["op"], 2);
        assert_eq!(identify["d"]["shard"], serde_json::json!([5, 16]));
        assert_eq!((identify["d"]["token"].as_str(), identify["d"]["intents"].as_u64()), (Some("Bot.t"), Some(513)));
        assert!(s.read_text(r#"{"op":10,"d":{"heartbeat_interval":41250}}"#, now, &mut out).is_err(), "one HELLO");

        let first = s.next_beat(now).expect("a schedule");
        assert!(first <= Duration::from_millis(41_250), "{first:?}");
        let ready = r#"{"op":0,"s":1,"t":"READY","d":{"session_id":"sess","resume_gateway_url":"wss://r.example","user":{"id":"1"}}}"#;
        let r = s.read_text(ready, now, &mut out).expect("ready");
        assert!(r.to_host);
        let PeerMessage::Ready { identity: Some(identity) } = r.message else { panic!("{r:?}") };
        assert_eq!(identity.as_str(), "sess 1 wss://r.example");
        let event = s.read_text(r#"{"op":0,"s":9,"t":"MESSAGE_CREATE","d":{}}"#, now, &mut out).expect("event");
        assert_eq!(event, Reading { message: PeerMessage::Application, to_host: true });
        assert_eq!(s.heartbeat(now), Beat::Frame(Frame::Text(r#"{"op":1,"d":9}"#.into())));
        let later = now + Duration::from_millis(100);
        assert_eq!(s.read_text(r#"{"op":11}"#, later, &mut out).expect("ack").message, PeerMessage::HeartbeatAck);
        assert_eq!(s.next_beat(later), Some(Duration::from_millis(41_150)), "an interval after the last beat");
        out.clear();
        assert_eq!(s.read_text(r#"{"op":1}"#, later, &mut out).expect("asked").message, PeerMessage::Handled);
        assert!(matches!(&out[..], [Write::Now(Frame::Text(t))] if t == r#"{"op":1,"d":9}"#), "{out:?}");
        assert_eq!(
            s.read_text(r#"{"op":7,"d":null}"#, later, &mut out).expect("op 7").message,
            PeerMessage::ReconnectRequested
        );
        assert_eq!(
            s.read_text(r#"{"op":9,"d":true}"#, later, &mut out).expect("op 9").message,
            PeerMessage::ReconnectRequested
        );
        let PeerMessage::SessionInvalid { retry_after } =
            s.read_text(r#"{"op":9,"d":false}"#, later, &mut out).expect("op 9").message
        else {
            panic!("not invalid")
        };
        assert!((Duration::from_secs(1)..=Duration::from_secs(5)).contains(&retry_after), "{retry_after:?}");
        assert_eq!(
            s.read_text(r#"{"op":42}"#, later, &mut out).expect("op 42").message,
            PeerMessage::Unknown { kind: "op 42".into() }
        );
        assert_eq!(s.logout(), Logout::Close(StatusCode::NORMAL));
        assert!(s.read_binary(&[0x78, 0x9c], later, &mut out).is_err(), "no compression");
    }

    #[tokio::test(start_paused = true)]
    async fn a_resume_sends_resume_with_the_newest_sequence_this_process_saw() {
        let p = protocol();
        let shard = name("shard-2");
        let recorded = ResumeData { session_id: "sess".into(), seq: 3, url: "wss://r".into() }.to_identity();
        let (now, mut out) = (Instant::now(), Vec::new());
        // A first connection resumed and saw events up to 17; the recorded identity still says 3.
        let mut first = p.open(&shard, recorded.as_ref());
        first.read_text(r#"{"op":10,"d":{"heartbeat_interval":1000}}"#, now, &mut out).expect("hello");
        let resume: serde_json::Value = serde_json::from_str(text(&out[0])).expect("json");
        assert_eq!(resume, serde_json::json!({"op": 6, "d": {"token": "Bot.t", "session_id": "sess", "seq": 3}}));
        assert!(matches!(out[0], Write::Now(_)), "a resume is not paced");
        let resumed = first.read_text(r#"{"op":0,"s":4,"t":"RESUMED","d":{}}"#, now, &mut out).expect("resumed");
        assert!(matches!(resumed.message, PeerMessage::Ready { identity: Some(_) }));
        first.read_text(r#"{"op":0,"s":17,"t":"X","d":{}}"#, now, &mut out).expect("event");
        drop(first);
        out.clear();
        let mut second = p.open(&shard, recorded.as_ref());
        second.read_text(r#"{"op":10,"d":{"heartbeat_interval":1000}}"#, now, &mut out).expect("hello");
        let resume: serde_json::Value = serde_json::from_str(text(&out[0])).expect("json");
        assert_eq!(resume["d"]["seq"], 17);
        // After an invalid session the next connection identifies.
        second.read_text(r#"{"op":9,"d":false}"#, now, &mut out).expect("op 9");
        out.clear();
        let mut third = p.open(&shard, None);
        third.read_text(r#"{"op":10,"d":{"heartbeat_interval":1000}}"#, now, &mut out).expect("hello");
        assert!(matches!(out[..], [Write::Paced { .. }]), "{out:?}");
        let stray = third.read_text(r#"{"op":0,"s":1,"t":"RESUMED","d":{}}"#, now, &mut out);
        assert!(matches!(stray, Err(ProtocolError::Violation { .. })), "{stray:?}");
    }
}
