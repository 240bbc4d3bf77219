//! GGUF files: the container llama.cpp uses for model weights, hyper-parameters and tokenizer.
//!
//! [`Gguf`] owns the file's bytes (memory-mapped for files, so opening a 100 MB model costs
//! no copy) and the parsed header. The bytes are untrusted: [`Gguf::open`] and
//! [`Gguf::from_bytes`] validate the whole header and every tensor's byte range up front
//! (see `parse`), so after construction every [`TensorInfo`] it hands out points inside the
//! file and accessors cannot fail on bounds. Tensor data is only read on demand by
//! [`Gguf::tensor_bytes`] and [`Gguf::dequantize`].

mod dequant;
mod parse;
mod types;

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::Path;

pub use types::GgmlType;

use crate::error::{Error, Result};

/// A GGUF metadata value, one variant per GGUF value type.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// `GGUF_TYPE_UINT8`.
    U8(u8),
    /// `GGUF_TYPE_INT8`.
    I8(i8),
    /// `GGUF_TYPE_UINT16`.
    U16(u16),
    /// `GGUF_TYPE_INT16`.
    I16(i16),
    /// `GGUF_TYPE_UINT32`.
    U32(u32),
    /// `GGUF_TYPE_INT32`.
    I32(i32),
    /// `GGUF_TYPE_UINT64`.
    U64(u64),
    /// `GGUF_TYPE_INT64`.
    I64(i64),
    /// `GGUF_TYPE_FLOAT32`.
    F32(f32),
    /// `GGUF_TYPE_FLOAT64`.
    F64(f64),
    /// `GGUF_TYPE_BOOL`.
    Bool(bool),
    /// `GGUF_TYPE_STRING` (UTF-8; files with invalid UTF-8 are rejected).
    String(String),
    /// `GGUF_TYPE_ARRAY`: elements all of one type.
    Array(Vec<Value>),
}

impl Value {
    /// The GGUF name of the value's type, for error messages.
    pub fn type_name(&self) -> &'static str {
        match self {
            Value::U8(_) => "u8",
            Value::I8(_) => "i8",
            Value::U16(_) => "u16",
            Value::I16(_) => "i16",
            Value::U32(_) => "u32",
            Value::I32(_) => "i32",
            Value::U64(_) => "u64",
            Value::I64(_) => "i64",
            Value::F32(_) => "f32",
            Value::F64(_) => "f64",
            Value::Bool(_) => "bool",
            Value::String(_) => "string",
            Value::Array(_) => "array",
        }
    }

    /// The value as a signed 128-bit integer if it is of any integer type (every GGUF integer
    /// fits, so range checks happen once, in the caller's target type).
    pub fn as_integer(&self) -> Option<i128> {
        Some(match *self {
            Value::U8(v) => v.into(),
            Value::I8(v) => v.into(),
            Value::U16(v) => v.into(),
            Value::I16(v) => v.into(),
            Value::U32(v) => v.into(),
            Value::I32(v) => v.into(),
            Value::U64(v) => v.into(),
            Value::I64(v) => v.into(),
            _ => return None,
        })
    }

    /// The value as a string slice if it is a string.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }

    /// The elements if the value is an array.
    pub fn as_array(&self) -> Option<&[Value]> {
        match self {
            Value::Array(items) => Some(items),
            _ => None,
        }
    }
}

/// Where one tensor lives in the file and how to read it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorInfo {
    /// The tensor's name, e.g. `blk.0.attn_q.weight`.
    pub name: String,
    /// Element type of the stored data.
    pub ggml_type: GgmlType,
    /// Dimensions in GGUF order: `dims[0]` varies fastest (the row length).
    pub dims: Vec<u64>,
    /// Offset of the data relative to the start of the data section.
    pub offset: u64,
    /// Length of the data in bytes.
    pub n_bytes: u64,
}

impl TensorInfo {
    /// The row-major shape, outermost dimension first (`dims` reversed), as torch wants it.
    pub fn shape(&self) -> Vec<usize> {
        // The parser checked the element count fits in usize, so each dimension does too.
        self.dims.iter().rev().map(|&d| usize::try_from(d).unwrap_or(usize::MAX)).collect()
    }

    /// The number of elements (product of the dimensions).
    pub fn n_elements(&self) -> u64 {
        self.dims.iter().product()
    }
}

/// The bytes behind a [`Gguf`].
enum Storage {
    Mapped(memmap2::Mmap),
    Owned(Vec<u8>),
}

impl Storage {
    fn bytes(&self) -> &[u8] {
        match self {
            Storage::Mapped(m) => m,
            Storage::Owned(v) => v,
        }
    }
}

/// A parsed GGUF file: metadata, tensor infos and the raw tensor data.
pub struct Gguf {
    storage: Storage,
    version: u32,
    metadata: BTreeMap<String, Value>,
    tensors: Vec<TensorInfo>,
    by_name: HashMap<String, usize>,
    alignment: u64,
    data_offset: u64,
}

impl std::fmt::Debug for Gguf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The metadata holds the whole vocabulary; print a summary instead.
        f.debug_struct("Gguf")
            .field("version", &self.version)
            .field("metadata_keys", &self.metadata.len())
            .field("tensors", &self.tensors.len())
            .field("bytes", &self.storage.bytes().len())
            .finish()
    }
}

impl Gguf {
    /// Memory-maps and parses the GGUF file at `path`.
    pub fn open(path: &Path) -> Result<Gguf> {
        let io = |source| Error::Io { path: path.to_owned(), source };
        let file = File::open(path).map_err(io)?;
        // SAFETY: the map is read-only and private to us. Another process truncating or
        // rewriting the file while it is mapped is outside what we can defend against (a
        // model file is replaced by writing a new file and renaming it, never in place).
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(io)?;
        let gguf = Self::from_storage(Storage::Mapped(map))?;
        tracing::debug!(
            path = %path.display(),
            version = gguf.version,
            tensors = gguf.tensors.len(),
            metadata_keys = gguf.metadata.len(),
            "opened gguf"
        );
        Ok(gguf)
    }

    /// Parses a GGUF file held in memory.
    pub fn from_bytes(bytes: Vec<u8>) -> Result<Gguf> {
        Self::from_storage(Storage::Owned(bytes))
    }

    fn from_storage(storage: Storage) -> Result<Gguf> {
        let header = parse::parse(storage.bytes())?;
        let by_name = header.tensors.iter().enumerate().map(|(i, t)| (t.name.clone(), i)).collect();
        Ok(Gguf {
            storage,
            version: header.version,
            metadata: header.metadata,
            tensors: header.tensors,
            by_name,
            alignment: header.alignment,
            data_offset: header.data_offset,
        })
    }

    /// The GGUF format version of the file (1, 2 or 3).
    pub fn version(&self) -> u32 {
        self.version
    }

    /// The alignment of tensor data (`general.alignment`, 32 by default).
    pub fn alignment(&self) -> u64 {
        self.alignment
    }

    /// All metadata, sorted by key.
    pub fn metadata(&self) -> &BTreeMap<String, Value> {
        &self.metadata
    }

    /// The metadata value under `key`, if any.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.get(key)
    }

    fn require(&self, key: &str) -> Result<&Value> {
        self.get(key).ok_or_else(|| Error::metadata(key, "missing"))
    }

    /// An integer metadata value of any integer type that fits in a u32.
    pub fn get_u32(&self, key: &str) -> Result<u32> {
        let value = self.require(key)?;
        let n = value.as_integer().ok_or_else(|| {
            Error::metadata(key, format!("expected an integer, found {}", value.type_name()))
        })?;
        u32::try_from(n).map_err(|_| Error::metadata(key, format!("value {n} does not fit in a u32")))
    }

    /// A floating-point metadata value (f32, or f64 rounded to f32).
    pub fn get_f32(&self, key: &str) -> Result<f32> {
        match self.require(key)? {
            Value::F32(v) => Ok(*v),
            Value::F64(v) => Ok(*v as f32),
            other => Err(Error::metadata(key, format!("expected a float, found {}", other.type_name()))),
        }
    }

    /// A string metadata value.
    pub fn get_str(&self, key: &str) -> Result<&str> {
        let value = self.require(key)?;
        value
            .as_str()
            .ok_or_else(|| Error::metadata(key, format!("expected a string, found {}", value.type_name())))
    }

    /// An array metadata value.
    pub fn get_array(&self, key: &str) -> Result<&[Value]> {
        let value = self.require(key)?;
        value
            .as_array()
            .ok_or_else(|| Error::metadata(key, format!("expected an array, found {}", value.type_name())))
    }

    /// The model architecture (`general.architecture`, e.g. `llama`); other keys are prefixed
    /// with it.
    pub fn architecture(&self) -> Result<&str> {
        self.get_str("general.architecture")
    }

    /// All tensor infos, in file order.
    pub fn tensors(&self) -> &[TensorInfo] {
        &self.tensors
    }

    /// The info of the tensor called `name`.
    pub fn tensor_info(&self, name: &str) -> Option<&TensorInfo> {
        self.by_name.get(name).map(|&i| &self.tensors[i])
    }

    /// The raw stored bytes of a tensor. `info` must come from this file; for an info whose
    /// range is not inside the file (one built by hand) the slice is empty.
    pub fn tensor_bytes(&self, info: &TensorInfo) -> &[u8] {
        let bytes = self.storage.bytes();
        let range = self
            .data_offset
            .checked_add(info.offset)
            .and_then(|start| Some(start..start.checked_add(info.n_bytes)?))
            .and_then(|r| Some(usize::try_from(r.start).ok()?..usize::try_from(r.end).ok()?));
        range.and_then(|r| bytes.get(r)).unwrap_or(&[])
    }

    /// The tensor called `name` converted to f32, with its row-major shape.
    pub fn dequantize(&self, name: &str) -> Result<(Vec<f32>, Vec<usize>)> {
        let info = self.tensor_info(name).ok_or_else(|| Error::TensorNotFound { name: name.to_owned() })?;
        let unsupported =
            || Error::UnsupportedType { name: name.to_owned(), ggml_type: info.ggml_type.name().to_owned() };
        if !info.ggml_type.can_dequantize() {
            return Err(unsupported());
        }
        let values = dequant::dequantize(info.ggml_type, self.tensor_bytes(info)).ok_or_else(unsupported)?;
        Ok((values, info.shape()))
    }
}
