"""Heun EDM sampler with classifier-free guidance (model/samplers/heun.py): schedule, accuracy, CFG, determinism."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from model.samplers.heun import HeunOutput, HeunSampler, guided_denoiser, karras_sigmas, make_noise

S = 0.5  # std of the Gaussian "data"




SD = 0.9  # EDM's sigma_data (model/objectives/edm.py EDMConfig)


def gaussian_denoiser(x, sigma, caption):
    """Exact D for data x ~ N(mu, S^2) per element, mu = mean of the caption (zeros -> mu 0)."""
    mu = caption.flatten(1).mean(dim=1).to(x.dtype).view(-1, 1, 1, 1)
    k = (S ** 2 / (S ** 2 + sigma.to(x.dtype) ** 2)).view(-1, 1, 1, 1)
    return mu + k * (x - mu)


def captions_with_mean(n: int, mu: float) -> torch.Tensor:
    return torch.full((n, 3, 2), mu)


class CountingNet(nn.Module):
    """MicroDiT-shaped stand-in that records each forward's batch size and dtype."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Conv2d(4, 4, 1)
        self.cap = nn.Linear(2, 4)
        self.calls: list[tuple[int, torch.dtype]] = []

    def forward(self, x, c_noise, caption, mask_ratio=0.0, generator=None):
        self.calls.append((x.shape[0], x.dtype))
        n = x.shape[0]
        return self.lin(x) * c_noise.view(-1, 1, 1, 1).cos() + self.cap(caption.mean(1)).view(n, 4, 1, 1), None


def test_sigma_schedule_matches_edm_formula():
    steps, smin, smax, rho = 7, 0.002, 80.0, 7.0
    sig = karras_sigmas(steps, smin, smax, rho)
    assert sig.dtype == torch.float64 and sig.shape == (steps + 1,)
    for i in range(steps):
        ref = (smax ** (1 / rho) + i / (steps - 1) * (smin ** (1 / rho) - smax ** (1 / rho))) ** rho
        assert sig[i].item() == pytest.approx(ref, rel=1e-12)
    assert sig[0].item() == pytest.approx(80.0) and sig[steps - 1].item() == pytest.approx(0.002)
    assert sig[-1].item() == 0.0 and bool((sig[:-1] > sig[1:]).all())
    sampler = HeunSampler(steps=30)
    assert sampler.sigmas.shape == (31,)
    sampler.set_timesteps(10)
    assert sampler.sigmas.shape == (11,) and sampler.steps == 10
    with pytest.raises(ValueError, match="sigma_min"):
        karras_sigmas(5, sigma_min=1.0, sigma_max=0.5, rho=7.0)


def test_analytic_gaussian_reaches_exact_solution_and_distribution():
    noise = make_noise((4000, 1, 2, 2), seed=0)
    cap = captions_with_mean(4000, 1.5)
    # The probability-flow ODE of a Gaussian is linear: x(0) = mu + (x_T - mu) * S / sqrt(S^2 + smax^2).
    exact = 1.5 + (noise.double() * 80.0 - 1.5) * S / math.sqrt(S ** 2 + 80.0 ** 2)
    errors = {}
    for steps in (30, 100):
        out = HeunSampler(steps=steps).sample(gaussian_denoiser, noise, cap, guidance=None, sigma_data=SD)
        assert out.dtype == torch.float32
        errors[steps] = ((out.double() - 1.5) / (exact - 1.5) - 1).abs().max().item()
        if steps == 30:
            assert out.mean().item() == pytest.approx(1.5, abs=0.02)
            assert out.std().item() == pytest.approx(S, rel=0.04)
    # Heun is second order: 30 steps within a few percent, 100 steps ~ (30/100)^2 of that.
    assert errors[30] < 0.03 and errors[100] < 0.003
    assert errors[100] < errors[30] * (30 / 100) ** 2 * 1.5


def test_guidance_scales_the_conditional_shift():
    # With mu_u = 0, guided D is the exact D of N(g * mu_c, S^2): samples land there.
    noise = make_noise((4000, 1, 2, 2), seed=1)
    out = HeunSampler(steps=30).sample(gaussian_denoiser, noise, captions_with_mean(4000, 0.4), guidance=3.0,
                                       sigma_data=SD)
    assert out.mean().item() == pytest.approx(1.2, abs=0.02)
    assert out.std().item() == pytest.approx(S, rel=0.04)


def test_guidance_one_equals_conditional_only():
    torch.manual_seed(0)
    net = CountingNet()
    noise, cap = make_noise((3, 4, 4, 4), seed=2), torch.randn(3, 5, 2)
    sampler = HeunSampler(steps=6)
    guided = sampler.sample(net, noise, cap, guidance=1.0, sigma_data=SD)
    cond = sampler.sample(net, noise, cap, guidance=None, sigma_data=SD)
    torch.testing.assert_close(guided, cond, rtol=1e-5, atol=1e-5)
    g5 = sampler.sample(net, noise, cap, guidance=5.0, sigma_data=SD)
    assert (g5 - cond).abs().max() > 1e-3, "the unconditional branch must matter at guidance 5"


def test_cfg_is_one_batched_forward_in_model_dtype():
    net = CountingNet()
    noise, cap = make_noise((3, 4, 4, 4), seed=3), torch.randn(3, 5, 2)
    HeunSampler(steps=5).sample(net, noise, cap, guidance=4.0, sigma_data=SD)
    assert len(net.calls) == 2 * 5 - 1  # Heun: two evaluations per step, Euler on the last
    assert all(n == 6 and dt == torch.float32 for n, dt in net.calls)


def test_guided_denoiser_uses_zero_caption_for_uncond():
    seen = []

    def d(x, sigma, caption):
        seen.append(caption.clone())
        return gaussian_denoiser(x, sigma, caption)

    cap = captions_with_mean(2, 2.0)
    x, sigma = torch.randn(2, 1, 2, 2, dtype=torch.float64), torch.full((2,), 1.0, dtype=torch.float64)
    out = guided_denoiser(d, 2.0, SD)(x, sigma, cap)
    assert torch.equal(seen[0][:2], cap) and (seen[0][2:] == 0).all()
    expected = gaussian_denoiser(x, sigma, captions_with_mean(2, 4.0))  # mu' = 0 + 2 * (2 - 0)
    torch.testing.assert_close(out, expected)


def test_same_seed_same_samples_and_seed_zero_is_a_seed():
    net = CountingNet()
    cap = torch.randn(2, 5, 2)
    a = HeunSampler(steps=4).sample(net, make_noise((2, 4, 4, 4), seed=0), cap, guidance=2.0, sigma_data=SD)
    b = HeunSampler(steps=4).sample(net, make_noise((2, 4, 4, 4), seed=0), cap, guidance=2.0, sigma_data=SD)
    assert torch.equal(a, b)
    assert torch.equal(make_noise((5,), seed=0), torch.randn(5, generator=torch.Generator().manual_seed(0)))
    assert not torch.equal(make_noise((5,), seed=0), make_noise((5,), seed=1))


def test_manual_step_loop_equals_sample():
    sampler = HeunSampler(steps=5)
    noise, cap = make_noise((8, 1, 2, 2), seed=4), captions_with_mean(8, -0.7)
    x = sampler.init_noise(noise)
    assert x.dtype == torch.float64
    for i in range(sampler.steps):
        res = sampler.step(gaussian_denoiser, i, x, cap)
        assert isinstance(res, HeunOutput) and res.prev_sample.dtype == torch.float64
        x = res.prev_sample
    torch.testing.assert_close(x.float(), sampler.sample(gaussian_denoiser, noise, cap, guidance=None, sigma_data=SD))
    with pytest.raises(ValueError, match="step index"):
        sampler.step(gaussian_denoiser, 5, x, cap)


def test_sampler_drives_microdit_debug():
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
    sampler = HeunSampler(steps=3)
    a = sampler.sample(net, make_noise(shape, seed=0), cap, guidance=3.0, sigma_data=SD)
    b = sampler.sample(net, make_noise(shape, seed=0), cap, guidance=3.0, sigma_data=SD)
    c = sampler.sample(net, make_noise(shape, seed=0), cap, guidance=None, sigma_data=SD)
    assert a.shape == shape and a.dtype == torch.float32 and torch.isfinite(a).all()
    assert torch.equal(a, b)
    assert (a - c).abs().max() > 1e-4
