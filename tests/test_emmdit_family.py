"""E-MMDiT as a family of the pipeline: lookup, presets, fit, shard units, and the rectified-flow objective."""
from __future__ import annotations

import pytest
import torch

from model import family as families
from model.objectives import configs as objective_configs
from model.objectives import objective as objectives
from pipeline.core.plan import RectifiedFlowObjective


@pytest.fixture(scope="module")
def fam():
    return families.get("emmdit")


def test_lookup_and_specs(fam):
    assert fam.name == "emmdit" and fam.objectives == ("rectified_flow",)
    assert fam.latent.vae == "mit-han-lab/dc-ae-f32c32-sana-1.0-diffusers"
    assert (fam.latent.channels, fam.latent.downsample, fam.latent.scaling_factor, fam.latent.encode) == \
        (32, 32, 0.41407, "mode")
    assert (fam.text.encoder, fam.text.tokens, fam.text.width, fam.text.unconditional) == \
        ("meta-llama/Llama-3.2-1B", 128, 2048, "empty_prompt")
    assert (fam.sampler.kind, fam.sampler.steps, fam.sampler.guidance) == ("euler", 20, 4.5)
    assert {"EMMDiT_512", "EMMDiT_1024", "EMMDiT_Debug"} <= set(fam.presets)
    with pytest.raises(ValueError, match="emmdit"):
        families.get("emdit")


def test_config_overrides_and_roundtrip(fam):
    cfg = fam.config("EMMDiT_Debug", groups=[1, 1, 1])
    assert cfg.groups == (1, 1, 1)
    assert fam.config_from_dict(fam.config_to_dict(cfg)) == cfg
    with pytest.raises(ValueError, match="unknown EMMDiTConfig key"):
        fam.config("EMMDiT_Debug", depth=3)
    with pytest.raises(ValueError, match="unknown emmdit preset"):
        fam.config("EMMDiT_XL")


def test_fit_sets_the_latent_side_and_checks_shapes(fam):
    base = fam.config("EMMDiT_512")
    assert fam.fit(base, (32, 32, 32), (128, 2048), 2.0).input_size == 32
    assert fam.fit(base, (32, 16, 16), (128, 2048), 1.0) == base
    with pytest.raises(ValueError, match="channels"):
        fam.fit(base, (4, 16, 16), (128, 2048), 1.0)
    with pytest.raises(ValueError, match="caption states"):
        fam.fit(base, (32, 16, 16), (77, 2048), 1.0)
    with pytest.raises(ValueError, match="square"):
        fam.fit(base, (32, 16, 32), (128, 2048), 1.0)
    with pytest.raises(ValueError, match="latent side 10"):
        fam.fit(base, (32, 10, 10), (128, 2048), 1.0)


def test_shard_units_and_flops(fam):
    cfg = fam.config("EMMDiT_Debug")
    with torch.device("meta"):
        net = fam.build(cfg)
    units = fam.shard_units(net)
    assert len(units) == cfg.depth and all(type(u).__name__ == "JointBlock" for u in units)
    assert fam.flops_per_sample(cfg, {"kind": "rectified_flow"}) > 0


def _net_and_batch(seed=0, n=4):
    fam = families.get("emmdit")
    torch.manual_seed(seed)
    cfg = fam.config("EMMDiT_Debug", repa=True)
    net = fam.build(cfg)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, cfg.in_channels, cfg.input_size, cfg.input_size, generator=g)
    cap = torch.randn(n, cfg.caption_len, cfg.caption_dim, generator=g)
    return cfg, net, x, cap


def spec(**constants):
    """An objective from an export's record, as generate reads it (no caption dropout unless given)."""
    return objectives.build(objective_configs.config_from_dict({"kind": "rectified_flow", "caption_dropout": 0.0,
                                                         **constants}))


def test_objective_builds_from_the_plan_section():
    section = RectifiedFlowObjective(caption_dropout=0.0)
    assert section.config() == objective_configs.config_from_dict(section.model_dump(mode="json"))
    obj = objectives.build(section.config())
    assert isinstance(obj, objectives.RectifiedFlow) and obj.kind == "rectified_flow"
    cfg, net, x, cap = _net_and_batch()
    a = obj.loss(net, x, cap, torch.Generator().manual_seed(5))
    b = obj.loss(net, x, cap, torch.Generator().manual_seed(5))
    assert a.ndim == 0 and torch.isfinite(a) and torch.equal(a, b)
    with pytest.raises(ValueError, match="rectified_flow"):
        objective_configs.config_from_dict({"kind": "rectified_flow", "sigma_data": 0.5})


def test_caption_dropout_uses_the_bound_unconditional_caption():
    cfg, net, x, cap = _net_and_batch()
    obj = spec(caption_dropout=1.0)
    with pytest.raises(ValueError, match="bind"):
        obj.loss(net, x, cap, torch.Generator().manual_seed(0))
    uncond = torch.randn(cfg.caption_len, cfg.caption_dim)
    bound = obj.bind(unconditional=uncond)
    assert obj.unconditional is None  # bind returns a new objective
    dropped = bound.loss(net, x, cap, torch.Generator().manual_seed(0))
    # dropout 1: every caption is the unconditional one, i.e. the loss of an undropped objective on uncond
    plain = spec()
    gen = torch.Generator().manual_seed(0)
    torch.rand(x.shape[0], generator=gen)  # the dropout draw comes first
    expected = plain.loss(net, x, uncond.expand_as(cap), gen)
    assert torch.allclose(dropped, expected)


def test_repa_needs_features_and_adds_the_weighted_term():
    cfg, net, x, cap = _net_and_batch()
    obj = spec(repa_weight=0.5)
    with pytest.raises(ValueError, match="repa_features"):
        obj.loss(net, x, cap, torch.Generator().manual_seed(0))
    feats = torch.randn(x.shape[0], cfg.num_patches, cfg.repa_dim)
    with_repa = obj.loss(net, x, cap, torch.Generator().manual_seed(0), extras={"repa_features": feats})
    plain = spec().loss(net, x, cap, torch.Generator().manual_seed(0))
    assert not torch.allclose(with_repa, plain)
    assert abs(float((with_repa - plain).detach())) <= 0.5 + 1e-5  # |cosine| <= 1


def test_edm_keeps_its_interface():
    edm = objectives.build(objective_configs.config_from_dict({"kind": "edm"}))
    assert edm.bind(unconditional=torch.zeros(3, 4)) is edm
    with pytest.raises(ValueError, match="zeros"):
        edm.bind(unconditional=torch.ones(3, 4))
