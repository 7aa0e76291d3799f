"""KServe's model server as a second front over the engine: v1 and v2 (Open Inference Protocol) over REST, with
the binary tensor extension in and out, v2 over gRPC, health, readiness and model metadata (all KServe's own), and
the OpenAI Images API at /v1/images/generations and /openai/v1/images/generations.

    python handler/sd_kserve.py --model-dir model_store/stable-diffusion      # make serve-kserve

It serves the folder package_model.py writes (`--no-archive`, or a .mar file, extracted once next to it) with the
same model-config.yaml as TorchServe: the `handler:` block configures the engine, and `batchSize`/`maxBatchDelay`
the engine's micro-batcher (KServe's server has none). REST and gRPC listen on 127.0.0.1 unless --host says
otherwise (KServe's own server listens on every interface), on 8090/8091 beside TorchServe's 8080-8082. With an API
key (--api-key-file, or $SD_API_KEY) every route but health, readiness and /metrics needs `Authorization: Bearer
<key>` (gRPC: the `authorization` metadata). On SIGTERM it stops taking requests, finishes those in flight and exits.
"""

from __future__ import annotations

import argparse
import asyncio
import hmac
import json
import logging
import os
import signal
import sys
from pathlib import Path

import numpy as np

from sd_engine.batching import Batcher
from sd_engine.config import EngineConfig
from sd_engine.engine import load_engine, pick_device
from sd_engine.errors import EngineError, InvalidRequest
from sd_engine.loading import model_config, prepare_model_dir, prepare_weights
from sd_engine.openai_images import error_response, generation_response, parse_generation
from sd_engine.protocols import V1, b64, decode, encode_results, v1_response
from sd_engine.requests import FIELDS

import kserve
from fastapi import Request  # at module level: FastAPI resolves the route's annotations in this module
from fastapi.responses import JSONResponse
from kserve.errors import InvalidInput
from kserve.protocol.infer_type import InferOutput, InferRequest, InferResponse, to_http_parameters

logger = logging.getLogger("sd_kserve")
OPEN_PATHS = ("/", "/metrics", "/v2/health/live", "/v2/health/ready")  # probes and Prometheus need no key
DATATYPES = {"prompt": "BYTES", "negative_prompt": "BYTES", "format": "BYTES", "guidance_scale": "FP32"}


class StableDiffusionModel(kserve.Model):
    def __init__(self, name: str, engine, batcher: Batcher, max_images: int):
        super().__init__(name)
        self.engine, self.batcher, self.max_images = engine, batcher, max_images
        self.ready = True

    def get_input_types(self):
        return [{"name": f, "datatype": DATATYPES.get(f, "INT64"), "shape": [-1]} for f in FIELDS]

    def get_output_types(self):
        return [{"name": "image", "datatype": "BYTES", "shape": [-1]},
                {"name": "content_type", "datatype": "BYTES", "shape": [-1]},
                {"name": "seed", "datatype": "INT64", "shape": [-1]}]

    async def predict(self, payload, headers=None, response_headers=None):
        """v1: a dict in, a dict out. v2 (REST or gRPC): an InferRequest, whose binary inputs KServe has decoded."""
        if isinstance(payload, InferRequest):
            body = {"id": payload.id, "parameters": to_http_parameters(payload.parameters or {}), "inputs": [
                {"name": i.name, "datatype": i.datatype, "shape": list(i.shape), "data": _values(i)}
                for i in payload.inputs]}
        elif isinstance(payload, dict) and "instances" in payload:
            body = payload
        else:
            raise InvalidInput('the body must be a v1 {"instances": [...]} or v2 {"inputs": [...]} document')
        try:
            job = decode(body, self.engine.rules, self.max_images)
        except InvalidRequest as error:
            raise InvalidInput(str(error)) from None  # 400 {"error": ...}; gRPC INVALID_ARGUMENT
        images = await self.generate(job.requests)
        if job.protocol == V1:
            return v1_response(images)
        # The image tensor holds the JPEG/PNG bytes themselves where the tensor goes out in binary (gRPC, the binary
        # extension), base64 text in JSON (as TorchServe's front answers).
        raw = _binary_image(payload)
        outputs = [InferOutput("image", [len(images)], "BYTES"), InferOutput("content_type", [len(images)], "BYTES"),
                   InferOutput("seed", [len(images)], "INT64")]
        outputs[0].set_data_from_numpy(np.array([i.payload if raw else b64(i.payload) for i in images], np.object_),
                                       binary_data=raw)
        outputs[1].set_data_from_numpy(np.array([i.content_type for i in images], np.object_), binary_data=False)
        outputs[2].set_data_from_numpy(np.array([i.request.seed for i in images], np.int64), binary_data=False)
        return InferResponse(job.request_id or "", self.name, outputs, from_grpc=payload.from_grpc,
                             use_binary_outputs=payload.use_binary_outputs, requested_outputs=payload.request_outputs)

    async def generate(self, requests):
        """The engine's results for `requests`, encoded; raises the EngineError that fails them."""
        results = await self.batcher.generate(requests)
        if self.engine.device_failure:  # a poisoned CUDA context fails every later call: let the platform restart us
            logger.critical("exiting: the GPU context is lost (%s)", self.engine.device_failure)
            os._exit(1)
        images = encode_results(results)
        if isinstance(images, EngineError):
            raise images
        return images


def _values(tensor) -> list:
    values = tensor.as_numpy().reshape(-1).tolist()
    return [v.decode("utf-8", "replace") if isinstance(v, bytes) else v for v in values]


def _binary_image(payload: InferRequest) -> bool:
    """Whether the image output leaves in binary: always over gRPC; over REST as the client asked (per output, else
    `binary_data_output`), which is how KServe's InferResponse.to_rest decides too."""
    if payload.from_grpc:
        return True
    if payload.request_outputs:
        return any(o.name == "image" and o.binary_data for o in payload.request_outputs)
    return bool(payload.use_binary_outputs)


def add_routes(app, model: StableDiffusionModel, api_key: str | None) -> None:
    """Our error statuses, the OpenAI Images route (at both prefixes) and the key check, on KServe's FastAPI app."""
    async def engine_error(_, error: EngineError):  # 500/503/507 with KServe's error shape
        return JSONResponse({"error": str(error)}, status_code=error.status)

    async def generations(request: Request):
        try:
            body = json.loads(await request.body())
            images = await model.generate(parse_generation(body, model.engine.rules, model.max_images))
        except ValueError as error:  # bad JSON (ValueError), or InvalidRequest naming the field
            status = getattr(error, "status", 400)
            return JSONResponse(error_response(error, status), status_code=status)
        except EngineError as error:
            return JSONResponse(error_response(error, error.status), status_code=error.status)
        return JSONResponse(generation_response(images))

    app.add_exception_handler(EngineError, engine_error)
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


async def serve(model, host: str, http_port: int, grpc_port: int | None, api_key: str | None, grace_s: int) -> None:
    """KServe's REST (and gRPC) servers over `model`, bound to `host`; returns after a graceful SIGTERM/SIGINT."""
    from kserve.constants.constants import FASTAPI_APP_IMPORT_STRING
    from kserve.model_repository import ModelRepository
    from kserve.protocol.dataplane import DataPlane
    from kserve.protocol.model_repository_extension import ModelRepositoryExtension
    from kserve.protocol.rest.server import RESTServer

    registry = ModelRepository()
    registry.update(model)
    dataplane, extension = DataPlane(model_registry=registry), ModelRepositoryExtension(model_registry=registry)
    rest = RESTServer(FASTAPI_APP_IMPORT_STRING, dataplane, extension, http_port, grace_period=grace_s)
    rest.config.host = host  # uvicorn handles SIGTERM: no new connections, in-flight requests finish
    grpc_server = None
    if grpc_port:
        grpc_server = await start_grpc(host, grpc_port, dataplane, extension, api_key)
    await rest.start()
    if grpc_server is not None:
        await grpc_server.stop(grace=grace_s)


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


def log_batch(batch) -> None:
    logger.info("batch of %d image(s) from %d request(s), longest queued %.3f s", batch.images, batch.submissions,
                max(batch.queue_seconds))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", type=Path, required=True, help="package_model.py's folder (or .mar file)")
    parser.add_argument("--model-name", default="stable-diffusion", help="served name (default: %(default)s)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    parser.add_argument("--http-port", type=int, default=8090, help="REST port (default: %(default)s)")
    parser.add_argument("--grpc-port", type=int, default=8091, help="gRPC port, 0 for none (default: %(default)s)")
    parser.add_argument("--api-key-file", type=Path, help="file holding the API key (default: $SD_API_KEY, or none)")
    parser.add_argument("--gpu", type=int, default=0, help="which CUDA GPU to use, when there is one (default: 0)")
    parser.add_argument("--grace-seconds", type=int, default=300,
                        help="on SIGTERM, how long requests in flight may take to finish (default: %(default)s)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    api_key = args.api_key_file.read_text().strip() if args.api_key_file else os.environ.get("SD_API_KEY")

    model_dir = prepare_model_dir(args.model_dir)
    settings = model_config(model_dir)
    config = EngineConfig.from_mapping(settings.get("handler"))
    max_images = int(settings.get("batchSize") or 1)
    device = pick_device(args.gpu if settings.get("deviceType", "gpu") == "gpu" else None)
    engine = load_engine(config, prepare_weights(model_dir, config.weights), device, max_batch_size=max_images)
    batcher = Batcher(engine, max_images, float(settings.get("maxBatchDelay") or 0) / 1000, on_batch=log_batch)
    model = StableDiffusionModel(args.model_name, engine, batcher, max_images)
    import kserve.model_server

    add_routes(kserve.model_server.app, model, api_key)
    logger.info("serving %s on http://%s:%d (gRPC %s), batch %d within %s ms, API key %s", args.model_name, args.host,
                args.http_port, args.grpc_port or "off", max_images, settings.get("maxBatchDelay", 0),
                "on" if api_key else "off")
    # uvicorn handles SIGTERM/SIGINT while it serves (no new connections; in-flight requests finish), then re-raises
    # the signal to the handler it found: this one, so that the queue is drained below and the exit code is 0.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda number, frame: logger.info("signal %d: shutting down", number))
    asyncio.run(serve(model, args.host, args.http_port, args.grpc_port or None, api_key, args.grace_seconds))
    batcher.close()  # the server let in-flight requests finish; anything still queued finishes here
    logger.info("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
