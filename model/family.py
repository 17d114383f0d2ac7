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
    import torch
    from torch import nn

# The family of a plan or an export that names none (every export written before families existed).
DEFAULT = "microdit"
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
class Drawing:
    """How a family draws as a diffusers pipeline (model/pipelines/): its classes as "module:attribute" (imported
    when first drawn with) and its scheduler, made from the export's objective config."""

    transformer: str  # the network as a diffusers ModelMixin (model/<family>/transformer.py)
    pipeline: str  # its DiffusionPipeline (model/pipelines/<family>.py)
    scheduler: Callable[[Any], Any]  # objective config -> a diffusers scheduler

    def transformer_class(self) -> type:
        return load_attribute(self.transformer)

    def pipeline_class(self) -> type:
        return load_attribute(self.pipeline)


@dataclass(frozen=True)
class Variant:
    """One released file: its network (preset + overrides), encoders, objective, sampler and published scores."""

    name: str
    file: str
    preset: str
    overrides: dict[str, Any]
    encoders: dict[str, str]
    objective: dict[str, Any]
    sampler: dict[str, Any]
    scores: dict[str, float]
    note: str = ""


@dataclass(frozen=True)
class ReleaseFormat:
    """How one family's release names and stores its tensors (see the module docstring)."""

    family: str
    repo: str  # where the files are published
    variants: dict[str, Variant]
    to_ours: Callable[[str], str | None]  # release key -> our key; None: not a tensor of this layout
    to_release: Callable[[str], str]  # our key -> release key
    # Release-only buffers our network rebuilds from its config: name -> config -> the release's tensor.
    buffers: dict[str, Callable[[Any], "torch.Tensor"]] = field(default_factory=dict)
    # Release-only buffers whose values must equal the rebuilt ones (a file of another resolution differs).
    checked_buffers: tuple[str, ...] = ()
    dropped: tuple[str, ...] = ()  # key prefixes of training-only tensors dropped on import
    signature: str = ""  # a key prefix only this family's release has (names the family of a foreign file)
    license: str = "other"  # the release's licence as the Hub names it ("other": see the release's own terms)

    # The family's network, as the release's variants name it (preset + overrides).
    def config(self, preset: str, overrides: dict) -> Any:
        return get(self.family).config(preset, **overrides)

    def build(self, cfg: Any) -> "nn.Module":
        return get(self.family).build(cfg)

    def config_to_dict(self, cfg: Any) -> dict:
        return get(self.family).config_to_dict(cfg)

    def config_from_dict(self, data: dict) -> Any:
        return get(self.family).config_from_dict(data)


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
    drawing: Drawing
    release: ReleaseFormat | None = None  # its public checkpoints (model/<family>/release.py), if any
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


def load_attribute(spec: str) -> Any:
    """The attribute a "module:attribute" spec names (imported on demand)."""
    module, attr = spec.split(":")
    return getattr(importlib.import_module(module), attr)


def get(name: str) -> Family:
    """The family called `name`; ValueError naming the known ones otherwise."""
    if name not in REGISTRY:
        raise ValueError(f"unknown model family {name!r}; expected one of {sorted(REGISTRY)}")
    return load_attribute(REGISTRY[name])
