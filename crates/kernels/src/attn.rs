//! Dense (non-causal) f32 attention for encoders over long inputs
//! (Whisper's 1,500 audio positions): a block of up to eight queries
//! against all keys at once, as register tiles — eight queries × sixteen
//! keys for the scores, four queries × sixteen dimensions for the
//! weighted sum of values — so each loaded key or value feeds several
//! multiply-adds. The same code is compiled for AVX-512, AVX2+FMA and the
//! baseline, and chosen at run time.

use crate::dot::{simd_level, SimdLevel};
use crate::pool::{SendPtr, ThreadPool};

/// One head's keys and values, laid out for [`attend_block`].
pub struct HeadKv {
    /// Keys transposed: `hd` rows of `n_pad` values (zero past `n`).
    kt: Vec<f32>,
    /// Values: `n` rows of `hd` values.
    v: Vec<f32>,
    n: usize,
    n_pad: usize,
    hd: usize,
}

impl HeadKv {
    /// From rows of keys and values (`n` rows each, `stride` apart, the
    /// head's `hd` values starting at `off` in each row).
    pub fn new(k: &[f32], v: &[f32], stride: usize, off: usize, n: usize, hd: usize) -> Self {
        assert!(hd <= 256, "HeadKv: head size {hd} above 256");
        let n_pad = n.div_ceil(16) * 16;
        let mut kt = vec![0f32; hd * n_pad];
        let mut vv = Vec::with_capacity(n * hd);
        for s in 0..n {
            let kr = &k[s * stride + off..s * stride + off + hd];
            for (d, x) in kr.iter().enumerate() {
                kt[d * n_pad + s] = *x;
            }
            vv.extend_from_slice(&v[s * stride + off..s * stride + off + hd]);
        }
        Self {
            kt,
            v: vv,
            n,
            n_pad,
            hd,
        }
    }
}

/// `out[i] = softmax(scale · q_i·Kᵀ) · V` for the queries `q` (rows of
/// `hd` values, `q_stride` apart; at most eight), written to `out` (rows
/// `out_stride` apart). `scratch` is reused between calls.
#[allow(clippy::too_many_arguments)]
pub fn attend_block(
    kv: &HeadKv,
    q: &[f32],
    q_stride: usize,
    n_q: usize,
    scale: f32,
    out: &mut [f32],
    out_stride: usize,
    scratch: &mut Vec<f32>,
) {
    assert!(n_q <= 8, "attend_block: at most eight queries");
    block(kv, q, q_stride, n_q, scale, out, out_stride, scratch)
}

/// Multi-head attention without a mask: for each of `n_q` query rows of
/// `q` (`q_stride` apart, head `h`'s `hd` values at `h * hd`) and each
/// head, `softmax(scale · q·Kᵀ) · V` over the `n_kv` rows of `k` and `v`
/// (`kv_stride` apart, heads laid out alike), written to `out` (`n_q` rows
/// of `heads * hd`). Heads and blocks of eight queries are spread over the
/// pool.
#[allow(clippy::too_many_arguments)]
pub fn dense(
    pool: &ThreadPool,
    heads: usize,
    hd: usize,
    q: &[f32],
    q_stride: usize,
    (k, v, kv_stride): (&[f32], &[f32], usize),
    n_q: usize,
    n_kv: usize,
    scale: f32,
    out: &mut [f32],
) {
    let d = heads * hd;
    assert!(out.len() >= n_q * d, "attn::dense: output too small");
    if n_q == 0 {
        return;
    }
    // Laying out the keys and values is a copy, small beside the products.
    let kvs: Vec<HeadKv> = (0..heads)
        .map(|h| HeadKv::new(k, v, kv_stride, h * hd, n_kv, hd))
        .collect();
    let blocks = n_q.div_ceil(8);
    let dst = SendPtr(out.as_mut_ptr());
    pool.for_chunks(heads * blocks, 1, &|r| {
        let mut scratch = Vec::new();
        for job in r {
            let (h, b) = (job / blocks, job % blocks);
            let i0 = b * 8;
            let nq = (n_q - i0).min(8);
            // SAFETY: this job alone writes rows i0..i0+nq of head h's
            // columns; the slice spans from its first to its last value.
            let o = unsafe { dst.slice(i0 * d + h * hd, (nq - 1) * d + hd) };
            attend_block(
                &kvs[h],
                &q[i0 * q_stride + h * hd..],
                q_stride,
                nq,
                scale,
                o,
                d,
                &mut scratch,
            );
        }
    });
}

/// Scores of eight queries (`qs[d][i]`, already scaled) against sixteen
/// keys starting at `kb`, into `scratch` rows `np` apart.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn scores16_avx512(qs: &[[f32; 8]], kt: &[f32], np: usize, kb: usize, scratch: &mut [f32]) {
    use std::arch::x86_64::*;
    let mut acc = [_mm512_setzero_ps(); 8];
    for (d, q) in qs.iter().enumerate() {
        let k = _mm512_loadu_ps(kt.as_ptr().add(d * np + kb));
        for (a, qv) in acc.iter_mut().zip(q) {
            *a = _mm512_fmadd_ps(_mm512_set1_ps(*qv), k, *a);
        }
    }
    for (i, a) in acc.iter().enumerate() {
        _mm512_storeu_ps(scratch.as_mut_ptr().add(i * np + kb), *a);
    }
}

/// As [`scores16_avx512`], eight keys at a time with AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn scores16_avx2(qs: &[[f32; 8]], kt: &[f32], np: usize, kb: usize, scratch: &mut [f32]) {
    use std::arch::x86_64::*;
    for half in [0, 8] {
        let mut acc = [_mm256_setzero_ps(); 8];
        for (d, q) in qs.iter().enumerate() {
            let k = _mm256_loadu_ps(kt.as_ptr().add(d * np + kb + half));
            for (a, qv) in acc.iter_mut().zip(q) {
                *a = _mm256_fmadd_ps(_mm256_set1_ps(*qv), k, *a);
            }
        }
        for (i, a) in acc.iter().enumerate() {
            _mm256_storeu_ps(scratch.as_mut_ptr().add(i * np + kb + half), *a);
        }
    }
}

/// `acc[j][..64] = Σ_s pw[s*4+j] · v[s][..64]` for four queries (a head
/// of 64 dimensions), into `out` rows `out_stride` apart (`qn` of them).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn values64_avx512(pw: &[f32], v: &[f32], out: &mut [f32], out_stride: usize, qn: usize) {
    use std::arch::x86_64::*;
    let mut acc = [[_mm512_setzero_ps(); 4]; 4];
    for (s, ps) in pw.chunks_exact(4).enumerate() {
        let vp = v.as_ptr().add(s * 64);
        let vr = [
            _mm512_loadu_ps(vp),
            _mm512_loadu_ps(vp.add(16)),
            _mm512_loadu_ps(vp.add(32)),
            _mm512_loadu_ps(vp.add(48)),
        ];
        for (a, p) in acc.iter_mut().zip(ps) {
            let pb = _mm512_set1_ps(*p);
            for (x, vv) in a.iter_mut().zip(&vr) {
                *x = _mm512_fmadd_ps(pb, *vv, *x);
            }
        }
    }
    for (j, a) in acc.iter().enumerate().take(qn) {
        for (c, x) in a.iter().enumerate() {
            _mm512_storeu_ps(out.as_mut_ptr().add(j * out_stride + c * 16), *x);
        }
    }
}

/// As [`values64_avx512`] with AVX2 (two passes of 32 dimensions).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn values64_avx2(pw: &[f32], v: &[f32], out: &mut [f32], out_stride: usize, qn: usize) {
    use std::arch::x86_64::*;
    for half in [0, 32] {
        let mut acc = [[_mm256_setzero_ps(); 4]; 4];
        for (s, ps) in pw.chunks_exact(4).enumerate() {
            let vp = v.as_ptr().add(s * 64 + half);
            let vr = [
                _mm256_loadu_ps(vp),
                _mm256_loadu_ps(vp.add(8)),
                _mm256_loadu_ps(vp.add(16)),
                _mm256_loadu_ps(vp.add(24)),
            ];
            for (a, p) in acc.iter_mut().zip(ps) {
                let pb = _mm256_set1_ps(*p);
                for (x, vv) in a.iter_mut().zip(&vr) {
                    *x = _mm256_fmadd_ps(pb, *vv, *x);
                }
            }
        }
        for (j, a) in acc.iter().enumerate().take(qn) {
            for (c, x) in a.iter().enumerate() {
                _mm256_storeu_ps(out.as_mut_ptr().add(j * out_stride + half + c * 8), *x);
            }
        }
    }
}

/// `NC` chunks of eight dimensions from `d0` of the weighted values of four
/// queries (any head size that is a multiple of eight).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn values8_avx2<const NC: usize>(
    pw: &[f32],
    v: &[f32],
    hd: usize,
    d0: usize,
    out: &mut [f32],
    out_stride: usize,
    qn: usize,
) {
    use std::arch::x86_64::*;
    let mut acc = [[_mm256_setzero_ps(); NC]; 4];
    for (s, ps) in pw.chunks_exact(4).enumerate() {
        let vp = v.as_ptr().add(s * hd + d0);
        let mut vr = [_mm256_setzero_ps(); NC];
        for (c, x) in vr.iter_mut().enumerate() {
            *x = _mm256_loadu_ps(vp.add(c * 8));
        }
        for (a, p) in acc.iter_mut().zip(ps) {
            let pb = _mm256_set1_ps(*p);
            for (x, vv) in a.iter_mut().zip(&vr) {
                *x = _mm256_fmadd_ps(pb, *vv, *x);
            }
        }
    }
    for (j, a) in acc.iter().enumerate().take(qn) {
        for (c, x) in a.iter().enumerate() {
            _mm256_storeu_ps(out.as_mut_ptr().add(j * out_stride + d0 + c * 8), *x);
        }
    }
}

/// The weighted values for head sizes that are a multiple of eight,
/// 32 dimensions at a time.
#[cfg(target_arch = "x86_64")]
fn values_any(pw: &[f32], v: &[f32], hd: usize, out: &mut [f32], out_stride: usize, qn: usize) {
    let mut d0 = 0;
    while d0 < hd {
        let left = (hd - d0) / 8;
        // SAFETY: called only when the CPU has AVX2 and FMA; `v` holds rows
        // of `hd` values and `out` `qn` rows `out_stride` apart.
        unsafe {
            match left {
                4.. => values8_avx2::<4>(pw, v, hd, d0, out, out_stride, qn),
                2 | 3 => values8_avx2::<2>(pw, v, hd, d0, out, out_stride, qn),
                _ => values8_avx2::<1>(pw, v, hd, d0, out, out_stride, qn),
            }
        }
        d0 += match left {
            4.. => 32,
            2 | 3 => 16,
            _ => 8,
        };
    }
}

#[allow(clippy::too_many_arguments)]
fn block(
    kv: &HeadKv,
    q: &[f32],
    q_stride: usize,
    n_q: usize,
    scale: f32,
    out: &mut [f32],
    out_stride: usize,
    scratch: &mut Vec<f32>,
) {
    let (hd, n, np) = (kv.hd, kv.n, kv.n_pad);
    scratch.clear();
    scratch.resize(8 * np, 0.0);
    // Scores, eight queries × sixteen keys at a time.
    let mut qs = [[0f32; 8]; 256];
    let hd_tiles = hd.min(256);
    for (d, row) in qs.iter_mut().enumerate().take(hd_tiles) {
        for (i, x) in row.iter_mut().enumerate().take(n_q) {
            *x = q[i * q_stride + d] * scale;
        }
    }
    let level = simd_level();
    for kb in (0..np).step_by(16) {
        #[cfg(target_arch = "x86_64")]
        {
            match level {
                // SAFETY: the CPU has the features (simd_level); `kt` holds
                // `hd` rows of `np` values and `scratch` eight rows of `np`.
                SimdLevel::Avx2Vnni => {
                    unsafe { scores16_avx512(&qs[..hd_tiles], &kv.kt, np, kb, scratch) };
                    continue;
                }
                SimdLevel::Avx2 => {
                    unsafe { scores16_avx2(&qs[..hd_tiles], &kv.kt, np, kb, scratch) };
                    continue;
                }
                SimdLevel::Scalar => {}
            }
        }
        let mut acc = [[0f32; 16]; 8];
        for (d, qd) in qs.iter().enumerate().take(hd_tiles) {
            let kr: &[f32; 16] = kv.kt[d * np + kb..d * np + kb + 16]
                .try_into()
                .unwrap_or(&[0.0; 16]);
            for (a, qv) in acc.iter_mut().zip(qd) {
                for (x, k) in a.iter_mut().zip(kr) {
                    *x = qv.mul_add(*k, *x);
                }
            }
        }
        for (i, a) in acc.iter().enumerate().take(n_q) {
            scratch[i * np + kb..i * np + kb + 16].copy_from_slice(a);
        }
    }
    // Softmax over the real keys of each row (a vectorized exponential),
    // the weights then laid out key-major, four queries side by side.
    let mut p4 = vec![0f32; 2 * 4 * n];
    for i in 0..n_q {
        let row = &mut scratch[i * np..i * np + n];
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut e = vec![0f32; n];
        let sum = crate::ops::exp_weights(row, max, 1.0, &mut e);
        let inv = 1.0 / sum;
        let (half, j) = (i / 4, i % 4);
        for (s, x) in e.iter().enumerate() {
            p4[half * 4 * n + s * 4 + j] = x * inv;
        }
    }
    // Weighted values, four queries × sixteen dimensions at a time.
    for i0 in (0..n_q).step_by(4) {
        let qn = (n_q - i0).min(4);
        let pw = &p4[i0 * n..(i0 + 4) * n];
        #[cfg(target_arch = "x86_64")]
        if hd == 64 {
            let o = &mut out[i0 * out_stride..];
            match level {
                // SAFETY: as above; `out` holds `qn` rows of 64 values
                // `out_stride` apart from `o`.
                SimdLevel::Avx2Vnni => {
                    unsafe { values64_avx512(pw, &kv.v, o, out_stride, qn) };
                    continue;
                }
                SimdLevel::Avx2 => {
                    unsafe { values64_avx2(pw, &kv.v, o, out_stride, qn) };
                    continue;
                }
                SimdLevel::Scalar => {}
            }
        }
        #[cfg(target_arch = "x86_64")]
        if hd.is_multiple_of(8) && level != SimdLevel::Scalar {
            values_any(pw, &kv.v, hd, &mut out[i0 * out_stride..], out_stride, qn);
            continue;
        }
        for d0 in (0..hd).step_by(16) {
            let dn = (hd - d0).min(16);
            let mut acc = [[0f32; 16]; 4];
            if dn == 16 {
                for (s, ps) in pw.chunks_exact(4).enumerate() {
                    let vr: &[f32; 16] = kv.v[s * hd + d0..s * hd + d0 + 16]
                        .try_into()
                        .unwrap_or(&[0.0; 16]);
                    for (a, p) in acc.iter_mut().zip(ps) {
                        for (x, v) in a.iter_mut().zip(vr) {
                            *x = p.mul_add(*v, *x);
                        }
                    }
                }
            } else {
                for (s, ps) in pw.chunks_exact(4).enumerate() {
                    let vr = &kv.v[s * hd + d0..s * hd + d0 + dn];
                    for (a, p) in acc.iter_mut().zip(ps) {
                        for (x, v) in a.iter_mut().zip(vr) {
                            *x = p.mul_add(*v, *x);
                        }
                    }
                }
            }
            for (j, a) in acc.iter().enumerate().take(qn) {
                let o = (i0 + j) * out_stride + d0;
                out[o..o + dn].copy_from_slice(&a[..dn]);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_the_plain_formula() {
        for (n, hd) in [
            (37, 24),
            (50, 64),
            (3, 64),
            (41, 40),
            (20, 80),
            (9, 160),
            (5, 20),
        ] {
            check(n, hd);
        }
    }

    fn check(n: usize, hd: usize) {
        let heads = 2;
        let stride = hd * heads;
        let val = |i: usize| ((i * 7919 % 1000) as f32 / 500.0) - 1.0;
        let k: Vec<f32> = (0..n * stride).map(val).collect();
        let v: Vec<f32> = (0..n * stride).map(|i| val(i + 13)).collect();
        let q: Vec<f32> = (0..5 * stride).map(|i| val(i + 101)).collect();
        let scale = 0.3;
        let mut scratch = Vec::new();
        for h in 0..heads {
            let kv = HeadKv::new(&k, &v, stride, h * hd, n, hd);
            let mut out = vec![0f32; 5 * stride];
            attend_block(
                &kv,
                &q[h * hd..],
                stride,
                5,
                scale,
                &mut out[h * hd..],
                stride,
                &mut scratch,
            );
            for i in 0..5 {
                let s: Vec<f32> = (0..n)
                    .map(|j| {
                        (0..hd)
                            .map(|d| q[i * stride + h * hd + d] * k[j * stride + h * hd + d])
                            .sum::<f32>()
                            * scale
                    })
                    .collect();
                let m = s.iter().copied().fold(f32::MIN, f32::max);
                let e: Vec<f32> = s.iter().map(|x| (x - m).exp()).collect();
                let z: f32 = e.iter().sum();
                for d in 0..hd {
                    let want: f32 = (0..n).map(|j| e[j] / z * v[j * stride + h * hd + d]).sum();
                    let got = out[i * stride + h * hd + d];
                    assert!(
                        (want - got).abs() < 1e-5,
                        "head {h} query {i} dim {d}: {got} vs {want}"
                    );
                }
            }
        }
    }
}
