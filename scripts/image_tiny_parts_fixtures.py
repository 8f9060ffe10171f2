#!/usr/bin/env python3
"""Record what diffusers and transformers make of two parts Hanlin's image
pipeline can swap in: a TAESD decoder (diffusers' AutoencoderTiny, for
previews while denoising) and a Chinese BERT text encoder with its
WordPiece tokenizer (as Taiyi-Stable-Diffusion-1B-Chinese uses).
crates/image/tests/parity.rs compares Hanlin with them.

Run once, by hand, to make fixtures (never in CI):

    python3 -m venv /tmp/sdv && /tmp/sdv/bin/pip install torch diffusers transformers safetensors
    /tmp/sdv/bin/python scripts/image_tiny_parts_fixtures.py

Writes, with random weights stored as f16:
- crates/image/tests/data/tiny-taesd/ (two up-levels, matching the tiny
  pipeline's VAE) and tiny-taesd-sd/ (TAESD's own shape, 8× up, narrow);
- crates/image/tests/data/tiny-bert/{text_encoder,tokenizer}, which replace
  the tiny pipeline's (crates/image/tests/data/tiny-sd, image_fixtures.py);
- crates/image/tests/data/tiny_parts.json: the decoders' outputs for given
  latents, token ids of a few prompts, the BERT's last hidden state, and a
  whole 4-step Euler run of the tiny pipeline with the BERT encoder from
  given latents.
"""
import json
import os
import shutil
import sys

import torch
from diffusers import AutoencoderTiny, StableDiffusionPipeline
from transformers import BertConfig, BertModel, BertTokenizer

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
DATA = os.path.join(ROOT, "crates", "image", "tests", "data")

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "，", "。", ",", ".", "!"] + list(
    "一只在西湖边的猫红色蓝背景上圆形绿方黄三角画") + [
    "a", "red", "blue", "green", "circle", "square", "on", "the", "background", "cat",
    "##s", "##ed", "##ing", "paint", "lake", "cafe", "big", "##ger"]

PROMPTS = ["蓝色背景上的红色圆形", "画一只在西湖边的猫。", "A Red Circle on the BLUE background!",
           "painted circles, bigger café 猫", "zebra 🦓 斑马", ""]


def r(t):
    return [round(float(v), 6) for v in torch.as_tensor(t).detach().flatten().tolist()]


def f16_round(module):
    """Store as f16, compute in f32 from the rounded values (as Hanlin reads them)."""
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(p.half().float())


def taesd(name, blocks, channels):
    torch.manual_seed(len(blocks))
    m = AutoencoderTiny(encoder_block_out_channels=channels, decoder_block_out_channels=channels,
                        num_encoder_blocks=blocks, num_decoder_blocks=blocks,
                        latent_channels=4).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.mul_(1.5)
    f16_round(m)
    out = os.path.join(DATA, name)
    shutil.rmtree(out, ignore_errors=True)
    m.half().save_pretrained(out)
    return m.float()


def main():
    fx = {}
    g = torch.Generator().manual_seed(7)
    latents = torch.randn(1, 4, 6, 5, generator=g) * 2
    fx["taesd_latents"] = r(latents)
    fx["taesd_shape"] = [1, 4, 6, 5]
    with torch.no_grad():
        for name, blocks, channels in (("tiny-taesd", (2, 1), (8, 8)),
                                       ("tiny-taesd-sd", (3, 3, 3, 1), (8, 8, 8, 8))):
            m = taesd(name, blocks, channels)
            fx[name] = r(m.decode(latents).sample)

    # The Chinese BERT and its WordPiece tokenizer, shaped to the tiny pipeline.
    bert_dir = os.path.join(DATA, "tiny-bert")
    shutil.rmtree(bert_dir, ignore_errors=True)
    tok_dir = os.path.join(bert_dir, "tokenizer")
    os.makedirs(tok_dir)
    with open(os.path.join(tok_dir, "vocab.txt"), "w") as f:
        f.write("\n".join(VOCAB) + "\n")
    tok = BertTokenizer(os.path.join(tok_dir, "vocab.txt"), do_lower_case=True,
                        model_max_length=24)
    tok.save_pretrained(tok_dir)
    for extra in ("tokenizer.json",):
        p = os.path.join(tok_dir, extra)
        if os.path.exists(p):
            os.remove(p)
    torch.manual_seed(3)
    cfg = BertConfig(vocab_size=len(VOCAB), hidden_size=32, num_hidden_layers=2,
                     num_attention_heads=4, intermediate_size=64, max_position_embeddings=40,
                     type_vocab_size=2)
    bert = BertModel(cfg, add_pooling_layer=True).eval()
    f16_round(bert)
    bert.half().save_pretrained(os.path.join(bert_dir, "text_encoder"))
    bert = bert.float()
    ids = [tok(p, padding="max_length", max_length=tok.model_max_length,
               truncation=True).input_ids for p in PROMPTS]
    fx["bert_prompts"] = PROMPTS
    fx["bert_ids"] = ids
    with torch.no_grad():
        fx["bert_hidden"] = r(bert(torch.tensor([ids[0]]))[0])

    pipe = StableDiffusionPipeline.from_pretrained(os.path.join(DATA, "tiny-sd"),
                                                   torch_dtype=torch.float32,
                                                   safety_checker=None,
                                                   requires_safety_checker=False)
    pipe.text_encoder = bert
    pipe.tokenizer = tok
    start = torch.randn(1, 4, 16, 16, generator=g)
    with torch.no_grad():
        image = pipe("蓝色背景上的红色圆形", negative_prompt="绿色", num_inference_steps=4,
                     guidance_scale=7.5, latents=start.clone(), height=32, width=32,
                     output_type="np").images[0]
    fx["bert_run"] = {"prompt": "蓝色背景上的红色圆形", "negative": "绿色", "steps": 4,
                      "guidance": 7.5, "latents": r(start), "image": r(image)}
    with open(os.path.join(DATA, "tiny_parts.json"), "w") as f:
        json.dump(fx, f)
    print("wrote tiny_parts.json", ids, file=sys.stderr)


if __name__ == "__main__":
    main()
