//! The GPT: token embeddings (tied to the output), `n_layer` pre-norm blocks
//! of grouped-query self-attention with rotary positions and a SwiGLU
//! feed-forward, a final RMSNorm. The same architecture as the engine's
//! `llama` family (RoPE on interleaved pairs), so [`crate::export`] writes
//! it as a llama GGUF.

use crate::config::GptConfig;
use burn::module::Module;
use burn::nn::loss::CrossEntropyLossConfig;
use burn::nn::{
    Embedding, EmbeddingConfig, Initializer, Linear, LinearConfig, RmsNorm, RmsNormConfig,
    RotaryEncoding, RotaryEncodingConfig,
};
use burn::tensor::activation::{silu, softmax};
use burn::tensor::{Bool, Device, Int, Tensor, TensorData};

#[derive(Module, Debug)]
pub struct Block {
    pub attn_norm: RmsNorm,
    pub wq: Linear,
    pub wk: Linear,
    pub wv: Linear,
    pub wo: Linear,
    pub ffn_norm: RmsNorm,
    pub gate: Linear,
    pub up: Linear,
    pub down: Linear,
    n_head: usize,
    n_kv: usize,
    head_dim: usize,
}

#[derive(Module, Debug)]
pub struct Gpt {
    pub embed: Embedding,
    pub blocks: Vec<Block>,
    pub norm: RmsNorm,
    rope: RotaryEncoding,
}

fn linear(d_in: usize, d_out: usize, std: f64, device: &Device) -> Linear {
    LinearConfig::new(d_in, d_out)
        .with_bias(false)
        .with_initializer(Initializer::Normal { mean: 0.0, std })
        .init(device)
}

impl Gpt {
    /// A new model with GPT-2-style initialisation (N(0, 0.02); the output
    /// projections of each block scaled down by √(2·layers)).
    pub fn new(c: &GptConfig, device: &Device) -> Self {
        let (d, hd, kv) = (c.d_model, c.head_dim(), c.kv_heads());
        let std = 0.02;
        let out_std = std / (2.0 * c.n_layer as f64).sqrt();
        let norm = || RmsNormConfig::new(d).with_epsilon(c.norm_eps).init(device);
        let blocks = (0..c.n_layer)
            .map(|_| Block {
                attn_norm: norm(),
                wq: linear(d, c.n_head * hd, std, device),
                wk: linear(d, kv * hd, std, device),
                wv: linear(d, kv * hd, std, device),
                wo: linear(c.n_head * hd, d, out_std, device),
                ffn_norm: norm(),
                gate: linear(d, c.d_ff, std, device),
                up: linear(d, c.d_ff, std, device),
                down: linear(c.d_ff, d, out_std, device),
                n_head: c.n_head,
                n_kv: kv,
                head_dim: hd,
            })
            .collect();
        Self {
            embed: EmbeddingConfig::new(c.vocab_size, d)
                .with_initializer(Initializer::Normal { mean: 0.0, std })
                .init(device),
            blocks,
            norm: norm(),
            rope: RotaryEncodingConfig::new(c.context, hd)
                .with_theta(c.rope_base)
                .init(device),
        }
    }

    /// Logits `[batch, seq, vocab]` for token ids `[batch, seq]`.
    pub fn forward(&self, tokens: Tensor<2, Int>) -> Tensor<3> {
        let [b, t] = tokens.dims();
        let device = tokens.device();
        let mut x = self.embed.forward(tokens);
        // Causal mask: position i attends to positions ≤ i.
        // (`tril_mask` is true outside the lower triangle: the future.)
        let mask = Tensor::<2, Bool>::tril_mask([t, t], 0, &device).reshape([1, 1, t, t]);
        for blk in &self.blocks {
            x = x.clone() + blk.attention(blk.attn_norm.forward(x), &self.rope, mask.clone());
            let h = blk.ffn_norm.forward(x.clone());
            let ff = blk
                .down
                .forward(silu(blk.gate.forward(h.clone())) * blk.up.forward(h));
            x = x + ff;
        }
        let x = self.norm.forward(x);
        let [_, _, d] = x.dims();
        let w = self.embed.weight.val();
        let vocab = w.dims()[0];
        x.reshape([b * t, d])
            .matmul(w.transpose())
            .reshape([b, t, vocab])
    }

    /// Mean next-token cross-entropy over windows of `len + 1` tokens.
    pub fn loss(&self, windows: &[Vec<u32>], device: &Device) -> Tensor<1> {
        let (inputs, targets) = split_windows(windows, device);
        let logits = self.forward(inputs);
        let [b, t, v] = logits.dims();
        CrossEntropyLossConfig::new()
            .init(device)
            .forward(logits.reshape([b * t, v]), targets.reshape([b * t]))
    }
}

impl Block {
    fn attention(&self, x: Tensor<3>, rope: &RotaryEncoding, mask: Tensor<4, Bool>) -> Tensor<3> {
        let [b, t, _] = x.dims();
        let (h, kv, hd) = (self.n_head, self.n_kv, self.head_dim);
        let heads = |y: Tensor<3>, n: usize| y.reshape([b, t, n, hd]).swap_dims(1, 2);
        let q = rope.forward(heads(self.wq.forward(x.clone()), h));
        let k = rope.forward(heads(self.wk.forward(x.clone()), kv));
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
