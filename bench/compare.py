#!/usr/bin/env python3
"""Hanlin vs llama.cpp (and ik_llama.cpp with --ik) on the same GGUF files,
same threads, one run.

    bench/compare.py [--threads 2] [--prompt 512] [--gen 64] [--reps 3] [--ik] [--avx2 | --avxvnni] [MODEL ...]

Builds llama.cpp from the llama-cpp-python source package if needed
(scripts/build_llama_cpp.sh), pulls the models into Hanlin's store, then for
each model runs `hanlin bench` and `llama-bench` (each in its own process,
peak RSS from wait4) and prints medians and ratios, plus the machine's read
bandwidth and the decode ceiling it implies (file size / bandwidth).
"""
import argparse
import json
import os
import subprocess
import sys

import machine

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HANLIN = os.path.join(ROOT, "target", "release", "hanlin")


def run(cmd, env=None):
    """Run cmd, return its stdout."""
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    out, err = p.communicate()
    if p.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{err.decode(errors='replace')[-2000:]}")
    return out.decode()


def run_rss(cmd, env=None, stderr=False):
    """Run cmd, return (stdout, peak RSS bytes); with stderr, stdout and
    stderr together."""
    pid = os.fork()
    if pid == 0:
        fd = os.open(os.devnull, os.O_WRONLY)
        out = os.open("/tmp/.hanlin-bench.out", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(out, 1)
        os.dup2(out if stderr else fd, 2)
        os.execvpe(cmd[0], cmd, env or os.environ)
    _, status, ru = os.wait4(pid, 0)
    if status != 0:
        sys.exit(f"{' '.join(cmd)} failed with status {status}")
    with open("/tmp/.hanlin-bench.out") as f:
        return f.read(), ru.ru_maxrss * 1024


def source(script, env):
    """Run scripts/SCRIPT (a build script) and add the `export K='V'` lines it prints to env."""
    out = subprocess.run([os.path.join(ROOT, "scripts", script)], capture_output=True, text=True, check=True).stdout
    for line in out.splitlines():
        k, v = line.removeprefix("export ").split("=", 1)
        env[k] = v.strip("'")


def median(v):
    v = sorted(v)
    return v[len(v) // 2]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--gen", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--ik", action="store_true",
                    help="also ik_llama.cpp (scripts/build_ik_llama_cpp.sh)")
    ap.add_argument("--avx2", action="store_true",
                    help="the AVX2 paths only: HANLIN_SIMD=avx2 against peers built with AVX2 and without AVX-512")
    ap.add_argument("--avxvnni", action="store_true",
                    help="the AVX2 paths with AVX-VNNI (an Alder Lake's): HANLIN_SIMD=avxvnni against llama.cpp built "
                         "with AVX2 and AVX-VNNI and ik_llama.cpp's AVX2-only build (it has no AVX-VNNI code)")
    ap.add_argument("models", nargs="*", default=["qwen2.5-coder-0.5b", "smollm2-135m"])
    a = ap.parse_args()
    if a.avx2 and a.avxvnni:
        sys.exit("--avx2 and --avxvnni are two different paths: choose one")

    subprocess.run(["cargo", "build", "--release", "--bin", "hanlin"], cwd=ROOT, check=True)
    if a.avx2:
        os.environ.update(HANLIN_SIMD="avx2", HANLIN_LLAMA_AVX2_ONLY="1", HANLIN_IK_AVX2_ONLY="1")
    if a.avxvnni:
        os.environ.update(HANLIN_SIMD="avxvnni", HANLIN_LLAMA_AVXVNNI="1", HANLIN_IK_AVX2_ONLY="1")
    env = dict(os.environ)
    source("build_llama_cpp.sh", env)
    if a.ik:
        source("build_ik_llama_cpp.sh", env)
    print(machine.describe(a.threads))
    bw = json.loads(run([HANLIN, "bench", "--bandwidth", "--json", "-t", str(a.threads)]))["read_gb_s"]
    print(f"machine read bandwidth: {bw:.1f} GB/s ({a.threads} threads)\n")
    rows, ik_rows, simd = [], [], "?"
    for m in a.models:
        run([HANLIN, "pull", m])
        path = run([HANLIN, "show", "--path", m]).strip()
        size = os.path.getsize(path)
        hj, hrss = run_rss([HANLIN, "bench", m, "-t", str(a.threads), "-p", str(a.prompt), "-n", str(a.gen), "-r", str(a.reps), "--json"])
        h = json.loads(hj)
        lj, lrss = run_rss([os.path.join(env["LLAMA_CPP_BIN"], "llama-bench"), "-m", path, "-t", str(a.threads),
                            "-p", str(a.prompt), "-n", str(a.gen), "-r", str(a.reps), "-o", "json"], env)
        lb = json.loads(lj)
        lpp = median([r["avg_ts"] for r in lb if r["n_prompt"] > 0 and r["n_gen"] == 0])
        ltg = median([r["avg_ts"] for r in lb if r["n_gen"] > 0 and r["n_prompt"] == 0])
        ceiling = bw * 1e9 / size
        simd = h.get("simd", "?")
        rows.append((m, h["prefill_tok_s"], lpp, h["decode_tok_s"], ltg, ceiling, h["peak_rss_bytes"], lrss))
        if a.ik:
            ij = run([os.path.join(env["IK_LLAMA_CPP_BIN"], "llama-bench"), "-m", path, "-t", str(a.threads),
                      "-p", str(a.prompt), "-n", str(a.gen), "-r", str(a.reps), "-o", "json"],
                     dict(env, LD_LIBRARY_PATH=env["IK_LLAMA_CPP_BIN"]))
            ib = json.loads(ij)
            ik_rows.append((m, h["prefill_tok_s"], median([r["avg_ts"] for r in ib if r["n_prompt"] > 0 and r["n_gen"] == 0]),
                            h["decode_tok_s"], median([r["avg_ts"] for r in ib if r["n_gen"] > 0 and r["n_prompt"] == 0])))
    print(f"{'model':<22} {'prefill':>9} {'llama.cpp':>9} {'ratio':>6} | {'decode':>7} {'llama.cpp':>9} {'ratio':>6} {'ceiling':>8} | {'RSS MB':>7} {'llama':>7} {'ratio':>6}")
    for m, hp, lp, ht, lt, c, hr, lr in rows:
        print(f"{m:<22} {hp:9.1f} {lp:9.1f} {hp/lp:6.2f} | {ht:7.1f} {lt:9.1f} {ht/lt:6.2f} {c:8.1f} | {hr/1e6:7.0f} {lr/1e6:7.0f} {hr/lr:6.2f}")
    if ik_rows:
        print(f"\n{'model':<22} {'prefill':>9} {'ik_llama':>9} {'ratio':>6} | {'decode':>7} {'ik_llama':>9} {'ratio':>6}")
    for m, hp, ip, ht, it in ik_rows:
        print(f"{m:<22} {hp:9.1f} {ip:9.1f} {hp/ip:6.2f} | {ht:7.1f} {it:9.1f} {ht/it:6.2f}")
    peers = "AVX2-only builds (-DGGML_AVX512=OFF)" if a.avx2 else "native builds"
    if a.avxvnni:
        peers = "llama.cpp with AVX2 and AVX-VNNI (-DGGML_AVX_VNNI=ON -DGGML_AVX512=OFF), ik_llama.cpp AVX2-only"
    if not (a.avx2 or a.avxvnni) and os.environ.get("HANLIN_LLAMA_NO_AMX") == "1":
        peers += " (llama.cpp without AMX)"
    print(f"\nHanlin's kernels: {simd}; peers: {peers}")
    print(f"\n(prefill: {a.prompt}-token prompt; decode: {a.gen} tokens; medians of {a.reps}; {a.threads} threads; ceiling = read bandwidth / file size)")
    llc = machine.last_level_cache()
    if llc:
        print(f"(the ceiling is memory's; a last-level cache of {llc[1]} can hold part of a model, and decode then passes it)")


if __name__ == "__main__":
    main()
