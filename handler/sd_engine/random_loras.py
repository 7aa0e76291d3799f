"""LoRA adapters with seeded random weights for a pipeline, made with PEFT and saved as diffusers saves them or in
kohya's layout (`lora_unet_*`, `lora_te*_*`, `.alpha`): for the CPU tests, the demo and GPU timing. Nothing is
downloaded; PEFT is needed only here and at load (diffusers reads adapters through it).
"""

from __future__ import annotations

from pathlib import Path

import torch

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


def save_random_lora(pipe, path: str | Path, seed: int = 0, rank: int = 4, alpha: float = 8.0,
                     layout: str = "diffusers", std: float = 0.05) -> Path:
    """Write `path` (a .safetensors file): a LoRA on the UNet's and the text encoders' attention projections of
    `pipe`'s architecture, random A and B, leaving `pipe` as it was."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict
    from diffusers.utils import convert_state_dict_to_diffusers, convert_state_dict_to_kohya

    path = Path(path)
    generator = torch.Generator().manual_seed(seed)
    layers, metadata = {}, {}
    components = [c for c in ("unet", "text_encoder", "text_encoder_2") if getattr(pipe, c, None) is not None]
    for component in components:
        model = getattr(pipe, component)
        config = LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights=False,
                            target_modules=UNET_TARGETS if component == "unet" else TEXT_TARGETS)
        model.add_adapter(config, adapter_name="random")
        state = get_peft_model_state_dict(model, adapter_name="random")
        state = {k: torch.randn(v.shape, generator=generator) * std for k, v in state.items()}
        layers[component], metadata[component] = state, config.to_dict()
    pipe.unload_lora_weights()  # the plain layers again
    # kohya's prefixes; with two text encoders (SDXL) the first is te1.
    prefixes = {"unet": "lora_unet_", "text_encoder": "lora_te1_" if len(components) == 3 else "lora_te_",
                "text_encoder_2": "lora_te2_"}
    path.parent.mkdir(parents=True, exist_ok=True)
    if layout == "kohya":
        from safetensors.torch import save_file

        flat = {}
        for component, state in layers.items():
            kohya = convert_state_dict_to_kohya(state)
            for key, value in kohya.items():
                flat[prefixes[component] + key] = torch.tensor(float(alpha)) if key.endswith(".alpha") else \
                    value.contiguous()
        save_file(flat, str(path))
    elif layout == "diffusers":
        kwargs = {f"{c}_lora_layers": convert_state_dict_to_diffusers(s) for c, s in layers.items()}
        kwargs.update({f"{c}_lora_adapter_metadata": m for c, m in metadata.items()})
        type(pipe).save_lora_weights(str(path.parent), weight_name=path.name, **kwargs)
    else:
        raise ValueError(f"layout must be diffusers or kohya, got {layout!r}")
    return path
