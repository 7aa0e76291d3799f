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
from query import ServerUnreachable, current_key, request  # noqa: E402

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
            return self.args.api_key or os.environ.get("SD_API_KEY") or None
        if not Path(self.args.key_file).is_file():
            return None  # a TorchServe with token authorization off
        return current_key(self.args.key_file, kind, self.args.management_url)

    def describe(self) -> tuple[int, dict]:
        status, _, body = request(self.describe_url, self.key("management"), timeout=30)
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
        instances = [dict(fields, **({"seed": seed + i} if isinstance(seed, int) else {})) for i in range(n)]
        start = time.perf_counter()
        status, headers, body = request(self.predict_url, self.key("inference"),
                                        json.dumps({"instances": instances}).encode(), "application/json")
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


def make_app(server: Server):
    from fastapi import FastAPI, Request
    from fastapi.responses import HTMLResponse, JSONResponse

    app = FastAPI(title="Stable Diffusion playground", docs_url=None, redoc_url=None, openapi_url=None)

    @app.get("/", response_class=HTMLResponse)
    def page():
        return PAGE.read_text()

    @app.get("/api/model")
    def model():
        try:
            status, document = server.describe()
        except ServerUnreachable as e:
            status, document = 502, {"error": f"the server cannot be reached: {e}"}
        return JSONResponse(document, status_code=status)

    @app.post("/api/generate")
    async def generate(request: Request):
        try:
            fields = await request.json()
        except ValueError:
            return JSONResponse({"error": "the page sent a body that is not JSON"}, status_code=400)
        if not isinstance(fields, dict):
            return JSONResponse({"error": "the page sent a body that is not a JSON object"}, status_code=400)
        try:
            status, document = server.generate(fields)
        except ServerUnreachable as e:
            status, document = 502, {"error": f"the server cannot be reached: {e}"}
        return JSONResponse(document, status_code=status)

    return app


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--front", choices=("torchserve", "kserve"), default="torchserve",
                        help="which server runs the model (default: %(default)s)")
    parser.add_argument("--url", help="its inference URL (default: http://127.0.0.1:8080, or :8090 for kserve)")
    parser.add_argument("--management-url", default="http://127.0.0.1:8081", help="TorchServe's management URL")
    parser.add_argument("--key-file", default="key_file.json", help="TorchServe's key file (default: %(default)s)")
    parser.add_argument("--api-key", help="the KServe front's key (default: $SD_API_KEY)")
    parser.add_argument("--model", default="stable-diffusion", help="model name (default: %(default)s)")
    parser.add_argument("--host", default="127.0.0.1", help="address the page listens on (default: %(default)s)")
    parser.add_argument("--port", type=int, default=7860, help="port of the page (default: %(default)s)")
    args = parser.parse_args(argv)
    import uvicorn

    print(f"playground: http://{args.host}:{args.port} -> {args.front}", file=sys.stderr, flush=True)
    uvicorn.run(make_app(Server(args)), host=args.host, port=args.port, log_level="warning")
    return 0


if __name__ == "__main__":
    sys.exit(main())
