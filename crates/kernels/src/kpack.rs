//! Weights interleaved eight rows at a time, once, at load (Q4_K, Q5_K,
//! Q6_K, Q5_0, Q8_0, Q4_1).
//!
//! In a file's layout every row's blocks follow each other, so a kernel
//! that works on one row at a time ends every block with horizontal sums,
//! and one that wants several rows side by side has to rearrange them first
//! for every matmul (that rearranging cost a 16-token batch more than its
//! products). Here the rows of a matrix are rearranged once, in place, when
//! the model loads: each block of eight rows keeps its bytes (the same
//! size, so memory does not grow; only Q5_0's fifth bits are reordered
//! within their word), but word `w` of all eight rows
//! sits side by side. One 256-bit load then holds the same four bytes of
//! eight rows, the nibbles are masked out in place, and one broadcast of four
//! activation bytes multiplies eight rows: every lane is a row, nothing is
//! summed across lanes, and one token costs what a batch of four costs per
//! token (the idea is ik_llama.cpp's row-interleaved formats; the layout and
//! kernels are ours). With AVX-512 a batch of eight tokens or more takes two
//! neighbouring groups in 512-bit registers ([`Kernel::wide`]): sixteen
//! rows per load, broadcast and dot product.
//!
//! A packed block of eight rows, per 256 columns:
//!
//! | Q4_K (1152 bytes) | Q6_K (1680 bytes) |
//! |---|---|
//! | `d`: 8 × f16 | `d`: 8 × f16 |
//! | `dmin`: 8 × f16 | scales: 8 pairs × 8 rows × 2 × i8 |
//! | scales: 3 words × 8 rows × 4 bytes | 16 × (a `qh` word and the two `ql` words it completes) × 8 rows × 4 bytes |
//! | `qs`: 32 words × 8 rows × 4 bytes | |
//!
//! and per 32 columns: Q8_0 (272 bytes) `d`: 8 × f16, then 8 words × 8 rows
//! × 4 bytes of quants; Q5_0 (176 bytes) `d`: 8 × f16, `qh`: 8 × 4 bytes
//! (each row's fifth bits transposed, see [`qh_transpose`]),
//! then 4 words × 8 rows × 4 bytes of nibbles; Q4_1 (160 bytes) `d`: 8 ×
//! f16, `m`: 8 × f16, then 4 words × 8 rows × 4 bytes of nibbles.
//!
//! Each is in the order the kernels read it, so a group is one sequential
//! stream.
//!
//! A packed matrix is only ever multiplied by these kernels, for one token
//! or hundreds, and each (row, token) result goes through the same steps
//! whatever the number of tokens: a token's logits do not depend on how many
//! share its pass. For the K formats the steps are also
//! [`crate::dot::scalar_q8k`]'s, so the result is its bit for bit; the
//! 32-element formats sum each block exactly in integers and then
//! `acc = fma(d·xd, isum, acc)`, block by block.

use crate::quant::{BlockQ8, BlockQ8K};
use hanlin_formats::GgmlType;

/// A block's words in the order a packed block stores them, as (offset in
/// the file's block, bytes): each is stored for the eight rows side by side.
fn words(ty: GgmlType) -> Vec<(usize, usize)> {
    let mut v = Vec::new();
    match ty {
        GgmlType::Q4_K => {
            v.extend([(0, 2), (2, 2)]);
            v.extend((0..3).map(|w| (4 + 4 * w, 4)));
            v.extend((0..32).map(|w| (16 + 4 * w, 4)));
        }
        GgmlType::Q5_K => {
            v.extend([(0, 2), (2, 2)]);
            v.extend((0..3).map(|w| (4 + 4 * w, 4)));
            v.extend((0..8).map(|w| (16 + 4 * w, 4)));
            v.extend((0..32).map(|w| (48 + 4 * w, 4)));
        }
        GgmlType::Q8_0 => {
            v.push((0, 2));
            v.extend((0..8).map(|w| (2 + 4 * w, 4)));
        }
        GgmlType::Q5_0 => {
            v.extend([(0, 2), (2, 4)]);
            v.extend((0..4).map(|w| (6 + 4 * w, 4)));
        }
        GgmlType::Q4_1 => {
            v.extend([(0, 2), (2, 2)]);
            v.extend((0..4).map(|w| (4 + 4 * w, 4)));
        }
        GgmlType::Q6_K => {
            v.push((208, 2));
            v.extend((0..8).map(|p| (192 + 2 * p, 2)));
            // In the order the kernel reads them: a word of high bits,
            // then the two words of low bits it completes.
            for h in 0..2 {
                for q in 0..2 {
                    for mm in 0..4 {
                        let (m, a) = (8 * h + 4 * q + mm, 16 * h + 4 * q + mm);
                        v.extend([(128 + 4 * m, 4), (4 * a, 4), (4 * (a + 8), 4)]);
                    }
                }
            }
        }
        _ => {}
    }
    v
}

/// A Q5_0 row's fifth bits as a packed block stores them: bit `4w + i` of
/// the file's `qh` (the quant in byte `i` of nibble word `w`, `w` 0..8 with
/// the high nibbles as words 4..8) becomes bit `w` of byte `i`. Word `w`'s
/// fifth bits are then one shift and one mask away (`(qh >> w) << 4 &
/// 0x10` in every byte), where the file's order needs a byte shuffle and a
/// compare per word.
fn qh_transpose(qh: u32) -> u32 {
    // Byte k of `qh` holds words 2k and 2k + 1: a table spreads it as
    // words 0 and 1, shifted into place.
    (0..4).fold(0, |o, k| {
        o | QH_SPREAD[(qh >> (8 * k) & 0xFF) as usize] << (2 * k)
    })
}

/// [`qh_transpose`] of one byte of `qh` as if it were the first.
const QH_SPREAD: [u32; 256] = {
    let mut t = [0u32; 256];
    let mut b = 0;
    while b < 256 {
        let mut j = 0;
        while j < 8 {
            if b >> j & 1 != 0 {
                t[b] |= 1 << (8 * (j % 4) + j / 4);
            }
            j += 1;
        }
        b += 1;
    }
    t
};

/// The inverse of [`qh_transpose`].
fn qh_untranspose(t: u32) -> u32 {
    (0..8).fold(0, |o, w| {
        let x = t >> w & 0x0101_0101;
        o | ((x | x >> 7 | x >> 14 | x >> 21) & 0xF) << (4 * w)
    })
}

/// Whether the word at `src` of a `ty` block is a Q5_0 `qh` (stored
/// transposed).
fn is_qh(ty: GgmlType, src: usize) -> bool {
    ty == GgmlType::Q5_0 && src == 2
}

/// Bytes of one block of eight rows [`expand`]ed: the packed block's header
/// (scales, minimums), then a byte per quant.
const Q4_K_EXPANDED: usize = 128 + 2048;
const Q6_K_EXPANDED: usize = 144 + 2048;

/// The bytes one block of eight rows of `ty` takes [`expand`]ed, for the
/// formats that expand (Q4_K, Q6_K).
pub fn expanded_block_bytes(ty: GgmlType) -> Option<usize> {
    match ty {
        GgmlType::Q4_K => Some(Q4_K_EXPANDED),
        GgmlType::Q6_K => Some(Q6_K_EXPANDED),
        _ => None,
    }
}

/// Packed groups of `ty` (whole blocks of eight rows, in [`pack`]'s layout)
/// with every quant in a byte of its own, into `out`: each block keeps its
/// header (scales, minimums) and its words in the order the kernels read
/// them, a Q4_K word as its low nibbles then its high ones, a Q6_K unit as
/// its four 6-bit values. The kernels of [`kernel_k_expanded`] read these
/// without unpacking: a prefill chunk of groups meets hundreds of tokens,
/// and pays for the expansion once instead of once per four tokens.
///
/// # Panics
/// If `ty` does not expand or `packed` is not whole blocks.
pub fn expand(ty: GgmlType, packed: &[u8], out: &mut Vec<u8>) {
    let size = 8 * ty.type_size();
    let xb = expanded_block_bytes(ty).expect("a format that expands");
    assert!(packed.len().is_multiple_of(size), "expand: whole blocks");
    out.resize(packed.len() / size * xb, 0);
    for (src, dst) in packed.chunks_exact(size).zip(out.chunks_exact_mut(xb)) {
        if ty == GgmlType::Q4_K {
            dst[..128].copy_from_slice(&src[..128]);
            for (w, d) in src[128..]
                .chunks_exact(32)
                .zip(dst[128..].chunks_exact_mut(64))
            {
                let (lo, hi) = d.split_at_mut(32);
                for j in 0..32 {
                    lo[j] = w[j] & 0x0F;
                    hi[j] = w[j] >> 4;
                }
            }
        } else {
            dst[..144].copy_from_slice(&src[..144]);
            for (u, d) in src[144..]
                .chunks_exact(96)
                .zip(dst[144..].chunks_exact_mut(128))
            {
                let (qh, qa, qb) = (&u[..32], &u[32..64], &u[64..]);
                for j in 0..32 {
                    d[j] = (qa[j] & 0x0F) | ((qh[j] << 4) & 0x30);
                    d[32 + j] = (qb[j] & 0x0F) | ((qh[j] << 2) & 0x30);
                    d[64 + j] = (qa[j] >> 4) | (qh[j] & 0x30);
                    d[96 + j] = (qb[j] >> 4) | ((qh[j] >> 2) & 0x30);
                }
            }
        }
    }
}

/// Whether matrices of `ty` are packed on this CPU: a kernel exists for it.
pub fn packs(ty: GgmlType) -> bool {
    kernel_k(ty).is_some() || kernel_32(ty).is_some()
}

/// Rearrange a matrix of `ty` (`rows` rows, a multiple of eight, of
/// `cols` columns) from the file's layout into the packed one, in place.
pub fn pack(ty: GgmlType, data: &mut [u8], rows: usize, cols: usize) {
    let (size, bs) = (ty.type_size(), ty.block_size());
    let row_bytes = ty.row_bytes(cols);
    assert!(
        rows.is_multiple_of(8),
        "packing needs whole groups of eight rows"
    );
    assert_eq!(data.len(), rows * row_bytes, "packing: matrix size");
    let words = words(ty);
    let mut tmp = vec![0u8; 8 * row_bytes];
    for group in data.chunks_exact_mut(8 * row_bytes) {
        tmp.copy_from_slice(group);
        for b in 0..cols / bs {
            let mut packed = 8 * b * size;
            for &(src, wb) in &words {
                for r in 0..8 {
                    let file = r * row_bytes + b * size + src;
                    // Fixed sizes: moves, not a call to memcpy per word.
                    match wb {
                        2 => copy::<2>(group, packed, &tmp, file),
                        _ if is_qh(ty, src) => {
                            let qh = word(&tmp, file);
                            group[packed..packed + 4]
                                .copy_from_slice(&qh_transpose(qh).to_le_bytes());
                        }
                        _ => copy::<4>(group, packed, &tmp, file),
                    }
                    packed += wb;
                }
            }
        }
    }
}

/// One matrix for [`pack_all`]: its bytes in the file's layout, its format
/// and shape (`rows` a multiple of eight).
pub struct PackJob<'a> {
    pub ty: GgmlType,
    pub data: &'a mut [u8],
    pub rows: usize,
    pub cols: usize,
}

/// [`pack`] every matrix of `jobs`, on all cores: a model's matrices are
/// cut into pieces of whole row groups ([`crate::LOAD_PIECE_BYTES`]) that
/// the threads take in turn. A packed group depends only on its own rows,
/// so the result is the same as packing each matrix whole.
pub fn pack_all(jobs: Vec<PackJob<'_>>) {
    pack_in_pieces(jobs, crate::LOAD_PIECE_BYTES);
}

/// [`pack_all`] with pieces of at most `piece` bytes (at least one group).
fn pack_in_pieces(jobs: Vec<PackJob<'_>>, piece: usize) {
    let mut pieces = Vec::new();
    for PackJob {
        ty,
        data,
        rows,
        cols,
    } in jobs
    {
        let row_bytes = ty.row_bytes(cols).max(1);
        let per = crate::rows_per_piece(row_bytes, rows, piece, 8);
        for data in data.chunks_mut(per * row_bytes) {
            let rows = data.len() / row_bytes;
            pieces.push(PackJob {
                ty,
                data,
                rows,
                cols,
            });
        }
    }
    let packed: Result<(), std::convert::Infallible> = hanlin_formats::par::for_each(pieces, |p| {
        pack(p.ty, p.data, p.rows, p.cols);
        Ok(())
    });
    let Ok(()) = packed;
}

/// Row `lane` of a packed group of eight rows (`group`, `cols` columns)
/// in the file's layout, into `row` (an embedding lookup of a packed
/// matrix: the output matrix that is also the token embedding).
pub fn unpack_row(ty: GgmlType, group: &[u8], lane: usize, cols: usize, row: &mut [u8]) {
    let (size, bs) = (ty.type_size(), ty.block_size());
    assert!(lane < 8 && group.len() == 8 * ty.row_bytes(cols) && row.len() == ty.row_bytes(cols));
    let words = words(ty);
    for b in 0..cols / bs {
        let mut packed = 8 * b * size;
        for &(src, wb) in &words {
            let at = packed + lane * wb;
            let to = &mut row[b * size + src..b * size + src + wb];
            if is_qh(ty, src) {
                to.copy_from_slice(&qh_untranspose(word(group, at)).to_le_bytes());
            } else {
                to.copy_from_slice(&group[at..at + wb]);
            }
            packed += 8 * wb;
        }
    }
}

/// The inverse of [`pack`], row by row through [`unpack_row`].
pub fn unpack(ty: GgmlType, data: &mut [u8], rows: usize, cols: usize) {
    let row_bytes = ty.row_bytes(cols);
    assert!(rows.is_multiple_of(8) && data.len() == rows * row_bytes);
    let mut group = vec![0u8; 8 * row_bytes];
    for g in data.chunks_exact_mut(8 * row_bytes) {
        group.copy_from_slice(g);
        for (lane, row) in g.chunks_exact_mut(row_bytes).enumerate() {
            unpack_row(ty, &group, lane, cols, row);
        }
    }
}

/// The little-endian word at `at`.
fn word(from: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(from[at..at + 4].try_into().unwrap_or([0; 4]))
}

#[inline(always)]
fn copy<const W: usize>(to: &mut [u8], at: usize, from: &[u8], from_at: usize) {
    let v: [u8; W] = from[from_at..from_at + W].try_into().unwrap_or([0; W]);
    to[at..at + W].copy_from_slice(&v);
}

/// Where a kernel writes: token `t`'s results (eight, or sixteen for a
/// wide kernel) go to `ptr + t * stride ..`.
#[derive(Clone, Copy)]
pub struct Out {
    pub ptr: *mut f32,
    pub stride: usize,
    /// The weights are streamed from memory once (a decode batch), not
    /// reused from cache by further tokens: the kernel asks for them ahead.
    pub stream: bool,
}

/// Packed rows × `N` tokens whose activations are blocks `B`:
/// `(group, stride, blocks, xs, out)`. A narrow kernel reads eight rows
/// (the group at `group`); a wide one sixteen, the next group `stride`
/// bytes further. Safety: the group(s) hold `blocks` packed blocks, every
/// token as many activation blocks, and every place [`Out`] names is valid
/// and written by no one else.
pub type Gemm<B, const N: usize> = unsafe fn(*const u8, usize, usize, [&[B]; N], Out);

/// The kernels of one format at one register width, for one to four
/// tokens, and for eight where the registers hold eight tokens' sums: a
/// decode batch of eight then unpacks each weight block once instead of
/// twice. Each token's sums are formed in the same order whatever the
/// kernel, so the results are the same bits.
pub struct Kernels<B: 'static> {
    pub g1: Gemm<B, 1>,
    pub g2: Gemm<B, 2>,
    pub g3: Gemm<B, 3>,
    pub g4: Gemm<B, 4>,
    pub g8: Option<Gemm<B, 8>>,
}

impl<B> Clone for Kernels<B> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<B> Copy for Kernels<B> {}

/// A format's kernels on this CPU: eight rows in 256-bit registers, and
/// with AVX-512 sixteen rows (two neighbouring groups) in 512-bit ones.
/// A wide kernel unpacks each weight block once for twice the rows, and
/// every activation broadcast and dot-product instruction serves sixteen
/// rows; each lane takes the same steps as in the narrow kernel, so the
/// bits are the same.
pub struct Kernel<B: 'static> {
    pub narrow: Kernels<B>,
    pub wide: Option<Kernels<B>>,
}

impl<B> Clone for Kernel<B> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<B> Copy for Kernel<B> {}

#[cfg(target_arch = "x86_64")]
macro_rules! kernels {
    ($f:ident) => {
        Kernels {
            g1: avx2::$f::<1>,
            g2: avx2::$f::<2>,
            g3: avx2::$f::<3>,
            g4: avx2::$f::<4>,
            g8: None,
        }
    };
    ($f:ident, 8) => {
        Kernels {
            g8: Some(avx2::$f::<8>),
            ..kernels!($f)
        }
    };
}

/// The kernels for a K format `ty` on this CPU (AVX2, AVX2 with AVX-VNNI,
/// or AVX-512 VNNI).
pub fn kernel_k(ty: GgmlType) -> Option<Kernel<BlockQ8K>> {
    k_kernels(ty, false)
}

/// The kernels for a K format's groups [`expand`]ed to a byte per quant
/// (Q4_K and Q6_K), on this CPU.
pub fn kernel_k_expanded(ty: GgmlType) -> Option<Kernel<BlockQ8K>> {
    k_kernels(ty, true)
}

fn k_kernels(ty: GgmlType, x: bool) -> Option<Kernel<BlockQ8K>> {
    #[cfg(target_arch = "x86_64")]
    {
        use crate::dot::{avx_vnni, simd_level, SimdLevel};
        use GgmlType::{Q4_K, Q5_K, Q6_K};
        let vnni = avx_vnni();
        // Eight-token kernels where a decode batch of eight gains from
        // unpacking each word once (Xeon, `hanlin bench -b 8`, 1.5B: AVX-512
        // 1.15×, AVX2 1.11×); the narrow 256-bit Q6_K one would keep 32 sums
        // and spill (0.93× two four-token passes in cache), so it has none.
        // Expanded Q4_K on plain AVX2 has them too: each block's scales
        // and minimums are unpacked once for eight prefill tokens instead
        // of twice (Zen 3, 1.5B `hanlin bench -p 512`: the kernel's samples
        // −6 %, prefill 1.05×); expanded Q6_K's ran no faster (72 against
        // 73 GMAC/s in cache), so it keeps four.
        let (narrow, wide) = match (simd_level(), ty, x) {
            (SimdLevel::Avx2Vnni, Q4_K, false) => {
                (kernels!(q4k_vnni, 8), Some(kernels!(q4k_zmm, 8)))
            }
            (SimdLevel::Avx2Vnni, Q5_K, false) => (kernels!(q5k_vnni), Some(kernels!(q5k_zmm))),
            (SimdLevel::Avx2Vnni, Q6_K, false) => (kernels!(q6k_vnni), Some(kernels!(q6k_zmm, 8))),
            (SimdLevel::Avx2Vnni, Q4_K, true) => (kernels!(q4kx_vnni), Some(kernels!(q4kx_zmm))),
            (SimdLevel::Avx2Vnni, Q6_K, true) => (kernels!(q6kx_vnni), Some(kernels!(q6kx_zmm))),
            (SimdLevel::Avx2, Q4_K, false) if vnni => (kernels!(q4k_avxvnni, 8), None),
            (SimdLevel::Avx2, Q5_K, false) if vnni => (kernels!(q5k_avxvnni, 8), None),
            (SimdLevel::Avx2, Q6_K, false) if vnni => (kernels!(q6k_avxvnni, 8), None),
            (SimdLevel::Avx2, Q4_K, true) if vnni => (kernels!(q4kx_avxvnni, 8), None),
            (SimdLevel::Avx2, Q6_K, true) if vnni => (kernels!(q6kx_avxvnni, 8), None),
            (SimdLevel::Avx2, Q4_K, false) => (kernels!(q4k_avx2, 8), None),
            (SimdLevel::Avx2, Q5_K, false) => (kernels!(q5k_avx2), None),
            (SimdLevel::Avx2, Q6_K, false) => (kernels!(q6k_avx2, 8), None),
            (SimdLevel::Avx2, Q4_K, true) => (kernels!(q4kx_avx2, 8), None),
            (SimdLevel::Avx2, Q6_K, true) => (kernels!(q6kx_avx2), None),
            _ => return None,
        };
        return Some(Kernel { narrow, wide });
    }
    #[allow(unreachable_code)]
    {
        let _ = (ty, x);
        None
    }
}

/// The kernels for a 32-element format `ty` on this CPU.
pub fn kernel_32(ty: GgmlType) -> Option<Kernel<BlockQ8>> {
    #[cfg(target_arch = "x86_64")]
    {
        use crate::dot::{avx_vnni, simd_level, SimdLevel};
        use GgmlType::{Q4_1, Q5_0, Q8_0};
        let (narrow, wide) = match (simd_level(), ty) {
            (SimdLevel::Avx2Vnni, Q8_0) => (kernels!(q8_0_vnni, 8), Some(kernels!(q8_0_zmm, 8))),
            (SimdLevel::Avx2Vnni, Q5_0) => (kernels!(q5_0_vnni, 8), Some(kernels!(q5_0_zmm, 8))),
            (SimdLevel::Avx2, Q8_0) if avx_vnni() => (kernels!(q8_0_avxvnni, 8), None),
            (SimdLevel::Avx2, Q5_0) if avx_vnni() => (kernels!(q5_0_avxvnni, 8), None),
            (SimdLevel::Avx2, Q4_1) if avx_vnni() => (kernels!(q4_1_avxvnni, 8), None),
            (SimdLevel::Avx2, Q8_0) => (kernels!(q8_0_avx2, 8), None),
            (SimdLevel::Avx2, Q5_0) => (kernels!(q5_0_avx2, 8), None),
            (SimdLevel::Avx2Vnni, Q4_1) => (kernels!(q4_1_vnni, 8), Some(kernels!(q4_1_zmm, 8))),
            (SimdLevel::Avx2, Q4_1) => (kernels!(q4_1_avx2), None),
            _ => return None,
        };
        return Some(Kernel { narrow, wide });
    }
    #[allow(unreachable_code)]
    {
        let _ = ty;
        None
    }
}

#[cfg(target_arch = "x86_64")]
// Register-blocked kernels index several arrays by the same counters.
#[allow(clippy::needless_range_loop)]
mod avx2 {
    use super::*;
    use std::arch::x86_64::*;

    /// For a decode step ([`Out::stream`]): asks for part `part` of
    /// `parts` of the cache lines of the weights [`Regs::AHEAD`] bytes past
    /// a block of `bytes` at `blk` (and `stride` further). Several tokens'
    /// work keeps the kernel busy long enough that the hardware's own
    /// prefetching falls behind.
    ///
    /// One token asks ahead too. It did not while the requests came in a
    /// burst at each block's start (that made single-sequence decode
    /// slower); spread over the block's steps they raise it: Zen 5,
    /// `hanlin bench -p 16 -n 128 -t 2`, 1.5B 1.17–1.18× (55 → 65 tok/s,
    /// 73 GB/s), 0.5B 1.09×; its AVX2 path 1.19× and 1.10×.
    ///
    /// A kernel asks for a block's lines a part at a time, spread over its
    /// steps on the block, not all at its start: a burst of requests (36
    /// for a Q4_K block of sixteen rows) fills the core's miss buffers and
    /// the rest wait or are dropped. Spread over the four sub-block steps,
    /// four tokens' Q4_K from memory went from 0.44× to 0.9× the kernel's
    /// in-cache rate and Q6_K from 0.33× to 0.75× (`kpack_stream_speed`,
    /// Zen 5, one thread); the 32-element formats, whose blocks are a few
    /// lines, gained within noise.
    #[inline(always)]
    unsafe fn ahead<R: Regs>(
        out: Out,
        blk: *const u8,
        bytes: usize,
        stride: usize,
        part: usize,
        parts: usize,
    ) {
        if out.stream {
            let lines = bytes.div_ceil(64);
            for l in lines * part / parts..lines * (part + 1) / parts {
                R::prefetch(blk.wrapping_add(R::AHEAD + 64 * l), stride);
            }
        }
    }

    /// The operations the kernels are written in, at one register width:
    /// [`Y`] holds one group of eight rows (256 bits), [`Z`] two
    /// neighbouring groups (512 bits, the second `stride` bytes after the
    /// first). Lane `r` of a register is row `r` either way, so one kernel
    /// source serves both widths and every lane takes the same steps.
    pub(super) trait Regs {
        type I: Copy;
        type F: Copy;
        /// A packed word of every row: 32 bytes at `p` (and at `p + stride`).
        unsafe fn ld(p: *const u8, stride: usize) -> Self::I;
        /// Asks for the cache line at `p` (and at `p + stride`) ahead of use.
        unsafe fn prefetch(p: *const u8, stride: usize);
        /// How far ahead (bytes) a decode step's kernels ask for their
        /// weights ([`ahead`]).
        const AHEAD: usize;
        /// Sixteen i8 at `p` (and at `p + stride`) as i16.
        unsafe fn ld_i16(p: *const u8, stride: usize) -> Self::I;
        /// Eight f16 at `p` (and at `p + stride`) as f32.
        unsafe fn ld_f16(p: *const u8, stride: usize) -> Self::F;
        /// Four bytes at `x + at` in every lane.
        unsafe fn bcast(x: *const i8, at: usize) -> Self::I;
        unsafe fn splat(v: i32) -> Self::I;
        unsafe fn splat8(v: i8) -> Self::I;
        unsafe fn splat16(v: i16) -> Self::I;
        unsafe fn splat_f(v: f32) -> Self::F;
        unsafe fn zero_f() -> Self::F;
        unsafe fn and(a: Self::I, b: Self::I) -> Self::I;
        unsafe fn or(a: Self::I, b: Self::I) -> Self::I;
        unsafe fn xor(a: Self::I, b: Self::I) -> Self::I;
        unsafe fn add32(a: Self::I, b: Self::I) -> Self::I;
        unsafe fn sub32(a: Self::I, b: Self::I) -> Self::I;
        unsafe fn add16(a: Self::I, b: Self::I) -> Self::I;
        unsafe fn mullo32(a: Self::I, b: Self::I) -> Self::I;
        unsafe fn madd16(a: Self::I, b: Self::I) -> Self::I;
        unsafe fn maddubs(u: Self::I, x: Self::I) -> Self::I;
        unsafe fn dpbusd(acc: Self::I, u: Self::I, x: Self::I) -> Self::I;
        /// `a` with `b`'s sign per byte (zero where `b` is).
        unsafe fn sign8(a: Self::I, b: Self::I) -> Self::I;
        unsafe fn srl32(a: Self::I, k: i32) -> Self::I;
        unsafe fn sll32(a: Self::I, k: i32) -> Self::I;
        unsafe fn sra32(a: Self::I, k: i32) -> Self::I;
        unsafe fn srl16(a: Self::I, k: i32) -> Self::I;
        unsafe fn sll16(a: Self::I, k: i32) -> Self::I;
        /// Each lane's low i16 in both of its halves.
        unsafe fn dup16(a: Self::I) -> Self::I;
        unsafe fn cvt(a: Self::I) -> Self::F;
        unsafe fn mul(a: Self::F, b: Self::F) -> Self::F;
        unsafe fn fmadd(a: Self::F, b: Self::F, c: Self::F) -> Self::F;
        unsafe fn sub_f(a: Self::F, b: Self::F) -> Self::F;
        /// Every row's result to `p..`.
        unsafe fn store(v: Self::F, p: *mut f32);
        /// Whether a VNNI kernel has only sixteen vector registers (VEX
        /// encoding: AVX-VNNI), so that sums kept for four values of each
        /// token would spill.
        const SIXTEEN: bool = false;
    }

    /// 256-bit registers: one group of eight rows.
    pub(super) struct Y;
    /// [`Y`] with AVX-VNNI's `vpdpbusd` (VEX-encoded; no AVX-512).
    pub(super) struct V;
    /// 512-bit registers: two groups of eight rows (AVX-512).
    pub(super) struct Z;

    macro_rules! ops {
        ($($name:ident($($a:ident),*) => $f:ident;)*) => {$(
            #[inline(always)]
            unsafe fn $name($($a: Self::I),*) -> Self::I {
                $f($($a),*)
            }
        )*};
    }

    macro_rules! ymm {
        ($t:ident, $dpbusd:ident, $sixteen:literal) => {
            impl Regs for $t {
                type I = __m256i;
                type F = __m256;
                const SIXTEEN: bool = $sixteen;
                // The 256-bit kernels consume their weights slowly enough
                // for a short distance into L1; asking far ahead into L2 as
                // [`Z`] does measured slightly slower (`kpack_stream_speed`
                // with `HANLIN_SIMD=avx2`, Zen 4, requests all at a block's
                // start). With the requests spread over the block ([`ahead`]),
                // 4 KiB beat 1 KiB for two and three tokens (Zen 5's AVX2
                // path: Q4_K 1.2×, Q5_0 1.15×, Q8_0 1.2×) and equalled 16 KiB.
                // One token (the narrow kernels of a single sequence's
                // decode, 1.5B): 4 KiB 1.18×, 2 KiB 1.09×, 16 KiB 1.04× the
                // rate without asking ahead (Zen 5).
                const AHEAD: usize = 4096;
                #[inline(always)]
                unsafe fn ld(p: *const u8, _: usize) -> __m256i {
                    _mm256_loadu_si256(p as *const __m256i)
                }
                #[inline(always)]
                unsafe fn prefetch(p: *const u8, _: usize) {
                    _mm_prefetch::<_MM_HINT_T0>(p as *const i8);
                }
                #[inline(always)]
                unsafe fn ld_i16(p: *const u8, _: usize) -> __m256i {
                    _mm256_cvtepi8_epi16(_mm_loadu_si128(p as *const __m128i))
                }
                #[inline(always)]
                unsafe fn ld_f16(p: *const u8, _: usize) -> __m256 {
                    _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i))
                }
                #[inline(always)]
                unsafe fn bcast(x: *const i8, at: usize) -> __m256i {
                    _mm256_set1_epi32((x.add(at) as *const i32).read_unaligned())
                }
                #[inline(always)]
                unsafe fn splat(v: i32) -> __m256i {
                    _mm256_set1_epi32(v)
                }
                #[inline(always)]
                unsafe fn splat8(v: i8) -> __m256i {
                    _mm256_set1_epi8(v)
                }
                #[inline(always)]
                unsafe fn splat16(v: i16) -> __m256i {
                    _mm256_set1_epi16(v)
                }
                #[inline(always)]
                unsafe fn splat_f(v: f32) -> __m256 {
                    _mm256_set1_ps(v)
                }
                #[inline(always)]
                unsafe fn zero_f() -> __m256 {
                    _mm256_setzero_ps()
                }
                ops! {
                    and(a, b) => _mm256_and_si256;
                    or(a, b) => _mm256_or_si256;
                    xor(a, b) => _mm256_xor_si256;
                    add32(a, b) => _mm256_add_epi32;
                    sub32(a, b) => _mm256_sub_epi32;
                    add16(a, b) => _mm256_add_epi16;
                    mullo32(a, b) => _mm256_mullo_epi32;
                    madd16(a, b) => _mm256_madd_epi16;
                    maddubs(u, x) => _mm256_maddubs_epi16;
                    dpbusd(acc, u, x) => $dpbusd;
                    sign8(a, b) => _mm256_sign_epi8;
                }
                #[inline(always)]
                unsafe fn srl32(a: __m256i, k: i32) -> __m256i {
                    _mm256_srl_epi32(a, _mm_cvtsi32_si128(k))
                }
                #[inline(always)]
                unsafe fn sll32(a: __m256i, k: i32) -> __m256i {
                    _mm256_sll_epi32(a, _mm_cvtsi32_si128(k))
                }
                #[inline(always)]
                unsafe fn sra32(a: __m256i, k: i32) -> __m256i {
                    _mm256_sra_epi32(a, _mm_cvtsi32_si128(k))
                }
                #[inline(always)]
                unsafe fn srl16(a: __m256i, k: i32) -> __m256i {
                    _mm256_srl_epi16(a, _mm_cvtsi32_si128(k))
                }
                #[inline(always)]
                unsafe fn sll16(a: __m256i, k: i32) -> __m256i {
                    _mm256_sll_epi16(a, _mm_cvtsi32_si128(k))
                }
                #[inline(always)]
                unsafe fn dup16(a: __m256i) -> __m256i {
                    _mm256_blend_epi16::<0b1010_1010>(a, _mm256_slli_epi32::<16>(a))
                }
                #[inline(always)]
                unsafe fn cvt(a: __m256i) -> __m256 {
                    _mm256_cvtepi32_ps(a)
                }
                #[inline(always)]
                unsafe fn mul(a: __m256, b: __m256) -> __m256 {
                    _mm256_mul_ps(a, b)
                }
                #[inline(always)]
                unsafe fn fmadd(a: __m256, b: __m256, c: __m256) -> __m256 {
                    _mm256_fmadd_ps(a, b, c)
                }
                #[inline(always)]
                unsafe fn sub_f(a: __m256, b: __m256) -> __m256 {
                    _mm256_sub_ps(a, b)
                }
                #[inline(always)]
                unsafe fn store(v: __m256, p: *mut f32) {
                    _mm256_storeu_ps(p, v)
                }
            }
        };
    }
    ymm!(Y, _mm256_dpbusd_epi32, false);
    ymm!(V, _mm256_dpbusd_avx_epi32, true);

    /// Two 256-bit halves as one 512-bit register.
    #[inline(always)]
    unsafe fn join(lo: __m256i, hi: __m256i) -> __m512i {
        _mm512_inserti64x4::<1>(_mm512_castsi256_si512(lo), hi)
    }
    /// Two 128-bit halves as one 256-bit register.
    #[inline(always)]
    unsafe fn join128(p: *const u8, stride: usize) -> __m256i {
        let lo = _mm_loadu_si128(p as *const __m128i);
        let hi = _mm_loadu_si128(p.add(stride) as *const __m128i);
        _mm256_inserti128_si256::<1>(_mm256_castsi128_si256(lo), hi)
    }

    impl Regs for Z {
        type I = __m512i;
        type F = __m512;
        // Far enough to cover the memory's latency at the rate eight tokens
        // consume sixteen rows, into L2: the requests in flight are then
        // not bounded by L1's few miss buffers, and lines asked for early
        // do not push the block in use out of L1. 1 KiB into L1 left eight
        // tokens' Q5_0 at 0.55× and Q8_0 at 0.45× their in-cache rate, and
        // four tokens' Q4_K at 0.37× (`kpack_stream_speed`, Zen 4); 32 KiB
        // into L2 gives 0.85×, 0.78× and 0.86×. Small against any L2.
        const AHEAD: usize = 32 << 10;
        #[inline(always)]
        unsafe fn ld(p: *const u8, stride: usize) -> __m512i {
            join(
                _mm256_loadu_si256(p as *const __m256i),
                _mm256_loadu_si256(p.add(stride) as *const __m256i),
            )
        }
        #[inline(always)]
        unsafe fn prefetch(p: *const u8, stride: usize) {
            _mm_prefetch::<_MM_HINT_T1>(p as *const i8);
            _mm_prefetch::<_MM_HINT_T1>(p.add(stride) as *const i8);
        }
        #[inline(always)]
        unsafe fn ld_i16(p: *const u8, stride: usize) -> __m512i {
            _mm512_cvtepi8_epi16(join128(p, stride))
        }
        #[inline(always)]
        unsafe fn ld_f16(p: *const u8, stride: usize) -> __m512 {
            _mm512_cvtph_ps(join128(p, stride))
        }
        #[inline(always)]
        unsafe fn bcast(x: *const i8, at: usize) -> __m512i {
            _mm512_set1_epi32((x.add(at) as *const i32).read_unaligned())
        }
        #[inline(always)]
        unsafe fn splat(v: i32) -> __m512i {
            _mm512_set1_epi32(v)
        }
        #[inline(always)]
        unsafe fn splat8(v: i8) -> __m512i {
            _mm512_set1_epi8(v)
        }
        #[inline(always)]
        unsafe fn splat16(v: i16) -> __m512i {
            _mm512_set1_epi16(v)
        }
        #[inline(always)]
        unsafe fn splat_f(v: f32) -> __m512 {
            _mm512_set1_ps(v)
        }
        #[inline(always)]
        unsafe fn zero_f() -> __m512 {
            _mm512_setzero_ps()
        }
        ops! {
            and(a, b) => _mm512_and_si512;
            or(a, b) => _mm512_or_si512;
            xor(a, b) => _mm512_xor_si512;
            add32(a, b) => _mm512_add_epi32;
            sub32(a, b) => _mm512_sub_epi32;
            add16(a, b) => _mm512_add_epi16;
            mullo32(a, b) => _mm512_mullo_epi32;
            madd16(a, b) => _mm512_madd_epi16;
            maddubs(u, x) => _mm512_maddubs_epi16;
            dpbusd(acc, u, x) => _mm512_dpbusd_epi32;
        }
        #[inline(always)]
        unsafe fn sign8(a: __m512i, b: __m512i) -> __m512i {
            let kept = _mm512_maskz_mov_epi8(_mm512_test_epi8_mask(b, b), a);
            _mm512_mask_sub_epi8(kept, _mm512_movepi8_mask(b), _mm512_setzero_si512(), a)
        }
        #[inline(always)]
        unsafe fn srl32(a: __m512i, k: i32) -> __m512i {
            _mm512_srl_epi32(a, _mm_cvtsi32_si128(k))
        }
        #[inline(always)]
        unsafe fn sll32(a: __m512i, k: i32) -> __m512i {
            _mm512_sll_epi32(a, _mm_cvtsi32_si128(k))
        }
        #[inline(always)]
        unsafe fn sra32(a: __m512i, k: i32) -> __m512i {
            _mm512_sra_epi32(a, _mm_cvtsi32_si128(k))
        }
        #[inline(always)]
        unsafe fn srl16(a: __m512i, k: i32) -> __m512i {
            _mm512_srl_epi16(a, _mm_cvtsi32_si128(k))
        }
        #[inline(always)]
        unsafe fn sll16(a: __m512i, k: i32) -> __m512i {
            _mm512_sll_epi16(a, _mm_cvtsi32_si128(k))
        }
        #[inline(always)]
        unsafe fn dup16(a: __m512i) -> __m512i {
            _mm512_mask_blend_epi16(0xAAAA_AAAA, a, _mm512_slli_epi32::<16>(a))
        }
        #[inline(always)]
        unsafe fn cvt(a: __m512i) -> __m512 {
            _mm512_cvtepi32_ps(a)
        }
        #[inline(always)]
        unsafe fn mul(a: __m512, b: __m512) -> __m512 {
            _mm512_mul_ps(a, b)
        }
        #[inline(always)]
        unsafe fn fmadd(a: __m512, b: __m512, c: __m512) -> __m512 {
            _mm512_fmadd_ps(a, b, c)
        }
        #[inline(always)]
        unsafe fn sub_f(a: __m512, b: __m512) -> __m512 {
            _mm512_sub_ps(a, b)
        }
        #[inline(always)]
        unsafe fn store(v: __m512, p: *mut f32) {
            _mm512_storeu_ps(p, v)
        }
    }

    /// `$body` for `$t` = 0, 1, … `$n − 1` (`$n` ≤ 8, a constant), written
    /// out: a loop over eight tokens' bodies is too long for the compiler to
    /// unroll, and rolled it keeps every token's pointers on the stack.
    macro_rules! unrolled {
        ($n:expr, $t:ident, $body:block) => {{
            const { assert!($n <= 8) };
            unrolled!(@ $n, $t, $body, 0 1 2 3 4 5 6 7)
        }};
        (@ $n:expr, $t:ident, $body:block, $($i:literal)*) => {{$(
            if $i < $n {
                let $t: usize = $i;
                $body
            }
        )*}};
    }

    /// Add the products of `u` and `x` to `p`: with VNNI one `vpdpbusd`
    /// into 32-bit lanes, else a `vpmaddubsw` pair sum added as i16 (exact
    /// while a caller adds at most 8 steps of u ≤ 15, 4 of u ≤ 31 or 2 of u ≤ 63, with
    /// |x| ≤ 128, before [`scaled`]).
    #[inline(always)]
    unsafe fn step<R: Regs, const VNNI: bool>(p: R::I, u: R::I, x: R::I) -> R::I {
        if VNNI {
            R::dpbusd(p, u, x)
        } else {
            R::add16(p, R::maddubs(u, x))
        }
    }
    /// The first `n` of [`step`]'s partial sums added up.
    #[inline(always)]
    unsafe fn sum<R: Regs, const VNNI: bool>(p: [R::I; 4], n: usize) -> R::I {
        let mut s = p[0];
        for v in &p[1..n] {
            s = if VNNI {
                R::add32(s, *v)
            } else {
                R::add16(s, *v)
            };
        }
        s
    }
    /// `p` (from [`step`]) times each lane's scale `sc`, as 32-bit lanes.
    #[inline(always)]
    unsafe fn scaled<R: Regs, const VNNI: bool>(p: R::I, sc: R::I) -> R::I {
        if VNNI {
            R::mullo32(p, sc)
        } else {
            R::madd16(p, R::dup16(sc))
        }
    }
    /// Byte `k` of every lane.
    #[inline(always)]
    unsafe fn byte<R: Regs>(v: R::I, k: usize) -> R::I {
        R::and(R::srl32(v, 8 * k as i32), R::splat(0xFF))
    }
    /// The activations' sums over sub-blocks `2j, 2j+1` (i16 pair) in every lane.
    #[inline(always)]
    unsafe fn bsum_pair<R: Regs>(x: &BlockQ8K, j: usize) -> R::I {
        R::bcast(x.bsums.as_ptr() as *const i8, 4 * j)
    }
    #[inline(always)]
    unsafe fn store<R: Regs, const N: usize>(acc: [R::F; N], macc: [R::F; N], out: Out) {
        for t in 0..N {
            R::store(R::sub_f(acc[t], macc[t]), out.ptr.add(t * out.stride));
        }
    }

    /// Q4_K (and Q5_K, with `Q5`: a fifth bit per quant): per 32-element
    /// sub-block `j` one scale and one minimum.
    #[inline(always)]
    unsafe fn q4k<R: Regs, const N: usize, const VNNI: bool, const Q5: bool, const X: bool>(
        g: *const u8,
        stride: usize,
        blocks: usize,
        xs: [&[BlockQ8K]; N],
        out: Out,
    ) {
        let mut acc = [R::zero_f(); N];
        let mut macc = [R::zero_f(); N];
        let lo4 = R::splat8(0x0F);
        for b in 0..blocks {
            let bytes = match (X, Q5) {
                (true, _) => Q4_K_EXPANDED,
                (_, true) => 1408,
                _ => 1152,
            };
            let blk = g.add(b * bytes);
            let qs = blk.add(if Q5 { 384 } else { 128 });
            let xb: [&BlockQ8K; N] = std::array::from_fn(|t| xs[t].get_unchecked(b));
            let xq: [*const i8; N] = std::array::from_fn(|t| xb[t].qs.as_ptr());
            // The 6-bit scales and minimums, four to a lane's word.
            let (w0, w1, w2) = (
                R::ld(blk.add(32), stride),
                R::ld(blk.add(64), stride),
                R::ld(blk.add(96), stride),
            );
            let m6 = R::splat8(0x3F);
            let top = R::splat8(0x30);
            let sc_lo = R::and(w0, m6);
            let m_lo = R::and(w1, m6);
            let sc_hi = R::or(R::and(w2, lo4), R::and(R::srl32(w0, 2), top));
            let m_hi = R::or(R::and(R::srl32(w2, 4), lo4), R::and(R::srl32(w1, 2), top));
            let mut s: [R::I; N] = [R::splat(0); N];
            for c in 0..4 {
                ahead::<R>(out, blk, bytes, stride, c, 4);
                let (sc0, sc1) = if c < 2 {
                    (byte::<R>(sc_lo, 2 * c), byte::<R>(sc_lo, 2 * c + 1))
                } else {
                    (byte::<R>(sc_hi, 2 * c - 4), byte::<R>(sc_hi, 2 * c - 3))
                };
                // Independent sums (chains) per token: few tokens need
                // several to keep the multipliers busy.
                let chains = (4 / N).max(1);
                // Q5_K's fifth bits: bit 2c (low nibbles) and 2c+1 (high)
                // of each byte of `qh` word k, moved to bit 4.
                let fifth = |v: R::I, bit: i32| {
                    let v = if bit <= 4 {
                        R::sll16(v, 4 - bit)
                    } else {
                        R::srl16(v, bit - 4)
                    };
                    R::and(v, R::splat8(0x10))
                };
                // As i16 sums, eight steps of u ≤ 15 stay in range, four of
                // u ≤ 31: Q5_K without VNNI scales each half on its own.
                let halves = if Q5 && !VNNI { 2 } else { 1 };
                if (R::SIXTEEN || (!VNNI && !Q5)) && N == 8 {
                    // Eight tokens in sixteen registers (AVX-VNNI, and AVX2,
                    // whose i16 sums hold the eight steps of u ≤ 15): the low
                    // nibbles for every token, then the high ones, so that
                    // each unpacked word serves eight tokens with eight sums
                    // live (both at once would need sixteen). AVX2, 8-sequence
                    // decode of the 1.5B model: 1.11× two four-token passes
                    // (Xeon, `hanlin bench -b 8`).
                    for nib in 0..2 {
                        let sc = if nib == 0 { sc0 } else { sc1 };
                        let mut p = [R::splat(0); N];
                        // An opaque bound keeps this a loop: unrolled, LLVM
                        // hoisted the activations' loads into scalar
                        // registers and the stack, and each broadcast became
                        // a move and a shuffle.
                        for k in 0..std::hint::black_box(8) {
                            let mut u = if X {
                                R::ld(qs.add((8 * c + k) * 64 + 32 * nib), stride)
                            } else {
                                let w = R::ld(qs.add((8 * c + k) * 32), stride);
                                let w = if nib == 0 { w } else { R::srl16(w, 4) };
                                R::and(w, lo4)
                            };
                            if Q5 {
                                let qh = R::ld(blk.add(128 + 32 * k), stride);
                                u = R::or(u, fifth(qh, (2 * c + nib) as i32));
                            }
                            for t in 0..N {
                                let x = R::bcast(xq[t], 64 * c + 32 * nib + 4 * k);
                                p[t] = step::<R, VNNI>(p[t], u, x);
                            }
                        }
                        for t in 0..N {
                            s[t] = R::add32(s[t], scaled::<R, VNNI>(p[t], sc));
                        }
                    }
                    continue;
                }
                for half in 0..halves {
                    let mut plo = [[R::splat(0); 4]; N];
                    let mut phi = [[R::splat(0); 4]; N];
                    for k in (8 * half / halves)..(8 * (half + 1) / halves) {
                        let (mut lo, mut hi) = if X {
                            let w = qs.add((8 * c + k) * 64);
                            (R::ld(w, stride), R::ld(w.add(32), stride))
                        } else {
                            let w = R::ld(qs.add((8 * c + k) * 32), stride);
                            (R::and(w, lo4), R::and(R::srl16(w, 4), lo4))
                        };
                        if Q5 {
                            let qh = R::ld(blk.add(128 + 32 * k), stride);
                            lo = R::or(lo, fifth(qh, 2 * c as i32));
                            hi = R::or(hi, fifth(qh, 2 * c as i32 + 1));
                        }
                        let i = k % chains;
                        for t in 0..N {
                            let xl = R::bcast(xq[t], 64 * c + 4 * k);
                            let xh = R::bcast(xq[t], 64 * c + 32 + 4 * k);
                            plo[t][i] = step::<R, VNNI>(plo[t][i], lo, xl);
                            phi[t][i] = step::<R, VNNI>(phi[t][i], hi, xh);
                        }
                    }
                    // Integer sums: their order does not matter.
                    for t in 0..N {
                        let a = scaled::<R, VNNI>(sum::<R, VNNI>(plo[t], chains), sc0);
                        let h = scaled::<R, VNNI>(sum::<R, VNNI>(phi[t], chains), sc1);
                        s[t] = R::add32(s[t], R::add32(a, h));
                    }
                }
            }
            // M = Σ m_j · S_j (S_j: the activations' sum over sub-block j):
            // the minimums as i16 pairs (m_j, m_j+2) per lane, two pairs in
            // each of `m_lo` (j = 0..4) and `m_hi` (4..8), against the pairs
            // of `pair_sums` (S0 S2, S1 S3, S4 S6, S5 S7): four `vpmaddwd`
            // a token where one per minimum took eight.
            let even = R::splat(0x00FF_00FF);
            let mins = [
                R::and(m_lo, even),
                R::and(R::srl32(m_lo, 8), even),
                R::and(m_hi, even),
                R::and(R::srl32(m_hi, 8), even),
            ];
            let d = R::ld_f16(blk, stride);
            let dmin = R::ld_f16(blk.add(16), stride);
            for t in 0..N {
                let sums = xb[t].pair_sums.as_ptr() as *const i8;
                let mut m = R::madd16(mins[0], R::bcast(sums, 0));
                for (i, mn) in mins.iter().enumerate().skip(1) {
                    m = R::add32(m, R::madd16(*mn, R::bcast(sums, 4 * i)));
                }
                let xd = R::splat_f(xb[t].d);
                let dd = R::mul(d, xd);
                acc[t] = R::fmadd(dd, R::cvt(s[t]), acc[t]);
                let dm = R::mul(dmin, xd);
                macc[t] = R::fmadd(dm, R::cvt(m), macc[t]);
            }
        }
        store::<R, N>(acc, macc, out)
    }

    /// Q6_K: per 16-element sub-block one signed scale; quants offset by 32.
    #[inline(always)]
    unsafe fn q6k<R: Regs, const N: usize, const VNNI: bool, const X: bool>(
        g: *const u8,
        stride: usize,
        blocks: usize,
        xs: [&[BlockQ8K]; N],
        out: Out,
    ) {
        let mut acc = [R::zero_f(); N];
        let lo4 = R::splat8(0x0F);
        let top = R::splat8(0x30);
        for b in 0..blocks {
            let bytes = if X { Q6_K_EXPANDED } else { 1680 };
            let blk = g.add(b * bytes);
            let xb: [&BlockQ8K; N] = std::array::from_fn(|t| xs[t].get_unchecked(b));
            let xq: [*const i8; N] = std::array::from_fn(|t| xb[t].qs.as_ptr());
            // Scales of sub-blocks 2p and 2p+1 as an i16 pair per lane.
            let pair = |p: usize| R::ld_i16(blk.add(16 + 16 * p), stride);
            // Sub-block j's scale from its pair, as a 32-bit lane.
            let scale = |j: usize| {
                let pr = pair(j / 2);
                if j.is_multiple_of(2) {
                    R::sra32(R::sll32(pr, 16), 16)
                } else {
                    R::sra32(pr, 16)
                }
            };
            let mut s: [R::I; N] = [R::splat(0); N];
            // The four quants of lane word `i` of a unit (16 bytes apart in
            // the row: sub-blocks 2i + q of half h).
            let unpack = |qh: R::I, qa: R::I, qb: R::I, i: usize| match i {
                0 => R::or(R::and(qa, lo4), R::and(R::sll16(qh, 4), top)),
                1 => R::or(R::and(qb, lo4), R::and(R::sll16(qh, 2), top)),
                2 => R::or(R::and(R::srl16(qa, 4), lo4), R::and(qh, top)),
                _ => R::or(R::and(R::srl16(qb, 4), lo4), R::and(R::srl16(qh, 2), top)),
            };
            // Expanded: value `i` of unit (h, q, mm) is a word of bytes.
            let value = |qh: R::I, qa: R::I, qb: R::I, h: usize, q: usize, mm: usize, i: usize| {
                if X {
                    R::ld(blk.add(144 + 128 * (8 * h + 4 * q + mm) + 32 * i), stride)
                } else {
                    unpack(qh, qa, qb, i)
                }
            };
            let unit = |h: usize, q: usize, mm: usize| {
                let u = blk.add(144 + 96 * (8 * h + 4 * q + mm));
                (
                    R::ld(u, stride),
                    R::ld(u.add(32), stride),
                    R::ld(u.add(64), stride),
                )
            };
            if !VNNI && N > 1 {
                // Without VNNI, for several tokens, each step's i16 pair
                // sums are scaled at once (`vpmaddwd` into 32-bit sums): the
                // same integers as summing two steps first, with N
                // accumulators live instead of 4·N (AVX2 has sixteen
                // registers). One token keeps the two-step form (faster).
                for h in 0..2 {
                    for q in 0..2 {
                        ahead::<R>(out, blk, bytes, stride, 2 * h + q, 4);
                        let scp: [R::I; 4] =
                            std::array::from_fn(|i| R::dup16(scale(8 * h + 2 * i + q)));
                        for mm in 0..4 {
                            let l0 = 16 * q + 4 * mm;
                            let (qh, qa, qb) = unit(h, q, mm);
                            for (i, scp) in scp.iter().enumerate() {
                                let v = value(qh, qa, qb, h, q, mm, i);
                                for t in 0..N {
                                    let x = R::bcast(xq[t], 128 * h + 32 * i + l0);
                                    let m = R::madd16(R::maddubs(v, x), *scp);
                                    s[t] = R::add32(s[t], m);
                                }
                            }
                        }
                    }
                }
            } else if VNNI && R::SIXTEEN && N > 1 {
                // AVX-VNNI's sixteen registers cannot keep four values'
                // sums for every token: one value at a time over the four
                // units (each unit's words are loaded again from L1, and
                // each value is still unpacked once).
                for h in 0..2 {
                    for q in 0..2 {
                        ahead::<R>(out, blk, bytes, stride, 2 * h + q, 4);
                        for i in 0..4 {
                            let sc = scale(8 * h + 2 * i + q);
                            let mut p = [R::splat(0); N];
                            for mm in 0..4 {
                                let l0 = 16 * q + 4 * mm;
                                let (qh, qa, qb) = unit(h, q, mm);
                                let v = value(qh, qa, qb, h, q, mm, i);
                                for t in 0..N {
                                    let x = R::bcast(xq[t], 128 * h + 32 * i + l0);
                                    p[t] = R::dpbusd(p[t], v, x);
                                }
                            }
                            for t in 0..N {
                                s[t] = R::add32(s[t], R::mullo32(p[t], sc));
                            }
                        }
                    }
                }
            } else {
                for h in 0..2 {
                    for q in 0..2 {
                        ahead::<R>(out, blk, bytes, stride, 2 * h + q, 4);
                        // Sub-blocks 8h + 2i + q for i in 0..4.
                        let sc: [R::I; 4] = std::array::from_fn(|i| scale(8 * h + 2 * i + q));
                        let mut p = [[R::splat(0); N]; 4];
                        for mm in 0..4 {
                            let l0 = 16 * q + 4 * mm;
                            let (qh, qa, qb) = unit(h, q, mm);
                            for i in 0..4 {
                                let v = value(qh, qa, qb, h, q, mm, i);
                                for t in 0..N {
                                    let x = R::bcast(xq[t], 128 * h + 32 * i + l0);
                                    p[i][t] = step::<R, VNNI>(p[i][t], v, x);
                                }
                            }
                            // i16 sums hold two steps of 6-bit quants.
                            if mm == 3 || (!VNNI && mm == 1) {
                                for i in 0..4 {
                                    for t in 0..N {
                                        let v = scaled::<R, VNNI>(p[i][t], sc[i]);
                                        s[t] = R::add32(s[t], v);
                                        p[i][t] = R::splat(0);
                                    }
                                }
                            }
                        }
                    }
                }
            }
            let d = R::ld_f16(blk, stride);
            for t in 0..N {
                // The offset of 32: S −= 32 · Σ sc_j · bsum_j.
                let mut a = R::splat(0);
                for j in 0..8 {
                    a = R::add32(a, R::madd16(pair(j), bsum_pair::<R>(xb[t], j)));
                }
                let si = R::sub32(s[t], R::sll32(a, 5));
                let dd = R::mul(d, R::splat_f(xb[t].d));
                acc[t] = R::fmadd(dd, R::cvt(si), acc[t]);
            }
        }
        store::<R, N>(acc, [R::zero_f(); N], out)
    }

    /// Q8_0: signed quants, one scale per 32 columns.
    #[inline(always)]
    unsafe fn q8_0<R: Regs, const N: usize, const VNNI: bool>(
        g: *const u8,
        stride: usize,
        blocks: usize,
        xs: [&[BlockQ8]; N],
        out: Out,
    ) {
        let mut acc = [R::zero_f(); N];
        let chains = (4 / N).max(1);
        for b in 0..blocks {
            let blk = g.add(b * 272);
            let xb: [&BlockQ8; N] = std::array::from_fn(|t| xs[t].get_unchecked(b));
            let xq: [*const i8; N] = std::array::from_fn(|t| xb[t].qs.as_ptr());
            // VNNI multiplies u = q + 128 and takes 128·Σx off at the start;
            // AVX2 multiplies |q| by x with q's sign.
            let mut p = [[R::splat(0); 4]; N];
            if VNNI {
                for t in 0..N {
                    p[t][0] = R::splat(-128 * xb[t].isum);
                }
            }
            for w in 0..8 {
                if w % 2 == 0 {
                    ahead::<R>(out, blk, 272, stride, w / 2, 4);
                }
                let q = R::ld(blk.add(16 + 32 * w), stride);
                let i = w % chains;
                if VNNI {
                    let u = R::xor(q, R::splat8(-128));
                    for t in 0..N {
                        p[t][i] = R::dpbusd(p[t][i], u, R::bcast(xq[t], 4 * w));
                    }
                } else {
                    let aq = R::sign8(q, q);
                    for t in 0..N {
                        let x = R::sign8(R::bcast(xq[t], 4 * w), q);
                        let d = R::madd16(R::maddubs(aq, x), R::splat16(1));
                        p[t][i] = R::add32(p[t][i], d);
                    }
                }
            }
            let d = R::ld_f16(blk, stride);
            for t in 0..N {
                let isum = sum::<R, true>(p[t], chains);
                let dd = R::mul(d, R::splat_f(xb[t].d));
                acc[t] = R::fmadd(dd, R::cvt(isum), acc[t]);
            }
        }
        store::<R, N>(acc, [R::zero_f(); N], out)
    }

    /// Q5_0: 5-bit quants offset by 16, one scale per 32 columns.
    #[inline(always)]
    unsafe fn q5_0<R: Regs, const N: usize, const VNNI: bool>(
        g: *const u8,
        stride: usize,
        blocks: usize,
        xs: [&[BlockQ8]; N],
        out: Out,
    ) {
        let mut acc = [R::zero_f(); N];
        let lo4 = R::splat8(0x0F);
        let bit4 = R::splat8(0x10);
        for b in 0..blocks {
            let blk = g.add(b * 176);
            let xb: [&BlockQ8; N] = std::array::from_fn(|t| xs[t].get_unchecked(b));
            let xq: [*const i8; N] = std::array::from_fn(|t| xb[t].qs.as_ptr());
            let qh = R::ld(blk.add(16), stride);
            // The fifth bits of nibble word `w` (low nibbles 0..4, high
            // 4..8): bit `w` of every byte of the transposed `qh`, moved to
            // bit 4 (a 16-bit shift by at most 4 brings no bit of the
            // neighbouring byte to bit 4).
            let high = |w: usize| {
                let v = match w {
                    0..4 => R::sll16(qh, 4 - w as i32),
                    4 => qh,
                    _ => R::srl16(qh, w as i32 - 4),
                };
                R::and(v, bit4)
            };
            let d = R::ld_f16(blk, stride);
            if !VNNI {
                // AVX2's sixteen registers cannot hold the unpacking
                // constants and two i16 sums per token of several tokens:
                // the block's quants are unpacked once (the low halves,
                // then the high), and the tokens take them one after the
                // other with two sums each (four steps of u ≤ 31 fit).
                let mut u = [R::splat(0); 8];
                for w in 0..4 {
                    ahead::<R>(out, blk, 176, stride, w, 4);
                    let q = R::ld(blk.add(48 + 32 * w), stride);
                    u[w] = R::or(R::and(q, lo4), high(w));
                    u[4 + w] = R::or(R::and(R::srl16(q, 4), lo4), high(w + 4));
                }
                let ones = R::splat16(1);
                unrolled!(N, t, {
                    let x = xq[t];
                    let mut lo = R::maddubs(u[0], R::bcast(x, 0));
                    let mut hi = R::maddubs(u[4], R::bcast(x, 16));
                    for w in 1..4 {
                        lo = R::add16(lo, R::maddubs(u[w], R::bcast(x, 4 * w)));
                        hi = R::add16(hi, R::maddubs(u[4 + w], R::bcast(x, 16 + 4 * w)));
                    }
                    let (a, h) = (R::madd16(lo, ones), R::madd16(hi, ones));
                    let off = R::splat(16 * xb[t].isum);
                    let isum = R::sub32(R::add32(a, h), off);
                    let dd = R::mul(d, R::splat_f(xb[t].d));
                    acc[t] = R::fmadd(dd, R::cvt(isum), acc[t]);
                });
                continue;
            }
            // One 32-bit sum per token, starting from the offset's −16·Σx
            // (two, low and high halves, where the registers have room).
            let h = if N <= 4 { 1 } else { 0 };
            let mut p: [[R::I; 2]; N] =
                std::array::from_fn(|t| [R::splat(-16 * xb[t].isum), R::splat(0)]);
            for w in 0..4 {
                ahead::<R>(out, blk, 176, stride, w, 4);
                let q = R::ld(blk.add(48 + 32 * w), stride);
                let lo = R::or(R::and(q, lo4), high(w));
                let hi = R::or(R::and(R::srl16(q, 4), lo4), high(w + 4));
                for t in 0..N {
                    p[t][0] = R::dpbusd(p[t][0], lo, R::bcast(xq[t], 4 * w));
                    p[t][h] = R::dpbusd(p[t][h], hi, R::bcast(xq[t], 16 + 4 * w));
                }
            }
            for t in 0..N {
                let isum = if h == 1 {
                    R::add32(p[t][0], p[t][1])
                } else {
                    p[t][0]
                };
                let dd = R::mul(d, R::splat_f(xb[t].d));
                acc[t] = R::fmadd(dd, R::cvt(isum), acc[t]);
            }
        }
        store::<R, N>(acc, [R::zero_f(); N], out)
    }

    /// Q4_1: 4-bit quants with a scale and a minimum per 32 columns:
    /// `d·xd·Σu·x + m·s` (`s` the activation block's `xd·Σx`).
    #[inline(always)]
    unsafe fn q4_1<R: Regs, const N: usize, const VNNI: bool>(
        g: *const u8,
        stride: usize,
        blocks: usize,
        xs: [&[BlockQ8]; N],
        out: Out,
    ) {
        let mut acc = [R::zero_f(); N];
        let lo4 = R::splat8(0x0F);
        for b in 0..blocks {
            let blk = g.add(b * 160);
            let xb: [&BlockQ8; N] = std::array::from_fn(|t| xs[t].get_unchecked(b));
            let xq: [*const i8; N] = std::array::from_fn(|t| xb[t].qs.as_ptr());
            // One sum per token: 32-bit with VNNI; i16 without (eight
            // steps of u ≤ 15 fit).
            let mut p = [R::splat(0); N];
            for w in 0..4 {
                ahead::<R>(out, blk, 160, stride, w, 4);
                let q = R::ld(blk.add(32 + 32 * w), stride);
                let lo = R::and(q, lo4);
                let hi = R::and(R::srl16(q, 4), lo4);
                for t in 0..N {
                    p[t] = step::<R, VNNI>(p[t], lo, R::bcast(xq[t], 4 * w));
                    p[t] = step::<R, VNNI>(p[t], hi, R::bcast(xq[t], 16 + 4 * w));
                }
            }
            let d = R::ld_f16(blk, stride);
            let m = R::ld_f16(blk.add(16), stride);
            for t in 0..N {
                let isum = if VNNI {
                    p[t]
                } else {
                    R::madd16(p[t], R::splat16(1))
                };
                let dd = R::mul(d, R::splat_f(xb[t].d));
                acc[t] = R::fmadd(dd, R::cvt(isum), acc[t]);
                acc[t] = R::fmadd(m, R::splat_f(xb[t].s), acc[t]);
            }
        }
        store::<R, N>(acc, [R::zero_f(); N], out)
    }

    // Safety (all of them): handed out by `kernel_k`/`kernel_32` only after
    // `simd_level()` found the features they are compiled for; the rest as
    // `Gemm` says.
    macro_rules! wrappers {
        ($feat:literal, $regs:ty, $vnni:literal, $($name:ident = $inner:ident($b:ty $(, $c:literal)*)),*) => {$(
            #[target_feature(enable = $feat)]
            pub(super) unsafe fn $name<const N: usize>(
                g: *const u8,
                stride: usize,
                blocks: usize,
                xs: [&[$b]; N],
                out: Out,
            ) {
                $inner::<$regs, N, $vnni $(, $c)*>(g, stride, blocks, xs, out)
            }
        )*};
    }
    wrappers!(
        "avx2,fma,f16c",
        Y,
        false,
        q4k_avx2 = q4k(BlockQ8K, false, false),
        q5k_avx2 = q4k(BlockQ8K, true, false),
        q6k_avx2 = q6k(BlockQ8K, false),
        q4kx_avx2 = q4k(BlockQ8K, false, true),
        q6kx_avx2 = q6k(BlockQ8K, true),
        q8_0_avx2 = q8_0(BlockQ8),
        q5_0_avx2 = q5_0(BlockQ8),
        q4_1_avx2 = q4_1(BlockQ8)
    );
    wrappers!(
        "avx2,fma,f16c,avx512f,avx512vnni,avx512vl,avx512bw",
        Y,
        true,
        q4k_vnni = q4k(BlockQ8K, false, false),
        q5k_vnni = q4k(BlockQ8K, true, false),
        q6k_vnni = q6k(BlockQ8K, false),
        q4kx_vnni = q4k(BlockQ8K, false, true),
        q6kx_vnni = q6k(BlockQ8K, true),
        q8_0_vnni = q8_0(BlockQ8),
        q5_0_vnni = q5_0(BlockQ8),
        q4_1_vnni = q4_1(BlockQ8)
    );
    wrappers!(
        "avx2,fma,f16c,avxvnni",
        V,
        true,
        q4k_avxvnni = q4k(BlockQ8K, false, false),
        q5k_avxvnni = q4k(BlockQ8K, true, false),
        q6k_avxvnni = q6k(BlockQ8K, false),
        q4kx_avxvnni = q4k(BlockQ8K, false, true),
        q6kx_avxvnni = q6k(BlockQ8K, true),
        q8_0_avxvnni = q8_0(BlockQ8),
        q5_0_avxvnni = q5_0(BlockQ8),
        q4_1_avxvnni = q4_1(BlockQ8)
    );
    wrappers!(
        "avx2,fma,f16c,avx512f,avx512vnni,avx512vl,avx512bw",
        Z,
        true,
        q4k_zmm = q4k(BlockQ8K, false, false),
        q5k_zmm = q4k(BlockQ8K, true, false),
        q6k_zmm = q6k(BlockQ8K, false),
        q4kx_zmm = q4k(BlockQ8K, false, true),
        q6kx_zmm = q6k(BlockQ8K, true),
        q8_0_zmm = q8_0(BlockQ8),
        q5_0_zmm = q5_0(BlockQ8),
        q4_1_zmm = q4_1(BlockQ8)
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant;
    use rand::SeedableRng;

    fn quantized(cols: usize, n_tok: usize) -> Vec<Vec<BlockQ8K>> {
        (0..n_tok)
            .map(|t| {
                let x: Vec<f32> = (0..cols)
                    .map(|i| (((i * 13 + t * 7) % 31) as f32 - 15.0) * 0.07)
                    .collect();
                let mut v = Vec::new();
                quant::quantize_q8k(&x, &mut v);
                v
            })
            .collect()
    }

    /// `n` tokens (1–4 or 8) of `xs` through `ks` into `out` (`n` × 16).
    ///
    /// Safety: `g` holds `blocks` packed blocks per group (two groups,
    /// `stride` apart, for a wide set), every token as many.
    unsafe fn run<B>(
        ks: &Kernels<B>,
        g: *const u8,
        stride: usize,
        blocks: usize,
        xs: &[&[B]],
        out: &mut [[f32; 16]],
    ) {
        let o = Out {
            ptr: out.as_mut_ptr() as *mut f32,
            stride: 16,
            // Asking ahead must not change a bit.
            stream: true,
        };
        let x = |t: usize| xs[t];
        match xs.len() {
            1 => (ks.g1)(g, stride, blocks, [x(0)], o),
            2 => (ks.g2)(g, stride, blocks, std::array::from_fn(x), o),
            3 => (ks.g3)(g, stride, blocks, std::array::from_fn(x), o),
            4 => (ks.g4)(g, stride, blocks, std::array::from_fn(x), o),
            _ => (ks.g8.expect("an eight-token kernel"))(
                g,
                stride,
                blocks,
                std::array::from_fn(x),
                o,
            ),
        }
    }

    /// `cargo test --release -p hanlin-kernels -- --ignored --nocapture kpack_stream_speed`
    ///
    /// A decode batch's kernels on weights that come from memory (96 MiB,
    /// read once, as a decode step reads a model), against the same
    /// kernels on one cache-resident pair of groups: how much of the
    /// kernel's own rate the asking ahead ([`Out::stream`]) keeps.
    #[test]
    #[ignore = "a measurement, not a check"]
    fn kpack_stream_speed() {
        // The 1.5B model's width for the K formats, the 0.5B model's (which
        // no K format divides) for the others.
        for ty in [GgmlType::Q4_K, GgmlType::Q6_K] {
            let Some(k) = kernel_k(ty) else { return };
            stream(ty, k, 1536, quantized(1536, 8));
        }
        for ty in [GgmlType::Q5_0, GgmlType::Q8_0] {
            let Some(k) = kernel_32(ty) else { return };
            stream(ty, k, 896, quantized_32(896, 8));
        }

        fn stream<B: Sync>(ty: GgmlType, k: Kernel<B>, cols: usize, xq: Vec<Vec<B>>) {
            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
            let mut pair = crate::dot::tests::random_rows(ty, 16, cols, &mut rng);
            pack(ty, &mut pair, 16, cols);
            let copies = (96 << 20) / pair.len();
            // The model's weights sit in 2 MiB pages (`GgufFile::open`
            // asks for them), and so do these: in 4 KiB pages two threads
            // read no faster than one (Zen 4: 24–32 GB/s of 52.8).
            let in_huge_pages = |bytes: Vec<u8>| {
                let mut m = memmap2::MmapMut::map_anon(bytes.len()).expect("an anonymous mapping");
                #[cfg(target_os = "linux")]
                let _ = m.advise(memmap2::Advice::HugePage);
                m.copy_from_slice(&bytes);
                m
            };
            let big = in_huge_pages(pair.repeat(copies));
            let big2 = in_huge_pages(pair.repeat(copies));
            let xs: Vec<&[B]> = xq.iter().map(|x| &x[..]).collect();
            let stride = 8 * ty.row_bytes(cols);
            let most = if k.wide.unwrap_or(k.narrow).g8.is_some() {
                8
            } else {
                4
            };
            for tokens in [1, 2, 3, 4, 8].into_iter().filter(|&t| t <= most) {
                // The kernels `matmul` takes for this many tokens.
                let (ks, groups) = crate::matmul::kernels_for(&k, tokens, true);
                // One pass over `big`'s groups, or over its first group again
                // and again (in cache).
                let sweep = |big: &[u8], from_memory: bool| {
                    let mut res = [[0f32; 16]; 8];
                    for i in 0..copies * (2 / groups) {
                        let at = if from_memory { i * groups * stride } else { 0 };
                        // SAFETY: `big` holds `2 * copies` packed groups.
                        unsafe {
                            run(
                                &ks,
                                big.as_ptr().add(at),
                                stride,
                                cols / ty.block_size(),
                                &xs[..tokens],
                                &mut res,
                            )
                        };
                    }
                };
                // Several passes a measurement: one pass of one token is a
                // few milliseconds, too short for a core that was idle to
                // reach its clock (two threads of one token read 25–35 of
                // Zen 4's 52.8 GB/s in one pass, 43 in eight).
                const PASSES: usize = 8;
                let macs = (PASSES * copies * 16 * tokens * cols) as f64;
                let rate = |from_memory: bool| {
                    sweep(&big[..], from_memory);
                    let t0 = std::time::Instant::now();
                    for _ in 0..PASSES {
                        sweep(&big[..], from_memory);
                    }
                    macs / t0.elapsed().as_secs_f64() / 1e9
                };
                // Two threads, each streaming its own copy, as a decode
                // step's two threads share the memory; timed from when both
                // have made a pass.
                let both = || {
                    let start = std::sync::Barrier::new(3);
                    let mut t0 = std::time::Instant::now();
                    std::thread::scope(|s| {
                        for big in [&big[..], &big2[..]] {
                            let (sweep, start) = (&sweep, &start);
                            s.spawn(move || {
                                sweep(big, true);
                                start.wait();
                                for _ in 0..PASSES {
                                    sweep(big, true);
                                }
                            });
                        }
                        start.wait();
                        t0 = std::time::Instant::now();
                    });
                    2.0 * macs / t0.elapsed().as_secs_f64() / 1e9
                };
                let rates: Vec<[f64; 3]> =
                    (0..3).map(|_| [rate(false), rate(true), both()]).collect();
                let median = |i: usize| {
                    let mut v: Vec<f64> = rates.iter().map(|r| r[i]).collect();
                    v.sort_by(f64::total_cmp);
                    v[1]
                };
                let (cache, memory, two) = (median(0), median(1), median(2));
                let gb = |r: f64| r / tokens as f64 * ty.row_bytes(cols) as f64 / cols as f64;
                println!(
                "{ty}, {tokens} tokens: GMAC/s in cache {cache:.1}, from memory {memory:.1} ({:.2}×, {:.1} GB/s), two threads {two:.1} ({:.2}× twice in cache, {:.1} GB/s)",
                memory / cache,
                gb(memory),
                two / cache / 2.0,
                gb(two)
            );
            }
        }
    }

    /// `cargo test --release -p hanlin-kernels -- --ignored --nocapture kpack_speed`
    #[test]
    #[ignore = "a measurement, not a check"]
    fn kpack_speed() {
        let cols = 1536;
        for ty in [GgmlType::Q4_K, GgmlType::Q6_K] {
            let Some(k) = kernel_k(ty) else { return };
            speed(ty, k, cols, quantized(cols, 8));
        }
        for ty in [GgmlType::Q5_0, GgmlType::Q8_0, GgmlType::Q4_1] {
            let Some(k) = kernel_32(ty) else { return };
            speed(ty, k, cols, quantized_32(cols, 8));
        }

        fn speed<B>(ty: GgmlType, k: Kernel<B>, cols: usize, xq: Vec<Vec<B>>) {
            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
            let m = crate::dot::tests::random_rows(ty, 16, cols, &mut rng);
            let mut p = m.clone();
            let reps = 2000;
            let t0 = std::time::Instant::now();
            for _ in 0..reps {
                p.copy_from_slice(&m);
                pack(ty, &mut p, 16, cols);
            }
            let pack_s = t0.elapsed().as_secs_f64() / reps as f64;
            let xs: Vec<&[B]> = xq.iter().map(|x| &x[..]).collect();
            let mut res = [[0f32; 16]; 8];
            let stride = 8 * ty.row_bytes(cols);
            let n = 50_000;
            let mut rate = |ks: &Kernels<B>, groups: usize, tokens: usize| {
                if tokens == 8 && ks.g8.is_none() {
                    return f64::NAN;
                }
                let t0 = std::time::Instant::now();
                for _ in 0..n {
                    for g in (0..2).step_by(groups) {
                        // SAFETY: `p` holds two groups of packed blocks,
                        // `res` eight tokens of sixteen rows.
                        unsafe {
                            run(
                                ks,
                                p.as_ptr().add(g * stride),
                                stride,
                                cols / ty.block_size(),
                                &xs[..tokens],
                                &mut res,
                            )
                        };
                    }
                }
                (n * 16 * tokens * cols) as f64 / t0.elapsed().as_secs_f64() / 1e9
            };
            let narrow = [1, 4, 8].map(|t| rate(&k.narrow, 1, t));
            let wide = k.wide.map(|w| [1, 4, 8].map(|t| rate(&w, 2, t)));
            println!(
                "{ty}: GMAC/s for 1, 4, 8 tokens: narrow {narrow:.1?}, wide {wide:.1?}; packing 16 rows {:.2} µs ({})",
                pack_s * 1e6,
                res[0][0]
            );
        }
    }

    fn quantized_32(cols: usize, n_tok: usize) -> Vec<Vec<BlockQ8>> {
        (0..n_tok)
            .map(|t| {
                let x: Vec<f32> = (0..cols)
                    .map(|i| (((i * 11 + t * 5) % 29) as f32 - 14.0) * 0.05)
                    .collect();
                let mut v = Vec::new();
                quant::quantize_q8(&x, &mut v);
                v
            })
            .collect()
    }

    /// Every bit of a Q5_0 `qh` lands where the kernels look for it, and
    /// comes back.
    #[test]
    fn qh_transpose_moves_each_bit_to_its_word() {
        for w in 0..8 {
            for i in 0..4 {
                let qh = 1u32 << (4 * w + i);
                assert_eq!(qh_transpose(qh), 1 << (8 * i + w), "word {w} byte {i}");
                assert_eq!(qh_untranspose(qh_transpose(qh)), qh);
            }
        }
        let all = 0xDEAD_BEEF;
        assert_eq!(qh_untranspose(qh_transpose(all)), all);
    }

    /// Packing many matrices at once, cut into pieces of one or more row
    /// groups on several threads, gives what packing each whole gives.
    #[test]
    fn pack_all_packs_each_matrix_as_pack_does() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(6);
        let shapes = [
            (GgmlType::Q4_K, 16),
            (GgmlType::Q5_0, 24),
            (GgmlType::Q8_0, 40),
        ];
        let mats: Vec<(GgmlType, usize, Vec<u8>)> = shapes
            .iter()
            .map(|&(ty, rows)| {
                let m = crate::dot::tests::random_rows(ty, rows, 512, &mut rng);
                (ty, rows, m)
            })
            .collect();
        let whole: Vec<Vec<u8>> = mats
            .iter()
            .map(|(ty, rows, m)| {
                let mut p = m.clone();
                pack(*ty, &mut p, *rows, 512);
                p
            })
            .collect();
        for piece in [1, 3 * 8 * GgmlType::Q8_0.row_bytes(512), 4 << 20] {
            let mut got: Vec<Vec<u8>> = mats.iter().map(|(_, _, m)| m.clone()).collect();
            let jobs = got
                .iter_mut()
                .zip(&mats)
                .map(|(data, &(ty, rows, _))| PackJob {
                    ty,
                    data,
                    rows,
                    cols: 512,
                })
                .collect();
            pack_in_pieces(jobs, piece);
            assert_eq!(got, whole, "pieces of {piece} bytes");
        }
    }

    #[test]
    fn unpack_undoes_pack() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        for ty in [
            GgmlType::Q4_K,
            GgmlType::Q5_K,
            GgmlType::Q6_K,
            GgmlType::Q5_0,
            GgmlType::Q8_0,
            GgmlType::Q4_1,
        ] {
            let m = crate::dot::tests::random_rows(ty, 16, 512, &mut rng);
            let mut p = m.clone();
            pack(ty, &mut p, 16, 512);
            assert_ne!(p, m, "{ty}: packing moves bytes");
            let rb = ty.row_bytes(512);
            let mut row = vec![0u8; rb];
            for r in 0..16 {
                let g = &p[r / 8 * 8 * rb..(r / 8 + 1) * 8 * rb];
                unpack_row(ty, g, r % 8, 512, &mut row);
                assert_eq!(row, m[r * rb..(r + 1) * rb], "{ty} row {r}");
            }
            unpack(ty, &mut p, 16, 512);
            assert_eq!(p, m, "{ty}");
        }
    }

    /// Every kernel, narrow and wide, for one to four (and eight) tokens,
    /// gives the portable dot's bits (the K formats), or one another's (the
    /// 32-element formats, close to the portable dot).
    #[test]
    fn kernels_give_the_scalar_bits() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(4);
        let cols = 768;
        for ty in [GgmlType::Q4_K, GgmlType::Q5_K, GgmlType::Q6_K] {
            let Some(k) = kernel_k(ty) else { return };
            let xq = quantized(cols, 8);
            let want = |rows: &[Vec<u8>]| -> Vec<Vec<f32>> {
                xq.iter()
                    .map(|x| {
                        rows.iter()
                            .map(|r| crate::dot::scalar_q8k(ty, r, x))
                            .collect()
                    })
                    .collect()
            };
            // The expanded groups' kernels give the same bits as the packed
            // ones (and so as the portable dot).
            check(ty, k, kernel_k_expanded(ty), cols, &xq, &mut rng, want);
        }
        for ty in [GgmlType::Q5_0, GgmlType::Q8_0, GgmlType::Q4_1] {
            let Some(k) = kernel_32(ty) else { return };
            let xq = quantized_32(cols, 8);
            // The narrow one-token kernel is the reference; it is close to
            // the portable dot.
            let mut first = None;
            let want = |rows: &[Vec<u8>]| -> Vec<Vec<f32>> {
                let mut p: Vec<u8> = rows.concat();
                pack(ty, &mut p, 16, cols);
                let stride = 8 * ty.row_bytes(cols);
                let v: Vec<Vec<f32>> = xq
                    .iter()
                    .map(|x| {
                        let mut o = [[0f32; 16]; 1];
                        let mut row = Vec::new();
                        for g in 0..2 {
                            // SAFETY: `p` holds two groups, `o` one token.
                            unsafe {
                                run(
                                    &k.narrow,
                                    p.as_ptr().add(g * stride),
                                    stride,
                                    cols / 32,
                                    &[&x[..]],
                                    &mut o,
                                )
                            };
                            row.extend_from_slice(&o[0][..8]);
                        }
                        row
                    })
                    .collect();
                for (x, got) in xq.iter().zip(&v) {
                    for (r, g) in rows.iter().zip(got) {
                        let s = crate::dot::scalar_q8(ty, r, x);
                        assert!(
                            (s - g).abs() <= 1e-4 * (1.0 + s.abs()),
                            "{ty}: {g} vs portable {s}"
                        );
                    }
                }
                first.get_or_insert(v).clone()
            };
            check(ty, k, None, cols, &xq, &mut rng, want);
        }

        fn check<B>(
            ty: GgmlType,
            k: Kernel<B>,
            expanded: Option<Kernel<B>>,
            cols: usize,
            xq: &[Vec<B>],
            rng: &mut rand_chacha::ChaCha8Rng,
            mut want: impl FnMut(&[Vec<u8>]) -> Vec<Vec<f32>>,
        ) {
            let rows: Vec<Vec<u8>> = (0..16)
                .map(|_| crate::dot::tests::random_row(ty, cols, rng))
                .collect();
            let want = want(&rows);
            let mut p: Vec<u8> = rows.concat();
            pack(ty, &mut p, 16, cols);
            let blocks = cols / ty.block_size();
            let mut runs = vec![(k, p.clone(), 8 * ty.row_bytes(cols), "")];
            if let Some(x) = expanded {
                let mut e = Vec::new();
                expand(ty, &p, &mut e);
                let stride = blocks * expanded_block_bytes(ty).expect("it expands");
                assert_eq!(e.len(), 2 * stride);
                runs.push((x, e, stride, " expanded"));
            }
            for (k, p, stride, form) in runs {
                let sets = [Some((k.narrow, 1)), k.wide.map(|w| (w, 2))];
                for (ks, groups) in sets.into_iter().flatten() {
                    for n in [1, 2, 3, 4, 8] {
                        if n == 8 && ks.g8.is_none() {
                            continue;
                        }
                        let xs: Vec<&[B]> = xq[..n].iter().map(|x| &x[..]).collect();
                        let mut got = [[f32::NAN; 16]; 8];
                        for g in (0..2).step_by(groups) {
                            let mut o = [[f32::NAN; 16]; 8];
                            // SAFETY: `p` holds two groups of `blocks` packed
                            // blocks, `o` eight tokens of sixteen rows.
                            unsafe {
                                run(&ks, p.as_ptr().add(g * stride), stride, blocks, &xs, &mut o)
                            };
                            for t in 0..n {
                                got[t][8 * g..8 * g + 8 * groups]
                                    .copy_from_slice(&o[t][..8 * groups]);
                            }
                        }
                        for t in 0..n {
                            for r in 0..16 {
                                assert_eq!(
                                    got[t][r].to_bits(),
                                    want[t][r].to_bits(),
                                    "{ty}{form} {} N={n} token {t} row {r}: {} vs {}",
                                    if groups == 2 { "wide" } else { "narrow" },
                                    got[t][r],
                                    want[t][r]
                                );
                            }
                        }
                    }
                }
            }
        }
    }
}
