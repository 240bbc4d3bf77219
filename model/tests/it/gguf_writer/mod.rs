//! A small GGUF writer for tests: builds valid files of any version, and records where each
//! header field lies so corruption tests can aim at counts, lengths, types and offsets.
//!
//! It is written from the GGUF specification independently of the crate's parser, so a test
//! that round-trips through both checks the parser against the format, not against itself.

#![allow(dead_code)] // Each test binary uses a different part of it.

use llmchain_model::gguf::{GgmlType, Value};

/// What a recorded header field holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FieldKind {
    Magic,
    Version,
    Count,
    StringLength,
    ValueType,
    Value,
    DimCount,
    Dim,
    TensorType,
    TensorOffset,
}

/// One header field: its kind, byte position and width.
#[derive(Debug, Clone, Copy)]
pub struct Field {
    pub kind: FieldKind,
    pub pos: usize,
    pub width: usize,
}

/// A written file and the layout of its header.
pub struct Built {
    pub bytes: Vec<u8>,
    pub fields: Vec<Field>,
    /// Offset of the data section.
    pub data_offset: usize,
}

/// Builder of GGUF files.
pub struct GgufWriter {
    version: u32,
    alignment: usize,
    kvs: Vec<(String, Value)>,
    tensors: Vec<(String, GgmlType, Vec<u64>, Vec<u8>)>,
}

/// The GGUF type id of `v`.
pub fn value_type(v: &Value) -> u32 {
    match v {
        Value::U8(_) => 0,
        Value::I8(_) => 1,
        Value::U16(_) => 2,
        Value::I16(_) => 3,
        Value::U32(_) => 4,
        Value::I32(_) => 5,
        Value::F32(_) => 6,
        Value::Bool(_) => 7,
        Value::String(_) => 8,
        Value::Array(_) => 9,
        Value::U64(_) => 10,
        Value::I64(_) => 11,
        Value::F64(_) => 12,
    }
}

struct Out {
    bytes: Vec<u8>,
    fields: Vec<Field>,
    narrow: bool,
}

impl Out {
    fn put(&mut self, kind: FieldKind, data: &[u8]) {
        self.fields.push(Field { kind, pos: self.bytes.len(), width: data.len() });
        self.bytes.extend_from_slice(data);
    }

    fn count(&mut self, kind: FieldKind, n: u64) {
        if self.narrow {
            self.put(kind, &(n as u32).to_le_bytes());
        } else {
            self.put(kind, &n.to_le_bytes());
        }
    }

    fn string(&mut self, s: &str) {
        self.count(FieldKind::StringLength, s.len() as u64);
        self.put(FieldKind::Value, s.as_bytes());
    }

    fn value(&mut self, v: &Value) {
        match v {
            Value::U8(x) => self.put(FieldKind::Value, &x.to_le_bytes()),
            Value::I8(x) => self.put(FieldKind::Value, &x.to_le_bytes()),
            Value::U16(x) => self.put(FieldKind::Value, &x.to_le_bytes()),
            Value::I16(x) => self.put(FieldKind::Value, &x.to_le_bytes()),
            Value::U32(x) => self.put(FieldKind::Value, &x.to_le_bytes()),
            Value::I32(x) => self.put(FieldKind::Value, &x.to_le_bytes()),
            Value::U64(x) => self.put(FieldKind::Value, &x.to_le_bytes()),
            Value::I64(x) => self.put(FieldKind::Value, &x.to_le_bytes()),
            Value::F32(x) => self.put(FieldKind::Value, &x.to_le_bytes()),
            Value::F64(x) => self.put(FieldKind::Value, &x.to_le_bytes()),
            Value::Bool(x) => self.put(FieldKind::Value, &[u8::from(*x)]),
            Value::String(s) => self.string(s),
            Value::Array(items) => {
                let elem = items.first().map_or(0, value_type);
                self.put(FieldKind::ValueType, &elem.to_le_bytes());
                self.count(FieldKind::Count, items.len() as u64);
                for item in items {
                    self.value(item);
                }
            }
        }
    }
}

impl Default for GgufWriter {
    fn default() -> Self {
        Self::new()
    }
}

impl GgufWriter {
    /// An empty version 3 file with the default alignment.
    pub fn new() -> Self {
        GgufWriter { version: 3, alignment: 32, kvs: Vec::new(), tensors: Vec::new() }
    }

    /// Sets the version written (1 uses 32-bit counts and lengths).
    pub fn version(mut self, version: u32) -> Self {
        self.version = version;
        self
    }

    /// Sets `general.alignment` (written as a u32 key) and lays tensors out accordingly.
    pub fn alignment(mut self, alignment: u32) -> Self {
        self.alignment = alignment as usize;
        self.kvs.push(("general.alignment".into(), Value::U32(alignment)));
        self
    }

    /// Adds a metadata key.
    pub fn kv(mut self, key: &str, value: Value) -> Self {
        self.kvs.push((key.into(), value));
        self
    }

    /// Adds a tensor with GGUF-order `dims` and raw `data`.
    pub fn tensor(mut self, name: &str, ty: GgmlType, dims: &[u64], data: Vec<u8>) -> Self {
        self.tensors.push((name.into(), ty, dims.to_vec(), data));
        self
    }

    /// Writes the file.
    pub fn build(&self) -> Built {
        let mut o = Out { bytes: Vec::new(), fields: Vec::new(), narrow: self.version == 1 };
        o.put(FieldKind::Magic, b"GGUF");
        o.put(FieldKind::Version, &self.version.to_le_bytes());
        o.count(FieldKind::Count, self.tensors.len() as u64);
        o.count(FieldKind::Count, self.kvs.len() as u64);
        for (key, value) in &self.kvs {
            o.string(key);
            o.put(FieldKind::ValueType, &value_type(value).to_le_bytes());
            o.value(value);
        }
        let pad = |n: usize| n.div_ceil(self.alignment) * self.alignment;
        let mut offset = 0usize;
        let mut offsets = Vec::new();
        for (name, ty, dims, data) in &self.tensors {
            o.string(name);
            o.put(FieldKind::DimCount, &(dims.len() as u32).to_le_bytes());
            for &d in dims {
                o.count(FieldKind::Dim, d);
            }
            o.put(FieldKind::TensorType, &ty.id().to_le_bytes());
            o.put(FieldKind::TensorOffset, &(offset as u64).to_le_bytes());
            offsets.push(offset);
            offset = pad(offset + data.len());
        }
        let data_offset = pad(o.bytes.len());
        o.bytes.resize(data_offset, 0);
        for ((_, _, _, data), &at) in self.tensors.iter().zip(&offsets) {
            o.bytes.resize(data_offset + at, 0);
            o.bytes.extend_from_slice(data);
        }
        Built { bytes: o.bytes, fields: o.fields, data_offset }
    }
}

/// A deterministic xorshift generator, so corruption corpora are the same on every run.
pub struct XorShift(pub u64);

impl XorShift {
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
}

/// f16 bits of `x` (exact for the small dyadic values the tests use).
pub fn f16_bytes(x: f32) -> [u8; 2] {
    half::f16::from_f32(x).to_bits().to_le_bytes()
}

/// A small valid file with metadata of every type and tensors of several types, used as the
/// seed for corruption tests.
pub fn sample() -> GgufWriter {
    let f32_data: Vec<u8> = (0..8).flat_map(|i| (i as f32 * 0.5).to_le_bytes()).collect();
    let mut q8 = Vec::new();
    for b in 0..2 {
        q8.extend_from_slice(&f16_bytes(0.25 * (b + 1) as f32));
        q8.extend((0..32).map(|i| (i as i8 - 16) as u8));
    }
    let mut q4_1 = Vec::new();
    q4_1.extend_from_slice(&f16_bytes(0.5));
    q4_1.extend_from_slice(&f16_bytes(-1.0));
    q4_1.extend((0..16u8).map(|i| i | (15 - i) << 4));
    GgufWriter::new()
        .kv("general.architecture", Value::String("llama".into()))
        .kv("general.name", Value::String("tiny test".into()))
        .kv("test.u8", Value::U8(200))
        .kv("test.i8", Value::I8(-5))
        .kv("test.u16", Value::U16(60000))
        .kv("test.i16", Value::I16(-30000))
        .kv("test.u32", Value::U32(4_000_000_000))
        .kv("test.i32", Value::I32(-7))
        .kv("test.u64", Value::U64(1 << 40))
        .kv("test.i64", Value::I64(-(1 << 40)))
        .kv("test.f32", Value::F32(1.5))
        .kv("test.f64", Value::F64(-2.25))
        .kv("test.bool", Value::Bool(true))
        .kv("test.strings", Value::Array(vec![Value::String("a b".into()), Value::String("ü€".into())]))
        .kv("test.ints", Value::Array((0..5).map(Value::I32).collect()))
        .kv(
            "test.nested",
            Value::Array(vec![
                Value::Array(vec![Value::U8(1)]),
                Value::Array(vec![Value::U8(2), Value::U8(3)]),
            ]),
        )
        .tensor("norm.weight", GgmlType::F32, &[8], f32_data)
        .tensor("embd.weight", GgmlType::Q8_0, &[32, 2], q8)
        .tensor("blk.0.attn_q.weight", GgmlType::Q4_1, &[32, 1], q4_1)
}
