//! The policy: plain data that parameterises the rules. What to do on each
//! close status in each phase (R4), how to back off (R9), how many pairing
//! codes to accept, heartbeats, and every time-out. Every bound is a named
//! field with a default and a reason.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::types::{InstanceName, StatusCode};

/// The phase a connection was in when it closed: the close table is keyed by it,
/// because the same status can mean different things (Baileys' 408 is "pairing
/// codes ran out" before open and "connection lost" after).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ClosePhase {
    /// Handshaking or pairing: the session never opened on this connection.
    BeforeOpen,
    /// The session was `Open`.
    AfterOpen,
}

/// Which phases a [`CloseRule`] applies to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum PhaseMatch {
    /// Both phases.
    Any,
    /// Only before open.
    BeforeOpen,
    /// Only after open.
    AfterOpen,
}

impl PhaseMatch {
    fn matches(self, phase: ClosePhase) -> bool {
        match self {
            Self::Any => true,
            Self::BeforeOpen => phase == ClosePhase::BeforeOpen,
            Self::AfterOpen => phase == ClosePhase::AfterOpen,
        }
    }
}

/// Which statuses a [`CloseRule`] applies to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum StatusMatch {
    /// The connection ended without a status (lost, reset, no close frame).
    Missing,
    /// Exactly this status.
    Code(u16),
    /// Every status from `first` to `last`, inclusive.
    Range {
        /// First status of the range.
        first: u16,
        /// Last status of the range.
        last: u16,
    },
}

impl StatusMatch {
    fn matches(self, status: Option<StatusCode>) -> bool {
        match (self, status) {
            (Self::Missing, None) => true,
            (Self::Code(c), Some(s)) => s.0 == c,
            (Self::Range { first, last }, Some(s)) => (first..=last).contains(&s.0),
            _ => false,
        }
    }
}

/// What to do when a connection closes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum CloseAction {
    /// Reconnect after a backoff delay.
    Reconnect,
    /// Reconnect at once (still counted against the give-up limit).
    ReconnectNow,
    /// Give up into `Closed` (R4): no automatic reconnect.
    Stop,
    /// Delete the instance: cleanup, then `Removed`.
    Remove,
    /// Reconnect after a backoff delay, without the resume data: the peer
    /// forgot the session (Discord's 4007 and 4009), so the next attempt
    /// identifies anew (R14).
    ReconnectFresh,
}

/// One row of the close table: the first row that matches decides.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CloseRule {
    /// Statuses it applies to.
    pub status: StatusMatch,
    /// Phases it applies to.
    pub phase: PhaseMatch,
    /// What to do.
    pub action: CloseAction,
    /// What the status means, for people reading logs and diagrams.
    pub label: String,
}

impl CloseRule {
    fn new(status: StatusMatch, phase: PhaseMatch, action: CloseAction, label: &str) -> Self {
        Self { status, phase, action, label: label.to_owned() }
    }
}

/// Jitter applied to backoff delays.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Jitter {
    /// The exact exponential delay.
    None,
    /// "Full jitter": uniform between `base` and the *next* exponential delay
    /// (`base · factor^attempt`, capped), so even the first retry of a fleet
    /// that lost its peer at once is spread over `base · (factor − 1)` instead
    /// of all landing at `base`. The draw is a pure function of (seed,
    /// instance name, attempt): replay reproduces it.
    Full,
}

/// Exponential backoff with a cap, jitter, a give-up limit and a stable period.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Backoff {
    /// Delay before the first retry, and the floor of every jittered delay.
    pub base: Duration,
    /// Growth factor per attempt.
    pub factor: u32,
    /// Largest delay.
    pub cap: Duration,
    /// Jitter mode.
    pub jitter: Jitter,
    /// Consecutive attempts after which the instance gives up into `Closed` (R9).
    pub attempts_max: u32,
    /// A session must stay open this long before the attempt counter resets, so
    /// a peer that accepts and closes at once cannot cause a tight loop.
    pub stable_period: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self {
            // One second: fast enough for a blip, slow enough not to hammer a peer.
            base: Duration::from_secs(1),
            factor: 2,
            // Five minutes: a customer waits at most this long after an outage ends.
            cap: Duration::from_secs(300),
            jitter: Jitter::Full,
            // 1+2+4+…+300 s with the cap: about an hour and a half of trying before giving up.
            attempts_max: 25,
            // A minute open proves the peer accepted the session, not just the socket.
            stable_period: Duration::from_secs(60),
        }
    }
}

/// WebSocket heartbeat settings (R7).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Heartbeat {
    /// A ping every `interval`.
    pub interval: Duration,
    /// A pong must arrive within `deadline` of its ping, or the instance is a zombie.
    pub deadline: Duration,
}

impl Default for Heartbeat {
    fn default() -> Self {
        // 30 s pings keep NAT mappings alive; a 10 s deadline tolerates a slow
        // mobile path while detecting a dead socket within 40 s.
        Self { interval: Duration::from_secs(30), deadline: Duration::from_secs(10) }
    }
}

/// Time-outs of every wait the engine makes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Timeouts {
    /// From opening a transport to the first pairing code or `ready`.
    pub connect: Duration,
    /// Lifetime of one pairing code (re-armed on each code).
    pub pairing_code: Duration,
    /// Waiting for the peer to confirm a logout.
    pub logout: Duration,
    /// Waiting for the socket to finish closing.
    pub close: Duration,
    /// The whole host cleanup of a delete.
    pub cleanup: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            // 20 s covers TLS and a slow handshake on a loaded host.
            connect: Duration::from_secs(20),
            // WhatsApp rotates QR codes every ~20 s; 60 s is generous for one.
            pairing_code: Duration::from_secs(60),
            // A peer that has not confirmed in 5 s will not: move on (R5).
            logout: Duration::from_secs(5),
            close: Duration::from_secs(5),
            // Session-store, files and cache removal; 30 s bounds a slow database.
            cleanup: Duration::from_secs(30),
        }
    }
}

/// The policy for one fleet.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Policy {
    /// Preset name (or a host's own name), printed in summaries.
    pub name: String,
    /// The close table; the first matching row decides.
    pub close_rules: Vec<CloseRule>,
    /// What to do when no row matches.
    pub close_default: CloseAction,
    /// Backoff between automatic attempts.
    pub backoff: Backoff,
    /// Pairing codes accepted on one connection before giving up ("pairing refused").
    pub pairing_codes_max: u32,
    /// Heartbeats.
    pub heartbeat: Heartbeat,
    /// Time-outs.
    pub timeouts: Timeouts,
    /// After an engine restart, reconnect instances that were connecting or open (R11).
    pub reconnect_after_restart: bool,
    /// Seed for backoff jitter (with the instance name and attempt).
    pub jitter_seed: u64,
}

/// The presets, by name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Preset {
    /// Phase-aware WhatsApp (Baileys) statuses: the recommended one for WhatsApp gateways.
    Whatsapp,
    /// Exactly the seeds' list: 401, 402, 403, 406, 408 never reconnect.
    Evolution,
    /// Discord gateway close codes 4000–4014.
    Discord,
    /// Plain RFC 6455 close codes; the default.
    Rfc6455,
}

impl Preset {
    /// Every preset.
    pub const ALL: [Preset; 4] = [Self::Whatsapp, Self::Evolution, Self::Discord, Self::Rfc6455];

    /// The preset's name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Whatsapp => "whatsapp",
            Self::Evolution => "evolution",
            Self::Discord => "discord",
            Self::Rfc6455 => "rfc6455",
        }
    }

    /// Parses a preset name.
    pub fn parse(s: &str) -> Result<Self, PolicyError> {
        Self::ALL
            .into_iter()
            .find(|p| p.as_str().eq_ignore_ascii_case(s))
            .ok_or_else(|| PolicyError::UnknownPreset { name: s.to_owned() })
    }
}

impl fmt::Display for Preset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A policy that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PolicyError {
    /// No preset has this name.
    #[error("unknown policy preset {name:?}; known: whatsapp, evolution, discord, rfc6455")]
    UnknownPreset {
        /// The name given.
        name: String,
    },
    /// A field is out of range.
    #[error("policy {policy:?}: {field} {problem}")]
    OutOfRange {
        /// The policy's name.
        policy: String,
        /// The field.
        field: &'static str,
        /// What is wrong.
        problem: &'static str,
    },
}

use CloseAction::{Reconnect, ReconnectFresh, ReconnectNow, Stop};
use PhaseMatch::{AfterOpen, Any, BeforeOpen};
use StatusMatch::{Code, Missing, Range};

impl Policy {
    /// A preset.
    pub fn preset(preset: Preset) -> Self {
        let close_rules = match preset {
            Preset::Whatsapp => vec![
                CloseRule::new(Code(401), Any, Stop, "logged out"),
                CloseRule::new(Code(402), Any, Stop, "temporarily banned"),
                CloseRule::new(Code(403), Any, Stop, "forbidden"),
                CloseRule::new(Code(405), Any, Stop, "client outdated"),
                CloseRule::new(Code(406), Any, Stop, "banned"),
                CloseRule::new(Code(409), Any, Stop, "bad user agent"),
                CloseRule::new(Code(411), Any, Stop, "multi-device mismatch"),
                CloseRule::new(Code(440), Any, Stop, "replaced by another session"),
                CloseRule::new(Code(408), BeforeOpen, Stop, "pairing codes ran out"),
                CloseRule::new(Code(408), AfterOpen, Reconnect, "connection lost"),
                CloseRule::new(Code(428), Any, Reconnect, "connection closed"),
                CloseRule::new(Code(500), Any, Reconnect, "bad session"),
                CloseRule::new(Code(503), Any, Reconnect, "unavailable service"),
                CloseRule::new(Code(515), Any, ReconnectNow, "restart required"),
                CloseRule::new(Missing, Any, Reconnect, "connection lost"),
            ],
            Preset::Evolution => vec![
                CloseRule::new(Code(401), Any, Stop, "logged out"),
                CloseRule::new(Code(402), Any, Stop, "temporarily banned"),
                CloseRule::new(Code(403), Any, Stop, "forbidden"),
                CloseRule::new(Code(406), Any, Stop, "banned"),
                CloseRule::new(Code(408), Any, Stop, "timed out (PR 2501)"),
                CloseRule::new(Missing, Any, Reconnect, "connection lost"),
            ],
            Preset::Discord => vec![
                CloseRule::new(Code(4004), Any, Stop, "authentication failed"),
                CloseRule::new(
                    Range { first: 4010, last: 4014 },
                    Any,
                    Stop,
                    "invalid shard, sharding, version or intents",
                ),
                CloseRule::new(Code(4007), Any, ReconnectFresh, "invalid sequence: identify anew"),
                CloseRule::new(Code(4009), Any, ReconnectFresh, "session timed out: identify anew"),
                CloseRule::new(Range { first: 4000, last: 4009 }, Any, Reconnect, "resumable gateway error"),
                CloseRule::new(Missing, Any, Reconnect, "connection lost: resume"),
            ],
            Preset::Rfc6455 => vec![
                CloseRule::new(Code(1000), Any, Stop, "normal closure"),
                CloseRule::new(Code(1001), Any, Reconnect, "going away"),
                CloseRule::new(Range { first: 1002, last: 1010 }, Any, Stop, "protocol or data error"),
                CloseRule::new(Range { first: 1011, last: 1014 }, Any, Reconnect, "server error, restart or overload"),
                CloseRule::new(Missing, Any, Reconnect, "connection lost"),
            ],
        };
        Self {
            name: preset.as_str().to_owned(),
            close_rules,
            close_default: Reconnect,
            backoff: Backoff::default(),
            // Evolution API's default QR limit.
            pairing_codes_max: 30,
            heartbeat: match preset {
                // Discord's HELLO sets the interval (41.25 s in practice; the
                // protocol's `HeartbeatDue` replaces this one); an ACK is due
                // well before the next beat.
                Preset::Discord => {
                    Heartbeat { interval: Duration::from_millis(41_250), deadline: Duration::from_secs(20) }
                }
                _ => Heartbeat::default(),
            },
            timeouts: Timeouts::default(),
            reconnect_after_restart: true,
            jitter_seed: 0,
        }
    }

    /// Checks every bound; a policy is validated once, when an engine or tool takes it.
    pub fn validate(&self) -> Result<(), PolicyError> {
        let bad = |field, problem| Err(PolicyError::OutOfRange { policy: self.name.clone(), field, problem });
        let b = &self.backoff;
        if b.base.is_zero() {
            return bad("backoff.base", "must be greater than zero (a zero floor allows tight reconnect loops)");
        }
        if b.factor == 0 {
            return bad("backoff.factor", "must be at least 1");
        }
        if b.cap < b.base {
            return bad("backoff.cap", "must be at least backoff.base");
        }
        if b.attempts_max == 0 {
            return bad("backoff.attempts_max", "must be at least 1");
        }
        if self.heartbeat.interval.is_zero() || self.heartbeat.deadline.is_zero() {
            return bad("heartbeat", "interval and deadline must be greater than zero");
        }
        let t = &self.timeouts;
        for (field, d) in [
            ("timeouts.connect", t.connect),
            ("timeouts.pairing_code", t.pairing_code),
            ("timeouts.logout", t.logout),
            ("timeouts.close", t.close),
            ("timeouts.cleanup", t.cleanup),
        ] {
            if d.is_zero() {
                return bad(field, "must be greater than zero (every wait is bounded, never skipped)");
            }
        }
        for rule in &self.close_rules {
            if let Range { first, last } = rule.status
                && first > last
            {
                return bad("close_rules", "has a range whose first status is after its last");
            }
        }
        Ok(())
    }

    /// The first close rule matching `status` in `phase`, if any.
    pub fn close_rule(&self, status: Option<StatusCode>, phase: ClosePhase) -> Option<&CloseRule> {
        self.close_rules.iter().find(|r| r.status.matches(status) && r.phase.matches(phase))
    }

    /// What to do when a connection in `phase` ends with `status` (R4).
    pub fn close_action(&self, status: Option<StatusCode>, phase: ClosePhase) -> CloseAction {
        self.close_rule(status, phase).map_or(self.close_default, |r| r.action)
    }

    /// The backoff delay before attempt number `attempt` (1-based) of `name`.
    /// Deterministic: the same seed, name and attempt give the same delay.
    pub fn backoff_delay(&self, name: &InstanceName, attempt: u32) -> Duration {
        self.backoff_delay_under(super::RulesVersion::CURRENT, name, attempt)
    }

    /// [`Policy::backoff_delay`] as the rules of `rules` drew it: before
    /// version 3, full jitter reached only the current exponential step
    /// (`base · factor^(attempt−1)`), so a fleet's first retries all fell at `base`.
    pub fn backoff_delay_under(&self, rules: super::RulesVersion, name: &InstanceName, attempt: u32) -> Duration {
        let b = &self.backoff;
        let base_ms = millis(b.base);
        let cap_ms = millis(b.cap).max(base_ms);
        // base · factor^exponent, capped (and safe from overflow at any attempt).
        let grown = |exponent: u32| {
            let g =
                u128::from(b.factor).checked_pow(exponent).map_or(u128::MAX, |f| f.saturating_mul(u128::from(base_ms)));
            u64::try_from(g.min(u128::from(cap_ms))).unwrap_or(cap_ms)
        };
        let ms = match b.jitter {
            Jitter::None => grown(attempt.saturating_sub(1)),
            Jitter::Full => {
                let window = if rules < super::RulesVersion::V3 { attempt.saturating_sub(1) } else { attempt };
                let span = grown(window) - base_ms;
                let draw = mix(self.jitter_seed ^ fnv1a(name.as_str().as_bytes()) ^ u64::from(attempt).rotate_left(32));
                base_ms + if span == 0 { 0 } else { draw % (span + 1) }
            }
        };
        Duration::from_millis(ms)
    }
}

impl Policy {
    /// Every field in which `other` differs from `self`, as
    /// `field: mine vs theirs` (`heartbeat.interval: 1s vs 30s`), in field order.
    pub fn differences(&self, other: &Policy) -> Vec<String> {
        let (mut mine, mut theirs) = (BTreeMap::new(), BTreeMap::new());
        flatten("", &serde_json::to_value(self).unwrap_or_default(), &mut mine);
        flatten("", &serde_json::to_value(other).unwrap_or_default(), &mut theirs);
        let keys: std::collections::BTreeSet<&String> = mine.keys().chain(theirs.keys()).collect();
        let absent = || "absent".to_owned();
        keys.into_iter()
            .filter(|k| mine.get(*k) != theirs.get(*k))
            .map(|k| {
                let a = mine.get(k).cloned().unwrap_or_else(absent);
                let b = theirs.get(k).cloned().unwrap_or_else(absent);
                format!("{k}: {a} vs {b}")
            })
            .collect()
    }
}

/// A `Duration` as serde writes it: exactly `{"secs": u64, "nanos": u32}`.
fn duration_of(v: &serde_json::Value) -> Option<Duration> {
    let m = v.as_object()?;
    if m.len() != 2 {
        return None;
    }
    let secs = m.get("secs")?.as_u64()?;
    let nanos = u32::try_from(m.get("nanos")?.as_u64()?).ok()?;
    Some(Duration::new(secs, nanos))
}

/// Flattens a JSON value into `path → printed leaf`; durations print as `250ms`.
fn flatten(path: &str, v: &serde_json::Value, out: &mut BTreeMap<String, String>) {
    use serde_json::Value;
    let join = |k: &str| if path.is_empty() { k.to_owned() } else { format!("{path}.{k}") };
    if let Some(d) = duration_of(v) {
        out.insert(path.to_owned(), format!("{d:?}"));
        return;
    }
    match v {
        Value::Object(m) => m.iter().for_each(|(k, v)| flatten(&join(k), v, out)),
        Value::Array(items) => items.iter().enumerate().for_each(|(i, v)| flatten(&format!("{path}[{i}]"), v, out)),
        leaf => {
            out.insert(path.to_owned(), leaf.to_string());
        }
    }
}

impl Default for Policy {
    /// The plain RFC 6455 preset.
    fn default() -> Self {
        Self::preset(Preset::Rfc6455)
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// FNV-1a: a stable hash of the instance name (std's hasher is not stable across releases).
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3))
}

/// SplitMix64's finaliser: spreads the seed bits uniformly.
fn mix(z: u64) -> u64 {
    SplitMix64::new(z).next_u64()
}

/// SplitMix64 (Steele, Lea, Flood): a tiny, well-known seeded generator.
/// Jitter draws from it, and so do the chaos schedules: same seed, same numbers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    /// A generator seeded with `seed`.
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    /// The next number.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A number below `n` (0 when `n` is 0).
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 { 0 } else { self.next_u64() % n }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(s: &str) -> InstanceName {
        InstanceName::new(s).expect("valid test name")
    }

    #[test]
    fn presets_are_valid_and_round_trip_through_json() {
        for p in Preset::ALL {
            let policy = Policy::preset(p);
            assert_eq!(policy.validate(), Ok(()), "{p}");
            let json = serde_json::to_string(&policy).expect("serialize");
            let back: Policy = serde_json::from_str(&json).expect("deserialize");
            assert_eq!(back, policy);
            assert_eq!(Preset::parse(p.as_str()), Ok(p));
        }
        assert!(Preset::parse("bogus").is_err());
    }

    /// Every status of Baileys 7's `DisconnectReason`, and what the
    /// `whatsapp` preset does with it (`lib/Types/index.ts` there).
    #[test]
    fn whatsapp_preset_covers_baileys_7_disconnect_reasons() {
        let wa = Policy::preset(Preset::Whatsapp);
        let (before, after) = (ClosePhase::BeforeOpen, ClosePhase::AfterOpen);
        for (reason, code, phase, action) in [
            ("connectionClosed", 428, after, Reconnect),
            ("connectionLost", 408, after, Reconnect),
            ("timedOut (QR refs ended)", 408, before, Stop),
            ("loggedOut", 401, after, Stop),
            ("badSession", 500, after, Reconnect),
            ("restartRequired", 515, before, ReconnectNow),
            ("multideviceMismatch", 411, before, Stop),
            ("forbidden", 403, after, Stop),
            ("connectionReplaced", 440, after, Stop),
            ("unavailableService", 503, after, Reconnect),
        ] {
            assert_eq!(wa.close_action(Some(StatusCode(code)), phase), action, "{reason} ({code})");
        }
    }

    #[test]
    fn whatsapp_408_depends_on_phase_evolution_408_does_not() {
        let wa = Policy::preset(Preset::Whatsapp);
        assert_eq!(wa.close_action(Some(StatusCode(408)), ClosePhase::BeforeOpen), Stop);
        assert_eq!(wa.close_action(Some(StatusCode(408)), ClosePhase::AfterOpen), Reconnect);
        assert_eq!(wa.close_action(Some(StatusCode(515)), ClosePhase::AfterOpen), ReconnectNow);
        let evo = Policy::preset(Preset::Evolution);
        for phase in [ClosePhase::BeforeOpen, ClosePhase::AfterOpen] {
            for code in [401, 402, 403, 406, 408] {
                assert_eq!(evo.close_action(Some(StatusCode(code)), phase), Stop, "{code}");
            }
            assert_eq!(evo.close_action(Some(StatusCode(440)), phase), Reconnect);
        }
        let discord = Policy::preset(Preset::Discord);
        assert_eq!(discord.close_action(Some(StatusCode(4004)), ClosePhase::AfterOpen), Stop);
        assert_eq!(discord.close_action(Some(StatusCode(4012)), ClosePhase::AfterOpen), Stop);
        for (code, action) in [(4000, Reconnect), (4003, Reconnect), (4005, Reconnect), (4008, Reconnect)] {
            assert_eq!(discord.close_action(Some(StatusCode(code)), ClosePhase::AfterOpen), action, "{code}");
        }
        for code in [4007, 4009] {
            assert_eq!(discord.close_action(Some(StatusCode(code)), ClosePhase::AfterOpen), ReconnectFresh, "{code}");
        }
        for code in [4004, 4010, 4011, 4012, 4013, 4014] {
            assert_eq!(discord.close_action(Some(StatusCode(code)), ClosePhase::BeforeOpen), Stop, "{code}");
        }
        assert_eq!(discord.close_action(None, ClosePhase::AfterOpen), Reconnect);
    }

    #[test]
    fn backoff_is_bounded_deterministic_and_jittered() {
        let p = Policy::default();
        let n = name("acme");
        for attempt in 1..200 {
            let d = p.backoff_delay(&n, attempt);
            assert!(d >= p.backoff.base && d <= p.backoff.cap, "attempt {attempt}: {d:?}");
            assert_eq!(d, p.backoff_delay(&n, attempt));
        }
        let delays: std::collections::BTreeSet<_> =
            (0..50).map(|i| p.backoff_delay(&name(&format!("n{i}")), 8)).collect();
        assert!(delays.len() > 25, "jitter spreads a fleet: {} distinct delays of 50", delays.len());
        let mut exact = p.clone();
        exact.backoff.jitter = Jitter::None;
        assert_eq!(exact.backoff_delay(&n, 1), Duration::from_secs(1));
        assert_eq!(exact.backoff_delay(&n, 3), Duration::from_secs(4));
        assert_eq!(exact.backoff_delay(&n, 60), Duration::from_secs(300));
    }

    #[test]
    fn differences_name_every_field_that_differs() {
        let wa = Policy::preset(Preset::Whatsapp);
        assert!(wa.differences(&wa).is_empty());
        let mut tuned = wa.clone();
        tuned.heartbeat.interval = Duration::from_secs(1);
        tuned.name = "whatsapp (tuned)".into();
        assert_eq!(
            wa.differences(&tuned),
            vec!["heartbeat.interval: 30s vs 1s".to_owned(), "name: \"whatsapp\" vs \"whatsapp (tuned)\"".to_owned()]
        );
        let evo = Policy::preset(Preset::Evolution);
        assert!(wa.differences(&evo).iter().any(|d| d.starts_with("close_rules[")), "{:?}", wa.differences(&evo));
    }

    #[test]
    fn validation_names_the_field() {
        let mut p = Policy::default();
        p.backoff.base = Duration::ZERO;
        let err = p.validate().expect_err("zero base is invalid");
        assert!(err.to_string().contains("backoff.base"), "{err}");
        let mut p = Policy::default();
        p.timeouts.logout = Duration::ZERO;
        assert!(p.validate().expect_err("zero logout timeout").to_string().contains("timeouts.logout"));
    }

    #[test]
    fn every_bound_is_checked_and_named() {
        type Break = fn(&mut Policy);
        let cases: Vec<(&str, Break)> = vec![
            ("backoff.base", |p| p.backoff.base = Duration::ZERO),
            ("backoff.factor", |p| p.backoff.factor = 0),
            ("backoff.cap", |p| p.backoff.cap = p.backoff.base - Duration::from_millis(1)),
            ("backoff.attempts_max", |p| p.backoff.attempts_max = 0),
            ("heartbeat", |p| p.heartbeat.interval = Duration::ZERO),
            ("heartbeat", |p| p.heartbeat.deadline = Duration::ZERO),
            ("timeouts.connect", |p| p.timeouts.connect = Duration::ZERO),
            ("timeouts.pairing_code", |p| p.timeouts.pairing_code = Duration::ZERO),
            ("timeouts.logout", |p| p.timeouts.logout = Duration::ZERO),
            ("timeouts.close", |p| p.timeouts.close = Duration::ZERO),
            ("timeouts.cleanup", |p| p.timeouts.cleanup = Duration::ZERO),
            ("close_rules", |p| {
                p.close_rules.push(CloseRule::new(Range { first: 10, last: 9 }, Any, Stop, "backwards"))
            }),
        ];
        for (field, break_it) in cases {
            let mut p = Policy::default();
            break_it(&mut p);
            let err = p.validate().expect_err(field);
            assert!(err.to_string().contains(field) && err.to_string().contains("rfc6455"), "{field}: {err}");
        }
        // The edges are allowed: a factor of 1, a cap equal to the base, one attempt, a one-status range.
        let mut p = Policy::default();
        p.backoff.factor = 1;
        p.backoff.cap = p.backoff.base;
        p.backoff.attempts_max = 1;
        p.close_rules.push(CloseRule::new(Range { first: 7, last: 7 }, Any, Stop, "one"));
        assert_eq!(p.validate(), Ok(()));
    }

    #[test]
    fn the_first_matching_rule_decides_by_status_and_phase() {
        let p = Policy {
            close_rules: vec![
                CloseRule::new(Code(4000), BeforeOpen, Stop, "a"),
                CloseRule::new(Range { first: 4000, last: 4002 }, AfterOpen, ReconnectNow, "b"),
                CloseRule::new(Range { first: 4000, last: 4002 }, Any, Stop, "c"),
                CloseRule::new(Missing, AfterOpen, Stop, "d"),
            ],
            close_default: CloseAction::Remove,
            ..Policy::default()
        };
        let at = |code: Option<u16>, phase| p.close_rule(code.map(StatusCode), phase).map(|r| r.label.as_str());
        assert_eq!(at(Some(4000), ClosePhase::BeforeOpen), Some("a"));
        assert_eq!(at(Some(4000), ClosePhase::AfterOpen), Some("b"));
        assert_eq!(at(Some(4002), ClosePhase::BeforeOpen), Some("c"), "ranges include their last status");
        assert_eq!(at(Some(4003), ClosePhase::BeforeOpen), None);
        assert_eq!(at(Some(3999), ClosePhase::AfterOpen), None, "ranges start at their first");
        assert_eq!(at(None, ClosePhase::AfterOpen), Some("d"));
        assert_eq!(at(None, ClosePhase::BeforeOpen), None, "Missing matches no status only");
        assert_eq!(p.close_action(Some(StatusCode(4003)), ClosePhase::AfterOpen), CloseAction::Remove, "the default");
        assert_eq!(p.close_action(Some(StatusCode(4001)), ClosePhase::AfterOpen), ReconnectNow);
    }

    #[test]
    fn the_presets_say_what_their_documentation_says() {
        let action = |p: &Policy, code: u16, phase| p.close_action(Some(StatusCode(code)), phase);
        let (b, a) = (ClosePhase::BeforeOpen, ClosePhase::AfterOpen);
        let wa = Policy::preset(Preset::Whatsapp);
        for code in [401, 402, 403, 405, 406, 409, 440] {
            assert_eq!((action(&wa, code, b), action(&wa, code, a)), (Stop, Stop), "{code}");
        }
        for code in [428, 500, 503] {
            assert_eq!(action(&wa, code, a), Reconnect, "{code}");
        }
        assert_eq!(action(&wa, 515, b), ReconnectNow);
        assert_eq!(wa.close_action(None, a), Reconnect, "connection lost");
        let rfc = Policy::default();
        assert_eq!(rfc.name, "rfc6455");
        for (code, expected) in
            [(1000, Stop), (1001, Reconnect), (1002, Stop), (1010, Stop), (1011, Reconnect), (1014, Reconnect)]
        {
            assert_eq!(action(&rfc, code, a), expected, "{code}");
        }
        assert_eq!(action(&rfc, 1015, a), Reconnect, "the default");
        let discord = Policy::preset(Preset::Discord);
        for (code, expected) in [(4000, Reconnect), (4010, Stop), (4014, Stop), (4015, Reconnect)] {
            assert_eq!(action(&discord, code, a), expected, "{code}");
        }
        for p in Preset::ALL.map(Policy::preset) {
            assert_eq!((p.pairing_codes_max, p.backoff.attempts_max, p.reconnect_after_restart), (30, 25, true));
            assert!(p.close_rules.iter().all(|r| !r.label.is_empty()), "every status is explained");
            assert_eq!(p.close_default, Reconnect);
        }
        assert_eq!(Preset::parse("WhatsApp"), Ok(Preset::Whatsapp), "names are case-insensitive");
        assert_eq!(Preset::ALL.map(|p| p.to_string()), ["whatsapp", "evolution", "discord", "rfc6455"]);
        assert!(Preset::parse("bogus").expect_err("unknown").to_string().contains("whatsapp, evolution"));
    }

    #[test]
    fn backoff_grows_by_its_factor_up_to_its_cap_and_jitter_stays_above_the_base() {
        let mut p = Policy {
            backoff: Backoff {
                base: Duration::from_millis(100),
                factor: 3,
                cap: Duration::from_millis(2_000),
                jitter: Jitter::None,
                attempts_max: 10,
                stable_period: Duration::from_secs(1),
            },
            ..Policy::default()
        };
        let n = name("grow");
        let exact: Vec<u64> = (1..=5).map(|a| p.backoff_delay(&n, a).as_millis() as u64).collect();
        assert_eq!(exact, [100, 300, 900, 2_000, 2_000]);
        assert_eq!(p.backoff_delay(&n, u32::MAX), Duration::from_millis(2_000), "no overflow at any attempt");
        p.backoff.jitter = Jitter::Full;
        for attempt in 1..=6 {
            // The window reaches the next exponential step: even the first retry is spread.
            let ceiling = exact.get(attempt).copied().unwrap_or(2_000);
            let d = p.backoff_delay(&n, attempt as u32).as_millis() as u64;
            assert!((100..=ceiling).contains(&d), "attempt {attempt}: {d} ms outside 100..={ceiling}");
        }
        let first: std::collections::BTreeSet<_> =
            (0..200).map(|i| p.backoff_delay(&name(&format!("f{i}")), 1)).collect();
        assert!(first.len() > 100, "the first retries of a fleet are spread over base..base*factor: {}", first.len());
        let flat = Policy { backoff: Backoff { factor: 1, ..p.backoff.clone() }, ..p.clone() };
        assert_eq!(flat.backoff_delay(&n, 3), Duration::from_millis(100), "a zero span has no jitter");
        let other_seed = Policy { jitter_seed: 7, ..p.clone() };
        let spread = |p: &Policy| (1..=40).map(|i| p.backoff_delay(&name(&format!("i{i}")), 4)).collect::<Vec<_>>();
        assert_ne!(spread(&p), spread(&other_seed), "the seed moves the draws");
    }

    /// Full jitter draws from base..=ceiling, both ends included; the seed,
    /// the name and the attempt each move the draw on their own (a fleet
    /// with another seed, or a later retry of the same instance, is not
    /// spread the same way).
    #[test]
    fn full_jitter_reaches_both_ends_and_each_input_moves_the_draw() {
        let tiny = Policy {
            backoff: Backoff {
                base: Duration::from_millis(1),
                factor: 2,
                cap: Duration::from_secs(1),
                ..Backoff::default()
            },
            ..Policy::default()
        };
        let firsts: std::collections::BTreeSet<u128> =
            (0..200).map(|i| tiny.backoff_delay(&name(&format!("e{i}")), 1).as_millis()).collect();
        assert_eq!(firsts.into_iter().collect::<Vec<_>>(), [1, 2], "the window is base..=base*factor");
        let wide = Policy {
            backoff: Backoff {
                base: Duration::from_millis(100),
                factor: 3,
                cap: Duration::from_secs(3_600),
                ..Backoff::default()
            },
            ..Policy::default()
        };
        let names: Vec<InstanceName> = (0..200).map(|i| name(&format!("w{i}"))).collect();
        let same = |a: &Policy, x: u32, b: &Policy, y: u32| {
            names.iter().filter(|n| a.backoff_delay(n, x) == b.backoff_delay(n, y)).count()
        };
        // Independent draws over a window of thousands of milliseconds coincide for almost no name.
        let other_seed = Policy { jitter_seed: 7, ..wide.clone() };
        assert!(same(&wide, 4, &other_seed, 4) <= 2, "another seed, other draws");
        // Attempts past the cap share one window: only the attempt itself moves the draw.
        assert!(same(&wide, 30, &wide, 31) <= 2, "a later retry draws anew");
        assert!(same(&wide, 30, &wide, 30) == names.len(), "and the same attempt draws the same");
    }

    #[test]
    fn splitmix_is_the_published_generator() {
        let mut g = SplitMix64::new(0);
        assert_eq!(g.next_u64(), 0xe220_a839_7b1d_cdaf);
        assert_eq!(g.next_u64(), 0x6e78_9e6a_a1b9_65f4);
        assert_eq!(g.below(0), 0);
        let mut g = SplitMix64::new(42);
        assert!((0..1_000).all(|_| g.below(7) < 7));
        assert_eq!(fnv1a(b""), 0xcbf2_9ce4_8422_2325, "FNV-1a's offset basis");
        assert_eq!(fnv1a(b"a"), 0xaf63_dc4c_8601_ec8c);
    }

    #[test]
    fn differences_list_rules_durations_and_absent_fields() {
        let mut a = Policy::preset(Preset::Whatsapp);
        let mut b = a.clone();
        b.timeouts.close = Duration::from_millis(1_500);
        b.close_rules.pop();
        let d = a.differences(&b);
        assert!(d.contains(&"timeouts.close: 5s vs 1.5s".to_owned()), "{d:?}");
        let last = format!("close_rules[{}].", b.close_rules.len());
        assert!(d.iter().any(|x| x.starts_with(&last) && x.ends_with("vs absent")), "{d:?}");
        a.jitter_seed = 3;
        assert!(a.differences(&b).contains(&"jitter_seed: 3 vs 0".to_owned()));
    }
}
