//! The pure lifecycle core ("sans-IO"): states, inputs, effects, policy, and
//! the one transition table, [`step`].
//!
//! Invariant: nothing in this module does I/O, reads a clock, spawns, or
//! depends on tokio or sled. Time comes in as `now`; randomness is the
//! policy's seeded jitter. Everything here is usable from a plain `#[test]`.
//!
//! ```
//! use instance_lifecycle::machine::{step, Effect, Input, Instance, Outcome, Policy, State, Timestamp};
//! use instance_lifecycle::InstanceName;
//!
//! let name = InstanceName::new("acme").unwrap();
//! let policy = Policy::default();
//! let mut instance = Instance::new();
//! let Outcome::Transition(t) = step(&name, &instance, &Input::Connect, &policy, Timestamp(0)) else { panic!() };
//! assert!(matches!(t.effects[0], Effect::OpenTransport { .. }));
//! instance.apply(&t);
//! assert!(matches!(instance.state, State::Connecting { .. }));
//! ```

pub mod catalog;
mod driver;
mod effect;
mod explain;
mod input;
mod policy;
mod rules;
mod state;
mod types;

pub use driver::{Driver, Fed, Pending};
pub use effect::Effect;
pub use explain::{Rule, rule_of};
pub use input::{CloseInitiator, Input, InputKind, Timer, TimerKind};
pub use policy::{
    Backoff, CloseAction, ClosePhase, CloseRule, Heartbeat, Jitter, PhaseMatch, Policy, PolicyError, Preset,
    SplitMix64, StatusMatch, Timeouts,
};
pub use rules::{Ignored, Outcome, Rejection, RulesVersion, Transition, step, step_under};
pub use state::{
    CleanupOutcome, ClosedCause, ClosingStep, CoarseStatus, Instance, Intent, LogoutOutcome, Phase, State, StateKind,
    StepOutcome, StepReport, ZombieCause,
};
pub use types::{
    Generation, IDENTITY_LEN_MAX, INSTANCE_NAME_LEN_MAX, Identity, IdentityError, InstanceName, NameError,
    REASON_LEN_MAX, Reason, StatusCode, Timestamp, URL_LEN_MAX, UrlError, WsUrl,
};
