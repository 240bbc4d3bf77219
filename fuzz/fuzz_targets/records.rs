//! Fuzz target: see [`llmchain_fuzz::records`].
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| llmchain_fuzz::records(data));
