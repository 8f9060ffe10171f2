//! Dense retrieval: every passage of a knowledge base embedded by the
//! knowledge base's embedding model ([`Embedder`]), kept in `dense.bin`
//! beside the index, and searched by cosine similarity (the vectors are
//! L2-normalised, so a dot product) over all passages — exact, and fast
//! enough for the hundreds of thousands of passages a laptop holds.
//!
//! `dense.bin`: one JSON header line (`{"model", "dim"}`), then one record
//! per passage: the document id (24 hex characters), the passage number
//! (u32 LE), `dim` f32 LE values. Records are appended as documents are
//! added; removal and `rebuild` rewrite the file.

use crate::SearchError;
use std::io::Write;
use std::path::{Path, PathBuf};

/// Something that turns texts into vectors (an encoder such as
/// multilingual-e5-small, or a chat model's pooled hidden states).
pub trait Embedder: Send + Sync {
    /// The model's name: vectors from different models are never mixed.
    fn name(&self) -> &str;
    /// One vector per text; `query` marks search queries (models such as e5
    /// embed queries and passages differently).
    fn embed(&self, texts: &[&str], query: bool) -> Result<Vec<Vec<f32>>, String>;
}

const ID_LEN: usize = 24;

fn path(dir: &Path) -> PathBuf {
    dir.join("dense.bin")
}

fn corrupt(dir: &Path, reason: impl Into<String>) -> SearchError {
    SearchError::Index {
        dir: dir.to_path_buf(),
        reason: format!("dense.bin: {}", reason.into()),
    }
}

#[derive(serde::Serialize, serde::Deserialize)]
struct Header {
    model: String,
    dim: usize,
}

/// The passage vectors of one knowledge base, in memory.
#[derive(Debug, Default)]
pub struct Vectors {
    pub model: String,
    pub dim: usize,
    keys: Vec<(String, u64)>,
    data: Vec<f32>,
}

/// L2-normalise `v` in place (a zero vector stays zero).
pub fn normalize(v: &mut [f32]) {
    let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    if n > 0.0 {
        v.iter_mut().for_each(|x| *x /= n);
    }
}

impl Vectors {
    pub fn new(model: &str, dim: usize) -> Self {
        Self {
            model: model.into(),
            dim,
            ..Default::default()
        }
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// Read `dense.bin` (None when there is none yet).
    pub fn load(dir: &Path) -> Result<Option<Self>, SearchError> {
        let bytes = match std::fs::read(path(dir)) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        let nl = bytes
            .iter()
            .position(|b| *b == b'\n')
            .ok_or_else(|| corrupt(dir, "no header"))?;
        let h: Header =
            serde_json::from_slice(&bytes[..nl]).map_err(|e| corrupt(dir, e.to_string()))?;
        if h.dim == 0 || h.dim > 1 << 16 {
            return Err(corrupt(dir, format!("dimension {}", h.dim)));
        }
        let rec = ID_LEN + 4 + 4 * h.dim;
        let body = &bytes[nl + 1..];
        if body.len() % rec != 0 {
            return Err(corrupt(dir, "truncated record"));
        }
        let n = body.len() / rec;
        let mut v = Self::new(&h.model, h.dim);
        v.keys.reserve(n);
        v.data.reserve(n * h.dim);
        for r in body.chunks_exact(rec) {
            let id = std::str::from_utf8(&r[..ID_LEN])
                .map_err(|_| corrupt(dir, "document id is not text"))?;
            let chunk =
                u32::from_le_bytes([r[ID_LEN], r[ID_LEN + 1], r[ID_LEN + 2], r[ID_LEN + 3]]);
            v.keys.push((id.to_string(), chunk as u64));
            v.data.extend(
                r[ID_LEN + 4..]
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])),
            );
        }
        Ok(Some(v))
    }

    fn record(out: &mut Vec<u8>, id: &str, chunk: u64, v: &[f32]) {
        let mut idb = [b'0'; ID_LEN];
        let n = id.len().min(ID_LEN);
        idb[..n].copy_from_slice(&id.as_bytes()[..n]);
        out.extend_from_slice(&idb);
        out.extend_from_slice(&(chunk as u32).to_le_bytes());
        for x in v {
            out.extend_from_slice(&x.to_le_bytes());
        }
    }

    /// Add vectors in memory and append them to `dense.bin` (written with
    /// its header when new).
    pub fn append(
        &mut self,
        dir: &Path,
        entries: Vec<((String, u64), Vec<f32>)>,
    ) -> Result<(), SearchError> {
        let p = path(dir);
        let mut buf = Vec::new();
        if !p.exists() {
            buf.extend(serde_json::to_vec(&Header {
                model: self.model.clone(),
                dim: self.dim,
            })?);
            buf.push(b'\n');
        }
        for ((id, chunk), mut v) in entries {
            if v.len() != self.dim {
                return Err(SearchError::Embedder(format!(
                    "{} returned {} values, expected {}",
                    self.model,
                    v.len(),
                    self.dim
                )));
            }
            normalize(&mut v);
            Self::record(&mut buf, &id, chunk, &v);
            self.keys.push((id, chunk));
            self.data.extend(v);
        }
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&p)?;
        f.write_all(&buf)?;
        f.sync_data()?;
        Ok(())
    }

    /// Keep only the passages of documents `keep` says yes to; rewrite the
    /// file (atomically).
    pub fn retain(&mut self, dir: &Path, keep: impl Fn(&str) -> bool) -> Result<(), SearchError> {
        let mut keys = Vec::new();
        let mut data = Vec::new();
        for (i, k) in self.keys.iter().enumerate() {
            if keep(&k.0) {
                keys.push(k.clone());
                data.extend_from_slice(&self.data[i * self.dim..(i + 1) * self.dim]);
            }
        }
        self.keys = keys;
        self.data = data;
        self.write(dir)
    }

    /// Write the whole file (a temporary file renamed over the old one).
    pub fn write(&self, dir: &Path) -> Result<(), SearchError> {
        let mut buf = serde_json::to_vec(&Header {
            model: self.model.clone(),
            dim: self.dim,
        })?;
        buf.push(b'\n');
        for (i, (id, chunk)) in self.keys.iter().enumerate() {
            Self::record(
                &mut buf,
                id,
                *chunk,
                &self.data[i * self.dim..(i + 1) * self.dim],
            );
        }
        let tmp = dir.join("dense.bin.tmp");
        std::fs::write(&tmp, &buf)?;
        std::fs::rename(&tmp, path(dir))?;
        Ok(())
    }

    /// The `k` passages most similar to the (normalised) query vector, with
    /// their cosine similarity, best first.
    pub fn search(&self, q: &[f32], k: usize) -> Vec<((String, u64), f32)> {
        if q.len() != self.dim || k == 0 {
            return Vec::new();
        }
        let mut scored: Vec<(usize, f32)> = self
            .data
            .chunks_exact(self.dim)
            .map(|v| v.iter().zip(q).map(|(a, b)| a * b).sum::<f32>())
            .enumerate()
            .collect();
        let k = k.min(scored.len());
        if k == 0 {
            return Vec::new();
        }
        scored.select_nth_unstable_by(k - 1, |a, b| b.1.total_cmp(&a.1));
        scored.truncate(k);
        scored.sort_by(|a, b| b.1.total_cmp(&a.1));
        scored
            .into_iter()
            .map(|(i, s)| (self.keys[i].clone(), s))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vectors_round_trip_search_and_retain() {
        let dir = tempfile::tempdir().unwrap();
        let mut v = Vectors::new("toy", 3);
        v.append(
            dir.path(),
            vec![
                (("a".repeat(24), 0), vec![1.0, 0.0, 0.0]),
                (("b".repeat(24), 0), vec![0.0, 2.0, 0.0]),
            ],
        )
        .unwrap();
        v.append(dir.path(), vec![(("b".repeat(24), 1), vec![0.0, 1.0, 1.0])])
            .unwrap();
        let loaded = Vectors::load(dir.path()).unwrap().unwrap();
        assert_eq!(
            (loaded.model.as_str(), loaded.dim, loaded.len()),
            ("toy", 3, 3)
        );
        let hits = loaded.search(&[0.0, 1.0, 0.0], 2);
        assert_eq!(hits[0].0, ("b".repeat(24), 0));
        assert!((hits[0].1 - 1.0).abs() < 1e-6, "stored normalised");
        assert_eq!(hits[1].0, ("b".repeat(24), 1));
        let mut loaded = loaded;
        loaded.retain(dir.path(), |id| id.starts_with('a')).unwrap();
        assert_eq!(Vectors::load(dir.path()).unwrap().unwrap().len(), 1);
        // A wrong-sized vector is refused; a cut file is reported.
        assert!(loaded
            .append(dir.path(), vec![(("c".repeat(24), 0), vec![1.0])])
            .is_err());
        let bytes = std::fs::read(path(dir.path())).unwrap();
        std::fs::write(path(dir.path()), &bytes[..bytes.len() - 3]).unwrap();
        let e = Vectors::load(dir.path()).unwrap_err().to_string();
        assert!(e.contains("kb rebuild"), "{e}");
    }
}
