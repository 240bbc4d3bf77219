//! Key/value state with revisions, watches, leases and transactions (embedded and etcd backends).
//!
//! The [`Store`] trait is modelled on etcd's v3 data model so that both backends behave alike
//! and the one conformance suite ([`conformance`]) can hold them to the same contract:
//!
//! - Keys are non-empty UTF-8 strings; values are opaque bytes.
//! - Every change (put, delete, lease expiry, transaction) gets a revision from **one
//!   monotonic counter per store**. All changes of one transaction share its revision.
//! - Each key carries `create_revision`, `mod_revision` and `version` (number of puts since it
//!   was created; 0 means absent), like etcd.
//! - Prefixes are **raw string prefixes**: `list("a/b")` also returns `a/bc`. Callers that mean
//!   a directory end their prefix with `/`.
//! - A watch delivers every change with a revision strictly greater than `from_revision`, in
//!   revision order. When that history is gone it yields [`Error::Compacted`](crate::Error::Compacted) and ends; the
//!   caller re-lists and watches from the listed revision.
//! - Keys attached to a lease are deleted (with watch delete events) when the lease expires or
//!   is revoked.

pub mod election;
pub mod embedded;
pub mod etcd;

#[cfg(feature = "testing")]
pub mod conformance;
#[cfg(feature = "testing")]
pub mod testing;

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::stream::BoxStream;
use llmchain_proto::ApiError;

use crate::error::{Error, Result};

/// A store revision: the value of the store's single monotonic change counter.
pub type Revision = i64;

/// The identifier of a lease granted by [`Store::grant_lease`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LeaseId(pub i64);

impl fmt::Display for LeaseId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:x}", self.0)
    }
}

/// One key with its value and etcd-style metadata.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyValue {
    /// The key, without any backend namespace prefix.
    pub key: String,
    /// The value bytes.
    pub value: Bytes,
    /// Revision of the put that created the key (since it was last absent).
    pub create_revision: Revision,
    /// Revision of the latest change to the key.
    pub mod_revision: Revision,
    /// Number of puts since the key was created (1 after the first put).
    pub version: i64,
    /// The lease the key is attached to, if any.
    pub lease: Option<LeaseId>,
}

/// The result of [`Store::list`]: the matching keys and the revision they were read at.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Listing {
    /// Matching keys, sorted by key.
    pub kvs: Vec<KeyValue>,
    /// The store revision of the snapshot the keys come from; watch from here to follow on.
    pub revision: Revision,
}

/// A condition of a [`Txn`]. Every comparison is an equality; an absent key has revision and
/// version 0 and never matches a [`Compare::Value`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Compare {
    /// The key's `mod_revision` equals the revision (0: the key is absent).
    ModRevision(String, Revision),
    /// The key's `version` equals the version (0: the key is absent).
    Version(String, i64),
    /// The key exists and its value equals the bytes.
    Value(String, Bytes),
}

impl Compare {
    /// The condition "`key` does not exist".
    pub fn absent(key: impl Into<String>) -> Self {
        Compare::Version(key.into(), 0)
    }

    /// The key the comparison reads.
    pub fn key(&self) -> &str {
        match self {
            Compare::ModRevision(key, _) | Compare::Version(key, _) | Compare::Value(key, _) => key,
        }
    }
}

/// One operation of a [`Txn`] branch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    /// Sets `key` to `value`, attached to `lease` when given.
    Put {
        /// The key to write.
        key: String,
        /// The new value.
        value: Bytes,
        /// The lease to attach the key to.
        lease: Option<LeaseId>,
    },
    /// Deletes `key` if present.
    Delete {
        /// The key to delete.
        key: String,
    },
    /// Reads `key` as of the transaction.
    Get {
        /// The key to read.
        key: String,
    },
}

impl Op {
    /// A put without a lease.
    pub fn put(key: impl Into<String>, value: impl Into<Bytes>) -> Self {
        Op::Put { key: key.into(), value: value.into(), lease: None }
    }

    /// A put attached to `lease`.
    pub fn put_with_lease(key: impl Into<String>, value: impl Into<Bytes>, lease: LeaseId) -> Self {
        Op::Put { key: key.into(), value: value.into(), lease: Some(lease) }
    }

    /// A delete.
    pub fn delete(key: impl Into<String>) -> Self {
        Op::Delete { key: key.into() }
    }

    /// A read.
    pub fn get(key: impl Into<String>) -> Self {
        Op::Get { key: key.into() }
    }

    /// The key the operation touches.
    pub fn key(&self) -> &str {
        match self {
            Op::Put { key, .. } | Op::Delete { key } | Op::Get { key } => key,
        }
    }
}

/// The outcome of one [`Op`], in the order the ops were given.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OpResponse {
    /// The put was applied at the transaction's revision.
    Put,
    /// Whether the delete removed a key.
    Delete {
        /// True when the key existed.
        deleted: bool,
    },
    /// The value read, if the key exists.
    Get(Option<KeyValue>),
}

/// A compare-and-swap transaction: if every compare holds, `success` runs, else `failure`;
/// atomically, at one revision.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Txn {
    /// Conditions that must all hold for `success` to run.
    pub compares: Vec<Compare>,
    /// Ops run when every compare holds.
    pub success: Vec<Op>,
    /// Ops run otherwise.
    pub failure: Vec<Op>,
}

impl Txn {
    /// An empty transaction (no compares: `success` always runs).
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets the conditions.
    pub fn when(mut self, compares: impl IntoIterator<Item = Compare>) -> Self {
        self.compares = compares.into_iter().collect();
        self
    }

    /// Sets the ops run when the conditions hold.
    pub fn and_then(mut self, ops: impl IntoIterator<Item = Op>) -> Self {
        self.success = ops.into_iter().collect();
        self
    }

    /// Sets the ops run when a condition fails.
    pub fn or_else(mut self, ops: impl IntoIterator<Item = Op>) -> Self {
        self.failure = ops.into_iter().collect();
        self
    }

    /// Checks every key of the transaction (see [`validate_key`]) and refuses a branch that
    /// writes one key twice: etcd refuses it, so allowing it in one backend would let code
    /// pass its tests there and fail on the other.
    pub fn validate(&self) -> Result<()> {
        self.compares
            .iter()
            .map(Compare::key)
            .chain(self.success.iter().chain(&self.failure).map(Op::key))
            .try_for_each(validate_key)?;
        for branch in [&self.success, &self.failure] {
            let mut written = std::collections::HashSet::new();
            for op in branch.iter().filter(|op| !matches!(op, Op::Get { .. })) {
                if !written.insert(op.key()) {
                    return Err(ApiError::invalid("txn", format!("key {:?} written twice", op.key())).into());
                }
            }
        }
        Ok(())
    }
}

/// The outcome of a [`Txn`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TxnResult {
    /// True when every compare held and `success` ran.
    pub succeeded: bool,
    /// The store revision after the transaction (unchanged if it wrote nothing).
    pub revision: Revision,
    /// One response per op of the branch that ran.
    pub responses: Vec<OpResponse>,
}

/// One change seen by a watch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WatchEvent {
    /// The key was created or updated; `kv.mod_revision` is the change's revision.
    Put(KeyValue),
    /// The key was deleted (explicitly, or because its lease ended) at `revision`.
    Delete {
        /// The deleted key.
        key: String,
        /// The revision of the delete.
        revision: Revision,
    },
}

impl WatchEvent {
    /// The key the event is about.
    pub fn key(&self) -> &str {
        match self {
            WatchEvent::Put(kv) => &kv.key,
            WatchEvent::Delete { key, .. } => key,
        }
    }

    /// The revision of the change.
    pub fn revision(&self) -> Revision {
        match self {
            WatchEvent::Put(kv) => kv.mod_revision,
            WatchEvent::Delete { revision, .. } => *revision,
        }
    }
}

/// The events of a watch, in revision order. After an error the stream ends.
pub type WatchStream = BoxStream<'static, Result<WatchEvent>>;

/// Key/value state shared by the coordinator's services; see the module docs for the contract.
#[async_trait::async_trait]
pub trait Store: Send + Sync + 'static {
    /// Reads one key.
    async fn get(&self, key: &str) -> Result<Option<KeyValue>>;

    /// Writes `key`, attached to `lease` when given; returns the revision of the write.
    /// Fails with [`Error::LeaseExpired`](crate::Error::LeaseExpired) if the lease does not exist.
    async fn put(&self, key: &str, value: Bytes, lease: Option<LeaseId>) -> Result<Revision>;

    /// Deletes `key`; returns whether it existed.
    async fn delete(&self, key: &str) -> Result<bool>;

    /// Lists every key starting with `prefix` (a raw string prefix), sorted by key.
    async fn list(&self, prefix: &str) -> Result<Listing>;

    /// Runs a compare-and-swap transaction atomically.
    async fn txn(&self, txn: Txn) -> Result<TxnResult>;

    /// Streams every change under `prefix` with a revision greater than `from_revision`.
    /// Yields [`Error::Compacted`](crate::Error::Compacted) (then ends) when that history is no longer available.
    async fn watch(&self, prefix: &str, from_revision: Revision) -> Result<WatchStream>;

    /// Grants a lease that expires `ttl` after its grant or last keep-alive. Backends may round
    /// the TTL up (etcd counts whole seconds).
    async fn grant_lease(&self, ttl: Duration) -> Result<LeaseId>;

    /// Renews a lease; returns its TTL. Fails with [`Error::LeaseExpired`](crate::Error::LeaseExpired) once it is gone.
    async fn keep_alive(&self, lease: LeaseId) -> Result<Duration>;

    /// Ends a lease now, deleting the keys attached to it. Fails with [`Error::LeaseExpired`](crate::Error::LeaseExpired)
    /// if it is already gone.
    async fn revoke_lease(&self, lease: LeaseId) -> Result<()>;

    /// The store's latest revision.
    async fn current_revision(&self) -> Result<Revision>;

    /// Most ops one [`Txn`] branch (and most compares) the backend accepts, so batching
    /// writers (agent records, summaries) size their transactions to fit.
    fn max_txn_ops(&self) -> usize {
        DEFAULT_MAX_TXN_OPS
    }
}

/// [`Store::max_txn_ops`] of a backend without a limit of its own: large enough that batching
/// pays off, small enough that one transaction stays short.
pub const DEFAULT_MAX_TXN_OPS: usize = 1024;

/// Rejects keys the data model does not allow (empty ones: etcd cannot store them).
pub fn validate_key(key: &str) -> Result<()> {
    if key.is_empty() {
        return Err(ApiError::invalid("key", "must not be empty").into());
    }
    Ok(())
}

/// Where the state lives, parsed from a `--store` spec by [`StoreSpec::parse`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StoreSpec {
    /// `embedded:PATH`: one local redb file.
    Embedded {
        /// The database file (created if missing).
        path: std::path::PathBuf,
    },
    /// `etcd:URL[,URL…][?prefix=P]`: an etcd cluster; every key lives under `prefix`, which
    /// must end with `/` (default [`etcd::DEFAULT_PREFIX`]).
    Etcd {
        /// Client endpoints, e.g. `http://127.0.0.1:2379`.
        endpoints: Vec<String>,
        /// Namespace prepended to every key.
        prefix: String,
    },
}

impl StoreSpec {
    /// Parses `embedded:PATH` or `etcd:URL[,URL…][?prefix=P]`.
    pub fn parse(spec: &str) -> Result<Self> {
        let invalid =
            |reason: &str| Error::InvalidStoreSpec { spec: spec.to_owned(), reason: reason.to_owned() };
        let Some((scheme, rest)) = spec.split_once(':') else {
            return Err(invalid("expected embedded:PATH or etcd:URL[,URL...][?prefix=P]"));
        };
        match scheme {
            "embedded" => {
                if rest.is_empty() {
                    return Err(invalid("missing file path after embedded:"));
                }
                Ok(StoreSpec::Embedded { path: rest.into() })
            }
            "etcd" => {
                let (urls, query) = match rest.split_once('?') {
                    Some((urls, query)) => (urls, Some(query)),
                    None => (rest, None),
                };
                let mut prefix = etcd::DEFAULT_PREFIX.to_owned();
                if let Some(query) = query {
                    for pair in query.split('&') {
                        match pair.split_once('=') {
                            // Without the trailing `/` one deployment's namespace would be a raw
                            // prefix of another's (`/a` of `/ab/...`).
                            Some(("prefix", value)) if value.ends_with('/') => prefix = value.to_owned(),
                            Some(("prefix", _)) => return Err(invalid("prefix must end with /")),
                            _ => return Err(invalid(&format!("unknown option {pair:?} (only prefix=P)"))),
                        }
                    }
                }
                let endpoints: Vec<String> = urls.split(',').map(str::trim).map(str::to_owned).collect();
                for endpoint in &endpoints {
                    let valid = ["http://", "https://"]
                        .iter()
                        .any(|s| endpoint.strip_prefix(s).is_some_and(|host| !host.is_empty()));
                    if !valid {
                        return Err(invalid(&format!(
                            "endpoint {endpoint:?} is not an http(s)://host:port url"
                        )));
                    }
                }
                Ok(StoreSpec::Etcd { endpoints, prefix })
            }
            other => Err(invalid(&format!("unknown store kind {other:?} (embedded or etcd)"))),
        }
    }
}

/// Opens the store a `--store` spec names (see [`StoreSpec::parse`] for the syntax).
pub async fn open(spec: &str) -> Result<Arc<dyn Store>> {
    match StoreSpec::parse(spec)? {
        StoreSpec::Embedded { path } => Ok(Arc::new(embedded::EmbeddedStore::open(&path).await?)),
        StoreSpec::Etcd { endpoints, prefix } => {
            Ok(Arc::new(etcd::EtcdStore::connect(&endpoints, &prefix).await?))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_embedded_and_etcd_specs() {
        assert_eq!(
            StoreSpec::parse("embedded:/var/lib/llmchain/state.redb").unwrap(),
            StoreSpec::Embedded { path: "/var/lib/llmchain/state.redb".into() }
        );
        assert_eq!(
            StoreSpec::parse("etcd:http://a:2379,http://b:2379").unwrap(),
            StoreSpec::Etcd {
                endpoints: vec!["http://a:2379".into(), "http://b:2379".into()],
                prefix: etcd::DEFAULT_PREFIX.into()
            }
        );
        assert_eq!(
            StoreSpec::parse("etcd:https://a:2379?prefix=/team/x/").unwrap(),
            StoreSpec::Etcd { endpoints: vec!["https://a:2379".into()], prefix: "/team/x/".into() }
        );
    }

    #[test]
    fn rejects_bad_specs_with_a_reason() {
        for (spec, needle) in [
            ("state.redb", "expected embedded:PATH"),
            ("embedded:", "missing file path"),
            ("zookeeper:x", "unknown store kind"),
            ("etcd:", "not an http(s)"),
            ("etcd:127.0.0.1:2379", "not an http(s)"),
            ("etcd:http://a:2379?ttl=3", "unknown option"),
            ("etcd:http://a:2379?prefix=/team", "must end with /"),
        ] {
            let err = StoreSpec::parse(spec).unwrap_err();
            assert!(matches!(err, Error::InvalidStoreSpec { .. }), "{spec}: {err}");
            assert!(err.to_string().contains(needle), "{spec}: {err}");
        }
    }
}
