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
        let mut out = Vec::new();
        for run in text::runs(sentence) {
            let (lang, words) = match run {
                Run::Chinese(p) => ("cmn-latn-pinyin", p),
                Run::English(t) => ("en-us", t),
            };
            let pcm = self.espeak(&words, &format!("{lang}+{}", v.variant), speed)?;
            out.extend(crate::audio::resample(pcm, OUTPUT_RATE)?);
        }
        Ok(out)
    }

    fn espeak(
        &self,
        words: &str,
        voice: &str,
        speed: f32,
    ) -> Result<crate::audio::Pcm, SpeechError> {
        let words = words.replace("[[", " ").replace("]]", " ");
        let wpm = (175.0 * speed.clamp(0.25, 4.0)).clamp(80.0, 450.0) as u32;
        let mut child = Command::new(&self.espeak)
            .args(["-v", voice, "-s", &wpm.to_string(), "-b", "1", "--stdout"])
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
        // A WAV whose sizes say "unknown" (it streams): the decoder reads
        // to the end.
        crate::audio::decode(wav, Some("wav"), f64::INFINITY)
            .map_err(|e| SpeechError::Model(format!("espeak-ng's output: {e}")))
    }
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
