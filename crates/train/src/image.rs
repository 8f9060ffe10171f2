//! `hanlin train image`: a text-to-image model trained from nothing on
//! pictures generated here ([`crate::shapes`]) with captions in English and
//! Chinese. The caption tokenizer is learnt first (CLIP's BPE, written as
//! `tokenizer/`); then the text encoder and the pixel UNet ([`crate::sd`])
//! train together on DDPM's noise-prediction loss through the shared loop
//! ([`crate::trainer`]: checkpoints, resumption, `loss.csv`, `loss.png`).
//! One caption in ten is dropped so classifier-free guidance works. The
//! run ends with a diffusers directory (`model/`) that `hanlin image`,
//! the API and the web app load, and `samples.png`, drawn from it.

use crate::config::TrainConfig;
use crate::sd::{alphas_cumprod, ImageModelConfig, TextToImage};
use crate::shapes::{self, Lang, Scene};
use crate::trainer::{self, Progress, Task, Trainable};
use crate::{io_err, TrainError};
use burn::module::Module;
use burn::tensor::{Device, Int, Tensor, TensorData};
use hanlin_image::clip::ClipTokenizer;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// The recipe `hanlin train image` runs when given no config
/// (`recipes/image-shapes.toml`).
pub const RECIPE: &str = include_str!("../../../recipes/image-shapes.toml");

/// A run's settings: `[model]` and `[train]` in TOML.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImageRunConfig {
    #[serde(default)]
    pub model: ImageModelConfig,
    pub train: TrainConfig,
    /// Share of captions left empty (for classifier-free guidance).
    #[serde(default = "d_uncond")]
    pub uncond: f64,
    /// Entries in the learnt caption vocabulary.
    #[serde(default = "d_vocab")]
    pub vocab: usize,
    /// What the UNet learns to predict: `"v"` (the velocity
    /// √ᾱ·ε − √(1−ᾱ)·x₀, which weighs what the picture shows at high noise,
    /// where colours and places are decided) or `"epsilon"` (the noise).
    #[serde(default = "d_prediction")]
    pub prediction: String,
}

fn d_prediction() -> String {
    "v".into()
}

fn d_uncond() -> f64 {
    0.1
}
fn d_vocab() -> usize {
    1000
}

impl ImageRunConfig {
    pub fn from_toml(text: &str) -> Result<Self, TrainError> {
        let c: Self = toml::from_str(text).map_err(|e| TrainError::Config(e.to_string()))?;
        c.model.validate()?;
        c.train.check()?;
        if !matches!(c.prediction.as_str(), "v" | "epsilon") {
            return Err(TrainError::Config(format!(
                "prediction {:?}: use \"v\" or \"epsilon\"",
                c.prediction
            )));
        }
        if !(0.0..1.0).contains(&c.uncond) || !(300..=50_000).contains(&c.vocab) {
            return Err(TrainError::Config(
                "uncond must be in [0, 1) and vocab 300–50000".into(),
            ));
        }
        Ok(c)
    }
}

/// Checkpointed whole, as `model.bpk`.
impl Trainable for TextToImage {}

/// Captions for the tokenizer to learn from: every scene, every template,
/// both languages.
fn caption_corpus(seed: u64) -> Vec<String> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut out = Vec::new();
    for s in Scene::all() {
        for _ in 0..6 {
            out.push(s.caption(Lang::En, &mut rng));
            out.push(s.caption(Lang::Zh, &mut rng));
        }
    }
    out
}

/// A standard normal sample (Box–Muller).
fn normal(rng: &mut impl Rng) -> f32 {
    let u1: f32 = rng.random_range(f32::MIN_POSITIVE..1.0);
    let u2: f32 = rng.random();
    (-2.0 * u1.ln()).sqrt() * (std::f32::consts::TAU * u2).cos()
}

/// One batch: noisy pictures, their timesteps, caption ids and the targets.
struct Batch {
    x: Vec<f32>,
    t: Vec<f32>,
    ids: Vec<i64>,
    /// What the UNet should output: the noise or the velocity.
    target: Vec<f32>,
    n: usize,
}

struct ImageTask {
    tok: ClipTokenizer,
    cfg: ImageRunConfig,
    acp: Vec<f32>,
    val: Option<Batch>,
    out: PathBuf,
    vocab: usize,
}

impl ImageTask {
    fn batch(&self, seed: u64, n: usize) -> Result<Batch, TrainError> {
        let side = self.cfg.model.side;
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let px = 3 * side * side;
        let mut b = Batch {
            x: Vec::with_capacity(n * px),
            t: Vec::with_capacity(n),
            ids: Vec::with_capacity(n * self.tok.max_len),
            target: Vec::with_capacity(n * px),
            n,
        };
        let v = self.cfg.prediction == "v";
        for _ in 0..n {
            let s = Scene::random(&mut rng);
            let lang = if rng.random_bool(0.5) {
                Lang::En
            } else {
                Lang::Zh
            };
            let mut caption = s.caption(lang, &mut rng);
            if rng.random_bool(self.cfg.uncond) {
                caption.clear();
            }
            let ids = self
                .tok
                .encode(&caption)
                .map_err(|e| TrainError::Tokenizer(e.to_string()))?;
            b.ids.extend(ids.iter().map(|&i| i as i64));
            let img = s.render(side, Scene::random_placement(&mut rng));
            let t = rng.random_range(0..self.acp.len());
            let (a, s1) = (self.acp[t].sqrt(), (1.0 - self.acp[t]).sqrt());
            for x0 in img {
                let e = normal(&mut rng);
                b.target.push(if v { a * e - s1 * x0 } else { e });
                b.x.push(a * x0 + s1 * e);
            }
            b.t.push(t as f32);
        }
        Ok(b)
    }

    /// The loss on `b` with captions `ids` (the batch's own, or others).
    fn mse(&self, model: &TextToImage, b: &Batch, ids: &[i64], device: &Device) -> Tensor<1> {
        let side = self.cfg.model.side;
        let x = Tensor::<4>::from_data(TensorData::new(b.x.clone(), [b.n, 3, side, side]), device);
        let ids = Tensor::<2, Int>::from_data(
            TensorData::new(ids.to_vec(), [b.n, self.tok.max_len]),
            device,
        );
        let target = Tensor::<4>::from_data(
            TensorData::new(b.target.clone(), [b.n, 3, side, side]),
            device,
        );
        let pred = model.forward(x, &b.t, ids);
        (pred - target).powf_scalar(2.0).mean()
    }
}

impl Task<TextToImage> for ImageTask {
    fn loss(
        &mut self,
        model: &TextToImage,
        step: usize,
        micro: usize,
        device: &Device,
    ) -> (Tensor<1>, Vec<(&'static str, f32)>) {
        let seed = self.cfg.train.seed
            ^ ((step as u64) << 8 | micro as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        match self.batch(seed, self.cfg.train.batch_size) {
            Ok(b) => (self.mse(model, &b, &b.ids, device), Vec::new()),
            // Captions come from our own templates, so this cannot happen
            // with a tokenizer trained on them; a NaN stops the run clearly.
            Err(e) => {
                tracing::error!("{e}");
                (
                    Tensor::from_data(TensorData::new(vec![f32::NAN], [1]), device),
                    Vec::new(),
                )
            }
        }
    }

    fn validate(&mut self, model: &TextToImage, device: &Device) -> f32 {
        if self.val.is_none() {
            self.val = self
                .batch(self.cfg.train.seed.wrapping_add(0xA11CE), 64)
                .ok();
        }
        let Some(b) = &self.val else {
            return f32::NAN;
        };
        let loss = self.mse(model, b, &b.ids, device).into_scalar::<f32>();
        // The same pictures with each caption moved to the next picture:
        // how much the model gains from the text it is given.
        let mut other = b.ids.clone();
        other.rotate_left(self.tok.max_len);
        let without = self.mse(model, b, &other, device).into_scalar::<f32>();
        tracing::info!(loss, with_other_captions = without, "validation");
        loss
    }

    fn tokens_per_micro(&self) -> f64 {
        self.cfg.train.batch_size as f64
    }

    /// Each checkpoint is also exported as `model/` with `samples.png`, so
    /// a run can be watched and stopped with a usable model.
    fn checkpointed(&mut self, model: &TextToImage, _step: usize) -> Result<(), TrainError> {
        let model_dir = self.out.join("model");
        model.export(
            &self.cfg.model,
            &self.out.join("tokenizer"),
            self.vocab,
            &self.cfg.prediction,
            &model_dir,
        )?;
        draw_samples(
            &model_dir,
            &self.out.join("samples.png"),
            self.cfg.train.seed,
        )
    }
}

/// What a finished run left.
pub struct ImageOutcome {
    pub model_dir: PathBuf,
    pub samples: PathBuf,
    pub final_loss: f32,
    pub val_loss: f32,
    pub images_per_sec: f64,
    pub resumed_from: usize,
}

/// Prompts drawn in `samples.png`, and by the smoke test.
pub const SAMPLE_PROMPTS: [&str; 8] = [
    "a red circle on the left, black background",
    "a blue square at the top on a white background",
    "a yellow triangle in the center, gray background",
    "a green circle at the bottom, white background",
    "黑色背景上右边的紫色正方形",
    "中间有一个红色三角形，背景是白色",
    "一个蓝色圆形在下面，灰色背景",
    "灰色背景上上面的黄色圆形",
];

/// Train (or resume) the run in `out`, export `out/model` and draw
/// `out/samples.png`.
pub fn train(
    cfg: &ImageRunConfig,
    out: &Path,
    device: &Device,
    progress: impl FnMut(&Progress),
) -> Result<ImageOutcome, TrainError> {
    std::fs::create_dir_all(out).map_err(io_err(out))?;
    let saved = out.join("config.toml");
    let text = toml::to_string(cfg).map_err(|e| TrainError::Config(e.to_string()))?;
    if saved.exists() && trainer::has_checkpoint(out)? {
        let before = std::fs::read_to_string(&saved).map_err(io_err(&saved))?;
        let before = ImageRunConfig::from_toml(&before)?;
        if before.model != cfg.model {
            return Err(TrainError::Config(format!(
                "{} holds a run of another model shape; use a new output directory",
                out.display()
            )));
        }
    }
    std::fs::write(&saved, text).map_err(io_err(&saved))?;
    let tok_dir = out.join("tokenizer");
    let tok = if tok_dir.join("vocab.json").exists() {
        ClipTokenizer::load(&tok_dir)
    } else {
        ClipTokenizer::train(
            &caption_corpus(cfg.train.seed),
            cfg.vocab,
            cfg.model.max_len,
            &tok_dir,
        )
    }
    .map_err(|e| TrainError::Tokenizer(e.to_string()))?;
    // Every caption the generator can write must fit.
    let longest = Scene::all()
        .iter()
        .flat_map(|s| {
            [Lang::En, Lang::Zh]
                .into_iter()
                .flat_map(move |l| (0..shapes::TEMPLATES).map(move |k| s.template(l, k)))
        })
        .map(|c| tok.token_count(&c).unwrap_or(usize::MAX))
        .max()
        .unwrap_or(0);
    if longest + 2 > cfg.model.max_len {
        return Err(TrainError::Config(format!(
            "captions take up to {} tokens but max_len is {}",
            longest + 2,
            cfg.model.max_len
        )));
    }
    let vocab = tok.vocab_size();
    // The same seed, the same starting weights (and so the same run).
    device.seed(cfg.train.seed);
    let model = TextToImage::new(&cfg.model, vocab, device);
    let mut task = ImageTask {
        tok,
        cfg: cfg.clone(),
        acp: alphas_cumprod(),
        val: None,
        out: out.to_path_buf(),
        vocab,
    };
    let o = trainer::run(model, &cfg.train, out, device, &mut task, progress)?;
    let model_dir = out.join("model");
    let samples = out.join("samples.png");
    if !model_dir.is_dir() {
        // A finished run resumed: export what its checkpoint holds.
        task.checkpointed(&o.model.valid(), cfg.train.steps)?;
    }
    Ok(ImageOutcome {
        model_dir,
        samples,
        final_loss: o.final_loss,
        val_loss: o.val_loss,
        images_per_sec: o.tokens_per_sec,
        resumed_from: o.resumed_from,
    })
}

/// A grid of [`SAMPLE_PROMPTS`] drawn by the exported model (4 per row,
/// each scaled up ×4 so it can be seen).
pub fn draw_samples(model: &Path, out: &Path, seed: u64) -> Result<(), TrainError> {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let img_err =
        |e: hanlin_image::ImageError| TrainError::Config(format!("{}: {e}", model.display()));
    let p = hanlin_image::pipeline::Pipeline::load(model, threads).map_err(img_err)?;
    let side = p.native_size();
    let zoom = 4;
    let cell = side * zoom;
    let (cols, rows) = (4, SAMPLE_PROMPTS.len().div_ceil(4));
    let (w, h) = (cols * cell, rows * cell);
    let mut rgb = vec![0u8; w * h * 3];
    for (k, prompt) in SAMPLE_PROMPTS.iter().enumerate() {
        let mut req = p.request(prompt);
        req.seed = seed + k as u64;
        let img = p.generate(&req, &mut |_| true).map_err(img_err)?;
        let (ox, oy) = ((k % cols) * cell, (k / cols) * cell);
        for y in 0..cell {
            for x in 0..cell {
                let src = ((y / zoom) * img.width + x / zoom) * 3;
                let dst = ((oy + y) * w + ox + x) * 3;
                rgb[dst..dst + 3].copy_from_slice(&img.rgb[src..src + 3]);
            }
        }
    }
    let png = hanlin_image::pipeline::Image {
        width: w,
        height: h,
        rgb,
    }
    .png();
    std::fs::write(out, png).map_err(io_err(out))
}

/// Write `n` generated pictures with their captions and labels to `dir`
/// (`000.png` …, `labels.jsonl`), for training and checking an evaluator.
pub fn write_dataset(dir: &Path, n: usize, side: usize, seed: u64) -> Result<(), TrainError> {
    std::fs::create_dir_all(dir).map_err(io_err(dir))?;
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut lines = String::new();
    for i in 0..n {
        let s = Scene::random(&mut rng);
        let lang = if i % 2 == 0 { Lang::En } else { Lang::Zh };
        let caption = s.caption(lang, &mut rng);
        let img = s.render(side, Scene::random_placement(&mut rng));
        let file = format!("{i:05}.png");
        let png = hanlin_image::pipeline::Image {
            width: side,
            height: side,
            rgb: shapes::to_rgb8(&img, side),
        }
        .png();
        let path = dir.join(&file);
        std::fs::write(&path, png).map_err(io_err(&path))?;
        let row = serde_json::json!({
            "file": file,
            "caption": caption,
            "colour": shapes::COLOURS[s.colour].0,
            "shape": shapes::SHAPES[s.shape].0,
            "position": shapes::POSITIONS[s.position].0,
            "background": shapes::BACKGROUNDS[s.background].0,
        });
        lines.push_str(&row.to_string());
        lines.push('\n');
    }
    let path = dir.join("labels.jsonl");
    std::fs::write(&path, lines).map_err(io_err(&path))
}

#[cfg(test)]
mod tests {
    use super::*;
    use hanlin_image::nn::Feat;

    /// Starting weights are drawn from the device's one random generator:
    /// tests that draw them take turns, so a seeded run draws the same.
    static WEIGHTS: std::sync::Mutex<()> = std::sync::Mutex::new(());

    fn drawing() -> std::sync::MutexGuard<'static, ()> {
        WEIGHTS.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn tiny() -> ImageRunConfig {
        let mut cfg = ImageRunConfig::from_toml(RECIPE).unwrap();
        cfg.model.channels = vec![32, 64];
        cfg.model.attention = vec![false, true];
        cfg.model.side = 16;
        cfg.model.text_dim = 32;
        cfg
    }

    fn max_rel(a: &[f32], b: &[f32]) -> f32 {
        let range = b.iter().fold(0f32, |m, v| m.max(v.abs()));
        let err = a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
        err / range.max(1e-6)
    }

    /// The exported directory, loaded by hanlin-image (Q8_0 products),
    /// computes what the burn model computes: the text encoder's output
    /// and one UNet call, through every weight name and layout.
    #[test]
    fn export_matches_the_trained_model() {
        let _turn = drawing();
        let dir = tempfile::tempdir().unwrap();
        let cfg = tiny();
        let tok_dir = dir.path().join("tokenizer");
        let tok =
            ClipTokenizer::train(&caption_corpus(1), 600, cfg.model.max_len, &tok_dir).unwrap();
        let device = Device::default();
        let model = TextToImage::new(&cfg.model, tok.vocab_size(), &device);
        // Random biases and norm weights too, so a misplaced one shows.
        let model = jitter(model);
        let out = dir.path().join("model");
        model
            .export(&cfg.model, &tok_dir, tok.vocab_size(), "v", &out)
            .unwrap();
        let p = hanlin_image::pipeline::Pipeline::load(&out, 2).unwrap();
        assert_eq!(p.native_size(), 16);
        assert!(p.reads_chinese(), "trained on Chinese captions too");

        computes_like(&model, &tok, &p);

        // The recipe's UNet also takes each pixel's coordinates; a
        // directory that does not say so is refused, naming the channels.
        assert!(cfg.model.coords);
        let index = out.join("unet/config.json");
        let text = std::fs::read_to_string(&index).unwrap();
        let flag = "\"hanlin_coord_channels\": true";
        assert!(text.contains(flag), "{text}");
        std::fs::write(
            &index,
            text.replace(flag, "\"hanlin_coord_channels\": false"),
        )
        .unwrap();
        let e = hanlin_image::pipeline::Pipeline::load(&out, 2)
            .err()
            .expect("a UNet with 5 input channels and no coordinates")
            .to_string();
        assert!(e.contains("takes 5 and gives 3"), "{e}");
    }

    /// `caption`'s token ids as a batch of one.
    fn caption_ids(tok: &ClipTokenizer, caption: &str) -> Tensor<2, Int> {
        let ids: Vec<i64> = tok
            .encode(caption)
            .unwrap()
            .iter()
            .map(|&i| i as i64)
            .collect();
        let n = ids.len();
        Tensor::from_data(TensorData::new(ids, [1, n]), &Device::default())
    }

    fn values<const D: usize>(t: Tensor<D>) -> Vec<f32> {
        t.to_data().convert::<f32>().try_to_vec::<f32>().unwrap()
    }

    /// The loaded pipeline `p` computes what `model` computes: the text
    /// encoder's output and one UNet call (16×16).
    fn computes_like(
        model: &TextToImage,
        tok: &ClipTokenizer,
        p: &hanlin_image::pipeline::Pipeline,
    ) {
        let device = Device::default();
        let caption = "黑色背景上左边的红色圆形";
        let ctx = model.text.forward(caption_ids(tok, caption));
        let want = values(ctx.clone());
        let got = p.encode_text(caption).unwrap();
        let e = max_rel(&got, &want);
        assert!(e < 0.05, "text encoder: max error {e} of the range");

        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let x: Vec<f32> = (0..3 * 16 * 16).map(|_| normal(&mut rng)).collect();
        let t = 617.0;
        let xt = Tensor::<4>::from_data(TensorData::new(x.clone(), [1, 3, 16, 16]), &device);
        let want = values(model.unet.forward(xt, &[t], &ctx));
        let got = p
            .unet(&Feat::from_nchw(1, 3, 16, 16, &x), t, &got)
            .to_nchw();
        let e = max_rel(&got, &want);
        assert!(e < 0.08, "UNet: max error {e} of the range");
    }

    /// A run that keeps a moving average exports the average (what its
    /// checkpoint keeps beside the trained weights), and the export
    /// computes what the average computes in burn.
    #[test]
    fn a_run_with_an_average_exports_the_average() {
        let _turn = drawing();
        use crate::trainer::{checkpoint_dir, weights_dir, Trainable};
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = tiny();
        cfg.vocab = 600;
        cfg.train.steps = 4;
        cfg.train.batch_size = 4;
        cfg.train.eval_every = 2;
        cfg.train.checkpoint_every = 4;
        cfg.train.ema = Some(0.5);
        let o = train(&cfg, dir.path(), &Device::default().autodiff(), |_| {}).unwrap();
        let p = hanlin_image::pipeline::Pipeline::load(&o.model_dir, 2).unwrap();
        let tok = ClipTokenizer::load(&dir.path().join("tokenizer")).unwrap();
        let ck = checkpoint_dir(dir.path());
        assert!(weights_dir(&ck).ends_with("ema"));
        let load = |d: &Path| {
            TextToImage::new(&cfg.model, tok.vocab_size(), &Device::default())
                .load_weights(d)
                .unwrap()
        };
        computes_like(&load(&weights_dir(&ck)), &tok, &p);
        // The trained weights are another model.
        let ids = caption_ids(&tok, "a red circle on the left, black background");
        let a = values(load(&ck).text.forward(ids.clone()));
        let b = values(load(&weights_dir(&ck)).text.forward(ids));
        assert!(max_rel(&a, &b) > 1e-3, "the average is the trained weights");
    }

    /// The same settings and tokenizer give the same run: the starting
    /// weights come from the seed (they were drawn unseeded, so two runs of
    /// the recipe differed from their first step).
    #[test]
    fn a_run_is_reproducible_from_its_seed() {
        let _turn = drawing();
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = tiny();
        cfg.vocab = 600;
        cfg.train.steps = 3;
        cfg.train.batch_size = 4;
        cfg.train.checkpoint_every = 3;
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        let device = Device::default().autodiff();
        train(&cfg, &a, &device, |_| {}).unwrap();
        // The second run reads the first one's tokenizer (training one
        // breaks ties between merges in no fixed order).
        std::fs::create_dir_all(b.join("tokenizer")).unwrap();
        for f in ["vocab.json", "merges.txt", "tokenizer_config.json"] {
            std::fs::copy(a.join("tokenizer").join(f), b.join("tokenizer").join(f)).unwrap();
        }
        train(&cfg, &b, &device, |_| {}).unwrap();
        let losses = |d: &Path| crate::curves::read(&d.join("loss.csv")).unwrap();
        assert_eq!(losses(&a), losses(&b));
    }

    /// Every parameter moved by noise (burn initialises biases and norms
    /// to constants, which would hide a misnamed one).
    fn jitter(m: TextToImage) -> TextToImage {
        struct J(ChaCha8Rng);
        impl burn::module::ModuleMapper for J {
            fn map_float<const D: usize>(
                &mut self,
                param: burn::module::Param<Tensor<D>>,
            ) -> burn::module::Param<Tensor<D>> {
                let (id, t, mapper) = param.consume();
                let dims = t.dims();
                let len: usize = dims.iter().product();
                let noise: Vec<f32> = (0..len).map(|_| 0.1 * normal(&mut self.0)).collect();
                let noise = Tensor::<D>::from_data(TensorData::new(noise, dims), &t.device());
                burn::module::Param::from_mapped_value(id, t + noise, mapper)
            }
        }
        m.map(&mut J(ChaCha8Rng::seed_from_u64(9)))
    }

    /// A learnt vocabulary keeps Chinese characters apart: captions that
    /// differ in one word differ in its tokens only (a run of characters
    /// was one word, and BPE merged whole captions into single tokens).
    #[test]
    fn chinese_captions_are_tokenized_by_character() {
        let dir = tempfile::tempdir().unwrap();
        let tok = ClipTokenizer::train(&caption_corpus(1), 1000, 32, dir.path()).unwrap();
        let red = tok.encode("黑色背景上左边的红色圆形").unwrap();
        let blue = tok.encode("黑色背景上左边的蓝色圆形").unwrap();
        assert_eq!(tok.token_count("黑色背景上左边的红色圆形").unwrap(), 12);
        let differ = red.iter().zip(&blue).filter(|(a, b)| a != b).count();
        assert_eq!(differ, 1, "{red:?} {blue:?}");
        // English words stay whole.
        assert_eq!(tok.token_count("a red circle on the left").unwrap(), 6);
        // The same files, loaded, tokenize the same way.
        let again = ClipTokenizer::load(dir.path()).unwrap();
        assert_eq!(
            again.encode("左边有一个红色圆形").unwrap(),
            tok.encode("左边有一个红色圆形").unwrap()
        );
    }

    #[test]
    fn configs_are_checked() {
        let bad = RECIPE.replace("side = 24", "side = 30");
        assert!(ImageRunConfig::from_toml(&bad).is_err());
        let bad = RECIPE.replace("channels = [32, 64, 128]", "channels = [32, 64]");
        assert!(ImageRunConfig::from_toml(&bad).is_err());
        let bad = RECIPE.replace("uncond = 0.1", "uncond = 1.5");
        assert!(ImageRunConfig::from_toml(&bad).is_err());
    }
}
