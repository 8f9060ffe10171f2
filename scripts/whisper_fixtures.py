#!/usr/bin/env python3
"""Record reference transcripts for Hanlin's Whisper parity test.

Runs once, by hand, never in CI. Needs `pip install faster-whisper` (it
brings ctranslate2 and PyAV) and `espeak-ng` (Debian), and the
`whisper-base` model pulled into Hanlin's store (`hanlin pull whisper-base`).

Writes crates/speech/tests/data/:
  zh_espeak.wav, en_espeak.wav  synthesised speech (espeak-ng), 16 kHz
  whisper_base.json             for each fixture: faster-whisper's
                                segments (start, end, text, tokens), the
                                language, and log-mel values at fixed spots

Decoding options match Hanlin's `Options` with voice-activity detection
off and no temperature fallback (sampling is random): greedy, timestamps,
the previous text as prompt, float32 compute.
"""
import json, os, subprocess, sys, tempfile, wave

import numpy as np
from faster_whisper import WhisperModel, decode_audio
from faster_whisper.feature_extractor import FeatureExtractor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(ROOT, "crates/speech/tests/data")
HOME = os.environ.get("HANLIN_HOME", os.path.expanduser("~/.local/share/hanlin"))

SYNTH = {
    # (voice, text): Mandarin is spoken from pinyin with tone numbers.
    "zh_espeak.wav": ("cmn-latn-pinyin",
                      "jin1 tian1 tian1 qi4 hen3 hao3, wo3 men5 qu4 gong1 yuan2 san4 bu4 ba5."),
    "en_espeak.wav": ("en", "The meeting starts at nine thirty tomorrow morning."),
}


def model_dir():
    m = json.load(open(os.path.join(HOME, "manifests/whisper-base.json")))
    d = tempfile.mkdtemp()
    os.symlink(os.path.join(HOME, "blobs", "sha256-" + m["sha256"]), os.path.join(d, "model.bin"))
    for name, sha in m["files"].items():
        os.symlink(os.path.join(HOME, "blobs", "sha256-" + sha), os.path.join(d, name))
    return d


def write_wav(path, samples):
    pcm = np.clip(np.round(samples * 32768.0), -32768, 32767).astype("<i2")
    with wave.open(path, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes(pcm.tobytes())


def read_wav(path):
    with wave.open(path, "rb") as w:
        assert w.getframerate() == 16000 and w.getnchannels() == 1 and w.getsampwidth() == 2
        return np.frombuffer(w.readframes(w.getnframes()), dtype="<i2").astype(np.float32) / 32768.0


def long_audio(jfk):
    """jfk three times with two seconds of silence between: 37 s, three windows."""
    gap = np.zeros(32000, dtype=np.float32)
    return np.concatenate([jfk, gap, jfk, gap, jfk])


def main():
    for name, (voice, text) in SYNTH.items():
        with tempfile.NamedTemporaryFile(suffix=".wav") as t:
            subprocess.run(["espeak-ng", "-v", voice, "-w", t.name, text], check=True)
            write_wav(os.path.join(DATA, name), decode_audio(t.name))
    model = WhisperModel(model_dir(), device="cpu", compute_type="float32")
    fe = FeatureExtractor()
    jfk = read_wav(os.path.join(DATA, "jfk.wav"))
    zh = read_wav(os.path.join(DATA, "zh_espeak.wav"))
    # name: (audio, language given or None: detected, task)
    cases = {
        "jfk.wav": (jfk, None, "transcribe"),
        "zh_espeak.wav": (zh, "zh", "transcribe"),
        "zh_espeak.wav:translate": (zh, "zh", "translate"),
        "en_espeak.wav": (read_wav(os.path.join(DATA, "en_espeak.wav")), None, "transcribe"),
        "jfk_x3": (long_audio(jfk), None, "transcribe"),
    }
    out = {}
    for name, (audio, language, task) in cases.items():
        segments, info = model.transcribe(audio, language=language, task=task, beam_size=1,
                                          best_of=1, vad_filter=False, temperature=0.0,
                                          condition_on_previous_text=True)
        segments = list(segments)
        mel = fe(audio)
        spots = [(m, t) for m in (0, 17, 40, 79) for t in (0, 37, mel.shape[1] // 2, mel.shape[1] - 1)]
        out[name] = {
            "language": info.language,
            "given_language": language,
            "task": task,
            "frames": int(mel.shape[1]),
            "mel": [[m, t, float(mel[m, t])] for m, t in spots],
            "segments": [{"start": s.start, "end": s.end, "text": s.text, "tokens": s.tokens}
                         for s in segments],
        }
        print(name, info.language, [s.text for s in segments], file=sys.stderr)
    with open(os.path.join(DATA, "whisper_base.json"), "w") as f:
        json.dump(out, f, ensure_ascii=False, indent=1)
        f.write("\n")


if __name__ == "__main__":
    main()
