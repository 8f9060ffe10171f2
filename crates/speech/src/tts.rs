//! Speech out. Two synthesisers:
//!
//! - espeak-ng (Debian's `espeak-ng`, run as a child process), always
//!   there and fast: Mandarin spoken from the pinyin [`crate::text`] makes
//!   (fed Hanzi, espeak-ng spells them out as English letters), English as
//!   is. Text goes in on stdin — never on the command line, never as SSML —
//!   and `[[`/`]]` (espeak's inline phoneme syntax) are removed, so input
//!   text cannot steer the synthesiser. Each call is bounded in time and
//!   output.
//! - Kokoro-82M ([`crate::kokoro`]), when it is pulled: a natural voice,
//!   about ten times slower. It reads phonemes ([`crate::phonemes`]):
//!   Mandarin from the same pinyin, English from espeak-ng's IPA.
//!
//! Voices: OpenAI's names (`alloy`, `nova`, …) each pick one of espeak-ng's
//! voice variants and one of Kokoro's voice packs, so unchanged clients
//! work.

use crate::kokoro::{Kokoro, MAX_TOKENS};
use crate::text::{self, Run};
use crate::viseme::{self, Cue};
use crate::{phonemes, SpeechError};
use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The rate `/v1/audio/speech` delivers (as OpenAI's does).
pub const OUTPUT_RATE: u32 = 24_000;

/// Which synthesiser speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Model {
    Espeak,
    Kokoro,
}

/// Speech model names and the synthesiser each asks for: OpenAI's fast
/// `tts-1` is espeak-ng; its better `tts-1-hd` and `gpt-4o-mini-tts` are
/// Kokoro when it is pulled (espeak-ng otherwise, so unchanged clients
/// always get speech); the synthesisers' own names ask for exactly them.
pub const MODEL_NAMES: &[(&str, Model)] = &[
    ("tts-1", Model::Espeak),
    ("espeak-ng", Model::Espeak),
    ("tts-1-hd", Model::Kokoro),
    ("gpt-4o-mini-tts", Model::Kokoro),
    (hanlin_store::KOKORO_MODEL, Model::Kokoro),
];

/// The synthesiser model `name` asks for, and whether it may fall back
/// to espeak-ng when Kokoro is not there.
pub fn model(name: &str) -> Option<(Model, bool)> {
    let (_, m) = MODEL_NAMES.iter().find(|(n, _)| *n == name)?;
    Some((*m, name != hanlin_store::KOKORO_MODEL))
}

/// A voice: OpenAI's name, the espeak-ng variant and the Kokoro voice
/// pack it speaks with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Voice {
    pub name: &'static str,
    variant: &'static str,
    pack: &'static str,
}

const fn v(name: &'static str, variant: &'static str, pack: &'static str) -> Voice {
    Voice {
        name,
        variant,
        pack,
    }
}

/// Kokoro's only published packs are Japanese voices (four women, one
/// man); they speak Mandarin and English with an accent.
pub const VOICES: &[Voice] = &[
    v("alloy", "f2", "jf_alpha"),
    v("ash", "m1", "jm_kumo"),
    v("ballad", "m5", "jm_kumo"),
    v("coral", "f1", "jf_gongitsune"),
    v("echo", "m3", "jm_kumo"),
    v("fable", "m2", "jm_kumo"),
    v("nova", "f3", "jf_nezumi"),
    v("onyx", "m4", "jm_kumo"),
    v("sage", "f5", "jf_tebukuro"),
    v("shimmer", "f4", "jf_alpha"),
    v("verse", "m6", "jm_kumo"),
];

pub fn voice(name: &str) -> Option<Voice> {
    let name = name.trim().to_lowercase();
    VOICES.iter().copied().find(|v| v.name == name)
}

/// Longest wait for one espeak-ng call.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// Most output one call may produce (bytes of WAV): ten minutes at 22 kHz.
const MAX_OUTPUT: usize = 22_050 * 2 * 600;

pub struct Synth {
    espeak: PathBuf,
    kokoro: Option<Kokoro>,
}

impl Synth {
    /// espeak-ng from `$HANLIN_ESPEAK` or the `PATH`.
    pub fn find() -> Result<Self, SpeechError> {
        let espeak = std::env::var_os("HANLIN_ESPEAK")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("espeak-ng"));
        let ok = Command::new(&espeak)
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            return Err(SpeechError::Model(
                "espeak-ng is not installed (Debian/Ubuntu: apt install espeak-ng; or set HANLIN_ESPEAK)"
                    .into(),
            ));
        }
        Ok(Self {
            espeak,
            kokoro: None,
        })
    }

    /// This synthesiser, with Kokoro too.
    pub fn with_kokoro(self, kokoro: Kokoro) -> Self {
        Self {
            kokoro: Some(kokoro),
            ..self
        }
    }

    pub fn has(&self, model: Model) -> bool {
        model == Model::Espeak || self.kokoro.is_some()
    }

    /// One sentence (or any short text) as mono samples at
    /// [`OUTPUT_RATE`]; `speed` 0.25–4.0 as OpenAI's.
    pub fn speak(
        &self,
        sentence: &str,
        v: Voice,
        model: Model,
        speed: f32,
    ) -> Result<Vec<f32>, SpeechError> {
        Ok(self.say(sentence, v, model, speed, false)?.0)
    }

    /// [`Synth::speak`], with the mouth shapes to show as it plays
    /// ([`crate::viseme`]: the phonemes of each run, laid over that run's
    /// audio).
    pub fn speak_with_visemes(
        &self,
        sentence: &str,
        v: Voice,
        model: Model,
        speed: f32,
    ) -> Result<(Vec<f32>, Vec<Cue>), SpeechError> {
        self.say(sentence, v, model, speed, true)
    }

    fn say(
        &self,
        sentence: &str,
        v: Voice,
        model: Model,
        speed: f32,
        visemes: bool,
    ) -> Result<(Vec<f32>, Vec<Cue>), SpeechError> {
        let mut out = Vec::new();
        let mut cues: Vec<Cue> = Vec::new();
        if model == Model::Kokoro {
            let k = self
                .kokoro
                .as_ref()
                .ok_or_else(|| SpeechError::Model("the Kokoro voice is not loaded".into()))?;
            let ps = self.kokoro_phonemes(sentence)?;
            for piece in pieces(&ps, |c| k.voices.knows(c), MAX_TOKENS) {
                let samples =
                    k.synthesize(&k.voices.tokens(&piece), v.pack, speed.clamp(0.5, 2.0))?;
                if visemes {
                    let sounds = viseme::mouths(&phonemes::as_ipa(&piece));
                    add_cues(&mut cues, &out, &sounds, &samples);
                }
                out.extend(samples);
            }
            return Ok((out, cues));
        }
        for run in text::runs(sentence) {
            let (lang, words) = match run {
                Run::Chinese(p) => ("cmn-latn-pinyin", p),
                Run::English(t) => ("en-us", t),
            };
            let voice = format!("{lang}+{}", v.variant);
            let wav = self.call(&words, &voice, speed, &["--stdout"])?;
            // A WAV whose sizes say "unknown" (it streams): the decoder
            // reads to the end.
            let pcm = crate::audio::decode(wav, Some("wav"), f64::INFINITY)
                .map_err(|e| SpeechError::Model(format!("espeak-ng's output: {e}")))?;
            let samples = crate::audio::resample(pcm, OUTPUT_RATE)?;
            if visemes {
                let ipa = self.call(&words, &voice, speed, &["-q", "--ipa"])?;
                let sounds = viseme::mouths(&String::from_utf8_lossy(&ipa));
                add_cues(&mut cues, &out, &sounds, &samples);
            }
            out.extend(samples);
        }
        Ok((out, cues))
    }

    /// A sentence as Kokoro's phonemes: Chinese from its pinyin, English
    /// clause by clause from espeak-ng's IPA, the punctuation kept.
    pub fn kokoro_phonemes(&self, sentence: &str) -> Result<String, SpeechError> {
        let mut parts = Vec::new();
        for (zh, s) in text::segments(sentence) {
            if zh {
                parts.push(phonemes::chinese(&text::pinyin_words(&s)));
                continue;
            }
            for (clause, marks) in phonemes::english_clauses(&s) {
                let ipa = self.call(&clause, "en-us", 1.0, &["-q", "--ipa", "--tie=^"])?;
                let ipa = String::from_utf8_lossy(&ipa);
                parts.push(format!("{}{marks}", phonemes::english(&ipa)));
            }
        }
        parts.retain(|p| !p.is_empty());
        Ok(parts.join(" "))
    }

    /// One espeak-ng call on `words` (its stdout, bounded in time and
    /// size); `mode` is `--stdout` (WAV) or `-q --ipa` (phonemes).
    fn call(
        &self,
        words: &str,
        voice: &str,
        speed: f32,
        mode: &[&str],
    ) -> Result<Vec<u8>, SpeechError> {
        let words = strip_phoneme_input(words);
        let wpm = (175.0 * speed.clamp(0.25, 4.0)).clamp(80.0, 450.0) as u32;
        let mut child = Command::new(&self.espeak)
            .args(["-v", voice, "-s", &wpm.to_string(), "-b", "1"])
            .args(mode)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| SpeechError::Model(format!("cannot run espeak-ng: {e}")))?;
        let mut stdin = child.stdin.take();
        let feed = std::thread::spawn(move || {
            if let Some(s) = stdin.as_mut() {
                let _ = s.write_all(words.as_bytes());
            }
        });
        let mut stdout = child
            .stdout
            .take()
            .ok_or_else(|| SpeechError::Model("espeak-ng has no output".into()))?;
        let reader = std::thread::spawn(move || {
            let mut buf = Vec::new();
            let r = (&mut stdout)
                .take(MAX_OUTPUT as u64 + 1)
                .read_to_end(&mut buf);
            r.map(|_| buf)
        });
        let started = Instant::now();
        let status = loop {
            match child.try_wait() {
                Ok(Some(s)) => break s,
                Ok(None) if started.elapsed() > CALL_TIMEOUT => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(SpeechError::Model("espeak-ng took too long".into()));
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(5)),
                Err(e) => return Err(SpeechError::Model(format!("espeak-ng: {e}"))),
            }
        };
        let _ = feed.join();
        let wav = reader
            .join()
            .map_err(|_| SpeechError::Model("espeak-ng output reader failed".into()))?
            .map_err(|e| SpeechError::Model(format!("reading espeak-ng: {e}")))?;
        if !status.success() {
            return Err(SpeechError::Model(format!("espeak-ng failed ({status})")));
        }
        if wav.len() > MAX_OUTPUT {
            return Err(SpeechError::BadRequest(
                "the text is too long to speak at once".into(),
            ));
        }
        Ok(wav)
    }
}

/// Cues for `sounds` laid over `samples`, which follow `before` in the
/// output: appended to `cues`, one per change of mouth.
fn add_cues(cues: &mut Vec<Cue>, before: &[f32], sounds: &[viseme::Mouth], samples: &[f32]) {
    let start = (before.len() as u64 * 1000 / OUTPUT_RATE as u64) as u32;
    for c in viseme::align(sounds, samples, OUTPUT_RATE) {
        let at_ms = start + c.at_ms;
        match cues.last_mut() {
            Some(last) if last.at_ms >= at_ms => last.mouth = c.mouth,
            Some(last) if last.mouth == c.mouth => {}
            _ => cues.push(Cue { at_ms, ..c }),
        }
    }
}

/// `text` cut into pieces of at most `max` characters that `counts`
/// (the rest ride along free): after punctuation where it can, else
/// between words, else anywhere.
fn pieces(text: &str, counts: impl Fn(char) -> bool, max: usize) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = text.trim();
    loop {
        // Where the longest prefix that fits ends: at the counted
        // character past `max`, if there is one.
        let over = rest
            .char_indices()
            .filter(|&(_, c)| counts(c))
            .nth(max)
            .map(|(i, _)| i);
        let Some(fit) = over.filter(|&i| i > 0) else {
            break;
        };
        let head = &rest[..fit];
        let cut = head
            .rfind(['.', '!', '?', ';', ',', ':'])
            .map(|i| i + 1)
            .filter(|&i| i > fit / 2)
            .or_else(|| head.rfind(' ').filter(|&i| i > 0))
            .unwrap_or(fit);
        out.push(rest[..cut].trim().to_string());
        rest = rest[cut..].trim_start();
    }
    if !rest.is_empty() {
        out.push(rest.to_string());
    }
    out
}

/// `[[`…`]]` is espeak-ng's inline phoneme syntax: user text must not
/// reach it, so the brackets go (whatever they held is read as words).
fn strip_phoneme_input(words: &str) -> String {
    let mut s = words.to_string();
    while s.contains("[[") || s.contains("]]") {
        s = s.replace("[[", " ").replace("]]", " ");
    }
    s
}

/// The header of a WAV stream of 16-bit mono samples at `rate` whose length
/// is not known yet (sizes set to the largest value, as streaming
/// encoders write them).
pub fn wav_stream_header(rate: u32) -> Vec<u8> {
    let mut h = crate::audio::wav_bytes(&[], rate);
    h[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
    h[40..44].copy_from_slice(&(u32::MAX - 36).to_le_bytes());
    h
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::viseme::Mouth;

    #[test]
    fn openai_model_names_pick_a_synthesiser() {
        assert_eq!(model("tts-1"), Some((Model::Espeak, true)));
        assert_eq!(model("tts-1-hd"), Some((Model::Kokoro, true)));
        assert_eq!(model("gpt-4o-mini-tts"), Some((Model::Kokoro, true)));
        // Asked for by name, Kokoro is not replaced by espeak-ng.
        assert_eq!(model("kokoro-82m"), Some((Model::Kokoro, false)));
        assert_eq!(model("tts-2"), None);
        assert!(VOICES
            .iter()
            .all(|v| v.pack.starts_with("jf_") || v.pack == "jm_kumo"));
    }

    #[test]
    fn long_phoneme_strings_are_cut_at_pauses_then_words() {
        let counts = |c: char| c != ' ';
        let count = |s: &str| s.chars().filter(|&c| counts(c)).count();
        let text = "aaaa bbbb, cccc dddd eeee. ffff";
        let p = pieces(text, counts, 12);
        assert_eq!(p, ["aaaa bbbb,", "cccc dddd", "eeee. ffff"]);
        assert!(p.iter().all(|x| count(x) <= 12));
        let long = "x".repeat(30);
        let p = pieces(&long, counts, 12);
        assert_eq!(p.concat(), long);
        assert!(p.iter().all(|x| count(x) <= 12), "{p:?}");
        assert_eq!(pieces("short", counts, 12), ["short"]);
        assert!(pieces("   ", counts, 12).is_empty());
    }

    #[test]
    fn phoneme_brackets_never_reach_espeak() {
        assert_eq!(strip_phoneme_input("a [[h@'loU]] b"), "a  h@'loU  b");
        assert!(!strip_phoneme_input("[[[[x]]]]").contains("[["));
        assert!(!strip_phoneme_input("[[[x]]]").contains("]]"));
    }

    /// espeak-ng is a test dependency (CI installs it).
    #[test]
    fn visemes_follow_the_spoken_sentence() {
        let synth = Synth::find().expect("espeak-ng is installed");
        let alloy = voice("alloy").expect("a voice");
        let (audio, cues) = synth
            .speak_with_visemes("妈妈好。Hello, mama.", alloy, Model::Espeak, 1.0)
            .expect("spoken");
        let end_ms = (audio.len() as u64 * 1000 / OUTPUT_RATE as u64) as u32;
        assert!(cues.windows(2).all(|w| w[0].at_ms < w[1].at_ms), "{cues:?}");
        assert!(cues
            .last()
            .is_some_and(|c| c.mouth == Mouth::Rest && c.at_ms <= end_ms + 10));
        let shapes: Vec<Mouth> = cues.iter().map(|c| c.mouth).collect();
        // m closes the lips, a opens them, o rounds them ("hello").
        for m in [Mouth::Closed, Mouth::Open, Mouth::Round] {
            assert!(shapes.contains(&m), "{m:?} missing in {cues:?}");
        }
        // The same audio as speak().
        assert_eq!(
            audio,
            synth
                .speak("妈妈好。Hello, mama.", alloy, Model::Espeak, 1.0)
                .expect("spoken")
        );
    }
}
