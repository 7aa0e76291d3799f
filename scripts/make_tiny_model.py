#!/usr/bin/env python3
"""Write a Stable Diffusion pipeline with seeded random weights as a diffusers folder (save_pretrained).

The tiny presets are the embedded demo/test models, one per family: `tiny` (SD 1.x), `tiny-sd2` (SD 2.x,
v-prediction) and `tiny-sdxl` (SDXL): a few MB each, 64x64 images, noise rather than pictures, nothing downloaded.
`sd15`, `sd21` and `sdxl` build the full architectures for GPU timing (about 2, 2.6 and 7 GB in float16).

Exit codes: 0 written, 2 bad arguments.
"""

import argparse
import logging
import sys
import time

import torch

from sd_engine.random_models import PRESETS, save_pipeline


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="build/tiny-sd", help="output folder (default: %(default)s)")
    parser.add_argument("--preset", choices=PRESETS, default="tiny", help="architecture (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed for the random weights (default: %(default)s)")
    parser.add_argument("--dtype", choices=("float32", "float16"), default="float32",
                        help="dtype of the saved weights (default: %(default)s)")
    parser.add_argument("--device", default="cpu", help="where to initialise the weights, e.g. cuda (default: cpu)")
    parser.add_argument("--loras", action="store_true",
                        help="also write two random LoRA adapters into loras/: style (diffusers' layout) and detail "
                             "(kohya's)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    start = time.perf_counter()
    out = save_pipeline(args.preset, args.out, seed=args.seed, device=args.device, dtype=getattr(torch, args.dtype))
    if args.loras:
        from diffusers import DiffusionPipeline

        from sd_engine.random_loras import save_random_lora

        pipe = DiffusionPipeline.from_pretrained(out)
        save_random_lora(pipe, out / "loras" / "style.safetensors", seed=args.seed + 1, std=0.1)
        save_random_lora(pipe, out / "loras" / "detail.safetensors", seed=args.seed + 2, layout="kohya", std=0.1)
    print(f"wrote {args.preset} pipeline (seed {args.seed}, {args.dtype}){' with adapters style, detail' * args.loras} "
          f"to {out} in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
