"""The training objectives' configs: the one home of each objective's constants and their defaults.

Plain dataclasses without torch, so the run plan (pipeline/core/plan) makes its `objective` section from them
without importing the algorithms: a step's cache key (flows/caching.py) then changes with an objective's
constants, not with its code. The algorithms that take them are edm.py and rectified_flow.py.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal, Mapping, Union


@dataclass(frozen=True)
class EDMConfig:
    """EDM as MicroDiT trains it, the one home of its constants (docs/RECIPE.md "Diffusion"): data std, the
    log-normal training noise ln(sigma) ~ N(p_mean, p_std^2), patch masking, and caption dropout (the
    unconditional input, zeros, for classifier-free guidance). The plan's `objective` section is made from it."""

    kind: Literal["edm"] = "edm"
    sigma_data: float = 0.9
    p_mean: float = -0.6  # the 256-px stages; (0.0, 0.6) at 512 px
    p_std: float = 1.2
    mask_ratio: float = 0.0  # patches dropped after the mixer (0.75 in MicroDiT's masked stages)
    caption_dropout: float = 0.1

    def __post_init__(self) -> None:
        checks = {"sigma_data": self.sigma_data > 0, "p_std": self.p_std > 0,
                  "mask_ratio": 0 <= self.mask_ratio < 1, "caption_dropout": 0 <= self.caption_dropout <= 1}
        bad = [k for k, ok in checks.items() if not ok]
        if bad:
            raise ValueError(f"EDMConfig: {', '.join(f'{k}={getattr(self, k)!r}' for k in bad)} out of range "
                             "(sigma_data > 0, p_std > 0, 0 <= mask_ratio < 1, 0 <= caption_dropout <= 1)")


@dataclass(frozen=True)
class RectifiedFlowConfig:
    """Rectified flow as E-MMDiT trains it, the one home of its constants: the logit-normal time density,
    caption dropout (to the empty prompt's embedding) and the REPA loss weight (> 0: align the group-1 tokens
    with DINOv2 patch features, stage 1 of the paper). The plan's `objective` section is made from it."""

    kind: Literal["rectified_flow"] = "rectified_flow"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    caption_dropout: float = 0.1
    repa_weight: float = 0.0

    def __post_init__(self) -> None:
        checks = {"logit_std": self.logit_std > 0, "caption_dropout": 0 <= self.caption_dropout <= 1,
                  "repa_weight": self.repa_weight >= 0}
        bad = [k for k, ok in checks.items() if not ok]
        if bad:
            raise ValueError(f"RectifiedFlowConfig: {', '.join(f'{k}={getattr(self, k)!r}' for k in bad)} out of "
                             "range (logit_std > 0, 0 <= caption_dropout <= 1, repa_weight >= 0)")


ObjectiveConfig = Union[EDMConfig, RectifiedFlowConfig]
CONFIGS: dict[str, type] = {"edm": EDMConfig, "rectified_flow": RectifiedFlowConfig}


def config_from_dict(spec: Mapping[str, Any]) -> ObjectiveConfig:
    """The objective config a plan or an export records ({"kind": ..., constants...}); missing constants take the
    config's defaults; ValueError on an unknown kind or key."""
    kind = spec.get("kind")
    if kind not in CONFIGS:
        raise ValueError(f"unknown objective kind {kind!r}; expected one of {sorted(CONFIGS)}")
    cls = CONFIGS[kind]
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(spec) - set(names))
    if unknown:
        raise ValueError(f"objective {kind!r}: unknown key(s) {unknown}; allowed: {names}")
    return cls(**spec)
