//! Fuzz target `log_open_verify`: see `instance_lifecycle::fuzzing::log_contents` for the invariants it checks.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| instance_lifecycle::fuzzing::log_contents(data));
