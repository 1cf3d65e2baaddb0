//! The functions behind the fuzz targets in `fuzz/` and the corpus replay in
//! `tests/it/fuzz_corpus.rs` (feature `testing`). Each takes arbitrary bytes,
//! drives one input boundary, and panics only when an invariant is broken —
//! never on bad input, which must meet a typed error.

use std::sync::Arc;
use std::time::Duration;

use crate::log::record::{decode_record, encode_record};
use crate::log::{Event, Log, LogConfig, MemoryStore, Store};
use crate::machine::{
    CloseInitiator, ClosedCause, ClosingStep, Effect, Generation, Identity, Ignored, Input, Instance, InstanceName,
    Intent, LogoutOutcome, Outcome, Phase, Policy, Preset, Reason, State, StatusCode, Timer, TimerKind, Timestamp,
    ZombieCause, step,
};
use crate::transport::{PeerMessage, Protocol, ReferenceProtocol};

/// Reads choices from fuzz bytes; runs out gracefully (zeros).
struct Bytes<'a>(&'a [u8]);

impl Bytes<'_> {
    fn u8(&mut self) -> u8 {
        match self.0.split_first() {
            Some((b, rest)) => {
                self.0 = rest;
                *b
            }
            None => 0,
        }
    }

    fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.u8(), self.u8()])
    }

    fn u32(&mut self) -> u32 {
        u32::from_le_bytes([self.u8(), self.u8(), self.u8(), self.u8()])
    }

    fn below(&mut self, n: u8) -> u8 {
        self.u8() % n.max(1)
    }

    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    fn take(&mut self, n: usize) -> &[u8] {
        let n = n.min(self.0.len());
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        head
    }
}

fn identity(b: &mut Bytes<'_>) -> Option<Identity> {
    match b.below(4) {
        0 => None,
        n => Identity::new(format!("peer-{n}")).ok(),
    }
}

fn state(b: &mut Bytes<'_>) -> State {
    let retries = u32::from(b.u8());
    match b.below(9) {
        0 => State::Connecting {
            phase: Phase::Backoff { until: Timestamp(u64::from(b.u32())) },
            retries,
            resume: identity(b),
        },
        1 => State::Connecting { phase: Phase::Handshaking, retries, resume: identity(b) },
        2 => State::Connecting { phase: Phase::Pairing { codes: u32::from(b.u8()) }, retries, resume: identity(b) },
        3 => State::Open {
            identity: identity(b).unwrap_or_else(|| Identity::new("p").unwrap_or_else(|_| unreachable!())),
            since: Timestamp(u64::from(b.u32())),
            retries,
        },
        4 => {
            let intent = if b.u8().is_multiple_of(2) { Intent::Logout } else { Intent::Delete };
            let step = match b.below(3) {
                0 => ClosingStep::LoggingOut,
                1 => ClosingStep::ClosingSocket { logout: LogoutOutcome::TimedOut },
                _ if intent == Intent::Delete => ClosingStep::CleaningUp,
                _ => ClosingStep::LoggingOut,
            };
            State::Closing { intent, step }
        }
        5 | 6 => State::Closed { cause: ClosedCause::Created, status: None, resume: identity(b) },
        7 => State::Zombie {
            since: Timestamp(0),
            cause: ZombieCause::HeartbeatMissed,
            identity: Identity::new("z").unwrap_or_else(|_| unreachable!()),
            retries,
        },
        _ => State::Removed { cleanup: crate::machine::CleanupOutcome::TimedOut },
    }
}

fn input(b: &mut Bytes<'_>, current: Generation) -> Input {
    let generation = match b.below(6) {
        0 => Generation(u64::from(b.u8())),
        _ => current,
    };
    let status = match b.below(3) {
        0 => None,
        _ => Some(StatusCode(b.u16())),
    };
    match b.below(16) {
        0 => Input::Connect,
        1 => Input::Logout,
        2 => Input::Delete,
        3 => Input::Restart,
        4 => Input::TransportOpened { generation, identity: identity(b) },
        5 => Input::PairingCode { generation },
        6 => match b.below(4) {
            0 => Input::TransportClosedV1 { generation, status, reason: Reason::default() },
            n => {
                let initiator =
                    [CloseInitiator::Peer, CloseInitiator::Local, CloseInitiator::Transport][usize::from(n - 1)];
                Input::TransportClosed { generation, initiator, status, reason: Reason::default() }
            }
        },
        7 => Input::WriteFailed { generation, error: "e".into() },
        8 => match b.below(6) {
            0 => Input::HeartbeatMissed { generation },
            1 => Input::Pong { generation },
            2 => Input::ReconnectRequested { generation },
            3 => Input::SessionInvalid { generation, retry_after: Duration::from_millis(u64::from(b.u16())) },
            4 => Input::HeartbeatDue { generation, after: Duration::from_millis(u64::from(b.u16())) },
            _ => Input::HandshakeStep { generation },
        },
        9 => Input::LogoutConfirmed { generation },
        10 => Input::LogoutFailed { generation, error: "e".into() },
        11 => Input::CloseFinished { generation },
        12 => Input::CleanupFinished { steps: Vec::new() },
        13 => Input::Recovered,
        14 => Input::Panicked { message: "p".into() },
        _ => Input::TimerFired {
            timer: Timer { kind: TimerKind::ALL[usize::from(b.below(TimerKind::ALL.len() as u8))], generation },
        },
    }
}

/// The structural invariants of one step of the table (also used by the
/// exhaustive test): R1, R6, R9's generation discipline, R12, timers of the
/// current generation, R7's "never wait on a zombie's socket".
pub fn check_step(from: &Instance, input: &Input, outcome: &Outcome) {
    if let Some(g) = input.generation()
        && g != from.generation
    {
        assert_eq!(*outcome, Outcome::Ignored(Ignored::Stale { input: g, current: from.generation }), "R12");
    }
    if let Outcome::Effects(effects) = outcome {
        // Upkeep is the heartbeat's, on an open connection, or a handshake's
        // connect deadline restarted (R15); of this generation.
        let handshaking = matches!(from.state, State::Connecting { phase: Phase::Handshaking, .. });
        assert!(
            matches!(from.state, State::Open { .. }) || handshaking,
            "upkeep outside Open or a handshake: {input:?} → {effects:?}"
        );
        for e in effects {
            let ours = if handshaking {
                matches!(e, Effect::ArmTimer { timer, .. } if timer.kind == TimerKind::Connect && timer.generation == from.generation)
            } else {
                matches!(e, Effect::SendPing { generation } if *generation == from.generation)
                    || matches!(e, Effect::ArmTimer { timer, .. } | Effect::CancelTimer { timer } if timer.generation == from.generation)
            };
            assert!(ours, "upkeep of another kind or generation in {}: {e:?}", from.state);
        }
    }
    let Outcome::Transition(t) = outcome else { return };
    assert!(!matches!(from.state, State::Removed { .. }), "R1: left Removed on {input:?}");
    let opened: Vec<_> = t.effects.iter().filter(|e| matches!(e, Effect::OpenTransport { .. })).collect();
    if opened.is_empty() {
        assert_eq!(t.generation, from.generation, "generation moved without a new attempt");
    } else {
        assert_eq!(opened.len(), 1, "R9: one attempt at a time");
        assert_eq!(t.generation, from.generation.next());
        assert!(matches!(t.to, State::Connecting { .. }));
    }
    if let State::Open { identity, .. } = &t.to
        && !matches!(from.state, State::Open { .. })
    {
        assert!(
            matches!(input, Input::TransportOpened { identity: Some(id), .. } if id == identity),
            "R6: opened by {input:?}"
        );
    }
    for e in &t.effects {
        if let Effect::ArmTimer { timer, .. } = e {
            assert_eq!(timer.generation, t.generation, "timers belong to the current generation");
        }
        if let Effect::SendLogout { generation } = e {
            assert!(from.state.has_socket() && *generation == from.generation, "logout sent without a socket");
        }
    }
    if matches!(from.state, State::Zombie { .. }) {
        let waits = t.effects.iter().any(|e| matches!(e, Effect::SendLogout { .. } | Effect::CloseTransport { .. }));
        assert!(!waits, "R7: waited on a zombie");
    }
}

/// Fuzz target `core_step`: arbitrary input sequences from arbitrary states
/// under an arbitrary preset, the rules checked after every step.
pub fn core_sequence(data: &[u8]) {
    let mut b = Bytes(data);
    let mut policy = Policy::preset(Preset::ALL[usize::from(b.below(4))]);
    policy.backoff.attempts_max = u32::from(b.below(30)) + 1;
    policy.pairing_codes_max = u32::from(b.below(5));
    let name = InstanceName::new("fuzz").unwrap_or_else(|_| unreachable!("a literal valid name"));
    let mut instance = Instance { generation: Generation(u64::from(b.u8())), state: state(&mut b) };
    let mut now = 0u64;
    while !b.is_empty() {
        now += u64::from(b.u16());
        let i = input(&mut b, instance.generation);
        let outcome = step(&name, &instance, &i, &policy, Timestamp(now));
        check_step(&instance, &i, &outcome);
        assert_eq!(outcome, step(&name, &instance, &i, &policy, Timestamp(now)), "R8: step is deterministic");
        if let Outcome::Transition(t) = &outcome {
            instance.apply(t);
        }
    }
}

/// Fuzz target `record_decode`: arbitrary bytes as a stored record. Decoding
/// is a typed error or a record that re-encodes and decodes to itself.
pub fn record_decode(data: &[u8]) {
    if let Ok(record) = decode_record(data) {
        let again = decode_record(&encode_record(&record));
        assert_eq!(again.as_ref(), Ok(&record), "a decoded record must round-trip");
    }
}

/// Fuzz target `protocol_frame`: arbitrary bytes as a text frame from a peer
/// (of the reference protocol, and of the Discord gateway after its HELLO),
/// and as a close code.
pub fn protocol_frame(data: &[u8]) {
    let p = ReferenceProtocol;
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(PeerMessage::Ready { identity: Some(id) }) = p.parse(text) {
            assert!(Identity::new(id.as_str()).is_ok(), "R6: a parsed identity is valid");
        }
        discord_frame(text);
    }
    if data.len() >= 2 {
        let code = u16::from_le_bytes([data[0], data[1]]);
        let status = p.status_of(code);
        if (1000..=4999).contains(&code) {
            assert_eq!(p.close_code_of(status), code, "close codes map to statuses and back");
        }
    }
}

/// A small valid log: a few instances through typical transitions.
fn seeded_store() -> Arc<MemoryStore> {
    let store = Arc::new(MemoryStore::new());
    let Ok(log) = Log::with_store(
        store.clone(),
        LogConfig { durability: crate::log::Durability::Buffered, ..LogConfig::default() },
    ) else {
        unreachable!("an empty memory store opens")
    };
    let policy = Policy::preset(Preset::Whatsapp);
    for n in ["a", "b"] {
        let Ok(name) = InstanceName::new(n) else { unreachable!() };
        let mut instance = Instance::new();
        let _ = log.append(&name, 1, Timestamp(0), Event::created("ws://x/"), &instance);
        let g = Generation(1);
        let inputs = [
            Input::Connect,
            Input::TransportOpened { generation: g, identity: Identity::new("p").ok() },
            Input::HeartbeatMissed { generation: g },
            Input::Delete,
            Input::CleanupFinished { steps: Vec::new() },
        ];
        for (i, input) in inputs.into_iter().enumerate() {
            if let Outcome::Transition(t) = step(&name, &instance, &input, &policy, Timestamp(i as u64)) {
                let mut to = instance.clone();
                to.apply(&t);
                let event = Event::Transition { from: instance.clone(), input, effects: t.effects.clone() };
                let _ = log.append(&name, log.next_seq(&name), Timestamp(i as u64), event, &to);
                instance = to;
            }
        }
    }
    store
}

/// Fuzz target `log_open_verify`: arbitrary writes over a small valid log
/// (overwrites, truncations, bit flips, new keys). Opening is a typed error
/// or a log whose verification and recovery report rather than panic; a log
/// that verifies clean recovers, and both recovery modes agree.
pub fn log_contents(data: &[u8]) {
    let store = seeded_store();
    let keys: Vec<Vec<u8>> = store.scan(&[]).filter_map(Result::ok).map(|(k, _)| k).collect();
    let mut b = Bytes(data);
    while !b.is_empty() {
        let key = match b.below(4) {
            0 => {
                let len = usize::from(b.below(24));
                b.take(len).to_vec()
            }
            _ => keys[usize::from(b.u8()) % keys.len().max(1)].clone(),
        };
        let current = store.get(&key).ok().flatten().unwrap_or_default();
        let value = match b.below(4) {
            0 => current[..current.len().min(usize::from(b.u8()))].to_vec(),
            1 => {
                let mut v = current;
                if !v.is_empty() {
                    let at = usize::from(b.u16()) % v.len();
                    v[at] ^= b.u8() | 1;
                }
                v
            }
            2 => {
                let len = usize::from(b.u8());
                b.take(len).to_vec()
            }
            _ => Vec::new(),
        };
        let _ = store.apply(vec![(key, Some(value))]);
    }
    // Read as a copy is read: damage is reported, never refused.
    let Ok(log) = Log::inspect_store(store.clone()) else {
        return; // a typed error: fine
    };
    let policy = Policy::preset(Preset::Whatsapp);
    let report = log.verify(&policy);
    let options = |mode, quarantine| crate::log::RecoveryOptions { mode, quarantine };
    let _ = log.recover(options(crate::log::RecoveryMode::Replay, true));
    if report.is_clean() {
        let fast = log.recover(options(crate::log::RecoveryMode::Fast, false));
        let replay = log.recover(options(crate::log::RecoveryMode::Replay, false));
        match (fast, replay) {
            (Ok(f), Ok(r)) => assert_eq!(f.instances, r.instances, "a clean log recovers the same either way"),
            (f, r) => panic!("a clean log must recover: {:?} / {:?}", f.err(), r.err()),
        }
    }
    drop(log);
    // A writer opens a clean log; one that lost records or its head it refuses, typed.
    let writable =
        Log::with_store(store, LogConfig { durability: crate::log::Durability::Buffered, ..LogConfig::default() });
    let log = match writable {
        Ok(log) => log,
        Err(crate::log::LogError::Damaged { .. }) => {
            assert!(!report.is_clean(), "a writer refused a log that verifies clean");
            return;
        }
        Err(_) => return,
    };
    // The log still takes appends, or refuses them with a typed error; on a
    // clean log, a new instance's first record keeps it clean.
    let Ok(fresh) = InstanceName::new("fresh") else { unreachable!() };
    for name in [InstanceName::new("a").ok(), Some(fresh.clone())].into_iter().flatten() {
        let appended =
            log.append(&name, log.next_seq(&name), Timestamp(99), Event::created("ws://y/"), &Instance::new());
        if name == fresh && report.is_clean() {
            assert!(appended.is_ok(), "a clean log refused a new instance: {:?}", appended.err());
            let after = log.verify(&policy);
            assert!(after.is_clean(), "appending to a clean log made it unclean: {:?}", after.findings);
        }
    }
}

/// A Discord session after HELLO reads `text`: never a panic; a READY's
/// identity is valid resume data; a schedule is never past the interval.
fn discord_frame(text: &str) {
    use crate::transport::discord::{DiscordConfig, DiscordProtocol, ResumeData};
    let Ok(discord) = DiscordProtocol::new(DiscordConfig::new("Bot.fuzz", 1)) else { return };
    let Ok(name) = crate::machine::InstanceName::new("shard-0") else { return };
    let mut session = discord.open(&name, None);
    let (now, mut out) = (tokio::time::Instant::now(), Vec::new());
    if session.read_text(r#"{"op":10,"d":{"heartbeat_interval":1000}}"#, now, &mut out).is_err() {
        return;
    }
    if let Ok(reading) = session.read_text(text, now, &mut out)
        && let PeerMessage::Ready { identity: Some(id) } = reading.message
    {
        assert!(ResumeData::from_identity(&id).is_some(), "a READY's identity is resume data: {id:?}");
    }
    if let Some(next) = session.next_beat(now) {
        assert!(next <= std::time::Duration::from_millis(1000), "{next:?}");
    }
}
