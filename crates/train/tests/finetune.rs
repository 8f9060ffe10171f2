//! Fine-tuning on tiny models: SFT learns the assistant's turns only and
//! reports malformed lines; DPO moves the held-out preference towards the
//! chosen answers; LoRA trains adapters only, resumes, and merges on export
//! into a GGUF the engine runs with the trainer's logits. And the trainer
//! reads the real SmolLM2 GGUF with the engine's logits.

use burn::tensor::Device;
use hanlin_train::burn;
use hanlin_train::config::{RunConfig, TrainConfig};
use hanlin_train::finetune::{self, LoraOptions, Options};
use std::path::{Path, PathBuf};

mod common;
use common::{assert_same_logits, drawing, logits, max_diff};

fn pretrained(dir: &Path) -> PathBuf {
    let corpus = dir.join("corpus");
    std::fs::create_dir_all(&corpus).unwrap();
    let text = "床前明月光，疑是地上霜。举头望明月，低头思故乡。\n你好！今天天气很好。写一首诗。好的答案。\n";
    for i in 0..4 {
        std::fs::write(corpus.join(format!("{i}.txt")), text.repeat(20)).unwrap();
    }
    let tok = hanlin_train::tokenizer::train(&corpus, 300).unwrap();
    let tok_path = dir.join("tok.json");
    hanlin_train::tokenizer::save(&tok, &tok_path).unwrap();
    let cfg = RunConfig::from_toml(
        "[model]\nn_layer=2\nd_model=32\nn_head=4\nn_head_kv=2\nd_ff=64\ncontext=48\n\
         [train]\nsteps=10\nbatch_size=4\nlr=5e-3\nwarmup=2\neval_every=10\ncheckpoint_every=10\nval_fraction=0.1\n",
    )
    .unwrap();
    let out = dir.join("pre");
    hanlin_train::pretrain::run(
        cfg,
        &corpus,
        &tok_path,
        &out,
        &Device::default().autodiff(),
        |_| {},
    )
    .unwrap();
    out
}

fn train_cfg(steps: usize, lr: f64) -> TrainConfig {
    let mut t = TrainConfig::new(steps);
    t.lr = lr;
    t.warmup = 2;
    t.batch_size = 4;
    t.eval_every = 10;
    t.checkpoint_every = 10;
    t.val_fraction = 0.1;
    t.weight_decay = 0.0;
    t
}

#[test]
fn sft_learns_the_assistant_turns_and_reports_bad_lines() {
    let _turn = drawing();
    let dir = tempfile::tempdir().unwrap();
    let pre = pretrained(dir.path());
    let data = dir.path().join("chat.jsonl");
    let mut lines = String::new();
    for i in 0..30 {
        lines.push_str(&format!(
            "{{\"messages\":[{{\"role\":\"user\",\"content\":\"问题{i}\"}},{{\"role\":\"assistant\",\"content\":\"好的答案。\"}}]}}\n"
        ));
        if i == 4 {
            lines.push_str("{not json\n");
        }
        if i == 9 {
            lines.push_str("{\"messages\":[{\"role\":\"user\",\"content\":\"只有问题\"}]}\n");
        }
    }
    std::fs::write(&data, lines).unwrap();

    // The mask covers exactly the assistant's text and its <|im_end|>.
    let r = hanlin_train::run::load(&pre, &Device::default()).unwrap();
    let turns = hanlin_train::chat::parse_chat(&serde_json::json!({"messages": [
        {"role": "system", "content": "你是诗人"}, {"role": "user", "content": "你好"},
        {"role": "assistant", "content": "好的答案。"}]}))
    .unwrap();
    let ex = hanlin_train::chat::encode(&r.tok, &turns).unwrap();
    let learnt: Vec<u32> = ex
        .tokens
        .iter()
        .zip(&ex.mask)
        .filter(|(_, &m)| m == 1)
        .map(|(&t, _)| t)
        .collect();
    assert_eq!(r.tok.decode(&learnt), "好的答案。<|im_end|>");
    assert_eq!(
        r.tok.decode(&ex.tokens),
        "<|im_start|>system\n你是诗人<|im_end|>\n<|im_start|>user\n你好<|im_end|>\n<|im_start|>assistant\n好的答案。<|im_end|>\n"
    );

    let before = finetune::evaluate(&pre, &data, &[], 4, 1).unwrap();
    let out = dir.path().join("sft");
    let opts = Options {
        data: &data,
        strict: false,
        train: train_cfg(40, 5e-3),
    };
    let s = finetune::sft(&pre, &opts, &out, &Device::default().autodiff(), |_| {}).unwrap();
    assert_eq!(s.examples, 30);
    assert_eq!(s.rejected_lines.len(), 2, "{:?}", s.rejected_lines);
    assert!(
        s.rejected_lines[0]
            .ends_with("chat.jsonl:6: not JSON (key must be a string at line 1 column 2)"),
        "{:?}",
        s.rejected_lines
    );
    assert!(
        s.rejected_lines[1].contains("chat.jsonl:12: no assistant message"),
        "{:?}",
        s.rejected_lines
    );
    let after = finetune::evaluate(&out, &data, &[], 4, 1).unwrap();
    assert!(
        after.loss < 0.3 * before.loss,
        "the answers are learnt: {} → {}",
        before.loss,
        after.loss
    );
    // Packed: two or three conversations per 48-token row, each seeing only
    // itself; it learns the answers as well.
    let mut t = train_cfg(40, 5e-3);
    t.pack = true;
    let packed = Options {
        data: &data,
        strict: false,
        train: t,
    };
    let out_p = dir.path().join("sft-packed");
    finetune::sft(&pre, &packed, &out_p, &Device::default().autodiff(), |_| {}).unwrap();
    let after_p = finetune::evaluate(&out_p, &data, &[], 4, 1).unwrap();
    assert!(
        after_p.loss < 0.3 * before.loss,
        "packed: the answers are learnt: {} → {}",
        before.loss,
        after_p.loss
    );
    // Strict mode stops at the first bad line.
    let strict = Options {
        data: &data,
        strict: true,
        train: train_cfg(2, 1e-3),
    };
    let e = finetune::sft(
        &pre,
        &strict,
        &dir.path().join("strict"),
        &Device::default().autodiff(),
        |_| {},
    )
    .expect_err("strict fails")
    .to_string();
    assert!(e.contains("chat.jsonl:6"), "{e}");
}

#[test]
fn dpo_prefers_the_chosen_answers_on_held_out_pairs() {
    let _turn = drawing();
    let dir = tempfile::tempdir().unwrap();
    let pre = pretrained(dir.path());
    let data = dir.path().join("prefs.jsonl");
    let mut lines = String::new();
    for i in 0..40 {
        lines.push_str(&format!(
            "{{\"prompt\":\"写一首诗{i}\",\"chosen\":\"床前明月光，疑是地上霜。\",\"rejected\":\"好好好好好好。\"}}\n"
        ));
    }
    std::fs::write(&data, lines).unwrap();
    let out = dir.path().join("dpo");
    let mut t = train_cfg(30, 5e-3);
    t.val_fraction = 0.25;
    let opts = Options {
        data: &data,
        strict: true,
        train: t,
    };
    let s = finetune::dpo(
        &pre,
        &opts,
        0.5,
        &out,
        &Device::default().autodiff(),
        |_| {},
    )
    .unwrap();
    let d = s.dpo.expect("dpo figures");
    assert_eq!(s.held_out, 10);
    assert!(d.margin_after > d.margin_before + 1.0, "{d:?}");
    assert!((d.accuracy_after - 1.0).abs() < 1e-6, "{d:?}");
    let rows = hanlin_train::curves::read(&out.join("loss.csv")).unwrap();
    assert!(
        rows.last().unwrap().1 < 0.5 * rows[0].1,
        "{:?}",
        (rows[0], rows.last())
    );
}

#[test]
fn lora_trains_adapters_only_resumes_and_merges_on_export() {
    let _turn = drawing();
    let dir = tempfile::tempdir().unwrap();
    let pre = pretrained(dir.path());
    let base = dir.path().join("base.gguf");
    hanlin_train::export::export_run(&pre, &base, hanlin_train::export::Quant::F32).unwrap();
    let base_bytes = std::fs::read(&base).unwrap();
    let domain = dir.path().join("domain");
    std::fs::create_dir_all(&domain).unwrap();
    for i in 0..4 {
        std::fs::write(
            domain.join(format!("{i}.txt")),
            "白日依山尽，黄河入海流。欲穷千里目，更上一层楼。\n".repeat(30),
        )
        .unwrap();
    }
    let lo = LoraOptions {
        rank: 4,
        alpha: 8.0,
        targets: ["wq", "wk", "wv", "wo", "gate", "up", "down"]
            .map(String::from)
            .to_vec(),
    };
    let out = dir.path().join("lora");
    let run = |steps: usize, first: &mut Option<usize>| {
        let mut t = train_cfg(steps, 3e-2);
        t.seq_len = Some(32);
        let opts = Options {
            data: &domain,
            strict: false,
            train: t,
        };
        finetune::lora(
            &base,
            "base",
            &lo,
            &opts,
            &out,
            &Device::default().autodiff(),
            |p| {
                first.get_or_insert(p.step);
            },
        )
        .unwrap()
    };
    let mut first = None;
    run(20, &mut first);
    let mut first = None;
    let s = run(60, &mut first);
    assert_eq!(first, Some(21), "resumed from the step-20 checkpoint");
    let l = s.lora.expect("lora figures");
    // (The tiny base is nearly untrained and tests share the device's
    // random generator, so how far it drops varies: 0.6–0.7× seen.)
    assert!(
        l.perplexity_after < 0.8 * l.perplexity_before,
        "held-out perplexity drops: {l:?}"
    );
    // Per layer: wq 32→32, wk and wv 32→16, wo 32→32, gate and up 32→64,
    // down 64→32, each with A [in, 4] and B [4, out].
    let per_layer = 4 * ((32 + 32) + 2 * (32 + 16) + (32 + 32) + 3 * (32 + 64));
    assert_eq!(l.trainable_parameters, 2 * per_layer);
    // Only the adapters are checkpointed; the base file is untouched.
    let ck = out.join("checkpoint");
    assert!(!ck.join("model.bpk").exists());
    let adapters = std::fs::metadata(ck.join("adapters.bpk")).unwrap().len();
    assert!(adapters < base_bytes.len() as u64 / 2, "{adapters}");
    assert_eq!(std::fs::read(&base).unwrap(), base_bytes);
    // Export merges the adapters; the engine runs it with the trainer's logits.
    let merged = dir.path().join("merged.gguf");
    hanlin_train::export::export_run(&out, &merged, hanlin_train::export::Quant::F32).unwrap();
    let r = hanlin_train::run::load(&out, &Device::default()).unwrap();
    assert!(r.model.has_lora());
    let ids = r.tok.encode("白日依山尽，黄河").unwrap();
    assert_same_logits(&r.model, &merged, &ids, 0.02);
    // …and they differ from the base's.
    let b = hanlin_train::run::from_gguf(&base, &Device::default())
        .unwrap()
        .1;
    assert!(max_diff(&logits(&b, &ids), &logits(&r.model, &ids)) > 0.1);
    // A bad target is refused.
    let bad = LoraOptions {
        rank: 4,
        alpha: 8.0,
        targets: vec!["wz".into()],
    };
    let opts = Options {
        data: &domain,
        strict: false,
        train: train_cfg(1, 1e-3),
    };
    let e = finetune::lora(
        &base,
        "base",
        &bad,
        &opts,
        &dir.path().join("x"),
        &Device::default().autodiff(),
        |_| {},
    )
    .expect_err("unknown target")
    .to_string();
    assert!(e.contains("unknown LoRA target \"wz\""), "{e}");
}

/// A real model file read into the trainer gives the engine's logits (the
/// engine multiplies quantized weights with activations quantized to 8
/// bits; the trainer works in f32 throughout): LoRA starts from the model
/// the engine serves. Returns the trainer's next token after `prompt`.
fn parity_with_the_engine(name: &str, prompt: &str) -> String {
    let store = hanlin_store::Store::open(hanlin_store::Store::default_home()).expect("store");
    let path = store.path_of(name).expect("store").unwrap_or_else(|| {
        panic!(
            "{name} is not in the store: run `cargo run --release -- pull {name}` (CI does this)"
        )
    });
    // Building the model draws starting weights before the file's replace
    // them: that takes its turn too.
    let (cfg, model, tok) = {
        let _turn = drawing();
        hanlin_train::run::from_gguf(&path, &Device::default()).unwrap()
    };
    let ids = tok.encode(prompt).unwrap();
    let engine = hanlin_engine::Model::load(&path).unwrap();
    let pool = hanlin_kernels::ThreadPool::new(2);
    let mut cache =
        hanlin_engine::KvCache::new(hanlin_engine::KvShape::of(&engine.cfg), ids.len() + 1);
    let ours = engine
        .forward(&pool, &ids, &mut cache, hanlin_engine::Logits::All)
        .unwrap();
    let theirs = logits(&model, &ids);
    assert_eq!(ours.len(), theirs.len());
    let v = cfg.vocab_size;
    let argmax = |x: &[f32]| {
        x.iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .map(|(i, _)| i)
            .unwrap()
    };
    let last = ids.len() - 1;
    let (a, b) = (&ours[last * v..], &theirs[last * v..]);
    assert_eq!(argmax(a), argmax(b));
    let max = max_diff(&ours, &theirs);
    let mean = ours
        .iter()
        .zip(&theirs)
        .map(|(x, y)| (x - y).abs())
        .sum::<f32>()
        / ours.len() as f32;
    let scale = theirs.iter().map(|v| v.abs()).fold(0f32, f32::max);
    eprintln!("{name}: logit difference max {max}, mean {mean} (scale {scale})");
    assert!(
        max < 0.06 * scale && mean < 0.01 * scale,
        "{name}: engine vs trainer: max {max}, mean {mean} (scale {scale})"
    );
    tok.decode(&[argmax(b) as u32])
}

/// SmolLM2 (llama, Q4_1, tied output).
#[test]
fn the_trainer_reads_smollm2_like_the_engine() {
    assert_eq!(
        parity_with_the_engine("smollm2-135m", "The capital of France is"),
        " Paris"
    );
}

/// Qwen2.5-Coder (qwen2: NEOX rotary embeddings, query/key/value biases,
/// an output matrix of its own; Q4_K/Q5_0/Q6_K/Q8_0).
#[test]
fn the_trainer_reads_qwen2_like_the_engine() {
    assert_eq!(
        parity_with_the_engine("qwen2.5-coder-0.5b", "中国的首都是"),
        "北京"
    );
}
