#!/usr/bin/env python3
"""Accuracy with and without server-run tools (`hanlin_tools`), on a public set.

The questions (bench/tools_eval/questions.jsonl, Chinese and English):
multi-digit arithmetic, percentages, unit conversion, days between dates,
weekdays, date arithmetic, and questions answered by the knowledge base built
from bench/search_eval/docs. `split: heldout` questions were written before
the arithmetic router and were never used to tune it; `split: fresh` ones
were written before the date, unit, price and knowledge routes (whose
design saw how the models failed the held-out ones) and never used to tune
them.

Three columns per model, each question asked once (temperature 0):
  none        no tools
  tools       hanlin_tools, the arithmetic router off
  router      hanlin_tools, the router on (the default)
An answer is right when it contains one of the expected answers (digits
compared without thousands separators).

It starts its own `hanlin serve` (a fresh SQLite database and knowledge base
in a temporary directory), so run it on an idle machine.

Usage: python3 bench/tools_eval.py [--hanlin target/release/hanlin]
         [--models qwen2.5-coder-0.5b,qwen2.5-coder-1.5b] [--split all|heldout|fresh|dev]
         [--json out.json] [--parallel 4]
"""

import argparse
import http.client
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
import machine  # noqa: E402

TOOLS = ["calculator", "datetime", "search_knowledge"]


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def post(base, key, body, timeout=600):
    req = urllib.request.Request(
        base + "/v1/chat/completions",
        data=json.dumps(body).encode(),
        headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return json.load(r)
    except urllib.error.HTTPError as e:
        return json.loads(e.read() or b"{}")
    except (OSError, http.client.HTTPException) as e:
        # A dropped connection is this question's failure, not the run's.
        return {"error": {"message": f"{type(e).__name__}: {e}"}}


MONTHS = ["january", "february", "march", "april", "may", "june", "july",
          "august", "september", "october", "november", "december"]


def iso_dates(s):
    """Dates written 2026年4月15日 or April 15, 2026 as 2026-04-15."""
    s = re.sub(r"(\d{4})\s*年\s*(\d{1,2})\s*月\s*(\d{1,2})\s*[日号]?",
               lambda m: f"{m[1]}-{int(m[2]):02}-{int(m[3]):02}", s)
    month = "|".join(MONTHS)
    return re.sub(rf"\b({month})\s+(\d{{1,2}})(?:st|nd|rd|th)?,?\s+(\d{{4}})",
                  lambda m: f"{m[3]}-{MONTHS.index(m[1].lower()) + 1:02}-{int(m[2]):02}",
                  s, flags=re.I)


def norm(s):
    return re.sub(r"(?<=\d)[,，](?=\d{3})", "", iso_dates(s)).replace(" ", "")


def right(answer, expected):
    a = norm(answer)
    return any(norm(x) in a for x in expected)


def start(hanlin, home, models):
    env = dict(os.environ)
    db = f"sqlite://{home}/h.db"
    env["HANLIN_DATABASE_URL"] = db
    env["HANLIN_KB_DIR"] = f"{home}/kb"
    run = lambda *a: subprocess.run([hanlin, *a], env=env, check=True, capture_output=True, text=True)
    run("admin", "plan", "set", "eval", "--tpm", "100000000", "--tpd", "1000000000",
        "--rpm", "100000", "--max-context", "8192")
    out = run("admin", "key", "create", "--user", "eval", "--plan", "eval").stdout
    key = re.search(r"sk-[A-Za-z0-9_-]+", out).group(0)
    docs = sorted(str(p) for p in (ROOT / "bench/search_eval/docs").iterdir() if p.suffix == ".md")
    run("kb", "create", "docs")
    run("kb", "add", "docs", *docs)
    port = free_port()
    log = open(f"{home}/serve.log", "w")
    p = subprocess.Popen([hanlin, "serve", "--port", str(port), "--model", models[0]],
                         env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            urllib.request.urlopen(base + "/health", timeout=1)
            return p, base, key
        except Exception:
            time.sleep(0.5)
    p.kill()
    sys.exit("the server did not start: see " + f"{home}/serve.log")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--hanlin", default=str(ROOT / "target/release/hanlin"))
    ap.add_argument("--models", default="qwen2.5-coder-0.5b")
    ap.add_argument("--split", default="all",
                    help="all, or a comma-separated list of heldout, fresh, dev")
    ap.add_argument("--json")
    ap.add_argument("--parallel", type=int, default=4, help="questions asked at once")
    args = ap.parse_args()
    models = args.models.split(",")
    qs = [json.loads(l) for l in open(HERE / "tools_eval/questions.jsonl", encoding="utf-8")]
    if args.split != "all":
        qs = [q for q in qs if q["split"] in args.split.split(",")]
    print(machine.describe(os.cpu_count()))
    results = {}
    with tempfile.TemporaryDirectory() as home:
        srv, base, key = start(args.hanlin, home, models)
        try:
            for model in models:
                cols = {"none": None, "tools": False, "router": True}

                def ask(q):
                    row = {"id": q["id"], "kind": q["kind"], "split": q["split"]}
                    for col, router in cols.items():
                        body = {"model": model, "temperature": 0, "max_tokens": 512,
                                "messages": [{"role": "user", "content": q["question"]}]}
                        if router is not None:
                            body["hanlin_tools"] = TOOLS
                            body["hanlin_tool_options"] = {"router": router}
                        t = time.time()
                        r = post(base, key, body)
                        if "choices" in r:
                            text = r["choices"][0]["message"]["content"] or ""
                        else:
                            text = "ERROR " + json.dumps(r.get("error"), ensure_ascii=False)
                        row[col] = right(text, q["answers"])
                        row[col + "_text"] = text
                        row[col + "_s"] = round(time.time() - t, 2)
                        row[col + "_steps"] = [(s["name"], s["arguments"], s["ok"]) for s in
                                               (r.get("hanlin_tools") or {}).get("steps", [])]
                    print(f"  {model} #{q['id']:>2} {q['kind']:<9} " +
                          " ".join(f"{c}={'✓' if row[c] else '✗'}" for c in cols), flush=True)
                    return row

                # Several questions at once: the server batches them.
                with ThreadPoolExecutor(args.parallel) as ex:
                    rows = list(ex.map(ask, qs))
                results[model] = rows
        finally:
            srv.terminate()
            srv.wait()
    groups = [("arith/date", lambda r: r["kind"] != "kb"), ("kb", lambda r: r["kind"] == "kb"),
              ("all", lambda r: True)]
    print(f"\n{'model':<22} {'split':<8} {'group':<11} {'n':>3} {'none':>7} {'tools':>7} {'router':>7}")
    for model, rows in results.items():
        for split in ["heldout", "fresh", "dev", "all"]:
            sub = [r for r in rows if split == "all" or r["split"] == split]
            for g, f in groups:
                s = [r for r in sub if f(r)]
                if not s:
                    continue
                pct = lambda c: f"{100 * sum(r[c] for r in s) / len(s):6.1f}%"
                print(f"{model:<22} {split:<8} {g:<11} {len(s):>3} {pct('none')} {pct('tools')} {pct('router')}")
    if args.json:
        json.dump({"machine": machine.describe(os.cpu_count()), "results": results}, open(args.json, "w"),
                  ensure_ascii=False, indent=1)


if __name__ == "__main__":
    main()
