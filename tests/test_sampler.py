"""The samplers as diffusers schedulers, driven by the families' pipelines without encoders (prompt_embeds in,
latents out): EDM Heun (model/samplers/edm_heun.py) against the exact solution of a Gaussian, classifier-free
guidance, evaluation counts and determinism; flow-matching Euler (diffusers' scheduler) on straight flows."""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from torch import nn

from model.objectives.edm import precondition
from model.pipelines.emmdit import EMMDiTPipeline
from model.pipelines.microdit import MicroDiTPipeline
from model.samplers.edm_heun import EDMHeunScheduler, karras_sigmas

S = 0.5  # std of the Gaussian "data"
SD = 0.9  # EDM's sigma_data (model/objectives/configs.py EDMConfig)


def noise(shape, seed: int) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


class GaussianNet(nn.Module):
    """A MicroDiT-shaped network whose output F makes D(x; sigma) the exact denoiser of data ~ N(mu, S^2) per
    element, mu = the caption's mean (zeros -> 0). Records each forward's batch size and dtype."""

    def __init__(self, channels: int = 1, side: int = 2, tokens: int = 3, width: int = 2):
        super().__init__()
        self.cfg = SimpleNamespace(in_channels=channels, input_size=side, patch_size=1, caption_len=tokens,
                                   caption_dim=width)
        self.anchor = nn.Parameter(torch.zeros(()))  # a parameter: the pipeline reads dtype and device from it
        self.calls: list[tuple[int, torch.dtype]] = []

    @property
    def device(self):
        return self.anchor.device

    def forward(self, x_in, c_noise, caption):
        self.calls.append((x_in.shape[0], x_in.dtype))
        sigma = (4 * c_noise.double()).exp().view(-1, 1, 1, 1)
        c_skip, c_out, c_in, _ = precondition(sigma, SD)
        x = x_in.double() / c_in
        mu = caption.double().flatten(1).mean(1).view(-1, 1, 1, 1)
        d = mu + S ** 2 / (S ** 2 + sigma ** 2) * (x - mu)
        return ((d - c_skip * x) / c_out).to(x_in.dtype), None


def heun(net, captions, latents, steps: int, guidance: float = 1.0, **kwargs) -> torch.Tensor:
    pipe = MicroDiTPipeline(transformer=net, scheduler=EDMHeunScheduler(sigma_data=SD))
    pipe.set_progress_bar_config(disable=True)
    return pipe(prompt_embeds=captions, latents=latents, num_inference_steps=steps, guidance_scale=guidance,
                output_type="latent", **kwargs).images


def test_sigma_schedule_matches_edm_formula():
    steps, smin, smax, rho = 7, 0.002, 80.0, 7.0
    sig = karras_sigmas(steps, smin, smax, rho)
    assert sig.dtype == torch.float64 and sig.shape == (steps + 1,)
    for i in range(steps):
        ref = (smax ** (1 / rho) + i / (steps - 1) * (smin ** (1 / rho) - smax ** (1 / rho))) ** rho
        assert sig[i].item() == pytest.approx(ref, rel=1e-12)
    assert sig[-1].item() == 0.0 and bool((sig[:-1] > sig[1:]).all())
    scheduler = EDMHeunScheduler(sigma_data=SD)
    scheduler.set_timesteps(10)
    assert scheduler.sigmas.shape == (11,) and len(scheduler.timesteps) == 2 * 10 - 1
    assert scheduler.init_noise_sigma == pytest.approx(80.0)
    # the network's noise input is EDM's c_noise = ln(sigma) / 4 at each evaluated sigma: s0, s1, s1, s2, s2, ...
    torch.testing.assert_close(scheduler.timesteps[:3], scheduler.sigmas[[0, 1, 1]].log() / 4)
    with pytest.raises(ValueError, match="sigma_min"):
        karras_sigmas(5, sigma_min=1.0, sigma_max=0.5, rho=7.0)


def test_heun_reaches_the_exact_solution_of_a_gaussian_at_second_order():
    start = noise((4000, 1, 2, 2), 0)
    cap = torch.full((4000, 3, 2), 1.5)
    # The probability-flow ODE of a Gaussian is linear: x(0) = mu + (x_T - mu) * S / sqrt(S^2 + smax^2).
    exact = 1.5 + (start.double() * 80.0 - 1.5) * S / math.sqrt(S ** 2 + 80.0 ** 2)
    errors = {}
    for steps in (30, 100):
        out = heun(GaussianNet(), cap, start, steps)
        errors[steps] = ((out.double() - 1.5) / (exact - 1.5) - 1).abs().max().item()
        if steps == 30:
            assert out.mean().item() == pytest.approx(1.5, abs=0.02)
            assert out.std().item() == pytest.approx(S, rel=0.04)
    # Heun is second order: 30 steps within a few percent, 100 steps ~ (30/100)^2 of that.
    assert errors[30] < 0.03 and errors[100] < 0.003
    assert errors[100] < errors[30] * (30 / 100) ** 2 * 1.5


def test_guidance_scales_the_conditional_shift_against_zeros():
    # MicroDiT's unconditional caption is zeros (mu_u = 0): guided D is the exact D of N(g * mu_c, S^2).
    out = heun(GaussianNet(), torch.full((4000, 3, 2), 0.4), noise((4000, 1, 2, 2), 1), 30, guidance=3.0)
    assert out.mean().item() == pytest.approx(1.2, abs=0.02)
    assert out.std().item() == pytest.approx(S, rel=0.04)


def test_cfg_is_one_batched_forward_and_guidance_one_skips_it():
    cap, start = torch.randn(3, 3, 2), noise((3, 1, 2, 2), 3)
    net = GaussianNet()
    guided = heun(net, cap, start, 5, guidance=4.0)
    assert len(net.calls) == 2 * 5 - 1  # Heun: two evaluations per step, Euler on the last
    assert all(n == 6 and dt == torch.float32 for n, dt in net.calls)
    net = GaussianNet()
    plain = heun(net, cap, start, 5, guidance=1.0)
    assert all(n == 3 for n, _ in net.calls)  # guidance 1 is the conditional model alone
    assert (guided - plain).abs().max() > 1e-3


def test_same_noise_same_samples_and_a_rerun_scheduler_restarts():
    cap, start = torch.randn(2, 3, 2), noise((2, 1, 2, 2), 0)
    pipe = MicroDiTPipeline(transformer=GaussianNet(), scheduler=EDMHeunScheduler(sigma_data=SD))
    pipe.set_progress_bar_config(disable=True)
    a = pipe(prompt_embeds=cap, latents=start, num_inference_steps=4, guidance_scale=2.0, output_type="latent")
    b = pipe(prompt_embeds=cap, latents=start, num_inference_steps=4, guidance_scale=2.0, output_type="latent")
    assert torch.equal(a.images, b.images)
    generated = pipe(prompt_embeds=cap, generator=[torch.Generator().manual_seed(0), torch.Generator().manual_seed(1)],
                     num_inference_steps=4, output_type="latent").images
    by_seed = pipe(prompt_embeds=cap[1:], generator=[torch.Generator().manual_seed(1)], num_inference_steps=4,
                   output_type="latent").images
    torch.testing.assert_close(generated[1:], by_seed)  # an image's noise is its own generator's: batch-free


def test_scheduler_refuses_steps_past_its_schedule():
    scheduler = EDMHeunScheduler(sigma_data=SD)
    scheduler.set_timesteps(2)
    x = torch.zeros(1, 1, 2, 2, dtype=torch.float64)
    for t in scheduler.timesteps:
        x = scheduler.step(torch.zeros_like(x), t, x).prev_sample
    with pytest.raises(ValueError, match="set_timesteps again"):
        scheduler.step(torch.zeros_like(x), scheduler.timesteps[-1], x)


def test_heun_drives_microdit_debug():
    from model.microdit.config import model_config
    from model.microdit.network import MicroDiT

    torch.manual_seed(0)
    cfg = model_config("MicroDiT_Debug")
    net = MicroDiT(cfg).eval()
    with torch.no_grad():  # non-zero output layer so guidance changes the result
        for p in net.final_layer.parameters():
            p.normal_(0, 0.05)
    shape = (2, cfg.in_channels, cfg.input_size, cfg.input_size)
    cap = torch.randn(2, cfg.caption_len, cfg.caption_dim)
    a = heun(net, cap, noise(shape, 0), 3, guidance=3.0)
    b = heun(net, cap, noise(shape, 0), 3, guidance=3.0)
    c = heun(net, cap, noise(shape, 0), 3, guidance=1.0)
    assert a.shape == shape and a.dtype == torch.float32 and torch.isfinite(a).all()
    assert torch.equal(a, b) and (a - c).abs().max() > 1e-4


# ---------------------------------------------------------------------------------------- flow-matching Euler


class StraightFlow(nn.Module):
    """An E-MMDiT-shaped network whose velocity carries x_t = (1 - t) target + t eps straight to a target chosen by
    the caption's mean: 1 -> `cond`, 0 -> `uncond`. Records batch sizes."""

    def __init__(self, cond: float = 1.0, uncond: float = -0.5):
        super().__init__()
        self.cfg = SimpleNamespace(in_channels=1, input_size=2, patch_size=1, caption_len=3, caption_dim=2)
        self.anchor = nn.Parameter(torch.zeros(()))
        self.targets, self.batches = (cond, uncond), []

    @property
    def device(self):
        return self.anchor.device

    def forward(self, x, t, caption):
        self.batches.append(x.shape[0])
        cond, uncond = self.targets
        target = caption.mean(dim=(1, 2)).view(-1, 1, 1, 1) * (cond - uncond) + uncond
        return (x - target) / t.view(-1, 1, 1, 1)


def euler(net, captions, latents, steps, guidance=1.0, negative=None):
    pipe = EMMDiTPipeline(transformer=net, scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000))
    pipe.set_progress_bar_config(disable=True)
    return pipe(prompt_embeds=captions, negative_prompt_embeds=negative, latents=latents, num_inference_steps=steps,
                guidance_scale=guidance, output_type="latent").images


@pytest.mark.parametrize("steps", [1, 4, 20])
def test_euler_integrates_a_straight_flow_exactly(steps):
    out = euler(StraightFlow(), torch.ones(3, 3, 2), noise((3, 1, 2, 2), 0), steps)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, torch.ones_like(out), rtol=0, atol=1e-5)


def test_euler_guidance_batches_uncond_first_and_ends_at_the_guided_target():
    net = StraightFlow()
    out = euler(net, torch.ones(2, 3, 2), noise((2, 1, 2, 2), 1), 8, guidance=4.5, negative=torch.zeros(1, 3, 2))
    expect = -0.5 + 4.5 * (1.0 - -0.5)  # guided flows end at u + g (c - u)
    torch.testing.assert_close(out, torch.full_like(out, expect), rtol=0, atol=1e-4)
    assert set(net.batches) == {4}  # both branches in one batch
    with pytest.raises(ValueError, match="no text encoder"):
        euler(StraightFlow(), torch.ones(2, 3, 2), noise((2, 1, 2, 2), 1), 2, guidance=4.5)  # no negative, no encoder


def test_euler_timesteps_are_the_release_schedule():
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000)
    scheduler.set_timesteps(20)
    torch.testing.assert_close(scheduler.sigmas[:-1], torch.linspace(1.0, 1e-3, 20), rtol=0, atol=1e-6)
    assert scheduler.sigmas[-1] == 0 and torch.equal(scheduler.timesteps, scheduler.sigmas[:-1] * 1000)
