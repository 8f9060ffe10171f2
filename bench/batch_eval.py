#!/usr/bin/env python3
"""The Batch API through the official `openai` client, and what it buys.

It starts its own `hanlin serve` (fresh SQLite database in a temporary
directory), then:

1. sends N short chat requests one after another (prompts of about 50
   tokens, answers of up to 64), timing the whole run;
2. measures interactive time to first token (p50 of --probes streamed
   requests) on the idle server;
3. submits the same N requests as a batch: `files.create` →
   `batches.create` → polls `batches.retrieve` → `files.content`; while it
   runs, sends the same streamed probes and measures their TTFT;
4. checks every `custom_id` came back once, with a 200 answer, and that the
   usage the answers report is what the server metered (`hanlin admin
   usage`).

Prints: sequential seconds, batch seconds, speed-up (target >= 3x), idle and
during-batch TTFT p50 and their ratio (target <= 2x).

Usage: python3 bench/batch_eval.py [--hanlin target/release/hanlin]
         [--model smollm2-135m] [--lines 200] [--probes 8] [--parallel 8] [--max-batch 16]
"""

import argparse
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
import machine  # noqa: E402

try:
    import openai
except ImportError:
    sys.exit("needs the official client: python3 -m pip install openai")

TOPICS = ["the sea", "a mountain village", "autumn rain", "a night train", "the first snow",
          "a tea house", "an old bridge", "the harvest moon", "a market street", "spring wind"]


def prompt(i):
    # About 50 tokens of prompt with the template.
    t = TOPICS[i % len(TOPICS)]
    return (f"Request {i}. Write two short sentences about {t}, in plain English, "
            f"for a travel magazine's weekend column. Keep it calm and concrete.")


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def start(hanlin, home, model, parallel, max_batch):
    env = dict(os.environ)
    env["HANLIN_DATABASE_URL"] = f"sqlite://{home}/h.db"
    env["HANLIN_KB_DIR"] = f"{home}/kb"
    run = lambda *a: subprocess.run([hanlin, *a], env=env, check=True, capture_output=True, text=True)
    run("admin", "plan", "set", "bench", "--tpm", "100000000", "--tpd", "1000000000",
        "--rpm", "100000", "--max-context", "8192")
    out = run("admin", "key", "create", "--user", "bench", "--plan", "bench").stdout
    key = re.search(r"sk-[A-Za-z0-9_-]+", out).group(0)
    port = free_port()
    log = open(f"{home}/serve.log", "w")
    p = subprocess.Popen([hanlin, "serve", "--port", str(port), "--model", model,
                          "--batch-parallel", str(parallel), "--max-batch", str(max_batch)],
                         env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            urllib.request.urlopen(base + "/health", timeout=1)
            return p, base, key, run
        except Exception:
            time.sleep(0.5)
    p.kill()
    sys.exit("the server did not start: see " + f"{home}/serve.log")


SPENT = []  # tokens every request outside the batch reported


def ttft(client, model, text):
    t0 = time.perf_counter()
    stream = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": text}],
        max_tokens=8, temperature=0, stream=True, stream_options={"include_usage": True})
    first = None
    for chunk in stream:
        if first is None and chunk.choices and chunk.choices[0].delta.content:
            first = time.perf_counter() - t0
        if chunk.usage:
            SPENT.append(chunk.usage.prompt_tokens + chunk.usage.completion_tokens)
    return first if first is not None else time.perf_counter() - t0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--hanlin", default=str(ROOT / "target/release/hanlin"))
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--lines", type=int, default=200)
    ap.add_argument("--probes", type=int, default=8)
    ap.add_argument("--parallel", type=int, default=8, help="batch lines run at once")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--max-batch", type=int, default=16,
                    help="the engine's slots (4 of them stay free for interactive requests)")
    args = ap.parse_args()
    print(machine.describe(os.cpu_count()))
    with tempfile.TemporaryDirectory() as home:
        p, base, key, run = start(args.hanlin, home, args.model, args.parallel, args.max_batch)
        try:
            client = openai.OpenAI(base_url=base + "/v1", api_key=key, max_retries=0, timeout=600)
            body = lambda i: {"model": args.model, "max_tokens": args.max_tokens, "temperature": 0,
                              "messages": [{"role": "user", "content": prompt(i)}]}
            # Warm up (the model loads on first use).
            r = client.chat.completions.create(**body(0))
            SPENT.append(r.usage.total_tokens)

            t0 = time.perf_counter()
            seq_tokens = 0
            for i in range(args.lines):
                r = client.chat.completions.create(**body(i))
                seq_tokens += r.usage.completion_tokens
                SPENT.append(r.usage.total_tokens)
            seq = time.perf_counter() - t0
            print(f"sequential: {args.lines} requests in {seq:.1f} s ({seq_tokens} tokens)")

            idle = [ttft(client, args.model, prompt(1000 + i)) for i in range(args.probes)]
            idle_p50 = statistics.median(idle)
            print(f"idle TTFT p50: {idle_p50 * 1000:.0f} ms")

            lines = "".join(json.dumps({"custom_id": f"line-{i}", "method": "POST",
                                        "url": "/v1/chat/completions", "body": body(i)}) + "\n"
                            for i in range(args.lines))
            f = client.files.create(file=("batch.jsonl", lines.encode()), purpose="batch")
            t0 = time.perf_counter()
            b = client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions",
                                      completion_window="24h")
            during = []
            stop = threading.Event()

            def probe():
                i = 0
                while not stop.is_set() and i < args.probes:
                    time.sleep(1.0)
                    during.append(ttft(client, args.model, prompt(2000 + i)))
                    i += 1

            th = threading.Thread(target=probe)
            th.start()
            while b.status in ("validating", "in_progress", "finalizing"):
                time.sleep(0.5)
                b = client.batches.retrieve(b.id)
            took = time.perf_counter() - t0
            stop.set()
            th.join()
            print(f"batch: status {b.status}, {b.request_counts.completed}/{b.request_counts.total} "
                  f"completed in {took:.1f} s")
            if b.status != "completed" or not b.output_file_id:
                sys.exit(f"the batch did not complete: {b}")
            out = [json.loads(l) for l in client.files.content(b.output_file_id).text.splitlines()]
            ids = sorted(int(o["custom_id"].split("-")[1]) for o in out)
            assert ids == list(range(args.lines)), "every custom_id once"
            assert all(o["response"]["status_code"] == 200 for o in out)
            usage = sum(o["response"]["body"]["usage"]["prompt_tokens"]
                        + o["response"]["body"]["usage"]["completion_tokens"] for o in out)
            rows = json.loads(run("admin", "usage", "--json").stdout)
            metered = sum(r["prompt_tokens"] + r["completion_tokens"] for r in rows)
            # The metered total also holds the warm-up, the sequential run
            # and the probes: what they reported is added.
            print(f"usage: the batch's answers {usage} + the other requests {sum(SPENT)} tokens; "
                  f"metered {metered}")
            assert metered == usage + sum(SPENT), "the metered usage is what the answers report"
            during_p50 = statistics.median(during) if during else float("nan")
            print()
            print(f"model {args.model}, {args.lines} lines, max_tokens {args.max_tokens}, "
                  f"batch-parallel {args.parallel}")
            print(f"speed-up, batch vs sequential: {seq / took:.2f}x (target >= 3x)")
            print(f"interactive TTFT p50: idle {idle_p50 * 1000:.0f} ms, during the batch "
                  f"{during_p50 * 1000:.0f} ms: {during_p50 / idle_p50:.2f}x (target <= 2x)")
        finally:
            p.terminate()
            p.wait()


if __name__ == "__main__":
    main()
