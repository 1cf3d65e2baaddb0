//! The seam for a log of record outside this process (a cluster): every
//! record the engine writes is first offered to the [`Fence`], which makes
//! it durable there — or refuses it, because this host no longer owns the
//! instance. Only an accepted record is appended to the local log and
//! applied (R8: the log of record comes first). Without a fence nothing
//! changes.

use std::future::Future;
use std::pin::Pin;

use crate::log::Event;
use crate::machine::{Instance, InstanceName, Timestamp};

/// What a fence answers.
pub type FenceFuture<'a> = Pin<Box<dyn Future<Output = Result<(), Refused>> + Send + 'a>>;

/// A record offered to the fence, before the local log has it.
#[derive(Clone, Copy, Debug)]
pub struct Offered<'a> {
    /// The instance's sequence number this record takes.
    pub seq: u64,
    /// When.
    pub at: Timestamp,
    /// What happened.
    pub event: &'a Event,
    /// The instance afterwards.
    pub to: &'a Instance,
}

/// Why a fence refused a record.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Refused(pub String);

/// The log of record a clustered engine writes through.
pub trait Fence: Send + Sync + 'static {
    /// Makes `record` durable in the log of record, or refuses it. A refusal
    /// means the instance is no longer this host's: the engine drops its
    /// socket at once and forgets the instance.
    fn record<'a>(&'a self, name: &'a InstanceName, record: Offered<'a>) -> FenceFuture<'a>;
}
