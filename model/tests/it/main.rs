//! The model crate's integration tests in one test binary: one link against libtorch instead
//! of one per file. nextest still runs each test in its own process; run one file's tests with
//! a name filter, e.g. `cargo nextest run -p llmchain-model tokenizer_hf::`.

mod common;
mod gguf_writer;

mod gguf_dequant;
mod gguf_parse;
mod gguf_proptest;
mod hf_parity;
mod safetensors_roundtrip;
mod tokenizer_hf;
