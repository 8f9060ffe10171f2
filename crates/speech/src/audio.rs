//! Audio in: any container and codec `symphonia` reads (WAV, MP3, Ogg
//! Vorbis, FLAC, AAC in MP4/M4A), and Opus in Ogg or WebM (what browsers
//! record) with `opus-decoder`, mixed down to mono and resampled to
//! 16 kHz (`rubato`, FFT-based). Decoding is bounded: audio longer than
//! the caller's limit stops with an error instead of filling memory.

use crate::SpeechError;
use rubato::{FftFixedIn, Resampler};
use symphonia::core::audio::SampleBuffer;
use symphonia::core::codecs::{DecoderOptions, CODEC_TYPE_NULL, CODEC_TYPE_OPUS};
use symphonia::core::errors::Error as SymErr;
use symphonia::core::formats::FormatOptions;
use symphonia::core::io::MediaSourceStream;
use symphonia::core::meta::MetadataOptions;
use symphonia::core::probe::Hint;

/// The rate Whisper hears at.
pub const SAMPLE_RATE: u32 = 16_000;

/// Mono samples at `rate`.
#[derive(Debug, Clone)]
pub struct Pcm {
    pub samples: Vec<f32>,
    pub rate: u32,
}

impl Pcm {
    pub fn seconds(&self) -> f64 {
        self.samples.len() as f64 / self.rate.max(1) as f64
    }
}

/// Decode an audio file's bytes (`ext`: the file name's extension, a hint
/// only) into mono samples; more than `max_seconds` of audio is an error.
/// The decoders see untrusted bytes, and some of symphonia's panic on
/// crafted input (found by fuzzing: its ADTS reader divides a range by a
/// zero step): a panic is a damaged file, not a crash.
pub fn decode(bytes: Vec<u8>, ext: Option<&str>, max_seconds: f64) -> Result<Pcm, SpeechError> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        decode_unguarded(bytes, ext, max_seconds)
    }))
    .unwrap_or_else(|_| {
        Err(SpeechError::BadAudio(
            "the file is damaged: the decoder could not read it".into(),
        ))
    })
}

fn decode_unguarded(
    bytes: Vec<u8>,
    ext: Option<&str>,
    max_seconds: f64,
) -> Result<Pcm, SpeechError> {
    if bytes.is_empty() {
        return Err(SpeechError::BadAudio("the file is empty".into()));
    }
    let mut hint = Hint::new();
    if let Some(e) = ext {
        hint.with_extension(e);
    }
    let mss = MediaSourceStream::new(Box::new(std::io::Cursor::new(bytes)), Default::default());
    let probed = symphonia::default::get_probe()
        .format(
            &hint,
            mss,
            &FormatOptions::default(),
            &MetadataOptions::default(),
        )
        .map_err(|e| match e {
            SymErr::Unsupported(_) => SpeechError::Unsupported(
                "not a supported audio file (WAV, MP3, Ogg, WebM, FLAC or M4A/AAC)".into(),
            ),
            e => SpeechError::BadAudio(format!("cannot read the audio: {e}")),
        })?;
    let mut format = probed.format;
    let track = format
        .tracks()
        .iter()
        .find(|t| t.codec_params.codec != CODEC_TYPE_NULL)
        .ok_or_else(|| SpeechError::BadAudio("the file holds no audio track".into()))?;
    let track_id = track.id;
    let mut codec = if track.codec_params.codec == CODEC_TYPE_OPUS {
        Codec::opus(&track.codec_params)?
    } else {
        let decoder = symphonia::default::get_codecs()
            .make(&track.codec_params, &DecoderOptions::default())
            .map_err(|e| match e {
                SymErr::Unsupported(what) => SpeechError::Unsupported(format!(
                    "the audio codec is not supported ({what}); send WAV, MP3, Ogg (Vorbis or Opus), WebM/Opus, FLAC or AAC"
                )),
                e => SpeechError::BadAudio(format!("cannot decode the audio: {e}")),
            })?;
        Codec::Symphonia(decoder, None)
    };
    let mut rate = track.codec_params.sample_rate.unwrap_or(0);
    let mut samples: Vec<f32> = Vec::new();
    let mut bad_packets = 0usize;
    loop {
        let packet = match format.next_packet() {
            Ok(p) => p,
            Err(SymErr::IoError(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => break,
            Err(SymErr::ResetRequired) => break,
            Err(e) => {
                if samples.is_empty() {
                    return Err(SpeechError::BadAudio(format!("cannot read the audio: {e}")));
                }
                // A damaged tail: keep what was decoded.
                tracing::debug!("audio read stopped early: {e}");
                break;
            }
        };
        if packet.track_id() != track_id {
            continue;
        }
        match codec.decode(&packet, &mut samples) {
            Ok(r) => rate = r,
            Err(Skip::Packet(e)) => {
                bad_packets += 1;
                tracing::debug!("skipped a damaged audio packet: {e}");
                continue;
            }
            Err(Skip::Rest) => break,
            Err(Skip::Fatal(e)) => return Err(e),
        }
        if rate > 0 && samples.len() as f64 / rate as f64 > max_seconds {
            return Err(SpeechError::TooLong { max_seconds });
        }
    }
    if rate == 0 {
        return Err(SpeechError::BadAudio("the audio has no sample rate".into()));
    }
    if samples.is_empty() {
        return Err(SpeechError::BadAudio(if bad_packets > 0 {
            "no packet of the audio could be decoded".into()
        } else {
            "the file holds no audio".into()
        }));
    }
    Ok(Pcm { samples, rate })
}

/// What decodes a track's packets: one of symphonia's codecs, or Opus
/// (`opus-decoder`, pure Rust: symphonia demuxes Ogg and WebM/Matroska but
/// has no Opus codec, and browsers record WebM/Opus).
enum Codec {
    Symphonia(
        Box<dyn symphonia::core::codecs::Decoder>,
        Option<SampleBuffer<f32>>,
    ),
    Opus {
        decoder: Box<opus_decoder::OpusDecoder>,
        channels: usize,
        /// Samples still to drop at the start (the stream's pre-skip).
        skip: usize,
        frame: Vec<f32>,
    },
}

/// Why a packet gave no samples.
enum Skip {
    /// A damaged packet: skip it.
    Packet(String),
    /// The stream ended.
    Rest,
    Fatal(SpeechError),
}

/// The rate Opus is decoded at.
const OPUS_RATE: u32 = 48_000;

impl Codec {
    fn opus(params: &symphonia::core::codecs::CodecParameters) -> Result<Self, SpeechError> {
        // The Ogg and Matroska mappings keep the OpusHead (RFC 7845) as
        // extra data: channel count at 9, pre-skip (u16 LE) at 10.
        let head = params
            .extra_data
            .as_deref()
            .filter(|h| h.len() >= 19 && h.starts_with(b"OpusHead"));
        let channels = head
            .map(|h| h[9] as usize)
            .or_else(|| params.channels.map(|c| c.count()))
            .unwrap_or(1);
        let skip = head.map_or(0, |h| u16::from_le_bytes([h[10], h[11]]) as usize);
        if !(1..=2).contains(&channels) {
            return Err(SpeechError::Unsupported(format!(
                "Opus with {channels} channels is not supported; send mono or stereo"
            )));
        }
        let decoder = opus_decoder::OpusDecoder::new(OPUS_RATE, channels)
            .map_err(|e| SpeechError::BadAudio(format!("cannot decode the Opus audio: {e}")))?;
        // The longest Opus packet: 120 ms.
        let frame = vec![0.0; OPUS_RATE as usize * 120 / 1000 * channels];
        Ok(Codec::Opus {
            decoder: Box::new(decoder),
            channels,
            skip,
            frame,
        })
    }

    /// Decode one packet, appending mono samples; the rate they are at.
    fn decode(
        &mut self,
        packet: &symphonia::core::formats::Packet,
        out: &mut Vec<f32>,
    ) -> Result<u32, Skip> {
        match self {
            Codec::Symphonia(decoder, buf) => {
                let decoded = match decoder.decode(packet) {
                    Ok(d) => d,
                    Err(SymErr::DecodeError(e)) => return Err(Skip::Packet(e.to_string())),
                    Err(SymErr::IoError(_)) => return Err(Skip::Rest),
                    Err(e) => {
                        return Err(Skip::Fatal(SpeechError::BadAudio(format!(
                            "cannot decode the audio: {e}"
                        ))))
                    }
                };
                let spec = *decoded.spec();
                let channels = spec.channels.count().max(1);
                let b = match buf {
                    Some(b) if b.capacity() >= decoded.capacity() * channels => b,
                    _ => buf.insert(SampleBuffer::new(decoded.capacity() as u64, spec)),
                };
                b.copy_interleaved_ref(decoded);
                for frame in b.samples().chunks_exact(channels) {
                    out.push(frame.iter().sum::<f32>() / channels as f32);
                }
                Ok(spec.rate)
            }
            Codec::Opus {
                decoder,
                channels,
                skip,
                frame,
            } => {
                let n = decoder
                    .decode_float(&packet.data, frame, false)
                    .map_err(|e| Skip::Packet(e.to_string()))?;
                let c = *channels;
                let mono = frame[..n * c]
                    .chunks_exact(c)
                    .map(|f| f.iter().sum::<f32>() / c as f32);
                let drop = (*skip).min(n);
                *skip -= drop;
                out.extend(mono.skip(drop));
                Ok(OPUS_RATE)
            }
        }
    }
}

/// `pcm` at 16 kHz.
pub fn to_16k(pcm: Pcm) -> Result<Vec<f32>, SpeechError> {
    resample(pcm, SAMPLE_RATE)
}

/// `pcm` at `rate`.
pub fn resample(pcm: Pcm, rate: u32) -> Result<Vec<f32>, SpeechError> {
    if pcm.rate == rate {
        return Ok(pcm.samples);
    }
    let (from, to) = (pcm.rate as usize, rate as usize);
    let chunk = 1024;
    let mut r = FftFixedIn::<f32>::new(from, to, chunk, 2, 1)
        .map_err(|e| SpeechError::BadAudio(format!("cannot resample from {from} Hz: {e}")))?;
    let want = (pcm.samples.len() as u64 * to as u64).div_ceil(from as u64) as usize;
    let delay = r.output_delay();
    let mut out = Vec::with_capacity(want + delay + chunk);
    let mut at = 0;
    let err = |e: rubato::ResampleError| SpeechError::BadAudio(format!("resampling failed: {e}"));
    while pcm.samples.len() - at >= r.input_frames_next() {
        let n = r.input_frames_next();
        let o = r.process(&[&pcm.samples[at..at + n]], None).map_err(err)?;
        out.extend_from_slice(&o[0]);
        at += n;
    }
    if at < pcm.samples.len() {
        let o = r
            .process_partial(Some(&[&pcm.samples[at..]]), None)
            .map_err(err)?;
        out.extend_from_slice(&o[0]);
    }
    while out.len() < want + delay {
        let o = r.process_partial::<&[f32]>(None, None).map_err(err)?;
        if o[0].is_empty() {
            break;
        }
        out.extend_from_slice(&o[0]);
    }
    let end = (delay + want).min(out.len());
    Ok(out[delay.min(end)..end].to_vec())
}

/// 16-bit mono WAV bytes of `samples` at `rate` (what the tests and the
/// speech endpoint write).
pub fn wav_bytes(samples: &[f32], rate: u32) -> Vec<u8> {
    let data_len = (samples.len() * 2) as u32;
    let mut out = Vec::with_capacity(44 + samples.len() * 2);
    out.extend_from_slice(b"RIFF");
    out.extend_from_slice(&(36 + data_len).to_le_bytes());
    out.extend_from_slice(b"WAVEfmt ");
    out.extend_from_slice(&16u32.to_le_bytes());
    out.extend_from_slice(&1u16.to_le_bytes()); // PCM
    out.extend_from_slice(&1u16.to_le_bytes()); // mono
    out.extend_from_slice(&rate.to_le_bytes());
    out.extend_from_slice(&(rate * 2).to_le_bytes());
    out.extend_from_slice(&2u16.to_le_bytes());
    out.extend_from_slice(&16u16.to_le_bytes());
    out.extend_from_slice(b"data");
    out.extend_from_slice(&data_len.to_le_bytes());
    out.extend(pcm16(samples));
    out
}

/// Samples as 16-bit little-endian PCM.
pub fn pcm16(samples: &[f32]) -> Vec<u8> {
    samples
        .iter()
        .flat_map(|s| ((s.clamp(-1.0, 1.0) * 32767.0).round() as i16).to_le_bytes())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tone(rate: u32, secs: f32, hz: f32) -> Vec<f32> {
        (0..(rate as f32 * secs) as usize)
            .map(|i| 0.5 * (2.0 * std::f32::consts::PI * hz * i as f32 / rate as f32).sin())
            .collect()
    }

    #[test]
    fn a_wav_round_trips_and_is_resampled_to_16k() {
        let x = tone(44_100, 1.0, 440.0);
        let pcm = decode(wav_bytes(&x, 44_100), Some("wav"), 60.0).expect("decode");
        assert_eq!((pcm.rate, pcm.samples.len()), (44_100, x.len()));
        let y = to_16k(pcm).expect("resample");
        assert_eq!(y.len(), 16_000);
        // Still a 440 Hz tone of the same loudness, in phase.
        let z = tone(16_000, 1.0, 440.0);
        let err: f32 = y[100..15_900]
            .iter()
            .zip(&z[100..15_900])
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f32::max);
        assert!(err < 0.02, "max error {err}");
    }

    /// Energy per 20 ms at 16 kHz.
    fn envelope(x: &[f32]) -> Vec<f32> {
        x.chunks(320)
            .map(|c| (c.iter().map(|v| v * v).sum::<f32>() / c.len() as f32).sqrt())
            .collect()
    }

    /// `got` holds the speech of `want`: the same length within 0.6 s (a
    /// recorder adds a little at the ends) and loudness envelopes that
    /// correlate at the best lag within ±200 ms.
    fn same_speech(got: &[f32], want: &[f32]) {
        let secs = |x: &[f32]| x.len() as f32 / 16_000.0;
        assert!((secs(got) - secs(want)).abs() < 0.6, "{} s", secs(got));
        let (a, b) = (envelope(got), envelope(want));
        // Align on the best lag within ±200 ms, then correlate the envelopes.
        let corr = |lag: isize| {
            let pairs: Vec<(f32, f32)> = (0..b.len())
                .filter_map(|i| {
                    let j = i as isize + lag;
                    (j >= 0 && (j as usize) < a.len()).then(|| (a[j as usize], b[i]))
                })
                .collect();
            let n = pairs.len() as f32;
            let (ma, mb) = (
                pairs.iter().map(|p| p.0).sum::<f32>() / n,
                pairs.iter().map(|p| p.1).sum::<f32>() / n,
            );
            let cov: f32 = pairs.iter().map(|p| (p.0 - ma) * (p.1 - mb)).sum();
            let va: f32 = pairs.iter().map(|p| (p.0 - ma).powi(2)).sum();
            let vb: f32 = pairs.iter().map(|p| (p.1 - mb).powi(2)).sum();
            cov / (va * vb).sqrt()
        };
        let best = (-10..=10).map(corr).fold(f32::MIN, f32::max);
        assert!(best > 0.9, "envelope correlation {best}");
    }

    #[test]
    fn browser_webm_opus_decodes_to_the_same_speech() {
        // jfk.wav recorded by Chromium's MediaRecorder (scripts/webm_fixture.mjs).
        let webm = include_bytes!("../tests/data/jfk.webm").to_vec();
        let wav = include_bytes!("../tests/data/jfk.wav").to_vec();
        let want = to_16k(decode(wav, Some("wav"), 60.0).expect("wav")).expect("16k");
        // And as an Ogg Opus file (opus-tools' opusenc at 24 kb/s).
        let ogg = include_bytes!("../tests/data/jfk.opus").to_vec();
        for (bytes, ext) in [(webm.clone(), "webm"), (ogg, "opus")] {
            let pcm = decode(bytes, Some(ext), 60.0).expect(ext);
            assert_eq!(pcm.rate, 48_000);
            let got = to_16k(pcm).expect("resample");
            same_speech(&got, &want);
        }
        // Cut short: what could be read, or (symphonia's Matroska reader
        // panics on a cut file as it opens it) a clear error; garbage
        // after the header is an error, not a panic.
        for cut in [webm.len() / 2, webm.len() * 9 / 10] {
            match decode(webm[..cut].to_vec(), Some("webm"), 60.0) {
                Ok(p) => assert!(p.seconds() > 3.0 && p.seconds() < 11.0, "{}", p.seconds()),
                Err(SpeechError::BadAudio(m)) => eprintln!("cut at {cut}: {m}"),
                Err(e) => panic!("cut at {cut}: {e}"),
            }
        }
        let mut broken = webm.clone();
        for b in broken.iter_mut().skip(400).step_by(7) {
            *b ^= 0x5a;
        }
        let _ = decode(broken, Some("webm"), 60.0);
    }

    #[test]
    fn bad_input_is_a_clear_error() {
        assert!(matches!(
            decode(Vec::new(), None, 60.0),
            Err(SpeechError::BadAudio(_))
        ));
        assert!(matches!(
            decode(
                b"this is plain text, not audio at all".repeat(10),
                Some("txt"),
                60.0
            ),
            Err(SpeechError::Unsupported(_))
        ));
        let wav = wav_bytes(&tone(16_000, 3.0, 200.0), 16_000);
        assert!(matches!(
            decode(wav.clone(), Some("wav"), 1.0),
            Err(SpeechError::TooLong { .. })
        ));
        // A truncated file keeps what arrived; a header alone holds nothing.
        let cut = decode(wav[..20_044].to_vec(), Some("wav"), 60.0).expect("truncated");
        assert!(cut.samples.len() <= 10_000 && cut.samples.len() > 9_000);
        assert!(decode(wav[..44].to_vec(), Some("wav"), 60.0).is_err());
        // Found by fuzzing (fuzz/fuzz_targets/ct2_parse.rs): symphonia's
        // ADTS probe panicked on these bytes.
        let crash = [
            0xd6, 0xd6, 0xd6, 0x0e, 0, 0, 0, 0, 0, 0, 0x80, 0xd6, 0x00, 0xff, 0xf1, 0x00, 0xff, 0,
            0, 0, 0, 0, 0, 0, 0, 0, 0x11, 0x00, 0x06,
        ];
        assert!(matches!(
            decode(crash.to_vec(), Some("wav"), 5.0),
            Err(SpeechError::BadAudio(_))
        ));
    }
}
