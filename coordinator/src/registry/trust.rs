//! Relaying root-signed trust documents (key rotation) to agents.
//!
//! The coordinator holds no root key and is not trusted with one: it checks only that a
//! document is well formed and newer than the stored one, so operators get an early error,
//! and serves the latest to agents, which verify the root signature themselves. A
//! compromised coordinator can withhold a document but cannot forge or roll one back.

use bytes::Bytes;
use llmchain_artifact::TrustDocument;
use llmchain_proto::{ApiError, model::SignedStatement, pb};
use prost::Message;
use tracing::info;

use crate::{
    Error, Result,
    store::{Compare, Op, Store, Txn},
};

/// Store key of the latest trust document (an encoded `pb::SignedStatement`).
pub const TRUST_DOCUMENT_KEY: &str = "security/trust-document";

fn corrupt(e: impl std::fmt::Display) -> Error {
    ApiError::DataLoss(format!("{TRUST_DOCUMENT_KEY}: {e}")).into()
}

fn decode(bytes: &[u8]) -> Result<(SignedStatement, u64)> {
    let signed =
        SignedStatement::try_from(pb::SignedStatement::decode(bytes).map_err(corrupt)?).map_err(corrupt)?;
    let version = TrustDocument::from_canonical_bytes(&signed.payload).map_err(corrupt)?.version;
    Ok((signed, version))
}

/// The latest trust document, if one was published.
pub async fn latest(store: &dyn Store) -> Result<Option<SignedStatement>> {
    Ok(store.get(TRUST_DOCUMENT_KEY).await?.map(|kv| decode(&kv.value)).transpose()?.map(|(s, _)| s))
}

/// Stores `signed` when it is a well-formed trust document newer than the stored one.
pub async fn publish(store: &dyn Store, signed: SignedStatement) -> Result<u64> {
    let doc = TrustDocument::from_canonical_bytes(&signed.payload)
        .map_err(|e| ApiError::invalid("document", format!("not a trust document: {e}")))?;
    let value = Bytes::from(pb::SignedStatement::from(signed.clone()).encode_to_vec());
    let current = store.get(TRUST_DOCUMENT_KEY).await?;
    let compare = match &current {
        Some(kv) => {
            let (_, held) = decode(&kv.value)?;
            if doc.version <= held {
                return Err(ApiError::FailedPrecondition(format!(
                    "trust document version {} is not newer than the stored version {held}",
                    doc.version
                ))
                .into());
            }
            Compare::ModRevision(TRUST_DOCUMENT_KEY.into(), kv.mod_revision)
        }
        None => Compare::absent(TRUST_DOCUMENT_KEY),
    };
    let txn = Txn::new().when([compare]).and_then([Op::put(TRUST_DOCUMENT_KEY, value)]);
    if !store.txn(txn).await?.succeeded {
        return Err(ApiError::FailedPrecondition(
            "another trust document was published at the same time".into(),
        )
        .into());
    }
    info!(version = doc.version, keys = doc.trainer_keys.len(), revoked = doc.revoked_key_ids.len(), key_id = %signed.key_id, "trust document stored");
    Ok(doc.version)
}
