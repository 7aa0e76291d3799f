#!/usr/bin/env python3
"""Turn a benchmark result file (scripts/benchmark.py's JSON) into the README's performance table.

Prints the Markdown table; with --update-readme it replaces the block between the `perf-table` markers in README.md,
so the README's numbers always come from a committed result file (tests/test_readme.py checks they still do).

Exit codes: 0 done; 1 README has no markers; 2 bad arguments.
"""

import argparse
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_RESULT = ROOT / "bench" / "results" / "h200-sd15-2026-11-21.json"
START, END = "<!-- perf-table:start -->", "<!-- perf-table:end -->"


def table(record: dict) -> str:
    rows = [r for r in record["rows"] if "error" not in r]
    eager = {r["batch"]: r for r in rows if r["backend"] == "eager-fp16"}
    lines = [
        f"{record['gpu']}, {record['preset']} architecture with random weights, {record['height']}x{record['width']}, "
        f"{record['steps']} steps, guidance {record['guidance_scale']}, PNDM; torch {record['torch']}, "
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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("result", type=Path, nargs="?", default=DEFAULT_RESULT,
                        help="benchmark JSON (default: the committed H200 run)")
    parser.add_argument("--update-readme", type=Path, metavar="README", help="rewrite the table block in README")
    args = parser.parse_args(argv)
    text = table(json.loads(args.result.read_text()))
    if not args.update_readme:
        print(text)
        return 0
    readme = args.update_readme.read_text()
    if START not in readme or END not in readme:
        print(f"error: {args.update_readme} has no {START} ... {END} block", file=sys.stderr)
        return 1
    block = f"{START}\n{text}\n{END}"
    args.update_readme.write_text(re.sub(re.escape(START) + ".*?" + re.escape(END), lambda m: block, readme,
                                         flags=re.S))
    print(f"updated {args.update_readme} from {args.result}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
