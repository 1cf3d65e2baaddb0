//! # instance-lifecycle
//!
//! An explicit state-machine engine for fleets of long-lived WebSocket
//! sessions ("instances"): every instance is a typed finite-state machine,
//! every rule lives in one transition table ([`machine::step`]), and every
//! transition can be appended to a persisted event log.
//!
//! Layout (every public module):
//! - [`machine`] — the pure core: states, inputs, effects, policy, the rules
//!   ([`machine::step`]) and the sans-IO [`machine::Driver`] every runtime
//!   drives instances through. No I/O, no clock.
//! - [`log`] — the persisted event log on sled: chained records, durability
//!   modes with a head that notices rollbacks, recovery, verification, retention.
//! - [`engine`] — the tokio runtime a host embeds: a task per live instance
//!   around its driver, the registry, cleanup, compaction.
//! - [`transport`] — how connections are held: the `Transport` trait, the
//!   WebSocket transport (tokio-tungstenite, rustls), the reference protocol.
//! - [`diagram`] — Mermaid and DOT state diagrams generated from the table.
//! - `serve` (feature `serve`) — `lifecycle serve`: the engine behind REST,
//!   SSE, persisted webhooks, Prometheus metrics, an Evolution-API-compatible
//!   subset and host-driven sessions, for hosts in any language.
//! - `testing` (features `tools`, `testing`) — the chaos schedule, the
//!   simulator and the reference peer; for test authors, the property-test
//!   harness (virtual time, strategies, a scripted transport, rule checks).
//!
//! Features: `cli` (default) builds the `lifecycle` tool, `tools` and
//! `serve`; a host that embeds the library uses `default-features = false`
//! and builds neither clap, the service nor the simulator.

#![warn(missing_docs)]
#![warn(unreachable_pub)]
#![forbid(unsafe_code)]

#[cfg(feature = "cluster")]
pub mod cluster;
mod contain;
pub mod diagram;
pub mod engine;
pub mod log;
pub mod machine;
#[cfg(feature = "serve")]
pub mod serve;
#[cfg(feature = "tools")]
pub mod testing;
pub mod transport;

pub(crate) use contain::panic_message;
pub use machine::{InstanceName, NameError};
