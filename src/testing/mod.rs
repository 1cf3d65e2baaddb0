//! Test support and tools (features `tools` and `testing`).
//!
//! With `tools` (part of the default `cli` feature):
//! - [`chaos`]: the seeded chaos schedule.
//! - [`simulate`]: `lifecycle simulate`, a fleet through the chaos over real sockets.
//! - [`peer`]: the fault-injecting reference peer.
//! - [`SimTransport`]: a transport without sockets whose faults are scripted.
//! - [`sim_engine`]: an engine on an in-memory log with the simulated
//!   transport and a fixed epoch, for `tokio::time::pause`.
//! - [`simulate_virtual`]: the seeded chaos schedule in virtual time;
//!   the same seed gives the same log, record for record (`simulate --virtual`).
//! - [`assert_rules_hold`]: every rule checked on a whole log.
//! - [`nats`] and [`cluster_sim`] (with `cluster`): a real `nats-server`
//!   for tests, and `lifecycle simulate --cluster N`.
//!
//! With `testing` (for test authors; it includes `tools`):
//! - [`Driver`]: the pure core's [`machine::Driver`](crate::machine::Driver)
//!   in virtual time, recording every transition and checking, after each,
//!   that one transport is live at a time and that every waiting state has
//!   its bounding timer — no tokio, no sockets, no clock.
//! - [`strategy`]: proptest strategies for states, inputs and policies.
//! - [`fleet`]: a whole fleet on the core's drivers alone, in virtual time,
//!   every rule checked after every step (a fleet-day in seconds).
//! - [`fuzz`]: the functions behind the fuzz targets.
//!
//! Everything is deterministic: the same inputs give the same records.

pub mod chaos;
#[cfg(feature = "cluster")]
pub mod cluster_sim;
pub mod discord;
#[cfg(feature = "cluster")]
pub mod nats;
pub mod peer;
pub mod simulate;

#[cfg(feature = "testing")]
pub mod fleet;
#[cfg(feature = "testing")]
pub mod fuzz;
mod sim;
#[cfg(feature = "testing")]
pub mod strategy;
mod virtual_time;

#[cfg(feature = "testing")]
mod harness;
#[cfg(feature = "testing")]
pub use harness::{Driver, DriverViolation, Step, append_to_log, retarget, waits_on};
pub use sim::{SimAction, SimBehaviour, SimTransport};
pub use virtual_time::{
    EPOCH, assert_rules_hold, check_rules, sim_engine, sim_engine_on, simulate_virtual, simulate_virtual_on,
};
