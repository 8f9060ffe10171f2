//! Byte-level BPE (GPT-2 style) from GGUF vocabulary and merges.

use crate::{TokenType, TokenizerError};
use tokenizers::models::bpe::{Merges, Vocab, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, DecoderWrapper, PreTokenizerWrapper, SplitDelimiterBehavior};

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
) -> Result<(Both, Vec<Vec<u8>>), TokenizerError> {
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
    // Built through the library's builders, not a JSON description: the
    // description of a 151,936-token vocabulary and its merges (and its
    // parse) briefly took more memory than the tokenizer itself.
    let mut vocab = Vocab::default();
    for (i, t) in tokens.iter().enumerate() {
        vocab.entry(t.clone()).or_insert(i as u32);
    }
    let merges: Merges = merges
        .iter()
        .enumerate()
        .map(|(i, m)| match m.split_once(' ') {
            Some((a, b)) => Ok((a.to_string(), b.to_string())),
            None => Err(TokenizerError::Build(format!(
                "merge {} ({m:?}) is not two tokens separated by a space",
                i + 1
            ))),
        })
        .collect::<Result<_, _>>()?;
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .ignore_merges(pre == "llama3" || pre == "llama-bpe")
        .build()
        .map_err(|e| TokenizerError::Build(e.to_string()))?;
    let model = Shared(std::sync::Arc::new(bpe));
    let mut pretok: Vec<PreTokenizerWrapper> = Vec::new();
    for p in split_patterns(pre) {
        let split = Split::new(
            SplitPattern::Regex(p.to_string()),
            SplitDelimiterBehavior::Isolated,
            false,
        )
        .map_err(|e| TokenizerError::Build(e.to_string()))?;
        pretok.push(split.into());
    }
    pretok.push(ByteLevel::new(false, false, false).into());
    let added: Vec<AddedToken> = tokens
        .iter()
        .enumerate()
        .filter(|(i, _)| matches!(types[*i], TokenType::Control | TokenType::UserDefined))
        .map(|(_, t)| AddedToken::from(t.clone(), true).normalized(false))
        .collect();
    let make = |plain: bool| {
        let mut tk = Bpe::new(model.clone());
        tk.with_pre_tokenizer(Some(PreTokenizerWrapper::Sequence(Sequence::new(
            pretok.clone(),
        ))));
        tk.with_decoder(Some(DecoderWrapper::ByteLevel(ByteLevel::new(
            false, false, false,
        ))));
        tk.add_special_tokens(&added);
        tk.set_encode_special_tokens(plain);
        tk
    };
    Ok(((make(false), make(true)), bytes))
}

/// The tokenizer that reads special tokens, and the one that reads their
/// spellings as plain text (untrusted text never becomes control tokens).
pub(crate) type Both = (Bpe, Bpe);

/// A byte-level BPE tokenizer whose model two tokenizers share.
pub(crate) type Bpe = tokenizers::TokenizerImpl<
    Shared,
    tokenizers::NormalizerWrapper,
    PreTokenizerWrapper,
    tokenizers::PostProcessorWrapper,
    DecoderWrapper,
>;

/// One BPE model (the vocabulary and merges: tens of megabytes for a large
/// vocabulary) behind the tokenizer that reads special tokens and the one
/// that reads their spellings as plain text.
#[derive(Clone)]
pub(crate) struct Shared(std::sync::Arc<BPE>);

impl tokenizers::Model for Shared {
    type Trainer = <BPE as tokenizers::Model>::Trainer;
    fn tokenize(&self, sequence: &str) -> tokenizers::Result<Vec<tokenizers::Token>> {
        self.0.tokenize(sequence)
    }
    fn token_to_id(&self, token: &str) -> Option<u32> {
        self.0.token_to_id(token)
    }
    fn id_to_token(&self, id: u32) -> Option<String> {
        self.0.id_to_token(id)
    }
    fn get_vocab(&self) -> std::collections::HashMap<String, u32> {
        self.0.get_vocab()
    }
    fn get_vocab_size(&self) -> usize {
        self.0.get_vocab_size()
    }
    fn save(
        &self,
        folder: &std::path::Path,
        prefix: Option<&str>,
    ) -> tokenizers::Result<Vec<std::path::PathBuf>> {
        self.0.save(folder, prefix)
    }
    fn get_trainer(&self) -> Self::Trainer {
        self.0.get_trainer()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A merge that is not two tokens is refused with its number, as the
    /// tokenizers library refuses such a line, not skipped.
    #[test]
    fn a_malformed_merge_is_refused() {
        let tokens: Vec<String> = ["a", "b", "ab"].map(String::from).to_vec();
        let types = [TokenType::Normal; 3];
        let good = ["a b".to_string()];
        assert!(build(&tokens, &types, &good, "gpt2").is_ok());
        let bad = ["a b".to_string(), "ab".to_string()];
        match build(&tokens, &types, &bad, "gpt2") {
            Err(TokenizerError::Build(m)) => assert!(m.contains("merge 2"), "{m}"),
            Err(e) => panic!("another error: {e}"),
            Ok(_) => panic!("a malformed merge was accepted"),
        }
    }
}
