//! Q4_K and Q6_K weights interleaved eight rows at a time, once, at load.
//!
//! In a file's layout every row's blocks follow each other, so a kernel
//! that works on one row at a time ends every block with horizontal sums,
//! and one that wants several rows side by side has to rearrange them first
//! for every matmul (that rearranging cost a 16-token batch more than its
//! products). Here the rows of a matrix are rearranged once, in place, when
//! the model loads: each block of eight rows keeps exactly its bytes
//! (the same size, so memory does not grow), but word `w` of all eight rows
//! sits side by side. One 256-bit load then holds the same four bytes of
//! eight rows, the nibbles are masked out in place, and one broadcast of four
//! activation bytes multiplies eight rows: every lane is a row, nothing is
//! summed across lanes, and one token costs what a batch of four costs per
//! token (the idea is ik_llama.cpp's row-interleaved formats; the layout and
//! kernels are ours).
//!
//! A packed block of eight rows, per 256 columns:
//!
//! | Q4_K (1152 bytes) | Q6_K (1680 bytes) |
//! |---|---|
//! | `d`: 8 × f16 | `d`: 8 × f16 |
//! | `dmin`: 8 × f16 | scales: 8 pairs × 8 rows × 2 × i8 |
//! | scales: 3 words × 8 rows × 4 bytes | 16 × (a `qh` word and the two `ql` words it completes) × 8 rows × 4 bytes |
//! | `qs`: 32 words × 8 rows × 4 bytes | |
//!
//! and per 32 columns: Q8_0 (272 bytes) `d`: 8 × f16, then 8 words × 8 rows
//! × 4 bytes of quants; Q5_0 (176 bytes) `d`: 8 × f16, `qh`: 8 × 4 bytes,
//! then 4 words × 8 rows × 4 bytes of nibbles.
//!
//! Each is in the order the kernels read it, so a group is one sequential
//! stream.
//!
//! A packed matrix is only ever multiplied by these kernels, for one token
//! or hundreds, and each (row, token) result goes through the same steps
//! whatever the number of tokens: a token's logits do not depend on how many
//! share its pass. For the K formats the steps are also
//! [`crate::dot::scalar_q8k`]'s, so the result is its bit for bit; the
//! 32-element formats sum each block exactly in integers and then
//! `acc = fma(d·xd, isum, acc)`, block by block.

use crate::quant::{BlockQ8, BlockQ8K};
use hanlin_formats::GgmlType;

/// A block's words in the order a packed block stores them, as (offset in
/// the file's block, bytes): each is stored for the eight rows side by side.
fn words(ty: GgmlType) -> Vec<(usize, usize)> {
    let mut v = Vec::new();
    match ty {
        GgmlType::Q4_K => {
            v.extend([(0, 2), (2, 2)]);
            v.extend((0..3).map(|w| (4 + 4 * w, 4)));
            v.extend((0..32).map(|w| (16 + 4 * w, 4)));
        }
        GgmlType::Q5_K => {
            v.extend([(0, 2), (2, 2)]);
            v.extend((0..3).map(|w| (4 + 4 * w, 4)));
            v.extend((0..8).map(|w| (16 + 4 * w, 4)));
            v.extend((0..32).map(|w| (48 + 4 * w, 4)));
        }
        GgmlType::Q8_0 => {
            v.push((0, 2));
            v.extend((0..8).map(|w| (2 + 4 * w, 4)));
        }
        GgmlType::Q5_0 => {
            v.extend([(0, 2), (2, 4)]);
            v.extend((0..4).map(|w| (6 + 4 * w, 4)));
        }
        GgmlType::Q6_K => {
            v.push((208, 2));
            v.extend((0..8).map(|p| (192 + 2 * p, 2)));
            // In the order the kernel reads them: a word of high bits,
            // then the two words of low bits it completes.
            for h in 0..2 {
                for q in 0..2 {
                    for mm in 0..4 {
                        let (m, a) = (8 * h + 4 * q + mm, 16 * h + 4 * q + mm);
                        v.extend([(128 + 4 * m, 4), (4 * a, 4), (4 * (a + 8), 4)]);
                    }
                }
            }
        }
        _ => {}
    }
    v
}

/// Whether matrices of `ty` are packed on this CPU: a kernel exists for it.
pub fn packs(ty: GgmlType) -> bool {
    kernel_k(ty).is_some() || kernel_32(ty).is_some()
}

/// Rearrange a matrix of `ty` (`rows` rows, a multiple of eight, of
/// `cols` columns) from the file's layout into the packed one, in place.
pub fn pack(ty: GgmlType, data: &mut [u8], rows: usize, cols: usize) {
    let (size, bs) = (ty.type_size(), ty.block_size());
    let row_bytes = ty.row_bytes(cols);
    assert!(
        rows.is_multiple_of(8),
        "packing needs whole groups of eight rows"
    );
    assert_eq!(data.len(), rows * row_bytes, "packing: matrix size");
    let words = words(ty);
    let mut tmp = vec![0u8; 8 * row_bytes];
    for group in data.chunks_exact_mut(8 * row_bytes) {
        tmp.copy_from_slice(group);
        for b in 0..cols / bs {
            let mut packed = 8 * b * size;
            for &(src, wb) in &words {
                for r in 0..8 {
                    let file = r * row_bytes + b * size + src;
                    // Fixed sizes: moves, not a call to memcpy per word.
                    match wb {
                        2 => copy::<2>(group, packed, &tmp, file),
                        _ => copy::<4>(group, packed, &tmp, file),
                    }
                    packed += wb;
                }
            }
        }
    }
}

/// Row `lane` of a packed group of eight rows (`group`, `cols` columns)
/// in the file's layout, into `row` (an embedding lookup of a packed
/// matrix: the output matrix that is also the token embedding).
pub fn unpack_row(ty: GgmlType, group: &[u8], lane: usize, cols: usize, row: &mut [u8]) {
    let (size, bs) = (ty.type_size(), ty.block_size());
    assert!(lane < 8 && group.len() == 8 * ty.row_bytes(cols) && row.len() == ty.row_bytes(cols));
    let words = words(ty);
    for b in 0..cols / bs {
        let mut packed = 8 * b * size;
        for &(src, wb) in &words {
            let at = packed + lane * wb;
            row[b * size + src..b * size + src + wb].copy_from_slice(&group[at..at + wb]);
            packed += 8 * wb;
        }
    }
}

/// The inverse of [`pack`], row by row through [`unpack_row`].
pub fn unpack(ty: GgmlType, data: &mut [u8], rows: usize, cols: usize) {
    let row_bytes = ty.row_bytes(cols);
    assert!(rows.is_multiple_of(8) && data.len() == rows * row_bytes);
    let mut group = vec![0u8; 8 * row_bytes];
    for g in data.chunks_exact_mut(8 * row_bytes) {
        group.copy_from_slice(g);
        for (lane, row) in g.chunks_exact_mut(row_bytes).enumerate() {
            unpack_row(ty, &group, lane, cols, row);
        }
    }
}

#[inline(always)]
fn copy<const W: usize>(to: &mut [u8], at: usize, from: &[u8], from_at: usize) {
    let v: [u8; W] = from[from_at..from_at + W].try_into().unwrap_or([0; W]);
    to[at..at + W].copy_from_slice(&v);
}

/// Where a kernel writes: token `t`'s eight results go to
/// `ptr + t * stride ..+ 8`.
#[derive(Clone, Copy)]
pub struct Out {
    pub ptr: *mut f32,
    pub stride: usize,
}

/// Eight packed rows (`blocks` blocks at `group`) × `N` tokens whose
/// activations are blocks `B`. Safety: the group holds `blocks` packed
/// blocks, every token as many activation blocks, and every place [`Out`]
/// names is valid and written by no one else.
pub type Gemm<B, const N: usize> = unsafe fn(*const u8, usize, [&[B]; N], Out);

/// The kernels of one format, for one to four tokens, and for eight where
/// the registers hold eight tokens' sums (AVX-512's 32): a decode batch of
/// eight then unpacks each weight block once instead of twice. Each
/// token's sums are formed in the same order whatever the kernel, so the
/// results are the same bits.
pub struct Kernel<B: 'static> {
    pub g1: Gemm<B, 1>,
    pub g2: Gemm<B, 2>,
    pub g3: Gemm<B, 3>,
    pub g4: Gemm<B, 4>,
    pub g8: Option<Gemm<B, 8>>,
}

impl<B> Clone for Kernel<B> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<B> Copy for Kernel<B> {}

#[cfg(target_arch = "x86_64")]
macro_rules! kernel {
    ($f:ident) => {
        Kernel {
            g1: avx2::$f::<1>,
            g2: avx2::$f::<2>,
            g3: avx2::$f::<3>,
            g4: avx2::$f::<4>,
            g8: None,
        }
    };
    ($f:ident, 8) => {
        Kernel {
            g8: Some(avx2::$f::<8>),
            ..kernel!($f)
        }
    };
}

/// The kernels for a K format `ty` on this CPU (AVX2, or AVX-512 VNNI).
pub fn kernel_k(ty: GgmlType) -> Option<Kernel<BlockQ8K>> {
    #[cfg(target_arch = "x86_64")]
    {
        use crate::dot::{simd_level, SimdLevel};
        use GgmlType::{Q4_K, Q5_K, Q6_K};
        return match (simd_level(), ty) {
            (SimdLevel::Avx2Vnni, Q4_K) => Some(kernel!(q4k_vnni)),
            (SimdLevel::Avx2Vnni, Q5_K) => Some(kernel!(q5k_vnni)),
            (SimdLevel::Avx2, Q5_K) => Some(kernel!(q5k_avx2)),
            (SimdLevel::Avx2Vnni, Q6_K) => Some(kernel!(q6k_vnni)),
            (SimdLevel::Avx2, Q4_K) => Some(kernel!(q4k_avx2)),
            (SimdLevel::Avx2, Q6_K) => Some(kernel!(q6k_avx2)),
            _ => None,
        };
    }
    #[allow(unreachable_code)]
    {
        let _ = ty;
        None
    }
}

/// The kernels for a 32-element format `ty` on this CPU.
pub fn kernel_32(ty: GgmlType) -> Option<Kernel<BlockQ8>> {
    #[cfg(target_arch = "x86_64")]
    {
        use crate::dot::{simd_level, SimdLevel};
        use GgmlType::{Q5_0, Q8_0};
        return match (simd_level(), ty) {
            (SimdLevel::Avx2Vnni, Q8_0) => Some(kernel!(q8_0_vnni, 8)),
            (SimdLevel::Avx2Vnni, Q5_0) => Some(kernel!(q5_0_vnni, 8)),
            (SimdLevel::Avx2, Q8_0) => Some(kernel!(q8_0_avx2)),
            (SimdLevel::Avx2, Q5_0) => Some(kernel!(q5_0_avx2)),
            _ => None,
        };
    }
    #[allow(unreachable_code)]
    {
        let _ = ty;
        None
    }
}

#[cfg(target_arch = "x86_64")]
// Register-blocked kernels index several arrays by the same counters.
#[allow(clippy::needless_range_loop)]
mod avx2 {
    use super::*;
    use std::arch::x86_64::*;

    #[inline(always)]
    unsafe fn ld(p: *const u8) -> __m256i {
        _mm256_loadu_si256(p as *const __m256i)
    }
    /// Four activation bytes from `x + at` in every lane.
    #[inline(always)]
    unsafe fn bcast(x: *const i8, at: usize) -> __m256i {
        _mm256_set1_epi32((x.add(at) as *const i32).read_unaligned())
    }
    /// Add the products of `u` and `x` to `p`: with VNNI one `vpdpbusd`
    /// into 32-bit lanes, else a `vpmaddubsw` pair sum added as i16 (exact
    /// while a caller adds at most 8 steps of u ≤ 15, 4 of u ≤ 31 or 2 of u ≤ 63, with
    /// |x| ≤ 128, before [`scaled`]).
    #[inline(always)]
    unsafe fn step<const VNNI: bool>(p: __m256i, u: __m256i, x: __m256i) -> __m256i {
        if VNNI {
            _mm256_dpbusd_epi32(p, u, x)
        } else {
            _mm256_add_epi16(p, _mm256_maddubs_epi16(u, x))
        }
    }
    /// The first `n` of [`step`]'s partial sums added up.
    #[inline(always)]
    unsafe fn sum<const VNNI: bool>(p: [__m256i; 4], n: usize) -> __m256i {
        let mut s = p[0];
        for v in &p[1..n] {
            s = if VNNI {
                _mm256_add_epi32(s, *v)
            } else {
                _mm256_add_epi16(s, *v)
            };
        }
        s
    }
    /// `p` (from [`step`]) times each lane's scale `sc`, as 32-bit lanes.
    #[inline(always)]
    unsafe fn scaled<const VNNI: bool>(p: __m256i, sc: __m256i) -> __m256i {
        if VNNI {
            _mm256_mullo_epi32(p, sc)
        } else {
            {
                // Each lane's scale in both of its i16 halves.
                let pair = _mm256_blend_epi16::<0b1010_1010>(sc, _mm256_slli_epi32::<16>(sc));
                _mm256_madd_epi16(p, pair)
            }
        }
    }
    /// Byte `k` of every lane.
    #[inline(always)]
    unsafe fn byte(v: __m256i, k: usize) -> __m256i {
        let s = _mm_cvtsi32_si128(8 * k as i32);
        _mm256_and_si256(_mm256_srl_epi32(v, s), _mm256_set1_epi32(0xFF))
    }
    /// Eight f16 at `p` as f32.
    #[inline(always)]
    unsafe fn f16x8(p: *const u8) -> __m256 {
        _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i))
    }
    /// The activations' sums over sub-blocks `2j, 2j+1` (i16 pair) in every lane.
    #[inline(always)]
    unsafe fn bsum_pair(x: &BlockQ8K, j: usize) -> __m256i {
        _mm256_set1_epi32((x.bsums.as_ptr().add(2 * j) as *const i32).read_unaligned())
    }
    #[inline(always)]
    unsafe fn store<const N: usize>(acc: [__m256; N], macc: [__m256; N], out: Out) {
        for t in 0..N {
            _mm256_storeu_ps(out.ptr.add(t * out.stride), _mm256_sub_ps(acc[t], macc[t]));
        }
    }

    /// Q4_K (and Q5_K, with `Q5`: a fifth bit per quant): per 32-element
    /// sub-block `j` one scale and one minimum.
    #[inline(always)]
    unsafe fn q4k<const N: usize, const VNNI: bool, const Q5: bool>(
        g: *const u8,
        blocks: usize,
        xs: [&[BlockQ8K]; N],
        out: Out,
    ) {
        let mut acc = [_mm256_setzero_ps(); N];
        let mut macc = [_mm256_setzero_ps(); N];
        let lo4 = _mm256_set1_epi8(0x0F);
        for b in 0..blocks {
            let blk = g.add(b * if Q5 { 1408 } else { 1152 });
            let qs = blk.add(if Q5 { 384 } else { 128 });
            let xb: [&BlockQ8K; N] = std::array::from_fn(|t| xs[t].get_unchecked(b));
            let xq: [*const i8; N] = std::array::from_fn(|t| xb[t].qs.as_ptr());
            // The 6-bit scales and minimums, four to a lane's word.
            let (w0, w1, w2) = (ld(blk.add(32)), ld(blk.add(64)), ld(blk.add(96)));
            let m6 = _mm256_set1_epi8(0x3F);
            let top = _mm256_set1_epi8(0x30);
            let sc_lo = _mm256_and_si256(w0, m6);
            let m_lo = _mm256_and_si256(w1, m6);
            let sc_hi = _mm256_or_si256(
                _mm256_and_si256(w2, lo4),
                _mm256_and_si256(_mm256_srli_epi32::<2>(w0), top),
            );
            let m_hi = _mm256_or_si256(
                _mm256_and_si256(_mm256_srli_epi32::<4>(w2), lo4),
                _mm256_and_si256(_mm256_srli_epi32::<2>(w1), top),
            );
            let mut s = [_mm256_setzero_si256(); N];
            for c in 0..4 {
                let (sc0, sc1) = if c < 2 {
                    (byte(sc_lo, 2 * c), byte(sc_lo, 2 * c + 1))
                } else {
                    (byte(sc_hi, 2 * c - 4), byte(sc_hi, 2 * c - 3))
                };
                // Independent sums (chains) per token: few tokens need
                // several to keep the multipliers busy.
                let chains = (4 / N).max(1);
                // Q5_K's fifth bits: bit 2c (low nibbles) and 2c+1 (high)
                // of each byte of `qh` word k, moved to bit 4.
                let fifth = |v: __m256i, bit: i32| {
                    let v = if bit <= 4 {
                        _mm256_sll_epi16(v, _mm_cvtsi32_si128(4 - bit))
                    } else {
                        _mm256_srl_epi16(v, _mm_cvtsi32_si128(bit - 4))
                    };
                    _mm256_and_si256(v, _mm256_set1_epi8(0x10))
                };
                // As i16 sums, eight steps of u ≤ 15 stay in range, four of
                // u ≤ 31: Q5_K without VNNI scales each half on its own.
                let halves = if Q5 && !VNNI { 2 } else { 1 };
                for half in 0..halves {
                    let mut plo = [[_mm256_setzero_si256(); 4]; N];
                    let mut phi = [[_mm256_setzero_si256(); 4]; N];
                    for k in (8 * half / halves)..(8 * (half + 1) / halves) {
                        let w = ld(qs.add((8 * c + k) * 32));
                        let mut lo = _mm256_and_si256(w, lo4);
                        let mut hi = _mm256_and_si256(_mm256_srli_epi16::<4>(w), lo4);
                        if Q5 {
                            let qh = ld(blk.add(128 + 32 * k));
                            lo = _mm256_or_si256(lo, fifth(qh, 2 * c as i32));
                            hi = _mm256_or_si256(hi, fifth(qh, 2 * c as i32 + 1));
                        }
                        let i = k % chains;
                        for t in 0..N {
                            let xl = bcast(xq[t], 64 * c + 4 * k);
                            let xh = bcast(xq[t], 64 * c + 32 + 4 * k);
                            plo[t][i] = step::<VNNI>(plo[t][i], lo, xl);
                            phi[t][i] = step::<VNNI>(phi[t][i], hi, xh);
                        }
                    }
                    // Integer sums: their order does not matter.
                    let plo: [__m256i; N] = std::array::from_fn(|t| sum::<VNNI>(plo[t], chains));
                    let phi: [__m256i; N] = std::array::from_fn(|t| sum::<VNNI>(phi[t], chains));
                    for t in 0..N {
                        let a = scaled::<VNNI>(plo[t], sc0);
                        let h = scaled::<VNNI>(phi[t], sc1);
                        s[t] = _mm256_add_epi32(s[t], _mm256_add_epi32(a, h));
                    }
                }
            }
            // M = Σ m_j · (bsum_2j + bsum_2j+1): each minimum in both
            // halves of its lane against the activations' i16 pair.
            let mins: [__m256i; 8] = std::array::from_fn(|j| {
                let m = if j < 4 {
                    byte(m_lo, j)
                } else {
                    byte(m_hi, j - 4)
                };
                _mm256_or_si256(m, _mm256_slli_epi32::<16>(m))
            });
            let d = f16x8(blk);
            let dmin = f16x8(blk.add(16));
            for t in 0..N {
                let mut m = _mm256_setzero_si256();
                for j in 0..8 {
                    m = _mm256_add_epi32(m, _mm256_madd_epi16(mins[j], bsum_pair(xb[t], j)));
                }
                let xd = _mm256_set1_ps(xb[t].d);
                let dd = _mm256_mul_ps(d, xd);
                acc[t] = _mm256_fmadd_ps(dd, _mm256_cvtepi32_ps(s[t]), acc[t]);
                let dm = _mm256_mul_ps(dmin, xd);
                macc[t] = _mm256_fmadd_ps(dm, _mm256_cvtepi32_ps(m), macc[t]);
            }
        }
        store(acc, macc, out)
    }

    /// Q6_K: per 16-element sub-block one signed scale; quants offset by 32.
    #[inline(always)]
    unsafe fn q6k<const N: usize, const VNNI: bool>(
        g: *const u8,
        blocks: usize,
        xs: [&[BlockQ8K]; N],
        out: Out,
    ) {
        let mut acc = [_mm256_setzero_ps(); N];
        let lo4 = _mm256_set1_epi8(0x0F);
        let top = _mm256_set1_epi8(0x30);
        for b in 0..blocks {
            let blk = g.add(b * 1680);
            let xb: [&BlockQ8K; N] = std::array::from_fn(|t| xs[t].get_unchecked(b));
            let xq: [*const i8; N] = std::array::from_fn(|t| xb[t].qs.as_ptr());
            // Scales of sub-blocks 2p and 2p+1 as an i16 pair per lane.
            let pair = |p: usize| _mm256_cvtepi8_epi16(_mm_loadu_si128(blk.add(16 + 16 * p) as _));
            let mut s = [_mm256_setzero_si256(); N];
            // The four quants of lane word `i` of a unit (16 bytes apart in
            // the row: sub-blocks 2i + q of half h).
            let unpack = |qh: __m256i, qa: __m256i, qb: __m256i, i: usize| match i {
                0 => _mm256_or_si256(
                    _mm256_and_si256(qa, lo4),
                    _mm256_and_si256(_mm256_slli_epi16::<4>(qh), top),
                ),
                1 => _mm256_or_si256(
                    _mm256_and_si256(qb, lo4),
                    _mm256_and_si256(_mm256_slli_epi16::<2>(qh), top),
                ),
                2 => _mm256_or_si256(
                    _mm256_and_si256(_mm256_srli_epi16::<4>(qa), lo4),
                    _mm256_and_si256(qh, top),
                ),
                _ => _mm256_or_si256(
                    _mm256_and_si256(_mm256_srli_epi16::<4>(qb), lo4),
                    _mm256_and_si256(_mm256_srli_epi16::<2>(qh), top),
                ),
            };
            if !VNNI && N > 1 {
                // Without VNNI, for several tokens, each step's i16 pair
                // sums are scaled at once (`vpmaddwd` into 32-bit sums): the
                // same integers as summing two steps first, with N
                // accumulators live instead of 4·N (AVX2 has sixteen
                // registers). One token keeps the two-step form (faster).
                for h in 0..2 {
                    for q in 0..2 {
                        let scp: [__m256i; 4] = std::array::from_fn(|i| {
                            let j = 8 * h + 2 * i + q;
                            let pr = pair(j / 2);
                            let sc = if j % 2 == 0 {
                                _mm256_srai_epi32::<16>(_mm256_slli_epi32::<16>(pr))
                            } else {
                                _mm256_srai_epi32::<16>(pr)
                            };
                            _mm256_blend_epi16::<0b1010_1010>(sc, _mm256_slli_epi32::<16>(sc))
                        });
                        for mm in 0..4 {
                            let l0 = 16 * q + 4 * mm;
                            let unit = blk.add(144 + 96 * (8 * h + 4 * q + mm));
                            let (qh, qa, qb) = (ld(unit), ld(unit.add(32)), ld(unit.add(64)));
                            for (i, scp) in scp.iter().enumerate() {
                                let v = unpack(qh, qa, qb, i);
                                for t in 0..N {
                                    let x = bcast(xq[t], 128 * h + 32 * i + l0);
                                    let m = _mm256_madd_epi16(_mm256_maddubs_epi16(v, x), *scp);
                                    s[t] = _mm256_add_epi32(s[t], m);
                                }
                            }
                        }
                    }
                }
            } else {
                for h in 0..2 {
                    for q in 0..2 {
                        // Sub-blocks 8h + 2i + q for i in 0..4.
                        let sc: [__m256i; 4] = std::array::from_fn(|i| {
                            let j = 8 * h + 2 * i + q;
                            let pr = pair(j / 2);
                            if j % 2 == 0 {
                                _mm256_srai_epi32::<16>(_mm256_slli_epi32::<16>(pr))
                            } else {
                                _mm256_srai_epi32::<16>(pr)
                            }
                        });
                        let mut p = [[_mm256_setzero_si256(); N]; 4];
                        for mm in 0..4 {
                            let l0 = 16 * q + 4 * mm;
                            let unit = blk.add(144 + 96 * (8 * h + 4 * q + mm));
                            let (qh, qa, qb) = (ld(unit), ld(unit.add(32)), ld(unit.add(64)));
                            for i in 0..4 {
                                let v = unpack(qh, qa, qb, i);
                                for t in 0..N {
                                    let x = bcast(xq[t], 128 * h + 32 * i + l0);
                                    p[i][t] = step::<VNNI>(p[i][t], v, x);
                                }
                            }
                            // i16 sums hold two steps of 6-bit quants.
                            if mm == 3 || (!VNNI && mm == 1) {
                                for i in 0..4 {
                                    for t in 0..N {
                                        let v = scaled::<VNNI>(p[i][t], sc[i]);
                                        s[t] = _mm256_add_epi32(s[t], v);
                                        p[i][t] = _mm256_setzero_si256();
                                    }
                                }
                            }
                        }
                    }
                }
            }
            let d = f16x8(blk);
            for t in 0..N {
                // The offset of 32: S −= 32 · Σ sc_j · bsum_j.
                let mut a = _mm256_setzero_si256();
                for j in 0..8 {
                    a = _mm256_add_epi32(a, _mm256_madd_epi16(pair(j), bsum_pair(xb[t], j)));
                }
                let si = _mm256_sub_epi32(s[t], _mm256_slli_epi32::<5>(a));
                let dd = _mm256_mul_ps(d, _mm256_set1_ps(xb[t].d));
                acc[t] = _mm256_fmadd_ps(dd, _mm256_cvtepi32_ps(si), acc[t]);
            }
        }
        store(acc, [_mm256_setzero_ps(); N], out)
    }

    /// Q8_0: signed quants, one scale per 32 columns.
    #[inline(always)]
    unsafe fn q8_0<const N: usize, const VNNI: bool>(
        g: *const u8,
        blocks: usize,
        xs: [&[BlockQ8]; N],
        out: Out,
    ) {
        let mut acc = [_mm256_setzero_ps(); N];
        let chains = (4 / N).max(1);
        for b in 0..blocks {
            let blk = g.add(b * 272);
            let xb: [&BlockQ8; N] = std::array::from_fn(|t| xs[t].get_unchecked(b));
            let xq: [*const i8; N] = std::array::from_fn(|t| xb[t].qs.as_ptr());
            // VNNI multiplies u = q + 128 and takes 128·Σx off at the start;
            // AVX2 multiplies |q| by x with q's sign.
            let mut p = [[_mm256_setzero_si256(); 4]; N];
            if VNNI {
                for t in 0..N {
                    p[t][0] = _mm256_set1_epi32(-128 * xb[t].isum);
                }
            }
            for w in 0..8 {
                let q = ld(blk.add(16 + 32 * w));
                let i = w % chains;
                if VNNI {
                    let u = _mm256_xor_si256(q, _mm256_set1_epi8(-128));
                    for t in 0..N {
                        p[t][i] = _mm256_dpbusd_epi32(p[t][i], u, bcast(xq[t], 4 * w));
                    }
                } else {
                    let aq = _mm256_sign_epi8(q, q);
                    for t in 0..N {
                        let x = _mm256_sign_epi8(bcast(xq[t], 4 * w), q);
                        let d = _mm256_maddubs_epi16(aq, x);
                        let d = _mm256_madd_epi16(d, _mm256_set1_epi16(1));
                        p[t][i] = _mm256_add_epi32(p[t][i], d);
                    }
                }
            }
            let d = f16x8(blk);
            for t in 0..N {
                let isum = sum::<true>(p[t], chains);
                let dd = _mm256_mul_ps(d, _mm256_set1_ps(xb[t].d));
                acc[t] = _mm256_fmadd_ps(dd, _mm256_cvtepi32_ps(isum), acc[t]);
            }
        }
        store(acc, [_mm256_setzero_ps(); N], out)
    }

    /// `vpshufb` indices that copy byte `k` of every 32-bit lane to all
    /// four of its bytes.
    #[inline(always)]
    unsafe fn spread(k: i8) -> __m256i {
        let lane = |l: i8| i32::from_le_bytes([(4 * l + k) as u8; 4]);
        _mm256_setr_epi32(
            lane(0),
            lane(1),
            lane(2),
            lane(3),
            lane(0),
            lane(1),
            lane(2),
            lane(3),
        )
    }

    /// Q5_0: 5-bit quants offset by 16, one scale per 32 columns.
    #[inline(always)]
    unsafe fn q5_0<const N: usize, const VNNI: bool>(
        g: *const u8,
        blocks: usize,
        xs: [&[BlockQ8]; N],
        out: Out,
    ) {
        let mut acc = [_mm256_setzero_ps(); N];
        let lo4 = _mm256_set1_epi8(0x0F);
        let bit4 = _mm256_set1_epi8(0x10);
        // The fifth bits of step `s` (columns 4s..4s+4) are bits 4s..4s+4
        // of a row's `qh`: byte s/2 spread over the lane's four bytes, then
        // one bit per byte.
        let spreads: [__m256i; 4] = std::array::from_fn(|k| spread(k as i8));
        let masks = [
            _mm256_set1_epi32(i32::from_le_bytes([1, 2, 4, 8])),
            _mm256_set1_epi32(i32::from_le_bytes([16, 32, 64, 128])),
        ];
        for b in 0..blocks {
            let blk = g.add(b * 176);
            let xb: [&BlockQ8; N] = std::array::from_fn(|t| xs[t].get_unchecked(b));
            let xq: [*const i8; N] = std::array::from_fn(|t| xb[t].qs.as_ptr());
            let qh = ld(blk.add(16));
            let high = |s: usize| {
                let m = masks[s % 2];
                let v = _mm256_and_si256(_mm256_shuffle_epi8(qh, spreads[s / 2]), m);
                _mm256_and_si256(_mm256_cmpeq_epi8(v, m), bit4)
            };
            let mut p = [[_mm256_setzero_si256(); 2]; N];
            for w in 0..4 {
                let q = ld(blk.add(48 + 32 * w));
                let lo = _mm256_or_si256(_mm256_and_si256(q, lo4), high(w));
                let hi = _mm256_or_si256(
                    _mm256_and_si256(_mm256_srli_epi16::<4>(q), lo4),
                    high(w + 4),
                );
                for t in 0..N {
                    // With VNNI one 32-bit sum per token; i16 sums need
                    // the halves apart.
                    let h = if VNNI { 0 } else { 1 };
                    p[t][0] = step::<VNNI>(p[t][0], lo, bcast(xq[t], 4 * w));
                    p[t][h] = step::<VNNI>(p[t][h], hi, bcast(xq[t], 16 + 4 * w));
                }
            }
            let d = f16x8(blk);
            for t in 0..N {
                // Without VNNI the sums are i16: four steps of u ≤ 31 fit.
                let (a, h) = if VNNI {
                    (p[t][0], p[t][1])
                } else {
                    let ones = _mm256_set1_epi16(1);
                    (
                        _mm256_madd_epi16(p[t][0], ones),
                        _mm256_madd_epi16(p[t][1], ones),
                    )
                };
                let off = _mm256_set1_epi32(16 * xb[t].isum);
                let isum = _mm256_sub_epi32(_mm256_add_epi32(a, h), off);
                let dd = _mm256_mul_ps(d, _mm256_set1_ps(xb[t].d));
                acc[t] = _mm256_fmadd_ps(dd, _mm256_cvtepi32_ps(isum), acc[t]);
            }
        }
        store(acc, [_mm256_setzero_ps(); N], out)
    }

    // Safety (all of them): handed out by `kernel_k`/`kernel_32` only after
    // `simd_level()` found the features they are compiled for; the rest as
    // `Gemm` says.
    macro_rules! wrappers {
        ($feat:literal, $vnni:literal, $($name:ident = $inner:ident($b:ty $(, $q5:literal)?)),*) => {$(
            #[target_feature(enable = $feat)]
            pub(super) unsafe fn $name<const N: usize>(
                g: *const u8,
                blocks: usize,
                xs: [&[$b]; N],
                out: Out,
            ) {
                $inner::<N, $vnni $(, $q5)?>(g, blocks, xs, out)
            }
        )*};
    }
    wrappers!(
        "avx2,fma,f16c",
        false,
        q4k_avx2 = q4k(BlockQ8K, false),
        q5k_avx2 = q4k(BlockQ8K, true),
        q6k_avx2 = q6k(BlockQ8K),
        q8_0_avx2 = q8_0(BlockQ8),
        q5_0_avx2 = q5_0(BlockQ8)
    );
    wrappers!(
        "avx2,fma,f16c,avx512f,avx512vnni,avx512vl,avx512bw",
        true,
        q4k_vnni = q4k(BlockQ8K, false),
        q5k_vnni = q4k(BlockQ8K, true),
        q6k_vnni = q6k(BlockQ8K),
        q8_0_vnni = q8_0(BlockQ8),
        q5_0_vnni = q5_0(BlockQ8)
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant;
    use rand::SeedableRng;

    fn quantized(cols: usize, n_tok: usize) -> Vec<Vec<BlockQ8K>> {
        (0..n_tok)
            .map(|t| {
                let x: Vec<f32> = (0..cols)
                    .map(|i| (((i * 13 + t * 7) % 31) as f32 - 15.0) * 0.07)
                    .collect();
                let mut v = Vec::new();
                quant::quantize_q8k(&x, &mut v);
                v
            })
            .collect()
    }

    /// `cargo test --release -p hanlin-kernels -- --ignored --nocapture kpack_speed`
    #[test]
    #[ignore = "a measurement, not a check"]
    fn kpack_speed() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
        let cols = 1536;
        for ty in [GgmlType::Q4_K, GgmlType::Q6_K] {
            let Some(k) = kernel_k(ty) else { return };
            let m: Vec<u8> = (0..8)
                .flat_map(|_| crate::dot::tests::random_row(ty, cols, &mut rng))
                .collect();
            let mut p = m.clone();
            let reps = 2000;
            let t0 = std::time::Instant::now();
            for _ in 0..reps {
                p.copy_from_slice(&m);
                pack(ty, &mut p, 8, cols);
            }
            let pack_s = t0.elapsed().as_secs_f64() / reps as f64;
            let xq = quantized(cols, 4);
            let xs: [&[BlockQ8K]; 4] = std::array::from_fn(|t| &xq[t][..]);
            let mut res = [0f32; 32];
            let out = Out {
                ptr: res.as_mut_ptr(),
                stride: 8,
            };
            let n = 200_000;
            let t0 = std::time::Instant::now();
            for _ in 0..n {
                // SAFETY: `p` holds cols/256 packed blocks, `res` four tokens.
                unsafe { (k.g4)(p.as_ptr(), cols / 256, xs, out) };
            }
            let s = t0.elapsed().as_secs_f64();
            let t1 = std::time::Instant::now();
            for _ in 0..n {
                // SAFETY: as above, one token.
                unsafe { (k.g1)(p.as_ptr(), cols / 256, [xs[0]], out) };
            }
            let s1 = t1.elapsed().as_secs_f64();
            println!(
                "{ty}: 4 tokens {:.1} GMAC/s, 1 token {:.1} GMAC/s; packing 8 rows {:.2} µs = {:.1} four-token passes ({})",
                (n * 8 * 4 * cols) as f64 / s / 1e9,
                (n * 8 * cols) as f64 / s1 / 1e9,
                pack_s * 1e6,
                pack_s / (s / n as f64),
                res[0]
            );
        }
    }

    #[test]
    fn unpack_undoes_pack() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        for ty in [
            GgmlType::Q4_K,
            GgmlType::Q5_K,
            GgmlType::Q6_K,
            GgmlType::Q5_0,
            GgmlType::Q8_0,
        ] {
            let m: Vec<u8> = (0..16)
                .flat_map(|_| crate::dot::tests::random_row(ty, 512, &mut rng))
                .collect();
            let mut p = m.clone();
            pack(ty, &mut p, 16, 512);
            assert_ne!(p, m, "{ty}: packing moves bytes");
            let rb = ty.row_bytes(512);
            let mut row = vec![0u8; rb];
            for r in 0..16 {
                let g = &p[r / 8 * 8 * rb..(r / 8 + 1) * 8 * rb];
                unpack_row(ty, g, r % 8, 512, &mut row);
                assert_eq!(row, m[r * rb..(r + 1) * rb], "{ty} row {r}");
            }
            unpack(ty, &mut p, 16, 512);
            assert_eq!(p, m, "{ty}");
        }
    }

    /// Every kernel, for one to four tokens, gives the portable dot's bits.
    #[test]
    fn kernels_give_the_scalar_bits() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(4);
        let cols = 768;
        for ty in [GgmlType::Q4_K, GgmlType::Q5_K, GgmlType::Q6_K] {
            let Some(k) = kernel_k(ty) else { return };
            let rows: Vec<Vec<u8>> = (0..8)
                .map(|_| crate::dot::tests::random_row(ty, cols, &mut rng))
                .collect();
            let mut p: Vec<u8> = rows.concat();
            pack(ty, &mut p, 8, cols);
            let xq = quantized(cols, 4);
            let want: Vec<Vec<f32>> = xq
                .iter()
                .map(|x| {
                    rows.iter()
                        .map(|r| crate::dot::scalar_q8k(ty, r, x))
                        .collect()
                })
                .collect();
            let mut got = [[f32::NAN; 8]; 4];
            let out = Out {
                ptr: got.as_mut_ptr() as *mut f32,
                stride: 8,
            };
            let blocks = cols / 256;
            // SAFETY: `p` holds `blocks` packed blocks, `got` four tokens.
            unsafe {
                (k.g1)(p.as_ptr(), blocks, [&xq[0]], out);
                check(&got, &want, 1, ty);
                (k.g2)(p.as_ptr(), blocks, [&xq[0], &xq[1]], out);
                check(&got, &want, 2, ty);
                (k.g3)(p.as_ptr(), blocks, [&xq[0], &xq[1], &xq[2]], out);
                check(&got, &want, 3, ty);
                (k.g4)(p.as_ptr(), blocks, std::array::from_fn(|t| &xq[t][..]), out);
                check(&got, &want, 4, ty);
            }
        }
        fn check(got: &[[f32; 8]; 4], want: &[Vec<f32>], n: usize, ty: GgmlType) {
            for t in 0..n {
                for r in 0..8 {
                    assert_eq!(
                        got[t][r].to_bits(),
                        want[t][r].to_bits(),
                        "{ty} N={n} token {t} row {r}: {} vs {}",
                        got[t][r],
                        want[t][r]
                    );
                }
            }
        }
    }
}
