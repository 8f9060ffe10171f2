#!/usr/bin/env python3
"""Evaluate grounded answering (`hanlin ask`) on a public Chinese + English set.

The collection: the articles in bench/search_eval/docs (written for this set,
Chinese and English, including dated notices where the newest one wins and a
document that tries to give the model orders) plus the 320 poems of 唐詩三百首
from the npm package chinese-poetry (fetched with `npm pack`, pinned). The
questions (bench/search_eval/questions.jsonl): 40 whose answer is a fact in one
document, 10 that nothing in the collection answers.

First, retrieval alone: recall@1 and recall@5 of BM25, dense (vectors) and
hybrid (both, fused by reciprocal rank) search, for each embedding model
given with --embedders (default: multilingual-e5-small; add
qwen2.5-coder-0.5b to compare the chat model's pooled hidden states).

Then grounded answers (`hanlin ask`, hybrid search with the first embedder),
on the given model (default: the default model):
  recall@5            the document holding the fact is among the 5 passages retrieved
  answer accuracy     the answer contains the fact
  citation precision  cited passages that contain the fact (over answered questions)
  declined            unanswerable questions answered "I don't know"

Usage: python3 bench/search_eval.py [--hanlin target/release/hanlin] [--model NAME]
         [--embedders multilingual-e5-small,qwen2.5-coder-0.5b] [--retrieval-only] [--json out.json]
"""

import argparse
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
POETRY = "chinese-poetry@2.0.1"


def poems(cache: Path) -> Path:
    """唐詩三百首 as JSON Lines documents (one per poem)."""
    cache.mkdir(parents=True, exist_ok=True)
    out = cache / "tangshisanbaishou.jsonl"
    if out.exists():
        return out
    tgz = next(cache.glob("chinese-poetry-*.tgz"), None)
    if tgz is None:
        print(f"fetching {POETRY} with npm pack …", file=sys.stderr)
        subprocess.run(["npm", "pack", "-q", POETRY], cwd=cache, check=True, stdout=subprocess.DEVNULL)
        tgz = next(cache.glob("chinese-poetry-*.tgz"))
    with tarfile.open(tgz) as t:
        data = json.load(t.extractfile("package/dist/mengxue/tangshisanbaishou.json"))
    n = 0
    with open(out, "w", encoding="utf-8") as f:
        for group in data["content"]:
            for p in group["content"]:
                title = f"《{p['chapter']}》（{p['author']}）"
                body = "\n".join(p["paragraphs"])
                text = f"{title}，{p['author']}作，{group['type']}。\n{body}"
                f.write(json.dumps({"title": title, "text": text, "source": "chinese-poetry/唐詩三百首"}, ensure_ascii=False) + "\n")
                n += 1
    print(f"{n} poems", file=sys.stderr)
    return out


def cache_dir() -> Path:
    """Where the fetched poems are kept between runs."""
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "hanlin" / "search-eval"


def load_questions() -> list:
    """bench/search_eval/questions.jsonl: `doc` is None for the unanswerable ones."""
    with open(HERE / "search_eval" / "questions.jsonl", encoding="utf-8") as f:
        return [json.loads(l) for l in f if l.strip()]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hanlin", default=str(ROOT / "target" / "release" / "hanlin"))
    ap.add_argument("--model", default="qwen2.5-coder-0.5b")
    ap.add_argument("--json", help="write per-question results here")
    ap.add_argument("--embedders", default="multilingual-e5-small", help="comma-separated embedding models to compare")
    ap.add_argument("--retrieval-only", action="store_true", help="skip the answering pass")
    args = ap.parse_args()

    poem_file = poems(cache_dir())
    questions = load_questions()

    with tempfile.TemporaryDirectory() as kbs:
        env = dict(os.environ, HANLIN_KB_DIR=kbs)
        run = lambda *a: subprocess.run([args.hanlin, *a], env=env, check=True, capture_output=True, text=True)
        embedders = [e for e in args.embedders.split(",") if e]
        answerable_qs = [q for q in questions if q["doc"] is not None]
        table = []
        for j, emb in enumerate(embedders):
            kb = f"eval{j}"
            run("kb", "create", kb, "--embedder", emb)
            t = time.time()
            added = run("kb", "add", kb, str(HERE / "search_eval" / "docs"), str(poem_file))
            print(f"{emb}: {added.stdout.strip()} in {time.time() - t:.0f} s", file=sys.stderr)
            for mode in (["bm25"] if j == 0 else []) + ["dense", "hybrid"]:
                r1 = r5 = 0
                for q in answerable_qs:
                    hits = json.loads(run("kb", "search", kb, q["question"], "-k", "5", "--mode", mode, "--json").stdout)
                    ranks = [i for i, p in enumerate(hits) if p["title"].startswith(q["doc"])]
                    r1 += bool(ranks) and ranks[0] == 0
                    r5 += bool(ranks)
                n = len(answerable_qs)
                label = "bm25" if mode == "bm25" else f"{mode} ({emb})"
                table.append((label, r1 / n, r5 / n))
                print(f"  {label:<40} recall@1 {r1 / n:6.1%}  recall@5 {r5 / n:6.1%}", file=sys.stderr)
        print()
        print(f"retrieval over {len(answerable_qs)} answerable questions:")
        for label, a, b in table:
            print(f"  {label:<40} recall@1 {a:6.1%}  recall@5 {b:6.1%}")
        if args.retrieval_only:
            return 0
        results = []
        t0 = time.time()
        for i, q in enumerate(questions):
            r = run("ask", "--kb", "eval0", "--model", args.model, "--json", q["question"])
            a = json.loads(r.stdout)
            facts = q["answers"]
            has_fact = lambda s: any(f in s for f in facts)
            res = {
                "question": q["question"],
                "answerable": bool(facts),
                "answered": a["answered"],
                "answer": a["answer"],
                "recall5": q["doc"] is not None and any(p["title"].startswith(q["doc"]) for p in a["retrieved"][:5]),
                "correct": bool(facts) and a["answered"] and has_fact(a["answer"]),
                "citations": [has_fact(s["passage"]) or has_fact(s["title"]) for s in a["sources"]],
            }
            results.append(res)
            mark = "ok " if (res["correct"] if facts else not a["answered"]) else "NO "
            print(f"{mark} {q['question']}  →  {a['answer'][:80]!r}", file=sys.stderr)
        elapsed = time.time() - t0

    answerable = [r for r in results if r["answerable"]]
    unanswerable = [r for r in results if not r["answerable"]]
    recall = sum(r["recall5"] for r in answerable) / len(answerable)
    accuracy = sum(r["correct"] for r in answerable) / len(answerable)
    cites = [c for r in answerable if r["answered"] for c in r["citations"]]
    precision = sum(cites) / len(cites) if cites else 0.0
    cited_answers = sum(1 for r in answerable if r["answered"] and r["citations"])
    declined = sum(not r["answered"] for r in unanswerable) / len(unanswerable)
    print()
    print(f"model {args.model}; {len(answerable)} answerable + {len(unanswerable)} unanswerable questions; {elapsed:.0f} s")
    print(f"recall@5            {recall:6.1%}   (target ≥ 95%)")
    print(f"answer accuracy     {accuracy:6.1%}   (target ≥ 85%)")
    print(f"citation precision  {precision:6.1%}   (target ≥ 90%; {len(cites)} citations in {cited_answers} answers)")
    print(f"declined            {declined:6.1%}   (target ≥ 80%)")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(results, f, ensure_ascii=False, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
