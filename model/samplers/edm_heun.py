"""EDM's deterministic Heun sampler (Karras et al. 2022, Algorithm 1, S_churn = 0) as a diffusers scheduler.

diffusers has no scheduler that reproduces it (its HeunDiscreteScheduler derives sigmas from a beta schedule, its
EDMEulerScheduler is first order and starts from sqrt(sigma_max^2 + 1)), so this one follows their interface:
`set_timesteps`, `scale_model_input`, `step`, with the preconditioning training uses (model/objectives/edm.py).
A pipeline walks `timesteps` (2 x steps - 1 network evaluations: the second-order correction of each step
re-evaluates at the next sigma; the last step, to sigma 0, is plain Euler) and calls the network on
`scale_model_input(x, t)` with `t` itself as the noise conditioning (c_noise = ln(sigma) / 4); `step` turns the
network's raw output F into the denoised estimate c_skip x + c_out F. The ODE state is kept in float64.
Exported folders carry this file, bundled with the preconditioning, as their scheduler's code.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import BaseOutput

from model.objectives.configs import EDMConfig
from model.objectives.edm import precondition


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
class EDMHeunSchedulerOutput(BaseOutput):
    """The next ODE state and the denoised estimate at the evaluated sigma."""

    prev_sample: torch.Tensor
    pred_original_sample: torch.Tensor


class EDMHeunScheduler(SchedulerMixin, ConfigMixin):
    """EDM Heun with its preconditioning (see the module docstring); `sigma_data` is the network's (default: the
    objective's own, EDMConfig)."""

    order = 2
    config_name = "scheduler_config.json"

    @register_to_config
    def __init__(self, sigma_data: float = EDMConfig.sigma_data, sigma_min: float = 0.002, sigma_max: float = 80.0,
                 rho: float = 7.0, num_train_timesteps: int = 1000):
        # num_train_timesteps: only so diffusers' helpers that read it find a value; EDM trains in continuous sigma.
        self.set_timesteps(1)

    @property
    def init_noise_sigma(self) -> float:
        """x(sigma_max) = sigma_max x standard normal noise."""
        return float(self.sigmas[0])

    def set_timesteps(self, num_inference_steps: int, device: torch.device | str = "cpu") -> None:
        """The Karras sigma grid of `num_inference_steps` steps and the (2 steps - 1) evaluations it takes."""
        c = self.config
        self.num_inference_steps = int(num_inference_steps)
        self.sigmas = karras_sigmas(self.num_inference_steps, c.sigma_min, c.sigma_max, c.rho, device)
        evaluated = torch.cat([self.sigmas[:1], self.sigmas[1:-1].repeat_interleave(2)])  # s0, s1, s1, s2, s2, ...
        self._evaluated = evaluated  # the sigma of each evaluation
        self.timesteps = precondition(evaluated, c.sigma_data)[3]  # c_noise: the network's noise input
        self._index, self._first = 0, None  # evaluation counter; the pending first-order step's state

    def _sigma(self) -> torch.Tensor:
        return self._evaluated[self._index]

    def scale_model_input(self, sample: torch.Tensor, timestep: torch.Tensor | float | None = None) -> torch.Tensor:
        """c_in x at the current evaluation's sigma."""
        return precondition(self._sigma().to(sample.device), self.config.sigma_data)[2] * sample

    def step(self, model_output: torch.Tensor, timestep: torch.Tensor | float | None, sample: torch.Tensor,
             return_dict: bool = True) -> EDMHeunSchedulerOutput | tuple:
        """One evaluation's update from the network's raw output F (guided): the first-order (Euler) step from
        sigma_i to sigma_{i+1}, or its second-order correction, whichever this evaluation is."""
        if self._index >= len(self._evaluated):
            raise ValueError(f"step called {self._index + 1} times for {len(self._evaluated)} evaluations; call "
                             "set_timesteps again before a new sampling loop")
        sigma = self._sigma().to(sample.device)
        c_skip, c_out, _, _ = precondition(sigma, self.config.sigma_data)
        x = sample.to(torch.float64)
        denoised = c_skip * x + c_out * model_output.to(torch.float64)  # D(x; sigma)
        slope = (x - denoised) / sigma
        if self._first is None:  # first order: Euler from sigma to the next sigma
            step = int((self.sigmas.to(sample.device) >= sigma).sum()) - 1  # i, with sigmas[i] == sigma
            sigma_next = self.sigmas[step + 1].to(sample.device)
            prev = x + (sigma_next - sigma) * slope
            if sigma_next > 0:  # a correction at sigma_next follows
                self._first = (x, slope, sigma_next - sigma)
        else:  # second order: average the slopes at both ends of the step
            start, first_slope, dt = self._first
            prev = start + dt * 0.5 * (first_slope + slope)
            self._first = None
        self._index += 1
        prev = prev.to(sample.dtype)
        if not return_dict:
            return prev, denoised
        return EDMHeunSchedulerOutput(prev_sample=prev, pred_original_sample=denoised)

    def __len__(self) -> int:
        return self.config.num_train_timesteps
