//! diffusers' `AutoencoderKL`. Its decoder turns latents into RGB: a 1×1
//! `post_quant_conv`, a convolution in, a middle block (ResNet, one-head
//! attention, ResNet), up blocks of ResNet blocks with 2× upsampling
//! between them, then group norm, SiLU and a convolution to three
//! channels. Its encoder ([`VaeEncoder`]) goes the other way, for
//! image-to-image and inpainting.

use crate::nn::{self, attention, count, Conv2d, Feat, GroupNorm, Resnet};
use crate::weights::{read_config, Weights};
use crate::{bad, ImageError};
use hanlin_kernels::linear::Linear;
use hanlin_kernels::ops;
use hanlin_kernels::pool::ThreadPool;
use serde_json::Value;
use std::path::Path;

/// The middle block's attention: every position attends to every other,
/// one head as wide as the channels.
struct Attn {
    norm: GroupNorm,
    /// `to_q`, `to_k`, `to_v` stacked.
    qkv: Linear,
    out: Linear,
}

impl Attn {
    fn load(w: &Weights, p: &str, groups: usize) -> Result<Self, ImageError> {
        // Older checkpoints name the projections query/key/value/proj_attn.
        let old = w.has(&format!("{p}.query.weight"));
        let name = |new: &str, legacy: &str| format!("{p}.{}", if old { legacy } else { new });
        Ok(Self {
            norm: GroupNorm::load(w, &name("group_norm", "group_norm"), groups, 1e-6)?,
            qkv: nn::linear_cat(
                w,
                &[
                    name("to_q", "query"),
                    name("to_k", "key"),
                    name("to_v", "value"),
                ],
            )?,
            out: nn::linear(w, &name("to_out.0", "proj_attn"))?,
        })
    }

    fn forward(&self, pool: &ThreadPool, x: &Feat) -> Feat {
        let mut h = x.clone();
        self.norm.apply(pool, &mut h, false);
        let c = x.c;
        let qkv = nn::apply_rows(pool, &self.qkv, &h.data, c);
        let hw = x.hw();
        let mut o = Vec::with_capacity(x.data.len());
        for s in 0..x.n {
            let qkv = &qkv[s * hw * 3 * c..(s + 1) * hw * 3 * c];
            o.extend(attention(
                pool,
                1,
                c,
                (qkv, 3 * c),
                (&qkv[c..], &qkv[2 * c..], 3 * c),
                hw,
                hw,
            ));
        }
        let mut out = x.clone();
        ops::add_inplace(&mut out.data, &nn::apply_rows(pool, &self.out, &o, c));
        out
    }
}

pub struct VaeDecoder {
    post_quant: Option<Conv2d>,
    conv_in: Conv2d,
    mid: (Resnet, Attn, Resnet),
    up: Vec<(Vec<Resnet>, Option<Conv2d>)>,
    norm_out: GroupNorm,
    conv_out: Conv2d,
    /// Latents are divided by this before decoding (0.18215 for SD 1.x).
    pub scaling_factor: f32,
    pub latent_channels: usize,
    /// Pixels per latent along each side (8 for Stable Diffusion).
    pub scale: usize,
}

/// One level of the encoder or decoder at `p`: its ResNet blocks and the
/// convolution that resamples after them (`resample`: `upsamplers`, run
/// after a 2× upsampling, or `downsamplers`, strided and padded after the
/// map), if the level has one.
fn level(
    w: &Weights,
    p: &str,
    resample: &str,
    groups: usize,
) -> Result<(Vec<Resnet>, Option<Conv2d>), ImageError> {
    let nr = count(w, &format!("{p}.resnets"), "conv1.weight");
    let resnets = (0..nr)
        .map(|j| Resnet::load(w, &format!("{p}.resnets.{j}"), groups, EPS))
        .collect::<Result<_, _>>()?;
    let name = format!("{p}.{resample}.0.conv");
    let conv = if !w.has(&format!("{name}.weight")) {
        None
    } else if resample == "downsamplers" {
        Some(Conv2d::load(w, &name, 2)?.padded_after())
    } else {
        Some(Conv2d::load(w, &name, 1)?)
    };
    Ok((resnets, conv))
}

/// The VAE's group norm epsilon.
const EPS: f32 = 1e-6;

/// A diffusers `vae/` directory: its decoder, and its encoder when the
/// weights hold one.
pub fn load(dir: &Path) -> Result<(VaeDecoder, Option<VaeEncoder>), ImageError> {
    let (cfg, w) = (read_config(dir)?, Weights::open_dir(dir)?);
    Ok((
        VaeDecoder::from_parts(&cfg, &w)?,
        VaeEncoder::from_parts(&cfg, &w)?,
    ))
}

impl VaeDecoder {
    /// From a config and weights named as diffusers names them.
    pub fn from_parts(cfg: &Value, w: &Weights) -> Result<Self, ImageError> {
        let dir = w.path();
        let groups = cfg
            .get("norm_num_groups")
            .and_then(Value::as_u64)
            .unwrap_or(32) as usize;
        let eps = EPS;
        let n_up = count(w, "decoder.up_blocks", "resnets.0.conv1.weight");
        if n_up == 0 {
            return Err(bad(dir, "no decoder up blocks"));
        }
        let up = (0..n_up)
            .map(|i| level(w, &format!("decoder.up_blocks.{i}"), "upsamplers", groups))
            .collect::<Result<Vec<_>, _>>()?;
        let ups = up.iter().filter(|u| u.1.is_some()).count();
        let conv_in = Conv2d::load(w, "decoder.conv_in", 1)?;
        Ok(Self {
            post_quant: if w.has("post_quant_conv.weight") {
                Some(Conv2d::load(w, "post_quant_conv", 1)?)
            } else {
                None
            },
            latent_channels: conv_in.c_in,
            conv_in,
            mid: (
                Resnet::load(w, "decoder.mid_block.resnets.0", groups, eps)?,
                Attn::load(w, "decoder.mid_block.attentions.0", groups)?,
                Resnet::load(w, "decoder.mid_block.resnets.1", groups, eps)?,
            ),
            up,
            norm_out: GroupNorm::load(w, "decoder.conv_norm_out", groups, eps)?,
            conv_out: Conv2d::load(w, "decoder.conv_out", 1)?,
            scaling_factor: cfg
                .get("scaling_factor")
                .and_then(Value::as_f64)
                .unwrap_or(0.18215) as f32,
            scale: 1 << ups,
        })
    }

    /// Decode latents `z` (already divided by the scaling factor) to RGB in
    /// [-1, 1] (three channels).
    pub fn decode(&self, pool: &ThreadPool, z: &Feat) -> Feat {
        let mut h = match &self.post_quant {
            Some(c) => c.forward(pool, z),
            None => z.clone(),
        };
        h = self.conv_in.forward(pool, &h);
        h = self.mid.0.forward(pool, &h, None);
        h = self.mid.1.forward(pool, &h);
        h = self.mid.2.forward(pool, &h, None);
        for (resnets, upsample) in &self.up {
            for r in resnets {
                h = r.forward(pool, &h, None);
            }
            if let Some(c) = upsample {
                h = c.forward(pool, &h.upsample2());
            }
        }
        self.norm_out.apply(pool, &mut h, true);
        self.conv_out.forward(pool, &h)
    }
}

/// The encoder of diffusers' `AutoencoderKL`: RGB → latents (the mean of
/// the latent distribution), for image-to-image and inpainting. A
/// convolution in, down blocks of ResNet blocks with a strided convolution
/// between them (padded after the map only), the middle block, group norm,
/// SiLU, a convolution to the mean and log-variance, and a 1×1
/// `quant_conv`.
pub struct VaeEncoder {
    conv_in: Conv2d,
    down: Vec<(Vec<Resnet>, Option<Conv2d>)>,
    mid: (Resnet, Attn, Resnet),
    norm_out: GroupNorm,
    conv_out: Conv2d,
    quant: Option<Conv2d>,
    /// Latents are multiplied by this after encoding.
    pub scaling_factor: f32,
    pub latent_channels: usize,
}

impl VaeEncoder {
    /// From a config and weights named as diffusers names them; `None`
    /// when the weights hold no encoder (single-file checkpoints are
    /// read for their decoder only).
    pub fn from_parts(cfg: &Value, w: &Weights) -> Result<Option<Self>, ImageError> {
        if !w.has("encoder.conv_in.weight") {
            return Ok(None);
        }
        let dir = w.path();
        let groups = cfg
            .get("norm_num_groups")
            .and_then(Value::as_u64)
            .unwrap_or(32) as usize;
        let eps = EPS;
        let n_down = count(w, "encoder.down_blocks", "resnets.0.conv1.weight");
        if n_down == 0 {
            return Err(bad(dir, "no encoder down blocks"));
        }
        let down = (0..n_down)
            .map(|i| {
                level(
                    w,
                    &format!("encoder.down_blocks.{i}"),
                    "downsamplers",
                    groups,
                )
            })
            .collect::<Result<Vec<_>, _>>()?;
        let conv_out = Conv2d::load(w, "encoder.conv_out", 1)?;
        if conv_out.c_out % 2 != 0 {
            return Err(bad(
                dir,
                format!(
                    "the encoder gives {} channels, not a mean and a log-variance",
                    conv_out.c_out
                ),
            ));
        }
        Ok(Some(Self {
            conv_in: Conv2d::load(w, "encoder.conv_in", 1)?,
            down,
            mid: (
                Resnet::load(w, "encoder.mid_block.resnets.0", groups, eps)?,
                Attn::load(w, "encoder.mid_block.attentions.0", groups)?,
                Resnet::load(w, "encoder.mid_block.resnets.1", groups, eps)?,
            ),
            norm_out: GroupNorm::load(w, "encoder.conv_norm_out", groups, eps)?,
            latent_channels: conv_out.c_out / 2,
            conv_out,
            quant: if w.has("quant_conv.weight") {
                Some(Conv2d::load(w, "quant_conv", 1)?)
            } else {
                None
            },
            scaling_factor: cfg
                .get("scaling_factor")
                .and_then(Value::as_f64)
                .unwrap_or(0.18215) as f32,
        }))
    }

    /// Encode RGB `x` in [-1, 1] (three channels) to the mean latents,
    /// not yet multiplied by the scaling factor.
    pub fn encode(&self, pool: &ThreadPool, x: &Feat) -> Feat {
        let mut h = self.conv_in.forward(pool, x);
        for (resnets, downsample) in &self.down {
            for r in resnets {
                h = r.forward(pool, &h, None);
            }
            if let Some(c) = downsample {
                h = c.forward(pool, &h);
            }
        }
        h = self.mid.0.forward(pool, &h, None);
        h = self.mid.1.forward(pool, &h);
        h = self.mid.2.forward(pool, &h, None);
        self.norm_out.apply(pool, &mut h, true);
        h = self.conv_out.forward(pool, &h);
        if let Some(q) = &self.quant {
            h = q.forward(pool, &h);
        }
        // Channels-last: the first half of each position's channels is the mean.
        let lc = self.latent_channels;
        let mut mean = Feat::zeros(h.n, h.h, h.w, lc);
        for (dst, src) in mean.data.chunks_mut(lc).zip(h.data.chunks(2 * lc)) {
            dst.copy_from_slice(&src[..lc]);
        }
        mean
    }
}
