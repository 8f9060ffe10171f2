//! Byte-level BPE tokenizers trained on a corpus (`tokenizers`' trainer),
//! pre-tokenized with the same pattern as Qwen2 (letters of any script stay
//! together, digits one by one, punctuation and whitespace apart), so the
//! engine reads the exported vocabulary with its `qwen2` pre-tokenizer.
//! The special tokens are `<|endoftext|>` (end of a document) and ChatML's
//! `<|im_start|>` / `<|im_end|>`.

use crate::TrainError;
use std::path::{Path, PathBuf};
use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::models::TrainerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::{AddedToken, SplitDelimiterBehavior, Tokenizer};

/// Qwen2's pre-tokenizer pattern (the engine's `qwen2`).
pub const PATTERN: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

pub const END_OF_TEXT: &str = "<|endoftext|>";
pub const SPECIAL: [&str; 3] = [END_OF_TEXT, "<|im_start|>", "<|im_end|>"];

fn err(e: impl std::fmt::Display) -> TrainError {
    TrainError::Tokenizer(e.to_string())
}

/// The text files of a corpus directory (or the file itself), sorted; hidden
/// entries skipped.
pub fn corpus_files(path: &Path) -> Result<Vec<PathBuf>, TrainError> {
    let mut out = Vec::new();
    let mut stack = vec![path.to_path_buf()];
    while let Some(p) = stack.pop() {
        let meta = std::fs::metadata(&p).map_err(crate::io_err(&p))?;
        if meta.is_dir() {
            for e in std::fs::read_dir(&p).map_err(crate::io_err(&p))? {
                let e = e.map_err(crate::io_err(&p))?;
                if !e.file_name().to_string_lossy().starts_with('.') {
                    stack.push(e.path());
                }
            }
        } else if matches!(
            p.extension().and_then(|e| e.to_str()),
            Some("txt" | "md" | "text")
        ) {
            out.push(p);
        }
    }
    out.sort();
    if out.is_empty() {
        return Err(TrainError::Corpus(format!(
            "no .txt or .md files under {}",
            path.display()
        )));
    }
    Ok(out)
}

fn new_tokenizer() -> Result<Tokenizer, TrainError> {
    let mut t = Tokenizer::new(BPE::default());
    let split = Split::new(
        SplitPattern::Regex(PATTERN.into()),
        SplitDelimiterBehavior::Isolated,
        false,
    )
    .map_err(err)?;
    let bytes = ByteLevel::new(false, true, false);
    t.with_pre_tokenizer(Some(PreTokenizerWrapper::Sequence(Sequence::new(vec![
        PreTokenizerWrapper::Split(split),
        PreTokenizerWrapper::ByteLevel(bytes),
    ]))));
    t.with_decoder(Some(ByteLevel::new(false, true, false)));
    Ok(t)
}

/// Train a tokenizer with `vocab` entries (special tokens and the 256 byte
/// symbols included) on the files under `corpus`.
pub fn train(corpus: &Path, vocab: usize) -> Result<Tokenizer, TrainError> {
    if vocab < 256 + SPECIAL.len() + 1 {
        return Err(TrainError::Config(format!(
            "a byte-level vocabulary needs more than {} entries",
            256 + SPECIAL.len()
        )));
    }
    // Files that are not UTF-8 text, or empty, are left out (the data
    // loader reports them).
    let texts: Vec<String> = corpus_files(corpus)?
        .into_iter()
        .filter_map(|f| std::fs::read(&f).ok())
        .filter_map(|b| String::from_utf8(b).ok())
        .filter(|s| !s.trim().is_empty())
        .collect();
    if texts.is_empty() {
        return Err(TrainError::Corpus(format!(
            "no text to learn from under {}",
            corpus.display()
        )));
    }
    let mut t = new_tokenizer()?;
    let mut trainer: TrainerWrapper = BpeTrainerBuilder::new()
        .vocab_size(vocab)
        .min_frequency(2)
        .show_progress(true)
        .special_tokens(SPECIAL.iter().map(|s| AddedToken::from(*s, true)).collect())
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .build()
        .into();
    t.train(&mut trainer, texts.iter()).map_err(err)?;
    Ok(t)
}

pub fn save(t: &Tokenizer, path: &Path) -> Result<(), TrainError> {
    t.save(path, true).map_err(err)
}

pub fn load(path: &Path) -> Result<Tokenizer, TrainError> {
    Tokenizer::from_file(path)
        .map_err(|e| TrainError::Tokenizer(format!("{}: {e}", path.display())))
}

/// The tokenizer a run trains with: one trained here (`tokenizer.json`), or
/// the one inside a GGUF base model (LoRA).
pub enum Tok {
    Bpe(Box<Tokenizer>),
    Gguf(Box<hanlin_tokenizer::Tokenizer>),
}

impl Tok {
    /// Token ids of `text`; special tokens written in it (`<|im_start|>`)
    /// become their ids. No beginning-of-text token is added.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, TrainError> {
        match self {
            Tok::Bpe(t) => Ok(t.encode(text, false).map_err(err)?.get_ids().to_vec()),
            Tok::Gguf(t) => t.encode(text, false).map_err(err),
        }
    }

    pub fn decode(&self, ids: &[u32]) -> String {
        match self {
            Tok::Bpe(t) => t.decode(ids, false).unwrap_or_default(),
            Tok::Gguf(t) => t.decode(ids),
        }
    }

    pub fn id(&self, token: &str) -> Option<u32> {
        match self {
            Tok::Bpe(t) => t.token_to_id(token),
            Tok::Gguf(t) => (0..t.vocab_size() as u32).find(|&i| t.token_str(i) == Some(token)),
        }
    }

    pub fn vocab_size(&self) -> usize {
        match self {
            Tok::Bpe(t) => t.get_vocab_size(true),
            Tok::Gguf(t) => t.vocab_size(),
        }
    }

    /// The token that ends a document: `<|endoftext|>`, else `</s>`.
    pub fn end_of_text(&self) -> Result<u32, TrainError> {
        self.id(END_OF_TEXT)
            .or_else(|| self.id("</s>"))
            .ok_or_else(|| err(format!("no {END_OF_TEXT} token")))
    }
}

/// The vocabulary by id and the merges ("a b"), as GGUF stores them.
pub fn vocab_and_merges(t: &Tokenizer) -> Result<(Vec<String>, Vec<String>), TrainError> {
    let v: serde_json::Value =
        serde_json::from_str(&t.to_string(false).map_err(err)?).map_err(err)?;
    let map = v["model"]["vocab"]
        .as_object()
        .ok_or_else(|| err("the tokenizer has no BPE vocabulary"))?;
    let mut vocab = vec![String::new(); map.len()];
    for (tok, id) in map {
        let i = id.as_u64().ok_or_else(|| err("bad token id"))? as usize;
        if i >= vocab.len() {
            return Err(err(format!("token id {i} beyond the vocabulary")));
        }
        vocab[i] = tok.clone();
    }
    let merges = v["model"]["merges"]
        .as_array()
        .ok_or_else(|| err("the tokenizer has no merges"))?
        .iter()
        .map(|m| match m {
            serde_json::Value::String(s) => Ok(s.clone()),
            serde_json::Value::Array(a) if a.len() == 2 => Ok(format!(
                "{} {}",
                a[0].as_str().unwrap_or(""),
                a[1].as_str().unwrap_or("")
            )),
            _ => Err(err("bad merge")),
        })
        .collect::<Result<_, _>>()?;
    Ok((vocab, merges))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trains_on_chinese_and_english_and_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let text =
            "床前明月光，疑是地上霜。举头望明月，低头思故乡。\nThe moon is bright tonight.\n"
                .repeat(50);
        std::fs::write(dir.path().join("a.txt"), &text).unwrap();
        let t = train(dir.path(), 400).unwrap();
        let (vocab, merges) = vocab_and_merges(&t).unwrap();
        assert!(vocab.len() <= 400 && vocab.len() > 300, "{}", vocab.len());
        assert_eq!(&vocab[..3], &SPECIAL.map(String::from));
        assert!(!merges.is_empty());
        let s = "举头望明月 The moon";
        let enc = t.encode(s, false).unwrap();
        assert!(enc.get_ids().len() < s.len(), "merges learnt");
        assert_eq!(t.decode(enc.get_ids(), false).unwrap(), s);
        // Specials are single tokens.
        let e = t.encode("<|im_start|>user", false).unwrap();
        assert_eq!(e.get_ids()[0], 1);
        assert!(train(dir.path(), 100).is_err());
        assert!(corpus_files(&dir.path().join("none")).is_err());
    }
}
