"""EngineConfig: the `handler:` block of model-config.yaml."""

from pathlib import Path

import pytest
import yaml

from sd_engine.config import EngineConfig
from sd_engine.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("name", ["model-config.yaml", "model-config-sdxl.yaml", "model-config-cpu.yaml"])
def test_shipped_configs_parse(name):
    block = yaml.safe_load((ROOT / "config" / name).read_text())["handler"]
    config = EngineConfig.from_mapping(block)
    assert config.weights == "model.zip"
    assert config.backend == "eager"
    assert config.cuda_graph is config.compile is (name != "model-config-cpu.yaml")
    # Size and guidance are the model's own in every shipped config.
    assert config.height is config.width is config.guidance_scale is None


def test_empty_block_gives_defaults():
    assert EngineConfig.from_mapping(None) == EngineConfig()
    assert EngineConfig.from_mapping({}).backend == "auto"


def test_unknown_key_is_rejected_by_name():
    with pytest.raises(ConfigError, match="unknown key.*'num_steps'"):
        EngineConfig.from_mapping({"num_steps": 30})


@pytest.mark.parametrize("key, value", [
    ("cuda_graph", "yes"), ("num_inference_steps", 30.5), ("num_inference_steps", True), ("height", "512"),
    ("guidance_scale", "high"), ("guidance_scale", float("nan")), ("backend", 3),
])
def test_wrong_type_is_rejected_by_name(key, value):
    with pytest.raises(ConfigError, match=f"handler.{key} must be a"):
        EngineConfig.from_mapping({key: value})


def test_request_defaults_may_be_left_to_the_model():
    config = EngineConfig.from_mapping({"height": None, "num_inference_steps": None})
    assert config.height is config.num_inference_steps is config.guidance_scale is config.max_width is None


def test_int_is_accepted_for_float():
    assert EngineConfig.from_mapping({"guidance_scale": 7}).guidance_scale == 7.0


@pytest.mark.parametrize("block, message", [
    ({"backend": "tensorrt"}, "backend must be one of"),
    ({"dtype": "bfloat16"}, "dtype must be one of"),
    ({"format": "gif"}, "format must be one of"),
    ({"height": 500}, "height must be a multiple of 8 and at least 64"),
    ({"max_width": 56}, "max_width must be a multiple of 8 and at least 64"),
    ({"quality": 0}, "quality must be in 1..100"),
    ({"num_inference_steps": 200}, r"handler.num_inference_steps: the default 200 is above "
                                   r"handler.max_num_inference_steps \(150\)"),
    ({"width": 2048, "max_width": 1024}, r"handler.width: the default 2048 is above handler.max_width"),
    ({"guidance_scale": 60.0}, r"handler.guidance_scale: the default 60.0 is above handler.max_guidance_scale"),
    ({"guidance_scale": -1}, r"handler.guidance_scale must be >= 0"),
    ({"backend": "deepspeed", "dtype": "float32"}, "float16 only"),
    ({"max_cuda_graphs": 16}, r"handler.max_cuda_graphs .* was replaced by handler.cuda_graph_memory_gib"),
    ({"cuda_graph_memory_gib": 0}, "cuda_graph_memory_gib must be > 0"),
    ({"sizes": [[512, 512], [512]]}, r"handler.sizes must be a list of \[height, width\] pairs"),
    ({"sizes": [[512, 512], 512]}, r"handler.sizes must be a list of \[height, width\] pairs"),
    ({"sizes": [[512, 500]]},
     r"handler.sizes: each side must be a multiple of 8 and at least 64, got \[\[512, 500\]\]"),
    ({"backend": "deepspeed", "compile": True}, "compile: true works with backend eager"),
    ({"warmup_steps": 0}, "warmup_steps must be >= 1"),
])
def test_invalid_values_and_combinations_fail_before_loading(block, message):
    with pytest.raises(ConfigError, match=message):
        EngineConfig.from_mapping(block)


def test_direct_construction_is_validated_too():
    with pytest.raises(ConfigError, match="backend must be one of"):
        EngineConfig(backend="tensorrt")


def test_config_is_frozen():
    config = EngineConfig()
    with pytest.raises(AttributeError):
        config.backend = "eager"
