//! Export a trained model to GGUF (llama architecture: RMSNorm, RoPE on
//! interleaved pairs, SwiGLU, grouped-query attention, the output tied to
//! the token embeddings) with its byte-level BPE tokenizer, so that
//! `hanlin run` and `hanlin serve` load it like any downloaded model.

use crate::config::GptConfig;
use crate::model::Gpt;
use crate::{io_err, TrainError};
use burn::tensor::Tensor;
use hanlin_formats::writer::{write_gguf, WriteTensor};
use hanlin_formats::{GgmlType, Value};
use hanlin_kernels::quant::{encode_f32, quantize_row_q8_0};
use std::path::Path;
use tokenizers::Tokenizer;

/// Weight types an export can use for the matrices (norms stay f32).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Quant {
    F32,
    F16,
    Q8_0,
}

impl std::str::FromStr for Quant {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "f32" => Ok(Quant::F32),
            "f16" => Ok(Quant::F16),
            "q8_0" => Ok(Quant::Q8_0),
            _ => Err(format!("unknown export type {s:?} (f32, f16, q8_0)")),
        }
    }
}

fn values<const D: usize>(t: Tensor<D>) -> Result<Vec<f32>, TrainError> {
    t.into_data()
        .convert::<f32>()
        .try_to_vec::<f32>()
        .map_err(|e| TrainError::Checkpoint {
            path: "model".into(),
            reason: format!("{e:?}"),
        })
}

fn tensor(name: String, cols: usize, rows: usize, v: &[f32], q: Quant) -> WriteTensor {
    let q = if !cols.is_multiple_of(32) && q == Quant::Q8_0 {
        Quant::F16
    } else {
        q
    };
    let (ty, data) = match q {
        Quant::F32 => (GgmlType::F32, encode_f32(v)),
        Quant::F16 => (
            GgmlType::F16,
            v.iter()
                .flat_map(|x| half::f16::from_f32(*x).to_bits().to_le_bytes())
                .collect(),
        ),
        Quant::Q8_0 => (GgmlType::Q8_0, quantize_row_q8_0(v)),
    };
    let dims = if rows == 1 {
        vec![cols as u64]
    } else {
        vec![cols as u64, rows as u64]
    };
    WriteTensor {
        name,
        dims,
        ty,
        data,
    }
}

/// A linear layer's weight as GGUF rows (burn keeps `[d_in, d_out]`).
fn linear(name: String, l: &burn::nn::Linear, q: Quant) -> Result<WriteTensor, TrainError> {
    let w = l.weight.val();
    let [d_in, d_out] = w.dims();
    Ok(tensor(name, d_in, d_out, &values(w.transpose())?, q))
}

/// Write `model` (shape `c`, tokenizer `tok`) to `path`.
pub fn export(
    model: &Gpt,
    c: &GptConfig,
    tok: &Tokenizer,
    path: &Path,
    q: Quant,
) -> Result<(), TrainError> {
    let (vocab, merges) = crate::tokenizer::vocab_and_merges(tok)?;
    if vocab.len() != c.vocab_size {
        return Err(TrainError::Tokenizer(format!(
            "the tokenizer has {} tokens, the model {}",
            vocab.len(),
            c.vocab_size
        )));
    }
    let blk = |i: usize, t: &str| format!("blk.{i}.{t}");
    let d = c.d_model;
    let mut ts = vec![
        tensor(
            "token_embd.weight".into(),
            d,
            c.vocab_size,
            &values(model.embed.weight.val())?,
            q,
        ),
        tensor(
            "output_norm.weight".into(),
            d,
            1,
            &values(model.norm.gamma.val())?,
            Quant::F32,
        ),
    ];
    for (i, b) in model.blocks.iter().enumerate() {
        ts.push(tensor(
            blk(i, "attn_norm.weight"),
            d,
            1,
            &values(b.attn_norm.gamma.val())?,
            Quant::F32,
        ));
        ts.push(linear(blk(i, "attn_q.weight"), &b.wq, q)?);
        ts.push(linear(blk(i, "attn_k.weight"), &b.wk, q)?);
        ts.push(linear(blk(i, "attn_v.weight"), &b.wv, q)?);
        ts.push(linear(blk(i, "attn_output.weight"), &b.wo, q)?);
        ts.push(tensor(
            blk(i, "ffn_norm.weight"),
            d,
            1,
            &values(b.ffn_norm.gamma.val())?,
            Quant::F32,
        ));
        ts.push(linear(blk(i, "ffn_gate.weight"), &b.gate, q)?);
        ts.push(linear(blk(i, "ffn_up.weight"), &b.up, q)?);
        ts.push(linear(blk(i, "ffn_down.weight"), &b.down, q)?);
    }
    let id = |s: &str| vocab.iter().position(|v| v == s).map(|i| i as u32);
    let u = |v: usize| Value::U32(v as u32);
    let mut md = vec![
        (
            "general.architecture".to_string(),
            Value::String("llama".into()),
        ),
        (
            "general.name".to_string(),
            Value::String("hanlin-trained".into()),
        ),
        ("llama.block_count".to_string(), u(c.n_layer)),
        ("llama.embedding_length".to_string(), u(d)),
        ("llama.feed_forward_length".to_string(), u(c.d_ff)),
        ("llama.attention.head_count".to_string(), u(c.n_head)),
        ("llama.attention.head_count_kv".to_string(), u(c.kv_heads())),
        ("llama.context_length".to_string(), u(c.context)),
        ("llama.vocab_size".to_string(), u(c.vocab_size)),
        ("llama.rope.dimension_count".to_string(), u(c.head_dim())),
        ("llama.rope.freq_base".to_string(), Value::F32(c.rope_base)),
        (
            "llama.attention.layer_norm_rms_epsilon".to_string(),
            Value::F32(c.norm_eps as f32),
        ),
        (
            "tokenizer.ggml.model".to_string(),
            Value::String("gpt2".into()),
        ),
        (
            "tokenizer.ggml.pre".to_string(),
            Value::String("qwen2".into()),
        ),
        (
            "tokenizer.ggml.tokens".to_string(),
            Value::Array(vocab.iter().map(|t| Value::String(t.clone())).collect()),
        ),
        (
            "tokenizer.ggml.token_type".to_string(),
            Value::Array(
                vocab
                    .iter()
                    .map(|t| {
                        Value::I32(if crate::tokenizer::SPECIAL.contains(&t.as_str()) {
                            3
                        } else {
                            1
                        })
                    })
                    .collect(),
            ),
        ),
        (
            "tokenizer.ggml.merges".to_string(),
            Value::Array(merges.into_iter().map(Value::String).collect()),
        ),
        (
            "tokenizer.ggml.add_bos_token".to_string(),
            Value::Bool(false),
        ),
    ];
    if let Some(e) = id(crate::tokenizer::END_OF_TEXT) {
        md.push(("tokenizer.ggml.eos_token_id".to_string(), Value::U32(e)));
    }
    if let Some(e) = id("<|im_end|>") {
        md.push(("tokenizer.ggml.eot_token_id".to_string(), Value::U32(e)));
    }
    let tmp = path.with_extension("gguf.tmp");
    let mut f = std::io::BufWriter::new(std::fs::File::create(&tmp).map_err(io_err(&tmp))?);
    write_gguf(&mut f, &md, &ts).map_err(io_err(&tmp))?;
    std::io::Write::flush(&mut f).map_err(io_err(&tmp))?;
    drop(f);
    std::fs::rename(&tmp, path).map_err(io_err(path))?;
    Ok(())
}
