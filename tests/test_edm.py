"""EDM preconditioning, masked loss and caption dropout (model/objectives/edm.py), on small stand-in networks."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from model.objectives.edm import (EDMConfig, denoise, drop_captions, edm_loss, loss_weight, masked_patch_mean,
                       precondition, sample_sigmas)

SD = 0.9




class StandInNet(nn.Module):
    """MicroDiT-shaped stand-in: conv on x plus time/caption terms; masks random patches like MicroDiT."""

    def __init__(self, channels: int = 4, caption_dim: int = 8, patch: int = 2, leak_masked: bool = False):
        super().__init__()
        self.patch, self.leak_masked = patch, leak_masked
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.cap = nn.Linear(caption_dim, channels)
        self.calls: list[tuple[torch.Tensor, torch.Tensor]] = []

    def forward(self, x, c_noise, caption, mask_ratio=0.0, generator=None):
        self.calls.append((x.detach().clone(), c_noise.detach().clone()))
        n, c, h, w = x.shape
        out = self.conv(x) + c_noise.view(-1, 1, 1, 1) + self.cap(caption.mean(1)).view(n, c, 1, 1)
        if mask_ratio == 0:
            return out, None
        gh, gw = h // self.patch, w // self.patch
        t = gh * gw
        order = torch.rand(n, t, generator=generator, device=x.device).argsort(dim=1)
        keep = torch.zeros(n, t, dtype=torch.bool, device=x.device)
        keep.scatter_(1, order[:, : int(t * (1 - mask_ratio))], True)  # (N, T)
        pix = keep.view(n, 1, gh, 1, gw, 1).expand(n, 1, gh, self.patch, gw, self.patch).reshape(n, 1, h, w)
        if self.leak_masked:  # garbage where MicroDiT would put zeros: the loss must not see it
            return torch.where(pix, out, torch.full_like(out, 1e4)), keep
        return out * pix, keep


class ZeroNet(nn.Module):
    def forward(self, x, c_noise, caption, mask_ratio=0.0, generator=None):
        return torch.zeros_like(x), None


def test_preconditioning_identities():
    sigma = torch.logspace(-4, 3, 50, dtype=torch.float64)
    c_skip, c_out, c_in, c_noise = precondition(sigma, SD)
    # Unit-variance network input and target; the skip/out pair splits the variance of x0.
    torch.testing.assert_close(c_in ** 2 * (sigma ** 2 + SD ** 2), torch.ones_like(sigma))
    torch.testing.assert_close(c_skip + c_out ** 2 / SD ** 2, torch.ones_like(sigma))
    torch.testing.assert_close(c_noise, sigma.log() / 4)
    # The loss weight cancels c_out^2: the effective target has unit weight.
    torch.testing.assert_close(loss_weight(sigma, SD) * c_out ** 2, torch.ones_like(sigma))
    # sigma -> 0: D -> x; sigma -> inf: D -> sd * F.
    assert c_skip[0] == pytest.approx(1.0, abs=1e-6) and c_out[0] == pytest.approx(0.0, abs=1e-3)
    assert c_in[0] == pytest.approx(1 / SD, rel=1e-6)
    assert c_skip[-1] == pytest.approx(0.0, abs=1e-6) and c_out[-1] == pytest.approx(SD, rel=1e-6)
    assert (c_in[-1] * sigma[-1]).item() == pytest.approx(1.0, rel=1e-6)


def test_denoise_limits_for_a_zero_net():
    x = torch.randn(3, 4, 8, 8, dtype=torch.float64)
    cap = torch.zeros(3, 5, 8)
    d_small, keep = denoise(ZeroNet(), x, 1e-5, cap, SD)
    assert keep is None
    torch.testing.assert_close(d_small, x, rtol=1e-9, atol=1e-9)
    d_large, _ = denoise(ZeroNet(), x, 1e4, cap, SD)
    assert d_large.abs().max() < 1e-7


def test_denoise_feeds_net_scaled_input_and_combines_output():
    torch.manual_seed(0)
    net = StandInNet().double()
    x = torch.randn(2, 4, 8, 8, dtype=torch.float64)
    sigma = torch.tensor([0.3, 7.0], dtype=torch.float64)
    cap = torch.randn(2, 5, 8, dtype=torch.float64)
    d, _ = denoise(net, x, sigma, cap, SD)
    c_skip, c_out, c_in, c_noise = precondition(sigma, SD)
    seen_x, seen_noise = net.calls[-1]
    torch.testing.assert_close(seen_x, c_in.view(-1, 1, 1, 1) * x)
    torch.testing.assert_close(seen_noise, c_noise)
    out, _ = net(seen_x, seen_noise, cap)
    torch.testing.assert_close(d, c_skip.view(-1, 1, 1, 1) * x + c_out.view(-1, 1, 1, 1) * out)


def test_denoise_runs_net_in_its_own_dtype():
    net = StandInNet()  # float32
    x = torch.randn(2, 4, 8, 8, dtype=torch.float64)
    d, _ = denoise(net, x, torch.tensor([1.0, 2.0], dtype=torch.float64), torch.randn(2, 5, 8), SD)
    assert net.calls[-1][0].dtype == torch.float32
    assert d.dtype == torch.float64


def _reference_masked_loss(net, x0, caption, sigma, noise, mask_ratio, seed, patch):
    """Hand-written loop version of the masked EDM loss."""
    gen = torch.Generator().manual_seed(seed)
    c_skip, c_out, c_in, c_noise = precondition(sigma, SD)
    x = x0 + sigma.view(-1, 1, 1, 1) * noise
    out, keep = net(c_in.view(-1, 1, 1, 1) * x, c_noise, caption, mask_ratio=mask_ratio, generator=gen)
    d = c_skip.view(-1, 1, 1, 1) * x + c_out.view(-1, 1, 1, 1) * out
    n, _, h, w = x0.shape
    per = []
    for i in range(n):
        total, count = 0.0, 0
        for gy in range(h // patch):
            for gx in range(w // patch):
                if not keep[i, gy * (w // patch) + gx]:
                    continue
                sl = (i, slice(None), slice(gy * patch, (gy + 1) * patch), slice(gx * patch, (gx + 1) * patch))
                total += ((d[sl] - x0[sl]) ** 2).mean().item()
                count += 1
        w_i = (sigma[i] ** 2 + SD ** 2) / (sigma[i] * SD) ** 2
        per.append(w_i.item() * total / count)
    return sum(per) / n, per


@pytest.mark.parametrize("mask_ratio", [0.5, 0.75])
def test_masked_loss_matches_hand_reference(mask_ratio):
    torch.manual_seed(1)
    net = StandInNet()
    x0, cap = torch.randn(3, 4, 8, 8), torch.randn(3, 5, 8)
    sigma, noise = torch.tensor([0.05, 0.9, 12.0]), torch.randn(3, 4, 8, 8)
    loss, per = edm_loss(net, x0, cap, EDMConfig(mask_ratio=mask_ratio),
                         generator=torch.Generator().manual_seed(5), sigma=sigma, noise=noise)
    ref, ref_per = _reference_masked_loss(net, x0, cap, sigma, noise, mask_ratio, 5, patch=2)
    assert loss.item() == pytest.approx(ref, rel=1e-5)
    torch.testing.assert_close(per, torch.tensor(ref_per), rtol=1e-5, atol=0)


def test_masked_loss_ignores_masked_patches():
    torch.manual_seed(2)
    clean, leaky = StandInNet(), StandInNet(leak_masked=True)
    leaky.load_state_dict(clean.state_dict())
    x0, cap = torch.randn(2, 4, 8, 8), torch.randn(2, 5, 8)
    args = dict(sigma=torch.tensor([0.5, 2.0]), noise=torch.randn(2, 4, 8, 8))
    a, _ = edm_loss(clean, x0, cap, EDMConfig(mask_ratio=0.75), generator=torch.Generator().manual_seed(3), **args)
    b, _ = edm_loss(leaky, x0, cap, EDMConfig(mask_ratio=0.75), generator=torch.Generator().manual_seed(3), **args)
    assert torch.isfinite(b) and b.item() == pytest.approx(a.item(), rel=1e-6)


def test_unmasked_loss_is_weighted_plain_mean():
    torch.manual_seed(3)
    net = StandInNet()
    x0, cap = torch.randn(2, 4, 8, 8), torch.randn(2, 5, 8)
    sigma, noise = torch.tensor([0.2, 3.0]), torch.randn(2, 4, 8, 8)
    loss, per = edm_loss(net, x0, cap, EDMConfig(), sigma=sigma, noise=noise)
    d, _ = denoise(net, x0 + sigma.view(-1, 1, 1, 1) * noise, sigma, cap, SD)
    expected = loss_weight(sigma, SD) * ((d - x0) ** 2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(per, expected)
    assert loss.item() == pytest.approx(expected.mean().item(), rel=1e-6)


def test_loss_is_differentiable_and_seeded():
    net, x0, cap = StandInNet(), torch.randn(2, 4, 8, 8), torch.randn(2, 5, 8)
    a, _ = edm_loss(net, x0, cap, EDMConfig(mask_ratio=0.5), generator=torch.Generator().manual_seed(0))
    b, _ = edm_loss(net, x0, cap, EDMConfig(mask_ratio=0.5), generator=torch.Generator().manual_seed(0))
    assert a.item() == b.item()
    a.backward()
    assert net.conv.weight.grad is not None and net.conv.weight.grad.abs().sum() > 0


def test_masked_patch_mean_checks_shapes():
    err = torch.ones(1, 4, 8, 8)
    with pytest.raises(ValueError, match="patch"):
        masked_patch_mean(err, torch.ones(1, 15, dtype=torch.bool))
    with pytest.raises(ValueError, match="no kept"):
        masked_patch_mean(err, torch.zeros(1, 16, dtype=torch.bool))
    assert masked_patch_mean(err * 2, torch.ones(1, 4, dtype=torch.bool), patch_size=4).item() == 2.0


def test_training_sigmas_are_log_normal():
    cfg = EDMConfig(p_mean=-0.6, p_std=1.2)
    log_s = sample_sigmas(40_000, cfg, torch.Generator().manual_seed(0)).log()
    assert log_s.mean().item() == pytest.approx(-0.6, abs=0.03)
    assert log_s.std().item() == pytest.approx(1.2, abs=0.03)


def test_caption_dropout_rate_and_rows():
    cap = torch.randn(20_000, 3, 4) + 5.0  # no row is zero by chance
    out = drop_captions(cap, 0.1, torch.Generator().manual_seed(0))
    zero = (out == 0).flatten(1).all(dim=1)
    same = (out == cap).flatten(1).all(dim=1)
    assert bool((zero ^ same).all()), "every row is either exactly zero or exactly unchanged"
    # Binomial(20000, 0.1): std ~ 42 rows; allow 5 std.
    assert abs(zero.sum().item() - 2000) < 5 * math.sqrt(20_000 * 0.1 * 0.9)
    again = drop_captions(cap, 0.1, torch.Generator().manual_seed(0))
    assert torch.equal(out, again)
    assert torch.equal(drop_captions(cap, 0.0), cap)
    assert (drop_captions(cap[:10], 1.0) == 0).all()
    with pytest.raises(ValueError, match="1.5"):
        drop_captions(cap, 1.5)


def test_masked_loss_on_microdit_debug_matches_reference():
    from model.microdit.config import model_config
    from model.microdit.network import MicroDiT

    torch.manual_seed(4)
    cfg = model_config("MicroDiT_Debug")
    net = MicroDiT(cfg)
    with torch.no_grad():  # the final layer starts at zero; give it an output so the test can fail
        for p in net.final_layer.parameters():
            p.normal_(0, 0.02)
    x0 = torch.randn(2, cfg.in_channels, cfg.input_size, cfg.input_size)
    cap = torch.randn(2, cfg.caption_len, cfg.caption_dim)
    sigma, noise = torch.tensor([0.3, 4.0]), torch.randn_like(x0)
    loss, per = edm_loss(net, x0, cap, EDMConfig(mask_ratio=0.75), generator=torch.Generator().manual_seed(9),
                         sigma=sigma, noise=noise)
    ref, ref_per = _reference_masked_loss(net, x0, cap, sigma, noise, 0.75, 9, patch=cfg.patch_size)
    assert loss.item() == pytest.approx(ref, rel=1e-4)
    torch.testing.assert_close(per, torch.tensor(ref_per), rtol=1e-4, atol=0)
    unmasked, _ = edm_loss(net, x0, cap, EDMConfig(), sigma=sigma, noise=noise)
    assert unmasked.item() != pytest.approx(loss.item(), rel=1e-3)
