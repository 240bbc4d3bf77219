//! The artifact crate's error enum and its mapping to the API's domain error.
//!
//! Variants are split by what a caller can do about them: malformed input (`Invalid`,
//! `NotCanonical`, `Decode`), an untrusted or forged signature (`UnknownKey`, `BadSignature`),
//! corrupt bytes (`DigestMismatch`, `SizeMismatch`) and local failures (`Io`, `Key`).

use llmchain_proto::{ApiError, model::Digest};

/// Result with the artifact crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong while handling manifests, keys and blobs.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A field of a manifest is malformed or inconsistent.
    #[error(transparent)]
    Invalid(#[from] ApiError),
    /// The manifest bytes are not a protobuf `Manifest`.
    #[error("manifest is not valid protobuf: {0}")]
    Decode(#[from] prost::DecodeError),
    /// The manifest decodes but re-encoding it does not give back the same bytes.
    #[error("manifest bytes are not canonical: {0}")]
    NotCanonical(String),
    /// The signature names a key that is not trusted.
    #[error("signing key {0} is not trusted")]
    UnknownKey(String),
    /// The signature names a key that a trust document revoked.
    #[error("signing key {0} is revoked")]
    RevokedKey(String),
    /// A trust document is not newer than the one already held.
    #[error("trust document version {got} is not newer than the held version {have}")]
    StaleTrustDocument {
        /// Version held.
        have: u64,
        /// Version offered.
        got: u64,
    },
    /// A trust document or rollback statement is malformed, mismatched or expired.
    #[error("{0}")]
    Statement(String),
    /// The signature does not verify against the named trusted key.
    #[error("signature does not verify against key {0}")]
    BadSignature(String),
    /// A blob's bytes hash to another digest than expected.
    #[error("blob {expected} hashes to {actual}")]
    DigestMismatch {
        /// Digest the bytes should have.
        expected: Digest,
        /// Digest the bytes have.
        actual: Digest,
    },
    /// A blob holds another number of bytes than expected.
    #[error("blob {digest} holds {actual} bytes, expected {expected}")]
    SizeMismatch {
        /// The blob.
        digest: Digest,
        /// Bytes expected.
        expected: u64,
        /// Bytes found.
        actual: u64,
    },
    /// A key file is malformed or has unsafe permissions.
    #[error("key file {path}: {reason}")]
    Key {
        /// The file.
        path: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The safetensors header could not be built.
    #[error("safetensors header: {0}")]
    Safetensors(String),
    /// Local I/O failed.
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
}

impl From<Error> for ApiError {
    fn from(err: Error) -> Self {
        match err {
            Error::Invalid(api) => api,
            Error::Decode(_) | Error::NotCanonical(_) => ApiError::invalid("manifest", err.to_string()),
            Error::UnknownKey(_) | Error::BadSignature(_) | Error::RevokedKey(_) | Error::Statement(_) => {
                ApiError::PermissionDenied(err.to_string())
            }
            Error::StaleTrustDocument { .. } => ApiError::FailedPrecondition(err.to_string()),
            Error::DigestMismatch { .. } | Error::SizeMismatch { .. } => ApiError::DataLoss(err.to_string()),
            Error::Key { .. } | Error::Safetensors(_) | Error::Io(_) => ApiError::Internal(err.to_string()),
        }
    }
}
