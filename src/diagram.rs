//! State diagrams generated from the transition table itself: every sample
//! state of [`crate::machine::catalog`] is stepped with every sample input under
//! every exploration policy, and each transition that changes the state kind
//! (or stays in it) becomes an edge labelled with the inputs that take it.
//! Upkeep — effects without a state change, such as a heartbeat's ping — is
//! drawn as a dotted loop marked "upkeep, not logged". Nothing here is a
//! hand-kept copy of the rules.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;

use crate::machine::catalog::{exploration_policies, sample_inputs, sample_states};
use crate::machine::{Generation, InputKind, Instance, InstanceName, Outcome, StateKind, Timestamp, step};

/// Output format of a diagram.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// Mermaid `stateDiagram-v2` (renders on GitHub).
    Mermaid,
    /// Graphviz DOT.
    Dot,
}

/// An edge of the diagram: from one state kind to another.
pub type Edge = (StateKind, StateKind);

/// The edges of the lifecycle, each with the inputs that take it and, when
/// annotated from a log, how often each was taken.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Diagram {
    /// Edge → input kind → times taken (0 when not annotated or never taken).
    pub edges: BTreeMap<Edge, BTreeMap<InputKind, u64>>,
    /// Whether counts come from a log (then edges with 0 are marked as never taken).
    pub annotated: bool,
    /// Inputs that only cause upkeep in a state (no transition, nothing logged).
    pub upkeep: BTreeMap<StateKind, BTreeSet<InputKind>>,
}

impl Diagram {
    /// The diagram of the transition table.
    pub fn from_rules() -> Self {
        let name = InstanceName::new("diagram").unwrap_or_else(|_| unreachable!("a literal valid name"));
        let g = Generation(1);
        let mut edges: BTreeMap<Edge, BTreeMap<InputKind, u64>> = BTreeMap::new();
        let mut upkeep: BTreeMap<StateKind, BTreeSet<InputKind>> = BTreeMap::new();
        for policy in exploration_policies() {
            for state in sample_states() {
                let instance = Instance { generation: g, state };
                for input in sample_inputs(g) {
                    match step(&name, &instance, &input, &policy, Timestamp(60_000)) {
                        Outcome::Transition(t) => {
                            let edge = (instance.state.kind(), t.to.kind());
                            edges.entry(edge).or_default().insert(input.kind(), 0);
                        }
                        Outcome::Effects(_) => {
                            upkeep.entry(instance.state.kind()).or_default().insert(input.kind());
                        }
                        Outcome::Ignored(_) | Outcome::Rejected(_) => {}
                    }
                }
            }
        }
        Self { edges, annotated: false, upkeep }
    }

    /// Counts one transition taken in a log. Edges the rules do not know are
    /// added too, so a log from other rules shows what it did.
    pub fn count(&mut self, from: StateKind, to: StateKind, input: InputKind) {
        self.annotated = true;
        *self.edges.entry((from, to)).or_default().entry(input).or_insert(0) += 1;
    }

    fn label(&self, inputs: &BTreeMap<InputKind, u64>, separator: &str) -> String {
        let never = self.annotated && inputs.values().all(|&n| n == 0);
        let parts: Vec<String> = inputs
            .iter()
            .filter(|&(_, &n)| !self.annotated || never || n > 0)
            .map(|(k, n)| if self.annotated && !never { format!("{k} ×{n}") } else { k.as_str().to_owned() })
            .collect();
        let label = parts.join(separator);
        if never { format!("never taken: {label}") } else { label }
    }

    /// Renders the diagram.
    pub fn render(&self, format: Format) -> String {
        let mut out = String::new();
        match format {
            Format::Mermaid => {
                out.push_str("stateDiagram-v2\n");
                out.push_str("    [*] --> Closed : create\n");
                for ((from, to), inputs) in &self.edges {
                    let _ = writeln!(out, "    {from} --> {to} : {}", self.label(inputs, ", "));
                }
                for (state, inputs) in &self.upkeep {
                    let _ =
                        writeln!(out, "    {state} --> {state} : {} (upkeep, not logged)", upkeep_label(inputs, ", "));
                }
                out.push_str("    Removed --> [*]\n");
            }
            Format::Dot => {
                out.push_str("digraph instance {\n    rankdir=LR;\n    node [shape=box, style=rounded];\n");
                out.push_str("    start [shape=point];\n    start -> Closed [label=\"create\"];\n");
                out.push_str("    Removed [peripheries=2];\n");
                for ((from, to), inputs) in &self.edges {
                    let style = if self.annotated && inputs.values().all(|&n| n == 0) { ", style=dashed" } else { "" };
                    let _ = writeln!(out, "    {from} -> {to} [label=\"{}\"{style}];", self.label(inputs, "\\n"));
                }
                for (state, inputs) in &self.upkeep {
                    let label = upkeep_label(inputs, "\\n");
                    let _ = writeln!(
                        out,
                        "    {state} -> {state} [label=\"{label}\\n(upkeep, not logged)\", style=dotted];"
                    );
                }
                out.push_str("}\n");
            }
        }
        out
    }
}

fn upkeep_label(inputs: &BTreeSet<InputKind>, separator: &str) -> String {
    inputs.iter().map(|k| k.as_str()).collect::<Vec<_>>().join(separator)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn removed_has_no_outgoing_edge_and_every_state_is_reachable() {
        let d = Diagram::from_rules();
        assert!(d.edges.keys().all(|(from, _)| *from != StateKind::Removed), "R1 violated in the diagram");
        for kind in StateKind::ALL {
            assert!(d.edges.keys().any(|(_, to)| *to == kind), "{kind} unreachable");
        }
        assert!(d.edges.contains_key(&(StateKind::Zombie, StateKind::Closing)), "delete of a zombie");
        assert!(!d.edges.contains_key(&(StateKind::Closed, StateKind::Open)), "open needs a connection first");
    }
}
