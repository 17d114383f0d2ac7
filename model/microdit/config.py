"""MicroDiT model config: typed dataclass, size presets, per-block widths and the FLOP count used for MFU."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass(frozen=True)
class ModelConfig:
    """Every size and shape choice of a MicroDiT network."""

    input_size: int = 32  # latent side (32 at 256 px with the SDXL VAE)
    in_channels: int = 4
    patch_size: int = 2
    dim: int = 1024  # backbone width
    depth: int = 28  # backbone blocks
    head_dim: int = 64
    attn_ratio: tuple[float, float] = (0.5, 1.0)  # self-attention width ratio, linspace over backbone blocks
    mlp_ratio: tuple[float, float] = (0.5, 4.0)  # FFN width ratio, linspace over backbone blocks
    mixer_dim: int = 768
    mixer_depth: int = 6
    mixer_attn_ratio: float = 1.0
    mixer_mlp_ratio: float = 4.0
    num_experts: int = 8
    expert_capacity: float = 2.0
    experts_every_n: int = 2  # MoE in blocks i with (i + 1) % n == 0; never the last backbone block
    multiple_of: int = 256  # FFN / expert hidden sizes round up to this
    caption_dim: int = 1024  # text-encoder token width
    caption_len: int = 77
    caption_mlp_ratio: float = 4.0  # FFN ratio of the caption transformer block
    freq_dim: int = 512  # sinusoidal timestep frequencies
    pos_interp_scale: float = 1.0  # 1.0 at 256 px, 2.0 at 512 px
    norm_eps: float = 1e-6

    def __post_init__(self) -> None:
        # YAML gives lists; keep the dataclass hashable and comparable.
        for name in ("attn_ratio", "mlp_ratio"):
            value = getattr(self, name)
            if not isinstance(value, (list, tuple)) or len(value) != 2:
                raise ValueError(f"{name}={value!r}: expected a pair (first block, last block)")
            object.__setattr__(self, name, (float(value[0]), float(value[1])))
        positive = ("input_size", "in_channels", "patch_size", "dim", "depth", "head_dim", "mixer_dim",
                    "num_experts", "experts_every_n", "multiple_of", "caption_dim", "caption_len", "freq_dim")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}={getattr(self, name)!r}: expected a positive integer")
        if self.mixer_depth < 0:
            raise ValueError(f"mixer_depth={self.mixer_depth!r}: expected >= 0")
        if self.input_size % self.patch_size:
            raise ValueError(f"input_size={self.input_size} is not divisible by patch_size={self.patch_size}")
        for name in ("dim", "mixer_dim"):
            if getattr(self, name) % self.head_dim:
                raise ValueError(f"{name}={getattr(self, name)} is not a multiple of head_dim={self.head_dim}")
        if self.dim % 4:
            raise ValueError(f"dim={self.dim}: 2-D sin-cos positions need a multiple of 4")
        if self.freq_dim % 2:
            raise ValueError(f"freq_dim={self.freq_dim}: expected an even number")
        if self.pos_interp_scale <= 0:
            raise ValueError(f"pos_interp_scale={self.pos_interp_scale!r}: expected > 0")
        if self.expert_capacity <= 0:
            raise ValueError(f"expert_capacity={self.expert_capacity!r}: expected > 0")

    @property
    def grid_size(self) -> int:
        """Patches per side."""
        return self.input_size // self.patch_size

    @property
    def num_patches(self) -> int:
        """Tokens per image before masking."""
        return self.grid_size ** 2


@dataclass(frozen=True)
class BlockSpec:
    """Resolved widths of one transformer block."""

    dim: int
    attn_width: int  # self-attention q/k/v width
    hidden: int  # SwiGLU hidden size, or expert hidden size when moe
    moe: bool


PRESETS: dict[str, ModelConfig] = {
    "MicroDiT_XL_2": ModelConfig(),
    "MicroDiT_Tiny_2": ModelConfig(dim=512, depth=16, head_dim=32, mixer_dim=512, mixer_depth=4),
    # A few million parameters for CPU tests and the tiny demo (tiny text encoder width 64, 16x16 latents).
    "MicroDiT_Debug": ModelConfig(input_size=16, dim=128, depth=4, head_dim=32, mixer_dim=96, mixer_depth=2,
                                  multiple_of=64, caption_dim=64, freq_dim=128),
}


def model_config(preset: str, **overrides) -> ModelConfig:
    """A preset with fields replaced; unknown preset or field -> ValueError naming it."""
    if preset not in PRESETS:
        raise ValueError(f"unknown model preset {preset!r}; expected one of {sorted(PRESETS)}")
    names = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise ValueError(f"unknown ModelConfig key(s) {unknown}; allowed: {sorted(names)}")
    return dataclasses.replace(PRESETS[preset], **overrides)


def _round_up(value: int, multiple: int) -> int:
    return multiple * ((value + multiple - 1) // multiple)


def _linspace(start: float, stop: float, num: int) -> list[float]:
    # Same float arithmetic as numpy.linspace, so int(dim * ratio) truncates exactly as the release's did.
    if num == 1:
        return [start]
    step = (stop - start) / (num - 1)
    return [start + i * step for i in range(num - 1)] + [stop]


def attn_width(dim: int, ratio: float, head_dim: int) -> int:
    """Self-attention width: ratio x dim rounded up to a multiple of 2 x head_dim."""
    return dim if ratio == 1.0 else _round_up(int(dim * ratio), 2 * head_dim)


def swiglu_hidden(dim: int, ratio: float, multiple_of: int) -> int:
    """Dense SwiGLU hidden size: 2/3 x int(dim x ratio) rounded up."""
    return _round_up(int(2 * int(dim * ratio) / 3), multiple_of)


def expert_hidden(dim: int, ratio: float, multiple_of: int) -> int:
    """Expert MLP hidden size: int(dim x ratio) rounded up (no 2/3: two matrices, not three)."""
    return _round_up(int(dim * ratio), multiple_of)


def _spec(cfg: ModelConfig, dim: int, attn_ratio: float, mlp_ratio: float, moe: bool) -> BlockSpec:
    hidden = expert_hidden if moe else swiglu_hidden
    return BlockSpec(dim, attn_width(dim, attn_ratio, cfg.head_dim), hidden(dim, mlp_ratio, cfg.multiple_of), moe)


def backbone_specs(cfg: ModelConfig) -> list[BlockSpec]:
    """Per-block widths of the backbone (ratios spread linearly over depth; MoE never in the last block)."""
    attn = _linspace(*cfg.attn_ratio, cfg.depth)
    mlp = _linspace(*cfg.mlp_ratio, cfg.depth)
    return [_spec(cfg, cfg.dim, attn[i], mlp[i], (i + 1) % cfg.experts_every_n == 0 and i < cfg.depth - 1)
            for i in range(cfg.depth)]


def mixer_specs(cfg: ModelConfig) -> list[BlockSpec]:
    """Per-block widths of the patch mixer (fixed ratios; MoE may sit in its last block)."""
    return [_spec(cfg, cfg.mixer_dim, cfg.mixer_attn_ratio, cfg.mixer_mlp_ratio, (i + 1) % cfg.experts_every_n == 0)
            for i in range(cfg.mixer_depth)]


def caption_hidden(cfg: ModelConfig) -> int:
    """SwiGLU hidden size of the caption transformer block (2816 for XL)."""
    return swiglu_hidden(cfg.dim, cfg.caption_mlp_ratio, cfg.multiple_of)


def tokens_per_expert(capacity: float, tokens: int, experts: int) -> int:
    """Expert-choice k: int(capacity x T / E), at most T."""
    return min(tokens, int(capacity * tokens / experts))


def kept_tokens(num_patches: int, mask_ratio: float) -> int:
    """Tokens left after masking: int(T x (1 - ratio))."""
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"mask_ratio={mask_ratio!r}: expected a value in [0, 1)")
    return int(num_patches * (1 - mask_ratio))


def _block_flops(cfg: ModelConfig, s: BlockSpec, tokens: int) -> float:
    """Forward matmul FLOPs of one block on `tokens` image tokens (caption K/V included)."""
    d, a, t, L = s.dim, s.attn_width, tokens, cfg.caption_len
    f = 2 * t * d * 3 * a + 2 * t * a * d  # qkv + out projection
    f += 2 * 2 * t * t * a  # q k^T and attn @ v
    f += 2 * t * d * d + 2 * L * d * 2 * d + 2 * t * d * d  # cross-attn q, kv (caption tokens), out
    f += 2 * 2 * t * L * d  # cross-attn scores and values
    if s.moe:
        k = tokens_per_expert(cfg.expert_capacity, t, cfg.num_experts)
        f += 2 * t * d * cfg.num_experts + cfg.num_experts * k * 2 * (2 * d * s.hidden)
    else:
        f += 3 * 2 * t * d * s.hidden
    f += 2 * cfg.dim * 6 * d  # adaLN
    return f


def flops_per_sample(cfg: ModelConfig, mask_ratio: float = 0.0) -> float:
    """Forward + backward (3x forward) matmul FLOPs of one sample, attention included, for MFU."""
    T = cfg.num_patches
    kept = kept_tokens(T, mask_ratio)
    D, L, p2c = cfg.dim, cfg.caption_len, cfg.patch_size ** 2 * cfg.in_channels
    f = 2 * T * p2c * D  # patch embed
    f += 2 * cfg.freq_dim * D + 2 * D * D  # timestep MLP
    f += 2 * L * cfg.caption_dim * D + 2 * L * D * D  # caption MLP
    h = caption_hidden(cfg)  # caption transformer block
    f += 2 * L * D * 3 * D + 2 * L * D * D + 2 * 2 * L * L * D + 3 * 2 * L * D * h
    f += 2 * 2 * D * D  # pooled caption MLP
    if cfg.mixer_dim != D:
        f += 2 * T * D * cfg.mixer_dim + 2 * L * D * cfg.mixer_dim + 2 * kept * cfg.mixer_dim * D
    f += sum(_block_flops(cfg, s, T) for s in mixer_specs(cfg))
    f += sum(_block_flops(cfg, s, kept) for s in backbone_specs(cfg))
    f += 2 * D * 2 * D + 2 * kept * D * p2c  # final layer adaLN and linear
    return 3.0 * f
