//! The trainer on tiny models: a model overfits one batch; gradients match
//! finite differences; a pretraining run writes its curves, checkpoints and
//! resumes exactly where it stopped; an exported GGUF gives the engine the
//! same logits as the trainer.

use burn::module::{Module, Param};
use burn::optim::{AdamWConfig, GradientsParams};
use burn::tensor::{Device, Tensor, TensorData};
use hanlin_train::burn;
use hanlin_train::config::{GptConfig, MoeConfig, RunConfig};
use hanlin_train::model::Gpt;

mod common;
use common::{assert_same_logits, drawing};

fn tiny(vocab: usize) -> GptConfig {
    GptConfig {
        n_layer: 2,
        d_model: 32,
        n_head: 4,
        n_head_kv: Some(2),
        d_ff: 64,
        context: 32,
        vocab_size: vocab,
        rope_base: 10000.0,
        norm_eps: 1e-5,
        qk_norm: false,
        moe: None,
    }
}

fn windows(n: usize, len: usize, vocab: u32, seed: u32) -> Vec<Vec<u32>> {
    (0..n)
        .map(|i| {
            (0..=len as u32)
                .map(|j| (j * 7 + i as u32 * 13 + seed) % vocab)
                .collect()
        })
        .collect()
}

/// Conversations packed into one row, each attending only to itself, get
/// the log-probabilities they get alone (RoPE depends only on distances).
#[test]
fn packed_documents_read_as_if_alone() {
    let _turn = drawing();
    use burn::tensor::Int;
    let device = Device::default();
    device.seed(3);
    let model = Gpt::new(&tiny(50), &device);
    let a: Vec<i64> = vec![3, 17, 5, 9, 22, 41];
    let b: Vec<i64> = vec![8, 1, 30, 12, 7, 19, 44, 2];
    let lp = |ids: &[i64], docs: Option<Vec<i64>>| -> Vec<f32> {
        let n = ids.len() - 1;
        let inp = Tensor::<2, Int>::from_data(TensorData::new(ids[..n].to_vec(), [1, n]), &device);
        let tgt = Tensor::<2, Int>::from_data(TensorData::new(ids[1..].to_vec(), [1, n]), &device);
        let docs = docs.map(|d| {
            Tensor::<2, Int>::from_data(TensorData::new(d[..n].to_vec(), [1, n]), &device)
        });
        model
            .token_logprobs_docs(inp, tgt, docs)
            .into_data()
            .convert::<f32>()
            .try_to_vec::<f32>()
            .unwrap()
    };
    let (la, lb) = (lp(&a, None), lp(&b, None));
    let row: Vec<i64> = a.iter().chain(&b).copied().collect();
    let docs: Vec<i64> = std::iter::repeat_n(0, a.len())
        .chain(std::iter::repeat_n(1, b.len()))
        .collect();
    let packed = lp(&row, Some(docs));
    // Targets 1..a.len() are a's, then the boundary (b's first token, not
    // learnt), then b's.
    let pa = &packed[..a.len() - 1];
    let pb = &packed[a.len()..];
    assert!(common::max_diff(pa, &la) < 1e-4, "{pa:?} vs {la:?}");
    assert!(common::max_diff(pb, &lb) < 1e-4, "{pb:?} vs {lb:?}");
    // Without the document mask b would read a: its log-probabilities change.
    let unmasked = lp(&row, None);
    assert!(common::max_diff(&unmasked[a.len()..], &lb) > 1e-3);
}

#[test]
fn a_tiny_model_overfits_one_batch() {
    let _turn = drawing();
    let device = Device::default().autodiff();
    device.seed(1);
    let mut model = Gpt::new(&tiny(50), &device);
    let mut optim = AdamWConfig::new().with_weight_decay(0.0).init();
    let batch = windows(4, 16, 50, 3);
    let first: f32 = model.loss(&batch, &device).into_scalar::<f32>();
    let mut last = first;
    for _ in 0..200 {
        let loss = model.loss(&batch, &device);
        last = loss.clone().into_scalar::<f32>();
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        model = optim.step(1e-2, model, grads);
    }
    assert!(first > 3.0, "starts near ln(50): {first}");
    assert!(last < 0.05, "a single batch is memorised: {first} → {last}");
}

type Pick = fn(&mut Gpt) -> &mut Param<Tensor<2>>;

/// d(loss)/d(w) by autodiff against a central difference at the entry of
/// each picked weight with the largest gradient.
fn check_gradients(model: Gpt, picks: &[(&str, Pick)], aux: f64, eps: f32) {
    let device = Device::default().autodiff();
    let batch = windows(2, 8, 40, 1);
    let mut model = model;
    let grads = model.loss_full(&batch, &device, aux).0.backward();
    let inner = device.clone().inner();
    for (name, pick) in picks {
        let p = pick(&mut model);
        let g: Vec<f32> = p
            .grad(&grads)
            .expect("gradient")
            .into_data()
            .try_to_vec()
            .unwrap();
        let w: Vec<f32> = p.val().into_data().try_to_vec().unwrap();
        let dims = p.val().dims();
        let (i, gi) = g
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.abs().total_cmp(&b.1.abs()))
            .map(|(i, v)| (i, *v))
            .unwrap();
        assert!(gi.abs() > 1e-5, "{name}: no gradient");
        let at = |delta: f32| {
            let mut w2 = w.clone();
            w2[i] += delta;
            let t = Tensor::<2>::from_data(TensorData::new(w2, dims), &inner);
            let mut m = model.clone().valid();
            *pick(&mut m) = Param::from_tensor(t);
            m.loss_full(&batch, &inner, aux).0.into_scalar::<f32>()
        };
        let fd = (at(eps) - at(-eps)) / (2.0 * eps);
        let rel = (fd - gi).abs() / gi.abs().max(1e-6);
        assert!(
            rel < 0.05,
            "{name}[{i}]: autodiff {gi} vs finite difference {fd}"
        );
    }
}

/// The attention (RoPE, grouped heads, mask, QK-norm), feed-forward,
/// embedding and LoRA factors.
#[test]
fn gradients_match_finite_differences() {
    let _turn = drawing();
    let device = Device::default().autodiff();
    device.seed(7);
    let mut c = tiny(40);
    c.qk_norm = true;
    let model = Gpt::new(&c, &device);
    let picks: [(&str, Pick); 5] = [
        ("wq", |m| &mut m.blocks[0].wq.weight),
        ("wk", |m| &mut m.blocks[1].wk.weight),
        ("wv", |m| &mut m.blocks[0].wv.weight),
        ("gate", |m| {
            &mut m.blocks[1].mlp.as_mut().unwrap().gate.weight
        }),
        ("embed", |m| &mut m.embed.weight),
    ];
    check_gradients(model.clone(), &picks, 0.0, 1e-2);
    // LoRA: B starts at zero (so A has no gradient yet); give it values.
    let mut lora = model.with_lora(4, 8.0, &["wq".into(), "up".into()]);
    for b in &mut lora.blocks {
        if let Some(l) = &mut b.wq.lora {
            l.b = Param::from_tensor(Tensor::random(
                [4, 32],
                burn::tensor::Distribution::Normal(0.0, 0.05),
                &device,
            ));
        }
    }
    let picks: [(&str, Pick); 3] = [
        ("lora a", |m| &mut m.blocks[0].wq.lora.as_mut().unwrap().a),
        ("lora b", |m| &mut m.blocks[1].wq.lora.as_mut().unwrap().b),
        ("lora up b", |m| {
            &mut m.blocks[0]
                .mlp
                .as_mut()
                .unwrap()
                .up
                .lora
                .as_mut()
                .unwrap()
                .b
        }),
    ];
    check_gradients(lora.clone(), &picks, 0.0, 1e-2);
    // The frozen base has no gradient.
    let batch = windows(2, 8, 40, 1);
    let grads = lora.loss(&batch, &device).backward();
    assert!(lora.blocks[0].wq.weight.grad(&grads).is_none());
    assert!(lora.embed.weight.grad(&grads).is_none());
}

/// The mixture of experts: the router (through the weights and the
/// load-balancing loss) and an expert.
#[test]
fn moe_gradients_match_finite_differences() {
    let _turn = drawing();
    let device = Device::default().autodiff();
    device.seed(3);
    let mut c = tiny(40);
    c.moe = Some(MoeConfig {
        experts: 4,
        top_k: 2,
        aux_weight: 0.1,
    });
    let model = Gpt::new(&c, &device);
    // The router with a small step: a larger one can change which experts
    // tokens go to, which the derivative does not see.
    check_gradients(
        model.clone(),
        &[("router", |m| {
            &mut m.blocks[0].moe.as_mut().unwrap().router.weight
        })],
        1.0,
        2.5e-3,
    );
    let picks: [(&str, Pick); 2] = [
        ("expert gate", |m| {
            &mut m.blocks[1].moe.as_mut().unwrap().experts[1].gate.weight
        }),
        ("expert down", |m| {
            &mut m.blocks[0].moe.as_mut().unwrap().experts[2].down.weight
        }),
    ];
    check_gradients(model, &picks, 1.0, 1e-2);
}

#[test]
fn pretraining_checkpoints_resumes_and_exports_for_the_engine() {
    let _turn = drawing();
    let dir = tempfile::tempdir().unwrap();
    let corpus = dir.path().join("corpus");
    std::fs::create_dir_all(&corpus).unwrap();
    let poem = "床前明月光，疑是地上霜。举头望明月，低头思故乡。\n白日依山尽，黄河入海流。欲穷千里目，更上一层楼。\n";
    for i in 0..6 {
        std::fs::write(corpus.join(format!("{i}.txt")), poem.repeat(20)).unwrap();
    }
    std::fs::write(corpus.join("empty.txt"), "").unwrap();
    std::fs::write(corpus.join("binary.txt"), [0xff, 0xfe, 0x00, 0x81]).unwrap();
    let tok = hanlin_train::tokenizer::train(&corpus, 320).unwrap();
    let tok_path = dir.path().join("tok.json");
    hanlin_train::tokenizer::save(&tok, &tok_path).unwrap();
    let cfg = |steps: usize| {
        RunConfig::from_toml(&format!(
            "[model]\nn_layer=2\nd_model=32\nn_head=4\nn_head_kv=2\nd_ff=64\ncontext=32\n\
             [train]\nsteps={steps}\nbatch_size=4\nlr=5e-3\nwarmup=5\neval_every=10\ncheckpoint_every=10\nval_fraction=0.1\n"
        ))
        .unwrap()
    };
    let out = dir.path().join("run");
    let device = Device::default().autodiff();
    let s =
        hanlin_train::pretrain::run(cfg(20), &corpus, &tok_path, &out, &device, |_| {}).unwrap();
    assert_eq!(s.skipped_files.len(), 2, "{:?}", s.skipped_files);
    // Resume to 30 steps: starts at 20, the log has one row per step.
    let mut first_step = None;
    let s = hanlin_train::pretrain::run(cfg(30), &corpus, &tok_path, &out, &device, |p| {
        first_step.get_or_insert(p.step);
    })
    .unwrap();
    assert_eq!(first_step, Some(21), "resumed after the step-20 checkpoint");
    let rows = hanlin_train::curves::read(&out.join("loss.csv")).unwrap();
    assert_eq!(rows.len(), 30);
    assert!(
        rows.last().unwrap().1 < rows[0].1,
        "the loss fell: {:?}",
        (rows[0], rows.last())
    );
    assert!(std::fs::metadata(out.join("loss.png")).unwrap().len() > 1000);
    eprintln!("{s:?}");
    assert!(s.val_bpc.is_finite() && s.val_bpc < s.unigram_bpc, "{s:?}");

    // Export and compare logits with the engine.
    let gguf = dir.path().join("m.gguf");
    hanlin_train::export::export_run(&out, &gguf, hanlin_train::export::Quant::F32).unwrap();
    let r = hanlin_train::run::load(&out, &Device::default()).unwrap();
    let ids = r.tok.encode("举头望明月，低头").unwrap();
    assert_same_logits(&r.model, &gguf, &ids, 0.02);
    // And the engine's tokenizer reads the exported vocabulary the same way.
    let lm = hanlin_engine::LoadedModel::load(&gguf, 1).unwrap();
    assert_eq!(lm.tokenizer.encode("举头望明月，低头", false).unwrap(), ids);
    // The same as a Hugging Face directory (safetensors, HF's rotary order).
    let hf = dir.path().join("hf");
    hanlin_train::export::export_safetensors(&out, &hf, hanlin_train::export::Quant::F32).unwrap();
    for f in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ] {
        assert!(hf.join(f).is_file(), "{f}");
    }
    assert_same_logits(&r.model, &hf, &ids, 0.02);
    let lm = hanlin_engine::LoadedModel::load(&hf, 1).unwrap();
    assert_eq!(lm.tokenizer.encode("举头望明月，低头", false).unwrap(), ids);
    let hf16 = dir.path().join("hf16");
    hanlin_train::export::export_safetensors(&out, &hf16, hanlin_train::export::Quant::F16)
        .unwrap();
    assert_same_logits(&r.model, &hf16, &ids, 0.02);
    assert!(hanlin_train::export::export_safetensors(
        &out,
        &hf16,
        hanlin_train::export::Quant::Q8_0
    )
    .is_err());
}

/// With `ema`, a run keeps a moving average of its weights beside them in
/// each checkpoint: the run hands the average on (what `run::load`, and so
/// exports, read), it lies between the first and the last weights' logits
/// rather than at the last, and a resumed run averages on from the
/// checkpoint to the same weights as one that never stopped.
#[test]
fn a_moving_average_is_checkpointed_resumed_and_handed_on() {
    let _turn = drawing();
    use hanlin_train::trainer::Trainable;
    let dir = tempfile::tempdir().unwrap();
    let (corpus, tok, tok_path) = poem_tokenizer(dir.path());
    let cfg = |steps: usize, ema: &str| {
        RunConfig::from_toml(&format!(
            "[model]\nn_layer=2\nd_model=32\nn_head=4\nn_head_kv=2\nd_ff=64\ncontext=32\n\
             [train]\nsteps={steps}\nbatch_size=4\nlr=5e-3\nmin_lr=5e-3\nwarmup=5\neval_every=10\ncheckpoint_every=10\nval_fraction=0.1\n{ema}"
        ))
        .unwrap()
    };
    // (A constant rate after warmup: stopping at 10 of 20 steps is then
    // the same run as stopping at 10 of 10.)
    let device = Device::default().autodiff();
    let train = |out: &std::path::Path, steps: usize, ema: &str| {
        hanlin_train::pretrain::run(cfg(steps, ema), &corpus, &tok_path, out, &device, |_| {})
            .unwrap();
    };
    let (whole, halves, plain) = (
        dir.path().join("whole"),
        dir.path().join("halves"),
        dir.path().join("plain"),
    );
    train(&whole, 20, "ema=0.9\n");
    train(&halves, 10, "ema=0.9\n");
    train(&halves, 20, "ema=0.9\n");
    train(&plain, 20, "");
    let cpu = Device::default();
    let ids = tok
        .encode("举头望明月，低头", false)
        .unwrap()
        .get_ids()
        .to_vec();
    let load = |run: &std::path::Path| {
        common::logits(&hanlin_train::run::load(run, &cpu).unwrap().model, &ids)
    };
    let raw = |run: &std::path::Path| {
        let ck = hanlin_train::trainer::checkpoint_dir(run);
        let shape = hanlin_train::run::load(run, &cpu).unwrap().cfg.model;
        let m = Gpt::new(&shape, &cpu).load_weights(&ck).unwrap();
        common::logits(&m, &ids)
    };
    let (avg, last) = (load(&whole), raw(&whole));
    assert!(whole.join("checkpoint/ema/model.bpk").is_file());
    assert!(!plain.join("checkpoint/ema").exists());
    // Without ema, what is handed on is the trained weights themselves,
    // and the average's trained weights are the same run's.
    assert!(common::max_diff(&load(&plain), &raw(&plain)) < 1e-6);
    assert!(common::max_diff(&last, &raw(&plain)) < 1e-4);
    let gap = common::max_diff(&avg, &last);
    assert!(gap > 1e-3, "the average is not the last weights: {gap}");
    // Resumed: the same average (and the same weights) as the whole run.
    let d = common::max_diff(&load(&halves), &avg);
    assert!(d < 1e-4, "resumed average differs by {d}");
    assert!(common::max_diff(&raw(&halves), &last) < 1e-4);
}

/// The poem corpus in `dir`, a 320-token tokenizer trained on it, and
/// where that tokenizer is saved.
fn poem_tokenizer(
    dir: &std::path::Path,
) -> (
    std::path::PathBuf,
    tokenizers::Tokenizer,
    std::path::PathBuf,
) {
    let corpus = poem_corpus(dir);
    let tok = hanlin_train::tokenizer::train(&corpus, 320).unwrap();
    let tok_path = dir.join("tok.json");
    hanlin_train::tokenizer::save(&tok, &tok_path).unwrap();
    (corpus, tok, tok_path)
}

fn poem_corpus(dir: &std::path::Path) -> std::path::PathBuf {
    let corpus = dir.join("corpus");
    std::fs::create_dir_all(&corpus).unwrap();
    let poem = "床前明月光，疑是地上霜。举头望明月，低头思故乡。\n白日依山尽，黄河入海流。欲穷千里目，更上一层楼。\n";
    for i in 0..6 {
        std::fs::write(corpus.join(format!("{i}.txt")), poem.repeat(20)).unwrap();
    }
    corpus
}

/// A mixture-of-experts model with QK-norm trains (the experts share the
/// load), exports as a llama GGUF with stacked experts, and the engine
/// gives the trainer's logits.
#[test]
fn a_mixture_of_experts_trains_and_runs_in_the_engine() {
    let _turn = drawing();
    let dir = tempfile::tempdir().unwrap();
    let (corpus, _, tok_path) = poem_tokenizer(dir.path());
    let cfg = RunConfig::from_toml(
        "[model]\nn_layer=2\nd_model=32\nn_head=4\nn_head_kv=2\nd_ff=32\ncontext=32\nqk_norm=true\n\
         [model.moe]\nexperts=4\ntop_k=1\naux_weight=0.05\n\
         [train]\nsteps=30\nbatch_size=4\nlr=5e-3\nwarmup=5\neval_every=10\ncheckpoint_every=30\nval_fraction=0.1\noptimizer=\"muon\"\n",
    )
    .unwrap();
    let out = dir.path().join("moe");
    let device = Device::default().autodiff();
    let s = hanlin_train::pretrain::run(cfg, &corpus, &tok_path, &out, &device, |_| {}).unwrap();
    assert!(s.val_bpc < s.unigram_bpc, "{s:?}");
    assert_eq!(s.expert_load.len(), 2);
    for layer in &s.expert_load {
        assert!((layer.iter().sum::<f32>() - 1.0).abs() < 1e-3);
        let used = layer.iter().filter(|&&l| l > 0.05).count();
        assert!(used >= 2, "the load is spread over experts: {layer:?}");
    }
    let gguf = dir.path().join("moe.gguf");
    hanlin_train::export::export_run(&out, &gguf, hanlin_train::export::Quant::F32).unwrap();
    let engine = hanlin_engine::Model::load(&gguf).unwrap();
    let m = engine.cfg.moe.expect("the engine sees experts");
    assert_eq!((m.n_expert, m.n_expert_used, m.norm_topk), (4, 1, false));
    let r = hanlin_train::run::load(&out, &Device::default()).unwrap();
    let ids = r.tok.encode("白日依山尽，黄河").unwrap();
    assert_same_logits(&r.model, &gguf, &ids, 0.02);
}

/// `--quant q4_k`: rows of 256 values become Q4_K (the engine's logits stay
/// close to the trainer's), the rest Q8_0; the file is much smaller than
/// F32.
#[test]
fn export_to_q4_k() {
    let _turn = drawing();
    let dir = tempfile::tempdir().unwrap();
    let corpus = poem_corpus(dir.path());
    let tok = hanlin_train::tokenizer::train(&corpus, 320).unwrap();
    let mut c = tiny(tok.get_vocab_size(true));
    (c.d_model, c.n_head, c.n_head_kv, c.d_ff) = (256, 4, Some(2), 512);
    let device = Device::default();
    device.seed(5);
    let model = Gpt::new(&c, &device);
    let md = || hanlin_train::export::bpe_metadata(&tok).unwrap();
    let f32_path = dir.path().join("f32.gguf");
    let q4_path = dir.path().join("q4.gguf");
    use hanlin_train::export::{export, Quant};
    export(&model, &c, md(), "t", &f32_path, Quant::F32).unwrap();
    export(&model, &c, md(), "t", &q4_path, Quant::Q4K).unwrap();
    let h = hanlin_formats::GgufFile::open(&q4_path).unwrap().header;
    let ty = |n: &str| h.tensor(n).unwrap().ty;
    assert_eq!(ty("blk.0.attn_q.weight"), hanlin_formats::GgmlType::Q4_K);
    assert_eq!(ty("blk.1.ffn_down.weight"), hanlin_formats::GgmlType::Q4_K);
    assert_eq!(ty("token_embd.weight"), hanlin_formats::GgmlType::Q8_0);
    let (a, b) = (
        std::fs::metadata(&f32_path).unwrap().len(),
        std::fs::metadata(&q4_path).unwrap().len(),
    );
    assert!(b * 4 < a, "{b} vs {a}");
    let ids = tok
        .encode("举头望明月，低头", false)
        .unwrap()
        .get_ids()
        .to_vec();
    assert_same_logits(&model, &f32_path, &ids, 0.02);
    assert_same_logits(&model, &q4_path, &ids, 0.15);
}
