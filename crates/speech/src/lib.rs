//! Speech for Hanlin: audio decoding and resampling ([`audio`]), Whisper's
//! log-mel features ([`mel`]), voice-activity detection ([`vad`]),
//! recognition and translation with timestamps on the engine's Whisper
//! ([`recognize`]), subtitles ([`subtitle`]) and Whisper's languages
//! ([`lang`]); speech out with espeak-ng ([`tts`]) from text read the way a
//! Chinese speaker reads it ([`text`]: numbers, pinyin, tone sandhi), with
//! the mouth shapes and expression a talking face shows ([`viseme`]), and
//! the natural Kokoro voice ([`kokoro`]) reading [`phonemes`].

pub mod audio;
pub mod kokoro;
pub mod lang;
pub mod mel;
pub mod phonemes;
pub mod recognize;
pub mod subtitle;
pub mod text;
pub mod tts;
pub mod vad;
pub mod viseme;

pub use recognize::{Options, Recognizer, Segment, Task, Transcript};

#[derive(Debug, thiserror::Error)]
pub enum SpeechError {
    /// The upload is not audio we can read (damaged, empty, no track).
    #[error("{0}")]
    BadAudio(String),
    /// A container or codec we do not decode.
    #[error("{0}")]
    Unsupported(String),
    #[error("the audio is longer than {max_seconds} seconds")]
    TooLong { max_seconds: f64 },
    #[error("{0}")]
    BadRequest(String),
    #[error("cancelled")]
    Cancelled,
    #[error("speech model: {0}")]
    Model(String),
    #[error(transparent)]
    Engine(#[from] hanlin_engine::EngineError),
}

/// Load speech model `name` (a catalog name such as `whisper-base`, or a
/// directory holding `model.bin`, `tokenizer.json` and `config.json`),
/// pulling a catalog model that is not in the store yet.
pub fn load_recognizer(
    store: &hanlin_store::Store,
    name: &str,
    threads: usize,
    progress: bool,
) -> Result<Recognizer, SpeechError> {
    let dir = std::path::Path::new(name);
    if dir.join("model.bin").is_file() {
        return Recognizer::load(
            &dir.join("model.bin"),
            &dir.join("tokenizer.json"),
            &dir.join("config.json"),
            threads,
        );
    }
    let store_err = |e: hanlin_store::StoreError| SpeechError::Model(format!("{name}: {e}"));
    let file = |f: &str| store.file_of(name, f).map_err(store_err);
    let found = |model: Option<std::path::PathBuf>, t, c| match (model, t, c) {
        (Some(m), Some(t), Some(c)) => Some((m, t, c)),
        _ => None,
    };
    let mut paths = found(
        store.path_of(name).map_err(store_err)?,
        file("tokenizer.json")?,
        file("config.json")?,
    );
    if paths.is_none() {
        store.pull(name, progress).map_err(store_err)?;
        paths = found(
            store.path_of(name).map_err(store_err)?,
            file("tokenizer.json")?,
            file("config.json")?,
        );
    }
    let (m, t, c) = paths.ok_or_else(|| {
        SpeechError::Model(format!(
            "{name} is not a speech model (it has no tokenizer.json and config.json beside it)"
        ))
    })?;
    Recognizer::load(&m, &t, &c, threads)
}

/// Kokoro ([`kokoro`]) from the store — the model, its voice packs and
/// vocabulary, and ONNX Runtime — pulled first when any of them is not
/// there (a pull of what is complete fetches nothing).
pub fn load_kokoro(
    store: &hanlin_store::Store,
    threads: usize,
    progress: bool,
) -> Result<kokoro::Kokoro, SpeechError> {
    let name = hanlin_store::KOKORO_MODEL;
    let store_err = |e: hanlin_store::StoreError| SpeechError::Model(format!("{name}: {e}"));
    store.pull(name, progress).map_err(store_err)?;
    let incomplete = || SpeechError::Model(format!("{name} is incomplete in the store"));
    let file = |f: &str| {
        store
            .file_of(name, f)
            .map_err(store_err)?
            .ok_or_else(incomplete)
    };
    let model = store
        .path_of(name)
        .map_err(store_err)?
        .ok_or_else(incomplete)?;
    let runtime = store
        .runtime(&hanlin_store::ONNXRUNTIME, progress)
        .map_err(store_err)?;
    let voices = kokoro::Voices::load(&file("voices.npz")?, &file("vocab.json")?)?;
    kokoro::Kokoro::load(&runtime, &model, voices, threads)
}
