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
    /// The state store failed in a way retrying will not fix (corrupt record, rejected request).
    #[error("store error: {0}")]
    Store(String),
    /// The state store cannot be reached right now; retrying may help.
    #[error("store unavailable: {0}")]
    StoreUnavailable(String),
    /// A watch asked for history the store no longer keeps; the caller must re-list and watch
    /// again from the listed revision.
    #[error("store history compacted: requested revision {requested}, compacted up to {compacted}")]
    Compacted {
        /// The first revision the watch wanted.
        requested: i64,
        /// The store's compaction point: history at or below it is gone.
        compacted: i64,
    },
    /// The lease does not exist (any more): it expired or was revoked.
    #[error("lease {0:x} expired or not found")]
    LeaseExpired(i64),
    /// A `--store` spec could not be parsed.
    #[error("invalid store spec {spec:?}: {reason}")]
    InvalidStoreSpec {
        /// The spec as given.
        spec: String,
        /// What is wrong with it.
        reason: String,
    },
    /// TLS material (CA, certificates, keys) is missing, unreadable or cannot be made.
    #[error("tls: {0}")]
    Tls(String),
}

impl From<Error> for ApiError {
    fn from(err: Error) -> Self {
        match err {
            Error::Api(api) => api,
            Error::Io(e) => ApiError::Unavailable(format!("i/o error: {e}")),
            Error::Store(msg) => ApiError::Internal(format!("store error: {msg}")),
            Error::StoreUnavailable(msg) => ApiError::Unavailable(format!("store unavailable: {msg}")),
            // A client retrying the request re-lists, which is exactly the recovery needed.
            err @ Error::Compacted { .. } => ApiError::Unavailable(err.to_string()),
            err @ Error::LeaseExpired(_) => ApiError::FailedPrecondition(err.to_string()),
            Error::InvalidStoreSpec { spec, reason } => {
                ApiError::invalid("store", format!("{spec:?}: {reason}"))
            }
            err @ Error::Tls(_) => ApiError::Internal(err.to_string()),
        }
    }
}

impl From<Error> for tonic::Status {
    fn from(err: Error) -> Self {
        ApiError::from(err).into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_errors_map_to_retryable_or_precise_api_errors() {
        let unavailable = ApiError::from(Error::StoreUnavailable("etcd: no leader".into()));
        assert!(matches!(unavailable, ApiError::Unavailable(msg) if msg.contains("no leader")));
        let compacted = ApiError::from(Error::Compacted { requested: 3, compacted: 9 });
        assert!(matches!(compacted, ApiError::Unavailable(msg) if msg.contains("compacted up to 9")));
        assert!(
            matches!(ApiError::from(Error::LeaseExpired(0x2a)), ApiError::FailedPrecondition(msg) if msg.contains("lease 2a"))
        );
        assert!(matches!(ApiError::from(Error::Store("bad record".into())), ApiError::Internal(_)));
        let spec = ApiError::from(Error::InvalidStoreSpec { spec: "x".into(), reason: "unknown".into() });
        assert!(matches!(spec, ApiError::InvalidArgument { field, .. } if field == "store"));
    }
}
