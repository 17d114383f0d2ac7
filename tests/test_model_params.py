"""Golden parameter counts and per-block widths of the MicroDiT presets (built on the meta device)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from model.microdit.config import PRESETS, ModelConfig, model_config
from model.microdit.layers import SwiGLU
from model.microdit.network import MicroDiT
from model.microdit.moe import ExpertChoiceMoE


def build_meta(preset: str, **overrides) -> MicroDiT:
    with torch.device("meta"):
        return MicroDiT(model_config(preset, **overrides))


def trainable(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@pytest.fixture(scope="module")
def xl() -> MicroDiT:
    return build_meta("MicroDiT_XL_2")


@pytest.fixture(scope="module")
def tiny() -> MicroDiT:
    return build_meta("MicroDiT_Tiny_2")


def test_golden_parameter_counts(xl, tiny):
    assert trainable(xl) == 1_165_442_320
    assert trainable(tiny) == 200_692_752


def test_debug_preset_is_small_and_matches_the_tiny_text_encoder():
    cfg = model_config("MicroDiT_Debug")
    assert cfg.caption_dim == 64 and cfg.input_size == 16 and cfg.caption_len == 77
    assert 1_000_000 < trainable(build_meta("MicroDiT_Debug")) < 10_000_000


def block_widths(block) -> tuple[int, int, bool]:
    """(self-attention width, FFN/expert hidden size, is MoE) read from the built module's weights."""
    attn = block.attn.qkv.out_features // 3
    if isinstance(block.ffn, ExpertChoiceMoE):
        return attn, block.ffn.experts.w1.shape[-1], True
    assert isinstance(block.ffn, SwiGLU)
    return attn, block.ffn.w1.out_features, False


def expected_widths(dim: int, depth: int, head_dim: int) -> list[tuple[int, int, bool]]:
    """The recipe's rules, written out independently with numpy's linspace."""
    up = lambda v, m: -(-v // m) * m
    attn = np.linspace(0.5, 1.0, depth)
    mlp = np.linspace(0.5, 4.0, depth)
    out = []
    for i in range(depth):
        moe = i % 2 == 1 and i != depth - 1
        a = dim if attn[i] == 1.0 else up(int(dim * attn[i]), 2 * head_dim)
        h = up(int(dim * mlp[i]), 256) if moe else up(int(2 * int(dim * mlp[i]) / 3), 256)
        out.append((a, h, moe))
    return out


XL_ATTN = [512, 640, 640, 640, 640, 640, 640, 768, 768, 768, 768, 768, 768, 768,
           896, 896, 896, 896, 896, 896, 896, 1024, 1024, 1024, 1024, 1024, 1024, 1024]
XL_HIDDEN = [512, 768, 768, 1024, 768, 1280, 1024, 1536, 1280, 1792, 1280, 2048, 1536, 2304,
             1792, 2560, 1792, 2816, 2048, 3072, 2304, 3328, 2304, 3584, 2560, 3840, 2816, 2816]
TINY_ATTN = [256, 320, 320, 320, 384, 384, 384, 384, 448, 448, 448, 448, 512, 512, 512, 512]
TINY_HIDDEN = [256, 512, 512, 768, 512, 1024, 768, 1280, 1024, 1536, 1024, 1792, 1280, 2048, 1536, 1536]


def test_xl_backbone_blocks(xl):
    got = [block_widths(b) for b in xl.blocks]
    assert [g[0] for g in got] == XL_ATTN
    assert [g[1] for g in got] == XL_HIDDEN
    assert [i for i, g in enumerate(got) if g[2]] == list(range(1, 26, 2))
    assert got == expected_widths(1024, 28, 64)


def test_tiny_backbone_blocks(tiny):
    got = [block_widths(b) for b in tiny.blocks]
    assert [g[0] for g in got] == TINY_ATTN
    assert [g[1] for g in got] == TINY_HIDDEN
    assert [i for i, g in enumerate(got) if g[2]] == list(range(1, 14, 2))
    assert got == expected_widths(512, 16, 32)


def test_mixer_blocks(xl, tiny):
    # XL: 6 x 768, full attention width, SwiGLU 2048 / experts 3072, MoE in 1, 3, 5 (the last one too).
    assert [block_widths(b) for b in xl.mixer] == [(768, 2048, False), (768, 3072, True)] * 3
    assert [block_widths(b) for b in tiny.mixer] == [(512, 1536, False), (512, 2048, True)] * 2
    for model in (xl, tiny):
        for block in list(model.mixer) + list(model.blocks):
            # Cross-attention keeps the full width of its stack; adaLN reads the 1024/512-d condition.
            width = block.norm1.normalized_shape[0]
            assert block.cross_attn.q.out_features == width
            assert block.adaLN[1].in_features == model.cfg.dim and block.adaLN[1].out_features == 6 * width
    assert xl.mixer_in[1].out_features == 768 and xl.mixer_out[1].out_features == 1024
    assert isinstance(tiny.mixer_in, torch.nn.Identity)  # same width: no projection


def test_experts_and_caption_block(xl):
    moe = xl.blocks[1].ffn
    assert moe.experts.w1.shape == (8, 1024, 768) and moe.experts.w2.shape == (8, 768, 1024)
    assert moe.router.weight.shape == (8, 1024) and moe.router.bias is None
    assert moe.capacity == 2.0
    assert xl.caption_embedder.block.ffn.w1.out_features == 2816
    assert xl.t_embedder.mlp[0].in_features == 512 and xl.t_embedder.mlp[2].out_features == 1024
    assert xl.final_layer.linear.out_features == 16
    # Linear layers inside blocks carry no bias; LayerNorms carry a weight but no bias; qk-norms nothing.
    block = xl.blocks[4]  # a dense block
    for linear in (block.attn.qkv, block.attn.proj, block.cross_attn.q, block.cross_attn.kv, block.ffn.w3):
        assert linear.bias is None
    assert block.norm1.weight is not None and block.norm1.bias is None
    assert block.attn.q_norm.weight is None and block.attn.q_norm.normalized_shape == (block.attn.qkv.out_features // 3,)


def test_model_config_overrides_and_errors():
    cfg = model_config("MicroDiT_XL_2", input_size=64, pos_interp_scale=2.0)
    assert (cfg.input_size, cfg.pos_interp_scale, cfg.dim) == (64, 2.0, 1024)
    assert PRESETS["MicroDiT_XL_2"].input_size == 32  # presets are not mutated
    with pytest.raises(ValueError, match="MicroDiT_XXL"):
        model_config("MicroDiT_XXL")
    with pytest.raises(ValueError, match="hidden_size"):
        model_config("MicroDiT_Debug", hidden_size=3)
    with pytest.raises(ValueError, match="input_size=15"):
        model_config("MicroDiT_Debug", input_size=15)
    with pytest.raises(ValueError, match="mlp_ratio"):
        ModelConfig(mlp_ratio=(1.0,))
    assert ModelConfig(attn_ratio=[0.5, 1]).attn_ratio == (0.5, 1.0)  # YAML lists become tuples


def test_config_round_trips_through_plain_dicts():
    import json

    from model import family as families

    fam = families.get("microdit")
    cfg = model_config("MicroDiT_Tiny_2", input_size=64, pos_interp_scale=2.0)
    saved = json.loads(json.dumps(fam.config_to_dict(cfg)))  # what config.json beside a checkpoint holds
    assert fam.config_from_dict(saved) == cfg
    with pytest.raises(ValueError, match="depht"):
        fam.config_from_dict({"depht": 3})
    with pytest.raises(ValueError, match="depht"):
        fam.config("MicroDiT_Debug", depht=3)
    with pytest.raises(ValueError, match=r"model.depth = '3'"):  # recipe overrides are type-checked
        fam.config("MicroDiT_Debug", depth="3")
