//! `hanlin image`: text to PNG with a Stable Diffusion pipeline, or a
//! picture redrawn (`--init`) or painted into (`--mask`).

use anyhow::{bail, Context, Result};
use clap::Args;
use hanlin_image::picture::{Picture, Start};
use hanlin_image::Sampler;
use std::path::PathBuf;

#[derive(Args)]
pub struct ImageArgs {
    /// What to draw
    prompt: String,
    /// Write the PNG here (several images: NAME-2.png, NAME-3.png, …)
    #[arg(long, short = 'o', default_value = "image.png")]
    output: PathBuf,
    /// Image model: a diffusers directory, a pulled model, or
    /// hf:owner/repo (default: the first pulled image model)
    #[arg(long, short = 'm')]
    model: Option<String>,
    /// What the image should not show
    #[arg(long, default_value = "")]
    negative: String,
    /// WIDTHxHEIGHT in pixels (multiples of 64 for Stable Diffusion;
    /// default: the size the model was trained at)
    #[arg(long)]
    size: Option<String>,
    /// Denoising steps (1–4 for Turbo models; default: the model's, 20
    /// for Stable Diffusion)
    #[arg(long)]
    steps: Option<usize>,
    /// Classifier-free guidance scale (0 or 1: off, as Turbo models want;
    /// default: the model's, 7.5 for Stable Diffusion)
    #[arg(long)]
    guidance: Option<f32>,
    /// Sampler: euler, euler_a, ddim, lcm (default: the model's — lcm for
    /// an LCMScheduler, else euler)
    #[arg(long)]
    sampler: Option<String>,
    /// Seed (the same seed, prompt and settings give the same image;
    /// default: a new one, printed)
    #[arg(long)]
    seed: Option<u64>,
    /// How many images (seeds SEED, SEED+1, …)
    #[arg(long, short = 'n', default_value_t = 1)]
    count: usize,
    /// Start from this PNG picture (image-to-image; its transparent pixels,
    /// if any, are where to paint)
    #[arg(long)]
    init: Option<PathBuf>,
    /// Paint only where this PNG mask is white or transparent, keep the
    /// rest of --init's picture (inpainting)
    #[arg(long, requires = "init")]
    mask: Option<PathBuf>,
    /// How far --init's picture is noised, above 0 to 1 (default: 1 where
    /// a mask says to paint, 0.8 for the whole picture)
    #[arg(long, requires = "init")]
    strength: Option<f32>,
    /// Also write each step's preview into this folder (OUTPUT-step-NN.png;
    /// through a pulled TAESD when one fits the model, else the latents'
    /// colours at one pixel per latent), to watch the picture form
    #[arg(long)]
    previews: Option<PathBuf>,
}

/// `--init`'s picture, `--mask` and `--strength`.
fn starting_picture(a: &ImageArgs) -> Result<Option<Start>> {
    let Some(path) = &a.init else {
        return Ok(None);
    };
    let read = |p: &PathBuf| -> Result<Picture> {
        let bytes = std::fs::read(p).with_context(|| format!("reading {}", p.display()))?;
        Picture::from_png(&bytes).with_context(|| p.display().to_string())
    };
    let mask = a.mask.as_ref().map(read).transpose()?;
    Ok(Some(
        Start::new(read(path)?, mask.as_ref(), a.strength).context("--strength")?,
    ))
}

fn parse_size(s: &str) -> Option<(usize, usize)> {
    let (w, h) = s.split_once(['x', 'X', '×'])?;
    Some((w.trim().parse().ok()?, h.trim().parse().ok()?))
}

pub fn run(store: &hanlin_store::Store, threads: usize, a: ImageArgs) -> Result<()> {
    let sampler = a
        .sampler
        .as_deref()
        .map(|s| {
            Sampler::parse(s).with_context(|| {
                format!(
                    "unknown sampler {s:?} (use one of {})",
                    Sampler::NAMES.join(", ")
                )
            })
        })
        .transpose()?;
    if let Some(d) = &a.previews {
        std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
    }
    if !(1..=16).contains(&a.count) {
        bail!("--count must be from 1 to 16");
    }
    let t0 = std::time::Instant::now();
    let pipe = hanlin_image::open(store, a.model.as_deref(), threads, true).with_context(|| {
        format!(
            "loading the image model {}",
            a.model.as_deref().unwrap_or("(default)")
        )
    })?;
    eprintln!(
        "loaded {} in {:.1} s",
        pipe.dir.display(),
        t0.elapsed().as_secs_f32()
    );
    let start = starting_picture(&a)?;
    if start.is_some() && !pipe.edits() {
        bail!("this model has no VAE encoder, so it cannot start from a picture (use a diffusers directory)");
    }
    let (width, height) = match &a.size {
        // A picture to start from is drawn at about its own size.
        None => match &start {
            Some(s) => s.size(pipe.size_multiple()),
            None => (pipe.native_size(), pipe.native_size()),
        },
        Some(s) => parse_size(s).context("--size must be WIDTHxHEIGHT, e.g. 512x512")?,
    };
    if hanlin_image::has_chinese(&a.prompt) && !pipe.reads_chinese() {
        eprintln!("note: this model's text encoder reads English only; `hanlin serve` has the chat model put Chinese prompts into English first");
    }
    let seed = a.seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64 % 1_000_000_000)
            .unwrap_or(0)
    });
    for i in 0..a.count {
        let mut r = pipe.request(&a.prompt);
        r.negative = a.negative.clone();
        (r.width, r.height) = (width, height);
        r.steps = a.steps.unwrap_or(r.steps);
        r.guidance = a.guidance.unwrap_or(r.guidance);
        r.sampler = sampler.unwrap_or(r.sampler);
        r.seed = seed + i as u64;
        r.init = start.as_ref().map(|s| s.init(width, height));
        let dropped = pipe
            .tokenizer()
            .token_count(&r.prompt)?
            .saturating_sub(pipe.tokenizer().max_len - 2);
        if dropped > 0 {
            eprintln!(
                "note: the text encoder reads {} tokens; the last {dropped} tokens of the prompt are ignored",
                pipe.tokenizer().max_len - 2
            );
        }
        let pb = indicatif::ProgressBar::new(r.steps as u64);
        pb.set_style(
            indicatif::ProgressStyle::with_template(
                "{msg} [{bar:30}] step {pos}/{len} {elapsed_precise} (~{eta} left)",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
            .progress_chars("=> "),
        );
        pb.set_message(format!("seed {}", r.seed));
        let t = std::time::Instant::now();
        let stem = a
            .output
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or("image");
        let (out, out_stem) = if i == 0 {
            (a.output.clone(), stem.to_string())
        } else {
            let n = format!("{stem}-{}", i + 1);
            (a.output.with_file_name(format!("{n}.png")), n)
        };
        let (mut failed, mut preview_s) = (None, 0f32);
        let made = pipe.generate(&r, &mut |p| {
            pb.set_length(p.steps as u64);
            pb.set_position(p.step as u64);
            if let Some(dir) = &a.previews {
                let t = std::time::Instant::now();
                let path = dir.join(format!("{out_stem}-step-{:02}.png", p.step));
                if let Err(e) = std::fs::write(&path, p.preview().png()) {
                    failed =
                        Some(anyhow::Error::new(e).context(format!("writing {}", path.display())));
                    return false;
                }
                preview_s += t.elapsed().as_secs_f32();
            }
            if p.step == p.steps {
                pb.set_message("decoding".to_string());
            }
            true
        });
        pb.finish_and_clear();
        if let Some(e) = failed {
            return Err(e);
        }
        let img = made?;
        if a.previews.is_some() {
            eprintln!(
                "previews: {} steps, {preview_s:.1} s ({})",
                r.steps,
                if pipe.has_previewer() {
                    "TAESD"
                } else {
                    "latent colours"
                }
            );
        }
        std::fs::write(&out, img.png()).with_context(|| format!("writing {}", out.display()))?;
        eprintln!(
            "{} ({}×{}, seed {}, {} steps, {:.1} s)",
            out.display(),
            img.width,
            img.height,
            r.seed,
            r.steps,
            t.elapsed().as_secs_f32()
        );
    }
    Ok(())
}
