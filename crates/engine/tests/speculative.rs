//! Speculative decoding on the real models: the verify pass computes the
//! same logits as one-token steps, bit for bit, so a proposer never changes
//! the tokens — greedy or sampled with a seed.

mod common;

use hanlin_engine::speculative::{
    DraftModel, LookupThenDraft, PromptLookup, Proposer, DRAFT_WINDOW, SHORT_LIST,
};
use hanlin_engine::{GenerateParams, LoadedModel, Logits, SamplerConfig};
use hanlin_tokenizer::Message;
use std::sync::Arc;

fn load(name: &str) -> Arc<LoadedModel> {
    LoadedModel::load(&common::model_path(name), hanlin_engine::default_threads()).expect("load")
}

/// Rows of `k` tokens verified at once equal the logits of feeding them
/// one at a time, for every k a round may use, on every model.
#[test]
fn verify_pass_equals_single_steps_bit_for_bit() {
    for name in common::MODELS {
        let m = load(name);
        let prompt = m
            .chat_prompt(&[Message::new("user", "写一个Python函数计算斐波那契数列")])
            .expect("prompt");
        let next: Vec<u32> = m
            .tokenizer
            .encode_plain("def fib(n):\n    if n < 2:\n        return n", false)
            .expect("encode");
        for k in [1, 2, 4, 5, 8, 9] {
            let feed = &next[..k.min(next.len())];
            let mut one = m.new_session(512);
            one.prefill(&prompt).expect("prefill");
            let singles: Vec<Vec<f32>> = feed.iter().map(|&t| one.step(t).expect("step")).collect();
            let mut many = m.new_session(512);
            many.prefill(&prompt).expect("prefill");
            let all = m
                .model
                .forward(&m.pool, feed, &mut many.cache, Logits::All)
                .expect("verify pass");
            let vocab = all.len() / feed.len();
            for (j, (row, single)) in all.chunks_exact(vocab).zip(&singles).enumerate() {
                let differ = row
                    .iter()
                    .zip(single)
                    .filter(|(a, b)| a.to_bits() != b.to_bits())
                    .count();
                assert_eq!(
                    differ, 0,
                    "{name}: k = {k}, row {j}: {differ} logits differ"
                );
            }
        }
    }
}

fn params(max: usize, sampler: SamplerConfig) -> GenerateParams {
    GenerateParams {
        max_tokens: max,
        sampler,
        ..Default::default()
    }
}

#[test]
fn proposers_never_change_the_tokens() {
    let m = load("qwen2.5-coder-0.5b");
    let source = "fn add(a: i32, b: i32) -> i32 {\n    a + b\n}\n\nfn sub(a: i32, b: i32) -> i32 {\n    a - b\n}";
    let prompt = m
        .chat_prompt(&[Message::new(
            "user",
            format!("Rename `add` to `plus` in this code and repeat the whole code:\n\n{source}"),
        )])
        .expect("prompt");
    let sampled = SamplerConfig {
        temperature: 0.8,
        seed: 7,
        ..Default::default()
    };
    // The same model as a draft at 4 bits (as `--draft` loads one).
    let four_bit =
        LoadedModel::load_draft(&common::model_path("qwen2.5-coder-0.5b"), m.pool.clone())
            .expect("load a 4-bit draft");
    for sampler in [SamplerConfig::greedy(), sampled] {
        let p = params(60, sampler);
        let plain = m
            .new_session(1024)
            .generate(&prompt, &p, |_| true)
            .expect("plain");
        // One run of the model with `proposer` guessing.
        let with = |what: &str, proposer: &mut dyn Proposer| {
            m.new_session(1024)
                .generate_with(&prompt, &p, Some(proposer), |_| true)
                .unwrap_or_else(|e| panic!("{what}: {e}"))
        };
        // The model drafting for itself: greedy proposals of its own.
        let self_draft = || DraftModel::new(&m, "self", &m, "self", 1024).expect("draft");
        let with_lookup = with("lookup", &mut PromptLookup::default());
        assert_eq!(
            with_lookup.tokens, plain.tokens,
            "prompt lookup changed the tokens"
        );
        assert!(with_lookup.proposed > 0, "nothing was proposed");
        let with_draft = with("draft", &mut self_draft());
        assert_eq!(
            with_draft.tokens, plain.tokens,
            "the draft changed the tokens"
        );
        assert_eq!(with_draft.text, plain.text);
        // Lookup first, the draft where lookup has nothing; the draft's
        // cache follows what lookup's kept guesses added.
        let with_both = with(
            "both",
            &mut LookupThenDraft {
                lookup: PromptLookup::default(),
                draft: self_draft(),
            },
        );
        assert_eq!(
            with_both.tokens, plain.tokens,
            "lookup and the draft changed the tokens"
        );
        assert!(with_both.proposed > 0, "nothing was proposed");
        let mut four = DraftModel::new(&four_bit, "4-bit self", &m, "self", 1024).expect("draft");
        let with_four = with("4-bit draft", &mut four);
        assert_eq!(
            with_four.tokens, plain.tokens,
            "the 4-bit draft changed the tokens"
        );
        assert!(with_four.proposed > 0, "the 4-bit draft proposed nothing");
        if p.sampler.temperature == 0.0 {
            // At 4 bits the model still guesses its own greedy choices
            // nearly always. Asked here for one token after each prefix of
            // the answer: the run's own count of kept guesses depends on
            // the clock, which may switch a draft as large as its target
            // (one that never pays) off after its first eight rounds, and
            // then counts only the answer's first few guesses.
            let mut probe =
                DraftModel::new(&four_bit, "4-bit self", &m, "self", 1024).expect("draft");
            let mut context = prompt.clone();
            let mut agree = 0;
            for &t in &plain.tokens {
                let guess = probe.propose(&context, 1).expect("propose");
                agree += usize::from(guess.first() == Some(&t));
                context.push(t);
            }
            assert!(
                agree * 10 >= plain.tokens.len() * 8,
                "the 4-bit draft guessed {agree} of {} of its own greedy tokens",
                plain.tokens.len()
            );
            // A greedy model agrees with itself, except where its token
            // lies past the short list the draft proposes from (and at the
            // end of the turn, whose token is past it too).
            let outside = plain
                .tokens
                .iter()
                .filter(|&&t| t as usize >= SHORT_LIST)
                .count();
            assert!(
                with_draft.proposed - with_draft.accepted <= outside + 1,
                "a greedy model agrees with itself: {} of {} kept, {outside} tokens past the short list",
                with_draft.accepted,
                with_draft.proposed
            );
        }
    }
}

/// Proposes what a plain run generated (always right), and records what
/// it was asked.
struct Oracle {
    prompt_len: usize,
    answer: Vec<u32>,
    calls: Vec<(&'static str, usize)>,
}

impl Proposer for Oracle {
    fn propose(
        &mut self,
        context: &[u32],
        k: usize,
    ) -> Result<Vec<u32>, hanlin_engine::EngineError> {
        self.calls.push(("propose", context.len()));
        let done = context.len() - self.prompt_len;
        Ok(self.answer.iter().skip(done).take(k).copied().collect())
    }

    fn catch_up(&mut self, context: &[u32]) -> Result<(), hanlin_engine::EngineError> {
        self.calls.push(("catch_up", context.len()));
        Ok(())
    }
}

/// A proposer catches up on the prompt as part of the prompt's work (a
/// draft model's prefill counts as prefill, not as decoding), and on what
/// was decoded while proposals were off before proposing resumes, in a
/// call of its own that the round's timing leaves out. An answer that ends
/// before proposals start costs it nothing.
#[test]
fn proposers_catch_up_before_proposing_resumes() {
    let m = load("qwen2.5-coder-0.5b");
    let prompt = m
        .chat_prompt(&[Message::new("user", "用一句话介绍长江。")])
        .expect("prompt");
    let p = params(40, SamplerConfig::greedy());
    let plain = m
        .new_session(1024)
        .generate(&prompt, &p, |_| true)
        .expect("plain");
    // A run of at most `max` tokens with the oracle guessing, and the
    // calls it was asked.
    let with_oracle = |max: usize| {
        let mut oracle = Oracle {
            prompt_len: prompt.len(),
            answer: plain.tokens.clone(),
            calls: Vec::new(),
        };
        let g = m
            .new_session(1024)
            .generate_with(
                &prompt,
                &params(max, SamplerConfig::greedy()),
                Some(&mut oracle as &mut dyn Proposer),
                |_| true,
            )
            .expect("oracle");
        (g, oracle.calls)
    };
    let (with, calls) = with_oracle(40);
    assert_eq!(with.tokens, plain.tokens);
    assert!(with.proposed > 0 && with.accepted == with.proposed);
    assert_eq!(
        calls.first(),
        Some(&("catch_up", prompt.len())),
        "{calls:?}"
    );
    // Each later catch-up has the tokens fed so far; the proposal right
    // after it adds the token to be fed next.
    let later = calls.iter().enumerate().skip(1);
    for (i, c) in later.filter(|(_, c)| c.0 == "catch_up") {
        assert!(c.1 > prompt.len(), "{calls:?}");
        assert_eq!(calls.get(i + 1), Some(&("propose", c.1 + 1)), "{calls:?}");
    }
    let (short, calls) = with_oracle(2);
    assert_eq!(short.tokens, plain.tokens[..2]);
    assert!(calls.is_empty(), "{calls:?}");
}

/// A draft reads only the latest [`DRAFT_WINDOW`] tokens of a long prompt
/// (before, it caught up on all of it: a 4,441-token prompt took the 1.5B
/// model's first token from 50 to 62 s with the 0.5B draft), still guesses
/// well, and the tokens stay the target's.
#[test]
fn a_draft_reads_only_the_end_of_a_long_prompt() {
    let m = load("qwen2.5-coder-0.5b");
    let prompt = common::long_notes_prompt(&m);
    assert!(prompt.len() > 3 * DRAFT_WINDOW, "{} tokens", prompt.len());
    let p = params(40, SamplerConfig::greedy());
    let plain = m
        .new_session(2048)
        .generate(&prompt, &p, |_| true)
        .expect("plain");
    let mut draft = DraftModel::new(&m, "self", &m, "self", 2048).expect("draft");
    let with = m
        .new_session(2048)
        .generate_with(&prompt, &p, Some(&mut draft as &mut dyn Proposer), |_| true)
        .expect("with the draft");
    assert_eq!(with.tokens, plain.tokens, "the draft changed the tokens");
    assert!(
        draft.start() + DRAFT_WINDOW >= prompt.len(),
        "the draft read from token {} of a {}-token prompt",
        draft.start(),
        prompt.len()
    );
    // The model drafting for itself from the prompt's last tokens still
    // guesses its own greedy choices.
    assert!(
        with.proposed > 0 && with.accepted * 10 >= with.proposed * 8,
        "{} of {} proposals kept",
        with.accepted,
        with.proposed
    );
}

#[test]
fn a_draft_with_another_vocabulary_is_refused_with_both_names() {
    let target = load("qwen2.5-coder-0.5b");
    let draft = load("smollm2-135m");
    let err = DraftModel::new(&draft, "smollm2-135m", &target, "qwen2.5-coder-0.5b", 256)
        .err()
        .expect("refused")
        .to_string();
    assert!(
        err.contains("smollm2-135m") && err.contains("qwen2.5-coder-0.5b"),
        "{err}"
    );
}
