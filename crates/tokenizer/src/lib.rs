//! Tokenizers and chat templates.
//!
//! - [`Tokenizer`]: built from GGUF metadata (`tokenizer.ggml.*`, byte-level BPE
//!   with the pre-tokenizer that `tokenizer.ggml.pre` names) on top of the
//!   `tokenizers` crate; token → bytes for decoding is our own table.
//! - [`StreamDecoder`] (and the owned [`Utf8Stream`]): turns a stream of token ids into text that never splits
//!   a UTF-8 character.
//! - [`ChatTemplate`]: renders the model's own Jinja chat template with `minijinja`.

mod bpe;
mod spm;
mod template;
pub mod unigram;
pub use unigram::UnigramTokenizer;

pub use template::{ChatTemplate, Message, Piece, TemplateError, CHATML, GEMMA};

use hanlin_formats::{GgufHeader, Value};

#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("the model file has no tokenizer ({0} missing)")]
    Missing(&'static str),
    #[error("tokenizer model {0:?} is not supported (supported: gpt2 byte-level BPE, llama SentencePiece)")]
    UnsupportedModel(String),
    #[error("building the tokenizer failed: {0}")]
    Build(String),
    #[error("encoding failed: {0}")]
    Encode(String),
}

/// ggml token types.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenType {
    Normal,
    Unknown,
    Control,
    UserDefined,
    Unused,
    Byte,
}

impl TokenType {
    fn from_i64(v: i64) -> Self {
        match v {
            2 => Self::Unknown,
            3 => Self::Control,
            4 => Self::UserDefined,
            5 => Self::Unused,
            6 => Self::Byte,
            _ => Self::Normal,
        }
    }
}

enum Inner {
    /// The tokenizer, and a copy that reads special-token spellings as
    /// plain text.
    Bpe(Box<bpe::Bpe>, Box<bpe::Bpe>),
    Spm(Box<SpmInner>),
}

/// SentencePiece pieces, with special tokens matched in the text first.
struct SpmInner {
    spm: spm::Spm,
    specials: aho_corasick::AhoCorasick,
    special_ids: Vec<u32>,
}

pub struct Tokenizer {
    tokens: Vec<String>,
    types: Vec<TokenType>,
    /// Bytes each token decodes to (control tokens: their text).
    bytes: Vec<Vec<u8>>,
    inner: Inner,
    pub bos: Option<u32>,
    pub eos: Option<u32>,
    pub add_bos: bool,
    /// Every id that ends generation (eos, eot, im_end, ...).
    pub eog: Vec<u32>,
    pub pre: String,
}

impl Tokenizer {
    pub fn from_gguf(h: &GgufHeader) -> Result<Self, TokenizerError> {
        let model = h
            .get_str("tokenizer.ggml.model")
            .ok_or(TokenizerError::Missing("tokenizer.ggml.model"))?;
        let tokens: Vec<String> = h
            .get("tokenizer.ggml.tokens")
            .and_then(Value::as_array)
            .ok_or(TokenizerError::Missing("tokenizer.ggml.tokens"))?
            .iter()
            .map(|v| v.as_str().unwrap_or_default().to_string())
            .collect();
        let types: Vec<TokenType> =
            match h.get("tokenizer.ggml.token_type").and_then(Value::as_array) {
                Some(a) if a.len() == tokens.len() => a
                    .iter()
                    .map(|v| TokenType::from_i64(v.as_i64().unwrap_or(1)))
                    .collect(),
                _ => vec![TokenType::Normal; tokens.len()],
            };
        let id = |k: &str| {
            h.get_u64(k)
                .filter(|&v| (v as usize) < tokens.len())
                .map(|v| v as u32)
        };
        let bos = id("tokenizer.ggml.bos_token_id");
        let eos = id("tokenizer.ggml.eos_token_id");
        let add_bos = h
            .get("tokenizer.ggml.add_bos_token")
            .and_then(Value::as_bool)
            .unwrap_or(false);
        let pre = h
            .get_str("tokenizer.ggml.pre")
            .unwrap_or("default")
            .to_string();
        let (inner, bytes) = match model {
            "gpt2" => {
                let merges: Vec<String> = h
                    .get("tokenizer.ggml.merges")
                    .and_then(Value::as_array)
                    .ok_or(TokenizerError::Missing("tokenizer.ggml.merges"))?
                    .iter()
                    .map(|v| v.as_str().unwrap_or_default().to_string())
                    .collect();
                let ((tk, plain), bytes) = bpe::build(&tokens, &types, &merges, &pre)?;
                (Inner::Bpe(Box::new(tk), Box::new(plain)), bytes)
            }
            "llama" => {
                let scores: Vec<f32> =
                    match h.get("tokenizer.ggml.scores").and_then(Value::as_array) {
                        Some(a) => a.iter().map(|v| v.as_f64().unwrap_or(0.0) as f32).collect(),
                        None => vec![0.0; tokens.len()],
                    };
                let add_space_prefix = h
                    .get("tokenizer.ggml.add_space_prefix")
                    .and_then(Value::as_bool)
                    .unwrap_or(true);
                let unk = id("tokenizer.ggml.unknown_token_id");
                let spm = spm::Spm::new(&tokens, &types, scores, unk, add_space_prefix);
                let (special_ids, patterns): (Vec<u32>, Vec<&str>) = tokens
                    .iter()
                    .enumerate()
                    .filter(|(i, t)| {
                        matches!(types[*i], TokenType::Control | TokenType::UserDefined)
                            && !t.is_empty()
                    })
                    .map(|(i, t)| (i as u32, t.as_str()))
                    .unzip();
                let specials = aho_corasick::AhoCorasick::builder()
                    .match_kind(aho_corasick::MatchKind::LeftmostLongest)
                    .build(&patterns)
                    .map_err(|e| TokenizerError::Build(e.to_string()))?;
                let bytes = tokens
                    .iter()
                    .zip(&types)
                    .map(|(t, ty)| match ty {
                        TokenType::Byte => spm::byte_token(t).map(|b| vec![b]).unwrap_or_default(),
                        TokenType::Normal | TokenType::Unused => {
                            t.replace('\u{2581}', " ").into_bytes()
                        }
                        _ => t.as_bytes().to_vec(),
                    })
                    .collect();
                (
                    Inner::Spm(Box::new(SpmInner {
                        spm,
                        specials,
                        special_ids,
                    })),
                    bytes,
                )
            }
            other => return Err(TokenizerError::UnsupportedModel(other.to_string())),
        };
        let mut eog: Vec<u32> = Vec::new();
        eog.extend(eos);
        eog.extend(id("tokenizer.ggml.eot_token_id"));
        eog.extend(id("tokenizer.ggml.eom_token_id"));
        for (i, t) in tokens.iter().enumerate() {
            let named = matches!(
                t.as_str(),
                "<|eot_id|>"
                    | "<|im_end|>"
                    | "<|end|>"
                    | "<end_of_turn>"
                    | "<|endoftext|>"
                    | "<|eom_id|>"
                    | "<EOT>"
            );
            if named && types[i] == TokenType::Control {
                eog.push(i as u32);
            }
        }
        eog.sort_unstable();
        eog.dedup();
        Ok(Self {
            tokens,
            types,
            bytes,
            inner,
            bos,
            eos,
            add_bos,
            eog,
            pre,
        })
    }

    pub fn vocab_size(&self) -> usize {
        self.tokens.len()
    }

    /// The token's vocabulary string (for display and debugging).
    pub fn token_str(&self, id: u32) -> Option<&str> {
        self.tokens.get(id as usize).map(String::as_str)
    }

    /// Encode text. Special tokens written in the text (e.g. `<|im_start|>`) are
    /// recognised, as llama.cpp does for rendered chat templates. A BOS token is
    /// prepended when the model asks for it and `add_bos` is set.
    pub fn encode(&self, text: &str, add_bos: bool) -> Result<Vec<u32>, TokenizerError> {
        let mut ids = Vec::new();
        if add_bos && self.add_bos {
            ids.extend(self.bos);
        }
        match &self.inner {
            Inner::Bpe(..) | Inner::Spm(..) => {
                self.encode_into(text, true, &mut true, &mut ids)?;
            }
        }
        Ok(ids)
    }

    /// Encode text as plain text only: a special token's spelling in it
    /// (`<|im_start|>`) becomes ordinary tokens, never the control token.
    pub fn encode_plain(&self, text: &str, add_bos: bool) -> Result<Vec<u32>, TokenizerError> {
        let mut ids = Vec::new();
        if add_bos && self.add_bos {
            ids.extend(self.bos);
        }
        self.encode_into(text, false, &mut true, &mut ids)?;
        Ok(ids)
    }

    /// Encode a rendered chat prompt: special tokens are recognised in the
    /// template's pieces only; the messages' text is plain text.
    pub fn encode_pieces(
        &self,
        pieces: &[template::Piece],
        add_bos: bool,
    ) -> Result<Vec<u32>, TokenizerError> {
        let mut ids = Vec::new();
        if add_bos && self.add_bos {
            ids.extend(self.bos);
        }
        let mut first = true;
        for p in pieces {
            match p {
                template::Piece::Template(t) => self.encode_into(t, true, &mut first, &mut ids)?,
                template::Piece::Text(t) => self.encode_into(t, false, &mut first, &mut ids)?,
            }
        }
        Ok(ids)
    }

    /// Append the ids of `text`, recognising special tokens when `special`.
    /// `first` says whether this is the prompt's first text (SentencePiece
    /// models prefix a space to it).
    fn encode_into(
        &self,
        text: &str,
        special: bool,
        first: &mut bool,
        ids: &mut Vec<u32>,
    ) -> Result<(), TokenizerError> {
        if text.is_empty() {
            return Ok(());
        }
        match &self.inner {
            Inner::Bpe(tk, plain) => {
                let tk = if special { tk } else { plain };
                let enc = tk
                    .encode_fast(text, false)
                    .map_err(|e| TokenizerError::Encode(e.to_string()))?;
                ids.extend_from_slice(enc.get_ids());
            }
            Inner::Spm(inner) => {
                let SpmInner {
                    spm,
                    specials,
                    special_ids,
                } = inner.as_ref();
                let plain = |frag: &str, first: bool, ids: &mut Vec<u32>| {
                    if first && spm.add_space_prefix() {
                        spm.encode(&format!(" {frag}"), ids);
                    } else {
                        spm.encode(frag, ids);
                    }
                };
                if !special {
                    plain(text, *first, ids);
                    *first = false;
                    return Ok(());
                }
                let mut pos = 0;
                for m in specials.find_iter(text) {
                    if m.start() > pos {
                        plain(&text[pos..m.start()], *first, ids);
                    }
                    *first = false;
                    ids.push(special_ids[m.pattern().as_usize()]);
                    pos = m.end();
                }
                if pos < text.len() {
                    plain(&text[pos..], *first, ids);
                    *first = false;
                }
            }
        }
        Ok(())
    }

    /// Raw bytes of one token; control tokens give their text only when
    /// `special` is set.
    pub fn token_bytes(&self, id: u32, special: bool) -> &[u8] {
        match self.types.get(id as usize) {
            Some(TokenType::Control) if !special => &[],
            Some(_) => &self.bytes[id as usize],
            None => &[],
        }
    }

    /// Decode ids to text (lossy on invalid UTF-8; control tokens skipped).
    pub fn decode(&self, ids: &[u32]) -> String {
        let bytes: Vec<u8> = ids
            .iter()
            .flat_map(|&i| self.token_bytes(i, false).iter().copied())
            .collect();
        String::from_utf8_lossy(&bytes).into_owned()
    }

    /// Start a streaming decode.
    pub fn stream(&self) -> StreamDecoder<'_> {
        StreamDecoder {
            tok: self,
            bytes: Utf8Stream::default(),
        }
    }
}

/// Incremental decoder: text comes out only in whole UTF-8 characters.
pub struct StreamDecoder<'a> {
    tok: &'a Tokenizer,
    bytes: Utf8Stream,
}

impl StreamDecoder<'_> {
    /// Feed one token; returns the text that became complete.
    pub fn push(&mut self, id: u32) -> String {
        self.bytes.push(self.tok.token_bytes(id, false))
    }

    /// Flush whatever is left (an incomplete character becomes U+FFFD).
    pub fn finish(&mut self) -> String {
        self.bytes.finish()
    }
}

/// The byte side of [`StreamDecoder`], owning no tokenizer (for sequences
/// that outlive a borrow, such as those of a batch scheduler).
#[derive(Debug, Default, Clone)]
pub struct Utf8Stream {
    pending: Vec<u8>,
}

impl Utf8Stream {
    /// Append a token's bytes; returns the text that became complete.
    pub fn push(&mut self, bytes: &[u8]) -> String {
        self.pending.extend_from_slice(bytes);
        self.take_complete()
    }

    fn take_complete(&mut self) -> String {
        match std::str::from_utf8(&self.pending) {
            Ok(s) => {
                let out = s.to_string();
                self.pending.clear();
                out
            }
            Err(e) => {
                let valid = e.valid_up_to();
                // A sequence that can never become valid is emitted lossily.
                let cut = match e.error_len() {
                    Some(bad) => valid + bad,
                    None => valid,
                };
                let out = String::from_utf8_lossy(&self.pending[..cut]).into_owned();
                self.pending.drain(..cut);
                if e.error_len().is_some() {
                    return out + &self.take_complete();
                }
                out
            }
        }
    }

    /// Flush whatever is left (an incomplete character becomes U+FFFD).
    pub fn finish(&mut self) -> String {
        let out = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending.clear();
        out
    }
}
