"""What the encoder wrappers share: the shape checks of every autoencoder."""
from __future__ import annotations

import torch


def check_pixels(pixels: torch.Tensor, f: int) -> None:
    if pixels.ndim != 4 or pixels.shape[1] != 3 or pixels.shape[2] % f or pixels.shape[3] % f:
        raise ValueError(f"expected pixels (N, 3, H, W) with H, W multiples of {f}, got {tuple(pixels.shape)}")


def check_latents(latents: torch.Tensor, c: int) -> None:
    if latents.ndim != 4 or latents.shape[1] != c:
        raise ValueError(f"expected latents (N, {c}, h, w), got {tuple(latents.shape)}")
