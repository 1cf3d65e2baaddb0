//! Exhaustive check: every sample state of every kind and sub-phase, stepped
//! with every sample input (current and stale generations), under every
//! exploration policy, breadth-first to a fixed depth. At each step the
//! structural invariants must hold; at the end every (state kind × input kind)
//! pair must have been decided and every input kind must move some state.

use std::collections::{BTreeMap, BTreeSet, HashSet};

use instance_lifecycle::machine::catalog::{exploration_policies, sample_inputs, sample_states};
use instance_lifecycle::machine::{Input, InputKind, Instance, Outcome, StateKind, Timestamp, step};
use instance_lifecycle::testing::fuzz::check_step;

use crate::support::name;

const DEPTH: usize = 3;

#[test]
fn exhaustive_pairs_up_to_depth() {
    let n = name("exhaustive");
    let mut decided: BTreeMap<(StateKind, InputKind), BTreeSet<&'static str>> = BTreeMap::new();
    let mut steps = 0usize;
    for policy in exploration_policies() {
        let mut seen: HashSet<Instance> = HashSet::new();
        let mut frontier: Vec<Instance> = sample_states()
            .into_iter()
            .map(|state| Instance { generation: instance_lifecycle::machine::Generation(2), state })
            .collect();
        for depth in 0..DEPTH {
            let mut next = Vec::new();
            for from in frontier.drain(..) {
                if !seen.insert(from.clone()) {
                    continue;
                }
                for input in sample_inputs(from.generation) {
                    let now = Timestamp(1_000 * (depth as u64 + 1));
                    let outcome = step(&n, &from, &input, &policy, now);
                    steps += 1;
                    check_step(&from, &input, &outcome);
                    let verdict = match &outcome {
                        Outcome::Transition(_) => "transition",
                        Outcome::Effects(_) => "upkeep",
                        Outcome::Ignored(_) => "ignored",
                        Outcome::Rejected(_) => "rejected",
                    };
                    decided.entry((from.state.kind(), input.kind())).or_default().insert(verdict);
                    if let Outcome::Transition(t) = outcome {
                        let mut to = from.clone();
                        to.apply(&t);
                        next.push(to);
                    }
                }
            }
            frontier = next;
        }
    }
    let all_inputs: BTreeSet<InputKind> =
        sample_inputs(instance_lifecycle::machine::Generation(2)).iter().map(Input::kind).collect();
    for kind in StateKind::ALL {
        for input in &all_inputs {
            assert!(decided.contains_key(&(kind, *input)), "pair ({kind}, {input}) never decided");
        }
    }
    for input in &all_inputs {
        let acts = StateKind::ALL.iter().any(|k| {
            let d = &decided[&(*k, *input)];
            d.contains("transition") || d.contains("upkeep")
        });
        assert!(acts, "input kind {input} never moves any state nor causes upkeep: a dead row in the table");
    }
    for kind in StateKind::ALL {
        let leaves = all_inputs.iter().any(|i| decided[&(kind, *i)].contains("transition"));
        assert_eq!(leaves, kind != StateKind::Removed, "{kind}");
    }
    assert!(steps > 10_000, "explored only {steps} steps");
}
