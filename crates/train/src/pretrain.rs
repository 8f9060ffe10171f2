//! Pretraining from scratch: next-token prediction on a corpus, AdamW with
//! warmup + cosine decay and gradient clipping, a validation loss every
//! `eval_every` steps, checkpoints every `checkpoint_every` steps (written
//! to a temporary directory and renamed, so the previous one stays valid if
//! the disk fills), and resumption from the last checkpoint.
//!
//! A run directory holds `config.toml`, `tokenizer.json`, `checkpoint/`
//! (`model.bpk`, `optim.bpk`, `state.json`), `loss.csv` and `loss.png`.

use crate::config::{GptConfig, RunConfig};
use crate::curves;
use crate::data::{self, Dataset};
use crate::model::Gpt;
use crate::{io_err, TrainError};
use burn::module::Module;
use burn::optim::grad_clipping::GradientClippingConfig;
use burn::optim::{AdamWConfig, GradientsParams, ModuleOptimizer};
use burn::tensor::Device;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Progress of one step, for the caller to show.
#[derive(Debug, Clone)]
pub struct Progress {
    pub step: usize,
    pub steps: usize,
    pub loss: f32,
    pub val_loss: Option<f32>,
    pub lr: f64,
    pub tokens_per_sec: f64,
}

/// What a run ended with.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Summary {
    pub steps: usize,
    pub final_loss: f32,
    pub val_loss: f32,
    /// Validation bits per character.
    pub val_bpc: f64,
    /// A unigram model's bits per character on the same validation split.
    pub unigram_bpc: f64,
    pub tokens_per_sec: f64,
    pub parameters: usize,
    pub skipped_files: Vec<String>,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct State {
    step: usize,
}

/// Estimated bytes to train: weights, gradients and AdamW's two moments,
/// plus activations kept for the backward pass.
pub fn memory_estimate(c: &GptConfig, batch: usize, seq: usize) -> u64 {
    let params = c.parameters() as u64 * 4 * 4;
    let tokens = (batch * seq) as u64;
    let per_layer = tokens * (c.d_model as u64 * 12 + c.d_ff as u64 * 4) * 4
        + (batch * c.n_head * seq * seq) as u64 * 4 * 3;
    let logits = tokens * c.vocab_size as u64 * 4 * 3;
    params + per_layer * c.n_layer as u64 + logits
}

fn available_memory() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = s.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Mean loss over the validation windows (no gradients).
fn evaluate(model: &Gpt, windows: &[Vec<u32>], batch: usize, device: &Device) -> f32 {
    if windows.is_empty() {
        return f32::NAN;
    }
    let model = model.clone().valid();
    let inner = device.clone().inner();
    let mut total = 0.0;
    let mut n = 0;
    for chunk in windows.chunks(batch.max(1)) {
        let l: f32 = model.loss(chunk, &inner).into_scalar::<f32>();
        total += l * chunk.len() as f32;
        n += chunk.len();
    }
    total / n as f32
}

/// Bits per character of a unigram model fitted on `train`, on `val`.
fn unigram_bpc(train: &[u32], val: &[u32], vocab: usize, chars_per_token: f64) -> f64 {
    let mut counts = vec![1.0f64; vocab];
    for &t in train {
        if let Some(c) = counts.get_mut(t as usize) {
            *c += 1.0;
        }
    }
    let total: f64 = counts.iter().sum();
    let nats: f64 = val
        .iter()
        .map(|&t| -(counts.get(t as usize).copied().unwrap_or(1.0) / total).ln())
        .sum::<f64>()
        / val.len().max(1) as f64;
    nats / std::f64::consts::LN_2 / chars_per_token.max(1e-9)
}

fn checkpoint_dir(out: &Path) -> PathBuf {
    out.join("checkpoint")
}

/// Load the model of a run directory (its last checkpoint).
pub fn load_model(run: &Path, device: &Device) -> Result<(GptConfig, Gpt), TrainError> {
    let cfg_path = run.join("config.toml");
    let text = std::fs::read_to_string(&cfg_path).map_err(io_err(&cfg_path))?;
    let cfg = RunConfig::from_toml(&text)?;
    let model = Gpt::new(&cfg.model, device);
    let path = checkpoint_dir(run).join("model.bpk");
    let model = model
        .try_load_file(&path)
        .map_err(|e| TrainError::Checkpoint {
            path: path.display().to_string(),
            reason: format!("{e:?}"),
        })?;
    Ok((cfg.model, model))
}

/// Pretrain according to `cfg` on `corpus` with `tokenizer`, in `out`
/// (resuming from its checkpoint when there is one). `progress` is called
/// after every step.
pub fn run(
    mut cfg: RunConfig,
    corpus: &Path,
    tokenizer_path: &Path,
    out: &Path,
    device: &Device,
    mut progress: impl FnMut(&Progress),
) -> Result<Summary, TrainError> {
    let tok = crate::tokenizer::load(tokenizer_path)?;
    cfg.model.vocab_size = tok.get_vocab_size(true);
    cfg.model.validate()?;
    let t = &cfg.train;
    let seq = t
        .seq_len
        .unwrap_or(cfg.model.context)
        .min(cfg.model.context);
    let need = memory_estimate(&cfg.model, t.batch_size, seq);
    if let Some(avail) = available_memory() {
        if need > avail {
            return Err(TrainError::TooBig {
                needed_mb: need >> 20,
                available_mb: avail >> 20,
            });
        }
    }
    std::fs::create_dir_all(out).map_err(io_err(out))?;
    let cfg_path = out.join("config.toml");
    let text = toml::to_string(&cfg).map_err(|e| TrainError::Config(e.to_string()))?;
    std::fs::write(&cfg_path, text).map_err(io_err(&cfg_path))?;
    let tok_copy = out.join("tokenizer.json");
    if tok_copy != tokenizer_path {
        std::fs::copy(tokenizer_path, &tok_copy).map_err(io_err(&tok_copy))?;
    }
    let data = Dataset::load(corpus, &tok, t.val_fraction)?;
    for s in &data.skipped {
        tracing::warn!("skipped {s}");
    }
    let val_windows = data::windows(&data.val, seq, 64);

    device.seed(t.seed);
    let mut model = Gpt::new(&cfg.model, device);
    let mut optim: ModuleOptimizer = AdamWConfig::new()
        .with_weight_decay(t.weight_decay)
        .with_grad_clipping(Some(GradientClippingConfig::Norm(t.grad_clip)))
        .init();
    let ck = checkpoint_dir(out);
    let old = out.join("checkpoint.old");
    if !ck.exists() && old.exists() {
        // Killed between swapping checkpoints: the previous one is whole.
        std::fs::rename(&old, &ck).map_err(io_err(&old))?;
    }
    let mut start = 0;
    if ck.join("state.json").exists() {
        let bad = |e: String| TrainError::Checkpoint {
            path: ck.display().to_string(),
            reason: e,
        };
        let s: State =
            serde_json::from_slice(&std::fs::read(ck.join("state.json")).map_err(io_err(&ck))?)
                .map_err(|e| bad(e.to_string()))?;
        model = model
            .try_load_file(ck.join("model.bpk"))
            .map_err(|e| bad(format!("{e:?}")))?;
        optim = optim
            .load(ck.join("optim.bpk"))
            .map_err(|e| bad(format!("{e:?}")))?;
        start = s.step;
        tracing::info!("resuming from step {start}");
    }
    let mut log = curves::LossLog::open(&out.join("loss.csv"), start)?;
    let tokens_per_step = (t.batch_size * seq) as f64;
    let began = Instant::now();
    let mut last_loss = f32::NAN;
    let mut val_loss = f32::NAN;
    let mut trained = 0usize;
    for step in start..t.steps {
        let windows = data::batch(&data.train, t.batch_size, seq, t.seed, step);
        let loss = model.loss(&windows, device);
        let l: f32 = loss.clone().into_scalar::<f32>();
        if !l.is_finite() {
            return Err(TrainError::NotFinite {
                step,
                loss: l,
                checkpoint: ck.display().to_string(),
            });
        }
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        let lr = t.lr_at(step);
        model = optim.step(lr, model, grads);
        last_loss = l;
        trained += 1;
        let done = step + 1;
        let eval = done % t.eval_every == 0 || done == t.steps;
        let v = eval.then(|| evaluate(&model, &val_windows, t.batch_size, device));
        if let Some(v) = v {
            val_loss = v;
        }
        log.record(done, l, v, lr)?;
        let tps = tokens_per_step * trained as f64 / began.elapsed().as_secs_f64().max(1e-9);
        progress(&Progress {
            step: done,
            steps: t.steps,
            loss: l,
            val_loss: v,
            lr,
            tokens_per_sec: tps,
        });
        if done % t.checkpoint_every == 0 || done == t.steps {
            save_checkpoint(&model, &optim, out, done)?;
            curves::plot(&out.join("loss.csv"), &out.join("loss.png"))?;
        }
    }
    if val_loss.is_nan() {
        val_loss = evaluate(&model, &val_windows, t.batch_size, device);
    }
    let tps = tokens_per_step * trained as f64 / began.elapsed().as_secs_f64().max(1e-9);
    let bpc = val_loss as f64 / std::f64::consts::LN_2 / data.val_chars_per_token.max(1e-9);
    let summary = Summary {
        steps: t.steps,
        final_loss: last_loss,
        val_loss,
        val_bpc: bpc,
        unigram_bpc: unigram_bpc(
            &data.train,
            &data.val,
            cfg.model.vocab_size,
            data.val_chars_per_token,
        ),
        tokens_per_sec: tps,
        parameters: cfg.model.parameters(),
        skipped_files: data.skipped.clone(),
    };
    let p = out.join("summary.json");
    std::fs::write(&p, serde_json::to_vec_pretty(&summary).unwrap_or_default())
        .map_err(io_err(&p))?;
    Ok(summary)
}

/// Write the checkpoint to `checkpoint.tmp/`, then swap it in.
fn save_checkpoint(
    model: &Gpt,
    optim: &ModuleOptimizer,
    out: &Path,
    step: usize,
) -> Result<(), TrainError> {
    let tmp = out.join("checkpoint.tmp");
    let fail = |e: String| TrainError::Checkpoint {
        path: tmp.display().to_string(),
        reason: e,
    };
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(io_err(&tmp))?;
    }
    std::fs::create_dir_all(&tmp).map_err(io_err(&tmp))?;
    model
        .clone()
        .save_file(tmp.join("model.bpk"))
        .map_err(|e| fail(format!("{e:?}")))?;
    optim
        .save(tmp.join("optim.bpk"))
        .map_err(|e| fail(format!("{e:?}")))?;
    let state = serde_json::to_vec(&State { step }).map_err(|e| fail(e.to_string()))?;
    std::fs::write(tmp.join("state.json"), state).map_err(io_err(&tmp))?;
    let ck = checkpoint_dir(out);
    let old = out.join("checkpoint.old");
    if ck.exists() {
        if old.exists() {
            std::fs::remove_dir_all(&old).map_err(io_err(&old))?;
        }
        std::fs::rename(&ck, &old).map_err(io_err(&ck))?;
    }
    std::fs::rename(&tmp, &ck).map_err(io_err(&ck))?;
    if old.exists() {
        std::fs::remove_dir_all(&old).map_err(io_err(&old))?;
    }
    Ok(())
}
