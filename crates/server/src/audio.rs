//! `POST /v1/audio/speech` (below: espeak-ng or Kokoro, streamed sentence
//! by sentence) and `POST /v1/audio/transcriptions` / `/v1/audio/translations`: speech
//! to text (or to English) with Whisper, as OpenAI serves them — a
//! multipart upload (`file`, `model`, `language`, `prompt`,
//! `response_format` json / text / srt / vtt / verbose_json,
//! `temperature`), authenticated before the upload is read, bounded in
//! bytes and seconds, run through the gateway (admission, the usage row
//! in audio milliseconds, written once, and only for a transcript that was
//! delivered), one recognition at a time on the recognizer's own threads,
//! stopped when the client goes away.

use crate::api::{admit, Via};
use crate::error::ApiError;
use crate::extract::ApiCaller;
use crate::AppState;
use axum::extract::{Multipart, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use hanlin_accounts::Usage;
use hanlin_gateway::Endpoint;
use hanlin_speech::{audio, recognize::Transcript, Options, Recognizer, SpeechError, Task};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

type AppResult<T> = Result<T, ApiError>;

/// The largest upload (OpenAI's limit).
pub const MAX_AUDIO_BYTES: usize = 25 << 20;
/// The longest recording, in seconds.
pub const MAX_AUDIO_SECONDS: f64 = 3.0 * 3600.0;
/// The longest `prompt`, in characters.
const MAX_PROMPT_CHARS: usize = 2000;

/// OpenAI's recognition model names, served by the installed Whisper.
pub const RECOGNITION_ALIASES: [&str; 3] =
    ["whisper-1", "gpt-4o-transcribe", "gpt-4o-mini-transcribe"];

/// The speech models, loaded on first use (pulled into the store if
/// needed), and run one request at a time.
pub struct Speech {
    store: hanlin_store::Store,
    threads: usize,
    recognizer: tokio::sync::OnceCell<Arc<tokio::sync::Mutex<Recognizer>>>,
    synth: tokio::sync::OnceCell<Arc<hanlin_speech::tts::Synth>>,
}

impl Speech {
    pub fn new(store: hanlin_store::Store, threads: usize) -> Self {
        Self {
            store,
            threads,
            recognizer: tokio::sync::OnceCell::new(),
            synth: tokio::sync::OnceCell::new(),
        }
    }

    /// The synthesiser, made on first use: espeak-ng, with Kokoro when it
    /// is pulled (a Kokoro that fails to load is logged and left out).
    async fn synth(&self) -> AppResult<Arc<hanlin_speech::tts::Synth>> {
        self.synth
            .get_or_try_init(|| async {
                let home = self.store.home().to_path_buf();
                let threads = self.threads;
                let kokoro = self.has_kokoro();
                tokio::task::spawn_blocking(move || {
                    let synth = hanlin_speech::tts::Synth::find()?;
                    if !kokoro {
                        return Ok(synth);
                    }
                    let loaded = hanlin_store::Store::open(home)
                        .map_err(|e| hanlin_speech::SpeechError::Model(e.to_string()))
                        .and_then(|store| hanlin_speech::load_kokoro(&store, threads, false));
                    Ok(match loaded {
                        Ok(k) => synth.with_kokoro(k),
                        Err(e) => {
                            tracing::error!("the Kokoro voice could not be loaded: {e}");
                            synth
                        }
                    })
                })
                .await
                .map_err(|e| ApiError::internal(format!("loading speech synthesis: {e}")))?
                .map(Arc::new)
                .map_err(|e: hanlin_speech::SpeechError| {
                    ApiError::unavailable(format!("Speech synthesis is not available: {e}"))
                })
            })
            .await
            .cloned()
    }

    /// Kokoro and its runtime are in the store.
    pub(crate) fn has_kokoro(&self) -> bool {
        self.store
            .path_of(hanlin_store::KOKORO_MODEL)
            .is_ok_and(|p| p.is_some())
            && self
                .store
                .runtime_path(&hanlin_store::ONNXRUNTIME)
                .is_some()
    }

    /// The synthesiser and the model that speaks for model name `name`
    /// (OpenAI's or ours).
    pub(crate) async fn synth_for(
        &self,
        name: &str,
    ) -> AppResult<(Arc<hanlin_speech::tts::Synth>, hanlin_speech::tts::Model)> {
        use hanlin_speech::tts::{self, Model};
        let (model, fallback) = tts::model(name).ok_or_else(|| ApiError::model_not_found(name))?;
        let synth = self.synth().await?;
        match model {
            Model::Kokoro if !synth.has(Model::Kokoro) && fallback => Ok((synth, Model::Espeak)),
            Model::Kokoro if !synth.has(Model::Kokoro) => Err(ApiError::unavailable(format!(
                "The model '{name}' is not available on this server (an administrator can run: hanlin pull {})",
                hanlin_store::KOKORO_MODEL
            ))),
            m => Ok((synth, m)),
        }
    }

    /// Names `/v1/models` lists.
    pub fn model_names(&self) -> Vec<String> {
        let kokoro = self.has_kokoro();
        std::iter::once(hanlin_store::WHISPER_MODEL)
            .chain(RECOGNITION_ALIASES)
            .chain(
                hanlin_speech::tts::MODEL_NAMES
                    .iter()
                    .map(|(n, _)| *n)
                    .filter(|n| kokoro || *n != hanlin_store::KOKORO_MODEL),
            )
            .map(String::from)
            .collect()
    }

    pub fn recognizes(name: &str) -> bool {
        name == hanlin_store::WHISPER_MODEL || RECOGNITION_ALIASES.contains(&name)
    }

    /// A speech model (recognition or synthesis), not a chat model.
    pub fn is_audio_model(name: &str) -> bool {
        Self::recognizes(name) || hanlin_speech::tts::model(name).is_some()
    }

    async fn recognizer(&self) -> AppResult<Arc<tokio::sync::Mutex<Recognizer>>> {
        self.recognizer
            .get_or_try_init(|| async {
                let store = hanlin_store::Store::open(self.store.home())
                    .map_err(|e| ApiError::unavailable(e.to_string()))?;
                let threads = self.threads;
                let r = tokio::task::spawn_blocking(move || {
                    hanlin_speech::load_recognizer(
                        &store,
                        hanlin_store::WHISPER_MODEL,
                        threads,
                        false,
                    )
                })
                .await
                .map_err(|e| ApiError::internal(format!("loading the speech model: {e}")))?
                .map_err(|e| {
                    tracing::error!("speech model: {e}");
                    ApiError::unavailable(format!("The speech model could not be loaded: {e}"))
                })?;
                Ok(Arc::new(tokio::sync::Mutex::new(r)))
            })
            .await
            .cloned()
    }
}

/// What the form asked for.
struct Form {
    file: Vec<u8>,
    filename: String,
    model: String,
    language: Option<String>,
    prompt: Option<String>,
    format: String,
    temperature: f32,
}

async fn read_form(mut form: Multipart, translate: bool) -> AppResult<Form> {
    use crate::extract::{bad_form, field_bytes};
    let mut file = None;
    let mut filename = String::new();
    let mut fields = std::collections::HashMap::new();
    while let Some(mut field) = form.next_field().await.map_err(bad_form)? {
        let name = field.name().unwrap_or_default().to_string();
        if name == "file" {
            if file.is_some() {
                return Err(ApiError::bad_request("Send one 'file'.").param("file"));
            }
            filename = field.file_name().unwrap_or("audio").to_string();
            let Some(bytes) = field_bytes(&mut field, MAX_AUDIO_BYTES).await? else {
                return Err(ApiError::bad_request(format!(
                    "The audio file is larger than {} MB.",
                    MAX_AUDIO_BYTES >> 20
                ))
                .param("file")
                .code("file_too_large"));
            };
            file = Some(bytes);
            continue;
        }
        let known = [
            "model",
            "language",
            "prompt",
            "response_format",
            "temperature",
            "timestamp_granularities[]",
            "timestamp_granularities",
            "stream",
            "chunking_strategy",
        ];
        if !known.contains(&name.as_str()) || (translate && name == "language") {
            return Err(ApiError::bad_request(format!(
                "Unrecognized request argument supplied: {name}"
            ))
            .param(&name));
        }
        let Some(text) = field_bytes(&mut field, 4 * MAX_PROMPT_CHARS).await? else {
            return Err(ApiError::bad_request(format!("'{name}' is too long.")).param(&name));
        };
        fields.insert(name, String::from_utf8_lossy(&text).into_owned());
    }
    let file = file.ok_or_else(|| {
        ApiError::bad_request("The form has no 'file': send the audio as a file field.")
            .param("file")
    })?;
    let model = fields
        .remove("model")
        .filter(|m| !m.trim().is_empty())
        .ok_or_else(|| {
            ApiError::bad_request("you must provide a model parameter").param("model")
        })?;
    let format = fields
        .remove("response_format")
        .unwrap_or_else(|| "json".into());
    if !hanlin_speech::subtitle::RESPONSE_FORMATS.contains(&format.as_str()) {
        return Err(ApiError::bad_request(format!(
            "Invalid response_format '{format}': use json, text, srt, verbose_json or vtt."
        ))
        .param("response_format"));
    }
    let temperature = match fields.remove("temperature") {
        None => 0.0,
        Some(t) => t
            .trim()
            .parse::<f32>()
            .ok()
            .filter(|t| (0.0..=1.0).contains(t))
            .ok_or_else(|| {
                ApiError::bad_request("'temperature' must be a number from 0 to 1.")
                    .param("temperature")
            })?,
    };
    if let Some(g) = fields
        .remove("timestamp_granularities[]")
        .or_else(|| fields.remove("timestamp_granularities"))
    {
        if g != "segment" {
            return Err(ApiError::bad_request(
                "Only 'segment' timestamp granularity is supported.",
            )
            .param("timestamp_granularities"));
        }
    }
    if fields.remove("stream").is_some_and(|s| s.trim() == "true") {
        return Err(ApiError::bad_request(
            "Streamed transcription is not supported; leave 'stream' out.",
        )
        .param("stream"));
    }
    let prompt = fields.remove("prompt").filter(|p| !p.trim().is_empty());
    if prompt
        .as_ref()
        .is_some_and(|p| p.chars().count() > MAX_PROMPT_CHARS)
    {
        return Err(ApiError::bad_request(format!(
            "'prompt' is longer than {MAX_PROMPT_CHARS} characters."
        ))
        .param("prompt"));
    }
    Ok(Form {
        file,
        filename,
        model,
        language: fields.remove("language").filter(|l| !l.trim().is_empty()),
        prompt,
        format,
        temperature,
    })
}

pub(crate) fn speech_error(e: SpeechError) -> ApiError {
    match e {
        SpeechError::BadAudio(m) => {
            ApiError::bad_request(format!("Could not decode the audio file: {m}"))
                .param("file")
                .code("invalid_audio")
        }
        SpeechError::Unsupported(m) => ApiError::bad_request(format!("Invalid file format. {m}"))
            .param("file")
            .code("unsupported_format"),
        SpeechError::TooLong { max_seconds } => ApiError::bad_request(format!(
            "The audio is longer than {} minutes.",
            max_seconds / 60.0
        ))
        .param("file")
        .code("audio_too_long"),
        SpeechError::BadRequest(m) => ApiError::bad_request(m).param("language"),
        SpeechError::Cancelled => ApiError::bad_request("The request was cancelled."),
        e => ApiError::internal(format!("speech recognition failed: {e}")),
    }
}

/// Set when the handler is dropped (the client went away): the
/// recognition stops after its current window.
struct CancelOnDrop(Arc<AtomicBool>);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

pub async fn transcriptions(
    State(st): State<Arc<AppState>>,
    ApiCaller(caller): ApiCaller,
    form: Multipart,
) -> Response {
    let r = run(&st, caller, form, Task::Transcribe).await;
    crate::api::finish_response(&st, "audio.transcriptions", r)
}

pub async fn translations(
    State(st): State<Arc<AppState>>,
    ApiCaller(caller): ApiCaller,
    form: Multipart,
) -> Response {
    let r = run(&st, caller, form, Task::Translate).await;
    crate::api::finish_response(&st, "audio.translations", r)
}

async fn run(
    st: &Arc<AppState>,
    caller: hanlin_accounts::Caller,
    form: Multipart,
    task: Task,
) -> AppResult<Response> {
    let f = read_form(form, task == Task::Translate).await?;
    if !Speech::recognizes(&f.model) || !crate::api::visible(&caller, &f.model) {
        return Err(ApiError::model_not_found(&f.model));
    }
    let ext = std::path::Path::new(&f.filename)
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_lowercase);
    let opts = Options {
        task,
        language: f.language,
        prompt: f.prompt,
        temperature: f.temperature,
        ..Options::default()
    };
    let t = recognize(st, &caller, &f.model, f.file, ext, opts).await?;
    Ok(render(&t, &f.format, task))
}

/// Recognise `file` (audio in any format [`audio::decode`] reads; `ext`
/// its file name's extension, a hint) for `caller`: admitted by the
/// gateway, decoded, recognised one request at a time and stopped if this
/// future is dropped, and metered in audio milliseconds once the
/// transcript is made. The one recognition path of the API and the web
/// app's voice mode.
pub(crate) async fn recognize(
    st: &Arc<AppState>,
    caller: &hanlin_accounts::Caller,
    model: &str,
    file: Vec<u8>,
    ext: Option<String>,
    opts: Options,
) -> AppResult<Transcript> {
    let endpoint = match opts.task {
        Task::Transcribe => Endpoint::Transcriptions,
        Task::Translate => Endpoint::Translations,
    };
    let mut request = admit(st, caller, endpoint, model, &Via::Api).await?;
    let samples = tokio::task::spawn_blocking(move || {
        let pcm = audio::decode(file, ext.as_deref(), MAX_AUDIO_SECONDS)?;
        audio::to_16k(pcm)
    })
    .await
    .map_err(|e| ApiError::internal(format!("a worker task failed: {e}")))?
    .map_err(speech_error)?;
    let rec = st.speech.recognizer().await?;
    let cancel = CancelOnDrop(Arc::new(AtomicBool::new(false)));
    let flag = cancel.0.clone();
    let duration_ms = (samples.len() as f64 / audio::SAMPLE_RATE as f64 * 1000.0).round() as i64;
    // One recognition at a time: the recognizer's threads are its own.
    let guard = rec.lock_owned().await;
    let t: Transcript = tokio::task::spawn_blocking(move || {
        guard.transcribe(&samples, &opts, &mut |_, _| !flag.load(Ordering::Relaxed))
    })
    .await
    .map_err(|e| ApiError::internal(format!("a worker task failed: {e}")))?
    .map_err(speech_error)?;
    drop(cancel);
    request.record(Usage {
        audio_ms: duration_ms,
        ..Usage::default()
    });
    request.finish().await;
    Ok(t)
}

/// A transcript in the requested format.
fn render(t: &Transcript, format: &str, task: Task) -> Response {
    let plain =
        |body: String, ty: &'static str| ([(header::CONTENT_TYPE, ty)], body).into_response();
    let seconds = t.duration.ceil() as u64;
    match format {
        "text" => plain(format!("{}\n", t.text()), "text/plain; charset=utf-8"),
        "srt" => plain(
            hanlin_speech::subtitle::srt(&t.segments),
            "text/plain; charset=utf-8",
        ),
        "vtt" => plain(
            hanlin_speech::subtitle::vtt(&t.segments),
            "text/vtt; charset=utf-8",
        ),
        "verbose_json" => {
            let mut v = t.verbose_json(task);
            v["usage"] = serde_json::json!({ "type": "duration", "seconds": seconds });
            axum::Json(v).into_response()
        }
        _ => axum::Json(serde_json::json!({
            "text": t.text(),
            "usage": { "type": "duration", "seconds": seconds },
        }))
        .into_response(),
    }
}

/// Text to speak: not blank, at most `max` characters (`param` names the
/// field in the error).
pub(crate) fn check_speech_text(text: &str, param: &str, max: usize) -> AppResult<()> {
    if text.trim().is_empty() {
        return Err(ApiError::bad_request(format!("'{param}' is empty.")).param(param));
    }
    let chars = text.chars().count();
    if chars > max {
        return Err(ApiError::bad_request(format!(
            "'{param}' is {chars} characters long; the limit is {max}."
        ))
        .param(param)
        .code("string_above_max_length"));
    }
    Ok(())
}

/// The voice called `name` (OpenAI's names).
pub(crate) fn speech_voice(name: &str) -> AppResult<hanlin_speech::tts::Voice> {
    use hanlin_speech::tts;
    tts::voice(name).ok_or_else(|| {
        let known: Vec<&str> = tts::VOICES.iter().map(|v| v.name).collect();
        ApiError::bad_request(format!(
            "Unknown voice '{name}': use one of {}.",
            known.join(", ")
        ))
        .param("voice")
    })
}

/// Speak `text` (one sentence or a few) for `caller` with the mouth shapes
/// a face shows ([`hanlin_speech::viseme`]): admitted by the gateway as a
/// speech request and metered for the audio made. The web app's voice
/// mode asks for its replies sentence by sentence through this.
pub(crate) async fn speak_with_visemes(
    st: &Arc<AppState>,
    caller: &hanlin_accounts::Caller,
    text: String,
    voice: hanlin_speech::tts::Voice,
    model: &str,
    speed: f32,
) -> AppResult<(Vec<f32>, Vec<hanlin_speech::viseme::Cue>)> {
    let (synth, speaker) = st.speech.synth_for(model).await?;
    let mut request = admit(st, caller, Endpoint::Speech, model, &Via::Api).await?;
    let (samples, cues) =
        tokio::task::spawn_blocking(move || synth.speak_with_visemes(&text, voice, speaker, speed))
            .await
            .map_err(|e| ApiError::internal(format!("a worker task failed: {e}")))?
            .map_err(|e| ApiError::internal(format!("speech synthesis failed: {e}")))?;
    request.record(Usage {
        audio_ms: samples.len() as i64 * 1000 / hanlin_speech::tts::OUTPUT_RATE as i64,
        ..Usage::default()
    });
    request.finish().await;
    Ok((samples, cues))
}

/// OpenAI's limit on `input`, in characters.
pub const MAX_SPEECH_CHARS: usize = 4096;

#[derive(serde::Deserialize)]
struct SpeechRequest {
    model: String,
    input: String,
    voice: serde_json::Value,
    response_format: Option<String>,
    speed: Option<f32>,
    #[allow(dead_code)]
    instructions: Option<String>,
    stream_format: Option<String>,
}

const SPEECH_FIELDS: &[&str] = &[
    "model",
    "input",
    "voice",
    "response_format",
    "speed",
    "instructions",
    "stream_format",
];

/// `POST /v1/audio/speech`: the input spoken sentence by sentence, each
/// sentence's audio sent as soon as it is made (`wav` with the streaming
/// header, or raw `pcm`: 16-bit mono at 24 kHz). Metered once, in audio
/// milliseconds, for what was sent — also when the client leaves early.
pub async fn speech(
    State(st): State<Arc<AppState>>,
    ApiCaller(caller): ApiCaller,
    crate::extract::Body(body): crate::extract::Body,
) -> Response {
    let r = speech_inner(&st, caller, &body).await;
    crate::api::finish_response(&st, "audio.speech", r)
}

async fn speech_inner(
    st: &Arc<AppState>,
    caller: hanlin_accounts::Caller,
    body: &[u8],
) -> AppResult<Response> {
    use hanlin_speech::tts;
    let req: SpeechRequest = crate::openai::parse(body, SPEECH_FIELDS)?;
    if tts::model(&req.model).is_none() || !crate::api::visible(&caller, &req.model) {
        return Err(ApiError::model_not_found(&req.model));
    }
    check_speech_text(&req.input, "input", MAX_SPEECH_CHARS)?;
    let name = match &req.voice {
        serde_json::Value::String(s) => s.clone(),
        v => v["id"].as_str().unwrap_or_default().to_string(),
    };
    let voice = speech_voice(&name)?;
    let speed = req.speed.unwrap_or(1.0);
    if !(0.25..=4.0).contains(&speed) {
        return Err(ApiError::bad_request("'speed' must be from 0.25 to 4.0.").param("speed"));
    }
    if req.stream_format.as_deref().is_some_and(|f| f != "audio") {
        return Err(
            ApiError::bad_request("Only stream_format 'audio' is supported.")
                .param("stream_format"),
        );
    }
    let format = req.response_format.unwrap_or_else(|| "mp3".into());
    let (wav, content_type) = match format.as_str() {
        "wav" => (true, "audio/wav"),
        "pcm" => (false, "audio/pcm"),
        "mp3" | "opus" | "aac" | "flac" => {
            return Err(ApiError::bad_request(format!(
                "response_format '{format}' needs an encoder this server does not have: use 'wav' or 'pcm'."
            ))
            .param("response_format")
            .code("unsupported_format"))
        }
        other => {
            return Err(ApiError::bad_request(format!(
                "Invalid response_format '{other}': use wav or pcm."
            ))
            .param("response_format"))
        }
    };
    let (synth, speaker) = st.speech.synth_for(&req.model).await?;
    let mut request = admit(st, &caller, Endpoint::Speech, &req.model, &Via::Api).await?;
    let sentences = hanlin_speech::text::sentences(&req.input);
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<axum::body::Bytes, std::io::Error>>(4);
    tokio::spawn(async move {
        let mut sent_samples = 0usize;
        if wav
            && tx
                .send(Ok(tts::wav_stream_header(tts::OUTPUT_RATE).into()))
                .await
                .is_err()
        {
            return;
        }
        for s in sentences {
            let synth = synth.clone();
            let made =
                tokio::task::spawn_blocking(move || synth.speak(&s, voice, speaker, speed)).await;
            let samples = match made {
                Ok(Ok(x)) => x,
                Ok(Err(e)) => {
                    tracing::warn!("speech synthesis failed: {e}");
                    break;
                }
                Err(e) => {
                    tracing::warn!("speech synthesis task failed: {e}");
                    break;
                }
            };
            let n = samples.len();
            if tx.send(Ok(audio::pcm16(&samples).into())).await.is_err() {
                break;
            }
            sent_samples += n;
        }
        request.record(Usage {
            audio_ms: sent_samples as i64 * 1000 / tts::OUTPUT_RATE as i64,
            ..Usage::default()
        });
        request.finish().await;
    });
    let stream = tokio_stream::wrappers::ReceiverStream::new(rx);
    Ok((
        [(header::CONTENT_TYPE, content_type)],
        axum::body::Body::from_stream(stream),
    )
        .into_response())
}
