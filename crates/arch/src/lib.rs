//! The one description of each supported architecture: hyper-parameters read
//! from GGUF metadata (or written by the trainer), and the tensor names and
//! shapes of a model. The engine loads by these names; the trainer exports by
//! them, so a model trained by Hanlin loads in Hanlin.

use hanlin_formats::GgufHeader;
use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum ArchError {
    #[error("architecture {name:?} is not supported (supported: {list})", name = .0, list = Arch::SUPPORTED.join(", "))]
    Unsupported(String),
    #[error("the model file has no general.architecture")]
    MissingArch,
    #[error("missing or invalid hyper-parameter {0}")]
    Missing(String),
    #[error("inconsistent hyper-parameters: {0}")]
    Inconsistent(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Arch {
    Llama,
    Qwen2,
    Qwen3,
    Gemma3,
    Qwen2Moe,
    Qwen3Moe,
}

impl Arch {
    pub const SUPPORTED: [&'static str; 6] =
        ["llama", "qwen2", "qwen3", "gemma3", "qwen2moe", "qwen3moe"];

    pub fn from_name(s: &str) -> Result<Self, ArchError> {
        Ok(match s {
            "llama" => Self::Llama,
            "qwen2" => Self::Qwen2,
            "qwen3" => Self::Qwen3,
            "gemma3" => Self::Gemma3,
            "qwen2moe" => Self::Qwen2Moe,
            "qwen3moe" => Self::Qwen3Moe,
            other => return Err(ArchError::Unsupported(other.to_string())),
        })
    }
    pub fn name(self) -> &'static str {
        match self {
            Self::Llama => "llama",
            Self::Qwen2 => "qwen2",
            Self::Qwen3 => "qwen3",
            Self::Gemma3 => "gemma3",
            Self::Qwen2Moe => "qwen2moe",
            Self::Qwen3Moe => "qwen3moe",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Activation {
    Silu,
    GeluTanh,
}

/// Hyper-parameters of a decoder-only transformer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    pub arch: Arch,
    pub n_layer: usize,
    pub d_model: usize,
    pub n_head: usize,
    pub n_head_kv: usize,
    pub head_dim: usize,
    pub d_ff: usize,
    pub vocab_size: usize,
    pub context_length: usize,
    pub rope_base: f32,
    /// RoPE base of sliding-window layers (Gemma 3), if different.
    pub rope_base_local: Option<f32>,
    /// Rotated dimensions per head.
    pub n_rot: usize,
    /// Pairs `(i, i + n_rot/2)` when true, `(2i, 2i+1)` when false.
    pub rope_neox: bool,
    pub norm_eps: f32,
    /// Per-head RMSNorm on queries and keys (Qwen3, Gemma 3).
    pub qk_norm: bool,
    pub activation: Activation,
    /// Multiply embeddings by sqrt(d_model) (Gemma).
    pub embed_scale: bool,
    /// Sliding-window size and pattern: layer `i` is local when `i % pattern != pattern - 1`.
    pub sliding_window: Option<(usize, usize)>,
    /// Mixture of experts: (experts, experts used per token, expert hidden size).
    pub moe: Option<MoeConfig>,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct MoeConfig {
    pub n_expert: usize,
    pub n_expert_used: usize,
    pub d_ff_expert: usize,
    /// Hidden size of an always-on shared expert (qwen2moe), if any.
    pub d_ff_shared: Option<usize>,
    /// Renormalize the selected experts' weights to sum to one.
    pub norm_topk: bool,
}

fn need(h: &GgufHeader, key: &str) -> Result<usize, ArchError> {
    h.get_u64(key)
        .filter(|&v| v > 0 && v < (1 << 32))
        .map(|v| v as usize)
        .ok_or_else(|| ArchError::Missing(key.to_string()))
}

impl ModelConfig {
    /// Read the configuration from GGUF metadata.
    pub fn from_gguf(h: &GgufHeader) -> Result<Self, ArchError> {
        let name = h.architecture().ok_or(ArchError::MissingArch)?;
        let arch = Arch::from_name(name)?;
        let k = |s: &str| format!("{name}.{s}");
        let d_model = need(h, &k("embedding_length"))?;
        let n_head = need(h, &k("attention.head_count"))?;
        let n_head_kv = h
            .get_u64(&k("attention.head_count_kv"))
            .map(|v| v as usize)
            .unwrap_or(n_head);
        let head_dim = h
            .get_u64(&k("attention.key_length"))
            .map(|v| v as usize)
            .unwrap_or(d_model / n_head);
        let vocab_size = match h.get_u64(&k("vocab_size")) {
            Some(v) => v as usize,
            None => h
                .get("tokenizer.ggml.tokens")
                .and_then(|v| v.as_array())
                .map(|a| a.len())
                .ok_or_else(|| ArchError::Missing(k("vocab_size")))?,
        };
        let moe = match arch {
            Arch::Qwen2Moe | Arch::Qwen3Moe => Some(MoeConfig {
                n_expert: need(h, &k("expert_count"))?,
                n_expert_used: need(h, &k("expert_used_count"))?,
                d_ff_expert: need(h, &k("expert_feed_forward_length"))?,
                d_ff_shared: h
                    .get_u64(&k("expert_shared_feed_forward_length"))
                    .map(|v| v as usize),
                norm_topk: arch == Arch::Qwen3Moe,
            }),
            _ => match h.get_u64(&k("expert_count")) {
                Some(n) if n > 1 => Some(MoeConfig {
                    n_expert: n as usize,
                    n_expert_used: need(h, &k("expert_used_count"))?,
                    d_ff_expert: need(h, &k("feed_forward_length"))?,
                    d_ff_shared: None,
                    // Mixtral renormalises; a Switch-style model says not to.
                    norm_topk: h
                        .get(&k("expert_weights_norm"))
                        .and_then(|v| v.as_bool())
                        .unwrap_or(true),
                }),
                _ => None,
            },
        };
        let d_ff = match moe {
            Some(m) => h
                .get_u64(&k("feed_forward_length"))
                .map(|v| v as usize)
                .unwrap_or(m.d_ff_expert),
            None => need(h, &k("feed_forward_length"))?,
        };
        let gemma = arch == Arch::Gemma3;
        let cfg = Self {
            arch,
            n_layer: need(h, &k("block_count"))?,
            d_model,
            n_head,
            n_head_kv,
            head_dim,
            d_ff,
            vocab_size,
            context_length: h
                .get_u64(&k("context_length"))
                .map(|v| v as usize)
                .unwrap_or(2048),
            rope_base: h.get_f64(&k("rope.freq_base")).unwrap_or(10000.0) as f32,
            rope_base_local: gemma.then_some(10000.0),
            n_rot: h
                .get_u64(&k("rope.dimension_count"))
                .map(|v| v as usize)
                .unwrap_or(head_dim),
            rope_neox: arch != Arch::Llama,
            norm_eps: h
                .get_f64(&k("attention.layer_norm_rms_epsilon"))
                .unwrap_or(1e-6) as f32,
            qk_norm: matches!(arch, Arch::Qwen3 | Arch::Qwen3Moe | Arch::Gemma3),
            activation: if gemma {
                Activation::GeluTanh
            } else {
                Activation::Silu
            },
            embed_scale: gemma,
            sliding_window: if gemma {
                h.get_u64(&k("attention.sliding_window"))
                    .map(|w| (w as usize, 6))
            } else {
                None
            },
            moe,
        };
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn validate(&self) -> Result<(), ArchError> {
        let bad = |m: String| Err(ArchError::Inconsistent(m));
        if self.n_head_kv == 0 || !self.n_head.is_multiple_of(self.n_head_kv) {
            return bad(format!(
                "{} heads not divisible by {} kv heads",
                self.n_head, self.n_head_kv
            ));
        }
        if self.n_rot > self.head_dim || !self.n_rot.is_multiple_of(2) {
            return bad(format!(
                "rope dims {} vs head dim {}",
                self.n_rot, self.head_dim
            ));
        }
        if let Some(m) = self.moe {
            if m.n_expert_used == 0 || m.n_expert_used > m.n_expert {
                return bad(format!(
                    "{} of {} experts used",
                    m.n_expert_used, m.n_expert
                ));
            }
        }
        Ok(())
    }

    pub fn q_dim(&self) -> usize {
        self.n_head * self.head_dim
    }
    pub fn kv_dim(&self) -> usize {
        self.n_head_kv * self.head_dim
    }
    /// Whether layer `i` uses sliding-window attention.
    pub fn is_local_layer(&self, i: usize) -> bool {
        matches!(self.sliding_window, Some((_, p)) if i % p != p - 1)
    }
}

/// GGUF tensor names (the llama.cpp naming, shared by engine and trainer).
pub mod names {
    pub const TOKEN_EMBD: &str = "token_embd.weight";
    pub const OUTPUT_NORM: &str = "output_norm.weight";
    pub const OUTPUT: &str = "output.weight";
    pub fn blk(i: usize, t: &str) -> String {
        format!("blk.{i}.{t}")
    }
    pub const ATTN_NORM: &str = "attn_norm.weight";
    pub const ATTN_Q: &str = "attn_q.weight";
    pub const ATTN_K: &str = "attn_k.weight";
    pub const ATTN_V: &str = "attn_v.weight";
    pub const ATTN_Q_BIAS: &str = "attn_q.bias";
    pub const ATTN_K_BIAS: &str = "attn_k.bias";
    pub const ATTN_V_BIAS: &str = "attn_v.bias";
    pub const ATTN_Q_NORM: &str = "attn_q_norm.weight";
    pub const ATTN_K_NORM: &str = "attn_k_norm.weight";
    pub const ATTN_OUT: &str = "attn_output.weight";
    pub const ATTN_POST_NORM: &str = "post_attention_norm.weight";
    pub const FFN_NORM: &str = "ffn_norm.weight";
    pub const FFN_POST_NORM: &str = "post_ffw_norm.weight";
    pub const FFN_GATE: &str = "ffn_gate.weight";
    pub const FFN_UP: &str = "ffn_up.weight";
    pub const FFN_DOWN: &str = "ffn_down.weight";
    pub const FFN_GATE_INP: &str = "ffn_gate_inp.weight";
    pub const FFN_GATE_EXPS: &str = "ffn_gate_exps.weight";
    pub const FFN_UP_EXPS: &str = "ffn_up_exps.weight";
    pub const FFN_DOWN_EXPS: &str = "ffn_down_exps.weight";
    pub const FFN_GATE_INP_SHEXP: &str = "ffn_gate_inp_shexp.weight";
    pub const FFN_GATE_SHEXP: &str = "ffn_gate_shexp.weight";
    pub const FFN_UP_SHEXP: &str = "ffn_up_shexp.weight";
    pub const FFN_DOWN_SHEXP: &str = "ffn_down_shexp.weight";
}
