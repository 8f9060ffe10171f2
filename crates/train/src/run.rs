//! Run directories and base models.
//!
//! A run trained here holds `config.toml` (`[model]` and `[train]`),
//! `tokenizer.json`, `checkpoint/` (`model.bpk`, `optim.bpk`,
//! `state.json`), `loss.csv`, `loss.png` and `summary.json`. A LoRA run
//! holds `lora.json` (the base GGUF, rank, alpha, targets) instead of a
//! tokenizer, and its checkpoint keeps only the adapters.
//!
//! [`from_gguf`] reads a llama-architecture GGUF (SmolLM2, a model exported
//! by [`crate::export`]) into the trainer's [`Gpt`], dequantizing its
//! weights to f32.

use crate::config::{GptConfig, MoeConfig, RunConfig};
use crate::model::{Gpt, Proj};
use crate::tokenizer::Tok;
use crate::trainer::Trainable;
use crate::{io_err, TrainError};
use burn::module::Param;
use burn::tensor::{Device, Tensor, TensorData};
use hanlin_formats::GgufFile;
use std::path::{Path, PathBuf};

/// Where a LoRA run's frozen weights come from.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct LoraInfo {
    /// The base model's GGUF file.
    pub base: PathBuf,
    /// Its name (for messages).
    pub base_name: String,
    pub rank: usize,
    pub alpha: f64,
    /// Projections adapted: `wq wk wv wo gate up down`.
    pub targets: Vec<String>,
}

/// A loaded run: its configuration, model and tokenizer.
pub struct Run {
    pub cfg: RunConfig,
    pub model: Gpt,
    pub tok: Tok,
    pub lora: Option<LoraInfo>,
}

pub fn write_config(out: &Path, cfg: &RunConfig) -> Result<(), TrainError> {
    let p = out.join("config.toml");
    let text = toml::to_string(cfg).map_err(|e| TrainError::Config(e.to_string()))?;
    std::fs::write(&p, text).map_err(io_err(&p))
}

fn read_config(run: &Path) -> Result<RunConfig, TrainError> {
    let p = run.join("config.toml");
    if !p.exists() {
        return Err(TrainError::Config(format!(
            "{} is not a training run (no config.toml)",
            run.display()
        )));
    }
    let text = std::fs::read_to_string(&p).map_err(io_err(&p))?;
    RunConfig::from_toml(&text)
}

/// Load the last checkpoint of the run in `dir`.
pub fn load(dir: &Path, device: &Device) -> Result<Run, TrainError> {
    let cfg = read_config(dir)?;
    let ck = crate::trainer::checkpoint_dir(dir);
    if !crate::trainer::has_checkpoint(dir)? {
        return Err(TrainError::Checkpoint {
            path: ck.display().to_string(),
            reason: "the run has no checkpoint yet".into(),
        });
    }
    let lora_path = dir.join("lora.json");
    if lora_path.exists() {
        let info: LoraInfo =
            serde_json::from_slice(&std::fs::read(&lora_path).map_err(io_err(&lora_path))?)
                .map_err(|e| TrainError::Config(format!("{}: {e}", lora_path.display())))?;
        let (_, model, tok) = from_gguf(&info.base, device)?;
        let model = model.with_lora(info.rank, info.alpha, &info.targets);
        let model = model.load_weights(&crate::trainer::weights_dir(&ck))?;
        return Ok(Run {
            cfg,
            model,
            tok,
            lora: Some(info),
        });
    }
    let tok = Tok::Bpe(Box::new(crate::tokenizer::load(
        &dir.join("tokenizer.json"),
    )?));
    let model = Gpt::new(&cfg.model, device).load_weights(&crate::trainer::weights_dir(&ck))?;
    Ok(Run {
        cfg,
        model,
        tok,
        lora: None,
    })
}

/// Start a new run in `out` from the run `from`: the model's shape and
/// tokenizer (or LoRA base) are carried over with the new `train` settings.
pub fn start_from(
    from: &Run,
    from_dir: &Path,
    out: &Path,
    cfg: &RunConfig,
) -> Result<(), TrainError> {
    std::fs::create_dir_all(out).map_err(io_err(out))?;
    write_config(out, cfg)?;
    match &from.lora {
        Some(info) => crate::trainer::write_json(&out.join("lora.json"), info),
        None => {
            let (src, dst) = (from_dir.join("tokenizer.json"), out.join("tokenizer.json"));
            if src != dst {
                std::fs::copy(&src, &dst).map_err(io_err(&dst))?;
            }
            Ok(())
        }
    }
}

fn bad(path: &Path, reason: impl Into<String>) -> TrainError {
    TrainError::Checkpoint {
        path: path.display().to_string(),
        reason: reason.into(),
    }
}

/// Read a llama-architecture GGUF into a [`Gpt`] (f32 weights) with its
/// tokenizer.
pub fn from_gguf(path: &Path, device: &Device) -> Result<(GptConfig, Gpt, Tok), TrainError> {
    let file = GgufFile::open(path).map_err(|e| bad(path, e.to_string()))?;
    let h = &file.header;
    let arch = h.architecture().unwrap_or("").to_string();
    // Qwen2 rotates the two halves of each head (NEOX style); the trainer
    // rotates interleaved pairs. Reordering the query and key features of
    // every head (i ↦ 2i, i + hd/2 ↦ 2i + 1) turns one into the other, and
    // attention scores do not change: the model is exported as llama.
    let neox = match arch.as_str() {
        "llama" => false,
        "qwen2" => true,
        _ => {
            return Err(bad(
                path,
                format!("training on a {arch:?} model is not supported yet (llama and qwen2 architectures: SmolLM2, Qwen2.5, models exported by hanlin)"),
            ))
        }
    };
    let k = |s: &str| format!("{arch}.{s}");
    let num = |s: &str| {
        h.get_u64(&k(s))
            .map(|v| v as usize)
            .ok_or_else(|| bad(path, format!("no {}", k(s))))
    };
    let d = num("embedding_length")?;
    let n_head = num("attention.head_count")?;
    let tok = Tok::Gguf(Box::new(
        hanlin_tokenizer::Tokenizer::from_gguf(h).map_err(|e| bad(path, e.to_string()))?,
    ));
    let moe = match h.get_u64(&k("expert_count")) {
        Some(e) if e > 1 => Some(MoeConfig {
            experts: e as usize,
            top_k: num("expert_used_count")?,
            aux_weight: 0.01,
        }),
        _ => None,
    };
    let cfg = GptConfig {
        n_layer: num("block_count")?,
        d_model: d,
        n_head,
        n_head_kv: Some(
            h.get_u64(&k("attention.head_count_kv"))
                .map_or(n_head, |v| v as usize),
        ),
        d_ff: num("feed_forward_length")?,
        context: num("context_length")?.min(8192),
        vocab_size: tok.vocab_size(),
        rope_base: h.get_f64(&k("rope.freq_base")).unwrap_or(10000.0) as f32,
        norm_eps: h
            .get_f64(&k("attention.layer_norm_rms_epsilon"))
            .unwrap_or(1e-5),
        qk_norm: h.tensor("blk.0.attn_q_norm.weight").is_some(),
        moe,
    };
    cfg.validate()?;
    if cfg.head_dim() != num("rope.dimension_count").unwrap_or(cfg.head_dim()) {
        return Err(bad(path, "partial rotary embeddings are not supported"));
    }
    let mut model = Gpt::new(&cfg, device);
    // The permutation of one head's features, NEOX → interleaved.
    let hd = cfg.head_dim();
    let order: Vec<usize> = (0..hd)
        .map(|j| if j % 2 == 0 { j / 2 } else { j / 2 + hd / 2 })
        .collect();
    let permute = |v: Vec<f32>, rows: usize, cols: usize| -> Vec<f32> {
        // Rows are output features, heads of `hd` one after the other.
        let mut out = vec![0f32; v.len()];
        for r in 0..rows {
            let (head, j) = (r / hd, r % hd);
            let src = head * hd + order[j];
            out[r * cols..(r + 1) * cols].copy_from_slice(&v[src * cols..(src + 1) * cols]);
        }
        out
    };
    // A tensor as `[rows, cols]` f32 values (GGUF rows are output features).
    let read = |name: &str| -> Result<(Vec<f32>, usize, usize), TrainError> {
        let t = h
            .tensor(name)
            .ok_or_else(|| bad(path, format!("no tensor {name}")))?;
        let (cols, rows) = (t.row_len(), t.n_rows());
        let bytes = file.tensor_data(t);
        let row_bytes = t.ty.row_bytes(cols);
        if bytes.len() < row_bytes * rows {
            return Err(bad(path, format!("tensor {name} is truncated")));
        }
        let mut v = vec![0f32; rows * cols];
        for (r, o) in v.chunks_exact_mut(cols).enumerate() {
            hanlin_kernels::quant::dequantize_row(
                t.ty,
                &bytes[r * row_bytes..(r + 1) * row_bytes],
                o,
            );
        }
        Ok((v, rows, cols))
    };
    let vec1 = |name: &str, n: usize| -> Result<Param<Tensor<1>>, TrainError> {
        let (v, rows, cols) = read(name)?;
        if rows * cols != n {
            return Err(bad(
                path,
                format!("{name} has {} values, not {n}", rows * cols),
            ));
        }
        Ok(Param::from_tensor(Tensor::from_data(
            TensorData::new(v, [n]),
            device,
        )))
    };
    // burn keeps `[d_in, d_out]`: GGUF's rows transposed. `rotary`: the
    // query or key projection (reordered for NEOX models), with its bias.
    let proj = |name: &str, d_in: usize, d_out: usize, rotary: bool| -> Result<Proj, TrainError> {
        let w = format!("{name}.weight");
        let (v, rows, cols) = read(&w)?;
        if (rows, cols) != (d_out, d_in) {
            return Err(bad(
                path,
                format!("{w} is {rows}×{cols}, expected {d_out}×{d_in}"),
            ));
        }
        let v = if rotary && neox {
            permute(v, rows, cols)
        } else {
            v
        };
        let t = Tensor::<2>::from_data(TensorData::new(v, [d_out, d_in]), device);
        let mut p = Proj::from_tensor(t.transpose());
        let b = format!("{name}.bias");
        if h.tensor(&b).is_some() {
            let (v, rows, cols) = read(&b)?;
            if rows * cols != d_out {
                return Err(bad(
                    path,
                    format!("{b} has {} values, not {d_out}", rows * cols),
                ));
            }
            let v = if rotary && neox {
                permute(v, d_out, 1)
            } else {
                v
            };
            p.bias = Some(Param::from_tensor(Tensor::from_data(
                TensorData::new(v, [d_out]),
                device,
            )));
        }
        Ok(p)
    };
    let mat = |name: &str, d_in: usize, d_out: usize| -> Result<Proj, TrainError> {
        proj(name.trim_end_matches(".weight"), d_in, d_out, false)
    };
    let (e, _, _) = read("token_embd.weight")?;
    if e.len() != cfg.vocab_size * d {
        return Err(bad(path, "token_embd.weight does not match the vocabulary"));
    }
    model.embed.weight = Param::from_tensor(Tensor::from_data(
        TensorData::new(e, [cfg.vocab_size, d]),
        device,
    ));
    model.norm.gamma = vec1("output_norm.weight", d)?;
    if h.tensor("output.weight").is_some() {
        model.head = Some(mat("output.weight", d, cfg.vocab_size)?);
    }
    let kv = cfg.kv_heads() * cfg.head_dim();
    for (i, b) in model.blocks.iter_mut().enumerate() {
        let n = |t: &str| format!("blk.{i}.{t}.weight");
        b.attn_norm.gamma = vec1(&n("attn_norm"), d)?;
        b.ffn_norm.gamma = vec1(&n("ffn_norm"), d)?;
        let p = |t: &str| format!("blk.{i}.{t}");
        b.wq = proj(&p("attn_q"), d, n_head * hd, true)?;
        b.wk = proj(&p("attn_k"), d, kv, true)?;
        b.wv = proj(&p("attn_v"), d, kv, false)?;
        b.wo = mat(&n("attn_output"), n_head * hd, d)?;
        if neox && b.q_norm.is_some() {
            return Err(bad(
                path,
                "QK-norm with NEOX rotary embeddings is not supported",
            ));
        }
        if let Some(q) = &mut b.q_norm {
            q.gamma = vec1(&n("attn_q_norm"), hd)?;
        }
        if let Some(q) = &mut b.k_norm {
            q.gamma = vec1(&n("attn_k_norm"), hd)?;
        }
        if let Some(m) = &mut b.mlp {
            m.gate = mat(&n("ffn_gate"), d, cfg.d_ff)?;
            m.up = mat(&n("ffn_up"), d, cfg.d_ff)?;
            m.down = mat(&n("ffn_down"), cfg.d_ff, d)?;
        }
        if let Some(m) = &mut b.moe {
            m.router = mat(&n("ffn_gate_inp"), d, m.experts.len())?;
            let ff = cfg.d_ff;
            let (g, _, _) = read(&n("ffn_gate_exps"))?;
            let (u, _, _) = read(&n("ffn_up_exps"))?;
            let (dn, _, _) = read(&n("ffn_down_exps"))?;
            if g.len() != ff * d * m.experts.len() || dn.len() != g.len() || u.len() != g.len() {
                return Err(bad(path, format!("blk.{i} experts have the wrong size")));
            }
            for (x, ex) in m.experts.iter_mut().enumerate() {
                let part = |v: &[f32], rows: usize, cols: usize| {
                    let s = &v[x * rows * cols..(x + 1) * rows * cols];
                    Proj::from_tensor(
                        Tensor::<2>::from_data(TensorData::new(s.to_vec(), [rows, cols]), device)
                            .transpose(),
                    )
                };
                ex.gate = part(&g, ff, d);
                ex.up = part(&u, ff, d);
                ex.down = part(&dn, d, ff);
            }
        }
    }
    Ok((cfg, model, tok))
}
