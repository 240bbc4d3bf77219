//! Fuzz target: see `model_targets::gguf` (needs the `model` feature: links libtorch).
#![no_main]

#[path = "../src/model_targets.rs"]
mod model_targets;

libfuzzer_sys::fuzz_target!(|data: &[u8]| model_targets::gguf(data));
