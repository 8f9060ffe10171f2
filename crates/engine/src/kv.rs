//! Engine-owned KV cache for one sequence: per layer, keys and values of every
//! position so far (`kv_dim` values each, stored as f16 like llama.cpp's
//! default cache), grown on demand up to a fixed limit.

use half::f16;

pub struct KvCache {
    keys: Vec<Vec<f16>>,
    vals: Vec<Vec<f16>>,
    kv_dim: usize,
    len: usize,
    limit: usize,
}

impl KvCache {
    pub fn new(n_layer: usize, kv_dim: usize, limit: usize) -> Self {
        Self {
            keys: vec![Vec::new(); n_layer],
            vals: vec![Vec::new(); n_layer],
            kv_dim,
            len: 0,
            limit,
        }
    }
    /// Positions committed so far.
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// Maximum positions (the context length).
    pub fn capacity(&self) -> usize {
        self.limit
    }
    /// Forget everything from position `n` on (to reuse a shared prefix).
    pub fn truncate(&mut self, n: usize) {
        let n = n.min(self.len);
        for l in 0..self.keys.len() {
            self.keys[l].truncate(n * self.kv_dim);
            self.vals[l].truncate(n * self.kv_dim);
        }
        self.len = n;
    }
    /// A new cache holding the first `n` positions of this one (another
    /// sequence sharing this one's prefix).
    pub fn clone_prefix(&self, n: usize) -> Self {
        let n = n.min(self.len);
        let cut = |v: &Vec<Vec<f16>>| -> Vec<Vec<f16>> {
            v.iter().map(|l| l[..n * self.kv_dim].to_vec()).collect()
        };
        Self {
            keys: cut(&self.keys),
            vals: cut(&self.vals),
            kv_dim: self.kv_dim,
            len: n,
            limit: self.limit,
        }
    }
    /// Append keys/values of new tokens for layer `l` (not yet committed).
    pub(crate) fn append(&mut self, l: usize, k: &[f32], v: &[f32]) {
        self.keys[l].truncate(self.len * self.kv_dim);
        self.vals[l].truncate(self.len * self.kv_dim);
        self.keys[l].extend(k.iter().map(|&x| f16::from_f32(x)));
        self.vals[l].extend(v.iter().map(|&x| f16::from_f32(x)));
    }
    pub(crate) fn commit(&mut self, n: usize) {
        self.len += n;
    }
    pub(crate) fn layer(&self, l: usize) -> (&[f16], &[f16]) {
        (&self.keys[l], &self.vals[l])
    }
}
