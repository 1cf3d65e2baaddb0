//! Fuzz target `log_open_verify`: see `instance_lifecycle::testing::fuzz::log_contents` for the invariants it checks.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| instance_lifecycle::testing::fuzz::log_contents(data));
