//! The crate's one error type.
//!
//! Every fallible function in `llmchain-model` returns [`Result`]. Variants say which stage
//! failed (GGUF parsing, metadata lookup, tokenizer, I/O) and carry enough context (key name,
//! tensor name, byte range) for an operator to tell what is wrong with a file without a debugger.

use std::path::PathBuf;

/// Errors of the model crate.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The GGUF bytes are malformed, truncated or inconsistent; `reason` names the field at fault.
    #[error("invalid gguf: {reason}")]
    Gguf {
        /// What is wrong, with the offending field, offset or tensor name.
        reason: String,
    },
    /// A metadata key is missing or holds a value of the wrong type or range.
    #[error("gguf metadata key {key}: {reason}")]
    Metadata {
        /// The metadata key that was asked for.
        key: String,
        /// Why the value cannot be used.
        reason: String,
    },
    /// A tensor was asked for by a name the file does not contain.
    #[error("tensor {name} not found")]
    TensorNotFound {
        /// The missing tensor's name.
        name: String,
    },
    /// A tensor's type is known but its dequantisation is not implemented.
    #[error("tensor {name}: dequantisation of type {ggml_type} is not supported")]
    UnsupportedType {
        /// The tensor's name.
        name: String,
        /// The ggml type name, e.g. `IQ2_XS`.
        ggml_type: String,
    },
    /// Building, loading or running the tokenizer failed.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// Reading a file failed.
    #[error("reading {path}: {source}", path = path.display())]
    Io {
        /// The file that could not be read.
        path: PathBuf,
        /// The underlying I/O error.
        #[source]
        source: std::io::Error,
    },
    /// Writing a file failed.
    #[error("writing {path}: {source}", path = path.display())]
    Write {
        /// The file that could not be written.
        path: PathBuf,
        /// The underlying I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The model configuration is invalid or asks for something the transformer does not do.
    #[error("model config: {reason}")]
    Config {
        /// What is wrong or unsupported.
        reason: String,
    },
    /// A weight tensor is missing, unexpected, or of the wrong shape or type.
    #[error("weight {name}: {reason}")]
    Weights {
        /// The tensor's name (Hugging Face or GGUF naming, as found).
        name: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A safetensors file is malformed.
    #[error("safetensors {path}: {reason}", path = path.display())]
    Safetensors {
        /// The file.
        path: PathBuf,
        /// What the parser or writer reported.
        reason: String,
    },
    /// An inference request is malformed (token id outside the vocabulary, empty prompt, …).
    #[error("invalid input: {reason}")]
    Input {
        /// What is wrong with the request.
        reason: String,
    },
    /// libtorch reported an error.
    #[error("torch: {0}")]
    Torch(#[from] tch::TchError),
}

impl Error {
    /// Shorthand for a [`Error::Gguf`] with a formatted reason.
    pub(crate) fn gguf(reason: impl Into<String>) -> Self {
        Error::Gguf { reason: reason.into() }
    }

    /// Shorthand for a [`Error::Metadata`] naming `key`.
    pub(crate) fn metadata(key: &str, reason: impl Into<String>) -> Self {
        Error::Metadata { key: key.to_owned(), reason: reason.into() }
    }

    /// Shorthand for a [`Error::Config`].
    pub(crate) fn config(reason: impl Into<String>) -> Self {
        Error::Config { reason: reason.into() }
    }

    /// Shorthand for a [`Error::Weights`] naming tensor `name`.
    pub(crate) fn weights(name: &str, reason: impl Into<String>) -> Self {
        Error::Weights { name: name.to_owned(), reason: reason.into() }
    }

    /// Shorthand for a [`Error::Safetensors`] about `path`.
    pub(crate) fn safetensors(path: &std::path::Path, reason: impl Into<String>) -> Self {
        Error::Safetensors { path: path.to_owned(), reason: reason.into() }
    }

    /// Shorthand for a [`Error::Input`].
    pub(crate) fn input(reason: impl Into<String>) -> Self {
        Error::Input { reason: reason.into() }
    }
}

/// The crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
