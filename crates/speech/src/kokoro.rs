//! Kokoro-82M, the natural voice: an ONNX model (int8, 92 MB) that turns
//! a phoneme string and a 256-number voice style into 24 kHz audio, run by
//! ONNX Runtime opened at run time from the library the store fetched
//! ([`hanlin_store::ONNXRUNTIME`]) — nothing is linked at build time, and
//! a build without the `kokoro` feature has no ONNX code at all.
//!
//! The phonemes come from [`crate::phonemes`]; the voice packs
//! (`voices.npz`: per voice, one style row for each input length) and the
//! phoneme vocabulary (`vocab.json`) are kept beside the model.

use crate::SpeechError;
use std::collections::HashMap;
use std::io::Read;
use std::path::Path;

/// The rate Kokoro speaks at.
pub const RATE: u32 = 24_000;
/// Style vector width.
const STYLE: usize = 256;
/// The most phoneme tokens one call takes (the model's 512 positions,
/// less the two pads).
pub const MAX_TOKENS: usize = 510;

/// Voice packs and vocabulary: what Kokoro needs besides the network.
pub struct Voices {
    /// Voice name → rows × [`STYLE`] floats (row i: inputs of i+1 tokens).
    packs: Vec<(String, Vec<f32>)>,
    vocab: HashMap<char, i64>,
}

impl Voices {
    pub fn load(voices_npz: &Path, vocab_json: &Path) -> Result<Self, SpeechError> {
        let bad =
            |what: &Path, e: String| SpeechError::Model(format!("Kokoro {}: {e}", what.display()));
        let text =
            std::fs::read_to_string(vocab_json).map_err(|e| bad(vocab_json, e.to_string()))?;
        let v: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| bad(vocab_json, e.to_string()))?;
        let mut vocab = HashMap::new();
        for (k, id) in v["vocab"].as_object().into_iter().flatten() {
            let mut cs = k.chars();
            if let (Some(c), None, Some(id)) = (cs.next(), cs.next(), id.as_i64()) {
                vocab.insert(c, id);
            }
        }
        if vocab.is_empty() {
            return Err(bad(vocab_json, "no phoneme vocabulary".into()));
        }
        let f = std::fs::File::open(voices_npz).map_err(|e| bad(voices_npz, e.to_string()))?;
        let mut zip = zip::ZipArchive::new(f).map_err(|e| bad(voices_npz, e.to_string()))?;
        let mut packs = Vec::new();
        for i in 0..zip.len() {
            let mut entry = zip
                .by_index(i)
                .map_err(|e| bad(voices_npz, e.to_string()))?;
            let Some(name) = entry.name().strip_suffix(".npy").map(str::to_string) else {
                continue;
            };
            // A voice pack is 510 × 256 floats (522 kB); refuse anything far larger.
            if entry.size() > 16 << 20 {
                return Err(bad(voices_npz, format!("{name} is too large")));
            }
            let mut bytes = Vec::with_capacity(entry.size() as usize);
            entry
                .read_to_end(&mut bytes)
                .map_err(|e| bad(voices_npz, e.to_string()))?;
            let rows = npy_f32(&bytes).map_err(|e| bad(voices_npz, format!("{name}: {e}")))?;
            packs.push((name, rows));
        }
        if packs.is_empty() {
            return Err(bad(voices_npz, "no voice packs".into()));
        }
        packs.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(Self { packs, vocab })
    }

    /// `c` is a symbol of the model's vocabulary (one token).
    pub fn knows(&self, c: char) -> bool {
        self.vocab.contains_key(&c)
    }

    /// Phonemes as the model's token ids (symbols outside its vocabulary
    /// are dropped).
    pub fn tokens(&self, phonemes: &str) -> Vec<i64> {
        phonemes
            .chars()
            .filter_map(|c| self.vocab.get(&c).copied())
            .collect()
    }

    /// The style for an input of `n` tokens in voice `name`.
    #[cfg_attr(not(feature = "kokoro"), allow(dead_code))]
    fn style(&self, name: &str, n: usize) -> Option<&[f32]> {
        let (_, rows) = self.packs.iter().find(|(p, _)| p == name)?;
        let count = rows.len() / STYLE;
        let row = n.clamp(1, count) - 1;
        rows.get(row * STYLE..(row + 1) * STYLE)
    }
}

/// The floats of a `.npy` array of little-endian f32 in C order, whose
/// last dimension is [`STYLE`].
fn npy_f32(b: &[u8]) -> Result<Vec<f32>, String> {
    let rest = b.strip_prefix(b"\x93NUMPY").ok_or("not a .npy array")?;
    let (major, rest) = rest.split_first().ok_or("truncated")?;
    let rest = rest.get(1..).ok_or("truncated")?;
    let (len, rest) = match major {
        1 => {
            let l = rest.get(..2).ok_or("truncated")?;
            (u16::from_le_bytes([l[0], l[1]]) as usize, &rest[2..])
        }
        2 | 3 => {
            let l = rest.get(..4).ok_or("truncated")?;
            (
                u32::from_le_bytes([l[0], l[1], l[2], l[3]]) as usize,
                &rest[4..],
            )
        }
        v => return Err(format!(".npy version {v} is not known")),
    };
    let header = std::str::from_utf8(rest.get(..len).ok_or("truncated header")?)
        .map_err(|_| "header is not text")?;
    let data = &rest[len..];
    if !header.contains("'descr': '<f4'") || !header.contains("'fortran_order': False") {
        return Err(format!("not little-endian f32 in C order: {header}"));
    }
    let shape = header
        .split("'shape': (")
        .nth(1)
        .and_then(|s| s.split(')').next())
        .ok_or("no shape")?;
    let dims: Vec<usize> = shape
        .split(',')
        .map(str::trim)
        .filter(|d| !d.is_empty())
        .map(|d| d.parse().map_err(|_| format!("bad shape ({shape})")))
        .collect::<Result<_, _>>()?;
    let n = dims
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .ok_or("shape overflows")?;
    if dims.last() != Some(&STYLE) || n == 0 {
        return Err(format!("shape ({shape}) is not rows × {STYLE}"));
    }
    if data.len() != n * 4 {
        return Err(format!("{} data bytes for shape ({shape})", data.len()));
    }
    Ok(data
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect())
}

/// The network, on ONNX Runtime.
#[cfg(feature = "kokoro")]
pub struct Kokoro {
    session: std::sync::Mutex<ort::session::Session>,
    pub voices: Voices,
}

#[cfg(feature = "kokoro")]
impl Kokoro {
    /// Open ONNX Runtime from `runtime` (once per process) and the model.
    pub fn load(
        runtime: &Path,
        model: &Path,
        voices: Voices,
        threads: usize,
    ) -> Result<Self, SpeechError> {
        let ort_err = |e: String| SpeechError::Model(format!("ONNX Runtime: {e}"));
        // One ONNX Runtime environment per process, from the first library
        // opened; it lives as long as the process.
        static ENV: std::sync::OnceLock<Result<ort::environment::Environment, String>> =
            std::sync::OnceLock::new();
        let env = ENV
            .get_or_init(|| {
                ort::init_from(runtime)
                    .map_err(|e| e.to_string())?
                    .with_name("hanlin")
                    .build()
                    .map_err(|e| e.to_string())
            })
            .as_ref()
            .map_err(|e| ort_err(e.clone()))?;
        let session = ort::session::Session::builder(env)
            .map_err(|e| ort_err(e.to_string()))?
            .with_intra_threads(threads.max(1))
            .map_err(|e| ort_err(e.to_string()))?
            .with_inter_threads(1)
            .map_err(|e| ort_err(e.to_string()))?
            // Its threads sleep between runs: the chat engine's pool needs
            // the cores.
            .with_intra_op_spinning(false)
            .map_err(|e| ort_err(e.to_string()))?
            .commit_from_file(model)
            .map_err(|e| SpeechError::Model(format!("Kokoro {}: {e}", model.display())))?;
        Ok(Self {
            session: std::sync::Mutex::new(session),
            voices,
        })
    }

    /// Speak `tokens` (at most [`MAX_TOKENS`]) in `voice` at `speed`
    /// (1.0 normal): mono samples at [`RATE`].
    pub fn synthesize(
        &self,
        tokens: &[i64],
        voice: &str,
        speed: f32,
    ) -> Result<Vec<f32>, SpeechError> {
        use ort::value::Tensor;
        if tokens.is_empty() {
            return Ok(Vec::new());
        }
        if tokens.len() > MAX_TOKENS {
            return Err(SpeechError::BadRequest(format!(
                "{} phonemes in one piece; Kokoro takes at most {MAX_TOKENS}",
                tokens.len()
            )));
        }
        let style = self
            .voices
            .style(voice, tokens.len())
            .ok_or_else(|| SpeechError::BadRequest(format!("unknown Kokoro voice {voice:?}")))?;
        let mut padded = Vec::with_capacity(tokens.len() + 2);
        padded.push(0);
        padded.extend_from_slice(tokens);
        padded.push(0);
        let err = |e: ort::Error| SpeechError::Model(format!("Kokoro: {e}"));
        let n = padded.len();
        let inputs = ort::inputs![
            "tokens" => Tensor::from_array(([1usize, n], padded)).map_err(err)?,
            "style" => Tensor::from_array(([1usize, STYLE], style.to_vec())).map_err(err)?,
            "speed" => Tensor::from_array(([1usize], vec![speed])).map_err(err)?,
        ];
        let mut session = self
            .session
            .lock()
            .map_err(|_| SpeechError::Model("Kokoro: a previous run panicked".into()))?;
        let outputs = session.run(inputs).map_err(err)?;
        let (_, audio) = outputs["audio"].try_extract_tensor::<f32>().map_err(err)?;
        Ok(audio.iter().map(|s| s.clamp(-1.0, 1.0)).collect())
    }
}

/// Without the `kokoro` feature there is no network to load.
#[cfg(not(feature = "kokoro"))]
pub struct Kokoro {
    pub voices: Voices,
}

#[cfg(not(feature = "kokoro"))]
impl Kokoro {
    pub fn load(_: &Path, _: &Path, _: Voices, _: usize) -> Result<Self, SpeechError> {
        Err(SpeechError::Model(
            "this build of Hanlin has no Kokoro voice (built without the `kokoro` feature)".into(),
        ))
    }

    pub fn synthesize(&self, _: &[i64], _: &str, _: f32) -> Result<Vec<f32>, SpeechError> {
        Err(SpeechError::Model("no Kokoro voice in this build".into()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn npy(header: &str, data: &[f32]) -> Vec<u8> {
        let mut h = header.to_string();
        while !(10 + h.len() + 1).is_multiple_of(64) {
            h.push(' ');
        }
        h.push('\n');
        let mut b = b"\x93NUMPY\x01\x00".to_vec();
        b.extend_from_slice(&(h.len() as u16).to_le_bytes());
        b.extend_from_slice(h.as_bytes());
        for x in data {
            b.extend_from_slice(&x.to_le_bytes());
        }
        b
    }

    #[test]
    fn voice_packs_are_read_and_bad_arrays_refused() {
        let data: Vec<f32> = (0..2 * STYLE).map(|i| i as f32).collect();
        let ok = npy(
            "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 1, 256), }",
            &data,
        );
        assert_eq!(npy_f32(&ok).expect("read"), data);
        for (header, d) in [
            ("{'descr': '<f8', 'fortran_order': False, 'shape': (2, 1, 256), }", &data[..]),
            ("{'descr': '<f4', 'fortran_order': True, 'shape': (2, 1, 256), }", &data[..]),
            ("{'descr': '<f4', 'fortran_order': False, 'shape': (2, 1, 128), }", &data[..]),
            ("{'descr': '<f4', 'fortran_order': False, 'shape': (3, 1, 256), }", &data[..]),
            ("{'descr': '<f4', 'fortran_order': False, 'shape': (99999999999999, 99999999999, 256), }", &data[..]),
        ] {
            assert!(npy_f32(&npy(header, d)).is_err(), "{header}");
        }
        assert!(npy_f32(&ok[..20]).is_err());
        assert!(npy_f32(b"not numpy").is_err());
    }
}
