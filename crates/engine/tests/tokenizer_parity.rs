//! Token ids must equal llama.cpp's on a corpus of Chinese, English, mixed,
//! emoji, code and whitespace-heavy strings (fixtures from
//! scripts/llama_cpp_reference.py), and decoding must give the text back.

mod common;

use hanlin_formats::GgufFile;
use hanlin_tokenizer::Tokenizer;

#[test]
fn token_ids_match_llama_cpp() {
    for name in common::PARITY_MODELS {
        let f = GgufFile::open(&common::model_path(name)).expect("open model");
        let tok = Tokenizer::from_gguf(&f.header).expect("tokenizer");
        let cases = common::fixture(&format!("{name}.tokens.json"));
        let cases = cases.as_array().expect("array");
        assert!(cases.len() >= 15);
        for case in cases {
            let text = case["text"].as_str().expect("text");
            let want: Vec<u32> = case["ids"]
                .as_array()
                .expect("ids")
                .iter()
                .map(|v| v.as_u64().expect("id") as u32)
                .collect();
            let got = tok.encode(text, false).expect("encode");
            assert_eq!(got, want, "{name}: {text:?}");
            if !text.contains("<|") {
                assert_eq!(tok.decode(&got), text, "{name}: decode of {text:?}");
            }
        }
    }
}

#[test]
fn streaming_decode_never_splits_characters() {
    let f = GgufFile::open(&common::model_path("qwen2.5-coder-0.5b")).expect("open model");
    let tok = Tokenizer::from_gguf(&f.header).expect("tokenizer");
    let text = "长城🇨🇳👨‍👩‍👧‍👦 emoji 和中文 mixed ÀÉ";
    let ids = tok.encode(text, false).expect("encode");
    let mut s = tok.stream();
    let mut out = String::new();
    for &id in &ids {
        let piece = s.push(id);
        assert!(!piece.contains('\u{FFFD}'), "broken piece {piece:?}");
        out.push_str(&piece);
    }
    out.push_str(&s.finish());
    assert_eq!(out, text);
    // Byte tokens for a multi-byte character arrive in several tokens.
    assert!(ids.len() > text.chars().filter(|c| c.is_ascii()).count() / 4);
}
