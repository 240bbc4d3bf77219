//! Revoked identities: `security/revoked/<name>` in the store, mirrored in memory.
//!
//! The store is the truth (every replica sees a revocation); each coordinator keeps a copy in a
//! `watch` channel that a task follows with a store watch (re-listing after compaction or a
//! broken watch), so checking a request costs one hash lookup. The coordinator that handles
//! `RevokeAgent` also updates its copy at once, so the revoked caller's very next request there
//! is refused even before the watch event arrives. Streams of a revoked identity end: the
//! authorization layer waits on [`RevocationSet::revoked`] beside each response.

use std::{
    collections::HashSet,
    sync::Arc,
    time::{Duration, SystemTime},
};

use futures::StreamExt;
use llmchain_proto::{ApiError, model::AgentId, pb};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::{
    Error, Result,
    store::{Store, WatchEvent},
};

/// Prefix of revocation records.
pub const REVOKED_PREFIX: &str = "security/revoked/";

/// Pause before re-listing after the watch failed.
const RETRY: Duration = Duration::from_secs(1);

/// The key of `name`'s revocation record.
pub fn revoked_key(name: &str) -> String {
    format!("{REVOKED_PREFIX}{name}")
}

/// Why and when an identity was revoked (stored as JSON).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RevocationRecord {
    /// The operator's reason, for the audit trail.
    pub reason: String,
    /// When, in seconds since the Unix epoch.
    pub revoked_at_unix_s: u64,
    /// The operator who revoked it (empty in insecure mode).
    pub revoked_by: String,
}

impl RevocationRecord {
    /// The stored bytes.
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a revocation record always serializes")
    }

    /// Decodes the record stored at `key`.
    pub fn decode(key: &str, bytes: &[u8]) -> Result<Self> {
        serde_json::from_slice(bytes)
            .map_err(|e| Error::Store(format!("corrupt revocation record {key}: {e}")))
    }
}

/// The names of revoked identities, kept current from the store.
#[derive(Clone)]
pub struct RevocationSet {
    tx: Arc<watch::Sender<Arc<HashSet<String>>>>,
}

impl Default for RevocationSet {
    fn default() -> Self {
        RevocationSet { tx: Arc::new(watch::Sender::new(Arc::default())) }
    }
}

impl std::fmt::Debug for RevocationSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RevocationSet").field("revoked", &self.tx.borrow().len()).finish()
    }
}

impl RevocationSet {
    /// Loads the revoked names from `store`, then follows the store until `cancel` fires.
    ///
    /// Returns after the first listing, so no request is judged against an empty set.
    pub async fn follow(store: Arc<dyn Store>, cancel: CancellationToken) -> Result<RevocationSet> {
        let set = RevocationSet::default();
        let revision = set.relist(store.as_ref()).await?;
        let follower = set.clone();
        tokio::spawn(async move { follower.run(store, revision, cancel).await });
        Ok(set)
    }

    /// Whether `name` is revoked.
    pub fn contains(&self, name: &str) -> bool {
        self.tx.borrow().contains(name)
    }

    /// Number of revoked names.
    pub fn len(&self) -> usize {
        self.tx.borrow().len()
    }

    /// Whether no name is revoked.
    pub fn is_empty(&self) -> bool {
        self.tx.borrow().is_empty()
    }

    /// Marks `name` revoked in this copy (the store write is the caller's).
    pub fn insert(&self, name: &str) {
        self.tx.send_if_modified(|set| {
            if set.contains(name) {
                return false;
            }
            Arc::make_mut(set).insert(name.to_string());
            true
        });
    }

    /// Completes once `name` is revoked (at once if it already is).
    pub fn revoked(&self, name: String) -> impl Future<Output = ()> + Send + 'static {
        let mut rx = self.tx.subscribe();
        async move {
            // The sender lives as long as any set clone; if it goes, the server is gone too.
            let _ = rx.wait_for(|set| set.contains(&name)).await;
        }
    }

    /// Replaces the copy with the store's records; returns the listing's revision.
    async fn relist(&self, store: &dyn Store) -> Result<i64> {
        let listing = store.list(REVOKED_PREFIX).await?;
        let names: HashSet<String> = listing
            .kvs
            .iter()
            .filter_map(|kv| kv.key.strip_prefix(REVOKED_PREFIX).map(str::to_string))
            .collect();
        self.tx.send_replace(Arc::new(names));
        Ok(listing.revision)
    }

    async fn run(self, store: Arc<dyn Store>, mut revision: i64, cancel: CancellationToken) {
        loop {
            let outcome = tokio::select! {
                () = cancel.cancelled() => return,
                outcome = self.follow_from(store.as_ref(), revision) => outcome,
            };
            match outcome {
                Err(Error::Compacted { .. }) => {}
                Err(e) => warn!(error = %e, "revocation watch failed; re-listing"),
                Ok(()) => warn!("revocation watch ended; re-listing"),
            }
            loop {
                tokio::select! {
                    () = cancel.cancelled() => return,
                    () = tokio::time::sleep(RETRY) => {}
                }
                match self.relist(store.as_ref()).await {
                    Ok(r) => {
                        revision = r;
                        break;
                    }
                    Err(e) => warn!(error = %e, "cannot list revocations; retrying"),
                }
            }
        }
    }

    async fn follow_from(&self, store: &dyn Store, revision: i64) -> Result<()> {
        let mut events = store.watch(REVOKED_PREFIX, revision).await?;
        while let Some(event) = events.next().await {
            match event? {
                WatchEvent::Put(kv) => {
                    if let Some(name) = kv.key.strip_prefix(REVOKED_PREFIX) {
                        self.insert(name);
                    }
                }
                WatchEvent::Delete { key, .. } => {
                    if let Some(name) = key.strip_prefix(REVOKED_PREFIX) {
                        self.tx.send_if_modified(|set| set.contains(name) && Arc::make_mut(set).remove(name));
                    }
                }
            }
        }
        Ok(())
    }
}

/// Writes `name`'s revocation record and marks it revoked in `set`.
pub async fn revoke(
    store: &dyn Store,
    set: &RevocationSet,
    name: &str,
    reason: &str,
    revoked_by: &str,
) -> Result<RevocationRecord> {
    let revoked_at_unix_s =
        SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default().as_secs();
    let record = RevocationRecord {
        reason: reason.to_string(),
        revoked_at_unix_s,
        revoked_by: revoked_by.to_string(),
    };
    store.put(&revoked_key(name), record.encode().into(), None).await?;
    set.insert(name);
    info!(identity = %name, reason = %reason, revoked_by = %revoked_by, "identity revoked");
    Ok(record)
}

/// A validated `RevokeAgent` request: the agent and the reason.
pub fn parse_request(r: pb::RevokeAgentRequest) -> Result<(AgentId, String), ApiError> {
    let agent = AgentId::parse("agent_id", &r.agent_id)?;
    if r.reason.len() > 1024 || r.reason.chars().any(char::is_control) {
        return Err(ApiError::invalid("reason", "must be at most 1024 bytes without control characters"));
    }
    Ok((agent, r.reason))
}

/// The refusal of a request by a revoked identity.
pub fn revoked_error(name: &str) -> ApiError {
    ApiError::Unauthenticated(format!("the certificate of {name} is revoked"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::embedded::EmbeddedStore;

    #[tokio::test]
    async fn follows_revocations_written_by_any_replica() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(EmbeddedStore::open(&dir.path().join("s.redb")).await.unwrap());
        let before =
            RevocationRecord { reason: "stolen".into(), revoked_at_unix_s: 1, revoked_by: "ops".into() };
        store.put(&revoked_key("early"), before.encode().into(), None).await.unwrap();

        let cancel = CancellationToken::new();
        let set = RevocationSet::follow(Arc::clone(&store), cancel.clone()).await.unwrap();
        assert!(set.contains("early"), "loaded by the first listing");
        assert!(!set.contains("agent-1"));

        // Another replica's write reaches this copy through the watch.
        let other = RevocationSet::default();
        let waiter = set.revoked("agent-1".into());
        let record = revoke(store.as_ref(), &other, "agent-1", "decommissioned", "ops").await.unwrap();
        tokio::time::timeout(Duration::from_secs(5), waiter).await.expect("revocation seen");
        assert!(set.contains("agent-1"));
        let stored = store.get(&revoked_key("agent-1")).await.unwrap().unwrap();
        assert_eq!(RevocationRecord::decode(&stored.key, &stored.value).unwrap(), record);

        store.delete(&revoked_key("early")).await.unwrap();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while set.contains("early") {
            assert!(tokio::time::Instant::now() < deadline, "reinstatement not seen");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(set.len(), 1);
        cancel.cancel();
    }
}
