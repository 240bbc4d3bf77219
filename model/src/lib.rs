//! SmolLM2 (Llama-architecture) inference and training building blocks on libtorch.
//!
//! Used by the edge agent (scoring decisions) and the cloud trainer (fine-tuning). Everything
//! runs on CPU and uses CUDA when `tch` sees a GPU.

pub mod config;
pub mod device;
pub mod error;
pub mod gguf;
pub mod inference;
pub mod llama;
pub mod prompt;
pub mod tokenizer;
pub mod version;
pub mod weights;

pub use config::LlamaConfig;
pub use error::{Error, Result};
pub use inference::{GenerateOptions, Generation, KeptTrunk, Prefix, StopReason};
pub use llama::{KvCache, Llama, Padding};
pub use weights::{SaveDtype, load_pretrained};
