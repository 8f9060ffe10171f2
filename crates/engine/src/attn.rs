//! Causal attention over the quantized KV cache ([`crate::kv`]), one job
//! per (sequence, KV head, block of up to [`tokens_per_job`] query tokens).
//!
//! Queries are quantized per row like keys (16-bit integers in a 12-bit
//! range), so a query·key product is an exact integer sum: `vpdpwssd` with
//! AVX-512 VNNI, `vpmaddwd` with AVX2, plain `i32` arithmetic otherwise.
//! The keys go by chunks of [`CHUNK`] blocks of [`KV_BLOCK`], so a
//! chunk's scores and weights stay in cache however long the context. As
//! in flash attention, softmax weights stay unnormalized (`e^{(s −
//! m)·scale}`, `m` the row's largest score so far: when a chunk raises it,
//! the row's sum and output so far are scaled down to match; the sum is
//! applied to the output at the end). Each block's weights times the
//! values' row scales are quantized to 7 bits (0..=127) with one scale per
//! (query, block), and the weighted sum of the 8-bit values is again an
//! exact integer sum (`vpdpbusd`, or `vpmaddubsw` — 127·127·2 fits in
//! i16 — with AVX2).
//!
//! A job's query rows (its tokens × the group's heads) sit side by side:
//! the scores, the weights and their quantized form are stored key-major,
//! `[key][row]`, so the softmax runs along the keys with sixteen rows in
//! the vector lanes and never sums or compares across lanes; `vpdpwssd`
//! and `vpmaddwd` compute the scores that way too (a key pair broadcast,
//! query pairs in the lanes).
//!
//! Every float step is the same plain code at every SIMD level, and every
//! index that decides an order is an absolute position: a score is the
//! exact sum over the head's dimensions, the softmax's partial sums take
//! key `p` into sum `p % PARTS`, blocks and chunks are aligned to
//! multiples of [`KV_BLOCK`] and `CHUNK · KV_BLOCK` and taken in order, a
//! row's largest score changes only with the keys it sees, and keys a
//! query does not see weigh exact zeros. So a token's output depends
//! neither on the other tokens of its job (a prompt's block of queries or a
//! single decode step), nor on its lane, nor on the SIMD level.

use crate::kv::{key_limit, quantize_row, KeyBlock, KvCache, ValBlock, KV_BLOCK};
use hanlin_kernels::ops::ROUND_MAGIC;
use hanlin_kernels::pool::SendPtr;

/// Query tokens per attention job: eight, or sixteen where eight tokens'
/// rows (× the group's heads) would leave lanes of the last vector empty
/// (groups of 3, 5, 7 … heads fill them exactly at sixteen).
pub(crate) fn tokens_per_job(group: usize) -> usize {
    if (8 * group).is_multiple_of(LANES) {
        8
    } else {
        16
    }
}

/// Which kernels a job runs.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Level {
    Portable,
    Avx2,
    /// AVX-512 F/BW/VL with VNNI.
    Vnni,
    /// AVX2 with AVX-VNNI (`vpdpwssd`/`vpdpbusd` on 256-bit registers:
    /// Intel's client CPUs since Alder Lake, which lack AVX-512).
    AvxVnni,
}

impl Level {
    pub(crate) fn detect() -> Self {
        #[cfg(target_arch = "x86_64")]
        {
            use hanlin_kernels::dot::{avx_vnni, simd_level, SimdLevel};
            match simd_level() {
                SimdLevel::Avx2Vnni => Level::Vnni,
                SimdLevel::Avx2 if avx_vnni() => Level::AvxVnni,
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
    /// Quantized query rows, `hd` each.
    q: Vec<i16>,
    /// The same as `[hd / 2][rn]` pairs.
    qp: Vec<i32>,
    /// Each row's scale.
    qs: Vec<f32>,
    /// Scores, then weights times the values' scales: `[key][rn]` over
    /// a chunk's blocks.
    s: Vec<f32>,
    /// Quantized weights, four keys to a word: per block, per sixteen rows,
    /// `[KV_BLOCK / 4][16]` (see [`Weights`]).
    u: Vec<u32>,
    /// Scale of each (block, row) of `u`, `[block][rn]` (a chunk's).
    us: Vec<f32>,
    /// One over each row's sum of weights.
    inv: Vec<f32>,
    /// The values' scales of a chunk's keys.
    vs: Vec<f32>,
    o: Vec<f32>,
    /// Keys each lane sees, per sixteen rows (see [`Attend::job`]).
    ae: Vec<([i32; LANES], [i32; LANES])>,
    /// Each row's largest score so far.
    mx: Vec<f32>,
    /// Each sixteen rows' partial sums of weights so far.
    part: Vec<[[f32; LANES]; PARTS]>,
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
            #[cfg(target_arch = "x86_64")]
            // SAFETY: AVX2, FMA and AVX-VNNI were detected at run time.
            Level::AvxVnni => unsafe { self.job_avxvnni(kvh, blk, sc) },
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

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma,avxvnni")]
    unsafe fn job_avxvnni(&self, kvh: usize, blk: usize, sc: &mut Scratch) {
        self.job::<3>(kvh, blk, sc)
    }

    /// `L`: 0 portable, 1 AVX2 (inside [`Self::job_avx2`]), 2 AVX-512 VNNI
    /// (inside [`Self::job_vnni`]), 3 AVX2 with AVX-VNNI (inside
    /// [`Self::job_avxvnni`]).
    ///
    /// The job's query rows (`tb` tokens × `group` heads, padded to a
    /// multiple of [`LANES`] with copies of the last row) sit side by side:
    /// scores, weights and their quantized form are stored key-major,
    /// `[key][row]`, so the softmax runs down each row with the rows in
    /// vector lanes and needs no sum or maximum across lanes.
    #[inline(always)]
    fn job<const L: u8>(&self, kvh: usize, blk: usize, sc: &mut Scratch) {
        let (hd, nh, group) = (self.hd, self.nh, self.group);
        let per = tokens_per_job(group);
        let t0 = blk * per;
        let tb = per.min(self.t_n - t0);
        let nq = tb * group;
        let rn = nq.next_multiple_of(LANES);
        let last = self.p0 + t0 + tb - 1;
        // Each query row's keys: positions from..=pos (padding rows are
        // the last row's).
        let seen = |r: usize| {
            let pos = self.p0 + t0 + r.min(nq - 1) / group;
            let from = self
                .window
                .map(|w| (pos + 1).saturating_sub(w))
                .unwrap_or(0);
            (from, pos)
        };
        let b0 = seen(0).0 / KV_BLOCK;
        let nb = last / KV_BLOCK + 1 - b0;
        let p_start = b0 * KV_BLOCK;
        // The cache's blocks lie apart, so the hardware's prefetchers do
        // not find the next one: the job asks for its keys a few blocks
        // ahead of use, the first ones while it quantizes its queries.
        for b in 0..nb.min(KEYS_AHEAD) {
            self.prefetch_keys(b0 + b, kvh);
        }

        // Queries, quantized per row like the keys, then laid out as
        // `[hd / 2][rn]` pairs (padding rows copy the last row).
        let lim = key_limit(hd);
        let k = self.scale * std::f32::consts::LOG2_E;
        sc.q.resize(nq * hd, 0);
        sc.qs.resize(rn, 0.0);
        for r in 0..nq {
            let (t, g) = (r / group, r % group);
            let src = &self.q[(t0 + t) * nh * hd + (kvh * group + g) * hd..][..hd];
            // The softmax's scale rides on the query's: scores come out in
            // base-2 exponent units.
            sc.qs[r] = quantize_row(src, lim, &mut sc.q[r * hd..(r + 1) * hd]) * k;
        }
        for r in nq..rn {
            sc.qs[r] = sc.qs[nq - 1];
        }
        sc.qp.resize(hd / 2 * rn, 0);
        for dp in 0..hd / 2 {
            for r in 0..rn {
                let q = &sc.q[r.min(nq - 1) * hd + 2 * dp..];
                sc.qp[dp * rn + r] = (q[0] as u16 as u32 | (q[1] as u16 as u32) << 16) as i32;
            }
        }

        // Lane `l` of the rows `c..c + LANES` sees keys `a[l]..e[l]` of the
        // job's span.
        let ng = rn / LANES;
        sc.ae.clear();
        sc.ae.extend((0..rn).step_by(LANES).map(|c| {
            let (mut a, mut e) = ([0i32; LANES], [0i32; LANES]);
            for l in 0..LANES {
                let (from, pos) = seen(c + l);
                (a[l], e[l]) = ((from - p_start) as i32, (pos + 1 - p_start) as i32);
            }
            (a, e)
        }));
        sc.mx.clear();
        sc.mx.resize(rn, f32::NEG_INFINITY);
        sc.part.clear();
        sc.part.resize(ng, [[0.0; LANES]; PARTS]);
        // Weighted values, room for a last tile of four rows past the queries.
        let o_all = aligned(&mut sc.o, (nq + 3) * hd);
        o_all.fill(0.0);
        let kvd = self.hd * self.nh / self.group;

        // The keys go by chunks of [`CHUNK`] blocks, aligned to absolute
        // positions, so a chunk's scores and weights stay in cache: each
        // row's running maximum, sums and output are rescaled when a chunk
        // raises the maximum (flash attention's online softmax).
        for ch in b0 / CHUNK..=(b0 + nb - 1) / CHUNK {
            let bs = (ch * CHUNK).max(b0)..((ch + 1) * CHUNK).min(b0 + nb);
            let cn = bs.len();
            // The chunk's first key in the job's span.
            let off = (bs.start - b0) * KV_BLOCK;

            // Scores: exact integer products times one factor per (row,
            // key), the softmax's scale `k` included.
            let s = aligned(&mut sc.s, CHUNK * KV_BLOCK * rn);
            for (i, b) in bs.clone().enumerate() {
                if b + KEYS_AHEAD < b0 + nb {
                    self.prefetch_keys(b + KEYS_AHEAD, kvh);
                }
                let kb = self.cache.key_block(self.li, b, kvh);
                qk::<L>(
                    &sc.qp,
                    &sc.qs,
                    (nq, rn),
                    hd,
                    &kb,
                    &mut s[i * KV_BLOCK * rn..][..KV_BLOCK * rn],
                );
            }
            sc.vs.resize(CHUNK * KV_BLOCK, 0.0);
            for (i, b) in bs.clone().enumerate() {
                let vb = self.cache.val_block(self.li, b, kvh);
                sc.vs[i * KV_BLOCK..(i + 1) * KV_BLOCK].copy_from_slice(vb.scale);
                // Later chunks' first values were asked for by the chunk
                // before's weighted sums.
                if b < b0 + VALS_AHEAD {
                    prefetch_vals(&vb, self.hd);
                }
            }

            // Softmax weights (unnormalized) and, block by block, the
            // weights times the values' scales, quantized to 0..=127 with
            // one scale per (row, block), four keys to a word as `pv` reads
            // them.
            let uq = aligned(&mut sc.u, CHUNK * KV_BLOCK / 4 * rn);
            sc.us.resize(CHUNK * rn, 0.0);
            for (g, c) in (0..rn).step_by(LANES).enumerate() {
                let (a, e) = &sc.ae[g];
                let (amin, amax) = (min_of(a), max_of(a));
                let (emin, emax) = (min_of(e), max_of(e));
                // Blocks every lane sees whole, and blocks no lane sees at all.
                let whole = |i0: usize| i0 as i32 >= amax && (i0 + KV_BLOCK) as i32 <= emin;
                let none = |i0: usize| (i0 + KV_BLOCK) as i32 <= amin || i0 as i32 >= emax;
                let old: [f32; LANES] = sc.mx[c..c + LANES].try_into().unwrap_or([0.0; LANES]);
                let mut mx = old;
                for i in 0..cn {
                    let i0 = off + i * KV_BLOCK;
                    let block = &s[i * KV_BLOCK * rn..][..KV_BLOCK * rn];
                    if whole(i0) {
                        block_max::<true>(block, rn, c, i0, (a, e), &mut mx);
                    } else if !none(i0) {
                        block_max::<false>(block, rn, c, i0, (a, e), &mut mx);
                    }
                }
                let part = &mut sc.part[g];
                if mx != old {
                    // Weights so far were taken against the old maximum.
                    let alpha: [f32; LANES] = std::array::from_fn(|l| {
                        if mx[l] == old[l] {
                            1.0
                        } else if old[l] == f32::NEG_INFINITY {
                            0.0
                        } else {
                            exp2_nonpositive(old[l] - mx[l])
                        }
                    });
                    for p in part.iter_mut() {
                        for (x, a) in p.iter_mut().zip(&alpha) {
                            *x *= a;
                        }
                    }
                    for (r, &a) in (c..(c + LANES).min(nq)).zip(&alpha) {
                        if a != 1.0 {
                            for x in &mut o_all[r * hd..(r + 1) * hd] {
                                *x *= a;
                            }
                        }
                    }
                    sc.mx[c..c + LANES].copy_from_slice(&mx);
                }
                for i in 0..cn {
                    let i0 = off + i * KV_BLOCK;
                    let u = &mut uq[i * KV_BLOCK / 4 * rn..][..KV_BLOCK / 4 * rn];
                    let us = &mut sc.us[i * rn + c..][..LANES];
                    if none(i0) {
                        u[c * KV_BLOCK / 4..][..KV_BLOCK / 4 * LANES].fill(0);
                        us.fill(0.0);
                        continue;
                    }
                    let mut mv = [0f32; LANES];
                    let block = &mut s[i * KV_BLOCK * rn..][..KV_BLOCK * rn];
                    let vs = &sc.vs[i * KV_BLOCK..(i + 1) * KV_BLOCK];
                    if whole(i0) {
                        weigh::<true>(block, rn, c, (i0, vs), &mx, (a, e), part, &mut mv);
                    } else {
                        weigh::<false>(block, rn, c, (i0, vs), &mx, (a, e), part, &mut mv);
                    }
                    let mut ip = [0f32; LANES];
                    // A lane with no weight (m = 0) or an infinite product
                    // gets zeros (127/∞ is 0, and `quantize_block` turns NaN
                    // into 0); a product so small that 127 over it is
                    // infinite gets the largest finite factor.
                    for l in 0..LANES {
                        let m = mv[l];
                        ip[l] = if m > 0.0 {
                            (127.0 / m).min(f32::MAX)
                        } else {
                            0.0
                        };
                        us[l] = if m < f32::INFINITY { m / 127.0 } else { 0.0 };
                    }
                    quantize_block(block, rn, c, &ip, u);
                }
            }

            // Weighted values: exact integer sums per block, added in
            // block order.
            for (i, b) in bs.enumerate() {
                if b + VALS_AHEAD < b0 + nb {
                    prefetch_vals(&self.cache.val_block(self.li, b + VALS_AHEAD, kvh), hd);
                }
                let vb = self.cache.val_block(self.li, b, kvh);
                let uw = &uq[i * KV_BLOCK / 4 * rn..][..KV_BLOCK / 4 * rn];
                for r0 in (0..nq).step_by(4) {
                    let rows: [usize; 4] = std::array::from_fn(|i| (r0 + i).min(nq - 1));
                    let ws = rows.map(|r| sc.us[i * rn + r]);
                    if ws.iter().all(|&w| w == 0.0) {
                        continue;
                    }
                    let o = &mut o_all[r0 * hd..(r0 + 4) * hd];
                    pv::<L>(Weights { u: uw, rn, rows }, ws, &vb, kvd, hd, o);
                }
            }
        }
        sc.inv.resize(rn, 0.0);
        for (g, c) in (0..rn).step_by(LANES).enumerate() {
            for (l, inv) in sc.inv[c..c + LANES].iter_mut().enumerate() {
                *inv = 1.0 / sc.part[g].iter().map(|p| p[l]).sum::<f32>();
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
            for (o, &x) in out.iter_mut().zip(&o_all[r * hd..(r + 1) * hd]) {
                *o = x * inv;
            }
        }
    }
}

impl Attend<'_> {
    /// Asks for head `kvh`'s keys in block `b` ahead of use.
    #[inline(always)]
    fn prefetch_keys(&self, b: usize, kvh: usize) {
        let kb = self.cache.key_block(self.li, b, kvh);
        prefetch(
            kb.keys.as_ptr() as *const u8,
            std::mem::size_of_val(kb.keys),
        );
    }
}

/// Key blocks a job asks for ahead of the one it scores.
const KEYS_AHEAD: usize = 2;
/// Value blocks a job asks for ahead of the one it weighs.
const VALS_AHEAD: usize = 4;
/// Key blocks whose scores a job holds at once.
const CHUNK: usize = 8;

/// Asks for a block's values of one head (`hd` bytes of each key, four
/// keys interleaved, so `4·hd` bytes per quad of keys) ahead of use.
#[inline(always)]
fn prefetch_vals(vb: &ValBlock, hd: usize) {
    let kvd = vb.vals.len() / KV_BLOCK;
    for jq in 0..KV_BLOCK / 4 {
        prefetch(
            vb.vals[(jq * kvd + vb.at) * 4..].as_ptr() as *const u8,
            4 * hd,
        );
    }
}

/// Asks for the cache lines of `bytes` bytes at `p`.
#[inline(always)]
fn prefetch(p: *const u8, bytes: usize) {
    #[cfg(target_arch = "x86_64")]
    for at in (0..bytes).step_by(64) {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        // SAFETY: a prefetch never faults; SSE is part of x86-64.
        unsafe { _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(at) as *const i8) };
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (p, bytes);
}

/// `len` elements of `v` from a 64-byte boundary (`v` grows to hold
/// them), so a vector of sixteen lanes never straddles two cache lines.
fn aligned<T: Copy + Default>(v: &mut Vec<T>, len: usize) -> &mut [T] {
    let pad = 64 / std::mem::size_of::<T>();
    v.resize(len + pad, T::default());
    let off = v.as_ptr().align_offset(64).min(pad);
    &mut v[off..off + len]
}

/// Rows a softmax pass keeps in vector lanes.
const LANES: usize = 16;

/// Partial sums of each row's weights: key `p` goes into sum `p % PARTS`
/// (an absolute position, so the order does not depend on the job).
const PARTS: usize = 4;

fn min_of(x: &[i32; LANES]) -> i32 {
    x.iter().copied().min().unwrap_or(0)
}

fn max_of(x: &[i32; LANES]) -> i32 {
    x.iter().copied().max().unwrap_or(0)
}

/// The largest score each lane of `c..c + LANES` sees in a block (`block`:
/// `[KV_BLOCK][rn]`, keys from `i0`), folded into `mx`. `ALL`: every lane
/// sees every key; otherwise lane `l` sees `a[l]..e[l]`.
#[inline(always)]
fn block_max<const ALL: bool>(
    block: &[f32],
    rn: usize,
    c: usize,
    i0: usize,
    (a, e): (&[i32; LANES], &[i32; LANES]),
    mx: &mut [f32; LANES],
) {
    // Four running maxima, so the loop is not one chain of dependent
    // steps (a maximum does not depend on the order).
    let mut m4 = [*mx; 4];
    for (jq, quad) in block.chunks_exact(4 * rn).enumerate() {
        for (q, mx) in m4.iter_mut().enumerate() {
            let j = (i0 + jq * 4 + q) as i32;
            let x: &[f32; LANES] = quad[q * rn + c..][..LANES]
                .try_into()
                .unwrap_or(&[0.0; LANES]);
            for l in 0..LANES {
                let see = ALL || (j >= a[l] && j < e[l]);
                let m = if x[l] > mx[l] { x[l] } else { mx[l] };
                mx[l] = if see { m } else { mx[l] };
            }
        }
    }
    for m in &m4 {
        for l in 0..LANES {
            mx[l] = if m[l] > mx[l] { m[l] } else { mx[l] };
        }
    }
}

/// One block's softmax weights for lanes `c..c + LANES`: `block` holds its
/// keys' scores (`[KV_BLOCK][rn]`, keys from `i0`, their values' scales
/// `vs`; a score `s` weighs `2^(s − mx)`, `mx` the lane's largest) and
/// gets each weight times its value's scale in place; the weight
/// of key `p` is added to `part[p % PARTS]` and the largest product of each
/// lane is kept in `mv`. `ALL`: every lane sees every key of the block;
/// otherwise lane `l` sees `a[l]..e[l]` and the others weigh exact zeros.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn weigh<const ALL: bool>(
    block: &mut [f32],
    rn: usize,
    c: usize,
    (i0, vs): (usize, &[f32]),
    mx: &[f32; LANES],
    (a, e): (&[i32; LANES], &[i32; LANES]),
    part: &mut [[f32; LANES]; PARTS],
    mv: &mut [f32; LANES],
) {
    // `i0` is a multiple of `PARTS`, so key `i0 + jj` goes into sum
    // `jj % PARTS`. The sums and maxima stay in registers for the block.
    let (mut sums, mut m) = (*part, *mv);
    for (jq, (quad, vs)) in block
        .chunks_exact_mut(PARTS * rn)
        .zip(vs.chunks_exact(PARTS))
        .enumerate()
    {
        for (q, (sum, &v)) in sums.iter_mut().zip(vs).enumerate() {
            let j = (i0 + jq * PARTS + q) as i32;
            let Ok(x): Result<&mut [f32; LANES], _> = (&mut quad[q * rn + c..][..LANES]).try_into()
            else {
                continue;
            };
            weigh_key::<ALL>(x, v, (j, a, e), mx, sum, &mut m);
        }
    }
    (*part, *mv) = (sums, m);
}

/// [`weigh`] for one key `j` (its scores `x`, its value's scale `v`).
#[inline(always)]
fn weigh_key<const ALL: bool>(
    x: &mut [f32; LANES],
    v: f32,
    (j, a, e): (i32, &[i32; LANES], &[i32; LANES]),
    mx: &[f32; LANES],
    part: &mut [f32; LANES],
    mv: &mut [f32; LANES],
) {
    for l in 0..LANES {
        let w = exp2_nonpositive(x[l] - mx[l]);
        let w = if ALL || (j >= a[l] && j < e[l]) {
            w
        } else {
            0.0
        };
        part[l] += w;
        let wv = w * v;
        x[l] = wv;
        mv[l] = if wv > mv[l] { wv } else { mv[l] };
    }
}

/// A block's weights times their values' scales (`block`, `[KV_BLOCK][rn]`)
/// for lanes `c..c + LANES`, quantized with each lane's factor `ip`
/// (rounded to the nearest integer, ties to even, within 0..=127) into `u`
/// (the block's words, laid out as [`Weights`] says), four keys to a
/// word, the first in the low byte.
#[inline(always)]
fn quantize_block(block: &[f32], rn: usize, c: usize, ip: &[f32; LANES], u: &mut [u32]) {
    let u = &mut u[c * KV_BLOCK / 4..][..KV_BLOCK / 4 * LANES];
    for (quad, out) in block.chunks_exact(4 * rn).zip(u.chunks_exact_mut(LANES)) {
        let mut word = [0u32; LANES];
        for (q, row) in quad.chunks_exact(rn).enumerate() {
            let Ok(x): Result<&[f32; LANES], _> = row[c..c + LANES].try_into() else {
                continue;
            };
            for l in 0..LANES {
                // NaN (a non-finite scale's lane, whose factor is 0) gives 0.
                let y = x[l] * ip[l];
                // At most 127·(1 + 2⁻²³) (`ip` is at most 127 over the
                // largest `x`), which rounds to 127.
                let y = if y > 0.0 { y } else { 0.0 };
                // The rounded integer lands in the sum's low bits.
                word[l] |= ((y + ROUND_MAGIC).to_bits() & 0xff) << (8 * q);
            }
        }
        out.copy_from_slice(&word);
    }
}

/// `2^t` for `t <= 0` (at most 3·10⁻⁶ relative error; about `2^-125`
/// below −125): the attention weights, quantized to seven bits per block
/// afterwards, need no more (a cubic's 7.5·10⁻⁵ moved the logits measurably
/// further from llama.cpp's). Plain arithmetic and `mul_add`, so loops of
/// it vectorize (the polynomial's fused steps: 3–5 % of attention at 4,096
/// keys; without FMA, in the portable kernels only, `mul_add` is libm's
/// exact `fmaf`, so every level keeps the same bits).
#[inline(always)]
fn exp2_nonpositive(t: f32) -> f32 {
    let t = if t > -125.0 { t } else { -125.0 };
    let r = t + ROUND_MAGIC;
    let n = r - ROUND_MAGIC;
    let f = t - n;
    // 2^f for |f| <= 1/2: the quartic of least largest relative error.
    let mut p: f32 = 9.570_102e-3;
    p = p.mul_add(f, 5.591_786_3e-2);
    p = p.mul_add(f, 2.402_474_4e-1);
    p = p.mul_add(f, 6.931_218e-1);
    p = p.mul_add(f, 9.999_993e-1);
    // `r`'s low bits hold `n` over ROUND_MAGIC's, whose bits from the 9th
    // up are all that is left of it shifted up 23: so the shift gives
    // `n · 2^23`, and added to `p`'s bits it multiplies `p` by `2^n`
    // (exactly: p ≥ 0.7 and n ≥ −125 keep the result normal).
    f32::from_bits(p.to_bits().wrapping_add(r.to_bits() << 23))
}

/// A block's scores for every row: `out[j][r] = (Σ_d q[r][d]·k[j][d]) ·
/// (qs[r]·kscale[j])`, the sum exact in i32; `qp` holds the queries as
/// `[hd / 2][rn]` pairs of i16 and `out` is `[KV_BLOCK][rn]`. Rows from
/// `nq` on are padding: where eight of them fill a vector of AVX2 lanes
/// (a decode step's seven or six rows padded to sixteen), they score
/// zeros instead.
#[inline(always)]
fn qk<const L: u8>(
    qp: &[i32],
    qs: &[f32],
    (nq, rn): (usize, usize),
    hd: usize,
    kb: &KeyBlock,
    out: &mut [f32],
) {
    let (keys, ks) = (kb.keys, kb.scale);
    assert!(
        rn.is_multiple_of(LANES)
            && nq <= rn
            && qp.len() >= hd / 2 * rn
            && qs.len() >= rn
            && out.len() >= KV_BLOCK * rn
            && keys.len() >= hd * KV_BLOCK
            && ks.len() >= KV_BLOCK
            && hd.is_multiple_of(2)
    );
    #[cfg(target_arch = "x86_64")]
    if L == 2 {
        let mut v0 = 0;
        while v0 < rn / 16 {
            // SAFETY: in bounds (asserted above; `v0 + NV <= rn / 16`);
            // AVX-512 VNNI is enabled in the function this is inlined into.
            v0 += unsafe {
                match rn / 16 - v0 {
                    1 => qk_tile::<Zmm, 1, 8>(qp, qs, rn, v0, hd, keys, ks, out),
                    2 => qk_tile::<Zmm, 2, 8>(qp, qs, rn, v0, hd, keys, ks, out),
                    3 => qk_tile::<Zmm, 3, 8>(qp, qs, rn, v0, hd, keys, ks, out),
                    _ => qk_tile::<Zmm, 4, 4>(qp, qs, rn, v0, hd, keys, ks, out),
                }
            };
        }
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if L == 1 || L == 3 {
        // Vectors of eight rows holding a query row.
        let nv = nq.div_ceil(8);
        // SAFETY: in bounds (asserted above; `v0 + NV <= nv <= rn / 8`);
        // AVX2 is enabled in the function this is inlined into (`L` 1 or
        // 3), and AVX-VNNI with it where `L == 3`.
        unsafe {
            let mut v0 = 0;
            while v0 < nv {
                v0 += match (L, nv - v0) {
                    (1, 1) => qk_tile::<Ymm<false>, 1, 4>(qp, qs, rn, v0, hd, keys, ks, out),
                    (1, _) => qk_tile::<Ymm<false>, 2, 4>(qp, qs, rn, v0, hd, keys, ks, out),
                    (_, 1) => qk_tile::<Ymm<true>, 1, 8>(qp, qs, rn, v0, hd, keys, ks, out),
                    _ => qk_tile::<Ymm<true>, 2, 4>(qp, qs, rn, v0, hd, keys, ks, out),
                };
            }
        }
        for j in 0..KV_BLOCK {
            out[j * rn + nv * 8..(j + 1) * rn].fill(0.0);
        }
        return;
    }
    for j in 0..KV_BLOCK {
        let o = &mut out[j * rn..][..rn];
        for (r, o) in o.iter_mut().enumerate() {
            let mut acc = 0i32;
            for dp in 0..hd / 2 {
                let q = qp[dp * rn + r];
                let (q0, q1) = (q as i16 as i32, (q >> 16) as i16 as i32);
                let k = &keys[(dp * KV_BLOCK + j) * 2..];
                acc += q0 * k[0] as i32 + q1 * k[1] as i32;
            }
            *o = acc as f32 * (qs[r] * ks[j]);
        }
    }
}

/// The vector operations of [`qk_tile`], at one width: eight lanes with
/// AVX2 (`vpmaddwd`, then an add) or AVX-VNNI (`vpdpwssd`), sixteen with
/// AVX-512 VNNI (`vpdpwssd`).
#[cfg(target_arch = "x86_64")]
trait QkLanes {
    /// Query rows a vector holds.
    const W: usize;
    type I: Copy;
    /// # Safety
    /// The width's features are enabled where this is inlined.
    unsafe fn zero() -> Self::I;
    /// # Safety
    /// As [`QkLanes::zero`]; `W` values readable at `p`.
    unsafe fn load(p: *const i32) -> Self::I;
    /// # Safety
    /// As [`QkLanes::zero`].
    unsafe fn splat(x: i32) -> Self::I;
    /// `acc` plus each lane's i16 pair of `q` times the pair `k`.
    /// # Safety
    /// As [`QkLanes::zero`].
    unsafe fn dot(acc: Self::I, q: Self::I, k: Self::I) -> Self::I;
    /// `o[l] = sum[l] as f32 · (f[l] · k)`, `f` and `o` `W` floats.
    /// # Safety
    /// As [`QkLanes::zero`]; `W` floats readable at `f`, writable at `o`.
    unsafe fn scale_store(sum: Self::I, f: *const f32, k: f32, o: *mut f32);
}

/// Eight lanes; `VNNI`: multiply and add in one AVX-VNNI `vpdpwssd`.
#[cfg(target_arch = "x86_64")]
struct Ymm<const VNNI: bool>;

#[cfg(target_arch = "x86_64")]
impl<const VNNI: bool> QkLanes for Ymm<VNNI> {
    const W: usize = 8;
    type I = std::arch::x86_64::__m256i;
    #[inline(always)]
    unsafe fn zero() -> Self::I {
        std::arch::x86_64::_mm256_setzero_si256()
    }
    #[inline(always)]
    unsafe fn load(p: *const i32) -> Self::I {
        std::arch::x86_64::_mm256_loadu_si256(p as *const _)
    }
    #[inline(always)]
    unsafe fn splat(x: i32) -> Self::I {
        std::arch::x86_64::_mm256_set1_epi32(x)
    }
    #[inline(always)]
    unsafe fn dot(acc: Self::I, q: Self::I, k: Self::I) -> Self::I {
        use std::arch::x86_64::*;
        if VNNI {
            _mm256_dpwssd_avx_epi32(acc, q, k)
        } else {
            _mm256_add_epi32(acc, _mm256_madd_epi16(q, k))
        }
    }
    #[inline(always)]
    unsafe fn scale_store(sum: Self::I, f: *const f32, k: f32, o: *mut f32) {
        use std::arch::x86_64::*;
        let m = _mm256_mul_ps(_mm256_loadu_ps(f), _mm256_set1_ps(k));
        _mm256_storeu_ps(o, _mm256_mul_ps(_mm256_cvtepi32_ps(sum), m));
    }
}

#[cfg(target_arch = "x86_64")]
struct Zmm;

#[cfg(target_arch = "x86_64")]
impl QkLanes for Zmm {
    const W: usize = 16;
    type I = std::arch::x86_64::__m512i;
    #[inline(always)]
    unsafe fn zero() -> Self::I {
        std::arch::x86_64::_mm512_setzero_si512()
    }
    #[inline(always)]
    unsafe fn load(p: *const i32) -> Self::I {
        std::arch::x86_64::_mm512_loadu_si512(p as *const _)
    }
    #[inline(always)]
    unsafe fn splat(x: i32) -> Self::I {
        std::arch::x86_64::_mm512_set1_epi32(x)
    }
    #[inline(always)]
    unsafe fn dot(acc: Self::I, q: Self::I, k: Self::I) -> Self::I {
        std::arch::x86_64::_mm512_dpwssd_epi32(acc, q, k)
    }
    #[inline(always)]
    unsafe fn scale_store(sum: Self::I, f: *const f32, k: f32, o: *mut f32) {
        use std::arch::x86_64::*;
        let m = _mm512_mul_ps(_mm512_loadu_ps(f), _mm512_set1_ps(k));
        _mm512_storeu_ps(o, _mm512_mul_ps(_mm512_cvtepi32_ps(sum), m));
    }
}

/// [`qk`]'s tile: vectors `v0..v0 + NV` (`R::W` rows each) against the
/// block's keys, `KJ` at a time; returns `NV`.
///
/// # Safety
/// `R`'s features; the bounds [`qk`] asserts, with `(v0 + NV)·R::W <= rn`.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn qk_tile<R: QkLanes, const NV: usize, const KJ: usize>(
    qp: &[i32],
    qs: &[f32],
    rn: usize,
    v0: usize,
    hd: usize,
    keys: &[i16],
    ks: &[f32],
    out: &mut [f32],
) -> usize {
    let kp = keys.as_ptr() as *const i32;
    for j0 in (0..KV_BLOCK).step_by(KJ) {
        let mut acc = [[R::zero(); KJ]; NV];
        for dp in 0..hd / 2 {
            let q = qp.as_ptr().add(dp * rn + v0 * R::W);
            let mut qv = [R::zero(); NV];
            for (v, x) in qv.iter_mut().enumerate() {
                *x = R::load(q.add(v * R::W));
            }
            for j in 0..KJ {
                let kk = R::splat(kp.add(dp * KV_BLOCK + j0 + j).read_unaligned());
                for (a, q) in acc.iter_mut().zip(&qv) {
                    a[j] = R::dot(a[j], *q, kk);
                }
            }
        }
        for (v, a) in acc.iter().enumerate() {
            let f = qs.as_ptr().add((v0 + v) * R::W);
            for (j, x) in a.iter().enumerate() {
                let o = out.as_mut_ptr().add((j0 + j) * rn + (v0 + v) * R::W);
                R::scale_store(*x, f, *ks.get_unchecked(j0 + j), o);
            }
        }
    }
    NV
}

/// A block's quantized weights as [`pv`] reads them: row `r`'s weights of
/// keys `4jq..4jq + 4`, a byte each (low byte first), are the word
/// [`Weights::at`]`(r, jq)`. Sixteen rows' words for one `jq` lie side by
/// side, so a row's eight words are a constant stride apart. `rows` are the
/// four rows of the tile.
struct Weights<'a> {
    u: &'a [u32],
    rn: usize,
    rows: [usize; 4],
}

impl Weights<'_> {
    /// Where row `r`'s word of keys `4jq..4jq + 4` lies in a block's words.
    #[inline(always)]
    fn at(r: usize, jq: usize) -> usize {
        (r / LANES * KV_BLOCK / 4 + jq) * LANES + r % LANES
    }
}

/// The weighted values of a block for up to four query rows:
/// `o[i][d] += ws[i] · Σ_j u[i][j] · v[j][d]`, the sum exact in i32, for
/// the four rows of `o` (`hd` values each).
#[inline(always)]
fn pv<const L: u8>(w: Weights, ws: [f32; 4], vb: &ValBlock, kvd: usize, hd: usize, o: &mut [f32]) {
    let (vals, at) = (vb.vals, vb.at);
    assert!(
        w.rows.iter().all(|&r| r < w.rn)
            && w.u.len() >= KV_BLOCK / 4 * w.rn
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
                        1 => pv_zmm::<1>(&w, ws, vals, at, kvd, hd, &mut o[d0..]),
                        2 => pv_zmm::<2>(&w, ws, vals, at, kvd, hd, &mut o[d0..]),
                        3 => pv_zmm::<3>(&w, ws, vals, at, kvd, hd, &mut o[d0..]),
                        _ => pv_zmm::<4>(&w, ws, vals, at, kvd, hd, &mut o[d0..]),
                    };
            }
            return;
        }
    }
    #[cfg(target_arch = "x86_64")]
    if (L == 1 || L == 3) && hd.is_multiple_of(16) {
        // SAFETY: in bounds (asserted above: dimension `at + d0 + 15` of
        // key quad `jq < KV_BLOCK/4` lies within `vals`); AVX2 is enabled
        // in the function this is inlined into (`L` 1 or 3), and AVX-VNNI
        // with it where `L == 3`.
        unsafe {
            use std::arch::x86_64::*;
            let ones = _mm256_set1_epi16(1);
            let up = w.rows.map(|r| w.u.as_ptr().add(Weights::at(r, 0)));
            for d0 in (0..hd).step_by(16) {
                let mut acc = [[_mm256_setzero_si256(); 2]; 4];
                for jq in 0..KV_BLOCK / 4 {
                    let vp = vals.as_ptr().add((jq * kvd + at + d0) * 4);
                    let v0 = _mm256_loadu_si256(vp as *const _);
                    let v1 = _mm256_loadu_si256(vp.add(32) as *const _);
                    for (a, &u) in acc.iter_mut().zip(&up) {
                        let ub = _mm256_set1_epi32(*u.add(jq * LANES) as i32);
                        if L == 3 {
                            a[0] = _mm256_dpbusd_avx_epi32(a[0], ub, v0);
                            a[1] = _mm256_dpbusd_avx_epi32(a[1], ub, v1);
                        } else {
                            // Weights are at most 127: pairs sum within i16.
                            let p0 = _mm256_madd_epi16(_mm256_maddubs_epi16(ub, v0), ones);
                            let p1 = _mm256_madd_epi16(_mm256_maddubs_epi16(ub, v1), ones);
                            a[0] = _mm256_add_epi32(a[0], p0);
                            a[1] = _mm256_add_epi32(a[1], p1);
                        }
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
    for (i, (&r, &ws)) in w.rows.iter().zip(&ws).enumerate() {
        let mut acc = vec![0i32; hd];
        for j in 0..KV_BLOCK {
            let x = (w.u[Weights::at(r, j / 4)] >> (8 * (j % 4))) as u8;
            let base = ((j / 4) * kvd + at) * 4 + j % 4;
            for (d, a) in acc.iter_mut().enumerate() {
                *a += x as i32 * vals[base + d * 4] as i32;
            }
        }
        for (o, &a) in o[i * hd..(i + 1) * hd].iter_mut().zip(&acc) {
            *o += ws * a as f32;
        }
    }
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
    w: &Weights,
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
    // Each row's first word; its word of quad `jq` lies `jq · LANES` on.
    let up = w.rows.map(|r| w.u.as_ptr().add(Weights::at(r, 0)));
    for jq in 0..KV_BLOCK / 4 {
        let vp = vals.as_ptr().add((jq * kvd + at) * 4);
        let mut v = [_mm512_setzero_si512(); NC];
        for (c, x) in v.iter_mut().enumerate() {
            *x = _mm512_loadu_si512(vp.add(c * 64) as *const _);
        }
        for (a, &u) in acc.iter_mut().zip(&up) {
            let ub = _mm512_set1_epi32(*u.add(jq * LANES) as i32);
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

    /// A one-layer cache of `n` positions of random keys (one dimension
    /// with a large offset, as Qwen's key bias gives) and values, with
    /// random queries for `t_n` tokens.
    struct Case {
        hd: usize,
        group: usize,
        n_kv: usize,
        k: Vec<f32>,
        v: Vec<f32>,
        q: Vec<f32>,
        cache: KvCache,
    }

    impl Case {
        fn new((hd, group): (usize, usize), n: usize, t_n: usize, seed: u64) -> Self {
            let n_kv = 2;
            let (nh, kvd) = (n_kv * group, n_kv * hd);
            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
            let mut gen = |len: usize, bias: bool| -> Vec<f32> {
                (0..len)
                    .map(|i| {
                        rng.random_range(-1.0..1.0f32)
                            + if bias && i % hd == 5 { 12.0 } else { 0.0 }
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
            Case {
                hd,
                group,
                n_kv,
                k,
                v,
                q,
                cache,
            }
        }

        /// Every job of the queries' tokens, positions `p0..`, at one level,
        /// into `out` (`t_n · heads · hd`).
        fn attend(
            &self,
            level: Level,
            window: Option<usize>,
            p0: usize,
            out: &mut [f32],
            sc: &mut Scratch,
        ) {
            let (hd, group) = (self.hd, self.group);
            let nh = self.n_kv * group;
            let t_n = self.q.len() / (nh * hd);
            assert_eq!(out.len(), self.q.len());
            let a = Attend {
                hd,
                nh,
                group,
                scale: 1.0 / (hd as f32).sqrt(),
                window,
                li: 0,
                cache: &self.cache,
                q: &self.q,
                p0,
                t_n,
                out: SendPtr(out.as_mut_ptr()),
            };
            for kvh in 0..self.n_kv {
                for blk in 0..t_n.div_ceil(tokens_per_job(group)) {
                    a.run(level, kvh, blk, sc);
                }
            }
        }
    }

    /// Attention of `t_n` query tokens from `p0` over a random cache
    /// ([`Case`]) at one level: the output rows and the f64 reference
    /// computed from the unquantized keys and values.
    fn run(
        level: Level,
        (hd, group): (usize, usize),
        window: Option<usize>,
        p0: usize,
        t_n: usize,
    ) -> (Vec<f32>, Vec<f64>) {
        let c = Case::new((hd, group), p0 + t_n, t_n, hd as u64);
        let (n_kv, k, v, q) = (c.n_kv, &c.k, &c.v, &c.q);
        let (nh, kvd) = (n_kv * group, n_kv * hd);
        let mut out = vec![0f32; q.len()];
        c.attend(level, window, p0, &mut out, &mut Scratch::default());
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
                if is_x86_feature_detected!("avxvnni") {
                    levels.push(Level::AvxVnni);
                }
            }
            if is_x86_feature_detected!("avx512f")
                && is_x86_feature_detected!("avx512bw")
                && is_x86_feature_detected!("avx512vl")
                && is_x86_feature_detected!("avx512vnni")
            {
                levels.push(Level::Vnni);
            }
        }
        // Eleven tokens: groups of 3, 6 and 7 heads give jobs of 33 rows,
        // 48 and 18 rows, and 77 rows (16, 8 and 16 tokens a job): two to
        // five vectors of lanes, with padding.
        for (hd, group, window) in [
            (64, 3, None),
            (128, 3, None),
            (16, 3, Some(40)),
            (256, 3, Some(70)),
            (64, 7, None),
            (64, 6, Some(50)),
        ] {
            let (p0, t_n) = (95, 11);
            let (base, want) = run(Level::Portable, (hd, group), window, p0, t_n);
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
                let (got, _) = run(l, (hd, group), window, p0, t_n);
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert!(
                    bits(&got) == bits(&base),
                    "hd {hd}: a SIMD level differs from the portable kernels"
                );
            }
        }
    }

    /// The exponential keeps its stated accuracy: within 3·10⁻⁶ of
    /// `2^t` over the weights' whole range, and of `2^-126` below −126.
    #[test]
    fn exp2_is_within_its_bound() {
        let mut worst = 0f64;
        for i in 0..=1_250_000 {
            let t = -(i as f32) * 1e-4;
            let got = exp2_nonpositive(t) as f64;
            let want = (t as f64).exp2();
            worst = worst.max((got / want - 1.0).abs());
        }
        assert!(worst < 3e-6, "largest relative error {worst}");
        for t in [-125.0, -126.0, -1000.0, f32::NEG_INFINITY, f32::NAN] {
            let floor = exp2_nonpositive(t) as f64 / 2f64.powi(-125);
            assert!((floor - 1.0).abs() < 3e-6, "{t}: {floor} · 2^-125");
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

    /// Attention's speed on a long context, alone (`cargo test --release -p
    /// hanlin-engine --lib attn_speed -- --ignored --nocapture`): 512 query
    /// tokens after 0 or 3,584 cached positions, Qwen2.5-0.5B's shape (head
    /// 64, 2 KV heads of 7 query heads), one thread, at the detected level.
    #[test]
    #[ignore = "a measurement; run it by hand"]
    fn attn_speed() {
        let t_n = 512;
        for n in [512, 4096] {
            let c = Case::new((64, 7), n, t_n, 7);
            let mut out = vec![0f32; c.q.len()];
            let mut sc = Scratch::default();
            let mut times = Vec::new();
            for _ in 0..15 {
                let t = std::time::Instant::now();
                c.attend(Level::detect(), None, n - t_n, &mut out, &mut sc);
                times.push(t.elapsed().as_secs_f64() * 1e3);
            }
            times.sort_by(f64::total_cmp);
            println!(
                "{t_n} queries over {n} keys: median {:.2} ms, best {:.2} ms ({:.1} µs a token)",
                times[times.len() / 2],
                times[0],
                times[times.len() / 2] * 1e3 / t_n as f64
            );
        }
        // A decode step's query: one token.
        for n in [64, 256, 1024] {
            let c = Case::new((64, 7), n, 1, 7);
            let mut out = vec![0f32; c.q.len()];
            let mut sc = Scratch::default();
            let mut times = Vec::new();
            for _ in 0..15 {
                let t = std::time::Instant::now();
                for _ in 0..200 {
                    c.attend(Level::detect(), None, n - 1, &mut out, &mut sc);
                }
                times.push(t.elapsed().as_secs_f64() * 1e6 / 200.0);
            }
            times.sort_by(f64::total_cmp);
            println!(
                "1 query over {n} keys: median {:.2} µs, best {:.2} µs (both KV heads)",
                times[times.len() / 2],
                times[0],
            );
        }
    }
}
