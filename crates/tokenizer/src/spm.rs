//! SentencePiece-style BPE as GGUF files describe it (`tokenizer.ggml.model =
//! "llama"`: Gemma, Llama 2): pieces with scores, merged greedily by the score
//! of the merged piece, with byte fallback (`<0xXX>` tokens). This follows the
//! reference algorithm llama.cpp implements; the `tokenizers` crate has no
//! model for score-ranked merges without an explicit merge list.

use crate::TokenType;
use std::cmp::Ordering;
use std::collections::{BinaryHeap, HashMap};

pub(crate) struct Spm {
    vocab: HashMap<String, u32>,
    scores: Vec<f32>,
    byte_ids: [Option<u32>; 256],
    unk: Option<u32>,
    add_space_prefix: bool,
}

#[derive(PartialEq)]
struct Bigram {
    score: f32,
    left: usize,
    size: usize,
}

impl Eq for Bigram {}

impl Ord for Bigram {
    /// Highest score first; on ties, the leftmost pair.
    fn cmp(&self, o: &Self) -> Ordering {
        self.score.total_cmp(&o.score).then(o.left.cmp(&self.left))
    }
}

impl PartialOrd for Bigram {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}

struct Sym {
    start: usize,
    len: usize,
    prev: Option<usize>,
    next: Option<usize>,
}

/// `<0x41>` → 0x41.
pub(crate) fn byte_token(t: &str) -> Option<u8> {
    let hex = t.strip_prefix("<0x")?.strip_suffix('>')?;
    if hex.len() != 2 {
        return None;
    }
    u8::from_str_radix(hex, 16).ok()
}

impl Spm {
    pub fn new(
        tokens: &[String],
        types: &[TokenType],
        scores: Vec<f32>,
        unk: Option<u32>,
        add_space_prefix: bool,
    ) -> Self {
        let mut vocab = HashMap::with_capacity(tokens.len());
        let mut byte_ids = [None; 256];
        for (i, t) in tokens.iter().enumerate() {
            if types[i] == TokenType::Byte {
                if let Some(b) = byte_token(t) {
                    byte_ids[b as usize] = Some(i as u32);
                }
                continue;
            }
            if matches!(
                types[i],
                TokenType::Normal | TokenType::UserDefined | TokenType::Unused
            ) {
                vocab.entry(t.clone()).or_insert(i as u32);
            }
        }
        Self {
            vocab,
            scores,
            byte_ids,
            unk,
            add_space_prefix,
        }
    }

    pub fn add_space_prefix(&self) -> bool {
        self.add_space_prefix
    }

    /// Encode one fragment of plain text (no special tokens inside).
    pub fn encode(&self, text: &str, out: &mut Vec<u32>) {
        if text.is_empty() {
            return;
        }
        let text = text.replace(' ', "\u{2581}");
        let mut syms: Vec<Sym> = Vec::new();
        for (i, (start, c)) in text.char_indices().enumerate() {
            syms.push(Sym {
                start,
                len: c.len_utf8(),
                prev: i.checked_sub(1),
                next: Some(i + 1),
            });
        }
        if let Some(last) = syms.last_mut() {
            last.next = None;
        }
        let mut heap = BinaryHeap::new();
        let try_add =
            |heap: &mut BinaryHeap<Bigram>, syms: &[Sym], l: Option<usize>, r: Option<usize>| {
                let (Some(l), Some(r)) = (l, r) else { return };
                let piece = &text[syms[l].start..syms[r].start + syms[r].len];
                if let Some(&id) = self.vocab.get(piece) {
                    heap.push(Bigram {
                        score: self.scores.get(id as usize).copied().unwrap_or(0.0),
                        left: l,
                        size: piece.len(),
                    });
                }
            };
        for i in 1..syms.len() {
            try_add(&mut heap, &syms, Some(i - 1), Some(i));
        }
        while let Some(b) = heap.pop() {
            let l = b.left;
            let Some(r) = syms[l].next else { continue };
            if syms[l].len == 0 || syms[r].len == 0 || syms[l].len + syms[r].len != b.size {
                continue; // stale: one side was merged since
            }
            syms[l].len += syms[r].len;
            syms[r].len = 0;
            syms[l].next = syms[r].next;
            if let Some(n) = syms[r].next {
                syms[n].prev = Some(l);
            }
            let (p, n) = (syms[l].prev, syms[l].next);
            try_add(&mut heap, &syms, p, Some(l));
            try_add(&mut heap, &syms, Some(l), n);
        }
        let mut i = Some(0);
        while let Some(k) = i {
            let piece = &text[syms[k].start..syms[k].start + syms[k].len];
            match self.vocab.get(piece) {
                Some(&id) => out.push(id),
                None => {
                    for b in piece.bytes() {
                        out.extend(self.byte_ids[b as usize].or(self.unk));
                    }
                }
            }
            i = syms[k].next;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merges_by_score_and_falls_back_to_bytes() {
        let toks: Vec<String> = [
            "<unk>",
            "\u{2581}",
            "a",
            "b",
            "ab",
            "\u{2581}ab",
            "<0xE5>",
            "<0xA5>",
            "<0xBD>",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let mut types = vec![TokenType::Normal; toks.len()];
        types[0] = TokenType::Unknown;
        for t in &mut types[6..] {
            *t = TokenType::Byte;
        }
        let scores = vec![0.0, -1.0, -2.0, -2.0, -0.5, -0.1, 0.0, 0.0, 0.0];
        let spm = Spm::new(&toks, &types, scores, Some(0), false);
        let mut out = Vec::new();
        spm.encode(" ab好", &mut out);
        assert_eq!(out, vec![5, 6, 7, 8]);
        assert_eq!(byte_token("<0x0A>"), Some(10));
        assert_eq!(byte_token("<0x0>"), None);
    }
}
