//! Export a trained model to GGUF (llama architecture: RMSNorm, RoPE on
//! interleaved pairs, SwiGLU, grouped-query attention, the output tied to
//! the token embeddings) with its byte-level BPE tokenizer, so that
//! `hanlin run` and `hanlin serve` load it like any downloaded model.

use crate::config::GptConfig;
use crate::model::{Gpt, Proj};
use crate::{io_err, TrainError};
use burn::tensor::Tensor;
use hanlin_formats::writer::{write_gguf, WriteTensor};
use hanlin_formats::{GgmlType, Value};
use hanlin_kernels::quant::{encode_f32, quantize_row_q4_k, quantize_row_q8_0};
use std::path::Path;
use tokenizers::Tokenizer;

/// Weight types an export can use for the matrices (norms stay f32).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Quant {
    F32,
    F16,
    Q8_0,
    /// Q4_K for matrices whose rows are a multiple of 256 values (Q8_0 or
    /// F16 for the others, and Q8_0 for the embeddings, which are also the
    /// output).
    Q4K,
}

impl std::str::FromStr for Quant {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "f32" => Ok(Quant::F32),
            "f16" => Ok(Quant::F16),
            "q8_0" => Ok(Quant::Q8_0),
            "q4_k" => Ok(Quant::Q4K),
            _ => Err(format!("unknown export type {s:?} (f32, f16, q8_0, q4_k)")),
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
    let q = match q {
        Quant::Q4K if !cols.is_multiple_of(256) => Quant::Q8_0,
        q => q,
    };
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
        Quant::Q4K => (GgmlType::Q4_K, quantize_row_q4_k(v)),
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

/// A projection's weight (adapter merged) as GGUF rows (burn keeps
/// `[d_in, d_out]`).
fn linear(name: String, p: &Proj, q: Quant) -> Result<WriteTensor, TrainError> {
    let w = p.merged();
    let [d_in, d_out] = w.dims();
    Ok(tensor(name, d_in, d_out, &values(w.transpose())?, q))
}

/// The experts' matrices of one kind stacked as one GGUF tensor
/// `[cols, rows, experts]`.
fn experts(name: String, ps: &[&Proj], q: Quant) -> Result<WriteTensor, TrainError> {
    let mut all = Vec::new();
    let (mut cols, mut rows) = (0, 0);
    for p in ps {
        let w = p.merged();
        [cols, rows] = w.dims();
        all.extend(values(w.transpose())?);
    }
    let mut t = tensor(name, cols, rows * ps.len(), &all, q);
    t.dims = vec![cols as u64, rows as u64, ps.len() as u64];
    Ok(t)
}

/// Tokenizer metadata for a byte-level BPE tokenizer trained here.
pub fn bpe_metadata(tok: &Tokenizer) -> Result<Vec<(String, Value)>, TrainError> {
    let (vocab, merges) = crate::tokenizer::vocab_and_merges(tok)?;
    let id = |s: &str| vocab.iter().position(|v| v == s).map(|i| i as u32);
    let mut md = vec![
        (
            "tokenizer.ggml.model".to_string(),
            Value::String("gpt2".into()),
        ),
        (
            "tokenizer.ggml.pre".to_string(),
            Value::String("qwen2".into()),
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
            "tokenizer.ggml.tokens".to_string(),
            Value::Array(vocab.iter().map(|t| Value::String(t.clone())).collect()),
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
    Ok(md)
}

/// The tokenizer metadata (and chat template) of a GGUF file, to carry
/// over to a model fine-tuned from it.
pub fn gguf_tokenizer_metadata(path: &Path) -> Result<Vec<(String, Value)>, TrainError> {
    let f = hanlin_formats::GgufFile::open(path).map_err(|e| TrainError::Checkpoint {
        path: path.display().to_string(),
        reason: e.to_string(),
    })?;
    Ok(f.header
        .metadata
        .iter()
        .filter(|(k, _)| k.starts_with("tokenizer."))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect())
}

/// Export the run in `dir` (its last checkpoint; a LoRA run merged into its
/// base) to `path`.
pub fn export_run(dir: &Path, path: &Path, q: Quant) -> Result<(), TrainError> {
    let device = burn::tensor::Device::default();
    let r = crate::run::load(dir, &device)?;
    let (md, name) = match (&r.lora, &r.tok) {
        (Some(info), _) => (
            gguf_tokenizer_metadata(&info.base)?,
            format!("{}-lora", info.base_name),
        ),
        (None, crate::tokenizer::Tok::Bpe(t)) => (bpe_metadata(t)?, "hanlin-trained".into()),
        (None, crate::tokenizer::Tok::Gguf(_)) => {
            return Err(TrainError::Tokenizer(
                "the run has no tokenizer.json".into(),
            ))
        }
    };
    export(&r.model, &r.cfg.model, md, &name, path, q)
}

/// Write `model` (shape `c`, tokenizer metadata `tok_md`) to `path`.
pub fn export(
    model: &Gpt,
    c: &GptConfig,
    tok_md: Vec<(String, Value)>,
    name: &str,
    path: &Path,
    q: Quant,
) -> Result<(), TrainError> {
    let n_tokens = tok_md
        .iter()
        .find(|(k, _)| k == "tokenizer.ggml.tokens")
        .and_then(|(_, v)| v.as_array())
        .map_or(0, |a| a.len());
    if n_tokens != c.vocab_size {
        return Err(TrainError::Tokenizer(format!(
            "the tokenizer has {n_tokens} tokens, the model {}",
            c.vocab_size
        )));
    }
    let blk = |i: usize, t: &str| format!("blk.{i}.{t}");
    let d = c.d_model;
    let f32v = |name: String, n: usize, t: Tensor<1>| -> Result<WriteTensor, TrainError> {
        Ok(tensor(name, n, 1, &values(t)?, Quant::F32))
    };
    let mut ts = vec![
        tensor(
            "token_embd.weight".into(),
            d,
            c.vocab_size,
            &values(model.embed.weight.val())?,
            if q == Quant::Q4K { Quant::Q8_0 } else { q },
        ),
        f32v("output_norm.weight".into(), d, model.norm.gamma.val())?,
    ];
    if let Some(h) = &model.head {
        ts.push(linear("output.weight".into(), h, q)?);
    }
    for (i, b) in model.blocks.iter().enumerate() {
        ts.push(f32v(
            blk(i, "attn_norm.weight"),
            d,
            b.attn_norm.gamma.val(),
        )?);
        for (name, p) in [("attn_q", &b.wq), ("attn_k", &b.wk), ("attn_v", &b.wv)] {
            ts.push(linear(blk(i, &format!("{name}.weight")), p, q)?);
            if let Some(bias) = &p.bias {
                let n = bias.val().dims()[0];
                ts.push(f32v(blk(i, &format!("{name}.bias")), n, bias.val())?);
            }
        }
        ts.push(linear(blk(i, "attn_output.weight"), &b.wo, q)?);
        if let (Some(qn), Some(kn)) = (&b.q_norm, &b.k_norm) {
            ts.push(f32v(
                blk(i, "attn_q_norm.weight"),
                c.head_dim(),
                qn.gamma.val(),
            )?);
            ts.push(f32v(
                blk(i, "attn_k_norm.weight"),
                c.head_dim(),
                kn.gamma.val(),
            )?);
        }
        ts.push(f32v(blk(i, "ffn_norm.weight"), d, b.ffn_norm.gamma.val())?);
        if let Some(m) = &b.mlp {
            ts.push(linear(blk(i, "ffn_gate.weight"), &m.gate, q)?);
            ts.push(linear(blk(i, "ffn_up.weight"), &m.up, q)?);
            ts.push(linear(blk(i, "ffn_down.weight"), &m.down, q)?);
        }
        if let Some(m) = &b.moe {
            // The router stays f32: its small differences pick experts.
            ts.push(linear(
                blk(i, "ffn_gate_inp.weight"),
                &m.router,
                Quant::F32,
            )?);
            let g: Vec<&Proj> = m.experts.iter().map(|e| &e.gate).collect();
            let u: Vec<&Proj> = m.experts.iter().map(|e| &e.up).collect();
            let dn: Vec<&Proj> = m.experts.iter().map(|e| &e.down).collect();
            ts.push(experts(blk(i, "ffn_gate_exps.weight"), &g, q)?);
            ts.push(experts(blk(i, "ffn_up_exps.weight"), &u, q)?);
            ts.push(experts(blk(i, "ffn_down_exps.weight"), &dn, q)?);
        }
    }
    let u = |v: usize| Value::U32(v as u32);
    let mut md = vec![
        (
            "general.architecture".to_string(),
            Value::String("llama".into()),
        ),
        ("general.name".to_string(), Value::String(name.into())),
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
    ];
    if let Some(m) = &c.moe {
        md.push(("llama.expert_count".to_string(), u(m.experts)));
        md.push(("llama.expert_used_count".to_string(), u(m.top_k)));
        // Switch-style weights: the router's probabilities, not renormalised.
        md.push(("llama.expert_weights_norm".to_string(), Value::Bool(false)));
    }
    md.extend(tok_md);
    let tmp = path.with_extension("gguf.tmp");
    let mut f = std::io::BufWriter::new(std::fs::File::create(&tmp).map_err(io_err(&tmp))?);
    write_gguf(&mut f, &md, &ts).map_err(io_err(&tmp))?;
    std::io::Write::flush(&mut f).map_err(io_err(&tmp))?;
    drop(f);
    std::fs::rename(&tmp, path).map_err(io_err(path))?;
    Ok(())
}

/// Export the run in `dir` as a Hugging Face directory: `config.json`
/// (llama), `model.safetensors` (f32 or f16; query and key rows in HF's
/// rotate-half order), `tokenizer.json` and `tokenizer_config.json` (ChatML
/// template). `hanlin run DIR` loads it, as do other tools that read HF
/// llama checkpoints.
pub fn export_safetensors(dir: &Path, out: &Path, q: Quant) -> Result<(), TrainError> {
    let device = burn::tensor::Device::default();
    let r = crate::run::load(dir, &device)?;
    let c = &r.cfg.model;
    let crate::tokenizer::Tok::Bpe(tok) = &r.tok else {
        return Err(TrainError::Config(
            "a LoRA run has no tokenizer.json of its own: export it to GGUF".into(),
        ));
    };
    if c.moe.is_some() || c.qk_norm {
        return Err(TrainError::Config(
            "safetensors export covers dense models without QK-norm; export this one to GGUF"
                .into(),
        ));
    }
    let (dtype, width) = match q {
        Quant::F32 => (safetensors::Dtype::F32, 4),
        Quant::F16 => (safetensors::Dtype::F16, 2),
        _ => {
            return Err(TrainError::Config(
                "safetensors holds f32 or f16 weights".into(),
            ))
        }
    };
    let encode = |v: &[f32]| -> Vec<u8> {
        if width == 4 {
            encode_f32(v)
        } else {
            hanlin_kernels::quant::encode_f16(v)
        }
    };
    let hd = c.head_dim();
    // Interleaved pairs (the trainer's RoPE) → HF's halves, per head.
    let unpermute = |rows: Vec<f32>, n_rows: usize, cols: usize| -> Vec<f32> {
        let mut out = vec![0f32; rows.len()];
        for r in 0..n_rows {
            let (head, j) = (r / hd, r % hd);
            let dst = head * hd + if j % 2 == 0 { j / 2 } else { j / 2 + hd / 2 };
            out[dst * cols..(dst + 1) * cols].copy_from_slice(&rows[r * cols..(r + 1) * cols]);
        }
        out
    };
    let mut tensors: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    let mut push =
        |name: String, shape: Vec<usize>, v: Vec<f32>| tensors.push((name, shape, encode(&v)));
    // `[out, in]` rows, as HF stores linear weights.
    let rows = |p: &Proj| -> Result<(Vec<f32>, usize, usize), TrainError> {
        let w = p.merged();
        let [d_in, d_out] = w.dims();
        Ok((values(w.transpose())?, d_out, d_in))
    };
    push(
        "model.embed_tokens.weight".into(),
        vec![c.vocab_size, c.d_model],
        values(model_embed(&r.model))?,
    );
    push(
        "model.norm.weight".into(),
        vec![c.d_model],
        values(r.model.norm.gamma.val())?,
    );
    for (i, b) in r.model.blocks.iter().enumerate() {
        let n = |t: &str| format!("model.layers.{i}.{t}");
        push(
            n("input_layernorm.weight"),
            vec![c.d_model],
            values(b.attn_norm.gamma.val())?,
        );
        push(
            n("post_attention_layernorm.weight"),
            vec![c.d_model],
            values(b.ffn_norm.gamma.val())?,
        );
        for (name, p, rotary) in [
            ("self_attn.q_proj", &b.wq, true),
            ("self_attn.k_proj", &b.wk, true),
            ("self_attn.v_proj", &b.wv, false),
            ("self_attn.o_proj", &b.wo, false),
        ] {
            let (v, o, i2) = rows(p)?;
            let v = if rotary { unpermute(v, o, i2) } else { v };
            push(n(&format!("{name}.weight")), vec![o, i2], v);
        }
        let Some(m) = &b.mlp else { continue };
        for (name, p) in [
            ("mlp.gate_proj", &m.gate),
            ("mlp.up_proj", &m.up),
            ("mlp.down_proj", &m.down),
        ] {
            let (v, o, i2) = rows(p)?;
            push(n(&format!("{name}.weight")), vec![o, i2], v);
        }
    }
    std::fs::create_dir_all(out).map_err(io_err(out))?;
    let views = tensors
        .iter()
        .map(|(n, shape, data)| {
            safetensors::tensor::TensorView::new(dtype, shape.clone(), data)
                .map(|v| (n.clone(), v))
                .map_err(|e| TrainError::Config(format!("{n}: {e}")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let st = out.join("model.safetensors");
    safetensors::tensor::serialize_to_file(views, None, &st).map_err(|e| TrainError::Io {
        path: st.display().to_string(),
        source: std::io::Error::other(e),
    })?;
    let eos = tok.token_to_id("<|im_end|>");
    let config = serde_json::json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": c.d_model,
        "intermediate_size": c.d_ff,
        "num_hidden_layers": c.n_layer,
        "num_attention_heads": c.n_head,
        "num_key_value_heads": c.kv_heads(),
        "head_dim": hd,
        "max_position_embeddings": c.context,
        "rope_theta": c.rope_base,
        "rms_norm_eps": c.norm_eps,
        "vocab_size": c.vocab_size,
        "tie_word_embeddings": true,
        "hidden_act": "silu",
        "eos_token_id": eos,
        "torch_dtype": if width == 4 { "float32" } else { "float16" },
    });
    crate::trainer::write_json(&out.join("config.json"), &config)?;
    crate::tokenizer::save(tok, &out.join("tokenizer.json"))?;
    let tc = serde_json::json!({
        "eos_token": "<|im_end|>",
        "pad_token": crate::tokenizer::END_OF_TEXT,
        "add_bos_token": false,
        "chat_template": hanlin_tokenizer::CHATML,
    });
    crate::trainer::write_json(&out.join("tokenizer_config.json"), &tc)
}

fn model_embed(m: &Gpt) -> Tensor<2> {
    m.embed.weight.val()
}
