"""The KServe front's server side: KServe's REST and gRPC servers bound where we say, our routes (the OpenAI Images
API, errors with our statuses, the API key check) on its FastAPI app, and our metrics beside KServe's own.

KServe 0.21's ModelServer listens on every interface; FrontServer runs the same REST server (RESTServer) and gRPC
service on one address instead, in a background thread, so that the engine can keep the main thread (see
sd_engine/batching.py), and stops them gracefully on request: no new connections, requests in flight finish.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import threading

from fastapi import Request  # at module level: FastAPI resolves the route's annotations in this module
from fastapi.responses import JSONResponse

from sd_engine.errors import EngineError
from sd_engine.openai_images import error_response, generation_response, parse_generation

OPEN_PATHS = ("/", "/metrics", "/v2/health/live", "/v2/health/ready")  # probes and Prometheus need no key
MAX_REQUEST_BYTES = 1 << 20  # as TorchServe's max_request_size: prompts and numbers, never images


class BodyLimit:
    """ASGI middleware: a body over `limit` bytes gets a 413 with the error shape, before it is read into memory
    (uvicorn itself has no limit). A declared Content-Length is refused at once; a chunked body once it passes it."""

    def __init__(self, app, limit: int = MAX_REQUEST_BYTES):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await self.refuse(send, int(declared))
        received, started = 0, False

        async def counted():
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.limit:
                raise _TooLarge()
            return message

        async def tracked(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted, tracked)
        except _TooLarge:
            if not started:
                await self.refuse(send, received)

    async def refuse(self, send, size: int) -> None:
        body = json.dumps({"error": f"`body` must be at most {self.limit} bytes, got {size} or more"}).encode()
        await send({"type": "http.response.start", "status": 413, "headers": [
            (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
            (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})


class _TooLarge(Exception):
    pass


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

    def batch_started(self, batch) -> None:
        self.batch.observe(batch.images)
        for seconds in batch.queue_seconds:
            self.queue.observe(seconds)

    def delivered(self, results) -> None:
        self.images.labels("ok").inc(len(results))
        for result in results:
            self.generation.observe(result.seconds)
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
            body = json.loads(await request.body())
            requests = parse_generation(body, model.engine.rules, model.max_images)
        except ValueError as error:  # bad JSON (ValueError), or InvalidRequest naming the field
            model.metrics.images.labels("invalid").inc()
            return JSONResponse(error_response(error, 400), status_code=400)
        try:
            images = await model.generate(requests)
        except EngineError as error:
            return JSONResponse(error_response(error, error.status), status_code=error.status)
        return JSONResponse(generation_response(images))

    app.add_exception_handler(EngineError, engine_error)
    app.add_middleware(BodyLimit)
    for prefix in ("/v1", "/openai/v1"):
        app.add_api_route(f"{prefix}/images/generations", generations, methods=["POST"])

    @app.middleware("http")
    async def json_by_default(request: Request, call_next):
        """A v2 body with neither a JSON content type nor the binary extension's header is JSON: tritonclient sends
        its JSON-only requests so, and KServe 0.21 would take them for binary ones (400)."""
        headers = dict(request.scope["headers"])
        if request.url.path.endswith("/infer") and b"inference-header-content-length" not in headers and \
                not headers.get(b"content-type", b"").startswith(b"application/json"):
            headers[b"content-type"] = b"application/json"
            request.scope["headers"] = list(headers.items())
        return await call_next(request)
    if api_key:
        @app.middleware("http")
        async def require_key(request: Request, call_next):
            supplied = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
            if request.url.path in OPEN_PATHS or request.url.path.endswith("/ready") or \
                    hmac.compare_digest(supplied.encode(), api_key.encode()):
                return await call_next(request)
            return JSONResponse({"error": "missing or wrong API key (Authorization: Bearer <key>)"}, status_code=401)


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

    class RequireKey(grpc.aio.ServerInterceptor):
        async def intercept_service(self, continuation, details):
            supplied = dict(details.invocation_metadata or ()).get("authorization", "").removeprefix("Bearer ")
            if details.method.endswith(("/ServerLive", "/ServerReady", "/ModelReady")) or \
                    hmac.compare_digest(supplied.strip().encode(), api_key.encode()):
                return await continuation(details)

            async def refuse(request, context):
                await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong API key (authorization)")
            return grpc.unary_unary_rpc_method_handler(refuse)

    interceptors = [ExceptionToStatusInterceptor()] + ([RequireKey()] if api_key else [])
    server = grpc.aio.server(interceptors=interceptors)
    grpc_predict_v2_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(InferenceServicer(dataplane, extension),
                                                                       server)
    server.add_insecure_port(f"{host}:{port}")
    await server.start()
    return server
