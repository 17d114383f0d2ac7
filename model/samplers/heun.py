"""Deterministic Heun sampler of EDM (Karras et al. 2022, Algorithm 1, S_churn = 0) with classifier-free guidance.

Scheduler-style interface: `set_timesteps`, `init_noise`, `step` (returns `HeunOutput`); `sample` runs the loop.
The ODE state is float64; the network runs in its own dtype. The model never sees the sampler.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from model.objectives.edm import denoise

__all__ = ["HeunSampler", "HeunOutput", "karras_sigmas", "guided_denoiser", "make_noise"]

# A denoiser maps (x (N, C, H, W) float64, sigma (N,) float64, caption) -> D(x; sigma) float64.
Denoiser = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def karras_sigmas(steps: int, sigma_min: float, sigma_max: float, rho: float,
                  device: torch.device | str = "cpu") -> torch.Tensor:
    """EDM noise levels sigma_0 > ... > sigma_{steps-1} = sigma_min, then a final 0 -> (steps + 1,) float64."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if not 0 < sigma_min < sigma_max:
        raise ValueError(f"need 0 < sigma_min < sigma_max, got sigma_min={sigma_min}, sigma_max={sigma_max}")
    i = torch.arange(steps, dtype=torch.float64, device=device)
    frac = i / (steps - 1) if steps > 1 else torch.zeros_like(i)
    lo, hi = sigma_min ** (1.0 / rho), sigma_max ** (1.0 / rho)
    sigmas = (hi + frac * (lo - hi)) ** rho
    return torch.cat([sigmas, sigmas.new_zeros(1)])


@dataclass
class HeunOutput:
    """Result of one sampler step: the next ODE state and the denoised estimate at the current sigma."""

    prev_sample: torch.Tensor
    denoised: torch.Tensor


def guided_denoiser(net: nn.Module | Denoiser, guidance: float | None, sigma_data: float) -> Denoiser:
    """Wrap a network (MicroDiT forward) or a denoiser callable with classifier-free guidance.

    guidance None: conditional only (one forward). Otherwise D = D_u + g (D_c - D_u), where the
    unconditional caption is zeros and both branches run as one batched forward.
    """
    if isinstance(net, nn.Module):
        def base(x, sigma, caption):
            return denoise(net, x, sigma, caption, sigma_data)[0]
    else:
        base = net

    if guidance is None:
        return base

    def cfg(x, sigma, caption):
        n = x.shape[0]
        d = base(torch.cat([x, x]), torch.cat([sigma, sigma]),
                 torch.cat([caption, torch.zeros_like(caption)]))  # (2N, C, H, W)
        d_c, d_u = d[:n], d[n:]
        return d_u + guidance * (d_c - d_u)

    return cfg


def make_noise(shape, seed: int | None, device: torch.device | str = "cpu") -> torch.Tensor:
    """Standard normal initial noise (float32); a given seed (0 included) makes it reproducible."""
    gen = None
    if seed is not None:
        gen = torch.Generator(device=device).manual_seed(int(seed))
    return torch.randn(shape, generator=gen, device=device, dtype=torch.float32)


class HeunSampler:
    """EDM deterministic Heun sampler: 2 * steps - 1 denoiser evaluations, last step plain Euler to sigma 0."""

    def __init__(self, steps: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0):
        self.sigma_min, self.sigma_max, self.rho = float(sigma_min), float(sigma_max), float(rho)
        self.set_timesteps(steps)

    def set_timesteps(self, steps: int, device: torch.device | str = "cpu") -> None:
        """Build the (steps + 1,) float64 sigma schedule ending at 0."""
        self.steps = int(steps)
        self.sigmas = karras_sigmas(self.steps, self.sigma_min, self.sigma_max, self.rho, device)

    def init_noise(self, noise: torch.Tensor) -> torch.Tensor:
        """Initial ODE state x_0 = sigma_max * noise, float64."""
        return noise.to(torch.float64) * self.sigmas[0].to(noise.device)

    def step(self, denoiser: Denoiser, i: int, sample: torch.Tensor, caption: torch.Tensor) -> HeunOutput:
        """Advance the float64 state from sigmas[i] to sigmas[i + 1] (Heun; Euler when sigmas[i + 1] == 0)."""
        if not 0 <= i < self.steps:
            raise ValueError(f"step index must be in [0, {self.steps}), got {i}")
        sigmas = self.sigmas.to(sample.device)
        s_cur, s_next = sigmas[i], sigmas[i + 1]
        n = sample.shape[0]
        d_cur = denoiser(sample, s_cur.expand(n), caption).to(torch.float64)
        slope = (sample - d_cur) / s_cur
        x_next = sample + (s_next - s_cur) * slope
        if i < self.steps - 1:  # 2nd-order correction; skipped at the final step to sigma 0
            d_next = denoiser(x_next, s_next.expand(n), caption).to(torch.float64)
            slope_next = (x_next - d_next) / s_next
            x_next = sample + (s_next - s_cur) * 0.5 * (slope + slope_next)
        return HeunOutput(prev_sample=x_next, denoised=d_cur)

    @torch.no_grad()
    def sample(self, net: nn.Module | Denoiser, noise: torch.Tensor, caption: torch.Tensor,
               guidance: float | None, sigma_data: float) -> torch.Tensor:
        """Draw samples from standard normal `noise` (N, C, H, W) given captions; returns float32 latents.

        `net` is a network with the MicroDiT forward (EDM preconditioning is applied here) or a
        denoiser callable D(x, sigma, caption). guidance None runs the conditional branch only.
        """
        if caption.shape[0] != noise.shape[0]:
            raise ValueError(f"caption batch {caption.shape[0]} != noise batch {noise.shape[0]}")
        denoiser = guided_denoiser(net, guidance, sigma_data)
        x = self.init_noise(noise)  # (N, C, H, W) float64
        for i in range(self.steps):
            x = self.step(denoiser, i, x, caption).prev_sample
        return x.to(torch.float32)
