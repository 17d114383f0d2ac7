"""The `microdit` flow's `compare` deployment: one stage trained with and without masking at equal compute.

From a finished run's cached latents (nothing is downloaded or encoded again), pipeline/report/compare.py's
`equal_compute_plan` gives each arm (mask 0.75, mask 0) its steps for the same training FLOPs; each arm is its
own subflow run (named after the arm, so the Prefect UI shows two flows) that trains, samples and evaluates under
{storage}/compare/{arm}/; then `compare_report` writes {storage}/compare/report/compare.md side by side.
Both arms start from scratch whatever the recipe's `init` says: the arm roots hold no earlier stage to start
from, and from scratch the comparison measures masking alone.
"""
from __future__ import annotations

from prefect import flow, get_run_logger

from flows.full_run import FLOW, evaluate, plan_of, run_owner, sample, train
from flows.stage import cached_latents
from model import family as families
from pipeline.core import lease
from pipeline.core.layout import Layout
from pipeline.core.plan import InitConfig, RunConfig, StageConfig
from pipeline.report.compare import compare_report, equal_compute_plan
from pipeline.train.data import source_shapes

COMPARE = "compare"


def compare_root(cfg: RunConfig, *parts: str) -> str:
    return Layout(cfg.storage).uri("compare", *parts)


@flow(name="microdit-compare-arm", flow_run_name="arm-{name}", log_prints=True)
def compare_arm(name: str, stage: StageConfig, plan: RunConfig, latents: dict[str, str],
                restart: bool = True) -> str:
    """Train, sample and evaluate one arm under its own root; returns that root."""
    root = compare_root(plan, name)
    forced = {stage.name, "sample", "evaluate"} if restart else set()
    export = train(plan, stage.name, latents, forced, root=root, stage_plan=stage)
    sample(plan, export, Layout(root).samples(), forced)
    if plan.evaluate is not None:
        evaluate(plan, export, root, forced)
    return root


@flow(name=FLOW, log_prints=True)
def compare_run(plan: RunConfig | None = None, recipe: str = "recipes/tiny.yaml", overrides: list[str] | None = None,
                stage: str = "stage1", budget_flops: float | None = None, restart: bool = True) -> dict[str, str]:
    """Train `stage` masked and unmasked at the same FLOPs from cached latents; returns the report's URIs.

    budget_flops: None -> what the plan's stage costs at its own steps and mask ratio.
    restart: retrain both arms (false: resume each from its checkpoints, or reuse its export).
    """
    log = get_run_logger()
    cfg = plan_of(plan, recipe, overrides)
    base = cfg.stage(stage).model_copy(update={"init": InitConfig()})  # scratch: see the module docstring
    latents = cached_latents(cfg)
    latent_shape, _ = source_shapes(next(iter(latents.values())), base.data.resolution)  # (C, H, W)
    model_cfg = families.get(cfg.model.family).config(cfg.model.preset, **cfg.model.overrides())
    arms = equal_compute_plan(model_cfg, base, budget_flops, downsample=base.data.resolution // latent_shape[-1])
    for arm in arms:
        log.info("arm %s: mask %.2f, %d steps, %.4g FLOPs", arm.name, arm.stage.objective.mask_ratio,
                 arm.stage.steps, arm.flops)
    with lease.hold(cfg.storage, run_owner()):  # one run per storage root (pipeline/core/lease.py)
        roots = [compare_arm(arm.name, arm.stage, cfg, latents, restart) for arm in arms]
        report = compare_report(roots[0], roots[1], compare_root(cfg, "report"), [a.name for a in arms])
    log.info("comparison report %s", report)
    return {**{a.name: r for a, r in zip(arms, roots, strict=True)}, "report": report}
