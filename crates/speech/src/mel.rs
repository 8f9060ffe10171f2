//! Whisper's log-mel spectrogram: 25 ms Hann windows every 10 ms (400-point
//! real FFT at 16 kHz, reflect-padded at both ends), power spectra through
//! 80 Slaney-style mel filters, log10, floored 8 (80 dB) below the loudest
//! value, scaled to about ±1. Computed as faster-whisper computes it
//! (160 zero samples appended, the last frame dropped), so the features
//! match the reference implementation.

use realfft::RealFftPlanner;

pub const N_FFT: usize = 400;
pub const HOP: usize = 160;

/// Mel filters `n_mels × (N_FFT/2 + 1)` for 16 kHz audio.
pub fn filters(n_mels: usize) -> Vec<f32> {
    let bins = N_FFT / 2 + 1;
    let sr = 16_000f64;
    let fft_freq: Vec<f64> = (0..bins).map(|i| i as f64 * sr / N_FFT as f64).collect();
    // Slaney's scale: linear below 1 kHz, logarithmic above.
    let f_sp = 200.0 / 3.0;
    let min_log_hz = 1000.0;
    let min_log_mel = min_log_hz / f_sp;
    let logstep = 6.4f64.ln() / 27.0;
    let to_mel = |f: f64| {
        if f >= min_log_hz {
            min_log_mel + (f / min_log_hz).ln() / logstep
        } else {
            f / f_sp
        }
    };
    let max_mel = to_mel(sr / 2.0);
    let freqs: Vec<f64> = (0..n_mels + 2)
        .map(|i| {
            let m = max_mel * i as f64 / (n_mels + 1) as f64;
            if m >= min_log_mel {
                min_log_hz * (logstep * (m - min_log_mel)).exp()
            } else {
                f_sp * m
            }
        })
        .collect();
    let mut w = vec![0f32; n_mels * bins];
    for m in 0..n_mels {
        let enorm = 2.0 / (freqs[m + 2] - freqs[m]);
        for (b, f) in fft_freq.iter().enumerate() {
            let lower = (f - freqs[m]) / (freqs[m + 1] - freqs[m]);
            let upper = (freqs[m + 2] - f) / (freqs[m + 2] - freqs[m + 1]);
            w[m * bins + b] = (lower.min(upper).max(0.0) * enorm) as f32;
        }
    }
    w
}

/// The log-mel features of 16 kHz `samples`: `n_mels` rows of `frames`
/// values (returned with `frames`).
pub fn log_mel(samples: &[f32], n_mels: usize) -> (Vec<f32>, usize) {
    let bins = N_FFT / 2 + 1;
    let pad = N_FFT / 2;
    // faster-whisper appends one hop of silence.
    let mut x: Vec<f32> = samples.to_vec();
    x.resize(samples.len() + HOP, 0.0);
    if x.len() <= pad {
        x.resize(pad + 1, 0.0);
    }
    // Reflect padding (numpy's "reflect": the edge sample is not repeated).
    let n = x.len();
    let mut p = Vec::with_capacity(n + 2 * pad);
    p.extend((1..=pad).rev().map(|i| x[i]));
    p.extend_from_slice(&x);
    p.extend((n - 1 - pad..n - 1).rev().map(|i| x[i]));
    let frames = 1 + (p.len() - N_FFT) / HOP - 1;
    let window: Vec<f32> = (0..N_FFT)
        .map(|i| (0.5 - 0.5 * (2.0 * std::f64::consts::PI * i as f64 / N_FFT as f64).cos()) as f32)
        .collect();
    let fb = filters(n_mels);
    let fft = RealFftPlanner::<f32>::new().plan_fft_forward(N_FFT);
    let mut input = fft.make_input_vec();
    let mut spec = fft.make_output_vec();
    let mut power = vec![0f32; bins];
    let mut mel = vec![0f32; n_mels * frames];
    for t in 0..frames {
        let seg = &p[t * HOP..t * HOP + N_FFT];
        for ((i, s), w) in input.iter_mut().zip(seg).zip(&window) {
            *i = s * w;
        }
        // The buffers have the planner's sizes: this cannot fail.
        if fft.process(&mut input, &mut spec).is_err() {
            continue;
        }
        for (pw, c) in power.iter_mut().zip(&spec) {
            *pw = c.norm_sqr();
        }
        for m in 0..n_mels {
            let v: f32 = fb[m * bins..(m + 1) * bins]
                .iter()
                .zip(&power)
                .map(|(a, b)| a * b)
                .sum();
            mel[m * frames + t] = v.max(1e-10).log10();
        }
    }
    let max = mel.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    for v in &mut mel {
        *v = (v.max(max - 8.0) + 4.0) / 4.0;
    }
    (mel, frames)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tone_lights_the_band_it_is_in() {
        let samples: Vec<f32> = (0..16_000)
            .map(|i| (2.0 * std::f32::consts::PI * 1000.0 * i as f32 / 16_000.0).sin())
            .collect();
        let (mel, frames) = log_mel(&samples, 80);
        assert_eq!(frames, 101);
        // Each filter's peak frequency; the loudest band holds 1 kHz.
        let t = 50;
        let loudest = (0..80)
            .max_by(|a, b| mel[a * frames + t].total_cmp(&mel[b * frames + t]))
            .unwrap_or(0);
        let fb = filters(80);
        let peak_bin = (0..201)
            .max_by(|a, b| fb[loudest * 201 + a].total_cmp(&fb[loudest * 201 + b]))
            .unwrap_or(0);
        let hz = peak_bin as f32 * 40.0;
        assert!(
            (hz - 1000.0).abs() <= 80.0,
            "band {loudest} peaks at {hz} Hz"
        );
        // Values lie in the floored, scaled range.
        let max = mel.iter().copied().fold(f32::MIN, f32::max);
        let min = mel.iter().copied().fold(f32::MAX, f32::min);
        assert!((min - (max - 2.0)).abs() < 1e-4 || min > max - 2.0);
    }
}
