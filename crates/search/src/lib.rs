//! Knowledge bases for conversational search: documents are extracted from
//! files ([`extract`]), cut into passages on sentence boundaries
//! ([`chunk`]), and indexed with tantivy using jieba's Chinese word
//! segmentation ([`index`]). Retrieval is behind the [`Retriever`] trait (the
//! embedded index now; OpenSearch or Qdrant adapters can implement it);
//! results from several knowledge bases are fused by reciprocal rank
//! ([`fuse`]). [`answer`] builds grounded prompts and checks the model's
//! citations against the passages they cite.

pub mod answer;
pub mod chunk;
pub mod dense;
pub mod extract;
pub mod feed;
pub mod index;
pub mod isolate;

pub use extract::Document;
pub use index::KnowledgeBase;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum SearchError {
    #[error("no knowledge base at {0} (create it with `hanlin kb create NAME`)")]
    NotFound(PathBuf),
    #[error("a knowledge base already exists at {0}")]
    Exists(PathBuf),
    #[error("the index in {dir} cannot be used ({reason}); run `hanlin kb rebuild` to rebuild it from the stored documents")]
    Index { dir: PathBuf, reason: String },
    #[error("invalid knowledge base name {0:?}: use letters, digits, '-', '_' or '.'")]
    BadName(String),
    #[error("embedding: {0}")]
    Embedder(String),
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Json(#[from] serde_json::Error),
}

/// A retrieved passage.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Passage {
    /// Knowledge base it came from.
    pub kb: String,
    pub doc_id: String,
    /// Passage number within the document.
    pub chunk: u64,
    pub title: String,
    pub source: String,
    pub text: String,
    pub published: Option<i64>,
    /// The retriever's score (higher is better; scales differ by retriever).
    pub score: f32,
}

/// Anything that finds passages for a query.
pub trait Retriever {
    /// Full-text (BM25) search.
    fn search(&self, query: &str, k: usize) -> Result<Vec<Passage>, SearchError>;
    /// The model whose vectors [`Retriever::search_dense`] compares (None:
    /// no dense retrieval).
    fn embedder(&self) -> Option<&str> {
        None
    }
    /// The passages nearest to a query vector from [`Retriever::embedder`].
    fn search_dense(&self, _query: &[f32], _k: usize) -> Result<Vec<Passage>, SearchError> {
        Ok(Vec::new())
    }
}

/// Reciprocal-rank fusion of several ranked lists (k = 60), then, when
/// `recency_days` is given, a boost for recent passages (a passage as old as
/// `recency_days` counts half as much as one from `now`). Duplicates (same
/// document and passage) are merged.
pub fn fuse(lists: &[Vec<Passage>], k: usize, recency_days: Option<f64>, now: i64) -> Vec<Passage> {
    let mut scored: Vec<(f64, Passage)> = Vec::new();
    for list in lists {
        for (rank, p) in list.iter().enumerate() {
            let rrf = 1.0 / (60.0 + rank as f64 + 1.0);
            match scored
                .iter_mut()
                .find(|(_, q)| q.doc_id == p.doc_id && q.chunk == p.chunk && q.kb == p.kb)
            {
                Some((s, _)) => *s += rrf,
                None => scored.push((rrf, p.clone())),
            }
        }
    }
    if let Some(days) = recency_days.filter(|d| *d > 0.0) {
        for (s, p) in &mut scored {
            if let Some(t) = p.published {
                let age = ((now - t).max(0) as f64) / 86_400.0;
                *s *= 1.0 + 1.0 / (1.0 + age / days);
            }
        }
    }
    scored.sort_by(|a, b| b.0.total_cmp(&a.0));
    scored.into_iter().take(k).map(|(_, p)| p).collect()
}

/// Words that ask for the newest information.
const LATEST: &[&str] = &[
    "最新", "最近", "latest", "recent", "newest", "today", "今天",
];

/// `embed(model, text)`: the query vector of `text` under `model`.
pub type QueryEmbedder<'a> = dyn FnMut(&str, &str) -> Result<Vec<f32>, SearchError> + 'a;

/// Which ranked lists a search fuses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Full text only.
    Bm25,
    /// Vectors only (knowledge bases without an embedder contribute nothing).
    Dense,
    /// Both, fused by reciprocal rank.
    Hybrid,
}

impl std::str::FromStr for Mode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "bm25" => Ok(Mode::Bm25),
            "dense" => Ok(Mode::Dense),
            "hybrid" => Ok(Mode::Hybrid),
            _ => Err(format!("unknown search mode {s:?} (bm25, dense, hybrid)")),
        }
    }
}

/// Each retriever's ranked lists for `question` — BM25, and nearest
/// vectors for those with an embedder (`embed(model, question)` computes
/// the query vector, once per model) — fused ([`fuse`]) into the top `k`: a
/// question that asks for the latest news favours passages from the last
/// month or so. Every list has `2k` entries, so fusion has more than the
/// final cut to choose from.
pub fn search_all<'a, R: Retriever + 'a>(
    retrievers: impl IntoIterator<Item = &'a R>,
    question: &str,
    k: usize,
    now: i64,
    mode: Mode,
    embed: &mut QueryEmbedder<'_>,
) -> Result<Vec<Passage>, SearchError> {
    let mut lists = Vec::new();
    let mut query_vectors: Vec<(String, Vec<f32>)> = Vec::new();
    for r in retrievers {
        if mode != Mode::Dense {
            lists.push(r.search(question, k * 2)?);
        }
        if mode == Mode::Bm25 {
            continue;
        }
        let Some(model) = r.embedder() else { continue };
        let i = match query_vectors.iter().position(|(m, _)| m == model) {
            Some(i) => i,
            None => {
                query_vectors.push((model.to_string(), embed(model, question)?));
                query_vectors.len() - 1
            }
        };
        lists.push(r.search_dense(&query_vectors[i].1, k * 2)?);
    }
    let q = question.to_lowercase();
    let latest = LATEST.iter().any(|w| q.contains(w));
    Ok(fuse(&lists, k, latest.then_some(30.0), now))
}

/// The directory of knowledge base `name` under `root`.
pub fn kb_dir(root: &Path, name: &str) -> Result<PathBuf, SearchError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if !ok {
        return Err(SearchError::BadName(name.into()));
    }
    Ok(root.join(name))
}

/// The knowledge bases under `root`, by name.
pub fn list(root: &Path) -> Vec<String> {
    let mut out: Vec<String> = std::fs::read_dir(root)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.path().join("docs.jsonl").exists())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    out.sort();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(kb: &str, doc: &str, published: Option<i64>) -> Passage {
        Passage {
            kb: kb.into(),
            doc_id: doc.into(),
            chunk: 0,
            title: doc.into(),
            source: String::new(),
            text: String::new(),
            published,
            score: 0.0,
        }
    }

    #[test]
    fn fusion_rewards_agreement_and_recency() {
        let a = vec![p("a", "x", None), p("a", "y", None)];
        let b = vec![p("a", "y", None), p("b", "z", None)];
        let fused = fuse(&[a, b], 10, None, 0);
        assert_eq!(fused[0].doc_id, "y", "found by both lists");
        assert_eq!(fused.len(), 3);
        let now = 100 * 86_400;
        let old = vec![p("f", "old", Some(0)), p("f", "new", Some(now))];
        let fused = fuse(&[old], 10, Some(7.0), now);
        assert_eq!(fused[0].doc_id, "new");
    }

    #[test]
    fn names_are_checked() {
        let root = Path::new("/kb");
        assert!(kb_dir(root, "诗词-2024").is_ok());
        for bad in ["", "../x", ".hidden", "a/b"] {
            assert!(kb_dir(root, bad).is_err(), "{bad}");
        }
    }
}
