#!/usr/bin/env python3
"""Ask a running TorchServe for an image and write it to disk (output-<timestamp>.jpg by default).

Standard library only, so it runs anywhere. The token comes from --token, else $TS_INFERENCE_TOKEN, else the
`inference` key in TorchServe's key_file.json (written into the directory `torchserve --start` ran in).
--wait SECONDS first waits until the model has a READY worker (asks the management API with the management key).

TorchServe's keys expire (`token_expiration_min`, 60 in config.properties) and it keeps one of each kind. A client
that reads key_file.json renews an expired key there with the file's API key, under a lock shared by every client
of that file, and only when the key in the file has expired: so no client replaces a key another has just renewed,
and a server left running keeps serving them (`current_key`). A request that still meets an expired key re-reads
the file and is sent once more. A token given with --token or $TS_INFERENCE_TOKEN is used as it is.

Exit codes: 0 image written; 1 the server answered with an HTTP error (its JSON message is printed);
2 bad arguments; 3 the server could not be reached or did not become ready in time.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import re
import sys
import time
import urllib.error
import urllib.request
from datetime import datetime, timezone
from pathlib import Path

FIELDS = ("negative_prompt", "num_inference_steps", "guidance_scale", "height", "width", "seed", "format", "quality")
EXTENSIONS = {"image/jpeg": ".jpg", "image/png": ".png"}


class ServerUnreachable(Exception):
    pass


def read_key(key_file: str | Path, kind: str = "inference") -> str:
    """The `kind` key (inference, management or API) from TorchServe's key_file.json."""
    return json.loads(Path(key_file).read_text())[kind]["key"]


class KeyRenewalFailed(Exception):
    pass


def current_key(key_file: str | Path, kind: str = "inference",
                management_url: str = "http://127.0.0.1:8081") -> str:
    """The `kind` key in key_file.json, renewed first if it has expired (see the module docstring)."""
    path = Path(key_file)
    keys = _read_keys(path)
    if not _expired(keys[kind]):
        return keys[kind]["key"]
    with open(path.with_name(f".{path.name}.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one renewal at a time among this file's clients
        keys = _read_keys(path)
        if _expired(keys[kind]):  # nobody renewed it while we waited for the lock
            status, _, body = request(f"{management_url.rstrip('/')}/token?type={kind}", keys["API"]["key"],
                                      timeout=30)
            if status != 200:
                raise KeyRenewalFailed(f"renewing the {kind} key failed: HTTP {status}: {body[:200]!r}")
            keys = _read_keys(path)  # TorchServe rewrote the file before it answered
        return keys[kind]["key"]


def _read_keys(path: Path, attempts: int = 20) -> dict:
    # TorchServe rewrites the file in place (truncate, then write): a read can catch it empty or half written.
    for attempt in range(attempts):
        try:
            return json.loads(path.read_text())
        except ValueError:
            if attempt == attempts - 1:
                raise
            time.sleep(0.05)  # the writer's next few milliseconds, bounded by attempts
    raise AssertionError("unreachable")


def _expired(entry: dict) -> bool:
    stamp = entry.get("expiration time")
    if not stamp:  # the API key never expires
        return False
    stamp = re.sub(r"(\.\d{6})\d+", r"\1", stamp.replace("Z", "+00:00"))  # Java's Instant may print nanoseconds
    return datetime.fromisoformat(stamp) <= datetime.now(timezone.utc)


def is_token_failure(status: int, body: bytes) -> bool:
    return status in (400, 401) and b"Token Authorization failed" in body


def resolve_token(token: str | None, key_file: str | Path,
                  management_url: str = "http://127.0.0.1:8081") -> str | None:
    """--token, else $TS_INFERENCE_TOKEN, else the (renewed if expired) inference key in key_file, else None."""
    token = token or os.environ.get("TS_INFERENCE_TOKEN")
    if not token and Path(key_file).is_file():
        token = current_key(key_file, "inference", management_url)
    return token


def request(url: str, token: str | None = None, body: bytes | None = None, content_type: str | None = None,
            timeout: float = 600) -> tuple[int, dict[str, str], bytes]:
    """One HTTP call; returns (status, headers, body) for any HTTP answer, raises ServerUnreachable otherwise."""
    req = urllib.request.Request(url, data=body, method="POST" if body is not None else "GET")
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    if content_type:
        req.add_header("Content-Type", content_type)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()
    except (urllib.error.URLError, ConnectionError, TimeoutError) as e:
        raise ServerUnreachable(f"{url}: {getattr(e, 'reason', e)}") from e


def predict(base_url: str, model: str, payload: dict | str, token: str | None = None, timeout: float = 600):
    """POST a JSON object (or a plain-text prompt) to /predictions/<model>; returns (status, headers, body)."""
    if isinstance(payload, str):
        body, content_type = payload.encode("utf-8"), "text/plain; charset=utf-8"
    else:
        body, content_type = json.dumps(payload).encode("utf-8"), "application/json"
    return request(f"{base_url.rstrip('/')}/predictions/{model}", token, body, content_type, timeout)


def predict_with_key_file(base_url: str, model: str, payload: dict | str, token: str | None, key_file: str | Path,
                          management_url: str, timeout: float = 600):
    """predict() with the token resolve_token() finds; when that is key_file's key and it expired in flight, once
    more with its successor (renewed if nobody has yet)."""
    fixed = token or os.environ.get("TS_INFERENCE_TOKEN")
    status, headers, body = predict(base_url, model, payload, resolve_token(token, key_file, management_url), timeout)
    if is_token_failure(status, body) and not fixed and Path(key_file).is_file():
        status, headers, body = predict(base_url, model, payload, resolve_token(None, key_file, management_url),
                                        timeout)
    return status, headers, body


EXCEPTION_LINE = re.compile(r"^[A-Za-z_][\w.]*(: .*)?$")  # `ValueError: ...`, `pkg.errors.ConfigError: ...`
CHAINED = ("Traceback (most recent call last)", "The above exception was", "During handling of the above")
NO_TRACEBACK = "a worker died while loading (its error is in model_log.log)"


def worker_load_error(model_log: str | Path, offset: int = 0) -> str | None:
    """What killed a TorchServe worker while it loaded, from the server's model_log.log (from byte `offset` on):
    None while no worker has died. TorchServe retries such a worker forever, with back-off, and lists the model as
    loading meanwhile. The error is the exception line of the last traceback TorchServe logged for the load, in that
    worker's own log lines: the one under "Failed to load model ..." (a RuntimeError or MemoryError, which it
    catches and then dies of as "500 - Unknown exception"), else the one under "Backend worker process died." (any
    other exception, e.g. the engine's `sd_engine.errors.ConfigError: handler.compile: ...`). None too while that
    traceback may still go on."""
    try:
        with open(model_log, "rb") as log:
            if log.seek(0, os.SEEK_END) < offset:  # rolled over since (log4j: daily, and at 100 MB)
                offset = 0
            log.seek(offset)
            text = log.read().decode("utf-8", errors="replace")
    except OSError:
        return None
    lines = [line.split(" MODEL_LOG - ", 1) for line in text[:text.rfind("\n") + 1].splitlines()
             if " MODEL_LOG - " in line]
    died = next((i for i, (_, message) in enumerate(lines) if message == "Backend worker process died."), None)
    if died is None:
        return None
    thread = lines[died][0].rsplit("] ", 1)[-1]  # e.g. W-9000-stable-diffusion_1.0-stdout: its worker, its stream
    messages = [message for head, message in lines if head.rsplit("] ", 1)[-1] == thread]
    died = messages.index("Backend worker process died.")
    caught = [i for i, message in enumerate(messages[:died]) if message.startswith(("Failed to load model ",
                                                                                     "Load model "))]
    if caught:
        return _exception_line(messages[caught[-1] + 1:died], complete=True) or NO_TRACEBACK
    return _exception_line(messages[died + 1:], complete=False)


def _exception_line(messages: list[str], complete: bool) -> str | None:
    """The exception line of the last traceback in `messages` (a chain's last exception), once a message after it
    shows that no chained traceback follows (or `complete`); None before that."""
    headers = [i for i, message in enumerate(messages) if message.startswith(CHAINED[0])]
    if not headers:  # not written yet, or none to read (an exception group's is indented throughout)
        moved_on = complete or any(message.strip() and not message[0].isspace() for message in messages)
        return NO_TRACEBACK if moved_on else None
    after = messages[headers[-1] + 1:]
    for i, message in enumerate(after):
        if not message.strip() or message[0].isspace():
            continue  # the frames and their source lines
        if not EXCEPTION_LINE.match(message):
            return NO_TRACEBACK  # e.g. an exception group, whose lines are all indented
        rest = [line for line in after[i + 1:] if line.strip()]
        return message.strip() if complete or (rest and not rest[0].startswith(CHAINED)) else None
    return None


def wait_until_ready(management_url: str, model: str, key_file: str | Path | None, timeout: float,
                     workers: int = 1, alive=None, model_log: str | Path | None = None) -> None:
    """Poll GET /models/<model> until `workers` workers are READY (TorchServe's /ping stays Healthy while loading).

    The management key is read from `key_file` on each try: `torchserve --start` returns before it writes the file.
    `alive` (optional, a callable) is asked on each try whether the server still runs: a frontend that died at start
    fails the wait at once instead of at the deadline. So does a worker that died while loading, given the server's
    `model_log` (its LOG_LOCATION's model_log.log): the error is in the message.
    """
    deadline = time.monotonic() + timeout
    last = "no answer"
    try:  # what an earlier server wrote to the same log is not this one's
        offset = os.path.getsize(model_log) if model_log else 0
    except OSError:
        offset = 0
    while time.monotonic() < deadline:
        if alive is not None and not alive():
            raise ServerUnreachable(f"the server exited before model {model!r} was ready ({last})")
        error = worker_load_error(model_log, offset) if model_log else None
        if error:
            raise ServerUnreachable(f"a worker of model {model!r} died while loading: {error}")
        try:
            token = current_key(key_file, "management", management_url) if key_file else None
        except (OSError, ValueError, KeyError, KeyRenewalFailed):  # not there yet, or created but not yet written
            token = None
        try:
            status, _, body = request(f"{management_url.rstrip('/')}/models/{model}", token, timeout=10)
            if status == 200:
                states = [w.get("status") for entry in json.loads(body) for w in entry.get("workers", [])]
                if states.count("READY") >= workers:
                    return
                last = f"workers {states}"
            else:
                last = f"HTTP {status}"
        except ServerUnreachable as e:
            last = str(e)
        time.sleep(0.5)  # polling interval of an external condition, bounded by the deadline
    raise ServerUnreachable(f"model {model!r} not ready after {timeout:.0f} s ({last})")


def wait_until_healthy(url: str, timeout: float, process=None) -> None:
    """Poll GET `url` (a health route that answers once the model is loaded, e.g. the KServe front's
    /v2/health/ready) until it answers 200; raise ServerUnreachable at the deadline, or as soon as `process` (a
    subprocess.Popen running that server) has exited."""
    deadline = time.monotonic() + timeout
    while True:
        if process is not None and process.poll() is not None:
            raise ServerUnreachable(f"the server exited with {process.returncode} before {url} answered")
        try:
            if request(url, timeout=5)[0] == 200:
                return
        except ServerUnreachable:
            pass
        if time.monotonic() > deadline:
            raise ServerUnreachable(f"{url} did not answer 200 within {timeout:.0f} s")
        time.sleep(0.2)  # polling interval of an external condition, bounded by the deadline


def add_request_arguments(parser: argparse.ArgumentParser) -> None:
    """The request fields as flags (shared with scripts/generate.py); omitted ones take the server's defaults."""
    parser.add_argument("--prompt", required=True, help="what to draw")
    parser.add_argument("--negative-prompt", help="what to steer away from")
    parser.add_argument("--num-inference-steps", type=int, help="denoising steps (config default if omitted)")
    parser.add_argument("--guidance-scale", type=float, help="classifier-free guidance scale")
    parser.add_argument("--height", type=int, help="image height in pixels, a multiple of 8")
    parser.add_argument("--width", type=int, help="image width in pixels, a multiple of 8")
    parser.add_argument("--seed", type=int,
                        help="seed (random if omitted); the same seed and fields give the same image")
    parser.add_argument("--format", choices=("jpeg", "png"), help="image format (default: jpeg)")
    parser.add_argument("--quality", type=int, help="JPEG quality 1-100")
    parser.add_argument("--lora", action="append", type=lora_flag, metavar="NAME=STRENGTH",
                        help="a LoRA adapter of the model and its strength, e.g. pixel-art=0.8 (repeatable)")


def lora_flag(text: str) -> tuple[str, float]:
    name, sep, strength = text.rpartition("=")
    try:
        if not (sep and name):
            raise ValueError(text)
        return name, float(strength)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not NAME=STRENGTH (e.g. pixel-art=0.8)") from None


def request_fields(args: argparse.Namespace) -> dict:
    """The JSON body for the flags add_request_arguments defined (only those given)."""
    payload = {"prompt": args.prompt}
    payload.update({f: getattr(args, f) for f in FIELDS if getattr(args, f) is not None})
    if args.lora:
        payload["loras"] = dict(args.lora)
    return payload


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_request_arguments(parser)
    parser.add_argument("--url", default="http://127.0.0.1:8080", help="inference address (default: %(default)s)")
    parser.add_argument("--management-url", default="http://127.0.0.1:8081",
                        help="management address, used by --wait and to renew an expired key (default: %(default)s)")
    parser.add_argument("--model", default="stable-diffusion", help="model name (default: %(default)s)")
    parser.add_argument("--token", help="inference token (default: $TS_INFERENCE_TOKEN or --key-file)")
    parser.add_argument("--key-file", default="key_file.json",
                        help="TorchServe's key file, read when no token is given (default: %(default)s)")
    parser.add_argument("--wait", type=float, default=0, metavar="SECONDS",
                        help="first wait up to SECONDS for the model to be ready (default: don't wait)")
    parser.add_argument("--timeout", type=float, default=600, help="request timeout in seconds (default: 600)")
    parser.add_argument("--output", type=Path, help="where to write the image (default: output-<timestamp>.<ext>)")
    args = parser.parse_args(argv)

    payload = request_fields(args)
    key_file = Path(args.key_file)
    try:
        if args.wait:
            wait_until_ready(args.management_url, args.model, key_file, args.wait)
        start = time.perf_counter()
        status, headers, body = predict_with_key_file(args.url, args.model, payload, args.token, key_file,
                                                      args.management_url, args.timeout)
    except ServerUnreachable as e:
        print(f"error: could not reach TorchServe: {e}", file=sys.stderr)
        return 3
    except KeyRenewalFailed as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if status != 200:
        print(f"error: HTTP {status}: {body.decode('utf-8', 'replace')}", file=sys.stderr)
        return 1

    content_type = headers.get("Content-Type", headers.get("content-type", "")).split(";")[0]
    output = args.output or Path(f"output-{datetime.now():%Y%m%d-%H%M%S}{EXTENSIONS.get(content_type, '.bin')}")
    output.write_bytes(body)
    print(f"wrote {output} ({len(body)} bytes, {content_type}, seed {headers.get('X-Seed', '?')}) "
          f"in {time.perf_counter() - start:.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
