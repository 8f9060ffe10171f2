//! Element-wise and row-wise operations of the transformer layers.

simd_copies! {
    /// RMSNorm of each row of `x` (row length `w.len()`) into `out`.
    pub fn rms_norm(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
        let n = w.len();
        for (xr, or) in x.chunks_exact(n).zip(out.chunks_exact_mut(n)) {
            let scale = 1.0 / (sum_squares(xr) / n as f32 + eps).sqrt();
            for ((o, v), g) in or.iter_mut().zip(xr).zip(w) {
                *o = v * scale * g;
            }
        }
    }
}

simd_copies! {
    /// In-place RMSNorm over each `w.len()`-sized chunk of `x`.
    pub fn rms_norm_inplace(x: &mut [f32], w: &[f32], eps: f32) {
        let n = w.len();
        for xr in x.chunks_exact_mut(n) {
            let scale = 1.0 / (sum_squares(xr) / n as f32 + eps).sqrt();
            for (v, g) in xr.iter_mut().zip(w) {
                *v *= scale * g;
            }
        }
    }
}

/// `Σ v²` of a row in sixteen running sums (element `i` into sum `i % 16`,
/// then the sixteen and the remainder in order), so the SIMD copies
/// vectorize it: one sum in order was a chain of dependent adds, and a
/// prefill's norms run on one thread while the others wait.
#[inline(always)]
fn sum_squares(x: &[f32]) -> f32 {
    let mut lanes = [0f32; 16];
    let mut c = x.chunks_exact(16);
    for xs in &mut c {
        for (l, v) in lanes.iter_mut().zip(xs) {
            *l = v.mul_add(*v, *l);
        }
    }
    let mut ss = lanes.iter().sum::<f32>();
    for v in c.remainder() {
        ss = v.mul_add(*v, ss);
    }
    ss
}

/// Rotary position embedding layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RopeStyle {
    /// Pairs are adjacent elements `(2i, 2i+1)` (llama GGUF files).
    Normal,
    /// Pairs are `(i, i + n_rot/2)` (GPT-NeoX; Qwen, Gemma).
    Neox,
}

/// Precomputed inverse frequencies for RoPE.
#[derive(Debug, Clone)]
pub struct Rope {
    pub style: RopeStyle,
    pub n_rot: usize,
    inv_freq: Vec<f32>,
}

impl Rope {
    pub fn new(style: RopeStyle, n_rot: usize, base: f32, freq_scale: f32) -> Self {
        let inv_freq = (0..n_rot / 2)
            .map(|i| freq_scale * base.powf(-2.0 * i as f32 / n_rot as f32))
            .collect();
        Self {
            style,
            n_rot,
            inv_freq,
        }
    }

    /// Rotate every head (`head_dim` apart) of one token's vector at `pos`.
    pub fn apply(&self, x: &mut [f32], head_dim: usize, pos: usize) {
        let half = self.n_rot / 2;
        let cs: Vec<(f32, f32)> = self
            .inv_freq
            .iter()
            .map(|f| (pos as f32 * f).sin_cos())
            .collect();
        for head in x.chunks_exact_mut(head_dim) {
            for (i, &(s, c)) in cs.iter().enumerate() {
                let (a, b) = match self.style {
                    RopeStyle::Normal => (2 * i, 2 * i + 1),
                    RopeStyle::Neox => (i, i + half),
                };
                let (x0, x1) = (head[a], head[b]);
                head[a] = x0 * c - x1 * s;
                head[b] = x0 * s + x1 * c;
            }
        }
    }
}

/// Numerically stable softmax in place. Inlined, so that a caller compiled
/// for wider vectors (attention's AVX-512 job) vectorizes it with them; the
/// operations per element are the same, so are the bits.
#[inline(always)]
pub fn softmax(x: &mut [f32]) {
    let max = x.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    // The exponential below rather than libm's, and sixteen partial sums:
    // both loops vectorize (attention over a long prompt calls this for
    // every query and head, over every key). Element `i` always goes to
    // sum `i % 16`, so zeros appended (masked keys past a query) change
    // nothing: attention's result does not depend on the span it shares.
    for v in x.iter_mut() {
        *v = exp_nonpositive(*v - max);
    }
    let mut part = [0f32; 16];
    let mut chunks = x.chunks_exact(16);
    for c in &mut chunks {
        for (p, v) in part.iter_mut().zip(c) {
            *p += v;
        }
    }
    for (p, v) in part.iter_mut().zip(chunks.remainder()) {
        *p += v;
    }
    let sum = part.iter().sum::<f32>();
    let inv = 1.0 / sum;
    for v in x.iter_mut() {
        *v *= inv;
    }
}

/// SiLU, `x · σ(x)`, with the polynomial exponential below (no libm call,
/// so a loop of it vectorizes).
#[inline]
pub fn silu(x: f32) -> f32 {
    let s = x / (1.0 + exp_clamped(-x));
    // Below -88 the true value is under 1e-36 in magnitude.
    if x < -88.0 {
        -0.0
    } else {
        s
    }
}

/// GELU, tanh approximation (as used by Gemma): `x·(1 + tanh z)/2` with
/// `z = √(2/π)·(x + 0.044715·x³)`, computed as the same function's
/// `x / (1 + e^(−2z))` with the polynomial exponential below (no libm
/// `tanh`, so a loop of it vectorizes; and no cancellation in `1 + tanh z`
/// for negative `x`).
#[inline]
pub fn gelu(x: f32) -> f32 {
    const C: f32 = 0.797_884_6; // sqrt(2/pi)
    let e = -2.0 * C * (x + 0.044_715 * x * x * x);
    let g = x / (1.0 + exp_clamped(e));
    // Beyond e^88 the true value is under 1e-30 in magnitude.
    if e > 88.0 {
        -0.0
    } else {
        g
    }
}

/// The activation of a gated feed-forward layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Act {
    Silu,
    GeluTanh,
}

simd_copies! {
    /// `gate = act(gate) * up`, element-wise.
    pub fn glu(gate: &mut [f32], up: &[f32], act: Act) {
        #[inline(always)]
        fn each(gate: &mut [f32], up: &[f32], f: impl Fn(f32) -> f32) {
            for (g, u) in gate.iter_mut().zip(up) {
                *g = f(*g) * u;
            }
        }
        match act {
            Act::Silu => each(gate, up, silu),
            Act::GeluTanh => each(gate, up, gelu),
        }
    }
}

/// Dot product written with eight independent accumulators so that it
/// vectorizes (a plain `.sum()` of products must stay sequential).
#[inline]
pub fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ac, bc) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ac
        .remainder()
        .iter()
        .zip(bc.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ac.zip(bc) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// `y += a * x`.
#[inline]
pub fn axpy(y: &mut [f32], a: f32, x: &[f32]) {
    for (o, v) in y.iter_mut().zip(x) {
        *o += a * v;
    }
}

pub fn add_inplace(x: &mut [f32], y: &[f32]) {
    for (a, b) in x.iter_mut().zip(y) {
        *a += b;
    }
}

simd_copies! {
    /// The largest value of `x` (NaN passed over, −∞ for none), as
    /// `x.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v))` gives it, in
    /// sixteen running maxima the compiler vectorizes (a maximum does not
    /// depend on the order). That fold, compiled for baseline x86-64 (four
    /// lanes with NaN checks), was nine tenths of sampling's own time at a
    /// temperature; this pass takes half as long, bound by reading the
    /// logits (8-stream server on the AVX2 path, Xeon: 1.2 % → 0.6 % of
    /// the samples).
    pub fn max(x: &[f32]) -> f32 {
        let mut lanes = [f32::NEG_INFINITY; 16];
        let mut c = x.chunks_exact(16);
        for xs in &mut c {
            for (m, &v) in lanes.iter_mut().zip(xs) {
                *m = if v > *m { v } else { *m };
            }
        }
        let mut best = f32::NEG_INFINITY;
        for &v in lanes.iter().chain(c.remainder()) {
            best = if v > best { v } else { best };
        }
        best
    }
}

/// [`argmax`] past 2^24 values, where float positions stop being exact.
fn argmax_long(x: &[f32]) -> usize {
    let mut best = 0;
    for (i, &v) in x.iter().enumerate() {
        if v > x[best] {
            best = i;
        }
    }
    best
}

simd_copies! {
    /// Where the first largest value of `x` lies (NaN passed over; 0 when
    /// nothing is larger than −∞): greedy decoding's choice. Sixteen
    /// running maxima with their positions, which the compiler vectorizes
    /// (compare and blend), then the lanes' best, the earliest on a tie;
    /// the scalar scan it replaces waited on each comparison (1.4 % of an
    /// 8-sequence greedy decode step, AVX2 path).
    pub fn argmax(x: &[f32]) -> usize {
        if x.len() >= 1 << 24 {
            return argmax_long(x);
        }
        // Positions as floats (exact below 2^24), so the blend is the
        // same vector operation as the maximum's: as integers the compiler
        // took the lanes one by one.
        let mut m = [f32::NEG_INFINITY; 16];
        let mut at = [0f32; 16];
        let mut c = x.chunks_exact(16);
        let mut base = [0f32; 16];
        for (l, b) in base.iter_mut().enumerate() {
            *b = l as f32;
        }
        for xs in &mut c {
            for l in 0..16 {
                let v = xs[l];
                let take = v > m[l];
                m[l] = if take { v } else { m[l] };
                at[l] = if take { base[l] } else { at[l] };
                base[l] += 16.0;
            }
        }
        let (mut best, mut bi) = (f32::NEG_INFINITY, 0usize);
        for l in 0..16 {
            let i = at[l] as usize;
            if m[l] > best || (m[l] == best && m[l] > f32::NEG_INFINITY && i < bi) {
                (best, bi) = (m[l], i);
            }
        }
        let done = x.len() - c.remainder().len();
        for (i, &v) in c.remainder().iter().enumerate() {
            if v > best {
                (best, bi) = (v, done + i);
            }
        }
        bi
    }
}

simd_copies! {
    /// `out[i] = exp((x[i] - shift) * scale)`, returning their sum: the
    /// weights of a softmax with temperature (sampling), in one pass that the
    /// compiler vectorizes. The exponential is Cephes' single-precision one
    /// (range reduction by ln 2, degree-5 polynomial), within 2 ulp of `f32::exp`
    /// for arguments in `[-87, 0]`; smaller arguments give 0. Compiled a second
    /// time with AVX2 (8 lanes against SSE2's 4; no fused multiply-adds, so the
    /// same bits): sampling at a temperature runs it over the whole vocabulary
    /// for every sequence of every step.
    pub fn exp_weights(x: &[f32], shift: f32, scale: f32, out: &mut [f32]) -> f32 {
        let mut sum = [0f32; 16];
        let n = x.len().min(out.len());
        let (x, out) = (&x[..n], &mut out[..n]);
        let mut xc = x.chunks_exact(16);
        let mut oc = out.chunks_exact_mut(16);
        for (xs, os) in (&mut xc).zip(&mut oc) {
            for ((o, &v), s) in os.iter_mut().zip(xs).zip(sum.iter_mut()) {
                *o = exp_nonpositive((v - shift) * scale);
                *s += *o;
            }
        }
        let mut total: f32 = sum.iter().sum();
        for (o, &v) in oc.into_remainder().iter_mut().zip(xc.remainder()) {
            *o = exp_nonpositive((v - shift) * scale);
            total += *o;
        }
        total
    }
}

/// `e^x` for `x <= 0` (0 below -87.33, where f32 would go subnormal), in
/// plain arithmetic so that loops over it vectorize.
#[inline(always)]
fn exp_nonpositive(x: f32) -> f32 {
    let under = x < -87.33;
    let e = exp_clamped(x);
    if under {
        0.0
    } else {
        e
    }
}

/// 1.5 · 2²³: adding it to an `f32` below 2²² in magnitude leaves no
/// fraction bits, so the sum holds the value rounded to an integer (half to
/// even, as IEEE addition rounds) in its low mantissa bits, and taking it
/// away again gives that integer as a float. Plain arithmetic in place of
/// `round_ties_even` (a call to `rintf` on a baseline x86-64 build).
pub const ROUND_MAGIC: f32 = 12_582_912.0;

/// `exp(x)` for `x` clamped to `[-87.33, 88.37]` (so `2^n` stays a normal
/// float): Cody–Waite reduction and a degree-6 polynomial, within a few
/// ulp of libm's, branch-free so that loops of it vectorize. Its steps are
/// fused multiply-adds (a third fewer operations in the AVX2 loops; the
/// portable build calls libm's exact `fmaf`, so the bits are the same).
#[inline(always)]
fn exp_clamped(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    let x = x.clamp(-87.33, 88.37);
    let t = x.mul_add(LOG2E, ROUND_MAGIC);
    let n = t - ROUND_MAGIC;
    let ni = (t.to_bits() as i32).wrapping_sub(ROUND_MAGIC.to_bits() as i32);
    let r = (-n).mul_add(LN2_LO, (-n).mul_add(LN2_HI, x));
    let mut p: f32 = 1.987_569_1e-4;
    p = p.mul_add(r, 1.398_199_9e-3);
    p = p.mul_add(r, 8.333_452e-3);
    p = p.mul_add(r, 4.166_579_6e-2);
    p = p.mul_add(r, 1.666_666_5e-1);
    p = p.mul_add(r, 0.5);
    let y = (p * r).mul_add(r, r) + 1.0;
    y * f32::from_bits(((ni + 127) << 23) as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn silu_matches_libm_over_the_whole_range() {
        let mut gate: Vec<f32> = (0..400_001)
            .map(|i| (i as f32 - 200_000.0) * 5e-4)
            .collect();
        gate.extend([-1e30, -200.0, -88.5, 88.5, 200.0, 1e30, 0.0, -0.0]);
        let up = vec![1.0f32; gate.len()];
        let x = gate.clone();
        glu(&mut gate, &up, Act::Silu);
        for (&v, &got) in x.iter().zip(&gate) {
            let want = v / (1.0 + (-v).exp());
            // Below -88 the true value (under 1e-36) is cut off differently.
            let tol = 4.0 * f32::EPSILON * want.abs() + 1e-35;
            assert!((got - want).abs() <= tol, "silu({v}) = {got}, libm {want}");
        }
    }

    #[test]
    fn gelu_matches_the_tanh_formula() {
        let mut gate: Vec<f32> = (0..400_001)
            .map(|i| (i as f32 - 200_000.0) * 5e-5)
            .collect();
        gate.extend([-1e30, -200.0, -9.0, 9.0, 200.0, 1e30, 0.0, -0.0]);
        let up = vec![1.0f32; gate.len()];
        let x = gate.clone();
        glu(&mut gate, &up, Act::GeluTanh);
        for (&v, &got) in x.iter().zip(&gate) {
            let v64 = v as f64;
            let z = 0.797_884_560_802_865_4 * (v64 + 0.044_715 * v64 * v64 * v64);
            // x·(1 + tanh z)/2, without f64's own cancellation in 1 + tanh z.
            let want = v64 / (1.0 + (-2.0 * z).exp());
            assert!((0.5 * v64 * (1.0 + z.tanh()) - want).abs() <= 1e-12 * (1.0 + v64.abs()));
            // The f32 argument of the exponential carries its own rounding:
            // the relative error grows with |2z| (as it does through libm's
            // tanh, where 1 + tanh z also cancels).
            let tol = (8.0 + 4.0 * (2.0 * z).abs()) * f32::EPSILON as f64 * want.abs() + 1e-30;
            assert!(
                (got as f64 - want).abs() <= tol,
                "gelu({v}) = {got}, want {want}"
            );
        }
    }

    #[test]
    fn max_is_the_folds() {
        let mut x: Vec<f32> = (0..1003)
            .map(|i| ((i * 7919) % 1003) as f32 * -0.5 + 3.0)
            .collect();
        let fold = |x: &[f32]| x.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
        assert_eq!(max(&x), fold(&x));
        // The largest in the remainder past the last whole chunk, NaN and
        // infinities anywhere, an empty slice.
        x[1001] = 9.0;
        x[5] = f32::NAN;
        x[700] = f32::NEG_INFINITY;
        assert_eq!(max(&x), 9.0);
        x[17] = f32::INFINITY;
        assert_eq!(max(&x), f32::INFINITY);
        assert_eq!(max(&[f32::NAN; 40]), f32::NEG_INFINITY);
        assert_eq!(max(&[]), f32::NEG_INFINITY);
        assert_eq!(max(&x[..16]), fold(&x[..16]));
    }

    #[test]
    fn argmax_is_the_first_largest() {
        let scan = |x: &[f32]| {
            let mut best = 0;
            for (i, &v) in x.iter().enumerate() {
                if v > x[best] {
                    best = i;
                }
            }
            best
        };
        let mut x: Vec<f32> = (0..1003)
            .map(|i| ((i * 7919) % 1003) as f32 * -0.5 + 3.0)
            .collect();
        assert_eq!(argmax(&x), scan(&x));
        // Ties go to the earliest, across lanes and chunks.
        x[40] = 9.0;
        x[7] = 9.0;
        x[900] = 9.0;
        assert_eq!(argmax(&x), 7);
        // The largest in the remainder past the last whole chunk; NaN and
        // infinities; all −∞; an empty slice.
        x[1001] = 10.0;
        x[5] = f32::NAN;
        x[700] = f32::NEG_INFINITY;
        assert_eq!(argmax(&x), 1001);
        x[17] = f32::INFINITY;
        assert_eq!(argmax(&x), 17);
        assert_eq!(argmax(&[f32::NEG_INFINITY; 40]), 0);
        assert_eq!(argmax(&[f32::NAN; 40]), 0);
        assert_eq!(argmax(&[]), 0);
        let mut y = vec![f32::NEG_INFINITY; 40];
        y[33] = -1e30;
        assert_eq!(argmax(&y), 33);
        assert_eq!(argmax(&x[..16]), scan(&x[..16]));
    }

    #[test]
    fn rms_norm_gives_the_portable_bits_close_to_exact() {
        // Rows of 899 (sixteen-lane chunks and a remainder), the SIMD copy
        // against the steps compiled for baseline x86-64, and both against
        // f64.
        let n = 899;
        let x: Vec<f32> = (0..3 * n)
            .map(|i| ((i * 7919) % 1013) as f32 * 0.013 - 6.5)
            .collect();
        let w: Vec<f32> = (0..n).map(|i| 0.5 + (i % 7) as f32 * 0.25).collect();
        let mut out = vec![0f32; x.len()];
        rms_norm(&x, &w, 1e-6, &mut out);
        let mut inplace = x.clone();
        rms_norm_inplace(&mut inplace, &w, 1e-6);
        for (r, xr) in x.chunks_exact(n).enumerate() {
            let scale = 1.0 / (sum_squares(xr) / n as f32 + 1e-6).sqrt();
            let exact = 1.0
                / (xr.iter().map(|&v| v as f64 * v as f64).sum::<f64>() / n as f64 + 1e-6).sqrt();
            for (i, (&v, &g)) in xr.iter().zip(&w).enumerate() {
                let got = out[r * n + i];
                assert_eq!(got.to_bits(), (v * scale * g).to_bits(), "row {r}, {i}");
                assert_eq!(inplace[r * n + i].to_bits(), (v * (scale * g)).to_bits());
                let want = v as f64 * exact * g as f64;
                assert!(
                    (got as f64 - want).abs() <= 1e-5 * (1.0 + want.abs()),
                    "{got} against {want}"
                );
            }
        }
    }

    #[test]
    fn exp_weights_give_the_portable_bits() {
        // The SIMD copy (taken on this CPU unless HANLIN_SIMD says less)
        // against the element function compiled for baseline x86-64: a
        // seeded sample must not depend on the SIMD level.
        let x: Vec<f32> = (0..4099)
            .map(|i| ((i * 7919) % 4099) as f32 * -0.031 + 1.7)
            .collect();
        let (shift, scale) = (1.7f32, 1.0 / 0.7);
        let mut out = vec![0f32; x.len()];
        let total = exp_weights(&x, shift, scale, &mut out);
        let mut lanes = [0f32; 16];
        let mut tail = Vec::new();
        let whole = x.len() / 16 * 16;
        for (i, (&v, &got)) in x.iter().zip(&out).enumerate() {
            let want = exp_nonpositive((v - shift) * scale);
            assert_eq!(got.to_bits(), want.to_bits(), "exp weight {i}");
            if i < whole {
                lanes[i % 16] += want;
            } else {
                tail.push(want);
            }
        }
        let mut want_total = lanes.iter().sum::<f32>();
        for w in tail {
            want_total += w;
        }
        assert_eq!(total.to_bits(), want_total.to_bits());
    }

    #[test]
    fn exp_weights_match_libm_within_two_ulp() {
        let x: Vec<f32> = (0..200_003)
            .map(|i| -(i as f32) * 4.4e-4 - 1e-9 * i as f32)
            .collect();
        let mut out = vec![0f32; x.len()];
        let total = exp_weights(&x, 0.0, 1.0, &mut out);
        let mut want_total = 0f64;
        for (&v, &got) in x.iter().zip(&out) {
            let want = v.exp();
            want_total += want as f64;
            if v < -87.33 {
                assert_eq!(got, 0.0, "exp({v})");
                continue;
            }
            let ulp = (got.to_bits() as i64 - want.to_bits() as i64).abs();
            assert!(ulp <= 2, "exp({v}) = {got}, libm {want} ({ulp} ulp)");
        }
        assert!(
            (total as f64 - want_total).abs() < 1e-5 * want_total,
            "{total} vs {want_total}"
        );
        // Shift and scale: softmax weights with temperature 0.5 (max weight 1).
        let l = [3.0f32, 1.0, -2.0, 3.0, 0.5];
        let mut w = [0f32; 5];
        let z = exp_weights(&l, 3.0, 2.0, &mut w);
        for (&li, &wi) in l.iter().zip(&w) {
            let e = ((li - 3.0) * 2.0).exp();
            assert!(
                (wi - e).abs() <= 2.0 * f32::EPSILON * e.max(f32::MIN_POSITIVE),
                "{wi} vs {e}"
            );
        }
        assert!((z - w.iter().sum::<f32>()).abs() < 1e-6);
    }

    #[test]
    fn rope_preserves_norm_and_is_identity_at_zero() {
        for style in [RopeStyle::Normal, RopeStyle::Neox] {
            let r = Rope::new(style, 8, 10000.0, 1.0);
            let orig: Vec<f32> = (0..16).map(|i| i as f32 - 7.5).collect();
            let mut x = orig.clone();
            r.apply(&mut x, 8, 0);
            assert_eq!(x, orig);
            r.apply(&mut x, 8, 17);
            let n0: f32 = orig.iter().map(|v| v * v).sum();
            let n1: f32 = x.iter().map(|v| v * v).sum();
            assert!((n0 - n1).abs() < 1e-3);
            assert_ne!(x, orig);
        }
    }

    #[test]
    fn softmax_sums_to_one() {
        let mut x = vec![1.0, 2.0, 3.0, 1000.0];
        softmax(&mut x);
        assert!((x.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        assert!(x[3] > 0.999);
    }

    /// Against libm's exponential, with masked (−∞) entries and a span
    /// that is not a multiple of sixteen.
    #[test]
    fn softmax_matches_libm() {
        let x: Vec<f32> = (0..1037)
            .map(|i| {
                if i % 7 == 3 {
                    f32::NEG_INFINITY
                } else {
                    ((i * 37 % 101) as f32 - 50.0) * 0.31
                }
            })
            .collect();
        let max = x.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
        let e: Vec<f64> = x.iter().map(|&v| ((v - max) as f64).exp()).collect();
        let sum: f64 = e.iter().sum();
        let mut y = x.clone();
        softmax(&mut y);
        for (i, (&got, want)) in y.iter().zip(e.iter().map(|v| v / sum)).enumerate() {
            assert!(
                (got as f64 - want).abs() <= 1e-6 * want + 1e-12,
                "{i}: {got} vs {want}"
            );
        }
        assert_eq!(y[3], 0.0, "masked");
        // Zeros appended (masked keys) change no bit.
        let mut z = x.clone();
        z.extend([f32::NEG_INFINITY; 29]);
        softmax(&mut z);
        assert!(y.iter().zip(&z).all(|(a, b)| a.to_bits() == b.to_bits()));
    }

    #[test]
    fn rms_norm_unit_rms() {
        let x = vec![3.0, 4.0];
        let mut o = vec![0.0; 2];
        rms_norm(&x, &[1.0, 1.0], 0.0, &mut o);
        let rms = (o.iter().map(|v| v * v).sum::<f32>() / 2.0).sqrt();
        assert!((rms - 1.0).abs() < 1e-6);
    }
}
