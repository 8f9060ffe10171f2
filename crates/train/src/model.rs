//! The GPT: token embeddings (tied to the output), `n_layer` pre-norm blocks
//! of grouped-query self-attention with rotary positions (and optional
//! per-head QK-norm) and a SwiGLU feed-forward — dense, or a routed
//! mixture of experts — and a final RMSNorm. The same architecture as the
//! engine's `llama` family (RoPE on interleaved pairs), so [`crate::export`]
//! writes it as a llama GGUF.
//!
//! Every projection is a [`Proj`]: a weight, and optionally a LoRA pair
//! (`x·W + s·(x·A)·B`, with `W` frozen) for fine-tuning.

use crate::config::GptConfig;
use burn::module::{Module, Param};
use burn::nn::loss::CrossEntropyLossConfig;
use burn::nn::{
    Embedding, EmbeddingConfig, Initializer, RmsNorm, RmsNormConfig, RotaryEncoding,
    RotaryEncodingConfig,
};
use burn::tensor::activation::{log_softmax, silu, softmax};
use burn::tensor::{Bool, Device, Distribution, IndexingUpdateOp, Int, Tensor, TensorData};

/// A linear map without bias, `[d_in] → [d_out]`, with an optional
/// low-rank adapter.
#[derive(Module, Debug)]
pub struct Proj {
    /// `[d_in, d_out]`.
    pub weight: Param<Tensor<2>>,
    pub lora: Option<LoraPair>,
    /// `[d_out]` (Qwen2's query, key and value projections have one).
    pub bias: Option<Param<Tensor<1>>>,
}

/// A LoRA adapter: `A` `[d_in, r]`, `B` `[r, d_out]` (zero at first), and
/// the scale `alpha / r`.
#[derive(Module, Debug)]
pub struct LoraPair {
    pub a: Param<Tensor<2>>,
    pub b: Param<Tensor<2>>,
    pub scale: f64,
}

impl Proj {
    pub fn new(d_in: usize, d_out: usize, std: f64, device: &Device) -> Self {
        Self::from_tensor(Tensor::random(
            [d_in, d_out],
            Distribution::Normal(0.0, std),
            device,
        ))
    }

    pub fn from_tensor(w: Tensor<2>) -> Self {
        Self {
            weight: Param::from_tensor(w),
            lora: None,
            bias: None,
        }
    }

    pub fn forward<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        let y = burn::tensor::module::linear(
            x.clone(),
            self.weight.val(),
            self.bias.as_ref().map(Param::val),
        );
        match &self.lora {
            None => y,
            Some(l) => {
                let low = burn::tensor::module::linear(x, l.a.val(), None);
                y + burn::tensor::module::linear(low, l.b.val(), None).mul_scalar(l.scale)
            }
        }
    }

    /// The weight with the adapter merged in, `[d_in, d_out]`.
    pub fn merged(&self) -> Tensor<2> {
        match &self.lora {
            None => self.weight.val(),
            Some(l) => self.weight.val() + l.a.val().matmul(l.b.val()).mul_scalar(l.scale),
        }
    }

    /// Freeze the weight and attach a fresh adapter of rank `r`.
    pub fn with_lora(self, r: usize, alpha: f64) -> Self {
        let w = self.weight.val();
        let [d_in, d_out] = w.dims();
        let device = w.device();
        Self {
            weight: self.weight.set_require_grad(false),
            bias: self.bias.map(|b| b.set_require_grad(false)),
            lora: Some(LoraPair {
                a: Param::from_tensor(Tensor::random(
                    [d_in, r],
                    Distribution::Normal(0.0, 1.0 / (d_in as f64).sqrt()),
                    &device,
                )),
                b: Param::from_tensor(Tensor::zeros([r, d_out], &device)),
                scale: alpha / r as f64,
            }),
        }
    }

    /// Freeze the weight and bias (an adapter, if any, still trains).
    fn freeze_base(self) -> Self {
        Self {
            weight: self.weight.set_require_grad(false),
            bias: self.bias.map(|b| b.set_require_grad(false)),
            lora: self.lora,
        }
    }
}

/// A SwiGLU feed-forward.
#[derive(Module, Debug)]
pub struct Mlp {
    pub gate: Proj,
    pub up: Proj,
    pub down: Proj,
}

impl Mlp {
    fn new(d: usize, ff: usize, std: f64, out_std: f64, device: &Device) -> Self {
        Self {
            gate: Proj::new(d, ff, std, device),
            up: Proj::new(d, ff, std, device),
            down: Proj::new(ff, d, out_std, device),
        }
    }
    fn forward<const D: usize>(&self, h: Tensor<D>) -> Tensor<D> {
        self.down
            .forward(silu(self.gate.forward(h.clone())) * self.up.forward(h))
    }
}

/// A routed mixture of SwiGLU experts: a softmax router, each token sent to
/// its `top_k` most probable experts and their outputs weighted by those
/// probabilities (not renormalised, as in the Switch Transformer).
#[derive(Module, Debug)]
pub struct Moe {
    pub router: Proj,
    pub experts: Vec<Mlp>,
    top_k: usize,
}

/// What a mixture-of-experts layer did in one forward pass.
#[derive(Debug, Clone, Default)]
pub struct Routing {
    /// Tokens sent to each expert, per MoE layer.
    pub load: Vec<Vec<usize>>,
}

impl Moe {
    /// `h` `[n, d]` → (`[n, d]`, the load-balancing loss, tokens per expert).
    fn forward(&self, h: Tensor<2>) -> (Tensor<2>, Tensor<1>, Vec<usize>) {
        let [n, d] = h.dims();
        let e = self.experts.len();
        let device = h.device();
        let probs = softmax(self.router.forward(h.clone()), 1);
        let p: Vec<f32> = probs
            .clone()
            .into_data()
            .convert::<f32>()
            .try_to_vec()
            .unwrap_or_default();
        // Each token's top-k experts (ties broken by index, as the engine does).
        let mut tokens: Vec<Vec<i64>> = vec![Vec::new(); e];
        let mut first = vec![0usize; e];
        for t in 0..n {
            let row = &p[t * e..(t + 1) * e];
            let mut idx: Vec<usize> = (0..e).collect();
            idx.sort_by(|&a, &b| row[b].total_cmp(&row[a]));
            for (rank, &x) in idx.iter().take(self.top_k).enumerate() {
                tokens[x].push(t as i64);
                if rank == 0 {
                    first[x] += 1;
                }
            }
        }
        let mut out = Tensor::<2>::zeros([n, d], &device);
        for (x, (expert, toks)) in self.experts.iter().zip(&tokens).enumerate() {
            if toks.is_empty() {
                continue;
            }
            let idx =
                Tensor::<1, Int>::from_data(TensorData::new(toks.clone(), [toks.len()]), &device);
            let y = expert.forward(h.clone().select(0, idx.clone()));
            let w = probs
                .clone()
                .select(0, idx.clone())
                .slice([0..toks.len(), x..x + 1]);
            out = out.select_assign(0, idx, y * w, IndexingUpdateOp::Add);
        }
        // Switch Transformer's auxiliary loss: E · Σ f_e · P_e, with f the
        // share of tokens whose first choice is e and P the mean router
        // probability of e. It is 1 when the load is uniform.
        let f: Vec<f32> = first.iter().map(|&c| c as f32 / n.max(1) as f32).collect();
        let f = Tensor::<1>::from_data(TensorData::new(f, [e]), &device);
        let aux = (probs.mean_dim(0).reshape([e]) * f)
            .sum()
            .mul_scalar(e as f64);
        (out, aux, tokens.iter().map(Vec::len).collect())
    }
}

#[derive(Module, Debug)]
pub struct Block {
    pub attn_norm: RmsNorm,
    pub wq: Proj,
    pub wk: Proj,
    pub wv: Proj,
    pub wo: Proj,
    /// Per-head RMSNorm of queries and keys, when the model has QK-norm.
    pub q_norm: Option<RmsNorm>,
    pub k_norm: Option<RmsNorm>,
    pub ffn_norm: RmsNorm,
    pub mlp: Option<Mlp>,
    pub moe: Option<Moe>,
    n_head: usize,
    n_kv: usize,
    head_dim: usize,
}

#[derive(Module, Debug)]
pub struct Gpt {
    pub embed: Embedding,
    pub blocks: Vec<Block>,
    pub norm: RmsNorm,
    /// An output matrix of its own `[d_model, vocab]`; without one the
    /// output is tied to the embeddings.
    pub head: Option<Proj>,
    rope: RotaryEncoding,
}

/// Logits and what the mixture-of-experts layers add.
pub struct Output {
    /// `[batch, seq, vocab]`.
    pub logits: Tensor<3>,
    /// Mean load-balancing loss of the MoE layers (zero without them).
    pub aux: Option<Tensor<1>>,
    pub routing: Routing,
}

impl Gpt {
    /// A new model with GPT-2-style initialisation (N(0, 0.02); the output
    /// projections of each block scaled down by √(2·layers)).
    pub fn new(c: &GptConfig, device: &Device) -> Self {
        let (d, hd, kv) = (c.d_model, c.head_dim(), c.kv_heads());
        let std = 0.02;
        let out_std = std / (2.0 * c.n_layer as f64).sqrt();
        let norm = |n: usize| RmsNormConfig::new(n).with_epsilon(c.norm_eps).init(device);
        let blocks = (0..c.n_layer)
            .map(|_| {
                let (mlp, moe) = match &c.moe {
                    Some(m) => (
                        None,
                        Some(Moe {
                            router: Proj::new(d, m.experts, std, device),
                            experts: (0..m.experts)
                                .map(|_| Mlp::new(d, c.d_ff, std, out_std, device))
                                .collect(),
                            top_k: m.top_k,
                        }),
                    ),
                    None => (Some(Mlp::new(d, c.d_ff, std, out_std, device)), None),
                };
                Block {
                    attn_norm: norm(d),
                    wq: Proj::new(d, c.n_head * hd, std, device),
                    wk: Proj::new(d, kv * hd, std, device),
                    wv: Proj::new(d, kv * hd, std, device),
                    wo: Proj::new(c.n_head * hd, d, out_std, device),
                    q_norm: c.qk_norm.then(|| norm(hd)),
                    k_norm: c.qk_norm.then(|| norm(hd)),
                    ffn_norm: norm(d),
                    mlp,
                    moe,
                    n_head: c.n_head,
                    n_kv: kv,
                    head_dim: hd,
                }
            })
            .collect();
        Self {
            embed: EmbeddingConfig::new(c.vocab_size, d)
                .with_initializer(Initializer::Normal { mean: 0.0, std })
                .init(device),
            blocks,
            norm: norm(d),
            head: None,
            rope: RotaryEncodingConfig::new(c.context, hd)
                .with_theta(c.rope_base)
                .init(device),
        }
    }

    /// Logits `[batch, seq, vocab]` for token ids `[batch, seq]`.
    pub fn forward(&self, tokens: Tensor<2, Int>) -> Tensor<3> {
        self.forward_full(tokens).logits
    }

    /// Logits with the MoE layers' auxiliary loss and routing.
    pub fn forward_full(&self, tokens: Tensor<2, Int>) -> Output {
        self.forward_docs(tokens, None)
    }

    /// [`Self::forward_full`] over rows that pack several documents:
    /// `docs[b, i]` numbers the document token `i` belongs to, and a token
    /// attends only to earlier tokens of its own document. (RoPE scores
    /// depend only on the distance between positions, so a document reads
    /// the same wherever it sits in the row.)
    pub fn forward_docs(&self, tokens: Tensor<2, Int>, docs: Option<Tensor<2, Int>>) -> Output {
        let [b, t] = tokens.dims();
        let device = tokens.device();
        let mut x = self.embed.forward(tokens);
        // Causal mask: position i attends to positions ≤ i.
        // (`tril_mask` is true outside the lower triangle: the future.)
        let causal = Tensor::<2, Bool>::tril_mask([t, t], 0, &device).reshape([1, 1, t, t]);
        let mask = match docs {
            None => causal,
            Some(d) => {
                let rows = d.clone().reshape([b, 1, t, 1]).repeat_dim(3, t);
                let cols = d.reshape([b, 1, 1, t]).repeat_dim(2, t);
                let other = rows.not_equal(cols).int();
                (other + causal.int().repeat_dim(0, b)).greater_elem(0)
            }
        };
        let mut aux: Option<Tensor<1>> = None;
        let mut routing = Routing::default();
        let n_moe = self
            .blocks
            .iter()
            .filter(|b| b.moe.is_some())
            .count()
            .max(1);
        for blk in &self.blocks {
            x = x.clone() + blk.attention(blk.attn_norm.forward(x), &self.rope, mask.clone());
            let h = blk.ffn_norm.forward(x.clone());
            let [_, _, d] = h.dims();
            let ff = match (&blk.mlp, &blk.moe) {
                (Some(m), _) => m.forward(h),
                (None, Some(moe)) => {
                    let (y, a, load) = moe.forward(h.reshape([b * t, d]));
                    let a = a.div_scalar(n_moe as f64);
                    aux = Some(match aux {
                        None => a,
                        Some(s) => s + a,
                    });
                    routing.load.push(load);
                    y.reshape([b, t, d])
                }
                (None, None) => h.zeros_like(),
            };
            x = x + ff;
        }
        let x = self.norm.forward(x);
        let logits = match &self.head {
            Some(h) => h.forward(x),
            None => {
                let [_, _, d] = x.dims();
                let w = self.embed.weight.val();
                let vocab = w.dims()[0];
                x.reshape([b * t, d])
                    .matmul(w.transpose())
                    .reshape([b, t, vocab])
            }
        };
        Output {
            logits,
            aux,
            routing,
        }
    }

    /// Mean next-token cross-entropy over windows of `len + 1` tokens.
    pub fn loss(&self, windows: &[Vec<u32>], device: &Device) -> Tensor<1> {
        self.loss_full(windows, device, 0.0).0
    }

    /// Cross-entropy plus `aux_weight` × the MoE load-balancing loss, with
    /// the routing.
    pub fn loss_full(
        &self,
        windows: &[Vec<u32>],
        device: &Device,
        aux_weight: f64,
    ) -> (Tensor<1>, Routing) {
        let (inputs, targets) = split_windows(windows, device);
        let out = self.forward_full(inputs);
        let [b, t, v] = out.logits.dims();
        let ce = CrossEntropyLossConfig::new()
            .init(device)
            .forward(out.logits.reshape([b * t, v]), targets.reshape([b * t]));
        let loss = match out.aux {
            Some(a) if aux_weight > 0.0 => ce + a.mul_scalar(aux_weight),
            _ => ce,
        };
        (loss, out.routing)
    }

    /// Log-probabilities `[batch, seq]` of each `targets` token given the
    /// tokens before it (`inputs` are the targets shifted right).
    pub fn token_logprobs(&self, inputs: Tensor<2, Int>, targets: Tensor<2, Int>) -> Tensor<2> {
        self.token_logprobs_docs(inputs, targets, None)
    }

    /// [`Self::token_logprobs`] over packed rows (see [`Self::forward_docs`]).
    pub fn token_logprobs_docs(
        &self,
        inputs: Tensor<2, Int>,
        targets: Tensor<2, Int>,
        docs: Option<Tensor<2, Int>>,
    ) -> Tensor<2> {
        let logits = self.forward_docs(inputs, docs).logits;
        let [b, t, _] = logits.dims();
        log_softmax(logits, 2)
            .gather(2, targets.reshape([b, t, 1]))
            .reshape([b, t])
    }

    /// Attach LoRA adapters of rank `r` to the projections whose names
    /// (`wq wk wv wo gate up down`) are in `targets`, freezing everything
    /// else.
    pub fn with_lora(self, r: usize, alpha: f64, targets: &[String]) -> Self {
        let want = |n: &str| targets.iter().any(|t| t == n);
        let lora = |p: Proj, n: &str| {
            if want(n) {
                p.with_lora(r, alpha)
            } else {
                p.freeze_base()
            }
        };
        let mlp = |m: Mlp| Mlp {
            gate: lora(m.gate, "gate"),
            up: lora(m.up, "up"),
            down: lora(m.down, "down"),
        };
        let blocks = self
            .blocks
            .into_iter()
            .map(|b| Block {
                attn_norm: b.attn_norm.no_grad(),
                wq: lora(b.wq, "wq"),
                wk: lora(b.wk, "wk"),
                wv: lora(b.wv, "wv"),
                wo: lora(b.wo, "wo"),
                q_norm: b.q_norm.map(Module::no_grad),
                k_norm: b.k_norm.map(Module::no_grad),
                ffn_norm: b.ffn_norm.no_grad(),
                mlp: b.mlp.map(mlp),
                moe: b.moe.map(|m| Moe {
                    router: lora(m.router, "router"),
                    experts: m.experts.into_iter().map(mlp).collect(),
                    top_k: m.top_k,
                }),
                ..b
            })
            .collect();
        Self {
            embed: self.embed.no_grad(),
            blocks,
            norm: self.norm.no_grad(),
            head: self.head.map(Proj::freeze_base),
            rope: self.rope,
        }
    }

    /// After loading a LoRA checkpoint: only the adapters train.
    pub fn freeze_non_lora(self) -> Self {
        let f = Proj::freeze_base;
        let mlp = |m: Mlp| Mlp {
            gate: f(m.gate),
            up: f(m.up),
            down: f(m.down),
        };
        Self {
            embed: self.embed.no_grad(),
            norm: self.norm.no_grad(),
            head: self.head.map(Proj::freeze_base),
            blocks: self
                .blocks
                .into_iter()
                .map(|b| Block {
                    attn_norm: b.attn_norm.no_grad(),
                    wq: f(b.wq),
                    wk: f(b.wk),
                    wv: f(b.wv),
                    wo: f(b.wo),
                    q_norm: b.q_norm.map(Module::no_grad),
                    k_norm: b.k_norm.map(Module::no_grad),
                    ffn_norm: b.ffn_norm.no_grad(),
                    mlp: b.mlp.map(mlp),
                    moe: b.moe.map(|m| Moe {
                        router: f(m.router),
                        experts: m.experts.into_iter().map(mlp).collect(),
                        top_k: m.top_k,
                    }),
                    ..b
                })
                .collect(),
            rope: self.rope,
        }
    }

    /// Every projection, in a fixed order, with its GGUF tensor name.
    pub fn projections(&self) -> Vec<(String, &Proj)> {
        let mut out = Vec::new();
        for (i, b) in self.blocks.iter().enumerate() {
            let n = |t: &str| format!("blk.{i}.{t}");
            out.push((n("attn_q"), &b.wq));
            out.push((n("attn_k"), &b.wk));
            out.push((n("attn_v"), &b.wv));
            out.push((n("attn_output"), &b.wo));
            if let Some(m) = &b.mlp {
                out.push((n("ffn_gate"), &m.gate));
                out.push((n("ffn_up"), &m.up));
                out.push((n("ffn_down"), &m.down));
            }
            if let Some(m) = &b.moe {
                out.push((n("ffn_gate_inp"), &m.router));
                for (e, x) in m.experts.iter().enumerate() {
                    out.push((n(&format!("ffn_gate.{e}")), &x.gate));
                    out.push((n(&format!("ffn_up.{e}")), &x.up));
                    out.push((n(&format!("ffn_down.{e}")), &x.down));
                }
            }
        }
        out
    }

    /// Whether any projection carries a LoRA adapter.
    pub fn has_lora(&self) -> bool {
        self.projections().iter().any(|(_, p)| p.lora.is_some())
    }

    /// The adapters, in [`Gpt::projections`] order.
    pub fn lora_pairs(&self) -> Vec<LoraPair> {
        self.projections()
            .into_iter()
            .filter_map(|(_, p)| p.lora.clone())
            .collect()
    }

    /// Put adapters (from [`Gpt::lora_pairs`] of the same shape) back.
    pub fn set_lora_pairs(mut self, pairs: Vec<LoraPair>) -> Self {
        let mut it = pairs.into_iter();
        let mut put = |p: &mut Proj| {
            if p.lora.is_some() {
                p.lora = it.next();
            }
        };
        for b in &mut self.blocks {
            for p in [&mut b.wq, &mut b.wk, &mut b.wv, &mut b.wo] {
                put(p);
            }
            if let Some(m) = &mut b.mlp {
                for p in [&mut m.gate, &mut m.up, &mut m.down] {
                    put(p);
                }
            }
            if let Some(m) = &mut b.moe {
                put(&mut m.router);
                for x in &mut m.experts {
                    for p in [&mut x.gate, &mut x.up, &mut x.down] {
                        put(p);
                    }
                }
            }
        }
        self
    }
}

impl Block {
    fn attention(&self, x: Tensor<3>, rope: &RotaryEncoding, mask: Tensor<4, Bool>) -> Tensor<3> {
        let [b, t, _] = x.dims();
        let (h, kv, hd) = (self.n_head, self.n_kv, self.head_dim);
        let heads = |y: Tensor<3>, n: usize| y.reshape([b, t, n, hd]).swap_dims(1, 2);
        let norm = |y: Tensor<4>, n: &Option<RmsNorm>| match n {
            Some(n) => n.forward(y),
            None => y,
        };
        let q = rope.forward(norm(heads(self.wq.forward(x.clone()), h), &self.q_norm));
        let k = rope.forward(norm(heads(self.wk.forward(x.clone()), kv), &self.k_norm));
        let v = heads(self.wv.forward(x), kv);
        // Query head i reads key/value head i / (h / kv).
        let rep = h / kv;
        let expand = |y: Tensor<4>| {
            if rep == 1 {
                y
            } else {
                y.reshape([b, kv, 1, t, hd])
                    .repeat_dim(2, rep)
                    .reshape([b, h, t, hd])
            }
        };
        let (k, v) = (expand(k), expand(v));
        let scores = q.matmul(k.swap_dims(2, 3)) / (hd as f64).sqrt();
        let scores = scores.mask_fill(mask, f32::NEG_INFINITY);
        let out = softmax(scores, 3).matmul(v);
        self.wo.forward(out.swap_dims(1, 2).reshape([b, t, h * hd]))
    }
}

/// Inputs `[b, len]` and targets `[b, len]` (shifted by one) from windows.
pub fn split_windows(windows: &[Vec<u32>], device: &Device) -> (Tensor<2, Int>, Tensor<2, Int>) {
    let b = windows.len();
    let len = windows.first().map_or(1, |w| w.len()) - 1;
    let mut inp = Vec::with_capacity(b * len);
    let mut tgt = Vec::with_capacity(b * len);
    for w in windows {
        inp.extend(w[..len].iter().map(|&x| x as i64));
        tgt.extend(w[1..=len].iter().map(|&x| x as i64));
    }
    (
        Tensor::from_data(TensorData::new(inp, [b, len]), device),
        Tensor::from_data(TensorData::new(tgt, [b, len]), device),
    )
}
