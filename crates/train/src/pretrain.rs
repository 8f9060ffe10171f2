//! Pretraining from scratch: next-token prediction on a corpus, AdamW with
//! warmup + cosine decay and gradient clipping, a validation loss every
//! `eval_every` steps, checkpoints every `checkpoint_every` steps (written
//! to a temporary directory and renamed, so the previous one stays valid if
//! the disk fills), and resumption from the last checkpoint.
//!
//! A run directory holds `config.toml`, `tokenizer.json`, `checkpoint/`
//! (`model.bpk`, `optim.bpk`, `state.json`), `loss.csv` and `loss.png`.

use crate::config::{GptConfig, RunConfig};
use crate::data::{self, Dataset};
use crate::model::Gpt;
use crate::tokenizer::Tok;
use crate::trainer::{self, Task};
use crate::{io_err, TrainError};
use burn::tensor::{Device, Tensor};
use std::path::Path;

pub use crate::trainer::Progress;

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
    /// Share of tokens each expert received in the last step, per MoE layer.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub expert_load: Vec<Vec<f32>>,
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
pub(crate) fn evaluate(model: &Gpt, windows: &[Vec<u32>], batch: usize, device: &Device) -> f32 {
    if windows.is_empty() {
        return f32::NAN;
    }
    let mut total = 0.0;
    let mut n = 0;
    for chunk in windows.chunks(batch.max(1)) {
        let l: f32 = model.loss(chunk, device).into_scalar::<f32>();
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

/// Check that a model of this shape can train here (the estimate against
/// the memory available).
pub fn check_memory(c: &GptConfig, batch: usize, seq: usize) -> Result<(), TrainError> {
    let need = memory_estimate(c, batch, seq);
    if let Some(avail) = available_memory() {
        if need > avail {
            return Err(TrainError::TooBig {
                needed_mb: need >> 20,
                available_mb: avail >> 20,
            });
        }
    }
    Ok(())
}

/// Next-token prediction on a tokenized corpus (pretraining, and LoRA on
/// plain text).
pub(crate) struct TextTask<'a> {
    pub data: &'a Dataset,
    pub val_windows: Vec<Vec<u32>>,
    pub batch: usize,
    pub seq: usize,
    pub seed: u64,
    pub aux_weight: f64,
    /// Tokens per expert in the last step, per MoE layer.
    pub load: Vec<Vec<usize>>,
}

impl Task for TextTask<'_> {
    fn loss(
        &mut self,
        model: &Gpt,
        step: usize,
        micro: usize,
        device: &Device,
    ) -> (Tensor<1>, Vec<(&'static str, f32)>) {
        let windows = data::batch(
            &self.data.train,
            self.batch,
            self.seq,
            self.seed.wrapping_add(micro as u64 * 0x51_7cc1),
            step,
        );
        let (loss, routing) = model.loss_full(&windows, device, self.aux_weight);
        self.load = routing.load;
        (loss, Vec::new())
    }
    fn validate(&mut self, model: &Gpt, device: &Device) -> f32 {
        evaluate(model, &self.val_windows, self.batch, device)
    }
    fn tokens_per_micro(&self) -> f64 {
        (self.batch * self.seq) as f64
    }
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
    progress: impl FnMut(&Progress),
) -> Result<Summary, TrainError> {
    let tok = Tok::Bpe(Box::new(crate::tokenizer::load(tokenizer_path)?));
    cfg.model.vocab_size = tok.vocab_size();
    cfg.model.validate()?;
    let t = &cfg.train;
    let seq = t
        .seq_len
        .unwrap_or(cfg.model.context)
        .min(cfg.model.context);
    check_memory(&cfg.model, t.batch_size, seq)?;
    std::fs::create_dir_all(out).map_err(io_err(out))?;
    crate::run::write_config(out, &cfg)?;
    let tok_copy = out.join("tokenizer.json");
    if tok_copy != tokenizer_path {
        std::fs::copy(tokenizer_path, &tok_copy).map_err(io_err(&tok_copy))?;
    }
    let data = Dataset::load(corpus, &tok, t.val_fraction)?;
    for s in &data.skipped {
        tracing::warn!("skipped {s}");
    }
    device.seed(t.seed);
    let model = Gpt::new(&cfg.model, device);
    let mut task = TextTask {
        data: &data,
        val_windows: data::windows(&data.val, seq, 64),
        batch: t.batch_size,
        seq,
        seed: t.seed,
        aux_weight: cfg.model.moe.as_ref().map_or(0.0, |m| m.aux_weight),
        load: Vec::new(),
    };
    let o = trainer::run(model, t, out, device, &mut task, progress)?;
    let bpc = o.val_loss as f64 / std::f64::consts::LN_2 / data.val_chars_per_token.max(1e-9);
    let summary = Summary {
        steps: t.steps,
        final_loss: o.final_loss,
        val_loss: o.val_loss,
        val_bpc: bpc,
        unigram_bpc: unigram_bpc(
            &data.train,
            &data.val,
            cfg.model.vocab_size,
            data.val_chars_per_token,
        ),
        tokens_per_sec: o.tokens_per_sec,
        parameters: cfg.model.parameters(),
        skipped_files: data.skipped.clone(),
        expert_load: task
            .load
            .iter()
            .map(|l| {
                let n: usize = l.iter().sum();
                l.iter().map(|&c| c as f32 / n.max(1) as f32).collect()
            })
            .collect(),
    };
    trainer::write_json(&out.join("summary.json"), &summary)?;
    Ok(summary)
}
