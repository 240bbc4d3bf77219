//! sha256 content addresses: a streaming hasher and chunk iteration over byte ranges.
//!
//! Blobs are addressed by the sha256 of their exact bytes ([`Digest`]). Hashing is done
//! incrementally so a blob of any size is verified in one pass while it is written or read.

use std::{io::Read, ops::Range};

use llmchain_proto::model::Digest;
use sha2::{Digest as _, Sha256};

/// Incremental sha256 that also counts the bytes it has seen.
#[derive(Clone, Default)]
pub struct Hasher {
    inner: Sha256,
    len: u64,
}

impl Hasher {
    /// A hasher that has seen no bytes.
    pub fn new() -> Self {
        Self::default()
    }

    /// Feeds the next bytes.
    pub fn update(&mut self, bytes: &[u8]) {
        self.inner.update(bytes);
        self.len += bytes.len() as u64;
    }

    /// Bytes fed so far.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether no bytes were fed yet.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The digest of everything fed.
    pub fn finish(self) -> Digest {
        Digest(self.inner.finalize().into())
    }
}

/// The digest of `bytes`.
pub fn digest_bytes(bytes: &[u8]) -> Digest {
    let mut h = Hasher::new();
    h.update(bytes);
    h.finish()
}

/// Hashes everything `reader` yields; returns the digest and the byte count.
pub fn digest_reader(mut reader: impl Read) -> std::io::Result<(Digest, u64)> {
    // 256 KiB keeps the syscall count low without a large stack or heap cost.
    let mut buf = vec![0u8; 256 << 10];
    let mut h = Hasher::new();
    loop {
        match reader.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => h.update(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
    let len = h.len();
    Ok((h.finish(), len))
}

/// Splits `range` into consecutive ranges of at most `chunk` bytes (the last may be shorter).
///
/// A `chunk` of 0 is treated as 1 so the iterator always terminates.
pub fn chunks(range: Range<u64>, chunk: u64) -> impl Iterator<Item = Range<u64>> {
    let chunk = chunk.max(1);
    let mut start = range.start;
    std::iter::from_fn(move || {
        if start >= range.end {
            return None;
        }
        let end = start.saturating_add(chunk).min(range.end);
        let out = start..end;
        start = end;
        Some(out)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_vector() {
        assert_eq!(
            digest_bytes(b"abc").to_string(),
            "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn incremental_equals_one_shot() {
        let data: Vec<u8> = (0..10_000u32).map(|i| (i * 31 % 251) as u8).collect();
        let mut h = Hasher::new();
        for c in data.chunks(777) {
            h.update(c);
        }
        assert_eq!(h.len(), data.len() as u64);
        assert_eq!(h.finish(), digest_bytes(&data));
        assert_eq!(digest_reader(&data[..]).unwrap(), (digest_bytes(&data), data.len() as u64));
    }

    #[test]
    fn chunks_cover_the_range_exactly() {
        let got: Vec<_> = chunks(3..13, 4).collect();
        assert_eq!(got, vec![3..7, 7..11, 11..13]);
        assert_eq!(chunks(5..5, 4).count(), 0);
        assert_eq!(chunks(0..3, 0).count(), 3);
        assert_eq!(chunks(u64::MAX - 2..u64::MAX, 8).collect::<Vec<_>>(), vec![u64::MAX - 2..u64::MAX]);
    }
}
