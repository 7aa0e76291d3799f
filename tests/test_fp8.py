"""FP8 linear layers: the arithmetic, on the CPU (torch._scaled_mm runs there too); speed and parity on a GPU are in
the benchmark records."""

import pytest
import torch

from sd_engine.config import EngineConfig
from sd_engine.engine import load_engine
from sd_engine.errors import ConfigError
from sd_engine.fp8 import Float8Linear, fp8_linears
from sd_engine.random_models import build_pipeline


def test_float8_linear_is_a_linear_layer_to_fp8_precision():
    torch.manual_seed(0)
    linear = torch.nn.Linear(320, 640)
    x = torch.randn(2, 77, 320) * 3
    fp8 = Float8Linear(linear, torch.float32)
    assert fp8.weight.dtype == torch.float8_e4m3fn and fp8.weight_scale.shape == (1, 640)
    reference = linear(x)
    error = (fp8(x) - reference).norm() / reference.norm()
    assert 0 < error < 0.06  # e4m3 keeps 3 mantissa bits per operand


def test_fp8_linears_swaps_the_transformer_layers_only():
    unet = build_pipeline("tiny-sdxl").unet
    linears = {name for name, m in unet.named_modules() if isinstance(m, torch.nn.Linear)}
    swapped = fp8_linears(unet)
    fp8 = {name for name, m in unet.named_modules() if isinstance(m, Float8Linear)}
    assert swapped == len(fp8) > 0
    assert all(".transformer_blocks." in name or name.endswith((".proj_in", ".proj_out")) for name in fp8)
    assert {name for name in linears if name.startswith(("time_embedding", "add_embedding"))}.isdisjoint(fp8)


def test_fp8_needs_a_gpu_with_fp8_tensor_cores_and_the_eager_backend(tmp_path):
    with pytest.raises(ConfigError, match="handler.fp8: true works with backend eager"):
        EngineConfig(fp8=True, backend="deepspeed")
    with pytest.raises(ConfigError, match="handler.fp8: true needs a CUDA GPU"):
        load_engine(EngineConfig(fp8=True), tmp_path, torch.device("cpu"))
