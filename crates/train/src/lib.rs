//! Training small GPTs on one machine with burn (CPU backend here; the
//! model code is backend-independent): a byte-level BPE tokenizer
//! ([`tokenizer`]), data packing ([`data`], [`chat`]), the GPT ([`model`]:
//! RoPE, RMSNorm, SwiGLU, grouped-query attention, tied embeddings,
//! optional QK-norm, dense or mixture-of-experts feed-forward, LoRA
//! adapters), one training loop ([`trainer`]: AdamW or Muon, warmup +
//! cosine or linear decay, clipping, accumulation, checkpoints that resume, loss
//! curves [`curves`]) driven by pretraining ([`pretrain`]) and fine-tuning
//! ([`finetune`]: SFT, DPO, LoRA, evaluation), run directories and GGUF
//! base models ([`run`]), and export to a GGUF file the engine serves
//! ([`export`]).

pub mod chat;
pub mod config;
pub mod curves;
pub mod data;
pub mod export;
pub mod finetune;
pub mod image;
pub mod model;
pub mod pretrain;
pub mod run;
pub mod sd;
pub mod shapes;
pub mod tokenizer;
pub mod trainer;

/// The burn version this crate is built with (for callers that pick devices).
pub use burn;
pub use config::{GptConfig, TrainConfig};

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    // The cause is shown by the error chain (anyhow prints it after the path).
    #[error("{path}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error("corpus: {0}")]
    Corpus(String),
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("checkpoint {path}: {reason}")]
    Checkpoint { path: String, reason: String },
    #[error("the loss became {loss} at step {step}; training stopped (last good checkpoint: {checkpoint})")]
    NotFinite {
        step: usize,
        loss: f32,
        checkpoint: String,
    },
    #[error("the model needs about {needed_mb} MB to train but {available_mb} MB are available; use a smaller model, batch or sequence")]
    TooBig { needed_mb: u64, available_mb: u64 },
}

pub(crate) fn io_err(path: &std::path::Path) -> impl FnOnce(std::io::Error) -> TrainError + '_ {
    move |source| TrainError::Io {
        path: path.display().to_string(),
        source,
    }
}
