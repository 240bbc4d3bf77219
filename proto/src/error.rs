//! Domain errors of the API and their one mapping to gRPC status codes.
//!
//! Every crate converts its own error enum into [`ApiError`] at the service boundary; the
//! `From<ApiError> for tonic::Status` impl below is the only place that picks status codes.

use tonic::{Code, Status};

/// Result with an [`ApiError`].
pub type ApiResult<T, E = ApiError> = std::result::Result<T, E>;

/// What went wrong, in terms a client can act on.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ApiError {
    /// A field of the request is malformed; `field` is its path, e.g. `target.model`.
    #[error("invalid {field}: {reason}")]
    InvalidArgument { field: String, reason: String },
    /// The named thing does not exist.
    #[error("{0} not found")]
    NotFound(String),
    /// The named thing exists already.
    #[error("{0} already exists")]
    AlreadyExists(String),
    /// The request is well-formed but the system is not in a state that allows it.
    #[error("{0}")]
    FailedPrecondition(String),
    /// The caller is known but not allowed to do this.
    #[error("permission denied: {0}")]
    PermissionDenied(String),
    /// The caller could not be identified.
    #[error("unauthenticated: {0}")]
    Unauthenticated(String),
    /// A size, rate or concurrency limit was hit.
    #[error("resource exhausted: {0}")]
    ResourceExhausted(String),
    /// Stored data is corrupt (e.g. a blob whose bytes no longer match its digest).
    #[error("data loss: {0}")]
    DataLoss(String),
    /// A dependency (store, disk) is unavailable; retrying may help.
    #[error("unavailable: {0}")]
    Unavailable(String),
    /// A bug or an unexpected failure.
    #[error("internal error: {0}")]
    Internal(String),
}

impl ApiError {
    /// An [`ApiError::InvalidArgument`] for `field`.
    pub fn invalid(field: impl Into<String>, reason: impl Into<String>) -> Self {
        ApiError::InvalidArgument { field: field.into(), reason: reason.into() }
    }

    /// Prefixes the field path of an `InvalidArgument` with `parent` (for nested messages).
    pub fn within(self, parent: &str) -> Self {
        match self {
            ApiError::InvalidArgument { field, reason } => {
                ApiError::InvalidArgument { field: format!("{parent}.{field}"), reason }
            }
            other => other,
        }
    }

    /// The gRPC code this error maps to.
    pub fn code(&self) -> Code {
        match self {
            ApiError::InvalidArgument { .. } => Code::InvalidArgument,
            ApiError::NotFound(_) => Code::NotFound,
            ApiError::AlreadyExists(_) => Code::AlreadyExists,
            ApiError::FailedPrecondition(_) => Code::FailedPrecondition,
            ApiError::PermissionDenied(_) => Code::PermissionDenied,
            ApiError::Unauthenticated(_) => Code::Unauthenticated,
            ApiError::ResourceExhausted(_) => Code::ResourceExhausted,
            ApiError::DataLoss(_) => Code::DataLoss,
            ApiError::Unavailable(_) => Code::Unavailable,
            ApiError::Internal(_) => Code::Internal,
        }
    }
}

impl From<ApiError> for Status {
    fn from(err: ApiError) -> Self {
        Status::new(err.code(), err.to_string())
    }
}

impl From<Status> for ApiError {
    /// Turns a status received by a client back into the domain error it came from.
    fn from(status: Status) -> Self {
        let msg = status.message().to_string();
        match status.code() {
            Code::InvalidArgument => {
                // "invalid <field>: <reason>" as written by the Display impl above.
                let rest = msg.strip_prefix("invalid ").unwrap_or(&msg);
                match rest.split_once(": ") {
                    Some((field, reason)) => ApiError::invalid(field, reason),
                    None => ApiError::invalid("request", rest),
                }
            }
            Code::NotFound => ApiError::NotFound(msg.trim_end_matches(" not found").to_string()),
            Code::AlreadyExists => {
                ApiError::AlreadyExists(msg.trim_end_matches(" already exists").to_string())
            }
            Code::FailedPrecondition | Code::Aborted | Code::OutOfRange => ApiError::FailedPrecondition(msg),
            Code::PermissionDenied => ApiError::PermissionDenied(strip(&msg, "permission denied: ")),
            Code::Unauthenticated => ApiError::Unauthenticated(strip(&msg, "unauthenticated: ")),
            Code::ResourceExhausted => ApiError::ResourceExhausted(strip(&msg, "resource exhausted: ")),
            Code::DataLoss => ApiError::DataLoss(strip(&msg, "data loss: ")),
            Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled => {
                ApiError::Unavailable(strip(&msg, "unavailable: "))
            }
            _ => ApiError::Internal(strip(&msg, "internal error: ")),
        }
    }
}

fn strip(msg: &str, prefix: &str) -> String {
    msg.strip_prefix(prefix).unwrap_or(msg).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_maps_to_its_code_and_back() {
        let cases = [
            (ApiError::invalid("target.model", "empty"), Code::InvalidArgument),
            (ApiError::NotFound("model m".into()), Code::NotFound),
            (ApiError::AlreadyExists("version 3".into()), Code::AlreadyExists),
            (ApiError::FailedPrecondition("blob missing".into()), Code::FailedPrecondition),
            (ApiError::PermissionDenied("role agent".into()), Code::PermissionDenied),
            (ApiError::Unauthenticated("no certificate".into()), Code::Unauthenticated),
            (ApiError::ResourceExhausted("too many streams".into()), Code::ResourceExhausted),
            (ApiError::DataLoss("blob corrupt".into()), Code::DataLoss),
            (ApiError::Unavailable("store down".into()), Code::Unavailable),
            (ApiError::Internal("bug".into()), Code::Internal),
        ];
        for (err, code) in cases {
            let status = Status::from(err.clone());
            assert_eq!(status.code(), code, "{err}");
            assert_eq!(ApiError::from(status), err);
        }
    }

    #[test]
    fn within_prefixes_only_invalid_argument() {
        assert_eq!(
            ApiError::invalid("model", "empty").within("target"),
            ApiError::invalid("target.model", "empty")
        );
        assert_eq!(ApiError::NotFound("x".into()).within("y"), ApiError::NotFound("x".into()));
    }
}
