//! End-to-end generation on the real default model (Chinese and English).

mod common;

use hanlin_engine::{EngineError, FinishReason, GenerateParams, LoadedModel, SamplerConfig};
use hanlin_tokenizer::Message;
use std::sync::Arc;

fn model() -> Arc<LoadedModel> {
    LoadedModel::load(
        &common::model_path("qwen2.5-coder-0.5b"),
        hanlin_engine::default_threads(),
    )
    .expect("load")
}

fn greedy(max: usize) -> GenerateParams {
    GenerateParams {
        max_tokens: max,
        sampler: SamplerConfig::greedy(),
        ..Default::default()
    }
}

#[test]
fn answers_in_chinese_streamed_and_multi_turn_reuses_the_prefix() {
    let m = model();
    // The vocabulary the tokenizer was built from is not kept twice.
    for key in ["tokenizer.ggml.tokens", "tokenizer.ggml.merges"] {
        assert!(m.model.header().get(key).is_none(), "{key} kept");
    }
    let mut s = m.new_session(2048);
    let mut history = vec![Message::new("user", "用中文介绍一下长城")];
    let prompt = m.chat_prompt(&history).expect("prompt");
    let mut pieces = Vec::new();
    let g = s
        .generate(&prompt, &greedy(48), |t| {
            pieces.push(t.to_string());
            true
        })
        .expect("generate");
    assert_eq!(pieces.concat(), g.text);
    assert!(pieces.len() > 5, "streamed in pieces");
    assert!(g.text.contains("长城"), "{}", g.text);
    let han = g
        .text
        .chars()
        .filter(|c| ('\u{4e00}'..='\u{9fff}').contains(c))
        .count();
    assert!(han >= 10, "mostly Chinese: {}", g.text);
    history.push(Message::new("assistant", g.text.clone()));
    history.push(Message::new("user", "它有多长？"));
    let prompt2 = m.chat_prompt(&history).expect("prompt");
    let g2 = s.generate(&prompt2, &greedy(16), |_| true).expect("turn 2");
    assert!(
        g2.cached_tokens >= prompt.len(),
        "reused {} of {} prompt tokens",
        g2.cached_tokens,
        prompt.len()
    );
}

#[test]
fn english_answer_and_stop_strings() {
    let m = model();
    let mut s = m.new_session(1024);
    let prompt = m
        .chat_prompt(&[Message::new(
            "user",
            "What is the capital of France? Answer in one sentence.",
        )])
        .expect("prompt");
    let g = s
        .generate(&prompt, &greedy(40), |_| true)
        .expect("generate");
    assert!(g.text.contains("Paris"), "{}", g.text);
    assert_eq!(g.finish, FinishReason::Stop);
    let mut p = greedy(40);
    p.stop = vec!["Paris".into()];
    let g = s.generate(&prompt, &p, |_| true).expect("generate");
    assert!(
        !g.text.contains("Paris") && g.finish == FinishReason::Stop,
        "{:?}",
        g.text
    );
}

#[test]
fn same_seed_same_text() {
    let m = model();
    let prompt = m
        .chat_prompt(&[Message::new("user", "写一句关于月亮的诗")])
        .expect("prompt");
    let params = |seed| GenerateParams {
        max_tokens: 24,
        sampler: SamplerConfig {
            temperature: 1.0,
            seed,
            ..Default::default()
        },
        ..Default::default()
    };
    let run = |seed| {
        m.new_session(512)
            .generate(&prompt, &params(seed), |_| true)
            .expect("gen")
            .text
    };
    let a = run(42);
    assert_eq!(a, run(42));
    assert_ne!(a, run(7), "different seeds should differ");
}

#[test]
fn context_overflow_is_an_explicit_error_and_length_limit_reports_length() {
    let m = model();
    let prompt = m
        .chat_prompt(&[Message::new("user", "长城".repeat(100))])
        .expect("prompt");
    let err = m
        .new_session(32)
        .generate(&prompt, &greedy(8), |_| true)
        .expect_err("overflow");
    assert!(matches!(err, EngineError::ContextOverflow { .. }), "{err}");
    let g = m
        .new_session(prompt.len() + 4)
        .generate(&prompt, &greedy(100), |_| true)
        .expect("gen");
    assert_eq!(g.finish, FinishReason::ContextFull);
    let g = m
        .new_session(2048)
        .generate(&prompt, &greedy(3), |_| true)
        .expect("gen");
    assert_eq!((g.finish, g.tokens.len()), (FinishReason::Length, 3));
}
