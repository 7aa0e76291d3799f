"""Stable Diffusion pipelines with seeded random weights, built from configs: nothing is downloaded.

Tiny presets (a few MB, 64x64 images, noise rather than pictures) for the demo and the CPU tests, one per family:
- `tiny`: SD 1.x (PNDM, epsilon prediction);
- `tiny-sd2`: SD 2.x (linear projections, upcast attention, DDIM with v-prediction);
- `tiny-sdxl`: SDXL (two text encoders, size/crop micro-conditioning, Euler, a VAE that asks to be upcast).
Full architectures (random weights) for GPU speed and parity checks: speed equals real weights, quality is checked
against the eager pipeline on the same seed:
- `sd15` (512x512), `sd21` (768x768, v-prediction), `sdxl` (1024x1024).
Each takes the settings of the public model's config files that differ from diffusers' defaults.

All use a CLIP tokenizer whose vocabulary (the 256 byte symbols, with and without the end-of-word mark, plus the two
special tokens) is written locally, so the real CLIPTokenizer loading code runs on it.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch

PRESETS = ("tiny", "tiny-sd2", "tiny-sdxl", "sd15", "sd21", "sdxl")

# Scheduler settings of the public models (scheduler/scheduler_config.json).
_SD_BETAS = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                 steps_offset=1)
SCHEDULERS = {
    "sd1": ("PNDMScheduler", dict(_SD_BETAS, skip_prk_steps=True, set_alpha_to_one=False)),
    "sd2": ("DDIMScheduler", dict(_SD_BETAS, prediction_type="v_prediction", clip_sample=False,
                                  set_alpha_to_one=False)),
    "sdxl": ("EulerDiscreteScheduler", dict(_SD_BETAS, timestep_spacing="leading", interpolation_type="linear",
                                            prediction_type="epsilon", use_karras_sigmas=False)),
}
_TINY_UNET = dict(sample_size=32, block_out_channels=(32, 64), layers_per_block=2, norm_num_groups=32,
                  down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                  up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"))
_TINY_VAE = dict(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
                 up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, sample_size=64)
_TINY_TEXT = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                  max_position_embeddings=77, projection_dim=32)
_SD_VAE = dict(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
               up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, layers_per_block=2)
# CLIP ViT-L/14's text tower (SD 1.x, SDXL's first encoder); the vocabulary is the real size, our tokenizer uses
# only its first ids.
_CLIP_L = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
               max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768)

# preset -> scheduler family and component configs; `text_encoder_2` makes it an SDXL pipeline.
_PRESETS = {
    "tiny": dict(scheduler="sd1", unet=dict(_TINY_UNET, cross_attention_dim=32, attention_head_dim=8),
                 vae=_TINY_VAE, text_encoder=_TINY_TEXT),
    "tiny-sd2": dict(scheduler="sd2", unet=dict(_TINY_UNET, cross_attention_dim=32, attention_head_dim=(2, 4),
                                                use_linear_projection=True, upcast_attention=True),
                     vae=_TINY_VAE, text_encoder=dict(_TINY_TEXT, hidden_act="gelu")),
    "tiny-sdxl": dict(scheduler="sdxl",
                      unet=dict(_TINY_UNET, cross_attention_dim=64, attention_head_dim=(2, 4),
                                use_linear_projection=True, transformer_layers_per_block=(1, 2),
                                addition_embed_type="text_time", addition_time_embed_dim=8,
                                projection_class_embeddings_input_dim=6 * 8 + 32),
                      vae=dict(_TINY_VAE, force_upcast=True), text_encoder=dict(_TINY_TEXT, hidden_act="gelu"),
                      text_encoder_2=dict(_TINY_TEXT, hidden_act="gelu")),
    # runwayml/stable-diffusion-v1-5
    "sd15": dict(scheduler="sd1", unet=dict(sample_size=64, cross_attention_dim=768, attention_head_dim=8),
                 vae=dict(_SD_VAE, sample_size=512), text_encoder=_CLIP_L),
    # stabilityai/stable-diffusion-2-1 (768-v); its text encoder is OpenCLIP ViT-H/14's text tower.
    "sd21": dict(scheduler="sd2", unet=dict(sample_size=96, cross_attention_dim=1024,
                                            attention_head_dim=(5, 10, 20, 20), use_linear_projection=True,
                                            upcast_attention=True),
                 vae=dict(_SD_VAE, sample_size=768),
                 text_encoder=dict(_CLIP_L, hidden_size=1024, intermediate_size=4096, num_hidden_layers=23,
                                   num_attention_heads=16, hidden_act="gelu", projection_dim=512)),
    # stabilityai/stable-diffusion-xl-base-1.0; text_encoder_2 is OpenCLIP ViT-bigG/14's text tower.
    "sdxl": dict(scheduler="sdxl",
                 unet=dict(sample_size=128, block_out_channels=(320, 640, 1280), cross_attention_dim=2048,
                           attention_head_dim=(5, 10, 20), transformer_layers_per_block=(1, 2, 10),
                           down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                           up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                           use_linear_projection=True, addition_embed_type="text_time",
                           addition_embed_type_num_heads=64, addition_time_embed_dim=256,
                           projection_class_embeddings_input_dim=2816),
                 vae=dict(_SD_VAE, sample_size=1024, scaling_factor=0.13025, force_upcast=True),
                 text_encoder=_CLIP_L,
                 text_encoder_2=dict(_CLIP_L, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                                     num_attention_heads=20, hidden_act="gelu", projection_dim=1280)),
}


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


def preset_config(preset: str) -> dict:
    if preset not in _PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {PRESETS}")
    return _PRESETS[preset]


def native_size(preset: str) -> int:
    """The side in pixels the preset's UNet was built for (sample size x the VAE's 2^(levels-1) scale)."""
    config = preset_config(preset)
    return config["unet"]["sample_size"] * 2 ** (len(config["vae"]["block_out_channels"]) - 1)


def build_pipeline(preset: str = "tiny", seed: int = 0, device: str | torch.device = "cpu"):
    """A StableDiffusion(XL)Pipeline with weights drawn from `torch.manual_seed(seed)`, in float32 on `device`."""
    import diffusers
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = preset_config(preset)
    tokenizer = build_tokenizer()
    special = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
               "pad_token_id": tokenizer.pad_token_id}
    scheduler_class, scheduler_config = SCHEDULERS[config["scheduler"]]
    scheduler = getattr(diffusers, scheduler_class)(**scheduler_config)
    torch.manual_seed(seed)
    with torch.device(device):
        unet = UNet2DConditionModel(**config["unet"])
        vae = AutoencoderKL(**config["vae"])
        text_encoder = CLIPTextModel(
            CLIPTextConfig(**{"vocab_size": len(tokenizer), **config["text_encoder"], **special}))
        if "text_encoder_2" not in config:
            return diffusers.StableDiffusionPipeline(
                vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        text_encoder_2 = CLIPTextModelWithProjection(
            CLIPTextConfig(**{"vocab_size": len(tokenizer), **config["text_encoder_2"], **special}))
    return diffusers.StableDiffusionXLPipeline(
        vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
        tokenizer_2=build_tokenizer(), unet=unet, scheduler=scheduler, add_watermarker=False)


def save_pipeline(preset: str, out_dir: str | Path, seed: int = 0, device: str = "cpu",
                  dtype: torch.dtype = torch.float32) -> Path:
    """Build a preset and write it as a diffusers folder with save_pretrained (safetensors)."""
    pipe = build_pipeline(preset, seed=seed, device=device).to(dtype=dtype)
    pipe.save_pretrained(str(out_dir), safe_serialization=True)
    return Path(out_dir)
