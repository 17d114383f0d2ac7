"""Rectified flow (flow matching on straight paths) with logit-normal times, plus the REPA alignment loss.

x_t = (1 - t) x0 + t eps, target v = eps - x0, unweighted MSE; t ~ sigmoid(N(logit_mean, logit_std^2)).
Never imports the network. The network is any module with `net(x_t, t, caption) -> v` and, for REPA,
`net(x_t, t, caption, return_repa=True) -> (v, z)` with z (N, T, Z) projected tokens.
"""
from __future__ import annotations


import torch
import torch.nn.functional as F
from torch import nn

from model.objectives.configs import RectifiedFlowConfig

__all__ = ["RectifiedFlowConfig", "sample_t", "interpolate", "velocity_target", "rf_loss", "repa_loss",
           "drop_captions"]


def sample_t(n: int, cfg: RectifiedFlowConfig, generator: torch.Generator | None = None,
             device: torch.device | str = "cpu") -> torch.Tensor:
    """Training times t = sigmoid(z), z ~ N(logit_mean, logit_std^2), shape (n,), float32, in (0, 1)."""
    z = torch.randn(n, generator=generator, device=device, dtype=torch.float32)
    return torch.sigmoid(z * cfg.logit_std + cfg.logit_mean)


def interpolate(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x_t = (1 - t) x0 + t noise, with t (N,) broadcast over the other dims."""
    t = t.view((-1,) + (1,) * (x0.ndim - 1))
    return (1 - t) * x0 + t * noise


def velocity_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """d x_t / d t = noise - x0."""
    return noise - x0


def _net_dtype(net: nn.Module, fallback: torch.dtype) -> torch.dtype:
    for p in net.parameters():
        return p.dtype
    return fallback


def _per_sample_t(t: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor:
    """Broadcast a scalar or (N,) t to (N,) in x's dtype and device."""
    t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
    if t.ndim == 0:
        t = t.expand(x.shape[0])
    if t.shape != (x.shape[0],):
        raise ValueError(f"t must be a scalar or shape ({x.shape[0]},), got {tuple(t.shape)}")
    return t


def rf_loss(net: nn.Module, latents: torch.Tensor, caption: torch.Tensor, cfg: RectifiedFlowConfig,
            generator: torch.Generator | None = None, t: torch.Tensor | None = None,
            noise: torch.Tensor | None = None, return_repa: bool = False):
    """Rectified-flow loss -> (scalar mean over the batch, per_sample (N,), z or None).

    Times and noise come from `generator` unless given (fixed t/noise make an evaluation loss). With
    return_repa the network also returns its projected group-1 tokens z (N, T, Z) for `repa_loss`.
    Captions are used as given: apply `drop_captions` first for classifier-free guidance training.
    """
    x0 = latents.float()
    n = x0.shape[0]
    if t is None:
        t = sample_t(n, cfg, generator, x0.device)
    t = _per_sample_t(t, x0)  # (N,)
    if noise is None:
        noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    noise = noise.to(x0.dtype)
    x_t = interpolate(x0, noise, t)  # (N, C, H, W)
    dtype = _net_dtype(net, x0.dtype)
    out = net(x_t.to(dtype), t.to(dtype), caption.to(dtype), return_repa=True) if return_repa else \
        net(x_t.to(dtype), t.to(dtype), caption.to(dtype))
    v, z = out if return_repa else (out, None)
    per = ((v.float() - velocity_target(x0, noise)) ** 2).flatten(1).mean(dim=1)  # (N,)
    return per.mean(), per, z


def repa_loss(z: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """REPA: minus the mean cosine similarity of projected tokens z (N, T, Z) to encoder features (N, T, Z)."""
    if z.shape != features.shape:
        raise ValueError(f"REPA features shape {tuple(features.shape)} does not match the projected tokens "
                         f"{tuple(z.shape)}: expected (N, tokens, width) equal to the network's group-1 tokens")
    return -F.cosine_similarity(z.float(), features.float(), dim=-1).mean()


def drop_captions(caption: torch.Tensor, p: float, generator: torch.Generator | None = None,
                  uncond: torch.Tensor | None = None) -> torch.Tensor:
    """Replace whole caption rows by the unconditional caption with probability p each.

    uncond: the embedding of the empty prompt, (L, C) or (1, L, C); None means zeros (as EDM's).
    """
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"caption dropout probability must be in [0, 1], got {p}")
    if uncond is not None and tuple(uncond.shape[-2:]) != tuple(caption.shape[1:]):
        raise ValueError(f"uncond shape {tuple(uncond.shape)}: expected {tuple(caption.shape[1:])} "
                         f"(one caption's (L, C))")
    if p == 0.0:
        return caption
    drop = torch.rand(caption.shape[0], generator=generator, device=caption.device) < p  # (N,)
    b = (-1,) + (1,) * (caption.ndim - 1)
    null = torch.zeros_like(caption) if uncond is None else uncond.to(caption).expand_as(caption)
    return torch.where(drop.view(b), null, caption)
