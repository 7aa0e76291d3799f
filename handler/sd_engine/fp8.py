"""FP8 matmuls for the UNet's transformer layers, on GPUs with FP8 tensor cores (compute capability 8.9+: Ada,
Hopper and later).

Every nn.Linear inside the UNet's transformer blocks and their linear projections in/out (about 70% of an SDXL UNet's
FLOPs) becomes a Float8Linear: its weight is quantized once to float8 e4m3 with one scale per output row, each call
quantizes its input with one scale per row (token), and torch._scaled_mm (cuBLAS) multiplies in FP8 on the tensor
cores, accumulating in float32, with the bias added in its epilogue. This is lossy: each operand keeps 3 mantissa
bits. Its parity against eager float16 is measured per model by scripts/benchmark.py (`rmse_vs_eager`).
"""

from __future__ import annotations

import logging

import torch

logger = logging.getLogger(__name__)
E4M3_MAX = 448.0  # the largest finite float8_e4m3fn value
MIN_CAPABILITY = (8, 9)


def quantize_rows(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A [tokens, features] activation as e4m3 with one float32 scale per row (token), as _scaled_mm's scale_a."""
    scale = rows.abs().amax(dim=1, keepdim=True).float().clamp(min=1e-12) / E4M3_MAX
    return (rows / scale).to(torch.float8_e4m3fn), scale


class Float8Linear(torch.nn.Module):
    def __init__(self, linear: torch.nn.Linear, out_dtype: torch.dtype):
        super().__init__()
        weight = linear.weight.detach().float()
        scale = weight.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / E4M3_MAX
        self.register_buffer("weight", (weight / scale).to(torch.float8_e4m3fn))  # [out, in], row-major
        self.register_buffer("weight_scale", scale.t().contiguous())  # [1, out]
        bias = linear.bias
        self.register_buffer("bias", None if bias is None else bias.detach().to(out_dtype))
        self.in_features, self.out_features, self.out_dtype = linear.in_features, linear.out_features, out_dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        quantized, scale = quantize_rows(x.reshape(-1, self.in_features))
        # _scaled_mm wants its second operand column-major: the transpose of the row-major weight is.
        out = torch._scaled_mm(quantized, self.weight.t(), scale_a=scale, scale_b=self.weight_scale, bias=self.bias,
                               out_dtype=self.out_dtype)
        return out.reshape(*x.shape[:-1], self.out_features).to(x.dtype)


def check_fp8_device(device: torch.device) -> str | None:
    """None when `device` has FP8 tensor cores, else why not."""
    if device.type != "cuda":
        return f"needs a CUDA GPU, but this worker runs on {device.type}"
    capability = torch.cuda.get_device_capability(device)
    if capability < MIN_CAPABILITY:
        return f"needs FP8 tensor cores (compute capability 8.9+), but {torch.cuda.get_device_name(device)} has " \
               f"{capability[0]}.{capability[1]}"
    return None


def _output_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """Row-wise scaled FP8 matmuls give float16 output on recent cuBLAS (CUDA 12.9+); older stacks only bfloat16,
    which the layer then casts back."""
    one = torch.ones(16, 16, device=device).to(torch.float8_e4m3fn)
    scales = torch.ones(16, 1, device=device), torch.ones(1, 16, device=device)
    try:
        torch._scaled_mm(one, one.t(), scale_a=scales[0], scale_b=scales[1], out_dtype=dtype)
        return dtype
    except RuntimeError:
        return torch.bfloat16


def fp8_linears(unet: torch.nn.Module) -> int:
    """Swap the UNet's transformer linear layers for Float8Linear, in place; returns how many were swapped."""
    device, dtype = next(unet.parameters()).device, next(unet.parameters()).dtype
    out_dtype = _output_dtype(dtype, device)
    targets = [(name, module) for name, module in unet.named_modules()
               if isinstance(module, torch.nn.Linear) and (".transformer_blocks." in name
                                                           or name.endswith((".proj_in", ".proj_out")))
               and module.in_features % 16 == 0 and module.out_features % 16 == 0]
    for name, module in targets:
        parent_name, _, child = name.rpartition(".")
        setattr(unet.get_submodule(parent_name), child, Float8Linear(module, out_dtype))
    logger.info("fp8: %d linear layers of the UNet multiply in float8 e4m3 (output %s)", len(targets),
                str(out_dtype).removeprefix("torch."))
    return len(targets)
