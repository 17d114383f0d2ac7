"""DC-AE (Chen et al. 2024) through diffusers' `AutoencoderDC`: deterministic latents x the config's scaling factor.

Specs: "mit-han-lab/dc-ae-f32c32-sana-1.0-diffusers" (any hub id or local folder of an AutoencoderDC written by
`save_pretrained`), or "tiny-dcae" (3 stages, f = 4, 4 latent channels, fixed-seed weights).
"""
from __future__ import annotations

import os

import torch

from model.encoders.checks import check_latents, check_pixels
from model.encoders.specs import DCAE_TINY

TINY_SEED = 20241001
# f = 2 ** (stages - 1) = 4; the scaling factor is the release's (DC-AE f32c32's config says 0.41407 too).
TINY_CONFIG = dict(in_channels=3, latent_channels=4, attention_head_dim=8,
                   encoder_block_types=("ResBlock", "ResBlock", "EfficientViTBlock"),
                   decoder_block_types=("ResBlock", "ResBlock", "EfficientViTBlock"),
                   encoder_block_out_channels=(8, 16, 16), decoder_block_out_channels=(8, 16, 16),
                   encoder_layers_per_block=(1, 1, 1), decoder_layers_per_block=(1, 1, 1),
                   encoder_qkv_multiscales=((), (), (5,)), decoder_qkv_multiscales=((), (), (5,)),
                   scaling_factor=0.41407)


class DCAE:
    """A diffusers AutoencoderDC: encode is deterministic (no posterior), latents scaled as its config says."""

    def __init__(self, vae, device, dtype):
        self.vae = vae.to(device=device, dtype=dtype).eval().requires_grad_(False)
        self.device, self.dtype = torch.device(device), dtype
        cfg = vae.config
        self.scaling_factor = float(cfg.scaling_factor)  # read, never copied
        self.latent_channels = int(cfg.latent_channels)
        self.downsample = 2 ** (len(cfg.encoder_block_out_channels) - 1)

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor, generator=None) -> torch.Tensor:
        """(N, 3, H, W) in [-1, 1] -> (N, C, H/f, W/f) float32 x scaling factor; `generator` is ignored."""
        check_pixels(pixels, self.downsample)
        z = self.vae.encode(pixels.to(self.device, self.dtype)).latent  # (N, C, h, w)
        return (z * self.scaling_factor).float()

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """(N, C, h, w) -> (N, 3, f*h, f*w) float32 in [-1, 1]."""
        check_latents(latents, self.latent_channels)
        z = latents.to(self.device, self.dtype) / self.scaling_factor
        return self.vae.decode(z).sample.clamp(-1, 1).float()


def build_tiny(seed: int = TINY_SEED):
    from diffusers import AutoencoderDC

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AutoencoderDC(**TINY_CONFIG)


def save_tiny_dcae(folder, seed: int = TINY_SEED) -> str:
    """Write the tiny AutoencoderDC with save_pretrained."""
    build_tiny(seed).save_pretrained(str(folder), safe_serialization=True)
    return str(folder)


def load_dcae(spec: str, device="cpu", dtype: torch.dtype = torch.float32) -> DCAE:
    """A DC-AE by spec: "tiny-dcae", a hub id or a local folder."""
    if spec == DCAE_TINY:
        return DCAE(build_tiny(), device, dtype)
    from diffusers import AutoencoderDC

    path = os.path.expanduser(str(spec)) if os.path.isdir(os.path.expanduser(str(spec))) else str(spec)
    vae = AutoencoderDC.from_pretrained(path, torch_dtype=dtype, use_safetensors=True, low_cpu_mem_usage=False)
    return DCAE(vae, device, dtype)
