"""Where a worker's just-in-time caches live: DeepSpeed's built CUDA ops, Inductor's and Triton's kernels, and the
CUDA driver's JIT cache (CUDA_CACHE_PATH: the machine code the driver makes from PTX at run time, 2.6-2.8 MB for an
SD 1.5 start from AOT packages).

What the driver's cache gives a start from AOT packages (aot.py), measured on H100s (SD 1.5, 4 sizes, batchSize 8,
bench/results/h100-sd15-2026-12-07-drivercache.txt): in-process, 16.2-19.4 s to ready with the cache an earlier start
filled (or a copy of it) against 22.7-25.6 s with an empty one (the optimize step, where each package runs once,
2.8-3.2 s instead of 6.5-8.4 s); through TorchServe, a restart on the cache_dir the first start filled took 28.0 s
against 32.6 s. Its entries depend on the process's working directory (one control start from another folder
missed: 22.3 s), so load_engine runs its optimize and warm-up steps, and Engine.generate each call, from /
(fixed_cwd): a TorchServe worker's is the model's folder, a new temporary one at each start of a MAR.

Where the driver's cache goes: <cache_dir>/cuda when the config sets `cache_dir` (one persistent folder for all of
them), else CUDA_CACHE_PATH as the environment has it, else (with a shipped cache) a temporary folder removed at exit.
compile-artifacts/cuda in the weights folder (or model.zip) is the driver's cache that scripts/compile_artifacts.py
--aot --check filled with its fresh start from the packages, shipped beside them; a worker copies it into its driver
cache folder when that is empty, each file checked against the weights' sha256 manifest first (a mismatch: not used,
and the weights' own check then fails the load; a copy that fails is logged and skipped).

The driver reads CUDA_CACHE_PATH as it initializes, and importing diffusers initializes it (its torch_utils picks
a default device at import: torch.accelerator.is_available, cuInit). So the fronts (and compile_artifacts.py,
generate.py) call use_jit_caches first: before the weights' check, beside which diffusers imports in another thread,
and before pick_device. load_engine, which gets a device already, sets only the compile caches. Should the driver
have started before (driver_started: cuInit has run), use_jit_caches logs a warning: the driver then keeps its
default folder (~/.nv/ComputeCache) and never sees the shipped cache. That is what the handler met while it set
the caches after the check: on an H100, its start as a worker runs it (bench/gpu/handler_start.py) took
20.2-21.0 s with the packages' first runs 5.6-5.8 s, against 16.7-19.0 s and 2.7-2.8 s with the caches set first
(bench/results/h100-sd15-2026-12-07-handler-start*).

A driver cache folder that holds anything is kept as it is, the shipped cache not copied over it: with a persistent
`cache_dir`, new packages' shipped cache seeds <cache_dir>/cuda only once that folder is emptied (or another
cache_dir is used); the driver still adds what it compiles.
"""

from __future__ import annotations

import atexit
import ctypes
import logging
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from .artifacts import ARTIFACTS_DIR
from .errors import ModelLoadError
from .loading import checked_files

logger = logging.getLogger(__name__)

DRIVER_CACHE = "cuda"  # the driver's JIT cache: <cache_dir>/cuda, and compile-artifacts/cuda in the weights folder


def compile_caches(cache_dir: str) -> None:
    """Point DeepSpeed's, Inductor's and Triton's caches into `cache_dir` (config; empty: their defaults). The config
    wins over the environment: importing torch already sets TORCHINDUCTOR_CACHE_DIR to its /tmp default, so a default
    could not be told apart."""
    if not cache_dir:
        return
    cache_dir = os.path.abspath(cache_dir)  # load_engine's steps and generate run from / (fixed_cwd)
    caches = {variable: os.path.join(cache_dir, sub) for variable, sub in (
        ("TORCH_EXTENSIONS_DIR", "torch_extensions"), ("TORCHINDUCTOR_CACHE_DIR", "inductor"),
        ("TRITON_CACHE_DIR", "triton"))}
    if any(os.environ.get(variable) != path for variable, path in caches.items()):
        os.environ.update(caches)
        logger.info("JIT caches: %s", caches)


def driver_started() -> bool | None:
    """Whether the CUDA driver has started in this process (cuInit has run: before it, cuDeviceGetCount answers
    CUDA_ERROR_NOT_INITIALIZED, 3); None where there is no CUDA driver."""
    try:
        driver = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return None
    count = ctypes.c_int()
    return driver.cuDeviceGetCount(ctypes.byref(count)) != 3


def use_jit_caches(cache_dir: str, weights: str | Path | None) -> None:
    """Before CUDA starts in the process: the compile caches into `cache_dir`, and the driver's cache (module doc),
    seeded from the one shipped in `weights` (a weights folder or .zip, whose shipped files are checked against its
    manifest first; None: no seeding)."""
    compile_caches(cache_dir)
    if cache_dir:
        _set_driver_cache(os.path.join(os.path.abspath(cache_dir), DRIVER_CACHE))
    elif os.environ.get("CUDA_CACHE_PATH") and not os.path.isabs(os.environ["CUDA_CACHE_PATH"]):
        # one folder whatever the working directory (load_engine's steps and generate run from /: fixed_cwd)
        _set_driver_cache(os.path.abspath(os.environ["CUDA_CACHE_PATH"]))
    if weights is None:
        return
    try:
        shipped = checked_files(Path(weights), f"{ARTIFACTS_DIR}/{DRIVER_CACHE}")
    except ModelLoadError as e:  # a front's check of the weights (prepare_weights) then fails the load too
        logger.warning("CUDA driver JIT cache: the shipped one is not used: %s", e)
        return
    if not shipped:
        return
    if "CUDA_CACHE_PATH" not in os.environ:
        temporary = tempfile.mkdtemp(prefix="sd-cuda-cache-")
        atexit.register(shutil.rmtree, temporary, True)
        _set_driver_cache(temporary)
    target = Path(os.environ["CUDA_CACHE_PATH"])
    if target.is_dir() and any(target.iterdir()):
        logger.info("CUDA driver JIT cache: %s (kept; the shipped one is not copied over it)", target)
        return
    try:
        _write_into(shipped, target)
        logger.info("CUDA driver JIT cache: %s, a copy of the one shipped with the packages", target)
    except OSError as e:  # only a start's speed depends on it
        logger.warning("CUDA driver JIT cache: could not copy the shipped one into %s (%s); starting without it",
                       target, e)


def _set_driver_cache(folder: str) -> None:
    os.environ["CUDA_CACHE_PATH"] = folder
    if driver_started():
        logger.warning("CUDA driver JIT cache: the driver started before CUDA_CACHE_PATH was set to %s; it may keep "
                       "its default folder (~/.nv/ComputeCache) for this process", folder)


def _write_into(files: dict[str, bytes], target: Path) -> None:
    """Write `files` (relative path: bytes) into the empty or missing folder `target` through a sibling folder renamed
    into place, so that workers sharing a cache_dir never see half a copy."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        for name, data in files.items():
            (staging / name).parent.mkdir(parents=True, exist_ok=True)
            (staging / name).write_bytes(data)
        try:
            if target.is_dir():
                target.rmdir()
            os.replace(staging, target)
        except OSError:
            if not (target.is_dir() and any(target.iterdir())):
                raise
            # another worker's copy got there first: keep it
    finally:
        shutil.rmtree(staging, ignore_errors=True)


@contextmanager
def fixed_cwd():
    """Run the block from / (then back): the driver's cache entries depend on the working directory (module doc).
    A working directory that was removed meanwhile (a worker's under /tmp, cleaned after days) is not returned to:
    the process stays in /, and the block runs all the same."""
    try:
        previous = os.getcwd()
    except FileNotFoundError:
        previous = None
    os.chdir("/")
    try:
        yield
    finally:
        if previous is not None:
            try:
                os.chdir(previous)
            except OSError:
                logger.warning("the working directory %s is gone; staying in /", previous)
