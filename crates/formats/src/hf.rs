//! Hugging Face model directories (`config.json`, `tokenizer.json`,
//! `tokenizer_config.json`, `*.safetensors`) converted in memory to the GGUF
//! form the engine loads: llama.cpp's metadata keys and tensor names, Q/K rows
//! of llama models permuted to the interleaved RoPE layout, Gemma norm weights
//! stored with their +1 offset. One representation downstream keeps one
//! loading path.

use crate::gguf::Value;
use crate::writer::WriteTensor;
use crate::{FormatError, GgmlType};
use serde_json::Value as Json;
use std::path::Path;

fn bad(msg: impl Into<String>) -> FormatError {
    FormatError::Invalid {
        offset: 0,
        msg: msg.into(),
    }
}

fn read_json(path: &Path) -> Result<Json, FormatError> {
    let text = std::fs::read_to_string(path).map_err(|e| FormatError::Io {
        path: path.display().to_string(),
        source: e,
    })?;
    serde_json::from_str(&text).map_err(|e| bad(format!("{}: {e}", path.display())))
}

fn num(cfg: &Json, key: &str) -> Option<u64> {
    cfg.get(key).and_then(Json::as_u64)
}

/// GGUF architecture name for a `config.json` `model_type`.
fn arch_of(model_type: &str) -> Result<&'static str, FormatError> {
    Ok(match model_type {
        "llama" | "mistral" => "llama",
        "qwen2" => "qwen2",
        "qwen3" => "qwen3",
        "gemma3" | "gemma3_text" => "gemma3",
        other => {
            return Err(bad(format!(
                "config.json model_type {other:?} is not supported for safetensors import (llama, mistral, qwen2, qwen3, gemma3)"
            )))
        }
    })
}

/// GGUF tensor name for an HF tensor name (`None`: not used by the engine).
fn gguf_name(hf: &str, gemma: bool) -> Option<String> {
    let hf = hf.strip_prefix("language_model.").unwrap_or(hf);
    match hf {
        "model.embed_tokens.weight" => return Some("token_embd.weight".into()),
        "model.norm.weight" => return Some("output_norm.weight".into()),
        "lm_head.weight" => return Some("output.weight".into()),
        _ => {}
    }
    let rest = hf.strip_prefix("model.layers.")?;
    let (idx, t) = rest.split_once('.')?;
    let i: usize = idx.parse().ok()?;
    let g = match t {
        "input_layernorm.weight" => "attn_norm.weight",
        "self_attn.q_proj.weight" => "attn_q.weight",
        "self_attn.k_proj.weight" => "attn_k.weight",
        "self_attn.v_proj.weight" => "attn_v.weight",
        "self_attn.q_proj.bias" => "attn_q.bias",
        "self_attn.k_proj.bias" => "attn_k.bias",
        "self_attn.v_proj.bias" => "attn_v.bias",
        "self_attn.o_proj.weight" => "attn_output.weight",
        "self_attn.q_norm.weight" => "attn_q_norm.weight",
        "self_attn.k_norm.weight" => "attn_k_norm.weight",
        "post_attention_layernorm.weight" if gemma => "post_attention_norm.weight",
        "post_attention_layernorm.weight" => "ffn_norm.weight",
        "pre_feedforward_layernorm.weight" => "ffn_norm.weight",
        "post_feedforward_layernorm.weight" => "post_ffw_norm.weight",
        "mlp.gate_proj.weight" => "ffn_gate.weight",
        "mlp.up_proj.weight" => "ffn_up.weight",
        "mlp.down_proj.weight" => "ffn_down.weight",
        _ => return None,
    };
    Some(format!("blk.{i}.{g}"))
}

/// Rows of a llama Q or K projection reordered from HF's half-split RoPE
/// layout to the interleaved one (what llama.cpp's converter does).
pub fn permute_qk_rows(data: &[u8], n_head: usize, head_dim: usize, row_bytes: usize) -> Vec<u8> {
    let mut out = vec![0u8; data.len()];
    let half = head_dim / 2;
    for h in 0..n_head {
        for i in 0..half {
            for j in 0..2 {
                let dst = h * head_dim + 2 * i + j;
                let src = h * head_dim + j * half + i;
                out[dst * row_bytes..(dst + 1) * row_bytes]
                    .copy_from_slice(&data[src * row_bytes..(src + 1) * row_bytes]);
            }
        }
    }
    out
}

/// Tokenizer metadata (`tokenizer.ggml.*`) from `tokenizer.json` and friends.
fn tokenizer_metadata(dir: &Path, md: &mut Vec<(String, Value)>) -> Result<(), FormatError> {
    let tj = read_json(&dir.join("tokenizer.json"))?;
    let model = tj
        .get("model")
        .ok_or_else(|| bad("tokenizer.json has no model"))?;
    if model.get("type").and_then(Json::as_str) != Some("BPE") {
        return Err(bad("only BPE tokenizer.json files are supported"));
    }
    let vocab = model
        .get("vocab")
        .and_then(Json::as_object)
        .ok_or_else(|| bad("tokenizer.json model has no vocab"))?;
    let mut n = vocab
        .values()
        .filter_map(Json::as_u64)
        .max()
        .map(|m| m as usize + 1)
        .unwrap_or(0);
    let added = tj
        .get("added_tokens")
        .and_then(Json::as_array)
        .cloned()
        .unwrap_or_default();
    for a in &added {
        if let Some(id) = a.get("id").and_then(Json::as_u64) {
            n = n.max(id as usize + 1);
        }
    }
    if n == 0 || n > 4_000_000 {
        return Err(bad(format!(
            "tokenizer.json vocabulary size {n} is not plausible"
        )));
    }
    let mut tokens: Vec<String> = (0..n).map(|i| format!("[PAD{i}]")).collect();
    let mut types = vec![1i32; n];
    for (t, id) in vocab {
        if let Some(id) = id.as_u64() {
            tokens[id as usize] = t.clone();
        }
    }
    let merges: Vec<String> = model
        .get("merges")
        .and_then(Json::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|m| match m {
                    Json::String(s) => Some(s.clone()),
                    Json::Array(p) if p.len() == 2 => {
                        Some(format!("{} {}", p[0].as_str()?, p[1].as_str()?))
                    }
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    for a in &added {
        let (Some(id), Some(content)) = (
            a.get("id").and_then(Json::as_u64),
            a.get("content").and_then(Json::as_str),
        ) else {
            continue;
        };
        tokens[id as usize] = content.to_string();
        types[id as usize] = if a.get("special").and_then(Json::as_bool).unwrap_or(false) {
            3
        } else {
            4
        };
    }
    let pre_json = tj
        .get("pre_tokenizer")
        .map(|p| p.to_string())
        .unwrap_or_default();
    let byte_level = pre_json.contains("ByteLevel");
    if byte_level {
        let pre = if pre_json.contains(r"\\p{N}{1,3}") {
            "llama-bpe"
        } else if pre_json.contains(r"[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}|") {
            "qwen2"
        } else if pre_json.contains("Digits") {
            "smollm"
        } else {
            "default"
        };
        md.push(("tokenizer.ggml.model".into(), Value::String("gpt2".into())));
        md.push(("tokenizer.ggml.pre".into(), Value::String(pre.into())));
        md.push((
            "tokenizer.ggml.merges".into(),
            Value::Array(merges.into_iter().map(Value::String).collect()),
        ));
    } else {
        // SentencePiece-derived BPE (byte fallback): rank merges by score.
        let mut scores = vec![0f32; n];
        let index: std::collections::HashMap<&str, usize> = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.as_str(), i))
            .collect();
        for (rank, m) in merges.iter().enumerate() {
            if let Some(&id) = index.get(m.replacen(' ', "", 1).as_str()) {
                if scores[id] == 0.0 {
                    scores[id] = -(rank as f32) - 1.0; // the first merge making a piece ranks it
                }
            }
        }
        for (i, t) in tokens.iter().enumerate() {
            if types[i] == 1 && t.len() == 6 && t.starts_with("<0x") && t.ends_with('>') {
                types[i] = 6;
            }
        }
        let prepend = tj
            .get("normalizer")
            .map(|n| n.to_string().contains("Prepend"))
            .unwrap_or(false);
        md.push(("tokenizer.ggml.model".into(), Value::String("llama".into())));
        md.push((
            "tokenizer.ggml.scores".into(),
            Value::Array(scores.into_iter().map(Value::F32).collect()),
        ));
        md.push((
            "tokenizer.ggml.add_space_prefix".into(),
            Value::Bool(prepend),
        ));
    }
    let cfg = read_json(&dir.join("tokenizer_config.json")).unwrap_or(Json::Null);
    let find = |key: &str| -> Option<u32> {
        let v = cfg.get(key)?;
        let s = v
            .as_str()
            .or_else(|| v.get("content").and_then(Json::as_str))?;
        tokens.iter().position(|t| t == s).map(|i| i as u32)
    };
    if let Some(b) = find("bos_token") {
        md.push(("tokenizer.ggml.bos_token_id".into(), Value::U32(b)));
    }
    let gen = read_json(&dir.join("generation_config.json")).unwrap_or(Json::Null);
    let eos = find("eos_token").or_else(|| match gen.get("eos_token_id") {
        Some(Json::Number(n)) => n.as_u64().map(|v| v as u32),
        Some(Json::Array(a)) => a.first().and_then(Json::as_u64).map(|v| v as u32),
        _ => None,
    });
    if let Some(e) = eos {
        md.push(("tokenizer.ggml.eos_token_id".into(), Value::U32(e)));
    }
    let add_bos = cfg
        .get("add_bos_token")
        .and_then(Json::as_bool)
        .unwrap_or(false);
    md.push(("tokenizer.ggml.add_bos_token".into(), Value::Bool(add_bos)));
    let template = match cfg.get("chat_template") {
        Some(Json::String(s)) => Some(s.clone()),
        Some(Json::Array(a)) => a
            .iter()
            .find(|t| t.get("name").and_then(Json::as_str) == Some("default"))
            .and_then(|t| t.get("template").and_then(Json::as_str))
            .map(str::to_string),
        _ => None,
    };
    if let Some(t) = template {
        md.push(("tokenizer.chat_template".into(), Value::String(t)));
    }
    md.push((
        "tokenizer.ggml.tokens".into(),
        Value::Array(tokens.into_iter().map(Value::String).collect()),
    ));
    md.push((
        "tokenizer.ggml.token_type".into(),
        Value::Array(types.into_iter().map(Value::I32).collect()),
    ));
    Ok(())
}

/// Build GGUF bytes (in memory) from a Hugging Face model directory.
pub fn hf_dir_to_gguf(dir: &Path) -> Result<Vec<u8>, FormatError> {
    let cfg = read_json(&dir.join("config.json"))?;
    let cfg = cfg.get("text_config").cloned().unwrap_or(cfg);
    let model_type = cfg
        .get("model_type")
        .and_then(Json::as_str)
        .ok_or_else(|| bad("config.json has no model_type"))?;
    let arch = arch_of(model_type)?;
    let need = |k: &str| num(&cfg, k).ok_or_else(|| bad(format!("config.json lacks {k}")));
    let d = need("hidden_size")?;
    let n_head = need("num_attention_heads")?;
    let n_kv = num(&cfg, "num_key_value_heads").unwrap_or(n_head);
    let head_dim = num(&cfg, "head_dim").unwrap_or(d / n_head.max(1));
    let gemma = arch == "gemma3";
    let k = |s: &str| format!("{arch}.{s}");
    let mut md: Vec<(String, Value)> = vec![
        ("general.architecture".into(), Value::String(arch.into())),
        (k("block_count"), Value::U64(need("num_hidden_layers")?)),
        (k("embedding_length"), Value::U64(d)),
        (
            k("feed_forward_length"),
            Value::U64(need("intermediate_size")?),
        ),
        (k("attention.head_count"), Value::U64(n_head)),
        (k("attention.head_count_kv"), Value::U64(n_kv)),
        (k("attention.key_length"), Value::U64(head_dim)),
        (
            k("context_length"),
            Value::U64(num(&cfg, "max_position_embeddings").unwrap_or(4096)),
        ),
        (
            k("rope.freq_base"),
            Value::F32(
                cfg.get("rope_theta")
                    .and_then(Json::as_f64)
                    .unwrap_or(10000.0) as f32,
            ),
        ),
        (
            k("attention.layer_norm_rms_epsilon"),
            Value::F32(
                cfg.get("rms_norm_eps")
                    .and_then(Json::as_f64)
                    .unwrap_or(1e-6) as f32,
            ),
        ),
    ];
    if let (true, Some(w)) = (gemma, num(&cfg, "sliding_window")) {
        md.push((k("attention.sliding_window"), Value::U64(w)));
    }
    tokenizer_metadata(dir, &mut md)?;

    let mut files: Vec<_> = std::fs::read_dir(dir)
        .map_err(|e| FormatError::Io {
            path: dir.display().to_string(),
            source: e,
        })?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(bad(format!("{} has no .safetensors files", dir.display())));
    }
    let mut tensors = Vec::new();
    for f in &files {
        let bytes = std::fs::read(f).map_err(|e| FormatError::Io {
            path: f.display().to_string(),
            source: e,
        })?;
        let st = safetensors::SafeTensors::deserialize(&bytes)
            .map_err(|e| bad(format!("{}: {e}", f.display())))?;
        for (name, view) in st.tensors() {
            let Some(gname) = gguf_name(&name, gemma) else {
                continue;
            };
            let ty = match view.dtype() {
                safetensors::Dtype::F32 => GgmlType::F32,
                safetensors::Dtype::F16 => GgmlType::F16,
                safetensors::Dtype::BF16 => GgmlType::BF16,
                other => {
                    return Err(bad(format!(
                        "tensor {name}: dtype {other:?} is not supported"
                    )))
                }
            };
            let shape = view.shape();
            if shape.is_empty() || shape.len() > 2 {
                return Err(bad(format!(
                    "tensor {name}: shape {shape:?} is not 1-D or 2-D"
                )));
            }
            let dims: Vec<u64> = shape.iter().rev().map(|&x| x as u64).collect();
            let mut data = view.data().to_vec();
            let is_norm = gname.ends_with("norm.weight");
            if gemma && is_norm {
                let mut v = vec![0f32; data.len() / ty.type_size()];
                crate::dequant_float(ty, &data, &mut v);
                data = v.iter().flat_map(|x| (x + 1.0).to_le_bytes()).collect();
                tensors.push(WriteTensor {
                    name: gname,
                    dims,
                    ty: GgmlType::F32,
                    data,
                });
                continue;
            }
            if arch == "llama"
                && (gname.ends_with("attn_q.weight") || gname.ends_with("attn_k.weight"))
            {
                let heads = if gname.ends_with("attn_q.weight") {
                    n_head
                } else {
                    n_kv
                } as usize;
                let row_bytes = ty.row_bytes(dims[0] as usize);
                data = permute_qk_rows(&data, heads, head_dim as usize, row_bytes);
            }
            tensors.push(WriteTensor {
                name: gname,
                dims,
                ty,
                data,
            });
        }
    }
    let mut out = Vec::new();
    crate::writer::write_gguf(&mut out, &md, &tensors)
        .map_err(|e| bad(format!("building GGUF: {e}")))?;
    Ok(out)
}
