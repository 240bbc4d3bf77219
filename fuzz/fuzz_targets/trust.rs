//! Fuzz target: see [`llmchain_fuzz::trust`].
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| llmchain_fuzz::trust(data));
