#!/usr/bin/env python3
"""Write a full-size Stable Diffusion 1.5-shaped pipeline with random
weights (f16 safetensors, diffusers layout) for speed and memory
benchmarks: speed does not depend on the weights' values.

    /tmp/sdv/bin/python bench/random_sd.py OUT_DIR [--turbo]

Needs torch, diffusers and transformers (pip). With --single-file, also
writes OUT_DIR.safetensors in the original (CompVis/LDM) layout that
stable-diffusion.cpp and most downloads use.
"""
import argparse
import json
import os
import shutil
import sys

import torch
from safetensors.torch import load_file, save_file
from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

HERE = os.path.dirname(os.path.abspath(__file__))
TINY_TOKENIZER = os.path.join(HERE, "..", "crates", "image", "tests", "data", "tiny-sd", "tokenizer")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--turbo", action="store_true", help="trailing timesteps (SD-Turbo style)")
    a = ap.parse_args()
    torch.manual_seed(0)
    with torch.no_grad():
        unet = UNet2DConditionModel(
            sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
            block_out_channels=(320, 640, 1280, 1280),
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            cross_attention_dim=768, attention_head_dim=8).half()
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=4,
            block_out_channels=(128, 256, 512, 512), layers_per_block=2,
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
            sample_size=512).half()
        tok = CLIPTokenizer(os.path.join(TINY_TOKENIZER, "vocab.json"),
                            os.path.join(TINY_TOKENIZER, "merges.txt"), model_max_length=77)
        text = CLIPTextModel(CLIPTextConfig(
            vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
            num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu")).half()
        # The tiny tokenizer's ids are all below 49408.
        sched = EulerDiscreteScheduler(
            beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
            timestep_spacing="trailing" if a.turbo else "leading")
        pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tok, unet=unet,
                                       scheduler=sched, safety_checker=None,
                                       feature_extractor=None, requires_safety_checker=False)
        pipe.save_pretrained(a.out, safe_serialization=True)
    # Released pipelines name the text encoder's tensors `text_model.…`
    # (newer transformers versions save them without it).
    te = os.path.join(a.out, "text_encoder", "model.safetensors")
    tensors = load_file(te)
    if not any(k.startswith("text_model.") for k in tensors):
        save_file({"text_model." + k: v for k, v in tensors.items()}, te)
    # The tokenizer files as released pipelines carry them.
    for f in os.listdir(os.path.join(a.out, "tokenizer")):
        os.remove(os.path.join(a.out, "tokenizer", f))
    for f in os.listdir(TINY_TOKENIZER):
        shutil.copy(os.path.join(TINY_TOKENIZER, f), os.path.join(a.out, "tokenizer", f))
    print(f"wrote {a.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
