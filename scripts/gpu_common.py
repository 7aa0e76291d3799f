"""What the GPU tools share: the record header, the random-weight preset folders, timing, parity, result files and
progress. The tools themselves, one job each (docs/development.md shows their command lines):

- gpu_check.py          the DeepSpeed backend through the real TorchServe handler: injected kernels, parity, OOM;
- benchmark.py          the backends side by side in one process (latency, images/s, memory, parity), plus checks;
- compile_artifacts.py  make a model's compile artifacts once and time a fresh start from them;
- serve_bench.py        the real servers (TorchServe, the KServe front) under load on this host's GPUs;
- report.py             committed records in bench/results/ -> the documentation's tables.

What each needs installed on a bare GPU host, and how it is carried there: bench/gpu/README.md and setup.sh.

Heavy packages (torch, the engine) are imported inside the functions that need them, so serve_bench.py, which only
drives servers, can use the light parts without them. Logs and progress bars go to stderr; stdout stays the result.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from datetime import date
from importlib import metadata
from pathlib import Path
from typing import Callable

import numpy as np

log = logging.getLogger(__name__)
PROMPT = "a photo of an astronaut riding a horse on mars"
STACK = ("diffusers", "transformers", "deepspeed")  # moves together with torch (requirements.txt says why)
NO_GPU = 2  # exit code of a GPU-only tool on a machine without CUDA


# Logging and progress ------------------------------------------------------------------------------------------------

class _AboveTheBars(logging.Handler):
    """Writes each log line to stderr above the progress bars instead of through them."""

    def emit(self, record: logging.LogRecord) -> None:
        from tqdm import tqdm

        try:
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # noqa: BLE001 - logging must never take the tool down
            self.handleError(record)


def setup_logging() -> None:
    """INFO to stderr with time and logger name; for the entry points only (library modules never configure it)."""
    handler = _AboveTheBars()
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s: %(message)s"))
    logging.basicConfig(level=logging.INFO, handlers=[handler])


def progress(total: int, desc: str, unit: str = "step"):
    """A tqdm bar on stderr for long work (stdout stays the JSON): `with progress(n, "bench") as bar: ...;
    bar.set_postfix_str(what); ...; bar.update()`."""
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, dynamic_ncols=True)


def cuda_available() -> bool:
    """Whether a CUDA GPU is here; says so on stderr when not (the tool then exits NO_GPU)."""
    import torch

    if not torch.cuda.is_available():
        print("no CUDA GPU", file=sys.stderr)
        return False
    return True


# The record header -------------------------------------------------------------------------------------------------

def versions(*extra: str) -> dict:
    """torch (with its build tag, e.g. 2.11.0+cu130), the CUDA it was built for, and the installed versions of the
    packages that move with it plus `extra` ones (None where one is not installed)."""
    import torch

    found = {"torch": torch.__version__, "cuda": torch.version.cuda}
    for name in STACK + extra:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


def gpu_name(device="cuda:0") -> str:
    """The device's name as CUDA reports it (e.g. "NVIDIA H200"), or "cpu"."""
    import torch

    device = torch.device(device)
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def record_header(device="cuda:0") -> dict:
    """What every GPU record says about where it was made: the GPU's name and the software stack's versions."""
    return {"gpu": gpu_name(device), **versions()}


# Weights and requests ----------------------------------------------------------------------------------------------

def preset_weights(preset: str, folder: Path | str | None = None, device: str = "cuda") -> Path:
    """The random-weight diffusers folder of an architecture preset (sd15, sd21, sdxl; float16, seed 0): built on
    first use, reused after. The default folder, /tmp/bench-weights-<preset>, is shared by the GPU tools and
    tests/test_gpu.py, so one machine builds each preset once. Random weights run at the speed of real ones."""
    folder = Path(folder or f"/tmp/bench-weights-{preset}")
    if not (folder / "model_index.json").is_file():
        import torch

        from sd_engine.random_models import save_pipeline

        start = time.perf_counter()
        log.info("building the %s architecture with random weights in %s (%s) ...", preset, folder, device)
        save_pipeline(preset, folder, seed=0, device=device, dtype=torch.float16)
        log.info("built %s in %.0f s", folder, time.perf_counter() - start)
    return folder


def requests_for(batch: int, steps: int, size: int, guidance: float = 7.5) -> list:
    """`batch` square requests, each with its own prompt and seed (1000, 1001, ...), the same on every run."""
    from sd_engine.requests import GenerationRequest

    return [GenerationRequest(prompt=f"{PROMPT}, take {i}", negative_prompt=None, num_inference_steps=steps,
                              guidance_scale=guidance, height=size, width=size, seed=1000 + i) for i in range(batch)]


# Timing and memory -------------------------------------------------------------------------------------------------

def timed_runs(call: Callable[[], object], runs: int, warmup: int = 0) -> list[float]:
    """Seconds of each of `runs` calls after `warmup` untimed ones (which may compile or capture graphs). On a GPU each
    is timed between two CUDA synchronizations, so the work it queued counts. Callers report the median or the best."""
    import torch

    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    for _ in range(warmup):
        call()
    times = []
    for _ in range(runs):
        sync()
        start = time.perf_counter()
        call()
        sync()
        times.append(time.perf_counter() - start)
    return times


def free() -> None:
    """Give the GPU memory of dropped engines back before the next one loads."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# Parity ------------------------------------------------------------------------------------------------------------

def pixels(results) -> list[np.ndarray]:
    """The engine's results as [0, 1] float64 arrays; a failed generation raises with its error."""
    from sd_engine.engine import GenerationResult

    for r in results:
        if not isinstance(r, GenerationResult):
            raise RuntimeError(f"generation failed: {r}")
    return [np.asarray(r.image, dtype=np.float64) / 255.0 for r in results]


def rmse(images, references) -> float:
    """The worst per-image RMSE of `images` against `references` (same order), on [0, 1] pixels."""
    return max(float(np.sqrt(np.mean((a - b) ** 2))) for a, b in zip(images, references))


def nan_pixels(images) -> int:
    return int(sum(np.isnan(i).sum() for i in images))


# Result files ------------------------------------------------------------------------------------------------------

def result_stem(gpu: str, preset: str, *parts: str | None) -> str:
    """How bench/results/ names a run: <gpu>-<preset>-<date>[-<part>...], e.g. h200-sdxl-2026-12-02-ladder."""
    short = gpu.replace("NVIDIA ", "").split()[0].lower()
    return "-".join([short, preset, date.today().isoformat(), *filter(None, parts)])


def json_saver(path: Path | None, record: dict, indent: int = 1, then: Callable[[], None] | None = None):
    """A save() to call after every step: rewrites `path` (when given) with `record` as it stands, then calls `then`
    (e.g. a plot), so a run cut short keeps what it measured."""
    def save() -> None:
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(record, indent=indent) + "\n")
        if then is not None:
            then()
    return save


def pyplot():
    """matplotlib's pyplot on the file-only backend, or None when matplotlib is not installed."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
