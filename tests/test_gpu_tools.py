"""The GPU tools' shared helpers (scripts/gpu_common.py) on the CPU, and the tools' own command lines up to the point
where they need a GPU: the numbers they record come from these helpers, so these are checked where a CI can run."""

import json
from datetime import date

import pytest
import torch

import benchmark
import gpu_check
from gpu_common import (json_saver, nan_pixels, pixels, preset_weights, record_header, requests_for, result_stem,
                        rmse, timed_runs)


def test_preset_weights_are_built_once_then_reused(tmp_path):
    folder = preset_weights("tiny", tmp_path / "w", device="cpu")
    index = folder / "model_index.json"
    assert index.is_file()
    built = index.stat().st_mtime_ns
    assert preset_weights("tiny", folder, device="cpu") == folder
    assert index.stat().st_mtime_ns == built


def test_timing_and_parity_helpers_on_the_tiny_engine(tiny_engine):
    requests = requests_for(2, 2, 64)
    assert [r.seed for r in requests] == [1000, 1001] and len({r.prompt for r in requests}) == 2
    images = pixels(tiny_engine.generate(requests))
    assert images[0].shape == (64, 64, 3) and 0 <= images[0].min() and images[0].max() <= 1
    assert rmse(images, pixels(tiny_engine.generate(requests))) == 0  # same seeds, same images
    assert rmse(images, images[::-1]) > 0
    assert nan_pixels(images) == 0
    calls = []
    times = timed_runs(lambda: calls.append(1), runs=3, warmup=2)
    assert len(times) == 3 and len(calls) == 5 and all(t >= 0 for t in times)


def test_pixels_refuses_a_failed_generation():
    with pytest.raises(RuntimeError, match="generation failed"):
        pixels([ValueError("boom")])


def test_result_names_and_the_save_after_every_step(tmp_path):
    today = date.today().isoformat()
    assert result_stem("NVIDIA H200", "sdxl", None, "ladder") == f"h200-sdxl-{today}-ladder"
    assert result_stem("NVIDIA H100 80GB HBM3", "sd15", "cold-start", None) == f"h100-sd15-{today}-cold-start"
    record, plotted = {"rows": []}, []
    save = json_saver(tmp_path / "out" / "run.json", record, then=lambda: plotted.append(len(record["rows"])))
    for row in range(2):
        record["rows"].append({"row": row})
        save()
        assert json.loads((tmp_path / "out" / "run.json").read_text()) == record
    assert plotted == [1, 2]
    json_saver(None, record)()  # no path: nothing written, no error


def test_record_header_names_the_device_and_the_stack():
    header = record_header("cpu")
    assert header["gpu"] == "cpu" and header["torch"] == torch.__version__
    assert {"cuda", "diffusers", "transformers", "deepspeed"} <= set(header)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the exit code on a machine without CUDA")
@pytest.mark.parametrize("tool, argv", [(benchmark, ["--preset", "sdxl", "--check", "loras"]),
                                        (gpu_check, ["--graph-modes", "true", "--oom", "10"])])
def test_gpu_only_tools_parse_their_flags_and_exit_2_without_cuda(tool, argv, capsys):
    assert tool.main(argv) == 2
    assert "no CUDA GPU" in capsys.readouterr().err


def test_one_command_reaches_every_gpu_tool(capsys):
    """scripts/gpu.py SUBCOMMAND runs that tool with the rest of the command line; its usage names the subcommand."""
    import subprocess
    import sys
    from pathlib import Path

    import gpu

    script = Path(gpu.__file__)
    for sub, flag in (("check", "--graph-modes"), ("bench", "--check"), ("precompile", "--time-sizes"),
                      ("serve-bench", "--phases")):
        shown = subprocess.run([sys.executable, str(script), sub, "--help"], capture_output=True, text=True,
                               timeout=120)
        assert shown.returncode == 0 and f"gpu.py {sub}" in shown.stdout and flag in shown.stdout, shown.stderr
    assert gpu.main(["nope"]) == 2 and "unknown subcommand 'nope'" in capsys.readouterr().err
    assert gpu.main([]) == 2 and "serve-bench" in capsys.readouterr().out
    if not torch.cuda.is_available():
        assert gpu.main(["bench", "--preset", "sdxl"]) == 2 and "no CUDA GPU" in capsys.readouterr().err


# A stand-in for compile_artifacts.py's --aot child: what it needs of one is the protocol (wait for "role HxW" on
# stdin, or exit on EOF; print a last line), which this reaches in milliseconds instead of a diffusers import.
FAKE_CHILD = ("import os, sys, time\n"
              "role = sys.stdin.readline().split()\n"
              "if role and role[1] == '9x9': time.sleep(60)\n"
              "print(' '.join(role + [os.environ['TORCHINDUCTOR_COMPILE_THREADS']]) if role else '')\n")


def test_build_children_wait_for_their_role_and_are_started_again_for_another_share_of_the_cores():
    import sys

    from compile_artifacts import Children

    children = Children([sys.executable, "-c", FAKE_CHILD], cpus=8, jobs=2)  # (--await-role: ignored by -c)
    started_builds = list(children.waiting["build"])
    assert len(started_builds) == 2 and len(children.waiting["check"]) == 2
    children.plan(jobs=1, sizes=3)  # one size at a time after all: a build then gets all 8 cores
    assert all(process.wait(timeout=30) is not None for process in started_builds)
    assert [children.run("build", (8, 16), timeout=30) for _ in range(3)] == ["build 8x16 8"] * 3
    # The checks use the children started first (4 threads each, irrelevant to a check), and one started while the
    # first works, since three were due and two waited.
    assert sorted(children.run("check", (8, 16), timeout=30) for _ in range(3)) == [
        "check 8x16 4", "check 8x16 4", "check 8x16 8"]
    with pytest.raises(RuntimeError, match="build stopped after 0.5 s"):
        children.run("build", (9, 9), timeout=0.5)
    children.stop_running()  # (SIGTERM): nothing more starts
    with pytest.raises(RuntimeError, match="not started"):
        children.run("build", (8, 16), timeout=30)
    waiting = [process for processes in children.waiting.values() for process in processes]
    children.stop()
    assert all(process.returncode is not None for process in waiting) and not children.running
