"""E-MMDiT (Shen et al. 2025): a 3-group MM-DiT with multi-path token compression, ASA and AdaLN-affine.

forward(x, t, caption) -> v: latents (N, C, H, W), flow time t (N,) in [0, 1] (1 = noise), caption states
(N, L, caption_dim) -> predicted velocity eps - x0 (N, C, H, W). Module names are the release's checkpoint keys.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from model.emmdit.config import EMMDiTConfig, attention_schedule
from model.emmdit.layers import AdaLNSingle, JointBlock, TokenCompressor, TokenReconstructor
from model.positions import sincos_2d


class PatchEmbed(nn.Module):
    """Patchify conv plus the centre crop of a stored (1, M*M, D) sin-cos table (keys proj.*, pos_embed)."""

    def __init__(self, cfg: EMMDiTConfig):
        super().__init__()
        self.cfg = cfg
        self.proj = nn.Conv2d(cfg.in_channels, cfg.dim, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        # Persistent as in the release's state dict; identical at 512 and 1024 px (arange(M) / 6 both times).
        # On the default device (not the parameters'): a build with meta parameters still gets a real table.
        self.register_buffer("pos_embed", self.table(None), persistent=True)  # (1, M*M, D)

    def table(self, device) -> torch.Tensor:
        """The full (1, M*M, D) table on `device`: coordinates arange(M) / (M / G) / pos_interp_scale."""
        cfg = self.cfg
        pos = sincos_2d(cfg.dim, cfg.pos_embed_max_size, base_size=cfg.grid_size,
                        pos_interp_scale=cfg.pos_interp_scale, device=device)
        return pos.unsqueeze(0)

    def positions(self) -> torch.Tensor:
        """(1, G*G, D) centre crop of the table for this model's grid."""
        m, g = self.cfg.pos_embed_max_size, self.cfg.grid_size
        top = (m - g) // 2
        crop = self.pos_embed.view(1, m, m, -1)[:, top:top + g, top:top + g]
        return crop.reshape(1, g * g, -1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) -> (N, G*G, D) tokens with positions added."""
        h = self.proj(x).flatten(2).transpose(1, 2)  # (N, T, D)
        return (h + self.positions()).to(h.dtype)


def repa_projector(dim: int, hidden: int, out_dim: int) -> nn.Sequential:
    """REPA MLP dim -> hidden -> hidden -> out_dim with SiLU (keys 0, 2, 4)."""
    return nn.Sequential(nn.Linear(dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                         nn.Linear(hidden, out_dim))


class EMMDiT(nn.Module):
    """Text-to-image MM-DiT: forward(x, t, caption, return_repa=False) -> v, or (v, projected group-1 tokens)."""

    def __init__(self, cfg: EMMDiTConfig):
        super().__init__()
        self.cfg = cfg
        D = cfg.dim
        self.pos_embed = PatchEmbed(cfg)
        self.adaln_single = AdaLNSingle(D, cfg.freq_dim)
        self.context_embedder = nn.Linear(cfg.caption_dim, D)
        schedule, hidden = attention_schedule(cfg), cfg.ffn_mult * D
        groups, start = [], 0
        for size in cfg.groups:  # block index counts over all groups, as the ASA cycle does
            groups.append(nn.ModuleList([JointBlock(D, cfg.head_dim, hidden, schedule[i], i != cfg.depth - 1)
                                         for i in range(start, start + size)]))
            start += size
        self.block_groups = nn.ModuleList(groups)
        # Nested lists: the release keys are tokencompressor.0.0.* and tokenreconstructor.0.0.*.
        if cfg.compression:
            self.tokencompressor = nn.ModuleList([nn.ModuleList([TokenCompressor(D)])])
            self.tokenreconstructor = nn.ModuleList([nn.ModuleList([TokenReconstructor(D)])])
        else:
            self.tokencompressor = self.tokenreconstructor = None
        self.norm_out = nn.LayerNorm(D, elementwise_affine=False, eps=1e-6)  # no timestep modulation
        self.proj_out = nn.Linear(D, cfg.patch_size ** 2 * cfg.in_channels)
        self.repa_projector = repa_projector(D, cfg.repa_hidden, cfg.repa_dim) if cfg.repa else None
        # Layers start with PyTorch's default init and blocks init their tables: already what init_weights() does.

    @property
    def device(self) -> torch.device:
        """Where the parameters are (a diffusers pipeline asks its components)."""
        return next(self.parameters()).device

    @torch.no_grad()
    def init_buffers(self) -> None:
        """Rebuild the fixed buffer (the sin-cos position table) on the parameters' device: after to_empty(), or a
        meta build whose weights hold no table (an EMA export)."""
        weight = self.pos_embed.proj.weight  # meta while a loader has yet to assign the weights: the default device
        self.pos_embed.pos_embed = self.pos_embed.table(None if weight.is_meta else weight.device)

    @torch.no_grad()
    def init_weights(self) -> None:
        """PyTorch default layer init and N(0, 1/D) modulation tables, as the release; works after to_empty()."""
        self.init_buffers()
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d, nn.LayerNorm, nn.RMSNorm)):
                m.reset_parameters()
            elif isinstance(m, JointBlock):
                m.init_modulation()

    def drop_repa_projector(self) -> None:
        """Remove the training-only projector (stage 2 starts from stage 1 without it)."""
        self.repa_projector = None

    def _check(self, x: torch.Tensor, t: torch.Tensor, caption: torch.Tensor) -> None:
        cfg = self.cfg
        if x.dim() != 4 or x.shape[1] != cfg.in_channels:
            raise ValueError(f"latent shape {tuple(x.shape)}: expected (N, {cfg.in_channels}, H, W)")
        if tuple(x.shape[-2:]) != (cfg.input_size, cfg.input_size):
            raise ValueError(f"latent resolution {x.shape[-2]}x{x.shape[-1]}: this model expects "
                             f"{cfg.input_size}x{cfg.input_size} (input_size)")
        n = x.shape[0]
        if t.numel() != n or any(s != 1 for s in t.shape[1:]):
            raise ValueError(f"t shape {tuple(t.shape)}: expected ({n},) (or ({n}, 1, 1, 1))")
        if caption.shape != (n, cfg.caption_len, cfg.caption_dim):
            raise ValueError(f"caption shape {tuple(caption.shape)}: expected "
                             f"({n}, {cfg.caption_len}, {cfg.caption_dim})")

    def forward(self, x: torch.Tensor, t: torch.Tensor, caption: torch.Tensor, return_repa: bool = False):
        """x (N, C, H, W) noisy latents, t (N,) in [0, 1], caption (N, L, C_txt) -> v (N, C, H, W) [, z (N, T, Z)]."""
        self._check(x, t, caption)
        if return_repa and self.repa_projector is None:
            raise ValueError("return_repa=True needs the REPA projector: build the model with repa=True")
        g = self.cfg.grid_size
        t6 = self.adaln_single(t.reshape(-1) * self.cfg.timestep_scale)  # (N, 6, D)
        h = self.pos_embed(x)  # (N, T, D)
        y = self.context_embedder(caption)  # (N, L, D); no text mask: padding tokens are attended

        first, middle, last = self.block_groups
        for blk in first:
            h, y = blk(h, y, t6)
        skip = h  # (N, T, D): group-1 output, REPA target tokens and the reconstructor's skip
        if self.tokencompressor is not None:
            h = self.tokencompressor[0][0](h, g)  # (N, T/4 + T/16, D)
        for blk in middle:
            h, y = blk(h, y, t6)
        if self.tokenreconstructor is not None:
            h = self.tokenreconstructor[0][0](h, skip, g)  # (N, T, D)
            h = h + self.pos_embed.positions()  # Position Reinforcement
        for blk in last:
            h, y = blk(h, y, t6)  # y is None after the last block
        v = self.unpatchify(self.proj_out(self.norm_out(h)))  # (N, C, H, W)
        if return_repa:
            return v, self.repa_projector(skip)  # (N, T, Z)
        return v

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """(N, T, p*p*C) raster-order patches -> (N, C, H, W)."""
        p, c, g = self.cfg.patch_size, self.cfg.in_channels, self.cfg.grid_size
        x = x.reshape(x.shape[0], g, g, p, p, c)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(x.shape[0], c, g * p, g * p)
