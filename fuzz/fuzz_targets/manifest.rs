//! Fuzz target: see [`llmchain_fuzz::manifest`].
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| llmchain_fuzz::manifest(data));
