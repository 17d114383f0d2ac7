"""An objective as training uses it: `build(config)` turns an objective config (configs.py) into an object with
`loss`, and, for objectives whose unconditional caption is data (rectified flow: the empty prompt's embedding),
`bind`. Per-batch inputs beyond latents and captions (REPA's DINOv2 features) arrive as `extras`. Drawing is the
family's diffusers pipeline with the scheduler the objective implies (model/family.py `Drawing`).
"""
from __future__ import annotations

from typing import Mapping, Union

import torch
from torch import nn

from model.objectives.configs import EDMConfig, ObjectiveConfig, RectifiedFlowConfig
from model.objectives.edm import drop_captions, edm_loss
from model.objectives.rectified_flow import repa_loss, rf_loss
from model.objectives.rectified_flow import drop_captions as drop_to_uncond


class EDM:
    """EDM training with its constants (model/objectives/edm.py); drawn by EDM Heun (model/samplers/edm_heun.py)."""

    kind = "edm"

    def __init__(self, config: EDMConfig):
        self.config = config

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
        if extras:
            raise ValueError(f"EDM uses no per-batch extras; got {sorted(extras)}")
        caption = drop_captions(caption, self.config.caption_dropout, generator)
        return edm_loss(net, latents, caption, self.config, generator)[0]


class RectifiedFlow:
    """Rectified-flow training (logit-normal t, optional REPA; model/objectives/rectified_flow.py).

    The unconditional caption (E-MMDiT: the empty prompt's embedding, (L, D)) is data, not a constant: caption
    dropout needs it, so `bind(unconditional=...)` gives an objective that holds it (the trainer binds the one
    precompute wrote; the training-time sample grids guide with it too).
    """

    kind = "rectified_flow"
    REPA_FEATURES = "repa_features"  # extras key: DINOv2 patch features (N, T, Z) of the batch's images

    def __init__(self, config: RectifiedFlowConfig, unconditional: torch.Tensor | None = None):
        self.config = config
        self.unconditional = unconditional

    @property
    def repa_weight(self) -> float:
        return self.config.repa_weight

    def bind(self, unconditional: torch.Tensor | None = None) -> "RectifiedFlow":
        """The same objective holding the unconditional caption (L, D) or (1, L, D)."""
        if unconditional is not None and unconditional.ndim not in (2, 3):
            raise ValueError(f"unconditional caption shape {tuple(unconditional.shape)}: expected (L, D) or (1, L, D)")
        return RectifiedFlow(self.config, unconditional)

    def loss(self, net: nn.Module, latents: torch.Tensor, caption: torch.Tensor,
             generator: torch.Generator | None = None, extras: Mapping[str, torch.Tensor] | None = None
             ) -> torch.Tensor:
        """Caption dropout (to the bound unconditional caption), rectified-flow MSE, plus weight x REPA (scalar)."""
        if self.config.caption_dropout > 0:
            if self.unconditional is None:
                raise ValueError("rectified_flow with caption_dropout > 0 needs the unconditional caption "
                                 "(the empty prompt's embedding): bind(unconditional=...) first")
            caption = drop_to_uncond(caption, self.config.caption_dropout, generator,
                                     self.unconditional.to(caption.device))
        repa = self.repa_weight > 0
        if repa and (not extras or self.REPA_FEATURES not in extras):
            raise ValueError(f"objective.repa_weight={self.repa_weight} needs DINOv2 patch features per batch "
                             f"({self.REPA_FEATURES!r} in the batch extras), and none were given: precompute them "
                             "with `encoders.repa`, or set repa_weight: 0")
        loss, _, z = rf_loss(net, latents, caption, self.config, generator, return_repa=repa)
        if repa:
            loss = loss + self.repa_weight * repa_loss(z, extras[self.REPA_FEATURES].to(z.device))
        return loss


Objective = Union[EDM, RectifiedFlow]
KINDS = {"edm": EDM, "rectified_flow": RectifiedFlow}


def build(config: ObjectiveConfig) -> Objective:
    """The objective its config describes."""
    return KINDS[config.kind](config)
