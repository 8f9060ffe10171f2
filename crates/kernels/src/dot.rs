//! Dot products between one quantized weight row and one quantized activation
//! row. Each format has a portable scalar version (the reference) and, where it
//! matters for the models we ship, an AVX2 version chosen at run time.

#[cfg(test)]
use crate::quant::QK;
use crate::quant::{self, BlockQ8, BlockQ8K};
use hanlin_formats::GgmlType;

/// Dot product of a weight row (raw ggml bytes) with 32-element activation blocks.
pub type DotQ8 = fn(&[u8], &[BlockQ8]) -> f32;
/// Dot product of a weight row (raw ggml bytes) with 256-element activation blocks.
pub type DotQ8K = fn(&[u8], &[BlockQ8K]) -> f32;

/// Which SIMD level the kernels use on this CPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SimdLevel {
    Scalar,
    Avx2,
    /// AVX2 plus AVX-512 (F, BW, VL) with VNNI dot-product instructions.
    Avx2Vnni,
}

/// Detected once; `HANLIN_SIMD=scalar` forces the portable path and
/// `HANLIN_SIMD=avx2` disables VNNI (AVX-512's and AVX-VNNI's alike). A
/// CPU without AVX2, FMA and F16C gets the portable kernels, and one line
/// in the log says so.
pub fn simd_level() -> SimdLevel {
    detected().level
}

/// Whether the packed kernels of the [`SimdLevel::Avx2`] level multiply with
/// AVX-VNNI: `vpdpbusd` on 256-bit registers, VEX-encoded, which Intel's
/// client CPUs since Alder Lake have without AVX-512. Only at that level,
/// on a CPU that has it, and not under `HANLIN_SIMD=avx2` (the plain AVX2
/// path of CPUs without it). `HANLIN_SIMD=avxvnni` chooses this path on an
/// AVX-512 CPU too, to measure it there.
pub fn avx_vnni() -> bool {
    detected().avx_vnni
}

/// The kernels in use, for benchmarks' output: `Avx2Vnni` (AVX-512 VNNI),
/// `Avx2+AvxVnni`, `Avx2` or `Scalar`.
pub fn simd_name() -> String {
    let d = detected();
    match (d.level, d.avx_vnni) {
        (SimdLevel::Avx2, true) => "Avx2+AvxVnni".to_string(),
        (l, _) => format!("{l:?}"),
    }
}

/// What [`choose`] made of this CPU and `HANLIN_SIMD`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Detected {
    level: SimdLevel,
    avx_vnni: bool,
}

fn detected() -> Detected {
    use std::sync::OnceLock;
    static LEVEL: OnceLock<Detected> = OnceLock::new();
    *LEVEL.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        let cpu = Cpu {
            avx2: is_x86_feature_detected!("avx2")
                && is_x86_feature_detected!("fma")
                && is_x86_feature_detected!("f16c"),
            vnni: is_x86_feature_detected!("avx512f")
                && is_x86_feature_detected!("avx512bw")
                && is_x86_feature_detected!("avx512vnni")
                && is_x86_feature_detected!("avx512vl"),
            avx_vnni: is_x86_feature_detected!("avxvnni"),
        };
        #[cfg(not(target_arch = "x86_64"))]
        let cpu = Cpu {
            avx2: false,
            vnni: false,
            avx_vnni: false,
        };
        let (d, notice) = choose(cpu, std::env::var("HANLIN_SIMD").ok().as_deref());
        if let Some(n) = notice {
            tracing::warn!("{n}");
        }
        d
    })
}

/// What a CPU has: AVX2+FMA+F16C, AVX-512 (F, BW, VL) with VNNI, AVX-VNNI.
#[derive(Debug, Clone, Copy)]
struct Cpu {
    avx2: bool,
    vnni: bool,
    avx_vnni: bool,
}

/// The kernels for `cpu` under `HANLIN_SIMD`, and the notice to log when
/// the portable kernels are used because the CPU has nothing faster.
fn choose(cpu: Cpu, forced: Option<&str>) -> (Detected, Option<String>) {
    let at = |level, avx_vnni| Detected { level, avx_vnni };
    match forced {
        Some("scalar") => (at(SimdLevel::Scalar, false), None),
        _ if !cpu.avx2 => (
            at(SimdLevel::Scalar, false),
            Some(format!(
                "this CPU ({}) has no AVX2/FMA/F16C: Hanlin runs its portable kernels, several times slower",
                std::env::consts::ARCH
            )),
        ),
        Some("avx2") => (at(SimdLevel::Avx2, false), None),
        Some("avxvnni") => (at(SimdLevel::Avx2, cpu.avx_vnni), None),
        _ if cpu.vnni => (at(SimdLevel::Avx2Vnni, false), None),
        _ => (at(SimdLevel::Avx2, cpu.avx_vnni), None),
    }
}

macro_rules! scalar32 {
    ($name:ident, $ty:expr) => {
        fn $name(w: &[u8], x: &[BlockQ8]) -> f32 {
            scalar_q8($ty, w, x)
        }
    };
}
macro_rules! scalark {
    ($name:ident, $ty:expr) => {
        fn $name(w: &[u8], x: &[BlockQ8K]) -> f32 {
            scalar_q8k($ty, w, x)
        }
    };
}
scalar32!(scalar_q4_0, GgmlType::Q4_0);
scalar32!(scalar_q4_1, GgmlType::Q4_1);
scalar32!(scalar_q5_0, GgmlType::Q5_0);
scalar32!(scalar_q5_1, GgmlType::Q5_1);
scalar32!(scalar_q8_0, GgmlType::Q8_0);
scalark!(scalar_q2_k, GgmlType::Q2_K);
scalark!(scalar_q3_k, GgmlType::Q3_K);
scalark!(scalar_q4_k, GgmlType::Q4_K);
scalark!(scalar_q5_k, GgmlType::Q5_K);
scalark!(scalar_q6_k, GgmlType::Q6_K);

/// Portable reference for the 32-element formats.
pub fn scalar_q8(ty: GgmlType, w: &[u8], x: &[BlockQ8]) -> f32 {
    let mut acc = 0f32;
    for (b, xb) in w.chunks_exact(ty.type_size()).zip(x) {
        let u = quant::unpack32(ty, b);
        let isum: i32 =
            u.q.iter()
                .zip(&xb.qs)
                .map(|(&a, &b)| a as i32 * b as i32)
                .sum();
        acc += u.d * xb.d * isum as f32 + u.m * xb.s;
    }
    acc
}

/// Portable reference for the K formats.
///
/// Q4_K, Q5_K and Q6_K follow the order every kernel of theirs keeps, so
/// that all of them (scalar, AVX2, AVX-512, one token or packed rows)
/// give the same bits: per block, the exact integer sums
/// `S = Σ sc·Σ u·x − offset·Σ sc·bsum` and `M = Σ m·bsum`, then
/// `acc = fma(d·xd, S, acc)` and `macc = fma(dmin·xd, M, macc)` block by
/// block, and the result `acc − macc`. How a kernel reaches `S` and `M` is
/// its own affair: integers are exact.
pub fn scalar_q8k(ty: GgmlType, w: &[u8], x: &[BlockQ8K]) -> f32 {
    if quant::is_k456(ty) {
        let (mut acc, mut macc) = (0f32, 0f32);
        for (b, xb) in w.chunks_exact(ty.type_size()).zip(x) {
            let quant::KInts { u, s: k } = quant::k_ints(ty, b);
            let (mut s, mut m) = (0i32, 0i32);
            for j in 0..16 {
                let dot: i32 = (16 * j..16 * j + 16)
                    .map(|i| u[i] as i32 * xb.qs[i] as i32)
                    .sum();
                let bs = xb.bsums[j] as i32;
                s += k.sc[j] as i32 * (dot - k.offset * bs);
                m += k.m[j] as i32 * bs;
            }
            acc = (k.d * xb.d).mul_add(s as f32, acc);
            macc = (k.dmin * xb.d).mul_add(m as f32, macc);
        }
        return acc - macc;
    }
    let mut acc = 0f32;
    for (b, xb) in w.chunks_exact(ty.type_size()).zip(x) {
        let u = quant::unpack_k(ty, b);
        let mut s = 0f32;
        for k in 0..16 {
            let isum: i32 = (0..16)
                .map(|l| u.q[16 * k + l] as i32 * xb.qs[16 * k + l] as i32)
                .sum();
            s += u.scale[k] * isum as f32 - u.min[k] * xb.bsums[k] as f32;
        }
        acc += xb.d * s;
    }
    acc
}

/// The fastest available dot product for a 32-element weight format.
pub fn dot_q8(ty: GgmlType) -> Option<DotQ8> {
    let simd = simd_level() != SimdLevel::Scalar;
    #[cfg(target_arch = "x86_64")]
    if simd_level() == SimdLevel::Avx2Vnni {
        return Some(match ty {
            GgmlType::Q4_0 => avx2::q4_0_v,
            GgmlType::Q4_1 => avx2::q4_1_v,
            GgmlType::Q5_0 => avx2::q5_0_v,
            GgmlType::Q5_1 => avx2::q5_1_v,
            GgmlType::Q8_0 => avx2::q8_0_v,
            _ => return None,
        });
    }
    Some(match ty {
        #[cfg(target_arch = "x86_64")]
        GgmlType::Q4_0 if simd => avx2::q4_0,
        #[cfg(target_arch = "x86_64")]
        GgmlType::Q4_1 if simd => avx2::q4_1,
        #[cfg(target_arch = "x86_64")]
        GgmlType::Q5_0 if simd => avx2::q5_0,
        #[cfg(target_arch = "x86_64")]
        GgmlType::Q5_1 if simd => avx2::q5_1,
        #[cfg(target_arch = "x86_64")]
        GgmlType::Q8_0 if simd => avx2::q8_0,
        GgmlType::Q4_0 => scalar_q4_0,
        GgmlType::Q4_1 => scalar_q4_1,
        GgmlType::Q5_0 => scalar_q5_0,
        GgmlType::Q5_1 => scalar_q5_1,
        GgmlType::Q8_0 => scalar_q8_0,
        _ => return None,
    })
}

/// The fastest available dot product for a K weight format.
pub fn dot_q8k(ty: GgmlType) -> Option<DotQ8K> {
    let simd = simd_level() != SimdLevel::Scalar;
    #[cfg(target_arch = "x86_64")]
    if simd_level() == SimdLevel::Avx2Vnni {
        match ty {
            GgmlType::Q4_K => return Some(avx2::q4_k_v),
            GgmlType::Q5_K => return Some(avx2::q5_k_v),
            GgmlType::Q6_K => return Some(avx2::q6_k_v),
            _ => {}
        }
    }
    Some(match ty {
        #[cfg(target_arch = "x86_64")]
        GgmlType::Q4_K if simd => avx2::q4_k,
        #[cfg(target_arch = "x86_64")]
        GgmlType::Q5_K if simd => avx2::q5_k,
        #[cfg(target_arch = "x86_64")]
        GgmlType::Q6_K if simd => avx2::q6_k,
        GgmlType::Q2_K => scalar_q2_k,
        GgmlType::Q3_K => scalar_q3_k,
        GgmlType::Q4_K => scalar_q4_k,
        GgmlType::Q5_K => scalar_q5_k,
        GgmlType::Q6_K => scalar_q6_k,
        _ => return None,
    })
}

/// Four tokens at once (one weight row): `None` where no such kernel exists.
pub type DotQ8x4 = fn(&[u8], [&[BlockQ8]; 4]) -> [f32; 4];
/// Four tokens at once for the K formats.
pub type DotQ8Kx4 = fn(&[u8], [&[BlockQ8K]; 4]) -> [f32; 4];

pub fn dot_q8_x4(ty: GgmlType) -> Option<DotQ8x4> {
    #[cfg(target_arch = "x86_64")]
    if simd_level() == SimdLevel::Avx2Vnni {
        return Some(match ty {
            GgmlType::Q4_0 => avx2::q4_0_v4,
            GgmlType::Q4_1 => avx2::q4_1_v4,
            GgmlType::Q5_0 => avx2::q5_0_v4,
            GgmlType::Q5_1 => avx2::q5_1_v4,
            GgmlType::Q8_0 => avx2::q8_0_v4,
            _ => return None,
        });
    }
    #[cfg(target_arch = "x86_64")]
    if simd_level() == SimdLevel::Avx2 {
        return Some(match ty {
            GgmlType::Q4_0 => avx2::q4_0_x4,
            GgmlType::Q4_1 => avx2::q4_1_x4,
            GgmlType::Q5_0 => avx2::q5_0_x4,
            GgmlType::Q5_1 => avx2::q5_1_x4,
            GgmlType::Q8_0 => avx2::q8_0_x4,
            _ => return None,
        });
    }
    let _ = ty;
    None
}

/// Two weight rows × four tokens (512-bit VNNI only).
pub type DotQ8_2x4 = fn(&[u8], &[u8], [&[BlockQ8]; 4]) -> [[f32; 4]; 2];
/// Two weight rows × eight tokens (512-bit VNNI only): the weights are
/// unpacked once for eight tokens.
pub type DotQ8_2x8 = fn(&[u8], &[u8], [&[BlockQ8]; 8]) -> [[f32; 8]; 2];

/// The two-row kernels (× four and × eight tokens) of a 32-element format.
pub fn dot_q8_2row(ty: GgmlType) -> Option<(DotQ8_2x4, DotQ8_2x8)> {
    #[cfg(target_arch = "x86_64")]
    if simd_level() == SimdLevel::Avx2Vnni {
        return match ty {
            GgmlType::Q4_0 => Some((avx2::q4_0_2x4, avx2::q4_0_2x8)),
            GgmlType::Q4_1 => Some((avx2::q4_1_2x4, avx2::q4_1_2x8)),
            GgmlType::Q5_0 => Some((avx2::q5_0_2x4, avx2::q5_0_2x8)),
            GgmlType::Q5_1 => Some((avx2::q5_1_2x4, avx2::q5_1_2x8)),
            GgmlType::Q8_0 => Some((avx2::q8_0_2x4, avx2::q8_0_2x8)),
            _ => None,
        };
    }
    let _ = ty;
    None
}

pub fn dot_q8k_x4(ty: GgmlType) -> Option<DotQ8Kx4> {
    #[cfg(target_arch = "x86_64")]
    if simd_level() == SimdLevel::Avx2Vnni {
        return Some(match ty {
            GgmlType::Q4_K => avx2::q4_k_v4,
            GgmlType::Q5_K => avx2::q5_k_v4,
            GgmlType::Q6_K => avx2::q6_k_v4,
            _ => return None,
        });
    }
    #[cfg(target_arch = "x86_64")]
    if simd_level() != SimdLevel::Scalar {
        return Some(match ty {
            GgmlType::Q4_K => avx2::q4_k_x4,
            GgmlType::Q5_K => avx2::q5_k_x4,
            GgmlType::Q6_K => avx2::q6_k_x4,
            _ => return None,
        });
    }
    let _ = ty;
    None
}

/// Dot product of an f32 vector with itself-typed float row (F32/F16/BF16).
pub fn dot_float(ty: GgmlType, w: &[u8], x: &[f32]) -> f32 {
    match ty {
        GgmlType::F32 => w
            .chunks_exact(4)
            .zip(x)
            .map(|(c, v)| f32::from_le_bytes([c[0], c[1], c[2], c[3]]) * v)
            .sum(),
        GgmlType::F16 => w
            .chunks_exact(2)
            .zip(x)
            .map(|(c, v)| half::f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32() * v)
            .sum(),
        GgmlType::BF16 => w
            .chunks_exact(2)
            .zip(x)
            .map(|(c, v)| half::bf16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32() * v)
            .sum(),
        _ => {
            let mut tmp = vec![0f32; x.len()];
            quant::dequantize_row(ty, w, &mut tmp);
            tmp.iter().zip(x).map(|(a, b)| a * b).sum()
        }
    }
}

/// 64 bytes, cache-line aligned.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
pub struct Z64(pub [u8; 64]);
/// 16 floats, cache-line aligned.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
pub struct F16x(pub [f32; 16]);

/// Rows of a 32-element weight format unpacked once for the batch kernels:
/// per pair of blocks, the 64 quants as the bytes the VNNI kernel multiplies,
/// both block scales spread over the 16 lanes, and the block minimums.
#[derive(Default)]
pub struct Unpacked {
    pairs: usize,
    u: Vec<Z64>,
    d: Vec<F16x>,
    m: Vec<[f32; 2]>,
}

impl Unpacked {
    pub fn clear(&mut self) {
        self.u.clear();
        self.d.clear();
        self.m.clear();
    }
}

/// Rows `r..r+4` of an [`Unpacked`] (raw bytes alongside) × four tokens.
pub type UnpackedDot4x4 = fn(&Unpacked, usize, [&[u8]; 4], [&[BlockQ8]; 4]) -> [[f32; 4]; 4];
/// Row `r` of an [`Unpacked`] × four tokens.
pub type UnpackedDot1x4 = fn(&Unpacked, usize, &[u8], [&[BlockQ8]; 4]) -> [f32; 4];

/// The batch kernels of one 32-element format: `unpack` appends a weight
/// row to an [`Unpacked`]; `dot4x4(up, r, rows, xs)` dots its rows
/// `r..r+4` (whose raw bytes are `rows`) with four tokens, `dot1x4` one row.
/// Every (row, token) result is bit-identical to [`dot_q8`]'s.
#[derive(Clone, Copy)]
pub struct BatchKernel {
    pub unpack: fn(&[u8], &mut Unpacked),
    pub dot4x4: UnpackedDot4x4,
    pub dot1x4: UnpackedDot1x4,
}

/// The unpack-once batch kernels (512-bit VNNI only).
pub fn batch_kernel(ty: GgmlType) -> Option<BatchKernel> {
    #[cfg(target_arch = "x86_64")]
    if simd_level() == SimdLevel::Avx2Vnni {
        return avx2::batch_kernel(ty);
    }
    let _ = ty;
    None
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    //! Every kernel exists for one token and for four tokens at once: the
    //! four-token form unpacks each weight block once and reuses it, which is
    //! what makes batched prefill compute-efficient.
    use super::*;
    use std::arch::x86_64::*;

    /// How far ahead of the current weight block to prefetch.
    const PREFETCH: usize = 1024;

    #[inline(always)]
    unsafe fn hsum(v: __m256) -> f32 {
        let lo = _mm256_castps256_ps128(v);
        let hi = _mm256_extractf128_ps(v, 1);
        let s = _mm_add_ps(lo, hi);
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_movehdup_ps(s));
        _mm_cvtss_f32(s)
    }

    /// The sum of 8 i32 lanes.
    #[inline(always)]
    unsafe fn hsum_i32(v: __m256i) -> i32 {
        let s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256::<1>(v));
        let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b01_00_11_10>(s));
        let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b10_11_00_01>(s));
        _mm_cvtsi128_si32(s)
    }

    /// u8 x i8 pairwise products summed to 8 i32 lanes.
    #[inline(always)]
    unsafe fn dot_u8i8(a: __m256i, b: __m256i) -> __m256i {
        _mm256_madd_epi16(_mm256_maddubs_epi16(a, b), _mm256_set1_epi16(1))
    }

    /// 16 packed nibbles -> 32 bytes: low nibbles first, then high nibbles.
    #[inline(always)]
    unsafe fn nibbles(p: *const u8) -> __m256i {
        let v = _mm_loadu_si128(p as *const __m128i);
        let m = _mm_set1_epi8(0xF);
        let lo = _mm_and_si128(v, m);
        let hi = _mm_and_si128(_mm_srli_epi16(v, 4), m);
        _mm256_set_m128i(hi, lo)
    }

    /// 32 bits -> 32 bytes of 0xFF where the bit is set.
    #[inline(always)]
    unsafe fn bytes_from_bits(bits: u32) -> __m256i {
        let x = _mm256_set1_epi32(bits as i32);
        let shuf = _mm256_set_epi64x(
            0x0303_0303_0303_0303,
            0x0202_0202_0202_0202,
            0x0101_0101_0101_0101,
            0,
        );
        let b = _mm256_shuffle_epi8(x, shuf);
        let m = _mm256_set1_epi64x(0x7fbf_dfef_f7fb_fdfe);
        _mm256_cmpeq_epi8(_mm256_or_si256(b, m), _mm256_set1_epi64x(-1))
    }

    /// One f16 at `p` (unaligned) to f32 with the F16C instruction.
    #[inline(always)]
    unsafe fn load_f16(p: *const u8) -> f32 {
        let bits = u16::from_le_bytes([*p, *p.add(1)]);
        _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32)))
    }

    #[inline(always)]
    unsafe fn q5_high(p: *const u8) -> __m256i {
        let qh = u32::from_le_bytes(*(p as *const [u8; 4]));
        _mm256_and_si256(bytes_from_bits(qh), _mm256_set1_epi8(0x10))
    }

    /// The 32-element formats. `unpack` gives the block's quants as bytes;
    /// with `SIGNED` they are signed (Q4_0/Q5_0/Q8_0, offsets already
    /// removed) and multiplied through the sign trick, otherwise unsigned
    /// with a per-block minimum at byte `m_at` (Q4_1/Q5_1).
    #[inline(always)]
    unsafe fn q32<const NT: usize, const SIGNED: bool>(
        w: &[u8],
        xs: [&[BlockQ8]; NT],
        size: usize,
        m_at: usize,
        unpack: impl Fn(*const u8) -> __m256i,
    ) -> [f32; NT] {
        let mut acc = [_mm256_setzero_ps(); NT];
        let mut macc = [0f32; NT];
        let n = xs.iter().fold(w.len() / size, |n, x| n.min(x.len()));
        let wp = w.as_ptr();
        for i in 0..n {
            let b = wp.add(i * size);
            // Rows are short; fetch ahead across row ends (prefetches never fault).
            _mm_prefetch::<_MM_HINT_T0>(b.wrapping_add(PREFETCH) as *const i8);
            let d = _mm256_set1_ps(load_f16(b));
            let q = unpack(b);
            let aq = if SIGNED { _mm256_sign_epi8(q, q) } else { q };
            let m = if SIGNED { 0.0 } else { load_f16(b.add(m_at)) };
            for k in 0..NT {
                let xb = xs[k].get_unchecked(i);
                let xv = _mm256_loadu_si256(xb.qs.as_ptr() as *const __m256i);
                let xv = if SIGNED { _mm256_sign_epi8(xv, q) } else { xv };
                let p = _mm256_cvtepi32_ps(dot_u8i8(aq, xv));
                acc[k] = _mm256_fmadd_ps(_mm256_mul_ps(d, _mm256_set1_ps(xb.d)), p, acc[k]);
                if !SIGNED {
                    macc[k] += m * xb.s;
                }
            }
        }
        std::array::from_fn(|k| hsum(acc[k]) + macc[k])
    }

    /// VNNI form of the 32-element formats: weights stay unsigned
    /// (`u = q + OFF`) and the offset is removed inside the integer dot by
    /// starting each of the 8 lanes at `-OFF/8 * sum(x)`. A block minimum at
    /// byte `m_at` (Q4_1/Q5_1) is added through the activation sums.
    #[inline(always)]
    unsafe fn q32v<const NT: usize, const OFF: i32>(
        w: &[u8],
        xs: [&[BlockQ8]; NT],
        size: usize,
        m_at: Option<usize>,
        unpack: impl Fn(*const u8) -> __m256i,
    ) -> [f32; NT] {
        let mut acc = [_mm256_setzero_ps(); NT];
        let mut macc = [0f32; NT];
        let n = xs.iter().fold(w.len() / size, |n, x| n.min(x.len()));
        let wp = w.as_ptr();
        for i in 0..n {
            let b = wp.add(i * size);
            _mm_prefetch::<_MM_HINT_T0>(b.wrapping_add(PREFETCH) as *const i8);
            let d = _mm256_set1_ps(load_f16(b));
            let u = unpack(b);
            let m = m_at.map(|at| load_f16(b.add(at)));
            for k in 0..NT {
                let xb = xs[k].get_unchecked(i);
                let init = if OFF != 0 {
                    _mm256_set1_epi32(-(OFF / 8) * xb.isum)
                } else {
                    _mm256_setzero_si256()
                };
                let xv = _mm256_loadu_si256(xb.qs.as_ptr() as *const __m256i);
                let p = _mm256_cvtepi32_ps(_mm256_dpbusd_epi32(init, u, xv));
                acc[k] = _mm256_fmadd_ps(_mm256_mul_ps(d, _mm256_set1_ps(xb.d)), p, acc[k]);
                if let Some(m) = m {
                    macc[k] += m * xb.s;
                }
            }
        }
        std::array::from_fn(|k| hsum(acc[k]) + macc[k])
    }

    /// The 512-bit VNNI core shared by every batch shape: `R` weight rows ×
    /// `NT` tokens over `pairs` pairs of 32-element blocks. `weights(r, i)`
    /// gives row `r`'s pair `i`: the 64 quants (`u = q + OFF`), both block
    /// scales spread over the 16 lanes, and the two block minimums (Q4_1 and
    /// Q5_1, with `has_min`). Each zmm holds two consecutive blocks, so one
    /// `vpdpbusd` covers 64 products; the weights are shared by the tokens
    /// and the activations by the rows. Every (row, token) result goes
    /// through exactly the same operations whatever `R` and `NT` are, so a
    /// token's logits do not depend on how many others share its batch.
    #[inline(always)]
    unsafe fn q32v_pairs<const R: usize, const NT: usize, const OFF: i32>(
        pairs: usize,
        xs: [&[BlockQ8]; NT],
        has_min: bool,
        weights: impl Fn(usize, usize) -> (__m512i, __m512, [f32; 2]),
    ) -> [[f32; NT]; R] {
        let mut acc = [[_mm512_setzero_ps(); NT]; R];
        let mut macc = [[0f32; NT]; R];
        let hi = 0xFF00u16;
        for i in 0..pairs {
            let mut wv = [_mm512_setzero_si512(); R];
            let mut dv = [_mm512_setzero_ps(); R];
            let mut mins = [[0f32; 2]; R];
            for r in 0..R {
                (wv[r], dv[r], mins[r]) = weights(r, i);
            }
            for k in 0..NT {
                let x0 = xs[k].get_unchecked(2 * i);
                let x1 = xs[k].get_unchecked(2 * i + 1);
                let xv = _mm512_inserti64x4(
                    _mm512_castsi256_si512(_mm256_loadu_si256(x0.qs.as_ptr() as *const __m256i)),
                    _mm256_loadu_si256(x1.qs.as_ptr() as *const __m256i),
                    1,
                );
                let init = if OFF != 0 {
                    _mm512_mask_mov_epi32(
                        _mm512_set1_epi32(-(OFF / 8) * x0.isum),
                        hi,
                        _mm512_set1_epi32(-(OFF / 8) * x1.isum),
                    )
                } else {
                    _mm512_setzero_si512()
                };
                let xd = _mm512_mask_mov_ps(_mm512_set1_ps(x0.d), hi, _mm512_set1_ps(x1.d));
                for r in 0..R {
                    let p = _mm512_cvtepi32_ps(_mm512_dpbusd_epi32(init, wv[r], xv));
                    acc[r][k] = _mm512_fmadd_ps(_mm512_mul_ps(dv[r], xd), p, acc[r][k]);
                    if has_min {
                        macc[r][k] += mins[r][0] * x0.s + mins[r][1] * x1.s;
                    }
                }
            }
        }
        let mut out = [[0f32; NT]; R];
        for r in 0..R {
            for k in 0..NT {
                out[r][k] = _mm512_reduce_add_ps(acc[r][k]) + macc[r][k];
            }
        }
        out
    }

    /// Blocks `n` of the rows and tokens (the smallest count), and an odd
    /// last block added through the 256-bit form (per token the same
    /// operations for any `NT`).
    #[inline(always)]
    unsafe fn q32v_blocks_and_tail<const R: usize, const NT: usize, const OFF: i32>(
        ws: [&[u8]; R],
        xs: [&[BlockQ8]; NT],
        size: usize,
        m_at: Option<usize>,
        unpack: impl Fn(*const u8) -> __m256i,
        body: impl FnOnce(usize) -> [[f32; NT]; R],
    ) -> [[f32; NT]; R] {
        let n = xs.iter().fold(
            ws.iter().fold(usize::MAX, |n, w| n.min(w.len() / size)),
            |n, x| n.min(x.len()),
        );
        let mut out = body(n / 2);
        if n % 2 == 1 {
            let last = n - 1;
            for r in 0..R {
                let tail = &ws[r][last * size..(last + 1) * size];
                let v = q32v::<NT, OFF>(
                    tail,
                    std::array::from_fn(|k| &xs[k][last..last + 1]),
                    size,
                    m_at,
                    &unpack,
                );
                for k in 0..NT {
                    out[r][k] += v[k];
                }
            }
        }
        out
    }

    /// One pair of blocks at `b0` unpacked for [`q32v_pairs`].
    #[inline(always)]
    unsafe fn unpack_pair(
        b0: *const u8,
        size: usize,
        m_at: Option<usize>,
        unpack: &impl Fn(*const u8) -> __m256i,
    ) -> (__m512i, __m512, [f32; 2]) {
        let b1 = b0.add(size);
        let wv = _mm512_inserti64x4(_mm512_castsi256_si512(unpack(b0)), unpack(b1), 1);
        let dv = _mm512_mask_mov_ps(
            _mm512_set1_ps(load_f16(b0)),
            0xFF00,
            _mm512_set1_ps(load_f16(b1)),
        );
        let mins = match m_at {
            Some(at) => [load_f16(b0.add(at)), load_f16(b1.add(at))],
            None => [0.0; 2],
        };
        (wv, dv, mins)
    }

    /// `R` rows × `NT` tokens, unpacking the weights on the fly.
    #[inline(always)]
    unsafe fn q32vz<const R: usize, const NT: usize, const OFF: i32>(
        ws: [&[u8]; R],
        xs: [&[BlockQ8]; NT],
        size: usize,
        m_at: Option<usize>,
        unpack: impl Fn(*const u8) -> __m256i,
    ) -> [[f32; NT]; R] {
        q32v_blocks_and_tail::<R, NT, OFF>(ws, xs, size, m_at, &unpack, |pairs| {
            q32v_pairs::<R, NT, OFF>(pairs, xs, m_at.is_some(), |r, i| {
                let b0 = ws[r].as_ptr().add(2 * i * size);
                _mm_prefetch::<_MM_HINT_T0>(b0.wrapping_add(PREFETCH) as *const i8);
                unpack_pair(b0, size, m_at, &unpack)
            })
        })
    }

    /// Append one weight row to `up`, unpacked exactly as [`q32vz`] unpacks
    /// it on the fly.
    #[inline(always)]
    unsafe fn unpack_row(
        w: &[u8],
        up: &mut Unpacked,
        size: usize,
        m_at: Option<usize>,
        unpack: impl Fn(*const u8) -> __m256i,
    ) {
        let pairs = w.len() / size / 2;
        up.pairs = pairs;
        for i in 0..pairs {
            let (wv, dv, mins) = unpack_pair(w.as_ptr().add(2 * i * size), size, m_at, &unpack);
            let mut z = Z64([0; 64]);
            _mm512_store_si512(z.0.as_mut_ptr() as *mut __m512i, wv);
            up.u.push(z);
            let mut f = F16x([0.0; 16]);
            _mm512_store_ps(f.0.as_mut_ptr(), dv);
            up.d.push(f);
            if m_at.is_some() {
                up.m.push(mins);
            }
        }
    }

    /// [`q32vz`] over rows `r0..r0+R` of `up` (raw bytes `ws`, used only for
    /// an odd last block), without unpacking the weights again.
    #[inline(always)]
    unsafe fn q32vu<const R: usize, const NT: usize, const OFF: i32>(
        up: &Unpacked,
        r0: usize,
        ws: [&[u8]; R],
        xs: [&[BlockQ8]; NT],
        size: usize,
        m_at: Option<usize>,
        unpack: impl Fn(*const u8) -> __m256i,
    ) -> [[f32; NT]; R] {
        q32v_blocks_and_tail::<R, NT, OFF>(ws, xs, size, m_at, &unpack, |pairs| {
            debug_assert_eq!(pairs, up.pairs);
            q32v_pairs::<R, NT, OFF>(pairs, xs, m_at.is_some(), |r, i| {
                let at = (r0 + r) * up.pairs + i;
                let wv = _mm512_load_si512(up.u.get_unchecked(at).0.as_ptr() as *const __m512i);
                let dv = _mm512_load_ps(up.d.get_unchecked(at).0.as_ptr());
                let mins = if m_at.is_some() {
                    *up.m.get_unchecked(at)
                } else {
                    [0.0; 2]
                };
                (wv, dv, mins)
            })
        })
    }

    macro_rules! batch_kernels {
        ($($ty:ident: $unpack:ident, $d44:ident, $d14:ident => $off:literal, $size:literal, $m_at:expr, $u:expr;)*) => {
            $(
                #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vnni,avx512vl,avx512bw")]
                unsafe fn $unpack(w: &[u8], up: &mut Unpacked) {
                    unpack_row(w, up, $size, $m_at, $u)
                }
                #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vnni,avx512vl,avx512bw")]
                unsafe fn $d44(
                    up: &Unpacked, r: usize, ws: [&[u8]; 4], x: [&[BlockQ8]; 4],
                ) -> [[f32; 4]; 4] {
                    let a = q32vu::<4, 2, $off>(up, r, ws, [x[0], x[1]], $size, $m_at, $u);
                    let b = q32vu::<4, 2, $off>(up, r, ws, [x[2], x[3]], $size, $m_at, $u);
                    std::array::from_fn(|i| [a[i][0], a[i][1], b[i][0], b[i][1]])
                }
                #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vnni,avx512vl,avx512bw")]
                unsafe fn $d14(up: &Unpacked, r: usize, w: &[u8], x: [&[BlockQ8]; 4]) -> [f32; 4] {
                    q32vu::<1, 4, $off>(up, r, [w], x, $size, $m_at, $u)[0]
                }
            )*
            pub(super) fn batch_kernel(ty: GgmlType) -> Option<BatchKernel> {
                // SAFETY (all closures below): handed out only when
                // `simd_level()` found AVX-512 F/BW/VL/VNNI at run time.
                match ty {
                    $(GgmlType::$ty => Some(BatchKernel {
                        unpack: |w, up| unsafe { $unpack(w, up) },
                        dot4x4: |up, r, ws, x| unsafe { $d44(up, r, ws, x) },
                        dot1x4: |up, r, w, x| unsafe { $d14(up, r, w, x) },
                    }),)*
                    _ => None,
                }
            }
        };
    }
    batch_kernels! {
        Q4_0: q4_0_unpack, q4_0_u44, q4_0_u14 => 8, 18, None, |b| nibbles(b.add(2));
        Q4_1: q4_1_unpack, q4_1_u44, q4_1_u14 => 0, 20, Some(2), |b| nibbles(b.add(4));
        Q5_0: q5_0_unpack, q5_0_u44, q5_0_u14 => 16, 22, None,
            |b| _mm256_or_si256(nibbles(b.add(6)), q5_high_mask(b.add(2)));
        Q5_1: q5_1_unpack, q5_1_u44, q5_1_u14 => 0, 24, Some(2),
            |b| _mm256_or_si256(nibbles(b.add(8)), q5_high_mask(b.add(4)));
        Q8_0: q8_0_unpack, q8_0_u44, q8_0_u14 => 128, 34, None,
            |b| _mm256_xor_si256(q8_0_u(b), _mm256_set1_epi8(-128));
    }

    /// Q5 high bits from a mask register (AVX-512BW): 0x10 where the bit is set.
    #[inline(always)]
    unsafe fn q5_high_mask(p: *const u8) -> __m256i {
        let qh = u32::from_le_bytes(*(p as *const [u8; 4]));
        _mm256_maskz_mov_epi8(qh, _mm256_set1_epi8(0x10))
    }

    #[inline(always)]
    unsafe fn q4_0_u(b: *const u8) -> __m256i {
        _mm256_sub_epi8(nibbles(b.add(2)), _mm256_set1_epi8(8))
    }
    #[inline(always)]
    unsafe fn q4_1_u(b: *const u8) -> __m256i {
        nibbles(b.add(4))
    }
    #[inline(always)]
    unsafe fn q5_0_u(b: *const u8) -> __m256i {
        // value - 16 as a signed byte: the nibble when the high bit is set,
        // the nibble with the top four bits set (nibble - 16) when it is not.
        let qh = u32::from_le_bytes(*(b.add(2) as *const [u8; 4]));
        let neg = _mm256_andnot_si256(bytes_from_bits(qh), _mm256_set1_epi8(0xF0u8 as i8));
        _mm256_or_si256(nibbles(b.add(6)), neg)
    }
    #[inline(always)]
    unsafe fn q5_1_u(b: *const u8) -> __m256i {
        _mm256_or_si256(nibbles(b.add(8)), q5_high(b.add(4)))
    }
    #[inline(always)]
    unsafe fn q8_0_u(b: *const u8) -> __m256i {
        _mm256_loadu_si256(b.add(2) as *const __m256i)
    }

    /// `_mm256_shuffle_epi8` controls that broadcast i16 lane `k` of a
    /// 128-bit half: bytes `2k, 2k+1` repeated.
    const SCALE_PICK: [i16; 8] = [
        0x0100, 0x0302, 0x0504, 0x0706, 0x0908, 0x0b0a, 0x0d0c, 0x0f0e,
    ];

    /// The 12 packed 6-bit scales and minimums of a Q4_K/Q5_K block, decoded
    /// with word operations instead of a per-sub-block loop: the eight
    /// scales as i16 in both 128-bit halves, and the eight minimums as i16
    /// pairs (each repeated, to multiply the sixteen 16-wide activation sums).
    #[inline(always)]
    unsafe fn k4_scales_mins(p: *const u8) -> (__m256i, __m256i) {
        let u: [u32; 3] =
            std::array::from_fn(|k| u32::from_le_bytes(*(p.add(4 * k) as *const [u8; 4])));
        const LOW6: u32 = 0x3f3f_3f3f;
        const LOW4: u32 = 0x0f0f_0f0f;
        const TOP2: u32 = 0x0303_0303;
        let scales_lo = u[0] & LOW6;
        let scales_hi = (u[2] & LOW4) | (((u[0] >> 6) & TOP2) << 4);
        let mins_lo = u[1] & LOW6;
        let mins_hi = ((u[2] >> 4) & LOW4) | (((u[1] >> 6) & TOP2) << 4);
        let scales = _mm_cvtepu8_epi16(_mm_set_epi32(0, 0, scales_hi as i32, scales_lo as i32));
        let mins = _mm_cvtepu8_epi16(_mm_set_epi32(0, 0, mins_hi as i32, mins_lo as i32));
        let m32 = _mm256_cvtepu16_epi32(mins);
        (
            _mm256_broadcastsi128_si256(scales),
            _mm256_or_si256(m32, _mm256_slli_epi32(m32, 16)),
        )
    }

    /// Sum of 8 i32 lanes per token for one K block: `parts[g]` (quants as
    /// unsigned bytes) × the 32 activations at `32 g` of each token, each
    /// 16-quant half weighted by its i16 scale in `scales[g]`
    /// (`maddubs` then `madd`). `WIDE` (AVX-512BW only) multiplies two
    /// groups per 512-bit instruction and adds the halves at the end; the
    /// integer sums are exact, so both forms give the same lanes.
    #[inline(always)]
    unsafe fn k_block_sums<const NT: usize, const WIDE: bool>(
        parts: &[__m256i; 8],
        scales: &[__m256i; 8],
        xs: &[&[BlockQ8K]; NT],
        i: usize,
    ) -> [__m256i; NT] {
        let mut sumi = [_mm256_setzero_si256(); NT];
        if WIDE {
            let wide = |v: &[__m256i; 8], g: usize| {
                _mm512_inserti64x4(_mm512_castsi256_si512(v[2 * g]), v[2 * g + 1], 1)
            };
            let wq: [__m512i; 4] = std::array::from_fn(|g| wide(parts, g));
            let ws: [__m512i; 4] = std::array::from_fn(|g| wide(scales, g));
            for k in 0..NT {
                let xq = xs[k].get_unchecked(i).qs.as_ptr();
                let mut s512 = _mm512_setzero_si512();
                for g in 0..4 {
                    let xv = _mm512_loadu_si512(xq.add(64 * g) as *const __m512i);
                    let p = _mm512_madd_epi16(_mm512_maddubs_epi16(wq[g], xv), ws[g]);
                    s512 = _mm512_add_epi32(s512, p);
                }
                sumi[k] = _mm256_add_epi32(
                    _mm512_castsi512_si256(s512),
                    _mm512_extracti64x4_epi64::<1>(s512),
                );
            }
        } else {
            for g in 0..8 {
                for k in 0..NT {
                    let xq = xs[k].get_unchecked(i).qs.as_ptr();
                    let xv = _mm256_loadu_si256(xq.add(32 * g) as *const __m256i);
                    let p = _mm256_madd_epi16(_mm256_maddubs_epi16(parts[g], xv), scales[g]);
                    sumi[k] = _mm256_add_epi32(sumi[k], p);
                }
            }
        }
        sumi
    }

    /// The 256 quants of a Q4_K/Q5_K block at `b` as unsigned bytes in
    /// element order, 32 to a register. Group 2j: the low nibbles of bytes
    /// 32j..; group 2j+1: their high nibbles (plus the fifth bits of Q5_K).
    #[inline(always)]
    unsafe fn q45k_parts<const FIVE: bool>(b: *const u8) -> [__m256i; 8] {
        let m4 = _mm256_set1_epi8(0xF);
        let qs = b.add(if FIVE { 48 } else { 16 });
        let hv = if FIVE {
            _mm256_loadu_si256(b.add(16) as *const __m256i)
        } else {
            _mm256_setzero_si256()
        };
        let mut parts = [_mm256_setzero_si256(); 8];
        for j in 0..4 {
            let q = _mm256_loadu_si256(qs.add(32 * j) as *const __m256i);
            let mut lo = _mm256_and_si256(q, m4);
            let mut hi = _mm256_and_si256(_mm256_srli_epi16(q, 4), m4);
            if FIVE {
                let one = _mm256_set1_epi8(1);
                let hl =
                    _mm256_and_si256(_mm256_srl_epi16(hv, _mm_cvtsi32_si128(2 * j as i32)), one);
                let hh = _mm256_and_si256(
                    _mm256_srl_epi16(hv, _mm_cvtsi32_si128(2 * j as i32 + 1)),
                    one,
                );
                lo = _mm256_or_si256(lo, _mm256_slli_epi16(hl, 4));
                hi = _mm256_or_si256(hi, _mm256_slli_epi16(hh, 4));
            }
            parts[2 * j] = lo;
            parts[2 * j + 1] = hi;
        }
        parts
    }

    /// The 256 quants of a Q6_K block at `b` (6 bits, before the offset of
    /// 32) in element order, 32 to a register: group 4h + kq holds quants
    /// 128h + 32kq...
    #[inline(always)]
    unsafe fn q6k_parts(b: *const u8) -> [__m256i; 8] {
        let m4 = _mm256_set1_epi8(0xF);
        let m2 = _mm256_set1_epi8(3);
        let mut parts = [_mm256_setzero_si256(); 8];
        for h in 0..2 {
            let ql = b.add(64 * h);
            let qh = _mm256_loadu_si256(b.add(128 + 32 * h) as *const __m256i);
            let qa = _mm256_loadu_si256(ql as *const __m256i);
            let qb = _mm256_loadu_si256(ql.add(32) as *const __m256i);
            let hbits = |shift: i32| {
                let v = _mm256_srl_epi16(qh, _mm_cvtsi32_si128(shift));
                _mm256_slli_epi16(_mm256_and_si256(v, m2), 4)
            };
            parts[4 * h] = _mm256_or_si256(_mm256_and_si256(qa, m4), hbits(0));
            parts[4 * h + 1] = _mm256_or_si256(_mm256_and_si256(qb, m4), hbits(2));
            parts[4 * h + 2] =
                _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(qa, 4), m4), hbits(4));
            parts[4 * h + 3] =
                _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(qb, 4), m4), hbits(6));
        }
        parts
    }

    /// Q4_K and Q5_K share a layout apart from the high bits.
    #[inline(always)]
    unsafe fn q45k<const NT: usize, const FIVE: bool, const WIDE: bool>(
        w: &[u8],
        xs: [&[BlockQ8K]; NT],
    ) -> [f32; NT] {
        let size = if FIVE { 176 } else { 144 };
        let mut acc = [0f32; NT];
        let mut mins = [0f32; NT];
        let n = xs.iter().fold(w.len() / size, |n, x| n.min(x.len()));
        for i in 0..n {
            let b = w.as_ptr().add(i * size);
            _mm_prefetch::<_MM_HINT_T0>(b.wrapping_add(PREFETCH) as *const i8);
            _mm_prefetch::<_MM_HINT_T0>(b.wrapping_add(PREFETCH + 64) as *const i8);
            let d = load_f16(b);
            let dmin = load_f16(b.add(2));
            let (sc256, m16) = k4_scales_mins(b.add(4));
            let parts = q45k_parts::<FIVE>(b);
            let scales: [__m256i; 8] = std::array::from_fn(|g| {
                _mm256_shuffle_epi8(sc256, _mm256_set1_epi16(SCALE_PICK[g]))
            });
            let sumi = k_block_sums::<NT, WIDE>(&parts, &scales, &xs, i);
            // Minimums: sum(m_j * (bsum_2j + bsum_2j+1)) as 8 lanes of
            // pairwise products (`m16` holds each m twice). Then the block's
            // exact sums into the accumulators, as `scalar_q8k` orders it.
            for k in 0..NT {
                let xb = xs[k].get_unchecked(i);
                let bs = _mm256_loadu_si256(xb.bsums.as_ptr() as *const __m256i);
                let m = hsum_i32(_mm256_madd_epi16(bs, m16));
                acc[k] = (d * xb.d).mul_add(hsum_i32(sumi[k]) as f32, acc[k]);
                mins[k] = (dmin * xb.d).mul_add(m as f32, mins[k]);
            }
        }
        std::array::from_fn(|k| acc[k] - mins[k])
    }

    #[inline(always)]
    unsafe fn q6k<const NT: usize, const WIDE: bool>(w: &[u8], xs: [&[BlockQ8K]; NT]) -> [f32; NT] {
        let mut acc = [0f32; NT];
        let n = xs.iter().fold(w.len() / 210, |n, x| n.min(x.len()));
        let pick2: [__m256i; 4] = std::array::from_fn(|kq| {
            _mm256_set_m128i(
                _mm_set1_epi16(SCALE_PICK[2 * kq + 1]),
                _mm_set1_epi16(SCALE_PICK[2 * kq]),
            )
        });
        for i in 0..n {
            let b = w.as_ptr().add(i * 210);
            for l in 0..4 {
                _mm_prefetch::<_MM_HINT_T0>(b.wrapping_add(PREFETCH + 64 * l) as *const i8);
            }
            let d = load_f16(b.add(208));
            // The 16 scales as i16; each half h of the block uses eight of
            // them, broadcast to both 128-bit lanes for the shuffles below.
            let sc16 = _mm256_cvtepi8_epi16(_mm_loadu_si128(b.add(192) as *const __m128i));
            let halves = [
                _mm256_permute2x128_si256::<0x00>(sc16, sc16),
                _mm256_permute2x128_si256::<0x11>(sc16, sc16),
            ];
            // Group 4h + kq against the activations at the same place; its
            // low lane takes scale 2kq of half h, its high lane 2kq + 1.
            let parts = q6k_parts(b);
            let scales: [__m256i; 8] =
                std::array::from_fn(|g| _mm256_shuffle_epi8(halves[g / 4], pick2[g % 4]));
            let sumi = k_block_sums::<NT, WIDE>(&parts, &scales, &xs, i);
            // The -32 offset of every quant, removed in integers: subtract
            // 32 * sum(scale_k * bsum_k) (8 lanes of pairwise products).
            for k in 0..NT {
                let xb = xs[k].get_unchecked(i);
                let bs = _mm256_loadu_si256(xb.bsums.as_ptr() as *const __m256i);
                let off = _mm256_slli_epi32(_mm256_madd_epi16(bs, sc16), 5);
                let si = hsum_i32(_mm256_sub_epi32(sumi[k], off));
                acc[k] = (d * xb.d).mul_add(si as f32, acc[k]);
            }
        }
        // `- 0.0`: no minimums, as in `scalar_q8k`.
        acc
    }

    macro_rules! kernels {
        ($feat:literal: $($name:ident, $name4:ident => $body:expr, $blk:ty;)*) => {$(
            #[target_feature(enable = $feat)]
            unsafe fn $name(w: &[u8], x: &[$blk]) -> f32 {
                let f = $body;
                f(w, [x])[0]
            }
            #[target_feature(enable = $feat)]
            unsafe fn $name4(w: &[u8], x: [&[$blk]; 4]) -> [f32; 4] {
                let f = $body;
                f(w, x)
            }
        )*};
    }
    kernels! { "avx2,fma,f16c":
        q4_0_i, q4_0_i4 => |w, x| q32::<_, true>(w, x, 18, 0, |b| q4_0_u(b)), BlockQ8;
        q4_1_i, q4_1_i4 => |w, x| q32::<_, false>(w, x, 20, 2, |b| q4_1_u(b)), BlockQ8;
        q5_0_i, q5_0_i4 => |w, x| q32::<_, true>(w, x, 22, 0, |b| q5_0_u(b)), BlockQ8;
        q5_1_i, q5_1_i4 => |w, x| q32::<_, false>(w, x, 24, 2, |b| q5_1_u(b)), BlockQ8;
        q8_0_i, q8_0_i4 => |w, x| q32::<_, true>(w, x, 34, 0, |b| q8_0_u(b)), BlockQ8;
        q4_k_i, q4_k_i4 => |w, x| q45k::<_, false, false>(w, x), BlockQ8K;
        q5_k_i, q5_k_i4 => |w, x| q45k::<_, true, false>(w, x), BlockQ8K;
        q6_k_i, q6_k_i4 => |w, x| q6k::<_, false>(w, x), BlockQ8K;
    }
    kernels! { "avx2,fma,f16c,avx512f,avx512vnni,avx512vl,avx512bw":
        q4_0_vi, q4_0_vi4 => |w, x| q32vz::<1, _, 8>([w], x, 18, None, |b| nibbles(b.add(2)))[0], BlockQ8;
        q4_1_vi, q4_1_vi4 => |w, x| q32vz::<1, _, 0>([w], x, 20, Some(2), |b| nibbles(b.add(4)))[0], BlockQ8;
        q5_0_vi, q5_0_vi4 => |w, x| q32vz::<1, _, 16>(
            [w], x, 22, None, |b| _mm256_or_si256(nibbles(b.add(6)), q5_high_mask(b.add(2)))
        )[0], BlockQ8;
        q5_1_vi, q5_1_vi4 => |w, x| q32vz::<1, _, 0>(
            [w], x, 24, Some(2), |b| _mm256_or_si256(nibbles(b.add(8)), q5_high_mask(b.add(4)))
        )[0], BlockQ8;
        q8_0_vi, q8_0_vi4 => |w, x| q32vz::<1, _, 128>(
            [w], x, 34, None, |b| _mm256_xor_si256(q8_0_u(b), _mm256_set1_epi8(-128))
        )[0], BlockQ8;
        q4_k_vi, q4_k_vi4 => |w, x| q45k::<_, false, true>(w, x), BlockQ8K;
        q5_k_vi, q5_k_vi4 => |w, x| q45k::<_, true, true>(w, x), BlockQ8K;
        q6_k_vi, q6_k_vi4 => |w, x| q6k::<_, true>(w, x), BlockQ8K;
    }

    macro_rules! kernels_2row {
        ($($name:ident, $name8:ident, $safe:ident, $safe8:ident => $off:literal, $size:literal, $m_at:expr, $unpack:expr;)*) => {$(
            #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vnni,avx512vl,avx512bw")]
            unsafe fn $name(w0: &[u8], w1: &[u8], x: [&[BlockQ8]; 4]) -> [[f32; 4]; 2] {
                q32vz::<2, 4, $off>([w0, w1], x, $size, $m_at, $unpack)
            }
            #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vnni,avx512vl,avx512bw")]
            unsafe fn $name8(w0: &[u8], w1: &[u8], x: [&[BlockQ8]; 8]) -> [[f32; 8]; 2] {
                q32vz::<2, 8, $off>([w0, w1], x, $size, $m_at, $unpack)
            }
            pub(super) fn $safe(w0: &[u8], w1: &[u8], x: [&[BlockQ8]; 4]) -> [[f32; 4]; 2] {
                // SAFETY: handed out by `dot_q8_2row` only after `simd_level()`
                // found AVX-512 F/BW/VL/VNNI at run time.
                unsafe { $name(w0, w1, x) }
            }
            pub(super) fn $safe8(w0: &[u8], w1: &[u8], x: [&[BlockQ8]; 8]) -> [[f32; 8]; 2] {
                // SAFETY: as above.
                unsafe { $name8(w0, w1, x) }
            }
        )*};
    }
    kernels_2row! {
        q4_0_z, q4_0_z8, q4_0_2x4, q4_0_2x8 => 8, 18, None, |b| nibbles(b.add(2));
        q4_1_z, q4_1_z8, q4_1_2x4, q4_1_2x8 => 0, 20, Some(2), |b| nibbles(b.add(4));
        q5_0_z, q5_0_z8, q5_0_2x4, q5_0_2x8 => 16, 22, None,
            |b| _mm256_or_si256(nibbles(b.add(6)), q5_high_mask(b.add(2)));
        q5_1_z, q5_1_z8, q5_1_2x4, q5_1_2x8 => 0, 24, Some(2),
            |b| _mm256_or_si256(nibbles(b.add(8)), q5_high_mask(b.add(4)));
        q8_0_z, q8_0_z8, q8_0_2x4, q8_0_2x8 => 128, 34, None,
            |b| _mm256_xor_si256(q8_0_u(b), _mm256_set1_epi8(-128));
    }

    macro_rules! safe_wrappers {
        ($($name:ident, $name4:ident => $imp:ident, $imp4:ident : $blk:ty),*) => {$(
            pub(super) fn $name(w: &[u8], x: &[$blk]) -> f32 {
                // SAFETY: these functions are only handed out by the `dot_*`
                // selectors after `simd_level()` confirmed at run time the CPU
                // features they were compiled for.
                unsafe { $imp(w, x) }
            }
            pub(super) fn $name4(w: &[u8], x: [&[$blk]; 4]) -> [f32; 4] {
                // SAFETY: as above.
                unsafe { $imp4(w, x) }
            }
        )*};
    }
    safe_wrappers!(
        q4_0, q4_0_x4 => q4_0_i, q4_0_i4: BlockQ8,
        q4_1, q4_1_x4 => q4_1_i, q4_1_i4: BlockQ8,
        q5_0, q5_0_x4 => q5_0_i, q5_0_i4: BlockQ8,
        q5_1, q5_1_x4 => q5_1_i, q5_1_i4: BlockQ8,
        q8_0, q8_0_x4 => q8_0_i, q8_0_i4: BlockQ8,
        q4_k, q4_k_x4 => q4_k_i, q4_k_i4: BlockQ8K,
        q5_k, q5_k_x4 => q5_k_i, q5_k_i4: BlockQ8K,
        q6_k, q6_k_x4 => q6_k_i, q6_k_i4: BlockQ8K,
        q4_0_v, q4_0_v4 => q4_0_vi, q4_0_vi4: BlockQ8,
        q4_1_v, q4_1_v4 => q4_1_vi, q4_1_vi4: BlockQ8,
        q5_0_v, q5_0_v4 => q5_0_vi, q5_0_vi4: BlockQ8,
        q5_1_v, q5_1_v4 => q5_1_vi, q5_1_vi4: BlockQ8,
        q8_0_v, q8_0_v4 => q8_0_vi, q8_0_vi4: BlockQ8,
        q4_k_v, q4_k_v4 => q4_k_vi, q4_k_vi4: BlockQ8K,
        q5_k_v, q5_k_v4 => q5_k_vi, q5_k_vi4: BlockQ8K,
        q6_k_v, q6_k_v4 => q6_k_vi, q6_k_vi4: BlockQ8K
    );
}

#[cfg(test)]
pub(crate) mod tests {
    #[test]
    fn a_cpu_without_avx2_gets_the_portable_kernels_and_a_notice() {
        use super::{choose, Cpu, SimdLevel};
        let cpu = |avx2, vnni, avx_vnni| Cpu {
            avx2,
            vnni,
            avx_vnni,
        };
        let level = |c, forced| {
            let (d, _) = choose(c, forced);
            (d.level, d.avx_vnni)
        };
        let (d, notice) = choose(cpu(false, false, false), None);
        assert_eq!(d.level, SimdLevel::Scalar);
        assert!(notice.is_some_and(|n| n.contains("portable")));
        // Asked for, the portable path is not news.
        assert!(choose(cpu(true, true, true), Some("scalar")).1.is_none());
        assert_eq!(
            level(cpu(true, true, true), Some("scalar")),
            (SimdLevel::Scalar, false)
        );
        assert_eq!(
            level(cpu(true, true, true), None),
            (SimdLevel::Avx2Vnni, false)
        );
        assert_eq!(
            level(cpu(true, true, true), Some("avx2")),
            (SimdLevel::Avx2, false)
        );
        assert_eq!(
            level(cpu(true, false, false), None),
            (SimdLevel::Avx2, false)
        );
        // An Alder Lake: AVX2 with AVX-VNNI, unless the plain AVX2 path is
        // asked for; an AVX-512 CPU takes that path only when asked to.
        assert_eq!(level(cpu(true, false, true), None), (SimdLevel::Avx2, true));
        assert_eq!(
            level(cpu(true, false, true), Some("avx2")),
            (SimdLevel::Avx2, false)
        );
        assert_eq!(
            level(cpu(true, true, true), Some("avxvnni")),
            (SimdLevel::Avx2, true)
        );
        // Neither can conjure what the CPU lacks.
        assert_eq!(
            level(cpu(true, true, false), Some("avxvnni")),
            (SimdLevel::Avx2, false)
        );
        assert_eq!(
            level(cpu(false, false, false), Some("avx2")).0,
            SimdLevel::Scalar
        );
    }

    use super::*;
    use rand::{Rng, SeedableRng};

    /// `rows` rows of [`random_row`], one after another.
    pub(crate) fn random_rows(ty: GgmlType, rows: usize, n: usize, rng: &mut impl Rng) -> Vec<u8> {
        (0..rows).flat_map(|_| random_row(ty, n, rng)).collect()
    }

    /// Random but valid weight bytes: scales are sane f16 values, quants random.
    pub(crate) fn random_row(ty: GgmlType, n: usize, rng: &mut impl Rng) -> Vec<u8> {
        let mut b: Vec<u8> = (0..ty.row_bytes(n)).map(|_| rng.random()).collect();
        let f16 = |v: f32| half::f16::from_f32(v).to_bits().to_le_bytes();
        let size = ty.type_size();
        for blk in b.chunks_exact_mut(size) {
            let (at, vals): (&[usize], [f32; 2]) = match ty {
                GgmlType::Q4_0 | GgmlType::Q5_0 | GgmlType::Q8_0 => (&[0], [0.01, 0.0]),
                GgmlType::Q4_1 | GgmlType::Q5_1 => (&[0, 2], [0.01, -0.05]),
                GgmlType::Q2_K => (&[80, 82], [0.01, 0.003]),
                GgmlType::Q3_K => (&[108], [0.01, 0.0]),
                GgmlType::Q4_K | GgmlType::Q5_K => (&[0, 2], [0.002, 0.001]),
                GgmlType::Q6_K => (&[208], [0.001, 0.0]),
                _ => (&[], [0.0, 0.0]),
            };
            for (k, &a) in at.iter().enumerate() {
                let scale = vals[k] * rng.random_range(0.5..1.5f32);
                blk[a..a + 2].copy_from_slice(&f16(scale));
            }
        }
        b
    }

    #[test]
    fn integer_dots_match_dequantized_float_dot() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
        let n = 512;
        for ty in GgmlType::ALL {
            if ty.block_size() == 1 {
                continue;
            }
            for _ in 0..20 {
                let w = random_row(ty, n, &mut rng);
                let x: Vec<f32> = (0..n).map(|_| rng.random_range(-1.0..1.0f32)).collect();
                let mut wf = vec![0f32; n];
                quant::dequantize_row(ty, &w, &mut wf);
                let exact: f32 = wf.iter().zip(&x).map(|(a, b)| a * b).sum();
                let norm: f32 = wf.iter().zip(&x).map(|(a, b)| (a * b).abs()).sum();
                let (scalar, fast) = if ty.block_size() == QK {
                    let mut xq = Vec::new();
                    quant::quantize_q8(&x, &mut xq);
                    (scalar_q8(ty, &w, &xq), dot_q8(ty).expect("dot")(&w, &xq))
                } else {
                    let mut xq = Vec::new();
                    quant::quantize_q8k(&x, &mut xq);
                    (scalar_q8k(ty, &w, &xq), dot_q8k(ty).expect("dot")(&w, &xq))
                };
                // The four-token kernels give the one-token results.
                if ty.block_size() == QK {
                    let mut xq = Vec::new();
                    quant::quantize_q8(&x, &mut xq);
                    if let Some(f4) = dot_q8_x4(ty) {
                        let one = dot_q8(ty).expect("dot")(&w, &xq);
                        for v in f4(&w, [&xq, &xq, &xq, &xq]) {
                            // Bit for bit: batching must not change a token's logits.
                            assert_eq!(v.to_bits(), one.to_bits(), "{ty} x4");
                        }
                    }
                    if let Some((f24, _)) = dot_q8_2row(ty) {
                        // Four different token rows and two weight rows; odd block
                        // counts exercise the tail.
                        let w2 = random_row(ty, n, &mut rng);
                        let xs: Vec<Vec<quant::BlockQ8>> = (0..4)
                            .map(|k| {
                                let xk: Vec<f32> = x
                                    .iter()
                                    .map(|v| v * (k as f32 + 1.0) - 0.1 * k as f32)
                                    .collect();
                                let mut q = Vec::new();
                                quant::quantize_q8(&xk, &mut q);
                                q
                            })
                            .collect();
                        for blocks in [n / QK, n / QK - 1] {
                            let bytes = blocks * ty.type_size();
                            let xr: [&[quant::BlockQ8]; 4] =
                                std::array::from_fn(|k| &xs[k][..blocks]);
                            let got = f24(&w[..bytes], &w2[..bytes], xr);
                            for (r, wr) in [&w[..bytes], &w2[..bytes]].into_iter().enumerate() {
                                for k in 0..4 {
                                    let want = scalar_q8(ty, wr, xr[k]);
                                    let one = dot_q8(ty).expect("dot")(wr, xr[k]);
                                    assert_eq!(
                                        got[r][k].to_bits(),
                                        one.to_bits(),
                                        "{ty} 2x4 r{r} t{k} differs from the one-token kernel"
                                    );
                                    assert!(
                                        (got[r][k] - want).abs()
                                            <= 1e-4 * norm * (k as f32 + 2.0) + 1e-4,
                                        "{ty} 2x4 r{r} t{k}: {} vs {want}",
                                        got[r][k]
                                    );
                                }
                            }
                        }
                    }
                } else {
                    let mut xq = Vec::new();
                    quant::quantize_q8k(&x, &mut xq);
                    if let Some(f4) = dot_q8k_x4(ty) {
                        let one = dot_q8k(ty).expect("dot")(&w, &xq);
                        for v in f4(&w, [&xq, &xq, &xq, &xq]) {
                            assert_eq!(v.to_bits(), one.to_bits(), "{ty} x4");
                        }
                    }
                }
                if quant::is_k456(ty) {
                    // One order of operations for every K kernel.
                    assert_eq!(fast.to_bits(), scalar.to_bits(), "{ty}: simd vs scalar");
                }
                // 8-bit activations: error bounded by ~1% of the absolute sum.
                assert!(
                    (scalar - exact).abs() <= 0.01 * norm + 1e-4,
                    "{ty}: {scalar} vs {exact}"
                );
                assert!(
                    (fast - scalar).abs() <= 1e-4 * norm + 1e-5,
                    "{ty} simd {fast} vs scalar {scalar}"
                );
            }
        }
    }

    /// The AVX-512 K-quant kernels add the same integers in wider registers:
    /// their results are the AVX2 kernels' bit for bit, so a model gives the
    /// same logits on either kind of CPU.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn avx512_k_kernels_equal_the_avx2_ones_bit_for_bit() {
        if simd_level() != SimdLevel::Avx2Vnni {
            eprintln!("no AVX-512 VNNI on this CPU: nothing to compare");
            return;
        }
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(23);
        type K = (DotQ8K, DotQ8K, DotQ8Kx4, DotQ8Kx4);
        let kernels: [(GgmlType, K); 3] = [
            (
                GgmlType::Q4_K,
                (avx2::q4_k, avx2::q4_k_v, avx2::q4_k_x4, avx2::q4_k_v4),
            ),
            (
                GgmlType::Q5_K,
                (avx2::q5_k, avx2::q5_k_v, avx2::q5_k_x4, avx2::q5_k_v4),
            ),
            (
                GgmlType::Q6_K,
                (avx2::q6_k, avx2::q6_k_v, avx2::q6_k_x4, avx2::q6_k_v4),
            ),
        ];
        for (ty, (a1, v1, a4, v4)) in kernels {
            for n in [256, 768, 4864] {
                let w = random_row(ty, n, &mut rng);
                let xs: Vec<Vec<quant::BlockQ8K>> = (0..4)
                    .map(|_| {
                        let x: Vec<f32> = (0..n).map(|_| rng.random_range(-3.0..3.0f32)).collect();
                        let mut q = Vec::new();
                        quant::quantize_q8k(&x, &mut q);
                        q
                    })
                    .collect();
                let x4: [&[quant::BlockQ8K]; 4] = std::array::from_fn(|k| &xs[k][..]);
                for (k, x) in x4.iter().enumerate() {
                    assert_eq!(a1(&w, x).to_bits(), v1(&w, x).to_bits(), "{ty} n{n} t{k}");
                }
                let (a, v) = (a4(&w, x4), v4(&w, x4));
                for k in 0..4 {
                    assert_eq!(a[k].to_bits(), v[k].to_bits(), "{ty} x4 n{n} t{k}");
                }
            }
        }
    }

    #[test]
    fn dot_float_matches_for_float_types() {
        let x: Vec<f32> = (0..64).map(|i| i as f32 * 0.1 - 3.0).collect();
        let w: Vec<f32> = (0..64).map(|i| (i as f32).sin()).collect();
        let exact: f32 = w.iter().zip(&x).map(|(a, b)| a * b).sum();
        let f32b = quant::encode_f32(&w);
        assert!((dot_float(GgmlType::F32, &f32b, &x) - exact).abs() < 1e-4);
        let f16b = quant::encode_f16(&w);
        assert!((dot_float(GgmlType::F16, &f16b, &x) - exact).abs() < 1e-2);
    }

    #[test]
    fn q8_0_roundtrip() {
        let x: Vec<f32> = (0..64).map(|i| (i as f32 * 0.37).cos()).collect();
        let b = quant::quantize_row_q8_0(&x);
        let mut y = vec![0f32; 64];
        quant::dequantize_row(GgmlType::Q8_0, &b, &mut y);
        for (a, b) in x.iter().zip(&y) {
            assert!((a - b).abs() < 0.01);
        }
    }
}
