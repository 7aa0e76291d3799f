"""The TorchServe handler's own start, in this process, as TorchServe's worker runs it: the model's folder first on
sys.path and as the working directory, a real ts.context.Context, StableDiffusionHandler.initialize (the sha256 check
with diffusers importing beside it, the JIT caches set before CUDA, load, the packages, the warm-up). Prints the
engine's timings as one JSON line.

What it tells apart: a TorchServe worker missed the CUDA driver's JIT cache that an in-process start
(compile_artifacts.py) had filled, and the reverse, while each hit its own kind's
(bench/results/h100-sd15-2026-12-07-drivercache.txt). Until jit-first, the handler set CUDA_CACHE_PATH after checking
the weights, while diffusers and the pipeline's modules imported beside the check in another thread; if that thread
started the CUDA driver, the driver kept its default folder (~/.nv/ComputeCache). The handler now sets it first;
--jit-late sets it where it was set before, after the check.

--then-batch N then times a batch size the warm-up skipped, whose first call builds kernels at run time (cuDNN's
attention, called by the packages): a TorchServe worker's took 4.5-5.8 s
(bench/results/h100-sd15-2026-12-07-serving-aot-jitfirst-*-model.log). Engine.generate now runs from /, as the warm-up
does, since the driver's cache entries depend on the working directory; --request-cwd-as-is runs it from the model's
folder instead, as it ran before: the control.

    python3 bench/gpu/handler_start.py MODEL_DIR [--gpu 0] [--jit-late] [--then-batch N [--request-cwd-as-is]]

The record says whether the CUDA driver was already initialized (cuInit) when the handler set CUDA_CACHE_PATH
(`driver_initialized_at_jit_caches`, from sd_engine.jit_caches.driver_started), the first Python-level call that
started it (`first_cuda_call`: which, from which thread, the stack), and how much the cache folder it set and the
driver's default folder hold afterwards.

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


def folder_kb(path) -> int | None:
    path = Path(path).expanduser() if path else None
    if path is None or not path.is_dir():
        return None
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) // 1024


def watch_cuda_starts() -> dict:
    """Record the first Python-level call that starts the CUDA driver (torch.cuda.is_available, device_count and
    _lazy_init reach it through these two functions of torch._C): which, from which thread, and the stack. A start
    from C++ (cuDNN, Triton's own driver) is not seen here; driver_initialized_at_jit_caches still tells."""
    import threading
    import traceback

    import torch

    first: dict = {}

    def watched(name, function):
        def call(*args, **kwargs):
            if not first:
                first.update(call=name, thread=threading.current_thread().name,
                             stack=[line.strip() for line in traceback.format_stack(limit=14)[:-1]])
            return function(*args, **kwargs)
        return call

    for name in ("_cuda_getDeviceCount", "_cuda_init"):
        if hasattr(torch._C, name):
            setattr(torch._C, name, watched(name, getattr(torch._C, name)))
    return first


def then_batch(engine, images: int) -> list[float]:
    """Seconds of two generations of `images` images at the default size, one after the other."""
    from sd_engine.requests import parse_request

    requests = [parse_request({"prompt": "a batch the warm-up skipped", "seed": i}, engine.rules)
                for i in range(images)]
    seconds = []
    for _ in range(2):
        start = time.perf_counter()
        results = engine.generate(requests)
        if not all(hasattr(result, "image") for result in results):
            raise RuntimeError(f"a batch of {images} failed: {results}")
        seconds.append(round(time.perf_counter() - start, 3))
    return seconds


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_dir", type=Path, help="a no-archive model folder (MAR-INF/MANIFEST.json inside)")
    parser.add_argument("--gpu", default="0", help="TorchServe's gpu_id for the worker (default: %(default)s)")
    parser.add_argument("--jit-late", action="store_true",
                        help="set the JIT caches after the weights' check, as the handler did before")
    parser.add_argument("--then-batch", type=int, default=0, metavar="N",
                        help="after READY, time two generations of N images at the default size: the first of a batch "
                             "size the warm-up skipped captures its graphs (a TorchServe worker's took 4.5-5.8 s on "
                             "H100s before generate ran from /; this start's, on an H200, 1.38 s)")
    parser.add_argument("--request-cwd-as-is", action="store_true",
                        help="with --then-batch: generate from the model's folder, as before generate ran from /")
    args = parser.parse_args(argv)
    model_dir = args.model_dir.resolve()
    manifest = json.loads((model_dir / "MAR-INF" / "MANIFEST.json").read_text())
    config = yaml.safe_load((model_dir / manifest["model"]["configFile"]).read_text())
    if args.request_cwd_as_is and not args.then_batch:
        parser.error("--request-cwd-as-is: only with --then-batch")
    if args.then_batch and not 1 < args.then_batch < int(config.get("batchSize", 1)):
        parser.error(f"--then-batch: a batch the warm-up skips, 2..{int(config.get('batchSize', 1)) - 1}")
    sys.path.insert(0, str(model_dir))  # TorchServe puts the model's folder first; the handler comes from there
    os.chdir(model_dir)  # and starts its worker in it
    from ts.context import Context

    first_cuda = watch_cuda_starts()  # before the handler's modules import
    import sd_handler
    from sd_engine.jit_caches import driver_started
    from sd_handler import StableDiffusionHandler

    seen = {}
    set_caches = sd_handler.use_jit_caches

    def use_jit_caches(*args_, **kwargs):
        seen["driver_initialized_at_jit_caches"] = driver_started()
        set_caches(*args_, **kwargs)
        seen["cuda_cache_path"] = os.environ.get("CUDA_CACHE_PATH")

    sd_handler.use_jit_caches = use_jit_caches
    if args.jit_late:  # the order before jit-first: the caches set after the weights' check and the imports
        calls = []
        sd_handler.use_jit_caches = lambda *args_: calls.append(args_)
        prepare = sd_handler.prepare_weights

        def prepare_weights(*args_):
            folder = prepare(*args_)
            use_jit_caches(*calls.pop())
            return folder

        sd_handler.prepare_weights = prepare_weights

    context = Context(manifest["model"]["modelName"], str(model_dir), manifest, int(config.get("batchSize", 1)),
                      args.gpu, "0.12.0", model_yaml_config=config)
    start = time.perf_counter()
    handler = StableDiffusionHandler()
    handler.initialize(context)
    record = {"ready_s": round(time.perf_counter() - start, 1), "handler": sys.modules["sd_handler"].__file__,
              **{k: round(v, 2) for k, v in handler.engine.timings.items()}, **handler.engine.startup,
              **seen, "first_cuda_call": first_cuda or None, "jit_late": args.jit_late,
              "cache_path_kb": folder_kb(seen.get("cuda_cache_path")),
              "default_cache_kb": folder_kb("~/.nv/ComputeCache")}
    if args.then_batch:
        if args.request_cwd_as_is:  # Engine.generate looks fixed_cwd up at each call
            import contextlib

            import sd_engine.engine

            sd_engine.engine.fixed_cwd = contextlib.nullcontext
        batch = record["then_batch"] = {"images": args.then_batch, "request_cwd_as_is": args.request_cwd_as_is}
        try:
            batch["seconds"] = then_batch(handler.engine, args.then_batch)
        except Exception as e:  # noqa: BLE001 - the start's record still comes out, with what went wrong
            batch["error"] = f"{type(e).__name__}: {e}"
        batch["cache_path_kb_after"] = folder_kb(seen.get("cuda_cache_path"))
    print(json.dumps(record))
    return 1 if "error" in record.get("then_batch", {}) else 0


if __name__ == "__main__":
    sys.exit(main())
