//! Key layout inside the one tree. Names are `[A-Za-z0-9._-]`, so the NUL
//! separator sorts before every name byte and a prefix never matches a longer name.
//!
//! | prefix | key | value |
//! |---|---|---|
//! | `r` | name ‖ 0 ‖ seq (u64 BE) | a record |
//! | `g` | global (u64 BE) | name ‖ 0 ‖ seq: the global-order index |
//! | `l` | name | the latest-state entry (a cache of the last record's `to`) |
//! | `s` | name | the instance's spec (from its `Created` record) |
//! | `t` | name | the digest of the instance's API token (from its `Created` record, when it has one) |
//! | `p` | from-global (u64 BE) | the policy in force from that global sequence number on (JSON) |
//! | `v` | from-global (u64 BE) | the version of the rules in force from that global sequence number on (u16 BE) |
//! | `x` | global (u64 BE) | a loss accepted when the log was opened with `accept_loss` |
//! | `a` | any | auxiliary data of a service (outside the chain: not verified, not compacted) |
//! | `m` | field | metadata: format marker, log id, tip (when compaction removed the newest record), the last journal frame applied, when compaction last ran and what the log held then |

use crate::machine::InstanceName;

pub(crate) const RECORD: u8 = b'r';
pub(crate) const GLOBAL: u8 = b'g';
pub(crate) const LATEST: u8 = b'l';
pub(crate) const SPEC: u8 = b's';
pub(crate) const TOKEN: u8 = b't';

pub(crate) const POLICY: u8 = b'p';
pub(crate) const RULES: u8 = b'v';
pub(crate) const LOSS: u8 = b'x';
pub(crate) const AUX: u8 = b'a';

pub(crate) const META_FORMAT: &[u8] = b"mformat";
/// The policy as format v1 recorded it (one, the last engine's); read as in force from the start.
pub(crate) const META_POLICY_V1: &[u8] = b"mpolicy";
pub(crate) const META_LOG_ID: &[u8] = b"mlogid";
/// Global and link of the newest record, written only when compaction deletes
/// that record (purging a removed instance), so the tip outlives it.
pub(crate) const META_TIP: &[u8] = b"mtip";
/// The JSN of the last batch applied (big-endian u64), written with the
/// batch (last, for one applied key by key): which journal frames sled
/// already holds (see `journal.rs`).
pub(crate) const META_JOURNAL: &[u8] = b"mjournal";
/// The batch being applied key by key, as its journal frame: written before
/// the batch's keys (and `mjournal` after them), so that sled recovering a
/// prefix of its writes that holds part of the batch also holds the whole
/// batch here, and opening completes it (see `store/sled.rs`).
pub(crate) const META_BATCH: &[u8] = b"mbatch";
/// When the log was last compacted (ms since the Unix epoch, big-endian
/// u64): the compaction schedule survives restarts.
pub(crate) const META_COMPACTED: &[u8] = b"mcompacted";
/// The bytes of keys and values the log held at its last compaction or rewrite (u64 BE).
pub(crate) const META_LIVE: &[u8] = b"mlive";
/// The format marker this build writes.
pub(crate) const FORMAT: &str = "instance-lifecycle log v2";
/// The marker of logs written before records were chained (read, and upgraded by a writer).
pub(crate) const FORMAT_V1: &str = "instance-lifecycle log v1";
/// What every format marker starts with (a longer or other marker is a newer format).
pub(crate) const FORMAT_FAMILY: &str = "instance-lifecycle log";

pub(crate) fn record_prefix(name: &InstanceName) -> Vec<u8> {
    let mut k = Vec::with_capacity(name.as_str().len() + 10);
    k.push(RECORD);
    k.extend_from_slice(name.as_str().as_bytes());
    k.push(0);
    k
}

/// A record key without its prefix: the global index's value.
pub(crate) fn record_suffix(name: &InstanceName, seq: u64) -> Vec<u8> {
    let mut k = Vec::with_capacity(name.as_str().len() + 9);
    k.extend_from_slice(name.as_str().as_bytes());
    k.push(0);
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

pub(crate) fn record(name: &InstanceName, seq: u64) -> Vec<u8> {
    let mut k = record_prefix(name);
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

pub(crate) fn global(global: u64) -> Vec<u8> {
    numbered(GLOBAL, global)
}

pub(crate) fn latest(name: &InstanceName) -> Vec<u8> {
    let mut k = Vec::with_capacity(name.as_str().len() + 1);
    k.push(LATEST);
    k.extend_from_slice(name.as_str().as_bytes());
    k
}

/// The first key after every record key of `name` (to skip to the next name).
pub(crate) fn after_records_of(name_bytes: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(name_bytes.len() + 2);
    k.push(RECORD);
    k.extend_from_slice(name_bytes);
    k.push(1);
    k
}

/// Splits a record key (without its `r`) into name bytes and seq.
pub(crate) fn split_record_suffix(suffix: &[u8]) -> Option<(&[u8], u64)> {
    let (name, rest) = suffix.split_at(suffix.iter().position(|&b| b == 0)?);
    let seq: [u8; 8] = rest.get(1..)?.try_into().ok()?;
    Some((name, u64::from_be_bytes(seq)))
}

/// Parses a record key into name and seq.
pub(crate) fn parse_record(key: &[u8]) -> Option<(&[u8], u64)> {
    split_record_suffix(key.strip_prefix(&[RECORD])?)
}

pub(crate) fn parse_global(key: &[u8]) -> Option<u64> {
    parse_numbered(GLOBAL, key)
}

pub(crate) fn aux(key: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(key.len() + 1);
    k.push(AUX);
    k.extend_from_slice(key);
    k
}

pub(crate) fn spec(name: &InstanceName) -> Vec<u8> {
    named(SPEC, name)
}

pub(crate) fn token(name: &InstanceName) -> Vec<u8> {
    named(TOKEN, name)
}

fn named(prefix: u8, name: &InstanceName) -> Vec<u8> {
    let mut k = Vec::with_capacity(name.as_str().len() + 1);
    k.push(prefix);
    k.extend_from_slice(name.as_str().as_bytes());
    k
}

/// A key made of a one-byte prefix and a big-endian number (policy, loss).
pub(crate) fn numbered(prefix: u8, n: u64) -> Vec<u8> {
    let mut k = Vec::with_capacity(9);
    k.push(prefix);
    k.extend_from_slice(&n.to_be_bytes());
    k
}

pub(crate) fn parse_numbered(prefix: u8, key: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(key.strip_prefix(&[prefix])?.try_into().ok()?))
}
