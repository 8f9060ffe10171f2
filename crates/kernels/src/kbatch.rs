//! The batch path of the K formats (Q4_K, Q5_K, Q6_K).
//!
//! Prefill multiplies hundreds of tokens by every weight row. The one-token
//! and four-token kernels unpack a row's nibbles and 6-bit scales again for
//! every group of tokens and end each block with horizontal sums, which cost
//! about as much as the products. Here a chunk of rows is unpacked once per
//! matmul into [`Block8`]s: eight rows interleaved four bytes at a time, so
//! one 256-bit register holds four quants of each of eight rows and one
//! broadcast of four activation bytes multiplies all eight rows at once —
//! every lane is a row, and nothing is summed across lanes. (The idea is the
//! row-interleaved repacking of ik_llama.cpp; the layout and kernels are
//! ours.)
//!
//! Every (row, token) result is the one-token kernel's bit for bit: the
//! block's integer sums `S` and `M` are exact however they are reached, and
//! the float steps after them are the ones [`crate::dot::scalar_q8k`]
//! documents, lane by lane.

use crate::quant::{self, BlockQ8K};
use hanlin_formats::GgmlType;

/// One 256-element block of eight weight rows, repacked.
#[derive(Clone, Copy)]
#[repr(C, align(32))]
pub struct Block8 {
    /// Step `s` (elements `4s..4s+4`): lane `r` holds row `r`'s four quants.
    q: [[u32; 8]; 64],
    /// Per 16-element sub-block, each row's scale.
    sc: [[i32; 8]; 16],
    /// Per pair `j` of sub-blocks, each row's i16 pair that multiplies the
    /// activations' `(bsum_2j, bsum_2j+1)`: the minimums (Q4_K, Q5_K) or the
    /// scales, for the offset of 32 (Q6_K).
    aux: [[i32; 8]; 8],
    d: [f32; 8],
    dmin: [f32; 8],
}

impl Block8 {
    pub const ZERO: Block8 = Block8 {
        q: [[0; 8]; 64],
        sc: [[0; 8]; 16],
        aux: [[0; 8]; 8],
        d: [0.0; 8],
        dmin: [0.0; 8],
    };
}

/// Repack eight rows of type `ty` (`Q4_K`, `Q5_K` or `Q6_K`, all rows the
/// same length) into `out`, one [`Block8`] per 256 columns (`out` is as
/// long as that; whatever it held is overwritten).
pub fn repack(ty: GgmlType, rows: [&[u8]; 8], out: &mut [Block8]) {
    #[cfg(target_arch = "x86_64")]
    if crate::dot::simd_level() != crate::dot::SimdLevel::Scalar {
        // SAFETY: AVX2 was found at run time.
        unsafe { avx2::repack(ty, rows, out) };
        return;
    }
    repack_scalar(ty, rows, out);
}

/// Row `r`'s scales, minimums and float factors into `blk`.
fn scales_into(blk: &mut Block8, r: usize, k: &quant::KScales) {
    for (j, sc) in blk.sc.iter_mut().enumerate() {
        sc[r] = k.sc[j] as i32;
    }
    let w = if k.offset != 0 { &k.sc } else { &k.m };
    for (j, a) in blk.aux.iter_mut().enumerate() {
        a[r] = (w[2 * j] as u16 as u32 | ((w[2 * j + 1] as u16 as u32) << 16)) as i32;
    }
    blk.d[r] = k.d;
    blk.dmin[r] = k.dmin;
}

/// The portable form of [`repack`] (the reference its SIMD form must match).
fn repack_scalar(ty: GgmlType, rows: [&[u8]; 8], out: &mut [Block8]) {
    let size = ty.type_size();
    for (b, out) in out.iter_mut().enumerate() {
        let mut blk = Block8::ZERO;
        for (r, row) in rows.iter().enumerate() {
            let k = quant::k_ints(ty, &row[b * size..(b + 1) * size]);
            for (s, q) in blk.q.iter_mut().enumerate() {
                q[r] = u32::from_le_bytes([
                    k.u[4 * s],
                    k.u[4 * s + 1],
                    k.u[4 * s + 2],
                    k.u[4 * s + 3],
                ]);
            }
            scales_into(&mut blk, r, &k.s);
        }
        *out = blk;
    }
}

/// Where a batch kernel writes: token `t`'s eight results of group `g` go
/// to `ptr + t * stride + 8 * g ..+ 8`, for tokens `t < tokens` (the rest
/// of the four are padding).
#[derive(Clone, Copy)]
pub struct Out {
    pub ptr: *mut f32,
    pub stride: usize,
    pub tokens: usize,
}

/// Sixteen rows (two groups of eight, their blocks in order) × four tokens.
/// Safety: every place [`Out`] names is valid and written by no one else.
pub type Gemm16 = unsafe fn(&[Block8], &[Block8], [&[BlockQ8K]; 4], Out);
/// Eight rows × four tokens. Safety: as [`Gemm16`].
pub type Gemm8 = unsafe fn(&[Block8], [&[BlockQ8K]; 4], Out);

/// The repacked batch kernels of one K format.
#[derive(Clone, Copy)]
pub struct Kernel {
    pub gemm16: Gemm16,
    pub gemm8: Gemm8,
}

/// The kernels for `ty` on this CPU (AVX2, or AVX-512 VNNI), if any.
pub fn kernel(ty: GgmlType) -> Option<Kernel> {
    #[cfg(target_arch = "x86_64")]
    {
        use crate::dot::{simd_level, SimdLevel};
        use GgmlType::{Q4_K, Q5_K, Q6_K};
        return match (simd_level(), ty) {
            (SimdLevel::Avx2Vnni, Q4_K | Q5_K) => Some(Kernel {
                gemm16: avx2::vnni16::<true>,
                gemm8: avx2::vnni8::<true>,
            }),
            (SimdLevel::Avx2Vnni, Q6_K) => Some(Kernel {
                gemm16: avx2::vnni16::<false>,
                gemm8: avx2::vnni8::<false>,
            }),
            (SimdLevel::Avx2, Q4_K) => Some(Kernel {
                gemm16: avx2::avx16::<true, 8>,
                gemm8: avx2::avx8::<true, 8>,
            }),
            (SimdLevel::Avx2, Q5_K) => Some(Kernel {
                gemm16: avx2::avx16::<true, 4>,
                gemm8: avx2::avx8::<true, 4>,
            }),
            (SimdLevel::Avx2, Q6_K) => Some(Kernel {
                gemm16: avx2::avx16::<false, 2>,
                gemm8: avx2::avx8::<false, 2>,
            }),
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

    use crate::dot::avx2::{q45k_parts, q6k_parts};

    /// Columns `i` of the 8×8 matrix of 32-bit values whose rows are `r`.
    #[inline(always)]
    unsafe fn transpose8(r: [__m256i; 8]) -> [__m256i; 8] {
        let lo = |a, b| _mm256_unpacklo_epi32(a, b);
        let hi = |a, b| _mm256_unpackhi_epi32(a, b);
        let t = [
            lo(r[0], r[1]),
            hi(r[0], r[1]),
            lo(r[2], r[3]),
            hi(r[2], r[3]),
            lo(r[4], r[5]),
            hi(r[4], r[5]),
            lo(r[6], r[7]),
            hi(r[6], r[7]),
        ];
        let u = [
            _mm256_unpacklo_epi64(t[0], t[2]),
            _mm256_unpackhi_epi64(t[0], t[2]),
            _mm256_unpacklo_epi64(t[1], t[3]),
            _mm256_unpackhi_epi64(t[1], t[3]),
            _mm256_unpacklo_epi64(t[4], t[6]),
            _mm256_unpackhi_epi64(t[4], t[6]),
            _mm256_unpacklo_epi64(t[5], t[7]),
            _mm256_unpackhi_epi64(t[5], t[7]),
        ];
        std::array::from_fn(|i| {
            if i < 4 {
                _mm256_permute2x128_si256::<0x20>(u[i], u[i + 4])
            } else {
                _mm256_permute2x128_si256::<0x31>(u[i - 4], u[i])
            }
        })
    }

    /// [`repack_scalar`] with the quants unpacked and interleaved in
    /// registers. Safety: the CPU has AVX2.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn repack(ty: GgmlType, rows: [&[u8]; 8], out: &mut [Block8]) {
        let size = ty.type_size();
        for (b, blk) in out.iter_mut().enumerate() {
            let mut parts = [[_mm256_setzero_si256(); 8]; 8];
            for (r, row) in rows.iter().enumerate() {
                let block = &row[b * size..(b + 1) * size];
                parts[r] = match ty {
                    GgmlType::Q4_K => q45k_parts::<false>(block.as_ptr()),
                    GgmlType::Q5_K => q45k_parts::<true>(block.as_ptr()),
                    _ => q6k_parts(block.as_ptr()),
                };
                scales_into(blk, r, &quant::k_scales(ty, block));
            }
            for g in 0..8 {
                let cols = transpose8(std::array::from_fn(|r| parts[r][g]));
                for (i, c) in cols.into_iter().enumerate() {
                    _mm256_store_si256(blk.q[8 * g + i].as_mut_ptr() as *mut __m256i, c);
                }
            }
        }
    }

    #[inline(always)]
    unsafe fn load(v: &[i32; 8]) -> __m256i {
        _mm256_load_si256(v.as_ptr() as *const __m256i)
    }
    #[inline(always)]
    unsafe fn load_q(v: &[u32; 8]) -> __m256i {
        _mm256_load_si256(v.as_ptr() as *const __m256i)
    }

    /// `G` groups of eight rows × four tokens. `MIN`: Q4_K/Q5_K (minimums);
    /// otherwise Q6_K (offset 32). `VNNI`: `vpdpbusd` per scale and one
    /// multiply, else `vpmaddubsw` + `vpmaddwd` with i16 scale pairs, `ACC`
    /// steps of four quants summed as i16 in between.
    #[inline(always)]
    unsafe fn gemm<const G: usize, const MIN: bool, const VNNI: bool, const ACC: usize>(
        rep: [&[Block8]; G],
        xs: [&[BlockQ8K]; 4],
        out: Out,
    ) {
        let n = xs.iter().fold(
            rep.iter().fold(usize::MAX, |n, r| n.min(r.len())),
            |n, x| n.min(x.len()),
        );
        let mut acc = [[_mm256_setzero_ps(); 4]; G];
        let mut macc = [[_mm256_setzero_ps(); 4]; G];
        for b in 0..n {
            let bl: [&Block8; G] = std::array::from_fn(|g| rep[g].get_unchecked(b));
            let xq: [*const u8; 4] =
                std::array::from_fn(|t| xs[t].get_unchecked(b).qs.as_ptr() as *const u8);
            let xv = |t: usize, st: usize| {
                _mm256_set1_epi32((xq[t].add(4 * st) as *const i32).read_unaligned())
            };
            let mut s = [[_mm256_setzero_si256(); 4]; G];
            // Q4_K and Q5_K keep one scale for 32 elements (two sub-blocks).
            let per = if MIN { 2 } else { 1 };
            for j in (0..16).step_by(per) {
                let scv: [__m256i; G] = std::array::from_fn(|g| load(&bl[g].sc[j]));
                if VNNI {
                    let mut p = [[_mm256_setzero_si256(); 4]; G];
                    for st in 4 * j..4 * (j + per) {
                        let wv: [__m256i; G] = std::array::from_fn(|g| load_q(&bl[g].q[st]));
                        for t in 0..4 {
                            let x = xv(t, st);
                            for g in 0..G {
                                p[g][t] = _mm256_dpbusd_epi32(p[g][t], wv[g], x);
                            }
                        }
                    }
                    for g in 0..G {
                        for t in 0..4 {
                            s[g][t] =
                                _mm256_add_epi32(s[g][t], _mm256_mullo_epi32(p[g][t], scv[g]));
                        }
                    }
                } else {
                    // Each row's scale in both i16 halves of its lane.
                    let pair: [__m256i; G] = std::array::from_fn(|g| {
                        _mm256_blend_epi16::<0b1010_1010>(scv[g], _mm256_slli_epi32::<16>(scv[g]))
                    });
                    // `vpmaddubsw` pair sums are added as i16 for `ACC`
                    // steps before one `vpmaddwd` applies the scale: with
                    // |x| ≤ 127 and u ≤ 15 (Q4_K), 31 (Q5_K) or 63 (Q6_K),
                    // 8, 4 or 2 steps stay below 32,768.
                    for c in (4 * j..4 * (j + per)).step_by(ACC) {
                        let mut a16 = [[_mm256_setzero_si256(); 4]; G];
                        for st in c..c + ACC {
                            let wv: [__m256i; G] = std::array::from_fn(|g| load_q(&bl[g].q[st]));
                            for t in 0..4 {
                                let x = xv(t, st);
                                for g in 0..G {
                                    let p = _mm256_maddubs_epi16(wv[g], x);
                                    a16[g][t] = _mm256_add_epi16(a16[g][t], p);
                                }
                            }
                        }
                        for g in 0..G {
                            for t in 0..4 {
                                let p = _mm256_madd_epi16(a16[g][t], pair[g]);
                                s[g][t] = _mm256_add_epi32(s[g][t], p);
                            }
                        }
                    }
                }
            }
            for t in 0..4 {
                let xb = xs[t].get_unchecked(b);
                let bs = xb.bsums.as_ptr() as *const i32;
                let mut a = [_mm256_setzero_si256(); G];
                for j in 0..8 {
                    let bv = _mm256_set1_epi32(bs.add(j).read_unaligned());
                    for g in 0..G {
                        a[g] = _mm256_add_epi32(a[g], _mm256_madd_epi16(load(&bl[g].aux[j]), bv));
                    }
                }
                let xd = _mm256_set1_ps(xb.d);
                for g in 0..G {
                    let si = if MIN {
                        s[g][t]
                    } else {
                        _mm256_sub_epi32(s[g][t], _mm256_slli_epi32::<5>(a[g]))
                    };
                    let d = _mm256_mul_ps(_mm256_load_ps(bl[g].d.as_ptr()), xd);
                    acc[g][t] = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(si), acc[g][t]);
                    if MIN {
                        let dm = _mm256_mul_ps(_mm256_load_ps(bl[g].dmin.as_ptr()), xd);
                        macc[g][t] = _mm256_fmadd_ps(dm, _mm256_cvtepi32_ps(a[g]), macc[g][t]);
                    }
                }
            }
        }
        for g in 0..G {
            for t in 0..out.tokens.min(4) {
                let p = out.ptr.add(t * out.stride + 8 * g);
                _mm256_storeu_ps(p, _mm256_sub_ps(acc[g][t], macc[g][t]));
            }
        }
    }

    // Safety (all four): handed out by `kernel` only after `simd_level()`
    // found the features they are compiled for; `out` as [`Gemm16`] says.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn avx16<const MIN: bool, const ACC: usize>(
        a: &[Block8],
        b: &[Block8],
        xs: [&[BlockQ8K]; 4],
        out: Out,
    ) {
        // Eight rows at a time: sixteen would not fit AVX2's registers.
        gemm::<1, MIN, false, ACC>([a], xs, out);
        let second = Out {
            ptr: out.ptr.wrapping_add(8),
            ..out
        };
        gemm::<1, MIN, false, ACC>([b], xs, second)
    }
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn avx8<const MIN: bool, const ACC: usize>(
        a: &[Block8],
        xs: [&[BlockQ8K]; 4],
        out: Out,
    ) {
        gemm::<1, MIN, false, ACC>([a], xs, out)
    }
    #[target_feature(enable = "avx2,fma,avx512f,avx512vnni,avx512vl,avx512bw")]
    pub(super) unsafe fn vnni16<const MIN: bool>(
        a: &[Block8],
        b: &[Block8],
        xs: [&[BlockQ8K]; 4],
        out: Out,
    ) {
        gemm::<2, MIN, true, 1>([a, b], xs, out)
    }
    #[target_feature(enable = "avx2,fma,avx512f,avx512vnni,avx512vl,avx512bw")]
    pub(super) unsafe fn vnni8<const MIN: bool>(a: &[Block8], xs: [&[BlockQ8K]; 4], out: Out) {
        gemm::<1, MIN, true, 1>([a], xs, out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The SIMD repack writes the portable one's bytes.
    #[test]
    fn repack_matches_the_portable_form() {
        use rand::SeedableRng;
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(9);
        for ty in [GgmlType::Q4_K, GgmlType::Q5_K, GgmlType::Q6_K] {
            let rows: Vec<Vec<u8>> = (0..8)
                .map(|_| crate::dot::tests::random_row(ty, 768, &mut rng))
                .collect();
            let rows: [&[u8]; 8] = std::array::from_fn(|i| &rows[i][..]);
            let (mut a, mut b) = (vec![Block8::ZERO; 3], vec![Block8::ZERO; 3]);
            repack(ty, rows, &mut a);
            repack_scalar(ty, rows, &mut b);
            assert_eq!(a.len(), 3);
            for (x, y) in a.iter().zip(&b) {
                assert_eq!(x.q, y.q, "{ty} quants");
                assert_eq!(x.sc, y.sc, "{ty} scales");
                assert_eq!(x.aux, y.aux, "{ty} aux");
                assert_eq!(x.d.map(f32::to_bits), y.d.map(f32::to_bits), "{ty} d");
                assert_eq!(
                    x.dmin.map(f32::to_bits),
                    y.dmin.map(f32::to_bits),
                    "{ty} dmin"
                );
            }
        }
    }

    /// `cargo test --release -p hanlin-kernels -- --ignored --nocapture kbatch_speed`
    #[test]
    #[ignore = "a measurement, not a check"]
    fn kbatch_speed() {
        use rand::SeedableRng;
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
        let cols = 1536;
        for ty in [GgmlType::Q4_K, GgmlType::Q6_K] {
            let Some(k) = kernel(ty) else { return };
            let rows: Vec<Vec<u8>> = (0..16)
                .map(|_| crate::dot::tests::random_row(ty, cols, &mut rng))
                .collect();
            let mut buf = vec![Block8::ZERO; 2 * cols / 256];
            let reps: usize = std::env::var("REPS")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(100);
            let t0 = std::time::Instant::now();
            for _ in 0..reps {
                let (a, b) = buf.split_at_mut(cols / 256);
                repack(ty, std::array::from_fn(|i| &rows[i][..]), a);
                repack(ty, std::array::from_fn(|i| &rows[8 + i][..]), b);
            }
            let repack_s = t0.elapsed().as_secs_f64() / reps as f64;
            let x: Vec<f32> = (0..4 * cols)
                .map(|i| ((i * 7 % 29) as f32 - 14.0) * 0.1)
                .collect();
            let xq: Vec<Vec<BlockQ8K>> = x
                .chunks(cols)
                .map(|c| {
                    let mut v = Vec::new();
                    quant::quantize_q8k(c, &mut v);
                    v
                })
                .collect();
            let xs: [&[BlockQ8K]; 4] = std::array::from_fn(|t| &xq[t][..]);
            let blocks = cols / 256;
            let n = 100000;
            let t0 = std::time::Instant::now();
            let mut res = [0f32; 4 * 16];
            let out = Out {
                ptr: res.as_mut_ptr(),
                stride: 16,
                tokens: 4,
            };
            for _ in 0..n {
                // SAFETY: `res` holds four tokens of sixteen rows.
                unsafe { (k.gemm16)(&buf[..blocks], &buf[blocks..], xs, out) };
            }
            let sink = res[0];
            let s = t0.elapsed().as_secs_f64();
            let macs = (n * 16 * 4 * cols) as f64;
            println!(
                "{ty}: {:.1} GMAC/s; repack of 16 rows {:.1} µs = {:.1} token-passes ({sink})",
                macs / s / 1e9,
                repack_s * 1e6,
                repack_s / (s / n as f64 / 4.0)
            );
        }
    }
}
