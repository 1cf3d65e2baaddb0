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

pub mod diagram;
pub mod engine;
#[cfg(feature = "testing")]
pub mod fuzzing;
pub mod log;
pub mod machine;
pub mod peer;
pub mod simulate;
#[cfg(feature = "testing")]
pub mod testing;
pub mod transport;

pub use machine::{InstanceName, NameError};

/// The message of a caught panic.
pub(crate) fn panic_message(panic: &Box<dyn std::any::Any + Send>) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "panic without a message".to_owned())
}
