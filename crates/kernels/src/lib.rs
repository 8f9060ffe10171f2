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

pub mod attn;
pub mod dot;
pub mod kpack;
pub mod linear;
pub mod matmul;
pub mod ops;
pub mod pool;
pub mod quant;

pub use matmul::{matmul, Activations, QMat};
pub use pool::ThreadPool;
