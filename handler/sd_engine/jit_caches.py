"""Where a worker's just-in-time caches live: DeepSpeed's built CUDA ops, Inductor's and Triton's kernels, and the
CUDA driver's JIT cache (CUDA_CACHE_PATH: the machine code the driver makes from PTX at run time, 2.6-2.8 MB for an
SD 1.5 start from AOT packages).

What the driver's cache gives a start from AOT packages (aot.py), measured on H100s (SD 1.5, 4 sizes, batchSize 8,
bench/results/h100-sd15-2026-12-07-drivercache.txt): in-process, 16.2-19.4 s to ready with the cache an earlier start
filled (or a copy of it) against 22.3-25.6 s with an empty one (the optimize step, where each package runs once,
2.8-3.2 s instead of 5.7-6.6 s); through TorchServe, a restart on the cache_dir the first start filled took 28.0 s
against 32.6 s. Its entries depend on the process's working directory, so load_engine runs its optimize and warm-up
steps from / (fixed_cwd): a TorchServe worker's is the model's folder, a new temporary one at each start of a MAR.

Two sources, in this order:
- `cache_dir` (config): one persistent folder for all of them; the driver's goes to <cache_dir>/cuda.
- compile-artifacts/cuda in the weights folder: the driver's cache that scripts/compile_artifacts.py --aot --check
  filled with its fresh start from the packages, shipped beside them. A worker copies it into <cache_dir>/cuda when
  that is empty, else into a temporary folder (the weights folder stays as its sha256 manifest says). An in-process
  start from another folder found all it needed there; a TorchServe worker, so far, did not (25.0 s, its first
  package run as slow as with an empty cache): something else differs between the two, not found yet.

They must be set before CUDA initializes in the process: the fronts call use_jit_caches before pick_device;
load_engine calls it again (for scripts), which changes nothing when its arguments are the same.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

logger = logging.getLogger(__name__)

DRIVER_CACHE = "cuda"  # the driver's JIT cache: <cache_dir>/cuda, and compile-artifacts/cuda in the weights folder
ARTIFACTS_DIR = "compile-artifacts"  # artifacts.py's, here without importing torch
_configured: tuple | None = None  # the arguments of the call that set this process's caches


def use_jit_caches(cache_dir: str, weights: str | Path | None) -> None:
    """Point this process's JIT caches at `cache_dir` (config; empty: their defaults) and seed the driver's from the
    one shipped in `weights` (a local folder, or None). The config wins over the environment: importing torch already
    sets TORCHINDUCTOR_CACHE_DIR to its /tmp default, so a default could not be told apart."""
    global _configured
    if _configured == (cache_dir, str(weights)):
        return
    _configured = (cache_dir, str(weights))
    caches = {}
    if cache_dir:
        cache_dir = os.path.abspath(cache_dir)  # load_engine's steps run from / (fixed_cwd)
        caches = {variable: os.path.join(cache_dir, sub) for variable, sub in (
            ("TORCH_EXTENSIONS_DIR", "torch_extensions"), ("TORCHINDUCTOR_CACHE_DIR", "inductor"),
            ("TRITON_CACHE_DIR", "triton"), ("CUDA_CACHE_PATH", DRIVER_CACHE))}
    shipped = Path(weights, ARTIFACTS_DIR, DRIVER_CACHE) if weights is not None else None
    if shipped is not None and shipped.is_dir():
        target = Path(caches.get("CUDA_CACHE_PATH") or tempfile.mkdtemp(prefix="sd-cuda-cache-"))
        if not target.is_dir() or not any(target.iterdir()):
            shutil.copytree(shipped, target, dirs_exist_ok=True)
            logger.info("CUDA driver JIT cache: %s, a copy of the one shipped with the packages", target)
        caches["CUDA_CACHE_PATH"] = str(target)
    os.environ.update(caches)
    if caches:
        logger.info("JIT caches: %s", caches)


@contextmanager
def fixed_cwd():
    """Run the block from / (then back): the driver's cache entries depend on the working directory (module doc)."""
    previous = os.getcwd()
    os.chdir("/")
    try:
        yield
    finally:
        os.chdir(previous)
