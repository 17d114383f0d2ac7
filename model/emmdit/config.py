"""E-MMDiT model config: typed dataclass, size presets, the attention schedule and the FLOP count used for MFU."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

# Token compression paths (pixel-unshuffle factors) between the first and the last block group.
COMPRESS_RATIOS = (2, 4)


@dataclass(frozen=True)
class EMMDiTConfig:
    """Every size and shape choice of an E-MMDiT network."""

    input_size: int = 16  # latent side (16 at 512 px with DC-AE f32c32)
    in_channels: int = 32
    patch_size: int = 1
    dim: int = 768  # width of both streams
    head_dim: int = 32  # 24 heads at width 768
    groups: tuple[int, int, int] = (4, 16, 4)  # blocks before compression, on compressed tokens, after
    ffn_mult: int = 3  # FFN hidden = ffn_mult x dim, tanh-GELU
    caption_dim: int = 2048  # Llama-3.2-1B hidden width
    caption_len: int = 128
    freq_dim: int = 256  # sinusoidal timestep frequencies of the shared adaLN-single module
    timestep_scale: float = 1000.0  # the network sees t x 1000 (the release's discrete timestep scale)
    sub_attention: bool = True  # Alternating Subregion Attention; False = full attention in every block
    # Multi-path token compression around the middle group; False = every block on all tokens (no compressor,
    # reconstructor or position reinforcement): the plain MM-DiT that the compression speedup is measured against.
    compression: bool = True
    pos_embed_max_size: int = 96  # side of the stored sin-cos table; the image grid is its centre crop
    repa: bool = False  # build the REPA projector (training only; not part of the inference weights)
    repa_hidden: int = 2048
    repa_dim: int = 768  # DINOv2 ViT-B/14 feature width

    def __post_init__(self) -> None:
        # YAML gives lists; keep the dataclass hashable and comparable.
        if not isinstance(self.groups, (list, tuple)) or len(self.groups) != 3:
            raise ValueError(f"groups={self.groups!r}: expected three block counts (before, compressed, after)")
        object.__setattr__(self, "groups", tuple(int(g) for g in self.groups))
        if min(self.groups) < 1:
            raise ValueError(f"groups={self.groups!r}: every group needs at least one block")
        positive = ("input_size", "in_channels", "patch_size", "dim", "head_dim", "ffn_mult", "caption_dim",
                    "caption_len", "freq_dim", "pos_embed_max_size", "repa_hidden", "repa_dim")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}={getattr(self, name)!r}: expected a positive integer")
        if self.timestep_scale <= 0:
            raise ValueError(f"timestep_scale={self.timestep_scale!r}: expected > 0")
        if self.dim % self.head_dim:
            raise ValueError(f"dim={self.dim} is not a multiple of head_dim={self.head_dim}")
        r = max(COMPRESS_RATIOS)
        if self.compression and self.dim % (r * r):
            raise ValueError(f"dim={self.dim}: the {r}x pixel-shuffle reconstruction needs a multiple of {r * r}")
        if self.freq_dim % 2:
            raise ValueError(f"freq_dim={self.freq_dim}: expected an even number")
        if self.input_size % self.patch_size:
            raise ValueError(f"input_size={self.input_size} is not divisible by patch_size={self.patch_size}")
        if self.compression and self.grid_size % r:
            raise ValueError(f"patch grid {self.grid_size}x{self.grid_size} (input_size / patch_size): "
                             f"token compression needs a side divisible by {r}")
        if self.pos_embed_max_size < self.grid_size:
            raise ValueError(f"pos_embed_max_size={self.pos_embed_max_size} is smaller than the patch grid "
                             f"side {self.grid_size}")
        for i, (s, n) in enumerate(attention_schedule(self)):
            tokens = image_tokens(self, i)
            if tokens % (s * n) or self.caption_len % (s * n):
                raise ValueError(f"block {i} attends in {s} subregions of runs of {n} tokens: its {tokens} image "
                                 f"tokens and caption_len={self.caption_len} must both divide by {s * n}")

    @property
    def grid_size(self) -> int:
        """Patches per side."""
        return self.input_size // self.patch_size

    @property
    def num_patches(self) -> int:
        """Image tokens at full resolution."""
        return self.grid_size ** 2

    @property
    def compressed_tokens(self) -> int:
        """Image tokens of the middle group: one per 2x2 plus one per 4x4 patch square (64 + 16 at 512 px)."""
        return sum(self.num_patches // (r * r) for r in COMPRESS_RATIOS)

    @property
    def depth(self) -> int:
        """Blocks in all groups."""
        return sum(self.groups)

    @property
    def pos_interp_scale(self) -> float:
        """Sin-cos interpolation scale as the release sets it: max(latent side // 16, 1)."""
        return float(max(self.input_size // 16, 1))


# Alternating Subregion Attention, by global block index mod 3: (subregions s, run length n).
_ASA_CYCLE = ((1, 1), (4, 1), (4, 4))


def attention_schedule(cfg: EMMDiTConfig) -> list[tuple[int, int]]:
    """(s, n) per block, counted over all blocks: token t attends within subregion (t // n) % s."""
    if not cfg.sub_attention:
        return [(1, 1)] * cfg.depth
    return [_ASA_CYCLE[i % len(_ASA_CYCLE)] for i in range(cfg.depth)]


def image_tokens(cfg: EMMDiTConfig, block: int) -> int:
    """Image tokens block `block` sees (compressed in the middle group when compression is on)."""
    first, middle, _ = cfg.groups
    return cfg.compressed_tokens if cfg.compression and first <= block < first + middle else cfg.num_patches


PRESETS: dict[str, EMMDiTConfig] = {
    "EMMDiT_512": EMMDiTConfig(),
    # Same weights, 32x32 latents, full attention everywhere.
    "EMMDiT_1024": EMMDiTConfig(input_size=32, sub_attention=False),
    # For CPU tests and the demo: 16x16 latents keep 80 compressed tokens, so every ASA mode is exercised.
    "EMMDiT_Debug": EMMDiTConfig(in_channels=4, dim=64, head_dim=16, groups=(1, 2, 1), caption_dim=64,
                                 caption_len=16, pos_embed_max_size=32, repa_hidden=128, repa_dim=32),
}


def model_config(preset: str, **overrides) -> EMMDiTConfig:
    """A preset with fields replaced; unknown preset or field -> ValueError naming it."""
    if preset not in PRESETS:
        raise ValueError(f"unknown E-MMDiT preset {preset!r}; expected one of {sorted(PRESETS)}")
    names = {f.name for f in dataclasses.fields(EMMDiTConfig)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise ValueError(f"unknown EMMDiTConfig key(s) {unknown}; allowed: {sorted(names)}")
    return dataclasses.replace(PRESETS[preset], **overrides)


def _block_flops(cfg: EMMDiTConfig, tokens: int, s: int, last: bool) -> float:
    """Forward matmul FLOPs of one joint block on `tokens` image and caption_len text tokens."""
    d, L, h = cfg.dim, cfg.caption_len, cfg.ffn_mult * cfg.dim
    f = 2 * (tokens + L) * d * 3 * d  # q, k, v of both streams
    f += 2 * 2 * (tokens + L) ** 2 * d / s  # scores and values inside each of s subregions
    out = tokens if last else tokens + L  # the last block drops the text output path
    f += 2 * out * d * d + 2 * 2 * out * d * h  # out projections and FFNs
    return f


def flops_per_sample(cfg: EMMDiTConfig) -> float:
    """Forward + backward (3x forward) matmul FLOPs of one sample, attention included, for MFU."""
    T, D, L = cfg.num_patches, cfg.dim, cfg.caption_len
    p2c = cfg.patch_size ** 2 * cfg.in_channels
    f = 2 * T * p2c * D  # patch embed
    f += 2 * cfg.freq_dim * D + 2 * D * D + 2 * D * 6 * D  # shared timestep module
    f += 2 * L * cfg.caption_dim * D  # caption projection
    schedule = attention_schedule(cfg)
    f += sum(_block_flops(cfg, image_tokens(cfg, i), s, i == cfg.depth - 1) for i, (s, _) in enumerate(schedule))
    for r in COMPRESS_RATIOS if cfg.compression else ():
        t = T // (r * r)
        f += 2 * t * (r * r * D) * D + 2 * t * D * D  # compressor path
        f += 2 * T * (D // (r * r)) * D + 2 * T * D * D  # reconstructor path
    if cfg.compression:
        f += 2 * T * 3 * D * D + 2 * T * D * D  # merger MLP
    f += 2 * T * D * p2c  # proj_out
    if cfg.repa:
        f += 2 * T * (D * cfg.repa_hidden + cfg.repa_hidden ** 2 + cfg.repa_hidden * cfg.repa_dim)
    return 3.0 * f
