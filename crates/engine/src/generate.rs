//! The generation loop: prompt → prefill → sample/decode → streamed text.

use crate::kv::KvCache;
use crate::model::{Logits, Model};
use crate::sampler::{logprobs, Sampler, SamplerConfig, TokenLogprob};
use crate::EngineError;
use hanlin_kernels::ThreadPool;
use hanlin_tokenizer::{ChatTemplate, Message, Tokenizer, CHATML, GEMMA};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A model with its tokenizer, chat template and thread pool.
pub struct LoadedModel {
    pub model: Model,
    pub tokenizer: Tokenizer,
    pub template: ChatTemplate,
    pub pool: ThreadPool,
}

impl LoadedModel {
    pub fn load(path: &Path, threads: usize) -> Result<Arc<Self>, EngineError> {
        let model = Model::load(path)?;
        let tokenizer = Tokenizer::from_gguf(model.header())?;
        // Models without a template of their own get their family's format.
        let fallback = match model.cfg.arch {
            hanlin_arch::Arch::Gemma3 => GEMMA,
            _ => CHATML,
        };
        let src = model
            .header()
            .get_str("tokenizer.chat_template")
            .unwrap_or(fallback)
            .to_string();
        let name = |id: Option<u32>| {
            id.and_then(|i| tokenizer.token_str(i))
                .unwrap_or("")
                .to_string()
        };
        let template = ChatTemplate::new(&src, &name(tokenizer.bos), &name(tokenizer.eos))?;
        Ok(Arc::new(Self {
            model,
            tokenizer,
            template,
            pool: ThreadPool::new(threads),
        }))
    }

    /// Render and tokenize a conversation, ending with the assistant's turn.
    pub fn chat_prompt(&self, messages: &[Message]) -> Result<Vec<u32>, EngineError> {
        let text = self.template.render(messages, None, true)?;
        Ok(self.tokenizer.encode(&text, true)?)
    }

    pub fn new_session(self: &Arc<Self>, ctx: usize) -> Session {
        let ctx = ctx.min(self.model.cfg.context_length).max(1);
        Session {
            cache: KvCache::new(self.model.cfg.n_layer, self.model.cfg.kv_dim(), ctx),
            tokens: Vec::new(),
            m: self.clone(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct GenerateParams {
    pub max_tokens: usize,
    pub sampler: SamplerConfig,
    pub stop: Vec<String>,
    /// Return this many top alternatives per token (0: no log-probabilities).
    pub top_logprobs: usize,
    pub logprobs: bool,
}

impl Default for GenerateParams {
    fn default() -> Self {
        Self {
            max_tokens: 512,
            sampler: SamplerConfig::default(),
            stop: Vec::new(),
            top_logprobs: 0,
            logprobs: false,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// End-of-generation token or a stop string.
    Stop,
    /// `max_tokens` reached.
    Length,
    /// The context is full.
    ContextFull,
    /// The callback asked to stop.
    Cancelled,
}

#[derive(Debug, Clone)]
pub struct Generation {
    pub text: String,
    pub tokens: Vec<u32>,
    pub prompt_tokens: usize,
    /// Prompt tokens whose KV entries were reused from the previous turn.
    pub cached_tokens: usize,
    pub finish: FinishReason,
    pub prefill_time: Duration,
    pub decode_time: Duration,
    pub logprobs: Vec<(TokenLogprob, Vec<TokenLogprob>)>,
}

/// One sequence: its KV cache and the tokens it holds.
pub struct Session {
    m: Arc<LoadedModel>,
    pub cache: KvCache,
    tokens: Vec<u32>,
}

impl Session {
    pub fn model(&self) -> &LoadedModel {
        &self.m
    }

    /// Run `ids`, reusing the cached prefix they share with what is in the
    /// cache; returns the last token's logits and how many were reused.
    pub fn prefill(&mut self, ids: &[u32]) -> Result<(Vec<f32>, usize), EngineError> {
        if ids.is_empty() {
            return Err(EngineError::BadModel("empty prompt".into()));
        }
        if ids.len() > self.cache.capacity() {
            return Err(EngineError::ContextOverflow {
                needed: ids.len(),
                limit: self.cache.capacity(),
            });
        }
        let mut common = self
            .tokens
            .iter()
            .zip(ids)
            .take_while(|(a, b)| a == b)
            .count();
        // Always recompute at least the last token to get its logits.
        common = common.min(ids.len() - 1);
        self.cache.truncate(common);
        self.tokens.truncate(common);
        let logits =
            self.m
                .model
                .forward(&self.m.pool, &ids[common..], &mut self.cache, Logits::Last)?;
        self.tokens.extend_from_slice(&ids[common..]);
        Ok((logits, common))
    }

    /// Feed one token and get the next logits.
    pub fn step(&mut self, id: u32) -> Result<Vec<f32>, EngineError> {
        let logits = self
            .m
            .model
            .forward(&self.m.pool, &[id], &mut self.cache, Logits::Last)?;
        self.tokens.push(id);
        Ok(logits)
    }

    pub fn tokens(&self) -> &[u32] {
        &self.tokens
    }

    /// Generate a continuation of `prompt`, calling `on_text` with each piece of
    /// text as it becomes final; returning `false` from it stops generation.
    pub fn generate(
        &mut self,
        prompt: &[u32],
        params: &GenerateParams,
        mut on_text: impl FnMut(&str) -> bool,
    ) -> Result<Generation, EngineError> {
        let m = self.m.clone();
        let tok = &m.tokenizer;
        let t0 = Instant::now();
        let (mut logits, cached) = self.prefill(prompt)?;
        let prefill_time = t0.elapsed();
        let t1 = Instant::now();
        let mut sampler = Sampler::new(params.sampler.clone());
        let mut stream = tok.stream();
        let mut text = String::new();
        let mut emitted = 0usize; // bytes of `text` already handed to on_text
        let mut out = Vec::new();
        let mut lps = Vec::new();
        let mut finish = FinishReason::Length;
        let max_stop = params.stop.iter().map(String::len).max().unwrap_or(0);
        let mut stopped_by_string = false;
        while out.len() < params.max_tokens {
            let raw = (params.logprobs || params.top_logprobs > 0).then(|| logits.clone());
            let id = sampler.sample(&mut logits, &self.tokens);
            if let Some(raw) = raw {
                let (lp, top) = logprobs(&raw, id, params.top_logprobs);
                lps.push((TokenLogprob { id, logprob: lp }, top));
            }
            if tok.eog.contains(&id) {
                finish = FinishReason::Stop;
                break;
            }
            out.push(id);
            text.push_str(&stream.push(id));
            if let Some(pos) = params
                .stop
                .iter()
                .filter_map(|s| text[emitted..].find(s.as_str()).map(|p| p + emitted))
                .min()
            {
                text.truncate(pos);
                stopped_by_string = true;
                if pos > emitted && !on_text(&text[emitted..]) {
                    finish = FinishReason::Cancelled;
                    break;
                }
                emitted = text.len();
                finish = FinishReason::Stop;
                break;
            }
            // Hold back a tail that could still grow into a stop string.
            let mut safe = text.len() - (max_stop.saturating_sub(1)).min(text.len() - emitted);
            while !text.is_char_boundary(safe) {
                safe -= 1;
            }
            if safe > emitted {
                let keep_going = on_text(&text[emitted..safe]);
                emitted = safe;
                if !keep_going {
                    finish = FinishReason::Cancelled;
                    break;
                }
            }
            if self.cache.len() >= self.cache.capacity() {
                finish = FinishReason::ContextFull;
                break;
            }
            if out.len() >= params.max_tokens {
                break;
            }
            logits = self.step(id)?;
        }
        // Text after a stop string is dropped, so is any byte still pending.
        if !stopped_by_string {
            text.push_str(&stream.finish());
        }
        if emitted < text.len() && finish != FinishReason::Cancelled {
            on_text(&text[emitted..]);
        }
        // The last sampled token is in `out` but was never fed back, so the
        // cache (and `self.tokens`) end one token short; the next turn's
        // prefix match recomputes it.
        Ok(Generation {
            text,
            tokens: out,
            prompt_tokens: prompt.len(),
            cached_tokens: cached,
            finish,
            prefill_time,
            decode_time: t1.elapsed(),
            logprobs: lps,
        })
    }
}
