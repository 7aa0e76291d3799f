"""TorchServe adapter for sd_engine: context -> engine config, requests <-> engine, errors -> per-request statuses.

TorchServe imports this module by its bare name and needs exactly one class defined in it. It ships in the MAR next to
the `sd_engine/` package, which the worker finds on its path (the model dir). Every request gets its own status:
a bad request answers 400 with a JSON body naming the field while the rest of its batch still gets images, and no
exception escapes `handle`, since TorchServe would fail the whole batch with it.
"""

import json
import logging
import time

from ts.metrics.dimension import Dimension
from ts.metrics.metric_type_enum import MetricTypes

from sd_engine.config import EngineConfig
from sd_engine.engine import load_engine, pick_device
from sd_engine.errors import EngineError, GenerationError, InvalidRequest
from sd_engine.imaging import encode_image
from sd_engine.loading import prepare_weights
from sd_engine.requests import parse_request

logger = logging.getLogger(__name__)

STATUS_PHRASES = {400: "Bad Request", 500: "Internal Server Error", 507: "Insufficient Storage"}


class StableDiffusionHandler:
    def __init__(self):
        self.engine = None
        self.initialized = False

    def initialize(self, context):
        properties = context.system_properties
        yaml_config = context.model_yaml_config or {}
        config = EngineConfig.from_mapping(yaml_config.get("handler"))
        device = pick_device(properties.get("gpu_id"))
        weights = prepare_weights(properties["model_dir"], config.weights)
        self.engine = load_engine(config, weights, device, max_batch_size=int(properties.get("batch_size") or 1))
        self.initialized = True

    def handle(self, data, context):
        start = time.perf_counter()
        responses = [None] * len(data)
        parsed = []
        for i, item in enumerate(data):
            try:
                parsed.append((i, parse_request(_body(item), self.engine.config, _declared_json(context, i))))
            except InvalidRequest as error:
                responses[i] = _error(context, i, error)
                _count(context, "invalid")

        try:
            results = self.engine.generate([request for _, request in parsed])
        except Exception:  # noqa: BLE001 - the engine answers per group; this is the last guard for the batch
            logger.exception("unexpected engine failure for a batch of %d", len(parsed))
            results = [GenerationError("generation failed; see the server log")] * len(parsed)
        ok = 0
        for (i, request), result in zip(parsed, results):
            if isinstance(result, EngineError):
                responses[i] = _error(context, i, result)
                _count(context, "out_of_memory" if result.status == 507 else "failed")
                continue
            encode_start = time.perf_counter()
            try:
                payload, content_type = encode_image(result.image, request.format, request.quality)
            except Exception:  # noqa: BLE001 - one image's encoding must not fail its batch
                logger.exception("encoding a %s image failed", request.format)
                responses[i] = _error(context, i, GenerationError("encoding the image failed; see the server log"))
                _count(context, "failed")
                continue
            encode_ms = (time.perf_counter() - encode_start) * 1000
            context.set_response_content_type(i, content_type)
            context.set_response_header(i, "X-Seed", str(request.seed))
            if result.truncated:
                context.set_response_header(i, "X-Prompt-Truncated", ",".join(result.truncated))
            # engine: the pipeline call this request was part of; encode: its JPEG/PNG encoding (W3C Server-Timing).
            context.set_response_header(i, "Server-Timing",
                                        f"engine;dur={result.seconds * 1000:.1f}, encode;dur={encode_ms:.1f}")
            responses[i] = payload
            ok += 1
            _count(context, "ok")
            _observe(context, result, encode_ms / 1000)
        if context.metrics is not None:
            context.metrics.add_metric("BatchSize", len(data), "Count", None, [], MetricTypes.HISTOGRAM)
        logger.info("batch of %d handled in %.3f s, %d ok", len(data), time.perf_counter() - start, ok)
        return responses


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
def _count(context, status: str) -> None:
    if context.metrics is not None:
        context.metrics.add_counter("ImagesGenerated", 1, None, [Dimension("Status", status)])


def _observe(context, result, encode_seconds: float) -> None:
    if context.metrics is None:
        return
    seconds = {"GenerationSeconds": result.seconds, "EncodeSeconds": encode_seconds,
               "TextEncoderSeconds": result.stage_seconds.get("text_encoder"),
               "DenoiseSeconds": result.stage_seconds.get("denoise"), "VaeSeconds": result.stage_seconds.get("vae")}
    for name, value in seconds.items():
        if value is not None:
            context.metrics.add_metric(name, value, "Seconds", None, [], MetricTypes.HISTOGRAM)
    if result.stage_seconds.get("denoise"):
        steps_per_second = result.request.num_inference_steps / result.stage_seconds["denoise"]
        context.metrics.add_metric("StepsPerSecond", steps_per_second, "Count", None, [], MetricTypes.GAUGE)
    if result.peak_memory_bytes is not None:
        context.metrics.add_metric("PeakGPUMemory", result.peak_memory_bytes / 2**20, "Megabytes", None, [],
                                   MetricTypes.GAUGE)


def _declared_json(context, index) -> bool:
    # TorchServe keeps each body parameter's own content type as a request header named after the parameter.
    parameter = context.get_request_header(index, "body") if context.request_processor else None
    content_type = parameter.get("content-type", "") if isinstance(parameter, dict) else ""
    return content_type.split(";")[0].strip().lower() == "application/json"


def _error(context, index, error):
    context.set_response_status(error.status, STATUS_PHRASES.get(error.status, "Error"), idx=index)
    context.set_response_content_type(index, "application/json")
    return json.dumps(error.to_dict(), allow_nan=False).encode("utf-8")
