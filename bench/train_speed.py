#!/usr/bin/env python3
"""Training speed on this machine: tokens/s and model FLOPs utilisation
(MFU) of `hanlin train pretrain` for a ~2M and a ~30M parameter GPT.

Model FLOPs per token = 6 × parameters + 12 × layers × d_model × seq (the
attention scores), the usual estimate; the peak is cores × clock × FLOPs per
cycle (32 for AVX2 with two FMA units, 64 with AVX-512), read from
/proc/cpuinfo — so MFU is against the vector units' ceiling.

Each model is trained with burn's flex CPU backend, the one Hanlin builds
(its ndarray backend was 0.66× flex's rate here and was dropped).

Usage: python3 bench/train_speed.py [--hanlin target/release/hanlin] [--steps 30]
Reference (the issue): ≈ 5,000 tok/s (2M) and ≈ 684 tok/s (30M) with burn on
this 2-core machine.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

MODELS = {
    # name: (layers, d_model, heads, kv heads, d_ff, vocab, seq, batch)
    "2M": (6, 160, 4, 4, 480, 2048, 128, 16),
    "30M": (8, 512, 8, 8, 1536, 8192, 256, 8),
}


def peak_flops() -> tuple[float, str]:
    info = Path("/proc/cpuinfo").read_text()
    mhz = max(float(l.split(":")[1]) for l in info.splitlines() if l.startswith("cpu MHz"))
    flags = next(l for l in info.splitlines() if l.startswith("flags"))
    per_cycle = 64 if "avx512f" in flags else 32
    cores = os.cpu_count() or 1
    return cores * mhz * 1e6 * per_cycle, f"{cores} cores × {mhz:.0f} MHz × {per_cycle} FLOP/cycle"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hanlin", default=str(ROOT / "target" / "release" / "hanlin"))
    ap.add_argument("--steps", type=int, default=30)
    args = ap.parse_args()
    peak, how = peak_flops()
    print(f"peak {peak / 1e9:.0f} GFLOP/s ({how})")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        corpus = tmp / "corpus"
        corpus.mkdir()
        # Enough varied text for any vocabulary: numbers spelled out in Chinese and English.
        digits = "零一二三四五六七八九"
        words = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
        lines = []
        for i in range(60000):
            s = str(i * 7919 % 100003)
            lines.append("".join(digits[int(c)] for c in s) + "，" + " ".join(words[int(c)] for c in s) + "。")
        (corpus / "a.txt").write_text("\n".join(lines), encoding="utf-8")
        for name, (l, d, h, kv, ff, vocab, seq, batch) in MODELS.items():
            tok = tmp / f"tok{vocab}.json"
            if not tok.exists():
                subprocess.run([args.hanlin, "train", "tokenizer", "--corpus", str(corpus), "--vocab", str(vocab), "-o", str(tok)],
                               check=True, capture_output=True)
            cfg = tmp / f"{name}.toml"
            cfg.write_text(
                f"[model]\nn_layer={l}\nd_model={d}\nn_head={h}\nn_head_kv={kv}\nd_ff={ff}\ncontext={seq}\n"
                f"[train]\nsteps={args.steps}\nbatch_size={batch}\nseq_len={seq}\nwarmup=5\neval_every={args.steps}\n"
                f"checkpoint_every={args.steps}\nval_fraction=0.01\n"
            )
            out = tmp / f"run-{name}"
            t = time.time()
            subprocess.run([args.hanlin, "train", "pretrain", "--config", str(cfg), "--corpus", str(corpus),
                            "--tokenizer", str(tok), "-o", str(out)], check=True, capture_output=True)
            s = json.loads((out / "summary.json").read_text())
            flops_tok = 6 * s["parameters"] + 12 * l * d * seq
            mfu = s["tokens_per_sec"] * flops_tok / peak
            print(f"{name:>4}: {s['parameters'] / 1e6:5.1f}M parameters  {s['tokens_per_sec']:8.0f} tokens/s  "
                  f"MFU {mfu:6.1%}  ({args.steps} steps × {batch}×{seq} tokens, {time.time() - t:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
