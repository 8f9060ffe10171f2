//! The generation loop: prompt → prefill → sample/decode → streamed text.

use crate::kv::{KvCache, KvShape};
use crate::model::{Logits, Model};
use crate::sampler::{logprobs, Sampler, SamplerConfig, TokenLogprob};
use crate::speculative::{propose_after, room, verify, AdaptiveK, Payoff, Proposer};
use crate::EngineError;
use hanlin_kernels::ThreadPool;
use hanlin_tokenizer::{ChatTemplate, Message, Tokenizer, Utf8Stream, CHATML, GEMMA};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A model with its tokenizer, chat template and thread pool.
pub struct LoadedModel {
    pub model: Model,
    pub tokenizer: Tokenizer,
    pub template: ChatTemplate,
    pub pool: Arc<ThreadPool>,
}

impl LoadedModel {
    pub fn load(path: &Path, threads: usize) -> Result<Arc<Self>, EngineError> {
        Self::load_with_pool(path, Arc::new(ThreadPool::new(threads)))
    }

    /// [`Self::load`], computing on `pool`, which another model may share:
    /// a draft model and its target take turns, and two pools of their own
    /// would keep twice the threads spinning on the same cores.
    pub fn load_with_pool(path: &Path, pool: Arc<ThreadPool>) -> Result<Arc<Self>, EngineError> {
        Self::with_model(Model::load(path)?, pool)
    }

    /// A draft model for a target computing on `pool`: [`Model::load_draft`]
    /// (its weights at 4 bits), on the target's threads.
    pub fn load_draft(path: &Path, pool: Arc<ThreadPool>) -> Result<Arc<Self>, EngineError> {
        Self::with_model(Model::load_draft(path)?, pool)
    }

    fn with_model(mut model: Model, pool: Arc<ThreadPool>) -> Result<Arc<Self>, EngineError> {
        let tokenizer = Tokenizer::from_gguf(model.header())?;
        model.drop_vocabulary();
        // Building the tokenizer and dropping the vocabulary it was built
        // from leave megabytes freed but held by the allocator; a server
        // keeps running long after.
        #[cfg(all(target_os = "linux", target_env = "gnu"))]
        // SAFETY: malloc_trim only returns free heap memory to the system.
        unsafe {
            libc::malloc_trim(0);
        }
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
            pool,
        }))
    }

    /// Render and tokenize a conversation, ending with the assistant's turn.
    pub fn chat_prompt(&self, messages: &[Message]) -> Result<Vec<u32>, EngineError> {
        self.chat_prompt_with(messages, None)
    }

    /// [`Self::chat_prompt`] with tool definitions (a JSON array). Special
    /// tokens come from the template only: the messages' text is tokenized
    /// as plain text, so a message spelling `<|im_end|><|im_start|>system`
    /// cannot open a turn of its own.
    pub fn chat_prompt_with(
        &self,
        messages: &[Message],
        tools: Option<&serde_json::Value>,
    ) -> Result<Vec<u32>, EngineError> {
        let pieces = self.template.render_pieces(messages, tools, true)?;
        Ok(self.tokenizer.encode_pieces(&pieces, true)?)
    }

    /// A sentence embedding from the model's own hidden states: the mean of
    /// the final-normalised states over the text's tokens, L2-normalised
    /// (what `/v1/embeddings` returns for a chat model).
    pub fn embed_mean(&self, text: &str) -> Result<Vec<f32>, EngineError> {
        let mut tokens = self.tokenizer.encode_plain(text, true)?;
        tokens.truncate(self.model.cfg.context_length.clamp(1, 2048));
        if tokens.is_empty() {
            return Ok(vec![0.0; self.model.cfg.d_model]);
        }
        let c = &self.model.cfg;
        let mut cache = KvCache::new(KvShape::of(c), tokens.len());
        self.model
            .forward(&self.pool, &tokens, &mut cache, Logits::Mean)
    }

    pub fn new_session(self: &Arc<Self>, ctx: usize) -> Session {
        let ctx = ctx.min(self.model.cfg.context_length).max(1);
        Session {
            cache: KvCache::new(KvShape::of(&self.model.cfg), ctx),
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
    /// Tokens a proposer guessed (speculative decoding), and how many of
    /// them the model kept.
    pub proposed: usize,
    pub accepted: usize,
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
        self.prefill_for(ids, Logits::Last)
    }

    /// [`Self::prefill`] wanting `want` (`Logits::Last` or
    /// `Logits::LastFirst`) for the last token.
    pub fn prefill_for(
        &mut self,
        ids: &[u32],
        want: Logits,
    ) -> Result<(Vec<f32>, usize), EngineError> {
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
        let logits = self
            .m
            .model
            .forward(&self.m.pool, &ids[common..], &mut self.cache, want)?;
        self.tokens.extend_from_slice(&ids[common..]);
        Ok((logits, common))
    }

    /// Feed one token and get the next logits.
    pub fn step(&mut self, id: u32) -> Result<Vec<f32>, EngineError> {
        self.step_for(id, Logits::Last)
    }

    /// [`Self::step`] wanting `want` (`Logits::Last` or `Logits::LastFirst`).
    pub fn step_for(&mut self, id: u32, want: Logits) -> Result<Vec<f32>, EngineError> {
        let logits = self
            .m
            .model
            .forward(&self.m.pool, &[id], &mut self.cache, want)?;
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
        on_text: impl FnMut(&str) -> bool,
    ) -> Result<Generation, EngineError> {
        self.generate_with(prompt, params, None, on_text)
    }

    /// [`Self::generate`], with a proposer guessing the next tokens for the
    /// model to verify several at a time (speculative decoding; see
    /// [`crate::speculative`]). The tokens are the same as without one.
    pub fn generate_with<'p>(
        &mut self,
        prompt: &[u32],
        params: &GenerateParams,
        mut proposer: Option<&mut (dyn Proposer + 'p)>,
        mut on_text: impl FnMut(&str) -> bool,
    ) -> Result<Generation, EngineError> {
        let m = self.m.clone();
        let t0 = Instant::now();
        let (first, cached) = self.prefill(prompt)?;
        let mut k = AdaptiveK::default();
        let mut payoff = Payoff::default();
        // A draft model reads the prompt as part of the prompt's work, and
        // its time counts as the prompt's (as llama.cpp's speculative
        // example counts it): caught up at the first round instead, a
        // 111-token prompt's catch-up was a tenth of a 128-token answer's
        // decode time. Not when the answer ends before proposals start:
        // the first proposals follow token `first_proposal() + 1` ([`room`]).
        if let Some(p) = proposer.as_deref_mut() {
            if params.max_tokens > payoff.first_proposal() + 1 {
                p.catch_up(&self.tokens)?;
            }
        }
        let prefill_time = t0.elapsed();
        let t1 = Instant::now();
        let mut dec = Decoder::new(params.clone());
        // When the last round's work began (to time it once it is judged).
        let mut round_started = Instant::now();
        let (mut proposed, mut accepted) = (0usize, 0usize);
        // Logits rows to sample from, in order (`verify`): one per token
        // fed, each but the last checking the proposal at the same index.
        let mut rows = first;
        let mut drafts: Vec<u32> = Vec::new();
        // How long the last verify pass took (timed for `k`).
        let mut verify_secs = None;
        let finish = loop {
            let round = verify(
                &mut dec,
                &m.tokenizer,
                &mut rows,
                &drafts,
                &self.tokens,
                self.cache.capacity(),
                &mut on_text,
            );
            // The cache keeps what was verified.
            self.unfeed(round.held);
            (accepted, proposed) = (accepted + round.accepted, proposed + round.proposed);
            if let Some(f) = round.finish {
                break f;
            }
            k.update(drafts.len(), round.accepted);
            if let Some(secs) = verify_secs.take() {
                k.pass(drafts.len() + 1, secs);
            }
            if !drafts.is_empty() {
                payoff.round(
                    round_started.elapsed().as_secs_f64(),
                    round.accepted + 1,
                    dec.out.len(),
                );
            }
            let Some(id) = round.feed else {
                unreachable!("a round ends with a token to feed or a finish")
            };
            // Propose what follows `id`, within the token and context limits.
            let room = room(&self.cache, params.max_tokens, dec.out.len());
            let resumed = drafts.is_empty();
            drafts = match proposer.as_deref_mut() {
                Some(p) if payoff.propose(dec.out.len()) => {
                    // Resuming after the prompt or plain steps: the proposer
                    // catches up first, outside the round's time.
                    if resumed && room > 0 {
                        p.catch_up(&self.tokens)?;
                    }
                    round_started = Instant::now();
                    let d = propose_after(p, &self.tokens, id, k.next().min(room))?;
                    k.proposing(d.len(), round_started.elapsed().as_secs_f64());
                    d
                }
                _ => Vec::new(),
            };
            let t = Instant::now();
            if drafts.is_empty() {
                rows = self.step(id)?;
                let secs = t.elapsed().as_secs_f64();
                payoff.plain_step(secs);
                k.pass(1, secs);
            } else {
                let mut feed = Vec::with_capacity(1 + drafts.len());
                feed.push(id);
                feed.extend_from_slice(&drafts);
                rows = m
                    .model
                    .forward(&m.pool, &feed, &mut self.cache, Logits::All)?;
                self.tokens.extend_from_slice(&feed);
                verify_secs = Some(t.elapsed().as_secs_f64());
            }
        };
        // The last sampled token is in `tokens` but was never fed back, so the
        // cache (and `self.tokens`) end one token short; the next turn's
        // prefix match recomputes it.
        Ok(Generation {
            text: dec.text,
            tokens: dec.out,
            prompt_tokens: prompt.len(),
            cached_tokens: cached,
            finish,
            prefill_time,
            decode_time: t1.elapsed(),
            logprobs: dec.lps,
            proposed,
            accepted,
        })
    }

    /// Forget the cached positions from `n` on (proposals that were not
    /// kept).
    fn unfeed(&mut self, n: usize) {
        if n < self.cache.len() {
            self.cache.truncate(n);
            self.tokens.truncate(n);
        }
    }
}

/// A constraint on what may be generated (a grammar, a JSON schema): it
/// masks the logits before each sample and follows the sampled tokens.
pub trait TokenConstraint: Send {
    /// Set the logits of the tokens not allowed next to -inf. Returns false
    /// when the constraint cannot go on (nothing is allowed).
    fn mask(&mut self, logits: &mut [f32]) -> bool;
    /// Follow a sampled (allowed) token.
    fn accept(&mut self, token: u32);
}

/// What one sampling step produced.
pub struct DecodeStep {
    /// Text that became final (never a broken character, never part of a
    /// possible stop string).
    pub text: String,
    /// Set when the sequence is finished.
    pub finish: Option<FinishReason>,
    /// The sampled token, to be fed back when the sequence goes on.
    pub feed: Option<u32>,
}

/// Per-sequence decoding state shared by [`Session::generate`] and the batch
/// scheduler: sampling, log-probabilities, streaming detokenization, stop
/// strings and the token limit.
pub struct Decoder {
    params: GenerateParams,
    sampler: Sampler,
    stream: Utf8Stream,
    max_stop: usize,
    emitted: usize,
    /// Everything generated so far (after a stop string: cut before it).
    pub text: String,
    /// Sampled tokens (end-of-generation tokens excluded).
    pub out: Vec<u32>,
    pub lps: Vec<(TokenLogprob, Vec<TokenLogprob>)>,
    constraint: Option<Box<dyn TokenConstraint>>,
}

impl Decoder {
    /// Sampling limited by `constraint` (e.g. a JSON schema).
    pub fn constrained(params: GenerateParams, constraint: Box<dyn TokenConstraint>) -> Self {
        let mut d = Self::new(params);
        d.constraint = Some(constraint);
        d
    }

    pub fn new(params: GenerateParams) -> Self {
        Self {
            constraint: None,
            sampler: Sampler::new(params.sampler.clone()),
            stream: Utf8Stream::default(),
            max_stop: params.stop.iter().map(String::len).max().unwrap_or(0),
            emitted: 0,
            text: String::new(),
            out: Vec::new(),
            lps: Vec::new(),
            params,
        }
    }

    /// Sample the next token from `logits` (`history`: the tokens the
    /// penalties look at; `context_full`: no room to feed another token).
    pub fn next(
        &mut self,
        tok: &Tokenizer,
        logits: &mut [f32],
        history: &[u32],
        context_full: bool,
    ) -> DecodeStep {
        if let Some(c) = &mut self.constraint {
            if !c.mask(logits) {
                return self.finish(FinishReason::Stop);
            }
        }
        let p = &self.params;
        let raw = (p.logprobs || p.top_logprobs > 0).then(|| logits.to_vec());
        let id = self.sampler.sample(logits, history);
        if let Some(c) = &mut self.constraint {
            if !tok.eog.contains(&id) {
                c.accept(id);
            }
        }
        if let Some(raw) = raw {
            let (lp, top) = logprobs(&raw, id, p.top_logprobs);
            self.lps.push((TokenLogprob { id, logprob: lp }, top));
        }
        if tok.eog.contains(&id) {
            return self.finish(FinishReason::Stop);
        }
        self.out.push(id);
        self.text
            .push_str(&self.stream.push(tok.token_bytes(id, false)));
        if let Some(pos) = p
            .stop
            .iter()
            .filter_map(|s| {
                self.text[self.emitted..]
                    .find(s.as_str())
                    .map(|i| i + self.emitted)
            })
            .min()
        {
            // Text after a stop string is dropped, so is any byte still pending.
            self.text.truncate(pos);
            let text = self.text[self.emitted.min(pos)..].to_string();
            self.emitted = self.text.len();
            return DecodeStep {
                text,
                finish: Some(FinishReason::Stop),
                feed: None,
            };
        }
        if self.out.len() >= p.max_tokens {
            return self.finish(FinishReason::Length);
        }
        if context_full {
            return self.finish(FinishReason::ContextFull);
        }
        // Hold back a tail that could still grow into a stop string.
        let held = self
            .max_stop
            .saturating_sub(1)
            .min(self.text.len() - self.emitted);
        let mut safe = self.text.len() - held;
        while !self.text.is_char_boundary(safe) {
            safe -= 1;
        }
        let text = self.text[self.emitted..safe.max(self.emitted)].to_string();
        self.emitted = self.emitted.max(safe);
        DecodeStep {
            text,
            finish: None,
            feed: Some(id),
        }
    }

    /// Finish without a stop string: flush pending bytes and held-back text.
    fn finish(&mut self, reason: FinishReason) -> DecodeStep {
        self.text.push_str(&self.stream.finish());
        let text = self.text[self.emitted..].to_string();
        self.emitted = self.text.len();
        DecodeStep {
            text,
            finish: Some(reason),
            feed: None,
        }
    }
}
