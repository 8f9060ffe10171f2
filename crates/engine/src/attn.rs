//! Causal attention over the quantized KV cache ([`crate::kv`]), one job
//! per (sequence, KV head, block of up to [`ATTN_TB`] query tokens).
//!
//! Queries are quantized per row like keys (16-bit integers in a 12-bit
//! range), so a query·key product is an exact integer sum: `vpdpwssd` with
//! AVX-512 VNNI, `vpmaddwd` with AVX2, plain `i32` arithmetic otherwise.
//! Softmax weights stay unnormalized (`e^{(s − max)·scale}`, the sum
//! applied to the output at the end, as flash attention does); each block
//! of [`KV_BLOCK`] keys then has its weights times the values' row scales
//! quantized to 7 bits (0..=127) with one scale per (query, block), and
//! the weighted sum of the 8-bit values is again an exact integer sum
//! (`vpdpbusd`, or `vpmaddubsw` — 127·127·2 fits in i16 — with AVX2).
//!
//! Every float step is the same plain code at every SIMD level, and every
//! index that decides an order is an absolute position: a score is the
//! exact sum over the head's dimensions, the softmax's partial sums take
//! key `p` into sum `p % 16`, blocks are aligned to multiples of
//! [`KV_BLOCK`] and added in order, and keys a query does not see weigh
//! exact zeros. So a token's output depends neither on the other tokens of
//! its job (a prompt's block of queries or a single decode step) nor on
//! the SIMD level.

use crate::kv::{key_limit, quantize_row, KeyBlock, KvCache, ValBlock, KV_BLOCK};
use hanlin_kernels::pool::SendPtr;

/// Query tokens per attention job.
pub(crate) const ATTN_TB: usize = 8;

/// Which kernels a job runs.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Level {
    Portable,
    Avx2,
    /// AVX-512 F/BW/VL with VNNI.
    Vnni,
}

impl Level {
    pub(crate) fn detect() -> Self {
        #[cfg(target_arch = "x86_64")]
        {
            use hanlin_kernels::dot::{simd_level, SimdLevel};
            match simd_level() {
                SimdLevel::Avx2Vnni => Level::Vnni,
                SimdLevel::Avx2 => Level::Avx2,
                SimdLevel::Scalar => Level::Portable,
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        Level::Portable
    }
}

/// One layer's attention over a batch of query tokens of one sequence.
pub(crate) struct Attend<'a> {
    pub hd: usize,
    pub nh: usize,
    pub group: usize,
    pub scale: f32,
    pub window: Option<usize>,
    pub li: usize,
    pub cache: &'a KvCache,
    /// The sequence's query rows (`nh · hd` each).
    pub q: &'a [f32],
    /// Position of the first query token.
    pub p0: usize,
    pub t_n: usize,
    /// Where the first query token's output row starts (rows of `nh · hd`).
    pub out: SendPtr,
}

/// Per-thread buffers, kept between jobs and steps.
#[derive(Default)]
pub(crate) struct Scratch {
    q: Vec<i16>,
    qs: Vec<f32>,
    /// Scores: a row per query, a column per key of the job's blocks.
    s: Vec<f32>,
    /// Quantized weights, laid out as `s`.
    u: Vec<u8>,
    /// Scale of each (query, block) of `u`.
    us: Vec<f32>,
    inv: Vec<f32>,
    /// The values' scales of the job's keys.
    vs: Vec<f32>,
    o: Vec<f32>,
}

thread_local! {
    pub(crate) static SCRATCH: std::cell::RefCell<Scratch> = std::cell::RefCell::default();
}

impl Attend<'_> {
    /// Keys/values head `kvh` against query tokens `blk·TB..` of every
    /// head of its group.
    pub(crate) fn run(&self, level: Level, kvh: usize, blk: usize, sc: &mut Scratch) {
        match level {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: AVX-512 F/BW/VL/VNNI, AVX2 and FMA were detected at run time.
            Level::Vnni => unsafe { self.job_vnni(kvh, blk, sc) },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: AVX2 and FMA were detected at run time.
            Level::Avx2 => unsafe { self.job_avx2(kvh, blk, sc) },
            _ => self.job::<0>(kvh, blk, sc),
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma")]
    unsafe fn job_vnni(&self, kvh: usize, blk: usize, sc: &mut Scratch) {
        self.job::<2>(kvh, blk, sc)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn job_avx2(&self, kvh: usize, blk: usize, sc: &mut Scratch) {
        self.job::<1>(kvh, blk, sc)
    }

    /// `L`: 0 portable, 1 AVX2 (inside [`Self::job_avx2`]), 2 AVX-512 VNNI
    /// (inside [`Self::job_vnni`]).
    #[inline(always)]
    fn job<const L: u8>(&self, kvh: usize, blk: usize, sc: &mut Scratch) {
        let (hd, nh, group) = (self.hd, self.nh, self.group);
        let t0 = blk * ATTN_TB;
        let tb = ATTN_TB.min(self.t_n - t0);
        let nq = tb * group;
        let last = self.p0 + t0 + tb - 1;
        // Each query row's keys: positions from..=pos.
        let seen = |r: usize| {
            let pos = self.p0 + t0 + r / group;
            let from = self
                .window
                .map(|w| (pos + 1).saturating_sub(w))
                .unwrap_or(0);
            (from, pos)
        };
        let b0 = seen(0).0 / KV_BLOCK;
        let nb = last / KV_BLOCK + 1 - b0;
        let span = nb * KV_BLOCK;
        let p_start = b0 * KV_BLOCK;

        // Queries, quantized per row like the keys.
        let lim = key_limit(hd);
        sc.q.resize(nq * hd, 0);
        sc.qs.resize(nq, 0.0);
        for r in 0..nq {
            let (t, g) = (r / group, r % group);
            let src = &self.q[(t0 + t) * nh * hd + (kvh * group + g) * hd..][..hd];
            sc.qs[r] = quantize_row(src, lim, &mut sc.q[r * hd..(r + 1) * hd]);
        }

        // Scores: exact integer products, then one scale per (query, key).
        sc.s.resize(nq * span, 0.0);
        let rt = if L == 2 { 8 } else { 4 };
        for b in 0..nb {
            let kb = self.cache.key_block(self.li, b0 + b, kvh);
            for r0 in (0..nq).step_by(rt) {
                let rows: [usize; 8] = std::array::from_fn(|i| (r0 + i).min(nq - 1));
                let out = Scores {
                    s: &mut sc.s,
                    span,
                    col: b * KV_BLOCK,
                };
                qk::<L>(&sc.q, &sc.qs, &rows[..rt], hd, &kb, out);
            }
        }

        // Softmax weights (unnormalized) and, block by block, the weights
        // times the values' scales, quantized: one pass over each row.
        sc.vs.resize(span, 0.0);
        for b in 0..nb {
            let vb = self.cache.val_block(self.li, b0 + b, kvh);
            sc.vs[b * KV_BLOCK..(b + 1) * KV_BLOCK].copy_from_slice(vb.scale);
        }
        sc.u.resize(nq * span, 0);
        sc.us.resize(nq * nb, 0.0);
        sc.inv.resize(nq, 0.0);
        let k = self.scale * std::f32::consts::LOG2_E;
        for r in 0..nq {
            let (from, pos) = seen(r);
            let (a, e) = (from - p_start, pos + 1 - p_start);
            let row = &sc.s[r * span..][..span];
            let mx = max16(&row[a..e]);
            let mut part = [0f32; 16];
            for b in 0..nb {
                let i0 = b * KV_BLOCK;
                let mut wv = [0f32; KV_BLOCK];
                if i0 + KV_BLOCK <= a || i0 >= e {
                    // No key of the block is seen.
                    sc.u[r * span + i0..][..KV_BLOCK].fill(0);
                    sc.us[r * nb + b] = 0.0;
                    continue;
                }
                let whole = i0 >= a && i0 + KV_BLOCK <= e;
                let mut mv = [0f32; 16];
                for h in (0..KV_BLOCK).step_by(16) {
                    let xs = &row[i0 + h..i0 + h + 16];
                    let vs = &sc.vs[i0 + h..i0 + h + 16];
                    let ws = &mut wv[h..h + 16];
                    if whole {
                        for l in 0..16 {
                            let w = exp2_nonpositive((xs[l] - mx) * k);
                            part[l] += w;
                            ws[l] = w * vs[l];
                            mv[l] = if ws[l] > mv[l] { ws[l] } else { mv[l] };
                        }
                    } else {
                        for l in 0..16 {
                            let i = i0 + h + l;
                            let w = exp2_nonpositive((xs[l] - mx) * k);
                            let w = if i >= a && i < e { w } else { 0.0 };
                            part[l] += w;
                            ws[l] = w * vs[l];
                            mv[l] = if ws[l] > mv[l] { ws[l] } else { mv[l] };
                        }
                    }
                }
                let m = max16(&mv);
                let u = &mut sc.u[r * span + i0..][..KV_BLOCK];
                if m > 0.0 && m.is_finite() {
                    // Rounded to the nearest integer, ties to even, by
                    // adding 1.5·2²³: the integer lands in the low bits.
                    const MAGIC: f32 = 12_582_912.0;
                    let ip = 127.0 / m;
                    for (u, &w) in u.iter_mut().zip(&wv) {
                        *u = ((w * ip).clamp(0.0, 127.0) + MAGIC).to_bits() as u8;
                    }
                    sc.us[r * nb + b] = m / 127.0;
                } else {
                    u.fill(0);
                    sc.us[r * nb + b] = 0.0;
                }
            }
            sc.inv[r] = 1.0 / part.iter().sum::<f32>();
        }

        // Weighted values: exact integer sums per block, added in block order.
        // Room for a last tile of four rows past the queries.
        sc.o.clear();
        sc.o.resize((nq + 3) * hd, 0.0);
        let kvd = self.hd * self.nh / self.group;
        for b in 0..nb {
            let vb = self.cache.val_block(self.li, b0 + b, kvh);
            for r0 in (0..nq).step_by(4) {
                let rows: [usize; 4] = std::array::from_fn(|i| (r0 + i).min(nq - 1));
                let ws = rows.map(|r| sc.us[r * nb + b]);
                if ws.iter().all(|&w| w == 0.0) {
                    continue;
                }
                let us: [&[u8]; 4] = rows.map(|r| &sc.u[r * span + b * KV_BLOCK..][..KV_BLOCK]);
                let o = &mut sc.o[r0 * hd..(r0 + 4) * hd];
                pv::<L>(us, ws, &vb, kvd, hd, o);
            }
        }
        for r in 0..nq {
            let (t, g) = (r / group, r % group);
            // SAFETY: each (token, head) output row belongs to exactly one job.
            let out = unsafe {
                self.out
                    .slice((t0 + t) * nh * hd + (kvh * group + g) * hd, hd)
            };
            let inv = sc.inv[r];
            for (o, &x) in out.iter_mut().zip(&sc.o[r * hd..(r + 1) * hd]) {
                *o = x * inv;
            }
        }
    }
}

/// The largest value of `x` (−∞ if empty), sixteen lanes at a time so the
/// loop vectorizes (a maximum does not depend on the order).
#[inline(always)]
fn max16(x: &[f32]) -> f32 {
    let mut m = [f32::NEG_INFINITY; 16];
    let mut chunks = x.chunks_exact(16);
    for c in &mut chunks {
        for (m, &v) in m.iter_mut().zip(c) {
            *m = if v > *m { v } else { *m };
        }
    }
    for (m, &v) in m.iter_mut().zip(chunks.remainder()) {
        *m = if v > *m { v } else { *m };
    }
    let mut w = 16;
    while w > 1 {
        w /= 2;
        for i in 0..w {
            m[i] = if m[i + w] > m[i] { m[i + w] } else { m[i] };
        }
    }
    m[0]
}

/// `2^t` for `t <= 0` (about 4·10⁻⁵ relative error; `2^-126` below −126):
/// the attention weights, quantized to seven bits per block afterwards,
/// need no more. Plain arithmetic, so loops of it vectorize.
#[inline(always)]
fn exp2_nonpositive(t: f32) -> f32 {
    // 1.5 × 2^23: adding it rounds to an integer, held in the low mantissa bits.
    const MAGIC: f32 = 12_582_912.0;
    let t = t.max(-126.0);
    let r = t + MAGIC;
    let n = r - MAGIC;
    let f = t - n;
    // e^(f·ln 2), Taylor to the fourth power, for |f| <= 1/2.
    let mut p = 9.618_129e-3;
    p = p * f + 5.550_411e-2;
    p = p * f + 2.402_265e-1;
    p = p * f + 6.931_472e-1;
    p = p * f + 1.0;
    let ni = (r.to_bits() as i32).wrapping_sub(MAGIC.to_bits() as i32);
    p * f32::from_bits(((ni + 127) << 23) as u32)
}

/// Where [`qk`] writes: row `r`'s scores of the block at `s[r·span + col..]`.
struct Scores<'a> {
    s: &'a mut [f32],
    span: usize,
    col: usize,
}

/// Scores of query rows `rows` against a block's keys:
/// `(Σ_d q[r][d] · k[d][j]) · (qs[r] · kscale[j])`, the sum exact in i32.
/// Rows may repeat (a short last tile): they get the same values.
#[inline(always)]
fn qk<const L: u8>(q: &[i16], qs: &[f32], rows: &[usize], hd: usize, kb: &KeyBlock, out: Scores) {
    let Scores { s, span, col } = out;
    let (keys, ks) = (kb.keys, kb.scale);
    assert!(
        rows.len() <= 8
            && rows
                .iter()
                .all(|&r| (r + 1) * hd <= q.len() && r < qs.len())
            && rows.iter().all(|&r| r * span + col + KV_BLOCK <= s.len())
            && keys.len() >= hd * KV_BLOCK
            && ks.len() >= KV_BLOCK
            && hd.is_multiple_of(2)
    );
    #[cfg(target_arch = "x86_64")]
    if L == 2 && rows.len() == 8 {
        // SAFETY: in bounds (asserted above); AVX-512 VNNI is enabled in
        // the function this is inlined into (`L == 2`).
        unsafe {
            use std::arch::x86_64::*;
            let mut acc = [[_mm512_setzero_si512(); 2]; 8];
            let kp = keys.as_ptr();
            for dp in 0..hd / 2 {
                let k0 = _mm512_loadu_si512(kp.add(dp * 64) as *const _);
                let k1 = _mm512_loadu_si512(kp.add(dp * 64 + 32) as *const _);
                for (a, &r) in acc.iter_mut().zip(rows) {
                    let qb = _mm512_set1_epi32(
                        (q.as_ptr().add(r * hd + 2 * dp) as *const i32).read_unaligned(),
                    );
                    a[0] = _mm512_dpwssd_epi32(a[0], k0, qb);
                    a[1] = _mm512_dpwssd_epi32(a[1], k1, qb);
                }
            }
            let k0 = _mm512_loadu_ps(ks.as_ptr());
            let k1 = _mm512_loadu_ps(ks.as_ptr().add(16));
            for (a, &r) in acc.iter().zip(rows) {
                let sq = _mm512_set1_ps(*qs.get_unchecked(r));
                let o = s.as_mut_ptr().add(r * span + col);
                _mm512_storeu_ps(
                    o,
                    _mm512_mul_ps(_mm512_cvtepi32_ps(a[0]), _mm512_mul_ps(sq, k0)),
                );
                _mm512_storeu_ps(
                    o.add(16),
                    _mm512_mul_ps(_mm512_cvtepi32_ps(a[1]), _mm512_mul_ps(sq, k1)),
                );
            }
            return;
        }
    }
    #[cfg(target_arch = "x86_64")]
    if L >= 1 && rows.len() == 4 {
        // SAFETY: in bounds (asserted above); AVX2 is enabled in the
        // function this is inlined into (`L >= 1`).
        unsafe {
            use std::arch::x86_64::*;
            let kp = keys.as_ptr();
            for half in [0, 16] {
                let mut acc = [[_mm256_setzero_si256(); 2]; 4];
                for dp in 0..hd / 2 {
                    let k0 = _mm256_loadu_si256(kp.add(dp * 64 + half * 2) as *const _);
                    let k1 = _mm256_loadu_si256(kp.add(dp * 64 + half * 2 + 16) as *const _);
                    for (a, &r) in acc.iter_mut().zip(rows) {
                        let qb = _mm256_set1_epi32(
                            (q.as_ptr().add(r * hd + 2 * dp) as *const i32).read_unaligned(),
                        );
                        a[0] = _mm256_add_epi32(a[0], _mm256_madd_epi16(k0, qb));
                        a[1] = _mm256_add_epi32(a[1], _mm256_madd_epi16(k1, qb));
                    }
                }
                let k0 = _mm256_loadu_ps(ks.as_ptr().add(half));
                let k1 = _mm256_loadu_ps(ks.as_ptr().add(half + 8));
                for (a, &r) in acc.iter().zip(rows) {
                    let sq = _mm256_set1_ps(*qs.get_unchecked(r));
                    let o = s.as_mut_ptr().add(r * span + col + half);
                    _mm256_storeu_ps(
                        o,
                        _mm256_mul_ps(_mm256_cvtepi32_ps(a[0]), _mm256_mul_ps(sq, k0)),
                    );
                    _mm256_storeu_ps(
                        o.add(8),
                        _mm256_mul_ps(_mm256_cvtepi32_ps(a[1]), _mm256_mul_ps(sq, k1)),
                    );
                }
            }
            return;
        }
    }
    for &r in rows {
        let qr = &q[r * hd..(r + 1) * hd];
        let mut acc = [0i32; KV_BLOCK];
        for (dp, pair) in qr.chunks_exact(2).enumerate() {
            let k = &keys[dp * 2 * KV_BLOCK..(dp + 1) * 2 * KV_BLOCK];
            for (a, kk) in acc.iter_mut().zip(k.chunks_exact(2)) {
                *a += pair[0] as i32 * kk[0] as i32 + pair[1] as i32 * kk[1] as i32;
            }
        }
        let o = &mut s[r * span + col..][..KV_BLOCK];
        for ((o, &a), &k) in o.iter_mut().zip(&acc).zip(ks) {
            *o = a as f32 * (qs[r] * k);
        }
    }
}

/// The weighted values of a block for up to four query rows:
/// `o[i][d] += ws[i] · Σ_j u[i][j] · v[j][d]`, the sum exact in i32, for
/// the four rows of `o` (`hd` values each).
#[inline(always)]
fn pv<const L: u8>(
    u: [&[u8]; 4],
    ws: [f32; 4],
    vb: &ValBlock,
    kvd: usize,
    hd: usize,
    o: &mut [f32],
) {
    let (vals, at) = (vb.vals, vb.at);
    assert!(
        u.iter().all(|x| x.len() >= KV_BLOCK)
            && at + hd <= kvd
            && vals.len() >= KV_BLOCK * kvd
            && o.len() == 4 * hd
    );
    #[cfg(target_arch = "x86_64")]
    if L == 2 && hd.is_multiple_of(16) {
        // SAFETY: in bounds (asserted above); AVX-512 VNNI is enabled in
        // the function this is inlined into (`L == 2`).
        unsafe {
            let mut d0 = 0;
            while d0 < hd {
                let at = at + d0;
                d0 += 16
                    * match (hd - d0) / 16 {
                        1 => pv_zmm::<1>(u, ws, vals, at, kvd, hd, &mut o[d0..]),
                        2 => pv_zmm::<2>(u, ws, vals, at, kvd, hd, &mut o[d0..]),
                        3 => pv_zmm::<3>(u, ws, vals, at, kvd, hd, &mut o[d0..]),
                        _ => pv_zmm::<4>(u, ws, vals, at, kvd, hd, &mut o[d0..]),
                    };
            }
            return;
        }
    }
    #[cfg(target_arch = "x86_64")]
    if L >= 1 && hd.is_multiple_of(16) {
        // SAFETY: in bounds (asserted above: dimension `at + d0 + 15` of
        // key quad `jq < KV_BLOCK/4` lies within `vals`); AVX2 is enabled
        // in the function this is inlined into (`L >= 1`).
        unsafe {
            use std::arch::x86_64::*;
            let ones = _mm256_set1_epi16(1);
            for d0 in (0..hd).step_by(16) {
                let mut acc = [[_mm256_setzero_si256(); 2]; 4];
                for jq in 0..KV_BLOCK / 4 {
                    let vp = vals.as_ptr().add((jq * kvd + at + d0) * 4);
                    let v0 = _mm256_loadu_si256(vp as *const _);
                    let v1 = _mm256_loadu_si256(vp.add(32) as *const _);
                    for (a, ur) in acc.iter_mut().zip(&u) {
                        let ub = _mm256_set1_epi32(word(ur, jq));
                        // Weights are at most 127: pairs sum within i16.
                        let p0 = _mm256_madd_epi16(_mm256_maddubs_epi16(ub, v0), ones);
                        let p1 = _mm256_madd_epi16(_mm256_maddubs_epi16(ub, v1), ones);
                        a[0] = _mm256_add_epi32(a[0], p0);
                        a[1] = _mm256_add_epi32(a[1], p1);
                    }
                }
                for (i, (a, &w)) in acc.iter().zip(&ws).enumerate() {
                    let op = o.as_mut_ptr().add(i * hd + d0);
                    let w = _mm256_set1_ps(w);
                    for (c, x) in a.iter().enumerate() {
                        let add = _mm256_mul_ps(w, _mm256_cvtepi32_ps(*x));
                        _mm256_storeu_ps(
                            op.add(c * 8),
                            _mm256_add_ps(_mm256_loadu_ps(op.add(c * 8)), add),
                        );
                    }
                }
            }
            return;
        }
    }
    for (i, (ur, &w)) in u.iter().zip(&ws).enumerate() {
        let mut acc = vec![0i32; hd];
        for (j, &x) in ur[..KV_BLOCK].iter().enumerate() {
            let base = ((j / 4) * kvd + at) * 4 + j % 4;
            for (d, a) in acc.iter_mut().enumerate() {
                *a += x as i32 * vals[base + d * 4] as i32;
            }
        }
        for (o, &a) in o[i * hd..(i + 1) * hd].iter_mut().zip(&acc) {
            *o += w * a as f32;
        }
    }
}

/// Four key positions' weights of a row as one 32-bit word.
///
/// # Safety
/// `x` holds at least `jq·4 + 4` bytes.
#[inline(always)]
unsafe fn word(x: &[u8], jq: usize) -> i32 {
    (x.as_ptr().add(jq * 4) as *const i32).read_unaligned()
}

/// [`pv`]'s AVX-512 tile: `NC` chunks of sixteen dimensions from `at`,
/// added to the four rows of `o` (`hd` apart); returns `NC`.
///
/// # Safety
/// AVX-512 VNNI; the bounds [`pv`] asserts, with `at + NC·16` dimensions
/// within the layer's values and `NC·16` within each row of `o`.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn pv_zmm<const NC: usize>(
    u: [&[u8]; 4],
    ws: [f32; 4],
    vals: &[i8],
    at: usize,
    kvd: usize,
    hd: usize,
    o: &mut [f32],
) -> usize {
    use std::arch::x86_64::*;
    debug_assert!(o.len() >= 3 * hd + NC * 16);
    let mut acc = [[_mm512_setzero_si512(); NC]; 4];
    for jq in 0..KV_BLOCK / 4 {
        let vp = vals.as_ptr().add((jq * kvd + at) * 4);
        let mut v = [_mm512_setzero_si512(); NC];
        for (c, x) in v.iter_mut().enumerate() {
            *x = _mm512_loadu_si512(vp.add(c * 64) as *const _);
        }
        for (a, ur) in acc.iter_mut().zip(&u) {
            let ub = _mm512_set1_epi32(word(ur, jq));
            for (x, vv) in a.iter_mut().zip(&v) {
                *x = _mm512_dpbusd_epi32(*x, ub, *vv);
            }
        }
    }
    for (i, (a, &w)) in acc.iter().zip(&ws).enumerate() {
        let op = o.as_mut_ptr().add(i * hd);
        let w = _mm512_set1_ps(w);
        for (c, x) in a.iter().enumerate() {
            let add = _mm512_mul_ps(w, _mm512_cvtepi32_ps(*x));
            _mm512_storeu_ps(
                op.add(c * 16),
                _mm512_add_ps(_mm512_loadu_ps(op.add(c * 16)), add),
            );
        }
    }
    NC
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv::KvShape;
    use rand::{Rng, SeedableRng};

    /// Attention of `t_n` query tokens from `p0` over a cache of random
    /// keys (one dimension with a large offset, as Qwen's key bias gives)
    /// and values, at one level: the output rows and the f64 reference
    /// computed from the unquantized keys and values.
    fn run(
        level: Level,
        hd: usize,
        window: Option<usize>,
        p0: usize,
        t_n: usize,
    ) -> (Vec<f32>, Vec<f64>) {
        let (n_kv, group) = (2, 3);
        let nh = n_kv * group;
        let kvd = n_kv * hd;
        let n = p0 + t_n;
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(hd as u64);
        let mut gen = |len: usize, bias: bool| -> Vec<f32> {
            (0..len)
                .map(|i| {
                    rng.random_range(-1.0..1.0f32) + if bias && i % hd == 5 { 12.0 } else { 0.0 }
                })
                .collect()
        };
        let k = gen(n * kvd, true);
        let v = gen(n * kvd, false);
        let q = gen(t_n * nh * hd, true);
        let shape = KvShape {
            n_layer: 1,
            n_kv,
            head_dim: hd,
        };
        let mut cache = KvCache::new(shape, n);
        cache.append(0, &k, &v);
        cache.commit(n);
        let mut out = vec![0f32; t_n * nh * hd];
        let a = Attend {
            hd,
            nh,
            group,
            scale: 1.0 / (hd as f32).sqrt(),
            window,
            li: 0,
            cache: &cache,
            q: &q,
            p0,
            t_n,
            out: SendPtr(out.as_mut_ptr()),
        };
        let mut sc = Scratch::default();
        for kvh in 0..n_kv {
            for blk in 0..t_n.div_ceil(ATTN_TB) {
                a.run(level, kvh, blk, &mut sc);
            }
        }
        let mut want = vec![0f64; out.len()];
        for t in 0..t_n {
            let pos = p0 + t;
            let from = window.map(|w| (pos + 1).saturating_sub(w)).unwrap_or(0);
            for h in 0..nh {
                let kh = h / group;
                let qr = &q[(t * nh + h) * hd..][..hd];
                let s: Vec<f64> = (from..=pos)
                    .map(|p| {
                        let kr = &k[p * kvd + kh * hd..][..hd];
                        qr.iter()
                            .zip(kr)
                            .map(|(&a, &b)| a as f64 * b as f64)
                            .sum::<f64>()
                            / (hd as f64).sqrt()
                    })
                    .collect();
                let mx = s.iter().cloned().fold(f64::MIN, f64::max);
                let w: Vec<f64> = s.iter().map(|x| (x - mx).exp()).collect();
                let sum: f64 = w.iter().sum();
                for d in 0..hd {
                    want[(t * nh + h) * hd + d] = (from..=pos)
                        .zip(&w)
                        .map(|(p, w)| w / sum * v[p * kvd + kh * hd + d] as f64)
                        .sum();
                }
            }
        }
        (out, want)
    }

    /// Every SIMD level gives the portable kernels' bits, and all are
    /// close to exact attention (keys, queries, weights and values
    /// quantized: within 0.01 of it, values being within ±1; 0.002–0.006
    /// measured).
    #[test]
    fn every_level_gives_the_portable_bits_close_to_exact() {
        let mut levels = vec![Level::Portable];
        #[cfg(target_arch = "x86_64")]
        {
            if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                levels.push(Level::Avx2);
            }
            if is_x86_feature_detected!("avx512f")
                && is_x86_feature_detected!("avx512bw")
                && is_x86_feature_detected!("avx512vl")
                && is_x86_feature_detected!("avx512vnni")
            {
                levels.push(Level::Vnni);
            }
        }
        for (hd, window) in [(64, None), (128, None), (16, Some(40)), (256, Some(70))] {
            let (p0, t_n) = (95, 11);
            let (base, want) = run(Level::Portable, hd, window, p0, t_n);
            let err = base
                .iter()
                .zip(&want)
                .map(|(&a, &b)| (a as f64 - b).abs())
                .fold(0.0, f64::max);
            assert!(
                err < 0.01,
                "hd {hd}: max error {err} against exact attention"
            );
            for &l in &levels[1..] {
                let (got, _) = run(l, hd, window, p0, t_n);
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert!(
                    bits(&got) == bits(&base),
                    "hd {hd}: a SIMD level differs from the portable kernels"
                );
            }
        }
    }

    #[test]
    fn key_sums_fit_in_i32() {
        for hd in [16, 64, 128, 256, 512] {
            let l = key_limit(hd) as i64;
            assert!(hd as i64 * l * l <= i32::MAX as i64, "hd {hd}");
        }
        assert_eq!(
            (key_limit(64), key_limit(128), key_limit(256)),
            (4095, 4095, 2896)
        );
        let mut q = [0i16; 4];
        let s = quantize_row(&[1.0, -0.5, 0.25, 0.0], 4095, &mut q);
        assert_eq!(q, [4095, -2048, 1024, 0], "ties to even: -2047.5 → -2048");
        assert_eq!(s, 1.0 / 4095.0);
        assert_eq!(quantize_row(&[0.0; 3], 127, &mut [0i8; 3]), 0.0);
    }
}
