//! Fuzz target `record_decode`: see `instance_lifecycle::testing::fuzz::record_decode` for the invariants it checks.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| instance_lifecycle::testing::fuzz::record_decode(data));
