//! Fuzz target: see [`llmchain_fuzz::summaries`].
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| llmchain_fuzz::summaries(data));
