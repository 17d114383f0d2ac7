"""Expert-choice MoE: gather/scatter equals a plain one-hot reference; routing invariants hold."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from model.microdit.moe import ExpertChoiceMoE


def make_moe(dim=16, hidden=24, experts=4, capacity=2.0, seed=0) -> ExpertChoiceMoE:
    torch.manual_seed(seed)
    moe = ExpertChoiceMoE(dim, hidden, experts, capacity)
    moe.init_weights(out_std=0.5)
    return moe


def reference_one_hot(moe: ExpertChoiceMoE, x: torch.Tensor) -> torch.Tensor:
    """The release's formulation: a (N, E, k, T) one-hot dispatch tensor and einsums."""
    n, t, _ = x.shape
    e = moe.num_experts
    k = int(moe.capacity * t / e)
    probs = F.softmax(x @ moe.router.weight.T, dim=-1)  # (N, T, E)
    g, m = torch.topk(probs.permute(0, 2, 1), k, dim=-1)  # (N, E, k)
    p = F.one_hot(m, num_classes=t).to(x.dtype)  # (N, E, k, T)
    xin = torch.einsum("nekt,ntd->nekd", p, x)
    h = F.gelu(torch.einsum("nekd,edf->nekf", xin, moe.experts.w1))
    h = torch.einsum("nekf,efd->nekd", h, moe.experts.w2)
    return torch.einsum("nekt,nekd->ntd", p, g.unsqueeze(-1) * h)


def reference_loop(moe: ExpertChoiceMoE, x: torch.Tensor) -> torch.Tensor:
    """Plain Python loops: for each image and expert, run the expert's top-k tokens one by one."""
    n, t, _ = x.shape
    k = int(moe.capacity * t / moe.num_experts)
    out = torch.zeros_like(x)
    probs = F.softmax(x @ moe.router.weight.T, dim=-1)  # (N, T, E)
    for i in range(n):
        for e in range(moe.num_experts):
            chosen = torch.topk(probs[i, :, e], k).indices
            for tok in chosen.tolist():
                h = F.gelu(x[i, tok] @ moe.experts.w1[e]) @ moe.experts.w2[e]
                out[i, tok] += probs[i, tok, e] * h
    return out


@pytest.mark.parametrize("tokens,capacity", [(16, 2.0), (20, 1.0), (9, 2.0)])
def test_matches_one_hot_and_loop_references(tokens, capacity):
    moe = make_moe(capacity=capacity)
    x = torch.randn(3, tokens, 16, generator=torch.Generator().manual_seed(1))
    out = moe(x)
    assert out.shape == x.shape
    torch.testing.assert_close(out, reference_one_hot(moe, x), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out, reference_loop(moe, x), rtol=1e-5, atol=1e-6)


def test_each_expert_processes_exactly_k_tokens_and_unpicked_get_zero():
    moe = make_moe(dim=16, hidden=24, experts=4, capacity=1.0)
    x = torch.randn(2, 32, 16, generator=torch.Generator().manual_seed(2))
    seen = {}

    def record(module, inputs, output):
        seen["shape"] = inputs[0].shape

    moe.experts.register_forward_hook(record)
    out = moe(x)
    k = int(1.0 * 32 / 4)
    assert seen["shape"] == (2, 4, k, 16)  # (N, E, k, D): every expert gets exactly k tokens per image

    probs = F.softmax(moe.router(x), dim=-1)  # (N, T, E)
    picked = torch.zeros(2, 32, dtype=torch.bool)
    for e in range(4):
        picked.scatter_(1, probs[..., e].topk(k, dim=1).indices, True)
    assert (~picked).any(), "capacity 1.0 over 4 experts should leave some token unpicked"
    assert torch.all(out[~picked] == 0)  # those pass through the residual only
    assert torch.all(out[picked].abs().sum(-1) > 0)


def test_gradients_reach_router_and_experts():
    moe = make_moe()
    x = torch.randn(2, 16, 16, requires_grad=True)
    moe(x).square().sum().backward()
    for p in (moe.router.weight, moe.experts.w1, moe.experts.w2, x):
        assert p.grad is not None and p.grad.abs().sum() > 0


def test_expert_weights_live_under_experts():
    moe = make_moe(dim=8, hidden=16, experts=3)
    names = {n for n, _ in moe.named_parameters()}
    assert names == {"router.weight", "experts.w1", "experts.w2"}
    assert moe.experts.w1.shape == (3, 8, 16) and moe.experts.w2.shape == (3, 16, 8)
