//! Trust metadata that survives a compromised coordinator: root-signed key-rotation documents
//! and trainer-signed rollback statements.
//!
//! An offline **root key** (`llmchainctl keys root-init`) signs [`TrustDocument`]s: the
//! complete set of trainer keys agents trust, the key ids that are revoked, and a version.
//! Agents pin the root public key and keep the document they accepted in their state
//! directory ([`TrustStore`]); they accept a new one only if the root signed it and its version
//! is higher, so a coordinator that relays documents can withhold one but can neither forge
//! nor replay an older one. Revocations are sticky: a key revoked once is never trusted again.
//!
//! A [`RollbackStatement`] is a trainer's permission to move agents back to an older version
//! until an expiry. Agents refuse a downgrade without one, so a coordinator cannot push a
//! known-bad old version on its own.
//!
//! Each kind is signed over a context string followed by its canonical protobuf bytes, so a
//! signature over one kind (or over a manifest) can never verify as another. Like manifests,
//! payloads are checked against the signature before they are decoded, and must re-encode to
//! the same bytes.

use std::{
    collections::BTreeSet,
    fs,
    io::Write,
    path::{Path, PathBuf},
    time::SystemTime,
};

use ed25519_dalek::{Signature, Signer};
use llmchain_proto::{
    ApiError,
    model::{self, ModelRef, SignedStatement},
    pb,
};
use prost::Message;

use crate::{Error, PublicKey, Result, SigningKey, TrustedKeys};

/// Signature context of trust documents.
pub const TRUST_DOCUMENT_CONTEXT: &[u8] = b"llmchain-trust-document-v1\0";
/// Signature context of rollback statements.
pub const ROLLBACK_CONTEXT: &[u8] = b"llmchain-rollback-v1\0";
/// Most trainer keys (and revoked ids) one trust document may list.
pub const MAX_DOCUMENT_KEYS: usize = 1024;
/// File of the accepted trust document in an agent's state directory.
pub const TRUST_FILE: &str = "trust-document.pb";

fn statement_err(reason: impl Into<String>) -> Error {
    Error::Statement(reason.into())
}

fn signed_bytes(context: &[u8], payload: &[u8]) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(context.len() + payload.len());
    bytes.extend_from_slice(context);
    bytes.extend_from_slice(payload);
    bytes
}

fn sign_statement(key: &SigningKey, context: &[u8], payload: Vec<u8>) -> SignedStatement {
    let signature = key.raw().sign(&signed_bytes(context, &payload)).to_bytes();
    SignedStatement { payload, signature, key_id: key.public().key_id() }
}

fn check_signature(key: &PublicKey, context: &[u8], signed: &SignedStatement) -> Result<()> {
    key.raw()
        .verify_strict(&signed_bytes(context, &signed.payload), &Signature::from_bytes(&signed.signature))
        .map_err(|_| Error::BadSignature(signed.key_id.clone()))
}

fn canonical<M: Message + Default>(bytes: &[u8], again: impl FnOnce(&M) -> Result<Vec<u8>>) -> Result<M> {
    let wire = M::decode(bytes)?;
    if again(&wire)? != bytes {
        return Err(Error::NotCanonical("statement does not re-encode to the signed bytes".into()));
    }
    Ok(wire)
}

/// The trainer keys agents trust, as signed by the root key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrustDocument {
    /// Monotonic version, at least 1.
    pub version: u64,
    /// The complete set of trusted trainer keys.
    pub trainer_keys: Vec<PublicKey>,
    /// Revoked key ids.
    pub revoked_key_ids: BTreeSet<String>,
    /// When it was signed.
    pub issued_at: SystemTime,
}

impl TrustDocument {
    /// The canonical bytes: keys sorted by their bytes, revoked ids sorted.
    pub fn canonical_bytes(&self) -> Vec<u8> {
        let mut keys: Vec<[u8; 32]> = self.trainer_keys.iter().map(PublicKey::to_bytes).collect();
        keys.sort();
        keys.dedup();
        pb::TrustDocument {
            version: self.version,
            trainer_keys: keys.into_iter().map(|k| k.to_vec()).collect(),
            revoked_key_ids: self.revoked_key_ids.iter().cloned().collect(),
            issued_at: Some(self.issued_at.into()),
        }
        .encode_to_vec()
    }

    /// Decodes canonical bytes (unverified: call [`TrustDocument::verify`] on signed input).
    pub fn from_canonical_bytes(bytes: &[u8]) -> Result<Self> {
        let mut parsed = None;
        canonical::<pb::TrustDocument>(bytes, |wire| {
            let doc = TrustDocument::try_from(wire.clone())?;
            let again = doc.canonical_bytes();
            parsed = Some(doc);
            Ok(again)
        })?;
        parsed.ok_or_else(|| statement_err("trust document did not decode"))
    }

    /// Signs the document with the root key.
    pub fn sign(&self, root: &SigningKey) -> SignedStatement {
        sign_statement(root, TRUST_DOCUMENT_CONTEXT, self.canonical_bytes())
    }

    /// Checks `signed` is signed by `root` (before decoding a byte of it), then decodes it.
    pub fn verify(signed: &SignedStatement, root: &PublicKey) -> Result<Self> {
        if signed.key_id != root.key_id() {
            return Err(Error::UnknownKey(signed.key_id.clone()));
        }
        check_signature(root, TRUST_DOCUMENT_CONTEXT, signed)?;
        Self::from_canonical_bytes(&signed.payload)
    }
}

impl TryFrom<pb::TrustDocument> for TrustDocument {
    type Error = Error;
    fn try_from(d: pb::TrustDocument) -> Result<Self> {
        if d.version == 0 {
            return Err(ApiError::invalid("version", "must be at least 1").into());
        }
        if d.trainer_keys.len() > MAX_DOCUMENT_KEYS || d.revoked_key_ids.len() > MAX_DOCUMENT_KEYS {
            return Err(ApiError::invalid("trainer_keys", format!("at most {MAX_DOCUMENT_KEYS} keys")).into());
        }
        let mut trainer_keys = Vec::with_capacity(d.trainer_keys.len());
        for (i, k) in d.trainer_keys.iter().enumerate() {
            let bytes: [u8; 32] = k.as_slice().try_into().map_err(|_| {
                ApiError::invalid(format!("trainer_keys[{i}]"), format!("must be 32 bytes, got {}", k.len()))
            })?;
            trainer_keys.push(PublicKey::from_bytes(&bytes)?);
        }
        let revoked_key_ids: BTreeSet<String> = d.revoked_key_ids.into_iter().collect();
        for id in &revoked_key_ids {
            if !is_key_id(id) {
                return Err(ApiError::invalid("revoked_key_ids", format!("{id:?} is not a key id")).into());
            }
        }
        if let Some(k) = trainer_keys.iter().find(|k| revoked_key_ids.contains(&k.key_id())) {
            return Err(statement_err(format!("key {} is both trusted and revoked", k.key_id())));
        }
        let issued_at = model::timestamp(
            "issued_at",
            d.issued_at.as_ref().ok_or_else(|| ApiError::invalid("issued_at", "is required"))?,
        )?;
        Ok(TrustDocument { version: d.version, trainer_keys, revoked_key_ids, issued_at })
    }
}

/// Whether `id` looks like `"ed25519:"` + 16 lowercase hex digits.
pub fn is_key_id(id: &str) -> bool {
    id.strip_prefix("ed25519:")
        .is_some_and(|h| h.len() == 16 && h.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)))
}

/// A trainer's permission to move agents back to `target` until `expires_at`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RollbackStatement {
    /// The older version agents may run again.
    pub target: ModelRef,
    /// After this instant the statement is refused.
    pub expires_at: SystemTime,
}

impl RollbackStatement {
    /// The canonical bytes.
    pub fn canonical_bytes(&self) -> Vec<u8> {
        pb::RollbackStatement {
            target: Some(self.target.clone().into()),
            expires_at: Some(self.expires_at.into()),
        }
        .encode_to_vec()
    }

    /// Decodes canonical bytes (unverified: call [`RollbackStatement::verify`] on signed input).
    pub fn from_canonical_bytes(bytes: &[u8]) -> Result<Self> {
        let mut parsed = None;
        canonical::<pb::RollbackStatement>(bytes, |wire| {
            let target = ModelRef::try_from(
                wire.target.clone().ok_or_else(|| ApiError::invalid("target", "is required"))?,
            )
            .map_err(|e| e.within("target"))?;
            let expires_at = model::timestamp(
                "expires_at",
                wire.expires_at.as_ref().ok_or_else(|| ApiError::invalid("expires_at", "is required"))?,
            )?;
            let s = RollbackStatement { target, expires_at };
            let again = s.canonical_bytes();
            parsed = Some(s);
            Ok(again)
        })?;
        parsed.ok_or_else(|| statement_err("rollback statement did not decode"))
    }

    /// Signs the statement with a trainer key.
    pub fn sign(&self, key: &SigningKey) -> SignedStatement {
        sign_statement(key, ROLLBACK_CONTEXT, self.canonical_bytes())
    }

    /// Checks `signed` is signed by a trusted, unrevoked key, is for `target` and unexpired
    /// at `now`.
    pub fn verify(
        signed: &SignedStatement,
        keys: &TrustedKeys,
        target: &ModelRef,
        now: SystemTime,
    ) -> Result<Self> {
        let key = keys.get(&signed.key_id)?;
        check_signature(&key, ROLLBACK_CONTEXT, signed)?;
        let s = Self::from_canonical_bytes(&signed.payload)?;
        if s.target != *target {
            return Err(statement_err(format!("rollback statement is for {}, not {target}", s.target)));
        }
        if s.expires_at <= now {
            return Err(statement_err(format!("rollback statement for {target} has expired")));
        }
        Ok(s)
    }
}

/// What [`TrustStore::apply`] did with a document.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    /// The document is newer: its keys are now the trusted set.
    Updated {
        /// The new version.
        version: u64,
    },
    /// The document is the one already held.
    Unchanged,
}

/// An agent's trust state: the pinned root key, the trusted trainer keys (shared with every
/// clone of the [`TrustedKeys`] given to it), and the version of the last accepted document,
/// which is kept in a state directory.
#[derive(Debug)]
pub struct TrustStore {
    root: Option<PublicKey>,
    keys: TrustedKeys,
    version: u64,
    held: Option<Vec<u8>>,
    path: Option<PathBuf>,
}

impl TrustStore {
    /// A store in memory: `keys` are the initial trainer keys (from flags or enrollment).
    pub fn new(root: Option<PublicKey>, keys: TrustedKeys) -> Self {
        TrustStore { root, keys, version: 0, held: None, path: None }
    }

    /// A store kept in `state_dir`: a document accepted before is verified and applied again.
    pub fn open(state_dir: &Path, root: Option<PublicKey>, keys: TrustedKeys) -> Result<Self> {
        let mut store = TrustStore::new(root, keys);
        let path = state_dir.join(TRUST_FILE);
        match fs::read(&path) {
            Ok(bytes) => {
                let signed =
                    model::SignedStatement::try_from(pb::SignedStatement::decode(bytes.as_slice())?)?;
                store.apply(&signed)?;
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e.into()),
        }
        store.path = Some(path);
        Ok(store)
    }

    /// The trusted keys (clones share the set this store updates).
    pub fn keys(&self) -> &TrustedKeys {
        &self.keys
    }

    /// Version of the accepted document; 0 when none.
    pub fn version(&self) -> u64 {
        self.version
    }

    /// Verifies `signed` against the pinned root and, when its version is higher than the
    /// held one, makes its keys the trusted set and adds its revocations (which never lapse).
    /// A lower version, or the same version with other bytes, is refused.
    pub fn apply(&mut self, signed: &SignedStatement) -> Result<Applied> {
        let root =
            self.root.ok_or_else(|| statement_err("no root key is pinned; trust documents are refused"))?;
        let doc = TrustDocument::verify(signed, &root)?;
        if doc.version == self.version && self.held.as_deref() == Some(signed.payload.as_slice()) {
            return Ok(Applied::Unchanged);
        }
        if doc.version <= self.version {
            return Err(Error::StaleTrustDocument { have: self.version, got: doc.version });
        }
        if let Some(path) = &self.path {
            write_atomic(path, &pb::SignedStatement::from(signed.clone()).encode_to_vec())?;
        }
        self.keys.rotate(doc.trainer_keys.iter().copied(), doc.revoked_key_ids.iter().cloned());
        self.version = doc.version;
        self.held = Some(signed.payload.clone());
        Ok(Applied::Updated { version: doc.version })
    }
}

/// Writes `bytes` to `path` through a synced temporary file and a rename.
fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension("tmp");
    let mut f = fs::File::create(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use llmchain_proto::model::ModelName;

    use super::*;
    use crate::testing::{synthetic_version, tiny_llama};

    fn key(seed: u8) -> SigningKey {
        SigningKey::from_seed([seed; 32])
    }

    fn doc(version: u64, keys: &[&SigningKey], revoked: &[&SigningKey]) -> TrustDocument {
        TrustDocument {
            version,
            trainer_keys: keys.iter().map(|k| k.public()).collect(),
            revoked_key_ids: revoked.iter().map(|k| k.public().key_id()).collect(),
            issued_at: SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000),
        }
    }

    #[test]
    fn rotation_trusts_new_keys_and_revokes_old_ones_even_for_earlier_manifests() {
        let (root, old, new) = (key(1), key(2), key(3));
        let keys = TrustedKeys::new([old.public()]);
        let shared = keys.clone();
        let dir = tempfile::tempdir().unwrap();
        let mut store = TrustStore::open(dir.path(), Some(root.public()), keys).unwrap();
        let (manifest, _) = synthetic_version("m", 2, 1, &tiny_llama(1), |_| 0);
        let by_old = old.sign(&manifest);
        assert!(shared.verify(&by_old).is_ok());
        assert!(matches!(shared.verify(&new.sign(&manifest)), Err(Error::UnknownKey(_))));

        let d1 = doc(1, &[&new], &[&old]).sign(&root);
        assert_eq!(store.apply(&d1).unwrap(), Applied::Updated { version: 1 });
        assert_eq!(store.apply(&d1).unwrap(), Applied::Unchanged);
        // The clone handed out before the rotation sees it.
        assert!(shared.verify(&new.sign(&manifest)).is_ok());
        assert!(matches!(shared.verify(&by_old), Err(Error::RevokedKey(_))));

        // Reopened from the state directory: the same state, and version 1 stays held.
        let reopened = TrustedKeys::new([old.public()]);
        let store2 = TrustStore::open(dir.path(), Some(root.public()), reopened.clone()).unwrap();
        assert_eq!(store2.version(), 1);
        assert!(matches!(reopened.verify(&by_old), Err(Error::RevokedKey(_))));

        // Replays, forgeries and other signers are refused; revocation is sticky.
        let d0 = doc(1, &[&old], &[]).sign(&root);
        assert!(matches!(store.apply(&d0), Err(Error::StaleTrustDocument { have: 1, got: 1 })));
        let by_trainer = doc(5, &[&old], &[]).sign(&new);
        assert!(matches!(store.apply(&by_trainer), Err(Error::UnknownKey(_))));
        let mut forged = doc(5, &[&old], &[]).sign(&root);
        forged.payload[1] ^= 1;
        assert!(store.apply(&forged).is_err());
        let d2 = doc(2, &[&new, &old], &[]).sign(&root);
        store.apply(&d2).unwrap();
        assert!(matches!(shared.verify(&by_old), Err(Error::RevokedKey(_))));
        assert!(TrustStore::new(None, TrustedKeys::default()).apply(&d2).is_err());
    }

    #[test]
    fn a_document_key_cannot_be_trusted_and_revoked() {
        let (root, k) = (key(1), key(2));
        let signed = doc(1, &[&k], &[&k]).sign(&root);
        assert!(matches!(TrustDocument::verify(&signed, &root.public()), Err(Error::Statement(_))));
    }

    #[test]
    fn rollback_statements_bind_target_expiry_and_signer() {
        let (trainer, rogue) = (key(2), key(9));
        let keys = TrustedKeys::new([trainer.public()]);
        let target = ModelRef { model: ModelName::parse("m", "m").unwrap(), version: 1 };
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let s = RollbackStatement { target: target.clone(), expires_at: now + Duration::from_secs(60) };
        let signed = s.sign(&trainer);
        assert_eq!(RollbackStatement::verify(&signed, &keys, &target, now).unwrap(), s);
        let later = now + Duration::from_secs(61);
        assert!(matches!(
            RollbackStatement::verify(&signed, &keys, &target, later),
            Err(Error::Statement(_))
        ));
        let other = ModelRef { version: 2, ..target.clone() };
        assert!(matches!(RollbackStatement::verify(&signed, &keys, &other, now), Err(Error::Statement(_))));
        assert!(matches!(
            RollbackStatement::verify(&s.sign(&rogue), &keys, &target, now),
            Err(Error::UnknownKey(_))
        ));
        // A trust document signed by the trainer key is not a rollback statement.
        let as_doc = doc(1, &[&trainer], &[]).sign(&trainer);
        assert!(RollbackStatement::verify(&as_doc, &keys, &target, now).is_err());
        keys.rotate([trainer.public()], [rogue.public().key_id()]);
        let revoked = TrustedKeys::new([trainer.public()]);
        revoked.rotate([], [trainer.public().key_id()]);
        assert!(matches!(
            RollbackStatement::verify(&signed, &revoked, &target, now),
            Err(Error::RevokedKey(_))
        ));
    }
}
