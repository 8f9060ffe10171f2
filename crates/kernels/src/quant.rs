//! Block layouts of the ggml quantization formats, dequantization of every
//! supported type, and quantization of activations (8-bit blocks) for the
//! integer dot products in [`crate::dot`].

use half::f16;
use hanlin_formats::GgmlType;

pub const QK: usize = 32;
pub const QK_K: usize = 256;

#[inline(always)]
pub(crate) fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_bits(u16::from_le_bytes([b[i], b[i + 1]])).to_f32()
}

/// Activation block for the 32-element formats: `qs * d` approximates the
/// values; `s = d * sum(qs)` serves formats with an offset or a minimum.
#[derive(Clone, Copy, Debug)]
#[repr(C)]
pub struct BlockQ8 {
    pub d: f32,
    pub s: f32,
    /// `sum(qs)`, for kernels that remove a weight offset in integers.
    pub isum: i32,
    pub qs: [i8; QK],
}

/// Activation block for the K-quant formats (256 elements); `bsums[k]` is the
/// sum of `qs[16k..16k+16]`, and `pair_sums` holds the sums of the eight
/// 32-element sub-blocks (`S_j = bsums[2j] + bsums[2j+1]`) in the order
/// S0 S2 S1 S3 S4 S6 S5 S7: the i16 pairs against which the packed Q4_K/Q5_K
/// kernels take each row's pair of minimums (`m_j`, `m_{j+2}`) in one
/// `vpmaddwd` (see [`BlockQ8K::finish`]).
#[derive(Clone, Copy, Debug)]
#[repr(C)]
pub struct BlockQ8K {
    pub d: f32,
    pub qs: [i8; QK_K],
    pub bsums: [i16; 16],
    pub pair_sums: [i16; 8],
}

impl BlockQ8K {
    /// The order of [`BlockQ8K::pair_sums`]: entry `i` is sub-block
    /// `PAIR_ORDER[i]`'s sum.
    pub const PAIR_ORDER: [usize; 8] = [0, 2, 1, 3, 4, 6, 5, 7];

    /// A block of `d`, `qs` and `bsums`, with its sub-block sums.
    fn finish(d: f32, qs: [i8; QK_K], bsums: [i16; 16]) -> Self {
        let pair_sums = Self::PAIR_ORDER.map(|j| bsums[2 * j] + bsums[2 * j + 1]);
        BlockQ8K {
            d,
            qs,
            bsums,
            pair_sums,
        }
    }
}

/// `v.round()` (half away from zero) for |v| < 2^31, without a libm call:
/// the truncation and the fraction `v - trunc(v)` are exact.
#[inline(always)]
fn round_away(v: f32) -> i32 {
    let t = v as i32;
    let f = v - t as f32;
    t + i32::from(f >= 0.5) - i32::from(f <= -0.5)
}

/// Quantize `x` (length a multiple of 32) into 8-bit blocks.
pub fn quantize_q8(x: &[f32], out: &mut Vec<BlockQ8>) {
    out.clear();
    out.reserve(x.len() / QK);
    #[cfg(target_arch = "x86_64")]
    if crate::dot::simd_level() != crate::dot::SimdLevel::Scalar {
        // SAFETY: `simd_level` found AVX2, FMA and F16C.
        return unsafe { avx2::quantize_q8(x, out) };
    }
    quantize_q8_portable(x, out)
}

/// [`quantize_q8`] in plain Rust.
fn quantize_q8_portable(x: &[f32], out: &mut Vec<BlockQ8>) {
    for chunk in x.chunks_exact(QK) {
        let amax = chunk.iter().fold(0f32, |m, v| m.max(v.abs()));
        let (d, id) = scale(amax);
        let mut qs = [0i8; QK];
        let mut sum = 0i32;
        for (q, v) in qs.iter_mut().zip(chunk) {
            *q = round_away(v * id) as i8;
            sum += *q as i32;
        }
        out.push(block_q8(d, sum, qs));
    }
}

/// The scale of a block whose largest magnitude is `amax`, and its inverse.
#[inline(always)]
fn scale(amax: f32) -> (f32, f32) {
    let d = amax / 127.0;
    (d, if d > 0.0 { 1.0 / d } else { 0.0 })
}

#[inline(always)]
fn block_q8(d: f32, sum: i32, qs: [i8; QK]) -> BlockQ8 {
    // Scales are kept at f16 precision, as in ggml's Q8_0/Q8_1 blocks, so
    // results match llama.cpp's as closely as possible.
    let d = f16::from_f32(d).to_f32();
    BlockQ8 {
        d,
        s: f16::from_f32(d * sum as f32).to_f32(),
        isum: sum,
        qs,
    }
}

/// Quantize `x` (length a multiple of 256) into 8-bit K blocks.
pub fn quantize_q8k(x: &[f32], out: &mut Vec<BlockQ8K>) {
    out.clear();
    out.reserve(x.len() / QK_K);
    #[cfg(target_arch = "x86_64")]
    if crate::dot::simd_level() != crate::dot::SimdLevel::Scalar {
        // SAFETY: `simd_level` found AVX2, FMA and F16C.
        return unsafe { avx2::quantize_q8k(x, out) };
    }
    quantize_q8k_portable(x, out)
}

/// [`quantize_q8k`] in plain Rust.
fn quantize_q8k_portable(x: &[f32], out: &mut Vec<BlockQ8K>) {
    for chunk in x.chunks_exact(QK_K) {
        let amax = chunk.iter().fold(0f32, |m, v| m.max(v.abs()));
        let (d, id) = scale(amax);
        let mut qs = [0i8; QK_K];
        for (q, v) in qs.iter_mut().zip(chunk) {
            *q = round_away(v * id).clamp(-127, 127) as i8;
        }
        let mut bsums = [0i16; 16];
        for (k, b) in bsums.iter_mut().enumerate() {
            *b = qs[16 * k..16 * k + 16].iter().map(|&q| q as i16).sum();
        }
        out.push(BlockQ8K::finish(d, qs, bsums));
    }
}

/// The quantizers in AVX2: for finite inputs the portable loops' bits
/// (the same scale, the same rounding half away from zero, done exactly in
/// floats), eight values per instruction.
#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::*;
    use std::arch::x86_64::*;

    /// The largest magnitude of `v`'s lanes.
    #[inline(always)]
    unsafe fn amax(v: &[__m256]) -> f32 {
        let sign = _mm256_set1_ps(-0.0);
        let mut m = _mm256_setzero_ps();
        for &x in v {
            m = _mm256_max_ps(_mm256_andnot_ps(sign, x), m);
        }
        let m4 = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps::<1>(m));
        let m2 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
        _mm_cvtss_f32(_mm_max_ss(m2, _mm_shuffle_ps::<1>(m2, m2)))
    }

    /// `round_away(v)` per lane, as an exact float (|v| < 2^31).
    #[inline(always)]
    unsafe fn round_away(v: __m256) -> __m256 {
        let t = _mm256_round_ps::<{ _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC }>(v);
        let f = _mm256_sub_ps(v, t);
        let one = _mm256_set1_ps(1.0);
        let up = _mm256_and_ps(_mm256_cmp_ps::<_CMP_GE_OQ>(f, _mm256_set1_ps(0.5)), one);
        let down = _mm256_and_ps(_mm256_cmp_ps::<_CMP_LE_OQ>(f, _mm256_set1_ps(-0.5)), one);
        _mm256_sub_ps(_mm256_add_ps(t, up), down)
    }

    /// Four vectors of eight i32 (each within i8) as 32 i8 in order.
    #[inline(always)]
    unsafe fn pack(q: [__m256i; 4]) -> __m256i {
        let p = _mm256_packs_epi16(
            _mm256_packs_epi32(q[0], q[1]),
            _mm256_packs_epi32(q[2], q[3]),
        );
        _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7))
    }

    #[inline(always)]
    unsafe fn load(x: &[f32], i: usize) -> __m256 {
        _mm256_loadu_ps(x.as_ptr().add(8 * i))
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn quantize_q8(x: &[f32], out: &mut Vec<BlockQ8>) {
        for chunk in x.chunks_exact(QK) {
            let v: [__m256; 4] = std::array::from_fn(|i| load(chunk, i));
            let (d, id) = scale(amax(&v));
            let idv = _mm256_set1_ps(id);
            let q = v.map(|v| _mm256_cvttps_epi32(round_away(_mm256_mul_ps(v, idv))));
            let s = _mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3]));
            let s4 = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256::<1>(s));
            let s2 = _mm_add_epi32(s4, _mm_unpackhi_epi64(s4, s4));
            let sum = _mm_cvtsi128_si32(_mm_add_epi32(s2, _mm_shuffle_epi32::<1>(s2)));
            let mut qs = [0i8; QK];
            _mm256_storeu_si256(qs.as_mut_ptr() as *mut __m256i, pack(q));
            out.push(block_q8(d, sum, qs));
        }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn quantize_q8k(x: &[f32], out: &mut Vec<BlockQ8K>) {
        let (lo, hi) = (_mm256_set1_ps(-127.0), _mm256_set1_ps(127.0));
        let ones8 = _mm256_set1_epi8(1);
        let ones16 = _mm256_set1_epi16(1);
        for chunk in x.chunks_exact(QK_K) {
            let v: [__m256; 32] = std::array::from_fn(|i| load(chunk, i));
            let (d, id) = scale(amax(&v));
            let idv = _mm256_set1_ps(id);
            let mut qs = [0i8; QK_K];
            let mut bsums = [0i16; 16];
            // 32 values at a time; their two sums of sixteen from byte
            // pairs and quads, then `vphaddd` twice.
            let mut quads = [_mm256_setzero_si256(); 2];
            for j in 0..8 {
                let q: [__m256i; 4] = std::array::from_fn(|i| {
                    let r = round_away(_mm256_mul_ps(v[4 * j + i], idv));
                    _mm256_cvttps_epi32(_mm256_min_ps(_mm256_max_ps(r, lo), hi))
                });
                let p = pack(q);
                _mm256_storeu_si256(qs.as_mut_ptr().add(32 * j) as *mut __m256i, p);
                quads[j % 2] = _mm256_madd_epi16(_mm256_maddubs_epi16(ones8, p), ones16);
                if j % 2 == 1 {
                    let h = _mm256_hadd_epi32(quads[0], quads[1]);
                    let h = _mm256_hadd_epi32(h, h);
                    // Lane 0: the first sixteen of each; lane 1: the second.
                    let s = [_mm256_extract_epi32::<0>(h), _mm256_extract_epi32::<4>(h)];
                    let t = [_mm256_extract_epi32::<1>(h), _mm256_extract_epi32::<5>(h)];
                    let k = 4 * (j / 2);
                    bsums[k] = s[0] as i16;
                    bsums[k + 1] = s[1] as i16;
                    bsums[k + 2] = t[0] as i16;
                    bsums[k + 3] = t[1] as i16;
                }
            }
            out.push(BlockQ8K::finish(d, qs, bsums));
        }
    }
}

/// 6-bit scale and min `j` (0..8) of a Q4_K/Q5_K block's 12 packed bytes.
#[inline(always)]
pub(crate) fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

/// Sixteen signed 6-bit scales of a Q3_K block (already offset by -32).
pub(crate) fn q3k_scales(s: &[u8]) -> [i8; 16] {
    let rd = |i: usize| u32::from_le_bytes([s[i], s[i + 1], s[i + 2], s[i + 3]]);
    let (a0, a1, tmp) = (rd(0), rd(4), rd(8));
    const M1: u32 = 0x0303_0303;
    const M2: u32 = 0x0f0f_0f0f;
    let aux = [
        (a0 & M2) | ((tmp & M1) << 4),
        (a1 & M2) | (((tmp >> 2) & M1) << 4),
        ((a0 >> 4) & M2) | (((tmp >> 4) & M1) << 4),
        ((a1 >> 4) & M2) | (((tmp >> 6) & M1) << 4),
    ];
    let mut out = [0i8; 16];
    for (i, o) in out.iter_mut().enumerate() {
        *o = ((aux[i / 4] >> (8 * (i % 4))) & 0xff) as i8 - 32;
    }
    out
}

/// Unpacked 32-element block: `value[i] = d * q[i] + m`.
pub(crate) struct Unpacked32 {
    pub q: [i8; QK],
    pub d: f32,
    pub m: f32,
}

pub(crate) fn unpack32(ty: GgmlType, b: &[u8]) -> Unpacked32 {
    let mut q = [0i8; QK];
    match ty {
        GgmlType::Q4_0 => {
            for j in 0..16 {
                q[j] = (b[2 + j] & 0xF) as i8 - 8;
                q[j + 16] = (b[2 + j] >> 4) as i8 - 8;
            }
            Unpacked32 {
                q,
                d: f16_at(b, 0),
                m: 0.0,
            }
        }
        GgmlType::Q4_1 => {
            for j in 0..16 {
                q[j] = (b[4 + j] & 0xF) as i8;
                q[j + 16] = (b[4 + j] >> 4) as i8;
            }
            Unpacked32 {
                q,
                d: f16_at(b, 0),
                m: f16_at(b, 2),
            }
        }
        GgmlType::Q5_0 | GgmlType::Q5_1 => {
            let (qh_at, qs_at, off) = if ty == GgmlType::Q5_0 {
                (2, 6, 16)
            } else {
                (4, 8, 0)
            };
            let qh = u32::from_le_bytes([b[qh_at], b[qh_at + 1], b[qh_at + 2], b[qh_at + 3]]);
            for j in 0..16 {
                let h0 = (((qh >> j) << 4) & 0x10) as u8;
                let h1 = ((qh >> (j + 12)) & 0x10) as u8;
                q[j] = ((b[qs_at + j] & 0xF) | h0) as i8 - off;
                q[j + 16] = ((b[qs_at + j] >> 4) | h1) as i8 - off;
            }
            let m = if ty == GgmlType::Q5_1 {
                f16_at(b, 2)
            } else {
                0.0
            };
            Unpacked32 {
                q,
                d: f16_at(b, 0),
                m,
            }
        }
        GgmlType::Q8_0 => {
            for j in 0..QK {
                q[j] = b[2 + j] as i8;
            }
            Unpacked32 {
                q,
                d: f16_at(b, 0),
                m: 0.0,
            }
        }
        _ => unreachable!("unpack32 called for {ty:?}"),
    }
}

/// Unpacked 256-element K block: value `i` = `scale[i/16] * q[i] - min[i/16]`.
pub(crate) struct UnpackedK {
    pub q: [i8; QK_K],
    pub scale: [f32; 16],
    pub min: [f32; 16],
}

pub(crate) fn unpack_k(ty: GgmlType, b: &[u8]) -> UnpackedK {
    let mut q = [0i8; QK_K];
    let mut scale = [0f32; 16];
    let mut min = [0f32; 16];
    match ty {
        GgmlType::Q2_K => {
            let (sc, qs) = (&b[0..16], &b[16..80]);
            let (d, dmin) = (f16_at(b, 80), f16_at(b, 82));
            for k in 0..16 {
                scale[k] = d * (sc[k] & 0xF) as f32;
                min[k] = dmin * (sc[k] >> 4) as f32;
            }
            for n in 0..2 {
                for j in 0..4 {
                    for l in 0..32 {
                        q[128 * n + 32 * j + l] = ((qs[32 * n + l] >> (2 * j)) & 3) as i8;
                    }
                }
            }
        }
        GgmlType::Q3_K => {
            let (hm, qs, sc) = (&b[0..32], &b[32..96], q3k_scales(&b[96..108]));
            let d = f16_at(b, 108);
            for k in 0..16 {
                scale[k] = d * sc[k] as f32;
            }
            for n in 0..2 {
                for j in 0..4 {
                    let m = 1u8 << (4 * n + j);
                    for l in 0..32 {
                        let lo = ((qs[32 * n + l] >> (2 * j)) & 3) as i8;
                        let hi = if hm[l] & m != 0 { 0 } else { 4 };
                        q[128 * n + 32 * j + l] = lo - hi;
                    }
                }
            }
        }
        GgmlType::Q4_K | GgmlType::Q5_K | GgmlType::Q6_K => {
            let KInts { u, s: k } = k_ints(ty, b);
            for (q, u) in q.iter_mut().zip(u) {
                *q = (u as i32 - k.offset) as i8;
            }
            for j in 0..16 {
                scale[j] = k.d * k.sc[j] as f32;
                min[j] = k.dmin * k.m[j] as f32;
            }
        }
        _ => unreachable!("unpack_k called for {ty:?}"),
    }
    UnpackedK { q, scale, min }
}

/// The scales of a Q4_K, Q5_K or Q6_K block as integers: one signed scale
/// and one minimum per 16 elements, and the block's float factors. Element
/// `i`'s value is `d * sc[i/16] * (u[i] - offset) - dmin * m[i/16]`, `u`
/// its quant ([`KInts`]).
pub(crate) struct KScales {
    pub sc: [i16; 16],
    pub m: [i16; 16],
    pub d: f32,
    pub dmin: f32,
    /// 32 for Q6_K (its quants are stored offset by 32), 0 otherwise.
    pub offset: i32,
}

/// A K block's quants as unsigned bytes in element order, and its scales.
pub(crate) struct KInts {
    pub u: [u8; QK_K],
    pub s: KScales,
}

/// Whether `ty` is one of the K formats [`k_ints`] reads.
pub(crate) fn is_k456(ty: GgmlType) -> bool {
    matches!(ty, GgmlType::Q4_K | GgmlType::Q5_K | GgmlType::Q6_K)
}

/// The scales of one Q4_K/Q5_K/Q6_K block `b`.
fn k_scales(ty: GgmlType, b: &[u8]) -> KScales {
    let mut sc = [0i16; 16];
    let mut m = [0i16; 16];
    match ty {
        GgmlType::Q4_K | GgmlType::Q5_K => {
            for j in 0..8 {
                let (s, mn) = scale_min_k4(j, &b[4..16]);
                sc[2 * j..2 * j + 2].fill(s as i16);
                m[2 * j..2 * j + 2].fill(mn as i16);
            }
            KScales {
                sc,
                m,
                d: f16_at(b, 0),
                dmin: f16_at(b, 2),
                offset: 0,
            }
        }
        GgmlType::Q6_K => {
            for (k, s) in sc.iter_mut().enumerate() {
                *s = b[192 + k] as i8 as i16;
            }
            KScales {
                sc,
                m,
                d: f16_at(b, 208),
                dmin: 0.0,
                offset: 32,
            }
        }
        _ => unreachable!("k_scales called for {ty:?}"),
    }
}

/// The integers of one Q4_K/Q5_K/Q6_K block `b`.
pub(crate) fn k_ints(ty: GgmlType, b: &[u8]) -> KInts {
    let mut u = [0u8; QK_K];
    match ty {
        GgmlType::Q4_K | GgmlType::Q5_K => {
            let (qh, qs) = if ty == GgmlType::Q5_K {
                (Some(&b[16..48]), &b[48..176])
            } else {
                (None, &b[16..144])
            };
            for j in 0..4 {
                for l in 0..32 {
                    let (mut lo, mut hi) = (qs[32 * j + l] & 0xF, qs[32 * j + l] >> 4);
                    if let Some(qh) = qh {
                        lo |= ((qh[l] >> (2 * j)) & 1) << 4;
                        hi |= ((qh[l] >> (2 * j + 1)) & 1) << 4;
                    }
                    u[64 * j + l] = lo;
                    u[64 * j + 32 + l] = hi;
                }
            }
        }
        GgmlType::Q6_K => {
            let (ql, qh) = (&b[0..128], &b[128..192]);
            for n in 0..2 {
                let (ql, qh) = (&ql[64 * n..], &qh[32 * n..]);
                for l in 0..32 {
                    let y = 128 * n + l;
                    u[y] = (ql[l] & 0xF) | ((qh[l] & 3) << 4);
                    u[y + 32] = (ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4);
                    u[y + 64] = (ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4);
                    u[y + 96] = (ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4);
                }
            }
        }
        _ => unreachable!("k_ints called for {ty:?}"),
    }
    KInts {
        u,
        s: k_scales(ty, b),
    }
}

/// Dequantize one row (`out.len()` elements) of type `ty` from `bytes`.
pub fn dequantize_row(ty: GgmlType, bytes: &[u8], out: &mut [f32]) {
    match ty {
        GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 => {
            hanlin_formats::dequant_float(ty, bytes, out)
        }
        GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q5_0 | GgmlType::Q5_1 | GgmlType::Q8_0 => {
            for (o, b) in out
                .chunks_exact_mut(QK)
                .zip(bytes.chunks_exact(ty.type_size()))
            {
                let u = unpack32(ty, b);
                for (v, q) in o.iter_mut().zip(u.q) {
                    *v = u.d * q as f32 + u.m;
                }
            }
        }
        GgmlType::Q2_K | GgmlType::Q3_K | GgmlType::Q4_K | GgmlType::Q5_K | GgmlType::Q6_K => {
            for (o, b) in out
                .chunks_exact_mut(QK_K)
                .zip(bytes.chunks_exact(ty.type_size()))
            {
                let u = unpack_k(ty, b);
                for (i, v) in o.iter_mut().enumerate() {
                    *v = u.scale[i / 16] * u.q[i] as f32 - u.min[i / 16];
                }
            }
        }
    }
}

/// Quantize `x` into ggml Q8_0 bytes (used to write small test models and by export).
pub fn quantize_row_q8_0(x: &[f32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(x.len() / QK * 34);
    for chunk in x.chunks_exact(QK) {
        let amax = chunk.iter().fold(0f32, |m, v| m.max(v.abs()));
        let d = amax / 127.0;
        let id = if d > 0.0 { 1.0 / d } else { 0.0 };
        out.extend_from_slice(&f16::from_f32(d).to_bits().to_le_bytes());
        out.extend(chunk.iter().map(|v| (v * id).round() as i8 as u8));
    }
    out
}

/// Quantize `x` (a multiple of 32 values) into ggml Q4_1 bytes: per block
/// of 32 an f16 scale and minimum and 4-bit values (`x ≈ d·q + m`), the
/// block fitted by its minimum and maximum.
pub fn quantize_row_q4_1(x: &[f32]) -> Vec<u8> {
    let mut out = vec![0u8; x.len() / QK * 20];
    for (chunk, o) in x.chunks_exact(QK).zip(out.chunks_exact_mut(20)) {
        let (mut lo, mut hi) = (chunk[0], chunk[0]);
        for &v in chunk {
            lo = lo.min(v);
            hi = hi.max(v);
        }
        let d = f16::from_f32((hi - lo) / 15.0);
        let m = f16::from_f32(lo);
        let (df, mf) = (d.to_f32(), m.to_f32());
        let id = if df > 0.0 { 1.0 / df } else { 0.0 };
        o[..2].copy_from_slice(&d.to_bits().to_le_bytes());
        o[2..4].copy_from_slice(&m.to_bits().to_le_bytes());
        let mut q = [0u8; QK];
        for (q, &v) in q.iter_mut().zip(chunk) {
            *q = round_away((v - mf) * id).clamp(0, 15) as u8;
        }
        for j in 0..16 {
            o[4 + j] = q[j] | (q[j + 16] << 4);
        }
    }
    out
}

/// The 4-bit type [`requantize_in_place`] turns `ty` into for rows of
/// `cols` values, if it would shrink them: Q4_K for the 5- and 6-bit K
/// formats, Q4_1 for the 5- and 8-bit 32-element ones.
pub fn four_bit(ty: GgmlType, cols: usize) -> Option<GgmlType> {
    match ty {
        GgmlType::Q5_K | GgmlType::Q6_K if cols.is_multiple_of(QK_K) => Some(GgmlType::Q4_K),
        GgmlType::Q5_0 | GgmlType::Q5_1 | GgmlType::Q8_0 if cols.is_multiple_of(QK) => {
            Some(GgmlType::Q4_1)
        }
        _ => None,
    }
}

/// Re-quantize a `rows × cols` matrix of type `from` (in a file's layout)
/// to the smaller `to` (Q4_1 or Q4_K) in place, and return its new size
/// in bytes (at the front of `bytes`; the rest is left as it was). Row
/// `r`'s new bytes only cover rows up to `r`'s old ones, and each row is
/// read before it is written, so going row by row in order is safe.
///
/// # Panics
/// If `to` is neither Q4_1 nor Q4_K, is larger per row than `from`, or
/// `bytes` is shorter than the matrix.
pub fn requantize_in_place(
    from: GgmlType,
    to: GgmlType,
    bytes: &mut [u8],
    rows: usize,
    cols: usize,
) -> usize {
    let (ob, nb) = (from.row_bytes(cols), to.row_bytes(cols));
    assert!(nb <= ob, "requantize_in_place: {from:?} → {to:?} grows");
    assert!(
        bytes.len() >= rows * ob,
        "requantize_in_place: too few bytes"
    );
    let quantize = match to {
        GgmlType::Q4_1 => quantize_row_q4_1,
        GgmlType::Q4_K => quantize_row_q4_k,
        _ => panic!("requantize_in_place: to {to:?}"),
    };
    let mut row = vec![0f32; cols];
    for r in 0..rows {
        dequantize_row(from, &bytes[r * ob..(r + 1) * ob], &mut row);
        let q = quantize(&row);
        bytes[r * nb..(r + 1) * nb].copy_from_slice(&q);
    }
    rows * nb
}

/// A matrix for [`requantize_all`]: `rows × cols` values of type `from`
/// in `data`, to become `to`.
pub struct RequantJob<'a> {
    pub from: GgmlType,
    pub to: GgmlType,
    pub data: &'a mut [u8],
    pub rows: usize,
    pub cols: usize,
}

/// [`requantize_in_place`] for every matrix of `jobs`, on all cores, with
/// the same bytes as a matrix done whole: each matrix is cut into pieces of
/// whole rows ([`crate::LOAD_PIECE_BYTES`]), each re-quantized at its own start
/// (the pieces do not touch each other's bytes, so they run at once), and
/// then the pieces are moved together, in order (each moves towards the
/// front, past bytes already moved). Returns each matrix's new size.
pub fn requantize_all(jobs: Vec<RequantJob<'_>>) -> Vec<usize> {
    requantize_all_in(jobs, crate::LOAD_PIECE_BYTES)
}

/// [`requantize_all`] with pieces of at most `piece` bytes (at least a row).
fn requantize_all_in(mut jobs: Vec<RequantJob<'_>>, piece: usize) -> Vec<usize> {
    let mut pieces = Vec::new();
    // Per matrix, per piece: where its new bytes are, where they go, how many.
    let mut spans: Vec<Vec<(usize, usize, usize)>> = Vec::with_capacity(jobs.len());
    for job in &mut jobs {
        let (from, to, rows, cols) = (job.from, job.to, job.rows, job.cols);
        let (ob, nb) = (from.row_bytes(cols).max(1), to.row_bytes(cols));
        let per = crate::rows_per_piece(ob, rows, piece, 1);
        let mut moves = Vec::new();
        for (i, part) in job.data[..rows * ob].chunks_mut(per * ob).enumerate() {
            let n = part.len() / ob;
            moves.push((i * per * ob, i * per * nb, n * nb));
            pieces.push((from, to, part, n, cols));
        }
        spans.push(moves);
    }
    let done: Result<(), std::convert::Infallible> =
        hanlin_formats::par::for_each(pieces, |(from, to, piece, n, cols)| {
            requantize_in_place(from, to, piece, n, cols);
            Ok(())
        });
    let Ok(()) = done;
    jobs.into_iter()
        .zip(spans)
        .map(|(job, moves)| {
            for (at, to, len) in moves {
                job.data.copy_within(at..at + len, to);
            }
            job.rows * job.to.row_bytes(job.cols)
        })
        .collect()
}

/// Quantize `x` (a multiple of 256 values) into ggml Q4_K bytes: per block
/// of 256, an f16 scale and min, eight 6-bit sub-block scales and mins, and
/// 4-bit values (`x ≈ d·sc·q − dmin·m`). Each sub-block of 32 is fitted by
/// its minimum and maximum, the values then rounded against the
/// quantized scales.
pub fn quantize_row_q4_k(x: &[f32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(x.len() / QK_K * 144);
    for block in x.chunks_exact(QK_K) {
        let mut scale = [0f32; 8];
        let mut min = [0f32; 8];
        for (j, sub) in block.chunks_exact(32).enumerate() {
            let lo = sub.iter().fold(f32::INFINITY, |m, &v| m.min(v)).min(0.0);
            let hi = sub.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
            scale[j] = (hi - lo).max(0.0) / 15.0;
            min[j] = -lo;
        }
        let max_scale = scale.iter().fold(0f32, |m, &v| m.max(v));
        let max_min = min.iter().fold(0f32, |m, &v| m.max(v));
        let d = f16::from_f32(max_scale / 63.0);
        let dmin = f16::from_f32(max_min / 63.0);
        let (df, dminf) = (d.to_f32(), dmin.to_f32());
        let mut sc = [0u8; 8];
        let mut mq = [0u8; 8];
        for j in 0..8 {
            sc[j] = if df > 0.0 {
                (scale[j] / df).round().clamp(0.0, 63.0) as u8
            } else {
                0
            };
            mq[j] = if dminf > 0.0 {
                (min[j] / dminf).round().clamp(0.0, 63.0) as u8
            } else {
                0
            };
        }
        let mut packed = [0u8; 12];
        for j in 0..8 {
            if j < 4 {
                packed[j] = sc[j];
                packed[j + 4] = mq[j];
            } else {
                packed[j + 4] = (sc[j] & 0xF) | ((mq[j] & 0xF) << 4);
                packed[j - 4] |= (sc[j] >> 4) << 6;
                packed[j] |= (mq[j] >> 4) << 6;
            }
        }
        let mut q = [0u8; QK_K];
        for (i, (qv, &v)) in q.iter_mut().zip(block).enumerate() {
            let j = i / 32;
            let step = df * sc[j] as f32;
            *qv = if step > 0.0 {
                ((v + dminf * mq[j] as f32) / step).round().clamp(0.0, 15.0) as u8
            } else {
                0
            };
        }
        out.extend_from_slice(&d.to_bits().to_le_bytes());
        out.extend_from_slice(&dmin.to_bits().to_le_bytes());
        out.extend_from_slice(&packed);
        for j in 0..4 {
            for l in 0..32 {
                out.push(q[64 * j + l] | (q[64 * j + 32 + l] << 4));
            }
        }
    }
    out
}

/// Encode `x` as F16 bytes.
pub fn encode_f16(x: &[f32]) -> Vec<u8> {
    x.iter()
        .flat_map(|v| f16::from_f32(*v).to_bits().to_le_bytes())
        .collect()
}

/// Encode `x` as F32 bytes.
pub fn encode_f32(x: &[f32]) -> Vec<u8> {
    x.iter().flat_map(|v| v.to_le_bytes()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn q4_k_round_trips_within_its_step() {
        let mut rng = 12345u32;
        let mut next = || {
            rng = rng.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            (rng >> 8) as f32 / (1 << 24) as f32 - 0.5
        };
        // Blocks of different ranges, an all-zero block and a constant one.
        let mut x: Vec<f32> = (0..QK_K * 3)
            .map(|i| next() * (1 + i / 100) as f32)
            .collect();
        x.extend(std::iter::repeat_n(0.0, QK_K));
        x.extend(std::iter::repeat_n(0.25, QK_K));
        let bytes = quantize_row_q4_k(&x);
        assert_eq!(bytes.len(), x.len() / QK_K * GgmlType::Q4_K.type_size());
        let mut back = vec![0f32; x.len()];
        dequantize_row(GgmlType::Q4_K, &bytes, &mut back);
        for (b, (xs, ys)) in x.chunks(32).zip(back.chunks(32)).enumerate() {
            let range = xs.iter().fold(0f32, |m, v| m.max(v.abs())) * 2.0;
            for (a, c) in xs.iter().zip(ys) {
                // Half a step of 15 levels, plus the 6-bit scale rounding.
                assert!(
                    (a - c).abs() <= range / 15.0 * 0.75 + 1e-3,
                    "sub-block {b}: {a} vs {c}"
                );
            }
        }
        assert!(back[QK_K * 3..QK_K * 4].iter().all(|&v| v == 0.0));
    }

    #[test]
    fn q4_1_round_trips_within_half_a_step() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        // Blocks of different ranges and offsets, an all-zero block and a
        // constant one.
        let mut x: Vec<f32> = (0..QK * 40)
            .map(|i| rng.random_range(-1.0..1.0f32) * (1 + i / 64) as f32 + (i / 96) as f32)
            .collect();
        x.extend(std::iter::repeat_n(0.0, QK));
        x.extend(std::iter::repeat_n(-0.75, QK));
        let bytes = quantize_row_q4_1(&x);
        assert_eq!(bytes.len(), GgmlType::Q4_1.row_bytes(x.len()));
        let mut back = vec![0f32; x.len()];
        dequantize_row(GgmlType::Q4_1, &bytes, &mut back);
        for (b, (xs, ys)) in x.chunks(QK).zip(back.chunks(QK)).enumerate() {
            let lo = xs.iter().fold(f32::INFINITY, |m, &v| m.min(v));
            let hi = xs.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
            for (a, c) in xs.iter().zip(ys) {
                // Half a step, plus the f16 rounding of the scale and minimum.
                let tol = (hi - lo) / 15.0 * 0.5 + (hi.abs() + lo.abs()) * 2e-3 + 1e-6;
                assert!((a - c).abs() <= tol, "block {b}: {a} vs {c}");
            }
        }
        assert!(back[QK * 40..QK * 41].iter().all(|&v| v == 0.0));
        assert!(back[QK * 41..].iter().all(|&v| v == -0.75));
    }

    /// In place, row by row, gives what quantizing each row's values into a
    /// buffer of its own gives, for every format a draft model shrinks.
    #[test]
    fn requantize_in_place_matches_quantizing_each_row() {
        use rand::SeedableRng;
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(4);
        let (rows, cols) = (7, 512);
        for from in [
            GgmlType::Q8_0,
            GgmlType::Q5_0,
            GgmlType::Q5_1,
            GgmlType::Q6_K,
            GgmlType::Q5_K,
        ] {
            let to = four_bit(from, cols).expect("a 4-bit type");
            let mut bytes = crate::dot::tests::random_rows(from, rows, cols, &mut rng);
            let before = bytes.clone();
            let n = requantize_in_place(from, to, &mut bytes, rows, cols);
            assert_eq!(n, rows * to.row_bytes(cols), "{from:?}");
            let (ob, nb) = (from.row_bytes(cols), to.row_bytes(cols));
            let mut vals = vec![0f32; cols];
            for r in 0..rows {
                dequantize_row(from, &before[r * ob..(r + 1) * ob], &mut vals);
                let want = match to {
                    GgmlType::Q4_1 => quantize_row_q4_1(&vals),
                    _ => quantize_row_q4_k(&vals),
                };
                assert_eq!(&bytes[r * nb..(r + 1) * nb], &want[..], "{from:?} row {r}");
            }
            // Close to the values it came from: 4-bit steps of each block's range.
            let mut back = vec![0f32; cols];
            for r in 0..rows {
                dequantize_row(from, &before[r * ob..(r + 1) * ob], &mut vals);
                dequantize_row(to, &bytes[r * nb..(r + 1) * nb], &mut back);
                let range = vals.iter().fold(0f32, |m, v| m.max(v.abs())) * 2.0;
                let err = vals
                    .iter()
                    .zip(&back)
                    .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
                assert!(err <= range / 15.0, "{from:?} row {r}: {err} of {range}");
            }
        }
        // All at once, in pieces on several threads: the same bytes as
        // each matrix done whole, each at the front of its own slice.
        let mats: Vec<(GgmlType, usize, usize)> = vec![
            (GgmlType::Q8_0, 3000, 64),
            (GgmlType::Q6_K, 40, 256),
            (GgmlType::Q5_0, 1, 896),
        ];
        let mut datas: Vec<Vec<u8>> = mats
            .iter()
            .map(|&(ty, r, c)| crate::dot::tests::random_rows(ty, r, c, &mut rng))
            .collect();
        let wants: Vec<Vec<u8>> = datas
            .iter()
            .zip(&mats)
            .map(|(d, &(ty, r, c))| {
                let mut d = d.clone();
                let n = requantize_in_place(ty, four_bit(ty, c).expect("4-bit"), &mut d, r, c);
                d.truncate(n);
                d
            })
            .collect();
        let jobs = datas
            .iter_mut()
            .zip(&mats)
            .map(|(data, &(from, rows, cols))| RequantJob {
                from,
                to: four_bit(from, cols).expect("4-bit"),
                data,
                rows,
                cols,
            })
            .collect();
        let sizes = super::requantize_all_in(jobs, 4096);
        for ((d, w), n) in datas.iter().zip(&wants).zip(sizes) {
            assert_eq!(&d[..n], &w[..]);
        }
        assert_eq!(four_bit(GgmlType::Q4_K, 512), None);
        assert_eq!(four_bit(GgmlType::Q6_K, 896), None);
        assert_eq!(four_bit(GgmlType::Q8_0, 896), Some(GgmlType::Q4_1));
    }

    /// The AVX2 quantizers give the portable loops' bits: scales, quants,
    /// sums, including values that fall on halves.
    #[test]
    fn simd_quantizers_match_the_portable_ones() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(9);
        for n in 0..50 {
            let mut x: Vec<f32> = (0..4096).map(|_| rng.random_range(-3.0..3.0f32)).collect();
            if n % 3 == 0 {
                // Halves after scaling: multiples of amax/254.
                let k = 127.0 / 3.0;
                for v in x.iter_mut() {
                    *v = (*v * k * 2.0).round() / (k * 2.0);
                }
                x[0] = 3.0;
            }
            if n % 5 == 1 {
                x[100..400].fill(0.0);
            }
            let (mut a, mut b) = (Vec::new(), Vec::new());
            quantize_q8(&x, &mut a);
            quantize_q8_portable(&x, &mut b);
            for (a, b) in a.iter().zip(&b) {
                assert_eq!(
                    (a.d.to_bits(), a.s.to_bits(), a.isum, a.qs),
                    (b.d.to_bits(), b.s.to_bits(), b.isum, b.qs)
                );
            }
            assert_eq!(a.len(), b.len());
            let (mut a, mut b) = (Vec::new(), Vec::new());
            quantize_q8k(&x, &mut a);
            quantize_q8k_portable(&x, &mut b);
            for (a, b) in a.iter().zip(&b) {
                assert_eq!(
                    (a.d.to_bits(), a.qs, a.bsums),
                    (b.d.to_bits(), b.qs, b.bsums)
                );
            }
            assert_eq!(a.len(), b.len());
        }
    }

    #[test]
    fn round_away_matches_f32_round() {
        let mut v = -130.0f32;
        while v < 130.0 {
            for x in [v, v + 0.5, v - 0.5, f32::from_bits(v.to_bits() + 1)] {
                assert_eq!(round_away(x), x.round() as i32, "{x}");
            }
            v += 0.37;
        }
        for x in [
            0.5f32,
            -0.5,
            1.5,
            -2.5,
            0.499_999_97,
            -0.499_999_97,
            126.5,
            -127.5,
        ] {
            assert_eq!(round_away(x), x.round() as i32, "{x}");
        }
    }
}
