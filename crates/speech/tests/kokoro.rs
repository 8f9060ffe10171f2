//! The Kokoro voice on the real model (pulled with ONNX Runtime into the
//! store on first use): the same audio as onnxruntime under Python for the
//! same phonemes (recorded by `scripts/kokoro_fixtures.py`), and speech
//! that Whisper understands — Chinese and English, judged by the error
//! rate of a round trip, with espeak-ng's on the same sentence beside it.

use hanlin_speech::tts::{self, Model, Synth};
use hanlin_speech::{audio, kokoro, Options};

fn store() -> hanlin_store::Store {
    hanlin_store::Store::open(hanlin_store::Store::default_home()).expect("store")
}

#[test]
fn audio_matches_onnxruntime_for_the_same_phonemes() {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/data/kokoro_phonemes.json"
    );
    let f: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).expect("fixture")).expect("json");
    let want = &f["audio"];
    let k =
        hanlin_speech::load_kokoro(&store(), 2, false).expect("kokoro-82m (pulled on first use)");
    let tokens = k
        .voices
        .tokens(want["phonemes"].as_str().expect("phonemes"));
    let voice = want["voice"].as_str().expect("voice");
    let got = k.synthesize(&tokens, voice, 1.0).expect("spoken");
    assert_eq!(got.len() as u64, want["samples"].as_u64().expect("length"));
    assert_eq!(kokoro::RATE, tts::OUTPUT_RATE);
    let mut worst = 0f32;
    for (i, w) in want["every_500th"]
        .as_array()
        .expect("samples")
        .iter()
        .enumerate()
    {
        let w = w.as_f64().expect("sample") as f32;
        worst = worst.max((got[i * 500] - w).abs());
    }
    assert!(worst < 2e-3, "largest difference {worst}");
    assert!(got.iter().any(|s| s.abs() > 0.05), "silent");
    // An unknown pack is a clear error, not a panic.
    assert!(k.synthesize(&tokens, "no_such_voice", 1.0).is_err());
    assert!(k
        .synthesize(&vec![1; kokoro::MAX_TOKENS + 1], voice, 1.0)
        .is_err());
}

/// Edit distance between two sequences.
fn distance<T: PartialEq>(a: &[T], b: &[T]) -> usize {
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, x) in a.iter().enumerate() {
        let mut cur = vec![i + 1];
        for (j, y) in b.iter().enumerate() {
            cur.push(
                (prev[j] + usize::from(x != y))
                    .min(prev[j + 1] + 1)
                    .min(cur[j] + 1),
            );
        }
        prev = cur;
    }
    prev[b.len()]
}

#[test]
fn whisper_understands_kokoro_better_than_espeak() {
    let store = store();
    let k = hanlin_speech::load_kokoro(&store, 2, false).expect("kokoro-82m");
    let synth = Synth::find()
        .expect("espeak-ng is installed")
        .with_kokoro(k);
    let rec = hanlin_speech::load_recognizer(&store, hanlin_store::WHISPER_MODEL, 2, false)
        .expect("whisper-base");
    let alloy = tts::voice("alloy").expect("voice");
    let hear = |samples: Vec<f32>, lang: &str, prompt: Option<&str>| {
        let pcm = audio::Pcm {
            samples,
            rate: tts::OUTPUT_RATE,
        };
        let opts = Options {
            language: Some(lang.into()),
            prompt: prompt.map(String::from),
            ..Options::default()
        };
        rec.transcribe(
            &audio::resample(pcm, 16_000).expect("resampled"),
            &opts,
            &mut |_, _| true,
        )
        .expect("transcribed")
        .text()
    };
    let zh = "今天天气很好，我们去公园散步吧。";
    let han = |s: &str| -> Vec<char> {
        s.chars()
            .filter(|c| ('\u{4e00}'..='\u{9fff}').contains(c))
            .collect()
    };
    let mut errors = Vec::new();
    for model in [Model::Kokoro, Model::Espeak] {
        let (samples, cues) = synth
            .speak_with_visemes(zh, alloy, model, 1.0)
            .expect("spoken");
        assert!(cues.len() > 10, "{model:?}: {cues:?}");
        let heard = hear(samples, "zh", Some("以下是普通话的句子。"));
        errors.push((model, distance(&han(zh), &han(&heard)), heard));
    }
    eprintln!("{errors:?}");
    let (_, kokoro_errors, heard) = &errors[0];
    assert!(*kokoro_errors <= 2, "Kokoro: {zh} heard as {heard}");
    assert!(kokoro_errors <= &errors[1].1, "{errors:?}");

    let en = "Please send me the report before Friday.";
    let words = |s: &str| -> Vec<String> {
        s.split_whitespace()
            .map(|w| {
                w.trim_matches(|c: char| !c.is_alphanumeric())
                    .to_lowercase()
            })
            .collect()
    };
    let samples = synth.speak(en, alloy, Model::Kokoro, 1.0).expect("spoken");
    let heard = hear(samples, "en", None);
    assert!(
        distance(&words(en), &words(&heard)) <= 1,
        "{en} heard as {heard}"
    );
}
