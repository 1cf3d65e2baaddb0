//! The one integration-test crate (one binary, fast to link). Modules:
//! - `rules`: one named property per rule of the design brief (R1–R9, R12).
//! - `model`: model-based test of `step` against a small reference model.
//! - `exhaustive`: every (state × input) pair of the catalog, to a depth.
//! - `seeds`: the scenarios of the seed pull requests, at the core level.
//! - `diagrams`: the checked-in diagrams match the code.

mod cli;
mod cluster;
mod cluster_service;
mod corruption;
mod crash;
mod dashboard;
mod data_safety;
mod diagrams;
mod discord;
mod durability;
mod engine;
mod exhaustive;
mod fuzz_corpus;
mod harness;
mod hostile;
mod journal;
mod log;
mod model;
mod node;
mod rules;
mod seeds;
mod serve;
mod support;
mod table;
mod traffic;
mod versions;
