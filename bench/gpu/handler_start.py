"""The TorchServe handler's own start, in this process, as TorchServe's worker runs it: the model's folder first on
sys.path and as the working directory, a real ts.context.Context, StableDiffusionHandler.initialize (the sha256 check
with diffusers importing beside it, the JIT caches set before CUDA, load, the packages, the warm-up). Prints the
engine's timings as one JSON line.

What it tells apart: a TorchServe worker missed the CUDA driver's JIT cache that an in-process start
(compile_artifacts.py) had filled, and the reverse, while each hit its own kind's
(bench/results/h100-sd15-2026-12-07-drivercache.txt). This start has the handler's path without TorchServe's
process (its Java parent, its environment): if it hits that cache the difference is the process, if it misses it is
the handler's path.

    python3 bench/gpu/handler_start.py MODEL_DIR [--gpu 0]

MODEL_DIR: a model folder in the no-archive layout (scripts/package_model.py WEIGHTS STORE --no-archive writes
STORE/<name>/), as TorchServe's model store holds it. Needs torchserve installed (ts.context).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import yaml


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_dir", type=Path, help="a no-archive model folder (MAR-INF/MANIFEST.json inside)")
    parser.add_argument("--gpu", default="0", help="TorchServe's gpu_id for the worker (default: %(default)s)")
    args = parser.parse_args(argv)
    model_dir = args.model_dir.resolve()
    manifest = json.loads((model_dir / "MAR-INF" / "MANIFEST.json").read_text())
    config = yaml.safe_load((model_dir / manifest["model"]["configFile"]).read_text())
    sys.path.insert(0, str(model_dir))  # TorchServe puts the model's folder first; the handler comes from there
    os.chdir(model_dir)  # and starts its worker in it
    from ts.context import Context

    from sd_handler import StableDiffusionHandler

    context = Context(manifest["model"]["modelName"], str(model_dir), manifest, int(config.get("batchSize", 1)),
                      args.gpu, "0.12.0", model_yaml_config=config)
    start = time.perf_counter()
    handler = StableDiffusionHandler()
    handler.initialize(context)
    record = {"ready_s": round(time.perf_counter() - start, 1), "handler": sys.modules["sd_handler"].__file__,
              **{k: round(v, 2) for k, v in handler.engine.timings.items()}, **handler.engine.startup}
    print(json.dumps(record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
