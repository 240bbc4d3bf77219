//! SmolLM2 (Llama-architecture) inference and training building blocks on libtorch.
//!
//! Used by the edge agent (scoring decisions) and the cloud trainer (fine-tuning). Everything
//! runs on CPU and uses CUDA when `tch` sees a GPU.

pub mod error;
pub mod gguf;
pub mod tokenizer;

pub use error::{Error, Result};
