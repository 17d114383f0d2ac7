"""Training objectives, one algorithm per file, and `build(spec)`: the objective a plan or an export names.

An objective turns (network, clean latents, caption states, generator) into a loss and owns its constants
(EDM's sigma_data, the training noise distribution, masking, caption dropout), so training and sampling read
them from one place: the `objective` dict that the plan holds and every export records. Objectives whose
unconditional caption is data (rectified flow: the empty prompt's embedding) take it through `bind`; per-batch
inputs beyond latents and captions (REPA's DINOv2 features) arrive as `extras`.
"""
from __future__ import annotations

from typing import Any, Mapping, Union

import torch
from torch import nn


class EDM:
    """EDM training and Heun sampling with one set of constants (model/objectives/edm.py)."""

    kind = "edm"

    def __init__(self, sigma_data: float = 0.9, p_mean: float = -0.6, p_std: float = 1.2, mask_ratio: float = 0.0,
                 caption_dropout: float = 0.0):
        from model.objectives.edm import EDMConfig

        self.config = EDMConfig(sigma_data=sigma_data, p_mean=p_mean, p_std=p_std)
        self.mask_ratio, self.caption_dropout = float(mask_ratio), float(caption_dropout)

    @property
    def sigma_data(self) -> float:
        return self.config.sigma_data

    def bind(self, unconditional: torch.Tensor | None = None) -> "EDM":
        """EDM's unconditional caption is zeros by construction: a non-zero one is refused."""
        if unconditional is not None and bool(unconditional.abs().sum() != 0):
            raise ValueError("EDM-trained networks take zeros as the unconditional caption")
        return self

    def loss(self, net: nn.Module, latents: torch.Tensor, caption: torch.Tensor,
             generator: torch.Generator | None = None, extras: Mapping[str, torch.Tensor] | None = None
             ) -> torch.Tensor:
        """Caption dropout (zeros: the unconditional input), then the weighted, masked EDM loss (scalar)."""
        from model.objectives.edm import drop_captions, edm_loss

        if extras:
            raise ValueError(f"EDM uses no per-batch extras; got {sorted(extras)}")
        caption = drop_captions(caption, self.caption_dropout, generator)
        return edm_loss(net, latents, caption, self.config, self.mask_ratio, generator)[0]

    @torch.no_grad()
    def sample(self, net: nn.Module, noise: torch.Tensor, caption: torch.Tensor, *, steps: int,
               guidance: float | None, unconditional: torch.Tensor | None = None) -> torch.Tensor:
        """Latents from standard normal noise by EDM Heun with CFG (the unconditional caption is zeros)."""
        from model.samplers.heun import HeunSampler

        if unconditional is not None and bool(unconditional.abs().sum() != 0):
            raise ValueError("EDM-trained networks take zeros as the unconditional caption")
        return HeunSampler(steps=steps).sample(net, noise, caption, guidance=guidance, sigma_data=self.sigma_data)


class RectifiedFlow:
    """Rectified-flow training (logit-normal t, optional REPA) and Euler sampling (model/objectives/rectified_flow.py).

    The unconditional caption (E-MMDiT: the empty prompt's embedding, (L, D)) is data, not a constant: caption
    dropout and guidance need it, so `bind(unconditional=...)` gives an objective that holds it (the trainer binds
    the one precompute wrote; generate the one its text encoder makes).
    """

    kind = "rectified_flow"
    REPA_FEATURES = "repa_features"  # extras key: DINOv2 patch features (N, T, Z) of the batch's images

    def __init__(self, logit_mean: float = 0.0, logit_std: float = 1.0, caption_dropout: float = 0.0,
                 repa_weight: float = 0.0, unconditional: torch.Tensor | None = None):
        from model.objectives.rectified_flow import RectifiedFlowConfig

        self.config = RectifiedFlowConfig(logit_mean=logit_mean, logit_std=logit_std, repa_weight=repa_weight)
        if not 0.0 <= caption_dropout <= 1.0:
            raise ValueError(f"caption_dropout must be in [0, 1], got {caption_dropout}")
        self.caption_dropout = float(caption_dropout)
        self.unconditional = unconditional

    @property
    def repa_weight(self) -> float:
        return self.config.repa_weight

    def bind(self, unconditional: torch.Tensor | None = None) -> "RectifiedFlow":
        """The same objective holding the unconditional caption (L, D) or (1, L, D)."""
        if unconditional is not None and unconditional.ndim not in (2, 3):
            raise ValueError(f"unconditional caption shape {tuple(unconditional.shape)}: expected (L, D) or (1, L, D)")
        c = self.config
        return RectifiedFlow(c.logit_mean, c.logit_std, self.caption_dropout, c.repa_weight, unconditional)

    def loss(self, net: nn.Module, latents: torch.Tensor, caption: torch.Tensor,
             generator: torch.Generator | None = None, extras: Mapping[str, torch.Tensor] | None = None
             ) -> torch.Tensor:
        """Caption dropout (to the bound unconditional caption), rectified-flow MSE, plus weight x REPA (scalar)."""
        from model.objectives.rectified_flow import drop_captions, repa_loss, rf_loss

        if self.caption_dropout > 0:
            if self.unconditional is None:
                raise ValueError("rectified_flow with caption_dropout > 0 needs the unconditional caption "
                                 "(the empty prompt's embedding): bind(unconditional=...) first")
            caption = drop_captions(caption, self.caption_dropout, generator, self.unconditional.to(caption.device))
        repa = self.repa_weight > 0
        if repa and (not extras or self.REPA_FEATURES not in extras):
            raise ValueError(f"objective.repa_weight={self.repa_weight} needs DINOv2 patch features per batch "
                             f"({self.REPA_FEATURES!r} in the batch extras), and none were given: precompute does "
                             "not write them yet; set repa_weight: 0")
        loss, _, z = rf_loss(net, latents, caption, self.config, generator, return_repa=repa)
        if repa:
            loss = loss + self.repa_weight * repa_loss(z, extras[self.REPA_FEATURES].to(z.device))
        return loss

    @torch.no_grad()
    def sample(self, net: nn.Module, noise: torch.Tensor, caption: torch.Tensor, *, steps: int,
               guidance: float | None, unconditional: torch.Tensor | None = None) -> torch.Tensor:
        """Latents from standard normal noise by flow-matching Euler with CFG against the unconditional caption."""
        from model.samplers.euler import EulerSampler

        uncond = unconditional if unconditional is not None else self.unconditional
        if guidance is not None and uncond is None:
            raise ValueError("rectified_flow guidance needs the unconditional caption (the empty prompt's "
                             "embedding): pass unconditional= or bind(unconditional=...)")
        uncond = uncond.to(caption.device) if uncond is not None else None
        return EulerSampler(steps=steps).sample(net, noise, caption, guidance=guidance, uncond=uncond)


Objective = Union[EDM, RectifiedFlow]
KINDS = {"edm": EDM, "rectified_flow": RectifiedFlow}


def build(spec: Mapping[str, Any]) -> Objective:
    """The objective described by `spec` ({"kind": ..., constants...}); ValueError on an unknown kind or key."""
    spec = dict(spec)
    kind = spec.pop("kind", None)
    if kind not in KINDS:
        raise ValueError(f"unknown objective kind {kind!r}; expected one of {sorted(KINDS)}")
    try:
        return KINDS[kind](**spec)
    except TypeError as e:
        raise ValueError(f"objective {kind!r}: {e}") from None
