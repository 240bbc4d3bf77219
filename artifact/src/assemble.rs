//! Assembling a safetensors file from a version's blobs.
//!
//! The file is streamed: the header is built from the manifest alone (the `safetensors`
//! crate's `TensorInfo`, padded to 8 bytes as the format requires), then each blob is copied
//! in name order while it is hashed. A blob whose bytes do not match its digest or size aborts
//! the assembly; the caller writes to a temporary file and discards it on error, so a
//! half-verified file is never used.

use std::{
    collections::BTreeMap,
    io::{Read, Write},
    path::PathBuf,
};

use llmchain_proto::model::{DType, Digest};
use safetensors::{Dtype, tensor::TensorInfo as StInfo};

use crate::{Error, Manifest, Result, digest::Hasher};

/// Where assembly reads blobs from.
pub trait BlobSource {
    /// Opens the bytes of the blob `digest`.
    fn open(&self, digest: &Digest) -> std::io::Result<Box<dyn Read + '_>>;
}

/// Blobs laid out as the coordinator's directory store and the agent's cache do:
/// `<root>/sha256/<first 2 hex>/<remaining 62 hex>`.
#[derive(Debug, Clone)]
pub struct BlobDir(pub PathBuf);

impl BlobDir {
    /// Path of the blob `digest` under this directory.
    pub fn path(&self, digest: &Digest) -> PathBuf {
        let hex = digest.hex();
        self.0.join("sha256").join(&hex[..2]).join(&hex[2..])
    }
}

impl BlobSource for BlobDir {
    fn open(&self, digest: &Digest) -> std::io::Result<Box<dyn Read + '_>> {
        Ok(Box::new(std::fs::File::open(self.path(digest))?))
    }
}

fn st_dtype(d: DType) -> Dtype {
    match d {
        DType::F32 => Dtype::F32,
        DType::F16 => Dtype::F16,
        DType::Bf16 => Dtype::BF16,
    }
}

/// The header of the safetensors file for `manifest`: 8-byte length, then padded JSON.
pub fn safetensors_header(manifest: &Manifest) -> Result<Vec<u8>> {
    let mut sorted: Vec<_> = manifest.tensors.iter().collect();
    sorted.sort_by(|a, b| a.name.cmp(&b.name));
    let mut map = serde_json::Map::new();
    let meta: BTreeMap<&str, String> = [
        ("format", "pt".to_string()),
        ("llmchain.model", manifest.id.model.to_string()),
        ("llmchain.version", manifest.id.version.to_string()),
    ]
    .into_iter()
    .collect();
    map.insert(
        "__metadata__".into(),
        serde_json::to_value(meta).map_err(|e| Error::Safetensors(e.to_string()))?,
    );
    let mut offset = 0usize;
    for t in sorted {
        let size =
            usize::try_from(t.size).map_err(|_| Error::Safetensors(format!("{} is too large", t.name)))?;
        let shape = t
            .shape
            .iter()
            .map(|&d| usize::try_from(d))
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(|_| Error::Safetensors(format!("{} has a dimension too large", t.name)))?;
        let info = StInfo { dtype: st_dtype(t.dtype), shape, data_offsets: (offset, offset + size) };
        offset += size;
        map.insert(
            t.name.clone(),
            serde_json::to_value(info).map_err(|e| Error::Safetensors(e.to_string()))?,
        );
    }
    let mut json = serde_json::to_vec(&map).map_err(|e| Error::Safetensors(e.to_string()))?;
    // The format requires the data section to start 8-byte aligned; spaces are valid JSON.
    json.resize(json.len().div_ceil(8) * 8, b' ');
    let mut out = Vec::with_capacity(8 + json.len());
    out.extend_from_slice(&(json.len() as u64).to_le_bytes());
    out.extend_from_slice(&json);
    Ok(out)
}

/// Writes the safetensors file of `manifest` to `out`, verifying every blob as it is copied.
///
/// Returns the bytes written. On error `out` holds a partial file that must be discarded.
pub fn assemble_safetensors(
    manifest: &Manifest,
    source: &dyn BlobSource,
    out: &mut dyn Write,
) -> Result<u64> {
    let header = safetensors_header(manifest)?;
    out.write_all(&header)?;
    let mut written = header.len() as u64;
    let mut sorted: Vec<_> = manifest.tensors.iter().collect();
    sorted.sort_by(|a, b| a.name.cmp(&b.name));
    let mut buf = vec![0u8; 1 << 20];
    for t in sorted {
        let mut reader = source.open(&t.digest)?;
        let mut hasher = Hasher::new();
        loop {
            let n = match reader.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e.into()),
            };
            hasher.update(&buf[..n]);
            // Stop early rather than copy an oversized blob to the end.
            if hasher.len() > t.size {
                return Err(Error::SizeMismatch { digest: t.digest, expected: t.size, actual: hasher.len() });
            }
            out.write_all(&buf[..n])?;
        }
        if hasher.len() != t.size {
            return Err(Error::SizeMismatch { digest: t.digest, expected: t.size, actual: hasher.len() });
        }
        let actual = hasher.finish();
        if actual != t.digest {
            return Err(Error::DigestMismatch { expected: t.digest, actual });
        }
        written += t.size;
    }
    out.flush()?;
    Ok(written)
}
