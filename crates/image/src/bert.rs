//! A BERT text encoder with its WordPiece tokenizer, as Chinese-native
//! pipelines condition on (Taiyi-Stable-Diffusion-1B-Chinese takes the
//! last hidden state of a Chinese RoBERTa-wwm, which is BERT's
//! architecture, for CLIP's). The tokenizer is built with the `tokenizers`
//! crate from `vocab.txt` (or a `tokenizer.json`): BERT's normalizer
//! (each Chinese character a word, lower case and accents stripped as
//! `tokenizer_config.json` says), its pre-tokenizer and `##` word pieces.
//! The encoder is `BertModel`: embeddings of word, position and token type
//! 0 through a layer norm, then post-norm layers of full (unmasked)
//! attention and a GELU feed-forward.

use crate::nn::{self, apply_rows, attention, LayerNorm};
use crate::text::{special, tokenizer_config, Tokenizer};
use crate::weights::{read_config, Weights};
use crate::{bad, ImageError};
use hanlin_kernels::linear::{gelu_erf, Linear};
use hanlin_kernels::ops;
use hanlin_kernels::pool::ThreadPool;
use serde_json::{json, Value};
use std::path::Path;

/// Whether a `tokenizer/` directory holds a WordPiece tokenizer.
pub(crate) fn is_wordpiece(dir: &Path) -> bool {
    dir.join("vocab.txt").exists()
        || std::fs::read_to_string(dir.join("tokenizer.json"))
            .is_ok_and(|t| t.contains("\"WordPiece\""))
}

/// A BERT `tokenizer/` directory with `vocab.txt` (or `tokenizer.json`)
/// and `tokenizer_config.json`: prompts framed by `[CLS]` and `[SEP]`,
/// padded with `[PAD]` to `model_max_length` (512 when unsaid).
pub(crate) fn wordpiece(dir: &Path) -> Result<Tokenizer, ImageError> {
    let config = tokenizer_config(dir);
    let vocab_path = dir.join("vocab.txt");
    let mut tok = if vocab_path.exists() {
        let text = std::fs::read_to_string(&vocab_path).map_err(|source| ImageError::Io {
            path: vocab_path.display().to_string(),
            source,
        })?;
        let mut vocab = serde_json::Map::new();
        // One token a line; its id is the line number (a repeated token
        // keeps its first id, as transformers keeps it).
        for (i, t) in text.lines().enumerate() {
            let t = t.trim_end_matches('\r');
            if !vocab.contains_key(t) {
                vocab.insert(t.to_owned(), Value::from(i as u64));
            }
        }
        let spec = json!({
            "version": "1.0",
            "normalizer": {"type": "BertNormalizer", "clean_text": true,
                "handle_chinese_chars": config.get("tokenize_chinese_chars").and_then(Value::as_bool).unwrap_or(true),
                "strip_accents": config.get("strip_accents").and_then(Value::as_bool),
                "lowercase": config.get("do_lower_case").and_then(Value::as_bool).unwrap_or(true)},
            "pre_tokenizer": {"type": "BertPreTokenizer"},
            "model": {"type": "WordPiece", "unk_token": special(&config, "unk_token", "[UNK]"),
                "continuing_subword_prefix": "##", "max_input_chars_per_word": 100,
                "vocab": vocab},
        });
        tokenizers::Tokenizer::from_bytes(spec.to_string().as_bytes())
            .map_err(|e| ImageError::Tokenizer(format!("{}: {e}", vocab_path.display())))?
    } else {
        let path = dir.join("tokenizer.json");
        tokenizers::Tokenizer::from_file(&path)
            .map_err(|e| ImageError::Tokenizer(format!("{}: {e}", path.display())))?
    };
    // [CLS] and [SEP] are added by `Tokenizer::encode`, with the cut.
    tok.with_post_processor(None::<tokenizers::PostProcessorWrapper>);
    let id = |t: String| {
        tok.token_to_id(&t)
            .ok_or_else(|| bad(dir, format!("no id for {t:?}")))
    };
    let max_len = crate::text::max_len(&config, 512);
    Ok(Tokenizer {
        start: id(special(&config, "cls_token", "[CLS]"))?,
        end: id(special(&config, "sep_token", "[SEP]"))?,
        pad: id(special(&config, "pad_token", "[PAD]"))?,
        tok,
        max_len,
    })
}

struct Layer {
    /// `query`, `key`, `value` stacked.
    qkv: Linear,
    attn_out: Linear,
    attn_norm: LayerNorm,
    up: Linear,
    down: Linear,
    out_norm: LayerNorm,
}

pub struct BertEncoder {
    word: Vec<f32>,
    pos: Vec<f32>,
    /// Token type 0's embedding (prompts are one segment).
    kind: Vec<f32>,
    emb_norm: LayerNorm,
    layers: Vec<Layer>,
    vocab: usize,
    pub dim: usize,
    heads: usize,
    max_pos: usize,
}

impl BertEncoder {
    pub fn load(dir: &Path) -> Result<Self, ImageError> {
        Self::from_parts(&read_config(dir)?, &Weights::open_dir(dir)?)
    }

    /// Whether a text encoder's config names BERT (or RoBERTa, which
    /// Chinese RoBERTa-wwm checkpoints save as BERT).
    pub fn is_bert(cfg: &Value) -> bool {
        matches!(
            cfg.get("model_type").and_then(Value::as_str),
            Some("bert" | "roberta")
        ) || cfg
            .get("architectures")
            .and_then(Value::as_array)
            .is_some_and(|a| a.iter().any(|v| v.as_str() == Some("BertModel")))
    }

    /// From a config and weights named as transformers' `BertModel` names
    /// them (a `bert.` prefix, as task models save them, is read too).
    pub fn from_parts(cfg: &Value, w: &Weights) -> Result<Self, ImageError> {
        let dir = w.path();
        let p = if w.has("bert.embeddings.word_embeddings.weight") {
            "bert."
        } else {
            ""
        };
        let shape = |n: &str| -> Result<Vec<usize>, ImageError> {
            Ok(w.shape(&format!("{p}embeddings.{n}.weight"))?.to_vec())
        };
        let (&[vocab, dim], &[max_pos, dim2], &[kinds, dim3]) = (
            &shape("word_embeddings")?[..],
            &shape("position_embeddings")?[..],
            &shape("token_type_embeddings")?[..],
        ) else {
            return Err(bad(dir, "embedding shapes"));
        };
        let heads = cfg
            .get("num_attention_heads")
            .and_then(Value::as_u64)
            .unwrap_or(12) as usize;
        if dim != dim2 || dim != dim3 || kinds == 0 || heads == 0 || !dim.is_multiple_of(heads) {
            return Err(bad(
                dir,
                format!("width {dim}/{dim2}/{dim3} with {heads} heads"),
            ));
        }
        match cfg.get("hidden_act").and_then(Value::as_str) {
            None | Some("gelu") => {}
            Some(other) => return Err(bad(dir, format!("activation {other:?} (BERT's is gelu)"))),
        }
        if cfg
            .get("position_embedding_type")
            .and_then(Value::as_str)
            .is_some_and(|t| t != "absolute")
        {
            return Err(bad(dir, "only absolute position embeddings are read"));
        }
        let eps = cfg
            .get("layer_norm_eps")
            .and_then(Value::as_f64)
            .unwrap_or(1e-12) as f32;
        let n = nn::count(
            w,
            &format!("{p}encoder.layer"),
            "attention.self.query.weight",
        );
        let layers = (0..n)
            .map(|i| {
                let l = format!("{p}encoder.layer.{i}");
                Ok(Layer {
                    qkv: nn::linear_cat(
                        w,
                        &["query", "key", "value"].map(|n| format!("{l}.attention.self.{n}")),
                    )?,
                    attn_out: nn::linear(w, &format!("{l}.attention.output.dense"))?,
                    attn_norm: LayerNorm::load(w, &format!("{l}.attention.output.LayerNorm"), eps)?,
                    up: nn::linear(w, &format!("{l}.intermediate.dense"))?,
                    down: nn::linear(w, &format!("{l}.output.dense"))?,
                    out_norm: LayerNorm::load(w, &format!("{l}.output.LayerNorm"), eps)?,
                })
            })
            .collect::<Result<Vec<_>, ImageError>>()?;
        if layers.is_empty() {
            return Err(bad(dir, "no encoder layers"));
        }
        Ok(Self {
            word: w.vec(
                &format!("{p}embeddings.word_embeddings.weight"),
                vocab * dim,
            )?,
            pos: w.vec(
                &format!("{p}embeddings.position_embeddings.weight"),
                max_pos * dim,
            )?,
            kind: w.vec(
                &format!("{p}embeddings.token_type_embeddings.weight"),
                kinds * dim,
            )?[..dim]
                .to_vec(),
            emb_norm: LayerNorm::load(w, &format!("{p}embeddings.LayerNorm"), eps)?,
            layers,
            vocab,
            dim,
            heads,
            max_pos,
        })
    }

    /// The last hidden state for `ids` (`ids.len() × dim`).
    pub fn forward(&self, pool: &ThreadPool, ids: &[u32]) -> Result<Vec<f32>, ImageError> {
        let (n, d) = (ids.len(), self.dim);
        let x = crate::text::embed(ids, (self.vocab, self.max_pos, d), |t, p, c| {
            self.word[t * d + c] + self.pos[p * d + c] + self.kind[c]
        })?;
        let mut x = self.emb_norm.apply(&x);
        for l in &self.layers {
            let qkv = apply_rows(pool, &l.qkv, &x, d);
            let ctx = attention(
                pool,
                self.heads,
                d,
                (&qkv, 3 * d),
                (&qkv[d..], &qkv[2 * d..], 3 * d),
                n,
                n,
            );
            ops::add_inplace(&mut x, &apply_rows(pool, &l.attn_out, &ctx, d));
            x = l.attn_norm.apply(&x);
            let mut m = apply_rows(pool, &l.up, &x, d);
            m.iter_mut().for_each(|v| *v = gelu_erf(*v));
            ops::add_inplace(&mut x, &apply_rows(pool, &l.down, &m, l.up.rows));
            x = l.out_norm.apply(&x);
        }
        Ok(x)
    }
}
