"""Memory levers: activation checkpointing per block (same loss and gradients, less saved for backward) and
float8 training of the blocks' large Linear layers through torchao (which modules get converted)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from model.microdit.config import model_config
from model.microdit.network import MicroDiT
from model.objectives.edm import EDMConfig, edm_loss
from pipeline.train.parallelize import apply_ac, apply_float8, float8_filter
from model.microdit.family import FAMILY as MICRODIT


def _saved_bytes_and_grads(ac: bool):
    cfg = model_config("MicroDiT_Debug", input_size=32)
    torch.manual_seed(0)
    net = MicroDiT(cfg)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    if ac:
        apply_ac(net, MICRODIT.shard_units)
    weights = {p.untyped_storage().data_ptr() for p in net.parameters()}
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:  # distinct storages autograd keeps, weights left out
        st = t.untyped_storage()
        if st.data_ptr() not in weights:
            storages[st.data_ptr()] = st.nbytes()
        return t

    data = torch.Generator().manual_seed(1)
    lat, cap = torch.randn(4, 4, 32, 32, generator=data), torch.randn(4, 77, 64, generator=data)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss, _ = edm_loss(net, lat, cap, EDMConfig(mask_ratio=0.75), torch.Generator().manual_seed(3))
    loss.backward()
    return loss, {n: p.grad for n, p in net.named_parameters()}, sum(storages.values())


def test_activation_checkpointing_same_loss_and_grads_less_saved():
    loss, grads, saved = _saved_bytes_and_grads(ac=False)
    loss_ac, grads_ac, saved_ac = _saved_bytes_and_grads(ac=True)
    assert torch.equal(loss, loss_ac)  # recomputation is exact on CPU float32
    for name, grad in grads.items():
        assert torch.equal(grad, grads_ac[name]), name
    # Debug at 32x32, batch 4, mask 0.75: 48.4 MiB saved without AC, 7.6 MiB with (block inputs only).
    assert saved_ac < 0.25 * saved, (saved_ac, saved)


def _linear_names(model: nn.Module) -> dict[str, nn.Linear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}


def test_float8_filter_selects_only_large_block_linears():
    # mixer_dim 72 is not a multiple of 16; backbone attention widths 64, 96, 112, 128 and FFN hidden sizes
    # 64 (dense), 256 (MoE), 256, 384: with min_features=128 the narrow ends fall out.
    cfg = model_config("MicroDiT_Debug", head_dim=8, mixer_dim=72)
    with torch.device("meta"):
        model = MicroDiT(cfg)
    chosen = {n for n, m in _linear_names(model).items() if float8_filter(m, n, min_features=128)}
    assert {"blocks.0.attn.qkv", "blocks.0.cross_attn.kv", "blocks.3.attn.proj", "blocks.3.ffn.w3",
            "blocks.2.ffn.w1"} <= chosen  # 128 -> 192 qkv qualifies, both dims >= 128
    for name in ("blocks.0.attn.proj", "blocks.0.ffn.w1", "blocks.2.attn.proj",  # 64, 64, 112 < 128
                 "mixer.0.attn.qkv", "mixer.0.cross_attn.q", "mixer.0.ffn.w1",  # 72 % 16 != 0
                 "blocks.1.adaLN.1", "blocks.1.ffn.router", "final_layer.linear", "final_layer.adaLN.1",
                 "caption_embedder.block.attn.qkv", "caption_embedder.mlp.fc1", "t_embedder.mlp.0",
                 "pooled_embedder.fc1", "mixer_in.1", "mixer_out.1"):
        assert name not in chosen, name
    for name in chosen:
        assert name.startswith("blocks.") and "adaLN" not in name and "router" not in name
        m = model.get_submodule(name)
        assert m.in_features % 16 == 0 and m.out_features % 16 == 0 and min(m.in_features, m.out_features) >= 128


def test_apply_float8_converts_the_chosen_layers():
    pytest.importorskip("torchao")
    from torchao.float8.float8_linear import Float8Linear

    cfg = model_config("MicroDiT_Debug")
    torch.manual_seed(0)
    model = MicroDiT(cfg)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    linears = _linear_names(model)
    want = sorted(n for n, m in linears.items() if float8_filter(m, n, min_features=64))
    got = apply_float8(model, MICRODIT.shard_units, min_features=64)
    assert sorted(got) == want and len(want) > 0
    for name in linears:
        converted = isinstance(model.get_submodule(name), Float8Linear)
        assert converted == (name in want), name
    after = model.state_dict()
    assert after.keys() == before.keys()  # checkpoints and exports keep their names
    for k, v in before.items():
        assert torch.equal(after[k], v), k


def test_apply_float8_on_xl_meta_converts_every_block_matmul_but_experts():
    pytest.importorskip("torchao")
    from torchao.float8.float8_linear import Float8Linear

    with torch.device("meta"):
        model = MicroDiT(model_config("MicroDiT_XL_2"))
    got = apply_float8(model, MICRODIT.shard_units)  # default min_features 512
    # 34 blocks x (qkv, proj, cross q, kv, proj) + 18 dense blocks x (w1, w2, w3)
    assert len(got) == 34 * 5 + 18 * 3
    assert sum(model.get_submodule(n).weight.numel() for n in got) == 333_447_168
    assert not any(isinstance(m, Float8Linear) for n, m in model.named_modules()
                   if not n.startswith(("mixer.", "blocks.")) or "adaLN" in n or "router" in n)
