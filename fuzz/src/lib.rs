//! One function per parser of untrusted bytes, shared by the `cargo fuzz` targets
//! (`fuzz_targets/`) and by the regression test that replays `regressions/` and the corpus in
//! `make test` (`tests/tests/it/fuzz_regressions.rs` includes this file). The targets of the model
//! crate, which links libtorch, are in `model_targets.rs`, built only with the `model` feature.
//!
//! Each function feeds the bytes to the same code an agent or the coordinator runs on data
//! from the network or disk, and asserts the invariants that must hold for *any* input: no
//! panic, and whatever is accepted re-encodes to the bytes that were signed or round-trips
//! through the domain types unchanged. Errors are fine; panics and broken invariants are bugs.

use std::time::{Duration, SystemTime};

use llmchain_artifact::{
    Manifest, RollbackStatement, SigningKey, TrustDocument, TrustStore, TrustedKeys, trust::is_key_id,
};
use llmchain_proto::{
    model::{self, ModelName, ModelRef, SignedManifest, SignedStatement, SummaryReport},
    pb,
};
use prost::Message;

/// The trainer key the seed corpus is signed with (fixed, so seeds verify).
pub fn trainer_key() -> SigningKey {
    SigningKey::from_seed([7; 32])
}

/// The root key the seed trust documents are signed with.
pub fn root_key() -> SigningKey {
    SigningKey::from_seed([9; 32])
}

fn now() -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000)
}

/// Manifests: canonical decoding, then `SignedManifest` decoding and signature verification.
pub fn manifest(data: &[u8]) {
    if let Ok(m) = Manifest::from_canonical_bytes(data) {
        assert_eq!(m.canonical_bytes(), data, "an accepted manifest must be its own canonical encoding");
        let _ = m.is_expired(now());
        let _ = m.total_bytes();
        assert!(m.blob_digests().count() == m.tensors.len() + 1);
    }
    let Ok(wire) = pb::SignedManifest::decode(data) else { return };
    let Ok(signed) = SignedManifest::try_from(wire) else { return };
    let keys = TrustedKeys::new([trainer_key().public()]);
    if let Ok(m) = keys.verify(&signed) {
        assert_eq!(m.canonical_bytes(), signed.manifest);
    }
}

/// Trust documents and rollback statements: canonical decoding, then signed verification and
/// application to a trust store.
pub fn trust(data: &[u8]) {
    if let Ok(d) = TrustDocument::from_canonical_bytes(data) {
        assert_eq!(d.canonical_bytes(), data);
        assert!(d.version >= 1);
        assert!(d.revoked_key_ids.iter().all(|id| is_key_id(id)));
    }
    if let Ok(s) = RollbackStatement::from_canonical_bytes(data) {
        assert_eq!(s.canonical_bytes(), data);
    }
    let Ok(wire) = pb::SignedStatement::decode(data) else { return };
    let Ok(signed) = SignedStatement::try_from(wire) else { return };
    let root = root_key().public();
    if let Ok(d) = TrustDocument::verify(&signed, &root) {
        let keys = TrustedKeys::new([trainer_key().public()]);
        let mut store = TrustStore::new(Some(root), keys.clone());
        store.apply(&signed).expect("a verified document applies to an empty store");
        assert_eq!(store.version(), d.version);
        assert!(d.revoked_key_ids.iter().all(|id| keys.get(id).is_err()));
    }
    let keys = TrustedKeys::new([trainer_key().public()]);
    let target = ModelRef { model: ModelName::parse("model", "fuzz").expect("valid name"), version: 1 };
    let _ = RollbackStatement::verify(&signed, &keys, &target, now());
}

/// Records (TASK.md JSON) as the agent's pipeline parses and preprocesses them, one per line.
pub fn records(data: &[u8]) {
    for line in std::iter::once(data).chain(data.split(|&b| b == b'\n')) {
        if let Ok(r) = llmchain_task::Record::parse(line) {
            let text = llmchain_task::preprocess::record_text(&r);
            assert!(!text.is_empty());
        }
    }
}

/// Summaries as the coordinator receives them: protobuf decoding and domain validation, and
/// the round trip of an accepted summary.
pub fn summaries(data: &[u8]) {
    if let Ok(wire) = pb::ReportSummariesRequest::decode(data) {
        let _ = SummaryReport::try_from(wire);
    }
    if let Ok(wire) = pb::Summary::decode(data)
        && let Ok(s) = model::Summary::try_from(wire)
    {
        let again = model::Summary::try_from(pb::Summary::from(s.clone()));
        assert_eq!(again.as_ref().ok(), Some(&s), "an accepted summary must round-trip: {again:?}");
    }
}
