"""Model families: what the pipeline asks of a network family instead of branching on its name.

A family bundles its network builder and presets, the training objectives it supports (with its default),
its sampler defaults, and the latent and text specs of the encoders it was designed for. The pipeline looks a
family up by the name in the plan (`model.family`) and an export records it, so generate and evaluate rebuild
the same network, objective and sampler from the export alone.
"""
from __future__ import annotations

import dataclasses
import importlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Literal

if TYPE_CHECKING:  # annotations only: the registry is read by light callers (the CLI) without importing torch
    from torch import nn

# name -> "module:attribute" of its Family; imported on first use, so using one family never imports another.
REGISTRY = {
    "microdit": "model.microdit.family:FAMILY",
    "emmdit": "model.emmdit.family:FAMILY",
}


@dataclass(frozen=True)
class LatentSpec:
    """The VAE a family's latents come from: id, channels, downsampling, scaling, and how it encodes."""

    vae: str
    channels: int
    downsample: int
    scaling_factor: float | None  # None: read from the VAE's config
    shift: float = 0.0
    encode: Literal["sample", "mode"] = "sample"  # a posterior sample (SDXL VAE) or deterministic (DC-AE)


@dataclass(frozen=True)
class TextSpec:
    """The text encoder: id, tokens kept, state width, padding rule, and the unconditional input for CFG."""

    encoder: str
    tokens: int
    width: int
    padding: str
    unconditional: Literal["zeros", "empty_prompt"] = "zeros"


@dataclass(frozen=True)
class SamplerDefaults:
    """The family's recipe for drawing: sampler, steps and guidance."""

    kind: str
    steps: int
    guidance: float


@dataclass(frozen=True)
class Family:
    """One model family (see the module docstring); every callable takes or returns the family's config."""

    name: str
    title: str
    config_class: type
    presets: dict[str, Any]
    build: Callable[[Any], nn.Module]
    flops_per_sample: Callable[[Any, Any], float]  # (config, objective config) -> training FLOPs per sample
    shard_units: Callable[[nn.Module], list[nn.Module]]  # blocks that FSDP shards, AC and compile wrap one by one
    fit: Callable[[Any, tuple, tuple, float], Any]  # (config, latent (C,H,W), caption (L,D), pos scale) -> config
    objectives: tuple[str, ...]
    latent: LatentSpec
    text: TextSpec
    sampler: SamplerDefaults
    notes: dict[str, Any] = field(default_factory=dict)

    def config(self, preset: str, **overrides) -> Any:
        """A preset with fields replaced; an unknown preset, field or a wrongly typed value -> ValueError."""
        if preset not in self.presets:
            raise ValueError(f"unknown {self.name} preset {preset!r}; expected one of {sorted(self.presets)}")
        base = self.presets[preset]
        fields = {f.name: getattr(base, f.name) for f in dataclasses.fields(base)}
        unknown = sorted(set(overrides) - set(fields))
        if unknown:
            raise ValueError(f"unknown {self.config_class.__name__} key(s) {unknown}; allowed: {sorted(fields)}")
        for key, value in overrides.items():
            _check_type(f"model.{key}", value, fields[key])
        try:
            return dataclasses.replace(base, **overrides)
        except TypeError as e:
            raise ValueError(f"model overrides {overrides}: {e}") from None

    def config_from_dict(self, data: dict[str, Any]) -> Any:
        """The config recorded in an export or checkpoint (every field present)."""
        names = {f.name for f in dataclasses.fields(self.config_class)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown {self.config_class.__name__} key(s) {unknown}; allowed: {sorted(names)}")
        return self.config_class(**data)

    @staticmethod
    def config_to_dict(cfg: Any) -> dict[str, Any]:
        """JSON-ready dict of a config (tuples as lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(cfg).items()}


def latent_side(cfg: Any, latent_shape, caption_shape, family: str) -> int:
    """The square latent side of data (C, H, W) + captions (L, D) that a config with in_channels, caption_len and
    caption_dim takes; ValueError naming the mismatch."""
    c, h, w = latent_shape
    if h != w:
        raise ValueError(f"latents are {h}x{w}; {family} expects square latents")
    if c != cfg.in_channels:
        raise ValueError(f"latents have {c} channels, the model expects in_channels={cfg.in_channels}")
    if tuple(caption_shape) != (cfg.caption_len, cfg.caption_dim):
        raise ValueError(f"caption states are {tuple(caption_shape)}, the model expects "
                         f"(caption_len, caption_dim) = ({cfg.caption_len}, {cfg.caption_dim})")
    return h


def _check_type(key: str, value: Any, default: Any) -> None:
    ok = (isinstance(value, bool) if isinstance(default, bool)
          else isinstance(value, int) and not isinstance(value, bool) if isinstance(default, int)
          else isinstance(value, (int, float)) and not isinstance(value, bool) if isinstance(default, float)
          else isinstance(value, (list, tuple)) if isinstance(default, tuple)
          else isinstance(value, type(default)) if default is not None else True)
    if not ok:
        raise ValueError(f"{key} = {value!r}: expected a {type(default).__name__} like the preset's {default!r}")


def get(name: str) -> Family:
    """The family called `name`; ValueError naming the known ones otherwise."""
    if name not in REGISTRY:
        raise ValueError(f"unknown model family {name!r}; expected one of {sorted(REGISTRY)}")
    module, attr = REGISTRY[name].split(":")
    return getattr(importlib.import_module(module), attr)
