"""Building blocks of MicroDiT: attention, feed-forward, embedders, the DiT block and the final layer."""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from model.microdit.config import BlockSpec
from model.microdit.moe import ExpertChoiceMoE


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: (N, T, D) * (1 + scale) + shift, with (N, D) shift/scale."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class LayerNorm(nn.LayerNorm):
    """nn.LayerNorm computed in float32 whatever the input and parameter dtype, returned in the input's dtype.

    Under FSDP's bf16 mixed precision the weight and activations arrive in bf16; statistics and the affine
    step stay float32 here. A float32 input is computed exactly as nn.LayerNorm does (the casts are no-ops).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = None if self.weight is None else self.weight.float()
        b = None if self.bias is None else self.bias.float()
        return F.layer_norm(x.float(), self.normalized_shape, w, b, self.eps).to(x.dtype)


def layer_norm(dim: int, eps: float, affine: bool = True) -> nn.LayerNorm:
    """Float32 LayerNorm without bias; affine=False also drops the weight (qk-norm)."""
    return LayerNorm(dim, eps=eps, elementwise_affine=affine, bias=False)


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """(N, Tq, A), (N, Tk, A) x2 -> (N, Tq, A) multi-head attention."""
    n, tq, a = q.shape
    q, k, v = (z.view(n, z.shape[1], heads, a // heads).transpose(1, 2) for z in (q, k, v))  # (N, h, T, a/h)
    out = F.scaled_dot_product_attention(q, k, v)  # (N, h, Tq, a/h)
    return out.transpose(1, 2).reshape(n, tq, a)


class SelfAttention(nn.Module):
    """Multi-head self-attention at its own width, qk-normed over the full width."""

    def __init__(self, dim: int, width: int, head_dim: int, eps: float):
        super().__init__()
        self.heads = width // head_dim
        self.qkv = nn.Linear(dim, 3 * width, bias=False)
        self.q_norm = layer_norm(width, eps, affine=False)
        self.k_norm = layer_norm(width, eps, affine=False)
        self.proj = nn.Linear(width, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).chunk(3, dim=-1)  # (N, T, A) each
        q, k = self.q_norm(q).to(v.dtype), self.k_norm(k).to(v.dtype)
        return self.proj(_attend(q, k, v, self.heads))  # (N, T, D)


class CrossAttention(nn.Module):
    """Image tokens attend to caption tokens at full model width, qk-normed."""

    def __init__(self, dim: int, head_dim: int, eps: float):
        super().__init__()
        self.heads = dim // head_dim
        self.q = nn.Linear(dim, dim, bias=False)
        self.kv = nn.Linear(dim, 2 * dim, bias=False)
        self.q_norm = layer_norm(dim, eps, affine=False)
        self.k_norm = layer_norm(dim, eps, affine=False)
        self.proj = nn.Linear(dim, dim, bias=False)

    def forward(self, x: torch.Tensor, caption: torch.Tensor) -> torch.Tensor:
        k, v = self.kv(caption).chunk(2, dim=-1)  # (N, L, D) each
        q, k = self.q_norm(self.q(x)).to(v.dtype), self.k_norm(k).to(v.dtype)
        return self.proj(_attend(q, k, v, self.heads))  # (N, T, D)


class SwiGLU(nn.Module):
    """Dense feed-forward: w3(silu(w1 x) * w2 x)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(dim, hidden, bias=False)
        self.w3 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w3(F.silu(self.w1(x)) * self.w2(x))

    def init_weights(self, out_std: float) -> None:
        nn.init.xavier_uniform_(self.w1.weight)
        nn.init.xavier_uniform_(self.w2.weight)
        _init_out(self.w3, out_std)


class Mlp(nn.Module):
    """Linear -> GELU(tanh) -> LayerNorm -> Linear, with biases (caption and pooled-caption embedders)."""

    def __init__(self, in_dim: int, dim: int, eps: float):
        super().__init__()
        self.fc1 = nn.Linear(in_dim, dim)
        self.act = nn.GELU(approximate="tanh")
        self.norm = layer_norm(dim, eps)
        self.fc2 = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.norm(self.act(self.fc1(x))))

    def init_weights(self) -> None:
        for fc in (self.fc1, self.fc2):
            nn.init.normal_(fc.weight, std=0.02)
            nn.init.zeros_(fc.bias)
        self.norm.reset_parameters()


def _init_out(linear: nn.Linear, std: float) -> None:
    """Output projection: N(0, std), or zeros when std == 0."""
    nn.init.normal_(linear.weight, std=std) if std > 0 else nn.init.zeros_(linear.weight)


class TimestepEmbedder(nn.Module):
    """c_noise (N,) -> (N, D): sinusoidal frequencies then Linear-GELU(tanh)-Linear."""

    def __init__(self, dim: int, freq_dim: int):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, dim), nn.GELU(approximate="tanh"), nn.Linear(dim, dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.freq_dim // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t.float()[:, None] * freqs[None]  # (N, F/2)
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (N, F)
        return self.mlp(emb.to(self.mlp[0].weight.dtype))  # (N, D)

    def init_weights(self) -> None:
        for i in (0, 2):
            nn.init.normal_(self.mlp[i].weight, std=0.02)
            nn.init.zeros_(self.mlp[i].bias)


class CaptionBlock(nn.Module):
    """Pre-LN transformer block over caption tokens (no conditioning)."""

    def __init__(self, dim: int, head_dim: int, hidden: int, eps: float):
        super().__init__()
        self.norm1 = layer_norm(dim, eps)
        self.attn = SelfAttention(dim, dim, head_dim, eps)
        self.norm2 = layer_norm(dim, eps)
        self.ffn = SwiGLU(dim, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.ffn(self.norm2(x))

    def init_weights(self) -> None:
        self.norm1.reset_parameters()
        self.norm2.reset_parameters()
        nn.init.xavier_uniform_(self.attn.qkv.weight)
        _init_out(self.attn.proj, 0.0)  # zero: the block starts as identity
        self.ffn.init_weights(0.0)


class CaptionEmbedder(nn.Module):
    """Text-encoder token states (N, L, C) -> (N, L, D): MLP then one transformer block."""

    def __init__(self, caption_dim: int, dim: int, head_dim: int, hidden: int, eps: float):
        super().__init__()
        self.mlp = Mlp(caption_dim, dim, eps)
        self.block = CaptionBlock(dim, head_dim, hidden, eps)

    def forward(self, caption: torch.Tensor) -> torch.Tensor:
        return self.block(self.mlp(caption))

    def init_weights(self) -> None:
        self.mlp.init_weights()
        self.block.init_weights()


class DiTBlock(nn.Module):
    """adaLN-gated self-attention, ungated cross-attention to the caption, adaLN-gated SwiGLU or MoE."""

    def __init__(self, spec: BlockSpec, cond_dim: int, head_dim: int, num_experts: int, capacity: float,
                 eps: float):
        super().__init__()
        d = spec.dim
        self.norm1 = layer_norm(d, eps)
        self.attn = SelfAttention(d, spec.attn_width, head_dim, eps)
        self.norm2 = layer_norm(d, eps)
        self.cross_attn = CrossAttention(d, head_dim, eps)
        self.norm3 = layer_norm(d, eps)
        self.ffn = ExpertChoiceMoE(d, spec.hidden, num_experts, capacity) if spec.moe else SwiGLU(d, spec.hidden)
        self.adaLN = nn.Sequential(nn.GELU(approximate="tanh"), nn.Linear(cond_dim, 6 * d))

    def forward(self, x: torch.Tensor, caption: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """x (N, T, D), caption (N, L, D), c (N, cond_dim) -> (N, T, D)."""
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN(c).chunk(6, dim=-1)  # (N, D) each
        x = x + gate1.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift1, scale1))
        x = x + self.cross_attn(self.norm2(x), caption)
        return x + gate2.unsqueeze(1) * self.ffn(modulate(self.norm3(x), shift2, scale2))

    def init_weights(self, out_std: float) -> None:
        """Xavier inputs, N(0, out_std) output projections, zero adaLN (blocks start as identity)."""
        for norm in (self.norm1, self.norm2, self.norm3):
            norm.reset_parameters()
        for linear in (self.attn.qkv, self.cross_attn.q, self.cross_attn.kv):
            nn.init.xavier_uniform_(linear.weight)
        _init_out(self.attn.proj, out_std)
        _init_out(self.cross_attn.proj, out_std)
        self.ffn.init_weights(out_std)
        nn.init.zeros_(self.adaLN[1].weight)
        nn.init.zeros_(self.adaLN[1].bias)


class FinalLayer(nn.Module):
    """LayerNorm, adaLN shift/scale, Linear to patch pixels: (N, T, D) -> (N, T, p*p*C)."""

    def __init__(self, dim: int, cond_dim: int, out_dim: int, eps: float):
        super().__init__()
        self.norm = layer_norm(dim, eps)
        self.adaLN = nn.Sequential(nn.GELU(approximate="tanh"), nn.Linear(cond_dim, 2 * dim))
        self.linear = nn.Linear(dim, out_dim)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN(c).chunk(2, dim=-1)  # (N, D) each
        return self.linear(modulate(self.norm(x), shift, scale))

    def init_weights(self) -> None:
        self.norm.reset_parameters()
        for linear in (self.adaLN[1], self.linear):
            nn.init.zeros_(linear.weight)
            nn.init.zeros_(linear.bias)
