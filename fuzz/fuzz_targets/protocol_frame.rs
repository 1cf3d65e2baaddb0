//! Fuzz target `protocol_frame`: see `instance_lifecycle::testing::fuzz::protocol_frame` for the invariants it checks.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| instance_lifecycle::testing::fuzz::protocol_frame(data));
