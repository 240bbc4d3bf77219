//! The cloud trainer: generates and loads data sets, fine-tunes a model (last layers, LoRA or
//! full) with libtorch, evaluates it, turns it into a signed, content-addressed version and
//! publishes it to a coordinator, uploading only the blobs the coordinator lacks.

pub mod data;
pub mod eval;
pub mod pipeline;
pub mod plot;
pub mod publish;
pub mod remote;
pub mod train;
pub mod version;

/// Errors of the trainer library.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The model runtime failed.
    #[error(transparent)]
    Model(#[from] llmchain_model::Error),
    /// Building or signing the artifact failed.
    #[error(transparent)]
    Artifact(#[from] llmchain_artifact::Error),
    /// The coordinator refused or failed a call.
    #[error("coordinator: {0}")]
    Coordinator(#[from] llmchain_proto::ApiError),
    /// The coordinator could not be reached.
    #[error("cannot reach coordinator at {url}: {message}")]
    Connect {
        /// Address tried.
        url: String,
        /// Transport error.
        message: String,
    },
    /// A local precondition does not hold.
    #[error("{0}")]
    Invalid(String),
}

/// Result with the trainer's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
