//! Dense layers for the models that are not chat models (Whisper, image
//! pipelines): a linear layer whose weights are converted at load from
//! f32 to Q8_0 (rows interleaved eight at a time where the CPU has a
//! kernel for it) and go through the same quantized [`matmul`] as the
//! chat models, plus the f32 norms and activations those models use.

use crate::kpack;
use crate::matmul::{matmul, Activations, QMat};
use crate::ops;
use crate::pool::ThreadPool;
use crate::quant::quantize_row_q8_0;
use hanlin_formats::GgmlType;

/// A linear layer: Q8_0 weights (`rows × cols`, `cols` a multiple of 32)
/// and an f32 bias (empty for none).
pub struct Linear {
    w: Vec<u8>,
    pub rows: usize,
    /// Columns after padding to a multiple of 32: inputs are rows of this
    /// many values, zero past the original width.
    pub cols: usize,
    packed: bool,
    b: Vec<f32>,
}

impl Linear {
    /// From f32 weights `rows × cols0`; columns are padded with zeros to a
    /// multiple of 32.
    pub fn new(w: &[f32], rows: usize, cols0: usize, b: Vec<f32>) -> Self {
        assert_eq!(w.len(), rows * cols0, "Linear::new: weight size");
        let cols = cols0.div_ceil(32) * 32;
        let mut data = Vec::with_capacity(GgmlType::Q8_0.row_bytes(cols) * rows);
        let mut row = vec![0f32; cols];
        for r in 0..rows {
            row[..cols0].copy_from_slice(&w[r * cols0..(r + 1) * cols0]);
            data.extend(quantize_row_q8_0(&row));
        }
        let packed = rows.is_multiple_of(8) && kpack::packs(GgmlType::Q8_0);
        if packed {
            kpack::pack(GgmlType::Q8_0, &mut data, rows, cols);
        }
        Self {
            w: data,
            rows,
            cols,
            packed,
            b,
        }
    }

    pub fn mat(&self) -> QMat<'_> {
        QMat {
            ty: GgmlType::Q8_0,
            data: &self.w,
            rows: self.rows,
            cols: self.cols,
            packed: self.packed,
        }
    }

    /// Bytes held (weights and bias).
    pub fn bytes(&self) -> usize {
        self.w.len() + 4 * self.b.len()
    }

    /// `out = x·Wᵀ + b` for the rows of `x` (`cols` each).
    pub fn apply(&self, pool: &ThreadPool, x: &[f32], out: &mut Vec<f32>) {
        let n = x.len() / self.cols;
        out.clear();
        out.resize(n * self.rows, 0.0);
        self.apply_into(pool, x, out);
    }

    /// As [`Linear::apply`], into `out` (`rows` values per row of `x`).
    pub fn apply_into(&self, pool: &ThreadPool, x: &[f32], out: &mut [f32]) {
        let n = x.len() / self.cols;
        matmul(pool, &self.mat(), &Activations::new(x, self.cols), out);
        if !self.b.is_empty() {
            for row in out[..n * self.rows].chunks_exact_mut(self.rows) {
                ops::add_inplace(row, &self.b);
            }
        }
    }
}

impl Linear {
    /// `out = x·Wᵀ + b` for rows already quantized to Q8 blocks
    /// (`cols / 32` blocks per row).
    pub fn apply_q8(&self, pool: &ThreadPool, x: Vec<crate::quant::BlockQ8>, out: &mut [f32]) {
        let a = Activations::from_q8(x, self.cols);
        let n = a.n_tok;
        matmul(pool, &self.mat(), &a, out);
        if !self.b.is_empty() {
            for row in out[..n * self.rows].chunks_exact_mut(self.rows) {
                ops::add_inplace(row, &self.b);
            }
        }
    }
}

/// Layer norm of each `w.len()`-wide row of `x` in place (after adding the
/// matching row of `y`, when given).
pub fn layer_norm(x: &mut [f32], y: Option<&[f32]>, w: &[f32], b: &[f32], eps: f32) {
    let h = w.len();
    for (i, row) in x.chunks_exact_mut(h).enumerate() {
        if let Some(y) = y {
            ops::add_inplace(row, &y[i * h..(i + 1) * h]);
        }
        let mean = row.iter().sum::<f32>() / h as f32;
        let var = row.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / h as f32;
        let inv = 1.0 / (var + eps).sqrt();
        for ((r, w), b) in row.iter_mut().zip(w).zip(b) {
            *r = (*r - mean) * inv * w + b;
        }
    }
}

/// GELU with the exact error function, as BERT, Whisper and diffusion
/// models use it.
pub fn gelu_erf(x: f32) -> f32 {
    0.5 * x * (1.0 + libm::erff(x * std::f32::consts::FRAC_1_SQRT_2))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn linear_matches_f32_product_with_padding_and_bias() {
        let (rows, cols0) = (16, 40);
        let w: Vec<f32> = (0..rows * cols0)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 64.0)
            .collect();
        let b: Vec<f32> = (0..rows).map(|r| r as f32 / 8.0).collect();
        let lin = Linear::new(&w, rows, cols0, b.clone());
        assert_eq!(lin.cols, 64);
        let n = 3;
        let mut x = vec![0f32; n * lin.cols];
        for t in 0..n {
            for c in 0..cols0 {
                x[t * lin.cols + c] = ((t * 7 + c * 3) % 13) as f32 / 6.0 - 1.0;
            }
        }
        let pool = ThreadPool::new(2);
        let mut out = Vec::new();
        lin.apply(&pool, &x, &mut out);
        for t in 0..n {
            for r in 0..rows {
                let exact: f32 = (0..cols0)
                    .map(|c| w[r * cols0 + c] * x[t * lin.cols + c])
                    .sum::<f32>()
                    + b[r];
                let got = out[t * rows + r];
                assert!(
                    (got - exact).abs() < 0.05,
                    "row {r} token {t}: {got} vs {exact}"
                );
            }
        }
    }
}
