//! Hanlin's CPU kernels: everything the forward pass computes with.
//!
//! - [`quant`]: ggml block formats, dequantization, activation quantization.
//! - [`dot`]: integer dot products, scalar reference + AVX2, chosen at run time.
//! - [`kpack`]: weights interleaved eight rows at a time (at load, or per
//!   matmul for a prefill) and the kernels that multiply them.
//! - [`matmul`]: batched quantized matrix multiply over the thread pool.
//! - [`linear`]: Q8_0 linear layers, layer norm and GELU for Whisper and
//!   the image pipelines.
//! - [`ops`]: RMSNorm, RoPE, softmax, activations.
//! - [`pool`]: the persistent thread pool.

/// A function whose body is compiled twice: as written, and with AVX2 and
/// FMA enabled, the copy taken when the CPU has them (`dot::simd_level`).
/// The same Rust either way, and Rust never fuses a multiply and an add on
/// its own, so both give the same bits; the second just vectorizes wider.
macro_rules! avx2_copy {
    ($(#[$m:meta])* $vis:vis fn $name:ident($($a:ident: $t:ty),* $(,)?) $(-> $r:ty)? $body:block) => {
        $(#[$m])*
        $vis fn $name($($a: $t),*) $(-> $r)? {
            #[inline(always)]
            fn body($($a: $t),*) $(-> $r)? $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx2,fma,f16c")]
                unsafe fn avx2($($a: $t),*) $(-> $r)? {
                    body($($a),*)
                }
                if crate::dot::simd_level() != crate::dot::SimdLevel::Scalar {
                    // SAFETY: `simd_level` found AVX2, FMA and F16C.
                    return unsafe { avx2($($a),*) };
                }
            }
            body($($a),*)
        }
    };
}

/// Load-time work on a model's matrices (interleaving rows,
/// re-quantizing a draft's) runs on all cores in pieces of about this many
/// bytes of whole rows, so that one large output matrix does not leave the
/// other threads waiting.
pub(crate) const LOAD_PIECE_BYTES: usize = 4 << 20;

/// How many rows of `row_bytes` bytes (at least 1) make a piece of at most
/// `piece` bytes: a multiple of `align`, at least `align`, and no more
/// than the matrix's `rows` rounded up to `align`.
pub(crate) fn rows_per_piece(row_bytes: usize, rows: usize, piece: usize, align: usize) -> usize {
    (piece / row_bytes / align * align).clamp(align, rows.max(align))
}

pub mod attn;
pub mod dot;
pub mod kpack;
pub mod linear;
pub mod matmul;
pub mod ops;
pub mod pool;
pub mod quant;

pub use matmul::{matmul, matmul_many, Activations, QMat};
pub use pool::ThreadPool;
