"""The OpenAI Images API's generations request and response (`POST .../v1/images/generations`), for any front.

A body has OpenAI's fields: `prompt` (required), `n` (images, at most the server's batch size), `size` ("WxH", width
first, as OpenAI writes it; "auto" is the model's own size), `response_format` (`b64_json`, also when omitted, as
OpenAI's newer image models answer; `url` is refused: nothing is stored to link to), `output_format` (png or jpeg),
`output_compression` (JPEG quality), `model` (any name; this server has one model), and `quality`, `style`, `user`,
`background`, `moderation`, which are accepted and have no effect here. Our own request fields (`seed`,
`negative_prompt`, `num_inference_steps`, `guidance_scale`, `loras`) may be added (the SDK's `extra_body`).
Image i of a body with a seed gets seed + i. Each image's seed comes back with it. Errors have OpenAI's shape and
name the field.
"""

from __future__ import annotations

import re
import time
from typing import Any

from .errors import InvalidRequest
from .protocols import EncodedImage, b64
from .requests import RequestRules, parse_request

OURS = ("seed", "negative_prompt", "num_inference_steps", "guidance_scale", "loras")
ACCEPTED = ("model", "quality", "style", "user", "background", "moderation")
FORMATS = {"png": "png", "jpeg": "jpeg", "jpg": "jpeg"}
SIZE = re.compile(r"^(\d{1,5})x(\d{1,5})$")


def parse_generation(body: Any, rules: RequestRules, max_images: int) -> list:
    """The GenerationRequests of one body; InvalidRequest names the OpenAI field."""
    if not isinstance(body, dict):
        raise InvalidRequest("body", type(body).__name__, "must be a JSON object")
    known = ("prompt", "n", "size", "response_format", "output_format", "output_compression") + OURS + ACCEPTED
    unknown = sorted(set(body) - set(known))
    if unknown:
        raise InvalidRequest(unknown[0], body[unknown[0]], f"is not a known field (known: {', '.join(known)})")
    n = body.get("n", 1)
    if n is None:
        n = 1
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= max_images:
        raise InvalidRequest("n", n, f"must be an integer in 1..{max_images} (the server's batch size)")
    response_format = body.get("response_format") or "b64_json"
    if response_format != "b64_json":
        raise InvalidRequest("response_format", response_format,
                             "must be b64_json (this server keeps no images to link to with url)")
    fields = {name: body[name] for name in ("prompt",) + OURS if body.get(name) is not None}
    size = body.get("size")
    if size is not None and size != "auto":
        match = SIZE.match(size) if isinstance(size, str) else None
        if not match:
            raise InvalidRequest("size", size, 'must be "WIDTHxHEIGHT" (e.g. "1024x1024") or "auto"')
        fields["width"], fields["height"] = int(match.group(1)), int(match.group(2))
    output_format = body.get("output_format")
    if output_format is not None:
        if not isinstance(output_format, str) or output_format.lower() not in FORMATS:
            raise InvalidRequest("output_format", output_format, "must be png or jpeg")
        fields["format"] = FORMATS[output_format.lower()]
    if body.get("output_compression") is not None:
        fields["quality"] = body["output_compression"]
    try:
        first = parse_request(fields, rules)
    except InvalidRequest as e:
        field = {"width": "size", "height": "size", "format": "output_format", "quality": "output_compression"}
        raise InvalidRequest(field.get(e.field, e.field), e.value, e.reason) from None
    if "seed" not in fields:  # one drawn seed per image, each reported back
        return [first] + [parse_request(fields, rules) for _ in range(n - 1)]
    return [parse_request(dict(fields, seed=first.seed + i), rules) if i else first for i in range(n)]


def generation_response(images: list[EncodedImage]) -> dict[str, Any]:
    return {"created": int(time.time()),
            "data": [{"b64_json": b64(image.payload), "seed": image.request.seed,
                      "output_format": image.content_type.removeprefix("image/")} for image in images]}


def error_response(error: Exception, status: int) -> dict[str, Any]:
    """OpenAI's error shape: {"error": {"message", "type", "param", "code"}}."""
    return {"error": {"message": str(error), "type": "invalid_request_error" if status < 500 else "server_error",
                      "param": getattr(error, "field", None), "code": None}}
