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
# The aspect-ratio set commonly served at a native 1024x1024 (height x width), about one megapixel each; a model of
# another native area of at least this one gets it scaled to its own side (multiples of 64).
LARGE_MODEL_SIZES = ((1024, 1024), (1152, 896), (896, 1152), (1216, 832), (832, 1216), (1344, 768), (768, 1344))


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


def native_sizes(height: int, width: int) -> tuple[tuple[int, int], ...]:
    """The sizes served at full speed when the config lists none, from the native size alone (no family names):
    at least 1024x1024 of native area, the usual one-megapixel aspect-ratio set scaled to it; below that, the native
    size, then its side times 1.5 as width and as height (512 -> 512x512, 512x768, 768x512)."""
    if height * width >= 1024 * 1024:
        scale = (height * width) ** 0.5 / 1024
        return tuple(dict.fromkeys((round(h * scale / 64) * 64, round(w * scale / 64) * 64)
                                   for h, w in LARGE_MODEL_SIZES))
    return ((height, width), (height, _side_limit(width)), (_side_limit(height), width))


def request_rules(config: EngineConfig, native: NativeDefaults) -> RequestRules:
    """The config's explicit keys over the model's defaults; fails with a ConfigError naming the key when the
    resulting defaults are not themselves a valid request (one set of rules: the request parser's)."""
    height = config.height or native.height
    width = config.width or native.width
    for name, value in (("height", height), ("width", width)):
        if value is None:
            raise ConfigError(f"handler.{name}: this model's UNet config has no sample_size, so it has no native "
                              f"size; set handler.height and handler.width")
    listed = tuple(tuple(size) for size in config.sizes) if config.sizes is not None else \
        native_sizes(native.height or height, native.width or width)
    sizes = tuple(dict.fromkeys(((height, width),) + listed))  # the default size first, always served at full speed
    max_height = config.max_height or max(height, _side_limit(native.height or height))
    max_width = config.max_width or max(width, _side_limit(native.width or width))
    if config.sizes is None:  # derived sizes stay within the limits; listed ones must already
        sizes = tuple((h, w) for h, w in sizes if h <= max_height and w <= max_width)
    beyond = [list(size) for size in sizes if size[0] > max_height or size[1] > max_width]
    if beyond:
        raise ConfigError(f"handler.sizes: {beyond} exceed the size limits ({max_height}x{max_width} as height x "
                          f"width; raise handler.max_height / handler.max_width)")
    rules = RequestRules(
        num_inference_steps=config.num_inference_steps or native.num_inference_steps,
        guidance_scale=native.guidance_scale if config.guidance_scale is None else config.guidance_scale,
        height=height, width=width, format=config.format, quality=config.quality,
        max_num_inference_steps=config.max_num_inference_steps, max_height=max_height, max_width=max_width,
        max_prompt_chars=config.max_prompt_chars, max_guidance_scale=config.max_guidance_scale, sizes=sizes,
        max_loras_per_request=config.max_loras_per_request, max_lora_scale=config.max_lora_scale)
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
