//! Hugging Face directories (config.json + tokenizer.json + safetensors) load
//! into the same model as the equivalent GGUF file.

use hanlin_engine::{KvCache, KvShape, Logits, Model};
use hanlin_formats::hf::permute_qk_rows;
use hanlin_formats::writer::{write_gguf, WriteTensor};
use hanlin_formats::{GgmlType, Value};
use hanlin_kernels::ops::{Rope, RopeStyle};
use hanlin_kernels::ThreadPool;
use rand::{Rng, SeedableRng};
use std::collections::HashMap;

const D: usize = 64;
const FF: usize = 96;
const HEADS: usize = 4;
const KV: usize = 2;
const HD: usize = D / HEADS;
const LAYERS: usize = 2;
const VOCAB: usize = 256;

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// HF tensors (name, [out, in] shape, values) for a tiny model.
fn hf_tensors(qwen: bool) -> Vec<(String, Vec<usize>, Vec<f32>)> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
    let mut t = Vec::new();
    let mat = |name: String, rows: usize, cols: usize, rng: &mut rand_chacha::ChaCha8Rng| {
        let v: Vec<f32> = (0..rows * cols)
            .map(|_| rng.random_range(-1.0..1.0f32) / (cols as f32).sqrt() * 1.7)
            .collect();
        (
            name,
            if cols == 1 {
                vec![rows]
            } else {
                vec![rows, cols]
            },
            v,
        )
    };
    t.push(mat("model.embed_tokens.weight".into(), VOCAB, D, &mut rng));
    t.push(mat("lm_head.weight".into(), VOCAB, D, &mut rng));
    t.push(("model.norm.weight".into(), vec![D], vec![1.0; D]));
    for i in 0..LAYERS {
        let p = |s: &str| format!("model.layers.{i}.{s}");
        t.push((p("input_layernorm.weight"), vec![D], vec![1.0; D]));
        t.push((p("post_attention_layernorm.weight"), vec![D], vec![1.0; D]));
        t.push(mat(p("self_attn.q_proj.weight"), D, D, &mut rng));
        t.push(mat(p("self_attn.k_proj.weight"), KV * HD, D, &mut rng));
        t.push(mat(p("self_attn.v_proj.weight"), KV * HD, D, &mut rng));
        t.push(mat(p("self_attn.o_proj.weight"), D, D, &mut rng));
        if qwen {
            t.push(mat(p("self_attn.q_proj.bias"), D, 1, &mut rng));
            t.push(mat(p("self_attn.k_proj.bias"), KV * HD, 1, &mut rng));
            t.push(mat(p("self_attn.v_proj.bias"), KV * HD, 1, &mut rng));
        }
        t.push(mat(p("mlp.gate_proj.weight"), FF, D, &mut rng));
        t.push(mat(p("mlp.up_proj.weight"), FF, D, &mut rng));
        t.push(mat(p("mlp.down_proj.weight"), D, FF, &mut rng));
    }
    t
}

fn write_hf_dir(
    dir: &std::path::Path,
    model_type: &str,
    tensors: &[(String, Vec<usize>, Vec<f32>)],
) {
    let cfg = serde_json::json!({
        "model_type": model_type, "hidden_size": D, "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS, "num_key_value_heads": KV, "intermediate_size": FF,
        "vocab_size": VOCAB, "max_position_embeddings": 128, "rope_theta": 10000.0, "rms_norm_eps": 1e-5
    });
    std::fs::write(dir.join("config.json"), cfg.to_string()).expect("config");
    // Byte-level BPE over the 256 byte symbols, no merges.
    let vocab: serde_json::Map<String, serde_json::Value> = (0..VOCAB)
        .map(|b| (byte_char(b as u8).to_string(), serde_json::json!(b)))
        .collect();
    let tok = serde_json::json!({
        "added_tokens": [],
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": true},
        "model": {"type": "BPE", "vocab": vocab, "merges": []}
    });
    std::fs::write(dir.join("tokenizer.json"), tok.to_string()).expect("tokenizer");
    std::fs::write(
        dir.join("tokenizer_config.json"),
        r#"{"add_bos_token": false}"#,
    )
    .expect("tokenizer config");
    let bytes: Vec<(String, Vec<usize>, Vec<u8>)> = tensors
        .iter()
        .map(|(n, s, v)| (n.clone(), s.clone(), f32_bytes(v)))
        .collect();
    let views: Vec<(String, safetensors::tensor::TensorView)> = bytes
        .iter()
        .map(|(n, s, b)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), b)
                    .expect("view"),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, &dir.join("model.safetensors"))
        .expect("safetensors");
}

/// GPT-2's byte → printable-char mapping.
fn byte_char(b: u8) -> char {
    let mut n = 0u32;
    for x in 0..=255u8 {
        let printable =
            (b'!'..=b'~').contains(&x) || (0xA1..=0xAC).contains(&x) || (0xAE..=0xFF).contains(&x);
        if x == b {
            return if printable {
                x as char
            } else {
                char::from_u32(256 + n).expect("char")
            };
        }
        if !printable {
            n += 1;
        }
    }
    unreachable!()
}

fn logits(model: &Model) -> Vec<f32> {
    let mut c = KvCache::new(KvShape::of(&model.cfg), 32);
    model
        .forward(
            &ThreadPool::new(2),
            &[7, 200, 31, 99, 5],
            &mut c,
            Logits::All,
        )
        .expect("forward")
}

#[test]
fn qwen2_safetensors_dir_equals_gguf() {
    let dir = tempfile::tempdir().expect("tmp");
    let tensors = hf_tensors(true);
    write_hf_dir(dir.path(), "qwen2", &tensors);
    let from_dir = Model::load(dir.path()).expect("load dir");
    // The same weights written as GGUF under llama.cpp's names.
    let names: HashMap<&str, String> = tensors
        .iter()
        .map(|(n, _, _)| {
            let g = n
                .replace("model.embed_tokens.weight", "token_embd.weight")
                .replace("lm_head.weight", "output.weight")
                .replace("model.norm.weight", "output_norm.weight")
                .replace("model.layers.", "blk.")
                .replace("input_layernorm", "attn_norm")
                .replace("post_attention_layernorm", "ffn_norm")
                .replace("self_attn.q_proj", "attn_q")
                .replace("self_attn.k_proj", "attn_k")
                .replace("self_attn.v_proj", "attn_v")
                .replace("self_attn.o_proj", "attn_output")
                .replace("mlp.gate_proj", "ffn_gate")
                .replace("mlp.up_proj", "ffn_up")
                .replace("mlp.down_proj", "ffn_down");
            (n.as_str(), g)
        })
        .collect();
    let wt: Vec<WriteTensor> = tensors
        .iter()
        .map(|(n, s, v)| WriteTensor {
            name: names[n.as_str()].clone(),
            dims: s.iter().rev().map(|&x| x as u64).collect(),
            ty: GgmlType::F32,
            data: f32_bytes(v),
        })
        .collect();
    let src = hanlin_formats::GgufFile::from_hf_dir(dir.path()).expect("convert");
    let md: Vec<(String, Value)> = src
        .header
        .metadata
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let gguf = dir.path().join("m.gguf");
    write_gguf(&mut std::fs::File::create(&gguf).expect("create"), &md, &wt).expect("write");
    let from_gguf = Model::load(&gguf).expect("load gguf");
    assert_eq!(from_dir.cfg, from_gguf.cfg);
    let (a, b) = (logits(&from_dir), logits(&from_gguf));
    let max = a
        .iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max);
    assert!(max < 1e-4, "differ by {max}");
    // The tokenizer came along: bytes round-trip.
    let tok = hanlin_tokenizer::Tokenizer::from_gguf(&src.header).expect("tokenizer");
    let ids = tok.encode("长城 ok", false).expect("encode");
    assert_eq!(tok.decode(&ids), "长城 ok");
}

#[test]
fn llama_qk_permutation_turns_half_split_rope_into_interleaved_rope() {
    // HF llama weights rotate (i, i + hd/2) pairs; GGUF llama rotates (2i, 2i+1).
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(9);
    let w: Vec<f32> = (0..HEADS * HD * D)
        .map(|_| rng.random_range(-1.0..1.0f32))
        .collect();
    let x: Vec<f32> = (0..D).map(|_| rng.random_range(-1.0..1.0f32)).collect();
    let mul = |w: &[f32]| -> Vec<f32> {
        w.chunks_exact(D)
            .map(|r| r.iter().zip(&x).map(|(a, b)| a * b).sum())
            .collect()
    };
    let permuted = permute_qk_rows(&f32_bytes(&w), HEADS, HD, D * 4);
    let wp: Vec<f32> = permuted
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    let (mut q_hf, mut q_gguf) = (mul(&w), mul(&wp));
    Rope::new(RopeStyle::Neox, HD, 10000.0, 1.0).apply(&mut q_hf, HD, 11);
    Rope::new(RopeStyle::Normal, HD, 10000.0, 1.0).apply(&mut q_gguf, HD, 11);
    for h in 0..HEADS {
        for i in 0..HD / 2 {
            for j in 0..2 {
                let a = q_gguf[h * HD + 2 * i + j];
                let b = q_hf[h * HD + j * HD / 2 + i];
                assert!((a - b).abs() < 1e-5, "head {h} pair {i}.{j}: {a} vs {b}");
            }
        }
    }
    // And a llama directory loads.
    let dir = tempfile::tempdir().expect("tmp");
    write_hf_dir(dir.path(), "llama", &hf_tensors(false));
    let m = Model::load(dir.path()).expect("llama dir");
    assert!(logits(&m).iter().all(|v| v.is_finite()));
}

#[test]
fn broken_directories_give_clear_errors() {
    let dir = tempfile::tempdir().expect("tmp");
    let err = Model::load(dir.path()).err().expect("empty dir");
    assert!(err.to_string().contains("config.json"), "{err}");
    std::fs::write(dir.path().join("config.json"), r#"{"model_type": "bert"}"#).expect("write");
    let err = Model::load(dir.path()).err().expect("bert");
    assert!(err.to_string().contains("not supported"), "{err}");
    write_hf_dir(dir.path(), "qwen2", &hf_tensors(true));
    std::fs::write(
        dir.path().join("model.safetensors"),
        b"\x10\0\0\0\0\0\0\0{broken",
    )
    .expect("write");
    let err = Model::load(dir.path()).err().expect("corrupt safetensors");
    assert!(err.to_string().contains("model.safetensors"), "{err}");
}
