//! Hanlin's inference engine: loads a model (GGUF, memory-mapped), runs the
//! transformer forward pass on its own kernels, and generates text.
//!
//! Flow: [`LoadedModel::load`] → [`Session`] (owns a [`KvCache`]) →
//! [`Session::generate`] (prefill the prompt in one batch, then decode one
//! token at a time through [`Sampler`], streaming text through a callback).
//! For serving, [`Scheduler`] runs many sequences at once with continuous
//! batching ([`Model::forward_batch`]) and a shared-prefix KV pool.

mod attn;
pub mod encoder;
mod generate;
pub mod kv;
pub mod model;
pub mod sampler;
pub mod sched;
pub mod speculative;
pub mod whisper;

pub use generate::{
    DecodeStep, Decoder, FinishReason, GenerateParams, Generation, LoadedModel, Session,
    TokenConstraint,
};
pub use hanlin_kernels::dot::{simd_level, simd_name, SimdLevel};
pub use kv::{KvBlocks, KvCache, KvShape, KV_BLOCK};
pub use model::{BatchLogits, BatchSeq, Logits, Model, FORWARD_CHUNK};
pub use sampler::{Sampler, SamplerConfig, TokenLogprob};
pub use sched::{
    Draft, Event, Job, Lookup, SchedStats, Scheduler, SchedulerConfig, Sink, SubmitError,
    BACKGROUND,
};

/// Compute threads to use by default: every core the OS gives us.
pub fn default_threads() -> usize {
    hanlin_kernels::ThreadPool::default_threads()
}

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Format(#[from] hanlin_formats::FormatError),
    #[error(transparent)]
    Arch(#[from] hanlin_arch::ArchError),
    #[error(transparent)]
    Tokenizer(#[from] hanlin_tokenizer::TokenizerError),
    #[error(transparent)]
    Template(#[from] hanlin_tokenizer::TemplateError),
    #[error("invalid model: {0}")]
    BadModel(String),
    #[error("token id {0} is outside the vocabulary")]
    BadToken(u32),
    #[error("the prompt needs {needed} positions but the context holds {limit}; shorten the prompt or raise --ctx")]
    ContextOverflow { needed: usize, limit: usize },
}
