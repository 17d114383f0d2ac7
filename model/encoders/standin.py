"""The parameter-free stand-in autoencoder ("standin"): 4x4 average pooling of RGB plus luminance, so the CPU
demo's decoded samples are real pictures without any VAE weights.

`StandinAutoencoder` is the diffusers model (the pipelines decode with it; exported folders carry this file as
their VAE's code); `StandinVAE` is the encoders' interface over it (precompute, training-time grids).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.autoencoders.vae import DecoderOutput
from diffusers.models.modeling_utils import ModelMixin

from model.encoders.checks import check_latents, check_pixels


class StandinAutoencoder(ModelMixin, ConfigMixin):
    """(N, 3, H, W) in [-1, 1] <-> (N, 4, H/4, W/4): RGB average-pooled plus Rec. 601 luma; decode upsamples RGB."""

    config_name = "config.json"

    @register_to_config
    def __init__(self, downsample: int = 4, latent_channels: int = 4, scaling_factor: float = 1.0):
        super().__init__()
        # Rec. 601 luma weights: the 4th channel is a linear summary, so decode needs only RGB. A saved buffer, so
        # the module has a device, a dtype and a weights file like any diffusers VAE.
        self.register_buffer("luma", torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1))

    @property
    def spatial_compression_ratio(self) -> int:
        return self.config.downsample

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) in [-1, 1] -> (N, 4, H/f, W/f), deterministic."""
        check_pixels(pixels, self.config.downsample)
        rgb = F.avg_pool2d(pixels, self.config.downsample)  # (N, 3, h, w)
        luma = (rgb * self.luma.to(rgb)).sum(1, keepdim=True)  # (N, 1, h, w)
        return torch.cat([rgb, luma], 1)

    def decode(self, z: torch.Tensor, return_dict: bool = True):
        """(N, 4, h, w) -> (N, 3, f*h, f*w) in [-1, 1]."""
        check_latents(z, self.config.latent_channels)
        x = F.interpolate(z[:, :3], scale_factor=self.config.downsample, mode="bilinear", align_corners=False)
        x = x.clamp(-1, 1)
        return DecoderOutput(sample=x) if return_dict else (x,)


class StandinVAE:
    """The encoders' interface (encode/decode, scaling_factor, latent_channels, downsample) over StandinAutoencoder."""

    def __init__(self, device="cpu", dtype=torch.float32):
        self.vae = StandinAutoencoder().to(device=device, dtype=dtype).eval()
        self.device, self.dtype = torch.device(device), dtype
        cfg = self.vae.config
        self.downsample, self.latent_channels, self.scaling_factor = cfg.downsample, cfg.latent_channels, \
            cfg.scaling_factor

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """(N, 3, H, W) in [-1, 1] -> (N, 4, H/4, W/4) float32; deterministic, `generator` is ignored."""
        return self.vae.encode(pixels.to(self.device, self.dtype)).float() * self.scaling_factor

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """(N, 4, h, w) -> (N, 3, 4h, 4w) float32 in [-1, 1]."""
        z = latents.to(self.device, self.dtype) / self.scaling_factor
        return self.vae.decode(z).sample.float()
