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
import subprocess
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


def resnet_ldm(rest):
    for new, old in (("norm1.", "in_layers.0."), ("conv1.", "in_layers.2."), ("time_emb_proj.", "emb_layers.1."),
                     ("norm2.", "out_layers.0."), ("conv2.", "out_layers.3."), ("conv_shortcut.", "skip_connection.")):
        if rest.startswith(new):
            return old + rest[len(new):]
    return rest


def unet_to_ldm(name, layers, attn_levels):
    """A diffusers UNet tensor name in the original (LDM) layout."""
    per = layers + 1
    p = name.split(".")
    fixed = {"conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0",
             "time_embedding.linear_2": "time_embed.2", "conv_norm_out": "out.0", "conv_out": "out.2"}
    for k, v in fixed.items():
        if name.startswith(k + "."):
            return v + name[len(k):]
    if p[0] == "down_blocks":
        b = int(p[1])
        if p[2] == "downsamplers":
            return f"input_blocks.{1 + b * per + layers}.0.op." + ".".join(p[5:])
        i = 1 + b * per + int(p[3])
        rest = ".".join(p[4:])
        return f"input_blocks.{i}.0." + resnet_ldm(rest) if p[2] == "resnets" else f"input_blocks.{i}.1.{rest}"
    if p[0] == "mid_block":
        rest = ".".join(p[3:])
        if p[1] == "attentions":
            return "middle_block.1." + rest
        return f"middle_block.{0 if p[2] == '0' else 2}." + resnet_ldm(rest)
    if p[0] == "up_blocks":
        b = int(p[1])
        if p[2] == "upsamplers":
            return f"output_blocks.{b * per + layers}.{2 if b in attn_levels else 1}.conv." + ".".join(p[5:])
        i = b * per + int(p[3])
        rest = ".".join(p[4:])
        return f"output_blocks.{i}.0." + resnet_ldm(rest) if p[2] == "resnets" else f"output_blocks.{i}.1.{rest}"
    raise ValueError(name)


def vae_to_ldm(name, levels):
    """A diffusers VAE tensor name in the original layout."""
    if name.startswith(("quant_conv.", "post_quant_conv.")):
        return name
    side, rest = name.split(".", 1)
    for k, v in (("conv_norm_out.", "norm_out."), ("conv_in.", "conv_in."), ("conv_out.", "conv_out.")):
        if rest.startswith(k):
            return f"{side}.{v}{rest[len(k):]}"
    p = rest.split(".")
    sc = lambda s: s.replace("conv_shortcut.", "nin_shortcut.")
    if p[0] == "mid_block":
        if p[1] == "resnets":
            return f"{side}.mid.block_{int(p[2]) + 1}." + sc(".".join(p[3:]))
        a = ".".join(p[3:])
        for k, v in (("group_norm.", "norm."), ("to_q.", "q."), ("to_k.", "k."), ("to_v.", "v."), ("to_out.0.", "proj_out.")):
            if a.startswith(k):
                return f"{side}.mid.attn_1.{v}{a[len(k):]}"
    if p[0] in ("up_blocks", "down_blocks"):
        i = int(p[1]) if side == "encoder" else levels - 1 - int(p[1])
        kind = "down" if side == "encoder" else "up"
        if p[2] in ("upsamplers", "downsamplers"):
            return f"{side}.{kind}.{i}.{'upsample' if kind == 'up' else 'downsample'}.conv." + ".".join(p[5:])
        return f"{side}.{kind}.{i}.block.{p[3]}." + sc(".".join(p[4:]))
    raise ValueError(name)


def write_single_file(pipe, path):
    """The pipeline as one checkpoint in the original layout, checked by
    converting it back with diffusers' own single-file converters."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint
    from safetensors.torch import save_file
    unet, vae, text = pipe.unet.state_dict(), pipe.vae.state_dict(), pipe.text_encoder.state_dict()
    layers = pipe.unet.config.layers_per_block
    attn = {i for i, t in enumerate(pipe.unet.config.up_block_types) if "CrossAttn" in t}
    levels = len(pipe.vae.config.block_out_channels)
    out = {}
    for k, v in unet.items():
        out["model.diffusion_model." + unet_to_ldm(k, layers, attn)] = v
    for k, v in vae.items():
        ldm = vae_to_ldm(k, levels)
        if ".mid.attn_1." in ldm and v.dim() == 2:
            v = v[:, :, None, None]
        out["first_stage_model." + ldm] = v
    for k, v in text.items():
        out["cond_stage_model.transformer." + (k if k.startswith("text_model.") else "text_model." + k)] = v
    back = convert_ldm_unet_checkpoint(out, dict(pipe.unet.config))
    assert set(back) == set(unet), set(back) ^ set(unet)
    assert all(torch.equal(back[k], unet[k]) for k in unet)
    back = convert_ldm_vae_checkpoint(out, dict(pipe.vae.config))
    assert set(back) == set(vae), set(back) ^ set(vae)
    assert all(torch.equal(back[k].reshape(vae[k].shape), vae[k]) for k in vae)
    save_file({k: v.contiguous() for k, v in out.items()}, path)


def clip_tokens(prompts):
    """Token ids from CLIP's real merges (the open_clip_torch wheel's
    bpe_simple_vocab_16e6.txt.gz, fetched with pip) with transformers'
    CLIPTokenizer, its vocabulary built as CLIP builds it."""
    import glob
    import gzip
    import tempfile
    import zipfile
    tmp = tempfile.mkdtemp()
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp,
                    "open_clip_torch==3.3.0"], check=True)
    z = zipfile.ZipFile(glob.glob(os.path.join(tmp, "*.whl"))[0])
    merges = gzip.decompress(z.read("open_clip/bpe_simple_vocab_16e6.txt.gz")).decode().split("\n")
    merges = merges[1:49152 - 256 - 2 + 1]
    b2u = list(bytes_to_unicode().values())
    vocab = b2u + [v + "</w>" for v in b2u] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    with open(os.path.join(tmp, "vocab.json"), "w") as f:
        json.dump({t: i for i, t in enumerate(vocab)}, f)
    with open(os.path.join(tmp, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
    tok = CLIPTokenizer(os.path.join(tmp, "vocab.json"), os.path.join(tmp, "merges.txt"), model_max_length=77)
    return [{"text": p, "ids": tok(p, padding="max_length", max_length=77, truncation=True).input_ids}
            for p in prompts]


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
    fx["clip_tokens"] = clip_tokens(prompts + ["An astronaut riding a horse, 4k, trending on artstation",
                                               "水墨画：雨中的西湖断桥", "it's a dog's life; don't panic!"])
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
    # Released Stable Diffusion directories carry vocab.json and merges.txt
    # only; keep it so.
    os.remove(os.path.join(OUT, "tokenizer", "tokenizer.json"))
    # The same weights as one file in the original layout (most downloads).
    write_single_file(pipe, os.path.join(DATA, "tiny-sd.safetensors"))
    with open(os.path.join(DATA, "tiny_sd.json"), "w") as f:
        json.dump(fx, f, ensure_ascii=False)
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(OUT) for f in fs)
    print(f"wrote {OUT} ({size} bytes) and tiny_sd.json; vocab {len(vocab)}", file=sys.stderr)


if __name__ == "__main__":
    main()
