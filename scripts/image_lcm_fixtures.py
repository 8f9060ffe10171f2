#!/usr/bin/env python3
"""Record what diffusers' LCMScheduler does with the tiny Stable Diffusion
pipeline (crates/image/tests/data/tiny-sd, written by image_fixtures.py):
its timesteps for a few step counts, its saved config, and one-step runs
(the consistency function with no fresh noise) from given latents, with
and without guidance. crates/image/tests/parity.rs compares Hanlin with
them.

Run once, by hand, to make fixtures (never in CI):

    python3 -m venv /tmp/sdv && /tmp/sdv/bin/pip install torch diffusers transformers safetensors
    /tmp/sdv/bin/python scripts/image_lcm_fixtures.py

Writes crates/image/tests/data/tiny_sd_lcm.json.
"""
import json
import os
import sys

import torch
from diffusers import LCMScheduler, StableDiffusionPipeline

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
DATA = os.path.join(ROOT, "crates", "image", "tests", "data")


def r(t):
    return [round(float(v), 6) for v in torch.as_tensor(t).detach().flatten().tolist()]


def main():
    pipe = StableDiffusionPipeline.from_pretrained(os.path.join(DATA, "tiny-sd"), torch_dtype=torch.float32,
                                                   safety_checker=None, requires_safety_checker=False)
    lcm = LCMScheduler.from_config(pipe.scheduler.config)
    pipe.scheduler = lcm
    fx = {"config": {k: v for k, v in lcm.config.items() if not k.startswith("_")} | {"_class_name": "LCMScheduler"},
          "timesteps": {}}
    for steps in (1, 2, 4, 8, 50):
        lcm.set_timesteps(steps)
        fx["timesteps"][str(steps)] = [int(t) for t in lcm.timesteps]
    g = torch.Generator().manual_seed(11)
    runs = []
    for guidance in (1.0, 2.0):
        init = torch.randn(1, 4, 16, 16, generator=g)
        out = pipe("a red circle on a blue background", num_inference_steps=1, guidance_scale=guidance,
                   latents=init.clone(), output_type="np").images[0]
        runs.append({"prompt": "a red circle on a blue background", "steps": 1, "guidance": guidance,
                     "latents": r(init), "image": r(out)})
    fx["runs"] = runs
    with open(os.path.join(DATA, "tiny_sd_lcm.json"), "w") as f:
        json.dump(fx, f)
    print("wrote tiny_sd_lcm.json", fx["timesteps"]["4"], file=sys.stderr)


if __name__ == "__main__":
    main()
