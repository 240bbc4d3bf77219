//! What an agent may read: the version assigned to it and the blobs of that version.
//!
//! An agent's assignment is `fleet/assignments/<agent id>` (written by `Assign` and the rollout
//! controller); the version it names, and every blob its manifest lists (tensors and
//! tokenizer), are the agent's to read. Checking a `FetchBlob` costs one store read of the
//! assignment: the manifest's digest set is cached per agent and reused while the assignment's
//! revision is unchanged, so a sync of hundreds of blobs decodes the manifest once.

use std::{
    collections::{HashMap, HashSet},
    sync::{Arc, Mutex},
};

use llmchain_proto::{
    ApiError,
    model::{AgentId, Digest, ModelRef},
};

use crate::{
    Result,
    fleet::records::{assignment_key, decode_assignment},
    registry::records::{PublishedVersion, version_key},
    store::{Revision, Store},
};

/// Agents whose scope is cached before the cache starts over (bounds memory).
const MAX_CACHED_AGENTS: usize = 100_000;

/// The version assigned to one agent, with its blobs.
#[derive(Debug, Clone)]
pub struct AgentScope {
    /// The assigned version.
    pub target: ModelRef,
    /// Digests of every blob of the version.
    pub blobs: Arc<HashSet<Digest>>,
}

/// Looks up (and caches) what each agent may read.
pub struct AgentScopes {
    store: Arc<dyn Store>,
    cache: Mutex<HashMap<String, (Revision, AgentScope)>>,
}

impl std::fmt::Debug for AgentScopes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentScopes").finish_non_exhaustive()
    }
}

fn denied(msg: String) -> crate::Error {
    ApiError::PermissionDenied(msg).into()
}

impl AgentScopes {
    /// Scopes read from `store`.
    pub fn new(store: Arc<dyn Store>) -> Self {
        AgentScopes { store, cache: Mutex::default() }
    }

    /// The store the scopes are read from.
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// What `agent` may read now; `None` when nothing is assigned to it.
    pub async fn scope(&self, agent: &str) -> Result<Option<AgentScope>> {
        let id = AgentId::parse("agent_id", agent)?;
        let key = assignment_key(&id);
        let Some(kv) = self.store.get(&key).await? else {
            return Ok(None);
        };
        if let Some((revision, scope)) = self.cache.lock().expect("scope cache lock").get(agent)
            && *revision == kv.mod_revision
        {
            return Ok(Some(scope.clone()));
        }
        let target = decode_assignment(&key, &kv.value)?.target;
        let vkey = version_key(&target.model, target.version);
        let blobs: HashSet<Digest> = match self.store.get(&vkey).await? {
            Some(v) => PublishedVersion::decode(&vkey, &v.value)?.manifest.blob_digests().collect(),
            // Assignments name published versions; an unpublished one grants no blobs.
            None => HashSet::new(),
        };
        let scope = AgentScope { target, blobs: Arc::new(blobs) };
        let mut cache = self.cache.lock().expect("scope cache lock");
        if cache.len() >= MAX_CACHED_AGENTS {
            cache.clear();
        }
        cache.insert(agent.to_string(), (kv.mod_revision, scope.clone()));
        Ok(Some(scope))
    }

    /// Refuses unless `version` is the one assigned to `agent`.
    pub async fn check_version(&self, agent: &str, version: &ModelRef) -> Result<()> {
        match self.scope(agent).await? {
            Some(scope) if scope.target == *version => Ok(()),
            _ => {
                Err(denied(format!("agent {agent} may only read the version assigned to it, not {version}")))
            }
        }
    }

    /// Refuses unless `digest` is a blob of the version assigned to `agent`.
    pub async fn check_blob(&self, agent: &str, digest: &Digest) -> Result<()> {
        match self.scope(agent).await? {
            Some(scope) if scope.blobs.contains(digest) => Ok(()),
            _ => Err(denied(format!(
                "agent {agent} may only fetch blobs of the version assigned to it, not {digest}"
            ))),
        }
    }
}
