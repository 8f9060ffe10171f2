//! Engine-owned KV cache, managed in fixed-size blocks.
//!
//! A sequence's cache is a table of [`KV_BLOCK`]-position blocks; each block
//! holds, for every layer, the keys and values of its positions, quantized
//! per (position, head) as the attention kernels read them: keys as 16-bit
//! integers (a 12-bit range, so a whole head's dot product sums exactly in
//! 32 bits), values as 8-bit integers, each row with an f32 scale. Keys take
//! what f16 took; values half. Blocks are
//! reference-counted, so sequences that share a prefix (a system prompt, the
//! earlier turns of a conversation) share its blocks instead of copying them:
//! [`KvCache::clone_prefix`] costs one pointer per block. A block is copied
//! only when a sequence writes into one that another sequence still reads
//! (the partly filled last block of a shared prefix): copy-on-write.
//!
//! Every block counts itself in a [`KvBlocks`] counter for as long as it
//! lives, so the engine reports real KV memory, shared blocks counted once.

use hanlin_arch::ModelConfig;
use hanlin_kernels::ops::ROUND_MAGIC;
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

/// What a cache holds per position: layers, key/value heads and head size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvShape {
    pub n_layer: usize,
    pub n_kv: usize,
    pub head_dim: usize,
}

impl KvShape {
    pub fn of(cfg: &ModelConfig) -> Self {
        Self {
            n_layer: cfg.n_layer,
            n_kv: cfg.n_head_kv,
            head_dim: cfg.head_dim,
        }
    }
    fn kv_dim(&self) -> usize {
        self.n_kv * self.head_dim
    }
}

/// The largest magnitude of a quantized key (and query) of a head of `hd`
/// values: `hd · L²` stays below 2³¹, so a query·key sum is exact in i32
/// (4,095 up to 128 values, 2,896 at 256).
pub fn key_limit(hd: usize) -> i32 {
    let bound = (i32::MAX as u64) / hd.max(1) as u64;
    (bound.isqrt() as i32).min(4095)
}

/// Quantize `x` to integers within `±lim` (round half to even) with one
/// scale, returned (`x ≈ q · scale`); an all-zero row has scale 0.
#[inline]
pub fn quantize_row<T: TryFrom<i32> + Default>(x: &[f32], lim: i32, out: &mut [T]) -> f32 {
    let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
    if amax == 0.0 || !amax.is_finite() {
        out.iter_mut().for_each(|o| *o = T::default());
        return if amax == 0.0 { 0.0 } else { f32::NAN };
    }
    let inv = lim as f32 / amax;
    for (o, &v) in out.iter_mut().zip(x) {
        let q = (round_small(v * inv) as i32).clamp(-lim, lim);
        *o = T::try_from(q).unwrap_or_default();
    }
    amax / lim as f32
}

/// `y.round_ties_even()` for `|y| < 2²²` (a quantized value is within
/// `±lim` ≤ 4,095), by [`ROUND_MAGIC`]: `rintf` was 0.6 % of a 4,096-token
/// prefill on Zen 4.
#[inline(always)]
fn round_small(y: f32) -> f32 {
    (y + ROUND_MAGIC) - ROUND_MAGIC
}

struct Block {
    /// Keys, `[layer][kv_dim / 2][KV_BLOCK][2]`: each head's keys for the
    /// block are contiguous, dimension pairs outermost, so one 32-bit
    /// load takes one dimension pair of one position.
    keys: Vec<i16>,
    /// Values, `[layer][KV_BLOCK / 4][kv_dim][4]`: four positions of one
    /// dimension side by side.
    vals: Vec<i8>,
    /// Scales of keys and values, `[layer][kv head][KV_BLOCK]`.
    kscale: Vec<f32>,
    vscale: Vec<f32>,
    counter: Arc<KvBlocks>,
}

impl Block {
    fn new(shape: &KvShape, counter: &Arc<KvBlocks>) -> Self {
        counter.live.fetch_add(1, Ordering::Relaxed);
        let n = shape.n_layer * KV_BLOCK * shape.kv_dim();
        let ns = shape.n_layer * shape.n_kv * KV_BLOCK;
        Self {
            keys: vec![0; n],
            vals: vec![0; n],
            kscale: vec![0.0; ns],
            vscale: vec![0.0; ns],
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
            kscale: self.kscale.clone(),
            vscale: self.vscale.clone(),
            counter: self.counter.clone(),
        }
    }
}

impl Drop for Block {
    fn drop(&mut self) {
        self.counter.live.fetch_sub(1, Ordering::Relaxed);
    }
}

/// One head's keys of one block, as [`crate::attn`] reads them.
pub(crate) struct KeyBlock<'a> {
    /// `[head_dim / 2][KV_BLOCK][2]`.
    pub keys: &'a [i16],
    /// `[KV_BLOCK]`.
    pub scale: &'a [f32],
}

/// One head's values of one block.
pub(crate) struct ValBlock<'a> {
    /// The layer's values of the block, `[KV_BLOCK / 4][kv_dim][4]`; the
    /// head's dimensions start at `at`.
    pub vals: &'a [i8],
    pub at: usize,
    /// `[KV_BLOCK]`.
    pub scale: &'a [f32],
}

pub struct KvCache {
    blocks: Vec<Arc<Block>>,
    shape: KvShape,
    len: usize,
    limit: usize,
    counter: Arc<KvBlocks>,
}

impl KvCache {
    /// A cache with its own block counter.
    pub fn new(shape: KvShape, limit: usize) -> Self {
        Self::counted(shape, limit, KvBlocks::new())
    }
    /// A cache whose blocks count in `counter` (one per model).
    pub fn counted(shape: KvShape, limit: usize, counter: Arc<KvBlocks>) -> Self {
        Self {
            blocks: Vec::new(),
            shape,
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
    /// Bytes of one block (keys, values and their scales, every layer).
    pub fn block_bytes(shape: KvShape) -> usize {
        shape.n_layer * KV_BLOCK * (3 * shape.kv_dim() + 2 * shape.n_kv * 4)
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
            shape: self.shape,
            len: n,
            limit: self.limit,
            counter: self.counter.clone(),
        }
    }
    /// Append keys/values of new tokens for layer `l` (rows of `kv_dim`;
    /// not yet committed; a second call for the same layer before
    /// [`Self::commit`] overwrites).
    pub(crate) fn append(&mut self, l: usize, k: &[f32], v: &[f32]) {
        let sh = self.shape;
        let (kvd, hd) = (sh.kv_dim(), sh.head_dim);
        let n = k.len() / kvd;
        let per_layer = KV_BLOCK * kvd;
        let scales = sh.n_kv * KV_BLOCK;
        let end = self.len + n;
        while self.blocks.len() < end.div_ceil(KV_BLOCK) {
            self.blocks.push(Arc::new(Block::new(&sh, &self.counter)));
        }
        let klim = key_limit(hd);
        let mut kq = vec![0i16; hd];
        let mut vq = vec![0i8; hd];
        for t in 0..n {
            let p = self.len + t;
            let (b, j) = (p / KV_BLOCK, p % KV_BLOCK);
            // Copy-on-write: a block another sequence still reads is copied
            // before this one writes past the shared positions.
            let blk = Arc::make_mut(&mut self.blocks[b]);
            for h in 0..sh.n_kv {
                let e0 = h * hd;
                let ks = quantize_row(&k[t * kvd + e0..][..hd], klim, &mut kq);
                let vs = quantize_row(&v[t * kvd + e0..][..hd], 127, &mut vq);
                blk.kscale[l * scales + h * KV_BLOCK + j] = ks;
                blk.vscale[l * scales + h * KV_BLOCK + j] = vs;
                let keys = &mut blk.keys[l * per_layer..][..per_layer];
                for (d, pair) in kq.chunks_exact(2).enumerate() {
                    let at = ((e0 / 2 + d) * KV_BLOCK + j) * 2;
                    keys[at..at + 2].copy_from_slice(pair);
                }
                let vals = &mut blk.vals[l * per_layer..][..per_layer];
                for (d, &x) in vq.iter().enumerate() {
                    vals[((j / 4) * kvd + e0 + d) * 4 + j % 4] = x;
                }
            }
        }
    }
    pub(crate) fn commit(&mut self, n: usize) {
        self.len += n;
    }
    /// Head `h`'s keys of layer `l` in block `b` (positions `b·KV_BLOCK..`),
    /// committed or appended in the current step.
    #[inline]
    pub(crate) fn key_block(&self, l: usize, b: usize, h: usize) -> KeyBlock<'_> {
        let sh = &self.shape;
        let blk = &self.blocks[b];
        let n = sh.head_dim * KV_BLOCK;
        let s = (l * sh.n_kv + h) * KV_BLOCK;
        KeyBlock {
            keys: &blk.keys[l * KV_BLOCK * sh.kv_dim() + h * n..][..n],
            scale: &blk.kscale[s..s + KV_BLOCK],
        }
    }
    /// Head `h`'s values of layer `l` in block `b`.
    #[inline]
    pub(crate) fn val_block(&self, l: usize, b: usize, h: usize) -> ValBlock<'_> {
        let sh = &self.shape;
        let blk = &self.blocks[b];
        let per_layer = KV_BLOCK * sh.kv_dim();
        let s = (l * sh.n_kv + h) * KV_BLOCK;
        ValBlock {
            vals: &blk.vals[l * per_layer..][..per_layer],
            at: h * sh.head_dim,
            scale: &blk.vscale[s..s + KV_BLOCK],
        }
    }
    /// Keys and values of layer `l` at position `p`, dequantized (`kv_dim`
    /// values each), for the tests.
    #[cfg(test)]
    fn row(&self, l: usize, p: usize) -> (Vec<f32>, Vec<f32>) {
        let sh = self.shape;
        let (b, j) = (p / KV_BLOCK, p % KV_BLOCK);
        let (mut k, mut v) = (Vec::new(), Vec::new());
        for h in 0..sh.n_kv {
            let kb = self.key_block(l, b, h);
            let vb = self.val_block(l, b, h);
            for d in 0..sh.head_dim {
                k.push(kb.keys[((d / 2) * KV_BLOCK + j) * 2 + d % 2] as f32 * kb.scale[j]);
                let x = vb.vals[((j / 4) * sh.kv_dim() + vb.at + d) * 4 + j % 4];
                v.push(x as f32 * vb.scale[j]);
            }
        }
        (k, v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_small_is_round_ties_even() {
        // Every half step, its neighbours one ulp apart, and a spread of
        // ordinary values, across the range a quantized value can take.
        let mut ys = Vec::new();
        for i in -2 * 4100..=2 * 4100 {
            let half = i as f32 * 0.5;
            ys.extend([half, half.next_up(), half.next_down()]);
        }
        ys.extend((0..100_000).map(|i| (i as f32 * 0.0823).sin() * 4200.0));
        ys.extend([0.0, -0.0, 1e-30, -1e-30, 4_194_303.5, -4_194_303.5]);
        for y in ys {
            assert_eq!(round_small(y), y.round_ties_even(), "{y}");
        }
        assert!(round_small(f32::NAN).is_nan());
    }

    fn row(p: usize, kvd: usize, l: usize) -> Vec<f32> {
        (0..kvd).map(|i| (p * 10 + i + l * 3) as f32).collect()
    }

    /// Two heads of `kvd / 2` values.
    fn shape(layers: usize, kvd: usize) -> KvShape {
        KvShape {
            n_layer: layers,
            n_kv: 2,
            head_dim: kvd / 2,
        }
    }

    /// Rows of small integers (exact after quantization: each head's
    /// largest magnitude maps to the limit, the others to integer steps).
    fn close(got: &[f32], want: &[f32], what: &str) {
        for (g, w) in got.iter().zip(want) {
            let m = want.iter().fold(0f32, |m, v| m.max(v.abs()));
            assert!(
                (g - w).abs() <= m / 250.0,
                "{what}: {got:?} against {want:?}"
            );
        }
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
        let mut a = KvCache::counted(shape(layers, kvd), 1000, counter.clone());
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
        assert_eq!(b.row(2, 40).0[0], 9.0);
        close(&a.row(2, 40).0, &row(40, kvd, 2), "a keeps its own");
        for p in 0..40 {
            for l in 0..layers {
                let (k, v) = b.row(l, p);
                close(&k, &row(p, kvd, l), "key");
                let neg: Vec<f32> = row(p, kvd, l).iter().map(|x| -x).collect();
                close(&v, &neg, "value");
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
        let mut c = KvCache::new(shape(layers, kvd), 1000);
        fill(&mut c, 0, 5, layers, kvd);
        fill(&mut c, 5, 100, layers, kvd);
        fill(&mut c, 105, 1, layers, kvd);
        assert_eq!(c.len(), 106);
        assert_eq!(c.blocks(), 106usize.div_ceil(KV_BLOCK));
        for p in 0..106 {
            for l in 0..layers {
                close(
                    &c.row(l, p).0,
                    &row(p, kvd, l),
                    &format!("position {p} layer {l}"),
                );
            }
        }
    }
}
