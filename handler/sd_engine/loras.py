"""LoRA adapters chosen per request, fused into the weights in place.

At load, each adapter file (`loras/<name>.safetensors` in the weights folder, then the config's `lora_dir`) is read
the way diffusers reads it (`load_lora_weights`: diffusers/PEFT and kohya layouts, SDXL's block names, both text
encoders) and what it adds to each layer is kept as PEFT made it: the low-rank factors A and B and the layer's
scaling (alpha / rank). The pipeline is then unloaded back to its plain layers. A request names adapters and
strengths; before each pipeline call the engine sets every layer they touch to W0 + sum(strength x scaling x B A),
in place. The weight tensors stay where they are, so compiled code and captured CUDA graphs keep reading them: a
switch never recompiles or captures. The images equal diffusers' `set_adapters` with the same weights (which adds
each B A x beside W0 x) up to rounding.

Where the layers' own weights are not what runs (DeepSpeed's injected kernels, fuse_qkv's fused projections, fp8's
quantized copies) adapters cannot be applied: the engine says so at load and requests naming them get a 400.
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

LORAS_DIR = "loras"  # inside the weights folder: shipped in the MAR and covered by its sha256 manifest
COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


@dataclass(frozen=True)
class Factor:
    """What one adapter adds to one layer's weight: scaling x (B @ A), for a Linear or a Conv2d."""
    module: torch.nn.Module
    down: torch.Tensor  # A
    up: torch.Tensor  # B
    scaling: float

    def delta(self) -> torch.Tensor:
        down, up = self.down.float(), self.up.float()
        if down.dim() == 2:
            return up @ down
        if down.shape[2:4] == (1, 1):  # as PEFT's lora.Conv2d.get_delta_weight
            return (up.squeeze(3).squeeze(2) @ down.squeeze(3).squeeze(2)).unsqueeze(2).unsqueeze(3)
        return F.conv2d(down.permute(1, 0, 2, 3), up).permute(1, 0, 2, 3)


class Adapters:
    """The loaded adapters and the set now fused into the weights."""

    def __init__(self, factors: dict[str, list[Factor]]):
        self.factors = factors
        touched = {id(f.module): f.module for fs in factors.values() for f in fs}
        # The untouched weights of every layer an adapter may change: a switch starts again from them, exactly.
        self.originals = {key: module.weight.detach().clone() for key, module in touched.items()}
        self.modules = touched
        # Per factor of a Linear or 1x1 Conv2d layer, B and A as matrices in the layer's dtype: a switch then writes
        # each such layer with one matmul-add per adapter (addmm accumulates in float32 and rounds once, as the
        # float32 path below does), not one float32 round trip per layer (launch-bound: SDXL's 736 layers took
        # 62-100 ms for one adapter that way on an H200).
        self.matrices = {id(f): (f.up.reshape(f.up.shape[0], -1).to(f.module.weight.dtype),
                                 f.down.reshape(f.down.shape[0], -1).to(f.module.weight.dtype))
                         for fs in factors.values() for f in fs if f.down.dim() == 2 or f.down.shape[2:4] == (1, 1)}
        self.active: tuple[tuple[str, float], ...] = ()

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(sorted(self.factors))

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for fs in self.factors.values() for f in fs for t in (f.down, f.up))

    @torch.no_grad()
    def apply(self, selection: tuple[tuple[str, float], ...]) -> float:
        """Fuse `selection` ((name, strength), ...) into the weights, undoing the set before, one layer at a time
        (_write: float32 accumulation, one layer's temporaries at once). Returns the seconds it took (0 when the set
        is already active). Should it fail halfway (out of memory), every layer goes back to its own weights and the
        error is raised: no request sees a half-switched model."""
        if selection == self.active:
            return 0.0
        start = time.perf_counter()
        chosen: dict[int, list[tuple[Factor, float]]] = {}
        for name, strength in selection:
            for f in self.factors[name]:
                chosen.setdefault(id(f.module), []).append((f, strength))
        keys = {id(f.module) for name, _ in (self.active or ()) for f in self.factors[name]} | set(chosen)
        self.active = None  # until every layer is written
        device = None
        try:
            for key in keys:
                weight = self._write(key, chosen.get(key, []))
                device = weight.device if weight.is_cuda else device
        except BaseException:
            self.restore()
            raise
        self.active = selection
        if device is not None:  # the time the switch really took, not the time to queue it
            torch.cuda.synchronize(device)
        return time.perf_counter() - start

    def _write(self, key: int, terms: list[tuple[Factor, float]]) -> torch.Tensor:
        """Set one layer's weight to W0 + sum(strength x scaling x B A) over `terms` (W0 alone for none)."""
        base, weight = self.originals[key], self.modules[key].weight
        if terms and all(id(f) in self.matrices for f, _ in terms):
            flat = weight.view(weight.shape[0], -1)  # a Linear's, or a 1x1 Conv2d's (any memory format)
            for i, (f, strength) in enumerate(terms):
                up, down = self.matrices[id(f)]
                if i == 0:  # W0 + s B A straight into the weight: one kernel
                    torch.addmm(base.view(flat.shape), up, down, alpha=strength * f.scaling, out=flat)
                else:
                    flat.addmm_(up, down, alpha=strength * f.scaling)
        elif terms:
            total = base.to(torch.float32, copy=True)  # never base itself (a float32 model's)
            for f, strength in terms:
                total += f.delta().view(base.shape) * (strength * f.scaling)
            weight.copy_(total)
        else:
            weight.copy_(base)
        return weight

    @torch.no_grad()
    def restore(self) -> None:
        """Every layer an adapter touches back to its own weights."""
        for key, module in self.modules.items():
            module.weight.copy_(self.originals[key])
        self.active = ()


def find_adapter_files(folders: list[Path]) -> dict[str, Path]:
    """name -> file for every `<name>.safetensors` in `folders`, the first folder winning a name both have."""
    found: dict[str, Path] = {}
    for folder in folders:
        if folder.is_dir():
            for path in sorted(folder.glob("*.safetensors")):
                found.setdefault(path.stem, path)
    return found


def load_adapters(pipe, files: dict[str, Path], max_count: int) -> tuple[Adapters | None, dict[str, str]]:
    """Read each file as diffusers does and keep its factors; returns the adapters (None when none is usable) and,
    for every file left out, why (a bad name, not a LoRA for this model, too many)."""
    from peft.tuners.lora import LoraLayer

    factors: dict[str, list[Factor]] = {}
    skipped: dict[str, str] = {}
    for name, path in files.items():
        if not NAME.fullmatch(name):
            skipped[name] = "its name must be letters, digits, '.', '_' or '-' (at most 64)"
            continue
        if len(factors) >= max_count:
            skipped[name] = f"more than max_loras ({max_count}) adapters"
            continue
        slot = f"adapter{len(factors)}"  # PEFT's adapter names may not hold '.'
        try:
            pipe.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name=slot)
            found = []
            for component in COMPONENTS:
                model = getattr(pipe, component, None)
                for module_name, module in (model.named_modules() if model is not None else ()):
                    if isinstance(module, LoraLayer) and slot in module.lora_A:
                        _check_supported(module, slot, f"{component}.{module_name}")
                        found.append((component, module_name, module.lora_A[slot].weight.detach().clone(),
                                      module.lora_B[slot].weight.detach().clone(), float(module.scaling[slot])))
            if not found:
                raise ValueError("none of its keys matches a layer of this model")
            factors[name] = found
        except Exception as e:  # noqa: BLE001 - one unusable file must not cost the model
            skipped[name] = f"{type(e).__name__}: {str(e)[:300]}"
        finally:
            if _has_adapter(pipe, slot):
                pipe.delete_adapters(slot)
    if files:
        pipe.unload_lora_weights()  # the plain layers again, as before the first file
    resolved = {name: [Factor(getattr(pipe, component).get_submodule(module_name), down, up, scaling)
                       for component, module_name, down, up, scaling in found]
                for name, found in factors.items()}
    for name, reason in skipped.items():
        logger.warning("LoRA %r (%s) is not served: %s", name, files[name], reason)
    return (Adapters(resolved) if resolved else None), skipped


def _check_supported(module, slot: str, where: str) -> None:
    """Only what Factor.delta computes exactly: plain low-rank A, B on a Linear or an ungrouped Conv2d."""
    if module.use_dora.get(slot):
        raise ValueError(f"{where}: DoRA adapters are not supported")
    if getattr(module, "lora_bias", {}).get(slot):
        raise ValueError(f"{where}: adapters with a bias in lora_B are not supported")
    if slot in getattr(module, "lora_variant", {}):
        raise ValueError(f"{where}: the LoRA variant {type(module.lora_variant[slot]).__name__} is not supported")
    base = module.get_base_layer()
    if not (type(base) is torch.nn.Linear or type(base) is torch.nn.Conv2d and base.groups == 1):
        raise ValueError(f"{where}: a {type(base).__name__} layer, which adapters here cannot change")


def _has_adapter(pipe, slot: str) -> bool:
    try:
        return any(slot in names for names in pipe.get_list_adapters().values())
    except Exception:  # noqa: BLE001 - no PEFT layers at all
        return False


def unavailable_reason(config, backend: str) -> str | None:
    """Why adapters cannot be applied with this config, or None."""
    if backend == "deepspeed":
        return "backend deepspeed runs its own copies of the weights, which adapters cannot change"
    if config.fuse_qkv:
        return "fuse_qkv: true fuses q, k and v into new weights that adapters do not reach"
    if config.fp8:
        return "fp8: true quantizes the weights that adapters would change"
    return None


def load_for_engine(pipe, config, source, backend: str) -> tuple[Adapters | None, str | None]:
    """The adapters of the weights folder's loras/ and the config's lora_dir, loaded into `pipe`'s layers (before
    optimizing), or None; and, when there are adapters this config cannot apply, why."""
    folders = [Path(source) / LORAS_DIR] + ([Path(config.lora_dir)] if config.lora_dir else [])
    files = find_adapter_files(folders)
    if not files:
        return None, None
    reason = unavailable_reason(config, backend)
    if reason:
        logger.warning("LoRA: %d adapter(s) found and not served: %s", len(files), reason)
        return None, reason
    start = time.perf_counter()
    adapters, _ = load_adapters(pipe, files, config.max_loras)
    if adapters is not None:
        logger.info("LoRA: serving %s (%d layers, %.1f MB of factors, %.1f MB of original weights) in %.1f s",
                    ", ".join(adapters.names), len(adapters.modules), adapters.nbytes() / 2**20,
                    sum(t.numel() * t.element_size() for t in adapters.originals.values()) / 2**20,
                    time.perf_counter() - start)
    return adapters, None
