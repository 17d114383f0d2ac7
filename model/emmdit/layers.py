"""Building blocks of E-MMDiT: joint attention with subregions, the joint block, adaLN-single, token compression.

Attribute names follow the public release's checkpoint keys (diffusers SD3 naming), so its state dict loads as is.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def to_subregions(x: torch.Tensor, s: int, n: int) -> torch.Tensor:
    """(N, T, D) -> (N*s, T/s, D): token t goes to subregion (t // n) % s, order kept inside each."""
    b, t, d = x.shape
    return x.view(b, t // (s * n), s, n, d).transpose(1, 2).reshape(b * s, t // s, d)


def from_subregions(x: torch.Tensor, s: int, n: int) -> torch.Tensor:
    """Inverse of to_subregions: (N*s, T/s, D) -> (N, T, D)."""
    bs, ts, d = x.shape
    return x.view(bs // s, s, ts // n, n, d).transpose(1, 2).reshape(bs // s, ts * s, d)


class JointAttention(nn.Module):
    """SD3 joint attention: per-stream q/k/v with per-head RMS qk-norm, one softmax over image + text tokens."""

    def __init__(self, dim: int, head_dim: int, text_out: bool = True, eps: float = 1e-6):
        super().__init__()
        self.heads, self.head_dim = dim // head_dim, head_dim
        self.to_q, self.to_k, self.to_v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.norm_q, self.norm_k = nn.RMSNorm(head_dim, eps=eps), nn.RMSNorm(head_dim, eps=eps)
        self.add_q_proj, self.add_k_proj, self.add_v_proj = (nn.Linear(dim, dim), nn.Linear(dim, dim),
                                                             nn.Linear(dim, dim))
        self.norm_added_q, self.norm_added_k = nn.RMSNorm(head_dim, eps=eps), nn.RMSNorm(head_dim, eps=eps)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim)])  # a list: the release's key is to_out.0
        self.to_add_out = nn.Linear(dim, dim) if text_out else None

    def _heads(self, z: torch.Tensor) -> torch.Tensor:
        return z.view(z.shape[0], z.shape[1], self.heads, self.head_dim)  # (N, T, h, a)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x (N, T, D) image, y (N, L, D) text -> (image out (N, T, D), text out (N, L, D) or None)."""
        t = x.shape[1]
        q = torch.cat([self.norm_q(self._heads(self.to_q(x))), self.norm_added_q(self._heads(self.add_q_proj(y)))], 1)
        k = torch.cat([self.norm_k(self._heads(self.to_k(x))), self.norm_added_k(self._heads(self.add_k_proj(y)))], 1)
        v = torch.cat([self._heads(self.to_v(x)), self._heads(self.add_v_proj(y))], 1)  # (N, T+L, h, a)
        q, k, v = (z.transpose(1, 2).to(v.dtype) for z in (q, k, v))  # (N, h, T+L, a)
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)  # (N, T+L, D)
        x_out = self.to_out[0](out[:, :t])
        y_out = self.to_add_out(out[:, t:]) if self.to_add_out is not None else None
        return x_out, y_out


class FeedForward(nn.Module):
    """Linear -> tanh-GELU -> Linear with biases; keys net.0.proj and net.2 as in the release."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        proj = nn.Module()
        proj.proj = nn.Linear(dim, hidden)
        self.net = nn.ModuleList([proj, nn.Identity(), nn.Linear(hidden, dim)])  # slot 1 held the release's dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net[2](F.gelu(self.net[0].proj(x), approximate="tanh"))


class JointBlock(nn.Module):
    """MM-DiT block with AdaLN-affine modulation, optional subregion attention; the last one has no text output."""

    def __init__(self, dim: int, head_dim: int, ffn_hidden: int, subregions: tuple[int, int], text_out: bool):
        super().__init__()
        self.subregions = subregions  # (s, n), static per block
        self.text_out = text_out
        self.norm1 = nn.LayerNorm(dim)  # affine, eps 1e-5
        self.norm1_context = nn.LayerNorm(dim)
        self.attn = JointAttention(dim, head_dim, text_out)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.ff = FeedForward(dim, ffn_hidden)
        # AdaLN-affine: modulation = bias + t6 * (1 + scale), per block, shared t6.
        self.scale_shift_bias = nn.Parameter(torch.empty(6, dim))
        self.scale_shift_scale = nn.Parameter(torch.empty(6, dim))
        if text_out:
            self.norm2_context = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
            self.ff_context = FeedForward(dim, ffn_hidden)
            self.scale_shift_bias_c = nn.Parameter(torch.empty(6, dim))
            self.scale_shift_scale_c = nn.Parameter(torch.empty(6, dim))
        self.init_modulation()

    def init_modulation(self) -> None:
        """Modulation tables N(0, 1/dim), as in the release (layers keep PyTorch's default init)."""
        for p in self.parameters(recurse=False):
            nn.init.normal_(p, std=p.shape[-1] ** -0.5)

    def forward(self, x: torch.Tensor, y: torch.Tensor, t6: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x (N, T, D), y (N, L, D), t6 (N, 6, D) -> (x, y or None for the last block)."""
        s, n = self.subregions
        mod = self.scale_shift_bias + t6 * (1 + self.scale_shift_scale)  # (N, 6, D)
        shift1, scale1, gate1, shift2, scale2, gate2 = mod.chunk(6, dim=1)  # (N, 1, D) each
        hx = self.norm1(x) * (1 + scale1) + shift1
        hy = self.norm1_context(y)  # the last block's text query input is not modulated
        if self.text_out:
            mod_c = self.scale_shift_bias_c + t6 * (1 + self.scale_shift_scale_c)  # (N, 6, D)
            c_shift1, c_scale1, c_gate1, c_shift2, c_scale2, c_gate2 = mod_c.chunk(6, dim=1)
            hy = hy * (1 + c_scale1) + c_shift1

        if s > 1:  # Alternating Subregion Attention: each subregion attends jointly to its own text subregion
            hx, hy = to_subregions(hx, s, n), to_subregions(hy, s, n)  # (N*s, T/s, D), (N*s, L/s, D)
        ax, ay = self.attn(hx, hy)
        if s > 1:
            ax = from_subregions(ax, s, n)
            ay = from_subregions(ay, s, n) if ay is not None else None

        x = x + gate1 * ax
        x = x + gate2 * self.ff(self.norm2(x) * (1 + scale2) + shift2)
        if not self.text_out:
            return x, None
        y = y + c_gate1 * ay
        y = y + c_gate2 * self.ff_context(self.norm2_context(y) * (1 + c_scale2) + c_shift2)
        return x, y


class TimestepEmbedding(nn.Module):
    """Linear -> SiLU -> Linear (keys linear_1, linear_2)."""

    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


def timestep_frequencies(t: torch.Tensor, freq_dim: int) -> torch.Tensor:
    """(N,) timesteps -> (N, freq_dim) float32 [cos, sin] of t * 10000^(-i / (freq_dim / 2))."""
    half = freq_dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]  # (N, F/2)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class AdaLNSingle(nn.Module):
    """PixArt adaLN-single: timestep -> (N, 6, D) modulation shared by every block (keys emb.timestep_embedder.*)."""

    def __init__(self, dim: int, freq_dim: int):
        super().__init__()
        self.freq_dim = freq_dim
        self.emb = nn.Module()
        self.emb.timestep_embedder = TimestepEmbedding(freq_dim, dim)
        self.linear = nn.Linear(dim, 6 * dim)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        """t (N,) on the network's timestep scale -> (N, 6, D)."""
        w = self.linear.weight
        emb = self.emb.timestep_embedder(timestep_frequencies(t, self.freq_dim).to(w.dtype))  # (N, D)
        return self.linear(F.silu(emb)).view(t.shape[0], 6, -1)


def _tokens_to_map(x: torch.Tensor, side: int) -> torch.Tensor:
    return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], side, side)  # (N, D, side, side)


def _map_to_tokens(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(2).transpose(1, 2)  # (N, side*side, D)


def _conv_path(shuffle: nn.Module, in_ch: int, dim: int) -> nn.Sequential:
    """(pixel-)(un)shuffle, 1x1 conv to dim, tanh-GELU, 1x1 conv; keys .1 and .3."""
    return nn.Sequential(shuffle, nn.Conv2d(in_ch, dim, 1), nn.GELU(approximate="tanh"), nn.Conv2d(dim, dim, 1))


class TokenCompressor(nn.Module):
    """(N, G*G, D) raster tokens -> (N, G*G/4 + G*G/16, D): a 2x and a 4x pixel-unshuffle path, concatenated."""

    def __init__(self, dim: int):
        super().__init__()
        self.body2x = _conv_path(nn.PixelUnshuffle(2), 4 * dim, dim)
        self.body4x = _conv_path(nn.PixelUnshuffle(4), 16 * dim, dim)

    def forward(self, x: torch.Tensor, side: int) -> torch.Tensor:
        m = _tokens_to_map(x, side)  # (N, D, G, G)
        return torch.cat([_map_to_tokens(self.body2x(m)), _map_to_tokens(self.body4x(m))], dim=1)


class TokenReconstructor(nn.Module):
    """Compressed tokens back to (N, G*G, D): pixel-shuffle each path, merge with the skip by a 3D -> D -> D MLP."""

    def __init__(self, dim: int):
        super().__init__()
        self.body2x = _conv_path(nn.PixelShuffle(2), dim // 4, dim)
        self.body4x = _conv_path(nn.PixelShuffle(4), dim // 16, dim)
        self.mergers = nn.Sequential(nn.Linear(3 * dim, dim), nn.GELU(approximate="tanh"), nn.Linear(dim, dim))

    def forward(self, x: torch.Tensor, skip: torch.Tensor, side: int) -> torch.Tensor:
        """x (N, G*G/4 + G*G/16, D), skip (N, G*G, D) the tokens before compression -> (N, G*G, D)."""
        x2, x4 = x.split([(side // 2) ** 2, (side // 4) ** 2], dim=1)
        x2 = _map_to_tokens(self.body2x(_tokens_to_map(x2, side // 2)))  # (N, G*G, D)
        x4 = _map_to_tokens(self.body4x(_tokens_to_map(x4, side // 4)))  # (N, G*G, D)
        return self.mergers(torch.cat([x2, x4, skip], dim=-1))
