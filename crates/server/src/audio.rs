//! `POST /v1/audio/transcriptions` and `/v1/audio/translations`: speech
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
}

impl Speech {
    pub fn new(store: hanlin_store::Store, threads: usize) -> Self {
        Self {
            store,
            threads,
            recognizer: tokio::sync::OnceCell::new(),
        }
    }

    /// Names `/v1/models` lists.
    pub fn model_names(&self) -> Vec<String> {
        std::iter::once(hanlin_store::WHISPER_MODEL)
            .chain(RECOGNITION_ALIASES)
            .map(String::from)
            .collect()
    }

    pub fn recognizes(name: &str) -> bool {
        name == hanlin_store::WHISPER_MODEL || RECOGNITION_ALIASES.contains(&name)
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
    let bad_form = |e: axum::extract::multipart::MultipartError| {
        ApiError::bad_request(format!("Could not read the multipart form: {e}"))
    };
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
            let mut bytes = Vec::new();
            while let Some(chunk) = field.chunk().await.map_err(bad_form)? {
                if bytes.len() + chunk.len() > MAX_AUDIO_BYTES {
                    return Err(ApiError::bad_request(format!(
                        "The audio file is larger than {} MB.",
                        MAX_AUDIO_BYTES >> 20
                    ))
                    .param("file")
                    .code("file_too_large"));
                }
                bytes.extend_from_slice(&chunk);
            }
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
        let mut text = String::new();
        while let Some(chunk) = field.chunk().await.map_err(bad_form)? {
            if text.len() + chunk.len() > 4 * MAX_PROMPT_CHARS {
                return Err(ApiError::bad_request(format!("'{name}' is too long.")).param(&name));
            }
            text.push_str(&String::from_utf8_lossy(&chunk));
        }
        fields.insert(name, text);
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
    if !["json", "text", "srt", "vtt", "verbose_json"].contains(&format.as_str()) {
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

fn speech_error(e: SpeechError) -> ApiError {
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
    let endpoint = match task {
        Task::Transcribe => Endpoint::Transcriptions,
        Task::Translate => Endpoint::Translations,
    };
    let mut request = admit(st, &caller, endpoint, &f.model, &Via::Api).await?;
    let ext = std::path::Path::new(&f.filename)
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_lowercase);
    let file = f.file;
    let samples = tokio::task::spawn_blocking(move || {
        let pcm = audio::decode(file, ext.as_deref(), MAX_AUDIO_SECONDS)?;
        audio::to_16k(pcm)
    })
    .await
    .map_err(|e| ApiError::internal(format!("a worker task failed: {e}")))?
    .map_err(speech_error)?;
    let rec = st.speech.recognizer().await?;
    let opts = Options {
        task,
        language: f.language,
        prompt: f.prompt,
        temperature: f.temperature,
        ..Options::default()
    };
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
    Ok(render(&t, &f.format, task))
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
        "verbose_json" => axum::Json(serde_json::json!({
            "task": match task { Task::Transcribe => "transcribe", Task::Translate => "translate" },
            "language": hanlin_speech::lang::name(&t.language).unwrap_or(&t.language),
            "duration": t.duration,
            "text": t.text(),
            "segments": t.segments,
            "usage": { "type": "duration", "seconds": seconds },
        }))
        .into_response(),
        _ => axum::Json(serde_json::json!({
            "text": t.text(),
            "usage": { "type": "duration", "seconds": seconds },
        }))
        .into_response(),
    }
}
