#!/usr/bin/env python3
"""Turn committed result files into the documentation's tables: scripts/benchmark.py's JSON into the performance
table (SD 1.5) and the families table (SD 2.1, SDXL), scripts/serve_bench.py's JSONs into the serving table.

Prints the Markdown; with --update-docs it replaces the blocks between the `perf-table`, `family-table` and
`serving-table` markers wherever they are in README.md and docs/*.md, so the numbers always come from committed
result files (tests/test_readme.py checks they still do).

Exit codes: 0 done; 1 a block's markers are missing; 2 bad arguments.
"""

import argparse
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_RESULT = ROOT / "bench" / "results" / "h200-sd15-2026-11-21.json"
START, END = "<!-- perf-table:start -->", "<!-- perf-table:end -->"
SERVING_RESULTS = [ROOT / "bench" / "results" / f"{name}.json" for name in (
    "h200x2-sd15-2026-11-22-serving-deepspeed", "h200x2-sd15-2026-11-22-serving-compile",
    "h200-sd15-2026-12-04-serving-both")]
SERVING_START, SERVING_END = "<!-- serving-table:start -->", "<!-- serving-table:end -->"
# One file per GPU call: each row's "vs eager" and RMSE compare with the eager fp16 run of its own file.
FAMILY_RESULTS = [ROOT / "bench" / "results" / f"h200-{name}.json" for name in (
    "sd21-2026-12-02-ladder", "sdxl-2026-12-02-ladder", "sdxl-2026-12-02-ours", "sdxl-2026-12-02-ours-b4",
    "sdxl-2026-12-02-fp8", "sd21-2026-12-07-postproc", "sdxl-2026-12-07-postproc")]
FAMILY_START, FAMILY_END = "<!-- family-table:start -->", "<!-- family-table:end -->"
SCHEDULERS = {"sd15": "PNDM", "sd21": "DDIM, v-prediction", "sdxl": "Euler"}


def table(record: dict) -> str:
    rows = [r for r in record["rows"] if "error" not in r]
    eager = {r["batch"]: r for r in rows if r["backend"] == "eager-fp16"}
    lines = [
        f"{record['gpu']}, {record['preset']} architecture with random weights, {record['height']}x{record['width']}, "
        f"{record['steps']} steps, guidance {record['guidance_scale']}, {SCHEDULERS[record['preset']]}; "
        f"torch {record['torch']}, "
        f"deepspeed {record['deepspeed']}, diffusers {record['diffusers']}; median of {record['runs']} runs.",
        "",
        "| backend | batch | latency (s) | images/s | vs eager | UNet step (ms) | text enc. (ms) | VAE (ms) "
        "| peak mem (GiB) | RMSE vs eager fp16 |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        speedup = eager[r["batch"]]["latency_s"] / r["latency_s"] if r["batch"] in eager else None
        lines.append(
            f"| {r['backend']} | {r['batch']} | {r['latency_s']:.3f} | {r['images_per_s']:.2f} | "
            f"{f'{speedup:.2f}x' if speedup else '-'} | {r['unet_step_ms']:.1f} | {r['text_encoder_ms']:.1f} | "
            f"{r['vae_ms']:.1f} | {r['peak_mem_gib']:.2f} | {r['rmse_vs_eager']:.4f} |")
    return "\n".join(lines)


def family_table(records: list[tuple[str, dict]]) -> str:
    """SD 2.1 and SDXL rows, each with the file it comes from; speed-ups against that file's eager fp16 row."""
    first = records[0][1]
    lines = [
        f"{first['gpu']}, random weights, each model at its native size with its own guidance and scheduler, "
        f"{first['steps']} steps; torch {first['torch']}, deepspeed {first['deepspeed']}, diffusers "
        f"{first['diffusers']}; median of {first['runs']} runs. Each file is one process on one GPU call.",
        "",
        "| model | backend | batch | latency (s) | images/s | vs eager (same file) | UNet step (ms) | VAE (ms) "
        "| peak mem (GiB) | RMSE vs eager fp16 | file |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for name, record in records:
        rows = [r for r in record["rows"] if "error" not in r]
        eager = {r["batch"]: r for r in rows if r["backend"] == "eager-fp16"}
        model = (f"{record['preset']} {record['height']}x{record['width']}, CFG {record['guidance_scale']:g}, "
                 f"{SCHEDULERS[record['preset']]}")
        for r in rows:
            speedup = eager[r["batch"]]["latency_s"] / r["latency_s"] if r["batch"] in eager else None
            lines.append(
                f"| {model} | {r['backend']} | {r['batch']} | {r['latency_s']:.3f} | {r['images_per_s']:.2f} | "
                f"{f'{speedup:.2f}x' if speedup else '-'} | {r['unet_step_ms']:.1f} | {r['vae_ms']:.1f} | "
                f"{r['peak_mem_gib']:.2f} | {r['rmse_vs_eager']:.4f} | `{name}` |")
    return "\n".join(lines)


def serving_table(records: list[dict]) -> str:
    """One row per load-test run of a real server (TorchServe, or the KServe front on the same model folder and
    config); start-to-ready times under the table."""
    first = records[0]
    size = f"{first['size']}x{first['size']}" if first["size"] else "its native size"
    lines = [
        f"{first['gpus'][0].split(', ')[1]}, {first['preset']} architecture with random weights, "
        f"{size}, {first['steps']} steps, TorchServe {first['versions']['torchserve']} "
        f"or the KServe front, batchSize {first['batch_size']}, maxBatchDelay 10 ms; "
        "scripts/loadtest.py, each request its own seed; latency as the client saw it.",
        "",
        "| front | handler config | date | GPUs (workers) | clients | requests | images/s | p50 (s) | p95 (s) "
        "| p99 (s) | errors |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    ready = []
    for record in records:
        config = f"{record['backend']}{' + compile' if record['compile'] else ''} + cuda_graph"
        for name, phase in record["phases"].items():
            if phase.get("start_to_ready_s") is not None:
                cache = f" (JIT cache {phase['jit_cache']})" if phase.get("jit_cache") else ""
                ready.append(f"{config}, {record['date']} {name}{cache}: {phase['start_to_ready_s']:.0f} s")
            for clients, run in sorted(phase.get("loadtest", {}).items(), key=lambda item: int(item[0])):
                errors = sum(n for status, n in run["status_counts"].items() if status != "200")
                latency = run["latency_s"]
                lines.append(f"| {phase.get('front', 'torchserve')} | {config} | {record['date']} | "
                             f"{phase['workers']} | {clients} | {run['requests']} | "
                             f"{run['throughput_rps']:.2f} | {latency['p50']:.2f} | {latency['p95']:.2f} | "
                             f"{latency['p99']:.2f} | {errors} |")
    lines += ["", "From `torchserve --start` to every worker READY: " + "; ".join(ready) + "."]
    return "\n".join(lines)


def replace_block(readme: str, start: str, end: str, text: str) -> str:
    block = f"{start}\n{text}\n{end}"
    return re.sub(re.escape(start) + ".*?" + re.escape(end), lambda m: block, readme, flags=re.S)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("result", type=Path, nargs="?", default=DEFAULT_RESULT,
                        help="benchmark JSON (default: the committed H200 run)")
    parser.add_argument("--update-docs", action="store_true",
                        help="rewrite the table blocks in README.md and docs/*.md")
    args = parser.parse_args(argv)
    text = table(json.loads(args.result.read_text()))
    families = family_table([(path.stem, json.loads(path.read_text())) for path in FAMILY_RESULTS])
    serving = serving_table([json.loads(path.read_text()) for path in SERVING_RESULTS])
    if not args.update_docs:
        print(text + "\n\n" + families + "\n\n" + serving)
        return 0
    pages = {path: path.read_text() for path in [ROOT / "README.md"] + sorted((ROOT / "docs").glob("*.md"))}
    for start, end, block in ((START, END, text), (FAMILY_START, FAMILY_END, families),
                              (SERVING_START, SERVING_END, serving)):
        holders = [path for path, page in pages.items() if start in page and end in page]
        if not holders:
            print(f"error: no page has a {start} ... {end} block", file=sys.stderr)
            return 1
        for path in holders:
            pages[path] = replace_block(pages[path], start, end, block)
    for path, page in pages.items():
        path.write_text(page)
    print(f"updated the tables from {args.result}, {len(FAMILY_RESULTS)} family and {len(SERVING_RESULTS)} serving "
          f"results")
    return 0


if __name__ == "__main__":
    sys.exit(main())
