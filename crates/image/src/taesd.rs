//! TAESD: diffusers' `AutoencoderTiny` decoder, a small convolutional
//! network that turns the same latents as a pipeline's VAE into a picture
//! at the same size for a small share of the VAE's cost (used for previews
//! while denoising). Its layers are a plain sequence: a convolution and a
//! ReLU in, then levels of blocks (three 3×3 convolutions with ReLUs
//! between, plus the input, then a ReLU), each but the last followed by
//! 2× nearest upsampling and a convolution; the last convolution gives RGB.
//! The input is first softly clamped (`tanh(z / 3) · 3`).
//!
//! Read from a diffusers directory (`config.json` and weights named
//! `decoder.layers.N…`), or from TAESD's own `taesd_decoder.safetensors`,
//! whose layer numbers are one higher (its clamp is layer 0).

use crate::nn::{Conv2d, Feat};
use crate::weights::Weights;
use crate::{bad, ImageError};
use hanlin_kernels::ops;
use hanlin_kernels::pool::ThreadPool;
use std::path::{Path, PathBuf};

enum Layer {
    Conv(Conv2d),
    Relu,
    /// Three convolutions (ReLU after the first two), plus the input
    /// (through a 1×1 convolution when the width changes), then ReLU.
    Block(Box<([Conv2d; 3], Option<Conv2d>)>),
    Upsample,
}

pub struct TinyDecoder {
    layers: Vec<Layer>,
    pub latent_channels: usize,
    /// Pixels per latent along each side.
    pub scale: usize,
}

/// Whether `file` is a TAESD decoder in one safetensors file (its tensors
/// named `decoder.layers.N…`, or TAESD's own `N.…`), not a checkpoint.
pub fn is_file(file: &Path) -> bool {
    let Ok(w) = Weights::open(file, &[file.to_path_buf()]) else {
        return false;
    };
    let mut names = w.names().peekable();
    names.peek().is_some()
        && names.all(|n| {
            n.starts_with("decoder.layers.")
                || n.starts_with("encoder.layers.")
                || n.split('.')
                    .next()
                    .is_some_and(|i| i.parse::<usize>().is_ok())
        })
}

impl TinyDecoder {
    /// A diffusers `AutoencoderTiny` directory, or a TAESD decoder file.
    pub fn load(path: &Path) -> Result<Self, ImageError> {
        if path.is_dir() {
            let cfg = crate::weights::read_config(path)?;
            if cfg.get("_class_name").and_then(|c| c.as_str()) != Some("AutoencoderTiny") {
                return Err(bad(path, "not a TAESD (diffusers' AutoencoderTiny)"));
            }
            if cfg
                .get("upsampling_scaling_factor")
                .and_then(|v| v.as_u64())
                .is_some_and(|f| f != 2)
                || cfg
                    .get("act_fn")
                    .and_then(|v| v.as_str())
                    .is_some_and(|a| a != "relu")
            {
                return Err(bad(path, "only 2× upsampling and ReLU are read"));
            }
            return Self::from_weights(&Weights::open_dir(path)?);
        }
        let files: [PathBuf; 1] = [path.to_path_buf()];
        let w = Weights::open_with(path, &files, &|n| {
            if n.starts_with("decoder.layers.") {
                return Some(n.to_string());
            }
            let (i, rest) = n.split_once('.')?;
            let i: usize = i.parse().ok()?;
            Some(format!("decoder.layers.{}.{rest}", i.checked_sub(1)?))
        })?;
        Self::from_weights(&w)
    }

    fn from_weights(w: &Weights) -> Result<Self, ImageError> {
        let path = w.path();
        let last = w
            .names()
            .filter_map(|n| {
                n.strip_prefix("decoder.layers.")?
                    .split('.')
                    .next()?
                    .parse::<usize>()
                    .ok()
            })
            .max()
            .ok_or_else(|| bad(path, "no decoder layers"))?;
        let mut layers = Vec::with_capacity(last + 1);
        for i in 0..=last {
            let p = format!("decoder.layers.{i}");
            layers.push(if w.has(&format!("{p}.weight")) {
                Layer::Conv(Conv2d::load(w, &p, 1)?)
            } else if w.has(&format!("{p}.conv.0.weight")) {
                let c = |j: usize| Conv2d::load(w, &format!("{p}.conv.{j}"), 1);
                let skip = format!("{p}.skip");
                Layer::Block(Box::new((
                    [c(0)?, c(2)?, c(4)?],
                    if w.has(&format!("{skip}.weight")) {
                        Some(Conv2d::load(w, &skip, 1)?)
                    } else {
                        None
                    },
                )))
            } else if i == 1 {
                // The activation after the first convolution.
                Layer::Relu
            } else {
                Layer::Upsample
            });
        }
        let latent_channels = match layers.first() {
            Some(Layer::Conv(c)) => c.c_in,
            _ => return Err(bad(path, "the decoder does not start with a convolution")),
        };
        match layers.last() {
            Some(Layer::Conv(c)) if c.c_out == 3 => {}
            _ => return Err(bad(path, "the decoder does not end in three channels")),
        }
        let ups = layers
            .iter()
            .filter(|l| matches!(l, Layer::Upsample))
            .count();
        Ok(Self {
            layers,
            latent_channels,
            scale: 1 << ups,
        })
    }

    /// Latents as the sampler leaves them (TAESD reads them unscaled) to
    /// RGB in about [0, 1].
    pub fn decode(&self, pool: &ThreadPool, z: &Feat) -> Feat {
        let mut x = z.clone();
        x.data.iter_mut().for_each(|v| *v = (*v / 3.0).tanh() * 3.0);
        let relu = |f: &mut Feat| f.data.iter_mut().for_each(|v| *v = v.max(0.0));
        for l in &self.layers {
            x = match l {
                Layer::Conv(c) => c.forward(pool, &x),
                Layer::Relu => {
                    relu(&mut x);
                    x
                }
                Layer::Upsample => x.upsample2(),
                Layer::Block(block) => {
                    let ([a, b, c], skip) = &**block;
                    let mut h = a.forward(pool, &x);
                    relu(&mut h);
                    h = b.forward(pool, &h);
                    relu(&mut h);
                    h = c.forward(pool, &h);
                    match skip {
                        Some(s) => ops::add_inplace(&mut h.data, &s.forward(pool, &x).data),
                        None => ops::add_inplace(&mut h.data, &x.data),
                    }
                    relu(&mut h);
                    h
                }
            };
        }
        x
    }
}
