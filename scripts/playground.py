#!/usr/bin/env python3
"""A page to try the model: prompt in, pictures out, against a running server (either front).

    python scripts/playground.py                       # TorchServe on 8080/8081, key from ./key_file.json
    python scripts/playground.py --front kserve        # the KServe front on 8090, key from $SD_API_KEY if set

Then open http://127.0.0.1:7860. One static page (scripts/playground.html) served by a small FastAPI app (FastAPI and
uvicorn come with the KServe front's extra): prompt, negative prompt, size (the model's full-speed sizes first), steps,
guidance, seed, number of images and the model's LoRA adapters; it shows the images, each image's seed and the time
taken, and a server's error as its message. The page learns the sizes, limits and adapters from the server
(TorchServe: `GET /models/<name>?customized=true` on the management API; the KServe front: `GET
/v2/models/<name>/describe`). The server's keys stay here, on the page's server side: the browser never sees them.
It binds 127.0.0.1 unless told otherwise, and has no key of its own: anyone who reaches it can generate.

Exit codes: 0 stopped; 2 bad arguments.
"""


import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from query import KeyRenewalFailed, ServerUnreachable, current_key, is_token_failure, request  # noqa: E402

PAGE = Path(__file__).resolve().parent / "playground.html"
MAX_IMAGES = 64  # per Generate; the server refuses more than its own batch size anyway


class Server:
    """How to reach one front: its describe and v1 predict URLs, and the key for each call."""

    def __init__(self, args):
        self.args = args
        if args.front == "torchserve":
            url = args.url or "http://127.0.0.1:8080"
            self.predict_url = f"{url.rstrip('/')}/predictions/{args.model}"
            self.describe_url = f"{args.management_url.rstrip('/')}/models/{args.model}?customized=true"
        else:
            url = args.url or "http://127.0.0.1:8090"
            self.predict_url = f"{url.rstrip('/')}/v1/models/{args.model}:predict"
            self.describe_url = f"{url.rstrip('/')}/v2/models/{args.model}/describe"

    def key(self, kind: str) -> str | None:
        if self.args.front == "kserve":
            if self.args.api_key_file:
                return self.args.api_key_file.read_text().strip()
            return os.environ.get("SD_API_KEY") or None
        if not Path(self.args.key_file).is_file():
            return None  # a TorchServe with token authorization off
        return current_key(self.args.key_file, kind, self.args.management_url)

    def call(self, url: str, kind: str, body: bytes | None = None, timeout: float = 600):
        """One request with the key; if TorchServe says the key expired, once more with its successor."""
        status, headers, answer = request(url, self.key(kind), body, body and "application/json", timeout)
        if self.args.front == "torchserve" and is_token_failure(status, answer):
            status, headers, answer = request(url, self.key(kind), body, body and "application/json", timeout)
        return status, answer

    def describe(self) -> tuple[int, dict]:
        status, body = self.call(self.describe_url, "management", timeout=30)
        if status != 200:
            return status, {"error": _message(body)}
        document = json.loads(body)
        if self.args.front == "torchserve":  # a list of model versions, each with the handler's answer
            document = document[0]["customizedMetadata"]
            document = json.loads(document) if isinstance(document, str) else document
        return 200, document

    def generate(self, fields: dict) -> tuple[int, dict]:
        """fields: the page's form (request fields plus `n`). One v1 body of n instances, seeds counting up."""
        fields = {k: v for k, v in fields.items() if v not in (None, "", {})}
        n = fields.pop("n", 1)
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_IMAGES:
            return 400, {"error": f"`n` (images) must be an integer in 1..{MAX_IMAGES}, got {n!r}"[:200]}
        seed = fields.pop("seed", None)
        counted = isinstance(seed, int) and not isinstance(seed, bool)  # anything else goes as is: the server says
        instances = [dict(fields, **({"seed": seed + i} if counted else {} if seed is None else {"seed": seed}))
                     for i in range(n)]
        start = time.perf_counter()
        status, body = self.call(self.predict_url, "inference", json.dumps({"instances": instances}).encode())
        seconds = round(time.perf_counter() - start, 2)
        if status != 200:
            return status, {"error": _message(body), "seconds": seconds}
        images = [{"src": f"data:{p['content_type']};base64,{p['image']['b64']}", "seed": p["seed"]}
                  for p in json.loads(body)["predictions"]]
        return 200, {"images": images, "seconds": seconds}


def _message(body: bytes) -> str:
    """The server's own words: our 400s' message (or KServe's `error`), else the raw text."""
    try:
        document = json.loads(body)
    except ValueError:
        return body.decode("utf-8", "replace")[:500]
    if isinstance(document, dict):
        return str(document.get("message") or document.get("error") or document)[:500]
    return str(document)[:500]


def guarded(action) -> tuple[int, dict]:
    """A server's unexpected answer or absence becomes a readable 502 for the page, never a bare 500."""
    try:
        return action()
    except ServerUnreachable as e:
        return 502, {"error": f"the server cannot be reached: {e}"}
    except (KeyRenewalFailed, OSError, ValueError, KeyError, IndexError, TypeError) as e:
        return 502, {"error": f"the server's answer could not be used ({type(e).__name__}: {str(e)[:200]})"}


def make_app(server: Server, hosts: list[str]):
    from fastapi import FastAPI, Request
    from fastapi.responses import HTMLResponse, JSONResponse
    from starlette.concurrency import run_in_threadpool
    from starlette.middleware.trustedhost import TrustedHostMiddleware

    app = FastAPI(title="Stable Diffusion playground", docs_url=None, redoc_url=None, openapi_url=None)
    # Only this machine's names: a page elsewhere that rebinds its DNS name to 127.0.0.1 cannot read the answers.
    app.add_middleware(TrustedHostMiddleware, allowed_hosts=hosts)

    @app.get("/", response_class=HTMLResponse)
    def page():
        return PAGE.read_text()

    @app.get("/api/model")
    def model():  # a plain def: FastAPI runs it in a thread, so a slow server never blocks the page
        status, document = guarded(server.describe)
        return JSONResponse(document, status_code=status)

    @app.post("/api/generate")
    async def generate(request: Request):
        # JSON only: another site's page can post text/plain or a form here without asking, not application/json.
        if request.headers.get("content-type", "").split(";")[0].strip() != "application/json":
            return JSONResponse({"error": "send application/json"}, status_code=415)
        try:
            fields = await request.json()
        except ValueError:
            return JSONResponse({"error": "the page sent a body that is not JSON"}, status_code=400)
        if not isinstance(fields, dict):
            return JSONResponse({"error": "the page sent a body that is not a JSON object"}, status_code=400)
        status, document = await run_in_threadpool(guarded, lambda: server.generate(fields))
        return JSONResponse(document, status_code=status)

    return app


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--front", choices=("torchserve", "kserve"), default="torchserve",
                        help="which server runs the model (default: %(default)s)")
    parser.add_argument("--url", help="its inference URL (default: http://127.0.0.1:8080, or :8090 for kserve)")
    parser.add_argument("--management-url", default="http://127.0.0.1:8081", help="TorchServe's management URL")
    parser.add_argument("--key-file", default="key_file.json", help="TorchServe's key file (default: %(default)s)")
    parser.add_argument("--api-key-file", type=Path, help="file holding the KServe front's key (default: $SD_API_KEY)")
    parser.add_argument("--model", default="stable-diffusion", help="model name (default: %(default)s)")
    parser.add_argument("--host", default="127.0.0.1", help="address the page listens on (default: %(default)s)")
    parser.add_argument("--port", type=int, default=7860, help="port of the page (default: %(default)s)")
    args = parser.parse_args(argv)
    import uvicorn

    print(f"playground: http://{args.host}:{args.port} -> {args.front}", file=sys.stderr, flush=True)
    hosts = sorted({"127.0.0.1", "localhost", args.host})
    uvicorn.run(make_app(Server(args), hosts), host=args.host, port=args.port, log_level="warning")
    return 0


if __name__ == "__main__":
    sys.exit(main())
