#!/usr/bin/env python3
"""Load test: N concurrent streaming chats against `hanlin serve` and against
llama.cpp's `llama-server -np N` (same GGUF, same threads), in one run.

Prints aggregate decode tokens/s, TTFT p50/p95 and the ratios, the N
streams' rate against the engine's own 512-token prefill rate (`hanlin bench
-p 512`, measured in the same run: how close batched decode comes to the
compute roof that prefill shows) and against the engine's own batched decode
of as many sequences (`hanlin bench -b N`: what the server itself costs),
plus the prefix-cache check (second turn
of a conversation with a ~1,500-token history: TTFT relative to the first
turn).

    python3 bench/serve_load.py                       # default model, 1 and 8 streams, medians of 3
    python3 bench/serve_load.py --streams 4 --tokens 64
    LLAMA_SERVER=/path/to/llama-server python3 bench/serve_load.py
    python3 bench/serve_load.py --baseline /tmp/old/hanlin --no-llama   # before/after, one run
    python3 bench/serve_load.py --no-llama --prefill  # + a long prompt's prefill rate: server vs `hanlin bench`
    python3 bench/serve_load.py --no-llama --lookup-off --quote   # prompt lookup on vs off, on edits of given code
    python3 bench/serve_load.py --no-llama --model qwen2.5-coder-1.5b --draft qwen2.5-coder-0.5b   # with a draft model vs without

`--baseline BIN` measures a second `hanlin` binary (built from an earlier
commit, say) the same way in the same run, and prints new / baseline ratios.
`--lookup-off` measures the same binary a second time with prompt lookup
off (`HANLIN_LOOKUP=false`), and `--quote` makes every stream's request an
edit of a given piece of code (answers that quote their prompt, where
lookup helps) instead of an essay. `--draft NAME` measures the same binary a
second time with NAME as the model's draft (`HANLIN_DRAFT`), and prints the
speed-up and each guesser's acceptance rate from /metrics.

llama-server comes from scripts/build_llama_cpp.sh ($LLAMA_CPP_BIN, or found
under ~/.cache/hanlin/llama.cpp); without it only Hanlin is measured.
Only the Python standard library is used.
"""
import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import machine  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
HANLIN = ROOT / "target" / "release" / "hanlin"

TOPICS = [
    "the history of the Great Wall of China",
    "how a CPU cache works",
    "a journey across the Pacific Ocean",
    "why the sky is blue",
    "the life of a honeybee",
    "how compilers optimise loops",
    "the story of paper money",
    "a day in the life of a lighthouse keeper",
    "用中文讲一个关于长城的故事",
    "用中文介绍一下杭州西湖",
    "how vaccines train the immune system",
    "the rules of the game of Go",
    "how rivers shape valleys",
    "the invention of the printing press",
    "用中文写一篇关于春天的短文",
    "how a hash table handles collisions",
]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url, proc, timeout=300):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            sys.exit(f"server exited early (code {proc.returncode})")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except Exception:
            time.sleep(0.5)
    sys.exit(f"server at {url} did not become ready")


def stream_chat(base, key, messages, max_tokens, model, out):
    body = json.dumps({
        "model": model,
        "messages": messages,
        "max_tokens": max_tokens,
        "temperature": 0.7,
        "seed": 1,
        "stream": True,
        "stream_options": {"include_usage": True},
    }).encode()
    req = urllib.request.Request(base + "/v1/chat/completions", data=body, headers={
        "Content-Type": "application/json",
        "Authorization": f"Bearer {key}",
    })
    t0 = time.perf_counter()
    ttft, tokens, chunks, text = None, None, 0, []
    with urllib.request.urlopen(req, timeout=600) as r:
        for raw in r:
            line = raw.decode("utf-8", "replace").strip()
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                break
            ev = json.loads(data)
            if ev.get("usage"):
                tokens = ev["usage"]["completion_tokens"]
            for ch in ev.get("choices", []):
                piece = (ch.get("delta") or {}).get("content")
                if piece:
                    if ttft is None:
                        ttft = time.perf_counter() - t0
                    chunks += 1
                    text.append(piece)
    out.update(ttft=ttft or 0.0, tokens=tokens if tokens is not None else chunks,
               elapsed=time.perf_counter() - t0, text="".join(text))


QUOTE = ("Rename the function `{old}` to `{new}` everywhere. Reply with the whole code in a code block.\n\n"
         "```python\ndef {old}(items):\n    \"\"\"{topic}: the total of the items' prices.\"\"\"\n"
         "    total = 0\n    for item in items:\n        total += item.price * item.quantity\n"
         "    return total\n\n\nprint({old}(basket))\nprint({old}(order.lines))\n```")
QUOTE_MODE = False


def run_load(base, key, model, streams, max_tokens, variant=0):
    results = [dict() for _ in range(streams)]
    threads = []
    t0 = time.perf_counter()
    for i in range(streams):
        # A run's prompts differ from the other runs' (only the chat
        # template's system prompt is shared), so no run finds them cached.
        essay = "a detailed essay" if variant == 0 else f"detailed essay number {variant}"
        if QUOTE_MODE:
            content = QUOTE.format(old=f"total_{variant}_{i}", new=f"basket_total_{i}",
                                   topic=TOPICS[i % len(TOPICS)])
        else:
            content = f"Write {essay} about {TOPICS[i % len(TOPICS)]}."
        msgs = [{"role": "user", "content": content}]
        th = threading.Thread(target=stream_chat, args=(base, key, msgs, max_tokens, model, results[i]))
        th.start()
        threads.append(th)
    for th in threads:
        th.join()
    wall = time.perf_counter() - t0
    toks = sum(r["tokens"] for r in results)
    ttfts = sorted(r["ttft"] for r in results)
    p95 = ttfts[min(len(ttfts) - 1, int(round(0.95 * (len(ttfts) - 1))))]
    return {"streams": streams, "tokens": toks, "wall": wall, "tok_s": toks / wall,
            "ttft_p50": statistics.median(ttfts), "ttft_p95": p95}


def median_load(base, key, model, streams, max_tokens, reps):
    """`run_load` `reps` times; the median of each figure, and every run's rate."""
    runs = [run_load(base, key, model, streams, max_tokens, variant=10 * streams + r + 1) for r in range(max(1, reps))]
    out = {k: statistics.median(r[k] for r in runs) for k in ("tokens", "wall", "tok_s", "ttft_p50", "ttft_p95")}
    out["all"] = [round(r["tok_s"], 1) for r in runs]
    return out


def prefix_check(base, key, model):
    """Second turn of a conversation with a long history: TTFT vs the first."""
    history = "\n".join(f"{i}. " + TOPICS[i % len(TOPICS)] + " is a topic we discussed at length, covering many details." for i in range(110))
    msgs = [{"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "Here are my notes:\n" + history + "\nSummarise them in one sentence."}]
    first = {}
    stream_chat(base, key, msgs, 24, model, first)
    msgs = msgs + [{"role": "assistant", "content": first["text"]},
                   {"role": "user", "content": "Now list three of the topics."}]
    second = {}
    stream_chat(base, key, msgs, 24, model, second)
    return first["ttft"], second["ttft"]


def prefill_rate(base, key, model, reps=3):
    """A ~2,700-token prompt through the server (the scheduler's chunked
    prefill, `max_tokens` 1): its length and the median prompt tok/s."""
    rates, n = [], 0
    for rep in range(reps):
        notes = "\n".join(f"{i}. {TOPICS[i % len(TOPICS)]} is a topic ({rep}) we discussed at length, covering "
                          "many details." for i in range(110))
        body = json.dumps({"model": model, "max_tokens": 1, "messages": [
            {"role": "user", "content": "Here are my notes:\n" + notes + "\nSummarise them in one sentence."}]}).encode()
        req = urllib.request.Request(base + "/v1/chat/completions", data=body, headers={
            "Authorization": f"Bearer {key}", "Content-Type": "application/json"})
        t = time.perf_counter()
        r = json.loads(urllib.request.urlopen(req, timeout=600).read())
        n = r["usage"]["prompt_tokens"]
        rates.append(n / (time.perf_counter() - t))
    return n, statistics.median(rates)


def start_hanlin(binary, model, threads, port, tmp, extra_env=None):
    env = dict(os.environ, HANLIN_DATABASE_URL=f"sqlite://{tmp}/bench.db", HANLIN_LOG="warn", **(extra_env or {}))
    key = subprocess.run([str(binary), "admin", "key", "create", "--user", "bench", "--plan", "plus"],
                         env=env, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
    proc = subprocess.Popen([str(binary), "-t", str(threads), "serve", "--port", str(port), "--model", model,
                             "--ctx", "4096"], env=env, stdout=subprocess.DEVNULL)
    return proc, key


def measure_hanlin(binary, name, args, rows, extra_env=None):
    """Load runs against one `hanlin serve` binary; returns the prefix-cache TTFTs."""
    with tempfile.TemporaryDirectory() as tmp:
        port = free_port()
        proc, key = start_hanlin(binary, args.model, args.threads, port, tmp, extra_env)
        base = f"http://127.0.0.1:{port}"
        try:
            wait_ready(base + "/health", proc)
            run_load(base, key, args.model, 1, 8)  # warm-up (loads the model)
            rows[name, 1] = median_load(base, key, args.model, 1, args.tokens, args.reps)
            rows[name, args.streams] = median_load(base, key, args.model, args.streams, args.tokens, args.reps)
            if args.prefill and name == "hanlin":
                rows["prefill"] = prefill_rate(base, key, args.model)
            rows[name, "guesses"] = guess_counts(base)
            return prefix_check(base, key, args.model)
        finally:
            proc.terminate()
            proc.wait()


def guess_counts(base):
    """Guesses checked and kept so far, per guesser, from /metrics."""
    text = urllib.request.urlopen(base + "/metrics", timeout=30).read().decode()
    out = {}
    for line in text.splitlines():
        for kind in ("lookup", "draft"):
            for what in ("proposed", "accepted"):
                if line.startswith(f"hanlin_{kind}_{what}_tokens{{"):
                    out[kind, what] = out.get((kind, what), 0) + float(line.rsplit(" ", 1)[1])
    return out


def bench_prefill(binary, model, tokens, threads, reps):
    """`hanlin bench`'s prefill rate (tok/s, median of `reps`) for a `tokens`-token prompt."""
    out = subprocess.run([str(binary), "bench", model, "-p", str(tokens), "-n", "1", "-r", str(reps), "-t",
                          str(threads), "--json"], check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])["prefill_tok_s"]


def bench_engine(binary, model, threads, streams, tokens, reps):
    """`hanlin bench`'s 512-token prefill rate and its `streams`-sequence
    decode rate (`-b`, `tokens` steps; the engine's batched forward pass
    without the server), each the median of `reps`."""
    out = subprocess.run([str(binary), "bench", model, "-p", "512", "-n", str(tokens), "-b", str(streams),
                          "-r", str(reps), "-t", str(threads), "--json"],
                         check=True, capture_output=True, text=True).stdout
    j = json.loads(out.strip().splitlines()[-1])
    return j["prefill_tok_s"], j["batched_decode_tok_s"]


def find_llama_server():
    p = os.environ.get("LLAMA_SERVER")
    if p:
        return Path(p) if Path(p).exists() else None
    b = os.environ.get("LLAMA_CPP_BIN")
    if b and (Path(b) / "llama-server").exists():
        return Path(b) / "llama-server"
    found = sorted((Path.home() / ".cache" / "hanlin" / "llama.cpp").glob("*/vendor/llama.cpp/build/bin/llama-server"))
    return found[-1] if found else None


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen2.5-coder-0.5b")
    ap.add_argument("--streams", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--reps", type=int, default=3,
                    help="load runs per server and stream count; medians are printed")
    ap.add_argument("--baseline", type=Path,
                    help="another hanlin binary (an earlier build) to measure in the same run")
    ap.add_argument("--no-llama", action="store_true", help="skip llama-server")
    ap.add_argument("--lookup-off", action="store_true",
                    help="also measure this binary with prompt lookup off (HANLIN_LOOKUP=false)")
    ap.add_argument("--draft", help="also measure this binary with this draft model (HANLIN_DRAFT)")
    ap.add_argument("--quote", action="store_true",
                    help="requests that edit a given piece of code (their answers quote the prompt) instead of essays")
    ap.add_argument("--prefill", action="store_true",
                    help="also: a long prompt's prefill rate through the server against `hanlin bench` on "
                         "the same number of tokens")
    args = ap.parse_args()
    global QUOTE_MODE
    QUOTE_MODE = args.quote
    print(machine.describe(args.threads))
    if not HANLIN.exists():
        subprocess.run(["cargo", "build", "--release", "--bin", "hanlin"], cwd=ROOT, check=True)
    gguf = subprocess.run([str(HANLIN), "show", args.model, "--path"], check=True,
                          capture_output=True, text=True).stdout.strip()
    rows = {}
    t1, t2 = measure_hanlin(HANLIN, "hanlin", args, rows)
    if args.baseline:
        b1, b2 = measure_hanlin(args.baseline, "baseline", args, rows)
    if args.lookup_off:
        measure_hanlin(HANLIN, "lookup off", args, rows, {"HANLIN_LOOKUP": "false"})
    if args.draft:
        measure_hanlin(HANLIN, "draft", args, rows, {"HANLIN_DRAFT": args.draft})
    llama = None if args.no_llama else find_llama_server()
    if llama:
        port = free_port()
        lib = str(llama.parent)
        env = dict(os.environ, LD_LIBRARY_PATH=lib + ":" + os.environ.get("LD_LIBRARY_PATH", ""))
        proc = subprocess.Popen([str(llama), "-m", gguf, "-t", str(args.threads), "-np", str(args.streams),
                                 "-c", str(4096 * args.streams), "--port", str(port), "--host", "127.0.0.1"],
                                env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        base = f"http://127.0.0.1:{port}"
        try:
            wait_ready(base + "/health", proc)
            run_load(base, "none", args.model, 1, 8)
            rows["llama-server", 1] = median_load(base, "none", args.model, 1, args.tokens, args.reps)
            rows["llama-server", args.streams] = median_load(base, "none", args.model, args.streams, args.tokens,
                                                             args.reps)
        finally:
            proc.terminate()
            proc.wait()
    pp512, batched = bench_engine(HANLIN, args.model, args.threads, args.streams, args.tokens, reps=3)
    print(f"model {args.model}, {args.threads} threads, {args.tokens} max tokens per stream"
          + (", requests that quote their prompt" if args.quote else ""))
    print(f"medians of {args.reps} runs (every run's aggregate tok/s in brackets)")
    print(f"{'server':<14} {'streams':>7} {'tokens':>7} {'agg tok/s':>10} {'TTFT p50':>9} {'TTFT p95':>9}  runs")
    for key, r in rows.items():
        if not isinstance(key, tuple) or key[1] == "guesses":
            continue
        name, n = key
        print(f"{name:<14} {n:>7} {r['tokens']:>7.0f} {r['tok_s']:>10.1f} {r['ttft_p50']:>8.2f}s {r['ttft_p95']:>8.2f}s"
              f"  {r['all']}")
    h1, hn = rows["hanlin", 1], rows["hanlin", args.streams]
    print(f"hanlin {args.streams} streams / hanlin 1 stream: {hn['tok_s'] / h1['tok_s']:.2f}x")
    print(f"hanlin {args.streams} streams / own pp512 ({pp512:.1f} tok/s in hanlin bench): "
          f"{hn['tok_s'] / pp512:.2f}x")
    # Which part of that is the server's: its streams against the engine's
    # own batched decode of as many sequences, and that against pp512.
    print(f"hanlin {args.streams} streams / the engine's own {args.streams}-sequence decode ({batched:.1f} tok/s in "
          f"hanlin bench -b {args.streams}): {hn['tok_s'] / batched:.2f}x; that decode / pp512: {batched / pp512:.2f}x")
    if ("llama-server", args.streams) in rows:
        ln = rows["llama-server", args.streams]
        print(f"hanlin / llama-server at {args.streams} streams: {hn['tok_s'] / ln['tok_s']:.2f}x")
        print(f"hanlin / llama-server at 1 stream: {h1['tok_s'] / rows['llama-server', 1]['tok_s']:.2f}x")
    if args.baseline:
        for n in (1, args.streams):
            h, b = rows["hanlin", n], rows["baseline", n]
            print(f"hanlin / baseline at {n} stream(s): {h['tok_s'] / b['tok_s']:.2f}x tok/s, "
                  f"TTFT p50 {h['ttft_p50']:.2f}s vs {b['ttft_p50']:.2f}s")
        print(f"baseline prefix cache: second-turn TTFT {b2:.3f}s vs first turn {b1:.3f}s = {b2 / b1:.0%}")
    if args.lookup_off:
        for n in (1, args.streams):
            h, b = rows["hanlin", n], rows["lookup off", n]
            print(f"prompt lookup on / off at {n} stream(s): {h['tok_s'] / b['tok_s']:.2f}x tok/s")
    if args.draft:
        for n in (1, args.streams):
            h, d = rows["hanlin", n], rows["draft", n]
            print(f"with draft {args.draft} / without at {n} stream(s): {d['tok_s'] / h['tok_s']:.2f}x tok/s")
    for name in [k[0] for k in rows if isinstance(k, tuple) and k[1] == "guesses"]:
        g = rows[name, "guesses"]
        rates = [f"{kind} {g[kind, 'accepted']:.0f} of {g[kind, 'proposed']:.0f} kept "
                 f"({g[kind, 'accepted'] / g[kind, 'proposed']:.0%})"
                 for kind in ("lookup", "draft") if g.get((kind, "proposed"))]
        if rates:
            print(f"guesses ({name}): " + ", ".join(rates))
    print(f"prefix cache: second-turn TTFT {t2:.3f}s vs first turn {t1:.3f}s = {t2 / t1:.0%}")
    if args.prefill:
        n, served = rows["prefill"]
        bench = bench_prefill(HANLIN, args.model, n, args.threads, reps=2)
        print(f"prefill of {n} tokens: {served:.1f} tok/s through the server, {bench:.1f} tok/s in hanlin bench "
              f"= {served / bench:.2f}x")


if __name__ == "__main__":
    main()
