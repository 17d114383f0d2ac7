"""Flow-matching Euler sampler (rectified flow, t = 1 noise -> t = 0 data) with classifier-free guidance.

Scheduler-style interface: `set_timesteps`, `init_noise`, `step` (returns `EulerOutput`); `sample` runs the loop.
The default time grid is diffusers' FlowMatchEulerDiscreteScheduler at shift 1 (the release's sampler):
linspace(1, t_min, steps) then 0, with t_min = 1/1000. The ODE state is float64; the network runs in its own
dtype. The model never sees the sampler.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from model.samplers.heun import make_noise

__all__ = ["EulerSampler", "EulerOutput", "flow_times", "guided_velocity", "make_noise"]

# A velocity field maps (x (N, C, H, W) float64, t (N,) float64, caption) -> v float64.
Velocity = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def flow_times(steps: int, t_min: float, device: torch.device | str = "cpu") -> torch.Tensor:
    """Times 1 = t_0 > ... > t_{steps-1} = t_min, then a final 0 -> (steps + 1,) float64."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if not 0.0 <= t_min < 1.0:
        raise ValueError(f"t_min must be in [0, 1), got {t_min}")
    if steps == 1:
        times = torch.ones(1, dtype=torch.float64, device=device)
    else:
        times = torch.linspace(1.0, t_min, steps, dtype=torch.float64, device=device)
    return torch.cat([times, times.new_zeros(1)])


@dataclass
class EulerOutput:
    """Result of one sampler step: the next ODE state and the clean estimate x - t v at the current time."""

    prev_sample: torch.Tensor
    denoised: torch.Tensor


def _uncond_batch(uncond: torch.Tensor, caption: torch.Tensor) -> torch.Tensor:
    """Broadcast an (L, C), (1, L, C) or (N, L, C) unconditional caption to caption's shape."""
    if tuple(uncond.shape[-2:]) != tuple(caption.shape[1:]) or (uncond.ndim == 3 and
                                                                uncond.shape[0] not in (1, caption.shape[0])):
        raise ValueError(f"uncond shape {tuple(uncond.shape)}: expected (L, C), (1, L, C) or (N, L, C) with "
                         f"(N, L, C) = {tuple(caption.shape)}")
    return uncond.to(caption).expand_as(caption)


def guided_velocity(net: nn.Module | Velocity, guidance: float | None,
                    uncond: torch.Tensor | None = None) -> Velocity:
    """Wrap a network (`net(x, t, caption) -> v`) or a velocity callable with classifier-free guidance.

    guidance None: conditional only (one forward). Otherwise v = v_u + g (v_c - v_u), both branches in one
    batched forward; `uncond` is the unconditional caption (E-MMDiT: the empty prompt's embedding).
    """
    if isinstance(net, nn.Module):
        dtype = next((p.dtype for p in net.parameters()), torch.float32)

        def base(x, t, caption):
            return net(x.to(dtype), t.to(dtype), caption.to(dtype)).to(torch.float64)
    else:
        base = net

    if guidance is None:
        return base
    if uncond is None:
        raise ValueError("guidance needs the unconditional caption `uncond` (the empty prompt's embedding)")

    def cfg(x, t, caption):
        n = x.shape[0]
        v = base(torch.cat([x, x]), torch.cat([t, t]), torch.cat([caption, _uncond_batch(uncond, caption)]))
        v_c, v_u = v[:n], v[n:]  # (N, C, H, W) each
        return v_u + guidance * (v_c - v_u)

    return cfg


class EulerSampler:
    """Euler integration of dx/dt = v(x, t) from t = 1 to t = 0: `steps` velocity evaluations."""

    def __init__(self, steps: int, t_min: float = 1e-3):
        self.t_min = float(t_min)
        self.set_timesteps(steps)

    def set_timesteps(self, steps: int, device: torch.device | str = "cpu") -> None:
        """Build the (steps + 1,) float64 time grid ending at 0."""
        self.steps = int(steps)
        self.times = flow_times(self.steps, self.t_min, device)

    def init_noise(self, noise: torch.Tensor) -> torch.Tensor:
        """Initial ODE state x(1) = noise, float64."""
        return noise.to(torch.float64)

    def step(self, velocity: Velocity, i: int, sample: torch.Tensor, caption: torch.Tensor) -> EulerOutput:
        """Advance the float64 state from times[i] to times[i + 1]."""
        if not 0 <= i < self.steps:
            raise ValueError(f"step index must be in [0, {self.steps}), got {i}")
        times = self.times.to(sample.device)
        t_cur, t_next = times[i], times[i + 1]
        v = velocity(sample, t_cur.expand(sample.shape[0]), caption).to(torch.float64)
        return EulerOutput(prev_sample=sample + (t_next - t_cur) * v, denoised=sample - t_cur * v)

    @torch.no_grad()
    def sample(self, net: nn.Module | Velocity, noise: torch.Tensor, caption: torch.Tensor,
               guidance: float | None, uncond: torch.Tensor | None = None) -> torch.Tensor:
        """Draw samples from standard normal `noise` (N, C, H, W) given captions; returns float32 latents.

        `net` is a network `net(x, t, caption) -> v` or a velocity callable. guidance None runs the conditional
        branch only; otherwise `uncond` (L, C), (1, L, C) or (N, L, C) is required.
        """
        if caption.shape[0] != noise.shape[0]:
            raise ValueError(f"caption batch {caption.shape[0]} != noise batch {noise.shape[0]}")
        velocity = guided_velocity(net, guidance, uncond)
        x = self.init_noise(noise)  # (N, C, H, W) float64
        for i in range(self.steps):
            x = self.step(velocity, i, x, caption).prev_sample
        return x.to(torch.float32)
