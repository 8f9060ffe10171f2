#!/usr/bin/env python3
"""Hanlin's Stable Diffusion pipeline against stable-diffusion.cpp on the
same weights, same threads, same run.

    bench/image_speed.py [--threads 2] [--steps 20] [--size 512] [--reps 1]
                         [--model DIR] [--python PY] [--sd-type q8_0]

The weights: a diffusers directory (--model), or a full-size SD-1.5-shaped
pipeline with random f16 weights written by bench/random_sd.py with a
Python that has torch and diffusers (--python; speed does not depend on
the values). stable-diffusion.cpp is built by scripts/build_sd_cpp.sh.

Two settings: SD-1.5 sampling (Euler, --steps steps, guidance 7.5: two
UNet passes per step) and Turbo-style sampling (one step, no guidance).
For each: seconds per step and for the VAE decode, the whole image, and
peak RSS, as medians over --reps runs, and stable-diffusion.cpp's time
divided by Hanlin's (above 1: Hanlin is faster). sd.cpp keeps the file's
f16 weights unless --sd-type asks it to quantize (Hanlin runs Q8_0).
"""
import argparse
import os
import re
import subprocess
import sys
import tempfile

import machine
from compare import median, run_rss, source

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HANLIN = os.path.join(ROOT, "target", "release", "hanlin")
PROMPT = "a photo of a cat by the west lake, highly detailed"


def hanlin(model, steps, guidance, size, threads, out):
    cmd = [HANLIN, "image", PROMPT, "-m", model, "--steps", str(steps), "--guidance", str(guidance),
           "--size", f"{size}x{size}", "--seed", "1", "-t", str(threads), "-o", out]
    env = dict(os.environ, HANLIN_LOG="hanlin_image=info", NO_COLOR="1")
    log, rss = run_rss(cmd, env=env, stderr=True)
    log = re.sub(r"\x1b\[[0-9;]*m", "", log)
    step_ms = [int(m) for m in re.findall(r"denoising step step=\d+ ms=(\d+)", log)]
    dec = re.findall(r"decoded ms=(\d+)", log)
    total = re.findall(r"\(\d+×\d+, seed \d+, \d+ steps, ([\d.]+) s\)", log)
    if not step_ms or not dec or not total:
        sys.exit(f"could not read Hanlin's timings:\n{log[-2000:]}")
    return sum(step_ms) / len(step_ms) / 1000, int(dec[0]) / 1000, float(total[0]), rss


def sdcpp(binary, model, steps, guidance, size, threads, out, wtype):
    cmd = [binary, "-m", model, "-p", PROMPT, "--steps", str(steps), "--cfg-scale", str(max(guidance, 1.0)),
           "-W", str(size), "-H", str(size), "--seed", "1", "-t", str(threads),
           "--sampling-method", "euler", "-o", out]
    if wtype:
        cmd += ["--type", wtype]
    log, rss = run_rss(cmd, stderr=True)
    sampling = re.findall(r"sampling completed, taking ([\d.]+)s", log)
    dec = re.findall(r"decode_first_stage completed, taking ([\d.]+)s", log)
    total = re.findall(r"generate_image completed in ([\d.]+)s", log)
    if not sampling or not dec or not total:
        sys.exit(f"could not read stable-diffusion.cpp's timings:\n{log[-3000:]}")
    return float(sampling[0]) / steps, float(dec[0]), float(total[0]), rss


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--reps", type=int, default=1)
    ap.add_argument("--model", help="a diffusers directory (default: random SD-1.5 weights)")
    ap.add_argument("--python", default=sys.executable, help="a Python with torch and diffusers")
    ap.add_argument("--sd-type", default="", help="weight type for stable-diffusion.cpp (e.g. q8_0)")
    a = ap.parse_args()
    model = a.model
    if not model:
        model = os.path.join(tempfile.gettempdir(), "hanlin-random-sd15")
        if not os.path.exists(os.path.join(model, "model_index.json")):
            subprocess.run([a.python, os.path.join(ROOT, "bench", "random_sd.py"), model], check=True)
    env = dict(os.environ)
    source("build_sd_cpp.sh", env)
    if not os.path.exists(HANLIN):
        subprocess.run(["cargo", "build", "--release", "--bin", "hanlin"], cwd=ROOT, check=True)
    print(machine.describe(a.threads))
    print(f"model: {model}; {a.size}x{a.size}; stable-diffusion.cpp weights: {a.sd_type or 'as stored (f16)'}")
    out = tempfile.mkdtemp()
    print(f"{'setting':<26}{'engine':<20}{'s/step':>8}{'decode s':>10}{'image s':>9}{'peak RSS':>10}")
    for name, steps, guidance in ((f"SD-1.5 {a.steps} steps, cfg 7.5", a.steps, 7.5), ("Turbo 1 step, no cfg", 1, 0.0)):
        h, s = [], []
        for _ in range(a.reps):
            h.append(hanlin(model, steps, guidance, a.size, a.threads, os.path.join(out, "h.png")))
            s.append(sdcpp(env["SD_CPP_BIN"], model, steps, guidance, a.size, a.threads, os.path.join(out, "s.png"), a.sd_type))
        rows = []
        for engine, runs in (("Hanlin (Q8_0)", h), ("stable-diffusion.cpp", s)):
            med = [median([r[i] for r in runs]) for i in range(4)]
            rows.append(med)
            print(f"{name:<26}{engine:<20}{med[0]:>8.2f}{med[1]:>10.2f}{med[2]:>9.1f}{med[3] / 2**30:>9.2f}G")
        print(f"{'':<26}{'sd.cpp / Hanlin':<20}{rows[1][0] / rows[0][0]:>7.2f}x{rows[1][1] / rows[0][1]:>9.2f}x{rows[1][2] / rows[0][2]:>8.2f}x")


if __name__ == "__main__":
    main()
