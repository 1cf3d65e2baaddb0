//! The record format: one record per transition, in an explicit version
//! envelope, checksummed, chained, decoded with a check that every byte was
//! consumed.
//!
//! On disk a value is `crc32(payload) as u32 LE ‖ payload`, where `payload`
//! is postcard of the envelope `V1(RecordV1) | V2(RecordV2) | V3(RecordV3)`.
//! Postcard writes the variant index first, so the version is the payload's
//! first byte: an unknown one is reported as such, not as garbage. New
//! versions add variants; old ones never change. This build writes V3 and
//! reads all three. V3 is V2 with the digest of the instance's API token in
//! its `Created` (and `Snapshot`) event, so a create commits its token with
//! its record, in one commit, and the token is in the chain.
//!
//! **The chain (V2 and V3).** A record's *digest* is BLAKE3 over its payload. Every
//! chained record carries `prev`, the *link* of its instance's previous record
//! ([`Digest::ZERO`] for an instance's first record), and a record's link is
//! its digest — except for a snapshot, whose link is the digest of the record
//! it replaced (kept in `replaced`), so the chain runs through compaction. A
//! record swapped, dropped from the middle, or replaced by a valid record of
//! another history breaks the chain of its instance; the log's head file
//! (see `head.rs`) covers the tail, which no later record can vouch for.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::machine::{Effect, Input, Instance, InstanceName, Timestamp};

/// The newest version this build writes.
pub const VERSION_CURRENT: u8 = 3;

/// BLAKE3 of a record's payload (or of anything the log commits to).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Digest(pub [u8; 32]);

impl Digest {
    /// The `prev` of an instance's first record.
    pub const ZERO: Self = Self([0; 32]);

    /// The digest of `bytes`.
    pub fn of(bytes: &[u8]) -> Self {
        Self(*blake3::hash(bytes).as_bytes())
    }

    /// The first 8 bytes in hex: enough for a person to compare two digests.
    pub fn short(&self) -> String {
        self.0[..8].iter().map(|b| format!("{b:02x}")).collect()
    }

    /// All 32 bytes in hex.
    pub fn hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// Parses 64 hex digits.
    pub fn from_hex(s: &str) -> Option<Self> {
        if s.len() != 64 || !s.is_ascii() {
            return None;
        }
        let mut out = [0u8; 32];
        for (i, byte) in out.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok()?;
        }
        Some(Self(out))
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Digest({})", self.short())
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.short())
    }
}

/// Raw bytes for postcard, hex text for JSON (`lifecycle export`).
impl Serialize for Digest {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if s.is_human_readable() { s.serialize_str(&self.hex()) } else { self.0.serialize(s) }
    }
}

impl<'de> Deserialize<'de> for Digest {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        if d.is_human_readable() {
            let s = String::deserialize(d)?;
            Self::from_hex(&s).ok_or_else(|| serde::de::Error::custom("expected 64 hex digits"))
        } else {
            <[u8; 32]>::deserialize(d).map(Self)
        }
    }
}

/// One entry of an instance's history (the current version, whatever
/// version it was read from).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// The instance.
    pub instance: InstanceName,
    /// Per-instance sequence number, from 1, without gaps.
    pub seq: u64,
    /// Global sequence number across all instances, increasing.
    pub global: u64,
    /// Wall-clock (or virtual) time of the input.
    pub at: Timestamp,
    /// The link of this instance's previous record ([`Digest::ZERO`] for its
    /// first); `None` for a record written before records were chained (V1).
    pub prev: Option<Digest>,
    /// For a snapshot: the digest of the record it replaced, which is what
    /// later records chain to. `None` for every other record.
    pub replaced: Option<Digest>,
    /// What happened.
    pub event: Event,
    /// The instance afterwards.
    pub to: Instance,
}

impl Record {
    /// What the next record of this instance must carry as `prev`, given
    /// this record's own digest.
    pub fn link(&self, digest: Digest) -> Digest {
        self.replaced.unwrap_or(digest)
    }
}

/// What the host gave when it created an instance; kept so that a restarted
/// engine can reconnect it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceSpec {
    /// Where the instance connects (`ws://…` or `wss://…`).
    pub url: String,
}

/// What a record records.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Event {
    /// The host created the instance (first record of an incarnation; a name
    /// can be created again after `Removed`, as a new instance).
    Created {
        /// The host's spec.
        spec: InstanceSpec,
        /// BLAKE3 of the instance's own API token, when the host gave it one
        /// (`lifecycle serve` does): committed with the record, in its chain.
        #[serde(default)]
        token: Option<Digest>,
    },
    /// A transition decided by the rules.
    Transition {
        /// The instance before (equal to the previous record's `to`).
        from: Instance,
        /// The input that caused it, with its generation, status, reason, identity.
        input: Input,
        /// The effects decided.
        effects: Vec<Effect>,
    },
    /// Compaction replaced the history up to here with the state it led to;
    /// a snapshot starts a new chain.
    Snapshot {
        /// The spec of the instance, carried over from its `Created` record.
        spec: InstanceSpec,
        /// Its token's digest, carried over from its `Created` record.
        #[serde(default)]
        token: Option<Digest>,
    },
}

impl Event {
    /// A `Created` event for an instance connecting to `url`.
    pub fn created(url: impl Into<String>) -> Self {
        Self::Created { spec: InstanceSpec { url: url.into() }, token: None }
    }

    /// The spec and token digest of the incarnation a `Created` or
    /// `Snapshot` record starts (`None` for a transition).
    pub fn origin(&self) -> Option<(&InstanceSpec, Option<Digest>)> {
        match self {
            Self::Created { spec, token } | Self::Snapshot { spec, token } => Some((spec, *token)),
            Self::Transition { .. } => None,
        }
    }

    /// The record of a transition the driver decided.
    pub fn of(p: &crate::machine::Pending) -> Self {
        Self::Transition { from: p.from.clone(), input: p.input.clone(), effects: p.effects.clone() }
    }

    /// A short name: `created`, the input kind, or `snapshot`.
    pub fn label(&self) -> &'static str {
        match self {
            Self::Created { .. } => "created",
            Self::Transition { input, .. } => input.kind().as_str(),
            Self::Snapshot { .. } => "snapshot",
        }
    }
}

impl Record {
    /// The failures recorded on the way: a logout that threw, a cleanup step
    /// that failed or timed out, a panic, a transport error.
    pub fn failures(&self) -> Vec<String> {
        use crate::machine::StepOutcome;
        let Event::Transition { input, .. } = &self.event else { return Vec::new() };
        match input {
            Input::LogoutFailed { error, .. } => vec![format!("logout failed: {error}")],
            Input::WriteFailed { error, .. } => vec![format!("write failed: {error}")],
            Input::Panicked { message } => vec![format!("panicked: {message}")],
            Input::CleanupFinished { steps } => steps
                .iter()
                .filter_map(|s| match &s.outcome {
                    StepOutcome::Done => None,
                    StepOutcome::Failed { error } => Some(format!("cleanup step {}: failed: {error}", s.step)),
                    StepOutcome::TimedOut => Some(format!("cleanup step {}: timed out", s.step)),
                    StepOutcome::Panicked { message } => Some(format!("cleanup step {}: panicked: {message}", s.step)),
                })
                .collect(),
            _ => Vec::new(),
        }
    }
}

/// The latest-state cache entry of one instance.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Latest {
    /// Sequence number of the record that produced it.
    pub seq: u64,
    /// That record's global sequence number.
    pub global: u64,
    /// That record's time.
    pub at: Timestamp,
    /// The instance.
    pub instance: Instance,
}

/// Why bytes could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Corruption {
    /// Fewer bytes than a checksum and a version.
    #[error("truncated: {len} bytes")]
    Truncated {
        /// Bytes present.
        len: usize,
    },
    /// The checksum does not match the bytes.
    #[error("checksum mismatch: stored {stored:#010x}, computed {computed:#010x}")]
    Checksum {
        /// Stored checksum.
        stored: u32,
        /// Checksum of the bytes present.
        computed: u32,
    },
    /// A version this build does not know (written by a newer release).
    #[error("unknown record version {version} (this build reads up to {VERSION_CURRENT}); upgrade instance-lifecycle")]
    UnknownVersion {
        /// The version found.
        version: u16,
    },
    /// The checksum matched but the value is not a valid record.
    #[error("undecodable: {message}")]
    Decode {
        /// The decoder's message.
        message: String,
    },
    /// A valid value followed by extra bytes.
    #[error("{count} trailing bytes after the value")]
    TrailingBytes {
        /// How many.
        count: usize,
    },
    /// The record's own name or sequence number differs from its key.
    #[error("record says {found}, its key says {expected}")]
    KeyMismatch {
        /// What the key says.
        expected: String,
        /// What the record says.
        found: String,
    },
}

/// The event as V1 and V2 records carry it (no token digest). Frozen.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
enum EventV2 {
    Created { spec: InstanceSpec },
    Transition { from: Instance, input: Input, effects: Vec<Effect> },
    Snapshot { spec: InstanceSpec },
}

impl From<EventV2> for Event {
    fn from(e: EventV2) -> Self {
        match e {
            EventV2::Created { spec } => Self::Created { spec, token: None },
            EventV2::Transition { from, input, effects } => Self::Transition { from, input, effects },
            EventV2::Snapshot { spec } => Self::Snapshot { spec, token: None },
        }
    }
}

impl From<&Event> for EventV2 {
    /// For writing an unchained (V1) record again: a V1 record never had a token.
    fn from(e: &Event) -> Self {
        match e.clone() {
            Event::Created { spec, .. } => Self::Created { spec },
            Event::Transition { from, input, effects } => Self::Transition { from, input, effects },
            Event::Snapshot { spec, .. } => Self::Snapshot { spec },
        }
    }
}

/// Version 1 (no chain), as written before records were chained. Frozen.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct RecordV1 {
    instance: InstanceName,
    seq: u64,
    global: u64,
    at: Timestamp,
    event: EventV2,
    to: Instance,
}

/// A chained record as stored; versions differ in their event only.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct Chained<E> {
    instance: InstanceName,
    seq: u64,
    global: u64,
    at: Timestamp,
    prev: Digest,
    replaced: Option<Digest>,
    event: E,
    to: Instance,
}

/// Version 2 (chained). Frozen.
type RecordV2 = Chained<EventV2>;

/// Version 3 (chained; the token's digest in `Created` and `Snapshot`).
type RecordV3 = Chained<Event>;

/// The envelope as stored. Variant order is the version: never reorder.
#[derive(Deserialize)]
enum Wire {
    V1(RecordV1),
    V2(RecordV2),
    V3(RecordV3),
}

/// The same envelope, borrowing, for writing without copying the record
/// (V1 only for a record read as V1; V2 is never written again).
#[derive(Serialize)]
enum WireRef<'a> {
    V1(V1Ref<'a>),
    #[allow(dead_code)] // the variant holds V3's place in the order
    V2(()),
    V3(V3Ref<'a>),
}

#[derive(Serialize)]
struct V1Ref<'a> {
    instance: &'a InstanceName,
    seq: u64,
    global: u64,
    at: Timestamp,
    event: EventV2,
    to: &'a Instance,
}

#[derive(Serialize)]
struct V3Ref<'a> {
    instance: &'a InstanceName,
    seq: u64,
    global: u64,
    at: Timestamp,
    prev: Digest,
    replaced: Option<Digest>,
    event: &'a Event,
    to: &'a Instance,
}

impl From<Wire> for Record {
    fn from(w: Wire) -> Self {
        match w {
            Wire::V1(r) => Self {
                instance: r.instance,
                seq: r.seq,
                global: r.global,
                at: r.at,
                prev: None,
                replaced: None,
                event: r.event.into(),
                to: r.to,
            },
            Wire::V2(r) => r.into(),
            Wire::V3(r) => r.into(),
        }
    }
}

impl<E: Into<Event>> From<Chained<E>> for Record {
    fn from(r: Chained<E>) -> Self {
        Self {
            instance: r.instance,
            seq: r.seq,
            global: r.global,
            at: r.at,
            prev: Some(r.prev),
            replaced: r.replaced,
            event: r.event.into(),
            to: r.to,
        }
    }
}

/// Encodes a value with its checksum.
pub(crate) fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    // Serializing our own in-memory types into a Vec cannot fail: every type is
    // plain data (no maps with non-string keys, no custom serializers that error).
    let payload = postcard::to_allocvec(value).unwrap_or_else(|e| unreachable!("postcard cannot fail here: {e}"));
    let mut out = Vec::with_capacity(4 + payload.len());
    out.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
    out.extend_from_slice(&payload);
    out
}

/// Decodes a checksummed value, requiring every byte to be consumed.
/// `versioned` checks the leading variant index against [`VERSION_CURRENT`].
pub(crate) fn decode<T: for<'de> Deserialize<'de>>(bytes: &[u8], versioned: bool) -> Result<T, Corruption> {
    let Some((crc, payload)) = bytes.split_first_chunk::<4>() else {
        return Err(Corruption::Truncated { len: bytes.len() });
    };
    if payload.is_empty() {
        return Err(Corruption::Truncated { len: bytes.len() });
    }
    let stored = u32::from_le_bytes(*crc);
    let computed = crc32fast::hash(payload);
    if stored != computed {
        return Err(Corruption::Checksum { stored, computed });
    }
    // Variant index i is version i + 1; postcard writes it as a one-byte varint while < 128.
    if versioned && payload[0] >= VERSION_CURRENT {
        return Err(Corruption::UnknownVersion { version: u16::from(payload[0]) + 1 });
    }
    let (value, rest) =
        postcard::take_from_bytes(payload).map_err(|e| Corruption::Decode { message: e.to_string() })?;
    if !rest.is_empty() {
        return Err(Corruption::TrailingBytes { count: rest.len() });
    }
    Ok(value)
}

/// Encodes a record: V3 when it is chained, V1 (as it was read) when not.
pub fn encode_record(r: &Record) -> Vec<u8> {
    let (instance, event, to) = (&r.instance, &r.event, &r.to);
    match r.prev {
        Some(prev) => encode(&WireRef::V3(V3Ref {
            instance,
            seq: r.seq,
            global: r.global,
            at: r.at,
            prev,
            replaced: r.replaced,
            event,
            to,
        })),
        None => {
            encode(&WireRef::V1(V1Ref { instance, seq: r.seq, global: r.global, at: r.at, event: event.into(), to }))
        }
    }
}

/// Decodes a record from raw bytes (checksum, version, whole-value check).
pub fn decode_record(bytes: &[u8]) -> Result<Record, Corruption> {
    decode::<Wire>(bytes, true).map(Record::from)
}

/// Decodes a record and computes its digest (BLAKE3 of the payload).
pub fn decode_record_with_digest(bytes: &[u8]) -> Result<(Record, Digest), Corruption> {
    let record = decode_record(bytes)?;
    // Decoding succeeded, so there are more than 4 bytes.
    Ok((record, Digest::of(&bytes[4..])))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::machine::{Generation, Instance};

    fn sample(prev: Option<Digest>) -> Record {
        Record {
            instance: InstanceName::new("acme").expect("valid"),
            seq: 1,
            global: 7,
            at: Timestamp(1_700_000_000_000),
            prev,
            replaced: None,
            event: Event::Transition {
                from: Instance::new(),
                input: Input::Connect,
                effects: vec![Effect::OpenTransport { generation: Generation(1), resume: None }],
            },
            to: Instance::new(),
        }
    }

    fn checksummed(payload: &[u8]) -> Vec<u8> {
        let mut out = crc32fast::hash(payload).to_le_bytes().to_vec();
        out.extend_from_slice(payload);
        out
    }

    #[test]
    fn round_trip_and_every_corruption_is_typed() {
        for record in [sample(Some(Digest::of(b"previous"))), sample(None)] {
            let bytes = encode_record(&record);
            assert_eq!(decode_record(&bytes), Ok(record.clone()));
            for len in 0..bytes.len() {
                assert!(decode_record(&bytes[..len]).is_err(), "truncated to {len} decoded");
            }
            let mut flipped = bytes.clone();
            let last = flipped.len() - 1;
            flipped[last] ^= 0x40;
            assert!(matches!(decode_record(&flipped), Err(Corruption::Checksum { .. })));
            // Trailing bytes, correctly checksummed.
            let mut payload = bytes[4..].to_vec();
            payload.push(0);
            assert_eq!(decode_record(&checksummed(&payload)), Err(Corruption::TrailingBytes { count: 1 }));
        }
        // A newer version, correctly checksummed.
        let mut payload = encode_record(&sample(Some(Digest::ZERO)))[4..].to_vec();
        payload[0] = VERSION_CURRENT;
        assert_eq!(decode_record(&checksummed(&payload)), Err(Corruption::UnknownVersion { version: 4 }));
    }

    #[test]
    fn labels_and_failures_say_what_a_record_records() {
        use crate::machine::{Reason, StepOutcome, StepReport};
        assert_eq!(Event::created("ws://x/").label(), "created");
        assert_eq!(Event::Snapshot { spec: InstanceSpec { url: "ws://x/".into() }, token: None }.label(), "snapshot");
        assert_eq!(sample(None).event.label(), "connect");
        let with = |input: Input| Record {
            event: Event::Transition { from: Instance::new(), input, effects: vec![] },
            ..sample(Some(Digest::ZERO))
        };
        let g = Generation(1);
        assert_eq!(with(Input::Connect).failures(), Vec::<String>::new());
        assert_eq!(
            with(Input::LogoutFailed { generation: g, error: "EPIPE".into() }).failures(),
            ["logout failed: EPIPE"]
        );
        assert_eq!(
            with(Input::WriteFailed { generation: g, error: "reset".into() }).failures(),
            ["write failed: reset"]
        );
        assert_eq!(with(Input::Panicked { message: "bug".into() }).failures(), ["panicked: bug"]);
        let steps = vec![
            StepReport { step: "store".into(), outcome: StepOutcome::Done },
            StepReport { step: "files".into(), outcome: StepOutcome::Failed { error: Reason::new("EACCES") } },
            StepReport { step: "cache".into(), outcome: StepOutcome::TimedOut },
            StepReport { step: "hook".into(), outcome: StepOutcome::Panicked { message: Reason::new("oops") } },
        ];
        assert_eq!(
            with(Input::CleanupFinished { steps }).failures(),
            [
                "cleanup step files: failed: EACCES",
                "cleanup step cache: timed out",
                "cleanup step hook: panicked: oops"
            ]
        );
        let created = Record { event: Event::created("ws://x/"), ..sample(None) };
        assert!(created.failures().is_empty());
    }

    /// The borrowed writer and the owned reader agree on the bytes, and the
    /// versions are where the envelope says: V1 records of older logs still read.
    #[test]
    fn versions_are_the_first_payload_byte_and_v1_and_v2_still_read() {
        let v3 = encode_record(&sample(Some(Digest::ZERO)));
        assert_eq!(v3[4], 2, "V3 is variant 2");
        let v1 = encode_record(&sample(None));
        assert_eq!(v1[4], 0, "V1 is variant 0");
        let legacy = RecordV1 {
            instance: InstanceName::new("acme").expect("valid"),
            seq: 1,
            global: 7,
            at: Timestamp(1_700_000_000_000),
            event: EventV2::from(&sample(None).event),
            to: Instance::new(),
        };
        #[derive(Serialize)]
        enum LegacyEnvelope {
            V1(RecordV1),
            V2(RecordV2),
        }
        assert_eq!(encode(&LegacyEnvelope::V1(legacy)), v1, "V1 bytes are what older builds wrote");
        // A V2 record, as the builds before the token's digest wrote them, reads with no token.
        let v2 = encode(&LegacyEnvelope::V2(RecordV2 {
            instance: InstanceName::new("acme").expect("valid"),
            seq: 1,
            global: 7,
            at: Timestamp(1_700_000_000_000),
            prev: Digest::ZERO,
            replaced: None,
            event: EventV2::Created { spec: InstanceSpec { url: "ws://x/".into() } },
            to: Instance::new(),
        }));
        assert_eq!(v2[4], 1, "V2 is variant 1");
        let read = decode_record(&v2).expect("V2 decodes");
        assert_eq!(read.event, Event::created("ws://x/"));
        // A V3 create carries its token's digest through the bytes.
        let token = Some(Digest::of(b"token"));
        let created = Record { event: Event::Created { spec: InstanceSpec { url: "ws://x/".into() }, token }, ..read };
        assert_eq!(decode_record(&encode_record(&created)), Ok(created.clone()));
        assert_eq!(created.event.origin().map(|(_, t)| t), Some(token));
        let (record, digest) = decode_record_with_digest(&v3).expect("decodes");
        assert_eq!(digest, Digest::of(&v3[4..]));
        assert_eq!(record.link(digest), digest);
        let snapshot = Record { replaced: Some(Digest::of(b"old")), ..record };
        assert_eq!(snapshot.link(digest), Digest::of(b"old"), "a snapshot links as the record it replaced");
    }

    #[test]
    fn digests_print_short_and_parse_from_hex() {
        let d = Digest::of(b"x");
        assert_ne!(d, Digest::of(b"y"), "different bytes, different digests");
        assert_ne!(d, Digest::ZERO);
        assert_eq!(d.short().len(), 16);
        assert!(d.hex().starts_with(&d.short()) && d.hex().len() == 64);
        assert_eq!(format!("{d}"), d.short());
        assert_eq!(format!("{d:?}"), format!("Digest({})", d.short()));
        assert_eq!(Digest::from_hex(&d.hex()), Some(d));
        assert_eq!(Digest::from_hex(&d.hex().to_uppercase()), Some(d));
        assert_eq!(Digest::from_hex("zz"), None);
        assert_eq!(Digest::from_hex(&d.hex()[..62]), None, "too short");
        // 64 bytes that are not ASCII: refused before slicing them (a slice could split a character).
        let odd = format!("a{}a", "é".repeat(31));
        assert_eq!(odd.len(), 64);
        assert_eq!(Digest::from_hex(&odd), None);
        assert_eq!(serde_json::to_string(&d).expect("json"), format!("\"{}\"", d.hex()));
        let back: Digest = serde_json::from_str(&format!("\"{}\"", d.hex())).expect("from json");
        assert_eq!(back, d);
        assert_eq!(postcard::to_allocvec(&d).expect("postcard").len(), 32);
    }
}
