//! The training loop every command shares (pretraining, SFT, DPO, LoRA):
//! the optimizer (AdamW, or Muon for the blocks' matrices), the learning
//! rate schedule, gradient clipping and accumulation, a validation loss
//! every `eval_every` steps, `loss.csv` row by row and `loss.png` at each
//! checkpoint, checkpoints written to `checkpoint.tmp/` and swapped in (the
//! previous one stays valid when the disk fills or the process dies), and
//! resumption from the last checkpoint with the same batches. With `ema`
//! set, it also keeps an exponential moving average of the weights, which
//! validation, the checkpoints' exports and the outcome use.
//!
//! A task ([`Task`]) says what the loss of a step is and how to validate.

use crate::config::{Optimizer, TrainConfig};
use crate::curves;
use crate::model::{Gpt, LoraPair};
use crate::{io_err, TrainError};
use burn::module::{Module, ModuleMapper, ModuleVisitor, Param, ParamGroup};
use burn::optim::grad_clipping::GradientClippingConfig;
use burn::optim::{AdamWConfig, GradientsAccumulator, GradientsParams, ModuleOptimizer};
use burn::optim::{AdjustLrFn, MuonConfig};
use burn::tensor::{Device, Tensor};
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
    /// Task-specific figures of this step (e.g. DPO's reward margin).
    pub extra: Vec<(&'static str, f32)>,
}

/// One training objective for a model `M`.
pub trait Task<M = Gpt> {
    /// The loss of micro-batch `micro` of step `step` (differentiable), and
    /// figures to report; the batch must depend only on the step, so a
    /// resumed run sees the same data.
    fn loss(
        &mut self,
        model: &M,
        step: usize,
        micro: usize,
        device: &Device,
    ) -> (Tensor<1>, Vec<(&'static str, f32)>);
    /// The validation loss (no gradients: `model` is on the inner device).
    fn validate(&mut self, model: &M, device: &Device) -> f32;
    /// Tokens (or samples) one micro-batch trains on (for the rate shown).
    fn tokens_per_micro(&self) -> f64;
    /// Called after each checkpoint is written (`model` on the inner
    /// device), e.g. to export it and draw samples.
    fn checkpointed(&mut self, _model: &M, _step: usize) -> Result<(), TrainError> {
        Ok(())
    }
}

/// A model the loop can train: how its checkpoint weights are written and
/// read — by default the whole model as `model.bpk` (the GPT writes only
/// its adapters when it has LoRA).
pub trait Trainable: Module + Sized {
    fn save_weights(&self, dir: &Path) -> Result<(), TrainError> {
        self.clone()
            .save_file(dir.join("model.bpk"))
            .map_err(|e| checkpoint_error(dir, e))
    }
    fn load_weights(self, dir: &Path) -> Result<Self, TrainError> {
        self.try_load_file(dir.join("model.bpk"))
            .map_err(|e| checkpoint_error(dir, e))
    }
}

fn checkpoint_error(dir: &Path, e: impl std::fmt::Display) -> TrainError {
    TrainError::Checkpoint {
        path: dir.display().to_string(),
        reason: e.to_string(),
    }
}

/// What the loop ended with.
pub struct Outcome<M = Gpt> {
    /// The trained weights, or their moving average when the run kept one
    /// (then without gradients).
    pub model: M,
    pub final_loss: f32,
    pub val_loss: f32,
    pub tokens_per_sec: f64,
    /// The step the run resumed from (0 for a fresh run).
    pub resumed_from: usize,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct State {
    step: usize,
}

/// The adapters of a LoRA model, checkpointed without the frozen base.
#[derive(Module, Debug)]
struct Adapters {
    pairs: Vec<LoraPair>,
}

pub fn checkpoint_dir(out: &Path) -> PathBuf {
    out.join("checkpoint")
}

/// The weights a checkpoint `ck` hands on (to exports, chats and runs
/// started from it): the moving average when the run kept one, else the
/// trained weights.
pub fn weights_dir(ck: &Path) -> PathBuf {
    let ema = ema_dir(ck);
    if ema.is_dir() {
        ema
    } else {
        ck.to_path_buf()
    }
}

/// Where checkpoint `ck` keeps the moving average, when the run keeps one.
fn ema_dir(ck: &Path) -> PathBuf {
    ck.join("ema")
}

/// An exponential moving average of a model's weights: after each update
/// `avg ← d·avg + (1 − d)·w`, with `d = min(decay, (1 + n) / (10 + n))` at
/// the `n`-th update, so the first steps' random weights fade fast.
struct Ema<M> {
    avg: M,
    decay: f64,
}

impl<M: Trainable> Ema<M> {
    /// Fold `model`'s weights (after update `n`, counting from 0) in.
    fn update(&mut self, model: &M, n: usize) {
        struct Collect(Vec<Tensor<1>>);
        impl ModuleVisitor for Collect {
            fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
                self.0.push(param.val().flatten::<1>(0, D - 1));
            }
        }
        struct Fold {
            weights: std::vec::IntoIter<Tensor<1>>,
            d: f64,
        }
        impl ModuleMapper for Fold {
            fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
                let (id, avg, mapper) = param.consume();
                let folded = match self.weights.next() {
                    Some(w) => {
                        let w = w.reshape(avg.dims());
                        avg.mul_scalar(self.d) + w.mul_scalar(1.0 - self.d)
                    }
                    None => avg,
                };
                Param::from_mapped_value(id, folded, mapper)
            }
        }
        let mut weights = Collect(Vec::new());
        model.clone().valid().visit(&mut weights);
        let d = self.decay.min((1.0 + n as f64) / (10.0 + n as f64));
        let avg = self.avg.clone();
        self.avg = avg.map(&mut Fold {
            weights: weights.0.into_iter(),
            d,
        });
    }
}

fn optimizer(t: &TrainConfig) -> ModuleOptimizer {
    let clip = Some(GradientClippingConfig::Norm(t.grad_clip));
    let adamw = AdamWConfig::new()
        .with_weight_decay(t.weight_decay)
        .with_grad_clipping(clip.clone())
        .init();
    match t.optimizer {
        Optimizer::AdamW => adamw,
        // Muon for the blocks' 2-D matrices (the projections); AdamW for
        // the embeddings and norms. Learning rates are scaled to match
        // AdamW's update size, so the same `lr` works for both.
        Optimizer::Muon => adamw.with_group(
            ParamGroup::from_any_predicates(vec![
                ".wq.", ".wk.", ".wv.", ".wo.", ".gate.", ".up.", ".down.", ".router.",
            ]),
            MuonConfig::new()
                .with_adjust_lr_fn(AdjustLrFn::MatchRmsAdamW)
                .with_weight_decay(Some(burn::optim::decay::WeightDecayConfig::new(
                    t.weight_decay,
                )))
                .build(),
            clip.map(|c| c.init()),
        ),
    }
}

impl Trainable for Gpt {
    fn save_weights(&self, dir: &Path) -> Result<(), TrainError> {
        if !self.has_lora() {
            return self
                .clone()
                .save_file(dir.join("model.bpk"))
                .map_err(|e| checkpoint_error(dir, e));
        }
        Adapters {
            pairs: self.lora_pairs(),
        }
        .save_file(dir.join("adapters.bpk"))
        .map_err(|e| checkpoint_error(dir, e))
    }

    fn load_weights(self, dir: &Path) -> Result<Self, TrainError> {
        if !self.has_lora() {
            return self
                .try_load_file(dir.join("model.bpk"))
                .map_err(|e| checkpoint_error(dir, e));
        }
        let a = Adapters {
            pairs: self.lora_pairs(),
        }
        .try_load_file(dir.join("adapters.bpk"))
        .map_err(|e| checkpoint_error(dir, e))?;
        Ok(self.set_lora_pairs(a.pairs).freeze_non_lora())
    }
}

/// Write the model's weights and the optimizer state.
fn save_checkpoint<M: Trainable>(
    model: &M,
    ema: Option<&M>,
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
    model.save_weights(&tmp)?;
    if let Some(avg) = ema {
        let dir = ema_dir(&tmp);
        std::fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        avg.save_weights(&dir)?;
    }
    optim
        .save(tmp.join("optim.bpk"))
        .map_err(|e| fail(format!("{e}")))?;
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

/// Whether `out` holds a checkpoint (recovering one left by a kill between
/// the two renames of a swap).
pub fn has_checkpoint(out: &Path) -> Result<bool, TrainError> {
    let ck = checkpoint_dir(out);
    let old = out.join("checkpoint.old");
    if !ck.exists() && old.exists() {
        std::fs::rename(&old, &ck).map_err(io_err(&old))?;
    }
    Ok(ck.join("state.json").exists())
}

/// Every step allocates and frees the same activations and gradients
/// (hundreds of KB to tens of MB each). glibc hands blocks above its mmap
/// threshold out as fresh mappings and unmaps or trims them on free, so each
/// step page-faulted its whole working set again: a third of a 2M model's
/// step was spent in the kernel. Training keeps freed memory for the next
/// step instead (largest mmap threshold glibc allows, no trimming).
fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        static ONCE: std::sync::Once = std::sync::Once::new();
        ONCE.call_once(|| {
            // SAFETY: mallopt only changes allocator parameters; glibc
            // rejects values out of range (returning 0), which leaves the
            // defaults in place.
            let ok = unsafe {
                libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20) == 1
                    && libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX) == 1
            };
            if !ok {
                tracing::debug!("mallopt refused the training allocator settings");
            }
        });
    }
}

/// Train `model` on `task` for `t.steps` steps in `out`, resuming from its
/// checkpoint when there is one. `progress` is called after every step.
pub fn run<M: Trainable>(
    mut model: M,
    t: &TrainConfig,
    out: &Path,
    device: &Device,
    task: &mut dyn Task<M>,
    mut progress: impl FnMut(&Progress),
) -> Result<Outcome<M>, TrainError> {
    keep_freed_memory();
    let mut optim = optimizer(t);
    let ck = checkpoint_dir(out);
    let mut start = 0;
    let mut ema_start = None;
    if has_checkpoint(out)? {
        let bad = |e: String| TrainError::Checkpoint {
            path: ck.display().to_string(),
            reason: e,
        };
        let s: State =
            serde_json::from_slice(&std::fs::read(ck.join("state.json")).map_err(io_err(&ck))?)
                .map_err(|e| bad(e.to_string()))?;
        model = model.load_weights(&ck)?;
        let dir = ema_dir(&ck);
        if t.ema.is_some() && dir.is_dir() {
            ema_start = Some(model.clone().valid().load_weights(&dir)?);
        }
        optim = optim
            .load(ck.join("optim.bpk"))
            .map_err(|e| bad(format!("{e}")))?;
        start = s.step;
        tracing::info!("resuming from step {start}");
    }
    // A run that did not keep an average before starts it from its
    // weights. (Taking them initialises any lazily initialised parameter,
    // in the module's order: done with or without an average, so the
    // setting does not change the starting weights.)
    let weights = model.clone().valid();
    let mut ema = t.ema.map(|decay| Ema {
        avg: ema_start.unwrap_or(weights),
        decay,
    });
    let mut log = curves::LossLog::open(&out.join("loss.csv"), start)?;
    let accum = t.grad_accum.max(1);
    let tokens_per_step = task.tokens_per_micro() * accum as f64;
    let began = Instant::now();
    let mut last_loss = f32::NAN;
    let mut val_loss = f32::NAN;
    let mut trained = 0usize;
    // The weights the run hands on: the average when it keeps one.
    let handed = |model: &M, ema: &Option<Ema<M>>| match ema {
        Some(e) => e.avg.clone(),
        None => model.clone().valid(),
    };
    let validate = |m: M, task: &mut dyn Task<M>| task.validate(&m, &device.clone().inner());
    for step in start..t.steps {
        let mut acc = GradientsAccumulator::new();
        let mut total = 0.0f32;
        let mut extra: Vec<(&'static str, f32)> = Vec::new();
        for micro in 0..accum {
            let (loss, x) = task.loss(&model, step, micro, device);
            let loss = if accum > 1 {
                loss.div_scalar(accum as f64)
            } else {
                loss
            };
            let l: f32 = loss.clone().into_scalar::<f32>();
            if !l.is_finite() {
                return Err(TrainError::NotFinite {
                    step: step + 1,
                    loss: l,
                    checkpoint: if ck.join("state.json").exists() {
                        ck.display().to_string()
                    } else {
                        "none yet".into()
                    },
                });
            }
            total += l;
            for (k, v) in x {
                match extra.iter_mut().find(|e| e.0 == k) {
                    Some(e) => e.1 += v / accum as f32,
                    None => extra.push((k, v / accum as f32)),
                }
            }
            acc.accumulate(&model, GradientsParams::from_grads(loss.backward(), &model));
        }
        let lr = t.lr_at(step);
        model = optim.step(lr, model, acc.grads());
        if let Some(e) = &mut ema {
            e.update(&model, step);
        }
        last_loss = total;
        trained += 1;
        let done = step + 1;
        let eval = done % t.eval_every.max(1) == 0 || done == t.steps;
        let v = eval.then(|| validate(handed(&model, &ema), task));
        if let Some(v) = v {
            val_loss = v;
        }
        log.record(done, total, v, lr)?;
        let tps = tokens_per_step * trained as f64 / began.elapsed().as_secs_f64().max(1e-9);
        progress(&Progress {
            step: done,
            steps: t.steps,
            loss: total,
            val_loss: v,
            lr,
            tokens_per_sec: tps,
            extra,
        });
        if done % t.checkpoint_every.max(1) == 0 || done == t.steps {
            save_checkpoint(&model, ema.as_ref().map(|e| &e.avg), &optim, out, done)?;
            curves::plot(&out.join("loss.csv"), &out.join("loss.png"))?;
            task.checkpointed(&handed(&model, &ema), done)?;
        }
    }
    if val_loss.is_nan() {
        val_loss = validate(handed(&model, &ema), task);
    }
    if trained == 0 {
        // Already finished: the last logged loss.
        if let Some(r) = curves::read(&out.join("loss.csv"))?.last() {
            last_loss = r.1 as f32;
        }
    }
    let tps = tokens_per_step * trained as f64 / began.elapsed().as_secs_f64().max(1e-9);
    let model = match ema {
        Some(e) => e.avg,
        None => model,
    };
    Ok(Outcome {
        model,
        final_loss: last_loss,
        val_loss,
        tokens_per_sec: tps,
        resumed_from: start,
    })
}

/// Write `value` as pretty JSON to `path`.
pub fn write_json(path: &Path, value: &impl serde::Serialize) -> Result<(), TrainError> {
    let bytes = serde_json::to_vec_pretty(value).map_err(|e| TrainError::Io {
        path: path.display().to_string(),
        source: std::io::Error::other(e),
    })?;
    std::fs::write(path, bytes).map_err(io_err(path))
}
