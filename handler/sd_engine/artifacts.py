"""Compile artifacts: what torch.compile built (Inductor's compiled graphs, AOTAutograd's, Triton's kernels), saved
once per GPU type and software stack, shipped with the weights, and loaded by a new worker before its warm-up, which
then finds the work done instead of compiling (torch's portable cache artifacts, `torch.compiler.save_cache_artifacts`
and `load_cache_artifacts`).

They live in the weights folder under `compile-artifacts/`: one `<platform>.bin` per platform and `index.json`
describing each (torch, Triton, CUDA, GPU name and compute capability; on a CPU its instruction set). A worker loads
the one whose description equals its own and logs it; with none matching it compiles as usual and logs one line saying
what differs. No description holds a device index. There is one file per platform, made for one config's sizes and
batch sizes; making it again replaces it. Being inside the weights folder they are covered by the package's
sha256 manifest: a changed file refuses the model (they are code the worker runs). scripts/compile_artifacts.py makes
them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

ARTIFACTS_DIR = "compile-artifacts"
INDEX = "index.json"


def platform(device: torch.device) -> dict:
    """What compiled code depends on, for `device`: versions and the GPU's kind, never its index."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    info = {"torch": torch.__version__, "triton": triton_version}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(device=props.name, capability=f"{props.major}.{props.minor}", cuda=torch.version.cuda)
    else:
        info.update(device=device.type, capability=torch.backends.cpu.get_cpu_capability(), cuda=None)
    return info


def file_name(info: dict) -> str:
    digest = hashlib.sha256(json.dumps(info, sort_keys=True).encode()).hexdigest()[:12]
    readable = re.sub(r"[^A-Za-z0-9.+-]+", "-", f"{info['device']}-{info['capability']}-torch{info['torch']}")
    return f"{readable}-{digest}.bin"


def read_index(folder: Path) -> dict[str, dict]:
    try:
        index = json.loads((folder / INDEX).read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        logger.warning("compile artifacts: %s is unreadable (%s); ignoring it", folder / INDEX, e)
        return {}
    return index if isinstance(index, dict) else {}


def load_compile_artifacts(folder: Path, device: torch.device) -> dict | None:
    """Load the artifacts made for this platform, if `folder` has them, into the local compile caches. Returns what
    was loaded ({"file", "bytes", "load_s"}), or None with one log line saying why not."""
    index = read_index(folder)
    if not index:
        logger.info("compile artifacts: none in %s; compiling at warm-up", folder)
        return None
    mine = platform(device)
    for name, info in index.items():
        if info == mine:
            start = time.perf_counter()
            try:
                data = (folder / name).read_bytes()
                if torch.compiler.load_cache_artifacts(data) is None:  # torch logs why (e.g. a bad checksum)
                    raise ValueError("torch could not read them")
            except Exception as e:  # noqa: BLE001 - a bad artifact costs a compile, never the worker
                logger.warning("compile artifacts: %s could not be loaded (%s: %s); compiling at warm-up", name,
                               type(e).__name__, e)
                return None
            seconds = time.perf_counter() - start
            logger.info("compile artifacts: loaded %s (%.1f MB) in %.1f s", name, len(data) / 2**20, seconds)
            return {"file": name, "bytes": len(data), "load_s": seconds}
    differences = {name: {key: info.get(key) for key in mine if info.get(key) != mine[key]}
                   for name, info in index.items() if isinstance(info, dict)}
    logger.info("compile artifacts: none of the %d in %s were made for this worker (%s); compiling at warm-up. "
                "They differ in: %s", len(index), folder, _describe(mine), differences)
    return None


def save_compile_artifacts(folder: Path, device: torch.device) -> Path:
    """Write what torch.compile built in this process as this platform's artifacts, and list them in the index."""
    saved = torch.compiler.save_cache_artifacts()
    if saved is None:
        raise RuntimeError("torch.compile built nothing in this process: nothing to save")
    data, _ = saved
    info = platform(device)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / file_name(info)
    partial = path.with_name(path.name + ".partial")  # (replaced in one step: a write cut short leaves no file)
    partial.write_bytes(data)
    partial.replace(path)
    index = read_index(folder)
    index[path.name] = info
    (folder / INDEX).write_text(json.dumps(index, indent=1, sort_keys=True) + "\n")
    logger.info("compile artifacts: wrote %s (%.1f MB) for %s", path, len(data) / 2**20, _describe(info))
    return path


def _describe(info: dict) -> str:
    return ", ".join(f"{key} {value}" for key, value in info.items() if value is not None)
