//! GGUF parsing: valid files of every version round-trip through the independent test writer,
//! and a corpus of corrupt and truncated files built here each yields a clean error (or, for
//! harmless value mutations, a consistent file) without a panic.

use std::panic::{AssertUnwindSafe, catch_unwind};

use crate::gguf_writer::{FieldKind, GgufWriter, XorShift, sample};
use llmchain_model::Error;
use llmchain_model::gguf::{GgmlType, Gguf, Value};

fn parse(bytes: Vec<u8>) -> Result<Gguf, Error> {
    Gguf::from_bytes(bytes)
}

fn reason(bytes: Vec<u8>) -> String {
    match parse(bytes) {
        Ok(g) => panic!("expected an error, parsed {g:?}"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn every_metadata_type_round_trips_in_every_version() {
    for version in [1, 2, 3] {
        let writer = sample().version(version);
        let built = writer.build();
        let g = parse(built.bytes.clone()).unwrap_or_else(|e| panic!("v{version}: {e}"));
        assert_eq!(g.version(), version);
        assert_eq!(g.get("test.u8"), Some(&Value::U8(200)));
        assert_eq!(g.get("test.i8"), Some(&Value::I8(-5)));
        assert_eq!(g.get("test.u16"), Some(&Value::U16(60000)));
        assert_eq!(g.get("test.i16"), Some(&Value::I16(-30000)));
        assert_eq!(g.get("test.u32"), Some(&Value::U32(4_000_000_000)));
        assert_eq!(g.get("test.i32"), Some(&Value::I32(-7)));
        assert_eq!(g.get("test.u64"), Some(&Value::U64(1 << 40)));
        assert_eq!(g.get("test.i64"), Some(&Value::I64(-(1 << 40))));
        assert_eq!(g.get("test.f32"), Some(&Value::F32(1.5)));
        assert_eq!(g.get("test.f64"), Some(&Value::F64(-2.25)));
        assert_eq!(g.get("test.bool"), Some(&Value::Bool(true)));
        assert_eq!(
            g.get("test.strings"),
            Some(&Value::Array(vec![Value::String("a b".into()), Value::String("ü€".into())]))
        );
        assert_eq!(g.get("test.ints").and_then(Value::as_array).map(<[Value]>::len), Some(5));
        assert_eq!(
            g.get("test.nested"),
            Some(&Value::Array(vec![
                Value::Array(vec![Value::U8(1)]),
                Value::Array(vec![Value::U8(2), Value::U8(3)])
            ]))
        );
        // Sorted, deterministic iteration.
        let keys: Vec<&String> = g.metadata().keys().collect();
        let mut sorted = keys.clone();
        sorted.sort();
        assert_eq!(keys, sorted);
        assert_eq!(g.metadata().len(), 16);

        assert_eq!(g.architecture().unwrap(), "llama");
        assert_eq!(g.get_str("general.name").unwrap(), "tiny test");
        assert_eq!(g.tensors().len(), 3);
        let embd = g.tensor_info("embd.weight").unwrap();
        assert_eq!(embd.ggml_type, GgmlType::Q8_0);
        assert_eq!(embd.dims, vec![32, 2]);
        assert_eq!(embd.shape(), vec![2, 32]);
        assert_eq!(embd.n_bytes, 68);
        assert_eq!(embd.offset % 32, 0);
        let start = built.data_offset + embd.offset as usize;
        assert_eq!(g.tensor_bytes(embd), &built.bytes[start..start + 68]);
        assert!(g.tensor_info("missing").is_none());
    }
}

#[test]
fn typed_getters_convert_and_name_the_key() {
    let g = parse(sample().build().bytes).unwrap();
    assert_eq!(g.get_u32("test.u8").unwrap(), 200);
    assert_eq!(g.get_u32("test.u16").unwrap(), 60000);
    assert_eq!(g.get_u32("test.u32").unwrap(), 4_000_000_000);
    let err = g.get_u32("test.i32").unwrap_err().to_string();
    assert!(err.contains("test.i32") && err.contains("-7"), "{err}");
    let err = g.get_u32("test.u64").unwrap_err().to_string();
    assert!(err.contains("test.u64") && err.contains("u32"), "{err}");
    let err = g.get_u32("test.f32").unwrap_err().to_string();
    assert!(err.contains("test.f32") && err.contains("f32"), "{err}");
    let err = g.get_u32("no.such.key").unwrap_err().to_string();
    assert!(err.contains("no.such.key") && err.contains("missing"), "{err}");
    assert_eq!(g.get_f32("test.f32").unwrap(), 1.5);
    assert_eq!(g.get_f32("test.f64").unwrap(), -2.25);
    assert!(g.get_f32("test.u8").unwrap_err().to_string().contains("test.u8"));
    assert!(g.get_str("test.bool").unwrap_err().to_string().contains("expected a string"));
}

#[test]
fn custom_alignment_is_honoured() {
    let built = sample().alignment(64).build();
    assert_eq!(built.data_offset % 64, 0);
    let g = parse(built.bytes.clone()).unwrap();
    assert_eq!(g.alignment(), 64);
    for t in g.tensors() {
        assert_eq!(t.offset % 64, 0, "{}", t.name);
        let start = built.data_offset + t.offset as usize;
        assert_eq!(g.tensor_bytes(t), &built.bytes[start..start + t.n_bytes as usize]);
    }
}

#[test]
fn open_reads_a_file_like_from_bytes() {
    let built = sample().build();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.gguf");
    std::fs::write(&path, &built.bytes).unwrap();
    let from_file = Gguf::open(&path).unwrap();
    let from_bytes = parse(built.bytes).unwrap();
    assert_eq!(from_file.metadata(), from_bytes.metadata());
    assert_eq!(from_file.tensors(), from_bytes.tensors());
    for t in from_file.tensors() {
        assert_eq!(from_file.tensor_bytes(t), from_bytes.tensor_bytes(t));
    }
    let err = Gguf::open(&dir.path().join("absent.gguf")).unwrap_err().to_string();
    assert!(err.contains("absent.gguf"), "{err}");
    std::fs::write(dir.path().join("empty.gguf"), b"").unwrap();
    let err = Gguf::open(&dir.path().join("empty.gguf")).unwrap_err().to_string();
    assert!(err.contains("magic"), "{err}");
}

#[test]
fn specific_corruptions_are_named() {
    let mut bytes = sample().build().bytes;
    bytes[0] = b'X';
    assert!(reason(bytes).contains("bad magic"));

    let mut bytes = sample().build().bytes;
    bytes[4..8].copy_from_slice(&7u32.to_le_bytes());
    assert!(reason(bytes).contains("unsupported version 7"));

    let mut bytes = sample().build().bytes;
    bytes[4..8].copy_from_slice(&0u32.to_le_bytes());
    assert!(reason(bytes).contains("unsupported version 0"));

    let mut bytes = sample().build().bytes;
    bytes[4..8].copy_from_slice(&3u32.to_be_bytes());
    assert!(reason(bytes).contains("big-endian"));

    let dup = GgufWriter::new().kv("a", Value::U8(1)).kv("a", Value::U8(2)).build();
    assert!(reason(dup.bytes).contains("duplicate metadata key a"));

    let dup = GgufWriter::new()
        .tensor("t", GgmlType::F32, &[1], vec![0; 4])
        .tensor("t", GgmlType::F32, &[1], vec![0; 4])
        .build();
    assert!(reason(dup.bytes).contains("duplicate tensor name t"));

    let bad_block = GgufWriter::new().tensor("q", GgmlType::Q8_0, &[16], vec![0; 17]).build();
    let r = reason(bad_block.bytes);
    assert!(r.contains("tensor q") && r.contains("block size 32"), "{r}");

    let five_dims = GgufWriter::new().tensor("t", GgmlType::F32, &[1, 1, 1, 1, 1], vec![0; 4]).build();
    assert!(reason(five_dims.bytes).contains("5 dimensions"));

    let overflow = GgufWriter::new().tensor("big", GgmlType::F32, &[1 << 32, 1 << 32], vec![]).build();
    let r = reason(overflow.bytes);
    assert!(r.contains("tensor big") && r.contains("overflow"), "{r}");

    let bad_alignment = GgufWriter::new().alignment(48).build();
    assert!(reason(bad_alignment.bytes).contains("general.alignment"));
    let wrong_type = GgufWriter::new().kv("general.alignment", Value::U64(32)).build();
    assert!(reason(wrong_type.bytes).contains("general.alignment"));

    let bool_byte = GgufWriter::new().kv("flag", Value::Bool(true)).build();
    let mut bytes = bool_byte.bytes;
    let at = bool_byte.fields.iter().rfind(|f| f.kind == FieldKind::Value).unwrap().pos;
    bytes[at] = 7;
    assert!(reason(bytes).contains("flag"));
}

#[test]
fn tensor_data_past_end_names_the_tensor_and_range() {
    let built = sample().build();
    let mut bytes = built.bytes;
    let len = bytes.len();
    bytes.truncate(len - 1);
    let r = reason(bytes);
    assert!(
        r.contains("tensor blk.0.attn_q.weight: data range")
            && r.contains(&format!("past end of file ({} bytes)", len - 1)),
        "{r}"
    );
}

#[test]
fn misaligned_and_unknown_tensor_fields_are_rejected() {
    let built = sample().build();
    let offsets: Vec<_> = built.fields.iter().filter(|f| f.kind == FieldKind::TensorOffset).collect();
    let mut bytes = built.bytes.clone();
    let last = offsets.last().unwrap().pos;
    let old = u64::from_le_bytes(bytes[last..last + 8].try_into().unwrap());
    bytes[last..last + 8].copy_from_slice(&(old + 4).to_le_bytes());
    let r = reason(bytes);
    assert!(r.contains("not a multiple of the alignment 32"), "{r}");

    let ty = built.fields.iter().find(|f| f.kind == FieldKind::TensorType).unwrap().pos;
    let mut bytes = built.bytes.clone();
    bytes[ty..ty + 4].copy_from_slice(&4u32.to_le_bytes());
    assert!(reason(bytes).contains("unknown ggml type 4"));

    let vt = built.fields.iter().find(|f| f.kind == FieldKind::ValueType).unwrap().pos;
    let mut bytes = built.bytes;
    bytes[vt..vt + 4].copy_from_slice(&13u32.to_le_bytes());
    assert!(reason(bytes).contains("unknown value type 13"));
}

#[test]
fn huge_counts_fail_before_allocating() {
    let built = sample().build();
    for field in built.fields.iter().filter(|f| matches!(f.kind, FieldKind::Count | FieldKind::StringLength))
    {
        for huge in [u64::MAX, u64::MAX / 2, 1 << 40, u32::MAX as u64] {
            let mut bytes = built.bytes.clone();
            bytes[field.pos..field.pos + field.width].copy_from_slice(&huge.to_le_bytes()[..field.width]);
            let r = reason(bytes);
            assert!(
                r.contains("cannot fit")
                    || r.contains("truncated")
                    || r.contains("not valid utf-8")
                    || r.contains("exceeds the limit"),
                "{field:?} = {huge}: {r}"
            );
        }
    }
}

#[test]
fn deeply_nested_arrays_are_rejected() {
    let mut v = Value::U8(1);
    for _ in 0..6 {
        v = Value::Array(vec![v]);
    }
    let r = reason(GgufWriter::new().kv("deep", v).build().bytes);
    assert!(r.contains("deep") && r.contains("nested"), "{r}");
}

/// Parses `bytes` and, when that succeeds, reads everything a caller could read; returns
/// whether parsing failed. Panics are caught and reported with the input's description.
fn exercise(bytes: Vec<u8>, what: &str) -> bool {
    let outcome = catch_unwind(AssertUnwindSafe(|| match parse(bytes) {
        Err(e) => {
            let msg = e.to_string();
            assert!(msg.starts_with("invalid gguf: "), "{what}: unexpected error kind: {msg}");
            true
        }
        Ok(g) => {
            for t in g.tensors() {
                assert_eq!(g.tensor_bytes(t).len() as u64, t.n_bytes);
                if let Ok((values, shape)) = g.dequantize(&t.name) {
                    assert_eq!(values.len(), shape.iter().product::<usize>());
                }
            }
            let _ = g.architecture();
            false
        }
    }));
    match outcome {
        Ok(failed) => failed,
        Err(_) => panic!("parser panicked on {what}"),
    }
}

#[test]
fn truncation_at_every_byte_is_a_clean_error() {
    for version in [1, 3] {
        let built = sample().version(version).build();
        for len in 0..built.bytes.len() {
            let failed = exercise(built.bytes[..len].to_vec(), &format!("v{version} truncated to {len}"));
            assert!(failed, "v{version} truncated to {len} bytes parsed");
        }
        // Truncating right at each header field boundary gives a message about truncation.
        for field in &built.fields {
            let r = reason(built.bytes[..field.pos].to_vec());
            assert!(r.contains("truncated") || r.contains("cannot fit"), "cut at {field:?}: {r}");
        }
    }
}

#[test]
fn mutated_header_fields_never_panic() {
    let built = sample().build();
    let mut errors = 0;
    let mut cases = 0;
    let interesting: [u64; 10] = [0, 1, 2, 3, 4, 31, 255, 0x8000_0000, u32::MAX as u64, u64::MAX];
    for field in &built.fields {
        for value in interesting {
            let mut bytes = built.bytes.clone();
            let w = field.width.min(8);
            bytes[field.pos..field.pos + w].copy_from_slice(&value.to_le_bytes()[..w]);
            cases += 1;
            errors += usize::from(exercise(bytes, &format!("{field:?} set to {value}")));
        }
    }
    // Most mutations of structural fields must be detected.
    assert!(errors * 2 > cases, "{errors} errors in {cases} cases");
}

#[test]
fn random_byte_flips_never_panic() {
    let built = sample().build();
    let mut rng = XorShift(0x9E37_79B9_7F4A_7C15);
    let header_len = built.data_offset;
    for case in 0..20_000 {
        let mut bytes = built.bytes.clone();
        let flips = 1 + rng.below(4);
        for _ in 0..flips {
            // Aim most flips at the header, where the structure is.
            let at = if rng.below(4) == 0 { rng.below(bytes.len()) } else { rng.below(header_len) };
            bytes[at] ^= 1 << rng.below(8);
        }
        if rng.below(8) == 0 {
            let keep = rng.below(bytes.len());
            bytes.truncate(keep);
        }
        exercise(bytes, &format!("random case {case}"));
    }
}

/// A v3 header with `tensors` tensor infos announced and one u8 array of `len` elements.
fn header_with_u8_array(tensors: u64, len: u64) -> Vec<u8> {
    let mut b = b"GGUF".to_vec();
    b.extend_from_slice(&3u32.to_le_bytes());
    b.extend_from_slice(&tensors.to_le_bytes());
    b.extend_from_slice(&1u64.to_le_bytes());
    b.extend_from_slice(&3u64.to_le_bytes());
    b.extend_from_slice(b"big");
    b.extend_from_slice(&9u32.to_le_bytes());
    b.extend_from_slice(&0u32.to_le_bytes());
    b.extend_from_slice(&len.to_le_bytes());
    b.resize(b.len() + len as usize, 0);
    b
}

#[test]
fn metadata_and_tensor_counts_are_capped_even_when_the_bytes_are_there() {
    // 4 Mi one-byte values would cost 128 MiB as `Value`s; the cap refuses them.
    let over = 4 << 20;
    let r = reason(header_with_u8_array(0, over + 1));
    assert!(r.contains("metadata key big") && r.contains("more than"), "{r}");
    let g = parse(header_with_u8_array(0, 1000)).unwrap();
    assert_eq!(g.get("big").and_then(Value::as_array).map(<[Value]>::len), Some(1000));

    let mut bytes = header_with_u8_array(2 << 20, 0);
    bytes.resize(bytes.len() + (2 << 20) * 32, 0);
    let r = reason(bytes);
    assert!(r.contains("exceeds the limit"), "{r}");
}
