//! Hanlin's phonemes for Kokoro against misaki's (the G2P Kokoro was
//! trained with), recorded once by `scripts/kokoro_fixtures.py`: every
//! pinyin syllable of the CJK Unified Ideographs, and English sentences
//! through espeak-ng (a test dependency CI installs).

use hanlin_speech::{phonemes, tts};

fn fixture() -> serde_json::Value {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/data/kokoro_phonemes.json"
    );
    let text = std::fs::read_to_string(path).expect("fixture");
    serde_json::from_str(&text).expect("json")
}

#[test]
fn every_pinyin_syllable_matches_misaki() {
    let f = fixture();
    let table = f["pinyin"].as_object().expect("pinyin table");
    assert!(table.len() > 1400, "{} syllables", table.len());
    let wrong: Vec<String> = table
        .iter()
        .filter_map(|(py, ipa)| {
            let ours = phonemes::syllable(py);
            (ours.as_deref() != ipa.as_str()).then(|| format!("{py}: {ours:?} vs {ipa}"))
        })
        .collect();
    assert!(wrong.is_empty(), "{} differ: {wrong:#?}", wrong.len());
}

#[test]
fn english_matches_misaki_through_espeak() {
    let f = fixture();
    let synth = tts::Synth::find().expect("espeak-ng is installed");
    for (text, want) in f["english"].as_object().expect("english") {
        let ours = synth.kokoro_phonemes(text).expect("phonemes");
        assert_eq!(&ours, want.as_str().unwrap_or_default(), "{text}");
    }
}
