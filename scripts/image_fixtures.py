#!/usr/bin/env python3
"""Record the tiny Stable Diffusion pipeline and its outputs that
crates/image/tests/parity.rs compares Hanlin with.

Run once, by hand, to make fixtures (never in CI):

    python3 -m venv /tmp/sdv && /tmp/sdv/bin/pip install torch diffusers transformers safetensors
    /tmp/sdv/bin/python scripts/image_fixtures.py

Writes crates/image/tests/data/tiny-sd/ (a diffusers directory with
random weights stored as f16, a CLIP BPE tokenizer learned here from a few
sentences) and crates/image/tests/data/tiny_sd.json (token ids, text
embeddings, one UNet step, one VAE decode, and whole 3-step pipelines with
Euler and DDIM from given latents), computed in f32 from the f16-rounded
weights.
"""
import collections
import json
import os
import shutil
import sys

import torch
from diffusers import (AutoencoderKL, DDIMScheduler, EulerDiscreteScheduler,
                       StableDiffusionPipeline, UNet2DConditionModel)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
DATA = os.path.join(ROOT, "crates", "image", "tests", "data")
OUT = os.path.join(DATA, "tiny-sd")

CORPUS = """a red circle on a blue background. a green square in the top left corner.
a yellow triangle at the bottom right. a photo of a cat by the west lake.
an astronaut riding a horse on the moon, highly detailed, 4k.
blurry, low quality, bad anatomy. the quick brown fox jumps over the lazy dog."""


def bytes_to_unicode():
    """GPT-2's printable stand-in for every byte (CLIP uses the same)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) \
        + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def learn_bpe(corpus, size):
    """A small byte-level BPE in CLIP's form (words end in </w>)."""
    b2u = bytes_to_unicode()
    base = list(b2u.values())
    vocab = base + [c + "</w>" for c in base]
    words = collections.Counter(corpus.lower().replace(".", " .").replace(",", " ,").split())
    split = {w: [b2u[b] for b in w.encode()] for w in words}
    for w in split:
        split[w][-1] += "</w>"
    merges = []
    while len(vocab) < size:
        pairs = collections.Counter()
        for w, n in words.items():
            s = split[w]
            for a, b in zip(s, s[1:]):
                pairs[a, b] += n
        if not pairs:
            break
        (a, b), _ = pairs.most_common(1)[0]
        merges.append(f"{a} {b}")
        vocab.append(a + b)
        for w in split:
            s, out, i = split[w], [], 0
            while i < len(s):
                if i + 1 < len(s) and s[i] == a and s[i + 1] == b:
                    out.append(a + b)
                    i += 2
                else:
                    out.append(s[i])
                    i += 1
            split[w] = out
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(vocab)}, merges


def r(t):
    return [round(float(v), 6) for v in t.detach().flatten().tolist()]


def main():
    torch.manual_seed(0)
    if os.path.exists(OUT):
        shutil.rmtree(OUT)
    os.makedirs(os.path.join(OUT, "tokenizer"))
    vocab, merges = learn_bpe(CORPUS, 700)
    with open(os.path.join(OUT, "tokenizer", "vocab.json"), "w") as f:
        json.dump(vocab, f, ensure_ascii=False)
    with open(os.path.join(OUT, "tokenizer", "merges.txt"), "w") as f:
        f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
    tok = CLIPTokenizer(os.path.join(OUT, "tokenizer", "vocab.json"),
                        os.path.join(OUT, "tokenizer", "merges.txt"), model_max_length=77)
    tok.save_pretrained(os.path.join(OUT, "tokenizer"))
    # Released Stable Diffusion directories carry vocab.json and merges.txt
    # only; keep it so.
    os.remove(os.path.join(OUT, "tokenizer", "tokenizer.json"))

    text = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=3,
        num_attention_heads=4, max_position_embeddings=77, hidden_act="quick_gelu",
        bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"],
        pad_token_id=vocab["<|endoftext|>"])).eval()
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32,
        attention_head_dim=(2, 4), norm_num_groups=8).eval()
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 64),
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1, norm_num_groups=8, sample_size=32).eval()
    # Round the weights to f16 (the stored form) before computing anything.
    with torch.no_grad():
        for m in (text, unet, vae):
            for p in m.parameters():
                p.copy_(p.half().float())
    sched = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        num_train_timesteps=1000, steps_offset=1, timestep_spacing="leading",
        prediction_type="epsilon")
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tok, unet=unet,
                                   scheduler=sched, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    fx = {}
    prompts = ["a red circle on a blue background", "A Photo of a CAT by the West Lake!",
               "画一只在西湖边的猫", "", "blurry, low quality " * 30]
    fx["tokens"] = [{"text": p, "ids": tok(p, padding="max_length", max_length=77,
                                              truncation=True).input_ids} for p in prompts]
    with torch.no_grad():
        ids = torch.tensor([fx["tokens"][0]["ids"]])
        emb = text(ids)[0]
        fx["text"] = {"prompt": prompts[0], "embedding": r(emb)}
        g = torch.Generator().manual_seed(1)
        lat = torch.randn(1, 4, 16, 16, generator=g)
        eps = unet(lat, 500.0, encoder_hidden_states=emb).sample
        fx["unet"] = {"t": 500.0, "latents": r(lat), "out": r(eps)}
        z = torch.randn(1, 4, 16, 16, generator=g)
        img = vae.decode(z).sample
        fx["vae"] = {"latents": r(z), "out": r(img)}
        runs = []
        for name, s in (("euler", sched),
                        ("ddim", DDIMScheduler.from_config(sched.config, set_alpha_to_one=False,
                                                           clip_sample=False))):
            pipe.scheduler = s
            init = torch.randn(1, 4, 16, 16, generator=g)
            out = pipe(prompts[0], negative_prompt="blurry", num_inference_steps=3,
                       guidance_scale=7.5, latents=init.clone(), output_type="np").images[0]
            runs.append({"sampler": name, "prompt": prompts[0], "negative": "blurry", "steps": 3,
                         "guidance": 7.5, "latents": r(init), "image": r(torch.tensor(out))})
        fx["pipeline"] = runs
    pipe.scheduler = sched
    pipe.to(torch.float16).save_pretrained(OUT, safe_serialization=True)
    with open(os.path.join(DATA, "tiny_sd.json"), "w") as f:
        json.dump(fx, f, ensure_ascii=False)
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(OUT) for f in fs)
    print(f"wrote {OUT} ({size} bytes) and tiny_sd.json; vocab {len(vocab)}", file=sys.stderr)


if __name__ == "__main__":
    main()
