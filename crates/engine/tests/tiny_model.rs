//! Forward-pass tests on tiny generated models (random weights written as GGUF):
//! dense llama/qwen2/qwen3 layouts and a Mixture-of-Experts (qwen2moe) model.

use hanlin_engine::{BatchSeq, EngineError, KvCache, KvShape, Logits, Model};
use hanlin_formats::writer::{write_gguf, WriteTensor};
use hanlin_formats::{GgmlType, Value};
use hanlin_kernels::quant::{encode_f32, quantize_row_q8_0};
use hanlin_kernels::ThreadPool;
use rand::{Rng, SeedableRng};

const D: usize = 64;
const FF: usize = 96;
const VOCAB: usize = 96;
const LAYERS: usize = 2;
const HEADS: usize = 4;
const KV_HEADS: usize = 2;
const EXPERTS: usize = 4;

struct Builder {
    rng: rand_chacha::ChaCha8Rng,
    tensors: Vec<WriteTensor>,
}

impl Builder {
    fn mat(&mut self, name: &str, cols: usize, rows: usize, q8: bool) {
        self.tensor(name, vec![cols as u64, rows as u64], cols * rows, q8);
    }
    fn tensor(&mut self, name: &str, dims: Vec<u64>, n: usize, q8: bool) {
        let scale = 1.0 / (dims[0] as f32).sqrt();
        let v: Vec<f32> = (0..n)
            .map(|_| self.rng.random_range(-1.0..1.0f32) * scale * 1.7)
            .collect();
        let (ty, data) = if q8 {
            (GgmlType::Q8_0, quantize_row_q8_0(&v))
        } else {
            (GgmlType::F32, encode_f32(&v))
        };
        self.tensors.push(WriteTensor {
            name: name.into(),
            dims,
            ty,
            data,
        });
    }
    fn norm(&mut self, name: &str, n: usize) {
        let v: Vec<f32> = (0..n).map(|_| self.rng.random_range(0.8..1.2f32)).collect();
        self.tensors.push(WriteTensor {
            name: name.into(),
            dims: vec![n as u64],
            ty: GgmlType::F32,
            data: encode_f32(&v),
        });
    }
}

fn tiny(arch: &str, dir: &std::path::Path) -> std::path::PathBuf {
    let hd = D / HEADS;
    let mut b = Builder {
        rng: rand_chacha::ChaCha8Rng::seed_from_u64(1),
        tensors: Vec::new(),
    };
    b.mat("token_embd.weight", D, VOCAB, true);
    b.norm("output_norm.weight", D);
    b.mat("output.weight", D, VOCAB, false);
    for i in 0..LAYERS {
        let n = |t: &str| format!("blk.{i}.{t}");
        b.norm(&n("attn_norm.weight"), D);
        b.mat(&n("attn_q.weight"), D, D, true);
        b.mat(&n("attn_k.weight"), D, KV_HEADS * hd, true);
        b.mat(&n("attn_v.weight"), D, KV_HEADS * hd, false);
        b.mat(&n("attn_output.weight"), D, D, true);
        if arch == "qwen2" {
            b.norm(&n("attn_q.bias"), D);
            b.norm(&n("attn_k.bias"), KV_HEADS * hd);
            b.norm(&n("attn_v.bias"), KV_HEADS * hd);
        }
        if arch == "qwen3" {
            b.norm(&n("attn_q_norm.weight"), hd);
            b.norm(&n("attn_k_norm.weight"), hd);
        }
        b.norm(&n("ffn_norm.weight"), D);
        if arch == "qwen2moe" {
            b.mat(&n("ffn_gate_inp.weight"), D, EXPERTS, false);
            b.tensor(
                &n("ffn_gate_exps.weight"),
                vec![D as u64, FF as u64, EXPERTS as u64],
                D * FF * EXPERTS,
                true,
            );
            b.tensor(
                &n("ffn_up_exps.weight"),
                vec![D as u64, FF as u64, EXPERTS as u64],
                D * FF * EXPERTS,
                true,
            );
            b.tensor(
                &n("ffn_down_exps.weight"),
                vec![FF as u64, D as u64, EXPERTS as u64],
                D * FF * EXPERTS,
                true,
            );
            b.mat(&n("ffn_gate_inp_shexp.weight"), D, 1, false);
            b.mat(&n("ffn_gate_shexp.weight"), D, FF, true);
            b.mat(&n("ffn_up_shexp.weight"), D, FF, true);
            b.mat(&n("ffn_down_shexp.weight"), FF, D, true);
        } else {
            b.mat(&n("ffn_gate.weight"), D, FF, true);
            b.mat(&n("ffn_up.weight"), D, FF, true);
            b.mat(&n("ffn_down.weight"), FF, D, true);
        }
    }
    let k = |s: &str| format!("{arch}.{s}");
    let mut md = vec![
        (
            "general.architecture".to_string(),
            Value::String(arch.into()),
        ),
        (k("block_count"), Value::U32(LAYERS as u32)),
        (k("embedding_length"), Value::U32(D as u32)),
        (k("feed_forward_length"), Value::U32(FF as u32)),
        (k("attention.head_count"), Value::U32(HEADS as u32)),
        (k("attention.head_count_kv"), Value::U32(KV_HEADS as u32)),
        (k("context_length"), Value::U32(256)),
        (k("vocab_size"), Value::U32(VOCAB as u32)),
        (k("attention.layer_norm_rms_epsilon"), Value::F32(1e-5)),
        (k("rope.freq_base"), Value::F32(10000.0)),
    ];
    if arch == "qwen2moe" {
        md.push((k("expert_count"), Value::U32(EXPERTS as u32)));
        md.push((k("expert_used_count"), Value::U32(2)));
        md.push((k("expert_feed_forward_length"), Value::U32(FF as u32)));
        md.push((
            k("expert_shared_feed_forward_length"),
            Value::U32(FF as u32),
        ));
    }
    let path = dir.join(format!("{arch}.gguf"));
    let mut f = std::fs::File::create(&path).expect("create");
    write_gguf(&mut f, &md, &b.tensors).expect("write");
    path
}

/// Logits of a batched prefill must equal those of token-by-token decoding,
/// and a prefix-truncated cache must reproduce the same continuation.
fn check_consistency(arch: &str) {
    let dir = tempfile::tempdir().expect("tmp");
    let model = Model::load(&tiny(arch, dir.path())).expect("load tiny model");
    let pool = ThreadPool::new(2);
    let toks: Vec<u32> = vec![3, 17, 42, 5, 88, 1, 60, 23, 9];
    let mut c1 = KvCache::new(KvShape::of(&model.cfg), 64);
    let all = model
        .forward(&pool, &toks, &mut c1, Logits::All)
        .expect("batch");
    assert_eq!(all.len(), toks.len() * VOCAB);
    let mut c2 = KvCache::new(KvShape::of(&model.cfg), 64);
    for (i, &t) in toks.iter().enumerate() {
        let one = model
            .forward(&pool, &[t], &mut c2, Logits::Last)
            .expect("step");
        let batch = &all[i * VOCAB..(i + 1) * VOCAB];
        let max = one
            .iter()
            .zip(batch)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(max < 1e-3, "{arch}: position {i} differs by {max}");
        assert!(one.iter().all(|v| v.is_finite()));
    }
    // Distinct positions give distinct logits (the model is not degenerate).
    assert!(all[..VOCAB]
        .iter()
        .zip(&all[VOCAB..2 * VOCAB])
        .any(|(a, b)| (a - b).abs() > 1e-3));
    c1.truncate(4);
    let again = model
        .forward(&pool, &toks[4..], &mut c1, Logits::Last)
        .expect("resume");
    let last = &all[(toks.len() - 1) * VOCAB..];
    let max = again
        .iter()
        .zip(last)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(max < 1e-3, "{arch}: truncated cache differs by {max}");

    // Several sequences in one batched pass (continuous batching): each gets
    // the logits it would get alone, whatever its history.
    let fresh = || KvCache::new(KvShape::of(&model.cfg), 64);
    // A mean embedding sits in the batch's buffer after every sequence's
    // logits, and a sequence that wants nothing gets an empty slice.
    let mut caches = [fresh(), fresh(), fresh(), fresh(), fresh()];
    let none = model
        .forward(&pool, &toks[..3], &mut caches[2], Logits::None)
        .expect("history");
    assert!(none.is_empty());
    let inputs: [&[u32]; 5] = [&toks[1..4], &toks[..5], &[7], &toks[..2], &toks[2..]];
    let wants = [
        Logits::Mean,
        Logits::All,
        Logits::Last,
        Logits::None,
        Logits::Last,
    ];
    let mut expected = Vec::new();
    for ((c, t), w) in caches.iter().zip(inputs).zip(wants) {
        let mut alone = c.clone_prefix(c.len());
        expected.push(model.forward(&pool, t, &mut alone, w).expect("alone"));
    }
    let mut batch: Vec<BatchSeq> = caches
        .iter_mut()
        .zip(inputs)
        .zip(wants)
        .map(|((cache, tokens), want)| BatchSeq {
            tokens,
            cache,
            want,
        })
        .collect();
    let mut got = model.forward_batch(&pool, &mut batch).expect("batch");
    assert_eq!(got.len(), 5);
    let lens: Vec<usize> = expected.iter().map(Vec::len).collect();
    assert_eq!(lens, [D, 5 * VOCAB, VOCAB, 0, VOCAB], "{arch}");
    let by_index: Vec<Vec<f32>> = (0..5).map(|i| got.get(i).to_vec()).collect();
    let by_iter: Vec<Vec<f32>> = got.iter().map(<[f32]>::to_vec).collect();
    let by_slices: Vec<Vec<f32>> = got.slices_mut().into_iter().map(|s| s.to_vec()).collect();
    assert_eq!(by_index, by_iter);
    assert_eq!(by_index, by_slices);
    for (i, (g, e)) in by_index.iter().zip(&expected).enumerate() {
        assert_eq!(g.len(), e.len(), "{arch}: sequence {i}");
        let max = g
            .iter()
            .zip(e)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(max < 1e-3, "{arch}: batched sequence {i} differs by {max}");
    }
    assert_eq!(caches[2].len(), 4);
    assert_eq!(
        caches[3].len(),
        2,
        "a sequence that wants no logits still runs"
    );
    // A buffer kept across passes gives the same as a fresh one.
    let mut kept = got.clone();
    let again: [&[u32]; 2] = [&[9], &[11, 12]];
    // The same two-sequence pass on fresh caches, into `out`.
    let pass = |out: &mut hanlin_engine::BatchLogits| {
        let mut two: Vec<KvCache> = (0..2).map(|_| fresh()).collect();
        let mut b: Vec<BatchSeq> = two
            .iter_mut()
            .zip(again)
            .map(|(cache, tokens)| BatchSeq {
                tokens,
                cache,
                want: Logits::Last,
            })
            .collect();
        model.forward_batch_into(&pool, &mut b, out).expect("pass");
    };
    let mut fresh_out = hanlin_engine::BatchLogits::default();
    pass(&mut fresh_out);
    pass(&mut kept);
    assert_eq!(kept.len(), 2);
    assert!(kept.iter().eq(fresh_out.iter()), "{arch}");
}

#[test]
fn llama_batch_equals_incremental() {
    check_consistency("llama");
}

#[test]
fn qwen2_batch_equals_incremental() {
    check_consistency("qwen2");
}

#[test]
fn qwen3_batch_equals_incremental() {
    check_consistency("qwen3");
}

#[test]
fn moe_batch_equals_incremental() {
    check_consistency("qwen2moe");
}

/// A short list's logits are the first ids' logits of a whole row, bit
/// for bit; a batch that also wants whole rows gets whole rows.
#[test]
fn short_list_logits_are_the_front_of_the_whole_row() {
    use hanlin_engine::model::SHORT_LIST_ROWS;
    let dir = tempfile::tempdir().expect("tmp");
    let model = Model::load(&tiny("qwen2", dir.path())).expect("load tiny model");
    let pool = ThreadPool::new(2);
    let fresh = || KvCache::new(KvShape::of(&model.cfg), 64);
    let toks = [3u32, 17, 42, 5];
    let whole = model
        .forward(&pool, &toks, &mut fresh(), Logits::Last)
        .expect("whole");
    let n: usize = 50;
    assert!(n.div_ceil(SHORT_LIST_ROWS) * SHORT_LIST_ROWS < VOCAB);
    let short = model
        .forward(&pool, &toks, &mut fresh(), Logits::LastFirst(n))
        .expect("short");
    assert_eq!(short.len(), SHORT_LIST_ROWS, "rounded up to whole groups");
    let same = |a: &[f32], b: &[f32]| a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits());
    assert!(same(&short, &whole[..SHORT_LIST_ROWS]));
    // Longer than the vocabulary: the whole row.
    let long = model
        .forward(&pool, &toks, &mut fresh(), Logits::LastFirst(10 * VOCAB))
        .expect("long");
    assert_eq!(long.len(), VOCAB);
    // Batched with a sequence wanting a whole row, and alone with others
    // wanting short lists.
    let (mut c1, mut c2) = (fresh(), fresh());
    let mut mixed = [
        BatchSeq {
            tokens: &toks,
            cache: &mut c1,
            want: Logits::LastFirst(n),
        },
        BatchSeq {
            tokens: &toks,
            cache: &mut c2,
            want: Logits::Last,
        },
    ];
    let out = model.forward_batch(&pool, &mut mixed).expect("mixed");
    assert_eq!(out.get(0).len(), VOCAB);
    assert!(same(out.get(0), &whole) && same(out.get(1), &whole));
    let (mut c1, mut c2) = (fresh(), fresh());
    let mut shorts = [
        BatchSeq {
            tokens: &toks,
            cache: &mut c1,
            want: Logits::LastFirst(n),
        },
        BatchSeq {
            tokens: &toks[..2],
            cache: &mut c2,
            want: Logits::None,
        },
    ];
    let out = model.forward_batch(&pool, &mut shorts).expect("shorts");
    assert!(same(out.get(0), &short) && out.get(1).is_empty());
}

#[test]
fn bad_models_give_clear_errors() {
    let dir = tempfile::tempdir().expect("tmp");
    let good = std::fs::read(tiny("llama", dir.path())).expect("read");
    // Unknown architecture: the error lists the supported ones.
    let p = dir.path().join("unknown.gguf");
    let mut f = std::fs::File::create(&p).expect("create");
    write_gguf(
        &mut f,
        &[("general.architecture".into(), Value::String("rwkv9".into()))],
        &[],
    )
    .expect("write");
    let err = Model::load(&p).err().expect("unsupported");
    assert!(
        err.to_string().contains("rwkv9") && err.to_string().contains("qwen2"),
        "{err}"
    );
    // Truncated file.
    let p = dir.path().join("trunc.gguf");
    std::fs::write(&p, &good[..good.len() / 2]).expect("write");
    let err = Model::load(&p).err().expect("truncated");
    assert!(
        matches!(err, EngineError::Format(_)) && err.to_string().contains("truncated"),
        "{err}"
    );
    // Not a GGUF at all.
    let p = dir.path().join("junk.gguf");
    std::fs::write(&p, b"<html>not a model</html>").expect("write");
    assert!(Model::load(&p)
        .err()
        .expect("junk")
        .to_string()
        .contains("not a GGUF"));
    // A token id outside the vocabulary.
    let m = Model::load(&tiny("llama", dir.path())).expect("load");
    let mut c = KvCache::new(KvShape::of(&m.cfg), 8);
    let err = m
        .forward(&ThreadPool::new(1), &[VOCAB as u32], &mut c, Logits::Last)
        .expect_err("bad token");
    assert!(matches!(err, EngineError::BadToken(_)));
}

/// A prompt longer than `FORWARD_CHUNK` runs in chunks: the same logits,
/// bit for bit, as one pass over all of it, and the same cache after (the
/// next step's logits agree); one that does not fit is refused before any
/// chunk runs.
#[test]
fn a_long_prompt_in_chunks_gives_one_pass_bits() {
    let dir = tempfile::tempdir().expect("tempdir");
    let model = Model::load(&tiny("qwen2", dir.path())).expect("load tiny model");
    let pool = ThreadPool::new(2);
    let n = hanlin_engine::FORWARD_CHUNK * 2 + 77;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(8);
    let prompt: Vec<u32> = (0..n).map(|_| rng.random_range(0..VOCAB as u32)).collect();
    let fresh = || KvCache::new(KvShape::of(&model.cfg), n + 8);
    let mut chunked = fresh();
    let a = model
        .forward(&pool, &prompt, &mut chunked, Logits::Last)
        .expect("chunked");
    let mut whole = fresh();
    let b = model
        .forward_batch(
            &pool,
            &mut [BatchSeq {
                tokens: &prompt,
                cache: &mut whole,
                want: Logits::Last,
            }],
        )
        .expect("one pass")
        .take(0);
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(&a), bits(&b));
    assert_eq!(chunked.len(), n);
    let next = |c: &mut KvCache| model.forward(&pool, &[5], c, Logits::Last).expect("step");
    assert_eq!(bits(&next(&mut chunked)), bits(&next(&mut whole)));
    let mut small = KvCache::new(KvShape::of(&model.cfg), n - 1);
    let err = model.forward(&pool, &prompt, &mut small, Logits::Last);
    assert!(
        matches!(err, Err(EngineError::ContextOverflow { .. })),
        "{err:?}"
    );
    assert_eq!(small.len(), 0, "nothing was run");
}

/// A draft model's matrices at 4 bits (`Model::load_draft`): its logits
/// are not the file's (the Q8_0 matrices were re-quantized) but close to
/// them, through a prefill and single steps.
#[test]
fn a_draft_at_four_bits_stays_close_to_the_file() {
    let dir = tempfile::tempdir().expect("tmp");
    let path = tiny("qwen2", dir.path());
    let full = Model::load(&path).expect("load");
    let draft = Model::load_draft(&path).expect("load as a draft");
    let pool = ThreadPool::new(2);
    let toks: Vec<u32> = (0..24).map(|i| (i * 37 + 5) % VOCAB as u32).collect();
    let logits = |m: &Model| {
        let mut cache = KvCache::new(KvShape::of(&m.cfg), 64);
        let mut all = m
            .forward(&pool, &toks[..16], &mut cache, Logits::All)
            .expect("prefill");
        for &t in &toks[16..] {
            all.extend(
                m.forward(&pool, &[t], &mut cache, Logits::Last)
                    .expect("step"),
            );
        }
        all
    };
    let (a, b) = (logits(&full), logits(&draft));
    assert_eq!(a.len(), b.len());
    assert!(
        a.iter().zip(&b).any(|(x, y)| x.to_bits() != y.to_bits()),
        "the draft's logits are the file's: nothing was re-quantized"
    );
    for (ra, rb) in a.chunks_exact(VOCAB).zip(b.chunks_exact(VOCAB)) {
        let dot: f32 = ra.iter().zip(rb).map(|(x, y)| x * y).sum();
        let norm = |r: &[f32]| r.iter().map(|x| x * x).sum::<f32>().sqrt();
        let cos = dot / (norm(ra) * norm(rb));
        // Random weights at 4 bits: 0.987–0.996 here; a row read in the
        // wrong layout would be near 0.
        assert!(cos > 0.97, "cosine {cos}");
    }
}
