//! Fuzz target `core_step`: see `instance_lifecycle::testing::fuzz::core_sequence` for the invariants it checks.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| instance_lifecycle::testing::fuzz::core_sequence(data));
