//! Token sampling: penalties, temperature, top-k, top-p, min-p, seeded RNG.

use hanlin_kernels::ops;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SamplerConfig {
    /// 0 means greedy.
    pub temperature: f32,
    /// 0 disables.
    pub top_k: usize,
    /// 1.0 disables.
    pub top_p: f32,
    /// 0.0 disables.
    pub min_p: f32,
    /// 1.0 disables (llama.cpp-style: divide positive logits, multiply negative).
    pub repeat_penalty: f32,
    pub presence_penalty: f32,
    pub frequency_penalty: f32,
    /// How many recent tokens the penalties look at (0: all).
    pub penalty_last_n: usize,
    pub seed: u64,
}

impl Default for SamplerConfig {
    fn default() -> Self {
        Self {
            temperature: 0.7,
            top_k: 40,
            top_p: 0.9,
            min_p: 0.05,
            repeat_penalty: 1.1,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            penalty_last_n: 64,
            seed: 0,
        }
    }
}

impl SamplerConfig {
    pub fn greedy() -> Self {
        Self {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repeat_penalty: 1.0,
            ..Self::default()
        }
    }
}

pub struct Sampler {
    pub cfg: SamplerConfig,
    rng: ChaCha8Rng,
    /// The softmax weights of the last draw (one per vocabulary entry).
    weights: Vec<f32>,
}

/// A token with its log-probability.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TokenLogprob {
    pub id: u32,
    pub logprob: f32,
}

impl Sampler {
    pub fn new(cfg: SamplerConfig) -> Self {
        let rng = ChaCha8Rng::seed_from_u64(cfg.seed);
        Self {
            cfg,
            rng,
            weights: Vec::new(),
        }
    }

    /// Apply repetition, presence and frequency penalties for `history`.
    pub fn apply_penalties(&self, logits: &mut [f32], history: &[u32]) {
        let c = &self.cfg;
        if c.repeat_penalty == 1.0 && c.presence_penalty == 0.0 && c.frequency_penalty == 0.0 {
            return;
        }
        let recent = if c.penalty_last_n == 0 {
            history
        } else {
            &history[history.len().saturating_sub(c.penalty_last_n)..]
        };
        let mut counts = std::collections::HashMap::<u32, u32>::new();
        for &t in recent {
            *counts.entry(t).or_default() += 1;
        }
        for (&t, &n) in &counts {
            let Some(l) = logits.get_mut(t as usize) else {
                continue;
            };
            if c.repeat_penalty != 1.0 {
                *l = if *l > 0.0 {
                    *l / c.repeat_penalty
                } else {
                    *l * c.repeat_penalty
                };
            }
            *l -= c.presence_penalty + c.frequency_penalty * n as f32;
        }
    }

    /// Choose the next token. `logits` is modified.
    pub fn sample(&mut self, logits: &mut [f32], history: &[u32]) -> u32 {
        self.apply_penalties(logits, history);
        let c = &self.cfg;
        if c.temperature <= 0.0 {
            return argmax(logits);
        }
        let t = c.temperature;
        let max = ops::max(logits);
        if c.top_k == 0 && c.top_p >= 1.0 && c.min_p <= 0.0 {
            // No truncation: draw from the whole softmax, weights computed
            // once, with no sort over the vocabulary.
            self.weights.resize(logits.len(), 0.0);
            let total = ops::exp_weights(logits, max, 1.0 / t, &mut self.weights);
            let mut r = self.rng.random::<f32>() * total;
            let mut last = 0;
            for (i, &p) in self.weights.iter().enumerate() {
                if p > 0.0 {
                    last = i;
                }
                r -= p;
                if r <= 0.0 {
                    return i as u32;
                }
            }
            return last as u32;
        }
        let n = logits.len();
        // With top-k, probabilities are normalised over the k best; without,
        // over the whole vocabulary. Only as many of the best tokens as
        // top-p / min-p can keep are sorted (k grows until they are covered).
        let z: f32 = if c.top_k == 0 {
            self.weights.resize(logits.len(), 0.0);
            ops::exp_weights(logits, max, 1.0 / t, &mut self.weights)
        } else {
            0.0
        };
        let mut k = if c.top_k > 0 {
            c.top_k.min(n)
        } else {
            64.min(n)
        };
        let (cand, probs) = loop {
            let mut cand: Vec<(u32, f32)> = logits
                .iter()
                .enumerate()
                .map(|(i, &l)| (i as u32, l))
                .collect();
            if k < n {
                cand.select_nth_unstable_by(k - 1, |a, b| b.1.total_cmp(&a.1));
                cand.truncate(k);
            }
            cand.sort_by(|a, b| b.1.total_cmp(&a.1));
            let mut probs = vec![0f32; cand.len()];
            let ls: Vec<f32> = cand.iter().map(|&(_, l)| l).collect();
            ops::exp_weights(&ls, max, 1.0 / t, &mut probs);
            let norm = if c.top_k > 0 { probs.iter().sum() } else { z };
            probs.iter_mut().for_each(|p| *p /= norm);
            let covered = c.top_k > 0
                || k == n
                || ((c.top_p >= 1.0 || probs.iter().sum::<f32>() >= c.top_p)
                    && (c.min_p <= 0.0 || probs[k - 1] < probs[0] * c.min_p));
            if covered {
                break (cand, probs);
            }
            k = (k * 4).min(n);
        };
        let mut keep = probs.len();
        if c.min_p > 0.0 {
            let thr = probs[0] * c.min_p;
            keep = keep.min(probs.iter().take_while(|&&p| p >= thr).count().max(1));
        }
        if c.top_p < 1.0 {
            let mut acc = 0.0;
            let mut n = 0;
            for p in &probs[..keep] {
                acc += p;
                n += 1;
                if acc >= c.top_p {
                    break;
                }
            }
            keep = n.max(1);
        }
        let total: f32 = probs[..keep].iter().sum();
        let mut r = self.rng.random::<f32>() * total;
        for (i, p) in probs[..keep].iter().enumerate() {
            r -= p;
            if r <= 0.0 {
                return cand[i].0;
            }
        }
        cand[keep - 1].0
    }
}

pub fn argmax(x: &[f32]) -> u32 {
    ops::argmax(x) as u32
}

/// Log-softmax of `logits`: the chosen token's log-probability and the `top` best.
pub fn logprobs(logits: &[f32], chosen: u32, top: usize) -> (f32, Vec<TokenLogprob>) {
    let max = ops::max(logits);
    let lse = max + logits.iter().map(|&l| (l - max).exp()).sum::<f32>().ln();
    let mut idx: Vec<u32> = (0..logits.len() as u32).collect();
    let top = top.min(idx.len());
    if top > 0 {
        idx.select_nth_unstable_by(top - 1, |&a, &b| {
            logits[b as usize].total_cmp(&logits[a as usize])
        });
    }
    idx.truncate(top);
    idx.sort_by(|&a, &b| logits[b as usize].total_cmp(&logits[a as usize]));
    let tops = idx
        .into_iter()
        .map(|id| TokenLogprob {
            id,
            logprob: logits[id as usize] - lse,
        })
        .collect();
    (
        logits
            .get(chosen as usize)
            .copied()
            .unwrap_or(f32::NEG_INFINITY)
            - lse,
        tops,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_picks_max() {
        let mut s = Sampler::new(SamplerConfig::greedy());
        assert_eq!(s.sample(&mut [0.1, 3.0, 2.0], &[]), 1);
    }

    #[test]
    fn same_seed_same_choices_and_different_seed_differs() {
        let logits: Vec<f32> = (0..100).map(|i| (i as f32 * 0.37).sin()).collect();
        let run = |seed| {
            let mut s = Sampler::new(SamplerConfig {
                seed,
                temperature: 1.5,
                top_k: 0,
                top_p: 1.0,
                min_p: 0.0,
                repeat_penalty: 1.0,
                ..Default::default()
            });
            (0..50)
                .map(|_| s.sample(&mut logits.clone(), &[]))
                .collect::<Vec<_>>()
        };
        assert_eq!(run(1), run(1));
        assert_ne!(run(1), run(2));
    }

    #[test]
    fn top_k_one_is_greedy_and_penalty_applies() {
        let mut s = Sampler::new(SamplerConfig {
            top_k: 1,
            temperature: 1.0,
            ..Default::default()
        });
        assert_eq!(s.sample(&mut [1.0, 5.0, 2.0], &[]), 1);
        let mut s = Sampler::new(SamplerConfig {
            temperature: 0.0,
            repeat_penalty: 1.0,
            presence_penalty: 10.0,
            ..Default::default()
        });
        assert_eq!(s.sample(&mut [1.0, 5.0, 2.0], &[1]), 2);
    }

    /// The sampled frequencies follow the exact truncated distribution, also
    /// when top-p needs more than the first batch of sorted candidates.
    #[test]
    fn sampling_matches_the_exact_distribution() {
        let n = 500;
        let logits: Vec<f32> = (0..n).map(|i| (i as f32 * 0.731).sin() * 2.0).collect();
        for (top_p, min_p) in [(1.0f32, 0.0f32), (0.5, 0.0), (0.95, 0.0), (1.0, 0.2)] {
            // Reference: sort everything, softmax, cut, renormalise.
            let mut idx: Vec<usize> = (0..n).collect();
            idx.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
            let z: f32 = logits.iter().map(|l| l.exp()).sum();
            let p: Vec<f32> = idx.iter().map(|&i| logits[i].exp() / z).collect();
            let mut keep = n;
            if min_p > 0.0 {
                keep = p.iter().take_while(|&&x| x >= p[0] * min_p).count();
            }
            if top_p < 1.0 {
                let mut acc = 0.0;
                keep = p
                    .iter()
                    .take_while(|&&x| {
                        let before = acc;
                        acc += x;
                        before < top_p
                    })
                    .count();
            }
            let total: f32 = p[..keep].iter().sum();
            let mut expected = vec![0f32; n];
            for (r, &i) in idx[..keep].iter().enumerate() {
                expected[i] = p[r] / total;
            }
            let mut s = Sampler::new(SamplerConfig {
                temperature: 1.0,
                top_k: 0,
                top_p,
                min_p,
                repeat_penalty: 1.0,
                seed: 3,
                ..SamplerConfig::default()
            });
            let draws = 40_000;
            let mut counts = vec![0f32; n];
            for _ in 0..draws {
                counts[s.sample(&mut logits.clone(), &[]) as usize] += 1.0;
            }
            let tv: f32 = counts
                .iter()
                .zip(&expected)
                .map(|(c, e)| (c / draws as f32 - e).abs())
                .sum::<f32>()
                / 2.0;
            assert!(
                tv < 0.04,
                "top_p {top_p} min_p {min_p}: total variation {tv}"
            );
            assert!(counts
                .iter()
                .zip(&expected)
                .all(|(c, e)| *e > 0.0 || *c == 0.0));
        }
    }

    #[test]
    fn logprobs_normalise() {
        let (lp, top) = logprobs(&[0.0, 0.0], 0, 2);
        assert!((lp - 0.5f32.ln()).abs() < 1e-6);
        assert_eq!(top.len(), 2);
    }
}
