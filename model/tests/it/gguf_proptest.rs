//! Property tests of the GGUF parser: arbitrary metadata written by the independent test
//! writer parses back to itself, and arbitrary mutations of a valid file (byte flips,
//! overwrites with boundary values, insertions, deletions, truncation) never panic: the parser
//! either rejects the file or returns one whose every tensor can be read and dequantised.
//!
//! `PROPTEST_CASES` raises the case count for a longer fuzzing run.

use crate::gguf_writer::{GgufWriter, sample, value_type};
use llmchain_model::gguf::{GgmlType, Gguf, Value};
use proptest::prelude::*;

/// A scalar or string value of the given GGUF type id.
fn scalar(ty: u8) -> BoxedStrategy<Value> {
    match ty {
        0 => any::<u8>().prop_map(Value::U8).boxed(),
        1 => any::<i8>().prop_map(Value::I8).boxed(),
        2 => any::<u16>().prop_map(Value::U16).boxed(),
        3 => any::<i16>().prop_map(Value::I16).boxed(),
        4 => any::<u32>().prop_map(Value::U32).boxed(),
        5 => any::<i32>().prop_map(Value::I32).boxed(),
        // NaN != NaN would make the round-trip comparison meaningless; compare finite floats.
        6 => any::<f32>().prop_filter("finite", |f| f.is_finite()).prop_map(Value::F32).boxed(),
        7 => any::<bool>().prop_map(Value::Bool).boxed(),
        8 => ".{0,24}".prop_map(Value::String).boxed(),
        10 => any::<u64>().prop_map(Value::U64).boxed(),
        11 => any::<i64>().prop_map(Value::I64).boxed(),
        _ => any::<f64>().prop_filter("finite", |f| f.is_finite()).prop_map(Value::F64).boxed(),
    }
}

const SCALAR_TYPES: [u8; 12] = [0, 1, 2, 3, 4, 5, 6, 7, 8, 10, 11, 12];

/// Any value: a scalar, or an array whose elements share one type (possibly arrays again).
fn value() -> impl Strategy<Value = Value> {
    let leaf = prop::sample::select(&SCALAR_TYPES[..]).prop_flat_map(scalar);
    leaf.prop_recursive(2, 64, 8, |inner| {
        // Arrays in GGUF are homogeneous: draw one type and fill the array with it. Using the
        // first drawn element's variant as the template keeps nested arrays homogeneous too.
        inner.prop_flat_map(|template| match template {
            Value::Array(_) => prop::collection::vec(Just(template), 0..3).prop_map(Value::Array).boxed(),
            other => {
                let ty = value_type(&other) as u8;
                prop::collection::vec(scalar(ty), 1..8).prop_map(Value::Array).boxed()
            }
        })
    })
}

/// A mutation of a file's bytes.
#[derive(Debug, Clone)]
enum Mutation {
    Xor(usize, u8),
    /// Overwrite 1, 4 or 8 bytes with a boundary value (0, all ones, a power of two...).
    Overwrite(usize, u64, usize),
    Insert(usize, Vec<u8>),
    Delete(usize, usize),
    Truncate(usize),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    let boundary =
        prop::sample::select(vec![0u64, 1, 2, 3, 8, 9, 31, 32, 255, 1 << 31, u32::MAX as u64, u64::MAX]);
    prop_oneof![
        4 => (any::<usize>(), 1u8..).prop_map(|(at, x)| Mutation::Xor(at, x)),
        3 => (any::<usize>(), boundary, prop::sample::select(vec![1usize, 4, 8]))
            .prop_map(|(at, v, w)| Mutation::Overwrite(at, v, w)),
        1 => (any::<usize>(), prop::collection::vec(any::<u8>(), 1..16)).prop_map(|(at, b)| Mutation::Insert(at, b)),
        1 => (any::<usize>(), 1usize..16).prop_map(|(at, n)| Mutation::Delete(at, n)),
        1 => any::<usize>().prop_map(Mutation::Truncate),
    ]
}

fn apply(bytes: &mut Vec<u8>, m: &Mutation) {
    if bytes.is_empty() {
        return;
    }
    let len = bytes.len();
    match m {
        Mutation::Xor(at, x) => bytes[at % len] ^= x,
        Mutation::Overwrite(at, v, w) => {
            let at = at % len;
            let end = (at + w).min(len);
            bytes[at..end].copy_from_slice(&v.to_le_bytes()[..end - at]);
        }
        Mutation::Insert(at, b) => {
            let at = at % (len + 1);
            bytes.splice(at..at, b.iter().copied());
        }
        Mutation::Delete(at, n) => {
            let at = at % len;
            bytes.drain(at..(at + n).min(len));
        }
        Mutation::Truncate(at) => bytes.truncate(at % len),
    }
}

/// Everything a caller could read from a parsed file must be consistent and panic-free.
fn read_everything(g: &Gguf) {
    for t in g.tensors() {
        assert_eq!(g.tensor_bytes(t).len() as u64, t.n_bytes, "{}", t.name);
        if let Ok((values, shape)) = g.dequantize(&t.name) {
            assert_eq!(values.len() as u64, t.n_elements());
            assert_eq!(shape.iter().product::<usize>(), values.len());
        }
    }
    for key in g.metadata().keys() {
        let _ = (g.get_u32(key), g.get_f32(key), g.get_str(key));
    }
    let _ = llmchain_model::tokenizer::Tokenizer::from_gguf(g);
}

/// 512 cases by default; `PROPTEST_CASES` overrides it for a longer fuzzing run.
fn config() -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(512);
    ProptestConfig { cases, ..ProptestConfig::default() }
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn written_metadata_parses_back(
        kvs in prop::collection::btree_map("[a-z]{1,6}(\\.[a-z_]{1,8}){0,2}", value(), 0..12),
        version in 1u32..=3,
    ) {
        let mut w = GgufWriter::new().version(version);
        for (k, v) in &kvs {
            w = w.kv(k, v.clone());
        }
        let g = Gguf::from_bytes(w.build().bytes).unwrap();
        prop_assert_eq!(g.metadata(), &kvs);
        prop_assert_eq!(g.version(), version);
    }

    #[test]
    fn mutated_files_never_panic(mutations in prop::collection::vec(mutation(), 1..6), version in 1u32..=3) {
        let mut bytes = sample().version(version).build().bytes;
        for m in &mutations {
            apply(&mut bytes, m);
        }
        if let Ok(g) = Gguf::from_bytes(bytes) {
            read_everything(&g);
        }
    }

    #[test]
    fn tensors_of_any_type_and_shape_parse_or_fail_cleanly(
        type_id in 0u32..42,
        dims in prop::collection::vec(0u64..600, 1..5),
        data_len in 0usize..2048,
    ) {
        let Some(ty) = GgmlType::from_id(type_id) else { return Ok(()) };
        let built = GgufWriter::new().tensor("t", ty, &dims, vec![0x3c; data_len]).build();
        let expected_bytes = dims.iter().product::<u64>() / ty.block_size() * ty.type_size();
        let valid = dims[0] % ty.block_size() == 0 && expected_bytes <= data_len as u64;
        match Gguf::from_bytes(built.bytes) {
            Ok(g) => {
                prop_assert!(valid, "accepted {ty} {dims:?} with {data_len} bytes");
                prop_assert_eq!(g.tensors()[0].n_bytes, expected_bytes);
                read_everything(&g);
            }
            Err(e) => prop_assert!(!valid, "rejected valid {ty} {dims:?} with {data_len} bytes: {e}"),
        }
    }
}
