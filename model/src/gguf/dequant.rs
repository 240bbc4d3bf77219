//! Dequantisation of ggml blocks to f32, with exactly ggml's formulas (`ggml-quants.c`,
//! `dequantize_row_*`), operation for operation, so results are bit-identical to ggml's
//! reference CPU path.
//!
//! Each function takes whole blocks (`src.len()` a multiple of the type size) and writes
//! exactly `src.len() / type_size * block_size` values; the caller guarantees the lengths.
//! Loops walk `chunks_exact` pairs so the compiler can drop bounds checks; large tensors are
//! split across threads by whole blocks.

use half::{bf16, f16};
use rayon::prelude::*;

use super::GgmlType;

/// Tensors with fewer blocks than this are converted on the calling thread: spawning work
/// costs more than it saves on small norms and biases.
const PARALLEL_MIN_BLOCKS: usize = 4096;

/// Converts whole blocks of `ty` in `src` to f32, or returns `None` if `ty` is not supported
/// or `src` is not a whole number of blocks.
pub(crate) fn dequantize(ty: GgmlType, src: &[u8]) -> Option<Vec<f32>> {
    let type_size = usize::try_from(ty.type_size()).ok()?;
    let block = usize::try_from(ty.block_size()).ok()?;
    if !ty.can_dequantize() || !src.len().is_multiple_of(type_size) {
        return None;
    }
    let n_blocks = src.len() / type_size;
    let mut out = vec![0f32; n_blocks.checked_mul(block)?];
    let kernel = kernel(ty)?;
    if n_blocks < PARALLEL_MIN_BLOCKS {
        kernel(src, &mut out);
    } else {
        // Split into pieces of whole blocks; a piece per few hundred KB keeps both cores busy
        // without scheduling overhead dominating.
        let blocks_per_piece = (n_blocks / (rayon::current_num_threads() * 8)).max(256);
        src.par_chunks(blocks_per_piece * type_size)
            .zip(out.par_chunks_mut(blocks_per_piece * block))
            .for_each(|(src, dst)| kernel(src, dst));
    }
    Some(out)
}

type Kernel = fn(&[u8], &mut [f32]);

fn kernel(ty: GgmlType) -> Option<Kernel> {
    Some(match ty {
        GgmlType::F32 => f32s,
        GgmlType::F16 => f16s,
        GgmlType::BF16 => bf16s,
        GgmlType::F64 => f64s,
        GgmlType::I8 => i8s,
        GgmlType::I16 => i16s,
        GgmlType::I32 => i32s,
        GgmlType::Q4_0 => q4_0,
        GgmlType::Q4_1 => q4_1,
        GgmlType::Q5_0 => q5_0,
        GgmlType::Q5_1 => q5_1,
        GgmlType::Q8_0 => q8_0,
        GgmlType::Q4_K => q4_k,
        GgmlType::Q5_K => q5_k,
        GgmlType::Q6_K => q6_k,
        _ => return None,
    })
}

#[inline(always)]
fn half(b: &[u8], at: usize) -> f32 {
    f16::from_bits(u16::from_le_bytes([b[at], b[at + 1]])).to_f32()
}

fn f32s(src: &[u8], dst: &mut [f32]) {
    for (s, d) in src.chunks_exact(4).zip(dst) {
        *d = f32::from_le_bytes([s[0], s[1], s[2], s[3]]);
    }
}

fn f16s(src: &[u8], dst: &mut [f32]) {
    for (s, d) in src.chunks_exact(2).zip(dst) {
        *d = f16::from_bits(u16::from_le_bytes([s[0], s[1]])).to_f32();
    }
}

fn bf16s(src: &[u8], dst: &mut [f32]) {
    for (s, d) in src.chunks_exact(2).zip(dst) {
        *d = bf16::from_bits(u16::from_le_bytes([s[0], s[1]])).to_f32();
    }
}

fn f64s(src: &[u8], dst: &mut [f32]) {
    for (s, d) in src.chunks_exact(8).zip(dst) {
        *d = f64::from_le_bytes([s[0], s[1], s[2], s[3], s[4], s[5], s[6], s[7]]) as f32;
    }
}

fn i8s(src: &[u8], dst: &mut [f32]) {
    for (s, d) in src.iter().zip(dst) {
        *d = f32::from(*s as i8);
    }
}

fn i16s(src: &[u8], dst: &mut [f32]) {
    for (s, d) in src.chunks_exact(2).zip(dst) {
        *d = f32::from(i16::from_le_bytes([s[0], s[1]]));
    }
}

fn i32s(src: &[u8], dst: &mut [f32]) {
    for (s, d) in src.chunks_exact(4).zip(dst) {
        *d = i32::from_le_bytes([s[0], s[1], s[2], s[3]]) as f32;
    }
}

/// `block_q4_0 { half d; uint8_t qs[16]; }`: low nibbles are weights 0..16, high 16..32.
fn q4_0(src: &[u8], dst: &mut [f32]) {
    for (b, y) in src.chunks_exact(18).zip(dst.chunks_exact_mut(32)) {
        let d = half(b, 0);
        let qs = &b[2..18];
        let (lo, hi) = y.split_at_mut(16);
        for j in 0..16 {
            let x0 = i32::from(qs[j] & 0x0F) - 8;
            let x1 = i32::from(qs[j] >> 4) - 8;
            lo[j] = x0 as f32 * d;
            hi[j] = x1 as f32 * d;
        }
    }
}

/// `block_q4_1 { half d; half m; uint8_t qs[16]; }`.
fn q4_1(src: &[u8], dst: &mut [f32]) {
    for (b, y) in src.chunks_exact(20).zip(dst.chunks_exact_mut(32)) {
        let d = half(b, 0);
        let m = half(b, 2);
        let qs = &b[4..20];
        let (lo, hi) = y.split_at_mut(16);
        for j in 0..16 {
            let x0 = qs[j] & 0x0F;
            let x1 = qs[j] >> 4;
            lo[j] = f32::from(x0) * d + m;
            hi[j] = f32::from(x1) * d + m;
        }
    }
}

/// `block_q5_0 { half d; uint8_t qh[4]; uint8_t qs[16]; }`: bit j of `qh` is the fifth bit of
/// weight j.
fn q5_0(src: &[u8], dst: &mut [f32]) {
    for (b, y) in src.chunks_exact(22).zip(dst.chunks_exact_mut(32)) {
        let d = half(b, 0);
        let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
        let qs = &b[6..22];
        let (lo, hi) = y.split_at_mut(16);
        for j in 0..16 {
            let xh_0 = ((qh >> j) << 4) & 0x10;
            let xh_1 = (qh >> (j + 12)) & 0x10;
            let x0 = (u32::from(qs[j] & 0x0F) | xh_0) as i32 - 16;
            let x1 = (u32::from(qs[j] >> 4) | xh_1) as i32 - 16;
            lo[j] = x0 as f32 * d;
            hi[j] = x1 as f32 * d;
        }
    }
}

/// `block_q5_1 { half d; half m; uint8_t qh[4]; uint8_t qs[16]; }`.
fn q5_1(src: &[u8], dst: &mut [f32]) {
    for (b, y) in src.chunks_exact(24).zip(dst.chunks_exact_mut(32)) {
        let d = half(b, 0);
        let m = half(b, 2);
        let qh = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
        let qs = &b[8..24];
        let (lo, hi) = y.split_at_mut(16);
        for j in 0..16 {
            let xh_0 = ((qh >> j) << 4) & 0x10;
            let xh_1 = (qh >> (j + 12)) & 0x10;
            let x0 = u32::from(qs[j] & 0x0F) | xh_0;
            let x1 = u32::from(qs[j] >> 4) | xh_1;
            lo[j] = x0 as f32 * d + m;
            hi[j] = x1 as f32 * d + m;
        }
    }
}

/// `block_q8_0 { half d; int8_t qs[32]; }`.
fn q8_0(src: &[u8], dst: &mut [f32]) {
    for (b, y) in src.chunks_exact(34).zip(dst.chunks_exact_mut(32)) {
        let d = half(b, 0);
        for (q, y) in b[2..34].iter().zip(y) {
            *y = f32::from(*q as i8) * d;
        }
    }
}

/// ggml's `get_scale_min_k4`: the 6-bit scale and minimum of sub-block `j` packed in 12 bytes.
#[inline(always)]
fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        ((q[j + 4] & 0x0F) | ((q[j - 4] >> 6) << 4), (q[j + 4] >> 4) | ((q[j] >> 6) << 4))
    }
}

/// `block_q4_K { half d; half dmin; uint8_t scales[12]; uint8_t qs[128]; }`: 8 sub-blocks of
/// 32, each 64 weights sharing 32 bytes (low nibbles first, then high).
fn q4_k(src: &[u8], dst: &mut [f32]) {
    for (b, y) in src.chunks_exact(144).zip(dst.chunks_exact_mut(256)) {
        let d = half(b, 0);
        let min = half(b, 2);
        let scales = &b[4..16];
        let qs = &b[16..144];
        for (k, (q, y)) in qs.chunks_exact(32).zip(y.chunks_exact_mut(64)).enumerate() {
            let (sc, m) = scale_min_k4(2 * k, scales);
            let d1 = d * f32::from(sc);
            let m1 = min * f32::from(m);
            let (sc, m) = scale_min_k4(2 * k + 1, scales);
            let d2 = d * f32::from(sc);
            let m2 = min * f32::from(m);
            let (lo, hi) = y.split_at_mut(32);
            for l in 0..32 {
                lo[l] = d1 * f32::from(q[l] & 0x0F) - m1;
                hi[l] = d2 * f32::from(q[l] >> 4) - m2;
            }
        }
    }
}

/// `block_q5_K { half d; half dmin; uint8_t scales[12]; uint8_t qh[32]; uint8_t qs[128]; }`:
/// like Q4_K, with the fifth bits of sub-block pair k at bits 2k and 2k+1 of `qh`.
fn q5_k(src: &[u8], dst: &mut [f32]) {
    for (b, y) in src.chunks_exact(176).zip(dst.chunks_exact_mut(256)) {
        let d = half(b, 0);
        let min = half(b, 2);
        let scales = &b[4..16];
        let qh = &b[16..48];
        let qs = &b[48..176];
        for (k, (ql, y)) in qs.chunks_exact(32).zip(y.chunks_exact_mut(64)).enumerate() {
            let (sc, m) = scale_min_k4(2 * k, scales);
            let d1 = d * f32::from(sc);
            let m1 = min * f32::from(m);
            let (sc, m) = scale_min_k4(2 * k + 1, scales);
            let d2 = d * f32::from(sc);
            let m2 = min * f32::from(m);
            let u1 = 1u8 << (2 * k);
            let u2 = 2u8 << (2 * k);
            let (lo, hi) = y.split_at_mut(32);
            for l in 0..32 {
                let h1 = if qh[l] & u1 != 0 { 16 } else { 0 };
                let h2 = if qh[l] & u2 != 0 { 16 } else { 0 };
                lo[l] = d1 * f32::from((ql[l] & 0x0F) + h1) - m1;
                hi[l] = d2 * f32::from((ql[l] >> 4) + h2) - m2;
            }
        }
    }
}

/// `block_q6_K { uint8_t ql[128]; uint8_t qh[64]; int8_t scales[16]; half d; }`: two halves of
/// 128 weights, each built from 64 bytes of low nibbles and 32 bytes of high bit pairs.
fn q6_k(src: &[u8], dst: &mut [f32]) {
    for (b, y) in src.chunks_exact(210).zip(dst.chunks_exact_mut(256)) {
        let d = half(b, 208);
        for half_index in 0..2 {
            let ql = &b[64 * half_index..64 * half_index + 64];
            let qh = &b[128 + 32 * half_index..128 + 32 * half_index + 32];
            let sc = &b[192 + 8 * half_index..192 + 8 * half_index + 8];
            let y = &mut y[128 * half_index..128 * half_index + 128];
            for l in 0..32 {
                let is = l / 16;
                let q1 = ((ql[l] & 0x0F) | ((qh[l] & 3) << 4)) as i8 - 32;
                let q2 = ((ql[l + 32] & 0x0F) | (((qh[l] >> 2) & 3) << 4)) as i8 - 32;
                let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i8 - 32;
                let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i8 - 32;
                y[l] = d * f32::from(sc[is] as i8) * f32::from(q1);
                y[l + 32] = d * f32::from(sc[is + 2] as i8) * f32::from(q2);
                y[l + 64] = d * f32::from(sc[is + 4] as i8) * f32::from(q3);
                y[l + 96] = d * f32::from(sc[is + 6] as i8) * f32::from(q4);
            }
        }
    }
}
