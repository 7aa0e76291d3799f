"""What a loaded pipeline says about itself, and the request rules a server derives from it.

A model decides the request defaults the config leaves out: its native size (the UNet's sample size times the VAE's
scale factor: 512 for SD 1.5, 768 for SD 2.1-v, 1024 for SDXL), and its pipeline's own defaults for steps and guidance
(diffusers' `__call__` signature: 50 steps; guidance 7.5 for SD, 5.0 for SDXL). Sizes up to 1.5x the native side are
accepted unless the config says otherwise. The config's explicit keys always win. Nothing here branches on a model
family: it reads the pipeline's components and signature.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

from .config import EngineConfig
from .errors import ConfigError, InvalidRequest
from .requests import RequestRules, parse_request

MAX_SIDE_FACTOR = 1.5


@dataclass(frozen=True)
class NativeDefaults:
    height: int | None  # None: the UNet's config does not say (the config must)
    width: int | None
    num_inference_steps: int
    guidance_scale: float


def native_defaults(pipe) -> NativeDefaults:
    sample = pipe.unet.config.get("sample_size")
    height, width = (sample, sample) if isinstance(sample, int) or sample is None else tuple(sample)
    scale = pipe.vae_scale_factor
    parameters = inspect.signature(type(pipe).__call__).parameters
    return NativeDefaults(height=height and height * scale, width=width and width * scale,
                          num_inference_steps=parameters["num_inference_steps"].default,
                          guidance_scale=float(parameters["guidance_scale"].default))


def request_rules(config: EngineConfig, native: NativeDefaults) -> RequestRules:
    """The config's explicit keys over the model's defaults; fails with a ConfigError naming the key when the
    resulting defaults are not themselves a valid request (one set of rules: the request parser's)."""
    height = config.height or native.height
    width = config.width or native.width
    for name, value in (("height", height), ("width", width)):
        if value is None:
            raise ConfigError(f"handler.{name}: this model's UNet config has no sample_size, so it has no native "
                              f"size; set handler.height and handler.width")
    rules = RequestRules(
        num_inference_steps=config.num_inference_steps or native.num_inference_steps,
        guidance_scale=native.guidance_scale if config.guidance_scale is None else config.guidance_scale,
        height=height, width=width, format=config.format, quality=config.quality,
        max_num_inference_steps=config.max_num_inference_steps,
        max_height=config.max_height or max(height, _side_limit(native.height or height)),
        max_width=config.max_width or max(width, _side_limit(native.width or width)),
        max_prompt_chars=config.max_prompt_chars, max_guidance_scale=config.max_guidance_scale)
    try:
        parse_request({"prompt": "x", "seed": 0}, rules)
    except InvalidRequest as e:
        hints = []
        if hasattr(native, e.field) and getattr(config, e.field) is None:
            hints.append(f"the model's own; set handler.{e.field}")
        limit = f"max_{e.field}"
        if getattr(config, limit, None) is not None:
            hints.append(f"or raise handler.{limit}" if hints else f"raise handler.{limit}")
        raise ConfigError(f"handler.{e.field}: the default {e.reason}, got {e.value!r}"
                          + (f" ({' '.join(hints)})" if hints else "")) from None
    return rules


def _side_limit(native_side: int) -> int:
    return int(native_side * MAX_SIDE_FACTOR) // 8 * 8
