//! `out = x · Wᵀ` for a quantized weight matrix `W` (`rows × cols`, ggml row
//! layout) and a batch of activation rows `x` (`n_tok × cols`). Activations are
//! quantized once per batch to the 8-bit block format the weight type pairs
//! with, then every weight row is dotted with every token while it is hot in
//! cache. Rows are split across the pool's threads.

use crate::dot;
use crate::kpack;
use crate::pool::ThreadPool;
use crate::quant::{self, BlockQ8, BlockQ8K};
use hanlin_formats::GgmlType;
use std::cell::OnceCell;

/// A borrowed quantized matrix.
#[derive(Clone, Copy, Debug)]
pub struct QMat<'a> {
    pub ty: GgmlType,
    pub data: &'a [u8],
    pub rows: usize,
    pub cols: usize,
    /// Rows interleaved eight at a time ([`kpack::pack`]), not in the
    /// file's layout: only [`matmul`] reads such a matrix.
    pub packed: bool,
}

impl<'a> QMat<'a> {
    pub fn row_bytes(&self) -> usize {
        self.ty.row_bytes(self.cols)
    }
    /// Row `r` in the file's layout (not of a packed matrix).
    pub fn row(&self, r: usize) -> &'a [u8] {
        debug_assert!(!self.packed, "a packed matrix has no rows");
        let rb = self.row_bytes();
        &self.data[r * rb..(r + 1) * rb]
    }
    /// Dequantize row `r` into `out` (`cols` long), e.g. an embedding lookup.
    pub fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        if !self.packed {
            return quant::dequantize_row(self.ty, self.row(r), out);
        }
        let rb = self.row_bytes();
        let g = r / 8;
        let mut row = vec![0u8; rb];
        let group = &self.data[8 * g * rb..8 * (g + 1) * rb];
        kpack::unpack_row(self.ty, group, r % 8, self.cols, &mut row);
        quant::dequantize_row(self.ty, &row, out);
    }
}

/// A batch of activation rows with lazily built quantized copies.
pub struct Activations<'a> {
    pub x: &'a [f32],
    pub n_tok: usize,
    pub cols: usize,
    q8: OnceCell<Vec<BlockQ8>>,
    q8k: OnceCell<Vec<BlockQ8K>>,
}

impl<'a> Activations<'a> {
    pub fn new(x: &'a [f32], cols: usize) -> Self {
        Self {
            x,
            n_tok: x.len() / cols,
            cols,
            q8: OnceCell::new(),
            q8k: OnceCell::new(),
        }
    }
    /// Rows already quantized to 32-value blocks (`cols / 32` per row),
    /// e.g. im2col rows built from a feature map quantized once. Only for
    /// weights of a 32-element type.
    pub fn from_q8(q8: Vec<BlockQ8>, cols: usize) -> Self {
        let n_tok = (q8.len() * quant::QK).checked_div(cols).unwrap_or(0);
        let cell = OnceCell::new();
        let _ = cell.set(q8);
        Self {
            x: &[],
            n_tok,
            cols,
            q8: cell,
            q8k: OnceCell::new(),
        }
    }
    fn q8(&self, pool: &ThreadPool) -> &[BlockQ8] {
        self.q8
            .get_or_init(|| quantize_rows(pool, self.x, self.cols, quant::quantize_q8))
    }
    fn q8k(&self, pool: &ThreadPool) -> &[BlockQ8K] {
        self.q8k
            .get_or_init(|| quantize_rows(pool, self.x, self.cols, quant::quantize_q8k))
    }
}

/// Up to this many values a matmul's activations are quantized on the
/// calling thread: a decode step's few rows (8 sequences × 4,864 values at
/// most for the 0.5B model) take a few microseconds, less than a round of
/// the pool and a vector per row would cost.
const QUANTIZE_ALONE_MAX: usize = 64 << 10;

/// Quantize each `cols`-long row of `x` with `f`, rows spread over the pool
/// when there are many (each row's blocks are independent).
fn quantize_rows<B: Send>(
    pool: &ThreadPool,
    x: &[f32],
    cols: usize,
    f: fn(&[f32], &mut Vec<B>),
) -> Vec<B> {
    let n_tok = x.len().checked_div(cols).unwrap_or(0);
    if n_tok < 2 || x.len() <= QUANTIZE_ALONE_MAX {
        let mut v = Vec::new();
        f(x, &mut v);
        return v;
    }
    let rows: Vec<std::sync::Mutex<Vec<B>>> = (0..n_tok).map(|_| Default::default()).collect();
    pool.for_chunks(n_tok, 1, &|r| {
        for t in r {
            let mut out = rows[t].lock().unwrap_or_else(|e| e.into_inner());
            f(&x[t * cols..(t + 1) * cols], &mut out);
        }
    });
    rows.into_iter()
        .flat_map(|m| m.into_inner().unwrap_or_else(|e| e.into_inner()))
        .collect()
}

/// A batch's activation blocks, token by token.
struct Tokens<'a, B> {
    xq: &'a [B],
    per_token: usize,
    n_tok: usize,
}

impl<B> Clone for Tokens<'_, B> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<B> Copy for Tokens<'_, B> {}

impl<'a, B> Tokens<'a, B> {
    fn new(xq: &'a [B], n_tok: usize) -> Self {
        Self {
            xq,
            per_token: xq.len() / n_tok,
            n_tok,
        }
    }
    /// Token `t`'s blocks.
    fn one(self, t: usize) -> &'a [B] {
        &self.xq[t * self.per_token..(t + 1) * self.per_token]
    }
    /// Tokens `t..t+N`; past the end, the last token again (a padded last
    /// group: only real tokens are stored).
    fn group<const N: usize>(self, t: usize) -> [&'a [B]; N] {
        std::array::from_fn(|k| self.one((t + k).min(self.n_tok - 1)))
    }
}

#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: threads write disjoint elements (distinct rows) of the output.
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

impl OutPtr {
    /// The place `i` (a pointer; in bounds is the user's to ensure).
    fn at(self, i: usize) -> *mut f32 {
        self.0.wrapping_add(i)
    }
    /// Store `v` at `i`. Safety: `i` is in bounds and no other thread writes it.
    #[inline(always)]
    unsafe fn set(self, i: usize, v: f32) {
        *self.0.add(i) = v;
    }
}

/// `dot4(row, t)`: tokens `t..t+4` against one weight row.
type Dot4<'a> = &'a (dyn Fn(&[u8], usize) -> [f32; 4] + Sync);
/// `dot2x4(row0, row1, t)`: tokens `t..t+4` against two weight rows.
type Dot2x4<'a> = &'a (dyn Fn(&[u8], &[u8], usize) -> [[f32; 4]; 2] + Sync);
/// `dot2x8(row0, row1, t)`: tokens `t..t+8` against two weight rows.
type Dot2x8<'a> = &'a (dyn Fn(&[u8], &[u8], usize) -> [[f32; 8]; 2] + Sync);

/// The multi-token kernels a weight type has.
#[derive(Clone, Copy, Default)]
struct Wide<'a> {
    dot4: Option<Dot4<'a>>,
    dot2x4: Option<Dot2x4<'a>>,
    dot2x8: Option<Dot2x8<'a>>,
}

/// Dot every row with every token: `dot1(row, t)` for one token,
/// `dot4(row, t)` for tokens `t..t+4` when a four-token kernel exists.
fn run_rows(
    pool: &ThreadPool,
    sink: Sink,
    w: &QMat,
    n_tok: usize,
    out: &mut [f32],
    dot1: &(dyn Fn(&[u8], usize) -> f32 + Sync),
    wide: Wide,
) {
    let Wide {
        dot4,
        dot2x4,
        dot2x8,
    } = wide;
    let rows = w.rows;
    let op = OutPtr(out.as_mut_ptr());
    // Decode streams the weights once: a few large contiguous ranges per
    // thread keep the hardware prefetchers on one sequential stream; a
    // decode batch of up to eight tokens also passes over each row once (the
    // 2×8 and 2×4 kernels take all its tokens), so it streams as well. With
    // more tokens a chunk of 64 rows is reused across all of them while it
    // sits in L2. Either way each thread writes long runs of each token's
    // output, so two threads seldom write the same cache line (8-row chunks
    // made them share one at every chunk for every token, which cost a batch
    // of 8 sequences a third of its speed).
    // A decode step's chunks shrink to 16 rows as the matrix drains
    // ([`ThreadPool::for_guided`]).
    let (min, max) = if n_tok <= 8 {
        (16, rows.div_ceil(pool.n_threads() * 4).max(16))
    } else {
        (64, 64)
    };
    sink(rows, min, max, &|range| {
        let mut t = 0;
        if let (Some(d28), Some(dot4)) = (dot2x8, dot4) {
            // Whole groups of eight tokens: each weight pair is unpacked
            // once for eight tokens.
            while t + 8 <= n_tok {
                let mut r = range.start;
                while r + 2 <= range.end {
                    let v = d28(w.row(r), w.row(r + 1), t);
                    for (dr, row) in v.into_iter().enumerate() {
                        for (k, v) in row.into_iter().enumerate() {
                            // SAFETY: (t + k) * rows + r + dr < n_tok * rows <= out.len();
                            // rows are disjoint per thread.
                            unsafe { op.set((t + k) * rows + r + dr, v) };
                        }
                    }
                    r += 2;
                }
                for r in r..range.end {
                    for h in [t, t + 4] {
                        for (k, v) in dot4(w.row(r), h).into_iter().enumerate() {
                            // SAFETY: as above.
                            unsafe { op.set((h + k) * rows + r, v) };
                        }
                    }
                }
                t += 8;
            }
        }
        if let Some(dot4) = dot4.filter(|_| n_tok > 1) {
            // Groups of four tokens; a last group of 1–3 is padded (the
            // kernels see the last token repeated, only real tokens are
            // stored): one pass over the rows instead of one per token.
            while t < n_tok {
                let real = (n_tok - t).min(4);
                let mut r = range.start;
                if let Some(d24) = dot2x4 {
                    while r + 2 <= range.end {
                        let v = d24(w.row(r), w.row(r + 1), t);
                        for (dr, row) in v.into_iter().enumerate() {
                            for (k, v) in row.into_iter().take(real).enumerate() {
                                // SAFETY: (t + k) * rows + r + dr < n_tok * rows <= out.len();
                                // rows are disjoint per thread.
                                unsafe { op.set((t + k) * rows + r + dr, v) };
                            }
                        }
                        r += 2;
                    }
                }
                for r in r..range.end {
                    let v = dot4(w.row(r), t);
                    for (k, v) in v.into_iter().take(real).enumerate() {
                        // SAFETY: as above.
                        unsafe { op.set((t + k) * rows + r, v) };
                    }
                }
                t += real;
            }
        }
        for t in t..n_tok {
            for r in range.clone() {
                // SAFETY: as above.
                unsafe { op.set(t * rows + r, dot1(w.row(r), t)) };
            }
        }
    });
}

/// `out[t * w.rows + r] = dot(x[t], W[r])` for all tokens `t` and rows `r`.
pub fn matmul(pool: &ThreadPool, w: &QMat, a: &Activations, out: &mut [f32]) {
    plan(pool, w, a, out, &mut |n, min, max, f| {
        run_parts(pool, &[(n, min, max, f)])
    });
}

/// [`matmul`] of several matrices with the same activations (a layer's
/// query, key and value projections; its gate and up projections) in one
/// round of the pool: every thread takes chunks of any of the matrices as
/// it comes free, so the threads wait for each other once instead of once
/// per matrix. Each output holds the same bits [`matmul`] gives.
pub fn matmul_many(pool: &ThreadPool, ws: &[QMat], a: &Activations, outs: &mut [&mut [f32]]) {
    assert_eq!(ws.len(), outs.len(), "matmul_many: one output per matrix");
    // Each matrix's work is planned inside the previous one's hand-over, so
    // that every plan's closure is alive when the round runs them all.
    fn go(
        pool: &ThreadPool,
        ws: &[QMat],
        a: &Activations,
        outs: &mut [&mut [f32]],
        parts: &[Part<'_>],
    ) {
        match (ws.split_first(), outs.split_first_mut()) {
            (Some((w, ws)), Some((out, outs))) => plan(pool, w, a, out, &mut |n, min, max, f| {
                let mut more = parts.to_vec();
                more.push((n, min, max, f));
                go(pool, ws, a, outs, &more);
            }),
            _ => run_parts(pool, parts),
        }
    }
    go(pool, ws, a, outs, &[]);
}

/// One matrix product's work: `n` items (rows or groups of rows) in chunks
/// of `min` to `max` items ([`ThreadPool::for_guided`]), each chunk done by
/// the closure.
type Part<'a> = (
    usize,
    usize,
    usize,
    &'a (dyn Fn(std::ops::Range<usize>) + Sync),
);

/// Where a matrix product hands over its work ([`Part`]) to be run: alone
/// ([`matmul`]) or in one round with others ([`matmul_many`]).
type Sink<'s> = &'s mut dyn FnMut(usize, usize, usize, &(dyn Fn(std::ops::Range<usize>) + Sync));

/// Run the parts in one round of the pool. Several parts are cut into
/// their smallest chunks and handed out, in order, as one list whose
/// chunks shrink as it drains; a thread's neighbouring chunks of one part
/// run as one range.
fn run_parts(pool: &ThreadPool, parts: &[Part<'_>]) {
    if let [(n, min, max, f)] = parts {
        return pool.for_guided(*n, *min, *max, f);
    }
    let tasks: Vec<(usize, std::ops::Range<usize>)> = parts
        .iter()
        .enumerate()
        .flat_map(|(i, &(n, min, _, _))| {
            let min = min.max(1);
            (0..n).step_by(min).map(move |s| (i, s..(s + min).min(n)))
        })
        .collect();
    // The largest matrix's longest chunk sets the pace (a small matrix's
    // chunks may run together beyond its own longest).
    let most = parts
        .iter()
        .map(|&(_, min, max, _)| max / min.max(1))
        .max()
        .unwrap_or(1);
    pool.for_guided(tasks.len(), 1, most, &|r| {
        let mut run: Option<(usize, std::ops::Range<usize>)> = None;
        for (i, range) in &tasks[r] {
            match &mut run {
                Some((j, cur)) if j == i && cur.end == range.start => cur.end = range.end,
                _ => {
                    if let Some((j, cur)) = run.replace((*i, range.clone())) {
                        (parts[j].3)(cur);
                    }
                }
            }
        }
        if let Some((j, cur)) = run {
            (parts[j].3)(cur);
        }
    });
}

/// Quantize the activations as `w` needs them and hand the product's work
/// to `sink`.
fn plan(pool: &ThreadPool, w: &QMat, a: &Activations, out: &mut [f32], sink: Sink) {
    assert_eq!(w.cols, a.cols, "matmul: inner dimensions differ");
    assert!(out.len() >= a.n_tok * w.rows, "matmul: output too small");
    assert!(
        !a.x.is_empty() || a.n_tok == 0 || (a.q8.get().is_some() && w.ty.block_size() == 32),
        "matmul: pre-quantized activations need a 32-element weight type"
    );
    let n_tok = a.n_tok;
    if w.packed {
        const WHY: &str = "a matrix is packed only where a kernel exists";
        return match w.ty.block_size() {
            256 => packed(
                pool,
                sink,
                w,
                out,
                a.q8k(pool),
                n_tok,
                kpack::kernel_k(w.ty).expect(WHY),
                None,
                Expanded::for_matrix(w, n_tok),
            ),
            _ => packed(
                pool,
                sink,
                w,
                out,
                a.q8(pool),
                n_tok,
                kpack::kernel_32(w.ty).expect(WHY),
                None,
                None,
            ),
        };
    }
    let batch = dot::batch_kernel(w.ty).filter(|_| n_tok >= UNPACK_MIN_TOKENS);
    match (w.ty.block_size(), batch) {
        (32, Some(k)) => unpacked(sink, w, out, a.q8(pool), n_tok, k),
        (32, None) => {
            let two_row = dot::dot_q8_2row(w.ty);
            quantized(
                pool,
                sink,
                w,
                out,
                a.q8(pool),
                n_tok,
                dot::dot_q8(w.ty).expect("32-element type has a dot"),
                dot::dot_q8_x4(w.ty),
                two_row.map(|k| k.0),
                two_row.map(|k| k.1),
            )
        }
        (256, _) => {
            match kpack::kernel_k(w.ty).filter(|_| n_tok >= REPACK_MIN_TOKENS && w.rows >= 8) {
                Some(k) => {
                    let one = dot::dot_q8k(w.ty).expect("K type has a dot");
                    packed(pool, sink, w, out, a.q8k(pool), n_tok, k, Some(one), None)
                }
                None => quantized(
                    pool,
                    sink,
                    w,
                    out,
                    a.q8k(pool),
                    n_tok,
                    dot::dot_q8k(w.ty).expect("K type has a dot"),
                    dot::dot_q8k_x4(w.ty),
                    None,
                    None,
                ),
            }
        }
        _ => {
            let cols = w.cols;
            let x = a.x;
            run_rows(
                pool,
                sink,
                w,
                n_tok,
                out,
                &|wr, t| dot::dot_float(w.ty, wr, &x[t * cols..(t + 1) * cols]),
                Wide::default(),
            );
        }
    }
}

/// From this many tokens on, weight rows are unpacked once per matmul and
/// reused by every token (below it, unpacking on the fly costs no more).
const UNPACK_MIN_TOKENS: usize = 16;

thread_local! {
    static UNPACKED: std::cell::RefCell<dot::Unpacked> = std::cell::RefCell::default();
}

/// The batch path: each thread unpacks a chunk of weight rows into a
/// thread-local buffer, then dots them with every token, four rows × four
/// tokens at a time.
fn unpacked(
    sink: Sink,
    w: &QMat,
    out: &mut [f32],
    xq: &[BlockQ8],
    n_tok: usize,
    k: dot::BatchKernel,
) {
    let rows = w.rows;
    let x = Tokens::new(xq, n_tok);
    let op = OutPtr(out.as_mut_ptr());
    sink(rows, 16, 16, &|range| {
        UNPACKED.with_borrow_mut(|up| {
            up.clear();
            for r in range.clone() {
                (k.unpack)(w.row(r), up);
            }
            let r0 = range.start;
            let mut t = 0;
            while t < n_tok {
                let real = (n_tok - t).min(4);
                let xs = x.group::<4>(t);
                let mut r = range.start;
                while r + 4 <= range.end {
                    let ws = [w.row(r), w.row(r + 1), w.row(r + 2), w.row(r + 3)];
                    let v = (k.dot4x4)(up, r - r0, ws, xs);
                    for (dr, row) in v.into_iter().enumerate() {
                        for (dt, v) in row.into_iter().take(real).enumerate() {
                            // SAFETY: (t + dt) * rows + r + dr < n_tok * rows <= out.len();
                            // rows are disjoint per thread.
                            unsafe { op.set((t + dt) * rows + r + dr, v) };
                        }
                    }
                    r += 4;
                }
                for r in r..range.end {
                    let v = (k.dot1x4)(up, r - r0, w.row(r), xs);
                    for (dt, v) in v.into_iter().take(real).enumerate() {
                        // SAFETY: as above.
                        unsafe { op.set((t + dt) * rows + r, v) };
                    }
                }
                t += real;
            }
        })
    });
}

/// From this many tokens on, a matmul takes two groups of rows at once
/// where the CPU has wide kernels (AVX-512). One token decodes faster with
/// the narrow kernels (Zen 5: 80 against 93 tok/s), and two alike. Since
/// the kernels spread their requests for the weights over each block
/// (`kpack`'s `ahead`), the wide ones stream from memory nearly at their
/// in-cache rate from three tokens on (Zen 5, `hanlin bench -b N`: three
/// sequences of the 1.5B model 1.14×, four 1.25× the narrow kernels'
/// rate); before, they lost to the narrow ones up to eight tokens.
const WIDE_MIN_TOKENS: usize = 3;

/// The kernels a packed matmul of `n_tok` tokens runs on a group, and how
/// many groups they take: two at once where the CPU has wide kernels, the
/// group's neighbour is in the same run (`pair`), and there are
/// [`WIDE_MIN_TOKENS`] tokens; else one.
#[inline(always)]
pub(crate) fn kernels_for<B>(
    k: &kpack::Kernel<B>,
    n_tok: usize,
    pair: bool,
) -> (kpack::Kernels<B>, usize) {
    match k.wide.filter(|_| pair && n_tok >= WIDE_MIN_TOKENS) {
        Some(wide) => (wide, 2),
        None => (k.narrow, 1),
    }
}

/// Up to this many tokens a packed matmul streams its weights as a decode
/// step does: each thread takes long runs of groups, every group meets all
/// the tokens while it is in L1, and the kernels ask for the weights ahead
/// ([`kpack::Out::stream`]). A server step of 8 sequences and their prompt
/// lookup guesses has up to 16 rows (the scheduler's default), so when this
/// was 8 such steps lost the asking ahead and read the weights in chunks of
/// four groups (the prefill layout). Zen 5, `hanlin bench -b N`, 0.5B:
/// 12 sequences 1.5×, 16 1.5×, 24 1.4×, 32 1.3× the rate with 8; its AVX2
/// path 16 sequences 1.27×, 32 1.13×. 64 tokens gained again (1.15× over
/// 32), but 64 tokens' activations of the 1.5B model's down projection
/// (650 KB) would not stay in a 512 KB L2 (Zen 3), and batches that large
/// come from prefill chunks, not from decoding.
const DECODE_MAX_TOKENS: usize = 32;

/// From this many tokens on, K-format rows not packed at load are packed
/// per matmul, a chunk at a time, and reused by every token.
const REPACK_MIN_TOKENS: usize = 16;

/// From this many tokens on, a matrix packed at load in a format that
/// [`kpack::expand`]s is expanded a chunk of groups at a time (a byte per
/// quant) and every token meets the expanded chunk: no unpacking in the
/// kernels' inner loops. Below it a chunk meets too few tokens to pay for
/// its expansion.
const EXPAND_MIN_TOKENS: usize = 64;

/// A chunk of expanded groups stays below this size (in L2 beside the
/// tokens' activations): two groups a chunk where four would pass it.
const EXPANDED_CHUNK_BYTES: usize = 128 << 10;

thread_local! {
    static PACKED: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
    static EXPANDED: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// The kernels of a format's [`kpack::expand`]ed groups and the bytes of an
/// expanded block of eight rows.
struct Expanded<B: 'static> {
    k: kpack::Kernel<B>,
    block_bytes: usize,
}

impl<B> Clone for Expanded<B> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<B> Copy for Expanded<B> {}

impl Expanded<BlockQ8K> {
    /// For a packed K-format matrix multiplied with `n_tok` tokens, where
    /// expanding pays ([`EXPAND_MIN_TOKENS`]) and the format expands.
    fn for_matrix(w: &QMat, n_tok: usize) -> Option<Self> {
        if n_tok < EXPAND_MIN_TOKENS || !w.packed {
            return None;
        }
        Some(Expanded {
            k: kpack::kernel_k_expanded(w.ty)?,
            block_bytes: kpack::expanded_block_bytes(w.ty)?,
        })
    }
}

/// Rows interleaved eight at a time ([`kpack`]), each group meeting the
/// tokens four at a time: a matrix packed at load (the same kernel for one
/// token or hundreds), or — with `one`, a matrix in the file's layout — each
/// thread packs its chunk of groups into a buffer first, and the rows left
/// over from whole groups take the one-token kernel `one` (the same bits:
/// the K formats' kernels share their steps).
#[allow(clippy::too_many_arguments)]
fn packed<B: Sync>(
    pool: &ThreadPool,
    sink: Sink,
    w: &QMat,
    out: &mut [f32],
    xq: &[B],
    n_tok: usize,
    k: kpack::Kernel<B>,
    one: Option<Kernel1<B>>,
    expanded: Option<Expanded<B>>,
) {
    let rows = w.rows;
    let packed_bytes = 8 * w.row_bytes();
    let blocks = w.cols / w.ty.block_size();
    assert!(
        (one.is_some() || rows.is_multiple_of(8))
            && w.data.len() == rows * w.row_bytes()
            && xq.len() == n_tok * blocks,
        "matmul: packed matrix or activations of the wrong size"
    );
    let x = Tokens::new(xq, n_tok);
    let op = OutPtr(out.as_mut_ptr());
    let groups = rows / 8;
    // Decode batches ([`DECODE_MAX_TOKENS`]) stream each thread's share of
    // the weights once (see `run_rows`); larger ones take four groups at a
    // time, and tiles of tokens so that the rows and the tile's activations
    // stay in L2. The kernels of a decode batch ask for their weights ahead
    // (`Out::stream`).
    let decode = n_tok <= DECODE_MAX_TOKENS;
    // A decode step's chunks shrink to two groups as the matrix drains.
    let (min, max, tile) = if decode {
        (
            2,
            groups.div_ceil(pool.n_threads() * 4).max(2),
            DECODE_MAX_TOKENS,
        )
    } else {
        match expanded {
            Some(e) if 4 * blocks * e.block_bytes > EXPANDED_CHUNK_BYTES => (2, 2, 32),
            _ => (4, 4, 32),
        }
    };
    // The layout the kernels read: the packed groups, or each chunk of them
    // expanded first (into `EXPANDED`). Chosen here, before `run` captures
    // it: handing `run` the kernels and the layout as arguments made a
    // decode step 6–8% slower (Xeon, AVX2 path, `hanlin bench -b 8`), all of
    // it in the output matrix's kernel.
    debug_assert!(
        one.is_none() || expanded.is_none(),
        "only packed matrices expand"
    );
    let (k, group_bytes) = match expanded {
        Some(e) => (e.k, blocks * e.block_bytes),
        None => (k, packed_bytes),
    };
    let run = |range: std::ops::Range<usize>, data: &[u8]| {
        for t0 in (0..n_tok).step_by(tile) {
            let t1 = (t0 + tile).min(n_tok);
            let mut g = range.start;
            while g < range.end {
                // Two groups at once where the CPU has wide kernels.
                let (ks, n_groups) = kernels_for(&k, n_tok, g + 1 < range.end);
                let at = (g - range.start) * group_bytes;
                let gp = data[at..at + n_groups * group_bytes].as_ptr();
                let mut t = t0;
                while let Some(g8) = ks.g8.filter(|_| t1 - t >= 8) {
                    let o = kpack::Out {
                        // In bounds: (t + 7) * rows + 8 * (g + n_groups) ≤ n_tok * rows.
                        ptr: op.at(t * rows + 8 * g),
                        stride: rows,
                        stream: decode,
                    };
                    // SAFETY: as below, for eight tokens.
                    unsafe { g8(gp, group_bytes, blocks, x.group(t), o) };
                    t += 8;
                }
                while t < t1 {
                    let n = (t1 - t).min(4);
                    let o = kpack::Out {
                        // In bounds: (t + n - 1) * rows + 8 * (g + n_groups) ≤ n_tok * rows.
                        ptr: op.at(t * rows + 8 * g),
                        stride: rows,
                        stream: decode,
                    };
                    // SAFETY: the groups hold `blocks` packed blocks each,
                    // every token as many (asserted above); the outputs are
                    // in bounds (above), and this thread's groups are its own.
                    unsafe {
                        match n {
                            4 => (ks.g4)(gp, group_bytes, blocks, x.group(t), o),
                            3 => (ks.g3)(gp, group_bytes, blocks, x.group(t), o),
                            2 => (ks.g2)(gp, group_bytes, blocks, x.group(t), o),
                            _ => (ks.g1)(gp, group_bytes, blocks, x.group(t), o),
                        }
                    }
                    t += n;
                }
                g += n_groups;
            }
        }
    };
    sink(groups, min, max, &|range| {
        let span = range.start * packed_bytes..range.end * packed_bytes;
        let Some(one) = one else {
            return match expanded {
                Some(_) => EXPANDED.with_borrow_mut(|buf| {
                    kpack::expand(w.ty, &w.data[span], buf);
                    run(range, buf)
                }),
                None => run(range, &w.data[span]),
            };
        };
        PACKED.with_borrow_mut(|buf| {
            buf.clear();
            buf.extend_from_slice(&w.data[span]);
            kpack::pack(w.ty, buf, 8 * range.len(), w.cols);
            run(range.clone(), buf);
        });
        if range.end == groups {
            for r in 8 * groups..rows {
                for t in 0..n_tok {
                    // SAFETY: t * rows + r < n_tok * rows <= out.len(); the
                    // leftover rows are this thread's alone.
                    unsafe { op.set(t * rows + r, one(w.row(r), x.one(t))) };
                }
            }
        }
    });
}

/// One-token kernel over activation blocks `B`.
type Kernel1<B> = fn(&[u8], &[B]) -> f32;
/// Four-token kernel over activation blocks `B`.
type Kernel4<B> = fn(&[u8], [&[B]; 4]) -> [f32; 4];
/// Two-row × four-token kernel over activation blocks `B`.
type Kernel2x4<B> = fn(&[u8], &[u8], [&[B]; 4]) -> [[f32; 4]; 2];
/// Two-row × eight-token kernel over activation blocks `B`.
type Kernel2x8<B> = fn(&[u8], &[u8], [&[B]; 8]) -> [[f32; 8]; 2];

/// A quantized weight against activations quantized to blocks `B`, with the
/// one-token kernel and, where they exist, the four-token and 2×4 kernels.
#[allow(clippy::too_many_arguments)]
fn quantized<B: Sync>(
    pool: &ThreadPool,
    sink: Sink,
    w: &QMat,
    out: &mut [f32],
    xq: &[B],
    n_tok: usize,
    f: fn(&[u8], &[B]) -> f32,
    f4: Option<Kernel4<B>>,
    f24: Option<Kernel2x4<B>>,
    f28: Option<Kernel2x8<B>>,
) {
    let x = Tokens::new(xq, n_tok);
    let d4 = f4.map(|f4| move |wr: &[u8], t: usize| f4(wr, x.group(t)));
    let d24 = f24.map(|f| move |w0: &[u8], w1: &[u8], t: usize| f(w0, w1, x.group(t)));
    let d28 = f28.map(|f| move |w0: &[u8], w1: &[u8], t: usize| f(w0, w1, x.group(t)));
    run_rows(
        pool,
        sink,
        w,
        n_tok,
        out,
        &|wr, t| f(wr, x.one(t)),
        Wide {
            dot4: d4.as_ref().map(|d| d as _),
            dot2x4: d24.as_ref().map(|d| d as _),
            dot2x8: d28.as_ref().map(|d| d as _),
        },
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A token's results do not depend on the batch around it: every path
    /// (one token, four tokens, 2×4, unpacked 4×4 and 1×4, leftovers) gives
    /// the one-token kernel's value bit for bit, for every 32-element format
    /// and the K formats the models use, with odd row and block counts.
    #[test]
    fn batched_matmul_is_bit_identical_to_one_token_dots() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(11);
        let pool = ThreadPool::new(2);
        for ty in [
            GgmlType::Q4_0,
            GgmlType::Q4_1,
            GgmlType::Q5_0,
            GgmlType::Q5_1,
            GgmlType::Q8_0,
            GgmlType::Q4_K,
            GgmlType::Q5_K,
            GgmlType::Q6_K,
        ] {
            let shapes: &[(usize, usize)] = if ty.block_size() == 32 {
                &[(37, 256), (21, 96), (40, 256)]
            } else {
                &[(37, 512), (21, 256), (45, 768), (40, 768)]
            };
            for &(rows, cols) in shapes {
                let data = crate::dot::tests::random_rows(ty, rows, cols, &mut rng);
                let w = QMat {
                    ty,
                    data: &data,
                    rows,
                    cols,
                    packed: false,
                };
                // The same matrix packed at load, where this CPU does.
                let packed = (kpack::packs(ty) && rows.is_multiple_of(8)).then(|| {
                    let mut p = data.clone();
                    kpack::pack(ty, &mut p, rows, cols);
                    p
                });
                // 70: a prefill's expanded groups (`EXPAND_MIN_TOKENS`).
                for n_tok in [1, 2, 3, 4, 5, 6, 7, 8, 9, 11, 15, 16, 17, 18, 33, 70] {
                    let x: Vec<f32> = (0..n_tok * cols)
                        .map(|_| rng.random_range(-2.0..2.0f32))
                        .collect();
                    let a = Activations::new(&x, cols);
                    let mut out = vec![0f32; n_tok * rows];
                    matmul(&pool, &w, &a, &mut out);
                    // Packed: each token alone, and all of them together.
                    let packed = packed.as_ref().map(|p| {
                        let wp = QMat {
                            data: p,
                            packed: true,
                            ..w
                        };
                        let mut all = vec![f32::NAN; n_tok * rows];
                        matmul(&pool, &wp, &a, &mut all);
                        let alone: Vec<f32> = (0..n_tok)
                            .flat_map(|t| {
                                let a1 = Activations::new(&x[t * cols..(t + 1) * cols], cols);
                                let mut o = vec![f32::NAN; rows];
                                matmul(&pool, &wp, &a1, &mut o);
                                o
                            })
                            .collect();
                        (all, alone)
                    });
                    let bpr = cols / ty.block_size();
                    let one = |r: usize, t: usize| {
                        if ty.block_size() == 32 {
                            dot::dot_q8(ty).expect("dot")(
                                w.row(r),
                                &a.q8(&pool)[t * bpr..(t + 1) * bpr],
                            )
                        } else {
                            dot::dot_q8k(ty).expect("dot")(
                                w.row(r),
                                &a.q8k(&pool)[t * bpr..(t + 1) * bpr],
                            )
                        }
                    };
                    for t in 0..n_tok {
                        for r in 0..rows {
                            let want = one(r, t);
                            assert_eq!(
                                out[t * rows + r].to_bits(),
                                want.to_bits(),
                                "{ty} {rows}x{cols} n_tok {n_tok}: t{t} r{r}"
                            );
                            let Some((all, alone)) = &packed else {
                                continue;
                            };
                            let (v, v1) = (all[t * rows + r], alone[t * rows + r]);
                            let at = format!("{ty} packed {rows}x{cols} n_tok {n_tok}: t{t} r{r}");
                            assert_eq!(v.to_bits(), v1.to_bits(), "{at}: batch vs alone");
                            if ty.block_size() == 256 {
                                // The K formats keep the one-token kernel's steps.
                                assert_eq!(v.to_bits(), want.to_bits(), "{at}");
                            } else {
                                // Sums in another order: close, not equal.
                                let tol = 1e-5 * (1.0 + want.abs());
                                assert!((v - want).abs() <= tol, "{at}: {v} vs {want}");
                            }
                        }
                    }
                }
            }
        }
    }

    /// Several matrices in one round give each matrix's own bits: mixed
    /// formats, packed at load or not, one token, a decode batch, a prefill.
    #[test]
    fn matmul_many_is_bit_identical_to_one_matmul_each() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
        let pool = ThreadPool::new(3);
        let cols = 512;
        let specs = [
            (GgmlType::Q5_0, 72, true),
            (GgmlType::Q4_K, 16, true),
            (GgmlType::Q6_K, 24, false),
            (GgmlType::Q8_0, 37, false),
        ];
        let mats: Vec<(GgmlType, usize, bool, Vec<u8>)> = specs
            .iter()
            .map(|&(ty, rows, pack)| {
                let mut data = crate::dot::tests::random_rows(ty, rows, cols, &mut rng);
                let pack = pack && kpack::packs(ty);
                if pack {
                    kpack::pack(ty, &mut data, rows, cols);
                }
                (ty, rows, pack, data)
            })
            .collect();
        let qmats: Vec<QMat> = mats
            .iter()
            .map(|(ty, rows, packed, data)| QMat {
                ty: *ty,
                data,
                rows: *rows,
                cols,
                packed: *packed,
            })
            .collect();
        for n_tok in [1, 3, 8, 20] {
            let x: Vec<f32> = (0..n_tok * cols)
                .map(|_| rng.random_range(-2.0..2.0f32))
                .collect();
            let a = Activations::new(&x, cols);
            let mut bufs: Vec<Vec<f32>> = qmats
                .iter()
                .map(|w| vec![f32::NAN; n_tok * w.rows])
                .collect();
            let mut outs: Vec<&mut [f32]> = bufs.iter_mut().map(|b| b.as_mut_slice()).collect();
            matmul_many(&pool, &qmats, &a, &mut outs);
            for (w, got) in qmats.iter().zip(&bufs) {
                let mut want = vec![f32::NAN; n_tok * w.rows];
                matmul(&pool, w, &Activations::new(&x, cols), &mut want);
                let same = got
                    .iter()
                    .zip(&want)
                    .all(|(g, w)| g.to_bits() == w.to_bits());
                assert!(same, "{} {}x{cols}, {n_tok} tokens", w.ty, w.rows);
            }
        }
    }

    #[test]
    fn matmul_matches_naive() {
        let pool = ThreadPool::new(2);
        let (rows, cols, n_tok) = (37, 64, 7);
        let wf: Vec<f32> = (0..rows * cols)
            .map(|i| ((i * 7 % 13) as f32 - 6.0) * 0.1)
            .collect();
        let x: Vec<f32> = (0..n_tok * cols)
            .map(|i| ((i * 5 % 11) as f32 - 5.0) * 0.2)
            .collect();
        for (ty, data, tol) in [
            (GgmlType::F32, quant::encode_f32(&wf), 1e-4),
            (GgmlType::F16, quant::encode_f16(&wf), 1e-2),
            (GgmlType::Q8_0, quant::quantize_row_q8_0(&wf), 0.1),
        ] {
            let w = QMat {
                ty,
                data: &data,
                rows,
                cols,
                packed: false,
            };
            let a = Activations::new(&x, cols);
            let mut out = vec![0f32; n_tok * rows];
            matmul(&pool, &w, &a, &mut out);
            for t in 0..n_tok {
                for r in 0..rows {
                    let e: f32 = (0..cols).map(|c| wf[r * cols + c] * x[t * cols + c]).sum();
                    assert!(
                        (out[t * rows + r] - e).abs() < tol,
                        "{ty} t{t} r{r}: {} vs {e}",
                        out[t * rows + r]
                    );
                }
            }
        }
    }
}
