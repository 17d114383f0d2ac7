"""The network a training stage builds: the plan's preset and overrides, fitted to the data's latent side and the
stage's position scale, with REPA's projector when the stage aligns with REPA features. Training (stage.py) and the
planner (pipeline/planner/) build it from here."""
from __future__ import annotations

import dataclasses

from model import family as families
from pipeline.core.plan import ModelSection, StageConfig


def stage_model_config(model: ModelSection, stage: StageConfig, latent_shape, caption_shape):
    """(family, network config) for this stage: the preset with the recipe's overrides, fitted to the data
    (latent side) and to the stage (positions scaled by resolution / base_resolution)."""
    fam = families.get(model.family)
    base = fam.config(model.preset, **model.overrides())
    cfg = fam.fit(base, latent_shape, caption_shape, stage.pos_interp_scale)
    if uses_repa(stage):  # the training-only projector exists only in stages that align with REPA features
        if not hasattr(cfg, "repa"):
            raise ValueError(f"stage {stage.name!r}: objective.repa_weight > 0, but the {fam.name} network has no "
                             "REPA projector")
        cfg = dataclasses.replace(cfg, repa=True)
    return fam, cfg


def uses_repa(stage: StageConfig) -> bool:
    """True when the stage's objective aligns the network with REPA features (repa_weight > 0)."""
    return getattr(stage.objective, "repa_weight", 0) > 0


def repa_target(model_cfg) -> tuple[int, int]:
    """(tokens, width) the REPA features must have: the network's group-1 image tokens x projector output."""
    return model_cfg.num_patches, model_cfg.repa_dim
