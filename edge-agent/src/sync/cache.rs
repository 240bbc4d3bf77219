//! The agent's local blob cache, which survives restarts.
//!
//! Layout under the cache root:
//! - `blobs/sha256/<2 hex>/<62 hex>`: verified blobs (the [`BlobDir`] layout);
//! - `partial/<64 hex>.part`: a blob being downloaded, its bytes so far, appended in order;
//! - `versions/<model>/<version>`: verified signed manifests (protobuf `SignedManifest`:
//!   manifest bytes, signature, key id), re-verified whenever they are loaded;
//! - `tmp/`: files being written; emptied when the cache is opened.
//!
//! Invariant: a file under a final name (`blobs/…`, `versions/…`) is complete and was
//! verified. Files are written under `tmp/` (or `partial/`), synced, then renamed into
//! place, so a crash at any point leaves at worst a stale temporary or part file, never a
//! wrong file under a final name. One process owns a cache directory at a time.

use std::{
    collections::{BTreeMap, HashSet},
    fs,
    io::{self, Write},
    path::{Path, PathBuf},
    sync::atomic::{AtomicU64, Ordering},
    time::{Duration, SystemTime},
};

use llmchain_artifact::{BlobDir, Manifest, TrustedKeys};
use llmchain_proto::{
    model::{Digest, ModelName, ModelRef, SignedManifest},
    pb,
};
use prost::Message;
use tracing::warn;

use super::{
    LocalVersion,
    error::{Result, SyncError},
    verify::verify_manifest,
};

/// Part files untouched this long are garbage (an abandoned download).
const PART_MAX_AGE: Duration = Duration::from_secs(24 * 3600);

/// What [`BlobCache::gc`] removed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GcReport {
    /// Versions whose manifests were deleted.
    pub versions_deleted: Vec<ModelRef>,
    /// Blobs deleted.
    pub blobs_deleted: usize,
    /// Bytes freed by deleted blobs and part files.
    pub bytes_freed: u64,
    /// Stale part files deleted.
    pub parts_deleted: usize,
}

/// The local cache of verified blobs and signed manifests (see the module docs).
///
/// Cloning is cheap: clones name the same directory.
#[derive(Debug, Clone)]
pub struct BlobCache {
    root: PathBuf,
    blobs: BlobDir,
}

/// Makes temporary file names unique within the process.
static TMP_SEQ: AtomicU64 = AtomicU64::new(0);

fn is_not_found(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::NotFound
}

/// Syncs a directory so a rename inside it survives a power loss; best effort.
fn sync_dir(dir: &Path) {
    if let Ok(d) = fs::File::open(dir) {
        let _ = d.sync_all();
    }
}

impl BlobCache {
    /// Opens (creating if needed) the cache at `root` and clears its temporary files.
    pub fn open(root: impl Into<PathBuf>) -> Result<Self> {
        let root = root.into();
        for sub in ["blobs/sha256", "partial", "versions"] {
            let dir = root.join(sub);
            fs::create_dir_all(&dir).map_err(SyncError::cache(&dir))?;
        }
        let tmp = root.join("tmp");
        match fs::remove_dir_all(&tmp) {
            Ok(()) => {}
            Err(e) if is_not_found(&e) => {}
            Err(e) => return Err(SyncError::cache(&tmp)(e)),
        }
        fs::create_dir_all(&tmp).map_err(SyncError::cache(&tmp))?;
        Ok(BlobCache { blobs: BlobDir(root.join("blobs")), root })
    }

    /// The cache root.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The verified blobs, in the [`BlobDir`] layout.
    pub fn blob_dir(&self) -> &BlobDir {
        &self.blobs
    }

    /// Whether the verified blob `digest` is in the cache.
    pub fn has(&self, digest: &Digest) -> bool {
        self.blobs.path(digest).is_file()
    }

    /// Path of the part file of `digest` (a download in progress).
    pub fn part_path(&self, digest: &Digest) -> PathBuf {
        self.root.join("partial").join(format!("{}.part", digest.hex()))
    }

    /// Bytes of `digest` downloaded so far (0 when no part file exists).
    pub fn part_len(&self, digest: &Digest) -> u64 {
        fs::metadata(self.part_path(digest)).map(|m| m.len()).unwrap_or(0)
    }

    /// Moves the completed, verified part file of `digest` to its final name.
    pub(crate) fn commit_part(&self, digest: &Digest) -> Result<()> {
        let part = self.part_path(digest);
        let dest = self.blobs.path(digest);
        let dir = dest.parent().expect("blob paths have a parent");
        fs::create_dir_all(dir).map_err(SyncError::cache(dir))?;
        fs::rename(&part, &dest).map_err(SyncError::cache(&dest))?;
        sync_dir(dir);
        Ok(())
    }

    /// Writes `bytes` to `dest` atomically: a synced temporary file renamed into place.
    fn write_atomic(&self, dest: &Path, bytes: &[u8]) -> Result<()> {
        let seq = TMP_SEQ.fetch_add(1, Ordering::Relaxed);
        let tmp = self.root.join("tmp").join(format!("{}-{seq}", std::process::id()));
        let write = || -> io::Result<()> {
            let mut f = fs::File::create(&tmp)?;
            f.write_all(bytes)?;
            f.sync_all()
        };
        if let Err(e) = write() {
            let _ = fs::remove_file(&tmp);
            return Err(SyncError::cache(&tmp)(e));
        }
        let dir = dest.parent().expect("cache paths have a parent");
        fs::create_dir_all(dir).map_err(SyncError::cache(dir))?;
        fs::rename(&tmp, dest).map_err(SyncError::cache(dest))?;
        sync_dir(dir);
        Ok(())
    }

    fn version_path(&self, id: &ModelRef) -> PathBuf {
        // Model names are [a-z0-9._-] starting with a letter or digit: safe path components.
        self.root.join("versions").join(id.model.as_str()).join(id.version.to_string())
    }

    /// Stores a verified signed manifest of `id` (atomically; replaces an existing one).
    pub fn store_version(&self, id: &ModelRef, signed: &SignedManifest) -> Result<()> {
        let wire = pb::SignedManifest {
            manifest: signed.manifest.clone(),
            signature: signed.signature.to_vec(),
            key_id: signed.key_id.clone(),
        };
        self.write_atomic(&self.version_path(id), &wire.encode_to_vec())
    }

    /// Every version whose signed manifest is stored (complete or still downloading), sorted.
    pub fn versions(&self) -> Result<Vec<ModelRef>> {
        let dir = self.root.join("versions");
        let mut out = Vec::new();
        for model in fs::read_dir(&dir).map_err(SyncError::cache(&dir))? {
            let model = model.map_err(SyncError::cache(&dir))?;
            let Some(name) = model.file_name().to_str().and_then(|n| ModelName::parse("model", n).ok())
            else {
                continue;
            };
            let mdir = model.path();
            for v in fs::read_dir(&mdir).map_err(SyncError::cache(&mdir))? {
                let v = v.map_err(SyncError::cache(&mdir))?;
                if let Some(version) = v.file_name().to_str().and_then(|s| s.parse::<u64>().ok())
                    && version > 0
                {
                    out.push(ModelRef { model: name.clone(), version });
                }
            }
        }
        out.sort();
        Ok(out)
    }

    /// The stored signed manifest of `id`, unverified; `None` when not stored.
    pub fn load_signed(&self, id: &ModelRef) -> Result<Option<SignedManifest>> {
        let path = self.version_path(id);
        let bytes = match fs::read(&path) {
            Ok(b) => b,
            Err(e) if is_not_found(&e) => return Ok(None),
            Err(e) => return Err(SyncError::cache(&path)(e)),
        };
        let invalid =
            |reason: String| SyncError::cache(&path)(io::Error::new(io::ErrorKind::InvalidData, reason));
        let wire = pb::SignedManifest::decode(bytes.as_slice()).map_err(|e| invalid(e.to_string()))?;
        SignedManifest::try_from(wire).map(Some).map_err(|e| invalid(e.to_string()))
    }

    /// The stored version `id`, re-verified against `keys`, with every blob present
    /// ([`SyncError::NotCached`] when its manifest or a blob is missing).
    pub fn load_version(&self, id: &ModelRef, keys: &TrustedKeys) -> Result<LocalVersion> {
        let not_cached = |missing: String| SyncError::NotCached { id: id.clone(), missing };
        let Some(signed) = self.load_signed(id)? else { return Err(not_cached("no manifest".into())) };
        let manifest = verify_manifest(keys, &signed, id, SystemTime::now())?;
        let mut seen = HashSet::new();
        let mut bytes = 0;
        let sizes = manifest.tensors.iter().map(|t| (t.digest, t.size));
        for (digest, size) in
            sizes.chain(std::iter::once((manifest.tokenizer.digest, manifest.tokenizer.size)))
        {
            if !seen.insert(digest) {
                continue;
            }
            match fs::metadata(self.blobs.path(&digest)) {
                Ok(m) if m.len() == size => bytes += size,
                Ok(m) => {
                    warn!(%id, %digest, len = m.len(), size, "cached blob has the wrong size");
                    return Err(not_cached(format!(
                        "blob {digest} holds {} bytes, expected {size}",
                        m.len()
                    )));
                }
                Err(_) => return Err(not_cached(format!("blob {digest} is missing"))),
            }
        }
        Ok(LocalVersion { manifest, blobs: self.blobs.clone(), downloaded_bytes: 0, reused_bytes: bytes })
    }

    /// Deletes the manifests of each model beyond its newest `keep_versions` (never those in
    /// `pinned`, e.g. the running and the pending version), then every blob that no kept
    /// manifest references, and part files untouched for a day.
    ///
    /// Manifests go first, so a crash midway leaves only unreferenced blobs behind.
    pub fn gc(&self, keep_versions: usize, pinned: &[ModelRef]) -> Result<GcReport> {
        let mut report = GcReport::default();
        let mut by_model: BTreeMap<ModelName, Vec<u64>> = BTreeMap::new();
        for id in self.versions()? {
            by_model.entry(id.model).or_default().push(id.version);
        }
        let mut referenced = HashSet::new();
        for (model, mut versions) in by_model {
            versions.sort_unstable_by(|a, b| b.cmp(a));
            for (rank, version) in versions.into_iter().enumerate() {
                let id = ModelRef { model: model.clone(), version };
                let path = self.version_path(&id);
                if rank < keep_versions || pinned.contains(&id) {
                    // Reference counting needs the tensor list, not trust: decode without verifying.
                    match self.load_signed(&id)?.map(|s| Manifest::from_canonical_bytes(&s.manifest)) {
                        Some(Ok(m)) => {
                            referenced.extend(m.blob_digests());
                            continue;
                        }
                        Some(Err(e)) => warn!(%id, error = %e, "stored manifest is unreadable; deleting it"),
                        None => continue,
                    }
                }
                match fs::remove_file(&path) {
                    Ok(()) => report.versions_deleted.push(id),
                    Err(e) if is_not_found(&e) => {}
                    Err(e) => return Err(SyncError::cache(&path)(e)),
                }
            }
        }
        self.gc_blobs(&referenced, &mut report)?;
        self.gc_parts(&mut report)?;
        Ok(report)
    }

    fn gc_blobs(&self, referenced: &HashSet<Digest>, report: &mut GcReport) -> Result<()> {
        let top = self.blobs.0.join("sha256");
        for prefix in fs::read_dir(&top).map_err(SyncError::cache(&top))? {
            let prefix = prefix.map_err(SyncError::cache(&top))?;
            let pdir = prefix.path();
            if !pdir.is_dir() {
                continue;
            }
            let head = prefix.file_name().to_string_lossy().into_owned();
            for entry in fs::read_dir(&pdir).map_err(SyncError::cache(&pdir))? {
                let entry = entry.map_err(SyncError::cache(&pdir))?;
                let name = format!("sha256:{head}{}", entry.file_name().to_string_lossy());
                let Ok(digest) = Digest::parse("blob", &name) else {
                    warn!(path = %entry.path().display(), "unexpected file in the blob cache; left alone");
                    continue;
                };
                if referenced.contains(&digest) {
                    continue;
                }
                let len = entry.metadata().map(|m| m.len()).unwrap_or(0);
                match fs::remove_file(entry.path()) {
                    Ok(()) => {
                        report.blobs_deleted += 1;
                        report.bytes_freed += len;
                    }
                    Err(e) if is_not_found(&e) => {}
                    Err(e) => return Err(SyncError::cache(entry.path())(e)),
                }
            }
        }
        Ok(())
    }

    fn gc_parts(&self, report: &mut GcReport) -> Result<()> {
        let dir = self.root.join("partial");
        let now = SystemTime::now();
        for entry in fs::read_dir(&dir).map_err(SyncError::cache(&dir))? {
            let entry = entry.map_err(SyncError::cache(&dir))?;
            let Ok(meta) = entry.metadata() else { continue };
            let stale = meta
                .modified()
                .ok()
                .and_then(|m| now.duration_since(m).ok())
                .is_some_and(|age| age > PART_MAX_AGE);
            if stale && fs::remove_file(entry.path()).is_ok() {
                report.parts_deleted += 1;
                report.bytes_freed += meta.len();
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use llmchain_artifact::{
        SigningKey,
        testing::{synthetic_version, tiny_llama},
    };

    use super::*;

    #[test]
    fn versions_round_trip_and_tmp_is_cleared() {
        let dir = tempfile::tempdir().unwrap();
        let cache = BlobCache::open(dir.path()).unwrap();
        std::fs::write(dir.path().join("tmp/leftover"), b"x").unwrap();
        let key = SigningKey::from_seed([3; 32]);
        let (manifest, blobs) = synthetic_version("m", 1, 0, &tiny_llama(1), |_| 0);
        let signed = key.sign(&manifest);
        cache.store_version(&manifest.id, &signed).unwrap();
        assert_eq!(cache.versions().unwrap(), vec![manifest.id.clone()]);
        assert_eq!(cache.load_signed(&manifest.id).unwrap(), Some(signed));
        let keys = TrustedKeys::new([key.public()]);
        // Stored but no blobs yet: not loadable.
        let err = cache.load_version(&manifest.id, &keys).unwrap_err();
        assert!(matches!(err, SyncError::NotCached { .. }), "{err}");
        for (d, b) in &blobs {
            std::fs::write(cache.part_path(d), b).unwrap();
            cache.commit_part(d).unwrap();
        }
        let v = cache.load_version(&manifest.id, &keys).unwrap();
        assert_eq!(v.manifest, manifest);
        // Reopening keeps everything but the temporary files.
        let cache = BlobCache::open(dir.path()).unwrap();
        assert!(!dir.path().join("tmp/leftover").exists());
        assert!(blobs.keys().all(|d| cache.has(d)));
        // A manifest signed by another key does not load.
        let other = TrustedKeys::new([SigningKey::from_seed([4; 32]).public()]);
        assert!(cache.load_version(&manifest.id, &other).unwrap_err().is_refused());
    }
}
