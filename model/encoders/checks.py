"""What the encoder wrappers share: the shape checks of every autoencoder and the test of a local spec."""
from __future__ import annotations

import os

import torch


def check_pixels(pixels: torch.Tensor, f: int) -> None:
    if pixels.ndim != 4 or pixels.shape[1] != 3 or pixels.shape[2] % f or pixels.shape[3] % f:
        raise ValueError(f"expected pixels (N, 3, H, W) with H, W multiples of {f}, got {tuple(pixels.shape)}")


def check_latents(latents: torch.Tensor, c: int) -> None:
    if latents.ndim != 4 or latents.shape[1] != c:
        raise ValueError(f"expected latents (N, {c}, h, w), got {tuple(latents.shape)}")


def is_local_spec(spec) -> bool:
    """True for a spec naming a local folder. Hub ids look like relative paths ("org/name"), so a local spec must
    exist or be explicit (absolute, ./relative, ~)."""
    if not isinstance(spec, (str, os.PathLike)):
        return False
    spec = str(spec)
    return os.path.isabs(spec) or spec.startswith((".", "~")) or os.path.isdir(spec)
