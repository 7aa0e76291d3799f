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

import logging
import os
import signal
import sys

import numpy as np

from sd_engine.batching import Batcher
from sd_engine.config import EngineConfig
from sd_engine.engine import load_engine, pick_device
from sd_engine.errors import EngineError, InvalidRequest
from sd_engine.jit_caches import use_jit_caches
from sd_engine.loading import model_config, prepare_model_dir, prepare_weights, weights_source
from sd_engine.protocols import V1, b64, decode, encode_results, v1_response
from sd_engine.requests import FIELDS

import kserve
from kserve.errors import InvalidInput
from kserve.protocol.infer_type import InferOutput, InferRequest, InferResponse, to_http_parameters
from sd_kserve_server import FrontServer, Metrics, add_routes, argument_parser

logger = logging.getLogger("sd_kserve")
DATATYPES = {"prompt": "BYTES", "negative_prompt": "BYTES", "format": "BYTES", "loras": "BYTES",  # loras: JSON text
             "guidance_scale": "FP32"}


class StableDiffusionModel(kserve.Model):
    def __init__(self, name: str, engine, batcher: Batcher, max_images: int, metrics: Metrics):
        super().__init__(name)
        self.engine, self.batcher, self.max_images, self.metrics = engine, batcher, max_images, metrics
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
                for i in payload.inputs], "outputs": [{"name": o.name, "parameters": to_http_parameters(
                    o.parameters or {})} for o in payload.request_outputs or []]}
        elif isinstance(payload, dict) and "instances" in payload:
            body = payload
        else:
            raise InvalidInput('the body must be a v1 {"instances": [...]} or v2 {"inputs": [...]} document')
        try:
            job = decode(body, self.engine.rules, self.max_images)
        except InvalidRequest as error:
            self.metrics.failed(error)
            raise InvalidInput(str(error)) from None  # 400 {"error": ...}; gRPC INVALID_ARGUMENT
        images = await self.generate(job.requests)
        if job.protocol == V1:
            return v1_response(images)
        # The image tensor holds the JPEG/PNG bytes themselves where the tensor goes out in binary (always over gRPC;
        # over REST as the client asked, which is how KServe's InferResponse.to_rest decides too), base64 text in
        # JSON (as TorchServe's front answers).
        raw = payload.from_grpc or bool({"*", "image"} & set(job.binary_outputs))
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
            self.metrics.failed(images, len(requests))
            raise images
        self.metrics.delivered(results)
        return images


def _values(tensor) -> list:
    values = tensor.as_numpy().reshape(-1).tolist()
    return [v.decode("utf-8", "replace") if isinstance(v, bytes) else v for v in values]


def batch_started(metrics: Metrics, batch) -> None:
    metrics.batch_started(batch)
    logger.info("batch of %d image(s) from %d request(s), longest queued %.3f s", batch.images, batch.submissions,
                max(batch.queue_seconds))


def main(argv=None) -> int:
    args = argument_parser(__doc__).parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    api_key = args.api_key_file.read_text().strip() if args.api_key_file else os.environ.get("SD_API_KEY")
    if api_key is not None and not api_key.strip():  # an unpopulated secret must not open the server
        print(f"error: the API key ({args.api_key_file or '$SD_API_KEY'}) is empty", file=sys.stderr)
        return 2

    model_dir = prepare_model_dir(args.model_dir)
    settings = model_config(model_dir)
    config = EngineConfig.from_mapping(settings.get("handler"))
    max_images = int(settings.get("batchSize") or 1)
    # The JIT caches before anything may start CUDA, the imports beside the weights' check included (sd_handler.py).
    use_jit_caches(config.cache_dir, weights_source(model_dir, config.weights))
    weights = prepare_weights(model_dir, config.weights)
    device = pick_device(args.gpu if settings.get("deviceType", "gpu") == "gpu" else None)
    engine = load_engine(config, weights, device, max_batch_size=max_images)
    metrics = Metrics()
    # The engine runs on this (the main) thread, the servers on another: see sd_engine/batching.py.
    batcher = Batcher(engine, max_images, float(settings.get("maxBatchDelay") or 0) / 1000,
                      on_batch=lambda batch: batch_started(metrics, batch), start=False,
                      max_queued=int(settings.get("jobQueueSize") or 64))  # past it: 503, as TorchServe answers
    model = StableDiffusionModel(args.model_name, engine, batcher, max_images, metrics)
    import kserve.model_server

    add_routes(kserve.model_server.app, model, api_key)
    server = FrontServer(model, args.host, args.http_port, args.grpc_port or None, api_key, args.grace_seconds)

    def shut_down(number, frame):  # SIGTERM (a scale-down) or SIGINT: no new requests, those in flight finish
        logger.info("signal %d: shutting down", number)
        server.stop()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, shut_down)
    logger.info("serving %s on http://%s:%d (gRPC %s), batch %d within %s ms, API key %s", args.model_name, args.host,
                args.http_port, args.grpc_port or "off", max_images, settings.get("maxBatchDelay", 0),
                "on" if api_key else "off")
    server.start(on_exit=batcher.close)  # once the servers stop, the engine loop drains the queue and returns
    try:
        batcher.run()
    except BaseException:  # noqa: BLE001 - without its engine loop the server must not stay up, listed ready
        logger.exception("the engine loop failed; exiting")
        os._exit(1)
    server.thread.join()
    if server.failure is not None:
        logger.error("the server failed: %r", server.failure)
        return 1
    logger.info("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
