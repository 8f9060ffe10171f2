//! Speculative decoding: a cheap proposer guesses the tokens that follow,
//! and the target model checks all of them in one forward pass.
//!
//! Proposals are deterministic (a draft model's greedy choices, or tokens
//! copied from an earlier occurrence of the last n-gram: prompt lookup).
//! The target samples each verified position exactly as plain decoding
//! would — same sampler, same random draws — and keeps the proposals only
//! while its own choice equals them; the first position where it differs
//! gives the corrected token and ends the round. With a proposal that is a
//! point mass this *is* the standard accept/reject rule (accept `x` with
//! probability `p(x)`, otherwise draw from `p` without `x`), so the output
//! has the target's distribution; and since the draws are the same, a
//! given seed gives the same tokens as decoding without a proposer, greedy
//! or sampled — as long as the verify pass computes the same logits as
//! one-token steps, bit for bit (`tests/speculative.rs` checks it).

use crate::generate::{Decoder, FinishReason, LoadedModel};
use crate::kv::KvCache;
use crate::{EngineError, Session};
use hanlin_tokenizer::Tokenizer;
use std::sync::Arc;

/// What one round of sampling gave (see [`verify`]).
#[derive(Debug, Default)]
pub struct Round {
    /// Text that became final this round.
    pub text: String,
    /// Set when the sequence is finished (or `on_text` stopped it).
    pub finish: Option<FinishReason>,
    /// The token to feed next when the sequence goes on.
    pub feed: Option<u32>,
    /// How many of the fed tokens stay: the KV cache and the token list
    /// are to be cut back to this length.
    pub held: usize,
    /// Rows sampled; proposals checked (those after a finish count
    /// neither way) and kept.
    pub sampled: usize,
    pub proposed: usize,
    pub accepted: usize,
}

/// Sample one round: `logits` holds a row per token fed this round (the
/// last sampled token, then the proposals `drafts`), and `tokens` every
/// token fed so far, proposals included. Each row is sampled exactly as
/// plain decoding would sample it; proposals are kept while they equal
/// those samples, and the first row that differs (or the one past the
/// last proposal) gives the token to feed next. `on_text` gets each row's
/// final text; returning false cancels.
pub fn verify(
    dec: &mut Decoder,
    tok: &Tokenizer,
    logits: &mut [f32],
    drafts: &[u32],
    tokens: &[u32],
    capacity: usize,
    on_text: &mut dyn FnMut(&str) -> bool,
) -> Round {
    let rows = drafts.len() + 1;
    let vocab = logits.len() / rows;
    let base = tokens.len() - drafts.len();
    let mut round = Round::default();
    for (j, row) in logits.chunks_exact_mut(vocab.max(1)).enumerate() {
        let held = base + j;
        let step = dec.next(tok, row, &tokens[..held], held >= capacity);
        round.sampled += 1;
        round.held = held;
        let cancelled = !step.text.is_empty() && !on_text(&step.text);
        round.text.push_str(&step.text);
        let finish = if cancelled {
            Some(FinishReason::Cancelled)
        } else {
            step.finish
        };
        if finish.is_none() && j < drafts.len() && step.feed == Some(drafts[j]) {
            round.accepted += 1;
            continue;
        }
        // A finish mid-round leaves the later proposals unchecked.
        round.proposed = if finish.is_some() {
            round.accepted
        } else {
            drafts.len()
        };
        (round.finish, round.feed) = (finish, step.feed);
        return round;
    }
    round
}

/// How many proposals may follow the next token `id`: the positions the
/// cache has left and the tokens `max_tokens` allows after `generated`
/// (`id` takes one of each).
pub fn room(cache: &KvCache, max_tokens: usize, generated: usize) -> usize {
    cache
        .capacity()
        .saturating_sub(cache.len() + 1)
        .min(max_tokens.saturating_sub(generated + 1))
}

/// What `p` proposes to follow `tokens` and then `id`: up to `k`'s number,
/// never more than `room` (none when it is 0).
pub fn propose_after(
    p: &mut (dyn Proposer + '_),
    tokens: &[u32],
    id: u32,
    k: &AdaptiveK,
    room: usize,
) -> Result<Vec<u32>, EngineError> {
    if room == 0 {
        return Ok(Vec::new());
    }
    let mut context = Vec::with_capacity(tokens.len() + 1);
    context.extend_from_slice(tokens);
    context.push(id);
    let mut d = p.propose(&context, k.snapped().min(room))?;
    d.truncate(room);
    Ok(d)
}

/// Guesses the tokens that follow a context.
pub trait Proposer: Send {
    /// Up to `k` tokens likely to follow `context` (every token of the
    /// sequence so far).
    fn propose(&mut self, context: &[u32], k: usize) -> Result<Vec<u32>, EngineError>;

    /// Bring any state the proposer keeps up to `context`, before proposing
    /// resumes after the prompt or a pause. This is a cost of having
    /// paused, not of the next round, so callers keep it out of the
    /// round's time ([`Payoff`]): a draft model's catch-up on a prompt or
    /// on 64 tokens decoded without it is a prefill many steps long, and
    /// counted in the round it made proposals look too costly each time
    /// they resumed (so they were switched off for good).
    fn catch_up(&mut self, _context: &[u32]) -> Result<(), EngineError> {
        Ok(())
    }
}

/// A smaller model with the same vocabulary, decoding greedily. Its cache
/// follows the accepted tokens: each round re-feeds only what differs.
pub struct DraftModel {
    session: Session,
}

impl DraftModel {
    /// `draft` proposing for `target`; refused when their vocabularies
    /// differ (a draft's token ids must mean the same text).
    pub fn new(
        draft: &Arc<LoadedModel>,
        draft_name: &str,
        target: &LoadedModel,
        target_name: &str,
        ctx: usize,
    ) -> Result<Self, EngineError> {
        same_vocabulary(draft, draft_name, target, target_name)?;
        Ok(Self {
            session: draft.new_session(ctx),
        })
    }
}

/// Refuses a draft whose vocabulary differs from the target's (a draft's
/// token ids must mean the same text), naming both models.
pub fn same_vocabulary(
    draft: &LoadedModel,
    draft_name: &str,
    target: &LoadedModel,
    target_name: &str,
) -> Result<(), EngineError> {
    let (dt, tt) = (&draft.tokenizer, &target.tokenizer);
    let same = dt.vocab_size() == tt.vocab_size()
        && (0..dt.vocab_size() as u32)
            .step_by(97)
            .all(|id| dt.token_bytes(id, true) == tt.token_bytes(id, true));
    if same {
        Ok(())
    } else {
        Err(EngineError::BadModel(format!(
            "the draft model {draft_name} ({} tokens) does not share the vocabulary of {target_name} ({} tokens); a draft must use the same tokenizer",
            dt.vocab_size(),
            tt.vocab_size()
        )))
    }
}

impl Proposer for DraftModel {
    fn catch_up(&mut self, context: &[u32]) -> Result<(), EngineError> {
        if !context.is_empty() && context.len() < self.session.cache.capacity() {
            self.session.prefill(context)?;
        }
        Ok(())
    }

    fn propose(&mut self, context: &[u32], k: usize) -> Result<Vec<u32>, EngineError> {
        let room = self.session.cache.capacity();
        if k == 0 || context.is_empty() || context.len() + k > room {
            return Ok(Vec::new());
        }
        let (logits, _) = self.session.prefill(context)?;
        let mut out = vec![crate::sampler::argmax(&logits)];
        while out.len() < k {
            let logits = self.session.step(out[out.len() - 1])?;
            out.push(crate::sampler::argmax(&logits));
        }
        Ok(out)
    }
}

/// Prompt lookup: the tokens that followed the most recent earlier
/// occurrence of the context's last n-gram (longest n first). Free to run,
/// and strong where the answer quotes its prompt (grounded answers, edits
/// of given code).
pub struct PromptLookup {
    pub max_ngram: usize,
    pub min_ngram: usize,
}

impl Default for PromptLookup {
    fn default() -> Self {
        Self {
            max_ngram: 4,
            min_ngram: 2,
        }
    }
}

impl Proposer for PromptLookup {
    fn propose(&mut self, context: &[u32], k: usize) -> Result<Vec<u32>, EngineError> {
        let n_ctx = context.len();
        for n in (self.min_ngram..=self.max_ngram).rev() {
            if n_ctx <= n {
                continue;
            }
            let tail = &context[n_ctx - n..];
            // The latest earlier occurrence that has something after it.
            if let Some(start) = (0..n_ctx - n).rev().find(|&s| &context[s..s + n] == tail) {
                let from = start + n;
                let end = (from + k).min(n_ctx);
                if end > from {
                    return Ok(context[from..end].to_vec());
                }
            }
        }
        Ok(Vec::new())
    }
}

/// How many tokens to propose next: one more after a round that accepted
/// everything, fewer after one that accepted nothing.
#[derive(Debug, Clone)]
pub struct AdaptiveK {
    pub k: usize,
    pub min: usize,
    pub max: usize,
}

impl Default for AdaptiveK {
    fn default() -> Self {
        Self {
            k: 3,
            min: 1,
            max: 7,
        }
    }
}

impl AdaptiveK {
    pub fn update(&mut self, proposed: usize, accepted: usize) {
        if proposed == 0 {
            return;
        }
        if accepted == proposed {
            self.k = (self.k + 1).min(self.max);
        } else if accepted == 0 {
            self.k = self.k.saturating_sub(1).max(self.min);
        }
    }

    /// The number to propose: the verify pass feeds `k + 1` tokens, and the
    /// multi-token kernels work in groups of four (a pass of 5 tokens costs
    /// what one of 8 does), so `k + 1` is rounded down to a multiple of four
    /// when it is not below four.
    pub fn snapped(&self) -> usize {
        let rows = self.k + 1;
        if rows < 4 {
            self.k
        } else {
            rows / 4 * 4 - 1
        }
    }
}

/// Whether proposing pays, measured as it goes: seconds per generated
/// token with proposals and without. Its clock (`generated`) is a count
/// that grows as decoding goes: tokens for one sequence, steps for the
/// scheduler's batch. When verifying costs more than it
/// saves — a machine whose multi-token passes are compute-bound, a draft
/// that is seldom right — proposals stop, and are tried again later.
#[derive(Debug, Clone)]
pub struct Payoff {
    plain: Option<f64>,
    spec: Option<f64>,
    rounds: usize,
    /// Generated-token count before which no proposal is made.
    off_until: usize,
    /// How long the next switch-off lasts: [`OFF_FOR`], doubled each time
    /// proposals are switched off again without having paid in between
    /// (up to [`OFF_MAX`]), so a machine where they never pay soon tries
    /// seldom.
    off_for: usize,
    /// Times proposals were switched off.
    pub switched_off: usize,
}

/// Plain steps measured before the first proposal.
const WARM: usize = 4;
/// Rounds measured before proposals may be switched off.
const JUDGE_AFTER: usize = 4;
/// Tokens decoded plainly after switching off, before trying again.
const OFF_FOR: usize = 64;
/// The longest switch-off.
const OFF_MAX: usize = 4096;

impl Default for Payoff {
    fn default() -> Self {
        Self {
            plain: None,
            spec: None,
            rounds: 0,
            off_until: WARM,
            off_for: OFF_FOR,
            switched_off: 0,
        }
    }
}

fn ema(old: Option<f64>, x: f64) -> Option<f64> {
    Some(match old {
        None => x,
        Some(o) => 0.7 * o + 0.3 * x,
    })
}

impl Payoff {
    /// Whether to propose when `generated` tokens have been generated.
    pub fn propose(&self, generated: usize) -> bool {
        generated >= self.off_until && self.plain.is_some()
    }

    /// One plain step took `secs`.
    pub fn plain_step(&mut self, secs: f64) {
        self.plain = ema(self.plain, secs);
    }

    /// A round (proposing and verifying) took `secs` and produced `tokens`
    /// tokens; `generated`: the count after it.
    pub fn round(&mut self, secs: f64, tokens: usize, generated: usize) {
        self.spec = ema(self.spec, secs / tokens.max(1) as f64);
        self.rounds += 1;
        if let (Some(p), Some(s)) = (self.plain, self.spec) {
            if self.rounds >= JUDGE_AFTER && s > p {
                self.off_until = generated + self.off_for;
                self.off_for = (2 * self.off_for).min(OFF_MAX);
                self.spec = None;
                self.rounds = 0;
                self.switched_off += 1;
            } else if self.rounds >= JUDGE_AFTER {
                self.off_for = OFF_FOR;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prompt_lookup_copies_what_followed_the_last_ngram() {
        let mut p = PromptLookup::default();
        // "... 5 6 7 8 9 ... 5 6 7" → propose "8 9 …".
        let ctx = [1, 5, 6, 7, 8, 9, 10, 2, 3, 5, 6, 7];
        assert_eq!(p.propose(&ctx, 3).expect("ok"), vec![8, 9, 10]);
        // Nothing repeats: no proposal.
        assert!(p.propose(&[1, 2, 3, 4], 3).expect("ok").is_empty());
        // Bounded by what the context holds after the match.
        assert_eq!(p.propose(&[4, 5, 9, 4, 5], 8).expect("ok"), vec![9, 4, 5]);
    }

    #[test]
    fn k_adapts_in_groups_of_four_rows() {
        let mut k = AdaptiveK::default();
        assert_eq!(k.snapped(), 3);
        k.update(3, 3);
        assert_eq!((k.k, k.snapped()), (4, 3));
        for _ in 0..5 {
            k.update(4, 4);
        }
        assert_eq!((k.k, k.snapped()), (7, 7));
        k.update(7, 0);
        k.update(6, 0);
        k.update(5, 0);
        k.update(4, 0);
        assert_eq!((k.k, k.snapped()), (3, 3));
        k.update(3, 0);
        assert_eq!((k.k, k.snapped()), (2, 2));
    }

    #[test]
    fn proposals_stop_when_they_cost_more_than_they_save() {
        let mut p = Payoff::default();
        assert!(!p.propose(0), "plain steps are measured first");
        for _ in 0..WARM {
            p.plain_step(0.040);
        }
        assert!(p.propose(WARM));
        // Rounds of 0.1 s for 2 tokens: 50 ms a token, worse than 40.
        for i in 0..JUDGE_AFTER {
            assert!(p.propose(WARM + 2 * i));
            p.round(0.1, 2, WARM + 2 * (i + 1));
        }
        assert_eq!(p.switched_off, 1);
        let now = WARM + 2 * JUDGE_AFTER;
        assert!(!p.propose(now));
        assert!(p.propose(now + OFF_FOR));
        // Rounds that pay keep going.
        let mut now = now + OFF_FOR;
        for _ in 0..10 {
            now += 4;
            p.round(0.1, 4, now);
        }
        assert_eq!(p.switched_off, 1);
        // Costly again: off for OFF_FOR once more (they paid in between),
        // then for twice as long when they cost more at the next try too.
        while p.switched_off == 1 {
            now += 1;
            p.round(0.1, 1, now);
        }
        assert!(!p.propose(now + OFF_FOR - 1) && p.propose(now + OFF_FOR));
        now += OFF_FOR;
        for _ in 0..JUDGE_AFTER {
            now += 1;
            p.round(0.1, 1, now);
        }
        assert_eq!(p.switched_off, 3);
        assert!(!p.propose(now + 2 * OFF_FOR - 1) && p.propose(now + 2 * OFF_FOR));
    }
}
