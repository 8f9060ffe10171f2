//! The layers diffusion models are built from, on channels-last f32
//! feature maps: convolutions as Q8_0 matrix products over im2col rows,
//! group norm, multi-head attention, and the ResNet block UNet and VAE
//! share.

use crate::weights::Weights;
use crate::{bad, ImageError};
use hanlin_kernels::attn;
use hanlin_kernels::linear::{layer_norm, Linear};
use hanlin_kernels::ops;
use hanlin_kernels::pool::{SendPtr, ThreadPool};
use hanlin_kernels::quant::{quantize_q8, BlockQ8, QK};

/// A batch of `n` feature maps, `h × w` positions of `c` channels each,
/// channels last: value `(s, y, x, ch)` is at `((s·h + y)·w + x)·c + ch`.
#[derive(Clone, Debug, PartialEq)]
pub struct Feat {
    pub n: usize,
    pub h: usize,
    pub w: usize,
    pub c: usize,
    pub data: Vec<f32>,
}

impl Feat {
    pub fn zeros(n: usize, h: usize, w: usize, c: usize) -> Self {
        Self {
            n,
            h,
            w,
            c,
            data: vec![0.0; n * h * w * c],
        }
    }
    /// Positions per sample.
    pub fn hw(&self) -> usize {
        self.h * self.w
    }
    /// Sample `s`'s values.
    pub fn sample(&self, s: usize) -> &[f32] {
        let m = self.hw() * self.c;
        &self.data[s * m..(s + 1) * m]
    }
    /// From channels-first (`n × c × h × w`, PyTorch's layout).
    pub fn from_nchw(n: usize, c: usize, h: usize, w: usize, x: &[f32]) -> Self {
        let mut f = Self::zeros(n, h, w, c);
        for s in 0..n {
            for ch in 0..c {
                for p in 0..h * w {
                    f.data[(s * h * w + p) * c + ch] = x[(s * c + ch) * h * w + p];
                }
            }
        }
        f
    }
    /// To channels-first.
    pub fn to_nchw(&self) -> Vec<f32> {
        let (hw, c) = (self.hw(), self.c);
        let mut out = vec![0f32; self.data.len()];
        for s in 0..self.n {
            for p in 0..hw {
                for ch in 0..c {
                    out[(s * c + ch) * hw + p] = self.data[(s * hw + p) * c + ch];
                }
            }
        }
        out
    }
    /// Channels of `self` then of `other` at every position (the UNet's
    /// skip connections).
    pub fn concat(&self, other: &Feat) -> Feat {
        assert_eq!((self.n, self.h, self.w), (other.n, other.h, other.w));
        let c = self.c + other.c;
        let mut data = Vec::with_capacity(self.n * self.hw() * c);
        for (a, b) in self
            .data
            .chunks_exact(self.c)
            .zip(other.data.chunks_exact(other.c))
        {
            data.extend_from_slice(a);
            data.extend_from_slice(b);
        }
        Feat {
            n: self.n,
            h: self.h,
            w: self.w,
            c,
            data,
        }
    }
    /// Nearest-neighbour 2× upsampling.
    pub fn upsample2(&self) -> Feat {
        let (h, w, c) = (self.h * 2, self.w * 2, self.c);
        let mut data = Vec::with_capacity(self.n * h * w * c);
        for s in 0..self.n {
            for y in 0..h {
                for x in 0..w {
                    let at = ((s * self.h + y / 2) * self.w + x / 2) * c;
                    data.extend_from_slice(&self.data[at..at + c]);
                }
            }
        }
        Feat {
            n: self.n,
            h,
            w,
            c,
            data,
        }
    }
}

pub fn silu_inplace(x: &mut [f32]) {
    x.iter_mut().for_each(|v| *v = ops::silu(*v));
}

/// A linear layer `prefix.weight` (`out × in`, or `out × in × 1 × 1`) with
/// `prefix.bias` when the file has one.
pub fn linear(w: &Weights, prefix: &str) -> Result<Linear, ImageError> {
    let name = format!("{prefix}.weight");
    let shape = w.shape(&name)?.to_vec();
    let (rows, cols) = match shape[..] {
        [r, c] | [r, c, 1, 1] => (r, c),
        _ => return Err(bad(w.path(), format!("{name} has shape {shape:?}"))),
    };
    let m = w.vec(&name, rows * cols)?;
    let bias = format!("{prefix}.bias");
    let b = if w.has(&bias) {
        w.vec(&bias, rows)?
    } else {
        Vec::new()
    };
    Ok(Linear::new(&m, rows, cols, b))
}

/// Several linear layers with the same input, stacked into one (their
/// outputs side by side in each row): one quantization of the input and
/// one matrix product instead of several.
pub fn linear_cat(w: &Weights, prefixes: &[String]) -> Result<Linear, ImageError> {
    let mut m = Vec::new();
    let mut b = Vec::new();
    let (mut rows, mut cols) = (0, None);
    let mut biased = 0;
    for prefix in prefixes {
        let name = format!("{prefix}.weight");
        let shape = w.shape(&name)?.to_vec();
        let (r, c) = match shape[..] {
            [r, c] | [r, c, 1, 1] => (r, c),
            _ => return Err(bad(w.path(), format!("{name} has shape {shape:?}"))),
        };
        if cols.is_some_and(|k| k != c) {
            return Err(bad(
                w.path(),
                format!("{name}: {c} inputs, unlike the layers beside it"),
            ));
        }
        cols = Some(c);
        m.extend(w.vec(&name, r * c)?);
        let bias = format!("{prefix}.bias");
        if w.has(&bias) {
            b.extend(w.vec(&bias, r)?);
            biased += 1;
        } else {
            b.extend(std::iter::repeat_n(0.0, r));
        }
        rows += r;
    }
    if biased == 0 {
        b.clear();
    }
    Ok(Linear::new(&m, rows, cols.unwrap_or(0), b))
}

/// Input rows of `cols` values (a multiple of 32) from rows of `c`.
fn pad_rows(x: &[f32], c: usize, cols: usize) -> Vec<f32> {
    let n = x.len() / c;
    let mut out = vec![0f32; n * cols];
    for (o, i) in out.chunks_exact_mut(cols).zip(x.chunks_exact(c)) {
        o[..c].copy_from_slice(i);
    }
    out
}

/// `y = x·Wᵀ + b` on rows of `c_in` values, whatever padding the layer needs.
pub fn apply_rows(pool: &ThreadPool, lin: &Linear, x: &[f32], c_in: usize) -> Vec<f32> {
    let mut out = Vec::new();
    if lin.cols == c_in {
        lin.apply(pool, x, &mut out);
    } else {
        lin.apply(pool, &pad_rows(x, c_in, lin.cols), &mut out);
    }
    out
}

/// A 2-D convolution (square kernel, zero padding, one stride).
pub struct Conv2d {
    lin: Linear,
    pub c_in: usize,
    pub c_out: usize,
    k: usize,
    stride: usize,
    /// Zeros before the map's first row and column …
    pad: usize,
    /// … and after its last.
    pad_end: usize,
}

/// im2col rows are built and multiplied this many values at a time.
const BAND_VALUES: usize = 8 << 20;

impl Conv2d {
    /// `prefix.weight` (`out × in × k × k`) and `prefix.bias`.
    pub fn load(w: &Weights, prefix: &str, stride: usize) -> Result<Self, ImageError> {
        let name = format!("{prefix}.weight");
        let shape = w.shape(&name)?.to_vec();
        let [c_out, c_in, k, k2] = shape[..] else {
            return Err(bad(w.path(), format!("{name} has shape {shape:?}")));
        };
        if k != k2 || k.is_multiple_of(2) {
            return Err(bad(w.path(), format!("{name}: a {k}×{k2} kernel")));
        }
        let m = w.vec(&name, c_out * c_in * k * k)?;
        // Rows as (ky, kx, in), the order im2col writes.
        let mut r = vec![0f32; m.len()];
        for o in 0..c_out {
            for i in 0..c_in {
                for t in 0..k * k {
                    r[(o * k * k + t) * c_in + i] = m[(o * c_in + i) * k * k + t];
                }
            }
        }
        let bias = format!("{prefix}.bias");
        let b = if w.has(&bias) {
            w.vec(&bias, c_out)?
        } else {
            Vec::new()
        };
        Ok(Self {
            lin: Linear::new(&r, c_out, k * k * c_in, b),
            c_in,
            c_out,
            k,
            stride,
            pad: k / 2,
            pad_end: k / 2,
        })
    }

    /// Padded with one row and column of zeros after the map only, as
    /// diffusers' VAE encoder pads before each strided convolution.
    pub fn padded_after(mut self) -> Self {
        (self.pad, self.pad_end) = (0, 1);
        self
    }

    pub fn forward(&self, pool: &ThreadPool, x: &Feat) -> Feat {
        assert_eq!(x.c, self.c_in, "conv: input channels");
        let (k, s, p) = (self.k, self.stride, self.pad);
        let oh = (x.h + p + self.pad_end - k) / s + 1;
        let ow = (x.w + p + self.pad_end - k) / s + 1;
        let mut out = Feat::zeros(x.n, oh, ow, self.c_out);
        if k == 1 && s == 1 {
            out.data = apply_rows(pool, &self.lin, &x.data, x.c);
            return out;
        }
        if x.c.is_multiple_of(QK) {
            self.forward_q8(pool, x, &mut out);
            return out;
        }
        let cols = self.lin.cols;
        let total = x.n * oh * ow;
        let band = (BAND_VALUES / cols).clamp(64, total.max(64));
        let mut buf = vec![0f32; band.min(total) * cols];
        let mut r0 = 0;
        while r0 < total {
            let r1 = (r0 + band).min(total);
            let rows = &mut buf[..(r1 - r0) * cols];
            let dst = SendPtr(rows.as_mut_ptr());
            let c = x.c;
            pool.for_chunks(r1 - r0, 64, &|range| {
                for i in range {
                    // SAFETY: row i of this band is written by this job only.
                    let row = unsafe { dst.slice(i * cols, cols) };
                    let (taps, tail) = row.split_at_mut(k * k * c);
                    im2col_row(taps, &x.data, c, 0.0, x, r0 + i, (oh, ow), (k, s, p));
                    tail.fill(0.0);
                }
            });
            self.lin
                .apply_into(pool, rows, &mut out.data[r0 * self.c_out..r1 * self.c_out]);
            r0 = r1;
        }
        out
    }
}

impl Conv2d {
    /// The convolution of a map whose channels fill whole Q8 blocks: the
    /// map is quantized once and im2col copies blocks, instead of
    /// quantizing every value k² times.
    fn forward_q8(&self, pool: &ThreadPool, x: &Feat, out: &mut Feat) {
        let (k, s, p) = (self.k, self.stride, self.pad);
        let (oh, ow) = (out.h, out.w);
        let bpp = x.c / QK;
        let positions = x.n * x.hw();
        let mut q = vec![
            BlockQ8 {
                d: 0.0,
                s: 0.0,
                isum: 0,
                qs: [0; QK]
            };
            positions * bpp
        ];
        {
            let qp = SendBlocks(q.as_mut_ptr());
            pool.for_chunks(positions, 64, &|r| {
                let mut tmp = Vec::with_capacity(bpp);
                for pos in r {
                    quantize_q8(&x.data[pos * x.c..(pos + 1) * x.c], &mut tmp);
                    // SAFETY: each position's blocks are written by this job only.
                    let d = unsafe { qp.slice(pos * bpp, bpp) };
                    d.copy_from_slice(&tmp);
                }
            });
        }
        let zero = BlockQ8 {
            d: 0.0,
            s: 0.0,
            isum: 0,
            qs: [0; QK],
        };
        let row_blocks = k * k * bpp;
        let cols = self.lin.cols;
        debug_assert_eq!(cols, row_blocks * QK);
        let total = x.n * oh * ow;
        let band = (BAND_VALUES / 4 / cols).clamp(64, total.max(64));
        let mut r0 = 0;
        while r0 < total {
            let r1 = (r0 + band).min(total);
            let mut rows = vec![zero; (r1 - r0) * row_blocks];
            let rp = SendBlocks(rows.as_mut_ptr());
            let q = &q;
            pool.for_chunks(r1 - r0, 64, &|range| {
                for i in range {
                    // SAFETY: row i of this band is written by this job only.
                    let row = unsafe { rp.slice(i * row_blocks, row_blocks) };
                    im2col_row(row, q, bpp, zero, x, r0 + i, (oh, ow), (k, s, p));
                }
            });
            self.lin
                .apply_q8(pool, rows, &mut out.data[r0 * self.c_out..r1 * self.c_out]);
            r0 = r1;
        }
    }
}

/// The im2col row of output position `r` (`oh × ow` per sample) of a
/// `k × k` kernel with stride `s` and padding `p`: for each tap in (ky, kx)
/// order, the `unit` values `src` holds for the input position it reads
/// (f32 channels or Q8 blocks), or `zero` outside the map.
#[allow(clippy::too_many_arguments)]
fn im2col_row<T: Copy>(
    row: &mut [T],
    src: &[T],
    unit: usize,
    zero: T,
    x: &Feat,
    r: usize,
    (oh, ow): (usize, usize),
    (k, s, p): (usize, usize, usize),
) {
    let (smp, pos) = (r / (oh * ow), r % (oh * ow));
    let (oy, ox) = (pos / ow, pos % ow);
    for ky in 0..k {
        for kx in 0..k {
            let t = (ky * k + kx) * unit;
            let iy = (oy * s + ky) as isize - p as isize;
            let ix = (ox * s + kx) as isize - p as isize;
            if iy < 0 || ix < 0 || iy >= x.h as isize || ix >= x.w as isize {
                row[t..t + unit].fill(zero);
            } else {
                let at = ((smp * x.h + iy as usize) * x.w + ix as usize) * unit;
                row[t..t + unit].copy_from_slice(&src[at..at + unit]);
            }
        }
    }
}

#[derive(Clone, Copy)]
struct SendBlocks(*mut BlockQ8);
// SAFETY: used only for disjoint writes from pool threads.
unsafe impl Send for SendBlocks {}
unsafe impl Sync for SendBlocks {}

impl SendBlocks {
    /// # Safety
    /// `[off, off + len)` is in bounds and written by no other thread.
    #[allow(clippy::mut_from_ref)]
    unsafe fn slice<'a>(self, off: usize, len: usize) -> &'a mut [BlockQ8] {
        std::slice::from_raw_parts_mut(self.0.add(off), len)
    }
}

/// Group normalisation over each sample's positions and the channels of a
/// group, with a per-channel scale and shift.
pub struct GroupNorm {
    g: Vec<f32>,
    b: Vec<f32>,
    groups: usize,
    eps: f32,
}

impl GroupNorm {
    pub fn load(w: &Weights, prefix: &str, groups: usize, eps: f32) -> Result<Self, ImageError> {
        let name = format!("{prefix}.weight");
        let c = w.shape(&name)?.iter().product::<usize>();
        if groups == 0 || !c.is_multiple_of(groups) {
            return Err(bad(
                w.path(),
                format!("{prefix}: {c} channels in {groups} groups"),
            ));
        }
        Ok(Self {
            g: w.vec(&name, c)?,
            b: w.vec(&format!("{prefix}.bias"), c)?,
            groups,
            eps,
        })
    }

    /// Normalise `x` in place, then apply SiLU when `silu`.
    pub fn apply(&self, pool: &ThreadPool, x: &mut Feat, silu: bool) {
        let c = x.c;
        assert_eq!(c, self.g.len(), "group norm: channels");
        let (groups, cg, hw) = (self.groups, c / self.groups, x.hw());
        // Per-channel sums over position chunks, in f64, then per group.
        const CHUNK: usize = 256;
        let chunks = hw.div_ceil(CHUNK);
        let partial = std::sync::Mutex::new(vec![(0f64, 0f64); x.n * c]);
        {
            let data = &x.data;
            pool.for_chunks(x.n * chunks, 1, &|r| {
                let mut sum = vec![0f32; c];
                let mut sq = vec![0f32; c];
                for job in r {
                    let (s, k) = (job / chunks, job % chunks);
                    sum.fill(0.0);
                    sq.fill(0.0);
                    for p in k * CHUNK..((k + 1) * CHUNK).min(hw) {
                        let row = &data[(s * hw + p) * c..(s * hw + p + 1) * c];
                        for ((a, b), v) in sum.iter_mut().zip(sq.iter_mut()).zip(row) {
                            *a += v;
                            *b += v * v;
                        }
                    }
                    let mut all = partial.lock().unwrap_or_else(|e| e.into_inner());
                    for ch in 0..c {
                        all[s * c + ch].0 += sum[ch] as f64;
                        all[s * c + ch].1 += sq[ch] as f64;
                    }
                }
            });
        }
        let partial = partial.into_inner().unwrap_or_else(|e| e.into_inner());
        // y = x·a + b per sample and channel.
        let mut ab = vec![(0f32, 0f32); x.n * c];
        let m = (hw * cg) as f64;
        for s in 0..x.n {
            for g in 0..groups {
                let (sum, sq) = partial[s * c + g * cg..s * c + (g + 1) * cg]
                    .iter()
                    .fold((0f64, 0f64), |(a, b), (x, y)| (a + x, b + y));
                let mean = sum / m;
                let var = (sq / m - mean * mean).max(0.0);
                let inv = 1.0 / (var + self.eps as f64).sqrt();
                for ch in g * cg..(g + 1) * cg {
                    let a = inv * self.g[ch] as f64;
                    ab[s * c + ch] = (a as f32, (self.b[ch] as f64 - mean * a) as f32);
                }
            }
        }
        let rows = x.n * hw;
        let dst = SendPtr(x.data.as_mut_ptr());
        pool.for_chunks(rows, 256, &|r| {
            for row in r {
                let s = row / hw;
                // SAFETY: each row is written by this job only.
                let v = unsafe { dst.slice(row * c, c) };
                for (x, (a, b)) in v.iter_mut().zip(&ab[s * c..(s + 1) * c]) {
                    *x = *x * a + b;
                }
                if silu {
                    silu_inplace(v);
                }
            }
        });
    }
}

/// Layer norm over each row's channels.
pub struct LayerNorm {
    g: Vec<f32>,
    b: Vec<f32>,
    eps: f32,
}

impl LayerNorm {
    pub fn load(w: &Weights, prefix: &str, eps: f32) -> Result<Self, ImageError> {
        let name = format!("{prefix}.weight");
        let c = w.shape(&name)?.iter().product::<usize>();
        Ok(Self {
            g: w.vec(&name, c)?,
            b: w.vec(&format!("{prefix}.bias"), c)?,
            eps,
        })
    }
    pub fn apply(&self, x: &[f32]) -> Vec<f32> {
        let mut y = x.to_vec();
        layer_norm(&mut y, None, &self.g, &self.b, self.eps);
        y
    }
}

/// Multi-head attention without a mask: `n_q` query rows (`q`, rows
/// `qs` apart) over `n_kv` key and value rows (`k`, `v`, rows `kvs`
/// apart), each `d = heads · hd` wide; returns `n_q` rows of `d`.
#[allow(clippy::too_many_arguments)]
pub fn attention(
    pool: &ThreadPool,
    heads: usize,
    d: usize,
    (q, qs): (&[f32], usize),
    (k, v, kvs): (&[f32], &[f32], usize),
    n_q: usize,
    n_kv: usize,
) -> Vec<f32> {
    let hd = d / heads;
    let scale = 1.0 / (hd as f32).sqrt();
    let mut out = vec![0f32; n_q * d];
    if hd <= 256 {
        attn::dense(
            pool,
            heads,
            hd,
            q,
            qs,
            (k, v, kvs),
            n_q,
            n_kv,
            scale,
            &mut out,
        );
        return out;
    }
    // Wide heads (a VAE's single 512-wide head): one query at a time.
    let dst = SendPtr(out.as_mut_ptr());
    pool.for_chunks(n_q * heads, 4, &|r| {
        let mut p = vec![0f32; n_kv];
        for job in r {
            let (i, h) = (job / heads, job % heads);
            let qi = &q[i * qs + h * hd..i * qs + (h + 1) * hd];
            for (j, pj) in p.iter_mut().enumerate() {
                *pj = ops::dot_f32(qi, &k[j * kvs + h * hd..j * kvs + (h + 1) * hd]) * scale;
            }
            ops::softmax(&mut p);
            // SAFETY: each (query, head) slice is written by this job only.
            let o = unsafe { dst.slice(i * d + h * hd, hd) };
            for (j, pj) in p.iter().enumerate() {
                ops::axpy(o, *pj, &v[j * kvs + h * hd..j * kvs + (h + 1) * hd]);
            }
        }
    });
    out
}

/// diffusers' `ResnetBlock2D`: norm, SiLU, conv, plus the projected time
/// embedding; norm, SiLU, conv; plus the input (through a 1×1 convolution
/// when the channel count changes).
pub struct Resnet {
    norm1: GroupNorm,
    conv1: Conv2d,
    /// The time embedding's projection: a bias per channel, or (diffusers'
    /// `resnet_time_scale_shift = "scale_shift"`, twice as many rows) a
    /// scale and a shift of the normed features.
    temb: Option<Linear>,
    norm2: GroupNorm,
    conv2: Conv2d,
    shortcut: Option<Conv2d>,
}

impl Resnet {
    pub fn load(w: &Weights, prefix: &str, groups: usize, eps: f32) -> Result<Self, ImageError> {
        let temb = format!("{prefix}.time_emb_proj");
        let shortcut = format!("{prefix}.conv_shortcut");
        let conv1 = Conv2d::load(w, &format!("{prefix}.conv1"), 1)?;
        let temb = if w.has(&format!("{temb}.weight")) {
            let l = linear(w, &temb)?;
            if l.rows != conv1.c_out && l.rows != 2 * conv1.c_out {
                return Err(bad(
                    w.path(),
                    format!(
                        "{prefix}: {} time embedding rows for {} channels",
                        l.rows, conv1.c_out
                    ),
                ));
            }
            Some(l)
        } else {
            None
        };
        Ok(Self {
            norm1: GroupNorm::load(w, &format!("{prefix}.norm1"), groups, eps)?,
            conv1,
            temb,
            norm2: GroupNorm::load(w, &format!("{prefix}.norm2"), groups, eps)?,
            conv2: Conv2d::load(w, &format!("{prefix}.conv2"), 1)?,
            shortcut: if w.has(&format!("{shortcut}.weight")) {
                Some(Conv2d::load(w, &shortcut, 1)?)
            } else {
                None
            },
        })
    }

    pub fn c_in(&self) -> usize {
        self.conv1.c_in
    }

    pub fn out_channels(&self) -> usize {
        self.conv2.c_out
    }

    /// `temb`: the SiLU of each sample's time embedding (`n` rows), for
    /// blocks that take one.
    pub fn forward(&self, pool: &ThreadPool, x: &Feat, temb: Option<&[f32]>) -> Feat {
        let mut h = x.clone();
        self.norm1.apply(pool, &mut h, true);
        let mut h = self.conv1.forward(pool, &h);
        let (c, hw) = (h.c, h.hw());
        let e = match (&self.temb, temb) {
            (Some(proj), Some(t)) => Some(apply_rows(pool, proj, t, t.len() / x.n)),
            _ => None,
        };
        match e {
            // (1 + scale) · norm(h) + shift, then SiLU.
            Some(e) if e.len() == 2 * c * x.n => {
                self.norm2.apply(pool, &mut h, false);
                for (s, e) in e.chunks_exact(2 * c).enumerate() {
                    let (scale, shift) = e.split_at(c);
                    for row in h.data[s * hw * c..(s + 1) * hw * c].chunks_exact_mut(c) {
                        for ((v, a), b) in row.iter_mut().zip(scale).zip(shift) {
                            *v = *v * (1.0 + a) + b;
                        }
                    }
                }
                silu_inplace(&mut h.data);
            }
            // A bias per channel, then norm and SiLU.
            Some(e) => {
                for (s, e) in e.chunks_exact(c).enumerate() {
                    for row in h.data[s * hw * c..(s + 1) * hw * c].chunks_exact_mut(c) {
                        ops::add_inplace(row, e);
                    }
                }
                self.norm2.apply(pool, &mut h, true);
            }
            None => self.norm2.apply(pool, &mut h, true),
        }
        let mut h = self.conv2.forward(pool, &h);
        match &self.shortcut {
            Some(sc) => ops::add_inplace(&mut h.data, &sc.forward(pool, x).data),
            None => ops::add_inplace(&mut h.data, &x.data),
        }
        h
    }
}

/// The number of `prefix.{i}.` entries present (checked by `probe`).
pub fn count(w: &Weights, prefix: &str, probe: &str) -> usize {
    (0..)
        .take_while(|i| w.has(&format!("{prefix}.{i}.{probe}")))
        .count()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(q: &[f32], k: &[f32], v: &[f32], d: usize, n_q: usize, n_kv: usize) -> Vec<f32> {
        let mut out = vec![0f32; n_q * d];
        for i in 0..n_q {
            let s: Vec<f32> = (0..n_kv)
                .map(|j| {
                    (0..d).map(|t| q[i * d + t] * k[j * d + t]).sum::<f32>() / (d as f32).sqrt()
                })
                .collect();
            let m = s.iter().copied().fold(f32::MIN, f32::max);
            let e: Vec<f32> = s.iter().map(|x| (x - m).exp()).collect();
            let z: f32 = e.iter().sum();
            for t in 0..d {
                out[i * d + t] = (0..n_kv).map(|j| e[j] / z * v[j * d + t]).sum();
            }
        }
        out
    }

    #[test]
    fn one_wide_head_and_narrow_heads_match_the_formula() {
        let pool = ThreadPool::new(2);
        let val = |i: usize| ((i * 7919 % 1000) as f32 / 500.0) - 1.0;
        for (heads, d) in [(1, 288), (1, 64), (4, 160)] {
            let (n_q, n_kv) = (9, 13);
            let q: Vec<f32> = (0..n_q * d).map(|i| val(i + 3) * 0.2).collect();
            let k: Vec<f32> = (0..n_kv * d).map(|i| val(i + 77) * 0.2).collect();
            let v: Vec<f32> = (0..n_kv * d).map(|i| val(i + 5)).collect();
            let got = attention(&pool, heads, d, (&q, d), (&k, &v, d), n_q, n_kv);
            let hd = d / heads;
            for h in 0..heads {
                let pick = |x: &[f32], n: usize| -> Vec<f32> {
                    (0..n)
                        .flat_map(|r| x[r * d + h * hd..r * d + (h + 1) * hd].to_vec())
                        .collect()
                };
                let want = naive(
                    &pick(&q, n_q),
                    &pick(&k, n_kv),
                    &pick(&v, n_kv),
                    hd,
                    n_q,
                    n_kv,
                );
                let got = pick(&got, n_q);
                for (a, b) in got.iter().zip(&want) {
                    assert!((a - b).abs() < 1e-4, "{heads}×{hd}: {a} vs {b}");
                }
            }
        }
    }

    #[test]
    fn feature_maps_convert_concatenate_and_upsample() {
        let x: Vec<f32> = (0..2 * 3 * 2 * 2).map(|i| i as f32).collect();
        let f = Feat::from_nchw(2, 3, 2, 2, &x);
        assert_eq!(f.to_nchw(), x);
        let c = f.concat(&f);
        assert_eq!(
            (c.c, c.data[..6].to_vec()),
            (6, vec![0.0, 4.0, 8.0, 0.0, 4.0, 8.0])
        );
        let u = f.upsample2();
        assert_eq!((u.h, u.w), (4, 4));
        assert_eq!(&u.data[..3], &u.data[3..6], "neighbours copy one value");
    }
}
