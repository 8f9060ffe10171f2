//! Engine-owned KV cache, managed in fixed-size blocks.
//!
//! A sequence's cache is a table of [`KV_BLOCK`]-position blocks; each block
//! holds, for every layer, the keys and values of its positions (`kv_dim`
//! values each, stored as f16 like llama.cpp's default cache). Blocks are
//! reference-counted, so sequences that share a prefix (a system prompt, the
//! earlier turns of a conversation) share its blocks instead of copying them:
//! [`KvCache::clone_prefix`] costs one pointer per block. A block is copied
//! only when a sequence writes into one that another sequence still reads
//! (the partly filled last block of a shared prefix): copy-on-write.
//!
//! Every block counts itself in a [`KvBlocks`] counter for as long as it
//! lives, so the engine reports real KV memory, shared blocks counted once.

use half::f16;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// Positions per block.
pub const KV_BLOCK: usize = 32;

/// Live KV blocks of one model, shared by all its caches.
#[derive(Debug, Default)]
pub struct KvBlocks {
    live: AtomicUsize,
}

impl KvBlocks {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }
    /// Blocks allocated now (shared blocks counted once).
    pub fn live(&self) -> usize {
        self.live.load(Ordering::Relaxed)
    }
}

struct Block {
    /// `[layer][position in block][kv_dim]`.
    keys: Vec<f16>,
    vals: Vec<f16>,
    counter: Arc<KvBlocks>,
}

impl Block {
    fn new(n: usize, counter: &Arc<KvBlocks>) -> Self {
        counter.live.fetch_add(1, Ordering::Relaxed);
        Self {
            keys: vec![f16::ZERO; n],
            vals: vec![f16::ZERO; n],
            counter: counter.clone(),
        }
    }
}

impl Clone for Block {
    fn clone(&self) -> Self {
        self.counter.live.fetch_add(1, Ordering::Relaxed);
        Self {
            keys: self.keys.clone(),
            vals: self.vals.clone(),
            counter: self.counter.clone(),
        }
    }
}

impl Drop for Block {
    fn drop(&mut self) {
        self.counter.live.fetch_sub(1, Ordering::Relaxed);
    }
}

pub struct KvCache {
    blocks: Vec<Arc<Block>>,
    n_layer: usize,
    kv_dim: usize,
    len: usize,
    limit: usize,
    counter: Arc<KvBlocks>,
}

impl KvCache {
    /// A cache with its own block counter.
    pub fn new(n_layer: usize, kv_dim: usize, limit: usize) -> Self {
        Self::counted(n_layer, kv_dim, limit, KvBlocks::new())
    }
    /// A cache whose blocks count in `counter` (one per model).
    pub fn counted(n_layer: usize, kv_dim: usize, limit: usize, counter: Arc<KvBlocks>) -> Self {
        Self {
            blocks: Vec::new(),
            n_layer,
            kv_dim,
            len: 0,
            limit,
            counter,
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
    /// Bytes of one block (keys and values of every layer).
    pub fn block_bytes(n_layer: usize, kv_dim: usize) -> usize {
        2 * n_layer * KV_BLOCK * kv_dim * std::mem::size_of::<f16>()
    }
    /// Blocks this cache refers to (some may be shared with other caches).
    pub fn blocks(&self) -> usize {
        self.blocks.len()
    }
    /// Forget everything from position `n` on (to reuse a shared prefix).
    pub fn truncate(&mut self, n: usize) {
        self.len = n.min(self.len);
        self.blocks.truncate(self.len.div_ceil(KV_BLOCK));
    }
    /// A new cache holding the first `n` positions of this one (another
    /// sequence sharing this one's prefix): the blocks are shared, not copied.
    pub fn clone_prefix(&self, n: usize) -> Self {
        let n = n.min(self.len);
        Self {
            blocks: self.blocks[..n.div_ceil(KV_BLOCK)].to_vec(),
            n_layer: self.n_layer,
            kv_dim: self.kv_dim,
            len: n,
            limit: self.limit,
            counter: self.counter.clone(),
        }
    }
    /// Append keys/values of new tokens for layer `l` (not yet committed;
    /// a second call for the same layer before [`Self::commit`] overwrites).
    pub(crate) fn append(&mut self, l: usize, k: &[f32], v: &[f32]) {
        let kvd = self.kv_dim;
        let n = k.len() / kvd;
        let per_layer = KV_BLOCK * kvd;
        let block_len = self.n_layer * per_layer;
        let end = self.len + n;
        while self.blocks.len() < end.div_ceil(KV_BLOCK) {
            self.blocks
                .push(Arc::new(Block::new(block_len, &self.counter)));
        }
        let mut t = 0;
        while t < n {
            let p = self.len + t;
            let (b, off) = (p / KV_BLOCK, p % KV_BLOCK);
            let m = (KV_BLOCK - off).min(n - t);
            // Copy-on-write: a block another sequence still reads is copied
            // before this one writes past the shared positions.
            let blk = Arc::make_mut(&mut self.blocks[b]);
            let at = l * per_layer + off * kvd;
            let dst_k = &mut blk.keys[at..at + m * kvd];
            dst_k
                .iter_mut()
                .zip(&k[t * kvd..(t + m) * kvd])
                .for_each(|(d, &s)| *d = f16::from_f32(s));
            let dst_v = &mut blk.vals[at..at + m * kvd];
            dst_v
                .iter_mut()
                .zip(&v[t * kvd..(t + m) * kvd])
                .for_each(|(d, &s)| *d = f16::from_f32(s));
            t += m;
        }
    }
    pub(crate) fn commit(&mut self, n: usize) {
        self.len += n;
    }
    /// Keys of layer `l` at position `p` (`kv_dim` values), committed or
    /// appended in the current step.
    #[inline]
    pub(crate) fn key(&self, l: usize, p: usize) -> &[f16] {
        let at = (l * KV_BLOCK + p % KV_BLOCK) * self.kv_dim;
        &self.blocks[p / KV_BLOCK].keys[at..at + self.kv_dim]
    }
    /// Values of layer `l` at position `p`.
    #[inline]
    pub(crate) fn val(&self, l: usize, p: usize) -> &[f16] {
        let at = (l * KV_BLOCK + p % KV_BLOCK) * self.kv_dim;
        &self.blocks[p / KV_BLOCK].vals[at..at + self.kv_dim]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(p: usize, kvd: usize, l: usize) -> Vec<f32> {
        (0..kvd).map(|i| (p * 10 + i + l * 3) as f32).collect()
    }

    fn fill(c: &mut KvCache, from: usize, n: usize, layers: usize, kvd: usize) {
        for l in 0..layers {
            let k: Vec<f32> = (from..from + n).flat_map(|p| row(p, kvd, l)).collect();
            let v: Vec<f32> = k.iter().map(|x| -x).collect();
            c.append(l, &k, &v);
        }
        c.commit(n);
    }

    #[test]
    fn blocks_are_shared_and_copied_on_write() {
        let (layers, kvd) = (3, 4);
        let counter = KvBlocks::new();
        let mut a = KvCache::counted(layers, kvd, 1000, counter.clone());
        fill(&mut a, 0, 70, layers, kvd); // 3 blocks, the last partly filled
        assert_eq!(counter.live(), 3);
        let mut b = a.clone_prefix(40);
        assert_eq!(b.len(), 40);
        assert_eq!(counter.live(), 3, "a shared prefix allocates nothing");
        // b writes into block 1, which a still reads: it gets its own copy.
        let k: Vec<f32> = vec![9.0; kvd];
        for l in 0..layers {
            b.append(l, &k, &k);
        }
        b.commit(1);
        assert_eq!(counter.live(), 4);
        assert_eq!(f32::from(b.key(2, 40)[0]), 9.0);
        assert_eq!(f32::from(a.key(2, 40)[0]), row(40, kvd, 2)[0]);
        for p in 0..40 {
            for l in 0..layers {
                assert_eq!(f32::from(b.key(l, p)[1]), row(p, kvd, l)[1]);
                assert_eq!(f32::from(b.val(l, p)[1]), -row(p, kvd, l)[1]);
            }
        }
        drop(a);
        assert_eq!(counter.live(), 2, "b's two blocks remain");
        b.truncate(10);
        assert_eq!(counter.live(), 1);
        drop(b);
        assert_eq!(counter.live(), 0);
    }

    #[test]
    fn appends_across_block_edges_read_back() {
        let (layers, kvd) = (2, 8);
        let mut c = KvCache::new(layers, kvd, 1000);
        fill(&mut c, 0, 5, layers, kvd);
        fill(&mut c, 5, 100, layers, kvd);
        fill(&mut c, 105, 1, layers, kvd);
        assert_eq!(c.len(), 106);
        assert_eq!(c.blocks(), 106usize.div_ceil(KV_BLOCK));
        for p in 0..106 {
            for l in 0..layers {
                let want: Vec<f32> = row(p, kvd, l);
                let got: Vec<f32> = c.key(l, p).iter().map(|x| f32::from(*x)).collect();
                assert_eq!(got, want, "position {p} layer {l}");
            }
        }
    }
}
