//! Sentence embeddings with a BERT-style encoder (multilingual-e5-small from
//! the packed `E5S1` file, [`hanlin_formats::e5`]): token + position + type
//! embeddings, post-norm layers of bidirectional attention and a GELU
//! feed-forward, mean pooling over the tokens, L2 normalisation. The weight
//! matrices are Q4_0 and go through the same quantized kernels as the chat
//! models; several texts are stepped together (their rows share every
//! matrix product; attention stays within each text).
//!
//! e5 is trained with a prefix that says what a text is: `query: ` for a
//! search query, `passage: ` for a document ([`Kind`]).

use crate::model::SendPtr;
use crate::EngineError;
use hanlin_formats::e5::EncoderFile;
use hanlin_formats::GgmlType;
use hanlin_kernels::matmul::{matmul, Activations, QMat};
use hanlin_kernels::ops;
use hanlin_kernels::pool::ThreadPool;
use hanlin_tokenizer::UnigramTokenizer;
use std::collections::HashMap;
use std::path::Path;

/// What a text is, for the model's prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Query,
    Passage,
}

/// Texts in one forward pass hold at most this many tokens in all.
const BATCH_TOKENS: usize = 2048;

pub struct Encoder {
    bytes: Vec<u8>,
    file: EncoderFile,
    tok: UnigramTokenizer,
    /// The float tensors (norms, biases, position and type embeddings).
    floats: HashMap<String, Vec<f32>>,
    pool: ThreadPool,
}

impl Encoder {
    /// Load an encoder file, computing with `threads` threads.
    pub fn load(path: &Path, threads: usize) -> Result<Self, EngineError> {
        let bytes = std::fs::read(path).map_err(|source| hanlin_formats::FormatError::Io {
            path: path.display().to_string(),
            source,
        })?;
        Self::from_bytes(bytes, threads)
    }

    pub fn from_bytes(bytes: Vec<u8>, threads: usize) -> Result<Self, EngineError> {
        let file = EncoderFile::parse(&bytes)?;
        let tok = UnigramTokenizer::new(&file.pieces, file.unk, file.normalize.clone())?;
        let mut floats = HashMap::new();
        for (name, t) in &file.tensors {
            if t.ty == GgmlType::F32 {
                let mut v = vec![0f32; t.n];
                hanlin_formats::dequant_float(
                    GgmlType::F32,
                    &bytes[t.offset..t.offset + t.len],
                    &mut v,
                );
                floats.insert(name.clone(), v);
            }
        }
        Ok(Self {
            bytes,
            file,
            tok,
            floats,
            pool: ThreadPool::new(threads.max(1)),
        })
    }

    /// Length of an embedding.
    pub fn dim(&self) -> usize {
        self.file.config.hidden
    }

    /// The longest input, in tokens (with the two special tokens).
    pub fn max_tokens(&self) -> usize {
        self.file.config.max_positions
    }

    /// Token ids the model sees for `text`: `<s>`, the prefixed text (cut to
    /// fit the model's positions), `</s>`.
    pub fn tokens(&self, text: &str, kind: Kind) -> Result<Vec<u32>, EngineError> {
        let prefix = match kind {
            Kind::Query => "query: ",
            Kind::Passage => "passage: ",
        };
        let mut ids = vec![self.file.bos];
        let mut content = self.tok.encode(&format!("{prefix}{text}"))?;
        content.truncate(self.max_tokens() - 2);
        ids.extend(content);
        ids.push(self.file.eos);
        Ok(ids)
    }

    /// L2-normalised embeddings of `texts`, in order.
    pub fn embed(&self, texts: &[&str], kind: Kind) -> Result<Vec<Vec<f32>>, EngineError> {
        let seqs = texts
            .iter()
            .map(|t| self.tokens(t, kind))
            .collect::<Result<Vec<_>, _>>()?;
        let mut out = Vec::with_capacity(seqs.len());
        let mut start = 0;
        while start < seqs.len() {
            let mut end = start + 1;
            let mut n = seqs[start].len();
            while end < seqs.len() && n + seqs[end].len() <= BATCH_TOKENS {
                n += seqs[end].len();
                end += 1;
            }
            out.extend(self.forward(&seqs[start..end]));
            start = end;
        }
        Ok(out)
    }

    fn f(&self, name: &str) -> &[f32] {
        // Presence and size were checked when the file was parsed.
        self.floats.get(name).map(Vec::as_slice).unwrap_or(&[])
    }

    fn mat(&self, name: &str, cols: usize) -> QMat<'_> {
        let t = &self.file.tensors[name];
        QMat {
            ty: t.ty,
            data: &self.bytes[t.offset..t.offset + t.len],
            rows: t.n / cols,
            cols,
            packed: false,
        }
    }

    /// `out = x·Wᵀ + b` for the `rows × cols` matrix `name`.
    fn linear(&self, x: &[f32], cols: usize, name: &str, out: &mut Vec<f32>) {
        let w = self.mat(&format!("{name}.w"), cols);
        let n_tok = x.len() / cols;
        out.resize(n_tok * w.rows, 0.0);
        matmul(&self.pool, &w, &Activations::new(x, cols), out);
        let b = self.f(&format!("{name}.b"));
        for row in out.chunks_exact_mut(w.rows) {
            ops::add_inplace(row, b);
        }
    }

    /// One pass over the sequences (token ids), each mean-pooled.
    fn forward(&self, seqs: &[Vec<u32>]) -> Vec<Vec<f32>> {
        let c = &self.file.config;
        let (h, n_head) = (c.hidden, c.heads);
        let hd = h / n_head;
        let total: usize = seqs.iter().map(Vec::len).sum();
        // Segment of each sequence in the concatenated rows.
        let mut segs = Vec::with_capacity(seqs.len());
        let mut at = 0;
        for s in seqs {
            segs.push(at..at + s.len());
            at += s.len();
        }
        let word = self.mat("emb.word", h);
        let (pos, ty) = (self.f("emb.pos"), self.f("emb.type"));
        let mut x = vec![0f32; total * h];
        for (s, seg) in seqs.iter().zip(&segs) {
            for (p, &id) in s.iter().enumerate() {
                let row = &mut x[(seg.start + p) * h..(seg.start + p + 1) * h];
                word.dequantize_row((id as usize).min(word.rows - 1), row);
                ops::add_inplace(row, &pos[p * h..(p + 1) * h]);
                ops::add_inplace(row, &ty[..h]);
            }
        }
        layer_norm(&mut x, None, self.f("emb.ln.w"), self.f("emb.ln.b"), c.eps);
        let (mut q, mut k, mut v) = (Vec::new(), Vec::new(), Vec::new());
        let (mut ctx, mut o, mut mid) = (vec![0f32; total * h], Vec::new(), Vec::new());
        let scale = 1.0 / (hd as f32).sqrt();
        for l in 0..c.layers {
            self.linear(&x, h, &format!("l{l}.q"), &mut q);
            self.linear(&x, h, &format!("l{l}.k"), &mut k);
            self.linear(&x, h, &format!("l{l}.v"), &mut v);
            let out = SendPtr(ctx.as_mut_ptr());
            let (q, k, v, segs) = (&q, &k, &v, &segs);
            // One job per (token, head): each reads its own text's keys.
            self.pool.for_chunks(total * n_head, 8, &|r| {
                let mut probs = Vec::new();
                for job in r {
                    let (t, hh) = (job / n_head, job % n_head);
                    let Some(seg) = segs.iter().find(|s| s.contains(&t)) else {
                        continue;
                    };
                    let qh = &q[t * h + hh * hd..t * h + (hh + 1) * hd];
                    probs.clear();
                    probs.extend(seg.clone().map(|s| {
                        ops::dot_f32(qh, &k[s * h + hh * hd..s * h + (hh + 1) * hd]) * scale
                    }));
                    ops::softmax(&mut probs);
                    // SAFETY: each (token, head) slice is written by this job only.
                    let dst = unsafe { out.slice(t * h + hh * hd, hd) };
                    dst.fill(0.0);
                    for (p, s) in probs.iter().zip(seg.clone()) {
                        ops::axpy(dst, *p, &v[s * h + hh * hd..s * h + (hh + 1) * hd]);
                    }
                }
            });
            self.linear(&ctx, h, &format!("l{l}.ao"), &mut o);
            layer_norm(
                &mut x,
                Some(&o),
                self.f(&format!("l{l}.aln.w")),
                self.f(&format!("l{l}.aln.b")),
                c.eps,
            );
            self.linear(&x, h, &format!("l{l}.fi"), &mut mid);
            for m in mid.iter_mut() {
                *m = gelu_erf(*m);
            }
            self.linear(&mid, c.ffn, &format!("l{l}.fo"), &mut o);
            layer_norm(
                &mut x,
                Some(&o),
                self.f(&format!("l{l}.oln.w")),
                self.f(&format!("l{l}.oln.b")),
                c.eps,
            );
        }
        segs.iter()
            .map(|seg| {
                let mut e = vec![0f32; h];
                for t in seg.clone() {
                    ops::add_inplace(&mut e, &x[t * h..(t + 1) * h]);
                }
                let norm = e.iter().map(|v| v * v).sum::<f32>().sqrt().max(1e-12);
                e.iter_mut().for_each(|v| *v /= norm);
                e
            })
            .collect()
    }
}

pub(crate) use hanlin_kernels::linear::{gelu_erf, layer_norm};

#[cfg(test)]
mod tests {
    use super::*;
    use hanlin_formats::e5::{tensor_list, write_f32, EncoderConfig};

    fn tiny() -> Encoder {
        let config = EncoderConfig {
            hidden: 64,
            layers: 2,
            heads: 4,
            ffn: 128,
            vocab: 12,
            max_positions: 24,
            type_vocab: 2,
            eps: 1e-12,
        };
        let pieces: Vec<(String, f32)> = [
            "<s>",
            "<pad>",
            "</s>",
            "<unk>",
            "▁",
            "▁query",
            ":",
            "▁passage",
            "▁a",
            "b",
            "长",
            "城",
        ]
        .iter()
        .enumerate()
        .map(|(i, p)| (p.to_string(), -(i as f32)))
        .collect();
        // Deterministic pseudo-random weights.
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let tensors = tensor_list(&config, |n, _| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let r = (state % 2001) as f32 / 1000.0 - 1.0;
            if n.ends_with("ln.w") {
                1.0 + 0.1 * r
            } else {
                0.2 * r
            }
        });
        let bytes = write_f32(&config, &pieces, [0, 2, 1, 3], &[], &tensors);
        Encoder::from_bytes(bytes, 2).unwrap()
    }

    #[test]
    fn embeddings_are_normalised_batched_and_bounded() {
        let e = tiny();
        assert_eq!(e.dim(), 64);
        let texts = ["a b", "长城", "a 长 b 城", "b"];
        let batch = e.embed(&texts, Kind::Passage).unwrap();
        for (t, v) in texts.iter().zip(&batch) {
            let n: f32 = v.iter().map(|x| x * x).sum::<f32>().sqrt();
            assert!((n - 1.0).abs() < 1e-5, "{t}: norm {n}");
            let alone = e.embed(&[t], Kind::Passage).unwrap().remove(0);
            let d: f32 = alone.iter().zip(v).map(|(a, b)| (a - b).abs()).sum();
            assert!(d < 1e-3, "{t}: batched differs from alone by {d}");
        }
        assert_ne!(batch[0], batch[1]);
        // Query and passage prefixes give different vectors.
        let q = e.embed(&["a b"], Kind::Query).unwrap().remove(0);
        assert_ne!(q, batch[0]);
        // Long input is cut to the model's positions, with <s> and </s>.
        let long = "a ".repeat(100);
        let ids = e.tokens(&long, Kind::Passage).unwrap();
        assert_eq!(ids.len(), 24);
        assert_eq!((ids[0], ids[23]), (0, 2));
        assert!(e.embed(&[&long], Kind::Passage).is_ok());
    }
}
