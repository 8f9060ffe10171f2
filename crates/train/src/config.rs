//! Model and training configuration (a TOML file: `[model]` and `[train]`).

use crate::TrainError;
use serde::{Deserialize, Serialize};

/// The GPT's shape. The vocabulary size comes from the tokenizer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GptConfig {
    pub n_layer: usize,
    pub d_model: usize,
    pub n_head: usize,
    /// Key/value heads (grouped-query attention); default: `n_head`.
    #[serde(default)]
    pub n_head_kv: Option<usize>,
    pub d_ff: usize,
    /// Longest sequence the model is trained for (and served with).
    pub context: usize,
    #[serde(default)]
    pub vocab_size: usize,
    #[serde(default = "default_rope")]
    pub rope_base: f32,
    #[serde(default = "default_eps")]
    pub norm_eps: f64,
    /// Per-head RMSNorm of queries and keys before RoPE.
    #[serde(default)]
    pub qk_norm: bool,
    /// A routed mixture of experts in place of each dense feed-forward.
    #[serde(default)]
    pub moe: Option<MoeConfig>,
}

/// Mixture-of-experts feed-forward: `experts` SwiGLU experts of `d_ff`
/// each, `top_k` of them per token (1: Switch Transformer; 2: GShard).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MoeConfig {
    pub experts: usize,
    #[serde(default = "default_top_k")]
    pub top_k: usize,
    /// Weight of the load-balancing loss.
    #[serde(default = "default_aux")]
    pub aux_weight: f64,
}

fn default_top_k() -> usize {
    1
}
fn default_aux() -> f64 {
    0.01
}

fn default_rope() -> f32 {
    10000.0
}
fn default_eps() -> f64 {
    1e-5
}

impl GptConfig {
    pub fn kv_heads(&self) -> usize {
        self.n_head_kv.unwrap_or(self.n_head)
    }
    pub fn head_dim(&self) -> usize {
        self.d_model / self.n_head
    }

    pub fn validate(&self) -> Result<(), TrainError> {
        let bad = |m: String| Err(TrainError::Config(m));
        if self.n_layer == 0 || self.d_model == 0 || self.n_head == 0 || self.d_ff == 0 {
            return bad("n_layer, d_model, n_head and d_ff must be positive".into());
        }
        if !self.d_model.is_multiple_of(self.n_head) || !self.head_dim().is_multiple_of(2) {
            return bad(format!(
                "d_model {} must split into {} heads of even size",
                self.d_model, self.n_head
            ));
        }
        if self.kv_heads() == 0 || !self.n_head.is_multiple_of(self.kv_heads()) {
            return bad(format!(
                "{} heads cannot share {} key/value heads",
                self.n_head,
                self.kv_heads()
            ));
        }
        if let Some(m) = &self.moe {
            if m.experts < 2 || m.top_k == 0 || m.top_k > m.experts {
                return bad(format!(
                    "a mixture of {} experts cannot route each token to {}",
                    m.experts, m.top_k
                ));
            }
        }
        if self.context < 2 {
            return bad("context must be at least 2".into());
        }
        Ok(())
    }

    /// Trainable parameters (embeddings tied to the output).
    pub fn parameters(&self) -> usize {
        self.count(false)
    }

    /// Parameters one token goes through (a mixture of experts runs
    /// `top_k` of its experts).
    pub fn active_parameters(&self) -> usize {
        self.count(true)
    }

    fn count(&self, active: bool) -> usize {
        let d = self.d_model;
        let kv = self.kv_heads() * self.head_dim();
        let mlp = 3 * d * self.d_ff;
        let ffn = match &self.moe {
            None => mlp,
            Some(m) => d * m.experts + mlp * if active { m.top_k } else { m.experts },
        };
        let qk = if self.qk_norm { 2 * self.head_dim() } else { 0 };
        let layer = 2 * d + d * d + 2 * d * kv + d * d + ffn + qk;
        self.vocab_size * d + self.n_layer * layer + d
    }

    /// Multiply-adds per trained token, forward and backward (≈ 6 × active
    /// params plus attention), for tokens/s → FLOP/s.
    pub fn flops_per_token(&self, seq: usize) -> f64 {
        6.0 * self.active_parameters() as f64 + 12.0 * (self.n_layer * self.d_model * seq) as f64
    }
}

/// How to train.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    #[serde(default = "d_batch")]
    pub batch_size: usize,
    /// Tokens per training sequence (≤ the model's context).
    #[serde(default)]
    pub seq_len: Option<usize>,
    pub steps: usize,
    #[serde(default = "d_lr")]
    pub lr: f64,
    #[serde(default)]
    pub min_lr: Option<f64>,
    #[serde(default = "d_warmup")]
    pub warmup: usize,
    #[serde(default = "d_wd")]
    pub weight_decay: f32,
    #[serde(default = "d_clip")]
    pub grad_clip: f32,
    #[serde(default = "d_seed")]
    pub seed: u64,
    /// Evaluate on the validation split every this many steps.
    #[serde(default = "d_eval")]
    pub eval_every: usize,
    #[serde(default = "d_ckpt")]
    pub checkpoint_every: usize,
    /// Share of the corpus held out for validation.
    #[serde(default = "d_val")]
    pub val_fraction: f64,
    #[serde(default)]
    pub optimizer: Optimizer,
    /// How the learning rate falls from `lr` to `min_lr` after warmup.
    #[serde(default)]
    pub decay: Decay,
    /// Micro-batches whose gradients are summed before each update.
    #[serde(default = "d_accum")]
    pub grad_accum: usize,
    /// SFT: pack several conversations into each sequence (each attends
    /// only to itself) instead of one padded conversation per row.
    #[serde(default)]
    pub pack: bool,
    /// Keep an exponential moving average of the weights with this decay
    /// (e.g. 0.999): validation, exports and later runs use the average.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ema: Option<f64>,
}

/// AdamW for everything, or Muon (momentum + Newton–Schulz
/// orthogonalisation) for the blocks' matrices with AdamW for the rest.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Optimizer {
    #[default]
    AdamW,
    Muon,
}

/// The learning-rate decay after warmup.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Decay {
    #[default]
    Cosine,
    Linear,
}

fn d_accum() -> usize {
    1
}

fn d_batch() -> usize {
    8
}
fn d_lr() -> f64 {
    3e-3
}
fn d_warmup() -> usize {
    20
}
fn d_wd() -> f32 {
    0.1
}
fn d_clip() -> f32 {
    1.0
}
fn d_seed() -> u64 {
    42
}
fn d_eval() -> usize {
    50
}
fn d_ckpt() -> usize {
    100
}
fn d_val() -> f64 {
    0.05
}

impl TrainConfig {
    /// The defaults, for `steps` steps.
    pub fn new(steps: usize) -> Self {
        Self {
            batch_size: d_batch(),
            seq_len: None,
            steps,
            lr: d_lr(),
            min_lr: None,
            warmup: d_warmup(),
            weight_decay: d_wd(),
            grad_clip: d_clip(),
            seed: d_seed(),
            eval_every: d_eval(),
            checkpoint_every: d_ckpt(),
            val_fraction: d_val(),
            optimizer: Optimizer::AdamW,
            decay: Decay::Cosine,
            grad_accum: d_accum(),
            pack: false,
            ema: None,
        }
    }

    /// Settings that parse but make no run.
    pub fn check(&self) -> Result<(), TrainError> {
        if self.steps == 0 || self.batch_size == 0 {
            return Err(TrainError::Config(
                "steps and batch_size must be positive".into(),
            ));
        }
        if !(0.0..0.5).contains(&self.val_fraction) {
            return Err(TrainError::Config(
                "val_fraction is between 0 and 0.5".into(),
            ));
        }
        if self.ema.is_some_and(|d| !(0.0..1.0).contains(&d)) {
            return Err(TrainError::Config("ema is a decay in [0, 1)".into()));
        }
        Ok(())
    }

    /// The learning rate at `step`: linear warmup, then cosine (or linear)
    /// decay to `min_lr` (default a tenth of `lr`) at the last step.
    pub fn lr_at(&self, step: usize) -> f64 {
        let min = self.min_lr.unwrap_or(self.lr / 10.0);
        if step < self.warmup {
            return self.lr * (step + 1) as f64 / self.warmup as f64;
        }
        let span = self.steps.saturating_sub(self.warmup).max(1);
        let p = ((step - self.warmup) as f64 / span as f64).min(1.0);
        let left = match self.decay {
            Decay::Cosine => 0.5 * (1.0 + (std::f64::consts::PI * p).cos()),
            Decay::Linear => 1.0 - p,
        };
        min + (self.lr - min) * left
    }
}

impl TrainConfig {
    /// The `[train]` table of a TOML file (other tables are ignored).
    pub fn from_toml(text: &str) -> Result<Self, TrainError> {
        #[derive(Deserialize)]
        struct Only {
            train: TrainConfig,
        }
        let v: toml::Table = toml::from_str(text).map_err(|e| TrainError::Config(e.to_string()))?;
        let t = v
            .get("train")
            .cloned()
            .ok_or_else(|| TrainError::Config("no [train] table".into()))?;
        let only: Only = toml::Value::Table(toml::Table::from_iter([("train".to_string(), t)]))
            .try_into()
            .map_err(|e: toml::de::Error| TrainError::Config(e.to_string()))?;
        only.train.check()?;
        Ok(only.train)
    }
}

/// A run's configuration file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunConfig {
    pub model: GptConfig,
    pub train: TrainConfig,
}

impl RunConfig {
    pub fn from_toml(text: &str) -> Result<Self, TrainError> {
        let c: Self = toml::from_str(text).map_err(|e| TrainError::Config(e.to_string()))?;
        c.train.check()?;
        Ok(c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedule_warms_up_then_decays() {
        let c = RunConfig::from_toml(
            "[model]\nn_layer=2\nd_model=64\nn_head=4\nd_ff=128\ncontext=64\n[train]\nsteps=100\nlr=1e-3\nwarmup=10\n",
        )
        .unwrap()
        .train;
        assert!((c.lr_at(0) - 1e-4).abs() < 1e-12);
        assert!((c.lr_at(9) - 1e-3).abs() < 1e-12);
        assert!(c.lr_at(50) < 1e-3 && c.lr_at(50) > 1e-4);
        assert!((c.lr_at(100) - 1e-4).abs() < 1e-9);
        // Linear decay: halfway through the decay, halfway between lr and min.
        let mut l = c.clone();
        l.decay = Decay::Linear;
        assert!((l.lr_at(55) - 5.5e-4).abs() < 1e-12, "{}", l.lr_at(55));
        assert!((l.lr_at(100) - 1e-4).abs() < 1e-9);
        // Early in the decay the cosine is still higher than the line.
        assert!(
            c.lr_at(30) > l.lr_at(30) + 5e-5,
            "{} {}",
            c.lr_at(30),
            l.lr_at(30)
        );
        let t = TrainConfig::from_toml("[train]\nsteps=10\ndecay=\"linear\"\n").unwrap();
        assert_eq!(t.decay, Decay::Linear);
        assert!(TrainConfig::from_toml("[train]\nsteps=10\ndecay=\"step\"\n").is_err());
        let bad = "[model]\nn_layer=2\nd_model=64\nn_head=4\nd_ff=128\ncontext=64\n[train]\nsteps=10\nema=1.5\n";
        let e = RunConfig::from_toml(bad).unwrap_err().to_string();
        assert!(e.contains("ema"), "{e}");
        assert!(RunConfig::from_toml("[model]\nn_layer=1\n").is_err());
        assert!(RunConfig::from_toml("[model]\nn_layer=2\nd_model=64\nn_head=4\nd_ff=128\ncontext=64\nbogus=1\n[train]\nsteps=1\n").is_err());
    }
}
