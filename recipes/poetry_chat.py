#!/usr/bin/env python3
"""The poetry recipe's fine-tuning data, written as JSONL:

- sft.jsonl: conversations (and heldout.jsonl: 200 more, not trained on). Poetry requests answered from the corpus
  (寫一首五言絕句，題目是《…》。 → the poem; 《…》是誰寫的？ → the author), and the
  traditional-Chinese dialogues of the PyPI package chatterbot-corpus
  (fetched with `pip download`).
- prefs.jsonl: preference pairs for DPO. The prompt asks for a quatrain of a
  given form and title; "chosen" is the real poem, "rejected" is one of two
  failures small models make: the first line repeated four times, or a poem
  of the wrong form (seven characters a line when five were asked, and the
  reverse).

Usage: python3 recipes/poetry_chat.py CORPUS_DIR OUT_DIR
"""
import glob
import json
import random
import subprocess
import sys
import zipfile
from pathlib import Path

import yaml

CHATTERBOT = "chatterbot-corpus==1.3.3"


def poems(corpus: Path):
    for f in sorted(corpus.glob("tang-*.txt")):
        for block in f.read_text(encoding="utf-8").split("\n\n"):
            lines = [l for l in block.strip().split("\n") if l]
            if len(lines) < 2 or not lines[0].startswith("《"):
                continue
            head = lines[0]
            title, _, author = head[1:].partition("》")
            yield title.strip(), author.strip(), lines[1:]


def form(body):
    """5 or 7 for a regular quatrain (two lines of 5/7 + punctuation per line), else None."""
    if len(body) != 2:
        return None
    for n in (5, 7):
        if all(len(l) == 2 * n + 2 for l in body):
            return n
    return None


def dialogues(cache: Path):
    cache.mkdir(parents=True, exist_ok=True)
    whl = next(cache.glob("chatterbot_corpus-*.whl"), None)
    if whl is None:
        print(f"fetching {CHATTERBOT} with pip download …", file=sys.stderr)
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(cache), CHATTERBOT],
            check=True,
        )
        whl = next(cache.glob("chatterbot_corpus-*.whl"))
    out = []
    with zipfile.ZipFile(whl) as z:
        for n in sorted(z.namelist()):
            if "/data/traditionalchinese/" in n and n.endswith(".yml"):
                data = yaml.safe_load(z.read(n).decode("utf-8"))
                for conv in data.get("conversations") or []:
                    turns = [str(t).strip() for t in conv if str(t).strip()]
                    if len(turns) >= 2:
                        out.append(turns)
    return out


def main() -> int:
    corpus, out = Path(sys.argv[1]), Path(sys.argv[2])
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(7)
    quatrains = {5: [], 7: []}
    for title, author, body in poems(corpus):
        n = form(body)
        if n and title and author:
            quatrains[n].append((title, author, body))
    name = {5: "五言絕句", 7: "七言絕句"}
    sft = []
    for n, qs in quatrains.items():
        for title, author, body in qs:
            sft.append([("user", f"寫一首{name[n]}，題目是《{title}》。"), ("assistant", "\n".join(body))])
            if rng.random() < 0.3:
                sft.append([("user", f"《{title}》是誰寫的？"), ("assistant", f"《{title}》是{author}寫的。")])
    chats = dialogues(out / "pip")
    for turns in chats:
        # Each dialogue a few times: they are few next to the poems.
        for _ in range(3):
            sft.append([("user" if i % 2 == 0 else "assistant", t) for i, t in enumerate(turns)])
    rng.shuffle(sft)
    # The last 200 conversations are kept out of training, for evaluation.
    for name_, part in (("sft.jsonl", sft[:-200]), ("heldout.jsonl", sft[-200:])):
        with open(out / name_, "w", encoding="utf-8") as f:
            for c in part:
                f.write(json.dumps({"messages": [{"role": r, "content": t} for r, t in c]}, ensure_ascii=False) + "\n")
    prefs = []
    for n, qs in quatrains.items():
        other = quatrains[12 - n]
        for title, author, body in qs:
            if rng.random() < 0.5:
                first = body[0].split("，")[0]
                bad = "\n".join([f"{first}，{first}。"] * 2)
            else:
                bad = "\n".join(rng.choice(other)[2])
            prefs.append({"prompt": f"寫一首{name[n]}，題目是《{title}》。", "chosen": "\n".join(body), "rejected": bad})
    rng.shuffle(prefs)
    prefs = prefs[:3000]
    with open(out / "prefs.jsonl", "w", encoding="utf-8") as f:
        for p in prefs:
            f.write(json.dumps(p, ensure_ascii=False) + "\n")
    print(
        f"{len(sft)} conversations ({len(quatrains[5])} + {len(quatrains[7])} quatrains, {len(chats)} dialogues), "
        f"{len(prefs)} preference pairs → {out}",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
