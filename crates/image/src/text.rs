//! The prompt's side of a pipeline: CLIP's BPE tokenizer and text model
//! ([`crate::clip`], Stable Diffusion's), or a WordPiece tokenizer and
//! BERT ([`crate::bert`], Chinese-native pipelines such as Taiyi), chosen
//! by what a diffusers directory holds.

use crate::bert::{BertEncoder, WordPieceTokenizer};
use crate::clip::{ClipTokenizer, TextEncoder};
use crate::weights::read_config;
use crate::ImageError;
use hanlin_kernels::pool::ThreadPool;
use std::path::Path;

pub enum Tokenizer {
    Clip(ClipTokenizer),
    WordPiece(WordPieceTokenizer),
}

impl From<ClipTokenizer> for Tokenizer {
    fn from(t: ClipTokenizer) -> Self {
        Self::Clip(t)
    }
}

impl Tokenizer {
    /// A `tokenizer/` directory: WordPiece when it has `vocab.txt` (or a
    /// WordPiece `tokenizer.json`), else CLIP's BPE.
    pub fn load(dir: &Path) -> Result<Self, ImageError> {
        if WordPieceTokenizer::is_in(dir) {
            Ok(Self::WordPiece(WordPieceTokenizer::load(dir)?))
        } else {
            Ok(Self::Clip(ClipTokenizer::load(dir)?))
        }
    }

    /// `max_len()` ids for `text`: start, tokens (cut to fit), end, padding.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, ImageError> {
        match self {
            Self::Clip(t) => t.encode(text),
            Self::WordPiece(t) => t.encode(text),
        }
    }

    /// How many tokens the prompt makes (those past `max_len() - 2` are
    /// dropped).
    pub fn token_count(&self, text: &str) -> Result<usize, ImageError> {
        match self {
            Self::Clip(t) => t.token_count(text),
            Self::WordPiece(t) => t.token_count(text),
        }
    }

    /// Ids per prompt, with the start and end tokens.
    pub fn max_len(&self) -> usize {
        match self {
            Self::Clip(t) => t.max_len,
            Self::WordPiece(t) => t.max_len,
        }
    }

    /// The languages prompts may be written in: English for CLIP (unless
    /// the model says otherwise), Chinese and English for a vocabulary
    /// with Chinese characters.
    pub fn languages(&self) -> Vec<String> {
        match self {
            Self::WordPiece(t) if t.reads_chinese() => vec!["zh".into(), "en".into()],
            _ => vec!["en".into()],
        }
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
