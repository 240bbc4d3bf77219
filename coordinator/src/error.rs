//! The coordinator's error enum and its conversion to the API's domain error.

use llmchain_proto::ApiError;

/// Result with the coordinator's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong inside the coordinator.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A request the API layer already classified (validation, not found, refusals).
    #[error(transparent)]
    Api(#[from] ApiError),
    /// Local I/O failed.
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
}

impl From<Error> for ApiError {
    fn from(err: Error) -> Self {
        match err {
            Error::Api(api) => api,
            Error::Io(e) => ApiError::Unavailable(format!("i/o error: {e}")),
        }
    }
}

impl From<Error> for tonic::Status {
    fn from(err: Error) -> Self {
        ApiError::from(err).into()
    }
}
