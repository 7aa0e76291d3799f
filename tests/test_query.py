"""The client's readiness wait: it must keep polling through TorchServe's start-up, never crash on it, and end at once
with the error when a worker dies while loading (the real server's case: tests/test_e2e_faults.py)."""

import pytest

from query import ServerUnreachable, wait_until_ready, worker_load_error
from ts_server import free_ports


@pytest.mark.parametrize("content", [None, "", '{"management": '])  # absent, created-but-empty, half-written
def test_wait_until_ready_polls_through_a_key_file_being_written(tmp_path, content):
    key_file = tmp_path / "key_file.json"
    if content is not None:
        key_file.write_text(content)
    [port] = free_ports(1)  # nothing listens there: the wait must end with its own error, not a JSON one
    with pytest.raises(ServerUnreachable, match="not ready after"):
        wait_until_ready(f"http://127.0.0.1:{port}", "stable-diffusion", key_file, timeout=1.5)


# model_log.log as TorchServe 0.12 writes it: each line of the worker's stdout/stderr behind this prefix.
PREFIX = "2026-12-06T21:11:01,644 [INFO ] W-9000-stable-diffusion_1.0-stdout MODEL_LOG - "
STARTED = ["Listening on port: /tmp/ts.sock.9000", "Torch worker started.",
           "model_name: stable-diffusion, batchSize: 8"]
RESTARTED = ["s_name_part0=/tmp/ts.sock, s_name_part1=9000, pid=4321"]
FRAMES = ["Traceback (most recent call last):", '  File "/site/ts/model_loader.py", line 143, in load',
          "    initialize_fn(service.context)"]
CONFIG = ["Backend worker process died.", *FRAMES, "sd_engine.errors.ConfigError: handler.compile: true works with "
          "backend eager (DeepSpeed's kernels break the graph)"]
# `raise ModelLoadError(...) from e`: the error is the chain's last exception, not its cause.
CHAINED = ["Backend worker process died.", *FRAMES, "FileNotFoundError: [Errno 2] No such file: 'unet'", "",
           "The above exception was the direct cause of the following exception:", "", *FRAMES,
           "sd_engine.errors.ModelLoadError: handler.weights: the pipeline could not be loaded"]
# A RuntimeError is caught by TorchServe and logged (its message, of several lines, before the traceback too); the
# worker then dies of "500 - Unknown exception".
CAUGHT = ["Load model stable-diffusion cuda OOM, exception CUDA error: out of memory",
          "CUDA kernel errors might be asynchronously reported", *FRAMES,
          "RuntimeError: CUDA error: out of memory", "CUDA kernel errors might be asynchronously reported",
          "Backend worker process died.", *FRAMES, "RuntimeError: 500 - Unknown exception"]
# An exception group's traceback is indented throughout: no line to name, but the death is reported.
GROUP = ["Backend worker process died.", "  + Exception Group Traceback (most recent call last):",
         "  |   File \"a.py\", line 1", "  | ExceptionGroup: two (2 sub-exceptions)"]


@pytest.mark.parametrize("lines, error", [
    (STARTED, None),
    (STARTED + CONFIG, None),  # the traceback may go on: nothing until a line after it is written
    (STARTED + CONFIG + RESTARTED, CONFIG[-1]),
    (STARTED + CHAINED + RESTARTED, CHAINED[-1]),
    (STARTED + CAUGHT + RESTARTED, "RuntimeError: CUDA error: out of memory"),
    (STARTED + CHAINED[:4] + ["STDERR: Exception ignored in: <x>"] + CHAINED[4:] + RESTARTED, CHAINED[-1]),
    (STARTED + CHAINED[:6], None),  # the cause, and maybe more to come
    (STARTED + CHAINED[:7], None),
])
def test_the_error_a_worker_died_of_is_read_from_its_log(tmp_path, lines, error):
    """Lines starting with STDERR: come from the worker's stderr, which TorchServe logs from another thread, so they
    may fall inside a traceback from stdout."""
    log = tmp_path / "model_log.log"
    log.write_text("".join((PREFIX.replace("-stdout", "-stderr") + line[8:] if line.startswith("STDERR: ") else
                            PREFIX + line) + "\n" for line in lines))
    assert worker_load_error(log) == error
    assert worker_load_error(log, offset=log.stat().st_size) is None  # an earlier server's lines are not read


def test_a_death_with_an_unnamed_traceback_is_still_reported(tmp_path):
    log = tmp_path / "model_log.log"
    log.write_text("".join(f"{PREFIX}{line}\n" for line in STARTED + GROUP + RESTARTED))
    assert "a worker died while loading" in worker_load_error(log)
