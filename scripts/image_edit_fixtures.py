#!/usr/bin/env python3
"""Record what diffusers makes of the tiny Stable Diffusion pipeline
(crates/image/tests/data/tiny-sd, written by image_fixtures.py) when it
starts from a picture: the VAE encoder's mean latents, image-to-image with
Euler and DDIM, and inpainting with a mask, each from given noise.
crates/image/tests/parity.rs compares Hanlin with them.

Run once, by hand, to make fixtures (never in CI):

    python3 -m venv /tmp/sdv && /tmp/sdv/bin/pip install torch diffusers transformers safetensors
    /tmp/sdv/bin/python scripts/image_edit_fixtures.py

Writes crates/image/tests/data/tiny_sd_edits.json. diffusers draws the
encoded latents from the VAE's distribution; here (as in Hanlin) they are
its mean, so the run depends on the noise given alone.
"""
import json
import os
import sys

import numpy as np
import torch
from diffusers import (DDIMScheduler, EulerDiscreteScheduler, StableDiffusionImg2ImgPipeline,
                       StableDiffusionInpaintPipeline)
from diffusers.models.autoencoders import vae as vae_module
from diffusers.pipelines.stable_diffusion import pipeline_stable_diffusion_img2img as img2img_module
from diffusers.pipelines.stable_diffusion import pipeline_stable_diffusion_inpaint as inpaint_module
from PIL import Image

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
DATA = os.path.join(ROOT, "crates", "image", "tests", "data")


def r(t):
    return [round(float(v), 6) for v in torch.as_tensor(t).detach().flatten().tolist()]


def picture():
    """32×32: a gradient with a yellow square."""
    y, x = np.mgrid[0:32, 0:32]
    rgb = np.stack([x * 8, y * 8, 255 - x * 4], axis=-1)
    rgb[8:20, 10:22] = (250, 220, 30)
    return rgb.astype(np.uint8)


def main():
    torch.manual_seed(0)
    # The encoded picture's latents are the distribution's mean.
    vae_module.DiagonalGaussianDistribution.sample = lambda self, generator=None: self.mean
    src = os.path.join(DATA, "tiny-sd")
    pipe = StableDiffusionImg2ImgPipeline.from_pretrained(src, torch_dtype=torch.float32,
                                                          safety_checker=None,
                                                          requires_safety_checker=False)
    euler = pipe.scheduler
    assert isinstance(euler, EulerDiscreteScheduler), type(euler)
    ddim = DDIMScheduler.from_config(euler.config, set_alpha_to_one=False, clip_sample=False)
    rgb = picture()
    img = Image.fromarray(rgb)
    fx = {"image": rgb.flatten().tolist(), "width": 32, "height": 32}
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        x = torch.tensor(rgb, dtype=torch.float32).permute(2, 0, 1)[None] / 127.5 - 1
        fx["encode"] = r(pipe.vae.encode(x).latent_dist.mean)

    def with_noise(module, noise, run):
        given = module.randn_tensor
        module.randn_tensor = lambda *a, **k: noise.clone()
        try:
            return run()
        finally:
            module.randn_tensor = given

    runs = []
    for name, s in (("euler", euler), ("ddim", ddim)):
        pipe.scheduler = s
        noise = torch.randn(1, 4, 16, 16, generator=g)
        out = with_noise(img2img_module, noise, lambda: pipe(
            "a red circle on a blue background", image=img, strength=0.6, num_inference_steps=5,
            negative_prompt="blurry", guidance_scale=7.5, output_type="np").images[0])
        runs.append({"sampler": name, "prompt": "a red circle on a blue background",
                     "negative": "blurry", "steps": 5, "guidance": 7.5, "strength": 0.6,
                     "noise": r(noise), "image": r(out)})
    fx["img2img"] = runs

    inpaint = StableDiffusionInpaintPipeline(**{k: v for k, v in pipe.components.items()
                                                if k != "image_encoder"})
    inpaint.scheduler = euler
    mask = np.zeros((32, 32), dtype=np.uint8)
    mask[4:20, 14:30] = 255
    fx["mask"] = (mask.flatten() // 255).tolist()
    runs = []
    for strength in (1.0, 0.7):
        noise = torch.randn(1, 4, 16, 16, generator=g)
        out = with_noise(inpaint_module, noise, lambda: inpaint(
            "a green square", image=img, mask_image=Image.fromarray(mask), strength=strength,
            num_inference_steps=4, guidance_scale=5.0, height=32, width=32,
            output_type="np").images[0])
        runs.append({"sampler": "euler", "prompt": "a green square", "steps": 4,
                     "guidance": 5.0, "strength": strength, "noise": r(noise), "image": r(out)})
    fx["inpaint"] = runs
    with open(os.path.join(DATA, "tiny_sd_edits.json"), "w") as f:
        json.dump(fx, f)
    print("wrote tiny_sd_edits.json", file=sys.stderr)


if __name__ == "__main__":
    main()
