#!/usr/bin/env python3
"""Download a Stable Diffusion model from the Hugging Face hub and save it as a local diffusers folder.

The model is loaded with diffusers (safetensors only) and written with save_pretrained, so the folder holds exactly
what the engine loads. The token comes from $HF_TOKEN (or --token-file); it is never printed and never written into
the output folder. Many models (e.g. stable-diffusion-v1-5) require accepting their licence on the hub first.

Exit codes: 0 saved; 1 download or load failed; 2 bad arguments.
"""

import argparse
import os
import sys
from pathlib import Path

import torch


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="hub id, e.g. stable-diffusion-v1-5/stable-diffusion-v1-5")
    parser.add_argument("--out", type=Path, required=True, help="folder to write the diffusers pipeline into")
    parser.add_argument("--revision", help="git revision on the hub (default: main)")
    parser.add_argument("--variant", help="weights variant to download, e.g. fp16 (SDXL's repository has "
                        "diffusion_pytorch_model.fp16.safetensors next to the full-precision files): half the download")
    parser.add_argument("--vae", help="hub id of a VAE to use instead of the model's own, e.g. "
                        "madebyollin/sdxl-vae-fp16-fix (SDXL's VAE decodes in float32; this one in float16)")
    parser.add_argument("--dtype", choices=("float16", "float32"), default="float16",
                        help="dtype to save in; float16 halves the size (default: %(default)s)")
    parser.add_argument("--token-file", type=Path, help="file holding the HF token (default: $HF_TOKEN)")
    args = parser.parse_args(argv)

    token = args.token_file.read_text().strip() if args.token_file else os.environ.get("HF_TOKEN")
    from diffusers import DiffusionPipeline

    dtype = getattr(torch, args.dtype)
    try:
        extra = {}
        if args.vae:
            from diffusers import AutoencoderKL

            extra["vae"] = AutoencoderKL.from_pretrained(args.vae, token=token, dtype=dtype, use_safetensors=True)
        pipe = DiffusionPipeline.from_pretrained(args.model, revision=args.revision, variant=args.variant, token=token,
                                                 dtype=dtype, use_safetensors=True, **extra)
    except Exception as e:  # noqa: BLE001 - hub, network and format errors all end here
        print(f"error: could not download {args.model}: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    pipe.save_pretrained(str(args.out), safe_serialization=True)
    print(f"saved {args.model} ({args.dtype}) to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
