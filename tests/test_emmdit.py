"""E-MMDiT network: golden parameter counts, release key layout, subregion attention, compression, FLOPs, errors."""
from __future__ import annotations

import math

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from model.emmdit.config import EMMDiTConfig, attention_schedule, flops_per_sample, model_config
from model.emmdit.layers import JointBlock, TokenCompressor, TokenReconstructor, from_subregions, to_subregions
from model.emmdit.network import EMMDiT, PatchEmbed
from model.positions import sincos_2d

N = 2


def build_meta(preset: str, **overrides) -> EMMDiT:
    with torch.device("meta"):
        return EMMDiT(model_config(preset, **overrides))


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.fixture(scope="module")
def m512() -> EMMDiT:
    return build_meta("EMMDiT_512")


@pytest.fixture(scope="module")
def cfg() -> EMMDiTConfig:
    return model_config("EMMDiT_Debug", repa=True)


@pytest.fixture(scope="module")
def model(cfg) -> EMMDiT:
    torch.manual_seed(0)
    return EMMDiT(cfg).eval()


@pytest.fixture(scope="module")
def inputs(cfg):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(N, cfg.in_channels, cfg.input_size, cfg.input_size, generator=gen)
    t = torch.rand(N, generator=gen)
    caption = torch.randn(N, cfg.caption_len, cfg.caption_dim, generator=gen)
    return x, t, caption


def test_golden_parameter_counts(m512):
    m1024 = build_meta("EMMDiT_1024")
    assert count(m512) == 302_449_952
    assert count(m1024) == 302_449_952
    assert count(build_meta("EMMDiT_512", repa=True).repa_projector) == 7_344_896
    assert m512.repa_projector is None  # inference weights carry no projector
    # The fixed sin-cos table is a persistent buffer, as in the release's state dict.
    assert m512.state_dict()["pos_embed.pos_embed"].shape == (1, 9216, 768)


def test_parameter_breakdown_512(m512):
    m = m512
    parts = {name: count(child) for name, child in m.named_children()}
    parts.update({f"block_groups.{g}": count(grp) for g, grp in enumerate(m.block_groups)})
    assert parts == {
        "pos_embed": 25_344, "adaln_single": 4_331_520, "context_embedder": 1_573_632,
        "block_groups": 279_787_776, "block_groups.0": 47_321_600, "block_groups.1": 189_286_400,
        "block_groups.2": 43_179_776, "tokencompressor": 12_979_200, "tokenreconstructor": 3_727_872,
        "norm_out": 0, "proj_out": 24_608}
    assert count(m.block_groups[0][0]) == 11_830_400
    assert count(m.block_groups[2][-1]) == 7_688_576  # no text out-projection, FFN, norm or modulation


def test_state_dict_uses_the_release_key_names(m512):
    keys = set(m512.state_dict())
    for key in ("pos_embed.proj.weight", "adaln_single.emb.timestep_embedder.linear_1.weight",
                "adaln_single.emb.timestep_embedder.linear_2.bias", "adaln_single.linear.weight",
                "context_embedder.weight", "block_groups.0.0.attn.to_q.bias", "block_groups.0.0.attn.norm_q.weight",
                "block_groups.0.0.attn.add_k_proj.weight", "block_groups.0.0.attn.norm_added_k.weight",
                "block_groups.0.0.attn.to_out.0.weight", "block_groups.0.0.attn.to_add_out.weight",
                "block_groups.1.15.ff.net.0.proj.weight", "block_groups.1.15.ff_context.net.2.bias",
                "block_groups.0.0.norm1.bias", "block_groups.0.0.norm1_context.weight",
                "block_groups.0.0.scale_shift_bias", "block_groups.0.0.scale_shift_scale_c",
                "tokencompressor.0.0.body2x.1.weight", "tokencompressor.0.0.body4x.3.bias",
                "tokenreconstructor.0.0.body4x.1.weight", "tokenreconstructor.0.0.mergers.2.weight",
                "proj_out.weight", "pos_embed.pos_embed"):
        assert key in keys, key
    last = "block_groups.2.3."
    assert not any(k.startswith(last) and ("to_add_out" in k or "_context" in k.replace("norm1_context", "")
                                           or k.endswith("_c")) for k in keys)
    assert f"{last}attn.add_v_proj.weight" in keys  # the last block's text still gives keys and values


def test_forward_shapes_and_repa_tokens(model, inputs, cfg):
    x, t, caption = inputs
    with torch.no_grad():
        v = model(x, t, caption)
        v2, z = model(x, t, caption, return_repa=True)
    assert v.shape == x.shape and torch.isfinite(v).all()
    assert torch.equal(v, v2)
    assert z.shape == (N, cfg.num_patches, cfg.repa_dim)
    bare = EMMDiT(model_config("EMMDiT_Debug"))
    with pytest.raises(ValueError, match="return_repa=True needs the REPA projector"):
        bare(x, t, caption, return_repa=True)


def test_attention_schedule_counts_blocks_globally(m512):
    sched = attention_schedule(model_config("EMMDiT_512"))
    assert sched[:6] == [(1, 1), (4, 1), (4, 4)] * 2
    assert sched[4] == (4, 1)  # block 0 of the middle group: global index 4, not 0
    assert attention_schedule(model_config("EMMDiT_1024")) == [(1, 1)] * 24
    assert [b.subregions for grp in m512.block_groups for b in grp] == sched


@pytest.mark.parametrize("s,n", [(4, 1), (4, 4), (2, 3)])
def test_subregion_split_is_t_div_n_mod_s(s, n):
    T = 2 * s * n * 3
    x = torch.arange(T, dtype=torch.float32).view(1, T, 1).repeat(2, 1, 1)  # token index as the value
    grouped = to_subregions(x, s, n)  # (2*s, T/s, 1)
    for b in range(2):
        for j in range(s):
            expect = [t for t in range(T) if (t // n) % s == j]
            assert grouped[b * s + j, :, 0].tolist() == expect
    assert torch.equal(from_subregions(grouped, s, n), x)


@pytest.mark.parametrize("s,n", [(4, 1), (4, 4)])
def test_subregion_attention_equals_a_reference_loop(s, n):
    torch.manual_seed(1)
    D, T, L = 32, 32, 16
    block = JointBlock(D, 8, 3 * D, (s, n), text_out=True).eval()
    full = JointBlock(D, 8, 3 * D, (1, 1), text_out=True).eval()
    full.load_state_dict(block.state_dict())
    x, y, t6 = torch.randn(2, T, D), torch.randn(2, L, D), torch.randn(2, 6, D)
    with torch.no_grad():
        ox, oy = block(x, y, t6)
        rx, ry = torch.zeros_like(x), torch.zeros_like(y)
        for j in range(s):  # everything but attention is per token: run each subregion alone, full attention
            ix = [t for t in range(T) if (t // n) % s == j]
            iy = [t for t in range(L) if (t // n) % s == j]
            gx, gy = full(x[:, ix], y[:, iy], t6)
            rx[:, ix], ry[:, iy] = gx, gy
        fx, _ = full(x, y, t6)
    torch.testing.assert_close(ox, rx, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(oy, ry, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(ox, fx, atol=1e-3)  # and it really differs from full attention


def test_last_block_has_no_text_output_path(model):
    last = model.block_groups[-1][-1]
    assert last.attn.to_add_out is None and not hasattr(last, "ff_context")
    assert not hasattr(last, "scale_shift_bias_c") and not hasattr(last, "norm2_context")
    others = [b for grp in model.block_groups for b in grp][:-1]
    assert all(b.text_out and b.attn.to_add_out is not None for b in others)
    x, y, t6 = torch.randn(1, 256, 64), torch.randn(1, 16, 64), torch.randn(1, 6, 64)
    with torch.no_grad():
        out_x, out_y = last(x, y, t6)
        alt_x, _ = last(x, y + 1.0, t6)
    assert out_y is None
    assert not torch.allclose(out_x, alt_x)  # text still conditions the image through joint attention


def test_token_compression_256_to_80_and_back():
    torch.manual_seed(0)
    D, G = 64, 16
    comp, rec = TokenCompressor(D), TokenReconstructor(D)
    x = torch.randn(2, G * G, D)
    c = comp(x, G)
    assert c.shape == (2, 64 + 16, D)
    assert rec(c, x, G).shape == (2, G * G, D)
    # Locality: 2x token 0 sees only the top-left 2x2 patch square.
    x2 = x.clone().view(2, G, G, D)
    x2[:, 2:, :] += 1.0
    x2[:, :, 2:] += 1.0
    c2 = comp(x2.view(2, G * G, D), G)
    torch.testing.assert_close(c2[:, 0], c[:, 0])
    assert not torch.allclose(c2[:, 1], c[:, 1])


def test_middle_group_runs_on_compressed_tokens(model, inputs, cfg):
    seen = []
    hooks = [b.register_forward_pre_hook(lambda mod, args: seen.append((args[0].shape[1], args[1].shape[1])))
             for grp in model.block_groups for b in grp]
    with torch.no_grad():
        model(*inputs)
    for h in hooks:
        h.remove()
    first, middle, last = cfg.groups
    T, C, L = cfg.num_patches, cfg.compressed_tokens, cfg.caption_len
    assert (T, C) == (256, 80)
    assert seen == [(T, L)] * first + [(C, L)] * middle + [(T, L)] * last


def test_positions_follow_the_release_table_and_reinforcement(model, inputs):
    with torch.device("meta"):
        pe = PatchEmbed(model_config("EMMDiT_512"))
    table512 = sincos_2d(768, 96, base_size=16, pos_interp_scale=1.0)
    table1024 = sincos_2d(768, 96, base_size=32, pos_interp_scale=2.0)
    torch.testing.assert_close(table512, table1024)  # one table serves both resolutions
    crop = table512.view(96, 96, 768)[40:56, 40:56].reshape(256, 768)
    pe = pe.to_empty(device="cpu")
    pe.pos_embed.copy_(pe.table("cpu"))
    torch.testing.assert_close(pe.positions()[0], crop)
    # Position Reinforcement: the reconstructed tokens get the table added again before group 3.
    seen = []
    h = model.block_groups[2][0].register_forward_pre_hook(lambda mod, args: seen.append(args[0]))
    hr = model.tokenreconstructor[0][0].register_forward_hook(lambda mod, args, out: seen.append(out))
    with torch.no_grad():
        model(*inputs)
    h.remove()
    hr.remove()
    torch.testing.assert_close(seen[1] - seen[0], model.pos_embed.positions().expand_as(seen[0]))


def test_meta_build_then_init_weights(cfg, model, inputs):
    with torch.device("meta"):
        m = EMMDiT(cfg)
    m.to_empty(device="cpu")
    torch.manual_seed(0)
    m.init_weights()
    torch.testing.assert_close(m.pos_embed.pos_embed, model.pos_embed.pos_embed)
    assert all(torch.isfinite(p).all() for p in m.parameters())
    with torch.no_grad():
        assert torch.isfinite(m.eval()(*inputs)).all()
    table = m.block_groups[0][0].scale_shift_bias
    assert 0.5 < table.std().item() * math.sqrt(cfg.dim) < 1.5  # N(0, 1/D) modulation tables


def test_flops_per_sample_matches_counted(cfg, model, inputs):
    x, t, caption = (z[:1] for z in inputs)
    counter = FlopCounterMode(display=False)
    with sdpa_kernel(SDPBackend.MATH), counter, torch.no_grad():
        model(x, t, caption, return_repa=True)
    assert flops_per_sample(cfg) == pytest.approx(3 * counter.get_total_flops(), rel=0.02)


def test_timestep_is_scaled_to_the_release_range(model, inputs):
    x, t, caption = inputs
    seen = []
    h = model.adaln_single.register_forward_pre_hook(lambda mod, args: seen.append(args[0]))
    with torch.no_grad():
        model(x, t, caption)
    h.remove()
    torch.testing.assert_close(seen[0], t * 1000)


@pytest.mark.parametrize("overrides,match", [
    (dict(caption_len=12), r"block 2 .*caption_len=12 must both divide by 16"),
    (dict(input_size=8), r"80 image tokens|20 image tokens"),
    (dict(groups=(4, 16)), r"groups=\(4, 16\)"),
    (dict(dim=72, head_dim=8), r"dim=72.*multiple of 16"),
    (dict(input_size=18), r"divisible by 4"),
    (dict(pos_embed_max_size=8), r"pos_embed_max_size=8"),
])
def test_config_errors_name_the_value(overrides, match):
    with pytest.raises(ValueError, match=match):
        model_config("EMMDiT_Debug", **overrides)


def test_config_lookup_errors():
    with pytest.raises(ValueError, match="unknown E-MMDiT preset 'nope'"):
        model_config("nope")
    with pytest.raises(ValueError, match=r"unknown EMMDiTConfig key\(s\) \['width'\]"):
        model_config("EMMDiT_Debug", width=3)
    assert model_config("EMMDiT_Debug", caption_len=12, sub_attention=False).caption_len == 12


@pytest.mark.parametrize("bad,match", [
    (dict(x=torch.randn(N, 3, 16, 16)), r"latent shape \(2, 3, 16, 16\)"),
    (dict(x=torch.randn(N, 4, 8, 8)), r"latent resolution 8x8"),
    (dict(t=torch.rand(N + 1)), r"t shape \(3,\)"),
    (dict(caption=torch.randn(N, 15, 64)), r"caption shape \(2, 15, 64\)"),
])
def test_forward_errors_name_the_value(model, inputs, bad, match):
    args = dict(zip(("x", "t", "caption"), inputs))
    args.update(bad)
    with pytest.raises(ValueError, match=match):
        model(**args)


def test_without_compression_every_block_sees_all_tokens():
    # The baseline the compression speedup is measured against: same blocks, no compressor/reconstructor.
    assert count(build_meta("EMMDiT_512", compression=False)) == 302_449_952 - 12_979_200 - 3_727_872
    cfg = model_config("EMMDiT_Debug", compression=False, repa=True)
    torch.manual_seed(0)
    model = EMMDiT(cfg).eval()
    assert model.tokencompressor is None and model.tokenreconstructor is None
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(N, cfg.in_channels, cfg.input_size, cfg.input_size, generator=gen)
    t, caption = torch.rand(N, generator=gen), torch.randn(N, cfg.caption_len, cfg.caption_dim, generator=gen)
    seen = []
    hooks = [b.register_forward_pre_hook(lambda mod, args: seen.append(args[0].shape[1]))
             for grp in model.block_groups for b in grp]
    counter = FlopCounterMode(display=False)
    with sdpa_kernel(SDPBackend.MATH), counter, torch.no_grad():
        v, z = model(x, t, caption, return_repa=True)
    for h in hooks:
        h.remove()
    assert seen == [cfg.num_patches] * cfg.depth
    assert v.shape == x.shape and z.shape == (N, cfg.num_patches, cfg.repa_dim)
    assert flops_per_sample(cfg) == pytest.approx(3 * counter.get_total_flops() / N, rel=0.02)
    assert flops_per_sample(cfg) > flops_per_sample(model_config("EMMDiT_Debug", repa=True))
