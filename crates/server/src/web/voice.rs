//! The web app's voice mode: the signed-in user's speech recognised
//! (`POST /api/voice/transcribe`, a WAV the page recorded itself), and the
//! reply spoken sentence by sentence with the mouth shapes and expression
//! the avatar shows (`POST /api/voice/speak`). Both run through the same
//! gateway and metering as `/v1/audio/*` (`crate::audio`), as the web
//! caller.

use super::*;
use crate::audio;
use hanlin_speech::{tts, viseme, Options};

/// The avatar's looks (a persona's `look`; app.css draws each, and the
/// page learns the list from `/api/me`).
pub const LOOKS: [&str; 4] = ["scholar", "friend", "teacher", "robot"];
/// The largest recording the voice mode sends: two minutes of the page's
/// 16 kHz 16-bit WAV, with room to spare.
pub const MAX_UTTERANCE_BYTES: usize = 4 << 20;
/// The most text one speak request says, in characters.
pub const MAX_SPEAK_CHARS: usize = 1000;
/// The voice when the persona has none.
const DEFAULT_VOICE: &str = "alloy";

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TranscribeQuery {
    language: Option<String>,
}

/// Recognise what the user said: `{text, language, duration}`.
pub async fn transcribe(
    State(st): State<Arc<AppState>>,
    WebWrite(s): WebWrite,
    Query(q): Query<TranscribeQuery>,
    crate::extract::Body(body): crate::extract::Body,
) -> AppResult<Json<Value>> {
    let caller = web_caller(&st, &s).await?;
    let model = hanlin_store::WHISPER_MODEL;
    if !crate::api::visible(&caller, model) {
        return Err(ApiError::model_not_found(model));
    }
    let opts = Options {
        language: q.language.filter(|l| !l.trim().is_empty()),
        ..Options::default()
    };
    let t = audio::recognize(&st, &caller, model, Vec::from(body), None, opts).await?;
    Ok(Json(json!({
        "text": t.text(),
        "language": t.language,
        "duration": t.duration,
    })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SpeakBody {
    text: String,
    #[serde(default)]
    voice: String,
    /// `tts-1` (espeak-ng, the default: fastest to first audio) or
    /// `tts-1-hd` (Kokoro's natural voice where it is pulled).
    model: Option<String>,
    speed: Option<f32>,
}

/// Say `text`: `{rate, audio` (base64 of 16-bit mono PCM)`, visemes`
/// (`[[ms, mouth], …]`)`, expression, duration_ms}`.
pub async fn speak(
    State(st): State<Arc<AppState>>,
    WebWrite(s): WebWrite,
    JsonBody(b): JsonBody<SpeakBody>,
) -> AppResult<Json<Value>> {
    use base64::Engine as _;
    audio::check_speech_text(&b.text, "text", MAX_SPEAK_CHARS)?;
    let voice = audio::speech_voice(if b.voice.is_empty() {
        DEFAULT_VOICE
    } else {
        &b.voice
    })?;
    let speed = b.speed.unwrap_or(1.0);
    if !(0.5..=2.0).contains(&speed) {
        return Err(ApiError::bad_request("'speed' must be from 0.5 to 2.").param("speed"));
    }
    let model = b.model.as_deref().unwrap_or("tts-1");
    if !matches!(model, "tts-1" | "tts-1-hd") {
        return Err(ApiError::bad_request("'model' is tts-1 or tts-1-hd.").param("model"));
    }
    let caller = web_caller(&st, &s).await?;
    if !crate::api::visible(&caller, model) {
        return Err(ApiError::model_not_found(model));
    }
    let expression = viseme::expression(&b.text);
    let (samples, cues) =
        audio::speak_with_visemes(&st, &caller, b.text, voice, model, speed).await?;
    let pcm = hanlin_speech::audio::pcm16(&samples);
    Ok(Json(json!({
        "rate": tts::OUTPUT_RATE,
        "audio": base64::engine::general_purpose::STANDARD.encode(pcm),
        "visemes": cues.iter().map(|c| json!([c.at_ms, c.mouth])).collect::<Vec<_>>(),
        "expression": expression,
        "duration_ms": samples.len() as u64 * 1000 / tts::OUTPUT_RATE as u64,
    })))
}
