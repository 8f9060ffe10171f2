//! A knowledge base on disk: Chinese and English retrieval, deduplication,
//! a deleted or damaged index (clear error, then rebuilt from the stored
//! documents), removal.

use hanlin_search::{Document, KnowledgeBase, Retriever, SearchError};

fn doc(title: &str, text: &str) -> Document {
    Document {
        title: title.into(),
        source: format!("test/{title}"),
        text: text.into(),
        published: None,
    }
}

fn corpus() -> Vec<Document> {
    vec![
        doc("静夜思", "床前明月光，疑是地上霜。举头望明月，低头思故乡。这首诗是唐代诗人李白所作。"),
        doc("春晓", "春眠不觉晓，处处闻啼鸟。夜来风雨声，花落知多少。作者是唐代诗人孟浩然。"),
        doc("登鹳雀楼", "白日依山尽，黄河入海流。欲穷千里目，更上一层楼。作者是王之涣。"),
        doc("Rust", "Rust is a systems programming language focused on safety. Its compiler is called rustc."),
        doc("Python", "Python is a dynamically typed language. Its reference implementation is CPython."),
    ]
}

#[test]
fn chinese_and_english_queries_find_their_documents() {
    let dir = tempfile::tempdir().expect("tmp");
    let kb_dir = dir.path().join("poems");
    let mut kb = KnowledgeBase::create(&kb_dir).expect("create");
    assert!(matches!(
        KnowledgeBase::create(&kb_dir),
        Err(SearchError::Exists(_))
    ));
    let mut seen = 0;
    let r = kb.add(corpus(), |n| seen = n).expect("add");
    assert_eq!((r.added, r.duplicates, seen), (5, 0, 5));
    // The same text again (with different spacing) is a duplicate.
    let again = doc(
        "副本",
        "床前明月光，疑是地上霜。  举头望明月，低头思故乡。\n这首诗是唐代诗人李白所作。",
    );
    let r = kb.add(vec![again], |_| {}).expect("add");
    assert_eq!((r.added, r.duplicates), (0, 1));

    for (q, want) in [
        ("谁写了《春晓》？", "春晓"),
        ("举头望明月的下一句是什么", "静夜思"),
        ("黄河入海流", "登鹳雀楼"),
        ("李白", "静夜思"),
        ("What is the Rust compiler called?", "Rust"),
        ("cpython", "Python"),
    ] {
        let hits = kb.search(q, 3).expect("search");
        assert_eq!(
            hits.first().map(|h| h.title.as_str()),
            Some(want),
            "{q}: {hits:?}"
        );
    }
    assert!(kb.search("量子计算机", 3).expect("search").is_empty());
    assert!(kb.search("   ？！", 3).expect("search").is_empty());

    // Reopened, everything is there.
    drop(kb);
    let kb = KnowledgeBase::open(&kb_dir).expect("open");
    assert_eq!(kb.documents().expect("docs").len(), 5);

    // A deleted index: a clear error naming the fix; rebuild restores it.
    drop(kb);
    std::fs::remove_dir_all(kb_dir.join("index")).expect("rm");
    let e = KnowledgeBase::open(&kb_dir)
        .err()
        .expect("an error")
        .to_string();
    assert!(e.contains("hanlin kb rebuild"), "{e}");
    // A damaged one too.
    std::fs::create_dir_all(kb_dir.join("index")).expect("mkdir");
    std::fs::write(kb_dir.join("index/meta.json"), "{garbage").expect("write");
    let e = KnowledgeBase::open(&kb_dir)
        .err()
        .expect("an error")
        .to_string();
    assert!(e.contains("hanlin kb rebuild"), "{e}");
    let mut calls = 0;
    let mut kb = KnowledgeBase::rebuild(&kb_dir, |_, _| calls += 1).expect("rebuild");
    assert_eq!(calls, 5);
    assert_eq!(kb.search("孟浩然", 1).expect("search")[0].title, "春晓");

    // Removing a document takes its passages out of the index.
    let id = kb.search("孟浩然", 1).expect("search")[0].doc_id.clone();
    assert!(kb.remove(&id).expect("remove"));
    assert!(kb
        .search("孟浩然", 3)
        .expect("search")
        .iter()
        .all(|h| h.doc_id != id));
    assert_eq!(kb.documents().expect("docs").len(), 4);
    assert!(matches!(
        KnowledgeBase::open(&dir.path().join("none")),
        Err(SearchError::NotFound(_))
    ));
}
