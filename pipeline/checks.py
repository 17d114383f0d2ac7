"""The edge check of a run plan: what needs the model families and dataset adapters to validate.

`load_run` = read + validate the recipe (pipeline/core/plan) + these checks, so a bad family, preset, model
override, objective or source option fails when the recipe is read, before any step starts.
"""
from __future__ import annotations

import os

from model import family as families
from pipeline.core.plan import PlanError, RunConfig, load_recipe
from pipeline.data import sources
from pipeline.planner.clusters import parse_cluster


def check_run(cfg: RunConfig, where: str = "recipe") -> RunConfig:
    """Check the plan against the model family and the source adapters; PlanError naming what is wrong."""
    errors = []
    try:
        fam = families.get(cfg.model.family)
        fam.config(cfg.model.preset, **cfg.model.overrides())
        for st in cfg.stages:
            if st.objective.kind not in fam.objectives:
                errors.append(f"stages.{st.name}.objective.kind = {st.objective.kind!r}: the {fam.name} family "
                              f"trains with {list(fam.objectives)}")
    except ValueError as e:
        errors.append(f"model: {e}")
    repa = [st.name for st in cfg.stages if getattr(st.objective, "repa_weight", 0) > 0]
    if repa and cfg.encoders.repa is None:  # precompute would write no features for them to align with
        errors.append(f"stages {repa} train with REPA (objective.repa_weight > 0) but encoders.repa is not set: "
                      "name the feature encoder (e.g. dinov2-base) so precompute writes repa_features")
    try:
        parse_cluster(cfg.estimate.cluster)
    except ValueError as e:
        errors.append(f"estimate.cluster: {e}")
    for src in cfg.sources:
        try:
            sources.get(src.kind).build(src.options)
        except (ValueError, TypeError) as e:
            errors.append(f"sources.{src.name}: {e}")
    if errors:
        raise PlanError("\n".join(f"{where}: {e}" for e in errors))
    return cfg


def load_run(path: str | os.PathLike, overrides: list[str] | tuple[str, ...] = (),
             storage_base: str | None = None) -> RunConfig:
    """A recipe read, validated and checked: the plan every entry point (CLI, flows) starts from."""
    return check_run(load_recipe(path, overrides, storage_base), str(path))
