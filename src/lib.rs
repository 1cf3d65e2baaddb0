//! # instance-lifecycle
//!
//! An explicit state-machine engine for fleets of long-lived WebSocket
//! sessions ("instances"): every instance is a typed finite-state machine,
//! every rule lives in one transition table ([`machine::step`]), and every
//! transition can be appended to a persisted event log.
//!
//! Layout:
//! - [`machine`] — the pure core: states, inputs, effects, policy, rules. No I/O.
//! - [`log`] — the persisted event log on sled: records, durability modes,
//!   recovery, verification, retention.
//! - [`diagram`] — Mermaid and DOT state diagrams generated from the table.

#![warn(missing_docs)]

mod contain;
pub mod diagram;
pub mod engine;
pub mod log;
pub mod machine;
#[cfg(feature = "tools")]
pub mod testing;
pub mod transport;

pub(crate) use contain::panic_message;
pub use machine::{InstanceName, NameError};
