//! `hanlin transcribe`: speech to text (or English) with Whisper, as
//! text, JSON or subtitles.

use anyhow::{bail, Context, Result};
use clap::Args;
use hanlin_speech::{audio, recognize, subtitle, Options, Task};
use hanlin_store::Store;
use std::path::PathBuf;

#[derive(Args)]
pub struct TranscribeArgs {
    /// Audio file: WAV, MP3, Ogg Vorbis, FLAC or M4A/AAC
    file: PathBuf,
    /// Speech model (catalog name or a faster-whisper model directory)
    #[arg(long, default_value = hanlin_store::WHISPER_MODEL)]
    model: String,
    /// Language spoken (a code like zh or en; default: detected)
    #[arg(long, short = 'l')]
    language: Option<String>,
    /// Translate to English instead of transcribing
    #[arg(long)]
    translate: bool,
    /// text, json, verbose_json, srt or vtt
    #[arg(long, short = 'f', default_value = "text")]
    format: String,
    /// Words and spelling to expect (names, terms)
    #[arg(long)]
    prompt: Option<String>,
    /// Sampling temperature of the first try (0: greedy)
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    /// Decode silence too (no voice-activity detection)
    #[arg(long)]
    no_vad: bool,
    /// Write here instead of stdout
    #[arg(long, short = 'o')]
    output: Option<PathBuf>,
}

/// Audio longer than this is refused (memory stays bounded).
const MAX_SECONDS: f64 = 4.0 * 3600.0;

pub fn transcribe(store: &Store, threads: usize, a: TranscribeArgs) -> Result<()> {
    if !subtitle::RESPONSE_FORMATS.contains(&a.format.as_str()) {
        bail!(
            "unknown format {:?} (text, json, verbose_json, srt or vtt)",
            a.format
        );
    }
    let bytes = std::fs::read(&a.file).with_context(|| format!("reading {}", a.file.display()))?;
    let ext = a.file.extension().and_then(|e| e.to_str());
    let pcm = audio::decode(bytes, ext, MAX_SECONDS)
        .with_context(|| format!("reading {}", a.file.display()))?;
    let samples = audio::to_16k(pcm)?;
    let rec = hanlin_speech::load_recognizer(store, &a.model, threads, true)?;
    let opts = Options {
        task: if a.translate {
            Task::Translate
        } else {
            Task::Transcribe
        },
        language: a.language.clone(),
        prompt: a.prompt.clone(),
        temperature: a.temperature,
        fallback: true,
        vad: !a.no_vad,
        seed: 0,
    };
    let pb = indicatif::ProgressBar::new(1000);
    pb.set_style(
        indicatif::ProgressStyle::with_template("transcribing [{bar:30}] {msg}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    let started = std::time::Instant::now();
    let t = rec.transcribe(&samples, &opts, &mut |done, total| {
        pb.set_position((done / total.max(1e-9) * 1000.0) as u64);
        pb.set_message(format!("{done:.0}/{total:.0} s"));
        true
    })?;
    pb.finish_and_clear();
    tracing::info!(
        "{:.1} s of audio in {:.1} s ({:.1}x real time), language {}",
        t.duration,
        started.elapsed().as_secs_f64(),
        t.duration / started.elapsed().as_secs_f64().max(1e-9),
        t.language
    );
    let out = render(&t, &a.format, opts.task);
    match &a.output {
        Some(p) => std::fs::write(p, out).with_context(|| format!("writing {}", p.display()))?,
        None => print!("{out}"),
    }
    Ok(())
}

/// A transcript in one of the endpoint's formats.
pub fn render(t: &recognize::Transcript, format: &str, task: Task) -> String {
    match format {
        "srt" => subtitle::srt(&t.segments),
        "vtt" => subtitle::vtt(&t.segments),
        "json" => format!("{}\n", serde_json::json!({ "text": t.text() })),
        "verbose_json" => format!("{}\n", t.verbose_json(task)),
        _ => format!("{}\n", t.text()),
    }
}

#[derive(Args)]
pub struct SayArgs {
    /// Text to speak (Chinese, English or both); `-` reads stdin
    text: String,
    /// Write the WAV here
    #[arg(long, short = 'o', default_value = "speech.wav")]
    output: PathBuf,
    /// Voice: alloy, ash, ballad, coral, echo, fable, nova, onyx, sage, shimmer, verse
    #[arg(long, default_value = "alloy")]
    voice: String,
    /// Speaking rate, 0.25 to 4.0
    #[arg(long, default_value_t = 1.0)]
    speed: f32,
    /// Synthesiser: espeak-ng (tts-1), or kokoro-82m (tts-1-hd): the
    /// natural voice, pulled on first use
    #[arg(long, short = 'm', default_value = "espeak-ng")]
    model: String,
}

/// `hanlin say`: text to a WAV file, sentence by sentence.
pub fn say(store: &hanlin_store::Store, threads: usize, a: SayArgs) -> Result<()> {
    use hanlin_speech::tts;
    let text = if a.text == "-" {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut std::io::stdin(), &mut s).context("reading stdin")?;
        s
    } else {
        a.text.clone()
    };
    if text.trim().is_empty() {
        bail!("nothing to say");
    }
    let voice = tts::voice(&a.voice).with_context(|| {
        let names: Vec<&str> = tts::VOICES.iter().map(|v| v.name).collect();
        format!(
            "unknown voice {:?} (use one of {})",
            a.voice,
            names.join(", ")
        )
    })?;
    if !(0.25..=4.0).contains(&a.speed) {
        bail!("--speed must be from 0.25 to 4.0");
    }
    let (model, _) = tts::model(&a.model).with_context(|| {
        let names: Vec<&str> = tts::MODEL_NAMES.iter().map(|(n, _)| *n).collect();
        format!(
            "unknown speech model {:?} (use one of {})",
            a.model,
            names.join(", ")
        )
    })?;
    let mut synth = tts::Synth::find()?;
    if model == tts::Model::Kokoro {
        synth = synth.with_kokoro(hanlin_speech::load_kokoro(store, threads, true)?);
    }
    let mut samples = Vec::new();
    for s in hanlin_speech::text::sentences(&text) {
        samples.extend(synth.speak(&s, voice, model, a.speed)?);
    }
    std::fs::write(&a.output, audio::wav_bytes(&samples, tts::OUTPUT_RATE))
        .with_context(|| format!("writing {}", a.output.display()))?;
    eprintln!(
        "wrote {} ({:.1} s)",
        a.output.display(),
        samples.len() as f64 / tts::OUTPUT_RATE as f64
    );
    Ok(())
}
