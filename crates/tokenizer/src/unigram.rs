//! SentencePiece-unigram tokenization for encoder models (XLM-RoBERTa's
//! vocabulary, as multilingual-e5 uses): the model's per-character
//! normalisation, runs of spaces collapsed, spaces as `▁` with one in front,
//! then the most probable segmentation (`tokenizers`' unigram Viterbi).

use crate::TokenizerError;
use std::collections::HashMap;
use tokenizers::Model;

pub struct UnigramTokenizer {
    model: tokenizers::models::unigram::Unigram,
    normalize: HashMap<char, String>,
}

const META: char = '\u{2581}';

impl UnigramTokenizer {
    pub fn new(
        pieces: &[(String, f32)],
        unk: u32,
        normalize: HashMap<char, String>,
    ) -> Result<Self, TokenizerError> {
        let vocab = pieces
            .iter()
            .map(|(p, s)| (p.clone(), *s as f64))
            .collect::<Vec<_>>();
        let model = tokenizers::models::unigram::Unigram::from(vocab, Some(unk as usize), false)
            .map_err(|e| TokenizerError::Build(e.to_string()))?;
        Ok(Self { model, normalize })
    }

    /// The text as the model's pieces see it.
    pub fn normalized(&self, text: &str) -> String {
        let mut out = String::with_capacity(text.len() + 3);
        let push = |c: char, out: &mut String| {
            if c == ' ' && (out.is_empty() || out.ends_with(META)) && !out.is_empty() {
                return; // collapse runs of spaces
            }
            out.push(if c == ' ' { META } else { c });
        };
        for c in text.chars() {
            match self.normalize.get(&c) {
                Some(r) => r.chars().for_each(|c| push(c, &mut out)),
                None => push(c, &mut out),
            }
        }
        if !out.starts_with(META) {
            out.insert(0, META);
        }
        out
    }

    /// Token ids of `text`, without the special tokens around it.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, TokenizerError> {
        let s = self.normalized(text);
        Ok(self
            .model
            .tokenize(&s)
            .map_err(|e| TokenizerError::Encode(e.to_string()))?
            .into_iter()
            .map(|t| t.id)
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spaces_normalisation_and_viterbi() {
        let pieces: Vec<(String, f32)> = [
            ("<unk>", 0.0),
            ("▁", -3.0),
            ("▁hello", -5.0),
            ("▁he", -4.0),
            ("llo", -4.0),
            ("▁world", -5.0),
            ("长城", -6.0),
            ("长", -7.0),
            ("城", -7.0),
        ]
        .iter()
        .map(|(p, s)| (p.to_string(), *s))
        .collect();
        let norm = HashMap::from([('\u{3000}', " ".to_string()), ('\u{1}', String::new())]);
        let t = UnigramTokenizer::new(&pieces, 0, norm).unwrap();
        assert_eq!(t.normalized("hello  world"), "▁hello▁world");
        assert_eq!(t.normalized(" hello\u{3000}\u{1}world"), "▁hello▁world");
        // "▁hello" (-5) beats "▁he" + "llo" (-8).
        assert_eq!(t.encode("hello   world").unwrap(), vec![2, 5]);
        assert_eq!(t.encode("长城").unwrap(), vec![1, 6]);
        // An unknown character becomes <unk>.
        assert_eq!(t.encode("☃").unwrap(), vec![1, 0]);
    }
}
