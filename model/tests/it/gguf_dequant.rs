//! Dequantisation: blocks packed by hand (with packers written from the ggml block layouts,
//! independently of the crate's unpacking) decode to the values they were built from, and real
//! SmolLM2 tensors decode to exactly what the python `gguf` package computes.

use crate::gguf_writer::{GgufWriter, XorShift, f16_bytes};
use llmchain_model::gguf::{GgmlType, Gguf};

/// Builds a one-tensor file and dequantises the tensor.
fn decode(ty: GgmlType, dims: &[u64], data: Vec<u8>) -> (Vec<f32>, Vec<usize>) {
    let built = GgufWriter::new().tensor("t", ty, dims, data).build();
    Gguf::from_bytes(built.bytes).unwrap().dequantize("t").unwrap()
}

#[test]
fn plain_float_types() {
    let xs = [0.0f32, -1.5, 3.25, 65504.0, -0.0009765625, 1e-3];
    let data: Vec<u8> = xs.iter().flat_map(|x| x.to_le_bytes()).collect();
    assert_eq!(decode(GgmlType::F32, &[3, 2], data), (xs.to_vec(), vec![2, 3]));

    let halves = [0.0f32, -1.5, 3.25, 65504.0, -0.0009765625, 0.099975586];
    let data: Vec<u8> = halves.iter().flat_map(|&x| f16_bytes(x)).collect();
    assert_eq!(decode(GgmlType::F16, &[6], data).0, halves.to_vec());

    // bf16 is the upper half of an f32: these values are exact in it.
    let b = [1.0f32, -2.5, 0.15625, 256.0, -1.5 * 2f32.powi(100)];
    let data: Vec<u8> = b.iter().flat_map(|x| ((x.to_bits() >> 16) as u16).to_le_bytes()).collect();
    assert_eq!(decode(GgmlType::BF16, &[5], data).0, b.to_vec());
}

#[test]
fn q8_0_is_scale_times_signed_byte() {
    let mut data = Vec::new();
    for block in 0..2 {
        data.extend_from_slice(&f16_bytes(if block == 0 { 0.5 } else { -0.125 }));
        data.extend((0..32i16).map(|i| (i * 8 - 128) as i8 as u8));
    }
    let (values, shape) = decode(GgmlType::Q8_0, &[64], data);
    assert_eq!(shape, vec![64]);
    for (i, v) in values.iter().enumerate() {
        let d = if i < 32 { 0.5 } else { -0.125 };
        assert_eq!(*v, f32::from((i % 32) as i16 * 8 - 128) * d, "{i}");
    }
}

/// 4-bit values of weight w in a 32-weight block: low nibbles hold weights 0..16.
fn nibble(qs: &[u8], w: usize) -> u8 {
    if w < 16 { qs[w] & 0x0F } else { qs[w - 16] >> 4 }
}

#[test]
fn q4_0_and_q4_1() {
    let qs: Vec<u8> = (0..16u8).map(|i| i | (15 - i) << 4).collect();
    let mut data = f16_bytes(0.25).to_vec();
    data.extend_from_slice(&qs);
    let (values, _) = decode(GgmlType::Q4_0, &[32], data);
    for (w, v) in values.iter().enumerate() {
        assert_eq!(*v, (f32::from(nibble(&qs, w)) - 8.0) * 0.25, "{w}");
    }

    let mut data = f16_bytes(0.5).to_vec();
    data.extend_from_slice(&f16_bytes(-1.0));
    data.extend_from_slice(&qs);
    let (values, _) = decode(GgmlType::Q4_1, &[32], data);
    for (w, v) in values.iter().enumerate() {
        assert_eq!(*v, f32::from(nibble(&qs, w)) * 0.5 - 1.0, "{w}");
    }
}

#[test]
fn q5_0_and_q5_1_take_the_fifth_bit_from_qh() {
    let qs: Vec<u8> = (0..16u8).map(|i| (i * 7 % 16) | ((i * 3 + 1) % 16) << 4).collect();
    let qh: u32 = 0xA5C3_5A3C;
    let q = |w: usize| u32::from(nibble(&qs, w)) | ((qh >> w) & 1) << 4;

    let mut data = f16_bytes(0.25).to_vec();
    data.extend_from_slice(&qh.to_le_bytes());
    data.extend_from_slice(&qs);
    let (values, _) = decode(GgmlType::Q5_0, &[32], data);
    for (w, v) in values.iter().enumerate() {
        assert_eq!(*v, (q(w) as f32 - 16.0) * 0.25, "{w}");
    }

    let mut data = f16_bytes(0.5).to_vec();
    data.extend_from_slice(&f16_bytes(2.0));
    data.extend_from_slice(&qh.to_le_bytes());
    data.extend_from_slice(&qs);
    let (values, _) = decode(GgmlType::Q5_1, &[32], data);
    for (w, v) in values.iter().enumerate() {
        assert_eq!(*v, q(w) as f32 * 0.5 + 2.0, "{w}");
    }
}

/// Packs 8 six-bit scales and minimums the way llama.cpp's `quantize_row_q4_K_ref` does.
fn pack_k_scales(sc: &[u8; 8], mins: &[u8; 8]) -> [u8; 12] {
    let mut out = [0u8; 12];
    for j in 0..8 {
        if j < 4 {
            out[j] = sc[j];
            out[j + 4] = mins[j];
        } else {
            out[j + 4] = (sc[j] & 0x0F) | ((mins[j] & 0x0F) << 4);
            out[j - 4] |= (sc[j] >> 4) << 6;
            out[j] |= (mins[j] >> 4) << 6;
        }
    }
    out
}

/// Position of weight `w` of a k-quant 256 block in the 128 nibble bytes: pairs of 32-weight
/// sub-blocks share 32 bytes, the even one in the low nibbles.
fn k_nibble_pos(w: usize) -> (usize, bool) {
    let sub = w / 32;
    (32 * (sub / 2) + w % 32, sub % 2 == 1)
}

fn k_test_values(seed: u64) -> ([u8; 8], [u8; 8], Vec<u8>) {
    let mut rng = XorShift(seed);
    let mut sc = [0u8; 8];
    let mut mins = [0u8; 8];
    for j in 0..8 {
        sc[j] = rng.below(64) as u8;
        mins[j] = rng.below(64) as u8;
    }
    // Exercise the extremes of the 6-bit fields too.
    sc[0] = 63;
    mins[7] = 63;
    sc[5] = 0;
    let q = (0..256).map(|_| rng.below(16) as u8).collect();
    (sc, mins, q)
}

#[test]
fn q4_k_matches_scale_min_formula() {
    let (sc, mins, q) = k_test_values(7);
    let (d, dmin) = (0.5f32, 0.25f32);
    let mut qs = [0u8; 128];
    for (w, &v) in q.iter().enumerate() {
        let (pos, high) = k_nibble_pos(w);
        qs[pos] |= if high { v << 4 } else { v };
    }
    let mut data = f16_bytes(d).to_vec();
    data.extend_from_slice(&f16_bytes(dmin));
    data.extend_from_slice(&pack_k_scales(&sc, &mins));
    data.extend_from_slice(&qs);
    let (values, _) = decode(GgmlType::Q4_K, &[256], data);
    for (w, v) in values.iter().enumerate() {
        let k = w / 32;
        let expected = d * f32::from(sc[k]) * f32::from(q[w]) - dmin * f32::from(mins[k]);
        assert_eq!(*v, expected, "{w}");
    }
}

#[test]
fn q5_k_adds_the_high_bit() {
    let (sc, mins, q4) = k_test_values(11);
    let mut rng = XorShift(99);
    let high: Vec<u8> = (0..256).map(|_| rng.below(2) as u8).collect();
    let (d, dmin) = (0.25f32, 0.5f32);
    let mut qs = [0u8; 128];
    let mut qh = [0u8; 32];
    for w in 0..256 {
        let (pos, hi_nibble) = k_nibble_pos(w);
        qs[pos] |= if hi_nibble { q4[w] << 4 } else { q4[w] };
        // The fifth bit of sub-block k lives in bit k of byte w % 32.
        qh[w % 32] |= high[w] << (w / 32);
    }
    let mut data = f16_bytes(d).to_vec();
    data.extend_from_slice(&f16_bytes(dmin));
    data.extend_from_slice(&pack_k_scales(&sc, &mins));
    data.extend_from_slice(&qh);
    data.extend_from_slice(&qs);
    let (values, _) = decode(GgmlType::Q5_K, &[256], data);
    for (w, v) in values.iter().enumerate() {
        let k = w / 32;
        let q = f32::from(q4[w] + 16 * high[w]);
        assert_eq!(*v, d * f32::from(sc[k]) * q - dmin * f32::from(mins[k]), "{w}");
    }
}

#[test]
fn q6_k_matches_signed_scale_formula() {
    let mut rng = XorShift(5);
    let q: Vec<u8> = (0..256).map(|_| rng.below(64) as u8).collect();
    let sc: Vec<i8> = (0..16).map(|i| if i == 3 { -128 } else { rng.below(256) as u8 as i8 }).collect();
    let d = 0.125f32;
    let mut ql = [0u8; 128];
    let mut qh = [0u8; 64];
    for (w, &v) in q.iter().enumerate() {
        // Each half of 128 weights: 4 groups of 32; groups 0/1 in the low nibbles of bytes
        // 0..32/32..64, groups 2/3 in the high nibbles; two high bits per group in qh.
        let (half, n) = (w / 128, w % 128);
        let (group, l) = (n / 32, n % 32);
        let byte = 64 * half + l + 32 * (group % 2);
        ql[byte] |= if group < 2 { v & 0x0F } else { (v & 0x0F) << 4 };
        qh[32 * half + l] |= (v >> 4) << (2 * group);
    }
    let mut data = ql.to_vec();
    data.extend_from_slice(&qh);
    data.extend(sc.iter().map(|&s| s as u8));
    data.extend_from_slice(&f16_bytes(d));
    let (values, _) = decode(GgmlType::Q6_K, &[256], data);
    for (w, v) in values.iter().enumerate() {
        let expected = d * f32::from(sc[w / 16]) * (f32::from(q[w]) - 32.0);
        assert_eq!(*v, expected, "{w}");
    }
}

#[test]
fn large_tensors_split_across_threads_decode_like_small_ones() {
    // 6000 Q4_0 blocks take the parallel path; every block must land in its own place.
    let mut rng = XorShift(3);
    let blocks = 6000;
    let mut data = Vec::new();
    let mut expected = Vec::new();
    for b in 0..blocks {
        let d = (b % 7) as f32 * 0.5 - 1.5;
        let qs: Vec<u8> = (0..16).map(|_| rng.below(256) as u8).collect();
        data.extend_from_slice(&f16_bytes(d));
        data.extend_from_slice(&qs);
        expected.extend((0..32).map(|w| (f32::from(nibble(&qs, w)) - 8.0) * d));
    }
    let (values, shape) = decode(GgmlType::Q4_0, &[64, blocks / 2], data);
    assert_eq!(shape, vec![blocks as usize / 2, 64]);
    assert_eq!(values, expected);
}

#[test]
fn unsupported_types_and_missing_tensors_are_errors() {
    let built = GgufWriter::new().tensor("q2", GgmlType::Q2_K, &[256], vec![0; 84]).build();
    let g = Gguf::from_bytes(built.bytes).unwrap();
    assert_eq!(g.tensor_info("q2").unwrap().n_bytes, 84);
    let err = g.dequantize("q2").unwrap_err().to_string();
    assert!(err.contains("q2") && err.contains("Q2_K"), "{err}");
    let err = g.dequantize("nope").unwrap_err().to_string();
    assert!(err.contains("nope"), "{err}");
}

fn repo_path(rel: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(rel)
}

fn smollm2() -> Gguf {
    let path = std::env::var_os("LLMCHAIN_SMOLLM2_GGUF")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| repo_path(".llmchain/smollm2.gguf"));
    Gguf::open(&path).unwrap_or_else(|e| panic!("{e}: run `make setup` to install the SmolLM2 gguf"))
}

fn fixture() -> serde_json::Value {
    let path = repo_path(".llmchain/fixtures/tokens.json");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e}: run `make fixtures`", path.display()));
    serde_json::from_str(&text).unwrap()
}

#[test]
fn real_tensors_match_the_python_gguf_package() {
    let g = smollm2();
    let fixture = fixture();
    let tensors = fixture["tensors"].as_array().unwrap();
    assert!(tensors.len() >= 3);
    let mut types = std::collections::BTreeSet::new();
    for t in tensors {
        let name = t["name"].as_str().unwrap();
        let (values, shape) = g.dequantize(name).unwrap();
        types.insert(g.tensor_info(name).unwrap().ggml_type.name());
        let want_shape: Vec<usize> =
            t["shape"].as_array().unwrap().iter().map(|d| d.as_u64().unwrap() as usize).collect();
        assert_eq!(shape, want_shape, "{name}");
        let indices = t["indices"].as_array().unwrap();
        let want = t["values"].as_array().unwrap();
        for (i, w) in indices.iter().zip(want) {
            let i = i.as_u64().unwrap() as usize;
            assert_eq!(values[i], w.as_f64().unwrap() as f32, "{name}[{i}]");
        }
        let sum: f64 = values.iter().map(|&v| f64::from(v)).sum();
        let want_sum = t["sum"].as_f64().unwrap();
        assert!((sum - want_sum).abs() <= 1e-6 * want_sum.abs().max(1.0), "{name}: sum {sum} vs {want_sum}");
    }
    assert!(types.contains("Q8_0") && types.contains("Q4_1") && types.contains("F32"), "{types:?}");
}

#[test]
fn the_whole_smollm2_file_dequantises() {
    let g = smollm2();
    assert_eq!(g.version(), 3);
    assert_eq!(g.architecture().unwrap(), "llama");
    assert_eq!(g.get_u32("llama.block_count").unwrap(), 30);
    assert_eq!(g.get_u32("llama.attention.head_count_kv").unwrap(), 3);
    assert_eq!(g.get_f32("llama.rope.freq_base").unwrap(), 100000.0);
    assert_eq!(g.tensors().len(), 272);
    let mut params = 0usize;
    for t in g.tensors() {
        let (values, shape) = g.dequantize(&t.name).unwrap();
        assert_eq!(values.len(), shape.iter().product::<usize>(), "{}", t.name);
        assert!(values.iter().all(|v| v.is_finite()), "{}", t.name);
        params += values.len();
    }
    // SmolLM2-135M: 134,515,008 parameters (tied output head).
    assert_eq!(params, 134_515_008);
}
