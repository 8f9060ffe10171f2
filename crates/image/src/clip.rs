//! CLIP's text side: the BPE tokenizer (lower-cased, byte-level, words
//! ending in `</w>`, built with the `tokenizers` crate from a diffusers
//! directory's `vocab.json` and `merges.txt`) and `CLIPTextModel`, whose
//! last hidden state (after the final layer norm) conditions the UNet.

use crate::nn::{self, apply_rows};
use crate::text::Tokenizer;
use crate::weights::{read_config, Weights};
use crate::{bad, ImageError};
use hanlin_kernels::linear::{gelu_erf, layer_norm, Linear};
use hanlin_kernels::ops;
use hanlin_kernels::pool::ThreadPool;
use serde_json::{json, Value};
use std::path::Path;

/// GPT-2's printable stand-in for every byte, in CLIP's order: the
/// printable bytes, then the others mapped from 256 up.
fn byte_symbols() -> Vec<char> {
    let printable =
        |b: u32| (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
    let mut out: Vec<char> = (0..256u32)
        .filter(|&b| printable(b))
        .filter_map(char::from_u32)
        .collect();
    let mut n = 0;
    for b in 0..256u32 {
        if !printable(b) {
            out.push(char::from_u32(256 + n).unwrap_or('?'));
            n += 1;
        }
    }
    out
}

/// CLIP's pre-tokenizer pattern (special tokens, contractions, letter
/// runs, single digits, other symbol runs).
const PATTERN: &str =
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";

/// [`PATTERN`] with each Chinese character a word of its own (the
/// vocabularies [`ClipTokenizer::train`] learns; CLIP's own takes a run of
/// them as one word, which lets BPE merge whole Chinese phrases, even
/// whole captions, into single tokens that nothing else shares).
const PATTERN_HAN: &str = r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|\p{Han}|[\p{L}&&[^\p{Han}]]+|[\p{N}]|[^\s\p{L}\p{N}]+";

/// The `tokenizers` description of CLIP's tokenizer with `vocab` and
/// `merges`; `split_han`: [`PATTERN_HAN`] instead of [`PATTERN`].
fn spec(vocab: Value, merges: Vec<String>, split_han: bool) -> Value {
    let pattern = if split_han { PATTERN_HAN } else { PATTERN };
    json!({
        "version": "1.0",
        "normalizer": {"type": "Sequence", "normalizers": [
            {"type": "NFC"},
            {"type": "Replace", "pattern": {"Regex": r"\s+"}, "content": " "},
            {"type": "Lowercase"}]},
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Removed", "invert": true},
            {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false}]},
        "model": {"type": "BPE", "dropout": null, "unk_token": "<|endoftext|>",
            "continuing_subword_prefix": "", "end_of_word_suffix": "</w>",
            "fuse_unk": false, "byte_fallback": false, "vocab": vocab, "merges": merges},
    })
}

/// CLIP's tokenizer is a [`Tokenizer`] built from BPE files.
pub type ClipTokenizer = Tokenizer;

fn read_text(path: &Path) -> Result<String, ImageError> {
    std::fs::read_to_string(path).map_err(|source| ImageError::Io {
        path: path.display().to_string(),
        source,
    })
}

/// A CLIP `tokenizer/` directory: `vocab.json`, `merges.txt` and
/// `tokenizer_config.json`, or a `tokenizer.json`.
pub(crate) fn bpe(dir: &Path) -> Result<Tokenizer, ImageError> {
    Tokenizer::bpe(dir)
}

impl Tokenizer {
    fn bpe(dir: &Path) -> Result<Self, ImageError> {
        let vocab_path = dir.join("vocab.json");
        if !vocab_path.exists() && dir.join("tokenizer.json").exists() {
            return Self::from_tokenizer_json(dir);
        }
        let vocab: serde_json::Map<String, Value> = serde_json::from_str(&read_text(&vocab_path)?)
            .map_err(|e| bad(&vocab_path, format!("not a JSON object: {e}")))?;
        let merges: Vec<String> = read_text(&dir.join("merges.txt"))?
            .lines()
            .filter(|l| !l.starts_with("#version") && !l.trim().is_empty())
            .map(str::to_owned)
            .collect();
        let config = crate::text::tokenizer_config(dir);
        let pad = crate::text::special(&config, "pad_token", "<|endoftext|>");
        let max_len = crate::text::max_len(&config, 77);
        // Hanlin's own key: Chinese characters are words of their own.
        let split_han = config
            .get("hanlin_split_han")
            .and_then(Value::as_bool)
            .unwrap_or(false);
        Self::from_parts(dir, vocab, merges, &pad, max_len, split_han)
    }

    /// From a vocabulary and merges; `pad` names the padding token.
    fn from_parts(
        path: &Path,
        vocab: serde_json::Map<String, Value>,
        merges: Vec<String>,
        pad: &str,
        max_len: usize,
        split_han: bool,
    ) -> Result<Self, ImageError> {
        let id = |t: &str| -> Result<u32, ImageError> {
            vocab
                .get(t)
                .and_then(Value::as_u64)
                .map(|v| v as u32)
                .ok_or_else(|| bad(path, format!("no id for {t:?}")))
        };
        let (bos, eos) = (id("<|startoftext|>")?, id("<|endoftext|>")?);
        let pad = id(pad)?;
        let spec = spec(Value::Object(vocab), merges, split_han);
        let tok = tokenizers::Tokenizer::from_bytes(spec.to_string().as_bytes())
            .map_err(|e| ImageError::Tokenizer(format!("{}: {e}", path.display())))?;
        Ok(Self {
            tok,
            start: bos,
            end: eos,
            pad,
            max_len,
        })
    }

    /// Learn a CLIP-style vocabulary of at most `vocab` entries from
    /// `texts` and write it to `dir` as `vocab.json`, `merges.txt` and
    /// `tokenizer_config.json` (prompts of `max_len` ids, each Chinese
    /// character a word), the files [`Tokenizer::load`] reads.
    pub fn train(
        texts: &[String],
        vocab: usize,
        max_len: usize,
        dir: &Path,
    ) -> Result<Self, ImageError> {
        use tokenizers::models::bpe::BpeTrainerBuilder;
        use tokenizers::models::TrainerWrapper;
        use tokenizers::{AddedToken, Model};
        let terr = |e: tokenizers::Error| ImageError::Tokenizer(e.to_string());
        let mut tok = tokenizers::Tokenizer::from_bytes(
            spec(json!({}), Vec::new(), true).to_string().as_bytes(),
        )
        .map_err(terr)?;
        let mut trainer: TrainerWrapper = BpeTrainerBuilder::new()
            .vocab_size(vocab)
            .min_frequency(1)
            .show_progress(false)
            .special_tokens(vec![
                AddedToken::from("<|startoftext|>", true),
                AddedToken::from("<|endoftext|>", true),
            ])
            .initial_alphabet(byte_symbols().into_iter().collect())
            .end_of_word_suffix("</w>".into())
            .build()
            .into();
        tok.train(&mut trainer, texts.iter()).map_err(terr)?;
        std::fs::create_dir_all(dir).map_err(|source| ImageError::Io {
            path: dir.display().to_string(),
            source,
        })?;
        tok.get_model().save(dir, None).map_err(terr)?;
        let config = json!({
            "bos_token": "<|startoftext|>",
            "eos_token": "<|endoftext|>",
            "pad_token": "<|endoftext|>",
            "unk_token": "<|endoftext|>",
            "model_max_length": max_len,
            "tokenizer_class": "CLIPTokenizer",
            "hanlin_split_han": true,
        });
        let path = dir.join("tokenizer_config.json");
        std::fs::write(&path, config.to_string()).map_err(|source| ImageError::Io {
            path: path.display().to_string(),
            source,
        })?;
        Self::load(dir)
    }

    /// From CLIP's original `bpe_simple_vocab_16e6.txt.gz` (the merges;
    /// the vocabulary follows from them as CLIP builds it: the 256 byte
    /// symbols, the same ending a word, each merge, then the two special
    /// tokens — 49,408 ids).
    pub fn from_bpe_gz(path: &Path) -> Result<Self, ImageError> {
        let gz = std::fs::read(path).map_err(|source| ImageError::Io {
            path: path.display().to_string(),
            source,
        })?;
        let mut text = String::new();
        std::io::Read::read_to_string(
            &mut std::io::Read::take(flate2::read::GzDecoder::new(&gz[..]), 8 << 20),
            &mut text,
        )
        .map_err(|e| bad(path, format!("not gzip-compressed UTF-8 text: {e}")))?;
        let merges: Vec<String> = text
            .split('\n')
            .skip(1)
            .take(49152 - 256 - 2)
            .map(str::to_owned)
            .collect();
        if merges.len() != 49152 - 256 - 2 || merges.iter().any(|m| m.split(' ').count() != 2) {
            return Err(bad(path, "not CLIP's merges file"));
        }
        let bytes = byte_symbols();
        let mut list: Vec<String> = bytes.iter().map(|c| c.to_string()).collect();
        list.extend(bytes.iter().map(|c| format!("{c}</w>")));
        list.extend(merges.iter().map(|m| m.replace(' ', "")));
        list.push("<|startoftext|>".into());
        list.push("<|endoftext|>".into());
        let mut vocab = serde_json::Map::new();
        for (i, t) in list.into_iter().enumerate() {
            vocab.insert(t, Value::from(i as u64));
        }
        Self::from_parts(path, vocab, merges, "<|endoftext|>", 77, false)
    }

    /// A `tokenizer.json` (as newer transformers versions save a CLIP
    /// tokenizer); its own post-processor is not used.
    fn from_tokenizer_json(dir: &Path) -> Result<Self, ImageError> {
        let path = dir.join("tokenizer.json");
        let mut tok = tokenizers::Tokenizer::from_file(&path)
            .map_err(|e| ImageError::Tokenizer(format!("{}: {e}", path.display())))?;
        tok.with_post_processor(None::<tokenizers::PostProcessorWrapper>);
        let id = |t: &str| {
            tok.token_to_id(t)
                .ok_or_else(|| bad(&path, format!("no id for {t:?}")))
        };
        let (bos, eos) = (id("<|startoftext|>")?, id("<|endoftext|>")?);
        Ok(Self {
            tok,
            start: bos,
            end: eos,
            pad: eos,
            max_len: 77,
        })
    }
}

struct Layer {
    ln1: (Vec<f32>, Vec<f32>),
    qkv: [Linear; 3],
    out: Linear,
    ln2: (Vec<f32>, Vec<f32>),
    fc1: Linear,
    fc2: Linear,
}

pub struct TextEncoder {
    tok_emb: Vec<f32>,
    pos_emb: Vec<f32>,
    layers: Vec<Layer>,
    final_ln: (Vec<f32>, Vec<f32>),
    vocab: usize,
    pub dim: usize,
    heads: usize,
    max_pos: usize,
    quick_gelu: bool,
    eps: f32,
}

impl TextEncoder {
    pub fn load(dir: &Path) -> Result<Self, ImageError> {
        Self::from_parts(&read_config(dir)?, &Weights::open_dir(dir)?)
    }

    /// From a config and weights named as transformers names them.
    pub fn from_parts(cfg: &Value, w: &Weights) -> Result<Self, ImageError> {
        let dir = w.path();
        let num = |k: &str| cfg.get(k).and_then(Value::as_u64).map(|v| v as usize);
        // transformers writes `text_model.` before every name; some tools
        // leave it out.
        let p = if w.has("text_model.embeddings.token_embedding.weight") {
            "text_model."
        } else {
            ""
        };
        let emb_shape = w
            .shape(&format!("{p}embeddings.token_embedding.weight"))?
            .to_vec();
        let pos_shape = w
            .shape(&format!("{p}embeddings.position_embedding.weight"))?
            .to_vec();
        let (&[vocab, dim], &[max_pos, dim2]) = (&emb_shape[..], &pos_shape[..]) else {
            return Err(bad(dir, "embedding shapes"));
        };
        let heads = num("num_attention_heads").unwrap_or(12);
        if dim != dim2 || heads == 0 || !dim.is_multiple_of(heads) {
            return Err(bad(dir, format!("width {dim}/{dim2} with {heads} heads")));
        }
        let eps = cfg
            .get("layer_norm_eps")
            .and_then(Value::as_f64)
            .unwrap_or(1e-5) as f32;
        let act = cfg
            .get("hidden_act")
            .and_then(Value::as_str)
            .unwrap_or("quick_gelu");
        let ln = |n: &str| -> Result<(Vec<f32>, Vec<f32>), ImageError> {
            Ok((
                w.vec(&format!("{n}.weight"), dim)?,
                w.vec(&format!("{n}.bias"), dim)?,
            ))
        };
        let n_layers = nn::count(w, &format!("{p}encoder.layers"), "self_attn.q_proj.weight");
        let mut layers = Vec::with_capacity(n_layers);
        for i in 0..n_layers {
            let l = format!("{p}encoder.layers.{i}");
            let lin = |n: &str| nn::linear(w, &format!("{l}.{n}"));
            layers.push(Layer {
                ln1: ln(&format!("{l}.layer_norm1"))?,
                qkv: [
                    lin("self_attn.q_proj")?,
                    lin("self_attn.k_proj")?,
                    lin("self_attn.v_proj")?,
                ],
                out: lin("self_attn.out_proj")?,
                ln2: ln(&format!("{l}.layer_norm2"))?,
                fc1: lin("mlp.fc1")?,
                fc2: lin("mlp.fc2")?,
            });
        }
        if layers.is_empty() {
            return Err(bad(dir, "no encoder layers"));
        }
        Ok(Self {
            tok_emb: w.vec(
                &format!("{p}embeddings.token_embedding.weight"),
                vocab * dim,
            )?,
            pos_emb: w.vec(
                &format!("{p}embeddings.position_embedding.weight"),
                max_pos * dim,
            )?,
            final_ln: ln(&format!("{p}final_layer_norm"))?,
            layers,
            vocab,
            dim,
            heads,
            max_pos,
            quick_gelu: act == "quick_gelu",
            eps,
        })
    }

    /// The last hidden state for `ids` (`ids.len() × dim`).
    pub fn forward(&self, pool: &ThreadPool, ids: &[u32]) -> Result<Vec<f32>, ImageError> {
        let (n, d) = (ids.len(), self.dim);
        let mut x = crate::text::embed(ids, (self.vocab, self.max_pos, d), |t, p, c| {
            self.tok_emb[t * d + c] + self.pos_emb[p * d + c]
        })?;
        let hd = d / self.heads;
        let scale = 1.0 / (hd as f32).sqrt();
        for l in &self.layers {
            let mut a = x.clone();
            layer_norm(&mut a, None, &l.ln1.0, &l.ln1.1, self.eps);
            let [q, k, v] = [0, 1, 2].map(|i| apply_rows(pool, &l.qkv[i], &a, d));
            // Causal attention over at most 77 tokens: small enough to do
            // directly.
            let mut ctx = vec![0f32; n * d];
            let mut p = Vec::with_capacity(n);
            for h in 0..self.heads {
                for i in 0..n {
                    let qi = &q[i * d + h * hd..i * d + (h + 1) * hd];
                    p.clear();
                    p.extend((0..=i).map(|j| {
                        ops::dot_f32(qi, &k[j * d + h * hd..j * d + (h + 1) * hd]) * scale
                    }));
                    ops::softmax(&mut p);
                    let o = &mut ctx[i * d + h * hd..i * d + (h + 1) * hd];
                    for (j, pj) in p.iter().enumerate() {
                        ops::axpy(o, *pj, &v[j * d + h * hd..j * d + (h + 1) * hd]);
                    }
                }
            }
            ops::add_inplace(&mut x, &apply_rows(pool, &l.out, &ctx, d));
            let mut a = x.clone();
            layer_norm(&mut a, None, &l.ln2.0, &l.ln2.1, self.eps);
            let mut m = apply_rows(pool, &l.fc1, &a, d);
            for v in m.iter_mut() {
                *v = if self.quick_gelu {
                    *v / (1.0 + (-1.702 * *v).exp())
                } else {
                    gelu_erf(*v)
                };
            }
            ops::add_inplace(&mut x, &apply_rows(pool, &l.fc2, &m, l.fc1.rows));
        }
        layer_norm(&mut x, None, &self.final_ln.0, &self.final_ln.1, self.eps);
        Ok(x)
    }
}
