//! Which rule of the design (R1–R15) decided a recorded transition: what the
//! dashboard's replay and the event stream show beside each record.
//!
//! [`rule_of`] reads a record's three parts — the state before, the input,
//! the state after — and names the rule whose clause produced that step of
//! [`super::step`]. Steps that no rule constrains (a host's first connect, a
//! pairing code being counted) name none. Five rules never decide a record:
//! R1 and R12 make inputs change *nothing*, R8 is about the log itself, R15
//! only moves a timer, and R10 is named only for a caught panic.

use std::fmt;

use serde::{Deserialize, Serialize};

use super::input::{Input, InputKind};
use super::state::{ClosedCause, Intent, State};

/// A rule of the design brief.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Rule {
    /// Removed is terminal.
    R1,
    /// Delete always removes.
    R2,
    /// Logout suppresses reconnect.
    R3,
    /// No-reconnect codes.
    R4,
    /// Forced close.
    R5,
    /// Open needs an identity.
    R6,
    /// Zombie detection.
    R7,
    /// The log is the truth.
    R8,
    /// Bounded reconnect.
    R9,
    /// Isolation.
    R10,
    /// Recovery.
    R11,
    /// Stale signals.
    R12,
    /// The peer's reconnect request resumes.
    R13,
    /// An invalid session is never resumed.
    R14,
    /// A fleet-wide wait is not a silent peer.
    R15,
}

impl Rule {
    /// Every rule, in order.
    pub const ALL: [Rule; 15] = [
        Self::R1,
        Self::R2,
        Self::R3,
        Self::R4,
        Self::R5,
        Self::R6,
        Self::R7,
        Self::R8,
        Self::R9,
        Self::R10,
        Self::R11,
        Self::R12,
        Self::R13,
        Self::R14,
        Self::R15,
    ];

    /// `R1` … `R15`.
    pub fn id(self) -> &'static str {
        match self {
            Self::R1 => "R1",
            Self::R2 => "R2",
            Self::R3 => "R3",
            Self::R4 => "R4",
            Self::R5 => "R5",
            Self::R6 => "R6",
            Self::R7 => "R7",
            Self::R8 => "R8",
            Self::R9 => "R9",
            Self::R10 => "R10",
            Self::R11 => "R11",
            Self::R12 => "R12",
            Self::R13 => "R13",
            Self::R14 => "R14",
            Self::R15 => "R15",
        }
    }

    /// The rule's title, as the design brief words it.
    pub fn title(self) -> &'static str {
        match self {
            Self::R1 => "Removed is terminal",
            Self::R2 => "Delete always removes",
            Self::R3 => "Logout suppresses reconnect",
            Self::R4 => "No-reconnect codes",
            Self::R5 => "Forced close",
            Self::R6 => "Open needs an identity",
            Self::R7 => "Zombie detection",
            Self::R8 => "The log is the truth",
            Self::R9 => "Bounded reconnect",
            Self::R10 => "Isolation",
            Self::R11 => "Recovery",
            Self::R12 => "Stale signals",
            Self::R13 => "A reconnect request resumes",
            Self::R14 => "An invalid session is never resumed",
            Self::R15 => "A fleet-wide wait is not a silent peer",
        }
    }
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.id(), self.title())
    }
}

/// The rule that decided the transition `from` —`input`→ `to`, or `None`
/// when the step is one no rule constrains. The first clause that applies
/// wins, in this order:
///
/// 1. a caught panic is R10 and a restart's recovery R11, whatever the state;
/// 2. a delete, a step of a delete, or reaching `Removed` is R2;
/// 3. becoming a zombie is R7, and so is a logout of one (it never waits on the dead socket);
/// 4. a step out of `Zombie` is R9 (its reconnect is bounded);
/// 5. a logout's own request is R3; every later step of it is R5;
/// 6. becoming `Open` is R6 (it happens only with an identity);
/// 7. a close the policy marks final is R4; giving up (attempts or pairing codes) is R9;
/// 8. a connect after a logout is R3 (only the host re-enables connecting);
///    a connect or restart of a live or waiting instance is R9 (one attempt at a time);
/// 9. the peer's reconnect request is R13, its "session invalid" R14;
/// 10. a lost connection, a connect time-out or a reconnect timer is R9.
pub fn rule_of(from: &State, input: &Input, to: &State) -> Option<Rule> {
    use InputKind as K;
    let kind = input.kind();
    let rule = match kind {
        K::Panicked => Rule::R10,
        K::Recovered => Rule::R11,
        K::Delete => Rule::R2,
        _ if matches!(to, State::Removed { .. }) || matches!(from, State::Closing { intent: Intent::Delete, .. }) => {
            Rule::R2
        }
        _ if matches!(to, State::Zombie { .. }) => Rule::R7,
        K::Logout if matches!(from, State::Zombie { .. }) => Rule::R7,
        _ if matches!(from, State::Zombie { .. }) => Rule::R9,
        K::Logout => Rule::R3,
        _ if matches!(from, State::Closing { intent: Intent::Logout, .. }) => Rule::R5,
        _ if matches!(to, State::Open { .. }) => Rule::R6,
        _ if matches!(to, State::Closed { cause: ClosedCause::FinalStatus, .. }) => Rule::R4,
        _ if matches!(
            to,
            State::Closed { cause: ClosedCause::GaveUp { .. } | ClosedCause::PairingRefused { .. }, .. }
        ) =>
        {
            Rule::R9
        }
        K::ReconnectRequested => Rule::R13,
        K::SessionInvalid => Rule::R14,
        K::Connect | K::Restart => match from {
            State::Closed { cause: ClosedCause::LoggedOut { .. }, .. } => Rule::R3,
            State::Closed { .. } => return None,
            _ => Rule::R9,
        },
        K::Closed | K::ConnectTimeout | K::WriteFailed | K::HeartbeatMissed | K::ReconnectTimer => Rule::R9,
        _ => return None,
    };
    Some(rule)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;
    use crate::machine::catalog::{exploration_policies, sample_inputs, sample_states};
    use crate::machine::{Generation, Instance, InstanceName, Outcome, Timestamp, step};

    /// Every transition the table can make, as (from, input, to, whether a new attempt started).
    fn transitions() -> Vec<(State, Input, State, bool)> {
        let name = InstanceName::new("explain").expect("name");
        let g = Generation(3);
        let mut out = Vec::new();
        for policy in exploration_policies() {
            for state in sample_states() {
                let instance = Instance { generation: g, state };
                for input in sample_inputs(g) {
                    if let Outcome::Transition(t) = step(&name, &instance, &input, &policy, Timestamp(60_000)) {
                        out.push((instance.state.clone(), input, t.to, t.generation > g));
                    }
                }
            }
        }
        out
    }

    /// Each clause of a rule that can decide a step, checked over every
    /// transition of the table: the rule named is the one the brief's words
    /// point at, not a snapshot of today's answers.
    #[test]
    fn every_transition_is_explained_by_the_rule_its_words_name() {
        let all = transitions();
        assert!(all.len() > 100, "the catalog explores the table: {}", all.len());
        let mut named = BTreeSet::new();
        for (from, input, to, attempt) in &all {
            let rule = rule_of(from, input, to);
            let case = format!("{from:?} --{:?}--> {to:?}: {rule:?}", input.kind());
            let expected = match input.kind() {
                InputKind::Panicked => Some(Rule::R10),
                InputKind::Recovered => Some(Rule::R11),
                InputKind::Delete => Some(Rule::R2),
                _ if matches!(to, State::Removed { .. }) => Some(Rule::R2),
                _ if matches!(to, State::Zombie { .. }) => Some(Rule::R7),
                InputKind::Opened => Some(Rule::R6),
                // R7's second half: a zombie's logout never waits on its dead socket.
                InputKind::Logout if matches!(from, State::Zombie { .. }) => Some(Rule::R7),
                _ if matches!(from, State::Zombie { .. }) => Some(Rule::R9),
                InputKind::Logout => Some(Rule::R3),
                _ => None,
            };
            if let Some(expected) = expected {
                assert_eq!(rule, Some(expected), "{case}");
            }
            if matches!(from, State::Closing { intent: Intent::Delete, .. })
                && !matches!(input.kind(), InputKind::Panicked | InputKind::Recovered)
            {
                // Every step of a delete is the delete's (R2), wherever it leads.
                assert_eq!(rule, Some(Rule::R2), "{case}");
            }
            if matches!(
                to,
                State::Closed { cause: ClosedCause::GaveUp { .. } | ClosedCause::PairingRefused { .. }, .. }
            ) && !matches!(input.kind(), InputKind::Panicked | InputKind::Recovered | InputKind::Logout)
            {
                // Giving up (attempts or pairing codes) is the bound of R9.
                assert_eq!(rule, Some(Rule::R9), "{case}");
            }
            if matches!(to, State::Closed { cause: ClosedCause::FinalStatus, .. })
                && !matches!(from, State::Zombie { .. } | State::Closing { .. })
            {
                assert_eq!(rule, Some(Rule::R4), "{case}");
            }
            if matches!(from, State::Closing { intent: Intent::Logout, .. })
                && !matches!(input.kind(), InputKind::Delete | InputKind::Panicked | InputKind::Recovered)
            {
                assert_eq!(rule, Some(Rule::R5), "{case}");
            }
            match input.kind() {
                InputKind::ReconnectRequested => assert!(matches!(rule, Some(Rule::R13 | Rule::R9)), "{case}"),
                InputKind::SessionInvalid => assert!(matches!(rule, Some(Rule::R14 | Rule::R9)), "{case}"),
                // Every other automatic or repeated attempt is bounded reconnect.
                _ if *attempt && !matches!(from, State::Closed { .. }) => {
                    assert!(matches!(rule, Some(Rule::R9 | Rule::R11)), "{case}")
                }
                _ => {}
            }
            if let Some(r) = rule {
                named.insert(r);
            }
        }
        // R1, R8, R12 and R15 never decide a record: nothing leaves Removed, the
        // log is not a step, a stale input changes nothing, and a handshake step
        // only moves a timer.
        let never = [Rule::R1, Rule::R8, Rule::R12, Rule::R15];
        for rule in never {
            assert!(!named.contains(&rule), "{rule} named a transition");
        }
        let expected: BTreeSet<Rule> = Rule::ALL.into_iter().filter(|r| !never.contains(r)).collect();
        assert_eq!(named, expected, "every other rule decides some transition");
    }

    #[test]
    fn a_connect_after_a_logout_is_r3_and_a_first_connect_names_no_rule() {
        let all = transitions();
        let connects: Vec<_> = all
            .iter()
            .filter(|(from, input, _, _)| input.kind() == InputKind::Connect && matches!(from, State::Closed { .. }))
            .collect();
        assert!(!connects.is_empty());
        for (from, input, to, _) in connects {
            let logged_out = matches!(from, State::Closed { cause: ClosedCause::LoggedOut { .. }, .. });
            assert_eq!(rule_of(from, input, to), logged_out.then_some(Rule::R3), "{from:?}");
        }
    }

    /// Only the host re-enables connecting after a logout (R3): a connect
    /// or restart of a logged-out instance is R3's; of one that was never
    /// connected or closed for another reason, no rule's.
    #[test]
    fn connecting_again_after_a_logout_is_r3() {
        use crate::machine::{LogoutOutcome, Phase};
        let logged_out = State::Closed {
            cause: ClosedCause::LoggedOut { logout: LogoutOutcome::Confirmed },
            status: None,
            resume: None,
        };
        let connecting = State::Connecting { phase: Phase::Handshaking, retries: 0, resume: None };
        assert_eq!(rule_of(&logged_out, &Input::Connect, &connecting), Some(Rule::R3));
        assert_eq!(rule_of(&logged_out, &Input::Restart, &connecting), Some(Rule::R3));
        let created = Instance::new().state;
        assert_eq!(rule_of(&created, &Input::Connect, &connecting), None);
        let gave_up = State::Closed { cause: ClosedCause::GaveUp { attempts: 3 }, status: None, resume: None };
        assert_eq!(rule_of(&gave_up, &Input::Restart, &connecting), None);
    }

    /// One pairing code too many ends the attempt: R9's bound, though the
    /// input (a pairing code) is not a loss.
    #[test]
    fn pairing_refused_is_the_bound_of_r9() {
        use crate::machine::{Generation, Phase, Policy, step};
        let name = InstanceName::new("pairing").expect("name");
        let policy = Policy::default();
        let state =
            State::Connecting { phase: Phase::Pairing { codes: policy.pairing_codes_max }, retries: 0, resume: None };
        let instance = Instance { generation: Generation(1), state };
        let input = Input::PairingCode { generation: Generation(1) };
        let Outcome::Transition(t) = step(&name, &instance, &input, &policy, Timestamp(0)) else {
            panic!("a transition")
        };
        assert!(matches!(t.to, State::Closed { cause: ClosedCause::PairingRefused { .. }, .. }), "{:?}", t.to);
        assert_eq!(rule_of(&instance.state, &input, &t.to), Some(Rule::R9));
        // The codes before it are counted under no rule.
        let first = Instance {
            generation: Generation(1),
            state: State::Connecting { phase: Phase::Handshaking, retries: 0, resume: None },
        };
        let Outcome::Transition(t) = step(&name, &first, &input, &policy, Timestamp(0)) else { panic!("a transition") };
        assert_eq!(rule_of(&first.state, &input, &t.to), None);
    }

    #[test]
    fn every_rule_has_its_own_id_and_title() {
        let ids: BTreeSet<_> = Rule::ALL.iter().map(|r| r.id()).collect();
        let titles: BTreeSet<_> = Rule::ALL.iter().map(|r| r.title()).collect();
        assert_eq!((ids.len(), titles.len()), (15, 15));
        for (i, r) in Rule::ALL.iter().enumerate() {
            assert_eq!(r.id(), format!("R{}", i + 1));
            assert!(r.title().len() > 5, "{r}");
            assert_eq!(r.to_string(), format!("R{} {}", i + 1, r.title()));
        }
    }
}
