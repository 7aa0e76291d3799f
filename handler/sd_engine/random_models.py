"""Stable Diffusion pipelines with seeded random weights, built from configs: nothing is downloaded.

- `tiny`: a few-MB pipeline (64x64 images) for the demo and the CPU tests. It makes noise images, not pictures.
- `sd15`: the SD 1.5 architecture (860M-parameter UNet, ViT-L/14 CLIP text encoder, 8x VAE) at 512x512, for GPU speed
  and parity checks: speed equals real weights, quality is checked against the eager pipeline on the same seed.

Both use a CLIP tokenizer whose vocabulary (the 256 byte symbols, with and without the end-of-word mark, plus the two
special tokens) is written locally, so the real CLIPTokenizer loading code runs on it.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch

PRESETS = ("tiny", "sd15")


def _byte_symbols() -> list[str]:
    # The printable-unicode stand-ins for the 256 bytes used by CLIP's (and GPT-2's) byte-level BPE.
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = [b for b in range(256) if b not in printable]
    codes = dict(zip(printable, printable)) | {b: 256 + n for n, b in enumerate(extra)}
    return [chr(codes[b]) for b in range(256)]


def build_tokenizer():
    from transformers import CLIPTokenizer

    symbols = _byte_symbols()
    vocab = {s: i for i, s in enumerate(symbols + [s + "</w>" for s in symbols])}
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "vocab.json").write_text(json.dumps(vocab))
        (Path(tmp) / "merges.txt").write_text("#version: 0.2\n")
        return CLIPTokenizer(str(Path(tmp) / "vocab.json"), str(Path(tmp) / "merges.txt"), model_max_length=77,
                             pad_token="<|endoftext|>")


def _component_configs(preset: str, tokenizer) -> dict:
    special = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
               "pad_token_id": tokenizer.pad_token_id}
    if preset == "tiny":
        return {
            "unet": dict(sample_size=32, block_out_channels=(32, 64), layers_per_block=2, cross_attention_dim=32,
                         down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                         up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=8, norm_num_groups=32),
            "vae": dict(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, sample_size=64),
            "text_encoder": dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                                 num_attention_heads=4, max_position_embeddings=77, projection_dim=32, **special),
        }
    if preset == "sd15":
        return {
            # The runwayml/stable-diffusion-v1-5 unet/config.json values that differ from diffusers' defaults.
            "unet": dict(sample_size=64, cross_attention_dim=768, attention_head_dim=8),
            "vae": dict(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, layers_per_block=2,
                        sample_size=512),
            # CLIP ViT-L/14's text tower. The vocabulary is the real size; our tokenizer uses only its first ids.
            "text_encoder": dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                 num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
                                 projection_dim=768, **special),
        }
    raise ValueError(f"unknown preset {preset!r}; choose from {PRESETS}")


def build_pipeline(preset: str = "tiny", seed: int = 0, device: str | torch.device = "cpu"):
    """A StableDiffusionPipeline with weights drawn from `torch.manual_seed(seed)`, in float32 on `device`."""
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = build_tokenizer()
    configs = _component_configs(preset, tokenizer)
    torch.manual_seed(seed)
    with torch.device(device):
        unet = UNet2DConditionModel(**configs["unet"])
        vae = AutoencoderKL(**configs["vae"])
        text_encoder = CLIPTextModel(CLIPTextConfig(**configs["text_encoder"]))
    # SD 1.5's scheduler settings.
    scheduler = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              num_train_timesteps=1000, skip_prk_steps=True, steps_offset=1, set_alpha_to_one=False)
    return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def save_pipeline(preset: str, out_dir: str | Path, seed: int = 0, device: str = "cpu",
                  dtype: torch.dtype = torch.float32) -> Path:
    """Build a preset and write it as a diffusers folder with save_pretrained (safetensors)."""
    pipe = build_pipeline(preset, seed=seed, device=device).to(dtype=dtype)
    pipe.save_pretrained(str(out_dir), safe_serialization=True)
    return Path(out_dir)
