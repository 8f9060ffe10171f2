//! Uploaded audio on arbitrary bytes: every container symphonia probes
//! (WAV, MP3, Ogg, WebM/Matroska, FLAC, MP4/ADTS) and the Opus decoder
//! behind Ogg and WebM. An error, never a crash, a hang or unbounded memory
//! (at most 5 seconds of audio are decoded). Seed it with the fixtures in
//! crates/speech/tests/data (jfk.webm, jfk.opus, jfk.wav).
//!
//! `audio::decode` turns a decoder's panic into a clear error (symphonia's
//! Matroska reader panics on a truncated file, its ADTS reader on a zero
//! step): the panic hook is silenced so that those do not stop the run; a
//! panic that escapes `decode` still unwinds into libFuzzer and is reported.
#![no_main]
use libfuzzer_sys::fuzz_target;

static QUIET: std::sync::Once = std::sync::Once::new();

fuzz_target!(|data: &[u8]| {
    QUIET.call_once(|| std::panic::set_hook(Box::new(|_| {})));
    let _ = hanlin_speech::audio::decode(data.to_vec(), None, 5.0);
});
