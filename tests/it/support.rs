//! Helpers shared by the test modules.

use instance_lifecycle::machine::{Effect, InstanceName, Outcome, State, TimerKind};

pub fn name(s: &str) -> InstanceName {
    InstanceName::new(s).expect("valid test name")
}

/// True when the effect starts a connection attempt.
pub fn opens(e: &Effect) -> bool {
    matches!(e, Effect::OpenTransport { .. })
}

/// True when the effect arms a reconnect timer.
pub fn arms_reconnect(e: &Effect) -> bool {
    matches!(e, Effect::ArmTimer { timer, .. } if timer.kind == TimerKind::Reconnect)
}

/// The transition's effects, or an empty list when the input changed nothing.
pub fn effects_of(o: &Outcome) -> Vec<Effect> {
    match o {
        Outcome::Transition(t) => t.effects.clone(),
        Outcome::Ignored(_) | Outcome::Rejected(_) => vec![],
    }
}

pub fn is_connecting(s: &State) -> bool {
    matches!(s, State::Connecting { .. })
}
