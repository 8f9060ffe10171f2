#!/usr/bin/env python3
"""Do images from a model trained by `hanlin train image` follow their
captions? A small classifier, trained on pictures from the same generator
(`hanlin train image-data`), reads each generated picture's shape colour,
shape, position and background; the score is the share read as the caption
asked, per attribute, for English and Chinese captions.

  bench/image_eval.py --model RUN/model [--n 200] [--steps N] [--guidance G]

Steps and guidance default to the model's own (`hanlin_defaults` in its
model_index.json: 30 and 2 for the recipe's models).

The classifier is softmax regression on a few features of a picture (the
border's colour as the background, the pixels that differ from it as the
shape: their mean colour, centroid and a 16×16 crop of the mask around the
centroid), one head per attribute, fitted with numpy. Its accuracy on
held-out generator pictures is printed first: it is the ceiling of the
score. Captions to draw come from a third seed of the generator, half
English, half Chinese. Target: ≥ 80% for colour, shape and position.

numpy is needed; without it the script makes a venv under
~/.cache/hanlin/bench-venv, installs numpy there and runs itself again.
"""
import argparse, json, os, re, struct, subprocess, sys, tempfile, time, zlib

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import machine  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HANLIN = os.environ.get("HANLIN_BIN", os.path.join(ROOT, "target/release/hanlin"))
ATTRS = ("colour", "shape", "position", "background")

try:
    import numpy as np
except ImportError:
    venv = os.path.expanduser("~/.cache/hanlin/bench-venv")
    py = os.path.join(venv, "bin/python3")
    if os.path.abspath(sys.executable) == os.path.abspath(py):
        sys.exit("numpy did not install in " + venv)
    if not os.path.exists(py):
        subprocess.run([sys.executable, "-m", "venv", venv], check=True)
    subprocess.run([py, "-m", "pip", "install", "-q", "numpy"], check=True)
    os.execv(py, [py] + sys.argv)


def read_png(path):
    """8-bit RGB PNG (as Hanlin writes them) → H×W×3 float array in [0, 1]."""
    data = open(path, "rb").read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", path
    pos, idat, w, h = 8, b"", 0, 0
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        kind, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + length]
        if kind == b"IHDR":
            w, h, depth, colour = struct.unpack(">IIBB", body[:10])
            assert depth == 8 and colour == 2, f"{path}: not 8-bit RGB"
        elif kind == b"IDAT":
            idat += body
        pos += 12 + length
    raw = zlib.decompress(idat)
    stride = w * 3
    out = np.zeros((h, stride), dtype=np.int32)
    prev = np.zeros(stride, dtype=np.int32)
    for y in range(h):
        f = raw[y * (stride + 1)]
        line = np.frombuffer(raw, dtype=np.uint8, count=stride, offset=y * (stride + 1) + 1).astype(np.int32)
        cur = np.zeros(stride, dtype=np.int32)
        for x in range(stride):
            a = cur[x - 3] if x >= 3 else 0
            b = prev[x]
            c = prev[x - 3] if x >= 3 else 0
            if f == 0:
                p = 0
            elif f == 1:
                p = a
            elif f == 2:
                p = b
            elif f == 3:
                p = (a + b) // 2
            else:
                pa, pb, pc = abs(b - c), abs(a - c), abs(a + b - 2 * c)
                p = a if pa <= pb and pa <= pc else (b if pb <= pc else c)
            cur[x] = (line[x] + p) & 255
        out[y] = cur
        prev = cur
    return out.reshape(h, w, 3).astype(np.float32) / 255.0


def features(img):
    h, w, _ = img.shape
    border = np.concatenate([img[0], img[-1], img[:, 0], img[:, -1]])
    bg = np.median(border, axis=0)
    diff = np.abs(img - bg).sum(axis=2)
    mask = (diff > 0.25).astype(np.float32)
    n = mask.sum()
    if n < 1:
        fg, cy, cx = bg, h / 2, w / 2
    else:
        fg = (img * mask[..., None]).sum(axis=(0, 1)) / n
        ys, xs = np.nonzero(mask)
        cy, cx = ys.mean(), xs.mean()
    crop = np.zeros((16, 16), dtype=np.float32)
    oy, ox = int(round(cy)) - 8, int(round(cx)) - 8
    for j in range(16):
        for i in range(16):
            y, x = oy + j, ox + i
            if 0 <= y < h and 0 <= x < w:
                crop[j, i] = mask[y, x]
    return np.concatenate([fg, bg, [cx / w, cy / h, n / (h * w)], crop.ravel()]).astype(np.float32)


class Softmax:
    """Multinomial logistic regression on standardised features."""

    def fit(self, x, labels, steps=600, lr=0.5, l2=1e-3):
        self.classes = sorted(set(labels))
        y = np.array([self.classes.index(l) for l in labels])
        self.mu, self.sd = x.mean(0), x.std(0) + 1e-6
        z = (x - self.mu) / self.sd
        k = len(self.classes)
        self.w = np.zeros((z.shape[1], k), dtype=np.float32)
        self.b = np.zeros(k, dtype=np.float32)
        onehot = np.eye(k)[y]
        for _ in range(steps):
            p = self._probs(z)
            g = (p - onehot) / len(y)
            self.w -= lr * (z.T @ g + l2 * self.w)
            self.b -= lr * g.sum(0)
        return self

    def _probs(self, z):
        s = z @ self.w + self.b
        s -= s.max(1, keepdims=True)
        e = np.exp(s)
        return e / e.sum(1, keepdims=True)

    def predict(self, x):
        return [self.classes[i] for i in self._probs((x - self.mu) / self.sd).argmax(1)]


def dataset(n, seed, tmp, side):
    out = os.path.join(tmp, f"data-{seed}")
    subprocess.run([HANLIN, "train", "image-data", "-n", str(n), "--side", str(side),
                    "--seed", str(seed), "-o", out], check=True, stdout=subprocess.DEVNULL)
    rows = [json.loads(l) for l in open(os.path.join(out, "labels.jsonl"))]
    for r in rows:
        r["path"] = os.path.join(out, r["file"])
    return rows


def score(heads, rows, paths):
    x = np.stack([features(read_png(p)) for p in paths])
    got = {a: heads[a].predict(x) for a in ATTRS}
    res = {}
    for lang in ("all", "en", "zh"):
        idx = [i for i, r in enumerate(rows) if lang == "all" or (r["lang"] == lang)]
        if not idx:
            continue
        res[lang] = {a: sum(got[a][i] == rows[i][a] for i in idx) / len(idx) for a in ATTRS}
        res[lang]["all four"] = sum(all(got[a][i] == rows[i][a] for a in ATTRS) for i in idx) / len(idx)
        res[lang]["n"] = len(idx)
    return res, got


def show(title, res):
    print(title)
    for lang, r in res.items():
        cells = "  ".join(f"{a} {r[a] * 100:5.1f}%" for a in ATTRS + ("all four",))
        print(f"  {lang:3} (n={r['n']:3}): {cells}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="the run's model/ directory")
    ap.add_argument("--n", type=int, default=200, help="captions to draw")
    ap.add_argument("--steps", type=int, help="default: the model's")
    ap.add_argument("--guidance", type=float, help="default: the model's")
    ap.add_argument("--sampler", default="euler")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-seed", type=int, default=303,
                    help="generator seed of the captions drawn (tune settings on another seed than you report)")
    ap.add_argument("--json", help="write the figures here")
    ap.add_argument("--keep", help="keep the generated pictures in this directory")
    a = ap.parse_args()
    side = json.load(open(os.path.join(a.model, "unet/config.json")))["sample_size"]
    own = json.load(open(os.path.join(a.model, "model_index.json"))).get("hanlin_defaults", {})
    a.steps = a.steps or own.get("steps", 20)
    a.guidance = own.get("guidance", 7.5) if a.guidance is None else a.guidance
    print(f"{machine.describe(a.threads)}; model {a.model}; {a.steps} steps, guidance {a.guidance}, {a.sampler}")
    with tempfile.TemporaryDirectory() as tmp:
        train = dataset(2000, 101, tmp, side)
        held = dataset(400, 202, tmp, side)
        for rows in (train, held):
            for r in rows:
                r["lang"] = "zh" if re.search(r"[\u4e00-\u9fff]", r["caption"]) else "en"
        x = np.stack([features(read_png(r["path"])) for r in train])
        heads = {a: Softmax().fit(x, [r[a] for r in train]) for a in ATTRS}
        ceiling, _ = score(heads, held, [r["path"] for r in held])
        show("classifier on held-out generator pictures (the ceiling):", ceiling)

        prompts = dataset(a.n, a.prompt_seed, tmp, side)
        for r in prompts:
            r["lang"] = "zh" if re.search(r"[\u4e00-\u9fff]", r["caption"]) else "en"
        outdir = a.keep or os.path.join(tmp, "generated")
        os.makedirs(outdir, exist_ok=True)
        paths, t0 = [], time.time()
        for i, r in enumerate(prompts):
            p = os.path.join(outdir, f"{i:04d}.png")
            subprocess.run([HANLIN, "--threads", str(a.threads), "image", "--model", a.model, r["caption"],
                            "--size", f"{side}x{side}", "--steps", str(a.steps),
                            "--guidance", str(a.guidance), "--sampler", a.sampler,
                            "--seed", str(1000 + i), "-o", p],
                           check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            paths.append(p)
        secs = (time.time() - t0) / len(prompts)
        res, got = score(heads, prompts, paths)
        show(f"generated pictures ({secs:.2f} s each, model load included):", res)
        if a.keep:
            with open(os.path.join(outdir, "readings.jsonl"), "w") as f:
                for i, r in enumerate(prompts):
                    f.write(json.dumps({"file": os.path.basename(paths[i]), "caption": r["caption"],
                                        **{f"read_{k}": got[k][i] for k in ATTRS}}, ensure_ascii=False) + "\n")
        ok = all(res["all"][k] >= 0.8 for k in ("colour", "shape", "position"))
        print("target (colour, shape, position ≥ 80%):", "met" if ok else "NOT met")
        if a.json:
            json.dump({"cpu": machine.describe(a.threads), "model": a.model, "steps": a.steps, "guidance": a.guidance,
                       "ceiling": ceiling, "generated": res, "seconds_per_image": secs}, open(a.json, "w"), indent=1)


if __name__ == "__main__":
    main()
