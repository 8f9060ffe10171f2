//! Training from a model that already exists: supervised fine-tuning on
//! conversations (the loss on the assistant's tokens only), preference
//! tuning with DPO against a frozen reference, and LoRA adaptation of a
//! GGUF foundation model on a domain's text or conversations. Also the
//! evaluation of a run on held-out data, with samples.

use crate::chat::{self, Example, Preference};
use crate::config::{RunConfig, TrainConfig};
use crate::data::{self, Dataset};
use crate::model::{split_windows, Gpt};
use crate::pretrain::TextTask;
use crate::run::{self, LoraInfo, Run};
use crate::trainer::{self, Progress, Task};
use crate::TrainError;
use burn::module::Module;
use burn::tensor::activation::{log_sigmoid, softmax};
use burn::tensor::{Device, Int, Tensor, TensorData};
use rand::{Rng, SeedableRng};
use std::path::Path;

/// The generator of micro-batch `micro` of step `step`.
fn rng(seed: u64, step: usize, micro: usize) -> rand_chacha::ChaCha8Rng {
    data::step_rng(seed ^ (micro as u64) << 48, step)
}

/// Inputs, targets and target mask `[b, len]` of examples, padded to the
/// longest (the padding is masked out).
fn pad(
    examples: &[&Example],
    pad_id: u32,
    device: &Device,
) -> (Tensor<2, Int>, Tensor<2, Int>, Tensor<2>) {
    let len = examples
        .iter()
        .map(|e| e.tokens.len().saturating_sub(1))
        .max()
        .unwrap_or(1)
        .max(1);
    let b = examples.len();
    let (mut inp, mut tgt, mut mask) = (
        Vec::with_capacity(b * len),
        Vec::with_capacity(b * len),
        Vec::with_capacity(b * len),
    );
    for e in examples {
        for i in 0..len {
            inp.push(*e.tokens.get(i).unwrap_or(&pad_id) as i64);
            tgt.push(*e.tokens.get(i + 1).unwrap_or(&pad_id) as i64);
            mask.push(f32::from(*e.mask.get(i + 1).unwrap_or(&0)));
        }
    }
    (
        Tensor::from_data(TensorData::new(inp, [b, len]), device),
        Tensor::from_data(TensorData::new(tgt, [b, len]), device),
        Tensor::from_data(TensorData::new(mask, [b, len]), device),
    )
}

/// Mean negative log-likelihood of the masked tokens. With `docs` the
/// examples are packed rows: `docs[r]` numbers the conversations of row `r`
/// (the padding after them is a conversation of its own), and each token
/// attends only to its own conversation.
fn masked_loss(
    model: &Gpt,
    examples: &[&Example],
    docs: Option<&[&[i64]]>,
    pad_id: u32,
    device: &Device,
) -> Tensor<1> {
    let (inp, tgt, mask) = pad(examples, pad_id, device);
    let docs = docs.map(|docs| {
        let [b, len] = inp.dims();
        let mut d = Vec::with_capacity(b * len);
        for row in docs {
            let fill = row.last().map_or(0, |x| x + 1);
            d.extend((0..len).map(|i| row.get(i).copied().unwrap_or(fill)));
        }
        Tensor::from_data(TensorData::new(d, [b, len]), device)
    });
    let lp = model.token_logprobs_docs(inp, tgt, docs);
    let n = mask.clone().sum();
    (lp * mask).sum().neg() / n.clamp_min(1.0)
}

/// Conversations packed into rows of at most `max` tokens.
struct Packed {
    rows: Vec<Example>,
    /// Per row, the conversation each token belongs to (0, 1, …).
    docs: Vec<Vec<i64>>,
}

/// Pack `examples` in order: a conversation that does not fit the current
/// row starts the next one. A conversation's first token is never a target
/// (it would be predicted from the previous conversation).
fn pack(examples: &[Example], max: usize) -> Packed {
    let mut p = Packed {
        rows: Vec::new(),
        docs: Vec::new(),
    };
    let mut row = Example::default();
    let mut docs: Vec<i64> = Vec::new();
    for e in examples {
        if !row.tokens.is_empty() && row.tokens.len() + e.tokens.len() > max {
            p.rows.push(std::mem::take(&mut row));
            p.docs.push(std::mem::take(&mut docs));
        }
        let doc = docs.last().map_or(0, |d| d + 1);
        row.tokens.extend_from_slice(&e.tokens);
        row.mask.extend(
            e.mask
                .iter()
                .enumerate()
                .map(|(i, &m)| if i == 0 { 0 } else { m }),
        );
        docs.extend(std::iter::repeat_n(doc, e.tokens.len()));
    }
    if !row.tokens.is_empty() {
        p.rows.push(row);
        p.docs.push(docs);
    }
    p
}

/// Sum of the masked tokens' log-probabilities, per example `[b]`.
fn sequence_logprobs(
    model: &Gpt,
    examples: &[&Example],
    pad_id: u32,
    device: &Device,
) -> Tensor<1> {
    let (inp, tgt, mask) = pad(examples, pad_id, device);
    let b = examples.len();
    (model.token_logprobs(inp, tgt) * mask)
        .sum_dim(1)
        .reshape([b])
}

fn to_vec(t: Tensor<1>) -> Vec<f32> {
    t.into_data()
        .convert::<f32>()
        .try_to_vec()
        .unwrap_or_default()
}

/// Cut examples to `max` tokens; those with nothing left to learn go.
fn fit(examples: Vec<Example>, max: usize) -> (Vec<Example>, usize) {
    let n = examples.len();
    let kept: Vec<Example> = examples
        .into_iter()
        .map(|mut e| {
            e.tokens.truncate(max);
            e.mask.truncate(max);
            e
        })
        .filter(|e| e.mask.iter().skip(1).any(|&m| m == 1))
        .collect();
    let dropped = n - kept.len();
    (kept, dropped)
}

/// At most this many examples are held out (validation runs often).
const MAX_HELD_OUT: usize = 200;

/// Hold out the last `fraction` (at least one when there are two or more).
fn split<T>(mut v: Vec<T>, fraction: f64, seed: u64) -> (Vec<T>, Vec<T>) {
    // A fixed shuffle first, so a sorted file does not put one kind of
    // example in the held-out part.
    let mut r = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    for i in (1..v.len()).rev() {
        v.swap(i, r.random_range(0..=i));
    }
    let n_val = ((v.len() as f64 * fraction).round() as usize)
        .max(usize::from(v.len() >= 2 && fraction > 0.0))
        .min(v.len().saturating_sub(1));
    let val = v.split_off(v.len() - n_val.min(MAX_HELD_OUT));
    (v, val)
}

/// Data and settings every fine-tuning command takes.
pub struct Options<'a> {
    pub data: &'a Path,
    /// Malformed lines are fatal instead of skipped.
    pub strict: bool,
    pub train: TrainConfig,
}

/// What a fine-tuning run ended with (`summary.json`).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Summary {
    pub kind: String,
    pub steps: usize,
    pub final_loss: f32,
    pub val_loss: f32,
    pub tokens_per_sec: f64,
    pub examples: usize,
    pub held_out: usize,
    /// Malformed or unusable lines, with file and line number.
    pub rejected_lines: Vec<String>,
    /// Examples cut to the sequence length (SFT) or dropped for it.
    pub truncated: usize,
    /// DPO: held-out preference accuracy and mean reward margin, of the
    /// starting model and after training.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dpo: Option<DpoFigures>,
    /// LoRA: held-out loss and perplexity of the base and after training.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lora: Option<LoraFigures>,
}

#[derive(Debug, Clone, Copy, serde::Serialize, serde::Deserialize)]
pub struct DpoFigures {
    pub beta: f64,
    pub accuracy_before: f32,
    pub accuracy_after: f32,
    pub margin_before: f32,
    pub margin_after: f32,
}

#[derive(Debug, Clone, Copy, serde::Serialize, serde::Deserialize)]
pub struct LoraFigures {
    pub val_loss_before: f32,
    pub val_loss_after: f32,
    pub perplexity_before: f64,
    pub perplexity_after: f64,
    pub trainable_parameters: usize,
}

struct Sft {
    train: Vec<Example>,
    /// With packing: each training row's conversation numbers.
    docs: Option<Vec<Vec<i64>>>,
    val: Vec<Example>,
    batch: usize,
    seed: u64,
    pad: u32,
    tokens: f64,
}

impl Sft {
    /// Training on `train` (packed into rows of `max` tokens when `t.pack`),
    /// validating on `val` one conversation per row.
    fn new(train: Vec<Example>, val: Vec<Example>, t: &TrainConfig, max: usize, pad: u32) -> Self {
        let (train, docs) = if t.pack {
            let p = pack(&train, max);
            tracing::info!(
                "{} conversations packed into {} rows",
                train.len(),
                p.rows.len()
            );
            (p.rows, Some(p.docs))
        } else {
            (train, None)
        };
        Self {
            train,
            docs,
            val,
            batch: t.batch_size,
            seed: t.seed,
            pad,
            tokens: 0.0,
        }
    }
}

impl Task for Sft {
    fn loss(
        &mut self,
        model: &Gpt,
        step: usize,
        micro: usize,
        device: &Device,
    ) -> (Tensor<1>, Vec<(&'static str, f32)>) {
        let mut r = rng(self.seed, step, micro);
        let picks: Vec<usize> = (0..self.batch)
            .map(|_| r.random_range(0..self.train.len()))
            .collect();
        let batch: Vec<&Example> = picks.iter().map(|&i| &self.train[i]).collect();
        self.tokens = batch.iter().map(|e| e.tokens.len() as f64).sum();
        let docs: Option<Vec<&[i64]>> = self
            .docs
            .as_ref()
            .map(|d| picks.iter().map(|&i| &d[i][..]).collect());
        let loss = masked_loss(model, &batch, docs.as_deref(), self.pad, device);
        (loss, Vec::new())
    }
    fn validate(&mut self, model: &Gpt, device: &Device) -> f32 {
        mean_masked_loss(model, &self.val, self.batch, self.pad, device)
    }
    fn tokens_per_micro(&self) -> f64 {
        let n = self.train.len().max(1) as f64;
        self.batch as f64
            * self
                .train
                .iter()
                .map(|e| e.tokens.len() as f64)
                .sum::<f64>()
            / n
    }
}

fn mean_masked_loss(model: &Gpt, ex: &[Example], batch: usize, pad: u32, device: &Device) -> f32 {
    if ex.is_empty() {
        return f32::NAN;
    }
    let (mut sum, mut n) = (0.0f64, 0.0f64);
    for chunk in ex.chunks(batch.max(1)) {
        let refs: Vec<&Example> = chunk.iter().collect();
        let toks: f64 = chunk
            .iter()
            .map(|e| e.mask.iter().skip(1).map(|&m| m as f64).sum::<f64>())
            .sum();
        let l: f32 = masked_loss(model, &refs, None, pad, device).into_scalar::<f32>();
        sum += l as f64 * toks;
        n += toks;
    }
    (sum / n.max(1.0)) as f32
}

fn seq_len(cfg: &RunConfig) -> usize {
    cfg.train
        .seq_len
        .unwrap_or(cfg.model.context)
        .min(cfg.model.context)
}

fn prepare(
    from: &Path,
    out: &Path,
    t: &TrainConfig,
    device: &Device,
) -> Result<(Run, RunConfig), TrainError> {
    let base = run::load(from, device)?;
    let mut cfg = base.cfg.clone();
    cfg.train = t.clone();
    let seq = seq_len(&cfg);
    crate::pretrain::check_memory(&cfg.model, t.batch_size * 2, seq)?;
    run::start_from(&base, from, out, &cfg)?;
    device.seed(t.seed);
    Ok((base, cfg))
}

/// Supervised fine-tuning of the run `from` on the conversations of
/// `opts.data`, into `out`.
pub fn sft(
    from: &Path,
    opts: &Options,
    out: &Path,
    device: &Device,
    progress: impl FnMut(&Progress),
) -> Result<Summary, TrainError> {
    let (base, cfg) = prepare(from, out, &opts.train, device)?;
    let chats = chat::read_chats(opts.data, opts.strict)?;
    let examples = chats
        .items
        .iter()
        .map(|c| chat::encode(&base.tok, c))
        .collect::<Result<Vec<_>, _>>()?;
    let max = seq_len(&cfg) + 1;
    let truncated = examples.iter().filter(|e| e.tokens.len() > max).count();
    let (examples, _) = fit(examples, max);
    let n = examples.len();
    let (train, val) = split(examples, cfg.train.val_fraction, cfg.train.seed);
    if train.is_empty() {
        return Err(TrainError::Corpus(
            "no conversation fits the sequence length".into(),
        ));
    }
    let held_out = val.len();
    let mut task = Sft::new(train, val, &cfg.train, max, base.tok.end_of_text()?);
    let o = trainer::run(base.model, &cfg.train, out, device, &mut task, progress)?;
    let s = Summary {
        kind: "sft".into(),
        steps: cfg.train.steps,
        final_loss: o.final_loss,
        val_loss: o.val_loss,
        tokens_per_sec: o.tokens_per_sec,
        examples: n,
        held_out,
        rejected_lines: chats.rejected,
        truncated,
        dpo: None,
        lora: None,
    };
    trainer::write_json(&out.join("summary.json"), &s)?;
    Ok(s)
}

/// A preference pair, encoded, with the reference model's log-probabilities.
struct Pair {
    chosen: Example,
    rejected: Example,
    ref_chosen: f32,
    ref_rejected: f32,
}

struct Dpo {
    train: Vec<Pair>,
    val: Vec<Pair>,
    batch: usize,
    seed: u64,
    pad: u32,
    beta: f64,
}

impl Dpo {
    /// DPO loss of `pairs` and the implicit rewards' margins.
    fn loss(&self, model: &Gpt, pairs: &[&Pair], device: &Device) -> (Tensor<1>, Tensor<1>) {
        let b = pairs.len();
        let mut seqs: Vec<&Example> = pairs.iter().map(|p| &p.chosen).collect();
        seqs.extend(pairs.iter().map(|p| &p.rejected));
        let lp = sequence_logprobs(model, &seqs, self.pad, device);
        let pc = lp.clone().narrow(0, 0, b);
        let pr = lp.narrow(0, b, b);
        let refs: Vec<f32> = pairs
            .iter()
            .map(|p| p.ref_chosen - p.ref_rejected)
            .collect();
        let refs = Tensor::<1>::from_data(TensorData::new(refs, [b]), device);
        let margin = (pc - pr - refs).mul_scalar(self.beta);
        (log_sigmoid(margin.clone()).mean().neg(), margin)
    }

    /// Held-out accuracy (share of pairs with a positive margin) and mean
    /// margin, with `model` (no gradients).
    fn held_out(&self, model: &Gpt, device: &Device) -> (f32, f32, f32) {
        let (mut loss, mut acc, mut margin) = (0.0f32, 0.0f32, 0.0f32);
        for chunk in self.val.chunks(self.batch.max(1)) {
            let refs: Vec<&Pair> = chunk.iter().collect();
            let (l, m) = self.loss(model, &refs, device);
            loss += l.into_scalar::<f32>() * chunk.len() as f32;
            for v in to_vec(m) {
                acc += f32::from(v > 0.0);
                margin += v;
            }
        }
        let n = self.val.len().max(1) as f32;
        (loss / n, acc / n, margin / n)
    }
}

impl Task for Dpo {
    fn loss(
        &mut self,
        model: &Gpt,
        step: usize,
        micro: usize,
        device: &Device,
    ) -> (Tensor<1>, Vec<(&'static str, f32)>) {
        let mut r = rng(self.seed, step, micro);
        let batch: Vec<&Pair> = (0..self.batch)
            .map(|_| &self.train[r.random_range(0..self.train.len())])
            .collect();
        let (loss, margin) = Dpo::loss(self, model, &batch, device);
        let m = to_vec(margin);
        let acc = m.iter().filter(|&&v| v > 0.0).count() as f32 / m.len().max(1) as f32;
        let mean = m.iter().sum::<f32>() / m.len().max(1) as f32;
        (loss, vec![("margin", mean), ("acc", acc)])
    }
    fn validate(&mut self, model: &Gpt, device: &Device) -> f32 {
        self.held_out(model, device).0
    }
    fn tokens_per_micro(&self) -> f64 {
        let n = self.train.len().max(1) as f64;
        self.batch as f64
            * self
                .train
                .iter()
                .map(|p| (p.chosen.tokens.len() + p.rejected.tokens.len()) as f64)
                .sum::<f64>()
            / n
    }
}

/// Direct preference optimisation of the run `from` on the pairs of
/// `opts.data`, against `from` itself frozen as the reference.
pub fn dpo(
    from: &Path,
    opts: &Options,
    beta: f64,
    out: &Path,
    device: &Device,
    progress: impl FnMut(&Progress),
) -> Result<Summary, TrainError> {
    let (base, cfg) = prepare(from, out, &opts.train, device)?;
    let prefs = chat::read_preferences(opts.data, opts.strict)?;
    let max = seq_len(&cfg) + 1;
    let pad = base.tok.end_of_text()?;
    let reference = base.model.clone().valid();
    let inner = device.clone().inner();
    let mut pairs = Vec::new();
    let mut truncated = 0;
    for p in &prefs.items {
        let Preference {
            prompt,
            chosen,
            rejected,
        } = p;
        let c = chat::encode_pair(&base.tok, prompt, chosen)?;
        let r = chat::encode_pair(&base.tok, prompt, rejected)?;
        if c.tokens.len() > max || r.tokens.len() > max {
            truncated += 1;
            continue;
        }
        pairs.push((c, r));
    }
    if pairs.is_empty() {
        return Err(TrainError::Corpus(
            "no preference pair fits the sequence length".into(),
        ));
    }
    let n = pairs.len();
    let (train, val) = split(pairs, cfg.train.val_fraction, cfg.train.seed);
    // The reference's log-probabilities, once.
    let score = |v: Vec<(Example, Example)>| -> Vec<Pair> {
        let mut out = Vec::with_capacity(v.len());
        for chunk in v.chunks(cfg.train.batch_size.max(1)) {
            let mut seqs: Vec<&Example> = chunk.iter().map(|p| &p.0).collect();
            seqs.extend(chunk.iter().map(|p| &p.1));
            let lp = to_vec(sequence_logprobs(&reference, &seqs, pad, &inner));
            let b = chunk.len();
            for (i, (c, r)) in chunk.iter().enumerate() {
                out.push(Pair {
                    chosen: c.clone(),
                    rejected: r.clone(),
                    ref_chosen: lp[i],
                    ref_rejected: lp[b + i],
                });
            }
        }
        out
    };
    let held_out = val.len();
    let mut task = Dpo {
        train: score(train),
        val: score(val),
        batch: cfg.train.batch_size,
        seed: cfg.train.seed,
        pad,
        beta,
    };
    // Before training the policy is the reference: every margin is 0, so
    // the starting model's preference is read from its raw log-ratio.
    let (acc0, margin0) = {
        let mut acc = 0.0f32;
        let mut m = 0.0f32;
        for p in &task.val {
            let d = (p.ref_chosen - p.ref_rejected) * beta as f32;
            acc += f32::from(d > 0.0);
            m += d;
        }
        let k = task.val.len().max(1) as f32;
        (acc / k, m / k)
    };
    let o = trainer::run(base.model, &cfg.train, out, device, &mut task, progress)?;
    let (_, acc1, margin1) = task.held_out(&o.model.clone().valid(), &inner);
    let s = Summary {
        kind: "dpo".into(),
        steps: cfg.train.steps,
        final_loss: o.final_loss,
        val_loss: o.val_loss,
        tokens_per_sec: o.tokens_per_sec,
        examples: n,
        held_out,
        rejected_lines: prefs.rejected,
        truncated,
        dpo: Some(DpoFigures {
            beta,
            accuracy_before: acc0,
            accuracy_after: acc1,
            margin_before: margin0,
            margin_after: margin1,
        }),
        lora: None,
    };
    trainer::write_json(&out.join("summary.json"), &s)?;
    Ok(s)
}

/// LoRA settings.
pub struct LoraOptions {
    pub rank: usize,
    pub alpha: f64,
    pub targets: Vec<String>,
}

/// Adapt the GGUF model `base` (named `base_name`) with LoRA on the text
/// files or conversations (`.jsonl`) of `opts.data`.
pub fn lora(
    base: &Path,
    base_name: &str,
    lo: &LoraOptions,
    opts: &Options,
    out: &Path,
    device: &Device,
    progress: impl FnMut(&Progress),
) -> Result<Summary, TrainError> {
    const TARGETS: [&str; 7] = ["wq", "wk", "wv", "wo", "gate", "up", "down"];
    if let Some(t) = lo.targets.iter().find(|t| !TARGETS.contains(&t.as_str())) {
        return Err(TrainError::Config(format!(
            "unknown LoRA target {t:?} (targets: {})",
            TARGETS.join(" ")
        )));
    }
    if lo.rank == 0 {
        return Err(TrainError::Config("the LoRA rank must be positive".into()));
    }
    let (mcfg, model, tok) = run::from_gguf(base, device)?;
    let cfg = RunConfig {
        model: mcfg,
        train: opts.train.clone(),
    };
    let seq = seq_len(&cfg);
    std::fs::create_dir_all(out).map_err(crate::io_err(out))?;
    run::write_config(out, &cfg)?;
    let info = LoraInfo {
        base: base.canonicalize().unwrap_or_else(|_| base.to_path_buf()),
        base_name: base_name.into(),
        rank: lo.rank,
        alpha: lo.alpha,
        targets: lo.targets.clone(),
    };
    trainer::write_json(&out.join("lora.json"), &info)?;
    device.seed(cfg.train.seed);
    let model = model.with_lora(lo.rank, lo.alpha, &lo.targets);
    let trainable: usize = model
        .lora_pairs()
        .iter()
        .map(|p| {
            p.a.val().dims().iter().product::<usize>() + p.b.val().dims().iter().product::<usize>()
        })
        .sum();
    let is_chat = opts.data.extension().is_some_and(|e| e == "jsonl")
        || (opts.data.is_dir()
            && std::fs::read_dir(opts.data)
                .map(|d| {
                    d.filter_map(Result::ok)
                        .any(|e| e.path().extension().is_some_and(|x| x == "jsonl"))
                })
                .unwrap_or(false));
    let inner = device.clone().inner();
    let before_path = out.join("lora_before.json");
    let text_data;
    let (mut task, examples, held_out, rejected): (Box<dyn Task + '_>, usize, usize, Vec<String>) =
        if is_chat {
            let chats = chat::read_chats(opts.data, opts.strict)?;
            let ex = chats
                .items
                .iter()
                .map(|c| chat::encode(&tok, c))
                .collect::<Result<Vec<_>, _>>()?;
            let (ex, _) = fit(ex, seq + 1);
            if ex.is_empty() {
                return Err(TrainError::Corpus(
                    "no conversation fits the sequence length".into(),
                ));
            }
            let n = ex.len();
            let (train, val) = split(ex, cfg.train.val_fraction, cfg.train.seed);
            let h = val.len();
            (
                Box::new(Sft::new(
                    train,
                    val,
                    &cfg.train,
                    seq + 1,
                    tok.end_of_text()?,
                )),
                n,
                h,
                chats.rejected,
            )
        } else {
            // A domain corpus is small: hold out every k-th block of the
            // stream rather than its tail (which would be one document).
            let all = Dataset::load(opts.data, &tok, 0.0)?;
            let every = (1.0 / cfg.train.val_fraction.max(0.01)).round().max(2.0) as usize;
            let (mut train, mut val) = (Vec::new(), Vec::new());
            for (i, block) in all.train.chunks(seq + 1).enumerate() {
                if i % every == every - 1 {
                    val.extend_from_slice(block);
                } else {
                    train.extend_from_slice(block);
                }
            }
            text_data = Dataset { train, val, ..all };
            let (n, h) = (text_data.train.len(), text_data.val.len());
            (
                Box::new(TextTask {
                    data: &text_data,
                    val_windows: data::windows(&text_data.val, seq, 64),
                    batch: cfg.train.batch_size,
                    seq,
                    seed: cfg.train.seed,
                    aux_weight: 0.0,
                    load: Vec::new(),
                }),
                n,
                h,
                Vec::new(),
            )
        };
    // The base's held-out loss (the adapters start at zero), measured once.
    let before: f32 = match std::fs::read(&before_path)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
    {
        Some(v) => v,
        None => {
            let v = task.validate(&model.clone().valid(), &inner);
            trainer::write_json(&before_path, &v)?;
            v
        }
    };
    let o = trainer::run(model, &cfg.train, out, device, task.as_mut(), progress)?;
    let s = Summary {
        kind: "lora".into(),
        steps: cfg.train.steps,
        final_loss: o.final_loss,
        val_loss: o.val_loss,
        tokens_per_sec: o.tokens_per_sec,
        examples,
        held_out,
        rejected_lines: rejected,
        truncated: 0,
        dpo: None,
        lora: Some(LoraFigures {
            val_loss_before: before,
            val_loss_after: o.val_loss,
            perplexity_before: (before as f64).exp(),
            perplexity_after: (o.val_loss as f64).exp(),
            trainable_parameters: trainable,
        }),
    };
    trainer::write_json(&out.join("summary.json"), &s)?;
    Ok(s)
}

/// Figures of a run on held-out data.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Evaluation {
    pub tokens: usize,
    pub loss: f64,
    pub perplexity: f64,
    /// Bits per UTF-8 byte and per character of the text (text data).
    pub bits_per_byte: Option<f64>,
    pub bits_per_char: Option<f64>,
    pub samples: Vec<(String, String)>,
}

/// Evaluate the run in `dir` on `data`: text files (perplexity, bits per
/// byte) or chat JSONL (loss on the assistant's tokens); then sample a
/// continuation of each prompt.
pub fn evaluate(
    dir: &Path,
    data: &Path,
    prompts: &[String],
    max_tokens: usize,
    seed: u64,
) -> Result<Evaluation, TrainError> {
    let device = Device::default();
    let r = run::load(dir, &device)?;
    let seq = seq_len(&r.cfg);
    let model = r.model.valid();
    let chat_data = data.extension().is_some_and(|e| e == "jsonl");
    let (tokens, loss, bpb, bpc, auto_prompts) = if chat_data {
        let chats = chat::read_chats(data, false)?;
        let ex = chats
            .items
            .iter()
            .map(|c| chat::encode(&r.tok, c))
            .collect::<Result<Vec<_>, _>>()?;
        let (ex, _) = fit(ex, seq + 1);
        let toks: usize = ex
            .iter()
            .map(|e| e.mask.iter().skip(1).filter(|&&m| m == 1).count())
            .sum();
        let pad = r.tok.end_of_text()?;
        let l = mean_masked_loss(&model, &ex, 8, pad, &device) as f64;
        let prompts = chats
            .items
            .iter()
            .take(3)
            .filter_map(|c| c.iter().find(|t| t.role == "user"))
            .map(|t| {
                format!(
                    "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n",
                    t.content
                )
            })
            .collect();
        (toks, l, None, None, prompts)
    } else {
        let files = crate::tokenizer::corpus_files(data)?;
        let (mut nll, mut n, mut bytes, mut chars) = (0.0f64, 0usize, 0usize, 0usize);
        let mut prompts = Vec::new();
        for f in files {
            let raw = std::fs::read(&f).map_err(crate::io_err(&f))?;
            let text = String::from_utf8_lossy(&raw);
            if text.trim().is_empty() {
                continue;
            }
            if prompts.len() < 3 {
                prompts.push(text.chars().take(12).collect());
            }
            bytes += text.len();
            chars += text.chars().count();
            let mut ids = r.tok.encode(&text)?;
            ids.push(r.tok.end_of_text()?);
            // Non-overlapping windows; each token is predicted once.
            for w in ids.chunks(seq + 1).filter(|w| w.len() >= 2) {
                let (inp, tgt) = split_windows(&[w.to_vec()], &device);
                let lp: f32 = model.token_logprobs(inp, tgt).sum().into_scalar::<f32>();
                nll -= lp as f64;
                n += w.len() - 1;
            }
        }
        if n == 0 {
            return Err(TrainError::Corpus(format!(
                "no text under {}",
                data.display()
            )));
        }
        let bits = nll / std::f64::consts::LN_2;
        (
            n,
            nll / n as f64,
            Some(bits / bytes.max(1) as f64),
            Some(bits / chars.max(1) as f64),
            prompts,
        )
    };
    let prompts: Vec<String> = if prompts.is_empty() {
        auto_prompts
    } else {
        prompts.to_vec()
    };
    let stop = r.tok.id("<|im_end|>");
    let eot = r.tok.end_of_text().ok();
    let mut samples = Vec::new();
    for (i, p) in prompts.iter().enumerate() {
        let ids = r.tok.encode(p)?;
        let out = sample(
            &model,
            &ids,
            max_tokens,
            seq,
            seed + i as u64,
            &[stop, eot],
            &device,
        );
        samples.push((p.clone(), r.tok.decode(&out)));
    }
    Ok(Evaluation {
        tokens,
        loss,
        perplexity: loss.exp(),
        bits_per_byte: bpb,
        bits_per_char: bpc,
        samples,
    })
}

/// Sample up to `max` tokens after `prompt` (temperature 0.8, top-k 40).
pub fn sample(
    model: &Gpt,
    prompt: &[u32],
    max: usize,
    context: usize,
    seed: u64,
    stop: &[Option<u32>],
    device: &Device,
) -> Vec<u32> {
    let mut r = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let mut ids = prompt.to_vec();
    let mut out = Vec::new();
    for _ in 0..max {
        let ctx = &ids[ids.len().saturating_sub(context)..];
        if ctx.is_empty() {
            break;
        }
        let t = ctx.len();
        let inp = Tensor::<2, Int>::from_data(
            TensorData::new(ctx.iter().map(|&x| x as i64).collect(), [1, t]),
            device,
        );
        let logits = model.forward(inp).slice([0..1, t - 1..t]);
        let v = logits.dims()[2];
        let p = to_vec(softmax(logits.reshape([v]).div_scalar(0.8), 0));
        let mut idx: Vec<usize> = (0..p.len()).collect();
        idx.sort_by(|&a, &b| p[b].total_cmp(&p[a]));
        idx.truncate(40);
        let total: f32 = idx.iter().map(|&i| p[i]).sum();
        let mut u = r.random::<f32>() * total;
        let mut next = idx[0];
        for &i in &idx {
            u -= p[i];
            if u <= 0.0 {
                next = i;
                break;
            }
        }
        let next = next as u32;
        if stop.contains(&Some(next)) {
            break;
        }
        ids.push(next);
        out.push(next);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packing_fills_rows_in_order_and_numbers_the_conversations() {
        let ex = |n: usize| Example {
            tokens: (0..n as u32).collect(),
            mask: vec![1; n],
        };
        let p = pack(&[ex(10), ex(10), ex(10), ex(20), ex(5)], 25);
        let lens: Vec<usize> = p.rows.iter().map(|r| r.tokens.len()).collect();
        assert_eq!(lens, [20, 10, 25]);
        assert_eq!(p.docs[0][9..11], [0, 1]);
        assert_eq!(p.docs[2][19..21], [0, 1]);
        // A conversation's first token is never learnt.
        assert_eq!(
            (p.rows[0].mask[0], p.rows[0].mask[10], p.rows[0].mask[11]),
            (0, 0, 1)
        );
        assert_eq!(p.rows[2].mask[20], 0);
    }
}
