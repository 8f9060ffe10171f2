//! Text-to-image with Stable Diffusion pipelines, on the engine's kernels.
//!
//! A pipeline is a diffusers directory (`model_index.json`, and
//! `text_encoder/`, `tokenizer/`, `unet/`, `vae/`, `scheduler/`, each with
//! its `config.json` and safetensors weights). Every weight matrix and
//! convolution is converted at load to Q8_0 and multiplied by the same
//! quantized matrix product as the chat models ([`hanlin_kernels::linear`]);
//! feature maps are f32 and channels-last, so a convolution is one matrix
//! product over im2col rows. Stages load one after another.
//!
//! - [`weights`] — safetensors files (f32, f16, bf16) by tensor name.
//! - [`nn`] — convolutions, group norm, attention, the blocks UNet and VAE share.
//! - [`ldm`] — single-file checkpoints in the original layout, renamed.
//! - [`clip`] — the CLIP tokenizer and text encoder.
//! - [`bert`] — a WordPiece tokenizer and BERT (Chinese-native pipelines).
//! - [`text`] — whichever of the two a pipeline has.
//! - [`unet`] — `UNet2DConditionModel`.
//! - [`vae`] — the `AutoencoderKL` decoder and encoder.
//! - [`taesd`] — the `AutoencoderTiny` decoder, for previews while denoising.
//! - [`picture`] — PNG pictures and masks that edits start from.
//! - [`sched`] — noise schedules and samplers (Euler, Euler ancestral, DDIM).
//! - [`pipeline`] — prompt → image, classifier-free guidance, seeds;
//!   image-to-image and inpainting.
//! - [`queue`] — one worker per loaded pipeline, jobs by priority, cancellation.

pub mod bert;
pub mod clip;
pub mod ldm;
pub mod nn;
pub mod picture;
pub mod pipeline;
pub mod queue;
pub mod sched;
pub mod taesd;
pub mod text;
pub mod unet;
pub mod vae;
pub mod weights;

pub use pipeline::{Image, Init, Pipeline, Progress, Request};
pub use sched::Sampler;

/// Whether `s` has Chinese characters (CJK ideographs): such a prompt
/// means nothing to CLIP's English-only text encoder.
pub fn has_chinese(s: &str) -> bool {
    s.chars().any(|c| {
        matches!(c, '\u{3400}'..='\u{4dbf}' | '\u{4e00}'..='\u{9fff}' | '\u{f900}'..='\u{faff}')
    })
}

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("{path}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {msg}")]
    Bad { path: String, msg: String },
    #[error("{0} is not a diffusion model directory (no model_index.json, unet/ or vae/)")]
    NotDiffusion(String),
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("invalid request: {0}")]
    Request(String),
    #[error("cancelled")]
    Cancelled,
    #[error("no image model is installed; pull a diffusers pipeline with `hanlin pull hf:owner/repo` or pass a directory")]
    NoModel,
    #[error("{0} is not an image model (pulled image models: {1})")]
    UnknownModel(String, String),
    #[error(transparent)]
    Store(#[from] hanlin_store::StoreError),
}

/// Pulled image models (diffusers pipelines, and single-file
/// `.safetensors` checkpoints), by name.
pub fn installed(store: &hanlin_store::Store) -> Result<Vec<String>, ImageError> {
    Ok(store
        .list()?
        .into_iter()
        .filter(|m| {
            m.files.contains_key("unet/config.json")
                || (m.source.contains(".safetensors") && !is_previewer(store, m))
        })
        .map(|m| m.name)
        .collect())
}

/// A TAESD file is a few megabytes; larger single files (checkpoints of
/// gigabytes) are not opened to find out.
const MAX_TAESD_BYTES: u64 = 64 << 20;

/// Whether pulled model `m` is a TAESD decoder file.
fn is_previewer(store: &hanlin_store::Store, m: &hanlin_store::Manifest) -> bool {
    m.source.contains(".safetensors")
        && m.size <= MAX_TAESD_BYTES
        && store
            .path_of(&m.name)
            .ok()
            .flatten()
            .is_some_and(|p| taesd::is_file(&p))
}

/// Pulled TAESD decoders (single safetensors files, e.g. `hanlin pull
/// hf:madebyollin/taesd/diffusion_pytorch_model.safetensors`), by name.
pub fn previewers(store: &hanlin_store::Store) -> Result<Vec<String>, ImageError> {
    Ok(store
        .list()?
        .into_iter()
        .filter(|m| is_previewer(store, m))
        .map(|m| m.name)
        .collect())
}

/// Give `pipe` the first pulled TAESD that fits its latents, if any.
fn attach_previewer(store: &hanlin_store::Store, pipe: &mut Pipeline) {
    for name in previewers(store).unwrap_or_default() {
        let Some(path) = store.path_of(&name).ok().flatten() else {
            continue;
        };
        match taesd::TinyDecoder::load(&path).and_then(|t| pipe.set_previewer(t)) {
            Ok(()) => {
                tracing::info!(taesd = %name, "previews through TAESD");
                return;
            }
            Err(e) => tracing::debug!(taesd = %name, "not used for previews: {e}"),
        }
    }
}

/// Load image model `name` (see [`locate`]). A single-file checkpoint
/// takes the tokenizer beside it (`tokenizer/` in its directory) or CLIP's
/// merges from the catalog (`clip-bpe`, pulled when missing). A pulled
/// TAESD that fits the model's latents draws its previews.
pub fn open(
    store: &hanlin_store::Store,
    name: Option<&str>,
    threads: usize,
    progress: bool,
) -> Result<Pipeline, ImageError> {
    let path = locate(store, name, progress)?;
    let mut pipe = open_path(store, &path, threads, progress)?;
    attach_previewer(store, &mut pipe);
    Ok(pipe)
}

fn open_path(
    store: &hanlin_store::Store,
    path: &std::path::Path,
    threads: usize,
    progress: bool,
) -> Result<Pipeline, ImageError> {
    if path.is_dir() {
        return Pipeline::load(path, threads);
    }
    let beside = path.with_file_name("tokenizer");
    let tokenizer = if beside.join("vocab.json").exists() {
        clip::ClipTokenizer::load(&beside)?
    } else {
        let m = store.pull(hanlin_store::CLIP_BPE, progress)?;
        clip::ClipTokenizer::from_bpe_gz(&store.blob_path(&m.sha256))?
    };
    Pipeline::load_single(path, tokenizer, &ldm::Configs::default(), threads)
}

/// Where image model `name` is: a diffusers directory or `.safetensors`
/// checkpoint given by path, a pulled model, or `hf:owner/repo` (a
/// diffusers repository) / `hf:owner/repo/file.safetensors` (pulled first). `None` picks
/// the first pulled image model.
pub fn locate(
    store: &hanlin_store::Store,
    name: Option<&str>,
    progress: bool,
) -> Result<std::path::PathBuf, ImageError> {
    let name = match name {
        Some(n) => n.to_owned(),
        None => installed(store)?
            .into_iter()
            .next()
            .ok_or(ImageError::NoModel)?,
    };
    let path = std::path::Path::new(&name);
    if path.is_dir() || (path.is_file() && name.ends_with(".safetensors")) {
        return Ok(path.to_path_buf());
    }
    let local = if name.starts_with("hf:") {
        store.pull(&name, progress)?.name
    } else {
        name.clone()
    };
    if let Some(dir) = store.dir_of(&local)? {
        return Ok(dir);
    }
    let single = store
        .get(&local)?
        .filter(|m| m.source.contains(".safetensors"))
        .and_then(|_| store.path_of(&local).ok().flatten());
    single.ok_or_else(|| {
        ImageError::UnknownModel(
            name,
            installed(store)
                .ok()
                .filter(|v| !v.is_empty())
                .map_or_else(|| "none".to_string(), |v| v.join(", ")),
        )
    })
}

pub(crate) fn bad(path: &std::path::Path, msg: impl Into<String>) -> ImageError {
    ImageError::Bad {
        path: path.display().to_string(),
        msg: msg.into(),
    }
}
