"""The KServe front's server side: KServe's REST and gRPC servers bound where we say, our routes (the OpenAI Images
API, errors with our statuses, the API key check) on its FastAPI app, and our metrics beside KServe's own.

KServe 0.21's ModelServer listens on every interface; FrontServer runs the same REST server (RESTServer) and gRPC
service on one address instead, in a background thread, so that the engine can keep the main thread (see
sd_engine/batching.py), and stops them gracefully on request: no new connections, requests in flight finish.
"""

from __future__ import annotations

import argparse
import asyncio
import hmac
import json
import threading

from pathlib import Path

from fastapi import Request  # at module level: FastAPI resolves the route's annotations in this module
from fastapi.responses import JSONResponse

from sd_engine.binary_tensors import decode_body
from sd_engine.errors import EngineError, InvalidRequest
from sd_engine.openai_images import error_response, generation_response, parse_generation
from sd_engine.requests import describe, parse_body

OPEN_PATHS = ("/", "/metrics", "/v2/health/live", "/v2/health/ready")  # probes and Prometheus need no key
MAX_REQUEST_BYTES = 1 << 20  # as TorchServe's max_request_size: prompts and numbers, never images


class RequestShaper:
    """ASGI middleware, before the app reads anything:
    - a body over `limit` bytes gets a 413 with the error shape, never read into memory whole (uvicorn has no limit);
      a declared Content-Length at once, a chunked body once it passes the limit;
    - a v2 body in the binary tensor extension is decoded by sd_engine.binary_tensors (malformed: a 400 naming
      where) and handed on as JSON: KServe 0.21's own decoder answers such mistakes with 500s or accepts them;
    - a v2 body with neither a JSON content type nor that extension's header is JSON (tritonclient's JSON mode);
    - the model repository API (load/unload, which would take the model away from a pod that stays ready) is off."""

    def __init__(self, app, limit: int = MAX_REQUEST_BYTES):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if scope["path"].startswith("/v2/repository"):
            return await answer(send, 403, "the model repository API is off on this server")
        headers = dict(scope["headers"])
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await answer(send, 413, f"`body` must be at most {self.limit} bytes, got {int(declared)}")
        body, more = b"", True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.limit:
                return await answer(send, 413, f"`body` must be at most {self.limit} bytes, got {len(body)} or more")
        if scope["path"].endswith("/infer"):
            json_length = headers.pop(b"inference-header-content-length", None)
            if json_length is not None:
                try:
                    body = json.dumps(decode_body(body, json_length.decode("latin-1"))).encode()
                except InvalidRequest as error:
                    return await answer(send, 400, str(error))
            if json_length is not None or not headers.get(b"content-type", b"").startswith(b"application/json"):
                headers[b"content-type"] = b"application/json"
                headers[b"content-length"] = str(len(body)).encode()
                scope = dict(scope, headers=list(headers.items()))
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()  # after the body: wait for a disconnect, as the app may
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)


async def answer(send, status: int, message: str) -> None:
    body = json.dumps({"error": message}).encode()
    await send({"type": "http.response.start", "status": status, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
        (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


def bearer(value: str) -> str:
    """The token of an `Authorization: Bearer <token>` value (the scheme in any case), else ""."""
    scheme, _, token = value.strip().partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


class Metrics:
    """Ours, on /metrics beside KServe's own request latencies, named as the TorchServe front's (config/metrics.yaml)
    so that one set of queries serves both fronts."""

    def __init__(self):
        from prometheus_client import Counter, Gauge, Histogram

        seconds = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64)
        self.images = Counter("ImagesGenerated", "images delivered (ok) or failed (invalid, failed, out_of_memory)",
                              ["Status"])
        self.generation = Histogram("GenerationSeconds", "a request's engine call", buckets=seconds)
        self.queue = Histogram("QueueSeconds", "how long a request waited for the engine", buckets=seconds)
        self.batch = Histogram("BatchSize", "images per engine call", buckets=(1, 2, 4, 8, 16, 32, 64))
        self.peak = Gauge("PeakGPUMemory", "peak GPU memory (MB) of the last engine call")
        self.lora_switch = Histogram("LoraSwitchSeconds", "a pipeline call's switch of the fused LoRA adapter set",
                                     buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1))

    def batch_started(self, batch) -> None:
        self.batch.observe(batch.images)
        for seconds in batch.queue_seconds:
            self.queue.observe(seconds)

    def delivered(self, results) -> None:
        self.images.labels("ok").inc(len(results))
        for result in results:
            self.generation.observe(result.seconds)
            if result.stage_seconds.get("lora_switch"):  # on a pipeline call's first result only
                self.lora_switch.observe(result.stage_seconds["lora_switch"])
        peaks = [r.peak_memory_bytes for r in results if r.peak_memory_bytes is not None]
        if peaks:
            self.peak.set(max(peaks) / 2**20)

    def failed(self, error: EngineError, count: int = 1) -> None:
        status = {400: "invalid", 507: "out_of_memory"}.get(error.status, "failed")
        self.images.labels(status).inc(count)


def add_routes(app, model, api_key: str | None) -> None:
    """Our error statuses, the OpenAI Images route (at both prefixes) and the key check, on KServe's FastAPI app."""
    async def engine_error(_, error: EngineError):  # 500/503/507 with KServe's error shape
        return JSONResponse({"error": str(error)}, status_code=error.status)

    async def generations(request: Request):
        try:
            body = parse_body(await request.body(), declared_json=True)
            requests = parse_generation(body, model.engine.rules, model.max_images)
        except InvalidRequest as error:
            model.metrics.failed(error)
            return JSONResponse(error_response(error, 400), status_code=400)
        try:
            images = await model.generate(requests)
        except EngineError as error:
            return JSONResponse(error_response(error, error.status), status_code=error.status)
        return JSONResponse(generation_response(images))

    async def describe_model():  # as TorchServe's GET /models/<name>?customized=true gives it
        return JSONResponse(describe(model.engine.rules, model.max_images))

    app.add_exception_handler(EngineError, engine_error)
    app.add_api_route(f"/v2/models/{model.name}/describe", describe_model, methods=["GET"])
    for prefix in ("/v1", "/openai/v1"):
        app.add_api_route(f"{prefix}/images/generations", generations, methods=["POST"])
    if api_key:
        open_paths = OPEN_PATHS + (f"/v2/models/{model.name}/ready",)

        @app.middleware("http")
        async def require_key(request: Request, call_next):
            if request.url.path in open_paths or \
                    hmac.compare_digest(bearer(request.headers.get("authorization", "")).encode(), api_key.encode()):
                return await call_next(request)
            return JSONResponse({"error": "missing or wrong API key (Authorization: Bearer <key>)"}, status_code=401)
    app.add_middleware(RequestShaper)  # added last: outermost, so the body limit holds before anything reads it


class FrontServer:
    """KServe's REST (and gRPC) servers over `model`, bound to `host`, in a thread of their own."""

    def __init__(self, model, host: str, http_port: int, grpc_port: int | None, api_key: str | None, grace_s: int):
        from kserve.constants.constants import FASTAPI_APP_IMPORT_STRING
        from kserve.model_repository import ModelRepository
        from kserve.protocol.dataplane import DataPlane
        from kserve.protocol.model_repository_extension import ModelRepositoryExtension
        from kserve.protocol.rest.server import RESTServer

        registry = ModelRepository()
        registry.update(model)
        self.dataplane = DataPlane(model_registry=registry)
        self.extension = ModelRepositoryExtension(model_registry=registry)
        self.rest = RESTServer(FASTAPI_APP_IMPORT_STRING, self.dataplane, self.extension, http_port,
                               grace_period=grace_s)
        self.rest.config.host = host
        self.host, self.grpc_port, self.api_key, self.grace_s = host, grpc_port, api_key, grace_s
        self.thread: threading.Thread | None = None
        self.failure: BaseException | None = None

    def start(self, on_exit) -> None:
        """Serve in the background; `on_exit` is called (in that thread) once the servers have stopped."""
        def run():
            try:
                asyncio.run(self._serve())
            except BaseException as e:  # noqa: BLE001 - reported to the main thread, which exits with it
                self.failure = e
            finally:
                on_exit()
        self.thread = threading.Thread(target=run, name="sd-kserve-server")
        self.thread.start()

    def stop(self) -> None:
        """Graceful: uvicorn stops accepting and lets requests in flight finish (up to grace_s). Thread-safe."""
        self.rest._server.should_exit = True

    async def _serve(self) -> None:
        grpc_server = None
        if self.grpc_port:
            grpc_server = await start_grpc(self.host, self.grpc_port, self.dataplane, self.extension, self.api_key)
        await self.rest.start()  # returns once stop() was called and the requests in flight are answered
        if grpc_server is not None:
            await grpc_server.stop(grace=self.grace_s)


async def start_grpc(host: str, port: int, dataplane, extension, api_key: str | None):
    """KServe's v2 gRPC service on `host` (its GRPCServer binds every interface), with the key check."""
    import grpc
    from kserve.protocol.grpc import grpc_predict_v2_pb2_grpc
    from kserve.protocol.grpc.interceptors import ExceptionToStatusInterceptor
    from kserve.protocol.grpc.servicer import InferenceServicer

    class Guard(grpc.aio.ServerInterceptor):
        """No model repository calls (as on REST); with an API key, no calls without it but health and readiness."""

        async def intercept_service(self, continuation, details):
            if "/RepositoryModel" in details.method:
                return refusal(grpc.StatusCode.PERMISSION_DENIED, "the model repository API is off on this server")
            supplied = bearer(dict(details.invocation_metadata or ()).get("authorization", ""))
            if not api_key or details.method.endswith(("/ServerLive", "/ServerReady", "/ModelReady")) or \
                    hmac.compare_digest(supplied.encode(), api_key.encode()):
                return await continuation(details)
            return refusal(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong API key (authorization)")

    def refusal(code, message):
        async def refuse(request, context):
            await context.abort(code, message)
        return grpc.unary_unary_rpc_method_handler(refuse)

    server = grpc.aio.server(interceptors=[ExceptionToStatusInterceptor(), Guard()],
                             options=[("grpc.max_receive_message_length", MAX_REQUEST_BYTES)])
    grpc_predict_v2_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(InferenceServicer(dataplane, extension),
                                                                       server)
    server.add_insecure_port(f"{host}:{port}")
    await server.start()
    return server


def argument_parser(description: str = "") -> argparse.ArgumentParser:
    """sd_kserve.py's command line (here, so that it can be read without importing kserve)."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", type=Path, required=True, help="package_model.py's folder (or .mar file)")
    parser.add_argument("--model-name", default="stable-diffusion", help="served name (default: %(default)s)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    parser.add_argument("--http-port", type=int, default=8090, help="REST port (default: %(default)s)")
    parser.add_argument("--grpc-port", type=int, default=8091, help="gRPC port, 0 for none (default: %(default)s)")
    parser.add_argument("--api-key-file", type=Path, help="file holding the API key (default: $SD_API_KEY, or none)")
    parser.add_argument("--gpu", type=int, default=0, help="which CUDA GPU to use, when there is one (default: 0)")
    parser.add_argument("--grace-seconds", type=int, default=300,
                        help="on SIGTERM, how long requests in flight may take to finish (default: %(default)s)")
    return parser
