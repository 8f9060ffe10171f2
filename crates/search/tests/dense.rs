//! Dense retrieval inside a knowledge base, with a toy embedder (character
//! bigrams hashed into 1,024 dimensions): vectors are stored as documents are
//! added, searched, kept in step with removals, rebuilt with the index, and
//! fused with BM25; a knowledge base refuses documents without its model.

use hanlin_search::dense::Embedder;
use hanlin_search::index::KbConfig;
use hanlin_search::{search_all, Document, KnowledgeBase, Mode, Retriever, SearchError};
use std::sync::atomic::{AtomicUsize, Ordering};

struct Bigrams {
    calls: AtomicUsize,
}

impl Embedder for Bigrams {
    fn name(&self) -> &str {
        "bigrams"
    }
    fn embed(&self, texts: &[&str], _query: bool) -> Result<Vec<Vec<f32>>, String> {
        self.calls.fetch_add(texts.len(), Ordering::Relaxed);
        Ok(texts
            .iter()
            .map(|t| {
                let cs: Vec<char> = t.chars().filter(|c| !c.is_whitespace()).collect();
                let mut v = vec![0f32; 1024];
                for w in cs.windows(2) {
                    let h = (w[0] as usize * 31 + w[1] as usize) % 1024;
                    v[h] += 1.0;
                }
                v
            })
            .collect())
    }
}

fn doc(title: &str, text: &str) -> Document {
    Document {
        title: title.into(),
        source: format!("test:{title}"),
        text: text.into(),
        published: None,
    }
}

#[test]
fn vectors_follow_the_documents() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("kb");
    let e = Bigrams {
        calls: AtomicUsize::new(0),
    };
    let mut kb = KnowledgeBase::create_with(
        &dir,
        KbConfig {
            embedder: Some("bigrams".into()),
        },
    )
    .unwrap();
    let docs = vec![
        doc("长城", "长城是中国古代的军事防御工程，总长度为21196千米。"),
        doc("黄河", "黄河是中国第二长河，全长约5464千米。"),
        doc("Rust", "Rust 1.0 was released in May 2015."),
    ];
    // Without its model the knowledge base refuses to add (nothing stored).
    let err = kb.add(docs.clone(), |_| {}).unwrap_err();
    assert!(matches!(err, SearchError::Embedder(_)), "{err}");
    assert!(kb.documents().unwrap().is_empty());
    let r = kb.add_with(docs.clone(), Some(&e), |_| {}).unwrap();
    assert_eq!((r.added, kb.vectors()), (3, 3));
    // Duplicates are neither stored nor embedded again.
    let before = e.calls.load(Ordering::Relaxed);
    kb.add_with(docs, Some(&e), |_| {}).unwrap();
    assert_eq!(e.calls.load(Ordering::Relaxed), before);

    let q = e.embed(&["黄河全长多少千米"], true).unwrap().remove(0);
    let hits = kb.search_dense(&q, 2).unwrap();
    assert_eq!(hits[0].title, "黄河");
    assert!(hits[0].text.contains("5464"));
    // Hybrid: BM25 and vectors fused; the query vector is computed once per model.
    let mut asked = Vec::new();
    let fused = search_all(
        [&kb],
        "黄河全长多少千米",
        2,
        0,
        Mode::Hybrid,
        &mut |m, t| {
            asked.push(m.to_string());
            Ok(e.embed(&[t], true).unwrap().remove(0))
        },
    )
    .unwrap();
    assert_eq!(fused[0].title, "黄河");
    assert_eq!(asked, ["bigrams"]);

    // Reopened from disk: the same vectors.
    drop(kb);
    let mut kb = KnowledgeBase::open(&dir).unwrap();
    assert_eq!(kb.vectors(), 3);
    let id = kb.search_dense(&q, 1).unwrap()[0].doc_id.clone();
    assert!(kb.remove(&id).unwrap());
    assert_eq!(kb.vectors(), 2);
    assert_ne!(kb.search_dense(&q, 1).unwrap()[0].title, "黄河");

    // A damaged vector file is reported; rebuild recomputes it.
    std::fs::write(
        dir.join("dense.bin"),
        b"{\"model\":\"bigrams\",\"dim\":1024}\n123",
    )
    .unwrap();
    let e2 = KnowledgeBase::open(&dir)
        .err()
        .expect("refused")
        .to_string();
    assert!(e2.contains("kb rebuild"), "{e2}");
    let kb = KnowledgeBase::rebuild_with(&dir, Some(&e), |_, _| {}).unwrap();
    assert_eq!(kb.vectors(), 2);
    // Vectors of another model are refused.
    std::fs::write(
        dir.join("config.json"),
        serde_json::to_vec(&KbConfig {
            embedder: Some("other".into()),
        })
        .unwrap(),
    )
    .unwrap();
    let e3 = KnowledgeBase::open(&dir)
        .err()
        .expect("refused")
        .to_string();
    assert!(e3.contains("not other"), "{e3}");
}
