"""Expert-choice mixture of experts (Zhou et al. 2022) with gather/scatter: memory linear in tokens."""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from model.microdit.config import tokens_per_expert


class Experts(nn.Module):
    """E two-matrix GELU MLPs stored batched; the optimizer finds these weights by this module's type."""

    def __init__(self, num_experts: int, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Parameter(torch.empty(num_experts, dim, hidden))  # (E, D, H)
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden, dim))  # (E, H, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, E, k, D) tokens routed to each expert -> (N, E, k, D)."""
        h = F.gelu(torch.einsum("nekd,edh->nekh", x, self.w1))  # (N, E, k, H)
        return torch.einsum("nekh,ehd->nekd", h, self.w2)  # (N, E, k, D)

    def init_weights(self, out_std: float) -> None:
        """Xavier uniform per expert for the input matrix, N(0, out_std) for the output projection."""
        _, d, h = self.w1.shape
        bound = math.sqrt(6.0 / (d + h))
        nn.init.uniform_(self.w1, -bound, bound)
        nn.init.normal_(self.w2, std=out_std)


class ExpertChoiceMoE(nn.Module):
    """Each expert picks its top-k tokens per image by router probability; unpicked tokens get zero."""

    def __init__(self, dim: int, hidden: int, num_experts: int, capacity: float):
        super().__init__()
        self.num_experts = num_experts
        self.capacity = capacity
        self.router = nn.Linear(dim, num_experts, bias=False)
        self.experts = Experts(num_experts, dim, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, T, D) -> (N, T, D): sum over the experts that chose a token of prob x expert(token)."""
        n, t, d = x.shape
        k = tokens_per_expert(self.capacity, t, self.num_experts)
        probs = F.softmax(self.router(x), dim=-1)  # (N, T, E): softmax over experts per token
        if k == 0:
            return torch.zeros_like(x)
        gate, idx = torch.topk(probs.transpose(1, 2), k, dim=-1)  # (N, E, k) each expert's chosen tokens
        flat = idx.reshape(n, -1, 1).expand(-1, -1, d)  # (N, E*k, D)
        routed = torch.gather(x, 1, flat).view(n, self.num_experts, k, d)  # (N, E, k, D)
        y = self.experts(routed) * gate.unsqueeze(-1).to(x.dtype)  # (N, E, k, D)
        out = torch.zeros_like(x)
        return out.scatter_add(1, flat, y.reshape(n, -1, d).to(x.dtype))  # (N, T, D)

    def init_weights(self, out_std: float) -> None:
        """Xavier router and expert inputs; expert outputs N(0, out_std)."""
        nn.init.xavier_uniform_(self.router.weight)
        self.experts.init_weights(out_std)
