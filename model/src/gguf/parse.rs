//! Parsing of the GGUF header: magic, version, metadata key/values and tensor infos.
//!
//! The bytes are untrusted. Invariants this module guarantees to its caller:
//! - every read is bounds-checked through [`Cursor`], so truncation is an error, never a panic;
//! - no allocation is sized by a count before that count has been checked against the bytes
//!   left (each element needs at least a known number of bytes), and the numbers of metadata
//!   values and tensors are capped, so memory stays a small multiple of the file size;
//! - every returned [`TensorInfo`] has a known type, a first dimension that is a multiple of its
//!   block size, an element count that fits in `usize`, an aligned offset and a byte range that
//!   lies inside the file; names and keys are unique.
//!
//! Versions 2 and 3 share one layout (64-bit counts and lengths; v3 only allowed big-endian files,
//! which we refuse); version 1 used 32-bit counts, lengths and dimensions.

use std::collections::{BTreeMap, HashSet};

use super::{GgmlType, TensorInfo, Value};
use crate::error::{Error, Result};

/// `"GGUF"` as the first four bytes of the file.
const MAGIC: &[u8; 4] = b"GGUF";
/// ggml's default data alignment when `general.alignment` is absent.
pub(crate) const DEFAULT_ALIGNMENT: u64 = 32;
/// ggml's `GGML_MAX_DIMS`.
const MAX_DIMS: u32 = 4;
/// Deepest nesting of arrays we accept; ggml itself writes no nested arrays at all.
const MAX_ARRAY_DEPTH: u32 = 4;
/// Cap on the number of metadata values (array elements included). A [`Value`] takes 32 bytes
/// in memory but a `u8` element only one in the file, so without a cap a 1 GB file could demand
/// 32 GB. Real files hold well under a million (vocabulary and merges).
pub(crate) const MAX_METADATA_VALUES: u64 = 4 << 20;
/// Cap on the number of tensors, for the same reason (an info costs ~5x its minimum encoded
/// size in memory). Real files hold a few thousand.
pub(crate) const MAX_TENSORS: u64 = 1 << 20;

/// The parsed header of a GGUF file.
#[derive(Debug)]
pub(crate) struct Header {
    pub version: u32,
    pub metadata: BTreeMap<String, Value>,
    pub tensors: Vec<TensorInfo>,
    pub alignment: u64,
    /// Absolute offset of the data section (tensor offsets are relative to it).
    pub data_offset: u64,
}

/// A bounds-checked little-endian reader over the file's bytes.
struct Cursor<'a> {
    bytes: &'a [u8],
    pos: usize,
    /// Version 1 files use 32-bit counts and lengths.
    narrow: bool,
}

impl<'a> Cursor<'a> {
    fn remaining(&self) -> usize {
        self.bytes.len() - self.pos
    }

    /// Takes `n` bytes or fails naming `what` was being read and where.
    fn take(&mut self, n: u64, what: impl FnOnce() -> String) -> Result<&'a [u8]> {
        let remaining = self.remaining();
        match usize::try_from(n) {
            Ok(n) if n <= remaining => {
                let slice = &self.bytes[self.pos..self.pos + n];
                self.pos += n;
                Ok(slice)
            }
            _ => Err(Error::gguf(format!(
                "truncated file: {} needs {n} bytes at offset {} but only {remaining} remain",
                what(),
                self.pos
            ))),
        }
    }

    fn array<const N: usize>(&mut self, what: impl FnOnce() -> String) -> Result<[u8; N]> {
        let bytes = self.take(N as u64, what)?;
        // `take` returned exactly N bytes.
        let mut out = [0u8; N];
        out.copy_from_slice(bytes);
        Ok(out)
    }

    fn u32(&mut self, what: impl FnOnce() -> String) -> Result<u32> {
        self.array(what).map(u32::from_le_bytes)
    }

    fn u64(&mut self, what: impl FnOnce() -> String) -> Result<u64> {
        self.array(what).map(u64::from_le_bytes)
    }

    /// A count or length: u32 in version 1, u64 since.
    fn count(&mut self, what: impl FnOnce() -> String) -> Result<u64> {
        if self.narrow { self.u32(what).map(u64::from) } else { self.u64(what) }
    }

    /// Width in bytes of a count or length field.
    fn count_width(&self) -> u64 {
        if self.narrow { 4 } else { 8 }
    }

    /// A length-prefixed UTF-8 string.
    fn string(&mut self, what: &dyn Fn() -> String) -> Result<String> {
        let len = self.count(|| format!("{} length", what()))?;
        let start = self.pos;
        let bytes = self.take(len, || format!("{} ({len} bytes)", what()))?;
        match std::str::from_utf8(bytes) {
            Ok(s) => Ok(s.to_owned()),
            Err(e) => Err(Error::gguf(format!("{} at offset {start} is not valid utf-8 ({e})", what()))),
        }
    }
}

/// Metadata value type ids (`enum gguf_type`).
mod value_type {
    pub const U8: u32 = 0;
    pub const I8: u32 = 1;
    pub const U16: u32 = 2;
    pub const I16: u32 = 3;
    pub const U32: u32 = 4;
    pub const I32: u32 = 5;
    pub const F32: u32 = 6;
    pub const BOOL: u32 = 7;
    pub const STRING: u32 = 8;
    pub const ARRAY: u32 = 9;
    pub const U64: u32 = 10;
    pub const I64: u32 = 11;
    pub const F64: u32 = 12;
}

/// The smallest number of bytes a value of type `ty` can occupy, or `None` for an unknown type.
fn min_value_size(ty: u32, count_width: u64) -> Option<u64> {
    use value_type::*;
    Some(match ty {
        U8 | I8 | BOOL => 1,
        U16 | I16 => 2,
        U32 | I32 | F32 => 4,
        U64 | I64 | F64 => 8,
        STRING => count_width,
        ARRAY => 4 + count_width,
        _ => return None,
    })
}

/// Parses the header of a whole GGUF file held in `bytes`.
pub(crate) fn parse(bytes: &[u8]) -> Result<Header> {
    let mut c = Cursor { bytes, pos: 0, narrow: false };
    let magic = c.array::<4>(|| "magic".into())?;
    if &magic != MAGIC {
        return Err(Error::gguf(format!("bad magic {magic:02x?}, expected \"GGUF\"")));
    }
    let version = c.u32(|| "version".into())?;
    match version {
        1 => c.narrow = true,
        2 | 3 => {}
        v if (1..=3).contains(&v.swap_bytes()) => {
            return Err(Error::gguf(format!(
                "version field {v:#x} looks byte-swapped: big-endian files are not supported"
            )));
        }
        v => return Err(Error::gguf(format!("unsupported version {v} (supported: 1, 2, 3)"))),
    }
    let tensor_count = c.count(|| "tensor count".into())?;
    let kv_count = c.count(|| "metadata count".into())?;

    let metadata = parse_metadata(&mut c, kv_count)?;
    let alignment = match metadata.get("general.alignment") {
        None => DEFAULT_ALIGNMENT,
        Some(Value::U32(a)) if a.is_power_of_two() => u64::from(*a),
        Some(other) => {
            return Err(Error::gguf(format!(
                "general.alignment must be a u32 power of two, found {other:?}"
            )));
        }
    };
    let mut tensors = parse_tensor_infos(&mut c, tensor_count, alignment)?;

    // The data section starts at the next multiple of the alignment after the header.
    let header_end = c.pos as u64;
    let data_offset = header_end.div_ceil(alignment) * alignment;
    let file_len = bytes.len() as u64;
    for t in &mut tensors {
        let start = data_offset.checked_add(t.offset);
        let end = start.and_then(|s| s.checked_add(t.n_bytes));
        match (start, end) {
            (Some(_), Some(end)) if end <= file_len => {}
            (start, end) => {
                let fmt = |x: Option<u64>| x.map_or_else(|| "overflow".to_owned(), |x| x.to_string());
                return Err(Error::gguf(format!(
                    "tensor {}: data range {}..{} past end of file ({file_len} bytes)",
                    t.name,
                    fmt(start),
                    fmt(end)
                )));
            }
        }
    }
    Ok(Header { version, metadata, tensors, alignment, data_offset })
}

fn parse_metadata(c: &mut Cursor<'_>, kv_count: u64) -> Result<BTreeMap<String, Value>> {
    // Each pair needs at least a key length, a type and a one-byte value.
    let min_pair = c.count_width() + 4 + 1;
    if kv_count.checked_mul(min_pair).is_none_or(|n| n > c.remaining() as u64) {
        return Err(Error::gguf(format!(
            "metadata count {kv_count} cannot fit in the {} bytes left",
            c.remaining()
        )));
    }
    let mut metadata = BTreeMap::new();
    let mut budget = MAX_METADATA_VALUES;
    for i in 0..kv_count {
        let key = c.string(&|| format!("metadata key #{i}"))?;
        let ty = c.u32(|| format!("type of metadata key {key}"))?;
        let value = read_value(c, ty, 0, &mut budget, &key)?;
        if metadata.contains_key(&key) {
            return Err(Error::gguf(format!("duplicate metadata key {key}")));
        }
        metadata.insert(key, value);
    }
    Ok(metadata)
}

/// Reads one value of type `ty` for metadata key `key`, spending `budget` values.
fn read_value(c: &mut Cursor<'_>, ty: u32, depth: u32, budget: &mut u64, key: &str) -> Result<Value> {
    use value_type::*;
    if *budget == 0 {
        return Err(Error::gguf(format!(
            "metadata key {key}: more than {MAX_METADATA_VALUES} metadata values in the file"
        )));
    }
    *budget -= 1;
    let what = || format!("value of metadata key {key}");
    Ok(match ty {
        U8 => Value::U8(c.array::<1>(what)?[0]),
        I8 => Value::I8(i8::from_le_bytes(c.array(what)?)),
        U16 => Value::U16(u16::from_le_bytes(c.array(what)?)),
        I16 => Value::I16(i16::from_le_bytes(c.array(what)?)),
        U32 => Value::U32(u32::from_le_bytes(c.array(what)?)),
        I32 => Value::I32(i32::from_le_bytes(c.array(what)?)),
        F32 => Value::F32(f32::from_le_bytes(c.array(what)?)),
        U64 => Value::U64(u64::from_le_bytes(c.array(what)?)),
        I64 => Value::I64(i64::from_le_bytes(c.array(what)?)),
        F64 => Value::F64(f64::from_le_bytes(c.array(what)?)),
        BOOL => match c.array::<1>(what)?[0] {
            0 => Value::Bool(false),
            1 => Value::Bool(true),
            b => return Err(Error::gguf(format!("metadata key {key}: bool byte {b} is neither 0 nor 1"))),
        },
        STRING => Value::String(c.string(&what)?),
        ARRAY => {
            if depth >= MAX_ARRAY_DEPTH {
                return Err(Error::gguf(format!(
                    "metadata key {key}: arrays nested deeper than {MAX_ARRAY_DEPTH}"
                )));
            }
            let elem_ty = c.u32(|| format!("array element type of metadata key {key}"))?;
            let Some(min) = min_value_size(elem_ty, c.count_width()) else {
                return Err(Error::gguf(format!("metadata key {key}: unknown array element type {elem_ty}")));
            };
            let len = c.count(|| format!("array length of metadata key {key}"))?;
            if len.checked_mul(min).is_none_or(|n| n > c.remaining() as u64) {
                return Err(Error::gguf(format!(
                    "metadata key {key}: array of {len} elements cannot fit in the {} bytes left",
                    c.remaining()
                )));
            }
            if len > *budget {
                return Err(Error::gguf(format!(
                    "metadata key {key}: more than {MAX_METADATA_VALUES} metadata values in the file"
                )));
            }
            // Checked above: `len` elements of at least one byte each fit in the bytes left.
            let mut items = Vec::with_capacity(len as usize);
            for _ in 0..len {
                items.push(read_value(c, elem_ty, depth + 1, budget, key)?);
            }
            Value::Array(items)
        }
        other => return Err(Error::gguf(format!("metadata key {key}: unknown value type {other}"))),
    })
}

fn parse_tensor_infos(c: &mut Cursor<'_>, count: u64, alignment: u64) -> Result<Vec<TensorInfo>> {
    // Each info needs at least a name length, a dimension count, one dimension, a type and an
    // offset.
    let min_info = c.count_width() * 2 + 4 + 4 + 8;
    if count > MAX_TENSORS {
        return Err(Error::gguf(format!("tensor count {count} exceeds the limit of {MAX_TENSORS}")));
    }
    if count.checked_mul(min_info).is_none_or(|n| n > c.remaining() as u64) {
        return Err(Error::gguf(format!(
            "tensor count {count} cannot fit in the {} bytes left",
            c.remaining()
        )));
    }
    let mut tensors = Vec::with_capacity(count as usize);
    let mut names = HashSet::with_capacity(count as usize);
    for i in 0..count {
        let name = c.string(&|| format!("name of tensor #{i}"))?;
        let n_dims = c.u32(|| format!("dimension count of tensor {name}"))?;
        if n_dims == 0 || n_dims > MAX_DIMS {
            return Err(Error::gguf(format!("tensor {name}: {n_dims} dimensions (must be 1 to {MAX_DIMS})")));
        }
        let mut dims = Vec::with_capacity(n_dims as usize);
        for d in 0..n_dims {
            dims.push(c.count(|| format!("dimension {d} of tensor {name}"))?);
        }
        let type_id = c.u32(|| format!("type of tensor {name}"))?;
        let offset = c.u64(|| format!("offset of tensor {name}"))?;
        let Some(ggml_type) = GgmlType::from_id(type_id) else {
            return Err(Error::gguf(format!("tensor {name}: unknown ggml type {type_id}")));
        };
        let n_elements = dims
            .iter()
            .try_fold(1u64, |acc, &d| acc.checked_mul(d))
            .filter(|&n| n <= i64::MAX as u64 && usize::try_from(n).is_ok())
            .ok_or_else(|| Error::gguf(format!("tensor {name}: dimensions {dims:?} overflow")))?;
        let block = ggml_type.block_size();
        if !dims[0].is_multiple_of(block) {
            return Err(Error::gguf(format!(
                "tensor {name}: first dimension {} is not a multiple of the {ggml_type} block size {block}",
                dims[0]
            )));
        }
        let n_bytes = (n_elements / block).checked_mul(ggml_type.type_size()).ok_or_else(|| {
            Error::gguf(format!("tensor {name}: byte size of dimensions {dims:?} overflows"))
        })?;
        if !offset.is_multiple_of(alignment) {
            return Err(Error::gguf(format!(
                "tensor {name}: offset {offset} is not a multiple of the alignment {alignment}"
            )));
        }
        if !names.insert(name.clone()) {
            return Err(Error::gguf(format!("duplicate tensor name {name}")));
        }
        tensors.push(TensorInfo { name, ggml_type, dims, offset, n_bytes });
    }
    Ok(tensors)
}
