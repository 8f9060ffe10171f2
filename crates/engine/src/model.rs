//! Loading a model's weights (memory-mapped GGUF) and the forward pass.

use crate::attn::{self, Attend};
use crate::kv::KvCache;
use crate::EngineError;
use hanlin_arch::{names, Activation, ModelConfig};
use hanlin_formats::{GgmlType, GgufFile, TensorInfo};
use hanlin_kernels::ops::{self, Rope, RopeStyle};
use hanlin_kernels::{matmul, matmul_many, Activations, QMat, ThreadPool};
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

/// What one batched forward pass returns: each sequence's logits (or mean
/// embedding) as a span of one buffer, in the order of the batch. A caller
/// that keeps one across steps ([`Model::forward_batch_into`]) reuses the
/// buffer: a decode step of 8 sequences writes 4.9 MB of logits for a
/// 152k-token vocabulary, which is neither copied out per sequence nor
/// allocated again.
#[derive(Debug, Default, Clone)]
pub struct BatchLogits {
    data: Vec<f32>,
    spans: Vec<std::ops::Range<usize>>,
}

impl BatchLogits {
    /// How many sequences the last pass had.
    pub fn len(&self) -> usize {
        self.spans.len()
    }

    pub fn is_empty(&self) -> bool {
        self.spans.is_empty()
    }

    /// Sequence `i`'s logits (empty where it wanted none).
    pub fn get(&self, i: usize) -> &[f32] {
        self.spans.get(i).map_or(&[], |s| &self.data[s.clone()])
    }

    pub fn iter(&self) -> impl Iterator<Item = &[f32]> {
        self.spans.iter().map(|s| &self.data[s.clone()])
    }

    /// Every sequence's logits at once, mutably, in the order of the batch.
    pub fn slices_mut(&mut self) -> Vec<&mut [f32]> {
        let mut got: Vec<&mut [f32]> = self.spans.iter().map(|_| Default::default()).collect();
        // The spans are disjoint: cut the buffer along them in the order
        // they lie in it (mean embeddings lie after every sequence's logits).
        let mut order: Vec<usize> = (0..self.spans.len())
            .filter(|&i| !self.spans[i].is_empty())
            .collect();
        order.sort_by_key(|&i| self.spans[i].start);
        let mut rest = self.data.as_mut_slice();
        let mut at = 0;
        for i in order {
            let s = &self.spans[i];
            let (_, tail) = std::mem::take(&mut rest).split_at_mut(s.start - at);
            let (mine, tail) = tail.split_at_mut(s.len());
            rest = tail;
            at = s.end;
            got[i] = mine;
        }
        got
    }

    /// Sequence `i`'s logits as a vector of their own (the first
    /// sequence's without a copy).
    pub fn take(mut self, i: usize) -> Vec<f32> {
        match self.spans.get(i) {
            Some(s) if s.start == 0 => {
                self.data.truncate(s.end);
                self.data
            }
            Some(s) => self.data[s.clone()].to_vec(),
            None => Vec::new(),
        }
    }

    /// No sequences. The buffer keeps its contents: the next pass
    /// overwrites them ([`Model::forward_batch_into`]) rather than paying
    /// to zero megabytes of logits first.
    fn clear(&mut self) {
        self.spans.clear();
    }
}

/// Which positions of a batch need logits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Logits {
    /// None (a prompt chunk that is not the prompt's end).
    None,
    Last,
    /// The last token's logits over the first `n` ids of the vocabulary
    /// only (rounded up to [`SHORT_LIST_ROWS`]): the rest of the output
    /// matrix is not read. A draft model proposing greedily needs no more
    /// than the ids it may propose ([`crate::speculative::DraftModel`]).
    /// In a batch with sequences that want whole rows, it gets a whole row.
    LastFirst(usize),
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
        Self::open(path, false)
    }

    /// [`Model::load`] for a draft model: its 5-, 6- and 8-bit matrices
    /// become 4-bit ones ([`Model::requantize_to_four_bits`]). A draft's guesses only
    /// have to be likely — the target checks every one — and each byte it
    /// reads is time the target waits.
    pub fn load_draft(path: &Path) -> Result<Self, EngineError> {
        Self::open(path, true)
    }

    fn open(path: &Path, four_bit: bool) -> Result<Self, EngineError> {
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
        if four_bit {
            model.requantize_to_four_bits();
        }
        model.pack();
        Ok(model)
    }

    /// The matrices the matmul reads (the output matrix and each dense
    /// layer's), each with its bytes in the mapped file: disjoint slices,
    /// in file order. A matrix that is not whole rows, or whose bytes
    /// another one already holds, is left out.
    fn matrices_mut(&mut self) -> Vec<(&mut WRef, &mut [u8])> {
        let mut ws: Vec<&mut WRef> = vec![&mut self.output];
        for l in &mut self.layers {
            ws.extend([&mut l.wq, &mut l.wk, &mut l.wv, &mut l.wo]);
            if let FeedForward::Dense(f) = &mut l.ffn {
                ws.extend([&mut f.gate, &mut f.up, &mut f.down]);
            }
        }
        ws.retain(|w| w.size == w.rows * w.ty.row_bytes(w.cols));
        ws.sort_by_key(|w| w.offset);
        let mut rest = self.file.bytes_mut();
        let mut at = 0;
        let mut out = Vec::with_capacity(ws.len());
        for w in ws {
            if w.offset < at || w.offset + w.size > at + rest.len() {
                continue;
            }
            let (_, tail) = std::mem::take(&mut rest).split_at_mut(w.offset - at);
            let (data, tail) = tail.split_at_mut(w.size);
            (rest, at) = (tail, w.offset + w.size);
            out.push((w, data));
        }
        out
    }

    /// Re-quantize the matrices the matmul reads to 4 bits where that
    /// shrinks them (Q8_0, Q5_0, Q5_1 → Q4_1; Q6_K, Q5_K → Q4_K;
    /// [`hanlin_kernels::quant::four_bit`]), in place in the mapped file's
    /// bytes, before they are interleaved. A tied token embedding follows
    /// the output matrix. Each matrix's freed tail stays mapped and is
    /// never read again (memory does not grow).
    fn requantize_to_four_bits(&mut self) {
        use hanlin_kernels::quant::{four_bit, requantize_all, RequantJob};
        let start = std::time::Instant::now();
        let tied = self.output.offset == self.embd.offset;
        let (mut jobs, mut shrunk) = (Vec::new(), Vec::new());
        for (w, data) in self.matrices_mut() {
            let Some(to) = four_bit(w.ty, w.cols) else {
                continue;
            };
            jobs.push(RequantJob {
                from: w.ty,
                to,
                data,
                rows: w.rows,
                cols: w.cols,
            });
            shrunk.push((w, to));
        }
        let before: usize = shrunk.iter().map(|(w, _)| w.size).sum();
        let sizes = requantize_all(jobs);
        for ((w, to), size) in shrunk.iter_mut().zip(&sizes) {
            (w.ty, w.size) = (*to, *size);
        }
        if tied {
            self.embd = self.output;
        }
        tracing::debug!(
            mb_before = before / 1_000_000,
            mb_after = sizes.iter().sum::<usize>() / 1_000_000,
            elapsed = ?start.elapsed(),
            "draft weights at 4 bits"
        );
    }

    /// Interleave the weights the matmul reads, eight rows at a time, where
    /// this CPU has kernels for their format (in place: memory does not
    /// grow). A token embedding of its own keeps the file's layout; one that
    /// is also the output matrix is packed, and its rows are looked up
    /// through the packing.
    fn pack(&mut self) {
        let start = std::time::Instant::now();
        let tied = self.output.offset == self.embd.offset;
        let mut jobs = Vec::new();
        for (w, data) in self.matrices_mut() {
            if !w.rows.is_multiple_of(8) || !hanlin_kernels::kpack::packs(w.ty) {
                continue;
            }
            jobs.push(hanlin_kernels::kpack::PackJob {
                ty: w.ty,
                data,
                rows: w.rows,
                cols: w.cols,
            });
            w.packed = true;
        }
        let n = jobs.len();
        hanlin_kernels::kpack::pack_all(jobs);
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

    /// [`Model::mm`] of several weights over the same activations in one
    /// round of the pool ([`matmul_many`]).
    fn mm_many<const N: usize>(
        &self,
        pool: &ThreadPool,
        ws: [&WRef; N],
        a: &Activations,
        outs: [&mut Vec<f32>; N],
    ) {
        let mats = ws.map(|w| self.q(w));
        let mut outs = outs;
        for (out, w) in outs.iter_mut().zip(&ws) {
            out.resize(a.n_tok * w.rows, 0.0);
        }
        let mut outs = outs.map(|o| o.as_mut_slice());
        matmul_many(pool, &mats, a, &mut outs);
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
        if tokens.len() > FORWARD_CHUNK
            && matches!(want, Logits::Last | Logits::LastFirst(_) | Logits::None)
        {
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
        Ok(self.forward_batch(pool, &mut seqs)?.take(0))
    }

    /// One pass over the weights for several sequences at once (continuous
    /// batching): the rows of every sequence go through each matrix product
    /// together, while RoPE positions, attention and the KV cache stay per
    /// sequence. Returns each sequence's logits as [`Model::forward`] would.
    pub fn forward_batch(
        &self,
        pool: &ThreadPool,
        seqs: &mut [BatchSeq<'_>],
    ) -> Result<BatchLogits, EngineError> {
        let mut out = BatchLogits::default();
        self.forward_batch_into(pool, seqs, &mut out)?;
        Ok(out)
    }

    /// [`Model::forward_batch`] into `out`, whose buffer is reused (a
    /// scheduler keeps one across its steps). On an error `out` is empty.
    pub fn forward_batch_into(
        &self,
        pool: &ThreadPool,
        seqs: &mut [BatchSeq<'_>],
        out: &mut BatchLogits,
    ) -> Result<(), EngineError> {
        out.clear();
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
            out.spans.resize(seqs.len(), 0..0);
            return Ok(());
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
                self.mm_many(
                    pool,
                    [&layer.wq, &layer.wk, &layer.wv],
                    &a,
                    [&mut q, &mut k, &mut v],
                );
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
                (Logits::Last | Logits::LastFirst(_), false) => span.end - 1..span.end,
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
        // How many ids each row of logits covers: the whole vocabulary
        // unless every sequence wants a short list.
        let vocab = seqs
            .iter()
            .zip(&counts)
            .filter(|(_, &n)| n > 0)
            .map(|(s, _)| match s.want {
                Logits::LastFirst(n) => n
                    .div_ceil(SHORT_LIST_ROWS)
                    .saturating_mul(SHORT_LIST_ROWS)
                    .min(cfg.vocab_size),
                _ => cfg.vocab_size,
            })
            .max()
            .unwrap_or(cfg.vocab_size);
        // The logits of the wanted rows fill the buffer's front, in the
        // batch's order; any mean embeddings follow them. The matmul writes
        // every logit, so a buffer kept from the last pass is only cut or
        // grown to size (`resize` zeroes just the growth), not cleared and
        // zeroed (8 rows of a 151,936-token vocabulary: 4.9 MB a decode
        // step, on one thread).
        out.data.resize(rows.len() / d * vocab, 0.0);
        if !rows.is_empty() {
            let mut normed = vec![0f32; rows.len()];
            ops::rms_norm(&rows, &self.output_norm, cfg.norm_eps, &mut normed);
            let a = Activations::new(&normed, d);
            // The first `vocab` rows of a matrix, packed or not, are its
            // front bytes (a packed group holds eight whole rows).
            let w = self.q(&self.output);
            let w = QMat {
                data: &w.data[..vocab * w.row_bytes()],
                rows: vocab,
                ..w
            };
            matmul(pool, &w, &a, &mut out.data);
        }
        let mut at = 0;
        let mut tail = out.data.len();
        for (n, mean) in counts.into_iter().zip(means) {
            match mean {
                Some(m) => {
                    out.data.extend_from_slice(&m);
                    out.spans.push(tail..tail + m.len());
                    tail += m.len();
                }
                None => {
                    out.spans.push(at..at + n * vocab);
                    at += n * vocab;
                }
            }
        }
        Ok(())
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
            })
            .collect();
        // One job per (sequence, kv head, block of query tokens): each
        // key/value block is read once for every query head of the group
        // and every token of the block.
        let mut jobs = Vec::new();
        for (si, a) in parts.iter().enumerate() {
            for kvh in 0..cfg.n_head_kv {
                for blk in 0..a.t_n.div_ceil(attn::tokens_per_job(a.group)) {
                    jobs.push((si, kvh, blk));
                }
            }
        }
        let level = attn::Level::detect();
        pool.for_chunks(jobs.len(), 1, &|r| {
            attn::SCRATCH.with_borrow_mut(|sc| {
                for &(si, kvh, blk) in &jobs[r] {
                    parts[si].run(level, kvh, blk, sc);
                }
            });
        });
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
        self.mm_many(pool, [&f.gate, &f.up], &a, [g, u]);
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

/// [`Logits::LastFirst`]'s lengths are multiples of this (whole groups of
/// packed rows for every kernel).
pub const SHORT_LIST_ROWS: usize = 64;

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
