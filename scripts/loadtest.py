#!/usr/bin/env python3
"""Load test a running server: N requests at concurrency C (or a target rate), bounded in count and time.

--front torchserve (default) posts the plain API to /predictions/<model>; --front kserve posts the OpenAI Images API
to the KServe front (/v1/images/generations), so both fronts are measured with the same client. Each request carries
its own seed (--seed-base + index); a 200 counts as good only if it holds a complete JPEG/PNG for that request's seed
(X-Seed, or the answer's `seed`), so lost, duplicated or swapped answers show up. Prints p50/p95/p99 latency,
throughput and counts by status, and for TorchServe the server-side split from the Server-Timing header (engine,
encode) against what the client saw. --json writes the same as a file for bench/results.

Standard library only, on purpose: it runs on an offline GPU host with nothing installed, and it checks every answer
is its own image, which a generic tool (locust, which a user also ran against this server: 32 users, nothing lost)
does not. Exit codes: 0 every request answered 200 with its own image; 1 otherwise; 2 bad arguments; 3 the server
could not be reached.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from query import KeyRenewalFailed, ServerUnreachable, predict_with_key_file, request


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered)) - 1))]


def server_timing(header: str | None) -> dict[str, float]:
    """'engine;dur=12.3, encode;dur=1.0' -> {'engine': 12.3, 'encode': 1.0} (milliseconds)."""
    out = {}
    for part in (header or "").split(","):
        name, _, rest = part.strip().partition(";")
        if rest.startswith("dur="):
            out[name] = float(rest[4:])
    return out


def is_image(body: bytes) -> bool:
    return (body[:2] == b"\xff\xd8" and body.rstrip(b"\0")[-2:] == b"\xff\xd9") or body[:8] == b"\x89PNG\r\n\x1a\n"


def own_image(front: str, headers: dict, body: bytes, seed: int) -> bool:
    if front == "torchserve":
        return is_image(body) and headers.get("x-seed") == str(seed)
    try:
        [image] = json.loads(body)["data"]
        return image["seed"] == seed and is_image(base64.b64decode(image["b64_json"]))
    except (ValueError, KeyError, TypeError):
        return False


def run(args) -> dict:
    deadline = time.monotonic() + args.max_seconds
    interval = 1.0 / args.rate if args.rate else 0.0
    start = time.monotonic()
    lock = threading.Lock()
    results = []

    def one(index: int) -> None:
        if interval:  # open-loop pacing: request i is sent at start + i / rate
            time.sleep(max(0.0, start + index * interval - time.monotonic()))
        if time.monotonic() > deadline:
            record = {"index": index, "status": "skipped"}
        else:
            seed = args.seed_base + index
            payload = dict(json.loads(args.payload), seed=seed)
            sent = time.perf_counter()
            try:  # the key is read (and renewed once expired) per request: a long run outlives a key
                if args.front == "kserve":
                    status, headers, body = request(f"{args.url.rstrip('/')}/v1/images/generations",
                                                    args.token or os.environ.get("SD_API_KEY"),
                                                    json.dumps(payload).encode(), "application/json", args.timeout)
                else:
                    status, headers, body = predict_with_key_file(args.url, args.model, payload, args.token,
                                                                  args.key_file, args.management_url, args.timeout)
            except ServerUnreachable as e:
                status, headers, body = "unreachable", {}, str(e).encode()
            except KeyRenewalFailed as e:
                status, headers, body = "key-renewal-failed", {}, str(e).encode()
            except Exception as e:  # noqa: BLE001 - one request's failure must not end the run
                status, headers, body = f"error: {type(e).__name__}", {}, str(e).encode()
            headers = {k.lower(): v for k, v in headers.items()}
            record = {"index": index, "status": status, "latency_s": time.perf_counter() - sent,
                      "own_image": status == 200 and own_image(args.front, headers, body, seed),
                      "timing_ms": server_timing(headers.get("server-timing"))}
        with lock:
            results.append(record)

    with ThreadPoolExecutor(args.concurrency) as pool:
        list(pool.map(one, range(args.requests)))
    elapsed = time.monotonic() - start

    ok = [r for r in results if r["status"] == 200]
    latencies = [r["latency_s"] for r in ok]
    counts: dict[str, int] = {}
    for r in results:
        counts[str(r["status"])] = counts.get(str(r["status"]), 0) + 1
    engine = [r["timing_ms"].get("engine") for r in ok if "engine" in r["timing_ms"]]
    encode = [r["timing_ms"].get("encode") for r in ok if "encode" in r["timing_ms"]]
    overhead = [r["latency_s"] * 1000 - r["timing_ms"]["engine"] - r["timing_ms"].get("encode", 0.0)
                for r in ok if "engine" in r["timing_ms"]]
    return {
        "url": args.url, "requests": args.requests, "concurrency": args.concurrency, "rate": args.rate,
        "payload": json.loads(args.payload), "elapsed_s": round(elapsed, 3),
        "throughput_rps": round(len(ok) / elapsed, 3) if elapsed else None,
        "status_counts": counts, "own_images": sum(r.get("own_image", False) for r in ok),
        "latency_s": {f"p{q}": round(percentile(latencies, q), 4) if latencies else None for q in (50, 95, 99)},
        "server_engine_ms_p50": round(statistics.median(engine), 2) if engine else None,
        "server_encode_ms_p50": round(statistics.median(encode), 2) if encode else None,
        "client_minus_server_ms": {f"p{q}": round(percentile(overhead, q), 2) if overhead else None for q in (50, 95)},
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:8080", help="inference address (default: %(default)s)")
    parser.add_argument("--front", choices=("torchserve", "kserve"), default="torchserve",
                        help="torchserve: the plain API; kserve: the KServe front's OpenAI route (default: torchserve)")
    parser.add_argument("--model", default="stable-diffusion", help="model name (default: %(default)s)")
    parser.add_argument("--token", help="inference token (default: $TS_INFERENCE_TOKEN or --key-file; for the KServe "
                        "front $SD_API_KEY)")
    parser.add_argument("--key-file", default="key_file.json", help="TorchServe's key file (default: %(default)s)")
    parser.add_argument("--management-url", default="http://127.0.0.1:8081",
                        help="management address, to renew an expired key in --key-file (default: %(default)s)")
    parser.add_argument("--requests", type=int, default=100, help="how many requests (default: %(default)s)")
    parser.add_argument("--concurrency", type=int, default=8, help="requests in flight at most (default: 8)")
    parser.add_argument("--rate", type=float, help="send at this many requests/s instead of as fast as possible")
    parser.add_argument("--max-seconds", type=float, default=600,
                        help="stop sending after this long; unsent requests count as skipped (default: 600)")
    parser.add_argument("--payload", default='{"prompt": "a photo of an astronaut riding a horse on mars"}',
                        help="JSON request body; each request gets its own seed (default: a fixed prompt)")
    parser.add_argument("--seed-base", type=int, default=1000, help="request i gets seed base + i (default: 1000)")
    parser.add_argument("--timeout", type=float, default=600, help="per-request timeout in seconds (default: 600)")
    parser.add_argument("--json", type=Path, help="also write the summary here")
    args = parser.parse_args(argv)
    if args.requests < 1 or args.concurrency < 1 or (args.rate is not None and args.rate <= 0):
        parser.error("--requests, --concurrency and --rate must be positive")
    try:
        json.loads(args.payload)
    except json.JSONDecodeError as e:
        parser.error(f"--payload is not JSON: {e}")

    summary = run(args)
    if summary["status_counts"].get("unreachable") == args.requests:
        print(f"error: could not reach {args.url}", file=sys.stderr)
        return 3
    text = json.dumps(summary, indent=1)
    if args.json:
        args.json.write_text(text + "\n")
    print(text)
    return 0 if summary["own_images"] == args.requests else 1


if __name__ == "__main__":
    sys.exit(main())
