//! Byte-level BPE (GPT-2 style) from GGUF vocabulary and merges.

use crate::{TokenType, TokenizerError};
use serde_json::json;

/// GPT-2's reversible byte → printable-character table.
pub(crate) fn byte_to_char() -> [char; 256] {
    let mut table = ['\0'; 256];
    let mut n = 0u32;
    for b in 0..256u32 {
        let printable = (b'!' as u32..=b'~' as u32).contains(&b)
            || (0xA1..=0xAC).contains(&b)
            || (0xAE..=0xFF).contains(&b);
        table[b as usize] = if printable {
            char::from_u32(b).unwrap_or('?')
        } else {
            let c = char::from_u32(256 + n).unwrap_or('?');
            n += 1;
            c
        };
    }
    table
}

/// Pre-tokenizer split patterns, applied in order, for each `tokenizer.ggml.pre`.
fn split_patterns(pre: &str) -> Vec<&'static str> {
    const GPT2: &str =
        r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+";
    match pre {
        "qwen2" | "deepseek-r1-qwen" => vec![
            r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
        ],
        "llama3" | "llama-bpe" | "falcon3" | "pixtral" => vec![
            r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
        ],
        "smollm" | "starcoder" | "refact" | "command-r" | "codeshell" | "exaone" | "minerva-7b" => {
            vec![
                r"\p{N}",
                r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)",
            ]
        }
        _ => vec![GPT2],
    }
}

pub(crate) fn build(
    tokens: &[String],
    types: &[TokenType],
    merges: &[String],
    pre: &str,
) -> Result<(tokenizers::Tokenizer, Vec<Vec<u8>>), TokenizerError> {
    let table = byte_to_char();
    let mut inverse = std::collections::HashMap::new();
    for (b, c) in table.iter().enumerate() {
        inverse.insert(*c, b as u8);
    }
    let bytes: Vec<Vec<u8>> = tokens
        .iter()
        .zip(types)
        .map(|(t, ty)| match ty {
            TokenType::Normal | TokenType::Unknown | TokenType::Byte | TokenType::Unused => t
                .chars()
                .map(|c| inverse.get(&c).copied().unwrap_or(b'?'))
                .collect(),
            TokenType::Control | TokenType::UserDefined => t.as_bytes().to_vec(),
        })
        .collect();
    let mut vocab = serde_json::Map::new();
    for (i, t) in tokens.iter().enumerate() {
        vocab.entry(t.clone()).or_insert(json!(i));
    }
    let added: Vec<_> = tokens
        .iter()
        .enumerate()
        .filter(|(i, _)| matches!(types[*i], TokenType::Control | TokenType::UserDefined))
        .map(|(i, t)| {
            json!({"id": i, "content": t, "single_word": false, "lstrip": false, "rstrip": false,
                   "normalized": false, "special": true})
        })
        .collect();
    let mut pretok: Vec<serde_json::Value> = split_patterns(pre)
        .into_iter()
        .map(|p| json!({"type": "Split", "pattern": {"Regex": p}, "behavior": "Isolated", "invert": false}))
        .collect();
    pretok.push(json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": false}));
    let spec = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": pretok},
        "post_processor": null,
        "decoder": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": false},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
                  "ignore_merges": pre == "llama3" || pre == "llama-bpe",
                  "vocab": vocab, "merges": merges}
    });
    let tk: tokenizers::Tokenizer = spec
        .to_string()
        .parse()
        .map_err(|e: tokenizers::Error| TokenizerError::Build(e.to_string()))?;
    Ok((tk, bytes))
}
