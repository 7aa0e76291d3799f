"""Shared fixtures: the tiny random model (built once per session, on the CPU) and an engine loaded from it."""

from pathlib import Path

import pytest
import torch
import yaml

from sd_engine.config import EngineConfig
from sd_engine.engine import load_engine
from sd_engine.random_models import save_pipeline

ROOT = Path(__file__).resolve().parent.parent
CPU_MODEL_CONFIG = ROOT / "config" / "model-config-cpu.yaml"


def cpu_handler_block() -> dict:
    return yaml.safe_load(CPU_MODEL_CONFIG.read_text())["handler"]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """The tiny model with two LoRA adapters in loras/, as a user ships them: `style` (diffusers' layout) and
    `detail` (kohya's)."""
    from diffusers import DiffusionPipeline

    from sd_engine.random_loras import save_random_lora

    folder = save_pipeline("tiny", tmp_path_factory.mktemp("tiny-sd") / "weights", seed=0)
    pipe = DiffusionPipeline.from_pretrained(folder)
    save_random_lora(pipe, folder / "loras" / "style.safetensors", seed=1, std=0.1)
    save_random_lora(pipe, folder / "loras" / "detail.safetensors", seed=2, layout="kohya", std=0.1)
    return folder


@pytest.fixture(scope="session")
def cpu_config() -> EngineConfig:
    return EngineConfig.from_mapping(cpu_handler_block())


@pytest.fixture(scope="session")
def tiny_engine(tiny_model_dir, cpu_config):
    return load_engine(cpu_config, tiny_model_dir, torch.device("cpu"), max_batch_size=4)  # batchSize of the CPU config


@pytest.fixture(scope="session")
def cpu_rules(tiny_engine):
    """The request defaults and limits the CPU config gives the tiny model (64x64, 4 steps, sides up to 256)."""
    return tiny_engine.rules


@pytest.fixture
def dynamo_compiles(monkeypatch):
    """The engine's torch.compile, tracing for real with Dynamo but compiling through a counting backend instead of
    inductor (whose C++ build on the CPU takes minutes): the list gets one entry per graph compiled."""
    from sd_engine import optimize

    compiled = []
    real_compile = torch.compile

    def counting(graph_module, example_inputs):
        compiled.append(len(example_inputs))
        return graph_module.forward

    torch._dynamo.reset()
    monkeypatch.setattr(optimize.torch, "compile", lambda fn: real_compile(fn, backend=counting))
    yield compiled
    torch._dynamo.reset()
