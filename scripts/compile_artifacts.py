#!/usr/bin/env python3
"""Make the compile artifacts of a model once, on a GPU host of the kind that will serve it, and ship them.

Loads the engine as a worker would (the `handler:` block of --config, compile forced on, warm-up of every listed size
at batch 1 and --batch-size) with empty compile caches, so that everything torch.compile builds is built in this
process, then saves it into WEIGHTS/compile-artifacts/ (sd_engine/artifacts.py: one file per GPU type and software
stack, described in index.json). If WEIGHTS has a sha256 manifest (a packaged no-archive folder), the new files are
added to it; otherwise package the folder afterwards (scripts/package_model.py), which ships them inside the MAR.

--aot makes AOTInductor packages of the UNet and the VAE decoder instead (sd_engine/aot.py), one per listed size,
built by --jobs processes side by side: a worker loads them instead of tracing, where torch.compile's artifacts still
leave it the tracing (45-62 s measured on an H200). Sizes whose packages are already there and fit are not built
again, so a run cut short (a time limit, a lost machine) is finished by running it again; to rebuild, delete
WEIGHTS/compile-artifacts/aot. Each size's packages are then loaded in a fresh process, as a worker loads them, and
run against the plain modules (batch 1, 2 and the largest, and from a CUDA graph) before they are indexed: a size
that fails is named, left out and the exit code is 1, while the sizes built are kept (a worker runs the one left out
uncompiled). A float32 VAE decoder (SDXL's) gets no package (aot.modules says why): this process compiles it with
torch.compile while the children build (compile_unpackaged) and saves that as compile artifacts beside the packages,
from which a worker's warm-up traces it without compiling.

--check then starts a fresh process with empty caches that loads the engine with the artifacts, and records both
start-up times, and with --time-sizes the batch-1 latency at each listed size (and one unlisted), as JSON.

    python scripts/compile_artifacts.py /models/sd15 --config config/model-config.yaml --check --json out.json

Progress bars and logs go to stderr, the record to stdout. Timing and the record header are gpu_common.py's, shared
with the other GPU tools. Exit codes: 0 done; 1 failed; 2 bad arguments or config.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import yaml

from gpu_common import PROMPT, json_saver, progress, record_header, setup_logging, timed_runs

ROOT = Path(__file__).resolve().parent.parent


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("weights", type=Path, help="diffusers folder the artifacts are made for and stored in")
    parser.add_argument("--config", type=Path, default=ROOT / "config" / "model-config.yaml",
                        help="model-config.yaml: its handler: block and batchSize (default: the GPU config)")
    parser.add_argument("--batch-size", type=int, help="largest batch warmed up (default: the config's batchSize)")
    parser.add_argument("--aot", action="store_true",
                        help="make AOTInductor packages of the UNet and VAE decoder (sd_engine/aot.py: a worker "
                             "loads them instead of compiling or tracing; a float32 decoder under a float16 UNet, "
                             "SDXL's, gets none) instead of torch.compile's cache artifacts")
    parser.add_argument("--jobs", type=int, help="with --aot: sizes built at once, each by a process of its own "
                        "that holds the whole pipeline on the GPU (default: one per 4 usable CPU cores, at most one "
                        "per size)")
    parser.add_argument("--build-timeout", type=float, default=1200,
                        help="with --aot: seconds each of a size's two processes (build, check) may take before it is "
                        "stopped and its size counted as failed (a package whose code hangs on the GPU; default: "
                        "1200, SDXL's sizes took 288-293 s each, 4 side by side on an H100)")
    parser.add_argument("--check", action="store_true", help="then time a fresh start that loads the artifacts")
    parser.add_argument("--time-sizes", action="store_true", help="with --check: batch-1 latency at each size")
    parser.add_argument("--time-batches", action="store_true",
                        help="with --check: what warming up each batch size between 1 and --batch-size would add, and "
                             "its latency against the full batch's")
    parser.add_argument("--json", type=Path, help="write the record here too")
    parser.add_argument("--preset", help="the model's name in the record (e.g. sd15, sdxl; default: the folder's)")
    parser.add_argument("--load-only", action="store_true", help=argparse.SUPPRESS)  # the --check child
    parser.add_argument("--driver-cache", help=argparse.SUPPRESS)  # the --aot --check child: the cache it fills
    parser.add_argument("--build-size", help=argparse.SUPPRESS)  # an --aot child: the latent size HxW it builds
    parser.add_argument("--check-size", help=argparse.SUPPRESS)  # an --aot child: the size HxW whose packages it checks
    parser.add_argument("--await-role", action="store_true", help=argparse.SUPPRESS)  # a pre-started --aot child
    args = parser.parse_args(argv)
    setup_logging()
    if args.jobs is not None and args.jobs < 1:
        parser.error(f"--jobs must be at least 1, not {args.jobs}")
    if not 0 < args.build_timeout < float("inf"):  # (nan fails this too)
        parser.error(f"--build-timeout must be a positive number of seconds, not {args.build_timeout:g}")
    if not (args.weights / "model_index.json").is_file():
        parser.error(f"{args.weights} is not a diffusers folder (no model_index.json)")
    model_config = yaml.safe_load(args.config.read_text()) or {}
    batch_size = args.batch_size or int(model_config.get("batchSize", 1))

    # Empty caches: everything is compiled (and so recorded) in this process, or, in the --check child, can only
    # come from the artifacts.
    cache = tempfile.mkdtemp(prefix="sd-compile-cache-")
    block = dict(model_config.get("handler") or {}, compile=True, cache_dir=cache)
    block.pop("weights", None)
    from sd_engine.config import EngineConfig
    from sd_engine.errors import ConfigError

    try:
        config = EngineConfig.from_mapping(block)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.aot and (config.backend not in ("eager", "auto") or config.fuse_qkv or config.fp8):
        print("error: --aot packages are used by the eager backend without fuse_qkv and fp8 only; the config has "
              f"handler.backend {config.backend}, fuse_qkv {config.fuse_qkv}, fp8 {config.fp8}", file=sys.stderr)
        return 2
    if args.await_role:  # imports first, while the parent loads or a size builds; then its role from the parent
        from diffusers import DiffusionPipeline  # noqa: F401
        import torch._inductor.package  # noqa: F401 - building and loading packages
        import torch.export  # noqa: F401

        role = sys.stdin.readline().split()
        if len(role) != 2 or role[0] not in ("build", "check"):
            return 0  # not needed: the parent closed stdin
        setattr(args, f"{role[0]}_size", role[1])
    if args.build_size:
        return build_one_size(args, config, batch_size)
    if args.check_size:
        return check_one_size(args, config, batch_size)
    if not args.load_only:
        return make_artifacts(args, config, batch_size)
    # The --check child: a fresh process whose compiled graphs can only come from the artifacts.
    engine, record, ready_s = load(args, config, batch_size)
    record["ready_warm_s"] = ready_s
    record["compile_cache"] = compile_counters()
    if args.time_sizes:
        record["latency_s"] = size_latencies(engine)
        record["best_batch"] = batch_throughput(engine, batch_size)
    if args.time_batches:
        record["batch_sizes"] = batch_sizes(engine, batch_size)
    print(json.dumps(record))
    return 0


def load(args, config, batch_size: int):
    """The engine as a worker loads it, the record of how it started, and the seconds it took."""
    from sd_engine.engine import load_engine, pick_device
    from sd_engine.jit_caches import use_jit_caches

    # As a front does, before CUDA starts; with --driver-cache this start fills the folder given instead (the build's
    # shipped cache, or run.sh jitcache's), unseeded.
    use_jit_caches(config.cache_dir, None if args.driver_cache else args.weights)
    if args.driver_cache:
        os.environ["CUDA_CACHE_PATH"] = os.path.abspath(args.driver_cache)
    device = pick_device(0)
    start = time.perf_counter()
    engine = load_engine(config, args.weights, device, batch_size)
    ready_s = round(time.perf_counter() - start, 1)
    started = {**engine.timings, **engine.startup}
    record = {"preset": args.preset or args.weights.name, **record_header(device), "weights": str(args.weights),
              "batch_size": batch_size, "device": str(device), "sizes": [list(size) for size in engine.rules.sizes],
              **{k: round(v, 2) if isinstance(v, float) else v for k, v in started.items()}}
    return engine, record, ready_s


def make_artifacts(args, config, batch_size: int) -> int:
    """Compile everything in this process, save the artifacts, and with --check time a fresh start from them."""
    from sd_engine.aot import AOT_DIR
    from sd_engine.artifacts import ARTIFACTS_DIR, save_compile_artifacts
    from sd_engine.jit_caches import DRIVER_CACHE

    with progress(2 + args.check, "compile_artifacts") as bar:
        if args.aot:
            bar.set_postfix_str("export and AOT-compile the UNet (and VAE decoder), one process per size")
            start = time.perf_counter()
            record, entries = build_packages_in_parallel(args, config, batch_size)
            if record.get("aot_failed"):  # the sizes built are kept and a worker uses them; the others run uncompiled
                print(f"error: building the AOT packages failed for {', '.join(record['aot_failed'])} (the logs are "
                      "above); the sizes built are kept: run again to retry the others", file=sys.stderr)
                if not entries and not record["aot_reused"]:
                    # (compile_unpackaged may have saved artifacts: a packaged folder's manifest must list them)
                    add_to_manifest(args.weights, args.weights / ARTIFACTS_DIR)
                    print(json.dumps(record, indent=1))
                    json_saver(args.json, record)()
                    return 1
            record["build_s"] = round(time.perf_counter() - start, 1)  # what making them took, loads included
            if not record["aot_reused"] and not record.get("aot_failed"):  # a whole build from nothing
                record["ready_cold_s"] = record["build_s"]
            record["aot"] = {name: round((args.weights / ARTIFACTS_DIR / AOT_DIR / name).stat().st_size / 2**20, 1)
                             for name in entries}
        else:
            bar.set_postfix_str("load, compile and warm up every size")
            engine, record, ready_s = load(args, config, batch_size)
            record["ready_cold_s"] = ready_s
        save = json_saver(args.json, record)
        save()
        bar.update()
        if args.aot:  # the packages, and torch.compile's artifacts of what they leave out (compile_unpackaged)
            add_to_manifest(args.weights, args.weights / ARTIFACTS_DIR)
        else:
            bar.set_postfix_str("save the artifacts")
            path = save_compile_artifacts(args.weights / ARTIFACTS_DIR, engine.device)
            record["artifact"] = {"file": path.name, "mb": round(path.stat().st_size / 2**20, 1)}
            add_to_manifest(args.weights, path.parent)
        save()
        bar.update()
        if args.check:
            bar.set_postfix_str("a fresh start from the artifacts")
            # With --aot, the CUDA driver's JIT cache this start fills ships beside the packages (jit_caches.py): made
            # again from nothing, it holds what such a start needs.
            driver = args.weights / ARTIFACTS_DIR / DRIVER_CACHE
            if args.aot:
                shutil.rmtree(driver, ignore_errors=True)
            child = None
            try:
                child = subprocess.run([sys.executable, __file__, str(args.weights), "--config", str(args.config),
                                        "--batch-size", str(batch_size), "--preset", record["preset"], "--load-only"]
                                       + (["--time-sizes"] if args.time_sizes else [])
                                       + (["--time-batches"] if args.time_batches else [])
                                       + (["--aot", "--driver-cache", str(driver)] if args.aot else []),
                                       stdout=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONUNBUFFERED="1"))
            finally:  # the manifest lists the driver's cache as it is now, none after a failed start (a half one)
                if args.aot:
                    if child is None or child.returncode != 0:
                        shutil.rmtree(driver, ignore_errors=True)
                    add_to_manifest(args.weights, driver)
            bar.update()  # (its log went to stderr as it ran)
            if child.returncode != 0:
                print(f"error: the --check start failed ({child.returncode})", file=sys.stderr)
                return 1
            record["warm"] = json.loads(child.stdout.strip().splitlines()[-1])
            if args.aot and driver.is_dir():
                record["driver_cache_mb"] = round(sum(f.stat().st_size for f in driver.rglob("*") if f.is_file())
                                                  / 2**20, 1)
            save()
            if args.aot and sorted(record["warm"].get("aot", [])) != sorted(record["aot_modules"]):
                print(f"error: the --check start did not use the AOT packages of {record['aot_modules']} (it used "
                      f"{record['warm'].get('aot')}; its log above says why)", file=sys.stderr)
                return 1
            if args.aot and record.get("torch_compiled") and not artifacts_served(record):
                print(f"error: the --check start did not find what it compiled in the compile artifacts saved beside "
                      f"the packages (loaded: {record['warm'].get('artifacts_loaded')}; Inductor's cache: "
                      f"{record['warm'].get('compile_cache')}; the build compiled {record['torch_compiled']}); a "
                      f"file kept from an earlier build is used again: delete {ARTIFACTS_DIR}/"
                      f"{record['torch_compiled'].get('artifact')} and build again", file=sys.stderr)
                return 1
            if args.aot and record["warm"].get("aot_missing") and not record.get("aot_failed"):
                print(f"error: the --check start found no package for {record['warm']['aot_missing']} (its log above "
                      "says why)", file=sys.stderr)
                return 1
    print(json.dumps(record, indent=1))
    return 1 if record.get("aot_failed") or record.get("torch_compile_failed") else 0


class Children:
    """The --aot child processes (this script, one role each: build or check one size), started before they are
    needed: each first imports diffusers and torch's compiler (11-17 s a process on the H100 hosts, where the parent's
    load took 13-14 s and each size's fresh-process check 22-28 s, 20 s of it that import), then waits for its role
    and size on stdin. So the imports run beside the parent's load and the builds instead of after them: `jobs` of
    each role at first, and one more whenever a child takes its role while more sizes are due than children wait.
    TORCHINDUCTOR_COMPILE_THREADS (a build's share of the cores) is read at import, so the build children are started
    again if the number of jobs turns out otherwise."""

    def __init__(self, command: list[str], cpus: int, jobs: int):
        self.command, self.cpus, self.jobs, self.lock = command, cpus, jobs, threading.Lock()
        self.env = self._env(jobs)
        self.waiting: dict[str, list] = {"build": [], "check": []}
        self.due = {"build": jobs, "check": jobs}
        self.running: set[subprocess.Popen] = set()
        self.stopped = False
        for role in self.waiting:
            self.waiting[role] = [self._spawn() for _ in range(jobs)]

    def _env(self, jobs: int) -> dict:
        return dict(os.environ, PYTHONUNBUFFERED="1", TORCHINDUCTOR_COMPILE_THREADS=str(max(1, self.cpus // jobs)))

    def _spawn(self) -> subprocess.Popen:
        return subprocess.Popen(self.command + ["--await-role"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                text=True, env=self.env)

    def plan(self, jobs: int, sizes: int) -> None:
        """Once the parent knows them: `jobs` sizes at a time, `sizes` of each role to run."""
        with self.lock:
            self.due = {"build": sizes, "check": sizes}
            if jobs != self.jobs:
                self.jobs, self.env = jobs, self._env(jobs)
                _kill(self.waiting["build"])
                self.waiting["build"] = []

    def run(self, role: str, size, timeout: float) -> str:
        """The last line the child printed for `role` at latent `size`; RuntimeError when it failed or outlasted
        `timeout` seconds."""
        with self.lock:
            if self.stopped:
                raise RuntimeError(f"{role} not started: this build is being stopped")
            waiting = self.waiting[role]
            process = waiting.pop(0) if waiting else self._spawn()  # the longest waiting: its import is furthest
            self.due[role] -= 1
            if self.due[role] > len(waiting):  # a later size's child imports while this one works
                waiting.append(self._spawn())
            self.running.add(process)
        if self.stopped:  # (stop_running, a signal handler, takes no lock: it may have missed this one)
            process.kill()
        try:
            out, _ = process.communicate(f"{role} {size[0]}x{size[1]}\n", timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill([process])
            raise RuntimeError(f"{role} stopped after {timeout:g} s") from None
        finally:
            with self.lock:
                self.running.discard(process)
        lines = out.strip().splitlines()
        if process.returncode != 0 or not lines:
            raise RuntimeError(f"{role} exit code {process.returncode}")
        return lines[-1]

    def stop_running(self) -> None:
        """The children at work killed (their threads reap them), and no more started: this process is being stopped,
        and they would hold their GPU memory and write packages that a rerun builds again. No lock: a signal handler
        calls this."""
        self.stopped = True
        for process in list(self.running):
            process.kill()

    def stop(self) -> None:
        """The waiting children killed and reaped (they have done nothing yet), and any still at work killed."""
        with self.lock:
            waiting = [process for processes in self.waiting.values() for process in processes]
            self.waiting = {role: [] for role in self.waiting}
        self.stop_running()
        _kill(waiting)


def _kill(processes) -> None:
    for process in processes:
        process.kill()
        process.wait(timeout=60)
        for pipe in (process.stdin, process.stdout):
            pipe.close()


def build_packages_in_parallel(args, config, batch_size: int):
    """The record of the model's load, and the index entries of the AOT packages built for the listed sizes that have
    none yet (a run cut short, e.g. by a time limit, is resumed by running it again), each size built by a child
    process and checked by another (Children), --jobs sizes at a time; the index gains each size's packages as soon
    as they are built and checked. A size whose child fails (its packages differ from the plain modules, or fault, or
    a child outlasts --build-timeout) is named in the record's `aot_failed` and stays out of the index."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    # The children start before this process loads the model, so their number is a guess from the config: right
    # for a build of every size the config lists.
    listed = cpus if config.sizes is None else len({tuple(size) for size in config.sizes}) or 1  # []: the default
    children = Children([sys.executable, __file__, str(args.weights), "--config", str(args.config), "--batch-size",
                         str(batch_size), "--aot"], cpus, max(1, min(listed, args.jobs or cpus // 4)))
    # A `timeout` around this script sends SIGTERM: the children at work go, no more start (the sizes not yet begun
    # fail at once, so the pool's threads end), and the waiting ones go in `finally`.
    signal.signal(signal.SIGTERM, lambda *_: (children.stop_running(), sys.exit(143)))
    try:
        return _build_with(children, args, config, batch_size)
    finally:
        children.stop()


def _build_with(children: Children, args, config, batch_size: int):
    from concurrent.futures import ThreadPoolExecutor, as_completed

    import torch

    from sd_engine.aot import AOT_DIR, MODULES, missing_sizes, modules, size_entries, write_index
    from sd_engine.artifacts import ARTIFACTS_DIR

    engine, record, _ = load_for_export(args, config, batch_size)
    scale = engine.pipe.vae_scale_factor
    sizes = sorted({(h // scale, w // scale) for h, w in engine.rules.sizes})
    todo = missing_sizes(engine.pipe, args.weights / ARTIFACTS_DIR, engine.device, sizes, batch_size)
    # The files each size's child writes (named by what they are made for), to remove a failed size's.
    packaged = modules(engine.pipe)  # (an upcast VAE decoder gets no package: aot.modules)
    files = {size: list(size_entries(engine.pipe, engine.device, size, batch_size)) for size in todo}
    # What the packages leave out is torch.compiled here, beside the children (compile_unpackaged): of this pipeline
    # only the VAE is kept.
    left = [module for module in MODULES if module not in packaged]
    unpackaged = (engine.pipe.vae, [(h // scale, w // scale) for h, w in engine.rules.sizes], engine.pipe.unet.dtype,
                  engine.device) if left else None
    del engine
    gc.collect()  # the pipeline's weights off the GPU before the children load theirs
    torch.cuda.empty_cache()
    jobs = max(1, min(len(todo) or 1, args.jobs or children.cpus // 4))
    children.plan(jobs, len(todo))
    pixels = {size: f"{size[1] * scale}x{size[0] * scale}" for size in sizes}
    if len(todo) < len(sizes):
        print(f"AOT packages for {', '.join(pixels[s] for s in sizes if s not in todo)} are already built and fit; "
              f"building {', '.join(pixels[s] for s in todo) or 'nothing'}", file=sys.stderr)

    def build(size):
        """Built in one process, then checked in a fresh one, as a worker meets them: SDXL's 1152x896 VAE decoder
        package passed every check in the process that built it, then faulted in three fresh ones
        (bench/results/h100-sdxl-2026-12-06-aot-4sizes-checked.log)."""
        try:
            built = json.loads(children.run("build", size, args.build_timeout))
            made = set(built["entries"])
        except (ValueError, TypeError, KeyError):
            raise RuntimeError("build printed no entries") from None
        if made != set(files[size]):  # the check child looks for the names the parent expects, and checks those
            raise RuntimeError(f"build made {sorted(made)}, not {sorted(files[size])}")
        start = time.perf_counter()
        children.run("check", size, args.build_timeout)
        built["check_seconds"] = round(time.perf_counter() - start, 1)
        return built

    entries, seconds, check_seconds, failed = {}, {}, {}, {}  # (failed: the reason, by size)

    def collect(futures):
        """Each size as its build and check end: indexed at once, so a run cut short keeps the sizes finished."""
        for future in as_completed(futures):
            size = futures[future]
            try:
                built = future.result()
            except Exception as e:  # noqa: BLE001 - (RuntimeError from build; anything else is a failed size too)
                failed[size] = str(e) if isinstance(e, RuntimeError) else f"{type(e).__name__}: {e}"
                continue
            write_index(args.weights / ARTIFACTS_DIR, built["entries"])  # kept whatever the other sizes do
            entries.update(built["entries"])
            seconds[size], check_seconds[size] = built["seconds"], built["check_seconds"]
            print(f"AOT packages for {pixels[size]} built in {built['seconds']} s, checked in a fresh process in "
                  f"{built['check_seconds']} s", file=sys.stderr)

    with ThreadPoolExecutor(jobs) as pool:
        collector = threading.Thread(target=collect, args=({pool.submit(build, size): size for size in todo},))
        collector.start()
        if unpackaged:  # meanwhile, in this thread
            try:
                record["torch_compiled"] = compile_unpackaged(*unpackaged, left, config, batch_size,
                                                              args.weights / ARTIFACTS_DIR, reuse=not todo)
            except Exception as e:  # noqa: BLE001 - the packages' builds go on; the exit code says it failed
                record["torch_compile_failed"] = f"{type(e).__name__}: {e}"
                print(f"error: compiling what the packages leave out failed ({record['torch_compile_failed']})",
                      file=sys.stderr)
            finally:
                unpackaged = None
                gc.collect()
                try:  # (after a CUDA fault this raises too: the builds go on)
                    torch.cuda.empty_cache()
                except Exception:  # noqa: BLE001
                    pass
        collector.join()
    # A size the collector did not get to (an error of its own ended it: its traceback is above) failed as well.
    failed.update({size: "not collected" for size in todo if size not in seconds and size not in failed})
    # A failed size's files (written before its check failed or faulted) must not ship with the index's; nothing
    # else is touched (another build, e.g. for another GPU, may be writing beside this one).
    for size in set(todo) - set(seconds):
        for name in files[size]:
            (args.weights / ARTIFACTS_DIR / AOT_DIR / name).unlink(missing_ok=True)
    record["aot_modules"] = list(packaged)
    record["aot_jobs"] = jobs
    record["aot_build_s"] = {pixels[size]: seconds[size] for size in todo if size in seconds}
    record["aot_check_s"] = {pixels[size]: check_seconds[size] for size in todo if size in seconds}
    if failed:
        record["aot_failed"] = sorted(f"{pixels[size]} ({why})" for size, why in failed.items())
    record["aot_reused"] = [pixels[size] for size in sizes if size not in todo]
    return record, entries


def compile_unpackaged(vae, latent_sizes, latent_dtype, device, left: list[str], config, batch_size: int, folder: Path,
                       reuse: bool = False) -> dict:
    """The modules the packages leave out (`left`: an upcast VAE decoder, aot.modules), compiled by torch.compile as a
    worker compiles them (optimize.torch_compiled, called as the pipeline calls it and in engine.warmup's order:
    batch 1 first, then the larger batch, sizes as listed), and saved as the compile artifacts in `folder` that a
    worker loads beside the packages (engine.py), so that its start traces them but compiles nothing. `vae`: as
    load_for_export leaves it (optimized, nothing compiled); `latent_sizes`: the listed sizes' latents, in the
    config's order; `latent_dtype`: the UNet's, in which the pipeline hands the decoder its latents. `reuse` (every
    size's packages were there already): a file of artifacts made for this platform is kept as it is, not made again
    (the --check start then shows whether it holds what a worker compiles). The --aot parent runs this while its
    children build the packages."""
    import torch

    from sd_engine.artifacts import platform, read_index, save_compile_artifacts
    from sd_engine.jit_caches import fixed_cwd
    from sd_engine.optimize import torch_compiled

    if left != ["vae_decode"]:  # (aot.modules leaves out nothing else)
        raise RuntimeError(f"no way to compile {left} here")
    if reuse:
        mine = platform(device)
        made = [name for name, info in read_index(folder).items() if info == mine and (folder / name).is_file()]
        if made:
            print(f"torch.compile: the compile artifacts {made[0]} are there already; kept", file=sys.stderr)
            return {"modules": left, "artifact": made[0], "reused": True}
    start = time.perf_counter()
    before = compile_counters()
    decode = torch_compiled(vae.decode, set(latent_sizes))
    batches = range(1, batch_size + 1) if config.warmup_all_batch_sizes else sorted({1, batch_size})
    with fixed_cwd(), torch.no_grad():  # (as the pipeline calls it: no_grad, latents in the UNet's dtype)
        for batch in batches:
            for height, width in latent_sizes:
                decode(torch.randn(batch, vae.config.latent_channels, height, width, device=device, dtype=latent_dtype),
                       return_dict=False)
    path = save_compile_artifacts(folder, device)
    seconds = round(time.perf_counter() - start, 1)
    counts = compile_counters()
    graphs = sum(counts.get(key, 0) - before.get(key, 0)  # compiled, hit or bypassed
                 for key in ("fxgraph_cache_miss", "fxgraph_cache_hit", "fxgraph_cache_bypass"))
    print(f"torch.compile: {', '.join(left)} compiled for the listed sizes in {seconds} s ({graphs} graphs), saved as "
          f"{path.name}", file=sys.stderr)
    return {"modules": left, "seconds": seconds, "graphs": graphs, "artifact": path.name,
            "mb": round(path.stat().st_size / 2**20, 1)}


def build_one_size(args, config, batch_size: int) -> int:
    """An --aot child: the pipeline of load_for_export, exported and AOT-compiled for one latent size; prints its index
    entries."""
    from sd_engine.aot import build_packages
    from sd_engine.artifacts import ARTIFACTS_DIR

    size = tuple(int(side) for side in args.build_size.split("x"))
    engine, _, _ = load_for_export(args, config, batch_size)
    start = time.perf_counter()
    entries = build_packages(engine.pipe, args.weights / ARTIFACTS_DIR, engine.device, size, batch_size)
    print(json.dumps({"entries": entries, "seconds": round(time.perf_counter() - start, 1)}))
    return 0


def check_one_size(args, config, batch_size: int) -> int:
    """An --aot child, a fresh process: the packages just built for one latent size (named by what they are made for,
    as the building child named them) loaded as a worker loads them and checked against the plain modules
    (aot.validate_packages), before the parent indexes them. One that differs fails this size; one that faults kills
    this process, which fails the size too."""
    from sd_engine.aot import size_entries, validate_packages
    from sd_engine.artifacts import ARTIFACTS_DIR

    size = tuple(int(side) for side in args.check_size.split("x"))
    engine, _, _ = load_for_export(args, config, batch_size)
    pipe, device = engine.pipe, engine.device
    validate_packages(pipe, args.weights / ARTIFACTS_DIR, device, size_entries(pipe, device, size, batch_size),
                      batch_size)
    print("checked")
    return 0


def load_for_export(args, config, batch_size: int):
    """load() of the pipeline as a worker optimizes it (dtype, channels-last, VAE precision) with nothing compiled,
    graphed or warmed up: what AOT packages are described by (the parent) and exported from (a child)."""
    from dataclasses import replace

    return load(args, replace(config, compile=False, cuda_graph=False, warmup=False), batch_size)


def artifacts_served(record: dict) -> bool:
    """Whether the --aot --check start (record["warm"]) found in the compile artifacts every graph torch.compile
    compiled at its warm-up (what the packages leave out, compile_unpackaged): loaded, with as many of Inductor's
    cache hits as the build compiled graphs (at least one, where it kept the artifacts it found), and nothing
    compiled or bypassing the cache."""
    warm, built = record["warm"], record["torch_compiled"]
    cache = warm.get("compile_cache", {})
    hits = cache.get("fxgraph_cache_hit", 0)
    return bool(warm.get("artifacts_loaded")) and not cache.get("fxgraph_cache_miss") and \
        not cache.get("fxgraph_cache_bypass") and hits >= max(1, built.get("graphs", 1))


def compile_counters() -> dict:
    """How the compiled graphs were obtained in this process: Inductor's cache hits and misses (a miss compiled)."""
    from torch._dynamo.utils import counters

    return {key: value for key, value in counters["inductor"].items() if key.startswith("fxgraph_cache")}


def size_latencies(engine) -> dict:
    """Batch-1 latency at each listed size (compiled) and at one unlisted size (the slower path), best of 2."""
    from sd_engine.requests import parse_request

    rules = engine.rules
    h, w = rules.height, rules.width
    unlisted = next(((h2, w2) for h2, w2 in ((h - 64, w), (h + 64, w), (h, w - 64), (h, w + 64), (h + 8, w))
                     if (h2, w2) not in rules.sizes and 64 <= h2 <= rules.max_height and 64 <= w2 <= rules.max_width),
                    None)
    out = {}
    for height, width in list(rules.sizes) + ([unlisted] if unlisted else []):
        request = parse_request({"prompt": PROMPT, "height": height, "width": width, "seed": 0}, rules)
        out[f"{width}x{height}" + ("" if (height, width) in rules.sizes else " (unlisted)")] = round(
            best_of_two(engine, [request]), 3)
    return out


def batch_throughput(engine, batch: int) -> dict:
    """Latency and images per second of one full batch at the default size (best of 2 after one run)."""
    from sd_engine.requests import parse_request

    best = best_of_two(engine, [parse_request({"prompt": PROMPT, "seed": i}, engine.rules) for i in range(batch)])
    return {"batch": batch, "size": f"{engine.rules.width}x{engine.rules.height}", "latency_s": round(best, 3),
            "images_per_s": round(batch / best, 2)}


def batch_sizes(engine, batch: int) -> dict:
    """Per listed size, for each batch the warm-up skips (2..batch-1): what its warm-up would take (a generation of
    warmup_steps steps that captures its graphs, as Engine.warmup runs it), then its latency at the default steps,
    against the full batch's (what serving it padded to the full batch would take)."""
    from sd_engine.requests import GenerationRequest

    def run(k, height, width, steps):
        requests = [GenerationRequest(prompt=PROMPT, negative_prompt=None, num_inference_steps=steps,
                                      guidance_scale=engine.rules.guidance_scale, height=height, width=width, seed=i)
                    for i in range(k)]
        start = time.perf_counter()
        results = engine.generate(requests)
        if not all(hasattr(r, "image") for r in results):
            raise RuntimeError(f"batch {k} at {width}x{height} failed: {results}")
        return round(time.perf_counter() - start, 3)

    steps = engine.rules.num_inference_steps
    out, warmups = {}, []
    for height, width in engine.rules.sizes:
        full = run(batch, height, width, steps)
        rows = {k: {"warmup_s": run(k, height, width, engine.config.warmup_steps),
                    "latency_s": run(k, height, width, steps)} for k in range(2, batch)}
        warmups += [row["warmup_s"] for row in rows.values()]
        out[f"{width}x{height}"] = {"full_batch_latency_s": full, **rows}
    out["warmup_total_s"] = round(sum(warmups), 1)
    return out


def best_of_two(engine, requests) -> float:
    """Seconds of the faster of two generations after an untimed one (which may still capture a graph)."""
    return min(timed_runs(lambda: engine.generate(requests), 2, warmup=1))


def add_to_manifest(weights: Path, folder: Path) -> None:
    """A packaged folder's manifest lists the files below the artifacts' `folder` as they now are (new ones added,
    removed ones dropped: a rebuild or a failed size's cleanup), and nothing else changes, so the integrity check
    still holds."""
    from package_model import manifest_text
    from sd_engine.loading import MANIFEST, file_digests

    manifest = weights / MANIFEST
    if not manifest.is_file():
        return
    digests = json.loads(manifest.read_text())["sha256"]
    prefix = folder.relative_to(weights).as_posix()
    digests = {name: digest for name, digest in digests.items() if not name.startswith(f"{prefix}/")}
    digests.update({f"{prefix}/{name}": digest for name, digest in file_digests(folder).items()})
    manifest.write_text(manifest_text(digests))


if __name__ == "__main__":
    sys.exit(main())
