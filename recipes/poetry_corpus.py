#!/usr/bin/env python3
"""The poetry recipe's corpus: 全唐詩 (about 57,000 Tang poems, 3.7 million
characters) from the npm package chinese-poetry (MIT, pinned), fetched with
`npm pack` and written as text files of 1,000 poems each, a poem per
paragraph: "《title》author\\nline\\nline…".

Usage: python3 recipes/poetry_corpus.py OUT_DIR [--limit N]
"""
import argparse
import json
import subprocess
import sys
import tarfile
from pathlib import Path

PACKAGE = "chinese-poetry@2.0.1"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--limit", type=int, default=0, help="at most this many poems (0: all)")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cache = out.parent / "npm"
    cache.mkdir(exist_ok=True)
    tgz = next(cache.glob("chinese-poetry-*.tgz"), None)
    if tgz is None:
        print(f"fetching {PACKAGE} with npm pack …", file=sys.stderr)
        subprocess.run(["npm", "pack", "-q", PACKAGE], cwd=cache, check=True, stdout=subprocess.DEVNULL)
        tgz = next(cache.glob("chinese-poetry-*.tgz"))
    poems = []
    with tarfile.open(tgz) as t:
        names = sorted(
            (m.name for m in t.getmembers() if "/quantangshi/poet.tang." in m.name and m.name.endswith(".json")),
            key=lambda n: int(n.rsplit(".", 2)[-2]),
        )
        for n in names:
            for p in json.load(t.extractfile(n)):
                body = "\n".join(x.strip() for x in p.get("paragraphs", []) if x.strip())
                if body:
                    poems.append(f"《{p.get('title', '').strip()}》{p.get('author', '').strip()}\n{body}")
                if args.limit and len(poems) >= args.limit:
                    break
            if args.limit and len(poems) >= args.limit:
                break
    for i in range(0, len(poems), 1000):
        (out / f"tang-{i // 1000:03d}.txt").write_text("\n\n".join(poems[i : i + 1000]) + "\n", encoding="utf-8")
    chars = sum(len(p) for p in poems)
    print(f"{len(poems)} poems, {chars} characters in {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
