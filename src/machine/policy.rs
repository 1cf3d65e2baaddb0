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
    /// "Full jitter": uniform between `base` and the exponential delay, so a
    /// fleet that lost its peer at once does not come back at once. The draw is
    /// a pure function of (seed, instance name, attempt): replay reproduces it.
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

use CloseAction::{Reconnect, ReconnectNow, Stop};
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
                CloseRule::new(Range { first: 4000, last: 4009 }, Any, Reconnect, "resumable gateway error"),
                CloseRule::new(Missing, Any, Reconnect, "connection lost"),
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
            heartbeat: Heartbeat::default(),
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
        let b = &self.backoff;
        let exponent = attempt.saturating_sub(1);
        let base_ms = millis(b.base);
        let cap_ms = millis(b.cap).max(base_ms);
        let grown =
            u128::from(b.factor).checked_pow(exponent).map_or(u128::MAX, |f| f.saturating_mul(u128::from(base_ms)));
        let ceiling = u64::try_from(grown.min(u128::from(cap_ms))).unwrap_or(cap_ms);
        let ms = match b.jitter {
            Jitter::None => ceiling,
            Jitter::Full => {
                let span = ceiling - base_ms;
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

/// Flattens a JSON value into `path → printed leaf`; durations print as `250ms`.
fn flatten(path: &str, v: &serde_json::Value, out: &mut BTreeMap<String, String>) {
    use serde_json::Value;
    let join = |k: &str| if path.is_empty() { k.to_owned() } else { format!("{path}.{k}") };
    match v {
        Value::Object(m) if m.len() == 2 && m.contains_key("secs") && m.contains_key("nanos") => {
            let secs = m["secs"].as_u64().unwrap_or(0);
            let nanos = m["nanos"].as_u64().unwrap_or(0);
            let d = Duration::new(secs, u32::try_from(nanos).unwrap_or(0));
            out.insert(path.to_owned(), format!("{d:?}"));
        }
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
        assert_eq!(discord.close_action(Some(StatusCode(4009)), ClosePhase::AfterOpen), Reconnect);
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
}
