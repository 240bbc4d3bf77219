//! ed25519 trainer keys: generation, key files, signing and verification of manifests.
//!
//! A private key file holds the 32-byte seed as 64 hex digits and is created with mode 0600;
//! loading refuses a file that group or others can read, as ssh does, because a leaked trainer
//! key lets anyone publish weights to the whole fleet. A public key file holds the 32-byte key
//! as 64 hex digits. A key is named by its id, `"ed25519:"` + hex of the first 8 bytes of
//! sha256(public key), which is what a `SignedManifest` carries.
//!
//! Verification checks the signature over the exact received bytes *before* decoding them,
//! so no byte of an unsigned manifest is ever interpreted.

use std::{
    collections::{HashMap, HashSet},
    fmt,
    fs::OpenOptions,
    io::Write,
    os::unix::fs::{OpenOptionsExt, PermissionsExt},
    path::Path,
    sync::{Arc, PoisonError, RwLock},
};

use ed25519_dalek::{Signature, Signer};
use llmchain_proto::model::SignedManifest;

use crate::{Error, Manifest, Result, digest::digest_bytes};

/// A trainer's private signing key.
pub struct SigningKey(ed25519_dalek::SigningKey);

impl fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print the secret; the id is enough to tell keys apart.
        write!(f, "SigningKey({})", self.public().key_id())
    }
}

fn key_err(path: &Path, reason: impl Into<String>) -> Error {
    Error::Key { path: path.display().to_string(), reason: reason.into() }
}

fn read_hex32(path: &Path) -> Result<[u8; 32]> {
    let text = std::fs::read_to_string(path)?;
    let bytes = hex::decode(text.trim()).map_err(|e| key_err(path, format!("not hex: {e}")))?;
    bytes.try_into().map_err(|b: Vec<u8>| key_err(path, format!("holds {} bytes, expected 32", b.len())))
}

fn write_new(path: &Path, mode: u32, contents: &str) -> Result<()> {
    // create_new: never overwrite a key by accident; mode applies atomically at creation.
    let mut f = OpenOptions::new().write(true).create_new(true).mode(mode).open(path)?;
    f.write_all(contents.as_bytes())?;
    f.sync_all()?;
    Ok(())
}

impl SigningKey {
    /// A fresh key from the operating system's random source.
    pub fn generate() -> Result<Self> {
        let mut seed = [0u8; 32];
        getrandom::getrandom(&mut seed).map_err(|e| Error::Io(std::io::Error::other(e.to_string())))?;
        Ok(Self::from_seed(seed))
    }

    /// The key with the given 32-byte seed (deterministic; for tests and key import).
    pub fn from_seed(seed: [u8; 32]) -> Self {
        SigningKey(ed25519_dalek::SigningKey::from_bytes(&seed))
    }

    /// Writes the key to a new file with mode 0600; refuses to overwrite an existing file.
    pub fn save(&self, path: &Path) -> Result<()> {
        write_new(path, 0o600, &format!("{}\n", hex::encode(self.0.to_bytes())))
    }

    /// Reads a key written by [`SigningKey::save`], refusing group- or world-readable files.
    pub fn load(path: &Path) -> Result<Self> {
        let mode = std::fs::metadata(path)?.permissions().mode();
        if mode & 0o077 != 0 {
            return Err(key_err(path, format!("permissions {:o} are too open; use 0600", mode & 0o777)));
        }
        Ok(Self::from_seed(read_hex32(path)?))
    }

    /// The matching public key.
    pub fn public(&self) -> PublicKey {
        PublicKey(self.0.verifying_key())
    }

    pub(crate) fn raw(&self) -> &ed25519_dalek::SigningKey {
        &self.0
    }

    /// Signs the canonical bytes of `manifest`.
    pub fn sign(&self, manifest: &Manifest) -> SignedManifest {
        let bytes = manifest.canonical_bytes();
        let signature = self.0.sign(&bytes).to_bytes();
        SignedManifest { manifest: bytes, signature, key_id: self.public().key_id() }
    }
}

/// A trainer's public key.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct PublicKey(ed25519_dalek::VerifyingKey);

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({})", self.key_id())
    }
}

impl PublicKey {
    /// Parses 32 key bytes, refusing points that are not valid public keys.
    pub fn from_bytes(bytes: &[u8; 32]) -> Result<Self> {
        ed25519_dalek::VerifyingKey::from_bytes(bytes).map(PublicKey).map_err(|e| Error::Key {
            path: "<bytes>".into(),
            reason: format!("not an ed25519 public key: {e}"),
        })
    }

    pub(crate) fn raw(&self) -> &ed25519_dalek::VerifyingKey {
        &self.0
    }

    /// The 32 key bytes.
    pub fn to_bytes(&self) -> [u8; 32] {
        self.0.to_bytes()
    }

    /// `"ed25519:"` + hex of the first 8 bytes of sha256(public key).
    pub fn key_id(&self) -> String {
        let d = digest_bytes(self.0.as_bytes());
        format!("ed25519:{}", hex::encode(&d.0[..8]))
    }

    /// Writes the key as hex to a new file with mode 0644.
    pub fn save(&self, path: &Path) -> Result<()> {
        write_new(path, 0o644, &format!("{}\n", hex::encode(self.to_bytes())))
    }

    /// Reads a key written by [`PublicKey::save`].
    pub fn load(path: &Path) -> Result<Self> {
        Self::from_bytes(&read_hex32(path)?).map_err(|e| match e {
            Error::Key { reason, .. } => key_err(path, reason),
            other => other,
        })
    }
}

/// The set of public keys whose signatures are accepted, by key id, and the key ids that are
/// revoked. Clones share one set, so a key rotation applied through one (see
/// [`crate::trust::TrustStore`]) is seen at once by every holder: the syncer, the cache.
#[derive(Debug, Clone, Default)]
pub struct TrustedKeys(Arc<RwLock<KeySet>>);

#[derive(Debug, Default)]
struct KeySet {
    keys: HashMap<String, PublicKey>,
    revoked: HashSet<String>,
}

impl TrustedKeys {
    /// A set holding `keys`.
    pub fn new(keys: impl IntoIterator<Item = PublicKey>) -> Self {
        let keys = keys.into_iter().map(|k| (k.key_id(), k)).collect();
        TrustedKeys(Arc::new(RwLock::new(KeySet { keys, revoked: HashSet::new() })))
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, KeySet> {
        self.0.read().unwrap_or_else(PoisonError::into_inner)
    }

    /// Adds a key (unless it is revoked).
    pub fn insert(&mut self, key: PublicKey) {
        let mut set = self.0.write().unwrap_or_else(PoisonError::into_inner);
        if !set.revoked.contains(&key.key_id()) {
            set.keys.insert(key.key_id(), key);
        }
    }

    /// Replaces the trusted keys with `keys` and adds `revoked` to the revoked ids, which are
    /// never trusted again.
    pub fn rotate(
        &self,
        keys: impl IntoIterator<Item = PublicKey>,
        revoked: impl IntoIterator<Item = String>,
    ) {
        let mut set = self.0.write().unwrap_or_else(PoisonError::into_inner);
        set.revoked.extend(revoked);
        let revoked = &set.revoked;
        let keys =
            keys.into_iter().filter(|k| !revoked.contains(&k.key_id())).map(|k| (k.key_id(), k)).collect();
        set.keys = keys;
    }

    /// Number of keys.
    pub fn len(&self) -> usize {
        self.read().keys.len()
    }

    /// Whether no key is trusted (then nothing verifies).
    pub fn is_empty(&self) -> bool {
        self.read().keys.is_empty()
    }

    /// Ids of the trusted keys, sorted.
    pub fn key_ids(&self) -> Vec<String> {
        let mut ids: Vec<String> = self.read().keys.keys().cloned().collect();
        ids.sort();
        ids
    }

    /// Whether `key_id` is revoked.
    pub fn is_revoked(&self, key_id: &str) -> bool {
        self.read().revoked.contains(key_id)
    }

    /// The trusted key `key_id`; revoked and unknown keys are errors.
    pub fn get(&self, key_id: &str) -> Result<PublicKey> {
        let set = self.read();
        if set.revoked.contains(key_id) {
            return Err(Error::RevokedKey(key_id.to_string()));
        }
        set.keys.get(key_id).copied().ok_or_else(|| Error::UnknownKey(key_id.to_string()))
    }

    /// Verifies the signature over the exact bytes, then decodes them canonically.
    pub fn verify(&self, signed: &SignedManifest) -> Result<Manifest> {
        let key = self.get(&signed.key_id)?;
        let signature = Signature::from_bytes(&signed.signature);
        // verify_strict also rejects small-order keys and malleable signatures.
        key.0
            .verify_strict(&signed.manifest, &signature)
            .map_err(|_| Error::BadSignature(signed.key_id.clone()))?;
        Manifest::from_canonical_bytes(&signed.manifest)
    }
}
