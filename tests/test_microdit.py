"""MicroDiT forward contract: deferred masking, order restore, positions across resolutions, init, FLOPs, errors."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from model.microdit.config import flops_per_sample, model_config
from model.microdit.layers import SwiGLU
from model.microdit.network import MicroDiT
from model.microdit.moe import ExpertChoiceMoE
from model.positions import sincos_2d

N = 3


def perturbed(cfg, seed: int = 0) -> MicroDiT:
    """A model whose zero-initialised layers (adaLN, final linear) are made non-zero so outputs carry signal."""
    torch.manual_seed(seed)
    model = MicroDiT(cfg).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return model


@pytest.fixture(scope="module")
def cfg():
    return model_config("MicroDiT_Debug")


@pytest.fixture(scope="module")
def model(cfg):
    return perturbed(cfg)


@pytest.fixture(scope="module")
def inputs(cfg):
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(N, cfg.in_channels, cfg.input_size, cfg.input_size, generator=gen)
    c_noise = torch.randn(N, generator=gen)
    caption = torch.randn(N, cfg.caption_len, cfg.caption_dim, generator=gen)
    return x, c_noise, caption


def patch_mask(keep: torch.Tensor, cfg) -> torch.Tensor:
    """(N, T) kept patches -> (N, 1, H, W) pixel mask."""
    g, p = cfg.grid_size, cfg.patch_size
    return keep.view(-1, 1, g, g).repeat_interleave(p, 2).repeat_interleave(p, 3)


@torch.no_grad()
def test_unmasked_forward(model, inputs, cfg):
    out, keep = model(*inputs)
    assert keep is None
    assert out.shape == inputs[0].shape and torch.isfinite(out).all()
    assert torch.equal(out, model(*inputs, mask_ratio=0.0)[0])  # deterministic, no mask drawn
    torch.testing.assert_close(out, model(inputs[0], inputs[1].view(N, 1, 1, 1), inputs[2])[0])
    # Captions and noise levels matter.
    assert not torch.allclose(out, model(inputs[0], inputs[1], torch.zeros_like(inputs[2]))[0])
    assert not torch.allclose(out, model(inputs[0], inputs[1] + 1.0, inputs[2])[0])


@torch.no_grad()
@pytest.mark.parametrize("ratio", [0.5, 0.75])
def test_masked_forward_keeps_a_random_subset_and_zeros_the_rest(model, inputs, cfg, ratio):
    T = cfg.num_patches
    out, keep = model(*inputs, mask_ratio=ratio, generator=torch.Generator().manual_seed(0))
    assert keep.shape == (N, T) and keep.dtype == torch.bool
    assert keep.sum(1).tolist() == [int(T * (1 - ratio))] * N
    assert len({tuple(row.tolist()) for row in keep}) == N  # each sample draws its own set
    pix = patch_mask(keep, cfg).expand_as(out)
    assert torch.all(out[~pix] == 0)
    assert torch.all(out.abs().mul(pix).flatten(2).sum(-1) > 0)


@torch.no_grad()
def test_generator_controls_the_mask(model, inputs):
    a = model(*inputs, mask_ratio=0.5, generator=torch.Generator().manual_seed(3))
    b = model(*inputs, mask_ratio=0.5, generator=torch.Generator().manual_seed(3))
    c = model(*inputs, mask_ratio=0.5, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a[1], b[1]) and torch.equal(a[0], b[0])
    assert not torch.equal(a[1], c[1])


@torch.no_grad()
def reference_forward(model: MicroDiT, x, c_noise, caption, keep: torch.Tensor) -> torch.Tensor:
    """The release's masking: kept tokens in a shuffled order, then unshuffled with mask tokens appended."""
    cfg = model.cfg
    n, T = x.shape[0], cfg.num_patches
    h = model.x_embedder(x).flatten(2).transpose(1, 2) + model.pos_embed
    y = model.caption_embedder(caption)
    c = model.t_embedder(c_noise) + model.pooled_embedder(y.mean(1))
    h = model.mixer_in(h)
    for blk in model.mixer:
        h = blk(h, model.mixer_caption(y), c)
    gen = torch.Generator().manual_seed(11)
    shuffles = []
    for row in keep:
        kept = row.nonzero().squeeze(1)
        kept = kept[torch.randperm(len(kept), generator=gen)]  # any order of the kept tokens
        dropped = (~row).nonzero().squeeze(1)
        shuffles.append(torch.cat([kept, dropped]))
    ids_shuffle = torch.stack(shuffles)  # (N, T)
    ids_restore = ids_shuffle.argsort(1)
    K = int(keep[0].sum())
    h = torch.stack([h[i, ids_shuffle[i, :K]] for i in range(n)])
    h = model.mixer_out(h)
    for blk in model.blocks:
        h = blk(h, y, c)
    h = model.final_layer(h, c)
    h = torch.cat([h, h.new_zeros(n, T - K, h.shape[-1])], 1)
    h = torch.stack([h[i, ids_restore[i]] for i in range(n)])
    return model.unpatchify(h)


def test_masked_output_matches_release_style_reference(model, inputs):
    out, keep = model(*inputs, mask_ratio=0.75, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(out, reference_forward(model, *inputs, keep), rtol=1e-4, atol=1e-5)


@torch.no_grad()
def test_mixer_sees_masked_tokens_but_backbone_does_not(model, inputs, cfg):
    x, c_noise, caption = inputs
    out, keep = model(x, c_noise, caption, mask_ratio=0.75, generator=torch.Generator().manual_seed(9))
    dropped = patch_mask(~keep, cfg).expand_as(x)
    x2 = torch.where(dropped, torch.randn_like(x), x)  # change only masked patches
    out2, keep2 = model(x2, c_noise, caption, mask_ratio=0.75, generator=torch.Generator().manual_seed(9))
    assert torch.equal(keep, keep2)
    assert not torch.allclose(out, out2)  # the mixer ran on all tokens, so kept outputs moved

    mixerless = perturbed(model_config("MicroDiT_Debug", mixer_depth=0))
    a, k = mixerless(x, c_noise, caption, mask_ratio=0.75, generator=torch.Generator().manual_seed(9))
    b, _ = mixerless(x2, c_noise, caption, mask_ratio=0.75, generator=torch.Generator().manual_seed(9))
    torch.testing.assert_close(a, b)  # without a mixer, masked patches cannot influence anything


def test_resolution_change_loads_strictly_and_rebuilds_positions():
    small = perturbed(model_config("MicroDiT_Debug", input_size=32))  # "256 px"
    big = MicroDiT(model_config("MicroDiT_Debug", input_size=64, pos_interp_scale=2.0))  # "512 px"
    state = small.state_dict()
    assert "pos_embed" not in state
    result = big.load_state_dict(state, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    big_params = dict(big.named_parameters())
    assert set(big_params) == {n for n, _ in small.named_parameters()}
    for name, p in small.named_parameters():
        assert torch.equal(big_params[name], p), name

    D = big.cfg.dim
    assert big.pos_embed.shape == (1, 32 * 32, D) and small.pos_embed.shape == (1, 16 * 16, D)
    big_grid = big.pos_embed.view(32, 32, D)
    torch.testing.assert_close(big_grid[::2, ::2].reshape(1, -1, D), small.pos_embed)  # 256 grid at half steps
    assert not torch.allclose(big_grid[1::2, 1::2].reshape(1, -1, D), small.pos_embed)
    # Explicit formula: arange(G) / (G / base_size) / scale with base_size = G.
    torch.testing.assert_close(big.pos_embed[0], sincos_2d(D, 32, base_size=32, pos_interp_scale=2.0))
    with torch.no_grad():
        out, _ = big(torch.randn(1, 4, 64, 64), torch.zeros(1), torch.randn(1, 77, 64))
    assert out.shape == (1, 4, 64, 64)


def test_positions_layout():
    emb = sincos_2d(8, 4)  # (16, 8): first half embeds the column, second half the row
    assert emb.shape == (16, 8)
    torch.testing.assert_close(emb[0], torch.tensor([0.0, 0.0, 1.0, 1.0, 0.0, 0.0, 1.0, 1.0]))
    assert torch.allclose(emb[1, 4:], emb[0, 4:]) and not torch.allclose(emb[1, :4], emb[0, :4])
    assert torch.allclose(emb[4, :4], emb[0, :4]) and not torch.allclose(emb[4, 4:], emb[0, 4:])


def test_meta_build_then_init_weights(cfg):
    with torch.device("meta"):
        model = MicroDiT(cfg)
    model.to_empty(device="cpu")
    model.init_weights()
    fresh = MicroDiT(cfg)
    assert torch.equal(model.pos_embed, fresh.pos_embed)
    for p in model.parameters():
        assert torch.isfinite(p).all()


def test_init_follows_the_recipe():
    torch.manual_seed(0)
    cfg = model_config("MicroDiT_Debug", dim=256, mixer_dim=128, depth=4)
    model = MicroDiT(cfg)
    for name, p in model.named_parameters():
        if name.endswith("bias"):
            assert torch.all(p == 0), name
    for blk in list(model.mixer) + list(model.blocks):
        assert torch.all(blk.adaLN[1].weight == 0)
        for norm in (blk.norm1, blk.norm2, blk.norm3):
            assert torch.all(norm.weight == 1)
    assert torch.all(model.final_layer.linear.weight == 0) and torch.all(model.final_layer.adaLN[1].weight == 0)
    cap = model.caption_embedder.block
    assert torch.all(cap.attn.proj.weight == 0) and torch.all(cap.ffn.w3.weight == 0)

    def std(t):
        return t.float().std().item()

    for w in (model.t_embedder.mlp[0].weight, model.t_embedder.mlp[2].weight, model.caption_embedder.mlp.fc1.weight,
              model.pooled_embedder.fc2.weight):
        assert std(w) == pytest.approx(0.02, rel=0.1)
    for i, blk in enumerate(model.blocks):
        target = 0.02 / math.sqrt(2 * (i + 1))
        assert std(blk.attn.proj.weight) == pytest.approx(target, rel=0.1)
        assert std(blk.cross_attn.proj.weight) == pytest.approx(target, rel=0.1)
        out = blk.ffn.experts.w2 if isinstance(blk.ffn, ExpertChoiceMoE) else blk.ffn.w3.weight
        assert std(out) == pytest.approx(target, rel=0.1)
        w = blk.attn.qkv.weight
        bound = math.sqrt(6 / sum(w.shape))  # Xavier uniform
        assert w.abs().max() <= bound and std(w) == pytest.approx(bound / math.sqrt(3), rel=0.1)
    assert isinstance(model.blocks[0].ffn, SwiGLU) and isinstance(model.blocks[1].ffn, ExpertChoiceMoE)


@pytest.mark.parametrize("ratio", [0.0, 0.5, 0.75])
def test_flops_per_sample_matches_counted(cfg, ratio):
    model = MicroDiT(cfg)
    x = torch.randn(1, 4, cfg.input_size, cfg.input_size)
    caption = torch.randn(1, cfg.caption_len, cfg.caption_dim)
    counter = FlopCounterMode(display=False)
    # The math backend runs attention as matmuls, which the counter sees on CPU.
    with sdpa_kernel(SDPBackend.MATH), counter, torch.no_grad():
        model(x, torch.zeros(1), caption, mask_ratio=ratio, generator=torch.Generator().manual_seed(0))
    counted = 3 * counter.get_total_flops()
    assert flops_per_sample(cfg, ratio) == pytest.approx(counted, rel=0.02)


def test_flops_account_for_masking():
    cfg = model_config("MicroDiT_XL_2")
    full, masked = flops_per_sample(cfg, 0.0), flops_per_sample(cfg, 0.75)
    assert 0.25 < masked / full < 0.6  # backbone on a quarter of the tokens, mixer on all
    with pytest.raises(ValueError, match="mask_ratio"):
        flops_per_sample(cfg, 1.0)


@pytest.mark.parametrize("bad,match", [
    (dict(x=torch.randn(N, 3, 16, 16)), r"latent shape \(3, 3, 16, 16\).*\(N, 4, H, W\)"),
    (dict(x=torch.randn(N, 16, 16)), r"latent shape"),
    (dict(x=torch.randn(N, 4, 15, 15)), r"15x15 is not divisible by patch_size=2"),
    (dict(x=torch.randn(N, 4, 24, 24)), r"24x24.*expects 16x16"),
    (dict(caption=torch.randn(N, 77, 32)), r"caption shape \(3, 77, 32\).*\(3, 77, 64\)"),
    (dict(caption=torch.randn(N, 10, 64)), r"caption shape"),
    (dict(c_noise=torch.randn(N + 1)), r"c_noise shape \(4,\): expected \(3,\)"),
    (dict(c_noise=torch.randn(N, 2)), r"c_noise shape"),
    (dict(mask_ratio=1.0), r"mask_ratio=1.0.*\[0, 1\)"),
    (dict(mask_ratio=-0.1), r"mask_ratio=-0.1"),
])
def test_bad_input_raises_value_error(model, inputs, bad, match):
    args = dict(zip(("x", "c_noise", "caption"), inputs))
    args.update(bad)
    with pytest.raises(ValueError, match=match):
        model(**args)


def test_backward_reaches_every_parameter(cfg):
    model = perturbed(cfg).train()
    x = torch.randn(2, 4, cfg.input_size, cfg.input_size)
    out, keep = model(x, torch.randn(2), torch.randn(2, 77, cfg.caption_dim), mask_ratio=0.5,
                      generator=torch.Generator().manual_seed(0))
    out.square().mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_bf16_autocast_with_masking(cfg):
    model = perturbed(cfg)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, keep = model(torch.randn(2, 4, 16, 16), torch.randn(2), torch.randn(2, 77, cfg.caption_dim),
                          mask_ratio=0.75, generator=torch.Generator().manual_seed(0))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()
    out.float().square().mean().backward()
    assert model.blocks[1].ffn.experts.w1.grad.abs().sum() > 0


def test_model_files_import_torch_only():
    root = Path(__file__).resolve().parents[1] / "model"
    for path in root.rglob("*.py"):
        text = path.read_text()
        assert "torch.distributed" not in text and "torch.compile" not in text, path
