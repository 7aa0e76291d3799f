"""KServe's JSON protocols, so the same handler answers plain requests and KServe predictor traffic.

- v1: `{"instances": [<request>, ...]}` where a request is a JSON object with the plain API's fields or a string (the
  prompt) -> `{"predictions": [{"image": {"b64": ...}, "content_type": ..., "seed": ...}, ...]}`.
- v2, the Open Inference Protocol: `{"id"?, "inputs": [{"name", "datatype", "shape", "data"}, ...], "parameters"?}`.
  Each input is one request field (`prompt` is required) with one value per image, or one value for all images;
  `parameters` sets fields for all images -> `{"id", "model_name", "outputs": [image (BYTES, base64), content_type
  (BYTES), seed (INT64)]}`.
- Errors in both: `{"error": "<message naming the field>"}` with the 4xx/5xx status.

A body asking for several images (at most the server's batchSize, so one TorchServe batch stays within batchSize
pipeline calls) joins the server's batch like separate requests would; a bad value fails its own body only.

TorchServe's own `kservev2` envelope (service_envelope / TS_SERVICE_ENVELOPE) hands the handler one request's tensors
already unpacked (the first value of each BYTES tensor; `parameters` dropped): `from_envelope_tensors` takes those.
That envelope reads only the first request of a batch, so it needs batchSize 1; without it, this module does the
same job with batching intact. TorchServe's v1 `kserve` envelope is not supported.
"""

from __future__ import annotations

import base64
import logging
import time
from dataclasses import dataclass
from typing import Any

from .errors import EngineError, GenerationError, InvalidRequest
from .imaging import encode_image
from .requests import FIELDS, GenerationRequest, RequestRules, parse_request

logger = logging.getLogger(__name__)

PLAIN, V1, V2, ENVELOPE_V2 = "plain", "v1", "v2", "envelope-v2"
MAX_IMAGES_PER_BODY = 16  # the default cap when no batchSize is given (the handler passes batchSize)
MAX_ANSWER_BYTES = 15 * 2**20  # a JSON answer's cap: under config.properties' max_response_size (16 MiB), beyond
# which TorchServe's frontend drops the worker's whole message and restarts the worker
MAX_DIMENSIONS = 8
PROTOCOL_PARAMETERS = ("binary_data_output",)
STRING_FIELDS = {"prompt", "negative_prompt", "format", "loras"}  # loras: JSON text of the object
INT_TYPES = {"INT8", "INT16", "INT32", "INT64", "UINT8", "UINT16", "UINT32", "UINT64"}
FLOAT_TYPES = {"FP16", "FP32", "FP64"}


@dataclass
class EncodedImage:
    payload: bytes  # JPEG or PNG
    content_type: str
    request: GenerationRequest
    truncated: tuple[str, ...] = ()
    seconds: float = 0.0  # its pipeline call
    encode_seconds: float = 0.0


@dataclass
class Decoded:
    protocol: str
    requests: list[GenerationRequest]
    request_id: str | None = None
    binary_outputs: tuple[str, ...] = ()  # v2: outputs to answer with the binary tensor extension (binary_tensors)


def protocol_of(fields: dict[str, Any]) -> str:
    """Which protocol a parsed JSON body speaks: its top-level keys tell (the plain API has neither key)."""
    if "instances" in fields:
        return V1
    if "inputs" in fields:
        return V2
    return PLAIN


def decode(fields: dict[str, Any], rules: RequestRules, max_images: int = MAX_IMAGES_PER_BODY) -> Decoded:
    """The requests of a parsed JSON body. Raises InvalidRequest naming the field as a path into the body."""
    protocol = protocol_of(fields)
    if protocol == V1:
        return Decoded(V1, _v1_requests(fields, rules, max_images))
    if protocol == V2:
        from .binary_tensors import wanted_binary

        requests, request_id = _v2_requests(fields, rules, max_images)
        return Decoded(V2, requests, request_id, wanted_binary(fields))
    return Decoded(PLAIN, [parse_request(fields, rules)])


def is_envelope_tensor(item: Any) -> bool:
    """TorchServe's kservev2 envelope replaces each request row by the tensors of the first request. A request row
    has a "body" (or is form fields, whose values are bytes); a tensor has a str name and datatype."""
    return (isinstance(item, dict) and "body" not in item and isinstance(item.get("name"), str)
            and isinstance(item.get("datatype"), str))


def from_envelope_tensors(tensors: list[dict], rules: RequestRules) -> Decoded:
    requests, _ = _v2_requests({"inputs": tensors}, rules, MAX_IMAGES_PER_BODY)
    if len(requests) != 1:
        raise InvalidRequest("inputs", len(requests), "must ask for one image under TorchServe's kservev2 envelope "
                                                      "(unset service_envelope to send several in one body)")
    return Decoded(ENVELOPE_V2, requests)


def _v1_requests(fields: dict[str, Any], rules: RequestRules, max_images: int) -> list[GenerationRequest]:
    _only_keys(fields, ("instances",))
    instances = fields["instances"]
    _check_count("instances", instances, max_images)
    requests = []
    for i, instance in enumerate(instances):
        if isinstance(instance, str):
            instance = {"prompt": instance}
        if not isinstance(instance, dict):
            raise InvalidRequest(f"instances[{i}]", instance, "must be a JSON object or a string (the prompt)")
        try:
            requests.append(parse_request(instance, rules))
        except InvalidRequest as e:
            raise InvalidRequest(f"instances[{i}].{e.field}", e.value, e.reason) from None
    return requests


def _v2_requests(fields: dict[str, Any], rules: RequestRules,
                 max_images: int) -> tuple[list[GenerationRequest], str | None]:
    _only_keys(fields, ("id", "inputs", "outputs", "parameters"))
    request_id = fields.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise InvalidRequest("id", request_id, "must be a string")
    parameters = fields.get("parameters")
    parameters = {} if parameters is None else parameters
    if not isinstance(parameters, dict):
        raise InvalidRequest("parameters", parameters, "must be a JSON object")
    # The binary tensor extension's own parameter (tritonclient sends it by default) is about the answer, not a field.
    parameters = {k: v for k, v in parameters.items() if k not in PROTOCOL_PARAMETERS}
    inputs = fields["inputs"]
    if not isinstance(inputs, list) or not inputs:
        raise InvalidRequest("inputs", inputs, "must be a non-empty list of tensors")

    columns: dict[str, tuple[int, list]] = {}  # field name -> (input index, flat values)
    for k, tensor in enumerate(inputs):
        name, values = _tensor(k, tensor)
        if name in columns:
            raise InvalidRequest(f"inputs[{k}].name", name, "appears twice")
        columns[name] = (k, values)
    if "prompt" not in columns:
        raise InvalidRequest("inputs", sorted(columns), "must include a tensor named 'prompt'")
    count = max(len(values) for _, values in columns.values())
    _check_count("inputs", range(count), max_images)
    for name, (k, values) in columns.items():
        if len(values) not in (1, count):
            raise InvalidRequest(f"inputs[{k}].data", len(values),
                                 f"must hold 1 or {count} values, like the longest input")

    requests = []
    for j in range(count):
        row = dict(parameters)
        row.update({name: values[0 if len(values) == 1 else j] for name, (_, values) in columns.items()})
        try:
            requests.append(parse_request(row, rules))
        except InvalidRequest as e:
            if e.field in columns:
                k, values = columns[e.field]
                where = f"inputs[{k}].data[{0 if len(values) == 1 else j}]"
            else:
                where = f"parameters.{e.field}"
            raise InvalidRequest(where, e.value, f"({e.field}) {e.reason}") from None
    return requests, request_id


def _tensor(k: int, tensor: Any) -> tuple[str, list]:
    if not isinstance(tensor, dict):
        raise InvalidRequest(f"inputs[{k}]", tensor, "must be a tensor object with name, datatype, shape and data")
    name = tensor.get("name")
    if name not in FIELDS:
        raise InvalidRequest(f"inputs[{k}].name", name, f"must be one of {', '.join(FIELDS)}")
    datatype = tensor.get("datatype")
    expected = ({"BYTES"} if name in STRING_FIELDS else INT_TYPES | FLOAT_TYPES if name == "guidance_scale"
                else INT_TYPES)
    if not isinstance(datatype, str) or datatype not in expected:
        raise InvalidRequest(f"inputs[{k}].datatype", datatype, f"must be {' or '.join(sorted(expected))} "
                                                                f"for {name}")
    data = tensor.get("data")
    # TorchServe's envelope has already unpacked a BYTES tensor to its first value; a body's data is always a list.
    values = _flatten(data) if isinstance(data, list) else [data]
    if data is None or not values:
        raise InvalidRequest(f"inputs[{k}].data", data, "must hold at least one value")
    shape = tensor.get("shape")
    if isinstance(data, list) and not _shape_holds(shape, len(values)):
        raise InvalidRequest(f"inputs[{k}].shape", shape, f"must be a list of at most {MAX_DIMENSIONS} sizes whose "
                                                          f"product is the number of values in data ({len(values)})")
    return name, values


def _shape_holds(shape: Any, count: int) -> bool:
    """Whether `shape` multiplies out to `count`, stopping as soon as it cannot: multiplying a hostile shape out
    (thousands of sizes, or huge ones) would cost seconds of CPU per request."""
    if not isinstance(shape, list) or len(shape) > MAX_DIMENSIONS:
        return False
    product = 1
    for size in shape:
        if isinstance(size, bool) or not isinstance(size, int) or not 0 < size <= count:
            return False
        product *= size
        if product > count:
            return False
    return product == count


def _flatten(data: list) -> list:
    flat, stack = [], [iter(data)]
    while stack:
        for value in stack[-1]:
            if isinstance(value, list):
                stack.append(iter(value))
                break
            flat.append(value)
        else:
            stack.pop()
    return flat


def _only_keys(fields: dict[str, Any], allowed: tuple[str, ...]) -> None:
    unknown = sorted(set(fields) - set(allowed))
    if unknown:
        raise InvalidRequest(unknown[0], fields[unknown[0]], f"is not a known key here (known: {', '.join(allowed)})")


def _check_count(name: str, items: Any, max_images: int) -> None:
    if not isinstance(items, (list, range)) or not items:
        raise InvalidRequest(name, items, "must be a non-empty list")
    if len(items) > max_images:
        raise InvalidRequest(name, f"<{len(items)} items>", f"must ask for at most {max_images} images (the "
                                                             "server's batchSize)")


def encode_results(results: list) -> list[EncodedImage] | EngineError:
    """One body's generation results as encoded images, in order; or the error that fails the body (its first)."""
    failures = [result for result in results if isinstance(result, EngineError)]
    if failures:
        return failures[0]
    images = []
    for result in results:
        start = time.perf_counter()
        try:
            payload, content_type = encode_image(result.image, result.request.format, result.request.quality)
        except Exception:  # noqa: BLE001 - one image's encoding must not fail its batch
            logger.exception("encoding a %s image failed", result.request.format)
            return GenerationError("encoding the image failed; see the server log")
        images.append(EncodedImage(payload, content_type, result.request, result.truncated, result.seconds,
                                   time.perf_counter() - start))
    return images


# Responses, with the images in request order.
def v1_response(images: list[EncodedImage]) -> dict[str, Any]:
    predictions = []
    for image in images:
        prediction = {"image": {"b64": b64(image.payload)}, "content_type": image.content_type,
                      "seed": image.request.seed}
        if image.truncated:
            prediction["truncated"] = list(image.truncated)
        predictions.append(prediction)
    return {"predictions": predictions}


def v2_response(images: list[EncodedImage], model_name: str, model_version: str | None,
                request_id: str | None) -> dict[str, Any]:
    n = len(images)
    response = {"model_name": model_name, "id": request_id or "", "outputs": [
        {"name": "image", "datatype": "BYTES", "shape": [n], "data": [b64(image.payload) for image in images]},
        {"name": "content_type", "datatype": "BYTES", "shape": [n], "data": [image.content_type for image in images]},
        {"name": "seed", "datatype": "INT64", "shape": [n], "data": [image.request.seed for image in images]},
    ]}
    if model_version:
        response["model_version"] = model_version
    return response


def error_body(message: str) -> dict[str, str]:
    return {"error": message}


def b64(payload: bytes) -> str:
    return base64.b64encode(payload).decode("ascii")
