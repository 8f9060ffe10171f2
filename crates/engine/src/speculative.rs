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
use crate::model::Logits;
use crate::{EngineError, Session};
use hanlin_tokenizer::Tokenizer;
use std::sync::Arc;

/// What one round of sampling gave (see [`verify`]).
#[derive(Debug, Default)]
pub struct Round {
    /// Set when the sequence is finished (or `on_text` stopped it).
    pub finish: Option<FinishReason>,
    /// The token to feed next when the sequence goes on.
    pub feed: Option<u32>,
    /// How many of the fed tokens stay: the KV cache and the token list
    /// are to be cut back to this length.
    pub held: usize,
    /// Proposals checked (those after a finish count neither way) and
    /// kept.
    pub proposed: usize,
    pub accepted: usize,
    /// Each sampled row's part: its text and the decoder's token and
    /// log-probability counts after it, so that a caller can report a
    /// round row by row, as plain decoding would (what a reader of the
    /// events decides after each piece then cannot depend on how many
    /// guesses a round checked).
    pub rows: Vec<RowPart>,
}

/// One sampled row of a [`Round`].
#[derive(Debug, Default)]
pub struct RowPart {
    /// Text that became final at this row.
    pub text: String,
    /// The decoder's `out` and `lps` lengths after this row.
    pub tokens: usize,
    pub logprobs: usize,
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
        round.held = held;
        let cancelled = !step.text.is_empty() && !on_text(&step.text);
        round.rows.push(RowPart {
            text: step.text,
            tokens: dec.out.len(),
            logprobs: dec.lps.len(),
        });
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

/// What `p` proposes to follow `tokens` and then `id`: never more than
/// `n` (the smaller of [`AdaptiveK::next`] and [`room`]; none when it is 0).
pub fn propose_after(
    p: &mut (dyn Proposer + '_),
    tokens: &[u32],
    id: u32,
    n: usize,
) -> Result<Vec<u32>, EngineError> {
    if n == 0 {
        return Ok(Vec::new());
    }
    let mut context = Vec::with_capacity(tokens.len() + 1);
    context.extend_from_slice(tokens);
    context.push(id);
    let mut d = p.propose(&context, n)?;
    d.truncate(n);
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
/// It reads the context from [`Self::off`] on: when it would have to catch
/// up on more than [`DRAFT_WINDOW`] tokens (a long prompt, or a long pause),
/// it starts afresh on the last [`DRAFT_WINDOW`] of them.
pub struct DraftModel {
    session: Session,
    /// Where in the context the draft's tokens start.
    off: usize,
}

/// The most tokens a draft catches up on at once; a longer lag starts the
/// draft afresh on this many of the latest tokens. Catching up costs a
/// prefill of the draft (0.44 of the target's per token for the 0.5B
/// draft of the 1.5B model): on a 4,441-token prompt the whole of it took
/// the 1.5B model's time to first token from 50.3 to 62.2 s (AMD Zen 3, 2
/// threads). The guesses are checked by the target whatever the draft
/// read, so the window costs only acceptance, and what a draft guesses
/// well is the local continuation (quotes of the distant prompt are prompt
/// lookup's).
pub const DRAFT_WINDOW: usize = 256;

/// Where a draft that holds `held` tokens from `off` on should start, to
/// follow a context of `len` tokens: `off` while it lags by at most
/// [`DRAFT_WINDOW`] tokens, else the last [`DRAFT_WINDOW`] of the context.
pub fn draft_start(off: usize, held: usize, len: usize) -> usize {
    if off > len || len - off - held.min(len - off) > DRAFT_WINDOW {
        len.saturating_sub(DRAFT_WINDOW)
    } else {
        off
    }
}

/// The ids a draft proposes from while the text stays within them: the
/// first of the vocabulary. Byte-pair and SentencePiece vocabularies list
/// their tokens roughly by frequency, and a large vocabulary's output
/// matrix is much of a small draft's bytes: the 0.5B Qwen model's 151,936
/// rows are 145 of its 491 MB, and a draft step over the first 65,536
/// rows ran 1.2× faster (AMD Zen 5, 2 threads). Its greedy choice agreed
/// with the 1.5B target's 0.2–2 points less often on English and code.
pub const SHORT_LIST: usize = 65_536;
/// Of the last [`SHORT_LIST_WINDOW`] tokens of the context, how many may
/// lie outside the short list before the draft proposes from the whole
/// vocabulary again (Qwen's Chinese tokens are ids 98,000–124,000: a
/// Chinese answer leaves the list at once, and code with Chinese comments
/// after a few lines).
pub const SHORT_LIST_MISSES: usize = 4;
/// How many of the context's last tokens [`draft_logits`] looks at.
pub const SHORT_LIST_WINDOW: usize = 64;

/// What logits a draft model proposing after `context` needs: those of the
/// [`SHORT_LIST`] while the recent tokens lie in it and the vocabulary
/// (`vocab`) is at least twice as large, else all of them.
pub fn draft_logits(context: &[u32], vocab: usize) -> Logits {
    let recent = &context[context.len().saturating_sub(SHORT_LIST_WINDOW)..];
    let outside = recent.iter().filter(|&&t| t as usize >= SHORT_LIST).count();
    if vocab >= 2 * SHORT_LIST && outside <= SHORT_LIST_MISSES {
        Logits::LastFirst(SHORT_LIST)
    } else {
        Logits::Last
    }
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
            off: 0,
        })
    }

    /// Where in the context the draft's tokens start (0 until it has had
    /// to start afresh on the latest [`DRAFT_WINDOW`] tokens).
    pub fn start(&self) -> usize {
        self.off
    }

    /// The part of `context` the draft reads ([`Self::off`] moved on
    /// first when it would lag by more than [`DRAFT_WINDOW`] tokens).
    fn window<'c>(&mut self, context: &'c [u32]) -> &'c [u32] {
        let off = self.off.min(context.len());
        let held = self
            .session
            .tokens()
            .iter()
            .zip(&context[off..])
            .take_while(|(a, b)| a == b)
            .count();
        self.off = draft_start(self.off, held, context.len());
        &context[self.off..]
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
        let seen = self.window(context);
        if !seen.is_empty() && seen.len() < self.session.cache.capacity() {
            self.session.prefill(seen)?;
        }
        Ok(())
    }

    fn propose(&mut self, context: &[u32], k: usize) -> Result<Vec<u32>, EngineError> {
        let room = self.session.cache.capacity();
        let want = draft_logits(context, self.session.model().model.cfg.vocab_size);
        let seen = self.window(context);
        if k == 0 || seen.is_empty() || seen.len() + k > room {
            return Ok(Vec::new());
        }
        let (logits, _) = self.session.prefill_for(seen, want)?;
        let mut out = vec![crate::sampler::argmax(&logits)];
        while out.len() < k {
            let logits = self.session.step_for(out[out.len() - 1], want)?;
            out.push(crate::sampler::argmax(&logits));
        }
        Ok(out)
    }
}

/// Prompt lookup first, and the draft model when lookup has nothing (as
/// the server's scheduler guesses): a guess copied from the prompt costs
/// nothing to make, a draft's a pass over the draft's weights each. The
/// draft's cache follows along: its next proposal first feeds what lookup's
/// kept guesses added.
pub struct LookupThenDraft {
    pub lookup: PromptLookup,
    pub draft: DraftModel,
}

impl Proposer for LookupThenDraft {
    fn catch_up(&mut self, context: &[u32]) -> Result<(), EngineError> {
        self.draft.catch_up(context)
    }

    fn propose(&mut self, context: &[u32], k: usize) -> Result<Vec<u32>, EngineError> {
        let copied = self.lookup.propose(context, k)?;
        if copied.is_empty() {
            self.draft.propose(context, k)
        } else {
            Ok(copied)
        }
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

/// How many tokens to propose next.
///
/// Where rounds are timed (`hanlin run`, and a sequence decoding alone in
/// `hanlin serve`: [`Self::pass`] and [`Self::proposing`]), `k` is chosen from what they measured: the
/// acceptance rate α of this proposer on this sequence, the seconds a
/// proposal takes (a draft model's pass; next to nothing for prompt
/// lookup) and the seconds a pass of the model over `n` rows takes. A
/// round of `k` proposals gives (1 − α^(k+1)) / (1 − α) tokens on average
/// for `k` proposals and a pass of `k + 1` rows, and the `k` that gives the
/// most tokens a second is proposed. A pass over a row count not yet
/// timed is guessed a little cheaper than it is likely to be, so it is
/// tried once and then known; only one row past the widest timed pass is
/// tried at a time. With the 1.5B Qwen model and its 0.5B draft on two
/// cores of an AMD Zen 5, passes of 2, 3, 4 and 5 rows took 1.2, 1.45, 1.7
/// and 2.4 single steps and a proposal 0.4: one to three proposals pay
/// and seven lose, which no rule on acceptance alone can see.
///
/// Where nothing is timed (the server's batch, where a sequence's extra
/// rows have no time of their own), the rule is on acceptance alone: one
/// more after a round that accepted everything, one fewer after a round
/// that accepted nothing, snapped to groups of four rows ([`Self::snapped`]).
#[derive(Debug, Clone)]
pub struct AdaptiveK {
    pub k: usize,
    pub min: usize,
    pub max: usize,
    /// Proposals kept, and rounds that ended on a rejected one, both
    /// decayed by [`FORGET`] each round: α ≈ kept / (kept + missed).
    kept: f64,
    missed: f64,
    /// Seconds of a pass over `n` rows, at `n - 1` (exponential averages).
    pass: [Option<f64>; MAX_ROWS],
    /// Seconds per proposed token.
    per_proposal: Option<f64>,
}

/// The most rows a timed pass is kept for (`max + 1` at most).
const MAX_ROWS: usize = 8;
/// How much of the acceptance counts each round keeps.
const FORGET: f64 = 0.9;

impl Default for AdaptiveK {
    fn default() -> Self {
        Self {
            k: 3,
            min: 1,
            max: 7,
            // A prior worth four proposals, three of them kept.
            kept: 3.0,
            missed: 1.0,
            pass: [None; MAX_ROWS],
            per_proposal: None,
        }
    }
}

impl AdaptiveK {
    /// A round proposed `proposed` tokens and `accepted` of them were kept.
    pub fn update(&mut self, proposed: usize, accepted: usize) {
        if proposed == 0 {
            return;
        }
        self.kept = FORGET * self.kept + accepted as f64;
        self.missed = FORGET * self.missed + f64::from(u8::from(accepted < proposed));
        if accepted == proposed {
            self.k = (self.k + 1).min(self.max);
        } else if accepted == 0 {
            self.k = self.k.saturating_sub(1).max(self.min);
        }
    }

    /// A pass of the model over `rows` rows (a plain step: 1) took `secs`.
    pub fn pass(&mut self, rows: usize, secs: f64) {
        if let Some(p) = rows.checked_sub(1).and_then(|i| self.pass.get_mut(i)) {
            *p = ema(*p, secs);
        }
    }

    /// Making `proposed` proposals took `secs`.
    pub fn proposing(&mut self, proposed: usize, secs: f64) {
        if proposed > 0 {
            self.per_proposal = ema(self.per_proposal, secs / proposed as f64);
        }
    }

    /// The acceptance rate measured so far (per proposal, while the ones
    /// before it were kept).
    pub fn alpha(&self) -> f64 {
        self.kept / (self.kept + self.missed)
    }

    /// How many to propose next: the measured best when passes are timed,
    /// else the acceptance rule's `k`, [`Self::snapped`].
    pub fn next(&self) -> usize {
        // Untimed, or no proposal timed yet: the acceptance rule.
        let (Some(one), Some(per)) = (self.pass[0], self.per_proposal) else {
            return self.snapped();
        };
        let alpha = self.alpha().min(0.999);
        // One row past the widest pass timed so far, at most: a round
        // that tries a wide pass on a guess costs much when the guess is
        // wrong (seven proposals at α = 0.9 where two rows pay).
        let timed = (0..MAX_ROWS)
            .rev()
            .find(|&i| self.pass[i].is_some())
            .unwrap_or(0);
        let max = self.max.min(MAX_ROWS - 1).min(timed + 1);
        let mut best = (self.min, 0.0);
        // The dearest pass timed so far over fewer rows.
        let mut floor = one;
        for k in self.min.max(1)..=max {
            // An untimed pass: a tenth of a step per extra row, and never
            // cheaper than a timed pass over fewer rows.
            let pass = match self.pass[k] {
                Some(p) => p,
                None => (one * (0.9 + 0.1 * (k + 1) as f64)).max(floor),
            };
            floor = floor.max(pass);
            let tokens = (1.0 - alpha.powi(k as i32 + 1)) / (1.0 - alpha);
            let rate = tokens / (k as f64 * per + pass);
            if rate > best.1 {
                best = (k, rate);
            }
        }
        best.0
    }

    /// The acceptance rule's number: the verify pass feeds `k + 1` tokens,
    /// and the multi-token kernels work in groups of four (a pass of 5
    /// tokens costs what one of 8 does), so `k + 1` is rounded down to a
    /// multiple of four when it is not below four.
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
    /// Seconds spent in rounds and the tokens they made, both decayed by
    /// [`ROUND_MEMORY`] each round: their ratio is the cost of a token with
    /// proposals. (An average of each round's own ratio was thrown by one
    /// round whose first proposal was rejected: one token for a round's
    /// time, which switched proposals off at α = 0.9.)
    spent: f64,
    made: f64,
    rounds: usize,
    /// Rounds since the last plain step. Every [`PLAIN_EVERY`] rounds one
    /// step is plain, so that the two costs compared are measured in the
    /// same stretch of time: a virtual machine's speed drifts by a fifth
    /// within seconds, and rounds timed in a slow stretch against plain
    /// steps timed in a fast one switched proposals off that paid.
    since_plain: usize,
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

/// The generated-token count from which proposals may start: the
/// prompt's pass gives the first token, and the first proposal also waits
/// for one timed plain step ([`Payoff::propose`]), so one step is plain.
/// (Four, before: the 1.5B model's grounded answers average ten tokens, so
/// three plain steps were a third of an answer; `bench/speculative.py
/// --grounded`, Zen 3, 1.25–1.39× → 1.43–1.45×.)
const WARM: usize = 1;
/// Rounds measured before proposals may be switched off (after four, a
/// code answer that began with two rejections was switched off for 64
/// tokens at α = 0.85).
const JUDGE_AFTER: usize = 8;
/// Tokens decoded plainly after switching off, before trying again.
const OFF_FOR: usize = 64;
/// The longest switch-off.
const OFF_MAX: usize = 4096;
/// Rounds between plain steps while proposing.
const PLAIN_EVERY: usize = 8;
/// How much of the rounds' time and tokens each round keeps.
const ROUND_MEMORY: f64 = 0.95;

impl Default for Payoff {
    fn default() -> Self {
        Self {
            plain: None,
            spent: 0.0,
            made: 0.0,
            rounds: 0,
            since_plain: 0,
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
        generated >= self.off_until && self.plain.is_some() && self.since_plain < PLAIN_EVERY
    }

    /// How many tokens are generated before the first proposal.
    pub fn first_proposal(&self) -> usize {
        self.off_until
    }

    /// One plain step took `secs`.
    pub fn plain_step(&mut self, secs: f64) {
        self.since_plain = 0;
        self.plain = ema(self.plain, secs);
    }

    /// A round (proposing and verifying) took `secs` and produced `tokens`
    /// tokens; `generated`: the count after it.
    pub fn round(&mut self, secs: f64, tokens: usize, generated: usize) {
        self.since_plain += 1;
        self.spent = ROUND_MEMORY * self.spent + secs;
        self.made = ROUND_MEMORY * self.made + tokens.max(1) as f64;
        self.rounds += 1;
        if let Some(p) = self.plain {
            let s = self.spent / self.made;
            if self.rounds >= JUDGE_AFTER && s > p {
                self.off_until = generated + self.off_for;
                self.off_for = (2 * self.off_for).min(OFF_MAX);
                (self.spent, self.made) = (0.0, 0.0);
                self.rounds = 0;
                self.since_plain = 0;
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
    fn a_draft_starts_afresh_only_when_it_lags_past_its_window() {
        let w = DRAFT_WINDOW;
        // A short prompt: read whole.
        assert_eq!(draft_start(0, 0, w), 0);
        // A long one: its last `w` tokens.
        assert_eq!(draft_start(0, 0, 3 * w), 2 * w);
        // Following along, a token or a window's worth behind: no change.
        assert_eq!(draft_start(2 * w, w, 3 * w + 1), 2 * w);
        assert_eq!(draft_start(2 * w, 0, 3 * w), 2 * w);
        // A pause longer than the window: afresh on the latest tokens.
        assert_eq!(draft_start(2 * w, w, 5 * w), 4 * w);
        // A context cut back before the draft's start (a new branch).
        assert_eq!(draft_start(2 * w, w, w + 5), 5);
    }

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

    /// Timings like a 1.5B target with its 0.5B draft on two cores (AMD
    /// Zen 5): a step 18 ms, passes of 2–5 rows 22, 26, 31, 44 ms, a
    /// proposal 7 ms.
    fn timed(alpha_rounds: &[(usize, usize)]) -> AdaptiveK {
        let mut k = AdaptiveK::default();
        for (rows, ms) in [(1, 18.0), (2, 22.0), (3, 26.0), (4, 31.0), (5, 44.0)] {
            k.pass(rows, ms / 1e3);
        }
        k.proposing(3, 0.021);
        for &(p, a) in alpha_rounds {
            k.update(p, a);
        }
        k
    }

    #[test]
    fn k_is_chosen_from_measured_costs() {
        // Untimed: the acceptance rule (its k starts at 3).
        let mut k = AdaptiveK::default();
        assert_eq!(k.next(), 3);
        for _ in 0..4 {
            k.update(3, 3);
        }
        assert_eq!(k.snapped(), 7);
        // Everything accepted for long: the rule climbs to 7 proposals,
        // but with these costs a round of 7 gives fewer tokens a second
        // than one of 2 or 3 at the same α.
        let k = timed(&[(3, 3); 12]);
        assert!(k.alpha() > 0.9, "{}", k.alpha());
        assert_eq!(k.snapped(), 7);
        let best = k.next();
        assert!((2..=4).contains(&best), "k = {best}");
        // A draft right two times in three: one proposal a round.
        let k = timed(&[(3, 2); 12]);
        assert!((0.62..0.72).contains(&k.alpha()), "{}", k.alpha());
        assert_eq!(k.next(), 1);
        // Free proposals (prompt lookup) at the same α go further.
        let mut free = timed(&[(3, 2); 12]);
        free.per_proposal = Some(0.0);
        assert_eq!(free.next(), 2);
    }

    #[test]
    fn untimed_wide_passes_are_tried_one_row_at_a_time() {
        let mut k = AdaptiveK::default();
        k.pass(1, 0.018);
        k.pass(2, 0.019);
        k.proposing(1, 0.001);
        for _ in 0..20 {
            k.update(1, 1);
        }
        // Only passes of 1 and 2 rows are timed: 3 rows is the widest
        // tried next, however cheap wider ones are guessed to be.
        assert_eq!(k.next(), 2);
        k.pass(3, 0.020);
        assert_eq!(k.next(), 3);
        // A wider pass that proved dear is not chosen again.
        k.pass(4, 0.080);
        assert_eq!(k.next(), 2);
    }

    #[test]
    fn one_rejected_round_among_paying_ones_keeps_proposals_on() {
        // Rounds of 3 tokens for 45 ms (15 ms a token) against plain steps
        // of 18 ms, then a round whose first proposal is rejected: one
        // token for 47 ms. An average of each round's ratio jumped to
        // 0.7 · 15 + 0.3 · 47 = 24.6 ms and switched proposals off.
        let mut p = Payoff::default();
        for _ in 0..WARM {
            p.plain_step(0.018);
        }
        let mut now = WARM;
        for _ in 0..JUDGE_AFTER {
            now += 3;
            p.round(0.045, 3, now);
        }
        now += 1;
        p.round(0.047, 1, now);
        assert_eq!(p.switched_off, 0);
        p.plain_step(0.018);
        assert!(p.propose(now + 1));
    }

    #[test]
    fn proposing_pauses_for_a_plain_step_now_and_then() {
        let mut p = Payoff::default();
        p.plain_step(0.018);
        let mut now = WARM;
        let mut plain = 0;
        for _ in 0..4 * PLAIN_EVERY {
            if p.propose(now) {
                now += 3;
                p.round(0.045, 3, now);
            } else {
                now += 1;
                p.plain_step(0.018);
                plain += 1;
            }
        }
        assert_eq!(plain, 3, "one plain step after each {PLAIN_EVERY} rounds");
        assert_eq!(p.switched_off, 0);
    }

    #[test]
    fn drafts_propose_from_the_short_list_while_the_text_stays_in_it() {
        let big = 151_936;
        let ascii: Vec<u32> = (0..100).map(|i| 100 + i).collect();
        assert_eq!(draft_logits(&ascii, big), Logits::LastFirst(SHORT_LIST));
        // A small vocabulary: all of it.
        assert_eq!(draft_logits(&ascii, 49_152), Logits::Last);
        // Chinese text (ids past the list) in the recent window: all of it.
        let mut mixed = ascii.clone();
        mixed.extend((0..=SHORT_LIST_MISSES as u32).map(|i| 110_000 + i));
        assert_eq!(draft_logits(&mixed, big), Logits::Last);
        // Once the window has moved past it, the list again.
        mixed.extend(&ascii);
        assert_eq!(draft_logits(&mixed, big), Logits::LastFirst(SHORT_LIST));
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
