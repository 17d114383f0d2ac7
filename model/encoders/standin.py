"""The parameter-free stand-in autoencoder ("standin"): 4x4 average pooling of RGB plus luminance, so the CPU
demo's decoded samples are real pictures without any VAE weights."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from model.encoders.checks import check_latents, check_pixels


class StandinVAE:
    """Parameter-free autoencoder: 4x4 average pool of RGB plus luminance; decode upsamples the RGB channels."""

    downsample = 4
    latent_channels = 4
    scaling_factor = 1.0
    # Rec. 601 luma weights: the 4th channel is a linear summary, so decode needs only RGB.
    _luma = (0.299, 0.587, 0.114)

    def __init__(self, device="cpu", dtype=torch.float32):
        self.device, self.dtype = torch.device(device), dtype

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """(N, 3, H, W) in [-1, 1] -> (N, 4, H/4, W/4) float32; deterministic, `generator` is ignored."""
        check_pixels(pixels, self.downsample)
        x = pixels.to(self.device, self.dtype)
        rgb = F.avg_pool2d(x, self.downsample)  # (N, 3, h, w)
        w = torch.tensor(self._luma, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
        luma = (rgb * w).sum(1, keepdim=True)  # (N, 1, h, w)
        return torch.cat([rgb, luma], 1).float() * self.scaling_factor

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """(N, 4, h, w) -> (N, 3, 4h, 4w) float32 in [-1, 1]."""
        check_latents(latents, self.latent_channels)
        z = latents.to(self.device, self.dtype) / self.scaling_factor
        x = F.interpolate(z[:, :3], scale_factor=self.downsample, mode="bilinear", align_corners=False)
        return x.clamp(-1, 1).float()
