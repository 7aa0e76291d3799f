"""Typed errors of the engine. Each carries the HTTP status an adapter should answer with; the engine itself knows
nothing about HTTP, it only says which kind of failure happened."""

from __future__ import annotations

import math
import reprlib
from typing import Any

# Values are shown depth- and length-limited: a hostile body's deeply nested value would overflow a plain repr().
_SHOW = reprlib.Repr()
_SHOW.maxlevel, _SHOW.maxstring, _SHOW.maxother, _SHOW.maxlist, _SHOW.maxdict, _SHOW.maxlong = 3, 80, 80, 6, 6, 40


def shown(value: Any) -> str:
    try:
        return _SHOW.repr(value)
    except (ValueError, RecursionError):  # an integer over Python's digit limit
        return f"<{type(value).__name__}>"


class EngineError(Exception):
    """Base class: something the engine could not do. `status` is the HTTP status an adapter maps it to."""

    status = 500

    def to_dict(self) -> dict[str, Any]:
        return {"error": type(self).__name__, "message": str(self)}


class ConfigError(EngineError, ValueError):
    """The `handler:` block of model-config.yaml is invalid. Raised at load time, before any weights are read."""


class InvalidRequest(EngineError, ValueError):
    """A request field is missing, of the wrong type or out of range. Names the field and the offending value."""

    status = 400

    def __init__(self, field: str, value: Any, reason: str):
        self.field = field
        self.value = value
        self.reason = reason
        text = shown(value)
        super().__init__(f"`{field}` {reason}, got {text[:80] + '...' if len(text) > 80 else text}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe: long values are cut, non-finite numbers and other types become their repr."""
        value = self.value
        if isinstance(value, float) and not math.isfinite(value) or not isinstance(
                value, (str, int, float, bool, type(None))):
            value = shown(value)
        if isinstance(value, str) and len(value) > 200:
            value = value[:200] + "..."
        if isinstance(value, int) and not isinstance(value, bool) and abs(value) > 2**64:
            value = shown(value)
        return {"error": "InvalidRequest", "field": self.field, "value": value, "message": str(self)}


class AnswerTooLarge(EngineError):
    """The images a request asked for would not fit in one response."""

    status = 413


class ModelLoadError(EngineError):
    """The weights could not be found, extracted or loaded."""


class GenerationError(EngineError):
    """The pipeline failed while generating a group of requests."""


class OutOfMemory(GenerationError):
    """The device ran out of memory for this group; the memory was released and the engine keeps serving."""

    status = 507
