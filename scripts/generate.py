#!/usr/bin/env python3
"""Generate one image with the engine, no server: same config file and code path as the TorchServe handler.

--model is a local diffusers folder (or a Hugging Face hub id, downloaded by diffusers; token from $HF_TOKEN).
Settings come from the `handler:` block of --config; --backend overrides its backend. Prints load, optimize, warm-up
and generation times.

Exit codes: 0 image written; 1 generation failed; 2 bad arguments or config.
"""

import argparse
import logging
import sys
import time
from pathlib import Path

import yaml

from sd_engine.config import EngineConfig
from sd_engine.engine import GenerationResult, load_engine, pick_device
from sd_engine.errors import ConfigError, InvalidRequest
from sd_engine.imaging import encode_image
from sd_engine.jit_caches import use_jit_caches
from query import add_request_arguments, request_fields
from sd_engine.requests import RequestRules, parse_request


ROOT = Path(__file__).resolve().parent.parent


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="diffusers folder or hub id")
    parser.add_argument("--config", type=Path, default=ROOT / "config" / "model-config.yaml",
                        help="model-config.yaml whose handler: block to use (default: this repo's GPU config)")
    parser.add_argument("--backend", choices=("auto", "deepspeed", "eager"), help="override the config's backend")
    parser.add_argument("--device", choices=("auto", "cpu"), default="auto",
                        help="auto: the first CUDA GPU if there is one, else the CPU (default: auto)")
    add_request_arguments(parser)
    parser.add_argument("--output", type=Path, help="output file (default: output-<timestamp>.<ext>)")
    parser.add_argument("--verbose", action="store_true", help="log at DEBUG (includes prompts)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(name)s: %(message)s")

    try:
        block = (yaml.safe_load(args.config.read_text()) or {}).get("handler") or {}
        config = EngineConfig.from_mapping(block)
        if args.backend:
            config = config.replace(backend=args.backend)
        # Fail in seconds on what needs no model (types, multiples of 8, the config's own limits); the model's size
        # limits are checked once it is loaded.
        fields = {k: v for k, v in request_fields(args).items() if k != "loras"}  # adapters: known once loaded
        parse_request(fields, RequestRules(
            max_height=2**16, max_width=2**16, max_num_inference_steps=config.max_num_inference_steps,
            max_prompt_chars=config.max_prompt_chars, max_guidance_scale=config.max_guidance_scale))
        # The JIT caches, the CUDA driver's too (and one shipped with AOT packages), before CUDA starts.
        use_jit_caches(config.cache_dir, args.model if Path(args.model).is_dir() else None)
        device = pick_device(0 if args.device == "auto" else None)
        engine = load_engine(config, args.model, device)
        # After loading: the defaults and size limits are the model's own where the config leaves them out.
        request = parse_request(request_fields(args), engine.rules)
    except (ConfigError, InvalidRequest, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    start = time.perf_counter()
    [result] = engine.generate([request])
    seconds = time.perf_counter() - start
    if not isinstance(result, GenerationResult):
        print(f"error: {result}", file=sys.stderr)
        return 1
    payload, _ = encode_image(result.image, request.format, request.quality)
    extension = ".png" if request.format == "png" else ".jpg"
    output = args.output or Path(f"output-{time.strftime('%Y%m%d-%H%M%S')}{extension}")
    output.write_bytes(payload)
    timings = ", ".join(f"{k.removesuffix('_s')} {v:.2f} s" for k, v in engine.timings.items())
    print(f"wrote {output} ({request.width}x{request.height}, {request.num_inference_steps} steps, "
          f"seed {request.seed}, "
          f"backend {engine.backend} on {device}); {timings}, generate {seconds:.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
