#!/usr/bin/env python3
"""Voice-mode latency: from the end of a spoken question to the first audio
of the answer, the way the web app's voice mode runs a turn — the recording
recognised (/v1/audio/transcriptions), the reply streamed
(/v1/chat/completions) until its first sentence is complete (the page's
rule: a sentence end, or a comma after at least 12 characters), that
sentence spoken (/v1/audio/speech). Target: at most 1.5 s after a 3 s
question.

    python3 bench/voice_latency.py [--threads 2] [--reps 5] [--model qwen2.5-coder-0.5b]
        [--voice-model tts-1|tts-1-hd]

The questions are SYNTHESISED (espeak-ng through /v1/audio/speech, padded
with silence to 3 s): the figure is about time, not accuracy. Prints the
CPU, then per question and overall the median of each stage and of the
total. Only the Python standard library is used.
"""
import argparse
import io
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import wave
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from machine import describe  # noqa: E402
from serve_load import free_port, start_hanlin, wait_ready  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
HANLIN = Path(os.environ.get("HANLIN_BIN", ROOT / "target" / "release" / "hanlin"))
QUESTIONS = [
    ("en", "What is the capital of France?"),
    ("en", "How many days are in a week?"),
    ("en", "Tell me a fun fact about cats."),
]
TARGET_S = 1.5
QUESTION_S = 3.0


def post(base, key, path, body, ctype="application/json"):
    req = urllib.request.Request(base + path, data=body, method="POST", headers={
        "Authorization": f"Bearer {key}", "Content-Type": ctype})
    return urllib.request.urlopen(req, timeout=300)


def question_wav(base, key, text):
    """The question spoken, padded with silence to QUESTION_S seconds, as 16-bit WAV."""
    body = json.dumps({"model": "tts-1", "voice": "alloy", "input": text, "response_format": "pcm"}).encode()
    pcm = post(base, key, "/v1/audio/speech", body).read()
    rate = 24000
    want = int(QUESTION_S * rate) * 2
    pcm = pcm[:want] + b"\0" * max(0, want - len(pcm))
    out = io.BytesIO()
    with wave.open(out, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm)
    return out.getvalue()


def transcribe(base, key, wav):
    boundary = "voice-latency-boundary"
    parts = [
        f'--{boundary}\r\nContent-Disposition: form-data; name="model"\r\n\r\nwhisper-1\r\n'.encode(),
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="q.wav"\r\n'
        "Content-Type: audio/wav\r\n\r\n".encode() + wav + b"\r\n",
        f"--{boundary}--\r\n".encode(),
    ]
    r = post(base, key, "/v1/audio/transcriptions", b"".join(parts), f"multipart/form-data; boundary={boundary}")
    return json.loads(r.read())["text"].strip()


SENTENCE_END = re.compile(r"[。！？!?；;\n]|[.:](?=\s)")


def first_sentence(base, key, model, text):
    """Stream the reply until its first sentence is complete (the page's rule)."""
    body = json.dumps({"model": model, "stream": True, "max_tokens": 200, "temperature": 0,
                       "messages": [{"role": "user", "content": text}]}).encode()
    got = ""
    with post(base, key, "/v1/chat/completions", body) as r:
        for line in r:
            line = line.decode().strip()
            if not line.startswith("data:") or line == "data: [DONE]":
                continue
            delta = json.loads(line[5:])["choices"][0]["delta"].get("content") or ""
            got += delta
            m = SENTENCE_END.search(got)
            if m:
                return got[: m.end()]
            comma = re.search(r"[，,、]", got)
            if comma and comma.start() >= 12:
                return got[: comma.end()]
    return got


def speak(base, key, sentence, model):
    body = json.dumps({"model": model, "voice": "alloy", "input": sentence, "response_format": "pcm"}).encode()
    with post(base, key, "/v1/audio/speech", body) as r:
        r.read(2)  # the first audio


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen2.5-coder-0.5b")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--voice-model", default="tts-1",
                    help="tts-1 (espeak-ng, the voice mode's default) or tts-1-hd (Kokoro)")
    args = ap.parse_args()
    print(describe(args.threads))
    with tempfile.TemporaryDirectory() as tmp:
        port = free_port()
        proc, key = start_hanlin(HANLIN, args.model, args.threads, port, tmp)
        base = f"http://127.0.0.1:{port}"
        try:
            wait_ready(base + "/health", proc)
            totals = []
            print(f"{'question':34} {'heard':34} {'asr s':>6} {'llm s':>6} {'tts s':>6} {'total s':>7}")
            for _, q in QUESTIONS:
                wav = question_wav(base, key, q)
                transcribe(base, key, wav)  # warm-up: loads Whisper
                speak(base, key, first_sentence(base, key, args.model, q), args.voice_model)
                rows = []
                for _ in range(args.reps):
                    t0 = time.perf_counter()
                    heard = transcribe(base, key, wav)
                    t1 = time.perf_counter()
                    sentence = first_sentence(base, key, args.model, heard)
                    t2 = time.perf_counter()
                    speak(base, key, sentence, args.voice_model)
                    t3 = time.perf_counter()
                    rows.append((t1 - t0, t2 - t1, t3 - t2, t3 - t0))
                med = [statistics.median(r[i] for r in rows) for i in range(4)]
                totals.append(med[3])
                print(f"{q[:34]:34} {heard[:34]:34} {med[0]:6.2f} {med[1]:6.2f} {med[2]:6.2f} {med[3]:7.2f}")
            overall = statistics.median(totals)
            verdict = "meets" if overall <= TARGET_S else "misses"
            print(f"median time to first audio ({args.voice_model}) after a {QUESTION_S:.0f} s question: {overall:.2f} s "
                  f"({verdict} the {TARGET_S} s target; {TARGET_S / overall:.2f}x of the budget)")
        finally:
            proc.terminate()
            proc.wait()


if __name__ == "__main__":
    main()
