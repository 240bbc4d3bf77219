//! Delta planning: which tensors of a version a holder of some blobs still has to fetch.
//!
//! Blobs are content-addressed, so the delta is simply the tensors whose digests the holder
//! lacks; two tensors with the same bytes are fetched once.

use std::collections::HashSet;

use llmchain_proto::model::{Digest, TensorInfo};

use crate::Manifest;

/// What a holder must fetch to assemble a version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeltaPlan {
    /// Tensors whose blobs are missing, one per distinct digest, in manifest order.
    pub needed: Vec<TensorInfo>,
    /// Bytes to download (each missing digest counted once).
    pub delta_bytes: u64,
    /// Bytes of all tensors of the version.
    pub total_bytes: u64,
}

/// Plans the fetch of `manifest`'s tensors for a holder of the blobs in `have`.
pub fn plan_delta(manifest: &Manifest, have: &HashSet<Digest>) -> DeltaPlan {
    let mut queued = HashSet::new();
    let mut needed = Vec::new();
    let mut delta_bytes = 0;
    for t in &manifest.tensors {
        if !have.contains(&t.digest) && queued.insert(t.digest) {
            delta_bytes += t.size;
            needed.push(t.clone());
        }
    }
    DeltaPlan { needed, delta_bytes, total_bytes: manifest.total_bytes() }
}

/// Bytes of `manifest`'s tensors that a holder of `parent` lacks.
pub fn delta_bytes_from(manifest: &Manifest, parent: &Manifest) -> u64 {
    let have: HashSet<Digest> = parent.tensors.iter().map(|t| t.digest).collect();
    plan_delta(manifest, &have).delta_bytes
}
