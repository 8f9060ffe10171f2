//! Prompt → image: tokenize and encode the prompt and the negative prompt,
//! start from seeded Gaussian latents, run the sampler's steps with
//! classifier-free guidance, decode with the VAE. Image-to-image starts
//! instead from a given picture, encoded and noised part of the way;
//! inpainting also puts the picture back, noised to each step's level,
//! wherever its mask says to keep it.

use crate::clip::{ClipTokenizer, TextEncoder};
use crate::nn::Feat;
use crate::sched::{gauss, Sampler, Schedule};
use crate::taesd::TinyDecoder;
use crate::text::{Encoder, Tokenizer};
use crate::unet::Unet;
use crate::vae::{VaeDecoder, VaeEncoder};
use crate::weights::Weights;
use crate::ImageError;
use hanlin_kernels::pool::ThreadPool;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use std::path::{Path, PathBuf};

/// The longest prompt accepted, in characters (CLIP reads 75 tokens; the
/// rest is dropped with a warning).
pub const MAX_PROMPT_CHARS: usize = 4000;
/// The largest image, in pixels.
pub const MAX_PIXELS: usize = 1024 * 1024;

#[derive(Clone, Debug)]
pub struct Request {
    pub prompt: String,
    pub negative: String,
    pub width: usize,
    pub height: usize,
    pub steps: usize,
    /// Classifier-free guidance scale; 1 or less turns guidance off (one
    /// UNet pass per step).
    pub guidance: f32,
    pub seed: u64,
    pub sampler: Sampler,
    /// Starting latents (channels-first, unscaled standard normal) instead
    /// of the seed's.
    pub latents: Option<Vec<f32>>,
    /// A picture to start from, instead of noise alone.
    pub init: Option<Init>,
}

/// The picture an image-to-image or inpainting request starts from.
#[derive(Clone, Debug)]
pub struct Init {
    /// At the request's width and height.
    pub image: Image,
    /// One value per pixel, row by row: 1 where the picture is painted
    /// anew, 0 where it is kept (and comes back unchanged). None: the whole
    /// picture is redrawn.
    pub mask: Option<Vec<f32>>,
    /// How far the picture is noised, in (0, 1]: the last `strength` share
    /// of the steps run. 1 keeps nothing of it where it is painted.
    pub strength: f32,
}

/// Steps, guidance and sampler a request gets when it names none: Stable
/// Diffusion's usual 20 steps of Euler at 7.5; 4 steps of LCM without
/// guidance for a model whose scheduler is diffusers' `LCMScheduler`; or
/// what a model's `model_index.json` says under `hanlin_defaults`
/// (`hanlin train image` writes the settings its models were measured
/// with).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Defaults {
    pub steps: usize,
    pub guidance: f32,
    pub sampler: Sampler,
}

impl Default for Defaults {
    fn default() -> Self {
        Self {
            steps: 20,
            guidance: 7.5,
            sampler: Sampler::Euler,
        }
    }
}

impl Defaults {
    /// A model made for `sampler`'s.
    fn for_sampler(sampler: Sampler) -> Self {
        match sampler {
            Sampler::Lcm => Self {
                steps: 4,
                guidance: 1.0,
                sampler,
            },
            _ => Self {
                sampler,
                ..Self::default()
            },
        }
    }

    /// `d` with what `model_index.json`'s `hanlin_defaults` changes; values
    /// out of range keep `d`'s.
    fn from_index(v: &serde_json::Value, d: Self) -> Self {
        Self {
            sampler: v
                .get("sampler")
                .and_then(|s| s.as_str())
                .and_then(Sampler::parse)
                .unwrap_or(d.sampler),
            steps: v
                .get("steps")
                .and_then(|s| s.as_u64())
                .filter(|s| (1..=200).contains(s))
                .map_or(d.steps, |s| s as usize),
            guidance: v
                .get("guidance")
                .and_then(|g| g.as_f64())
                .filter(|g| (0.0..=30.0).contains(g))
                .map_or(d.guidance, |g| g as f32),
        }
    }
}

impl Request {
    pub fn new(prompt: &str) -> Self {
        let d = Defaults::default();
        Self {
            prompt: prompt.to_owned(),
            negative: String::new(),
            width: 512,
            height: 512,
            steps: d.steps,
            guidance: d.guidance,
            seed: 0,
            sampler: d.sampler,
            latents: None,
            init: None,
        }
    }
}

/// An 8-bit RGB image.
#[derive(Clone, Debug, PartialEq)]
pub struct Image {
    pub width: usize,
    pub height: usize,
    pub rgb: Vec<u8>,
}

impl Image {
    /// From channels-last values in [0, 1].
    pub fn from_unit(f: &Feat) -> Self {
        Self {
            width: f.w,
            height: f.h,
            rgb: f.data[..f.hw() * 3]
                .iter()
                .map(|v| (v.clamp(0.0, 1.0) * 255.0).round() as u8)
                .collect(),
        }
    }

    /// Halved (each pixel the mean of a 2×2 block) until no side is longer
    /// than `side`.
    pub fn shrunk(mut self, side: usize) -> Self {
        while self.width.max(self.height) > side && self.width >= 2 && self.height >= 2 {
            let (w, h) = (self.width / 2, self.height / 2);
            let mut rgb = Vec::with_capacity(w * h * 3);
            for y in 0..h {
                for x in 0..w {
                    for c in 0..3 {
                        let at =
                            |yy: usize, xx: usize| self.rgb[(yy * self.width + xx) * 3 + c] as u32;
                        let sum = at(2 * y, 2 * x)
                            + at(2 * y, 2 * x + 1)
                            + at(2 * y + 1, 2 * x)
                            + at(2 * y + 1, 2 * x + 1);
                        rgb.push(((sum + 2) / 4) as u8);
                    }
                }
            }
            self = Self {
                width: w,
                height: h,
                rgb,
            };
        }
        self
    }

    /// The image as a PNG file.
    pub fn png(&self) -> Vec<u8> {
        let mut out = Vec::new();
        {
            let mut enc = png::Encoder::new(&mut out, self.width as u32, self.height as u32);
            enc.set_color(png::ColorType::Rgb);
            enc.set_depth(png::BitDepth::Eight);
            // Writing to memory fails only on a size mismatch, which the
            // constructor rules out.
            if let Ok(mut w) = enc.write_header() {
                let _ = w.write_image_data(&self.rgb);
            }
        }
        out
    }
}

/// A quick look at latents without the VAE: each latent position becomes
/// one pixel through a fixed linear map from Stable Diffusion's four latent
/// channels to RGB (the approximation image UIs use for previews; other
/// latent spaces get a rough picture).
pub fn preview(latents: &Feat) -> Image {
    const M: [[f32; 3]; 4] = [
        [0.298, 0.207, 0.208],
        [0.187, 0.286, 0.173],
        [-0.158, 0.189, 0.264],
        [-0.184, -0.271, -0.473],
    ];
    let mut rgb = Vec::with_capacity(latents.hw() * 3);
    for px in latents.sample(0).chunks_exact(latents.c) {
        for ch in 0..3 {
            let v: f32 = px.iter().zip(&M).map(|(x, m)| x * m[ch]).sum();
            rgb.push(((v + 1.0) / 2.0 * 255.0).clamp(0.0, 255.0) as u8);
        }
    }
    Image {
        width: latents.w,
        height: latents.h,
        rgb,
    }
}

/// What a step reports to its caller.
pub struct Progress<'a> {
    pub step: usize,
    pub steps: usize,
    /// The current latents (channels-last), for previews.
    pub latents: &'a Feat,
    /// Whether the model denoises pixels rather than VAE latents.
    pub pixels: bool,
    /// The pipeline's TAESD, when it has one, and its threads.
    pub tiny: Option<(&'a TinyDecoder, &'a ThreadPool)>,
}

/// The longest side of a preview decoded by a TAESD.
pub const PREVIEW_SIDE: usize = 256;

impl Progress<'_> {
    /// A quick look at the picture so far: the latents through the
    /// pipeline's TAESD (at most [`PREVIEW_SIDE`] on a side), through
    /// [`preview`] without one, or a pixel model's current image as it is.
    pub fn preview(&self) -> Image {
        if let Some((tiny, pool)) = self.tiny {
            return Image::from_unit(&tiny.decode(pool, self.latents)).shrunk(PREVIEW_SIDE);
        }
        if self.pixels {
            let f = self.latents;
            Image {
                width: f.w,
                height: f.h,
                rgb: f.data[..f.hw() * 3]
                    .iter()
                    .map(|&v| (signed_to_unit(v) * 255.0).round() as u8)
                    .collect(),
            }
        } else {
            preview(self.latents)
        }
    }
}

/// RGB in about [-1, 1] (what a VAE or a pixel model gives) to [0, 1].
fn signed_to_unit(v: f32) -> f32 {
    (v / 2.0 + 0.5).clamp(0.0, 1.0)
}

pub struct Pipeline {
    pub dir: PathBuf,
    /// Languages the text encoder was trained on (`hanlin_languages` in
    /// `model_index.json`; else English for CLIP, Chinese and English for
    /// a WordPiece vocabulary with Chinese characters).
    pub languages: Vec<String>,
    /// Guidance applies at timesteps from this one up (`hanlin_guidance_min_timestep`
    /// in `model_index.json`, default 0: always). Below it, where the
    /// picture's content is settled, the prompt alone is followed: guidance
    /// there only amplifies the model's errors in fine detail.
    guidance_min_t: f32,
    /// Steps, guidance and sampler when a request names none.
    pub defaults: Defaults,
    tokenizer: Tokenizer,
    text: Encoder,
    unet: Unet,
    /// None for a model that denoises pixels (trained by `hanlin train
    /// image`).
    vae: Option<VaeDecoder>,
    /// The VAE's encoder, for requests that start from a picture (None for
    /// single-file checkpoints, which are read for their decoder only).
    encoder: Option<VaeEncoder>,
    /// A TAESD for previews ([`Pipeline::set_previewer`]).
    tiny: Option<TinyDecoder>,
    schedule: Schedule,
    pool: ThreadPool,
}

impl Pipeline {
    /// A diffusers directory: `text_encoder/`, `tokenizer/`, `unet/`,
    /// `vae/` and (optionally) `scheduler/`. Without `vae/`, the UNet must
    /// work on RGB pixels (three channels in and out).
    pub fn load(dir: &Path, threads: usize) -> Result<Self, ImageError> {
        for part in ["unet", "text_encoder", "tokenizer"] {
            if !dir.join(part).is_dir() {
                return Err(ImageError::NotDiffusion(dir.display().to_string()));
            }
        }
        let t0 = std::time::Instant::now();
        let tokenizer = Tokenizer::load(&dir.join("tokenizer"))?;
        let text = Encoder::load(&dir.join("text_encoder"))?;
        let unet = Unet::load(&dir.join("unet"))?;
        unet.check(&dir.join("unet"))?;
        let (vae, encoder) = if dir.join("vae").is_dir() {
            let (d, e) = crate::vae::load(&dir.join("vae"))?;
            (Some(d), e)
        } else {
            (None, None)
        };
        let schedule = if dir.join("scheduler").is_dir() {
            Schedule::load(&dir.join("scheduler"))?
        } else {
            Schedule::default()
        };
        tracing::info!(dir = %dir.display(), ms = t0.elapsed().as_millis() as u64, "image pipeline loaded");
        let mut p = Self::assemble(dir, tokenizer, text, unet, vae, schedule, threads)?;
        p.encoder = encoder;
        let index = std::fs::read_to_string(dir.join("model_index.json"))
            .ok()
            .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok());
        if let Some(langs) = index
            .as_ref()
            .and_then(|v| v.get("hanlin_languages"))
            .and_then(|v| v.as_array())
        {
            p.languages = langs
                .iter()
                .filter_map(|l| l.as_str().map(str::to_owned))
                .collect();
        }
        if let Some(t) = index
            .as_ref()
            .and_then(|v| v.get("hanlin_guidance_min_timestep"))
            .and_then(|v| v.as_f64())
        {
            p.guidance_min_t = t.max(0.0) as f32;
        }
        if let Some(d) = index.as_ref().and_then(|v| v.get("hanlin_defaults")) {
            p.defaults = Defaults::from_index(d, p.defaults);
        }
        Ok(p)
    }

    /// A single-file Stable Diffusion 1.x checkpoint in the original layout
    /// ([`crate::ldm`]), with `tokenizer` (such files carry none).
    pub fn load_single(
        file: &Path,
        tokenizer: ClipTokenizer,
        config: &crate::ldm::Configs,
        threads: usize,
    ) -> Result<Self, ImageError> {
        let t0 = std::time::Instant::now();
        let files = [file.to_path_buf()];
        let all = Weights::open(file, &files)?;
        let layout = crate::ldm::Layout::of(all.names())
            .ok_or_else(|| ImageError::NotDiffusion(file.display().to_string()))?;
        drop(all);
        let part = |want: crate::ldm::Part| {
            Weights::open_with(file, &files, &move |n| {
                crate::ldm::rename(n, layout).and_then(|(p, name)| (p == want).then_some(name))
            })
        };
        let text =
            TextEncoder::from_parts(&config.text, &part(crate::ldm::Part::TextEncoder)?)?.into();
        let unet = Unet::from_parts(&config.unet, &part(crate::ldm::Part::Unet)?)?;
        unet.check(file)?;
        let vae = Some(VaeDecoder::from_parts(
            &config.vae,
            &part(crate::ldm::Part::Vae)?,
        )?);
        tracing::info!(file = %file.display(), ms = t0.elapsed().as_millis() as u64, "image checkpoint loaded");
        Self::assemble(
            file,
            tokenizer,
            text,
            unet,
            vae,
            Schedule::default(),
            threads,
        )
    }

    fn assemble(
        dir: &Path,
        tokenizer: Tokenizer,
        text: Encoder,
        unet: Unet,
        vae: Option<VaeDecoder>,
        schedule: Schedule,
        threads: usize,
    ) -> Result<Self, ImageError> {
        if unet.context_dim != text.dim() {
            return Err(crate::bad(
                dir,
                format!(
                    "the UNet attends to {}-wide text but the text encoder gives {}",
                    unet.context_dim,
                    text.dim()
                ),
            ));
        }
        let channels = vae.as_ref().map_or(3, |v| v.latent_channels);
        if unet.in_channels != channels || unet.out_channels != channels {
            return Err(crate::bad(
                dir,
                match vae {
                    Some(_) => format!(
                        "the UNet takes {} and gives {} latent channels but the VAE decodes {channels}",
                        unet.in_channels, unet.out_channels
                    ),
                    None => format!(
                        "no vae/ and the UNet takes {} and gives {} channels, not RGB pixels",
                        unet.in_channels, unet.out_channels
                    ),
                },
            ));
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            languages: tokenizer.languages(),
            guidance_min_t: 0.0,
            defaults: Defaults::for_sampler(schedule.sampler),
            tokenizer,
            text,
            unet,
            vae,
            encoder: None,
            tiny: None,
            schedule,
            pool: ThreadPool::new(threads.max(1)),
        })
    }

    /// Preview with `tiny` (a TAESD for this pipeline's latents) instead
    /// of the fixed latent-to-RGB map. Refused for a model without a VAE,
    /// or whose VAE's latents are not the TAESD's shape.
    pub fn set_previewer(&mut self, tiny: TinyDecoder) -> Result<(), ImageError> {
        match &self.vae {
            Some(v) if v.latent_channels == tiny.latent_channels && v.scale == tiny.scale => {
                self.tiny = Some(tiny);
                Ok(())
            }
            Some(v) => Err(ImageError::Request(format!(
                "a TAESD for {} latent channels at {}× does not fit a VAE of {} at {}×",
                tiny.latent_channels, tiny.scale, v.latent_channels, v.scale
            ))),
            None => Err(ImageError::Request(
                "this model denoises pixels; it needs no TAESD".into(),
            )),
        }
    }

    /// Whether previews go through a TAESD.
    pub fn has_previewer(&self) -> bool {
        self.tiny.is_some()
    }

    /// Whether prompts in Chinese reach the text encoder as meaning (else
    /// a chat model should put them into English first).
    pub fn reads_chinese(&self) -> bool {
        self.languages.iter().any(|l| l == "zh")
    }

    /// A request for `prompt` at the model's native size with its default
    /// steps and guidance.
    pub fn request(&self, prompt: &str) -> Request {
        let mut r = Request::new(prompt);
        (r.width, r.height) = (self.native_size(), self.native_size());
        (r.steps, r.guidance, r.sampler) = (
            self.defaults.steps,
            self.defaults.guidance,
            self.defaults.sampler,
        );
        r
    }

    /// The side the model was trained at, in pixels (512 for SD 1.x).
    pub fn native_size(&self) -> usize {
        self.unet.sample_size * self.scale()
    }

    /// Pixels per latent along a side (1 for pixel models).
    fn scale(&self) -> usize {
        self.vae.as_ref().map_or(1, |v| v.scale)
    }

    /// Image sides must be multiples of this many pixels.
    pub fn size_multiple(&self) -> usize {
        self.scale() * self.unet.downsampling()
    }

    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// The text encoder's output for `text` (`max_len` rows).
    pub fn encode_text(&self, text: &str) -> Result<Vec<f32>, ImageError> {
        let ids = self.tokenizer.encode(text)?;
        self.text.forward(&self.pool, &ids)
    }

    /// One UNet call: the model's output for latents `x` at timestep `t`.
    pub fn unet(&self, x: &Feat, t: f32, ctx: &[f32]) -> Feat {
        let ctx_len = ctx.len() / (x.n * self.text.dim());
        self.unet.forward(&self.pool, x, t, ctx, ctx_len)
    }

    /// Decode latents (as the sampler leaves them) to RGB in [0, 1].
    pub fn decode(&self, latents: &Feat) -> Feat {
        let mut img = match &self.vae {
            Some(vae) => {
                let mut z = latents.clone();
                z.data.iter_mut().for_each(|v| *v /= vae.scaling_factor);
                vae.decode(&self.pool, &z)
            }
            None => latents.clone(),
        };
        img.data.iter_mut().for_each(|v| *v = signed_to_unit(*v));
        img
    }

    /// The VAE decoder's raw output (RGB in about [-1, 1]) for latents
    /// already divided by the scaling factor.
    pub fn decode_raw(&self, z: &Feat) -> Feat {
        match &self.vae {
            Some(vae) => vae.decode(&self.pool, z),
            None => z.clone(),
        }
    }

    fn check(&self, r: &Request) -> Result<(), ImageError> {
        let m = self.size_multiple();
        if r.prompt.trim().is_empty() {
            return Err(ImageError::Request("the prompt is empty".into()));
        }
        for (what, s) in [("prompt", &r.prompt), ("negative prompt", &r.negative)] {
            if s.chars().count() > MAX_PROMPT_CHARS {
                return Err(ImageError::Request(format!(
                    "the {what} is longer than {MAX_PROMPT_CHARS} characters"
                )));
            }
        }
        if r.width == 0
            || r.height == 0
            || !r.width.is_multiple_of(m)
            || !r.height.is_multiple_of(m)
        {
            return Err(ImageError::Request(format!(
                "{}×{} is not a multiple of {m} pixels on each side",
                r.width, r.height
            )));
        }
        if r.width * r.height > MAX_PIXELS {
            return Err(ImageError::Request(format!(
                "{}×{} is larger than {MAX_PIXELS} pixels",
                r.width, r.height
            )));
        }
        if !(1..=200).contains(&r.steps) {
            return Err(ImageError::Request(format!("{} steps (1 to 200)", r.steps)));
        }
        if !(0.0..=30.0).contains(&r.guidance) {
            return Err(ImageError::Request(format!(
                "guidance {} (0 to 30)",
                r.guidance
            )));
        }
        if let Some(init) = &r.init {
            if (init.image.width, init.image.height) != (r.width, r.height)
                || init.image.rgb.len() != r.width * r.height * 3
            {
                return Err(ImageError::Request(format!(
                    "the picture to start from is {}×{}, not {}×{}",
                    init.image.width, init.image.height, r.width, r.height
                )));
            }
            if init
                .mask
                .as_ref()
                .is_some_and(|m| m.len() != r.width * r.height)
            {
                return Err(ImageError::Request(
                    "the mask is not the size of the picture".into(),
                ));
            }
            if !(init.strength > 0.0 && init.strength <= 1.0) {
                return Err(ImageError::Request(format!(
                    "strength {} (above 0, at most 1)",
                    init.strength
                )));
            }
            if !self.edits() {
                return Err(no_encoder());
            }
        }
        Ok(())
    }

    /// Whether requests may start from a picture ([`Request::init`]).
    pub fn edits(&self) -> bool {
        self.vae.is_none() || self.encoder.is_some()
    }

    /// RGB in [0, 1] (channels-last) as latents, as the sampler holds them
    /// (multiplied by the VAE's scaling factor).
    pub fn encode_image(&self, img: &Image) -> Result<Feat, ImageError> {
        let signed: Vec<f32> = img.rgb.iter().map(|&v| v as f32 / 127.5 - 1.0).collect();
        let x = Feat {
            n: 1,
            h: img.height,
            w: img.width,
            c: 3,
            data: signed,
        };
        match (&self.vae, &self.encoder) {
            (None, _) => Ok(x),
            (Some(_), Some(e)) => {
                let mut z = e.encode(&self.pool, &x);
                z.data.iter_mut().for_each(|v| *v *= e.scaling_factor);
                Ok(z)
            }
            (Some(_), None) => Err(no_encoder()),
        }
    }

    /// Run the sampler; returns RGB in [0, 1], channels-last. `progress`
    /// is called after every step and stops the run by returning false.
    pub fn run(
        &self,
        r: &Request,
        progress: &mut dyn FnMut(Progress) -> bool,
    ) -> Result<Feat, ImageError> {
        self.check(r)?;
        let c = self.unet.in_channels;
        let (lh, lw) = (r.height / self.scale(), r.width / self.scale());
        let guided = r.guidance > 1.0;
        let t0 = std::time::Instant::now();
        let cond = self.encode_text(&r.prompt)?;
        let ctx = if guided {
            let mut u = self.encode_text(&r.negative)?;
            u.extend_from_slice(&cond);
            u
        } else {
            cond
        };
        let plan = self.schedule.plan(r.sampler, r.steps);
        let mut rng = ChaCha8Rng::seed_from_u64(r.seed);
        let noise: Vec<f32> = match &r.latents {
            Some(l) if l.len() == c * lh * lw => l.clone(),
            Some(l) => {
                return Err(ImageError::Request(format!(
                    "{} starting latents for {c}×{lh}×{lw}",
                    l.len()
                )))
            }
            None => (0..c * lh * lw).map(|_| gauss(&mut rng)).collect(),
        };
        let noise = Feat::from_nchw(1, c, lh, lw, &noise);
        // A picture to start from: its latents, and which latents to keep.
        let known = match &r.init {
            Some(init) => Some((
                self.encode_image(&init.image)?,
                init.mask
                    .as_ref()
                    .map(|m| latent_mask(m, r.width, self.scale(), lh, lw)),
            )),
            None => None,
        };
        let start = r.init.as_ref().map_or(0, |i| plan.start_for(i.strength));
        let mut x = noise.clone();
        match (&known, &r.init) {
            // As diffusers: inpainting at full strength starts from noise
            // alone, image-to-image from the picture noised to the first
            // step's level.
            (Some((x0, mask)), Some(init)) if mask.is_none() || init.strength < 1.0 => {
                x.data = plan.noised(start, &x0.data, &noise.data);
            }
            _ => {
                let s0 = plan.init_noise_sigma();
                x.data.iter_mut().for_each(|v| *v *= s0);
            }
        }
        let steps = plan.timesteps.len();
        tracing::info!(ms = t0.elapsed().as_millis() as u64, "prompt encoded");
        for i in start..steps {
            let t1 = std::time::Instant::now();
            let t = plan.timesteps[i];
            let scale = plan.input_scale(i);
            let mut inp = x.clone();
            inp.data.iter_mut().for_each(|v| *v *= scale);
            let guide = guided && t >= self.guidance_min_t;
            if guide {
                inp.n = 2;
                inp.data.extend_from_within(..);
            }
            // Unguided steps of a guided run take the prompt's half.
            let c = if guided && !guide {
                &ctx[ctx.len() / 2..]
            } else {
                &ctx[..]
            };
            let out = self.unet(&inp, t, c);
            let m = x.data.len();
            let eps: Vec<f32> = if guide {
                let (u, c) = out.data.split_at(m);
                u.iter()
                    .zip(c)
                    .map(|(u, c)| u + r.guidance * (c - u))
                    .collect()
            } else {
                out.data
            };
            plan.step(i, &mut x.data, &eps, &mut rng);
            if let Some((x0, Some(mask))) = &known {
                // What is kept goes back, noised to the level just reached.
                let back = plan.noised_after(i, &x0.data, &noise.data);
                for ((xs, bs), &m) in x.data.chunks_mut(x.c).zip(back.chunks(x.c)).zip(mask) {
                    if m == 0.0 {
                        xs.copy_from_slice(bs);
                    }
                }
            }
            tracing::info!(
                step = i + 1,
                ms = t1.elapsed().as_millis() as u64,
                "denoising step"
            );
            if !progress(Progress {
                step: i + 1 - start,
                steps: steps - start,
                latents: &x,
                pixels: self.vae.is_none(),
                tiny: self.tiny.as_ref().map(|t| (t, &self.pool)),
            }) {
                return Err(ImageError::Cancelled);
            }
        }
        let t2 = std::time::Instant::now();
        let mut img = self.decode(&x);
        tracing::info!(ms = t2.elapsed().as_millis() as u64, "decoded");
        if let Some(Init {
            image,
            mask: Some(mask),
            ..
        }) = &r.init
        {
            // The kept pixels come back exactly (the VAE would blur them).
            for ((px, src), &m) in img.data.chunks_mut(3).zip(image.rgb.chunks(3)).zip(mask) {
                if m < 0.5 {
                    for (p, &s) in px.iter_mut().zip(src) {
                        *p = s as f32 / 255.0;
                    }
                }
            }
        }
        Ok(img)
    }

    /// [`Pipeline::run`] to an 8-bit image.
    pub fn generate(
        &self,
        r: &Request,
        progress: &mut dyn FnMut(Progress) -> bool,
    ) -> Result<Image, ImageError> {
        Ok(Image::from_unit(&self.run(r, progress)?))
    }
}

fn no_encoder() -> ImageError {
    ImageError::Request("this model has no VAE encoder, so it cannot start from a picture".into())
}

/// A per-pixel mask (`width` wide) at the latents' `lh × lw`, as diffusers
/// takes it: binarized at ½, each latent reading the first pixel of its
/// `scale × scale` block (nearest-neighbour). 1: painted anew.
fn latent_mask(mask: &[f32], width: usize, scale: usize, lh: usize, lw: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(lh * lw);
    for y in 0..lh {
        for x in 0..lw {
            let m = mask[(y * scale) * width + x * scale];
            out.push(if m >= 0.5 { 1.0 } else { 0.0 });
        }
    }
    out
}
