//! Errors of the sync layer, split by what the caller does about them: a refused manifest is
//! never retried (it will not become trusted), a fetch error may succeed later, and a cache
//! error needs an operator (disk full, permissions).

use std::{
    io,
    path::PathBuf,
    time::{SystemTime, UNIX_EPOCH},
};

use llmchain_proto::model::{Digest, ModelRef};

/// Result with a [`SyncError`].
pub type Result<T, E = SyncError> = std::result::Result<T, E>;

/// The three families of [`SyncError`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The manifest was refused (signature, key, expiry, identity); retrying does not help.
    Refused,
    /// The coordinator could not be reached or did not deliver; retrying later may help.
    Fetch,
    /// The local cache failed (I/O) or lacks the version.
    Cache,
}

/// Why a signed manifest was refused.
#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    /// The manifest is signed by a key that is not pinned.
    #[error("manifest of {requested} is signed by {key_id}, which is not a trusted key")]
    UntrustedKey {
        /// Version asked for.
        requested: ModelRef,
        /// Key the manifest names.
        key_id: String,
    },
    /// The manifest is signed by a key a root-signed trust document revoked.
    #[error("manifest of {requested} is signed by {key_id}, which is revoked")]
    RevokedKey {
        /// Version asked for.
        requested: ModelRef,
        /// Key the manifest names.
        key_id: String,
    },
    /// The signature does not verify against the pinned key it names.
    #[error("manifest of {requested} has a signature that does not verify against {key_id}")]
    BadSignature {
        /// Version asked for.
        requested: ModelRef,
        /// Key the manifest names.
        key_id: String,
    },
    /// The signed bytes are not a valid canonical manifest.
    #[error("manifest of {requested} is malformed: {reason}")]
    InvalidManifest {
        /// Version asked for.
        requested: ModelRef,
        /// What is wrong.
        reason: String,
    },
    /// The manifest's expiry has passed.
    #[error("manifest of {id} expired at unix time {}", unix_secs(*.expires_at))]
    Expired {
        /// The version.
        id: ModelRef,
        /// When it expired.
        expires_at: SystemTime,
    },
    /// The signed manifest is for another model or version than the one asked for.
    #[error("asked for {requested} but the signed manifest is for {got}")]
    IdMismatch {
        /// Version asked for.
        requested: ModelRef,
        /// Version the signed bytes name.
        got: ModelRef,
    },
}

/// Everything that can go wrong while syncing a model version.
#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    /// The manifest was refused; nothing of it was cached.
    #[error("refused: {0}")]
    Refused(#[from] Refusal),
    /// The coordinator does not know the version.
    #[error("{id} is not published on the coordinator")]
    NotFound {
        /// The version.
        id: ModelRef,
    },
    /// The coordinator URL is unusable.
    #[error("coordinator url {url}: {message}")]
    Connect {
        /// The URL.
        url: String,
        /// Why.
        message: String,
    },
    /// The coordinator answered with an error that retrying does not fix.
    #[error("{what}: {code:?}: {message}")]
    Rpc {
        /// The operation.
        what: String,
        /// The gRPC status code.
        code: tonic::Code,
        /// The status message.
        message: String,
    },
    /// A transient failure persisted through every retry.
    #[error("{what}: gave up after {attempts} attempts without progress: {last}")]
    RetriesExhausted {
        /// The operation.
        what: String,
        /// Attempts made.
        attempts: u32,
        /// The last failure.
        last: String,
    },
    /// A blob arrived with the wrong bytes more often than allowed.
    #[error("blob {digest} arrived corrupt {times} times, last: {last}")]
    Corrupt {
        /// The blob.
        digest: Digest,
        /// Corrupt transfers.
        times: u32,
        /// The last mismatch.
        last: String,
    },
    /// The version is not complete in the cache (manifest or some blob missing).
    #[error("{id} is not in the cache: {missing}")]
    NotCached {
        /// The version.
        id: ModelRef,
        /// What is missing.
        missing: String,
    },
    /// Local cache I/O failed.
    #[error("cache {}: {source}", path.display())]
    Cache {
        /// The file or directory.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
}

fn unix_secs(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

impl SyncError {
    /// Which family the error belongs to.
    pub fn kind(&self) -> ErrorKind {
        match self {
            SyncError::Refused(_) => ErrorKind::Refused,
            SyncError::NotFound { .. }
            | SyncError::Connect { .. }
            | SyncError::Rpc { .. }
            | SyncError::RetriesExhausted { .. }
            | SyncError::Corrupt { .. } => ErrorKind::Fetch,
            SyncError::NotCached { .. } | SyncError::Cache { .. } => ErrorKind::Cache,
        }
    }

    /// Whether the manifest was refused (see [`ErrorKind::Refused`]).
    pub fn is_refused(&self) -> bool {
        self.kind() == ErrorKind::Refused
    }

    pub(crate) fn cache(path: impl Into<PathBuf>) -> impl FnOnce(io::Error) -> SyncError {
        let path = path.into();
        move |source| SyncError::Cache { path, source }
    }
}
