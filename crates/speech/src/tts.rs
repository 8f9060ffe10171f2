//! Speech out with espeak-ng (Debian's `espeak-ng`, run as a child
//! process): Mandarin spoken from the pinyin [`crate::text`] makes (fed
//! Hanzi, espeak-ng spells them out as English letters), English as is.
//! Text goes in on stdin — never on the command line, never as SSML — and
//! `[[`/`]]` (espeak's inline phoneme syntax) are removed, so input text
//! cannot steer the synthesiser. Each call is bounded in time and output.
//!
//! Voices: OpenAI's names (`alloy`, `nova`, …) each pick one of espeak-ng's
//! voice variants, so unchanged clients work.

use crate::text::{self, Run};
use crate::viseme::{self, Cue};
use crate::SpeechError;
use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The rate `/v1/audio/speech` delivers (as OpenAI's does).
pub const OUTPUT_RATE: u32 = 24_000;

/// A voice: OpenAI's name and the espeak-ng variant it speaks with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Voice {
    pub name: &'static str,
    variant: &'static str,
}

pub const VOICES: &[Voice] = &[
    Voice {
        name: "alloy",
        variant: "f2",
    },
    Voice {
        name: "ash",
        variant: "m1",
    },
    Voice {
        name: "ballad",
        variant: "m5",
    },
    Voice {
        name: "coral",
        variant: "f1",
    },
    Voice {
        name: "echo",
        variant: "m3",
    },
    Voice {
        name: "fable",
        variant: "m2",
    },
    Voice {
        name: "nova",
        variant: "f3",
    },
    Voice {
        name: "onyx",
        variant: "m4",
    },
    Voice {
        name: "sage",
        variant: "f5",
    },
    Voice {
        name: "shimmer",
        variant: "f4",
    },
    Voice {
        name: "verse",
        variant: "m6",
    },
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
        Ok(Self { espeak })
    }

    /// One sentence (or any short text) as mono samples at
    /// [`OUTPUT_RATE`]; `speed` 0.25–4.0 as OpenAI's.
    pub fn speak(&self, sentence: &str, v: Voice, speed: f32) -> Result<Vec<f32>, SpeechError> {
        Ok(self.say(sentence, v, speed, false)?.0)
    }

    /// [`Synth::speak`], with the mouth shapes to show as it plays
    /// ([`crate::viseme`]: espeak-ng's phonemes of each run, laid over
    /// that run's audio).
    pub fn speak_with_visemes(
        &self,
        sentence: &str,
        v: Voice,
        speed: f32,
    ) -> Result<(Vec<f32>, Vec<Cue>), SpeechError> {
        self.say(sentence, v, speed, true)
    }

    fn say(
        &self,
        sentence: &str,
        v: Voice,
        speed: f32,
        visemes: bool,
    ) -> Result<(Vec<f32>, Vec<Cue>), SpeechError> {
        let mut out = Vec::new();
        let mut cues: Vec<Cue> = Vec::new();
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
                let start = (out.len() as u64 * 1000 / OUTPUT_RATE as u64) as u32;
                let sounds = viseme::mouths(&String::from_utf8_lossy(&ipa));
                for c in viseme::align(&sounds, &samples, OUTPUT_RATE) {
                    let at_ms = start + c.at_ms;
                    match cues.last_mut() {
                        Some(last) if last.at_ms >= at_ms => last.mouth = c.mouth,
                        Some(last) if last.mouth == c.mouth => {}
                        _ => cues.push(Cue { at_ms, ..c }),
                    }
                }
            }
            out.extend(samples);
        }
        Ok((out, cues))
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
            .speak_with_visemes("妈妈好。Hello, mama.", alloy, 1.0)
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
                .speak("妈妈好。Hello, mama.", alloy, 1.0)
                .expect("spoken")
        );
    }
}
