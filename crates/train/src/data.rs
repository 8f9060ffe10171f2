//! Training data: a corpus of text files tokenized into one stream
//! (`<|endoftext|>` between files), split into training and validation
//! parts, and cut into windows. The windows of step `s` depend only on the
//! seed and `s`, so a resumed run sees exactly the batches it would have.

use crate::tokenizer::{corpus_files, Tok};
use crate::TrainError;
use rand::{Rng, SeedableRng};
use std::path::Path;

pub struct Dataset {
    pub train: Vec<u32>,
    pub val: Vec<u32>,
    /// Characters per token in the validation split (for bits per character).
    pub val_chars_per_token: f64,
    /// Files skipped, with the reason.
    pub skipped: Vec<String>,
}

impl Dataset {
    /// Tokenize the corpus; the last `val_fraction` of the stream is held out.
    pub fn load(corpus: &Path, tok: &Tok, val_fraction: f64) -> Result<Self, TrainError> {
        let eot = tok.end_of_text()?;
        let mut ids = Vec::new();
        let mut chars: Vec<(usize, usize)> = Vec::new(); // (token end, chars so far)
        let mut total_chars = 0usize;
        let mut skipped = Vec::new();
        for f in corpus_files(corpus)? {
            let bytes = std::fs::read(&f).map_err(crate::io_err(&f))?;
            let Ok(text) = String::from_utf8(bytes) else {
                skipped.push(format!("{}: not UTF-8 text", f.display()));
                continue;
            };
            if text.trim().is_empty() {
                skipped.push(format!("{}: empty", f.display()));
                continue;
            }
            ids.extend_from_slice(&tok.encode(&text)?);
            ids.push(eot);
            total_chars += text.chars().count();
            chars.push((ids.len(), total_chars));
        }
        if ids.len() < 64 {
            return Err(TrainError::Corpus(format!(
                "only {} tokens of text under {}",
                ids.len(),
                corpus.display()
            )));
        }
        let n_val = ((ids.len() as f64) * val_fraction) as usize;
        let val = ids.split_off(ids.len() - n_val);
        // Characters in the validation part, from the file boundaries (a
        // file split by the cut counts pro rata).
        let cut = ids.len();
        let chars_before = chars
            .iter()
            .fold((0usize, 0usize, 0f64), |(pt, pc, acc), &(t, c)| {
                let acc = if t <= cut {
                    acc
                } else if pt >= cut {
                    acc + (c - pc) as f64
                } else {
                    acc + (c - pc) as f64 * (t - cut) as f64 / (t - pt) as f64
                };
                (t, c, acc)
            })
            .2;
        let val_chars_per_token = if val.is_empty() {
            0.0
        } else {
            chars_before / val.len() as f64
        };
        Ok(Self {
            train: ids,
            val,
            val_chars_per_token,
            skipped,
        })
    }
}

/// The random generator of step `step`: a function of the seed and the step
/// alone, so a resumed run draws the same batches.
pub fn step_rng(seed: u64, step: usize) -> rand_chacha::ChaCha8Rng {
    rand_chacha::ChaCha8Rng::seed_from_u64(seed ^ (step as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15))
}

/// `batch` random windows of `len + 1` tokens (inputs and shifted targets)
/// for step `step`.
pub fn batch(stream: &[u32], batch: usize, len: usize, seed: u64, step: usize) -> Vec<Vec<u32>> {
    let mut rng = step_rng(seed, step);
    let max = stream.len().saturating_sub(len + 1);
    (0..batch)
        .map(|_| {
            let at = if max == 0 {
                0
            } else {
                rng.random_range(0..=max)
            };
            stream[at..(at + len + 1).min(stream.len())].to_vec()
        })
        .collect()
}

/// Consecutive windows of `len + 1` tokens covering `stream` (at most `max`).
pub fn windows(stream: &[u32], len: usize, max: usize) -> Vec<Vec<u32>> {
    stream
        .chunks(len)
        .filter(|c| c.len() == len)
        .take(max)
        .enumerate()
        .filter_map(|(i, _)| stream.get(i * len..i * len + len + 1).map(<[u32]>::to_vec))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_are_reproducible_and_windows_shift() {
        let s: Vec<u32> = (0..1000).collect();
        assert_eq!(batch(&s, 4, 16, 7, 3), batch(&s, 4, 16, 7, 3));
        assert_ne!(batch(&s, 4, 16, 7, 3), batch(&s, 4, 16, 7, 4));
        for w in batch(&s, 4, 16, 7, 3) {
            assert_eq!(w.len(), 17);
            assert_eq!(w[16], w[0] + 16);
        }
        let w = windows(&s, 100, 3);
        assert_eq!(w.len(), 3);
        assert_eq!((w[1][0], w[1].len()), (100, 101));
    }
}
