"""Finding and loading the weights: a diffusers folder, or a `model.zip` of one shipped inside the MAR.

A zip is extracted once per model dir, next to the zip, under a file lock so that several workers sharing the model dir
do not race; a later worker (or restart) reuses the finished extraction. Extraction refuses entries that would land
outside the target folder (absolute paths, `..`), symlinks, and archives whose uncompressed size is absurd.

scripts/package_model.py writes a manifest (sha256 of every file) into the weights it packages; a folder that has one
is checked against it (once per extraction for a zip, at every load for a folder), so a truncated copy, a swapped file
or a stray extra file fails the load with the file's name. checked_files reads and checks the same way a few small
files (the CUDA driver's shipped cache: jit_caches.py) before that check of the whole, from a folder or a zip.
"""

from __future__ import annotations

import fcntl
import gc
import hashlib
import json
import logging
import os
import shutil
import stat
import threading
import zipfile
import zlib
from contextlib import contextmanager
from pathlib import Path, PurePosixPath

from .errors import ModelLoadError

logger = logging.getLogger(__name__)

MAX_UNCOMPRESSED_BYTES = 64 * 2**30  # SDXL fp32 is ~14 GB; anything near this is not a diffusers folder.
DONE_MARKER = ".extracted"
MANIFEST = "sd-weights-manifest.json"


@contextmanager
def collector_paused():
    """Python's cyclic garbage collector off while the weights are checked and the imports run beside them, then one
    collection. The imports make about 400,000 objects that the collector tracks, and it walked them again in each of
    its 7 full collections during them (bench/results/cpu-2026-12-07-gc.txt). Only there: load, optimize and warm-up
    (which may compile for minutes, making cyclic garbage that could hold GPU memory) run with it on. A use that finds
    the collector off leaves it off."""
    if not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        try:
            gc.collect()  # what the imports left, once
        finally:
            gc.enable()


def file_digests(folder: Path, progress=None) -> dict[str, str]:
    """sha256 of every file below `folder` (relative POSIX paths), leaving out the manifest and our marker.
    `progress`: called with the bytes read after each chunk (e.g. a tqdm bar's update)."""
    digests = {}
    for path in sorted(Path(folder).rglob("*")):
        name = path.relative_to(folder).as_posix()
        if path.is_file() and name not in (MANIFEST, DONE_MARKER):
            digest = hashlib.sha256()
            with open(path, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 22), b""):
                    digest.update(chunk)
                    if progress:
                        progress(len(chunk))
            digests[name] = digest.hexdigest()
    return digests


def verify_manifest(folder: Path) -> None:
    """Check `folder` against its manifest, if it has one; raise ModelLoadError naming the first mismatch."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        logger.warning("weights in %s have no %s: integrity not checked", folder, MANIFEST)
        return
    try:
        expected = json.loads(path.read_text())["sha256"]
    except (ValueError, KeyError, TypeError) as e:
        raise ModelLoadError(f"{MANIFEST} in {folder} is unreadable: {type(e).__name__}: {e}") from e
    actual = file_digests(Path(folder))
    match_manifest(expected, actual)
    logger.info("weights match %s (%d files)", MANIFEST, len(actual))


def match_manifest(expected: dict, actual: dict[str, str]) -> None:
    """Raise ModelLoadError naming the first file (by name) the manifest's digests `expected` lists but `actual` lacks,
    or that `actual` has but the manifest does not list, or whose sha256 differs."""
    for name in sorted(set(expected) | set(actual)):
        if name not in actual:
            raise ModelLoadError(f"weights file {name!r} listed in {MANIFEST} is missing")
        if name not in expected:
            raise ModelLoadError(f"weights file {name!r} is not listed in {MANIFEST}")
        if actual[name] != expected[name]:
            raise ModelLoadError(f"weights file {name!r} does not match its sha256 in {MANIFEST}")


def prepare_model_dir(path: str | Path) -> Path:
    """A packaged model as a folder: package_model.py's --no-archive folder as it is, a .mar extracted once next to
    it (for fronts other than TorchServe, which extracts its own)."""
    path = Path(path)
    if path.is_dir():
        return path
    if path.is_file() and path.suffix == ".mar":
        return extract_zip(path, path.with_suffix(""))
    raise ModelLoadError(f"{path} is neither a packaged model folder nor a .mar file")


def model_config(model_dir: str | Path) -> dict:
    """The model-config.yaml a packaged model folder ships (its MAR-INF/MANIFEST.json names it); {} without one."""
    import yaml

    manifest_path = Path(model_dir) / "MAR-INF" / "MANIFEST.json"
    try:
        name = json.loads(manifest_path.read_text())["model"].get("configFile")
        return (yaml.safe_load((Path(model_dir) / name).read_text()) or {}) if name else {}
    except (OSError, ValueError, KeyError, TypeError, yaml.YAMLError) as e:
        raise ModelLoadError(f"{manifest_path} or the config file it names is unreadable: {type(e).__name__}: {e}") \
            from e


def weights_source(model_dir: str | Path, weights: str) -> Path:
    """The folder or .zip file the `weights` config value names, resolved against the model dir; not checked yet."""
    model_dir = Path(model_dir).resolve()
    path = Path(weights) if Path(weights).is_absolute() else model_dir / weights
    if path.is_dir() or (path.is_file() and path.suffix == ".zip"):
        return path
    raise ModelLoadError(f"handler.weights: {weights!r} is neither a folder nor a .zip file in {model_dir}")


def checked_files(source: Path, prefix: str, max_bytes: int = 256 << 20) -> dict[str, bytes]:
    """The files below the folder `prefix` of a weights folder or .zip (names relative to `prefix`; at most
    `max_bytes` in all), read ahead of prepare_weights' check of the whole and checked as it checks them when there is
    a manifest: a file it does not list, lists but is missing, or whose sha256 differs raises ModelLoadError naming
    the file. {} when there are none."""
    source = Path(source)
    try:
        files, manifest = (_folder_files if source.is_dir() else _zip_files)(source, prefix, max_bytes)
        expected = json.loads(manifest)["sha256"] if manifest is not None else None
        if expected is not None and not isinstance(expected, dict):
            raise TypeError("its sha256 entry is not a mapping")
    except (OSError, ValueError, KeyError, TypeError, EOFError, zlib.error, zipfile.BadZipFile, RuntimeError,
            NotImplementedError) as e:  # unreadable, corrupt or truncated, encrypted or unsupported compression
        raise ModelLoadError(f"{source.name}: {prefix} could not be read: {type(e).__name__}: {e}") from e
    if expected is not None:
        match_manifest({name: digest for name, digest in expected.items() if name.startswith(prefix + "/")},
                       {f"{prefix}/{name}": hashlib.sha256(data).hexdigest() for name, data in files.items()})
    return files


def _folder_files(source: Path, prefix: str, max_bytes: int) -> tuple[dict[str, bytes], bytes | None]:
    base, files, total = source / prefix, {}, 0
    for path in sorted(base.rglob("*")) if base.is_dir() else ():
        if path.is_file():
            total += path.stat().st_size
            if total > max_bytes:
                raise ModelLoadError(f"{source.name}: {prefix} holds more than {max_bytes} bytes")
            files[path.relative_to(base).as_posix()] = path.read_bytes()
    return files, (source / MANIFEST).read_bytes() if (source / MANIFEST).is_file() else None


def _zip_files(source: Path, prefix: str, max_bytes: int) -> tuple[dict[str, bytes], bytes | None]:
    files, total = {}, 0
    with zipfile.ZipFile(source) as archive:
        for info in archive.infolist():
            if info.is_dir() or not info.filename.startswith(prefix + "/"):
                continue
            name = PurePosixPath(info.filename.replace("\\", "/")).relative_to(prefix)
            if ".." in name.parts:
                raise ModelLoadError(f"{source.name} entry {info.filename!r} would be written outside {prefix}")
            total += info.file_size
            if total > max_bytes:
                raise ModelLoadError(f"{source.name}: {prefix} holds more than {max_bytes} bytes")
            files[name.as_posix()] = archive.read(info)  # zipfile checks each entry's CRC
        return files, archive.read(MANIFEST) if MANIFEST in archive.namelist() else None


def prepare_weights(model_dir: str | Path, weights: str) -> Path:
    """Resolve the `weights` config value against the model dir and return a local diffusers folder."""
    path = weights_source(model_dir, weights)
    folder = path if path.is_dir() else path.with_suffix("")
    # Checking the weights (sha256, about 1 s per 1.3 GB; a zip's extraction the first time) overlaps with importing
    # diffusers and the pipeline's modules (8-13 s on the GPU hosts), which load_pipeline would do next anyway:
    # hashlib and zlib release the GIL. Through TorchServe on an H100 (SD 1.5) the check ended 3.5 s before the
    # import (bench/results/h100-sd15-2026-12-06-serving-aot.log).
    with collector_paused():
        importing = threading.Thread(target=_import_pipeline, args=(folder,), name="import-diffusers", daemon=True)
        importing.start()
        try:
            if path.is_dir():
                verify_manifest(path)
                return path
            return extract_zip(path, folder)
        finally:
            importing.join()


def extract_zip(zip_path: Path, target: Path, max_bytes: int = MAX_UNCOMPRESSED_BYTES) -> Path:
    """Extract `zip_path` into `target` once; later calls return the finished folder without touching it."""
    stamp = f"{zip_path.stat().st_size}:{zip_path.stat().st_mtime_ns}"
    with open(zip_path.parent / f".{zip_path.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        marker = target / DONE_MARKER
        if marker.is_file() and marker.read_text() == stamp:
            logger.info("weights already extracted in %s", target)
            return target
        staging = target.with_name(f".{target.name}.partial")
        shutil.rmtree(staging, ignore_errors=True)
        shutil.rmtree(target, ignore_errors=True)
        try:
            with zipfile.ZipFile(zip_path) as archive:
                members = _checked_members(archive, staging, max_bytes)
                for info in members:
                    archive.extract(info, staging)
            verify_manifest(staging)
        except ModelLoadError:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        except (zipfile.BadZipFile, OSError, RuntimeError, NotImplementedError, EOFError, zlib.error) as e:
            # Corrupt or truncated archive, clashing entries, encrypted or unsupported compression, full disk.
            shutil.rmtree(staging, ignore_errors=True)
            raise ModelLoadError(f"{zip_path.name} could not be extracted: {type(e).__name__}: {e}") from e
        (staging / DONE_MARKER).write_text(stamp)
        os.replace(staging, target)
        logger.info("extracted %d files from %s into %s", len(members), zip_path.name, target)
        return target


def _checked_members(archive: zipfile.ZipFile, staging: Path, max_bytes: int) -> list[zipfile.ZipInfo]:
    root = staging.resolve()
    total = 0
    members = archive.infolist()
    for info in members:
        name = info.filename
        parts = PurePosixPath(name.replace("\\", "/")).parts
        if name.startswith(("/", "\\")) or (parts and parts[0].endswith(":")) or ".." in parts:
            raise ModelLoadError(f"model.zip entry {name!r} would be written outside the model folder")
        if stat.S_ISLNK(info.external_attr >> 16):
            raise ModelLoadError(f"model.zip entry {name!r} is a symbolic link; links are not allowed")
        if not (root / name).resolve().is_relative_to(root):
            raise ModelLoadError(f"model.zip entry {name!r} would be written outside the model folder")
        total += info.file_size
        if total > max_bytes:
            raise ModelLoadError(f"model.zip expands to more than {max_bytes} bytes; refusing to extract it")
    return members


def _import_pipeline(folder: Path) -> None:
    """diffusers, then the module of the pipeline class `folder` names (its text encoders' come with it), where
    DiffusionPipeline.from_pretrained would import them (a zip extracted for the first time may not name it yet)."""
    try:
        import diffusers

        name = json.loads((folder / "model_index.json").read_text()).get("_class_name") \
            if (folder / "model_index.json").is_file() else None
        if isinstance(name, str):
            getattr(diffusers, name, None)
    except Exception as e:  # noqa: BLE001 - load_pipeline imports it again and reports what is wrong
        logger.debug("importing diffusers beside the weights' check failed: %s: %s", type(e).__name__, e)


def load_pipeline(source: str | Path, torch_dtype):
    """Load a diffusers pipeline from a local folder (or, for scripts, a hub id) in the given dtype, on the CPU."""
    from diffusers import DiffusionPipeline

    try:
        pipe = DiffusionPipeline.from_pretrained(str(source), dtype=torch_dtype)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"could not load a diffusers pipeline from {source}: {e}") from e
    missing = [name for name in ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
               if getattr(pipe, name, None) is None]
    if missing:
        raise ModelLoadError(f"{source} is not a Stable Diffusion pipeline: it has no {', '.join(missing)}")
    return pipe
