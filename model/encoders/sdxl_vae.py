"""The SDXL VAE through diffusers' `AutoencoderKL` (MicroDiT's latents), and a tiny one built from config for tests.

Specs: "stabilityai/stable-diffusion-xl-base-1.0" (subfolder vae), "madebyollin/sdxl-vae-fp16-fix",
"ostris/vae-kl-f8-d16" (16 channels, no subfolder: the 16-channel released MicroDiT's), or a local folder written
by `save_pretrained` / `save_tiny_vae`. Channels, downsampling, scaling and shift are read from the VAE's config.
"""
from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL

from model.encoders.checks import check_latents, check_pixels
from model.encoders.specs import SDXL_VAE_HUB

class DiffusersVAE:
    """A diffusers AutoencoderKL; latents are one posterior sample, shifted and scaled as its config says."""

    def __init__(self, vae, device, dtype):
        vae = vae.to(device=device) if vae.dtype == dtype else vae.to(device=device, dtype=dtype)
        self.vae = vae.eval().requires_grad_(False)
        self.device, self.dtype = torch.device(device), dtype
        cfg = vae.config
        self.scaling_factor = float(cfg.scaling_factor)  # 0.13025 for SDXL, read, never copied
        self.shift_factor = float(cfg.shift_factor) if getattr(cfg, "shift_factor", None) is not None else 0.0
        self.latent_channels = int(cfg.latent_channels)
        self.downsample = 2 ** (len(cfg.block_out_channels) - 1)

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """(N, 3, H, W) in [-1, 1] -> (N, C, H/f, W/f) float32: one posterior sample x scaling factor."""
        check_pixels(pixels, self.downsample)
        posterior = self.vae.encode(pixels.to(self.device, self.dtype)).latent_dist
        z = posterior.sample(generator=generator)  # (N, C, h, w)
        return ((z - self.shift_factor) * self.scaling_factor).float()

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """(N, C, h, w) -> (N, 3, f*h, f*w) float32 in [-1, 1]."""
        check_latents(latents, self.latent_channels)
        z = latents.to(self.device, self.dtype) / self.scaling_factor + self.shift_factor
        return self.vae.decode(z).sample.clamp(-1, 1).float()


def load_sdxl_vae(spec: str, device="cpu", dtype: torch.dtype = torch.float32) -> DiffusersVAE:
    """A hub id of SDXL_VAE_HUB or a local diffusers VAE folder (or a whole pipeline snapshot with vae/)."""
    if spec in SDXL_VAE_HUB:
        if dtype == torch.float16 and spec != "madebyollin/sdxl-vae-fp16-fix":
            raise ValueError(f"VAE {spec!r} overflows in float16; use bfloat16/float32 or "
                             "'madebyollin/sdxl-vae-fp16-fix'")
        return _load(spec, SDXL_VAE_HUB[spec], device, dtype)
    folder = Path(spec).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"VAE folder {str(folder)!r} does not exist")
    if (folder / "config.json").is_file():
        subfolder = None
    elif (folder / "vae" / "config.json").is_file():  # a whole pipeline snapshot
        subfolder = "vae"
    else:
        raise FileNotFoundError(f"VAE folder {str(folder)!r} has no config.json (nor vae/config.json)")
    return _load(str(folder), subfolder, device, dtype)


def _load(path: str, subfolder: str | None, device, dtype) -> DiffusersVAE:
    vae = AutoencoderKL.from_pretrained(path, subfolder=subfolder, torch_dtype=dtype, use_safetensors=True,
                                        low_cpu_mem_usage=False)  # low-memory loading needs accelerate
    # force_upcast marks VAEs that overflow in fp16 (SDXL's); the fp16-fix VAE clears it.
    if dtype == torch.float16 and getattr(vae.config, "force_upcast", False):
        raise ValueError(f"VAE {path!r} has force_upcast=True in its config: it overflows in float16; "
                         "use bfloat16 or float32")
    return DiffusersVAE(vae, device, dtype)


def save_tiny_vae(folder, scaling_factor: float = 0.5, seed: int = 0, force_upcast: bool = False) -> str:
    """Write a tiny AutoencoderKL (SDXL's class, f=4, a few channels, random weights) with save_pretrained."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=4,
            down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
            block_out_channels=(8, 8, 16), layers_per_block=1, norm_num_groups=4, sample_size=32,
            scaling_factor=scaling_factor, force_upcast=force_upcast,
        )
    vae.save_pretrained(str(folder), safe_serialization=True)
    return str(folder)
