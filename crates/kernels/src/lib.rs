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

/// A function whose body is compiled three times: as written, with AVX2
/// and FMA enabled, and with AVX-512 F/BW/VL as well, the copy taken being
/// the one `dot::simd_level` allows. The same Rust each time, and Rust
/// never fuses a multiply and an add on its own (an explicit `mul_add` is
/// one instruction in the SIMD copies and libm's exact `fmaf` in the
/// first), so all give the same bits; the later ones just vectorize wider.
macro_rules! simd_copies {
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
                #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
                unsafe fn avx512($($a: $t),*) $(-> $r)? {
                    body($($a),*)
                }
                match crate::dot::simd_level() {
                    // SAFETY: `simd_level` found AVX-512 F/BW/VL (with
                    // VNNI), AVX2, FMA and F16C.
                    crate::dot::SimdLevel::Avx2Vnni => return unsafe { avx512($($a),*) },
                    // SAFETY: `simd_level` found AVX2, FMA and F16C.
                    crate::dot::SimdLevel::Avx2 => return unsafe { avx2($($a),*) },
                    crate::dot::SimdLevel::Scalar => {}
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
