//! Whisper base on Hanlin's engine against faster-whisper (CTranslate2,
//! float32), whose transcripts `scripts/whisper_fixtures.py` recorded in
//! `tests/data/whisper_base.json`: the same log-mel features, the same
//! language, and the same tokens in the same timed segments, greedy, with
//! voice-activity detection and temperature fallback off on both sides.
//! Uses the real model (pulled into the store on first use).

use hanlin_speech::{audio, mel, Options, Task};
use serde_json::Value;

fn data(name: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data")
        .join(name)
}

fn wav(name: &str) -> Vec<f32> {
    let bytes = std::fs::read(data(name)).expect("fixture audio");
    let pcm = audio::decode(bytes, Some("wav"), 600.0).expect("decode");
    assert_eq!(pcm.rate, 16_000);
    pcm.samples
}

#[test]
fn transcripts_match_faster_whisper() {
    let store = hanlin_store::Store::open(hanlin_store::Store::default_home()).expect("store");
    let rec = hanlin_speech::load_recognizer(&store, hanlin_store::WHISPER_MODEL, 2, false)
        .expect("whisper-base (pulled on first use)");
    let fixtures: Value =
        serde_json::from_slice(&std::fs::read(data("whisper_base.json")).expect("fixtures"))
            .expect("json");
    let jfk = wav("jfk.wav");
    let mut failures = Vec::new();
    for (name, want) in fixtures.as_object().expect("cases") {
        let samples = match name.as_str() {
            "jfk_x3" => {
                let gap = vec![0f32; 32_000];
                [&jfk[..], &gap, &jfk, &gap, &jfk].concat()
            }
            n => wav(n.split(':').next().unwrap_or(n)),
        };
        // Features at the recorded spots.
        let (m, frames) = mel::log_mel(&samples, 80);
        assert_eq!(
            frames as u64,
            want["frames"].as_u64().unwrap_or(0),
            "{name}"
        );
        for spot in want["mel"].as_array().expect("mel") {
            let (b, t, v) = (
                spot[0].as_u64().unwrap_or(0) as usize,
                spot[1].as_u64().unwrap_or(0) as usize,
                spot[2].as_f64().unwrap_or(0.0) as f32,
            );
            let got = m[b * frames + t];
            assert!(
                (got - v).abs() < 2e-3,
                "{name}: mel[{b}][{t}] = {got}, reference {v}"
            );
        }
        let opts = Options {
            task: if want["task"] == "translate" {
                Task::Translate
            } else {
                Task::Transcribe
            },
            language: want["given_language"].as_str().map(String::from),
            vad: false,
            fallback: false,
            ..Options::default()
        };
        let t = rec
            .transcribe(&samples, &opts, &mut |_, _| true)
            .expect("transcribe");
        assert_eq!(
            t.language,
            want["language"].as_str().unwrap_or(""),
            "{name}"
        );
        let segs = want["segments"].as_array().expect("segments");
        let got: Vec<(f64, f64, &str, &[u32])> = t
            .segments
            .iter()
            .map(|s| (s.start, s.end, s.text.as_str(), &s.tokens[..]))
            .collect();
        let reference: Vec<(f64, f64, String, Vec<u32>)> = segs
            .iter()
            .map(|s| {
                (
                    s["start"].as_f64().unwrap_or(-1.0),
                    s["end"].as_f64().unwrap_or(-1.0),
                    s["text"].as_str().unwrap_or("").to_string(),
                    s["tokens"]
                        .as_array()
                        .map(|a| {
                            a.iter()
                                .filter_map(|v| v.as_u64())
                                .map(|v| v as u32)
                                .collect()
                        })
                        .unwrap_or_default(),
                )
            })
            .collect();
        let same = got.len() == reference.len()
            && got.iter().zip(&reference).all(|(g, r)| {
                (g.0 - r.0).abs() < 1e-6 && (g.1 - r.1).abs() < 1e-6 && g.3 == &r.3[..]
            });
        if !same {
            failures.push(format!(
                "{name}:\n  hanlin:    {got:?}\n  reference: {reference:?}"
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
