#!/usr/bin/env python3
"""The GPU tools behind one command: `python scripts/gpu.py SUBCOMMAND [its flags]` (`SUBCOMMAND --help` for them).

  check        gpu_check.py: the DeepSpeed backend through the real TorchServe handler (kernels, parity, OOM)
  bench        benchmark.py: the backends side by side in one process, or one check (shape-safety, cold-start, loras)
  precompile   compile_artifacts.py: a model's compile artifacts, made once, and a fresh start timed from them
  serve-bench  serve_bench.py: the real servers (TorchServe, the KServe front) under load on this host's GPUs

Each is also a script of its own; all stand on scripts/gpu_common.py (record header, preset weights, timing, parity,
result files, progress). bench/gpu/README.md says what a bare GPU host needs for each. Exit codes are the tool's.
"""

from __future__ import annotations

import importlib
import sys

TOOLS = {"check": "gpu_check", "bench": "benchmark", "precompile": "compile_artifacts", "serve-bench": "serve_bench"}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in TOOLS:
        print(f"unknown subcommand {name!r}; choose one of: {', '.join(TOOLS)}", file=sys.stderr)
        return 2
    sys.argv[0] = f"{sys.argv[0]} {name}"  # the tool's usage line names the subcommand
    return importlib.import_module(TOOLS[name]).main(rest)  # imported only when chosen: each pulls in its own stack


if __name__ == "__main__":
    sys.exit(main())
