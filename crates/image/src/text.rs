//! The prompt's side of a pipeline: CLIP's BPE tokenizer and text model
//! ([`crate::clip`], Stable Diffusion's), or a WordPiece tokenizer and
//! BERT ([`crate::bert`], Chinese-native pipelines such as Taiyi), chosen
//! by what a diffusers directory holds. Both tokenizers are one
//! [`Tokenizer`], built by either module.

use crate::bert::BertEncoder;
use crate::clip::TextEncoder;
use crate::weights::read_config;
use crate::ImageError;
use hanlin_kernels::pool::ThreadPool;
use serde_json::Value;
use std::path::Path;

/// A prompt tokenizer (a `tokenizers` model: CLIP's BPE, or BERT's
/// WordPiece) whose prompts are framed: the start token, the text's ids cut
/// to fit, the end token, padding to `max_len`.
pub struct Tokenizer {
    pub(crate) tok: tokenizers::Tokenizer,
    pub(crate) start: u32,
    pub(crate) end: u32,
    pub(crate) pad: u32,
    /// Ids per prompt, with the start and end tokens (77 for CLIP).
    pub max_len: usize,
}

impl Tokenizer {
    /// A `tokenizer/` directory: WordPiece when it has `vocab.txt` (or a
    /// WordPiece `tokenizer.json`), else CLIP's BPE.
    pub fn load(dir: &Path) -> Result<Self, ImageError> {
        if crate::bert::is_wordpiece(dir) {
            crate::bert::wordpiece(dir)
        } else {
            crate::clip::bpe(dir)
        }
    }

    /// `max_len` ids for `text`: start, tokens (cut to fit), end, padding.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, ImageError> {
        let enc = self
            .tok
            .encode(text, false)
            .map_err(|e| ImageError::Tokenizer(e.to_string()))?;
        let mut ids = Vec::with_capacity(self.max_len);
        ids.push(self.start);
        ids.extend(enc.get_ids().iter().take(self.max_len - 2));
        ids.push(self.end);
        ids.resize(self.max_len, self.pad);
        Ok(ids)
    }

    /// How many tokens the prompt makes (those past `max_len - 2` are
    /// dropped).
    pub fn token_count(&self, text: &str) -> Result<usize, ImageError> {
        Ok(self
            .tok
            .encode(text, false)
            .map_err(|e| ImageError::Tokenizer(e.to_string()))?
            .len())
    }

    /// Ids in the vocabulary.
    pub fn vocab_size(&self) -> usize {
        self.tok.get_vocab_size(true)
    }

    /// The languages prompts may be written in: Chinese and English when
    /// Chinese characters are tokens of the vocabulary (a Chinese BERT's;
    /// CLIP's byte-level tokens never are), else English.
    pub fn languages(&self) -> Vec<String> {
        if self.tok.token_to_id("的").is_some() {
            vec!["zh".into(), "en".into()]
        } else {
            vec!["en".into()]
        }
    }
}

/// Every id of a prompt embedded, `emb(token, position, channel)` for
/// each of `d` channels, once the ids are checked against the encoder's
/// `vocab` and `max_pos`.
pub(crate) fn embed(
    ids: &[u32],
    (vocab, max_pos, d): (usize, usize, usize),
    emb: impl Fn(usize, usize, usize) -> f32,
) -> Result<Vec<f32>, ImageError> {
    if ids.len() > max_pos {
        return Err(ImageError::Request(format!(
            "{} tokens for a text encoder of {max_pos} positions",
            ids.len()
        )));
    }
    let mut x = Vec::with_capacity(ids.len() * d);
    for (p, &t) in ids.iter().enumerate() {
        let t = t as usize;
        if t >= vocab {
            return Err(ImageError::Tokenizer(format!(
                "token {t} outside the vocabulary"
            )));
        }
        x.extend((0..d).map(|c| emb(t, p, c)));
    }
    Ok(x)
}

/// A `tokenizer/` directory's `tokenizer_config.json` (`Null` when it has
/// none or it does not parse).
pub(crate) fn tokenizer_config(dir: &Path) -> Value {
    std::fs::read_to_string(dir.join("tokenizer_config.json"))
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or(Value::Null)
}

/// Ids per prompt as a tokenizer config says (`model_max_length`, 3 to
/// 512), or `default`.
pub(crate) fn max_len(config: &Value, default: usize) -> usize {
    config
        .get("model_max_length")
        .and_then(Value::as_u64)
        .filter(|&n| (3..=512).contains(&n))
        .map_or(default, |n| n as usize)
}

/// A special token named in a tokenizer config (a string, or an object
/// with its `content`), or `default`.
pub(crate) fn special(config: &Value, key: &str, default: &str) -> String {
    match config.get(key) {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Object(o)) => o
            .get("content")
            .and_then(Value::as_str)
            .unwrap_or(default)
            .to_owned(),
        _ => default.to_owned(),
    }
}

pub enum Encoder {
    Clip(TextEncoder),
    Bert(BertEncoder),
}

impl From<TextEncoder> for Encoder {
    fn from(t: TextEncoder) -> Self {
        Self::Clip(t)
    }
}

impl Encoder {
    /// A `text_encoder/` directory: BERT when its config says so, else CLIP.
    pub fn load(dir: &Path) -> Result<Self, ImageError> {
        if BertEncoder::is_bert(&read_config(dir)?) {
            Ok(Self::Bert(BertEncoder::load(dir)?))
        } else {
            Ok(Self::Clip(TextEncoder::load(dir)?))
        }
    }

    /// The last hidden state for `ids` (`ids.len() × dim()`).
    pub fn forward(&self, pool: &ThreadPool, ids: &[u32]) -> Result<Vec<f32>, ImageError> {
        match self {
            Self::Clip(e) => e.forward(pool, ids),
            Self::Bert(e) => e.forward(pool, ids),
        }
    }

    /// Width of each token's state.
    pub fn dim(&self) -> usize {
        match self {
            Self::Clip(e) => e.dim,
            Self::Bert(e) => e.dim,
        }
    }
}
