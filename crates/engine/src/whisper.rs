//! Whisper (speech recognition) on the engine's kernels, loaded from
//! CTranslate2's `model.bin` ([`hanlin_formats::ct2`], the format
//! faster-whisper's models ship in).
//!
//! The encoder takes a log-mel spectrogram (`n_mels × frames`, frames a
//! multiple of two, at most twice the audio context): two 1-D convolutions
//! with GELU (the second with stride 2) run as matrix products over
//! im2col rows, sinusoidal positions are added, then pre-norm transformer
//! layers. The decoder is a GPT with learned positions whose layers also
//! attend to the encoder's output ("cross-attention"); its output matrix
//! is the token embedding.
//!
//! Every weight matrix is converted at load to Q8_0 (interleaved eight rows
//! at a time where the CPU has a kernel for it) and goes through the same
//! quantized matrix product as the chat models; norms, biases and
//! positions stay f32.

use crate::EngineError;
use hanlin_formats::ct2::Ct2File;
use hanlin_kernels::attn;
use hanlin_kernels::linear::{gelu_erf, layer_norm};
use hanlin_kernels::ops;
use hanlin_kernels::pool::SendPtr;
use hanlin_kernels::pool::ThreadPool;

/// Hyper-parameters, read from the variables' shapes.
#[derive(Debug, Clone, PartialEq)]
pub struct WhisperConfig {
    pub n_mels: usize,
    pub d: usize,
    pub enc_layers: usize,
    pub enc_heads: usize,
    pub dec_layers: usize,
    pub dec_heads: usize,
    pub vocab: usize,
    /// Encoder positions (1500: 30 seconds after the stride-2 convolution).
    pub audio_ctx: usize,
    /// Decoder positions (448).
    pub text_ctx: usize,
}

const EPS: f32 = 1e-5;

use hanlin_kernels::linear::Linear as Lin;

struct Norm {
    g: Vec<f32>,
    b: Vec<f32>,
}

impl Norm {
    /// Layer norm of each row of `x` into `out`.
    fn apply(&self, x: &[f32], out: &mut Vec<f32>) {
        out.clear();
        out.extend_from_slice(x);
        layer_norm(out, None, &self.g, &self.b, EPS);
    }
}

struct EncLayer {
    ln1: Norm,
    qkv: Lin,
    out: Lin,
    ln2: Norm,
    fc1: Lin,
    fc2: Lin,
}

struct DecLayer {
    ln1: Norm,
    qkv: Lin,
    out: Lin,
    lnx: Norm,
    xq: Lin,
    xkv: Lin,
    xout: Lin,
    ln2: Norm,
    fc1: Lin,
    fc2: Lin,
}

pub struct Whisper {
    pub config: WhisperConfig,
    conv1: Lin,
    conv2: Lin,
    enc_pos: Vec<f32>,
    enc: Vec<EncLayer>,
    enc_ln: Norm,
    /// Token embeddings (f32, for lookups) and the output matrix (Q8_0).
    emb: Vec<f32>,
    logits: Lin,
    dec_pos: Vec<f32>,
    dec: Vec<DecLayer>,
    dec_ln: Norm,
    pool: ThreadPool,
}

/// The encoder's output for one window: each decoder layer's keys and
/// values over the audio frames.
pub struct Audio {
    frames: usize,
    /// Per decoder layer: `frames × 2d` (keys, then values, per frame).
    kv: Vec<Vec<f32>>,
}

/// A decoder's running state over one window: the tokens' keys and values.
pub struct DecoderState {
    len: usize,
    /// Per layer: `len × 2d` (keys, then values, per token).
    kv: Vec<Vec<f32>>,
}

impl DecoderState {
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

fn bad(msg: String) -> EngineError {
    EngineError::BadModel(msg)
}

impl Whisper {
    /// Load a CTranslate2 Whisper `model.bin` held in `bytes`.
    pub fn from_ct2(bytes: &[u8], threads: usize) -> Result<Self, EngineError> {
        let f = Ct2File::parse(bytes)?;
        if f.spec != "WhisperSpec" {
            return Err(bad(format!("a CTranslate2 {} model, not Whisper", f.spec)));
        }
        let shape = |n: &str| -> Result<Vec<usize>, EngineError> { Ok(f.var(n)?.shape.clone()) };
        let get = |n: &str| -> Result<Vec<f32>, EngineError> { Ok(f.floats(bytes, n)?) };
        let count = |prefix: &str| {
            (0..)
                .take_while(|i| {
                    f.vars
                        .contains_key(&format!("{prefix}/layer_{i}/ffn/linear_0/weight"))
                })
                .count()
        };
        let conv1 = shape("encoder/conv1/weight")?;
        let emb_shape = shape("decoder/embeddings/weight")?;
        let enc_pos_shape = shape("encoder/position_encodings/encodings")?;
        let dec_pos_shape = shape("decoder/position_encodings/encodings")?;
        let heads = |n: &str| -> Result<usize, EngineError> {
            get(n)?
                .first()
                .map(|h| *h as usize)
                .ok_or_else(|| bad(format!("{n} is empty")))
        };
        let [d, n_mels, 3] = conv1[..] else {
            return Err(bad(format!("encoder/conv1/weight has shape {conv1:?}")));
        };
        let config = WhisperConfig {
            n_mels,
            d,
            enc_layers: count("encoder"),
            enc_heads: heads("encoder/num_heads")?,
            dec_layers: count("decoder"),
            dec_heads: heads("decoder/num_heads")?,
            vocab: emb_shape.first().copied().unwrap_or(0),
            audio_ctx: enc_pos_shape.first().copied().unwrap_or(0),
            text_ctx: dec_pos_shape.first().copied().unwrap_or(0),
        };
        let c = &config;
        let ok = c.d > 0
            && c.d.is_multiple_of(32)
            && c.enc_heads > 0
            && c.d.is_multiple_of(c.enc_heads)
            && c.dec_heads > 0
            && c.d.is_multiple_of(c.dec_heads)
            && c.enc_layers > 0
            && c.dec_layers > 0
            && emb_shape == [c.vocab, d]
            && enc_pos_shape == [c.audio_ctx, d]
            && dec_pos_shape == [c.text_ctx, d]
            && c.vocab > 0
            && c.audio_ctx > 0
            && c.text_ctx > 0;
        if !ok {
            return Err(bad(format!("inconsistent Whisper shapes: {c:?}")));
        }
        // A matrix `rows × cols` and its bias.
        let lin = |name: &str, rows: usize, cols: usize| -> Result<Lin, EngineError> {
            let w = get(&format!("{name}/weight"))?;
            if w.len() != rows * cols {
                return Err(bad(format!(
                    "{name}/weight: {} values, expected {rows}×{cols}",
                    w.len()
                )));
            }
            let b = get(&format!("{name}/bias"))?;
            if b.len() != rows {
                return Err(bad(format!(
                    "{name}/bias: {} values, expected {rows}",
                    b.len()
                )));
            }
            Ok(Lin::new(&w, rows, cols, b))
        };
        let norm = |name: &str| -> Result<Norm, EngineError> {
            let g = get(&format!("{name}/gamma"))?;
            let b = get(&format!("{name}/beta"))?;
            if g.len() != d || b.len() != d {
                return Err(bad(format!("{name}: not {d} values")));
            }
            Ok(Norm { g, b })
        };
        let ffn = 4 * d;
        let ffn_shape = shape("encoder/layer_0/ffn/linear_0/weight")?;
        let ffn = ffn_shape.first().copied().unwrap_or(ffn);
        let mut enc = Vec::with_capacity(c.enc_layers);
        for l in 0..c.enc_layers {
            let p = format!("encoder/layer_{l}");
            enc.push(EncLayer {
                ln1: norm(&format!("{p}/self_attention/layer_norm"))?,
                qkv: lin(&format!("{p}/self_attention/linear_0"), 3 * d, d)?,
                out: lin(&format!("{p}/self_attention/linear_1"), d, d)?,
                ln2: norm(&format!("{p}/ffn/layer_norm"))?,
                fc1: lin(&format!("{p}/ffn/linear_0"), ffn, d)?,
                fc2: lin(&format!("{p}/ffn/linear_1"), d, ffn)?,
            });
        }
        let mut dec = Vec::with_capacity(c.dec_layers);
        for l in 0..c.dec_layers {
            let p = format!("decoder/layer_{l}");
            dec.push(DecLayer {
                ln1: norm(&format!("{p}/self_attention/layer_norm"))?,
                qkv: lin(&format!("{p}/self_attention/linear_0"), 3 * d, d)?,
                out: lin(&format!("{p}/self_attention/linear_1"), d, d)?,
                lnx: norm(&format!("{p}/attention/layer_norm"))?,
                xq: lin(&format!("{p}/attention/linear_0"), d, d)?,
                xkv: lin(&format!("{p}/attention/linear_1"), 2 * d, d)?,
                xout: lin(&format!("{p}/attention/linear_2"), d, d)?,
                ln2: norm(&format!("{p}/ffn/layer_norm"))?,
                fc1: lin(&format!("{p}/ffn/linear_0"), ffn, d)?,
                fc2: lin(&format!("{p}/ffn/linear_1"), d, ffn)?,
            });
        }
        let emb = get("decoder/embeddings/weight")?;
        // The convolutions' weights are `out × in × 3`: an im2col row holds
        // each input channel's three taps in that order.
        let conv2 = shape("encoder/conv2/weight")?;
        if conv2 != [d, d, 3] {
            return Err(bad(format!("encoder/conv2/weight has shape {conv2:?}")));
        }
        Ok(Self {
            conv1: lin("encoder/conv1", d, n_mels * 3)?,
            conv2: lin("encoder/conv2", d, d * 3)?,
            enc_pos: get("encoder/position_encodings/encodings")?,
            enc_ln: norm("encoder/layer_norm")?,
            logits: Lin::new(&emb, c.vocab, d, Vec::new()),
            emb,
            dec_pos: get("decoder/position_encodings/encodings")?,
            dec_ln: norm("decoder/layer_norm")?,
            enc,
            dec,
            config,
            pool: ThreadPool::new(threads.max(1)),
        })
    }

    /// Run the encoder over `mel` (`n_mels` rows of `frames` values each;
    /// `frames` even and at most twice the audio context) and compute
    /// every decoder layer's cross-attention keys and values.
    pub fn encode(&self, mel: &[f32], frames: usize) -> Result<Audio, EngineError> {
        let c = &self.config;
        let d = c.d;
        if frames == 0 || !frames.is_multiple_of(2) || frames > 2 * c.audio_ctx {
            return Err(bad(format!(
                "{frames} mel frames (need an even number up to {})",
                2 * c.audio_ctx
            )));
        }
        if mel.len() != c.n_mels * frames {
            return Err(bad(format!(
                "{} mel values for {} × {frames}",
                mel.len(),
                c.n_mels
            )));
        }
        let pool = &self.pool;
        // conv1: stride 1, padding 1.
        let k1 = self.conv1.cols;
        let mut cols = vec![0f32; frames * k1];
        for (t, row) in cols.chunks_exact_mut(k1).enumerate() {
            for ch in 0..c.n_mels {
                for k in 0..3 {
                    let src = t + k;
                    if (1..=frames).contains(&src) {
                        row[ch * 3 + k] = mel[ch * frames + src - 1];
                    }
                }
            }
        }
        let mut h1 = Vec::new();
        self.conv1.apply(pool, &cols, &mut h1);
        h1.iter_mut().for_each(|v| *v = gelu_erf(*v));
        // conv2: stride 2, padding 1.
        let n = frames / 2;
        let mut cols = vec![0f32; n * 3 * d];
        for (t, row) in cols.chunks_exact_mut(3 * d).enumerate() {
            for k in 0..3 {
                let src = 2 * t + k;
                if (1..=frames).contains(&src) {
                    let from = &h1[(src - 1) * d..src * d];
                    for (ch, v) in from.iter().enumerate() {
                        row[ch * 3 + k] = *v;
                    }
                }
            }
        }
        let mut x = Vec::new();
        self.conv2.apply(pool, &cols, &mut x);
        for (t, row) in x.chunks_exact_mut(d).enumerate() {
            for (v, p) in row.iter_mut().zip(&self.enc_pos[t * d..(t + 1) * d]) {
                *v = gelu_erf(*v) + p;
            }
        }
        let (mut a, mut qkv, mut ctx, mut o, mut mid) = (
            Vec::new(),
            Vec::new(),
            vec![0f32; n * d],
            Vec::new(),
            Vec::new(),
        );
        for l in &self.enc {
            l.ln1.apply(&x, &mut a);
            l.qkv.apply(pool, &a, &mut qkv);
            encoder_attention(pool, c.enc_heads, d, &qkv, n, &mut ctx);
            l.out.apply(pool, &ctx, &mut o);
            ops::add_inplace(&mut x, &o);
            l.ln2.apply(&x, &mut a);
            l.fc1.apply(pool, &a, &mut mid);
            mid.iter_mut().for_each(|v| *v = gelu_erf(*v));
            l.fc2.apply(pool, &mid, &mut o);
            ops::add_inplace(&mut x, &o);
        }
        self.enc_ln.apply(&x, &mut a);
        let kv = self
            .dec
            .iter()
            .map(|l| {
                let mut kv = Vec::new();
                l.xkv.apply(pool, &a, &mut kv);
                kv
            })
            .collect();
        Ok(Audio { frames: n, kv })
    }

    pub fn new_state(&self) -> DecoderState {
        DecoderState {
            len: 0,
            kv: vec![Vec::new(); self.config.dec_layers],
        }
    }

    /// Feed `tokens` after what `st` holds; returns each token's final
    /// hidden state (`d` values per token) for [`Whisper::logits`].
    pub fn decode(
        &self,
        st: &mut DecoderState,
        audio: &Audio,
        tokens: &[u32],
    ) -> Result<Vec<f32>, EngineError> {
        let c = &self.config;
        let d = c.d;
        let pool = &self.pool;
        let n = tokens.len();
        if st.len + n > c.text_ctx {
            return Err(EngineError::ContextOverflow {
                needed: st.len + n,
                limit: c.text_ctx,
            });
        }
        let mut x = vec![0f32; n * d];
        for (i, (&t, row)) in tokens.iter().zip(x.chunks_exact_mut(d)).enumerate() {
            let t = t as usize;
            if t >= c.vocab {
                return Err(EngineError::BadToken(t as u32));
            }
            let p = st.len + i;
            for ((v, e), q) in row
                .iter_mut()
                .zip(&self.emb[t * d..(t + 1) * d])
                .zip(&self.dec_pos[p * d..(p + 1) * d])
            {
                *v = e + q;
            }
        }
        let heads = Heads {
            n: c.dec_heads,
            hd: d / c.dec_heads,
        };
        let (mut a, mut qkv, mut ctx, mut o, mut mid) = (
            Vec::new(),
            Vec::new(),
            vec![0f32; n * d],
            Vec::new(),
            Vec::new(),
        );
        let past = st.len;
        let mut xq = Vec::new();
        for ((l, kv), xkv) in self.dec.iter().zip(&mut st.kv).zip(&audio.kv) {
            l.ln1.apply(&x, &mut a);
            l.qkv.apply(pool, &a, &mut qkv);
            for row in qkv.chunks_exact(3 * d) {
                kv.extend_from_slice(&row[d..]);
            }
            attend(
                pool,
                heads,
                &qkv[..],
                3 * d,
                (&kv[..], &kv[d..], 2 * d),
                past + n,
                Some(past),
                &mut ctx,
            );
            l.out.apply(pool, &ctx, &mut o);
            ops::add_inplace(&mut x, &o);
            l.lnx.apply(&x, &mut a);
            l.xq.apply(pool, &a, &mut xq);
            attend(
                pool,
                heads,
                &xq[..],
                d,
                (&xkv[..], &xkv[d..], 2 * d),
                audio.frames,
                None,
                &mut ctx,
            );
            l.xout.apply(pool, &ctx, &mut o);
            ops::add_inplace(&mut x, &o);
            l.ln2.apply(&x, &mut a);
            l.fc1.apply(pool, &a, &mut mid);
            mid.iter_mut().for_each(|v| *v = gelu_erf(*v));
            l.fc2.apply(pool, &mid, &mut o);
            ops::add_inplace(&mut x, &o);
        }
        st.len += n;
        self.dec_ln.apply(&x, &mut a);
        Ok(a)
    }

    /// Logits over the vocabulary for one hidden state; the ids from
    /// `exact_from` on (Whisper's timestamp tokens, whose near-ties decide
    /// where segments end) are computed in f32.
    pub fn logits(&self, hidden: &[f32], exact_from: usize) -> Vec<f32> {
        let mut out = Vec::new();
        self.logits.apply(&self.pool, hidden, &mut out);
        let d = self.config.d;
        for (t, o) in out.iter_mut().enumerate().skip(exact_from) {
            *o = ops::dot_f32(hidden, &self.emb[t * d..(t + 1) * d]);
        }
        out
    }
}

/// Self-attention over all `n` positions of fused `q, k, v` rows (`3d`
/// each) into `ctx` (`n × d`): each head's keys and values laid out once,
/// then blocks of eight queries per job.
fn encoder_attention(
    pool: &ThreadPool,
    heads: usize,
    d: usize,
    qkv: &[f32],
    n: usize,
    ctx: &mut [f32],
) {
    let hd = d / heads;
    let scale = 1.0 / (hd as f32).sqrt();
    attn::dense(
        pool,
        heads,
        hd,
        qkv,
        3 * d,
        (&qkv[d..], &qkv[2 * d..], 3 * d),
        n,
        n,
        scale,
        ctx,
    );
}

#[derive(Clone, Copy)]
struct Heads {
    n: usize,
    hd: usize,
}

/// Scaled dot-product attention of `n_q` query rows (`q`, rows `q_stride`
/// apart, heads side by side) over `n_kv` key/value rows (`k` and `v`,
/// `kv_stride` apart) into `out` (`n_q × heads·hd`). `causal`: query `i`
/// sits at position `past + i` and sees keys up to it.
#[allow(clippy::too_many_arguments)]
fn attend(
    pool: &ThreadPool,
    h: Heads,
    q: &[f32],
    q_stride: usize,
    (k, v, kv_stride): (&[f32], &[f32], usize),
    n_kv: usize,
    causal: Option<usize>,
    out: &mut Vec<f32>,
) {
    let d = h.n * h.hd;
    let n_q = q.len().div_ceil(q_stride);
    out.clear();
    out.resize(n_q * d, 0.0);
    let dst = SendPtr(out.as_mut_ptr());
    let scale = 1.0 / (h.hd as f32).sqrt();
    pool.for_chunks(n_q * h.n, 4, &|r| {
        let mut probs = Vec::with_capacity(n_kv);
        for job in r {
            let (i, hh) = (job / h.n, job % h.n);
            let qh = &q[i * q_stride + hh * h.hd..i * q_stride + (hh + 1) * h.hd];
            let seen = causal.map_or(n_kv, |past| (past + i + 1).min(n_kv));
            probs.clear();
            probs.extend((0..seen).map(|s| {
                ops::dot_f32(
                    qh,
                    &k[s * kv_stride + hh * h.hd..s * kv_stride + (hh + 1) * h.hd],
                ) * scale
            }));
            ops::softmax(&mut probs);
            // SAFETY: each (query, head) slice is written by this job only.
            let o = unsafe { dst.slice(i * d + hh * h.hd, h.hd) };
            o.fill(0.0);
            for (p, s) in probs.iter().zip(0..seen) {
                ops::axpy(
                    o,
                    *p,
                    &v[s * kv_stride + hh * h.hd..s * kv_stride + (hh + 1) * h.hd],
                );
            }
        }
    });
}
