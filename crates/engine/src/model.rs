//! Loading a model's weights (memory-mapped GGUF) and the forward pass.

use crate::kv::KvCache;
use crate::EngineError;
use hanlin_arch::{names, Activation, ModelConfig};
use hanlin_formats::{GgmlType, GgufFile, TensorInfo};
use hanlin_kernels::ops::{self, Rope, RopeStyle};
use hanlin_kernels::{matmul, Activations, QMat, ThreadPool};
use std::path::Path;

/// A weight matrix inside the mapped file.
#[derive(Debug, Clone, Copy)]
pub struct WRef {
    pub ty: GgmlType,
    pub offset: usize,
    pub size: usize,
    pub rows: usize,
    pub cols: usize,
    /// Interleaved at load for the kernels ([`hanlin_kernels::kpack`]).
    pub packed: bool,
}

struct Ffn {
    gate: WRef,
    up: WRef,
    down: WRef,
}

struct Moe {
    router: WRef,
    /// 3-D expert tensors viewed as `n_expert * d_ff` rows (gate/up) and
    /// `n_expert * d_model` rows (down).
    gate: WRef,
    up: WRef,
    down: WRef,
    shared: Option<(Ffn, Option<WRef>)>,
}

enum FeedForward {
    Dense(Ffn),
    Moe(Moe),
}

struct Layer {
    attn_norm: Vec<f32>,
    wq: WRef,
    wk: WRef,
    wv: WRef,
    wo: WRef,
    bq: Option<Vec<f32>>,
    bk: Option<Vec<f32>>,
    bv: Option<Vec<f32>>,
    q_norm: Option<Vec<f32>>,
    k_norm: Option<Vec<f32>>,
    post_attn_norm: Option<Vec<f32>>,
    ffn_norm: Vec<f32>,
    post_ffn_norm: Option<Vec<f32>>,
    ffn: FeedForward,
    rope: Rope,
    window: Option<usize>,
}

pub struct Model {
    pub cfg: ModelConfig,
    file: GgufFile,
    embd: WRef,
    output: WRef,
    output_norm: Vec<f32>,
    layers: Vec<Layer>,
}

/// One sequence's share of a batched forward pass.
pub struct BatchSeq<'a> {
    pub tokens: &'a [u32],
    pub cache: &'a mut KvCache,
    pub want: Logits,
}

/// Which positions of a batch need logits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Logits {
    /// None (a prompt chunk that is not the prompt's end).
    None,
    Last,
    All,
    /// No logits: the mean over the positions of the final-normalised
    /// hidden state, L2-normalised (`d_model` floats; a sentence embedding).
    Mean,
}

struct Loader<'a> {
    file: &'a GgufFile,
}

impl Loader<'_> {
    fn info(&self, name: &str) -> Result<&TensorInfo, EngineError> {
        self.file
            .header
            .tensor(name)
            .ok_or_else(|| EngineError::BadModel(format!("tensor {name} is missing")))
    }
    fn has(&self, name: &str) -> bool {
        self.file.header.tensor(name).is_some()
    }
    /// A matrix with `cols` inputs and `rows` outputs (ggml dims `[cols, rows, (n)]`).
    fn mat(&self, name: &str, cols: usize, rows: usize) -> Result<WRef, EngineError> {
        let t = self.info(name)?;
        if t.row_len() != cols || t.n_rows() != rows {
            return Err(EngineError::BadModel(format!(
                "tensor {name} has shape {:?}, expected [{cols}, {rows}]",
                t.dims
            )));
        }
        Ok(WRef {
            ty: t.ty,
            offset: t.offset,
            size: t.size,
            rows,
            cols,
            packed: false,
        })
    }
    fn vec(&self, name: &str, len: usize) -> Result<Vec<f32>, EngineError> {
        let t = self.info(name)?;
        if t.n_elements() != len as u64 {
            return Err(EngineError::BadModel(format!(
                "tensor {name} has shape {:?}, expected [{len}]",
                t.dims
            )));
        }
        let mut out = vec![0f32; len];
        hanlin_kernels::quant::dequantize_row(t.ty, self.file.tensor_data(t), &mut out);
        Ok(out)
    }
    fn opt_vec(&self, name: &str, len: usize) -> Result<Option<Vec<f32>>, EngineError> {
        if self.has(name) {
            self.vec(name, len).map(Some)
        } else {
            Ok(None)
        }
    }
}

impl Model {
    /// Load a GGUF file, or a Hugging Face safetensors directory.
    pub fn load(path: &Path) -> Result<Self, EngineError> {
        let file = if path.is_dir() {
            GgufFile::from_hf_dir(path)?
        } else {
            GgufFile::open(path)?
        };
        let cfg = ModelConfig::from_gguf(&file.header)?;
        let l = Loader { file: &file };
        let (d, q, kv) = (cfg.d_model, cfg.q_dim(), cfg.kv_dim());
        let embd = l.mat(names::TOKEN_EMBD, d, cfg.vocab_size)?;
        let output = if l.has(names::OUTPUT) {
            l.mat(names::OUTPUT, d, cfg.vocab_size)?
        } else {
            embd
        };
        let output_norm = l.vec(names::OUTPUT_NORM, d)?;
        let mut layers = Vec::with_capacity(cfg.n_layer);
        for i in 0..cfg.n_layer {
            let n = |t: &str| names::blk(i, t);
            let ffn = match cfg.moe {
                None => FeedForward::Dense(Ffn {
                    gate: l.mat(&n(names::FFN_GATE), d, cfg.d_ff)?,
                    up: l.mat(&n(names::FFN_UP), d, cfg.d_ff)?,
                    down: l.mat(&n(names::FFN_DOWN), cfg.d_ff, d)?,
                }),
                Some(m) => {
                    let shared = match m.d_ff_shared {
                        Some(sd) if l.has(&n(names::FFN_GATE_SHEXP)) => Some((
                            Ffn {
                                gate: l.mat(&n(names::FFN_GATE_SHEXP), d, sd)?,
                                up: l.mat(&n(names::FFN_UP_SHEXP), d, sd)?,
                                down: l.mat(&n(names::FFN_DOWN_SHEXP), sd, d)?,
                            },
                            if l.has(&n(names::FFN_GATE_INP_SHEXP)) {
                                Some(l.mat(&n(names::FFN_GATE_INP_SHEXP), d, 1)?)
                            } else {
                                None
                            },
                        )),
                        _ => None,
                    };
                    FeedForward::Moe(Moe {
                        router: l.mat(&n(names::FFN_GATE_INP), d, m.n_expert)?,
                        gate: l.mat(&n(names::FFN_GATE_EXPS), d, m.d_ff_expert * m.n_expert)?,
                        up: l.mat(&n(names::FFN_UP_EXPS), d, m.d_ff_expert * m.n_expert)?,
                        down: l.mat(&n(names::FFN_DOWN_EXPS), m.d_ff_expert, d * m.n_expert)?,
                        shared,
                    })
                }
            };
            let local = cfg.is_local_layer(i);
            let base = if local {
                cfg.rope_base_local.unwrap_or(cfg.rope_base)
            } else {
                cfg.rope_base
            };
            let style = if cfg.rope_neox {
                RopeStyle::Neox
            } else {
                RopeStyle::Normal
            };
            layers.push(Layer {
                attn_norm: l.vec(&n(names::ATTN_NORM), d)?,
                wq: l.mat(&n(names::ATTN_Q), d, q)?,
                wk: l.mat(&n(names::ATTN_K), d, kv)?,
                wv: l.mat(&n(names::ATTN_V), d, kv)?,
                wo: l.mat(&n(names::ATTN_OUT), q, d)?,
                bq: l.opt_vec(&n(names::ATTN_Q_BIAS), q)?,
                bk: l.opt_vec(&n(names::ATTN_K_BIAS), kv)?,
                bv: l.opt_vec(&n(names::ATTN_V_BIAS), kv)?,
                q_norm: l.opt_vec(&n(names::ATTN_Q_NORM), cfg.head_dim)?,
                k_norm: l.opt_vec(&n(names::ATTN_K_NORM), cfg.head_dim)?,
                post_attn_norm: l.opt_vec(&n(names::ATTN_POST_NORM), d)?,
                ffn_norm: l.vec(&n(names::FFN_NORM), d)?,
                post_ffn_norm: l.opt_vec(&n(names::FFN_POST_NORM), d)?,
                ffn,
                rope: Rope::new(style, cfg.n_rot, base, 1.0),
                window: if local {
                    cfg.sliding_window.map(|(w, _)| w)
                } else {
                    None
                },
            });
        }
        let mut model = Self {
            cfg,
            file,
            embd,
            output,
            output_norm,
            layers,
        };
        model.pack();
        Ok(model)
    }

    /// Interleave the weights the matmul reads, eight rows at a time, where
    /// this CPU has kernels for their format (in place: memory does not
    /// grow). A token embedding of its own keeps the file's layout; one that
    /// is also the output matrix is packed, and its rows are looked up
    /// through the packing.
    fn pack(&mut self) {
        let start = std::time::Instant::now();
        let tied = self.output.offset == self.embd.offset;
        let mut ws: Vec<&mut WRef> = vec![&mut self.output];
        for l in &mut self.layers {
            ws.extend([&mut l.wq, &mut l.wk, &mut l.wv, &mut l.wo]);
            if let FeedForward::Dense(f) = &mut l.ffn {
                ws.extend([&mut f.gate, &mut f.up, &mut f.down]);
            }
        }
        let bytes = self.file.bytes_mut();
        let mut n = 0;
        for w in ws {
            let fits = w.rows.is_multiple_of(8) && w.size == w.rows * w.ty.row_bytes(w.cols);
            if fits && hanlin_kernels::kpack::packs(w.ty) {
                let data = &mut bytes[w.offset..w.offset + w.size];
                hanlin_kernels::kpack::pack(w.ty, data, w.rows, w.cols);
                w.packed = true;
                n += 1;
            }
        }
        if tied {
            self.embd.packed = self.output.packed;
        }
        tracing::debug!(matrices = n, elapsed = ?start.elapsed(), "weights interleaved");
    }

    pub fn header(&self) -> &hanlin_formats::GgufHeader {
        &self.file.header
    }

    /// Drop the tokenizer's vocabulary arrays (tokens, scores, types,
    /// merges) from the header once a tokenizer has been built from them:
    /// parsed, a 262,144-token vocabulary holds tens of megabytes the
    /// model never reads again.
    pub fn drop_vocabulary(&mut self) {
        self.file.header.metadata.retain(|k, _| {
            !matches!(
                k.as_str(),
                "tokenizer.ggml.tokens"
                    | "tokenizer.ggml.scores"
                    | "tokenizer.ggml.token_type"
                    | "tokenizer.ggml.merges"
            )
        });
    }

    fn q(&self, w: &WRef) -> QMat<'_> {
        QMat {
            ty: w.ty,
            data: &self.file.bytes()[w.offset..w.offset + w.size],
            rows: w.rows,
            cols: w.cols,
            packed: w.packed,
        }
    }

    /// A row range of a weight (one expert of a 3-D expert tensor).
    fn q_rows(&self, w: &WRef, start: usize, n: usize) -> QMat<'_> {
        let rb = w.ty.row_bytes(w.cols);
        let off = w.offset + start * rb;
        QMat {
            ty: w.ty,
            data: &self.file.bytes()[off..off + n * rb],
            rows: n,
            cols: w.cols,
            packed: false,
        }
    }

    fn mm(&self, pool: &ThreadPool, w: &WRef, a: &Activations, out: &mut Vec<f32>) {
        out.resize(a.n_tok * w.rows, 0.0);
        matmul(pool, &self.q(w), a, out);
    }

    /// Run `tokens` (continuing the sequence in `cache`) and return logits:
    /// `vocab` floats for the last token, or for every token with [`Logits::All`].
    ///
    /// A long prompt whose last logits (or none) are wanted runs in chunks
    /// of [`FORWARD_CHUNK`] tokens, as `hanlin serve`'s scheduler feeds it:
    /// only a chunk's activations are held at once, and every token's
    /// results are the same bits either way (nothing depends on the batch).
    pub fn forward(
        &self,
        pool: &ThreadPool,
        tokens: &[u32],
        cache: &mut KvCache,
        want: Logits,
    ) -> Result<Vec<f32>, EngineError> {
        if tokens.len() > FORWARD_CHUNK && matches!(want, Logits::Last | Logits::None) {
            // Refused before anything is run, as one pass would be.
            fits(cache, tokens.len())?;
            let (head, last) = tokens.split_at((tokens.len() - 1) / FORWARD_CHUNK * FORWARD_CHUNK);
            for chunk in head.chunks(FORWARD_CHUNK) {
                self.forward(pool, chunk, cache, Logits::None)?;
            }
            return self.forward(pool, last, cache, want);
        }
        let mut seqs = [BatchSeq {
            tokens,
            cache,
            want,
        }];
        Ok(self
            .forward_batch(pool, &mut seqs)?
            .pop()
            .unwrap_or_default())
    }

    /// One pass over the weights for several sequences at once (continuous
    /// batching): the rows of every sequence go through each matrix product
    /// together, while RoPE positions, attention and the KV cache stay per
    /// sequence. Returns each sequence's logits as [`Model::forward`] would.
    pub fn forward_batch(
        &self,
        pool: &ThreadPool,
        seqs: &mut [BatchSeq<'_>],
    ) -> Result<Vec<Vec<f32>>, EngineError> {
        let cfg = &self.cfg;
        for s in seqs.iter() {
            if let Some(&bad) = s.tokens.iter().find(|&&t| t as usize >= cfg.vocab_size) {
                return Err(EngineError::BadToken(bad));
            }
            fits(s.cache, s.tokens.len())?;
        }
        // Row ranges of each sequence in the stacked batch.
        let mut spans = Vec::with_capacity(seqs.len());
        let mut t_n = 0;
        for s in seqs.iter() {
            spans.push(t_n..t_n + s.tokens.len());
            t_n += s.tokens.len();
        }
        if t_n == 0 {
            return Ok(vec![Vec::new(); seqs.len()]);
        }
        let p0s: Vec<usize> = seqs.iter().map(|s| s.cache.len()).collect();
        let d = cfg.d_model;
        let (hd, qd, kvd) = (cfg.head_dim, cfg.q_dim(), cfg.kv_dim());
        let mut x = vec![0f32; t_n * d];
        let embd = self.q(&self.embd);
        let scale = if cfg.embed_scale {
            (d as f32).sqrt()
        } else {
            1.0
        };
        let all_tokens = seqs.iter().flat_map(|s| s.tokens.iter());
        for (row, &tok) in x.chunks_exact_mut(d).zip(all_tokens) {
            embd.dequantize_row(tok as usize, row);
            if scale != 1.0 {
                row.iter_mut().for_each(|v| *v *= scale);
            }
        }
        let mut h = vec![0f32; t_n * d];
        let (mut q, mut k, mut v) = (Vec::new(), Vec::new(), Vec::new());
        let mut attn = vec![0f32; t_n * qd];
        let (mut o, mut g, mut u, mut dn) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for (li, layer) in self.layers.iter().enumerate() {
            ops::rms_norm(&x, &layer.attn_norm, cfg.norm_eps, &mut h);
            {
                let a = Activations::new(&h, d);
                self.mm(pool, &layer.wq, &a, &mut q);
                self.mm(pool, &layer.wk, &a, &mut k);
                self.mm(pool, &layer.wv, &a, &mut v);
            }
            for (buf, bias) in [
                (&mut q, &layer.bq),
                (&mut k, &layer.bk),
                (&mut v, &layer.bv),
            ] {
                if let Some(b) = bias {
                    for row in buf.chunks_exact_mut(b.len()) {
                        ops::add_inplace(row, b);
                    }
                }
            }
            if let Some(w) = &layer.q_norm {
                ops::rms_norm_inplace(&mut q, w, cfg.norm_eps);
            }
            if let Some(w) = &layer.k_norm {
                ops::rms_norm_inplace(&mut k, w, cfg.norm_eps);
            }
            for ((s, span), &p0) in seqs.iter_mut().zip(&spans).zip(&p0s) {
                for (i, t) in span.clone().enumerate() {
                    layer.rope.apply(&mut q[t * qd..(t + 1) * qd], hd, p0 + i);
                    layer.rope.apply(&mut k[t * kvd..(t + 1) * kvd], hd, p0 + i);
                }
                let rows = span.start * kvd..span.end * kvd;
                s.cache.append(li, &k[rows.clone()], &v[rows]);
            }
            let caches: Vec<&KvCache> = seqs.iter().map(|s| &*s.cache).collect();
            self.attention(pool, layer, li, &caches, &spans, &p0s, &q, &mut attn);
            {
                let a = Activations::new(&attn, qd);
                self.mm(pool, &layer.wo, &a, &mut o);
            }
            if let Some(w) = &layer.post_attn_norm {
                ops::rms_norm_inplace(&mut o, w, cfg.norm_eps);
            }
            ops::add_inplace(&mut x, &o);
            ops::rms_norm(&x, &layer.ffn_norm, cfg.norm_eps, &mut h);
            match &layer.ffn {
                FeedForward::Dense(f) => self.dense_ffn(pool, f, &h, &mut g, &mut u, &mut dn),
                FeedForward::Moe(m) => self.moe_ffn(pool, m, &h, &mut g, &mut u, &mut dn),
            }
            if let Some(w) = &layer.post_ffn_norm {
                ops::rms_norm_inplace(&mut dn, w, cfg.norm_eps);
            }
            ops::add_inplace(&mut x, &dn);
        }
        // Only the rows whose logits are wanted go through the output matrix.
        let mut rows = Vec::new();
        let mut counts = Vec::with_capacity(seqs.len());
        let mut means: Vec<Option<Vec<f32>>> = vec![None; seqs.len()];
        for (i, (s, span)) in seqs.iter_mut().zip(&spans).enumerate() {
            s.cache.commit(span.len());
            let wanted = match (s.want, span.is_empty()) {
                (_, true) | (Logits::None, _) => 0..0,
                (Logits::Last, false) => span.end - 1..span.end,
                (Logits::All, false) => span.clone(),
                (Logits::Mean, false) => {
                    let seq = &x[span.start * d..span.end * d];
                    let mut normed = vec![0f32; seq.len()];
                    ops::rms_norm(seq, &self.output_norm, cfg.norm_eps, &mut normed);
                    let mut mean = vec![0f32; d];
                    for row in normed.chunks_exact(d) {
                        ops::add_inplace(&mut mean, row);
                    }
                    let norm = mean.iter().map(|v| v * v).sum::<f32>().sqrt().max(1e-12);
                    mean.iter_mut().for_each(|v| *v /= norm);
                    means[i] = Some(mean);
                    0..0
                }
            };
            rows.extend_from_slice(&x[wanted.start * d..wanted.end * d]);
            counts.push(wanted.len());
        }
        if rows.is_empty() {
            return Ok(means.into_iter().map(Option::unwrap_or_default).collect());
        }
        let mut normed = vec![0f32; rows.len()];
        ops::rms_norm(&rows, &self.output_norm, cfg.norm_eps, &mut normed);
        let a = Activations::new(&normed, d);
        let mut logits = Vec::new();
        self.mm(pool, &self.output, &a, &mut logits);
        let vocab = cfg.vocab_size;
        let mut out = Vec::with_capacity(seqs.len());
        let mut at = 0;
        for (n, mean) in counts.into_iter().zip(means) {
            match mean {
                Some(m) => out.push(m),
                None => out.push(logits[at * vocab..(at + n) * vocab].to_vec()),
            }
            at += n;
        }
        Ok(out)
    }

    /// Attention of every sequence of a batch (`spans`: its query rows,
    /// `p0s`: its first position) in one parallel pass, so short decode
    /// sequences do not each pay for a round of the pool.
    #[allow(clippy::too_many_arguments)]
    fn attention(
        &self,
        pool: &ThreadPool,
        layer: &Layer,
        li: usize,
        caches: &[&KvCache],
        spans: &[std::ops::Range<usize>],
        p0s: &[usize],
        q: &[f32],
        out: &mut [f32],
    ) {
        let cfg = &self.cfg;
        let qd = cfg.q_dim();
        let out_ptr = out.as_mut_ptr();
        let (hd, n_kv) = (cfg.head_dim, cfg.n_head_kv);
        // A sequence with several blocks of query tokens (a prompt) gets
        // its keys and values converted to f32 once for all of them.
        let first_of = |p0: usize| {
            layer
                .window
                .map(|w| (p0 + 1).saturating_sub(w))
                .unwrap_or(0)
                / ATTN_KB
                * ATTN_KB
        };
        // The buffers are kept between layers and steps (fresh pages for
        // megabytes per layer would cost more than the conversion).
        let mut bufs = SHARED_KV.take();
        let mut bases = Vec::new();
        for ((&cache, span), &p0) in caches.iter().zip(spans).zip(p0s) {
            if span.len() <= ATTN_TB {
                continue;
            }
            let base = first_of(p0);
            let positions = p0 + span.len() - base;
            let (nk, nv) = SharedKv::sizes(n_kv, hd, positions);
            if bufs.len() <= bases.len() {
                bufs.push(Default::default());
            }
            let (kt, v) = &mut bufs[bases.len()];
            kt.resize(nk, 0.0);
            v.resize(nv, 0.0);
            SharedKv::fill(cache, li, n_kv, hd, base, &mut kt[..nk], &mut v[..nv]);
            bases.push((base, nk, nv));
        }
        let mut shared = bufs
            .iter()
            .zip(&bases)
            .map(|((kt, v), &(base, nk, nv))| SharedKv {
                kt: &kt[..nk],
                v: &v[..nv],
                base,
                blocks: (nv / (n_kv * hd)).div_ceil(ATTN_KB),
                positions: nv / (n_kv * hd),
            });
        let parts: Vec<Attend> = caches
            .iter()
            .zip(spans)
            .zip(p0s)
            .map(|((&cache, span), &p0)| Attend {
                hd: cfg.head_dim,
                nh: cfg.n_head,
                group: cfg.n_head / cfg.n_head_kv,
                scale: 1.0 / (cfg.head_dim as f32).sqrt(),
                window: layer.window,
                li,
                cache,
                q: &q[span.start * qd..span.end * qd],
                p0,
                t_n: span.len(),
                // SAFETY: `span` lies within the batch's rows, so within `out`.
                out: SendPtr(unsafe { out_ptr.add(span.start * qd) }),
                shared: if span.len() > ATTN_TB {
                    shared.next()
                } else {
                    None
                },
            })
            .collect();
        // One job per (sequence, kv head, block of query tokens): each
        // key/value row is converted from f16 once and used by every query
        // head of the group and every token of the block.
        let mut jobs = Vec::new();
        for (si, a) in parts.iter().enumerate() {
            for kvh in 0..cfg.n_head_kv {
                for blk in 0..a.t_n.div_ceil(ATTN_TB) {
                    jobs.push((si, kvh, blk));
                }
            }
        }
        // Any SIMD level on x86-64 means AVX2, FMA and F16C were detected;
        // `Avx2Vnni` means AVX-512 F too.
        #[cfg(target_arch = "x86_64")]
        let level = hanlin_kernels::dot::simd_level();
        pool.for_chunks(jobs.len(), 1, &|r| {
            ATTEND_SCRATCH.with_borrow_mut(|sc| {
                for &(si, kvh, blk) in &jobs[r] {
                    let a = &parts[si];
                    #[cfg(target_arch = "x86_64")]
                    {
                        use hanlin_kernels::dot::SimdLevel;
                        match level {
                            // SAFETY: AVX-512 F, AVX2, FMA and F16C were detected at run time.
                            SimdLevel::Avx2Vnni => unsafe { a.job_avx512(kvh, blk, sc) },
                            // SAFETY: AVX2, FMA and F16C were detected at run time.
                            SimdLevel::Avx2 => unsafe { a.job_avx2(kvh, blk, sc) },
                            SimdLevel::Scalar => a.job::<false, false>(kvh, blk, sc),
                        }
                        continue;
                    }
                    #[allow(unreachable_code)]
                    a.job::<false, false>(kvh, blk, sc);
                }
            });
        });
        drop(parts);
        // Kept for the next layer, unless a very long prompt made them
        // large: then memory matters more than the page faults.
        const KEEP_FLOATS: usize = 16 << 20;
        if bufs
            .iter()
            .map(|(k, v)| k.capacity() + v.capacity())
            .sum::<usize>()
            > KEEP_FLOATS
        {
            bufs.clear();
        }
        SHARED_KV.set(bufs);
    }

    fn act(&self) -> ops::Act {
        match self.cfg.activation {
            Activation::Silu => ops::Act::Silu,
            Activation::GeluTanh => ops::Act::GeluTanh,
        }
    }

    fn dense_ffn(
        &self,
        pool: &ThreadPool,
        f: &Ffn,
        h: &[f32],
        g: &mut Vec<f32>,
        u: &mut Vec<f32>,
        out: &mut Vec<f32>,
    ) {
        let a = Activations::new(h, self.cfg.d_model);
        self.mm(pool, &f.gate, &a, g);
        self.mm(pool, &f.up, &a, u);
        glu_par(pool, g, u, self.act());
        let a = Activations::new(g, f.gate.rows);
        self.mm(pool, &f.down, &a, out);
    }

    fn moe_ffn(
        &self,
        pool: &ThreadPool,
        m: &Moe,
        h: &[f32],
        g: &mut Vec<f32>,
        u: &mut Vec<f32>,
        out: &mut Vec<f32>,
    ) {
        let d = self.cfg.d_model;
        let Some(mc) = self.cfg.moe else { return };
        let t_n = h.len() / d;
        out.clear();
        out.resize(t_n * d, 0.0);
        let mut router = Vec::new();
        self.mm(pool, &m.router, &Activations::new(h, d), &mut router);
        let mut y = Vec::new();
        for t in 0..t_n {
            let ht = &h[t * d..(t + 1) * d];
            let probs = &mut router[t * mc.n_expert..(t + 1) * mc.n_expert];
            ops::softmax(probs);
            let mut idx: Vec<usize> = (0..mc.n_expert).collect();
            idx.sort_by(|&a, &b| probs[b].total_cmp(&probs[a]));
            idx.truncate(mc.n_expert_used);
            let norm: f32 = if mc.norm_topk {
                idx.iter().map(|&e| probs[e]).sum()
            } else {
                1.0
            };
            let a = Activations::new(ht, d);
            for &e in &idx {
                let w = probs[e] / norm;
                let ff = mc.d_ff_expert;
                g.resize(ff, 0.0);
                u.resize(ff, 0.0);
                matmul(pool, &self.q_rows(&m.gate, e * ff, ff), &a, g);
                matmul(pool, &self.q_rows(&m.up, e * ff, ff), &a, u);
                ops::glu(g, u, self.act());
                y.resize(d, 0.0);
                matmul(
                    pool,
                    &self.q_rows(&m.down, e * d, d),
                    &Activations::new(g, ff),
                    &mut y,
                );
                for (o, v) in out[t * d..(t + 1) * d].iter_mut().zip(&y) {
                    *o += w * v;
                }
            }
            if let Some((sf, sgate)) = &m.shared {
                let mut sy = Vec::new();
                self.dense_ffn(pool, sf, ht, g, u, &mut sy);
                let gate = match sgate {
                    Some(gw) => {
                        let mut s = Vec::new();
                        self.mm(pool, gw, &a, &mut s);
                        1.0 / (1.0 + (-s[0]).exp())
                    }
                    None => 1.0,
                };
                for (o, v) in out[t * d..(t + 1) * d].iter_mut().zip(&sy) {
                    *o += gate * v;
                }
            }
        }
    }
}

/// Whether `cache` has room for `n` more positions.
fn fits(cache: &KvCache, n: usize) -> Result<(), EngineError> {
    let needed = cache.len() + n;
    if needed > cache.capacity() {
        return Err(EngineError::ContextOverflow {
            needed,
            limit: cache.capacity(),
        });
    }
    Ok(())
}

/// The most prompt tokens [`Model::forward`] runs in one pass.
pub const FORWARD_CHUNK: usize = 512;

/// Query tokens per attention job.
const ATTN_TB: usize = 8;
/// Key/value positions per block of an attention job (blocks start at
/// multiples of it).
const ATTN_KB: usize = 64;

/// One layer's attention over a batch of query tokens of one sequence.
struct Attend<'a> {
    hd: usize,
    nh: usize,
    group: usize,
    scale: f32,
    window: Option<usize>,
    li: usize,
    cache: &'a KvCache,
    q: &'a [f32],
    p0: usize,
    t_n: usize,
    out: SendPtr,
    /// This sequence's keys and values already in f32, for a batch of
    /// several query blocks (a prompt): converted once per layer instead
    /// of once per block.
    shared: Option<SharedKv<'a>>,
}

/// Keys (transposed, in blocks of [`ATTN_KB`] positions: block `b` of kv
/// head `h` holds `kt[d·KB + j]` for position `base + b·KB + j`) and values
/// (rows of `hd`) of positions `base..`, converted from the cache's f16.
#[derive(Clone, Copy)]
struct SharedKv<'a> {
    kt: &'a [f32],
    v: &'a [f32],
    base: usize,
    blocks: usize,
    positions: usize,
}

impl SharedKv<'_> {
    /// The size of the buffers for `positions` positions from a multiple
    /// of [`ATTN_KB`]: (keys, values).
    fn sizes(n_kv: usize, hd: usize, positions: usize) -> (usize, usize) {
        let blocks = positions.div_ceil(ATTN_KB);
        (n_kv * blocks * hd * ATTN_KB, n_kv * positions * hd)
    }

    /// Convert positions `base..base + positions` of layer `li` (all kv
    /// heads) into `kt` and `v`, sized by [`Self::sizes`].
    fn fill(
        cache: &KvCache,
        li: usize,
        n_kv: usize,
        hd: usize,
        base: usize,
        kt: &mut [f32],
        v: &mut [f32],
    ) {
        let positions = v.len() / (n_kv * hd);
        let blocks = positions.div_ceil(ATTN_KB);
        let mut row = vec![0f32; n_kv * hd];
        for j in 0..positions {
            f16::to_f32::<false>(cache.key(li, base + j), &mut row);
            let (b, jj) = (j / ATTN_KB, j % ATTN_KB);
            for h in 0..n_kv {
                let blk = &mut kt[(h * blocks + b) * hd * ATTN_KB..][..hd * ATTN_KB];
                for (d, &x) in row[h * hd..(h + 1) * hd].iter().enumerate() {
                    blk[d * ATTN_KB + jj] = x;
                }
            }
            f16::to_f32::<false>(cache.val(li, base + j), &mut row);
            for h in 0..n_kv {
                v[(h * positions + j) * hd..][..hd].copy_from_slice(&row[h * hd..(h + 1) * hd]);
            }
        }
    }
}

#[derive(Default)]
struct AttendScratch {
    scores: Vec<f32>,
    qs: Vec<f32>,
    row: Vec<f32>,
    /// A block of keys, transposed (dimension-major).
    kt: Vec<f32>,
    /// A block of values, row by row.
    vb: Vec<f32>,
}

thread_local! {
    /// Each pool thread's attention buffers, kept between jobs and steps.
    static ATTEND_SCRATCH: std::cell::RefCell<AttendScratch> = std::cell::RefCell::default();
    /// The calling thread's [`SharedKv`] buffers (keys, values), one pair
    /// per prompt in the batch, kept between layers and steps.
    static SHARED_KV: std::cell::Cell<Vec<(Vec<f32>, Vec<f32>)>> = std::cell::Cell::default();
}

impl Attend<'_> {
    /// [`Self::job`] compiled for AVX2 and FMA (the same operations, 8 lanes wide).
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn job_avx2(&self, kvh: usize, blk: usize, sc: &mut AttendScratch) {
        self.job::<true, false>(kvh, blk, sc)
    }

    /// [`Self::job`] with AVX-512 tiles (16 lanes): the same operations
    /// per element, so the same bits as [`Self::job_avx2`].
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx2,fma,f16c")]
    unsafe fn job_avx512(&self, kvh: usize, blk: usize, sc: &mut AttendScratch) {
        self.job::<true, true>(kvh, blk, sc)
    }

    /// Keys/values head `kvh` against query tokens `blk*TB..` of every head
    /// of its group. `F16C`: compiled inside [`Self::job_avx2`] or
    /// [`Self::job_avx512`], so the f16 conversions use the F16C
    /// instructions (exact, like the portable ones) and products are fused
    /// multiply-adds; `Z`: inside [`Self::job_avx512`], with 16-lane tiles.
    ///
    /// Keys and values come in blocks of [`ATTN_KB`] positions, aligned to
    /// multiples of it, converted from f16 once per block; register tiles
    /// of four query rows then meet sixteen keys (scores) or sixteen value
    /// dimensions (outputs) at a time — thirty-two of each with `Z`. A
    /// (query, key) score is the sum over the dimensions in order, and an
    /// output is the sum over aligned key blocks of each block's sum in key
    /// order, masked keys adding exact zeros: the same operations whichever
    /// block of query tokens the query sits in, and whichever tile width,
    /// so a token's result depends neither on its batch nor on the SIMD level.
    #[inline(always)]
    fn job<const F16C: bool, const Z: bool>(&self, kvh: usize, blk: usize, sc: &mut AttendScratch) {
        let tile = if Z { 32 } else { 16 };
        let (hd, nh, group) = (self.hd, self.nh, self.group);
        let (p0, li, cache) = (self.p0, self.li, self.cache);
        let t0 = blk * ATTN_TB;
        let tb = ATTN_TB.min(self.t_n - t0);
        let last = p0 + t0 + tb - 1;
        let first = |t: usize| {
            self.window
                .map(|w| (p0 + t + 1).saturating_sub(w))
                .unwrap_or(0)
        };
        let lo = first(t0);
        let span = last + 1 - lo;
        let nq = tb * group;
        sc.qs.resize(nq * hd, 0.0);
        sc.row.resize(hd, 0.0);
        sc.kt.resize(hd * ATTN_KB, 0.0);
        sc.vb.resize(ATTN_KB * hd, 0.0);
        // Queries rounded to f16, as llama.cpp does before its f16 K·Q.
        for t in 0..tb {
            for g in 0..group {
                let src = &self.q[(t0 + t) * nh * hd + (kvh * group + g) * hd..][..hd];
                let dst = &mut sc.qs[(t * group + g) * hd..][..hd];
                dst.copy_from_slice(src);
                f16::round::<F16C>(dst);
            }
        }
        let scores = &mut sc.scores;
        scores.clear();
        scores.resize(nq * span, f32::NEG_INFINITY);
        let blocks = (lo / ATTN_KB * ATTN_KB..=last).step_by(ATTN_KB);
        for pb in blocks.clone() {
            let n = ATTN_KB.min(last + 1 - pb);
            // Keys transposed: kt[d * KB + j] is key pb + j's dimension d.
            let kt: &[f32] = match self.shared {
                Some(sh) => {
                    let b = (pb - sh.base) / ATTN_KB;
                    &sh.kt[(kvh * sh.blocks + b) * hd * ATTN_KB..][..hd * ATTN_KB]
                }
                None => {
                    for j in 0..n {
                        f16::to_f32::<F16C>(&cache.key(li, pb + j)[kvh * hd..][..hd], &mut sc.row);
                        for (d, &v) in sc.row.iter().enumerate() {
                            sc.kt[d * ATTN_KB + j] = v;
                        }
                    }
                    &sc.kt
                }
            };
            for qi in (0..nq).step_by(4) {
                let rows: [usize; 4] = std::array::from_fn(|i| (qi + i).min(nq - 1));
                for jg in (0..n).step_by(tile) {
                    let acc = tiles::qk::<F16C, Z>(&sc.qs, rows, hd, &kt[jg..]);
                    let (p1, m) = (pb + jg, tile.min(n - jg));
                    for (i, a) in acc.iter().enumerate().take(nq - qi) {
                        let t = (qi + i) / group;
                        let (pos, from) = (p0 + t0 + t, first(t0 + t));
                        let row = &mut scores[(qi + i) * span..][..span];
                        if p1 >= from && p1 + m <= pos + 1 {
                            // All sixteen keys are seen (the usual case,
                            // before the diagonal): no per-key test.
                            for (o, &v) in row[p1 - lo..p1 - lo + m].iter_mut().zip(a) {
                                *o = v * self.scale;
                            }
                            continue;
                        }
                        for (l, &v) in a.iter().enumerate().take(m) {
                            let p = p1 + l;
                            if p <= pos && p >= from {
                                row[p - lo] = v * self.scale;
                            }
                        }
                    }
                }
            }
        }
        for s in scores.chunks_exact_mut(span) {
            ops::softmax(s);
            // Probabilities rounded to f16 as in llama.cpp's f16 V product.
            f16::round::<F16C>(s);
        }
        // SAFETY: each (token, head) output slice belongs to exactly one job.
        let out = |q: usize| unsafe {
            let (t, g) = (q / group, q % group);
            self.out
                .slice((t0 + t) * nh * hd + (kvh * group + g) * hd, hd)
        };
        for q in 0..nq {
            out(q).fill(0.0);
        }
        for pb in blocks {
            let n = ATTN_KB.min(last + 1 - pb);
            // Values: row j is position pb + j.
            let vrows: &[f32] = match self.shared {
                Some(sh) => &sh.v[(kvh * sh.positions + pb - sh.base) * hd..][..n * hd],
                None => {
                    for j in 0..n {
                        f16::to_f32::<F16C>(
                            &cache.val(li, pb + j)[kvh * hd..][..hd],
                            &mut sc.vb[j * hd..(j + 1) * hd],
                        );
                    }
                    &sc.vb[..n * hd]
                }
            };
            // Keys before the span (the block's alignment) weigh nothing.
            let j0 = lo.saturating_sub(pb);
            for qi in (0..nq).step_by(4) {
                let qn = 4.min(nq - qi);
                // Each row's weights of this block's keys (from j0) start here.
                let w: [usize; 4] =
                    std::array::from_fn(|i| (qi + i).min(nq - 1) * span + pb + j0 - lo);
                for d0 in (0..hd).step_by(tile) {
                    let dn = tile.min(hd - d0);
                    let vb = &vrows[j0 * hd + d0..];
                    let acc = tiles::pv::<F16C, Z>(scores, w, vb, hd, dn, 0..n - j0);
                    for (i, a) in acc.iter().enumerate().take(qn) {
                        for (o, &a) in out(qi + i)[d0..d0 + dn].iter_mut().zip(a) {
                            *o += a;
                        }
                    }
                }
            }
        }
    }
}

/// The register tiles of [`Attend::job`]: four query rows against sixteen
/// keys, or sixteen value dimensions (eight accumulators, enough to hide
/// the latency of fused multiply-adds on two ports). `FMA`: inside a function compiled for
/// AVX2 and FMA, with fused multiply-adds; otherwise portable (the same
/// order of operations per element, each rounded twice).
mod tiles {
    use super::ATTN_KB;
    #[cfg(target_arch = "x86_64")]
    use std::arch::x86_64::*;

    /// `acc[i][l] = Σ_d q[rows[i]][d] · kt[d·KB + l]`, `d` in order, for
    /// sixteen keys (thirty-two with `Z`).
    #[inline(always)]
    pub(super) fn qk<const FMA: bool, const Z: bool>(
        qs: &[f32],
        rows: [usize; 4],
        hd: usize,
        kt: &[f32],
    ) -> [[f32; 32]; 4] {
        let width = if Z { 32 } else { 16 };
        assert!(
            rows.iter().all(|&r| (r + 1) * hd <= qs.len())
                && (hd - 1) * ATTN_KB + width <= kt.len()
        );
        #[cfg(target_arch = "x86_64")]
        if FMA && Z {
            // SAFETY: in bounds (asserted above); AVX-512 F is enabled in
            // the function this is inlined into (`Z`).
            unsafe {
                let mut acc = [[_mm512_setzero_ps(); 2]; 4];
                for d in 0..hd {
                    let k0 = _mm512_loadu_ps(kt.as_ptr().add(d * ATTN_KB));
                    let k1 = _mm512_loadu_ps(kt.as_ptr().add(d * ATTN_KB + 16));
                    for (a, &r) in acc.iter_mut().zip(&rows) {
                        let q = _mm512_set1_ps(*qs.get_unchecked(r * hd + d));
                        a[0] = _mm512_fmadd_ps(q, k0, a[0]);
                        a[1] = _mm512_fmadd_ps(q, k1, a[1]);
                    }
                }
                let mut out = [[0f32; 32]; 4];
                for (o, a) in out.iter_mut().zip(acc) {
                    _mm512_storeu_ps(o.as_mut_ptr(), a[0]);
                    _mm512_storeu_ps(o.as_mut_ptr().add(16), a[1]);
                }
                return out;
            }
        }
        #[cfg(target_arch = "x86_64")]
        if FMA {
            // SAFETY: in bounds (asserted above); FMA and AVX2 are enabled
            // in the function this is inlined into (`FMA`).
            unsafe {
                let mut acc = [[_mm256_setzero_ps(); 2]; 4];
                for d in 0..hd {
                    let k0 = _mm256_loadu_ps(kt.as_ptr().add(d * ATTN_KB));
                    let k1 = _mm256_loadu_ps(kt.as_ptr().add(d * ATTN_KB + 8));
                    for (a, &r) in acc.iter_mut().zip(&rows) {
                        let q = _mm256_set1_ps(*qs.get_unchecked(r * hd + d));
                        a[0] = _mm256_fmadd_ps(q, k0, a[0]);
                        a[1] = _mm256_fmadd_ps(q, k1, a[1]);
                    }
                }
                let mut out = [[0f32; 32]; 4];
                for (o, a) in out.iter_mut().zip(acc) {
                    _mm256_storeu_ps(o.as_mut_ptr(), a[0]);
                    _mm256_storeu_ps(o.as_mut_ptr().add(8), a[1]);
                }
                return out;
            }
        }
        let mut acc = [[0f32; 32]; 4];
        for d in 0..hd {
            let k = &kt[d * ATTN_KB..d * ATTN_KB + width];
            for (a, &r) in acc.iter_mut().zip(&rows) {
                let q = qs[r * hd + d];
                for (a, &k) in a.iter_mut().zip(k) {
                    *a += q * k;
                }
            }
        }
        acc
    }

    /// `acc[i][e] = Σ_j w[rows_at[i] + j] · vb[j·hd + e]` for `j` in `js`,
    /// in order, `e < dn ≤ 32` (sixteen, or thirty-two with `Z`, at once).
    #[inline(always)]
    pub(super) fn pv<const FMA: bool, const Z: bool>(
        w: &[f32],
        rows_at: [usize; 4],
        vb: &[f32],
        hd: usize,
        dn: usize,
        js: std::ops::Range<usize>,
    ) -> [[f32; 32]; 4] {
        if js.is_empty() {
            return [[0.0; 32]; 4];
        }
        assert!(
            dn <= 32
                && rows_at.iter().all(|&r| r + js.end <= w.len())
                && (js.end - 1) * hd + dn <= vb.len()
        );
        #[cfg(target_arch = "x86_64")]
        if FMA && Z && dn == 32 {
            // SAFETY: in bounds (asserted above); AVX-512 F as in `qk`.
            unsafe {
                let mut acc = [[_mm512_setzero_ps(); 2]; 4];
                for j in js {
                    let v0 = _mm512_loadu_ps(vb.as_ptr().add(j * hd));
                    let v1 = _mm512_loadu_ps(vb.as_ptr().add(j * hd + 16));
                    for (a, &r) in acc.iter_mut().zip(&rows_at) {
                        let s = _mm512_set1_ps(*w.get_unchecked(r + j));
                        a[0] = _mm512_fmadd_ps(s, v0, a[0]);
                        a[1] = _mm512_fmadd_ps(s, v1, a[1]);
                    }
                }
                let mut out = [[0f32; 32]; 4];
                for (o, a) in out.iter_mut().zip(acc) {
                    _mm512_storeu_ps(o.as_mut_ptr(), a[0]);
                    _mm512_storeu_ps(o.as_mut_ptr().add(16), a[1]);
                }
                return out;
            }
        }
        #[cfg(target_arch = "x86_64")]
        if FMA && dn == 16 {
            // SAFETY: in bounds (asserted above); FMA and AVX2 as in `qk`.
            unsafe {
                let mut acc = [[_mm256_setzero_ps(); 2]; 4];
                for j in js {
                    let v0 = _mm256_loadu_ps(vb.as_ptr().add(j * hd));
                    let v1 = _mm256_loadu_ps(vb.as_ptr().add(j * hd + 8));
                    for (a, &r) in acc.iter_mut().zip(&rows_at) {
                        let s = _mm256_set1_ps(*w.get_unchecked(r + j));
                        a[0] = _mm256_fmadd_ps(s, v0, a[0]);
                        a[1] = _mm256_fmadd_ps(s, v1, a[1]);
                    }
                }
                let mut out = [[0f32; 32]; 4];
                for (o, a) in out.iter_mut().zip(acc) {
                    _mm256_storeu_ps(o.as_mut_ptr(), a[0]);
                    _mm256_storeu_ps(o.as_mut_ptr().add(8), a[1]);
                }
                return out;
            }
        }
        let mut acc = [[0f32; 32]; 4];
        for j in js {
            let v = &vb[j * hd..j * hd + dn];
            for (a, &r) in acc.iter_mut().zip(&rows_at) {
                let s = w[r + j];
                for (a, &v) in a.iter_mut().zip(v) {
                    *a = if FMA { s.mul_add(v, *a) } else { *a + s * v };
                }
            }
        }
        acc
    }
}

/// `ops::glu` split across the pool when there is enough of it (a batch of
/// tokens); the same operations per element either way.
fn glu_par(pool: &ThreadPool, g: &mut [f32], u: &[f32], act: ops::Act) {
    const CHUNK: usize = 4096;
    let n = g.len().min(u.len());
    if n < 2 * CHUNK {
        ops::glu(g, u, act);
        return;
    }
    let gp = SendPtr(g.as_mut_ptr());
    pool.for_chunks(n, CHUNK, &|r| {
        // SAFETY: `r` lies within `g` (`r.end <= n`), and each range is
        // handed to exactly one thread.
        let gs = unsafe { gp.slice(r.start, r.len()) };
        ops::glu(gs, &u[r], act);
    });
}

pub(crate) use hanlin_kernels::pool::SendPtr;

/// f16 conversions for attention: portable, or (`F16C`, only inside a
/// function compiled with that feature) eight lanes at a time. Both are
/// exact and round to nearest even, so they give the same bits.
mod f16 {
    use half::slice::HalfFloatSliceExt;

    /// `dst` = `src` widened to f32.
    #[inline(always)]
    pub(super) fn to_f32<const F16C: bool>(src: &[half::f16], dst: &mut [f32]) {
        let n = src.len().min(dst.len());
        #[cfg(target_arch = "x86_64")]
        if F16C {
            use std::arch::x86_64::*;
            let mut i = 0;
            while i + 8 <= n {
                // SAFETY: `i + 8 <= n` elements are in bounds of both slices;
                // F16C is only set inside `Attend::job_avx2`, compiled for it.
                unsafe {
                    let h = _mm_loadu_si128(src.as_ptr().add(i) as *const __m128i);
                    _mm256_storeu_ps(dst.as_mut_ptr().add(i), _mm256_cvtph_ps(h));
                }
                i += 8;
            }
            src[i..n].convert_to_f32_slice(&mut dst[i..n]);
            return;
        }
        src[..n].convert_to_f32_slice(&mut dst[..n]);
    }

    /// Round every value of `v` to the nearest f16 (kept as f32).
    #[inline(always)]
    pub(super) fn round<const F16C: bool>(v: &mut [f32]) {
        let mut i = 0;
        #[cfg(target_arch = "x86_64")]
        if F16C {
            use std::arch::x86_64::*;
            while i + 8 <= v.len() {
                // SAFETY: as in `to_f32`.
                unsafe {
                    let p = v.as_mut_ptr().add(i);
                    let h = _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(_mm256_loadu_ps(p));
                    _mm256_storeu_ps(p, _mm256_cvtph_ps(h));
                }
                i += 8;
            }
        }
        for x in &mut v[i..] {
            *x = half::f16::from_f32(*x).to_f32();
        }
    }
}
