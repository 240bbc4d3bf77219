//! Trust decisions on a signed manifest: pinned key, signature, identity, expiry.
//!
//! The signature is checked over the exact received bytes before any field is decoded
//! ([`TrustedKeys::verify`]); only then are the identity and the expiry looked at.

use std::time::SystemTime;

use llmchain_artifact::{Error as ArtifactError, Manifest, TrustedKeys};
use llmchain_proto::model::{ModelRef, SignedManifest};

use super::error::{Refusal, Result};

/// Verifies `signed` against the pinned `keys` and checks it is `requested` and unexpired at
/// `now`. Downgrade decisions are the caller's.
pub fn verify_manifest(
    keys: &TrustedKeys,
    signed: &SignedManifest,
    requested: &ModelRef,
    now: SystemTime,
) -> Result<Manifest> {
    let manifest = keys.verify(signed).map_err(|e| match e {
        ArtifactError::UnknownKey(key_id) => Refusal::UntrustedKey { requested: requested.clone(), key_id },
        ArtifactError::RevokedKey(key_id) => Refusal::RevokedKey { requested: requested.clone(), key_id },
        ArtifactError::BadSignature(key_id) => Refusal::BadSignature { requested: requested.clone(), key_id },
        other => Refusal::InvalidManifest { requested: requested.clone(), reason: other.to_string() },
    })?;
    if manifest.id != *requested {
        return Err(Refusal::IdMismatch { requested: requested.clone(), got: manifest.id }.into());
    }
    if manifest.is_expired(now) {
        let expires_at = manifest.expires_at.unwrap_or(now);
        return Err(Refusal::Expired { id: manifest.id, expires_at }.into());
    }
    Ok(manifest)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use llmchain_artifact::{
        SigningKey,
        testing::{synthetic_version, tiny_llama},
    };

    use super::*;
    use crate::sync::SyncError;

    fn refusal(r: Result<Manifest>) -> Refusal {
        match r {
            Err(SyncError::Refused(r)) => r,
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    #[test]
    fn refusals_are_distinct() {
        let key = SigningKey::from_seed([1; 32]);
        let keys = TrustedKeys::new([key.public()]);
        let (mut manifest, _) = synthetic_version("m", 2, 1, &tiny_llama(2), |_| 0);
        let id = manifest.id.clone();
        let now = manifest.created_at + Duration::from_secs(10);
        let signed = key.sign(&manifest);
        assert_eq!(verify_manifest(&keys, &signed, &id, now).unwrap(), manifest);

        let rogue = SigningKey::from_seed([2; 32]).sign(&manifest);
        assert!(matches!(refusal(verify_manifest(&keys, &rogue, &id, now)), Refusal::UntrustedKey { .. }));

        let mut forged = signed.clone();
        forged.signature[0] ^= 1;
        assert!(verify_manifest(&keys, &forged, &id, now).unwrap_err().is_refused());
        assert!(matches!(refusal(verify_manifest(&keys, &forged, &id, now)), Refusal::BadSignature { .. }));

        let other = ModelRef { version: 3, ..id.clone() };
        assert!(matches!(refusal(verify_manifest(&keys, &signed, &other, now)), Refusal::IdMismatch { .. }));

        manifest.expires_at = Some(now - Duration::from_secs(1));
        let expired = key.sign(&manifest);
        let err = refusal(verify_manifest(&keys, &expired, &id, now));
        assert!(matches!(err, Refusal::Expired { .. }), "{err}");
        assert!(err.to_string().contains("expired"), "{err}");
    }
}
