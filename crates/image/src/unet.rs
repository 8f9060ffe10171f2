//! diffusers' `UNet2DConditionModel` (Stable Diffusion 1.x/2.x): a time
//! embedding, down blocks of ResNet blocks and (cross-attention)
//! transformers with stride-2 convolutions between them, a middle block,
//! and up blocks that take the down path's outputs as skip connections.
//! The block layout is read from the weights' names; head counts from
//! `config.json`.

use crate::nn::{self, apply_rows, attention, count, Conv2d, Feat, GroupNorm, LayerNorm, Resnet};
use crate::weights::{read_config, Weights};
use crate::{bad, ImageError};
use hanlin_kernels::linear::{gelu_erf, Linear};
use hanlin_kernels::ops;
use hanlin_kernels::pool::ThreadPool;
use serde_json::Value;
use std::path::Path;

/// Attention in a transformer block: queries from the feature map, keys
/// and values from it (self: one stacked q/k/v product) or from the text
/// (cross: queries, then stacked k/v).
struct Attn {
    /// Self-attention: `to_q`, `to_k`, `to_v` stacked; cross: `to_q`.
    q: Linear,
    /// Cross-attention: `to_k` and `to_v` stacked.
    kv: Option<Linear>,
    out: Linear,
    heads: usize,
}

impl Attn {
    fn load(w: &Weights, p: &str, heads: usize, cross: bool) -> Result<Self, ImageError> {
        let name = |n: &str| format!("{p}.{n}");
        let (q, kv) = if cross {
            (
                nn::linear(w, &name("to_q"))?,
                Some(nn::linear_cat(w, &[name("to_k"), name("to_v")])?),
            )
        } else {
            (
                nn::linear_cat(w, &[name("to_q"), name("to_k"), name("to_v")])?,
                None,
            )
        };
        Ok(Self {
            q,
            kv,
            out: nn::linear(w, &name("to_out.0"))?,
            heads,
        })
    }

    /// `x`: `n` samples of `len` rows; `ctx`: `n` samples of `ctx_len` rows
    /// (cross-attention only).
    fn forward(
        &self,
        pool: &ThreadPool,
        x: &[f32],
        n: usize,
        len: usize,
        ctx: Option<(&[f32], usize)>,
    ) -> Vec<f32> {
        let d_in = x.len() / (n * len);
        let q = apply_rows(pool, &self.q, x, d_in);
        let d = if self.kv.is_some() {
            self.q.rows
        } else {
            self.q.rows / 3
        };
        let mut o = Vec::with_capacity(n * len * d);
        match (&self.kv, ctx) {
            (Some(kvl), Some((src, src_len))) => {
                let kv = apply_rows(pool, kvl, src, src.len() / (n * src_len));
                for s in 0..n {
                    let kv = &kv[s * src_len * 2 * d..(s + 1) * src_len * 2 * d];
                    o.extend(attention(
                        pool,
                        self.heads,
                        d,
                        (&q[s * len * d..(s + 1) * len * d], d),
                        (kv, &kv[d..], 2 * d),
                        len,
                        src_len,
                    ));
                }
            }
            _ => {
                for s in 0..n {
                    let qkv = &q[s * len * 3 * d..(s + 1) * len * 3 * d];
                    o.extend(attention(
                        pool,
                        self.heads,
                        d,
                        (qkv, 3 * d),
                        (&qkv[d..], &qkv[2 * d..], 3 * d),
                        len,
                        len,
                    ));
                }
            }
        }
        apply_rows(pool, &self.out, &o, d)
    }
}

/// `BasicTransformerBlock`: self-attention, cross-attention over the text,
/// and a GEGLU feed-forward, each pre-normed and added back.
struct Block {
    norm1: LayerNorm,
    attn1: Attn,
    norm2: LayerNorm,
    attn2: Attn,
    norm3: LayerNorm,
    ff_in: Linear,
    ff_out: Linear,
}

/// `Transformer2DModel`: group norm, projection in, transformer blocks,
/// projection out, plus the input.
struct Transformer {
    norm: GroupNorm,
    proj_in: Linear,
    blocks: Vec<Block>,
    proj_out: Linear,
}

impl Transformer {
    fn load(w: &Weights, p: &str, heads: usize, groups: usize) -> Result<Self, ImageError> {
        let n = count(w, &format!("{p}.transformer_blocks"), "attn1.to_q.weight");
        let mut blocks = Vec::with_capacity(n);
        for i in 0..n {
            let b = format!("{p}.transformer_blocks.{i}");
            blocks.push(Block {
                norm1: LayerNorm::load(w, &format!("{b}.norm1"), 1e-5)?,
                attn1: Attn::load(w, &format!("{b}.attn1"), heads, false)?,
                norm2: LayerNorm::load(w, &format!("{b}.norm2"), 1e-5)?,
                attn2: Attn::load(w, &format!("{b}.attn2"), heads, true)?,
                norm3: LayerNorm::load(w, &format!("{b}.norm3"), 1e-5)?,
                ff_in: nn::linear(w, &format!("{b}.ff.net.0.proj"))?,
                ff_out: nn::linear(w, &format!("{b}.ff.net.2"))?,
            });
        }
        Ok(Self {
            norm: GroupNorm::load(w, &format!("{p}.norm"), groups, 1e-6)?,
            proj_in: nn::linear(w, &format!("{p}.proj_in"))?,
            blocks,
            proj_out: nn::linear(w, &format!("{p}.proj_out"))?,
        })
    }

    fn forward(&self, pool: &ThreadPool, x: &Feat, ctx: &[f32], ctx_len: usize) -> Feat {
        let (n, len) = (x.n, x.hw());
        let mut h = x.clone();
        self.norm.apply(pool, &mut h, false);
        let mut h = apply_rows(pool, &self.proj_in, &h.data, x.c);
        let d = self.proj_in.rows;
        for b in &self.blocks {
            let a = b.attn1.forward(pool, &b.norm1.apply(&h), n, len, None);
            ops::add_inplace(&mut h, &a);
            let a = b
                .attn2
                .forward(pool, &b.norm2.apply(&h), n, len, Some((ctx, ctx_len)));
            ops::add_inplace(&mut h, &a);
            let proj = apply_rows(pool, &b.ff_in, &b.norm3.apply(&h), d);
            let inner = b.ff_in.rows / 2;
            let mut g = Vec::with_capacity(n * len * inner);
            for row in proj.chunks_exact(2 * inner) {
                let (hid, gate) = row.split_at(inner);
                g.extend(hid.iter().zip(gate).map(|(a, b)| a * gelu_erf(*b)));
            }
            let f = apply_rows(pool, &b.ff_out, &g, inner);
            ops::add_inplace(&mut h, &f);
        }
        let mut out = x.clone();
        ops::add_inplace(&mut out.data, &apply_rows(pool, &self.proj_out, &h, d));
        out
    }
}

/// A down or up block.
struct Stage {
    resnets: Vec<Resnet>,
    attns: Vec<Transformer>,
    /// Down: a stride-2 convolution; up: 2× upsampling and a convolution.
    resample: Option<Conv2d>,
}

/// diffusers' `TextTimeEmbedding` (`addition_embed_type = "text"`): the
/// text, layer-normed, pooled by one attention query (its mean row plus a
/// learnt offset, over itself and the rows) and projected onto the time
/// embedding, to which it is added.
struct TextTime {
    norm1: LayerNorm,
    offset: Vec<f32>,
    q: Linear,
    /// `k_proj` and `v_proj` stacked.
    kv: Linear,
    proj: Linear,
    norm2: LayerNorm,
    heads: usize,
}

impl TextTime {
    fn load(w: &Weights, heads: usize) -> Result<Self, ImageError> {
        let p = "add_embedding";
        let q = nn::linear(w, &format!("{p}.pool.q_proj"))?;
        let d = q.rows;
        if heads == 0 || !d.is_multiple_of(heads) {
            return Err(bad(
                w.path(),
                format!("{d}-wide text pooling in {heads} heads"),
            ));
        }
        Ok(Self {
            norm1: LayerNorm::load(w, &format!("{p}.norm1"), 1e-5)?,
            offset: w.vec(&format!("{p}.pool.positional_embedding"), d)?,
            q,
            kv: nn::linear_cat(w, &[format!("{p}.pool.k_proj"), format!("{p}.pool.v_proj")])?,
            proj: nn::linear(w, &format!("{p}.proj"))?,
            norm2: LayerNorm::load(w, &format!("{p}.norm2"), 1e-5)?,
            heads,
        })
    }

    /// One row of the time embedding's width for each of the `n` samples
    /// of `ctx_len` text rows.
    fn forward(&self, pool: &ThreadPool, ctx: &[f32], n: usize, ctx_len: usize) -> Vec<f32> {
        let d = self.q.rows;
        let mut out = Vec::with_capacity(n * self.proj.rows);
        for s in 0..n {
            let rows = self
                .norm1
                .apply(&ctx[s * ctx_len * d..(s + 1) * ctx_len * d]);
            let mut all = Vec::with_capacity((ctx_len + 1) * d);
            all.extend((0..d).map(|j| {
                let mean = (0..ctx_len).map(|i| rows[i * d + j]).sum::<f32>() / ctx_len as f32;
                mean + self.offset[j]
            }));
            all.extend_from_slice(&rows);
            let q = apply_rows(pool, &self.q, &all[..d], d);
            let kv = apply_rows(pool, &self.kv, &all, d);
            let a = attention(
                pool,
                self.heads,
                d,
                (&q, d),
                (&kv, &kv[d..], 2 * d),
                1,
                ctx_len + 1,
            );
            out.extend(self.norm2.apply(&apply_rows(pool, &self.proj, &a, d)));
        }
        out
    }
}

pub struct Unet {
    /// Sinusoidal time features (`conv_in`'s width).
    time_dim: usize,
    flip_sin_to_cos: bool,
    freq_shift: f32,
    time1: Linear,
    time2: Linear,
    text_time: Option<TextTime>,
    conv_in: Conv2d,
    down: Vec<Stage>,
    mid: (Resnet, Transformer, Resnet),
    up: Vec<Stage>,
    norm_out: GroupNorm,
    conv_out: Conv2d,
    /// `conv_in` also takes each position's column and row in [−1, 1]
    /// (`hanlin_coord_channels` in `config.json`, as models trained by
    /// `hanlin train image` say): [`Unet::forward`] appends them.
    coords: bool,
    /// Channels of the latents (or pixels) it denoises, in and out.
    pub in_channels: usize,
    pub out_channels: usize,
    /// The text embedding width the cross-attention expects.
    pub context_dim: usize,
    /// Latent side the model was trained at (`config.json`'s `sample_size`).
    pub sample_size: usize,
}

/// Each position's column then row, in [−1, 1] at pixel centres (what a
/// `hanlin_coord_channels` UNet takes after its input channels; training
/// builds them here too).
pub fn coordinates(n: usize, h: usize, w: usize) -> Feat {
    let at = |i: usize, len: usize| (2 * i + 1) as f32 / len as f32 - 1.0;
    let mut f = Feat::zeros(n, h, w, 2);
    for (p, v) in f.data.chunks_exact_mut(2).enumerate() {
        v[0] = at(p % w, w);
        v[1] = at((p / w) % h, h);
    }
    f
}

/// Heads per down block from `config.json` (`num_attention_heads`, or
/// diffusers' historical `attention_head_dim`, which means the same).
fn heads_of(cfg: &Value, blocks: usize) -> Vec<usize> {
    let v = cfg
        .get("num_attention_heads")
        .filter(|v| !v.is_null())
        .or_else(|| cfg.get("attention_head_dim"))
        .cloned()
        .unwrap_or(Value::from(8));
    match v {
        Value::Array(a) => a.iter().map(|x| x.as_u64().unwrap_or(8) as usize).collect(),
        other => vec![other.as_u64().unwrap_or(8) as usize; blocks],
    }
}

impl Unet {
    pub fn load(dir: &Path) -> Result<Self, ImageError> {
        Self::from_parts(&read_config(dir)?, &Weights::open_dir(dir)?)
    }

    /// From a config and weights named as diffusers names them.
    pub fn from_parts(cfg: &Value, w: &Weights) -> Result<Self, ImageError> {
        let dir = w.path();
        let groups = cfg
            .get("norm_num_groups")
            .and_then(Value::as_u64)
            .unwrap_or(32) as usize;
        let eps = cfg.get("norm_eps").and_then(Value::as_f64).unwrap_or(1e-5) as f32;
        if w.has("time_embedding.cond_proj.weight") {
            // LCM-distilled UNets take the guidance scale as an embedding
            // (`time_cond_proj_dim`); drawing without it would be wrong.
            return Err(bad(
                dir,
                "this UNet takes a guidance embedding (time_cond_proj_dim), which is not supported; LCM-LoRA models fused into Stable Diffusion work with --sampler lcm",
            ));
        }
        let n_down = count(w, "down_blocks", "resnets.0.conv1.weight");
        let n_up = count(w, "up_blocks", "resnets.0.conv1.weight");
        if n_down == 0 || n_up != n_down {
            return Err(bad(
                dir,
                format!("{n_down} down blocks and {n_up} up blocks"),
            ));
        }
        let heads = heads_of(cfg, n_down);
        if heads.len() != n_down || heads.contains(&0) {
            return Err(bad(
                dir,
                format!("attention heads {heads:?} for {n_down} blocks"),
            ));
        }
        let stage = |p: String, heads: usize, up: bool| -> Result<Stage, ImageError> {
            let nr = count(w, &format!("{p}.resnets"), "conv1.weight");
            let na = count(w, &format!("{p}.attentions"), "proj_in.weight");
            let resnets = (0..nr)
                .map(|i| Resnet::load(w, &format!("{p}.resnets.{i}"), groups, eps))
                .collect::<Result<_, _>>()?;
            let attns = (0..na)
                .map(|i| Transformer::load(w, &format!("{p}.attentions.{i}"), heads, groups))
                .collect::<Result<_, _>>()?;
            let (name, stride) = if up {
                (format!("{p}.upsamplers.0.conv"), 1)
            } else {
                (format!("{p}.downsamplers.0.conv"), 2)
            };
            let resample = if w.has(&format!("{name}.weight")) {
                Some(Conv2d::load(w, &name, stride)?)
            } else {
                None
            };
            if na != 0 && na != nr {
                return Err(bad(
                    dir,
                    format!("{p}: {nr} ResNet blocks but {na} transformers"),
                ));
            }
            Ok(Stage {
                resnets,
                attns,
                resample,
            })
        };
        let down = (0..n_down)
            .map(|i| stage(format!("down_blocks.{i}"), heads[i], false))
            .collect::<Result<Vec<_>, _>>()?;
        let up = (0..n_up)
            .map(|i| stage(format!("up_blocks.{i}"), heads[n_down - 1 - i], true))
            .collect::<Result<Vec<_>, _>>()?;
        let last = heads[n_down - 1];
        let mid = (
            Resnet::load(w, "mid_block.resnets.0", groups, eps)?,
            Transformer::load(w, "mid_block.attentions.0", last, groups)?,
            Resnet::load(w, "mid_block.resnets.1", groups, eps)?,
        );
        let text_time = match cfg.get("addition_embed_type").and_then(Value::as_str) {
            None => None,
            Some("text") => {
                let heads = cfg
                    .get("addition_embed_type_num_heads")
                    .and_then(Value::as_u64)
                    .unwrap_or(64) as usize;
                Some(TextTime::load(w, heads)?)
            }
            Some(other) => {
                return Err(bad(
                    dir,
                    format!("addition_embed_type {other:?} is not supported"),
                ))
            }
        };
        let conv_in = Conv2d::load(w, "conv_in", 1)?;
        let coords = cfg
            .get("hanlin_coord_channels")
            .and_then(Value::as_bool)
            .unwrap_or(false);
        let extra = if coords { 2 } else { 0 };
        if conv_in.c_in <= extra {
            return Err(bad(
                dir,
                format!(
                    "conv_in takes {} channels, with two of them coordinates",
                    conv_in.c_in
                ),
            ));
        }
        let time1 = nn::linear(w, "time_embedding.linear_1")?;
        let time2 = nn::linear(w, "time_embedding.linear_2")?;
        if let Some(tt) = &text_time {
            if tt.proj.rows != time2.rows {
                return Err(bad(
                    dir,
                    format!(
                        "the text adds {} values to a {}-wide time embedding",
                        tt.proj.rows, time2.rows
                    ),
                ));
            }
        }
        let context_dim = w
            .shape("down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight")
            .or_else(|_| w.shape("mid_block.attentions.0.transformer_blocks.0.attn2.to_k.weight"))?
            .get(1)
            .copied()
            .unwrap_or(0);
        let conv_out = Conv2d::load(w, "conv_out", 1)?;
        Ok(Self {
            time_dim: w.shape("time_embedding.linear_1.weight")?[1],
            flip_sin_to_cos: cfg
                .get("flip_sin_to_cos")
                .and_then(Value::as_bool)
                .unwrap_or(true),
            freq_shift: cfg.get("freq_shift").and_then(Value::as_f64).unwrap_or(0.0) as f32,
            time1,
            time2,
            text_time,
            coords,
            in_channels: conv_in.c_in - extra,
            out_channels: conv_out.c_out,
            conv_in,
            down,
            mid,
            up,
            norm_out: GroupNorm::load(w, "conv_norm_out", groups, eps)?,
            conv_out,
            context_dim,
            sample_size: cfg
                .get("sample_size")
                .and_then(Value::as_u64)
                .filter(|&s| (4..=256).contains(&s))
                .unwrap_or(64) as usize,
        })
    }

    /// diffusers' `get_timestep_embedding`.
    fn time_features(&self, t: f32) -> Vec<f32> {
        let half = self.time_dim / 2;
        let mut sin = Vec::with_capacity(half);
        let mut cos = Vec::with_capacity(half);
        for i in 0..half {
            let e = (-(10000f32.ln()) * i as f32 / (half as f32 - self.freq_shift)).exp();
            let a = t * e;
            sin.push(a.sin());
            cos.push(a.cos());
        }
        if self.flip_sin_to_cos {
            cos.extend(sin);
            cos
        } else {
            sin.extend(cos);
            sin
        }
    }

    /// The predicted noise (or v) for latents `x` at timestep `t`, with
    /// `ctx` the text embeddings (`x.n` samples of `ctx_len` rows).
    pub fn forward(
        &self,
        pool: &ThreadPool,
        x: &Feat,
        t: f32,
        ctx: &[f32],
        ctx_len: usize,
    ) -> Feat {
        let n = x.n;
        let f = self.time_features(t);
        let mut tf = Vec::with_capacity(n * f.len());
        for _ in 0..n {
            tf.extend_from_slice(&f);
        }
        let mut temb = apply_rows(pool, &self.time1, &tf, f.len());
        nn::silu_inplace(&mut temb);
        let mut temb = apply_rows(pool, &self.time2, &temb, self.time1.rows);
        if let Some(tt) = &self.text_time {
            let add = tt.forward(pool, ctx, n, ctx_len);
            temb.iter_mut().zip(add).for_each(|(t, a)| *t += a);
        }
        // Every ResNet block takes the embedding through SiLU first.
        nn::silu_inplace(&mut temb);
        let temb = Some(temb.as_slice());
        let mut h = if self.coords {
            self.conv_in
                .forward(pool, &x.concat(&coordinates(x.n, x.h, x.w)))
        } else {
            self.conv_in.forward(pool, x)
        };
        let mut skips = vec![h.clone()];
        for s in &self.down {
            for (i, r) in s.resnets.iter().enumerate() {
                h = r.forward(pool, &h, temb);
                if let Some(a) = s.attns.get(i) {
                    h = a.forward(pool, &h, ctx, ctx_len);
                }
                skips.push(h.clone());
            }
            if let Some(c) = &s.resample {
                h = c.forward(pool, &h);
                skips.push(h.clone());
            }
        }
        h = self.mid.0.forward(pool, &h, temb);
        h = self.mid.1.forward(pool, &h, ctx, ctx_len);
        h = self.mid.2.forward(pool, &h, temb);
        for s in &self.up {
            for (i, r) in s.resnets.iter().enumerate() {
                let skip = skips.pop().unwrap_or_else(|| Feat::zeros(n, h.h, h.w, 0));
                h = r.forward(pool, &h.concat(&skip), temb);
                if let Some(a) = s.attns.get(i) {
                    h = a.forward(pool, &h, ctx, ctx_len);
                }
            }
            if let Some(c) = &s.resample {
                h = c.forward(pool, &h.upsample2());
            }
        }
        self.norm_out.apply(pool, &mut h, true);
        self.conv_out.forward(pool, &h)
    }

    /// How many times the UNet halves the latents' sides, as a factor.
    pub fn downsampling(&self) -> usize {
        1 << self.down.iter().filter(|s| s.resample.is_some()).count()
    }

    /// Check that the skip connections' channels add up (a model whose
    /// weights disagree with each other is refused at load, not mid-run).
    pub fn check(&self, dir: &Path) -> Result<(), ImageError> {
        let mut c = self.conv_in.c_out;
        let mut skips = vec![c];
        for s in &self.down {
            for r in &s.resnets {
                if r.c_in() != c {
                    return Err(bad(dir, "down block channels do not chain"));
                }
                c = r.out_channels();
                skips.push(c);
            }
            if s.resample.is_some() {
                skips.push(c);
            }
        }
        for s in &self.up {
            for r in &s.resnets {
                let skip = skips.pop().unwrap_or(0);
                if r.c_in() != c + skip {
                    return Err(bad(
                        dir,
                        "up block channels do not match the skip connections",
                    ));
                }
                c = r.out_channels();
            }
        }
        if !skips.is_empty() || self.conv_out.c_in != c {
            return Err(bad(dir, "skip connections do not pair up"));
        }
        Ok(())
    }
}
