"""EDM (Karras et al. 2022) preconditioning, training noise and loss; never imports the network.

The network is any module with the MicroDiT forward:
`net(x_in, c_noise, caption, mask_ratio=..., generator=...) -> (out, keep)`, where x_in = c_in * x,
c_noise = ln(sigma) / 4, and keep is a (N, T) bool mask of kept patches (None when nothing is masked).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["EDMConfig", "precondition", "denoise", "edm_loss", "loss_weight", "sample_sigmas",
           "masked_patch_mean", "drop_captions"]


@dataclass
class EDMConfig:
    """EDM training constants: data std and the log-normal training noise ln(sigma) ~ N(p_mean, p_std^2)."""

    sigma_data: float = 0.9
    p_mean: float = -0.6
    p_std: float = 1.2

    def __post_init__(self) -> None:
        if not self.sigma_data > 0:
            raise ValueError(f"EDMConfig.sigma_data must be > 0, got {self.sigma_data}")
        if not self.p_std > 0:
            raise ValueError(f"EDMConfig.p_std must be > 0, got {self.p_std}")


def precondition(sigma: torch.Tensor, sigma_data: float = 0.9):
    """EDM scalings (c_skip, c_out, c_in, c_noise) for noise level(s) sigma, same shape as sigma."""
    s2 = sigma * sigma
    d2 = sigma_data * sigma_data
    c_skip = d2 / (s2 + d2)
    c_out = sigma * sigma_data / (s2 + d2).sqrt()
    c_in = 1.0 / (s2 + d2).sqrt()
    c_noise = sigma.log() / 4
    return c_skip, c_out, c_in, c_noise


def _per_sample_sigma(sigma: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor:
    """Broadcast a scalar or (N,) sigma to (N,) in x's dtype and device."""
    sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
    if sigma.ndim == 0:
        sigma = sigma.expand(x.shape[0])
    if sigma.shape != (x.shape[0],):
        raise ValueError(f"sigma must be a scalar or shape ({x.shape[0]},), got {tuple(sigma.shape)}")
    return sigma


def _net_dtype(net: nn.Module, fallback: torch.dtype) -> torch.dtype:
    for p in net.parameters():
        return p.dtype
    return fallback


def denoise(net: nn.Module, x: torch.Tensor, sigma: torch.Tensor | float, caption: torch.Tensor,
            mask_ratio: float = 0.0, generator: torch.Generator | None = None, sigma_data: float = 0.9,
            net_dtype: torch.dtype | None = None):
    """D(x; sigma) = c_skip x + c_out F(c_in x, c_noise); returns (D in x's dtype, keep).

    The preconditioning runs in x's dtype (float64 in the sampler); the network sees its own dtype
    (its parameters' dtype unless net_dtype is given).
    """
    sigma = _per_sample_sigma(sigma, x)  # (N,)
    c_skip, c_out, c_in, c_noise = precondition(sigma, sigma_data)
    dtype = net_dtype or _net_dtype(net, x.dtype)
    b = (-1,) + (1,) * (x.ndim - 1)
    out, keep = net((c_in.view(b) * x).to(dtype), c_noise.to(dtype), caption.to(dtype),
                    mask_ratio=mask_ratio, generator=generator)
    d = c_skip.view(b) * x + c_out.view(b) * out.to(x.dtype)  # (N, C, H, W)
    return d, keep


def loss_weight(sigma: torch.Tensor, sigma_data: float = 0.9) -> torch.Tensor:
    """EDM loss weight lambda(sigma) = (sigma^2 + sd^2) / (sigma sd)^2."""
    return (sigma * sigma + sigma_data ** 2) / (sigma * sigma_data) ** 2


def sample_sigmas(n: int, cfg: EDMConfig, generator: torch.Generator | None = None,
                  device: torch.device | str = "cpu") -> torch.Tensor:
    """Training noise levels: ln(sigma) ~ N(p_mean, p_std^2), shape (n,), float32."""
    z = torch.randn(n, generator=generator, device=device, dtype=torch.float32)
    return (z * cfg.p_std + cfg.p_mean).exp()


def masked_patch_mean(err: torch.Tensor, keep: torch.Tensor, patch_size: int | None = None) -> torch.Tensor:
    """Per-sample mean of a (N, C, H, W) error over channels, pooled per patch, over kept patches only -> (N,)."""
    n, _, h, w = err.shape
    t = keep.shape[1]
    if patch_size is None:
        patch_size = math.isqrt(h * w // t) if t else 0
    p = patch_size
    if p < 1 or h % p or w % p or (h // p) * (w // p) != t:
        raise ValueError(f"keep mask with {t} patches does not tile a {h}x{w} latent with patch size {p}")
    e = err.mean(dim=1)  # (N, H, W)
    e = e.view(n, h // p, p, w // p, p).mean(dim=(2, 4)).reshape(n, t)  # (N, T), raster order
    k = keep.to(e.dtype)
    kept = k.sum(dim=1)
    if bool((kept == 0).any()):
        raise ValueError("keep mask has a sample with no kept patches")
    return (e * k).sum(dim=1) / kept


def edm_loss(net: nn.Module, latents: torch.Tensor, caption: torch.Tensor, cfg: EDMConfig,
             mask_ratio: float = 0.0, generator: torch.Generator | None = None,
             sigma: torch.Tensor | None = None, noise: torch.Tensor | None = None,
             patch_size: int | None = None):
    """Weighted EDM denoising loss -> (scalar mean over the batch, per_sample (N,)).

    Noise levels and noise come from `generator` unless given (fixed sigma/noise make an evaluation loss).
    Captions are used as given: apply `drop_captions` first for classifier-free guidance training.
    With masking the error counts only at kept patches; masked patches are ignored.
    """
    x0 = latents.float()
    n = x0.shape[0]
    if sigma is None:
        sigma = sample_sigmas(n, cfg, generator, x0.device)
    sigma = _per_sample_sigma(sigma, x0)  # (N,)
    if noise is None:
        noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    x = x0 + sigma.view(-1, 1, 1, 1) * noise.to(x0.dtype)  # (N, C, H, W)
    d, keep = denoise(net, x, sigma, caption, mask_ratio=mask_ratio, generator=generator,
                      sigma_data=cfg.sigma_data)
    err = (d.float() - x0) ** 2  # (N, C, H, W)
    if keep is None:
        per = err.flatten(1).mean(dim=1)  # (N,)
    else:
        per = masked_patch_mean(err, keep, patch_size)  # (N,)
    per = loss_weight(sigma, cfg.sigma_data) * per
    return per.mean(), per


def drop_captions(caption: torch.Tensor, p: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Replace whole caption rows by zeros (the unconditional caption) with probability p each."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"caption dropout probability must be in [0, 1], got {p}")
    if p == 0.0:
        return caption
    drop = torch.rand(caption.shape[0], generator=generator, device=caption.device) < p  # (N,)
    b = (-1,) + (1,) * (caption.ndim - 1)
    return torch.where(drop.view(b), torch.zeros_like(caption), caption)
