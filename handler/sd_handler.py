"""TorchServe adapter for sd_engine: context -> engine config, requests <-> engine, errors -> per-request statuses.

TorchServe imports this module by its bare name and needs exactly one class defined in it. It ships in the MAR next to
the `sd_engine/` package, which the worker finds on its path (the model dir). Every request gets its own status:
a bad request answers 400 with a JSON body naming the field while the rest of its batch still gets images, and no
exception escapes `handle`, since TorchServe would fail the whole batch with it. A request is the plain API (an
image back) or a KServe v1/v2 body (sd_engine.protocols: JSON with base64 images, several per body).
"""

import json
import logging
import os
import sys
import time

from ts.metrics.dimension import Dimension
from ts.metrics.metric_type_enum import MetricTypes

from sd_engine.binary_tensors import HEADER as BINARY_HEADER
from sd_engine.binary_tensors import decode_body, encode_answer
from sd_engine.config import EngineConfig
from sd_engine.engine import load_engine, pick_device
from sd_engine.errors import AnswerTooLarge, EngineError, GenerationError, InvalidRequest
from sd_engine.jit_caches import use_jit_caches
from sd_engine.loading import prepare_weights, weights_source
from sd_engine.protocols import (ENVELOPE_V2, MAX_ANSWER_BYTES, MAX_IMAGES_PER_BODY, PLAIN, V1, V2, b64, decode,
                                 encode_results, error_body, from_envelope_tensors, is_envelope_tensor, protocol_of,
                                 v1_response, v2_response)
from sd_engine.requests import describe, parse_body

logger = logging.getLogger(__name__)

STATUS_PHRASES = {400: "Bad Request", 413: "Content Too Large", 500: "Internal Server Error",
                  507: "Insufficient Storage"}


class StableDiffusionHandler:
    def __init__(self):
        self.engine = None
        self.initialized = False

    def initialize(self, context):
        properties = context.system_properties
        yaml_config = context.model_yaml_config or {}
        config = EngineConfig.from_mapping(yaml_config.get("handler"))
        # The JIT caches (the driver's among them) before anything may start CUDA, the imports beside the weights'
        # check included; the driver's is seeded from the weights' checked copy.
        use_jit_caches(config.cache_dir, weights_source(properties["model_dir"], config.weights))
        weights = prepare_weights(properties["model_dir"], config.weights)
        device = pick_device(properties.get("gpu_id"))
        self.engine = load_engine(config, weights, device, max_batch_size=int(properties.get("batch_size") or 1))
        self.initialized = True

    def handle(self, data, context):
        start = time.perf_counter()
        if context.get_request_header(0, "describe") == "True":  # GET /models/<name>?customized=true (management)
            return [json.dumps(describe(self.engine.rules, self.engine.max_batch_size or MAX_IMAGES_PER_BODY))]
        if data and all(is_envelope_tensor(item) for item in data):
            return self._handle_envelope(data, context)
        responses = [None] * len(data)
        jobs = []  # (row index, Decoded): a row is one HTTP request, which may ask for several images (KServe)
        max_images = self.engine.max_batch_size or MAX_IMAGES_PER_BODY
        for i, item in enumerate(data):
            protocol = PLAIN
            try:
                body, json_length = _body(item), _request_header(context, i, BINARY_HEADER)
                if json_length is not None:  # the v2 binary tensor extension (tritonclient's default)
                    fields = decode_body(bytes(body) if isinstance(body, (bytes, bytearray)) else
                                         str(body).encode("utf-8"), json_length)
                else:
                    fields = parse_body(body, _declared_json(context, i))
                protocol = protocol_of(fields)
                jobs.append((i, decode(fields, self.engine.rules, max_images)))
            except InvalidRequest as error:
                responses[i] = _error(context, i, error, protocol)
                _count(context, "invalid")
            except Exception as e:  # noqa: BLE001 - a body the checks above did not foresee: our bug, its row only
                logger.exception("request %d of the batch could not be read", i)
                responses[i] = _error(context, i, EngineError(f"the request could not be read ({type(e).__name__}); "
                                                              "see the server log"), protocol)
                _count(context, "failed")

        results = self._generate([request for _, job in jobs for request in job.requests])
        self._exit_if_device_lost()  # before anything is counted as delivered: TorchServe will fail the whole batch
        for i, job in jobs:
            own, results = results[:len(job.requests)], results[len(job.requests):]
            images = self._encode(context, own)
            if isinstance(images, EngineError):
                responses[i] = _error(context, i, images, job.protocol)
            else:
                responses[i] = _answer(context, i, job, images)
        if context.metrics is not None:
            context.metrics.add_metric("BatchSize", len(data), "Count", None, [], MetricTypes.HISTOGRAM)
        logger.info("batch of %d handled in %.3f s", len(data), time.perf_counter() - start)
        return responses

    def _exit_if_device_lost(self):
        """A worker whose CUDA context is poisoned would answer 500 to everything while TorchServe lists it READY.
        Exiting makes TorchServe answer this batch with 500s and start a fresh worker (a new CUDA context)."""
        if self.engine.device_failure:
            logger.critical("exiting so that TorchServe restarts this worker: %s", self.engine.device_failure)
            exit_worker(1)

    def _handle_envelope(self, tensors, context):
        """TorchServe's kservev2 envelope is on: `tensors` are the first request's inputs, and the envelope wraps
        what this returns as that request's outputs, so answer strings: the base64 image, or the error's JSON."""
        try:
            job = from_envelope_tensors(tensors, self.engine.rules)
        except InvalidRequest as error:
            _count(context, "invalid")
            return [_error(context, 0, error, ENVELOPE_V2).decode("utf-8")]
        results = self._generate(job.requests)
        self._exit_if_device_lost()  # as in handle(): before anything is counted
        images = self._encode(context, results)
        if isinstance(images, EngineError):
            return [_error(context, 0, images, ENVELOPE_V2).decode("utf-8")]
        _count(context, "ok")
        return [b64(images[0].payload)]

    def _generate(self, requests):
        try:
            return self.engine.generate(requests)
        except Exception:  # noqa: BLE001 - the engine answers per group; this is the last guard for the batch
            logger.exception("unexpected engine failure for a batch of %d", len(requests))
            return [GenerationError("generation failed; see the server log")] * len(requests)

    def _encode(self, context, results):
        """One HTTP request's images, encoded; or the error that fails the request (its first failure)."""
        failed = [result for result in results if isinstance(result, EngineError)]
        for failure in failed:
            _count(context, "out_of_memory" if failure.status == 507 else "failed")
        images = encode_results(results)
        if isinstance(images, EngineError):
            if not failed:  # the encoding failed
                _count(context, "failed")
            return images
        for result, image in zip(results, images):
            _observe(context, result, image.encode_seconds)
        return images


def _answer(context, index, job, images):
    """The plain API answers with the image itself; KServe bodies with a JSON document holding all their images."""
    if job.protocol in (V1, V2):
        model = (context.manifest or {}).get("model", {})
        content_type, header_length = "application/json", None
        if job.protocol == V1:
            document = _json(v1_response(images))
        elif job.binary_outputs:
            document, header_length = encode_answer(v2_response(images, model.get("modelName", ""),
                                                                model.get("modelVersion"), job.request_id),
                                                    job.binary_outputs, [image.payload for image in images])
            content_type = "application/octet-stream"
        else:
            document = _json(v2_response(images, model.get("modelName", ""), model.get("modelVersion"),
                                         job.request_id))
        if len(document) > MAX_ANSWER_BYTES:  # TorchServe would drop the whole batch's message and the worker
            _count(context, "too_large", len(images))
            return _error(context, index, AnswerTooLarge(
                f"the answer would be {len(document) / 2**20:.1f} MiB of images, over the "
                f"{MAX_ANSWER_BYTES / 2**20:.0f} MiB limit; ask for fewer or smaller images, or JPEG"), job.protocol)
        context.set_response_content_type(index, content_type)
        if header_length is not None:
            context.set_response_header(index, "Inference-Header-Content-Length", str(header_length))
        _count(context, "ok", len(images))
        return document
    image = images[0]
    _count(context, "ok")
    context.set_response_content_type(index, image.content_type)
    context.set_response_header(index, "X-Seed", str(image.request.seed))
    if image.truncated:
        context.set_response_header(index, "X-Prompt-Truncated", ",".join(image.truncated))
    # engine: the pipeline call this request was part of; encode: its JPEG/PNG encoding (W3C Server-Timing).
    context.set_response_header(index, "Server-Timing", f"engine;dur={image.seconds * 1000:.1f}, "
                                                        f"encode;dur={image.encode_seconds * 1000:.1f}")
    return image.payload


def exit_worker(code: int) -> None:
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # not SystemExit: TorchServe's worker loop must not get a chance to carry on


def _body(item):
    # TorchServe puts the request body under "body" (or "data"); JSON arrives parsed, text/* as str, else bytes.
    # A form-encoded body (curl -d without a Content-Type) arrives split into form fields instead.
    if not isinstance(item, dict):
        return item
    body = item.get("body", item.get("data"))
    if body is None:
        raise InvalidRequest("body", "form fields" if item else "nothing",
                             "must be JSON (Content-Type: application/json) or plain text, not form-encoded or empty")
    return body


# Metrics (declared in config/metrics.yaml; Prometheus on the metrics port). Histograms give P50/P95 in Prometheus.
def _count(context, status: str, images: int = 1) -> None:
    if context.metrics is not None:
        context.metrics.add_counter("ImagesGenerated", images, None, [Dimension("Status", status)])


def _observe(context, result, encode_seconds: float) -> None:
    if context.metrics is None:
        return
    seconds = {"GenerationSeconds": result.seconds, "EncodeSeconds": encode_seconds,
               "TextEncoderSeconds": result.stage_seconds.get("text_encoder"),
               "DenoiseSeconds": result.stage_seconds.get("denoise"), "VaeSeconds": result.stage_seconds.get("vae"),
               "LoraSwitchSeconds": result.stage_seconds.get("lora_switch")}
    for name, value in seconds.items():
        if value is not None:
            context.metrics.add_metric(name, value, "Seconds", None, [], MetricTypes.HISTOGRAM)
    if result.stage_seconds.get("denoise"):
        steps_per_second = result.request.num_inference_steps / result.stage_seconds["denoise"]
        context.metrics.add_metric("StepsPerSecond", steps_per_second, "Count", None, [], MetricTypes.GAUGE)
    if result.peak_memory_bytes is not None:
        context.metrics.add_metric("PeakGPUMemory", result.peak_memory_bytes / 2**20, "Megabytes", None, [],
                                   MetricTypes.GAUGE)


def _request_header(context, index, name: str):
    """An HTTP request header of row `index`, whatever its case."""
    if not context.request_processor:
        return None
    headers = context.request_processor[index].get_request_properties() or {}
    return next((value for key, value in headers.items() if isinstance(key, str) and key.lower() == name), None)


def _declared_json(context, index) -> bool:
    # TorchServe keeps each body parameter's own content type as a request header named after the parameter.
    parameter = context.get_request_header(index, "body") if context.request_processor else None
    content_type = parameter.get("content-type", "") if isinstance(parameter, dict) else ""
    return content_type.split(";")[0].strip().lower() == "application/json"


def _error(context, index, error, protocol=PLAIN):
    """A JSON error at this index: ours names the field and value; KServe's protocols want {"error": message}."""
    context.set_response_status(error.status, STATUS_PHRASES.get(error.status, "Error"), idx=index)
    context.set_response_content_type(index, "application/json")
    return _json(error.to_dict() if protocol == PLAIN else error_body(str(error)))


def _json(document) -> bytes:
    return json.dumps(document, allow_nan=False).encode("utf-8")
