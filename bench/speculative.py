#!/usr/bin/env python3
"""Speculative decoding: decode speed with a draft model or prompt lookup
against the same model alone, same prompts, same threads, one run.

    bench/speculative.py [--target qwen2.5-coder-1.5b] [--draft qwen2.5-coder-0.5b]
                         [--threads 2] [--gen 128] [--reps 3]
    bench/speculative.py --grounded [--target qwen2.5-coder-0.5b] [--threads 2] [--reps 3]

For each prompt (code that quotes its input, new code, Chinese prose) it runs
`hanlin run --temperature 0 --verbose` alone, with `--draft` (lookup off),
with `--lookup`, and with both (lookup's guess where it has one, the
draft's where not), the modes taking turns in each repetition, and prints
the prompt's seconds (a draft reads the prompt too), median decode tok/s, the acceptance rate α, the
speed-up, and the bound α allows for k = 4 with free verification,
(1 − α^(k+1)) / ((1 − α)(c·k + 1)), c being the draft's share of the
target's bytes (0 for prompt lookup). Verification is not free: a pass
over k + 1 rows costs v(k+1) one-row passes (`hanlin bench --rows`,
measured in each repetition beside the runs), so it also prints the bound with those
costs, the best k of 0–5 of (1 − α^(k+1)) / ((1 − α)(c·k + v(k+1))), and
the speed-up as a share of it. The answers must be identical to the
plain run's (speculative decoding never changes the tokens); a difference
stops the benchmark.

With --grounded it measures prompt lookup on grounded answers instead: the
collection and answerable questions of bench/search_eval.py (its articles and
唐詩三百首), each asked with `hanlin ask --lookup false` and `--lookup true`
one after the other; per language and in all, decode tok/s over all answers
(tokens ÷ decode seconds), α, and the speed-up, medians of the reps. The
answers must be the same both ways.
"""
import argparse
import json
import os
import re
import subprocess
import sys

import machine

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HANLIN = os.path.join(os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target")), "release", "hanlin")

PROMPTS = {
    "code, quoting": "Add type hints to this Python code and return the whole file:\n\n"
    "def mean(xs):\n    total = 0\n    for x in xs:\n        total += x\n    return total / len(xs)\n\n"
    "def variance(xs):\n    m = mean(xs)\n    total = 0\n    for x in xs:\n        total += (x - m) ** 2\n    return total / len(xs)\n",
    "code, new": "Write a Python function that parses an ISO 8601 date string and returns the weekday name.",
    "中文散文": "用三段话介绍长江的地理、历史和今天的经济作用。",
}


def size_of(model):
    out = subprocess.run([HANLIN, "show", model], capture_output=True, text=True).stdout
    m = re.search(r"GGUF v\d, \d+ tensors, ([\d.]+) (MB|GB)", out)
    if not m:
        return 0
    return float(m.group(1)) * (1e9 if m.group(2) == "GB" else 1e6)


def run(model, prompt, threads, gen, extra):
    cmd = [HANLIN, "-t", str(threads), "run", model, "--temperature", "0", "-n", str(gen), "--verbose", *extra, prompt]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        sys.exit(f"{' '.join(cmd[:8])} … failed:\n{p.stderr[-2000:]}")
    m = re.search(r"(\d+) tokens in ([\d.]+)s = ([\d.]+) tok/s; finish", p.stderr)
    pr = re.search(r"prompt \d+ tokens \(\d+ cached\) in ([\d.]+)s", p.stderr)
    s = re.search(r"speculative: (\d+) of (\d+)", p.stderr)
    acc, prop = (int(s.group(1)), int(s.group(2))) if s else (0, 0)
    return p.stdout, float(m.group(3)), acc, prop, float(pr.group(1))


def grounded(a):
    """Prompt lookup on bench/search_eval.py's grounded answers."""
    import tempfile

    import search_eval

    poem_file = search_eval.poems(search_eval.cache_dir())
    questions = [q for q in search_eval.load_questions() if q["doc"] is not None]
    subprocess.run([HANLIN, "pull", "multilingual-e5-small"], check=True, capture_output=True)
    print(machine.describe(a.threads))
    print(f"model {a.target}; {len(questions)} answerable questions of bench/search_eval; greedy; medians of {a.reps}\n")
    zh = lambda q: any("\u4e00" <= ch <= "\u9fff" for ch in q["question"])
    groups = {"中文": [q for q in questions if zh(q)], "English": [q for q in questions if not zh(q)], "all": questions}
    with tempfile.TemporaryDirectory() as kbs:
        env = dict(os.environ, HANLIN_KB_DIR=kbs)
        hanlin = lambda *x: subprocess.run([HANLIN, "-t", str(a.threads), *x], env=env, check=True, capture_output=True, text=True)
        hanlin("kb", "create", "eval", "--embedder", "multilingual-e5-small")
        hanlin("kb", "add", "eval", str(search_eval.HERE / "search_eval" / "docs"), str(poem_file))
        # per rep, per mode, per question: (tokens, decode seconds, accepted, proposed)
        reps = []
        for r in range(a.reps):
            got = {"off": {}, "on": {}}
            for i, q in enumerate(questions):
                answers = {}
                for mode in ("off", "on"):
                    p = hanlin("ask", "--kb", "eval", "--model", a.target, "--json", "--verbose",
                               "--lookup", "true" if mode == "on" else "false", q["question"])
                    answers[mode] = json.loads(p.stdout)["answer"]
                    m = re.search(r"(\d+) tokens in ([\d.]+)s = [\d.]+ tok/s; finish", p.stderr)
                    sp = re.search(r"speculative: (\d+) of (\d+)", p.stderr)
                    tok, secs = (int(m.group(1)), float(m.group(2))) if m else (0, 0.0)
                    acc, prop = (int(sp.group(1)), int(sp.group(2))) if sp else (0, 0)
                    got[mode][q["question"]] = (tok, secs, acc, prop)
                if answers["on"] != answers["off"]:
                    sys.exit(f"{q['question']}: the answer with lookup differs from the one without")
                print(f"rep {r + 1}, {i + 1}/{len(questions)}", end="\r", file=sys.stderr)
            reps.append(got)
        print(file=sys.stderr)
    print(f"{'questions':<12}{'answers':>8}{'tokens':>8}{'off tok/s':>11}{'on tok/s':>10}{'α':>7}{'speed-up':>10}")
    for label, qs in groups.items():
        rates = {"off": [], "on": []}
        alphas, tokens = [], 0
        for got in reps:
            for mode in rates:
                rows = [got[mode][q["question"]] for q in qs]
                tok, secs = sum(x[0] for x in rows), sum(x[1] for x in rows)
                rates[mode].append(tok / secs if secs else 0.0)
                if mode == "on":
                    acc, prop = sum(x[2] for x in rows), sum(x[3] for x in rows)
                    alphas.append(acc / prop if prop else 0.0)
                    tokens = tok
        off, on = median(rates["off"]), median(rates["on"])
        print(f"{label:<12}{len(qs):>8}{tokens:>8}{off:>11.1f}{on:>10.1f}{median(alphas):>7.2f}{on / off if off else 0:>9.2f}×")


def tokens_per_round(alpha, k):
    """Tokens a round of k proposals makes at acceptance rate alpha."""
    return (1 - alpha ** (k + 1)) / (1 - alpha) if alpha < 1 else k + 1


def pass_costs(model, threads):
    """{rows: a forward pass over that many rows in one-row passes}, 1–6 rows."""
    out = subprocess.run([HANLIN, "-t", str(threads), "bench", model, "-p", "0", "-n", "0", "-r", "1",
                          "--rows", "2,3,4,5,6", "--json"], check=True, capture_output=True, text=True).stdout
    j = json.loads(out.strip().splitlines()[-1])
    return {1: 1.0, **dict(zip(j["pass_rows"], j["pass_cost"]))}


def median(v):
    v = sorted(v)
    return v[len(v) // 2]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--target", default="qwen2.5-coder-1.5b")
    ap.add_argument("--draft", default="qwen2.5-coder-0.5b")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--gen", type=int, default=128)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--grounded", action="store_true",
                    help="prompt lookup on bench/search_eval.py's grounded answers (hanlin ask) instead")
    a = ap.parse_args()
    if a.grounded:
        return grounded(a)
    for m in (a.target, a.draft):
        subprocess.run([HANLIN, "pull", m], check=True, capture_output=True)
    print(machine.describe(a.threads))
    c = size_of(a.draft) / max(size_of(a.target), 1)
    print(f"target {a.target}, draft {a.draft} ({c:.2f} of its bytes), {a.gen} tokens, greedy, medians of {a.reps}\n")
    # The prompt's seconds too: a draft model reads the prompt as well,
    # and that time is the prompt's, not the decoding's.
    print(f"{'prompt':<16}{'mode':<8}{'prompt s':>9}{'tok/s':>8}{'α':>7}{'speed-up':>10}{'bound k=4':>11}{'measured':>10}{'share':>7}")
    k = 4
    # "both": `--draft` with prompt lookup on (`hanlin run`'s default):
    # lookup's guess where it has one, the draft's where not.
    modes = (("alone", ["--lookup", "false"], 0), ("draft", ["--draft", a.draft, "--lookup", "false"], c),
             ("lookup", ["--lookup", "true"], 0.0), ("both", ["--draft", a.draft, "--lookup", "true"], c))
    for label, prompt in PROMPTS.items():
        base_text = None
        runs = {mode: ([], [], 0, 0) for mode, _, _ in modes}
        # The modes take turns within each repetition: a virtual machine's
        # speed drifts, and a drift must not fall on one mode.
        # What verify passes cost, measured in each repetition with its
        # runs (a drift of the machine moves it: where memory is fast, a
        # pass over several rows is bound by the kernels' arithmetic).
        costs = []
        for _ in range(a.reps):
            costs.append(pass_costs(a.target, a.threads))
            for mode, extra, _ in modes:
                text, tps, ac, pr, secs = run(a.target, prompt, a.threads, a.gen, extra)
                if base_text is None:
                    base_text = text
                elif text != base_text:
                    sys.exit(f"{label} / {mode}: the answer differs from the plain run's")
                speeds, prompts, acc, prop = runs[mode]
                runs[mode] = (speeds + [tps], prompts + [secs], acc + ac, prop + pr)
        rows = {mode: (median(runs[mode][0]), median(runs[mode][1]), runs[mode][2] / runs[mode][3] if runs[mode][3] else 0.0, cost)
                for mode, _, cost in modes}
        alone = rows["alone"][0]
        v = {n: median([x[n] for x in costs]) for n in costs[0]}
        for mode, (tps, secs, alpha, cost) in rows.items():
            if mode == "alone":
                print(f"{label:<16}{mode:<8}{secs:>9.2f}{tps:>8.1f}{'':>7}{'':>10}{'':>11}")
                continue
            bound = tokens_per_round(alpha, k) / (cost * k + 1)
            # k = 0: no proposals (the payoff switches them off when they lose).
            real = max([1.0] + [tokens_per_round(alpha, j) / (cost * j + v[j + 1]) for j in range(1, 6)])
            # "both" mixes free guesses and the draft's: no single bound.
            cols = ("—", "—", "") if mode == "both" else (f"{bound:.2f}×", f"{real:.2f}×", f"{tps / alone / real:.0%}")
            print(f"{'':<16}{mode:<8}{secs:>9.2f}{tps:>8.1f}{alpha:>7.2f}{tps / alone:>9.2f}×{cols[0]:>11}{cols[1]:>10}{cols[2]:>7}")
        print(f"{'':<16}verify passes of 2–6 rows: " + ", ".join(f"{v[n]:.2f}" for n in range(2, 7)) + " one-row passes")


if __name__ == "__main__":
    main()
