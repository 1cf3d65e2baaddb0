//! The record format: one record per transition, in an explicit version
//! envelope, checksummed, decoded with a check that every byte was consumed.
//!
//! On disk a value is `crc32(payload) as u32 LE ‖ payload`, where `payload`
//! is `postcard(Record)`. Postcard writes the enum variant index first, so
//! the version is the payload's first byte: an unknown one is reported as
//! such, not as garbage. New versions add variants; old ones never change.

use serde::{Deserialize, Serialize};

use crate::machine::{Effect, Input, Instance, InstanceName, Timestamp};

/// The versioned envelope of a log record.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Record {
    /// Version 1.
    V1(RecordV1),
}

/// The newest version this build writes.
pub const VERSION_CURRENT: u8 = 1;

/// One entry of an instance's history.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecordV1 {
    /// The instance.
    pub instance: InstanceName,
    /// Per-instance sequence number, from 1, without gaps.
    pub seq: u64,
    /// Global sequence number across all instances, increasing.
    pub global: u64,
    /// Wall-clock (or virtual) time of the input.
    pub at: Timestamp,
    /// What happened.
    pub event: Event,
    /// The instance afterwards.
    pub to: Instance,
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
    },
}

impl Event {
    /// A `Created` event for an instance connecting to `url`.
    pub fn created(url: impl Into<String>) -> Self {
        Self::Created { spec: InstanceSpec { url: url.into() } }
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

impl RecordV1 {
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
    if versioned {
        // Variant index 0 is V1; postcard writes it as a one-byte varint while < 128.
        let version = u16::from(payload[0]) + 1;
        if payload[0] >= VERSION_CURRENT {
            return Err(Corruption::UnknownVersion { version });
        }
    }
    let (value, rest) =
        postcard::take_from_bytes(payload).map_err(|e| Corruption::Decode { message: e.to_string() })?;
    if !rest.is_empty() {
        return Err(Corruption::TrailingBytes { count: rest.len() });
    }
    Ok(value)
}

/// Encodes a record.
pub fn encode_record(record: &Record) -> Vec<u8> {
    encode(record)
}

/// Decodes a record from raw bytes (checksum, version, whole-value check).
pub fn decode_record(bytes: &[u8]) -> Result<Record, Corruption> {
    decode(bytes, true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::machine::{Generation, Instance};

    fn sample() -> Record {
        Record::V1(RecordV1 {
            instance: InstanceName::new("acme").expect("valid"),
            seq: 1,
            global: 7,
            at: Timestamp(1_700_000_000_000),
            event: Event::Transition {
                from: Instance::new(),
                input: Input::Connect,
                effects: vec![Effect::OpenTransport { generation: Generation(1), resume: None }],
            },
            to: Instance::new(),
        })
    }

    #[test]
    fn round_trip_and_every_corruption_is_typed() {
        let bytes = encode_record(&sample());
        assert_eq!(decode_record(&bytes), Ok(sample()));
        for len in 0..bytes.len() {
            assert!(decode_record(&bytes[..len]).is_err(), "truncated to {len} decoded");
        }
        let mut flipped = bytes.clone();
        let last = flipped.len() - 1;
        flipped[last] ^= 0x40;
        assert!(matches!(decode_record(&flipped), Err(Corruption::Checksum { .. })));
        // A newer version, correctly checksummed.
        let mut payload = bytes[4..].to_vec();
        payload[0] = 1;
        let mut newer = crc32fast::hash(&payload).to_le_bytes().to_vec();
        newer.extend_from_slice(&payload);
        assert_eq!(decode_record(&newer), Err(Corruption::UnknownVersion { version: 2 }));
        // Trailing bytes, correctly checksummed.
        let mut payload = bytes[4..].to_vec();
        payload.push(0);
        let mut trailing = crc32fast::hash(&payload).to_le_bytes().to_vec();
        trailing.extend_from_slice(&payload);
        assert_eq!(decode_record(&trailing), Err(Corruption::TrailingBytes { count: 1 }));
    }
}
