//! Speech → text with Whisper, the way faster-whisper does it: 30-second
//! windows over the log-mel features of the whole recording, the
//! language detected on the first window when not given, each window
//! decoded with timestamp tokens (the rules that keep them paired and
//! increasing), segments cut at the timestamps and the next window started
//! at the last one, the previous text as the next window's prompt, and
//! temperature fallback when a window's text repeats itself (compression
//! ratio above 2.4) or is improbable (mean log-probability below −1) —
//! unless the model says there is no speech there.
//!
//! Regions the voice-activity detector ([`crate::vad`]) finds silent are
//! skipped, so long recordings with pauses cost only their speech.

use crate::lang;
use crate::mel;
use crate::vad;
use crate::SpeechError;
use hanlin_engine::whisper::{Audio, Whisper};
use rand::{Rng, SeedableRng};
use std::io::Write;
use std::path::Path;

/// Transcribe in the spoken language, or translate to English.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Task {
    Transcribe,
    Translate,
}

impl Task {
    pub fn as_str(self) -> &'static str {
        match self {
            Task::Transcribe => "transcribe",
            Task::Translate => "translate",
        }
    }
}

#[derive(Debug, Clone)]
pub struct Options {
    pub task: Task,
    /// A language code; `None`: detected.
    pub language: Option<String>,
    /// Text that conditions the first window (names, spelling, style).
    pub prompt: Option<String>,
    /// The first temperature; 0: greedy.
    pub temperature: f32,
    /// Decode a window again at higher temperatures when its text repeats
    /// itself or is improbable.
    pub fallback: bool,
    /// Skip silence found by voice-activity detection.
    pub vad: bool,
    pub seed: u64,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            task: Task::Transcribe,
            language: None,
            prompt: None,
            temperature: 0.0,
            fallback: true,
            vad: true,
            seed: 0,
        }
    }
}

/// One timed piece of the transcript.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Segment {
    pub id: usize,
    pub seek: usize,
    pub start: f64,
    pub end: f64,
    pub text: String,
    pub tokens: Vec<u32>,
    pub temperature: f32,
    pub avg_logprob: f32,
    pub compression_ratio: f32,
    pub no_speech_prob: f32,
}

#[derive(Debug, Clone)]
pub struct Transcript {
    pub language: String,
    pub language_probability: f32,
    /// Seconds of audio.
    pub duration: f64,
    pub segments: Vec<Segment>,
}

impl Transcript {
    /// OpenAI's `verbose_json` body: task, language name, duration, text,
    /// segments.
    pub fn verbose_json(&self, task: Task) -> serde_json::Value {
        serde_json::json!({
            "task": task.as_str(),
            "language": lang::name(&self.language).unwrap_or(&self.language),
            "duration": self.duration,
            "text": self.text(),
            "segments": self.segments,
        })
    }

    pub fn text(&self) -> String {
        self.segments
            .iter()
            .map(|s| s.text.as_str())
            .collect::<String>()
            .trim()
            .to_string()
    }
}

/// The tokenizer's special tokens.
#[derive(Debug, Clone)]
struct Specials {
    eot: u32,
    sot: u32,
    sot_prev: u32,
    translate: u32,
    transcribe: u32,
    no_speech: u32,
    no_timestamps: u32,
    timestamp_begin: u32,
    /// (code, token) for each language the model knows.
    langs: Vec<(String, u32)>,
}

/// What `config.json` beside the model says.
#[derive(Debug, Clone, serde::Deserialize)]
struct ModelConfig {
    #[serde(default)]
    suppress_ids: Vec<i64>,
    #[serde(default)]
    suppress_ids_begin: Vec<i64>,
    #[serde(default)]
    lang_ids: Vec<u32>,
}

pub struct Recognizer {
    model: Whisper,
    tok: tokenizers::Tokenizer,
    sp: Specials,
    suppress: Vec<u32>,
    suppress_begin: Vec<u32>,
}

const TIME_PRECISION: f64 = 0.02;
const FRAMES_PER_SECOND: usize = 100;
const WINDOW_FRAMES: usize = 3000;
const MAX_INITIAL_TIMESTAMP_INDEX: u32 = 50;
const TEMPERATURES: [f32; 6] = [0.0, 0.2, 0.4, 0.6, 0.8, 1.0];
const COMPRESSION_RATIO_THRESHOLD: f32 = 2.4;
const LOG_PROB_THRESHOLD: f32 = -1.0;
const NO_SPEECH_THRESHOLD: f32 = 0.6;
const PROMPT_RESET_ON_TEMPERATURE: f32 = 0.5;

impl Recognizer {
    /// Load `model.bin` (CTranslate2), `tokenizer.json` and `config.json`.
    pub fn load(
        model: &Path,
        tokenizer: &Path,
        config: &Path,
        threads: usize,
    ) -> Result<Self, SpeechError> {
        let read = |p: &Path| {
            std::fs::read(p).map_err(|e| SpeechError::Model(format!("{}: {e}", p.display())))
        };
        Self::from_bytes(&read(model)?, &read(tokenizer)?, &read(config)?, threads)
    }

    pub fn from_bytes(
        model: &[u8],
        tokenizer: &[u8],
        config: &[u8],
        threads: usize,
    ) -> Result<Self, SpeechError> {
        let model = Whisper::from_ct2(model, threads)?;
        let tok = tokenizers::Tokenizer::from_bytes(tokenizer)
            .map_err(|e| SpeechError::Model(format!("tokenizer.json: {e}")))?;
        let cfg: ModelConfig = serde_json::from_slice(config)
            .map_err(|e| SpeechError::Model(format!("config.json: {e}")))?;
        let id = |t: &str| {
            tok.token_to_id(t)
                .ok_or_else(|| SpeechError::Model(format!("the tokenizer has no {t}")))
        };
        let no_timestamps = id("<|notimestamps|>")?;
        let langs = cfg
            .lang_ids
            .iter()
            .filter_map(|&i| {
                let t = tok.id_to_token(i)?;
                Some((t.strip_prefix("<|")?.strip_suffix("|>")?.to_string(), i))
            })
            .collect::<Vec<_>>();
        let sp = Specials {
            eot: id("<|endoftext|>")?,
            sot: id("<|startoftranscript|>")?,
            sot_prev: id("<|startofprev|>")?,
            translate: id("<|translate|>")?,
            transcribe: id("<|transcribe|>")?,
            no_speech: id("<|nospeech|>").or_else(|_| id("<|nocaptions|>"))?,
            no_timestamps,
            timestamp_begin: tok.token_to_id("<|0.00|>").unwrap_or(no_timestamps + 1),
            langs,
        };
        let vocab = model.config.vocab as i64;
        let ids = |v: &[i64]| -> Vec<u32> {
            v.iter()
                .filter(|i| (0..vocab).contains(*i))
                .map(|i| *i as u32)
                .collect()
        };
        if sp.timestamp_begin as usize >= model.config.vocab {
            return Err(SpeechError::Model(
                "the model has no timestamp tokens".into(),
            ));
        }
        Ok(Self {
            suppress: ids(&cfg.suppress_ids),
            suppress_begin: ids(&cfg.suppress_ids_begin),
            model,
            tok,
            sp,
        })
    }

    pub fn multilingual(&self) -> bool {
        !self.sp.langs.is_empty()
    }

    /// Text of tokens (timestamps and other special tokens left out).
    pub fn decode_text(&self, tokens: &[u32]) -> String {
        let text: Vec<u32> = tokens
            .iter()
            .copied()
            .filter(|t| *t < self.sp.eot)
            .collect();
        self.tok.decode(&text, true).unwrap_or_default()
    }

    fn encode_text(&self, text: &str) -> Result<Vec<u32>, SpeechError> {
        self.tok
            .encode(text, false)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| SpeechError::BadRequest(format!("cannot tokenize the prompt: {e}")))
    }

    /// Probabilities of each language from a window's encoding, best first.
    fn detect(&self, audio: &Audio) -> Result<Vec<(String, f32)>, SpeechError> {
        let mut st = self.model.new_state();
        let h = self.model.decode(&mut st, audio, &[self.sp.sot])?;
        let logits = self.model.logits(&h, self.sp.timestamp_begin as usize);
        let max = self
            .sp
            .langs
            .iter()
            .map(|(_, i)| logits[*i as usize])
            .fold(f32::NEG_INFINITY, f32::max);
        let exps: Vec<f32> = self
            .sp
            .langs
            .iter()
            .map(|(_, i)| (logits[*i as usize] - max).exp())
            .collect();
        let sum: f32 = exps.iter().sum();
        let mut out: Vec<(String, f32)> = self
            .sp
            .langs
            .iter()
            .zip(exps)
            .map(|((c, _), e)| (c.clone(), e / sum))
            .collect();
        out.sort_by(|a, b| b.1.total_cmp(&a.1));
        Ok(out)
    }

    /// Transcribe 16 kHz mono `samples`. `progress(seconds done, total)`
    /// is called before each window; when it returns false the work stops
    /// with [`SpeechError::Cancelled`].
    pub fn transcribe(
        &self,
        samples: &[f32],
        opts: &Options,
        progress: &mut dyn FnMut(f64, f64) -> bool,
    ) -> Result<Transcript, SpeechError> {
        let n_mels = self.model.config.n_mels;
        let (features, frames) = mel::log_mel(samples, n_mels);
        let content_frames = frames.saturating_sub(1);
        let duration = samples.len() as f64 / crate::audio::SAMPLE_RATE as f64;
        // Windows to decode: the speech the detector found, or everything.
        let clips: Vec<(usize, usize)> = if opts.vad {
            vad::speech(samples, crate::audio::SAMPLE_RATE)
                .into_iter()
                .map(|(a, b)| {
                    (
                        a * FRAMES_PER_SECOND / 16_000,
                        b * FRAMES_PER_SECOND / 16_000,
                    )
                })
                .collect()
        } else {
            vec![(0, content_frames)]
        };
        let window = |seek: usize, size: usize| -> Vec<f32> {
            // `n_mels × WINDOW_FRAMES`, zero beyond the audio.
            let mut w = vec![0f32; n_mels * WINDOW_FRAMES];
            for m in 0..n_mels {
                let src = &features[m * frames + seek..m * frames + seek + size];
                w[m * WINDOW_FRAMES..m * WINDOW_FRAMES + size].copy_from_slice(src);
            }
            w
        };
        let mut language = opts.language.clone();
        let mut language_probability = 1.0;
        if let Some(l) = &language {
            let code = lang::code(l).ok_or_else(|| {
                SpeechError::BadRequest(format!(
                    "unknown language {l:?} (use a code like zh or en)"
                ))
            })?;
            if !self.sp.langs.iter().any(|(c, _)| c == code) && self.multilingual() {
                return Err(SpeechError::BadRequest(format!(
                    "the model does not know language {code}"
                )));
            }
            language = Some(code.to_string());
        }
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(opts.seed);
        let mut all_tokens: Vec<u32> = Vec::new();
        let mut prompt_reset_since = 0;
        if let Some(p) = opts.prompt.as_deref().filter(|p| !p.trim().is_empty()) {
            all_tokens.extend(self.encode_text(&format!(" {}", p.trim()))?);
        }
        let mut segments = Vec::new();
        for (clip_start, clip_end) in clips {
            let clip_end = clip_end.min(content_frames);
            let mut seek = clip_start;
            while seek < clip_end {
                if !progress((seek as f64 / 100.0).min(duration), duration) {
                    return Err(SpeechError::Cancelled);
                }
                let time_offset = seek as f64 / FRAMES_PER_SECOND as f64;
                let size = WINDOW_FRAMES
                    .min(content_frames - seek)
                    .min(clip_end - seek);
                let segment_duration = size as f64 / FRAMES_PER_SECOND as f64;
                let started = std::time::Instant::now();
                let audio = self.model.encode(&window(seek, size), WINDOW_FRAMES)?;
                let encoded = started.elapsed();
                if language.is_none() {
                    if self.multilingual() {
                        let probs = self.detect(&audio)?;
                        let (code, p) = probs
                            .into_iter()
                            .next()
                            .ok_or_else(|| SpeechError::Model("no language tokens".into()))?;
                        language_probability = p;
                        language = Some(code);
                    } else {
                        language = Some("en".into());
                    }
                }
                let lang_token = self
                    .sp
                    .langs
                    .iter()
                    .find(|(c, _)| Some(c) == language.as_ref())
                    .map(|(_, t)| *t);
                let mut prompt = Vec::new();
                let previous = &all_tokens[prompt_reset_since..];
                if !previous.is_empty() {
                    prompt.push(self.sp.sot_prev);
                    let keep = self.model.config.text_ctx / 2 - 1;
                    prompt.extend_from_slice(&previous[previous.len().saturating_sub(keep)..]);
                }
                let sot_index = prompt.len();
                prompt.push(self.sp.sot);
                if self.multilingual() {
                    prompt.extend(lang_token);
                    prompt.push(match opts.task {
                        Task::Transcribe => self.sp.transcribe,
                        Task::Translate => self.sp.translate,
                    });
                }
                let r = if opts.fallback {
                    self.with_fallback(&audio, &prompt, sot_index, opts.temperature, &mut rng)?
                } else {
                    self.generate(&audio, &prompt, sot_index, opts.temperature, &mut rng)?
                };
                tracing::debug!(
                    "window at {time_offset:.2} s: encoded in {:.0} ms, {} tokens in {:.0} ms",
                    encoded.as_secs_f64() * 1e3,
                    r.tokens.len(),
                    (started.elapsed() - encoded).as_secs_f64() * 1e3
                );
                if r.no_speech_prob > NO_SPEECH_THRESHOLD && r.avg_logprob <= LOG_PROB_THRESHOLD {
                    seek += size;
                    continue;
                }
                let previous_seek = seek;
                let (cut, next) = self.split(&r.tokens, time_offset, size, segment_duration, seek);
                seek = next.max(seek + 1);
                for (start, end, tokens) in cut {
                    let text = self.decode_text(&tokens);
                    if start == end || text.trim().is_empty() {
                        continue;
                    }
                    all_tokens.extend_from_slice(&tokens);
                    segments.push(Segment {
                        id: segments.len(),
                        seek: previous_seek,
                        start: round2(start),
                        end: round2(end.min(duration.max(start))),
                        text,
                        tokens,
                        temperature: r.temperature,
                        avg_logprob: r.avg_logprob,
                        compression_ratio: r.compression_ratio,
                        no_speech_prob: r.no_speech_prob,
                    });
                }
                if r.temperature > PROMPT_RESET_ON_TEMPERATURE {
                    prompt_reset_since = all_tokens.len();
                }
            }
        }
        progress(duration, duration);
        Ok(Transcript {
            language: language.unwrap_or_else(|| "en".into()),
            language_probability,
            duration,
            segments,
        })
    }

    /// Decode one window at each temperature of the ladder until the text
    /// is neither repetitive nor improbable.
    fn with_fallback(
        &self,
        audio: &Audio,
        prompt: &[u32],
        sot_index: usize,
        first: f32,
        rng: &mut rand_chacha::ChaCha8Rng,
    ) -> Result<Decoded, SpeechError> {
        let ladder: Vec<f32> = if first <= 0.0 {
            TEMPERATURES.to_vec()
        } else {
            std::iter::once(first.min(1.0))
                .chain(TEMPERATURES.iter().copied().filter(|t| *t > first))
                .collect()
        };
        let mut tried: Vec<Decoded> = Vec::new();
        for t in ladder {
            let r = self.generate(audio, prompt, sot_index, t, rng)?;
            let too_repetitive = r.compression_ratio > COMPRESSION_RATIO_THRESHOLD;
            let mut fallback = too_repetitive || r.avg_logprob < LOG_PROB_THRESHOLD;
            if r.no_speech_prob > NO_SPEECH_THRESHOLD && r.avg_logprob < LOG_PROB_THRESHOLD {
                fallback = false;
            }
            if !fallback {
                return Ok(r);
            }
            tried.push(r);
        }
        let best_of = |v: Vec<Decoded>| {
            v.into_iter()
                .max_by(|a, b| a.avg_logprob.total_cmp(&b.avg_logprob))
        };
        let (ok, all): (Vec<Decoded>, Vec<Decoded>) = tried
            .into_iter()
            .partition(|r| r.compression_ratio <= COMPRESSION_RATIO_THRESHOLD);
        best_of(if ok.is_empty() { all } else { ok })
            .ok_or_else(|| SpeechError::Model("no decoding was tried".into()))
    }

    /// One window's tokens (without the prompt and the end token).
    fn generate(
        &self,
        audio: &Audio,
        prompt: &[u32],
        sot_index: usize,
        temperature: f32,
        rng: &mut rand_chacha::ChaCha8Rng,
    ) -> Result<Decoded, SpeechError> {
        let sp = &self.sp;
        let vocab = self.model.config.vocab;
        let d = self.model.config.d;
        let mut st = self.model.new_state();
        let h = self.model.decode(&mut st, audio, prompt)?;
        let no_speech_prob = {
            let l = self.model.logits(
                &h[sot_index * d..(sot_index + 1) * d],
                sp.timestamp_begin as usize,
            );
            softmax_at(&l, sp.no_speech as usize)
        };
        let mut logits = self
            .model
            .logits(&h[(prompt.len() - 1) * d..], sp.timestamp_begin as usize);
        let mut tokens: Vec<u32> = Vec::new();
        let mut sum_logprob = 0f64;
        let ts = sp.timestamp_begin as usize;
        loop {
            // Suppressions: blank and end at the start, the model's list,
            // then the timestamp rules.
            if tokens.is_empty() {
                for &t in &self.suppress_begin {
                    logits[t as usize] = f32::NEG_INFINITY;
                }
            }
            for &t in &self.suppress {
                logits[t as usize] = f32::NEG_INFINITY;
            }
            logits[sp.no_timestamps as usize] = f32::NEG_INFINITY;
            let last_ts = tokens.last().is_some_and(|t| *t as usize >= ts);
            let penultimate_ts = tokens.len() < 2 || tokens[tokens.len() - 2] as usize >= ts;
            if last_ts {
                if penultimate_ts {
                    logits[ts..].fill(f32::NEG_INFINITY);
                } else {
                    logits[..sp.eot as usize].fill(f32::NEG_INFINITY);
                }
            }
            if let Some(&last) = tokens.iter().rev().find(|t| **t as usize >= ts) {
                let upto = if last_ts && !penultimate_ts {
                    last as usize
                } else {
                    last as usize + 1
                };
                logits[ts..upto.min(vocab)].fill(f32::NEG_INFINITY);
            }
            if tokens.is_empty() {
                logits[..ts].fill(f32::NEG_INFINITY);
                let last_allowed = ts + MAX_INITIAL_TIMESTAMP_INDEX as usize;
                if last_allowed + 1 < vocab {
                    logits[last_allowed + 1..].fill(f32::NEG_INFINITY);
                }
            }
            let logprobs = log_softmax(&logits);
            let ts_logprob = log_sum_exp(&logprobs[ts..]);
            let max_text = logprobs[..ts]
                .iter()
                .copied()
                .fold(f32::NEG_INFINITY, f32::max);
            let logprobs = if ts_logprob > max_text {
                logits[..ts].fill(f32::NEG_INFINITY);
                log_softmax(&logits)
            } else {
                logprobs
            };
            let next = if temperature > 0.0 {
                sample(&logits, temperature, rng)
            } else {
                argmax(&logits)
            };
            sum_logprob += logprobs[next] as f64;
            if next as u32 == sp.eot {
                break;
            }
            tokens.push(next as u32);
            // At most half the context per window, as Whisper samples.
            if tokens.len() >= self.model.config.text_ctx / 2
                || st.len() + 1 >= self.model.config.text_ctx
            {
                break;
            }
            let h = self.model.decode(&mut st, audio, &[next as u32])?;
            logits = self.model.logits(&h, self.sp.timestamp_begin as usize);
        }
        let text = self.decode_text(&tokens);
        Ok(Decoded {
            avg_logprob: (sum_logprob / (tokens.len() + 1) as f64) as f32,
            compression_ratio: compression_ratio(text.trim()),
            tokens,
            no_speech_prob,
            temperature,
        })
    }

    /// Segments of one window's tokens, cut at consecutive timestamps, and
    /// where the next window starts.
    #[allow(clippy::type_complexity)]
    fn split(
        &self,
        tokens: &[u32],
        time_offset: f64,
        size: usize,
        segment_duration: f64,
        seek: usize,
    ) -> (Vec<(f64, f64, Vec<u32>)>, usize) {
        let ts = self.sp.timestamp_begin;
        let is_ts = |t: u32| t >= ts;
        let n = tokens.len();
        let single_ending = n >= 2 && !is_ts(tokens[n - 2]) && is_ts(tokens[n - 1]);
        let mut slices: Vec<usize> = (1..n)
            .filter(|&i| is_ts(tokens[i]) && is_ts(tokens[i - 1]))
            .collect();
        let mut out = Vec::new();
        if slices.is_empty() {
            let mut duration = segment_duration;
            if let Some(&last) = tokens.iter().rev().find(|t| is_ts(**t)) {
                if last != ts {
                    duration = (last - ts) as f64 * TIME_PRECISION;
                }
            }
            out.push((time_offset, time_offset + duration, tokens.to_vec()));
            return (out, seek + size);
        }
        if single_ending {
            slices.push(n);
        }
        let mut last = 0;
        for &cur in &slices {
            let s = &tokens[last..cur];
            let start = time_offset + (s[0].saturating_sub(ts)) as f64 * TIME_PRECISION;
            let end = time_offset + (s[s.len() - 1].saturating_sub(ts)) as f64 * TIME_PRECISION;
            out.push((start, end, s.to_vec()));
            last = cur;
        }
        let next = if single_ending {
            seek + size
        } else {
            seek + (tokens[last - 1].saturating_sub(ts)) as usize * 2
        };
        (out, next)
    }
}

struct Decoded {
    tokens: Vec<u32>,
    avg_logprob: f32,
    compression_ratio: f32,
    no_speech_prob: f32,
    temperature: f32,
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

fn argmax(x: &[f32]) -> usize {
    let mut best = 0;
    for (i, v) in x.iter().enumerate() {
        if *v > x[best] {
            best = i;
        }
    }
    best
}

fn log_sum_exp(x: &[f32]) -> f32 {
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if max == f32::NEG_INFINITY {
        return max;
    }
    max + x.iter().map(|v| (v - max).exp()).sum::<f32>().ln()
}

fn log_softmax(x: &[f32]) -> Vec<f32> {
    let lse = log_sum_exp(x);
    x.iter().map(|v| v - lse).collect()
}

fn softmax_at(x: &[f32], i: usize) -> f32 {
    (x[i] - log_sum_exp(x)).exp()
}

fn sample(logits: &[f32], temperature: f32, rng: &mut rand_chacha::ChaCha8Rng) -> usize {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let w: Vec<f32> = logits
        .iter()
        .map(|v| ((v - max) / temperature).exp())
        .collect();
    let total: f32 = w.iter().sum();
    let mut r = rng.random::<f32>() * total;
    for (i, v) in w.iter().enumerate() {
        if r < *v {
            return i;
        }
        r -= v;
    }
    argmax(logits)
}

/// How well the text compresses: repetition loops compress very well.
fn compression_ratio(text: &str) -> f32 {
    if text.is_empty() {
        return 0.0;
    }
    let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
    let packed = z
        .write_all(text.as_bytes())
        .and_then(|_| z.finish())
        .map(|v| v.len())
        .unwrap_or(text.len());
    text.len() as f32 / packed.max(1) as f32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repetition_compresses_and_prose_does_not() {
        assert!(compression_ratio(&"thank you. ".repeat(30)) > 2.4);
        assert!(
            compression_ratio(
                "And so my fellow Americans, ask not what your country can do for you."
            ) < 2.4
        );
    }
}
