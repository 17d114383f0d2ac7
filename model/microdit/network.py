"""MicroDiT (Sehwag et al. 2024): a patch mixer on all tokens, deferred masking, a MoE DiT backbone."""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from model.microdit.config import ModelConfig, backbone_specs, caption_hidden, kept_tokens, mixer_specs
from model.microdit.layers import CaptionEmbedder, DiTBlock, FinalLayer, Mlp, TimestepEmbedder, layer_norm
from model.positions import sincos_2d


def _projection(in_dim: int, out_dim: int, eps: float) -> nn.Module:
    """LayerNorm + bias-free Linear between backbone and mixer widths; identity when they match."""
    if in_dim == out_dim:
        return nn.Identity()
    return nn.Sequential(layer_norm(in_dim, eps), nn.Linear(in_dim, out_dim, bias=False))


def random_keep(n: int, tokens: int, kept: int, device: torch.device,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """(N, kept) indices of kept tokens, a per-sample uniform random subset, sorted in raster order."""
    noise_device = generator.device if generator is not None else device
    noise = torch.rand(n, tokens, generator=generator, device=noise_device)  # (N, T)
    ids = torch.argsort(noise, dim=1)[:, :kept]  # a random permutation's first `kept` entries
    return ids.sort(dim=1).values.to(device)


class MicroDiT(nn.Module):
    """Text-to-image diffusion transformer: forward(x, c_noise, caption, keep_ids=...) -> (out, keep)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        D, eps = cfg.dim, cfg.norm_eps
        self.x_embedder = nn.Conv2d(cfg.in_channels, D, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.t_embedder = TimestepEmbedder(D, cfg.freq_dim)
        self.caption_embedder = CaptionEmbedder(cfg.caption_dim, D, cfg.head_dim, caption_hidden(cfg), eps)
        self.pooled_embedder = Mlp(D, D, eps)
        # Fixed positions: rebuilt from the config, never saved, so a 256-px state_dict loads into a 512-px model.
        # On the default device (not the parameters'): a build with meta parameters still gets real positions.
        self.register_buffer("pos_embed", self._positions(None), persistent=False)  # (1, T, D)

        block = lambda spec: DiTBlock(spec, D, cfg.head_dim, cfg.num_experts, cfg.expert_capacity, eps)
        self.mixer_in = _projection(D, cfg.mixer_dim, eps)
        self.mixer_caption = _projection(D, cfg.mixer_dim, eps)
        self.mixer = nn.ModuleList([block(s) for s in mixer_specs(cfg)])
        self.mixer_out = _projection(cfg.mixer_dim, D, eps)
        self.blocks = nn.ModuleList([block(s) for s in backbone_specs(cfg)])
        self.final_layer = FinalLayer(D, D, cfg.patch_size ** 2 * cfg.in_channels, eps)
        self.init_weights()

    def _positions(self, device) -> torch.Tensor:
        cfg = self.cfg
        pos = sincos_2d(cfg.dim, cfg.grid_size, pos_interp_scale=cfg.pos_interp_scale, device=device)
        return pos.unsqueeze(0)  # (1, T, D)

    @property
    def device(self) -> torch.device:
        """Where the parameters are (a diffusers pipeline asks its components)."""
        return next(self.parameters()).device

    @torch.no_grad()
    def init_buffers(self) -> None:
        """Rebuild the fixed buffers (positions) on the parameters' device; needed after to_empty() or a meta
        build."""
        weight = self.x_embedder.weight  # meta while a loader has yet to assign the weights: keep the default device
        self.pos_embed = self._positions(None if weight.is_meta else weight.device)

    @torch.no_grad()
    def init_weights(self) -> None:
        """Initialise every parameter (and rebuild positions) as the recipe says; works after to_empty()."""
        self.init_buffers()
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                m.reset_parameters()
        w = self.x_embedder.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))  # as a Linear over flattened patches
        nn.init.zeros_(self.x_embedder.bias)
        self.t_embedder.init_weights()
        self.caption_embedder.init_weights()
        self.pooled_embedder.init_weights()
        # Mixer blocks all use the backbone's deepest output std, as in the release (depth_init off there).
        for blk in self.mixer:
            blk.init_weights(0.02 / math.sqrt(2 * self.cfg.depth))
        for i, blk in enumerate(self.blocks):
            blk.init_weights(0.02 / math.sqrt(2 * (i + 1)))
        self.final_layer.init_weights()

    @property
    def num_patches(self) -> int:
        """Tokens per image before masking: the T of the (N, T) keep sets this network accepts."""
        return self.cfg.num_patches

    def _check(self, x: torch.Tensor, c_noise: torch.Tensor, caption: torch.Tensor, mask_ratio: float,
               keep_ids: torch.Tensor | None) -> None:
        cfg = self.cfg
        if x.dim() != 4 or x.shape[1] != cfg.in_channels:
            raise ValueError(f"latent shape {tuple(x.shape)}: expected (N, {cfg.in_channels}, H, W)")
        h, w = x.shape[-2:]
        if h % cfg.patch_size or w % cfg.patch_size:
            raise ValueError(f"latent resolution {h}x{w} is not divisible by patch_size={cfg.patch_size}")
        if (h, w) != (cfg.input_size, cfg.input_size):
            raise ValueError(f"latent resolution {h}x{w}: this model expects "
                             f"{cfg.input_size}x{cfg.input_size} (input_size)")
        n = x.shape[0]
        if c_noise.numel() != n or any(s != 1 for s in c_noise.shape[1:]):
            raise ValueError(f"c_noise shape {tuple(c_noise.shape)}: expected ({n},) (or ({n}, 1, 1, 1))")
        if caption.shape != (n, cfg.caption_len, cfg.caption_dim):
            raise ValueError(f"caption shape {tuple(caption.shape)}: expected "
                             f"({n}, {cfg.caption_len}, {cfg.caption_dim})")
        if not 0.0 <= mask_ratio < 1.0:
            raise ValueError(f"mask_ratio={mask_ratio!r}: expected a value in [0, 1)")
        if keep_ids is not None:
            T = cfg.num_patches
            if keep_ids.dim() != 2 or keep_ids.shape[0] != n or not 1 <= keep_ids.shape[1] <= T \
                    or keep_ids.dtype != torch.long:
                raise ValueError(f"keep_ids {tuple(keep_ids.shape)} {keep_ids.dtype}: expected int64 ({n}, K) "
                                 f"token indices with 1 <= K <= {T}")
            if mask_ratio > 0 and keep_ids.shape[1] != kept_tokens(T, mask_ratio):
                raise ValueError(f"keep_ids keep {keep_ids.shape[1]} tokens but mask_ratio={mask_ratio} keeps "
                                 f"{kept_tokens(T, mask_ratio)} of {T}")

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor, caption: torch.Tensor, mask_ratio: float = 0.0,
                generator: torch.Generator | None = None,
                keep_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x (N, C, H, W) = c_in * noisy latent, c_noise (N,), caption (N, L, C_txt) -> (out, keep (N, T) | None).

        keep_ids (N, K) int64 are the tokens the backbone sees (distinct per row, any order; `random_keep`
        draws them): training passes them, drawn outside, so the forward has no random op and compiles as one
        graph. Without keep_ids, mask_ratio > 0 draws them here from `generator` (eager convenience: the
        same draw, but a graph break when the network is compiled).
        """
        self._check(x, c_noise, caption, mask_ratio, keep_ids)
        n, T = x.shape[0], self.cfg.num_patches
        if keep_ids is None and mask_ratio > 0:
            kept = kept_tokens(T, mask_ratio)
            if kept == 0:
                raise ValueError(f"mask_ratio={mask_ratio} keeps no token of {T}; expected fewer masked")
            keep_ids = random_keep(n, T, kept, x.device, generator)  # (N, K)
        # Compute dtype: the parameters' (bf16 inside an FSDP mixed-precision forward). The root leaves inputs
        # as given, so c_noise reaches the timestep embedder in float32; positions are added in float32.
        dtype = self.x_embedder.weight.dtype
        c_noise = c_noise.reshape(n)  # a sigma-shaped (N, 1, 1, 1) is fine too
        x = self.x_embedder(x.to(dtype)).flatten(2).transpose(1, 2)  # (N, T, D)
        x = (x + self.pos_embed).to(dtype)
        y = self.caption_embedder(caption.to(dtype))  # (N, L, D)
        c = self.t_embedder(c_noise) + self.pooled_embedder(y.mean(dim=1))  # (N, D)

        x = self.mixer_in(x)  # (N, T, D_mix)
        y_mix = self.mixer_caption(y)  # (N, L, D_mix)
        for blk in self.mixer:
            x = blk(x, y_mix, c)  # (N, T, D_mix): the mixer sees every token

        keep = None
        if keep_ids is not None:
            ids = keep_ids.to(x.device)  # (N, K)
            x = torch.gather(x, 1, ids.unsqueeze(-1).expand(-1, -1, x.shape[-1]))  # (N, K, D_mix)
            keep = torch.zeros(n, T, dtype=torch.bool, device=x.device).scatter_(1, ids, True)  # (N, T)

        x = self.mixer_out(x)  # (N, K, D): projected after masking to save compute
        for blk in self.blocks:
            x = blk(x, y, c)  # (N, K, D)
        x = self.final_layer(x, c)  # (N, K, p*p*C)

        if keep_ids is not None:
            full = x.new_zeros(n, T, x.shape[-1])  # masked patches are zeros
            x = full.scatter(1, ids.unsqueeze(-1).expand(-1, -1, x.shape[-1]), x)  # (N, T, p*p*C)
        return self.unpatchify(x), keep

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """(N, T, p*p*C) raster-order patches -> (N, C, H, W)."""
        p, c, g = self.cfg.patch_size, self.cfg.in_channels, self.cfg.grid_size
        x = x.reshape(x.shape[0], g, g, p, p, c)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(x.shape[0], c, g * p, g * p)
