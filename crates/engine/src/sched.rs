//! Continuous batching: one scheduler thread per loaded model runs every
//! active sequence in the same forward pass (one pass over the weights per
//! step, the decode tokens of all sequences stacked into one batched GEMM),
//! admits queued requests between steps by priority, and feeds long prompts
//! in chunks so they do not stall the sequences already decoding.
//!
//! With prompt lookup on, a decoding sequence whose last tokens occurred
//! earlier in it also feeds the tokens that followed them there, and the
//! step's logits check those guesses ([`crate::speculative`]): the same
//! tokens as without, several per step when the answer quotes its prompt.
//! Guesses only fill rows the step has to spare ([`SchedulerConfig::lookup_rows`]):
//! a batch busy enough to be compute-bound gets none; and unless told to
//! guess always, the scheduler times its decode steps with guesses and
//! without, and stops guessing for a while when they cost more per token
//! than they save (a machine whose multi-token passes are compute-bound).
//!
//! With a draft model (a smaller model with the same vocabulary), each
//! decoding sequence that prompt lookup has nothing for guesses with the
//! draft instead: the draft keeps its own KV cache per sequence, catches up
//! on the tokens the target took (prompt chunks, kept guesses) and proposes
//! greedily, a few one-row passes batched across the sequences, before the
//! target's step checks the proposals like any other guesses.
//!
//! KV caches are per sequence. A finished sequence's cache (and its draft
//! cache) goes into a prefix pool (bounded in tokens); a new request starts
//! from the longest prefix it shares with the pool or with a running
//! sequence, so a system prompt or a conversation's earlier turns are not
//! recomputed, by the model or by its draft.

use crate::generate::{Decoder, FinishReason, GenerateParams, LoadedModel, TokenConstraint};
use crate::kv::{KvBlocks, KvCache, KvShape};
use crate::model::{BatchLogits, BatchSeq, Logits};
use crate::sampler::TokenLogprob;
use crate::speculative::{
    draft_logits, draft_start, propose_after, room, same_vocabulary, verify, AdaptiveK, Payoff,
    PromptLookup, Round,
};
use crate::EngineError;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(Debug, Clone)]
pub struct SchedulerConfig {
    /// Sequences decoded together in one step.
    pub max_batch: usize,
    /// Prompt tokens fed per step, across all prefilling sequences.
    pub prefill_chunk: usize,
    /// Requests waiting for a slot before new ones are refused.
    pub max_queue: usize,
    /// Context (KV positions) per sequence.
    pub ctx: usize,
    /// Tokens kept in the prefix pool after their sequences finish.
    pub prefix_pool_tokens: usize,
    /// Slots background jobs (priority below zero: batch lines) may never
    /// take, so an interactive request finds one free at once.
    pub reserved_slots: usize,
    /// Prompt lookup: decoding sequences also feed guesses copied from
    /// their own earlier tokens, checked in the same step.
    pub lookup: Lookup,
    /// Rows a decode step may have, guesses included: guesses fill what
    /// one row per decoding sequence leaves of it (a step's cost hardly
    /// grows with its rows until the batch becomes compute-bound).
    pub lookup_rows: usize,
}

/// When the scheduler guesses ahead with prompt lookup.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lookup {
    Off,
    /// While guessing gives tokens faster than plain steps (measured).
    WhenItPays,
    Always,
}

impl From<bool> for Lookup {
    fn from(on: bool) -> Self {
        if on {
            Lookup::WhenItPays
        } else {
            Lookup::Off
        }
    }
}

/// A draft model checked to share its target's vocabulary.
pub struct Draft {
    model: Arc<LoadedModel>,
}

impl Draft {
    /// `draft` proposing for `target`; refused when their vocabularies
    /// differ, naming both.
    pub fn new(
        draft: Arc<LoadedModel>,
        draft_name: &str,
        target: &LoadedModel,
        target_name: &str,
    ) -> Result<Self, EngineError> {
        same_vocabulary(&draft, draft_name, target, target_name)?;
        Ok(Self { model: draft })
    }
}

/// Jobs below this priority are background work ([`SchedulerConfig::reserved_slots`]).
pub const BACKGROUND: i32 = 0;

impl Default for SchedulerConfig {
    fn default() -> Self {
        Self {
            max_batch: 16,
            prefill_chunk: 256,
            max_queue: 256,
            ctx: 8192,
            prefix_pool_tokens: 32 * 1024,
            reserved_slots: 4,
            lookup: Lookup::WhenItPays,
            lookup_rows: 16,
        }
    }
}

/// What a request hears back, in order: `Started`, any number of `Token`,
/// then `Done` or `Failed`.
#[derive(Debug, Clone)]
pub enum Event {
    Started {
        prompt_tokens: usize,
        /// Prompt tokens whose KV entries came from the prefix cache.
        cached_tokens: usize,
    },
    Token {
        text: String,
        /// Tokens sampled since the previous `Token` event (text can lag
        /// behind tokens: a character split across tokens, a possible stop
        /// string held back).
        tokens: usize,
        /// Log-probabilities of the tokens sampled since the last event
        /// (when asked for).
        logprobs: Vec<(TokenLogprob, Vec<TokenLogprob>)>,
    },
    Done {
        finish: FinishReason,
        prompt_tokens: usize,
        cached_tokens: usize,
        completion_tokens: usize,
    },
    /// Still waiting for a slot, `ahead` requests before it (sent now and
    /// then, so a client that has gone away is noticed while queued too).
    Queued {
        ahead: usize,
    },
    /// A chunk of the prompt went through the model and more remains
    /// (`done` of `total` prompt tokens are in the KV cache). Sent after every
    /// chunk, so a client that leaves during a long prefill is noticed and
    /// its sequence freed before the rest of the prompt is computed.
    Prefill {
        done: usize,
        total: usize,
    },
    /// The answer to an embedding job (then `Done`).
    Embedding(Vec<f32>),
    Failed(String),
}

/// Receives a request's events on the scheduler thread; returning `false`
/// (the client went away) frees the sequence at once.
pub type Sink = Box<dyn FnMut(Event) -> bool + Send>;

pub struct Job {
    pub prompt: Vec<u32>,
    pub params: GenerateParams,
    /// Higher is admitted first (plans give paying users a higher one).
    pub priority: i32,
    /// Embed the prompt (mean-pooled hidden state) instead of generating.
    pub embed: bool,
    /// Limit what may be generated (structured output).
    pub constraint: Option<Box<dyn TokenConstraint>>,
    pub sink: Sink,
}

#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    #[error("the queue is full ({0} requests waiting)")]
    QueueFull(usize),
    #[error("the scheduler has stopped")]
    Stopped,
}

/// Counters the server exports as metrics.
#[derive(Debug, Default)]
pub struct SchedStats {
    pub queued: AtomicUsize,
    pub active: AtomicUsize,
    /// KV positions held by running sequences.
    pub kv_tokens: AtomicUsize,
    /// KV positions held by the prefix pool.
    pub pool_tokens: AtomicUsize,
    /// Bytes of KV blocks alive (running sequences and the prefix pool,
    /// shared blocks counted once).
    pub kv_bytes: AtomicUsize,
    pub steps: AtomicU64,
    pub prompt_tokens: AtomicU64,
    pub cached_tokens: AtomicU64,
    pub generated_tokens: AtomicU64,
    /// Guesses checked (prompt lookup), and those the model's own choice
    /// agreed with: their ratio is the acceptance rate.
    pub proposed_tokens: AtomicU64,
    pub accepted_tokens: AtomicU64,
    /// The same for the draft model's guesses.
    pub draft_proposed_tokens: AtomicU64,
    pub draft_accepted_tokens: AtomicU64,
    /// Tokens the draft model ran to catch up with its targets (prompts
    /// and kept tokens; a prefix whose draft cache was found in the pool or
    /// a running sequence is not run again).
    pub draft_caught_up_tokens: AtomicU64,
}

/// Handle to a model's scheduler thread; dropping every handle stops it once
/// its running sequences finish.
pub struct Scheduler {
    tx: mpsc::Sender<Job>,
    pub model: Arc<LoadedModel>,
    /// The draft model guessing for it, when one was given.
    pub draft: Option<Arc<LoadedModel>>,
    pub config: SchedulerConfig,
    pub stats: Arc<SchedStats>,
}

impl Scheduler {
    pub fn start(model: Arc<LoadedModel>, config: SchedulerConfig) -> Self {
        Self::start_with_draft(model, None, config)
    }

    /// A scheduler whose decoding sequences also guess with `draft`.
    pub fn start_with_draft(
        model: Arc<LoadedModel>,
        draft: Option<Draft>,
        mut config: SchedulerConfig,
    ) -> Self {
        let draft = draft.map(|d| d.model);
        config.ctx = config.ctx.min(model.model.cfg.context_length).max(2);
        config.max_batch = config.max_batch.max(1);
        config.prefill_chunk = config.prefill_chunk.max(1);
        let (tx, rx) = mpsc::channel();
        let stats = Arc::new(SchedStats::default());
        let mut worker = Worker {
            m: model.clone(),
            cfg: config.clone(),
            stats: stats.clone(),
            rx,
            waiting: Vec::new(),
            active: Vec::new(),
            pool: VecDeque::new(),
            blocks: KvBlocks::new(),
            arrivals: 0,
            last_probe: Instant::now(),
            payoff: Payoff::default(),
            steps: 0,
            draft: draft.clone(),
            draft_blocks: KvBlocks::new(),
            logits: BatchLogits::default(),
        };
        std::thread::Builder::new()
            .name("hanlin-sched".into())
            .spawn(move || worker.run())
            .expect("spawn scheduler thread");
        Self {
            tx,
            model,
            draft,
            config,
            stats,
        }
    }

    /// Queue a request. Refused when the queue is full (back-pressure).
    pub fn submit(&self, job: Job) -> Result<(), SubmitError> {
        let queued = self.stats.queued.load(Ordering::Relaxed);
        if queued >= self.config.max_queue {
            return Err(SubmitError::QueueFull(queued));
        }
        self.stats.queued.fetch_add(1, Ordering::Relaxed);
        self.tx.send(job).map_err(|_| {
            self.stats.queued.fetch_sub(1, Ordering::Relaxed);
            SubmitError::Stopped
        })
    }
}

struct Waiting {
    job: Job,
    arrival: u64,
}

/// A sequence's guessers: prompt lookup first, then the draft model.
struct Guess {
    lookup: Option<PromptLookup>,
    /// The draft model's KV cache, of a stretch of the sequence's tokens.
    draft: Option<DraftCache>,
    k: AdaptiveK,
}

/// A draft model's KV cache of a sequence's tokens from `off` on (`off` is
/// 0 unless the draft had to catch up on more than
/// [`DRAFT_WINDOW`](crate::speculative::DRAFT_WINDOW) tokens and started
/// afresh on the latest ones: see [`draft_start`]).
struct DraftCache {
    cache: KvCache,
    off: usize,
}

struct Seq {
    job: Job,
    dec: Decoder,
    cache: KvCache,
    /// Tokens whose KV entries are in `cache` (prompt prefix, then fed tokens).
    tokens: Vec<u32>,
    cached: usize,
    /// Sampled and not yet fed back.
    pending: Option<u32>,
    /// How it guesses ahead, when it does.
    guess: Option<Guess>,
    /// Guesses fed this step after the pending token.
    drafts: Vec<u32>,
    /// Whether they are the draft model's (else prompt lookup's).
    drafted: bool,
    lps_sent: usize,
    tokens_sent: usize,
    done: bool,
}

impl Seq {
    fn prefilling(&self) -> bool {
        self.tokens.len() < self.job.prompt.len()
    }
    fn send(&mut self, e: Event) {
        if !self.done && !(self.job.sink)(e) {
            self.done = true;
        }
    }

    /// How many guesses may follow the pending token `id` (at most
    /// `spare`, within the context and the token limit), and prompt
    /// lookup's guesses, when it has any.
    fn guesses(&mut self, id: u32, spare: usize) -> (usize, Vec<u32>) {
        let room = room(&self.cache, self.job.params.max_tokens, self.dec.out.len()).min(spare);
        let Some(g) = &mut self.guess else {
            return (0, Vec::new());
        };
        let room = room.min(g.k.next());
        let found = match &mut g.lookup {
            // Prompt lookup only reads the tokens; it has no error to give.
            Some(lookup) => propose_after(lookup, &self.tokens, id, room).unwrap_or_default(),
            None => Vec::new(),
        };
        (room, found)
    }

    /// The tokens the draft's cache lacks: those of `tokens` after it.
    fn draft_lag(&self) -> &[u32] {
        let Some(Guess {
            draft: Some(dc), ..
        }) = &self.guess
        else {
            return &[];
        };
        let known = (dc.off + dc.cache.len()).min(self.tokens.len());
        &self.tokens[known..]
    }

    /// Starts the draft afresh on the latest tokens when it lags by more
    /// than [`DRAFT_WINDOW`](crate::speculative::DRAFT_WINDOW) of them.
    fn draft_window(&mut self) {
        let len = self.tokens.len();
        if let Some(Guess {
            draft: Some(dc), ..
        }) = &mut self.guess
        {
            let held = dc.cache.len().min(len.saturating_sub(dc.off));
            let off = draft_start(dc.off, held, len);
            if off != dc.off {
                dc.cache.truncate(0);
                dc.off = off;
            }
        }
    }

    /// Sample from this step's logits (a row per fed token when guesses
    /// were fed; [`verify`]); the cache and `tokens` drop the guesses not
    /// kept.
    fn sample(&mut self, tok: &hanlin_tokenizer::Tokenizer, logits: &mut [f32]) -> Round {
        let capacity = self.cache.capacity();
        let round = verify(
            &mut self.dec,
            tok,
            logits,
            &self.drafts,
            &self.tokens,
            capacity,
            &mut |_| true,
        );
        self.cache.truncate(round.held);
        self.tokens.truncate(round.held);
        if let Some(g) = &mut self.guess {
            g.k.update(self.drafts.len(), round.accepted);
            if let Some(dc) = &mut g.draft {
                // Its proposals past the first rejected one go.
                let held = round.held.saturating_sub(dc.off);
                dc.cache.truncate(dc.cache.len().min(held));
            }
        }
        round
    }
}

/// Tokens and the caches that hold them: the target's, and the draft
/// model's (of a prefix of the same tokens) when it guesses with one. A
/// finished sequence's go into the prefix pool; a new sequence starts from
/// those of the longest prefix found, so that the next turn of a
/// conversation runs its history through neither model again.
struct Cached {
    tokens: Vec<u32>,
    cache: KvCache,
    draft: Option<DraftCache>,
}

impl Cached {
    /// The first `n` positions of `cache` and what `draft` holds of them
    /// (it may hold fewer), which hold `prompt[..n]`; blocks are shared,
    /// not copied.
    fn prefix(cache: &KvCache, draft: Option<&DraftCache>, prompt: &[u32], n: usize) -> Self {
        Self {
            tokens: prompt[..n].to_vec(),
            cache: cache.clone_prefix(n),
            draft: draft.filter(|d| d.off < n).map(|d| DraftCache {
                cache: d.cache.clone_prefix(n - d.off),
                off: d.off,
            }),
        }
    }
}

struct Worker {
    m: Arc<LoadedModel>,
    cfg: SchedulerConfig,
    stats: Arc<SchedStats>,
    rx: mpsc::Receiver<Job>,
    waiting: Vec<Waiting>,
    active: Vec<Seq>,
    /// Caches of finished sequences, least recently used first. Their
    /// blocks are shared with the sequences that reuse them.
    pool: VecDeque<Cached>,
    blocks: Arc<KvBlocks>,
    arrivals: u64,
    last_probe: Instant,
    /// Whether guessing pays on this machine: decode steps timed with
    /// guesses and without.
    payoff: Payoff,
    /// Steps run since the scheduler started: the payoff's clock (how
    /// long guessing stays off once it did not pay is counted in steps, so
    /// a busy batch does not try again sooner than a single sequence).
    steps: usize,
    draft: Option<Arc<LoadedModel>>,
    /// Counts the draft caches' blocks.
    draft_blocks: Arc<KvBlocks>,
    /// A step's logits, in a buffer kept from step to step.
    logits: BatchLogits,
}

/// How often waiting requests are probed.
const PROBE_EVERY: Duration = Duration::from_millis(250);

fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

impl Worker {
    fn run(&mut self) {
        loop {
            if self.active.is_empty() && self.waiting.is_empty() {
                match self.rx.recv() {
                    Ok(job) => self.enqueue(job),
                    Err(_) => return,
                }
            }
            while let Ok(job) = self.rx.try_recv() {
                self.enqueue(job);
            }
            self.admit();
            self.step();
            if self.last_probe.elapsed() >= PROBE_EVERY {
                self.probe_waiting();
            }
            self.publish();
        }
    }

    /// Tell waiting requests where they stand; drop those whose client left.
    fn probe_waiting(&mut self) {
        self.last_probe = Instant::now();
        self.waiting.sort_by_key(|w| (-w.job.priority, w.arrival));
        let mut ahead = 0;
        let before = self.waiting.len();
        self.waiting.retain_mut(|w| {
            let alive = (w.job.sink)(Event::Queued { ahead });
            ahead += usize::from(alive);
            alive
        });
        self.stats
            .queued
            .fetch_sub(before - self.waiting.len(), Ordering::Relaxed);
    }

    fn enqueue(&mut self, job: Job) {
        self.arrivals += 1;
        self.waiting.push(Waiting {
            job,
            arrival: self.arrivals,
        });
    }

    fn admit(&mut self) {
        while self.active.len() < self.cfg.max_batch && !self.waiting.is_empty() {
            // Highest priority first, then first come.
            let best = (0..self.waiting.len())
                .min_by_key(|&i| (-self.waiting[i].job.priority, self.waiting[i].arrival))
                .unwrap_or(0);
            let background = self.waiting[best].job.priority < BACKGROUND;
            let room = self
                .cfg
                .max_batch
                .saturating_sub(self.cfg.reserved_slots)
                .max(1);
            if background && self.active.len() >= room {
                // The best waiting job is background work, and the slots
                // left are kept for interactive requests.
                break;
            }
            let w = self.waiting.swap_remove(best);
            self.stats.queued.fetch_sub(1, Ordering::Relaxed);
            let mut job = w.job;
            let n = job.prompt.len();
            if n == 0 || n >= self.cfg.ctx {
                let msg = if n == 0 {
                    "the prompt is empty".to_string()
                } else {
                    format!(
                        "the prompt has {n} tokens but the context holds {}",
                        self.cfg.ctx
                    )
                };
                (job.sink)(Event::Failed(msg));
                continue;
            }
            if job.embed {
                self.embed(job);
                continue;
            }
            let Cached {
                cache,
                tokens,
                draft,
            } = self.prefix_for(&job.prompt);
            let cached = tokens.len();
            self.stats
                .prompt_tokens
                .fetch_add(n as u64, Ordering::Relaxed);
            self.stats
                .cached_tokens
                .fetch_add(cached as u64, Ordering::Relaxed);
            let dec = match job.constraint.take() {
                Some(c) => Decoder::constrained(job.params.clone(), c),
                None => Decoder::new(job.params.clone()),
            };
            let mut seq = Seq {
                dec,
                job,
                cache,
                tokens,
                cached,
                pending: None,
                guess: self.guesser(draft),
                drafts: Vec::new(),
                drafted: false,
                lps_sent: 0,
                tokens_sent: 0,
                done: false,
            };
            seq.send(Event::Started {
                prompt_tokens: n,
                cached_tokens: cached,
            });
            if !seq.done {
                self.active.push(seq);
            }
        }
    }

    /// Embedding jobs run alone, whole, between decode steps (their inputs
    /// are short and they need every position at once).
    fn embed(&mut self, mut job: Job) {
        let c = &self.m.model.cfg;
        let n = job.prompt.len();
        let mut cache = KvCache::counted(KvShape::of(c), n, self.blocks.clone());
        if !(job.sink)(Event::Started {
            prompt_tokens: n,
            cached_tokens: 0,
        }) {
            return;
        }
        self.stats
            .prompt_tokens
            .fetch_add(n as u64, Ordering::Relaxed);
        match self
            .m
            .model
            .forward(&self.m.pool, &job.prompt, &mut cache, Logits::Mean)
        {
            Ok(v) => {
                (job.sink)(Event::Embedding(v));
                (job.sink)(Event::Done {
                    finish: FinishReason::Stop,
                    prompt_tokens: n,
                    cached_tokens: 0,
                    completion_tokens: 0,
                });
            }
            Err(e) => {
                (job.sink)(Event::Failed(e.to_string()));
            }
        }
    }

    /// The longest cached prefix of `prompt` (never all of it: the last
    /// prompt token is always run, for its logits).
    fn prefix_for(&mut self, prompt: &[u32]) -> Cached {
        let limit = prompt.len() - 1;
        let pooled = self
            .pool
            .iter()
            .enumerate()
            .map(|(i, p)| (i, common_prefix(&p.tokens, prompt).min(limit)))
            .max_by_key(|&(_, n)| n);
        let running = self
            .active
            .iter()
            .enumerate()
            .map(|(i, s)| (i, common_prefix(&s.tokens, prompt).min(limit)))
            .max_by_key(|&(_, n)| n);
        let rn = running.map_or(0, |r| r.1);
        match (pooled, running) {
            (Some((i, n)), _) if n > 0 && n >= rn => {
                // Share the pooled blocks and mark the entry recently used.
                if let Some(entry) = self.pool.remove(i) {
                    let start = Cached::prefix(&entry.cache, entry.draft.as_ref(), prompt, n);
                    self.pool.push_back(entry);
                    return start;
                }
            }
            (_, Some((i, n))) if n > 0 => {
                let s = &self.active[i];
                let draft = s.guess.as_ref().and_then(|g| g.draft.as_ref());
                return Cached::prefix(&s.cache, draft, prompt, n);
            }
            _ => {}
        }
        let c = &self.m.model.cfg;
        Cached {
            cache: KvCache::counted(KvShape::of(c), self.cfg.ctx, self.blocks.clone()),
            tokens: Vec::new(),
            draft: None,
        }
    }

    fn step(&mut self) {
        // What each active sequence feeds this step.
        // The prompt budget goes out by priority (then admission order): a
        // background prompt never delays an interactive one's first token.
        let mut budget = self.cfg.prefill_chunk;
        let mut order: Vec<usize> = (0..self.active.len()).collect();
        order.sort_by_key(|&i| -self.active[i].job.priority);
        let mut plan: Vec<(Vec<u32>, Logits)> = vec![(Vec::new(), Logits::None); self.active.len()];
        let decoding = self.active.iter().filter(|s| s.pending.is_some()).count();
        let guessing = match self.cfg.lookup {
            Lookup::Off => self.draft.is_some() && self.payoff.propose(self.steps),
            Lookup::WhenItPays => self.payoff.propose(self.steps),
            Lookup::Always => true,
        };
        let mut spare = if guessing {
            self.cfg.lookup_rows.saturating_sub(decoding)
        } else {
            0
        };
        let started = Instant::now();
        // Guesses the draft model is to make, per sequence.
        let mut allot = vec![0; self.active.len()];
        for i in order {
            let s = &mut self.active[i];
            s.drafts.clear();
            s.drafted = false;
            plan[i] = if let Some(id) = s.pending {
                let (room, found) = s.guesses(id, spare);
                if found.is_empty() && s.guess.as_ref().is_some_and(|g| g.draft.is_some()) {
                    allot[i] = room;
                    spare -= room;
                } else {
                    spare -= found.len();
                    s.drafts = found;
                }
                (vec![id], Logits::Last)
            } else if s.prefilling() && budget > 0 {
                let rest = &s.job.prompt[s.tokens.len()..];
                let n = rest.len().min(budget);
                budget -= n;
                let want = if n == rest.len() {
                    Logits::Last
                } else {
                    Logits::None
                };
                (rest[..n].to_vec(), want)
            } else {
                (Vec::new(), Logits::None)
            };
        }
        let drafting = Instant::now();
        let catching_up = self.propose_with_draft(&allot);
        let draft_secs = (drafting.elapsed().as_secs_f64() - catching_up).max(0.0);
        for (s, (feed, want)) in self.active.iter().zip(plan.iter_mut()) {
            if s.pending.is_some() && !s.drafts.is_empty() {
                feed.extend_from_slice(&s.drafts);
                *want = Logits::All;
            }
        }
        if plan.iter().all(|(t, _)| t.is_empty()) {
            return;
        }
        // Only steps that decode and prefill nothing are timed for the payoff.
        let decode_only = self
            .active
            .iter()
            .zip(&plan)
            .all(|(s, (fed, _))| fed.is_empty() || s.pending.is_some());
        let guessed = self.active.iter().any(|s| !s.drafts.is_empty());
        let result = {
            let mut batch: Vec<BatchSeq<'_>> = self
                .active
                .iter_mut()
                .zip(&plan)
                .map(|(s, (tokens, want))| BatchSeq {
                    tokens,
                    cache: &mut s.cache,
                    want: *want,
                })
                .collect();
            self.m
                .model
                .forward_batch_into(&self.m.pool, &mut batch, &mut self.logits)
        };
        self.stats.steps.fetch_add(1, Ordering::Relaxed);
        if let Err(e) = result {
            for s in &mut self.active {
                s.send(Event::Failed(e.to_string()));
                s.done = true;
            }
            self.retire();
            return;
        }
        let tok = &self.m.tokenizer;
        for (s, (fed, _)) in self.active.iter_mut().zip(plan) {
            s.tokens.extend_from_slice(&fed);
            s.pending = None;
            if !s.done && s.prefilling() && !fed.is_empty() {
                let (done, total) = (s.tokens.len(), s.job.prompt.len());
                s.send(Event::Prefill { done, total });
            }
        }
        // Sampling (a pass or more over the vocabulary per sequence, and a
        // JSON-schema mask where one is set) runs on the pool's threads,
        // which would otherwise wait for the next step.
        type Sampling<'a> = Mutex<(&'a mut Seq, &'a mut [f32], Option<Round>)>;
        let work: Vec<Sampling> = self
            .active
            .iter_mut()
            .zip(self.logits.slices_mut())
            .filter(|(s, lg)| !s.done && !lg.is_empty())
            .map(|(s, lg)| Mutex::new((s, lg, None)))
            .collect();
        self.m.pool.for_chunks(work.len(), 1, &|range| {
            for w in &work[range] {
                let mut g = w.lock().unwrap_or_else(|e| e.into_inner());
                let (s, lg, st) = &mut *g;
                *st = Some(s.sample(tok, lg));
            }
        });
        // The step's time: the forward pass and the sampling (and the draft's
        // proposals, but not its catching up after a pause).
        let secs = (started.elapsed().as_secs_f64() - catching_up).max(0.0);
        let mut sampled = 0;
        // A sequence decoding alone times its own passes and proposals, and
        // chooses how many to propose from them (`AdaptiveK`), as `hanlin
        // run` does; in a batch its rows have no time of their own.
        let alone = decode_only && work.len() == 1;
        for w in work {
            let (s, _, st) = w.into_inner().unwrap_or_else(|e| e.into_inner());
            let Some(st) = st else { continue };
            if let (true, Some(g)) = (alone, &mut s.guess) {
                g.k.pass(1 + s.drafts.len(), (secs - draft_secs).max(0.0));
                g.k.proposing(s.drafts.len(), draft_secs);
            }
            sampled += st.rows.len();
            let stats = &self.stats;
            stats
                .generated_tokens
                .fetch_add(st.rows.len() as u64, Ordering::Relaxed);
            let (proposed, accepted) = if s.drafted {
                (&stats.draft_proposed_tokens, &stats.draft_accepted_tokens)
            } else {
                (&stats.proposed_tokens, &stats.accepted_tokens)
            };
            proposed.fetch_add(st.proposed as u64, Ordering::Relaxed);
            accepted.fetch_add(st.accepted as u64, Ordering::Relaxed);
            // An event per sampled row, as plain decoding sends them: a
            // reader that stops at some text (a tool loop at a repeated
            // call) then stops at the same token whether or not guesses
            // were checked with it.
            let last = st.rows.len().saturating_sub(1);
            for (j, row) in st.rows.into_iter().enumerate() {
                let lps = s.dec.lps[s.lps_sent..row.logprobs].to_vec();
                s.lps_sent = row.logprobs;
                let tokens = row.tokens - s.tokens_sent;
                let end = j == last && st.finish.is_some();
                if !row.text.is_empty() || !lps.is_empty() || (tokens > 0 && end) {
                    s.tokens_sent = row.tokens;
                    s.send(Event::Token {
                        text: row.text,
                        tokens,
                        logprobs: lps,
                    });
                }
            }
            match (st.finish, st.feed) {
                (Some(finish), _) => {
                    let done = Event::Done {
                        finish,
                        prompt_tokens: s.job.prompt.len(),
                        cached_tokens: s.cached,
                        completion_tokens: s.dec.out.len(),
                    };
                    s.send(done);
                    s.done = true;
                }
                (None, feed) => s.pending = feed,
            }
        }
        self.steps += 1;
        if decode_only && sampled > 0 {
            if guessed {
                self.payoff.round(secs, sampled, self.steps);
            } else {
                self.payoff.plain_step(secs / sampled as f64);
            }
        }
        self.retire();
    }

    /// How a new sequence guesses: prompt lookup when it is on, then the
    /// draft model when there is one, from `prefix` (the draft's cache of a
    /// prefix of the sequence's tokens) when one was found.
    fn guesser(&self, prefix: Option<DraftCache>) -> Option<Guess> {
        let lookup = (self.cfg.lookup != Lookup::Off).then(PromptLookup::default);
        let draft = self.draft.as_ref().map(|d| {
            prefix.unwrap_or_else(|| {
                let c = &d.model.cfg;
                let ctx = self.cfg.ctx.min(c.context_length);
                DraftCache {
                    cache: KvCache::counted(KvShape::of(c), ctx, self.draft_blocks.clone()),
                    off: 0,
                }
            })
        });
        (lookup.is_some() || draft.is_some()).then(|| Guess {
            lookup,
            draft,
            k: AdaptiveK::default(),
        })
    }

    /// The draft model's part of a step: each sequence allotted guesses
    /// (`allot`) has its draft cache catch up on the tokens its target took
    /// (up to a prefill chunk in all), then gets up to that many greedy
    /// proposals in `drafts`, in rounds of one batched pass. A draft
    /// pass that fails (it never should) ends guessing with the draft.
    /// Returns the seconds its first pass took when that pass caught a
    /// sequence's draft up on more than the token or two a round leaves
    /// (after the prompt, or after plain steps while guessing did not pay):
    /// a cost of the pause, which the payoff's clock leaves out, as
    /// [`Proposer::catch_up`](crate::speculative::Proposer::catch_up) is
    /// for `hanlin run` (else each resumption looked too costly, and
    /// guessing stayed off).
    fn propose_with_draft(&mut self, allot: &[usize]) -> f64 {
        let Some(dm) = self.draft.clone() else {
            return 0.0;
        };
        let started = Instant::now();
        let mut resumed = false;
        let mut catching_up = 0.0;
        let vocab = self.m.model.cfg.vocab_size;
        let mut budget = self.cfg.prefill_chunk;
        // Round 0 catches up and feeds the pending token; each later round
        // feeds the previous round's proposal.
        let mut feeds: Vec<(usize, Vec<u32>, Logits)> = Vec::new();
        for (s, _) in self.active.iter_mut().zip(allot).filter(|(_, &a)| a > 0) {
            s.draft_window();
        }
        for (i, s) in self.active.iter().enumerate() {
            let Some(Guess {
                draft: Some(dc), ..
            }) = &s.guess
            else {
                continue;
            };
            // Only a sequence that is to guess now catches up (a plain
            // step, when guessing does not pay, costs no draft pass; the
            // lag is fed in one pass later).
            if allot[i] == 0 {
                continue;
            }
            let lag = s.draft_lag();
            let n = lag.len().min(budget);
            let mut feed = lag[..n].to_vec();
            let mut want = Logits::None;
            if let (true, Some(id)) = (n == lag.len(), s.pending) {
                feed.push(id);
                want = draft_logits(&s.tokens, vocab);
            }
            if feed.is_empty() || dc.cache.len() + feed.len() + allot[i] > dc.cache.capacity() {
                continue;
            }
            budget -= n;
            resumed |= n > 1;
            self.stats
                .draft_caught_up_tokens
                .fetch_add(n as u64, Ordering::Relaxed);
            feeds.push((i, feed, want));
        }
        while !feeds.is_empty() {
            let result = {
                let mut batch = Vec::with_capacity(feeds.len());
                let mut rest = self.active.iter_mut().enumerate();
                for (i, feed, want) in &feeds {
                    let cache = rest
                        .find(|(j, _)| j == i)
                        .and_then(|(_, s)| s.guess.as_mut())
                        .and_then(|g| g.draft.as_mut())
                        .map(|d| &mut d.cache);
                    if let Some(cache) = cache {
                        batch.push(BatchSeq {
                            tokens: feed,
                            cache,
                            want: *want,
                        });
                    }
                }
                dm.model
                    .forward_batch_into(&self.m.pool, &mut batch, &mut self.logits)
            };
            if let Err(e) = result {
                tracing::warn!("the draft model failed ({e}); guessing without it");
                self.draft = None;
                for (s, &a) in self.active.iter_mut().zip(allot) {
                    if a > 0 {
                        s.drafts.clear();
                    }
                    if let Some(g) = &mut s.guess {
                        g.draft = None;
                    }
                }
                return catching_up;
            }
            if resumed {
                catching_up = started.elapsed().as_secs_f64();
                resumed = false;
            }
            let mut next = Vec::new();
            for ((i, _, want), lg) in feeds.iter().zip(self.logits.iter()) {
                if *want == Logits::None || lg.is_empty() {
                    continue;
                }
                let s = &mut self.active[*i];
                let id = crate::sampler::argmax(lg);
                if id as usize >= vocab {
                    continue;
                }
                s.drafts.push(id);
                s.drafted = true;
                if s.drafts.len() < allot[*i] {
                    next.push((*i, vec![id], *want));
                }
            }
            feeds = next;
        }
        catching_up
    }

    /// Move finished (or abandoned) sequences' caches into the prefix pool.
    fn retire(&mut self) {
        let mut i = 0;
        while i < self.active.len() {
            if self.active[i].done {
                let s = self.active.swap_remove(i);
                let draft = s.guess.and_then(|g| g.draft);
                self.pool_insert(Cached {
                    tokens: s.tokens,
                    cache: s.cache,
                    draft,
                });
            } else {
                i += 1;
            }
        }
        let mut total: usize = self.pool.iter().map(|p| p.tokens.len()).sum();
        while total > self.cfg.prefix_pool_tokens {
            match self.pool.pop_front() {
                Some(p) => total -= p.tokens.len(),
                None => break,
            }
        }
    }

    /// Keep a finished sequence's cache for later prefixes, unless a pooled
    /// entry already covers it; entries it covers are dropped (their blocks
    /// live on in it).
    fn pool_insert(&mut self, entry: Cached) {
        let tokens = &entry.tokens;
        if tokens.is_empty()
            || self
                .pool
                .iter()
                .any(|p| p.tokens.len() >= tokens.len() && p.tokens[..tokens.len()] == tokens[..])
        {
            return;
        }
        self.pool.retain(|p| {
            !(p.tokens.len() < tokens.len() && tokens[..p.tokens.len()] == p.tokens[..])
        });
        self.pool.push_back(entry);
    }

    fn publish(&self) {
        let st = &self.stats;
        st.active.store(self.active.len(), Ordering::Relaxed);
        st.kv_tokens.store(
            self.active.iter().map(|s| s.cache.len()).sum(),
            Ordering::Relaxed,
        );
        st.pool_tokens.store(
            self.pool.iter().map(|p| p.tokens.len()).sum(),
            Ordering::Relaxed,
        );
        let c = &self.m.model.cfg;
        let drafts = self.draft.as_ref().map_or(0, |d| {
            let c = &d.model.cfg;
            self.draft_blocks.live() * KvCache::block_bytes(KvShape::of(c))
        });
        st.kv_bytes.store(
            self.blocks.live() * KvCache::block_bytes(KvShape::of(c)) + drafts,
            Ordering::Relaxed,
        );
    }
}
