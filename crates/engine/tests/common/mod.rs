#![allow(dead_code)] // each test binary uses a different part of this module
//! Shared helpers for tests on the real models. A missing model fails the test
//! with instructions; it is never skipped.

use std::path::PathBuf;

pub fn model_path(name: &str) -> PathBuf {
    let store = hanlin_store::Store::open(hanlin_store::Store::default_home())
        .expect("open the model store");
    match store.path_of(name).expect("read the model store") {
        Some(p) => p,
        None => panic!(
            "model {name} is not in the store at {}; run `cargo run --release -- pull {name}` first (CI does this in .ci/run)",
            store.home().display()
        ),
    }
}

pub fn fixture(name: &str) -> serde_json::Value {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name);
    let text =
        std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("reading {}: {e}", p.display()));
    serde_json::from_str(&text).expect("fixture is JSON")
}

pub const MODELS: [&str; 3] = ["smollm2-135m", "qwen2.5-coder-0.5b", "gemma3-270m"];

/// The models with llama.cpp fixtures: the small ones and the 1.5B model
/// (its fixture is shorter, 128 steps a prompt, to keep CI's replay short).
pub const PARITY_MODELS: [&str; 4] = [
    "smollm2-135m",
    "qwen2.5-coder-0.5b",
    "gemma3-270m",
    "qwen2.5-coder-1.5b",
];

/// A chat prompt of about a thousand tokens (sixty numbered notes, then a
/// short coding question): longer than a draft reads
/// ([`hanlin_engine::speculative::DRAFT_WINDOW`]).
pub fn long_notes_prompt(m: &hanlin_engine::LoadedModel) -> Vec<u32> {
    let mut notes = String::new();
    for i in 0..60 {
        notes += &format!("{i}. The river passes town number {i} before it reaches the sea.\n");
    }
    let ask = format!("{notes}\nWrite a Python function that adds two numbers.");
    m.chat_prompt(&[hanlin_tokenizer::Message::new("user", ask)])
        .expect("prompt")
}
