"""Request contract: turns a request body into a validated GenerationRequest, or raises InvalidRequest naming the
field. This is the one place that knows the fields, their types, ranges and defaults.

A body is either plain text (the prompt) or a JSON object with diffusers' argument names plus `seed`, `format` and
`quality`. A body whose first non-blank character is `{` or `[` is read as JSON. Missing fields take the defaults of
RequestRules (the config's explicit keys over the model's own defaults: native.request_rules); a missing or null seed is
drawn at random and reported back so the image can be reproduced.
"""

from __future__ import annotations

import json
import math
import secrets
from dataclasses import asdict, dataclass
from typing import Any

from .errors import InvalidRequest

MAX_SEED = 2**63 - 1
MIN_SIDE = 64
FORMAT_ALIASES = {"jpeg": "jpeg", "jpg": "jpeg", "png": "png"}
FIELDS = ("prompt", "negative_prompt", "num_inference_steps", "guidance_scale", "height", "width", "seed", "format",
          "quality", "loras")


@dataclass(frozen=True)
class RequestRules:
    """What a server accepts: the defaults a request's missing fields take, and the limits. Built per model by
    native.request_rules; the values here are only the plain constructor's, for tests."""

    num_inference_steps: int = 30
    guidance_scale: float = 7.5
    height: int = 512
    width: int = 512
    format: str = "jpeg"
    quality: int = 90
    max_num_inference_steps: int = 150
    max_height: int = 1024
    max_width: int = 1024
    max_prompt_chars: int = 2000
    max_guidance_scale: float = 50.0
    # The sizes (height, width) served at full speed (compiled and graphed at warm-up), the default first; any other
    # size within the limits is served too, on the slower path.
    sizes: tuple = ((512, 512),)
    # LoRA adapters a request may name (loras.py), how many at once and the strength limit; when the model has
    # adapters that this backend cannot apply, why (a request naming one gets it as its 400).
    loras: tuple = ()
    max_loras_per_request: int = 4
    max_lora_scale: float = 2.0
    loras_unavailable: str | None = None


@dataclass(frozen=True)
class GenerationRequest:
    prompt: str
    negative_prompt: str | None
    num_inference_steps: int
    guidance_scale: float
    height: int
    width: int
    seed: int
    format: str = "jpeg"
    quality: int = 90
    loras: tuple = ()  # ((adapter name, strength), ...), sorted by name

    @property
    def shape_key(self) -> tuple:
        """Requests with the same key can run in one pipeline call (the engine may split further: see
        Engine._groups): the same shape, steps, guidance and adapter set."""
        return (self.height, self.width, self.num_inference_steps, self.guidance_scale, self.loras)


def describe(rules: RequestRules, max_images: int) -> dict[str, Any]:
    """What a client (the playground page) needs to build a valid request: the defaults, the limits, the sizes
    served at full speed, the adapters, and how many images one body may ask for. JSON-ready."""
    document = {name: list(map(list, value)) if name == "sizes" else list(value) if isinstance(value, tuple)
                else value for name, value in asdict(rules).items()}
    return dict(document, fields=list(FIELDS), max_images=max_images)


def parse_body(body: Any, declared_json: bool = False) -> dict[str, Any]:
    """Return the request's fields as a dict from a JSON object, JSON text, plain text or raw bytes.

    `declared_json`: the client said the body is JSON (Content-Type: application/json). A server may have decoded it
    already, so a str or list here is a JSON value that is not an object, not a prompt."""
    if declared_json and not isinstance(body, (bytes, bytearray, dict)):
        raise InvalidRequest("body", type(body).__name__, "must be a JSON object")
    if isinstance(body, (bytes, bytearray)):
        try:
            body = bytes(body).decode("utf-8")
        except UnicodeDecodeError as e:
            raise InvalidRequest("body", f"<{len(body)} bytes>", f"must be UTF-8 text ({e.reason} at byte {e.start})")
    if isinstance(body, str):
        text = body.strip()
        if declared_json or text[:1] in ("{", "["):
            try:
                body = json.loads(text)
            except json.JSONDecodeError as e:
                raise InvalidRequest("body", text[:80], f"is not valid JSON ({e.msg} at char {e.pos})")
            except (ValueError, RecursionError) as e:  # integers over Python's digit limit, absurd nesting
                raise InvalidRequest("body", text[:80], f"is not acceptable JSON ({type(e).__name__})")
        else:
            return {"prompt": text}
    if not isinstance(body, dict):
        raise InvalidRequest("body", type(body).__name__, "must be a JSON object or plain text")
    return body


def parse_request(body: Any, rules: RequestRules, declared_json: bool = False) -> GenerationRequest:
    """Validate one request body against the contract and the server's defaults and limits."""
    fields = parse_body(body, declared_json)
    unknown = sorted(set(fields) - set(FIELDS))
    if unknown:
        raise InvalidRequest(unknown[0], fields[unknown[0]], f"is not a known field (known: {', '.join(FIELDS)})")

    prompt = _text(fields, "prompt", rules.max_prompt_chars, required=True)
    negative_prompt = _text(fields, "negative_prompt", rules.max_prompt_chars, required=False)
    steps = _int(fields, "num_inference_steps", rules.num_inference_steps, 1, rules.max_num_inference_steps)
    guidance = _number(fields, "guidance_scale", rules.guidance_scale, 0.0, rules.max_guidance_scale)
    height = _side(fields, "height", rules.height, rules.max_height)
    width = _side(fields, "width", rules.width, rules.max_width)
    seed = fields.get("seed")
    seed = secrets.randbelow(MAX_SEED + 1) if seed is None else _int(fields, "seed", None, 0, MAX_SEED)
    fmt = fields.get("format", rules.format)
    if not isinstance(fmt, str) or fmt.lower() not in FORMAT_ALIASES:
        raise InvalidRequest("format", fmt, "must be one of jpeg, png")
    quality = _int(fields, "quality", rules.quality, 1, 100)
    loras = _loras(fields.get("loras"), rules)

    return GenerationRequest(prompt=prompt, negative_prompt=negative_prompt, num_inference_steps=steps,
                             guidance_scale=guidance, height=height, width=width, seed=seed,
                             format=FORMAT_ALIASES[fmt.lower()], quality=quality, loras=loras)


def _loras(value: Any, rules: RequestRules) -> tuple:
    """`loras`: an object of adapter name -> strength (or JSON text holding one: a v2 BYTES tensor). Strength 0
    leaves an adapter out."""
    if value is None:
        return ()
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except (ValueError, RecursionError):
            raise InvalidRequest("loras", value, 'must be a JSON object of adapter name -> strength, e.g. '
                                                 '{"pixel-art": 0.8}') from None
    if not isinstance(value, dict):
        raise InvalidRequest("loras", value, 'must be an object of adapter name -> strength, e.g. {"pixel-art": 0.8}')
    if value and rules.loras_unavailable:
        raise InvalidRequest("loras", value, f"cannot be applied here: {rules.loras_unavailable}")
    if len(value) > rules.max_loras_per_request:
        raise InvalidRequest("loras", value, f"may name at most {rules.max_loras_per_request} adapters "
                                             f"(has {len(value)})")
    chosen = []
    for name, strength in value.items():
        if name not in rules.loras:
            known = ", ".join(rules.loras) if rules.loras else "none: this model has no adapters"
            raise InvalidRequest("loras", name, f"names an adapter this model does not have (known: {known})")
        limit = rules.max_lora_scale
        try:  # the rule every number field follows, reported under `loras`
            strength = _number({name: strength}, name, None, -limit, limit)
        except InvalidRequest:
            raise InvalidRequest("loras", {name: strength}, f"strength of {name!r} must be a finite number in "
                                                            f"{-limit:g}..{limit:g}") from None
        if strength:
            chosen.append((name, strength))
    return tuple(sorted(chosen))


def _text(fields: dict, name: str, max_chars: int, required: bool) -> str | None:
    value = fields.get(name)
    if value is None and not required:
        return None
    if not isinstance(value, str):
        raise InvalidRequest(name, value, "must be a string" if value is not None else "is required")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates from JSON "\ud800" escapes: the tokenizer cannot take them
        raise InvalidRequest(name, value, "must be valid Unicode text (it has an unpaired surrogate)") from None
    if required and not value.strip():
        raise InvalidRequest(name, value, "must not be empty")
    if len(value) > max_chars:
        raise InvalidRequest(name, value, f"must be at most {max_chars} characters (has {len(value)})")
    return value


def _int(fields: dict, name: str, default: int | None, low: int, high: int) -> int:
    value = fields.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidRequest(name, value, "must be an integer")
    if not low <= value <= high:
        raise InvalidRequest(name, value, f"must be in {low}..{high}")
    return value


def _number(fields: dict, name: str, default: float, low: float, high: float) -> float:
    value = fields.get(name, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidRequest(name, value, "must be a number")
    try:
        number = float(value)
    except OverflowError:  # an integer beyond float range
        number = math.inf
    if not math.isfinite(number) or not low <= number <= high:
        raise InvalidRequest(name, value, f"must be a finite number in {low:g}..{high:g}")
    return number


def _side(fields: dict, name: str, default: int, high: int) -> int:
    value = _int(fields, name, default, MIN_SIDE, high)
    if value % 8:
        raise InvalidRequest(name, value, "must be a multiple of 8")
    return value
