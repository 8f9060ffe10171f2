//! A small Stable-Diffusion-shaped text-to-image model in burn, made to be
//! trained here: CLIP's text transformer (causal, quick-GELU, final layer
//! norm) and diffusers' `UNet2DConditionModel` (ResNet blocks with the time
//! embedding, spatial transformers with self- and cross-attention and a
//! GEGLU feed-forward, strided-convolution downsampling, nearest
//! upsampling). It denoises pixels (no VAE), so it trains in minutes.
//!
//! [`TextToImage::export`] writes a diffusers directory — the same weight
//! names, shapes and configs transformers and diffusers use — that
//! `hanlin-image` loads like any downloaded model.

use crate::{io_err, TrainError};
use burn::module::{Module, Param};
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::{
    Embedding, EmbeddingConfig, GroupNorm, GroupNormConfig, LayerNorm, LayerNormConfig, Linear,
    LinearConfig, PaddingConfig2d,
};
use burn::tensor::activation::{gelu, sigmoid, silu, softmax};
use burn::tensor::module::interpolate;
use burn::tensor::ops::{InterpolateMode, InterpolateOptions};
use burn::tensor::{Device, Int, Tensor, TensorData};
use serde::{Deserialize, Serialize};
use serde_json::json;
use std::path::Path;

/// The model's shape.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ImageModelConfig {
    /// Image side in pixels.
    #[serde(default = "d_side")]
    pub side: usize,
    /// Channels of each UNet level; each level after the first halves the side.
    #[serde(default = "d_channels")]
    pub channels: Vec<usize>,
    /// Which levels have spatial transformers (the middle block always has one).
    #[serde(default = "d_attention")]
    pub attention: Vec<bool>,
    #[serde(default = "d_heads")]
    pub heads: usize,
    #[serde(default = "d_groups")]
    pub groups: usize,
    /// Text encoder width, layers and heads.
    #[serde(default = "d_text_dim")]
    pub text_dim: usize,
    #[serde(default = "d_text_layers")]
    pub text_layers: usize,
    #[serde(default = "d_heads")]
    pub text_heads: usize,
    /// Tokens per caption, with the start and end tokens.
    #[serde(default = "d_max_len")]
    pub max_len: usize,
    /// Add the caption, attention-pooled, to the time embedding (diffusers'
    /// `addition_embed_type = "text"`): a global path for what the whole
    /// picture must show, beside the cross-attention's local one.
    #[serde(default = "d_true")]
    pub text_in_time: bool,
    /// ResNet blocks scale and shift their normed features by the time
    /// (and text) embedding (diffusers' `resnet_time_scale_shift =
    /// "scale_shift"`), rather than adding it as a bias.
    #[serde(default = "d_true")]
    pub scale_shift: bool,
    /// Two more input channels, each pixel's column and row in [−1, 1]
    /// (`hanlin_coord_channels` in the exported UNet's `config.json`;
    /// `hanlin-image` appends them, as inpainting pipelines append a mask):
    /// where "on the left" is, without having to infer it from the
    /// convolutions' zero padding.
    #[serde(default = "d_true")]
    pub coords: bool,
}

fn d_side() -> usize {
    32
}
fn d_channels() -> Vec<usize> {
    vec![32, 64, 128]
}
fn d_attention() -> Vec<bool> {
    vec![false, true, true]
}
fn d_heads() -> usize {
    4
}
fn d_groups() -> usize {
    8
}
fn d_text_dim() -> usize {
    64
}
fn d_text_layers() -> usize {
    2
}
fn d_max_len() -> usize {
    32
}
fn d_true() -> bool {
    true
}

impl Default for ImageModelConfig {
    fn default() -> Self {
        Self {
            side: d_side(),
            channels: d_channels(),
            attention: d_attention(),
            heads: d_heads(),
            groups: d_groups(),
            text_dim: d_text_dim(),
            text_layers: d_text_layers(),
            text_heads: d_heads(),
            max_len: d_max_len(),
            text_in_time: d_true(),
            scale_shift: d_true(),
            coords: d_true(),
        }
    }
}

impl ImageModelConfig {
    pub fn validate(&self) -> Result<(), TrainError> {
        let bad = |m: String| Err(TrainError::Config(m));
        if self.channels.is_empty() || self.channels.len() != self.attention.len() {
            return bad("channels and attention need one entry per level".into());
        }
        let down = 1usize << (self.channels.len() - 1);
        if self.side == 0 || !self.side.is_multiple_of(down) || self.side > 256 {
            return bad(format!(
                "side {} must be a multiple of {down} and at most 256",
                self.side
            ));
        }
        for &c in &self.channels {
            if c == 0
                || !c.is_multiple_of(self.groups.max(1))
                || !c.is_multiple_of(self.heads.max(1))
            {
                return bad(format!(
                    "{c} channels are not divisible into {} groups and {} heads",
                    self.groups, self.heads
                ));
            }
        }
        if self.text_dim == 0 || !self.text_dim.is_multiple_of(self.text_heads.max(1)) {
            return bad(format!(
                "text width {} is not divisible into {} heads",
                self.text_dim, self.text_heads
            ));
        }
        if self.text_in_time && !self.text_dim.is_multiple_of(self.heads.max(1)) {
            return bad(format!(
                "text width {} is not divisible into {} heads for pooling",
                self.text_dim, self.heads
            ));
        }
        if !(4..=77).contains(&self.max_len) || self.text_layers == 0 {
            return bad("max_len must be 4–77 and text_layers at least 1".into());
        }
        Ok(())
    }
}

fn linear(d_in: usize, d_out: usize, bias: bool, device: &Device) -> Linear {
    LinearConfig::new(d_in, d_out).with_bias(bias).init(device)
}

fn conv(c_in: usize, c_out: usize, k: usize, stride: usize, device: &Device) -> Conv2d {
    let p = k / 2;
    Conv2dConfig::new([c_in, c_out], [k, k])
        .with_stride([stride, stride])
        .with_padding(PaddingConfig2d::Explicit(p, p, p, p))
        .init(device)
}

fn group_norm(groups: usize, c: usize, eps: f64, device: &Device) -> GroupNorm {
    GroupNormConfig::new(groups, c)
        .with_epsilon(eps)
        .init(device)
}

/// Multi-head attention of `q` `[b, n, d]` over `k`, `v` `[b, m, d]`, with
/// an optional additive mask `[n, m]`.
fn attend(
    q: Tensor<3>,
    k: Tensor<3>,
    v: Tensor<3>,
    heads: usize,
    mask: Option<Tensor<2>>,
) -> Tensor<3> {
    let [b, n, d] = q.dims();
    let m = k.dims()[1];
    let hd = d / heads;
    let split = |t: Tensor<3>, len: usize| t.reshape([b, len, heads, hd]).swap_dims(1, 2);
    let (q, k, v) = (split(q, n), split(k, m), split(v, m));
    let mut s = q
        .matmul(k.swap_dims(2, 3))
        .mul_scalar(1.0 / (hd as f64).sqrt());
    if let Some(mask) = mask {
        s = s + mask.reshape([1, 1, n, m]);
    }
    softmax(s, 3).matmul(v).swap_dims(1, 2).reshape([b, n, d])
}

// ---------------------------------------------------------------- text

#[derive(Module, Debug)]
pub struct ClipLayer {
    ln1: LayerNorm,
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    ln2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
}

/// CLIP's text transformer.
#[derive(Module, Debug)]
pub struct TextModel {
    tokens: Embedding,
    positions: Param<Tensor<2>>,
    layers: Vec<ClipLayer>,
    final_ln: LayerNorm,
    heads: usize,
}

impl TextModel {
    fn new(cfg: &ImageModelConfig, vocab: usize, device: &Device) -> Self {
        let d = cfg.text_dim;
        let layers = (0..cfg.text_layers)
            .map(|_| ClipLayer {
                ln1: LayerNormConfig::new(d).init(device),
                q: linear(d, d, true, device),
                k: linear(d, d, true, device),
                v: linear(d, d, true, device),
                o: linear(d, d, true, device),
                ln2: LayerNormConfig::new(d).init(device),
                fc1: linear(d, 4 * d, true, device),
                fc2: linear(4 * d, d, true, device),
            })
            .collect();
        let init = burn::nn::Initializer::Normal {
            mean: 0.0,
            std: 0.02,
        };
        Self {
            tokens: EmbeddingConfig::new(vocab, d)
                .with_initializer(init.clone())
                .init(device),
            positions: init.init([cfg.max_len, d], device),
            layers,
            final_ln: LayerNormConfig::new(d).init(device),
            heads: cfg.text_heads,
        }
    }

    /// The last hidden state `[b, n, d]` for token ids `[b, n]`.
    pub fn forward(&self, ids: Tensor<2, Int>) -> Tensor<3> {
        let [_, n] = ids.dims();
        let device = ids.device();
        let d = self.positions.dims()[1];
        let mut x = self.tokens.forward(ids) + self.positions.val().reshape([1, n, d]);
        let mask: Vec<f32> = (0..n * n)
            .map(|i| if i % n > i / n { -1e9 } else { 0.0 })
            .collect();
        let mask = Tensor::<2>::from_data(TensorData::new(mask, [n, n]), &device);
        for l in &self.layers {
            let h = l.ln1.forward(x.clone());
            let a = attend(
                l.q.forward(h.clone()),
                l.k.forward(h.clone()),
                l.v.forward(h),
                self.heads,
                Some(mask.clone()),
            );
            x = x + l.o.forward(a);
            let h = l.fc1.forward(l.ln2.forward(x.clone()));
            // quick GELU
            let h = h.clone() * sigmoid(h.mul_scalar(1.702));
            x = x + l.fc2.forward(h);
        }
        self.final_ln.forward(x)
    }
}

// ---------------------------------------------------------------- UNet

/// diffusers' `TextTimeEmbedding`: the text, layer-normed, pooled by one
/// attention query (the mean token plus a learnt offset) and projected to
/// the time embedding's width.
#[derive(Module, Debug)]
pub struct TextTime {
    norm1: LayerNorm,
    offset: Param<Tensor<2>>,
    q: Linear,
    k: Linear,
    v: Linear,
    proj: Linear,
    norm2: LayerNorm,
    heads: usize,
}

impl TextTime {
    fn new(d: usize, temb: usize, heads: usize, device: &Device) -> Self {
        let init = burn::nn::Initializer::Normal {
            mean: 0.0,
            std: 1.0 / (d as f64).sqrt(),
        };
        Self {
            norm1: LayerNormConfig::new(d).init(device),
            offset: init.init([1, d], device),
            q: linear(d, d, true, device),
            k: linear(d, d, true, device),
            v: linear(d, d, true, device),
            proj: linear(d, temb, true, device),
            norm2: LayerNormConfig::new(temb).init(device),
            heads,
        }
    }

    /// `[b, temb]` from the text `[b, n, d]`.
    fn forward(&self, ctx: &Tensor<3>) -> Tensor<2> {
        let [b, _, d] = ctx.dims();
        let x = self.norm1.forward(ctx.clone());
        let cls = x.clone().mean_dim(1) + self.offset.val().reshape([1, 1, d]);
        let all = Tensor::cat(vec![cls.clone(), x], 1);
        let a = attend(
            self.q.forward(cls),
            self.k.forward(all.clone()),
            self.v.forward(all),
            self.heads,
            None,
        );
        let t = self.norm2.forward(self.proj.forward(a));
        let w = t.dims()[2];
        t.reshape([b, w])
    }
}

#[derive(Module, Debug)]
pub struct Resnet {
    norm1: GroupNorm,
    conv1: Conv2d,
    temb: Linear,
    norm2: GroupNorm,
    conv2: Conv2d,
    shortcut: Option<Conv2d>,
    scale_shift: bool,
}

impl Resnet {
    fn new(
        c_in: usize,
        c_out: usize,
        temb: usize,
        cfg: &ImageModelConfig,
        device: &Device,
    ) -> Self {
        let groups = cfg.groups;
        let proj = if cfg.scale_shift { 2 * c_out } else { c_out };
        Self {
            norm1: group_norm(groups, c_in, 1e-5, device),
            conv1: conv(c_in, c_out, 3, 1, device),
            temb: linear(temb, proj, true, device),
            norm2: group_norm(groups, c_out, 1e-5, device),
            conv2: conv(c_out, c_out, 3, 1, device),
            shortcut: (c_in != c_out).then(|| conv(c_in, c_out, 1, 1, device)),
            scale_shift: cfg.scale_shift,
        }
    }

    fn forward(&self, x: Tensor<4>, temb: &Tensor<2>) -> Tensor<4> {
        let h = self.conv1.forward(silu(self.norm1.forward(x.clone())));
        let [b, c, _, _] = h.dims();
        let e = self.temb.forward(silu(temb.clone()));
        let h = if self.scale_shift {
            let scale = e.clone().slice([0..b, 0..c]).reshape([b, c, 1, 1]);
            let shift = e.slice([0..b, c..2 * c]).reshape([b, c, 1, 1]);
            self.norm2.forward(h) * (scale + 1.0) + shift
        } else {
            self.norm2.forward(h + e.reshape([b, c, 1, 1]))
        };
        let h = self.conv2.forward(silu(h));
        let x = match &self.shortcut {
            Some(s) => s.forward(x),
            None => x,
        };
        x + h
    }
}

/// diffusers' `Transformer2DModel` with one `BasicTransformerBlock` and
/// linear projections.
#[derive(Module, Debug)]
pub struct SpatialTransformer {
    norm: GroupNorm,
    proj_in: Linear,
    ln1: LayerNorm,
    q1: Linear,
    k1: Linear,
    v1: Linear,
    o1: Linear,
    ln2: LayerNorm,
    q2: Linear,
    k2: Linear,
    v2: Linear,
    o2: Linear,
    ln3: LayerNorm,
    ff_in: Linear,
    ff_out: Linear,
    proj_out: Linear,
    heads: usize,
}

impl SpatialTransformer {
    fn new(c: usize, ctx: usize, heads: usize, groups: usize, device: &Device) -> Self {
        Self {
            norm: group_norm(groups, c, 1e-6, device),
            proj_in: linear(c, c, true, device),
            ln1: LayerNormConfig::new(c).init(device),
            q1: linear(c, c, false, device),
            k1: linear(c, c, false, device),
            v1: linear(c, c, false, device),
            o1: linear(c, c, true, device),
            ln2: LayerNormConfig::new(c).init(device),
            q2: linear(c, c, false, device),
            k2: linear(ctx, c, false, device),
            v2: linear(ctx, c, false, device),
            o2: linear(c, c, true, device),
            ln3: LayerNormConfig::new(c).init(device),
            ff_in: linear(c, 8 * c, true, device),
            ff_out: linear(4 * c, c, true, device),
            proj_out: linear(c, c, true, device),
            heads,
        }
    }

    fn forward(&self, x: Tensor<4>, ctx: &Tensor<3>) -> Tensor<4> {
        let [b, c, h, w] = x.dims();
        let t = self
            .norm
            .forward(x.clone())
            .reshape([b, c, h * w])
            .swap_dims(1, 2);
        let mut t = self.proj_in.forward(t);
        let a = self.ln1.forward(t.clone());
        let a = attend(
            self.q1.forward(a.clone()),
            self.k1.forward(a.clone()),
            self.v1.forward(a),
            self.heads,
            None,
        );
        t = t + self.o1.forward(a);
        let a = self.ln2.forward(t.clone());
        let a = attend(
            self.q2.forward(a),
            self.k2.forward(ctx.clone()),
            self.v2.forward(ctx.clone()),
            self.heads,
            None,
        );
        t = t + self.o2.forward(a);
        let f = self.ff_in.forward(self.ln3.forward(t.clone()));
        let [hidden, gate]: [Tensor<3>; 2] = match f.chunk(2, 2).try_into() {
            Ok(p) => p,
            Err(_) => unreachable!("chunk(2) of an even width gives two halves"),
        };
        t = t + self.ff_out.forward(hidden * gelu(gate));
        let t = self
            .proj_out
            .forward(t)
            .swap_dims(1, 2)
            .reshape([b, c, h, w]);
        t + x
    }
}

#[derive(Module, Debug)]
pub struct Level {
    resnets: Vec<Resnet>,
    attentions: Vec<SpatialTransformer>,
    /// Downsampling (down levels but the last) or upsampling (up levels but
    /// the last) convolution.
    sample: Option<Conv2d>,
}

#[derive(Module, Debug)]
pub struct Unet {
    time1: Linear,
    time2: Linear,
    text_time: Option<TextTime>,
    conv_in: Conv2d,
    down: Vec<Level>,
    mid: Level,
    up: Vec<Level>,
    norm_out: GroupNorm,
    conv_out: Conv2d,
    base: usize,
    coords: bool,
}

/// The UNet's input channels: RGB, and the coordinates when asked for.
fn in_channels(cfg: &ImageModelConfig) -> usize {
    if cfg.coords {
        5
    } else {
        3
    }
}

/// Each pixel's column then row as `hanlin-image` gives them to the UNet
/// (one definition, so training and inference agree): `[b, 2, h, w]`.
fn coordinates(b: usize, h: usize, w: usize, device: &Device) -> Tensor<4> {
    let v = hanlin_image::unet::coordinates(b, h, w).to_nchw();
    Tensor::from_data(TensorData::new(v, [b, 2, h, w]), device)
}

/// Layers per level (diffusers' `layers_per_block`).
const LAYERS: usize = 1;

/// Steps and guidance an exported model is drawn with by default
/// (`hanlin_defaults`): the settings the recipe's model scored best with in
/// `bench/image_eval.py`, tuned on captions of another generator seed than
/// the one reported. Guidance applies at every step.
pub const SAMPLE_STEPS: usize = 30;
pub const SAMPLE_GUIDANCE: f32 = 2.0;

impl Unet {
    fn new(cfg: &ImageModelConfig, device: &Device) -> Self {
        let ch = &cfg.channels;
        let (g, heads, ctx) = (cfg.groups, cfg.heads, cfg.text_dim);
        let temb = 4 * ch[0];
        let levels = ch.len();
        let mut down = Vec::new();
        let mut prev = ch[0];
        for (i, &c) in ch.iter().enumerate() {
            let mut resnets = Vec::new();
            let mut attentions = Vec::new();
            for j in 0..LAYERS {
                resnets.push(Resnet::new(
                    if j == 0 { prev } else { c },
                    c,
                    temb,
                    cfg,
                    device,
                ));
                if cfg.attention[i] {
                    attentions.push(SpatialTransformer::new(c, ctx, heads, g, device));
                }
            }
            let sample = (i + 1 < levels).then(|| conv(c, c, 3, 2, device));
            down.push(Level {
                resnets,
                attentions,
                sample,
            });
            prev = c;
        }
        let top = ch[levels - 1];
        let mid = Level {
            resnets: vec![
                Resnet::new(top, top, temb, cfg, device),
                Resnet::new(top, top, temb, cfg, device),
            ],
            attentions: vec![SpatialTransformer::new(top, ctx, heads, g, device)],
            sample: None,
        };
        let mut up = Vec::new();
        let rev: Vec<usize> = ch.iter().rev().copied().collect();
        let mut prev_out = top;
        for (i, &c) in rev.iter().enumerate() {
            let input = rev[(i + 1).min(levels - 1)];
            let attn = cfg.attention[levels - 1 - i];
            let mut resnets = Vec::new();
            let mut attentions = Vec::new();
            for j in 0..=LAYERS {
                let skip = if j == LAYERS { input } else { c };
                let c_in = if j == 0 { prev_out } else { c };
                resnets.push(Resnet::new(c_in + skip, c, temb, cfg, device));
                if attn {
                    attentions.push(SpatialTransformer::new(c, ctx, heads, g, device));
                }
            }
            let sample = (i + 1 < levels).then(|| conv(c, c, 3, 1, device));
            up.push(Level {
                resnets,
                attentions,
                sample,
            });
            prev_out = c;
        }
        Self {
            time1: linear(ch[0], temb, true, device),
            time2: linear(temb, temb, true, device),
            text_time: cfg
                .text_in_time
                .then(|| TextTime::new(ctx, temb, cfg.heads, device)),
            conv_in: conv(in_channels(cfg), ch[0], 3, 1, device),
            down,
            mid,
            up,
            norm_out: group_norm(g, ch[0], 1e-5, device),
            conv_out: conv(ch[0], 3, 3, 1, device),
            base: ch[0],
            coords: cfg.coords,
        }
    }

    /// The sinusoidal timestep features diffusers' `Timesteps` gives with
    /// `flip_sin_to_cos` and no shift: `[cos, sin]` of `t·10000^(−i/half)`.
    fn timestep_features(&self, t: &[f32], device: &Device) -> Tensor<2> {
        let half = self.base / 2;
        let mut v = Vec::with_capacity(t.len() * self.base);
        for &t in t {
            let f = |i: usize| t * (-(10000f32.ln()) * i as f32 / half as f32).exp();
            v.extend((0..half).map(|i| f(i).cos()));
            v.extend((0..half).map(|i| f(i).sin()));
        }
        Tensor::from_data(TensorData::new(v, [t.len(), self.base]), device)
    }

    /// The predicted noise for noisy images `x` `[b, 3, s, s]` at timesteps
    /// `t`, attending to text `ctx` `[b, n, d]`.
    pub fn forward(&self, x: Tensor<4>, t: &[f32], ctx: &Tensor<3>) -> Tensor<4> {
        let device = x.device();
        let mut temb = self
            .time2
            .forward(silu(self.time1.forward(self.timestep_features(t, &device))));
        if let Some(tt) = &self.text_time {
            temb = temb + tt.forward(ctx);
        }
        let x = if self.coords {
            let [b, _, hh, ww] = x.dims();
            Tensor::cat(vec![x, coordinates(b, hh, ww, &device)], 1)
        } else {
            x
        };
        let mut h = self.conv_in.forward(x);
        let mut skips = vec![h.clone()];
        for l in &self.down {
            for (j, r) in l.resnets.iter().enumerate() {
                h = r.forward(h, &temb);
                if let Some(a) = l.attentions.get(j) {
                    h = a.forward(h, ctx);
                }
                skips.push(h.clone());
            }
            if let Some(s) = &l.sample {
                h = s.forward(h);
                skips.push(h.clone());
            }
        }
        h = self.mid.resnets[0].forward(h, &temb);
        h = self.mid.attentions[0].forward(h, ctx);
        h = self.mid.resnets[1].forward(h, &temb);
        for l in &self.up {
            for (j, r) in l.resnets.iter().enumerate() {
                let skip = skips.pop().unwrap_or_else(|| h.clone());
                h = r.forward(Tensor::cat(vec![h, skip], 1), &temb);
                if let Some(a) = l.attentions.get(j) {
                    h = a.forward(h, ctx);
                }
            }
            if let Some(s) = &l.sample {
                let [_, _, hh, ww] = h.dims();
                h = interpolate(
                    h,
                    InterpolateOptions::new(InterpolateMode::Nearest)
                        .with_output_size([2 * hh, 2 * ww]),
                );
                h = s.forward(h);
            }
        }
        self.conv_out.forward(silu(self.norm_out.forward(h)))
    }
}

// ---------------------------------------------------------------- model

/// The text encoder and the UNet, trained together.
#[derive(Module, Debug)]
pub struct TextToImage {
    pub text: TextModel,
    pub unet: Unet,
}

/// DDPM's linear β schedule over 1,000 steps (what the exported scheduler
/// config names): ᾱ_t for each t.
pub fn alphas_cumprod() -> Vec<f32> {
    let n = 1000;
    let (b0, b1) = (1e-4f64, 0.02f64);
    let mut acc = 1.0f64;
    (0..n)
        .map(|i| {
            let beta = b0 + (b1 - b0) * i as f64 / (n - 1) as f64;
            acc *= 1.0 - beta;
            acc as f32
        })
        .collect()
}

impl TextToImage {
    pub fn new(cfg: &ImageModelConfig, vocab: usize, device: &Device) -> Self {
        Self {
            text: TextModel::new(cfg, vocab, device),
            unet: Unet::new(cfg, device),
        }
    }

    /// The predicted noise for `x` at `t` given caption token ids `[b, n]`.
    pub fn forward(&self, x: Tensor<4>, t: &[f32], ids: Tensor<2, Int>) -> Tensor<4> {
        let ctx = self.text.forward(ids);
        self.unet.forward(x, t, &ctx)
    }

    /// Every weight under the name transformers (text encoder) or diffusers
    /// (UNet) gives it, in PyTorch's layout (linear weights `[out, in]`).
    fn named(&self) -> (Vec<Named>, Vec<Named>) {
        let mut text = Vec::new();
        let p = "text_model";
        push_param(
            &mut text,
            &format!("{p}.embeddings.token_embedding.weight"),
            &self.text.tokens.weight,
        );
        push_param(
            &mut text,
            &format!("{p}.embeddings.position_embedding.weight"),
            &self.text.positions,
        );
        for (i, l) in self.text.layers.iter().enumerate() {
            let n = format!("{p}.encoder.layers.{i}");
            push_ln(&mut text, &format!("{n}.layer_norm1"), &l.ln1);
            push_linear(&mut text, &format!("{n}.self_attn.q_proj"), &l.q);
            push_linear(&mut text, &format!("{n}.self_attn.k_proj"), &l.k);
            push_linear(&mut text, &format!("{n}.self_attn.v_proj"), &l.v);
            push_linear(&mut text, &format!("{n}.self_attn.out_proj"), &l.o);
            push_ln(&mut text, &format!("{n}.layer_norm2"), &l.ln2);
            push_linear(&mut text, &format!("{n}.mlp.fc1"), &l.fc1);
            push_linear(&mut text, &format!("{n}.mlp.fc2"), &l.fc2);
        }
        push_ln(
            &mut text,
            &format!("{p}.final_layer_norm"),
            &self.text.final_ln,
        );

        let u = &self.unet;
        let mut w = Vec::new();
        push_linear(&mut w, "time_embedding.linear_1", &u.time1);
        push_linear(&mut w, "time_embedding.linear_2", &u.time2);
        if let Some(tt) = &u.text_time {
            push_ln(&mut w, "add_embedding.norm1", &tt.norm1);
            push_param(
                &mut w,
                "add_embedding.pool.positional_embedding",
                &tt.offset,
            );
            push_linear(&mut w, "add_embedding.pool.q_proj", &tt.q);
            push_linear(&mut w, "add_embedding.pool.k_proj", &tt.k);
            push_linear(&mut w, "add_embedding.pool.v_proj", &tt.v);
            push_linear(&mut w, "add_embedding.proj", &tt.proj);
            push_ln(&mut w, "add_embedding.norm2", &tt.norm2);
        }
        push_conv(&mut w, "conv_in", &u.conv_in);
        for (i, l) in u.down.iter().enumerate() {
            push_level(&mut w, &format!("down_blocks.{i}"), l, "downsamplers");
        }
        push_level(&mut w, "mid_block", &u.mid, "");
        for (i, l) in u.up.iter().enumerate() {
            push_level(&mut w, &format!("up_blocks.{i}"), l, "upsamplers");
        }
        push_gn(&mut w, "conv_norm_out", &u.norm_out);
        push_conv(&mut w, "conv_out", &u.conv_out);
        (text, w)
    }

    /// Write a diffusers directory: `text_encoder/`, `tokenizer/` (copied
    /// from `tokenizer`), `unet/`, `scheduler/` and `model_index.json`, with
    /// no `vae/` (the model works on pixels).
    pub fn export(
        &self,
        cfg: &ImageModelConfig,
        tokenizer: &Path,
        vocab: usize,
        prediction: &str,
        out: &Path,
    ) -> Result<(), TrainError> {
        let (text, unet) = self.named();
        let write_json = |path: &Path, v: serde_json::Value| -> Result<(), TrainError> {
            crate::trainer::write_json(path, &v)
        };
        let tmp = out.with_extension("tmp");
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp).map_err(io_err(&tmp))?;
        }
        for part in ["text_encoder", "tokenizer", "unet", "scheduler"] {
            std::fs::create_dir_all(tmp.join(part)).map_err(io_err(&tmp))?;
        }
        for f in ["vocab.json", "merges.txt", "tokenizer_config.json"] {
            let (from, to) = (tokenizer.join(f), tmp.join("tokenizer").join(f));
            std::fs::copy(&from, &to).map_err(io_err(&from))?;
        }
        write_safetensors(&tmp.join("text_encoder/model.safetensors"), &text)?;
        write_safetensors(&tmp.join("unet/diffusion_pytorch_model.safetensors"), &unet)?;
        write_json(
            &tmp.join("text_encoder/config.json"),
            json!({
                "architectures": ["CLIPTextModel"],
                "model_type": "clip_text_model",
                "hidden_act": "quick_gelu",
                "hidden_size": cfg.text_dim,
                "intermediate_size": 4 * cfg.text_dim,
                "num_attention_heads": cfg.text_heads,
                "num_hidden_layers": cfg.text_layers,
                "max_position_embeddings": cfg.max_len,
                "layer_norm_eps": 1e-5,
                "vocab_size": vocab,
            }),
        )?;
        let levels = cfg.channels.len();
        let down: Vec<&str> = cfg
            .attention
            .iter()
            .map(|&a| {
                if a {
                    "CrossAttnDownBlock2D"
                } else {
                    "DownBlock2D"
                }
            })
            .collect();
        let up: Vec<&str> = cfg
            .attention
            .iter()
            .rev()
            .map(|&a| if a { "CrossAttnUpBlock2D" } else { "UpBlock2D" })
            .collect();
        let mut unet_cfg = json!({
            "_class_name": "UNet2DConditionModel",
            "sample_size": cfg.side,
            "in_channels": in_channels(cfg),
            "out_channels": 3,
            "block_out_channels": cfg.channels,
            "down_block_types": down,
            "up_block_types": up,
            "mid_block_type": "UNetMidBlock2DCrossAttn",
            "layers_per_block": LAYERS,
            "attention_head_dim": vec![cfg.heads; levels],
            "cross_attention_dim": cfg.text_dim,
            "norm_num_groups": cfg.groups,
            "norm_eps": 1e-5,
            "use_linear_projection": true,
            "flip_sin_to_cos": true,
            "freq_shift": 0,
            "act_fn": "silu",
            "downsample_padding": 1,
            "resnet_time_scale_shift": if cfg.scale_shift { "scale_shift" } else { "default" },
            // conv_in's last two channels are each pixel's column and row
            // (`hanlin-image` appends them; diffusers does not know the key).
            "hanlin_coord_channels": cfg.coords,
        });
        if cfg.text_in_time {
            unet_cfg["addition_embed_type"] = json!("text");
            unet_cfg["addition_embed_type_num_heads"] = json!(cfg.heads);
        }
        write_json(&tmp.join("unet/config.json"), unet_cfg)?;
        write_json(
            &tmp.join("scheduler/scheduler_config.json"),
            json!({
                "_class_name": "EulerDiscreteScheduler",
                "num_train_timesteps": 1000,
                "beta_start": 0.0001,
                "beta_end": 0.02,
                "beta_schedule": "linear",
                "prediction_type": if prediction == "v" { "v_prediction" } else { "epsilon" },
                "timestep_spacing": "trailing",
                "clip_sample": true,
                "clip_sample_range": 1.0,
                "steps_offset": 0,
            }),
        )?;
        write_json(
            &tmp.join("model_index.json"),
            json!({
                "_class_name": "HanlinPixelDiffusionPipeline",
                "hanlin_languages": ["en", "zh"],
                // What `bench/image_eval.py` measured the recipe with
                // (bench/RESULTS.md): 30 Euler steps, guidance 2 at every
                // step.
                "hanlin_defaults": {"steps": SAMPLE_STEPS, "guidance": SAMPLE_GUIDANCE},
                "scheduler": ["diffusers", "EulerDiscreteScheduler"],
                "text_encoder": ["transformers", "CLIPTextModel"],
                "tokenizer": ["transformers", "CLIPTokenizer"],
                "unet": ["diffusers", "UNet2DConditionModel"],
                "vae": [null, null],
            }),
        )?;
        if out.exists() {
            std::fs::remove_dir_all(out).map_err(io_err(out))?;
        }
        std::fs::rename(&tmp, out).map_err(io_err(out))
    }
}

type Named = (String, Vec<usize>, Vec<f32>);

fn values<const D: usize>(t: &Tensor<D>) -> Vec<f32> {
    t.to_data()
        .convert::<f32>()
        .try_into_vec::<f32>()
        .unwrap_or_default()
}

fn push_param<const D: usize>(out: &mut Vec<Named>, name: &str, p: &Param<Tensor<D>>) {
    let t = p.val();
    out.push((name.into(), t.dims().to_vec(), values(&t)));
}

fn push_linear(out: &mut Vec<Named>, name: &str, l: &Linear) {
    // burn keeps [in, out]; PyTorch [out, in].
    let t = l.weight.val().transpose();
    out.push((format!("{name}.weight"), t.dims().to_vec(), values(&t)));
    if let Some(b) = &l.bias {
        push_param(out, &format!("{name}.bias"), b);
    }
}

fn push_conv(out: &mut Vec<Named>, name: &str, c: &Conv2d) {
    push_param(out, &format!("{name}.weight"), &c.weight);
    if let Some(b) = &c.bias {
        push_param(out, &format!("{name}.bias"), b);
    }
}

fn push_ln(out: &mut Vec<Named>, name: &str, l: &LayerNorm) {
    push_param(out, &format!("{name}.weight"), &l.gamma);
    if let Some(b) = &l.beta {
        push_param(out, &format!("{name}.bias"), b);
    }
}

fn push_gn(out: &mut Vec<Named>, name: &str, g: &GroupNorm) {
    if let Some(w) = &g.gamma {
        push_param(out, &format!("{name}.weight"), w);
    }
    if let Some(b) = &g.beta {
        push_param(out, &format!("{name}.bias"), b);
    }
}

fn push_level(out: &mut Vec<Named>, p: &str, l: &Level, sampler: &str) {
    for (j, r) in l.resnets.iter().enumerate() {
        let n = format!("{p}.resnets.{j}");
        push_gn(out, &format!("{n}.norm1"), &r.norm1);
        push_conv(out, &format!("{n}.conv1"), &r.conv1);
        push_linear(out, &format!("{n}.time_emb_proj"), &r.temb);
        push_gn(out, &format!("{n}.norm2"), &r.norm2);
        push_conv(out, &format!("{n}.conv2"), &r.conv2);
        if let Some(s) = &r.shortcut {
            push_conv(out, &format!("{n}.conv_shortcut"), s);
        }
    }
    for (j, a) in l.attentions.iter().enumerate() {
        let n = format!("{p}.attentions.{j}");
        let b = format!("{n}.transformer_blocks.0");
        push_gn(out, &format!("{n}.norm"), &a.norm);
        push_linear(out, &format!("{n}.proj_in"), &a.proj_in);
        push_ln(out, &format!("{b}.norm1"), &a.ln1);
        push_linear(out, &format!("{b}.attn1.to_q"), &a.q1);
        push_linear(out, &format!("{b}.attn1.to_k"), &a.k1);
        push_linear(out, &format!("{b}.attn1.to_v"), &a.v1);
        push_linear(out, &format!("{b}.attn1.to_out.0"), &a.o1);
        push_ln(out, &format!("{b}.norm2"), &a.ln2);
        push_linear(out, &format!("{b}.attn2.to_q"), &a.q2);
        push_linear(out, &format!("{b}.attn2.to_k"), &a.k2);
        push_linear(out, &format!("{b}.attn2.to_v"), &a.v2);
        push_linear(out, &format!("{b}.attn2.to_out.0"), &a.o2);
        push_ln(out, &format!("{b}.norm3"), &a.ln3);
        push_linear(out, &format!("{b}.ff.net.0.proj"), &a.ff_in);
        push_linear(out, &format!("{b}.ff.net.2"), &a.ff_out);
        push_linear(out, &format!("{n}.proj_out"), &a.proj_out);
    }
    if let Some(s) = &l.sample {
        push_conv(out, &format!("{p}.{sampler}.0.conv"), s);
    }
}

fn write_safetensors(path: &Path, tensors: &[Named]) -> Result<(), TrainError> {
    let bytes: Vec<Vec<u8>> = tensors
        .iter()
        .map(|(_, _, v)| v.iter().flat_map(|x| x.to_le_bytes()).collect())
        .collect();
    let views = tensors
        .iter()
        .zip(&bytes)
        .map(|((n, shape, _), b)| {
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), b)
                .map(|v| (n.clone(), v))
                .map_err(|e| TrainError::Config(format!("{n}: {e}")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    safetensors::tensor::serialize_to_file(views, None, path).map_err(|e| TrainError::Io {
        path: path.display().to_string(),
        source: std::io::Error::other(e),
    })
}
