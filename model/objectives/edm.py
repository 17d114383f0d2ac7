"""EDM (Karras et al. 2022) preconditioning, training noise and loss; never imports the network.

The network is any module with the MicroDiT forward:
`net(x_in, c_noise, caption, keep_ids=...) -> (out, keep)`, where x_in = c_in * x, c_noise = ln(sigma) / 4,
keep_ids (N, K) are the tokens the network keeps, and keep is the (N, T) bool mask of kept patches (None when
nothing is masked). A network that declares `num_patches` gets its keep set drawn here (`random_keep`, from the
loss's generator after sigma and noise), so its forward holds no random op and compiles as one graph; a
network without it draws its own set from `mask_ratio=..., generator=...` in its forward.
The preconditioning, the output combination and the loss run in float32 (float64 when x is), whatever
precision the network computes in.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from model.objectives.configs import EDMConfig

__all__ = ["EDMConfig", "precondition", "denoise", "edm_loss", "loss_weight", "sample_sigmas",
           "masked_patch_mean", "drop_captions", "random_keep"]


def precondition(sigma: torch.Tensor, sigma_data: float):
    """EDM scalings (c_skip, c_out, c_in, c_noise) for noise level(s) sigma, same shape as sigma."""
    s2 = sigma * sigma
    d2 = sigma_data * sigma_data
    c_skip = d2 / (s2 + d2)
    c_out = sigma * sigma_data / (s2 + d2).sqrt()
    c_in = 1.0 / (s2 + d2).sqrt()
    c_noise = sigma.log() / 4
    return c_skip, c_out, c_in, c_noise


def _precision(x: torch.Tensor) -> torch.dtype:
    """The dtype of the preconditioning and loss arithmetic: float32, or x's dtype when wider (float64)."""
    return torch.promote_types(x.dtype, torch.float32)


def _per_sample_sigma(sigma: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor:
    """Broadcast a scalar or (N,) sigma to (N,) in x's precision (at least float32) and device."""
    sigma = torch.as_tensor(sigma, dtype=_precision(x), device=x.device)
    if sigma.ndim == 0:
        sigma = sigma.expand(x.shape[0])
    if sigma.shape != (x.shape[0],):
        raise ValueError(f"sigma must be a scalar or shape ({x.shape[0]},), got {tuple(sigma.shape)}")
    return sigma


def _net_dtype(net: nn.Module, fallback: torch.dtype) -> torch.dtype:
    for p in net.parameters():
        return p.dtype
    return fallback


def random_keep(n: int, tokens: int, mask_ratio: float, generator: torch.Generator | None = None,
                device: torch.device | str = "cpu") -> torch.Tensor:
    """(N, K) kept-token indices, K = int(T (1 - mask_ratio)): a per-sample uniform subset in raster order.

    One torch.rand(N, T) on the generator's device, so a seeded generator gives the same sets on any device.
    """
    kept = int(tokens * (1 - mask_ratio))
    if not 0.0 < mask_ratio < 1.0 or kept == 0:
        raise ValueError(f"mask_ratio={mask_ratio!r} of {tokens} tokens: expected (0, 1) keeping at least one")
    noise_device = generator.device if generator is not None else device
    noise = torch.rand(n, tokens, generator=generator, device=noise_device)  # (N, T)
    ids = torch.argsort(noise, dim=1)[:, :kept]  # a random permutation's first K entries
    return ids.sort(dim=1).values.to(device)  # (N, K)


def denoise(net: nn.Module, x: torch.Tensor, sigma: torch.Tensor | float, caption: torch.Tensor, sigma_data: float,
            mask_ratio: float = 0.0, generator: torch.Generator | None = None,
            net_dtype: torch.dtype | None = None, keep_ids: torch.Tensor | None = None):
    """D(x; sigma) = c_skip x + c_out F(c_in x, c_noise); returns (D, keep), D in float32 (float64 if x is).

    c_skip, c_out, c_in, c_noise and the combination run in that precision; the network sees its own dtype
    (its parameters' dtype unless net_dtype is given) and casts further inside under mixed precision.
    keep_ids (N, K) select the kept tokens; without them a masking network draws its own from
    mask_ratio and generator (0: no masking).
    """
    x = x.to(_precision(x))
    sigma = _per_sample_sigma(sigma, x)  # (N,)
    c_skip, c_out, c_in, c_noise = precondition(sigma, sigma_data)
    dtype = net_dtype or _net_dtype(net, x.dtype)
    b = (-1,) + (1,) * (x.ndim - 1)
    masking = {"keep_ids": keep_ids} if keep_ids is not None else \
        {"mask_ratio": mask_ratio, "generator": generator} if mask_ratio > 0 else {}
    out, keep = net((c_in.view(b) * x).to(dtype), c_noise.to(dtype), caption.to(dtype), **masking)
    d = c_skip.view(b) * x + c_out.view(b) * out.to(x.dtype)  # (N, C, H, W)
    return d, keep


def loss_weight(sigma: torch.Tensor, sigma_data: float) -> torch.Tensor:
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
    if not kept.is_meta and bool((kept == 0).any()):  # meta: the planner's shape-only run (pipeline/planner)
        raise ValueError("keep mask has a sample with no kept patches")
    return (e * k).sum(dim=1) / kept


def edm_loss(net: nn.Module, latents: torch.Tensor, caption: torch.Tensor, cfg: EDMConfig,
             generator: torch.Generator | None = None, sigma: torch.Tensor | None = None,
             noise: torch.Tensor | None = None, patch_size: int | None = None):
    """Weighted EDM denoising loss -> (scalar mean over the batch, per_sample (N,)).

    Noise levels and noise come from `generator` unless given (fixed sigma/noise make an evaluation loss).
    Captions are used as given: apply `drop_captions` first for classifier-free guidance training.
    With masking (cfg.mask_ratio) the error counts only at kept patches. Generator draws, in order:
    sigmas, noise, then the keep set (see the module docstring).
    """
    mask_ratio = cfg.mask_ratio
    x0 = latents.float()
    n = x0.shape[0]
    if sigma is None:
        sigma = sample_sigmas(n, cfg, generator, x0.device)
    sigma = _per_sample_sigma(sigma, x0)  # (N,)
    if noise is None:
        noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    x = x0 + sigma.view(-1, 1, 1, 1) * noise.to(x0.dtype)  # (N, C, H, W)
    keep_ids = None
    if mask_ratio > 0 and hasattr(net, "num_patches"):  # drawn here, after sigma and noise: compile-clean
        keep_ids = random_keep(n, net.num_patches, mask_ratio, generator, x0.device)  # (N, K)
    d, keep = denoise(net, x, sigma, caption, cfg.sigma_data, mask_ratio=mask_ratio, generator=generator,
                      keep_ids=keep_ids)
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
