"""The `microdit` flow's `compare` deployment: one stage trained with and without masking at equal compute.

From a finished run's cached latents (nothing is downloaded or encoded again), pipeline/report/compare.py's
`equal_compute_plan` gives each arm (mask 0.75, mask 0) its steps for the same training FLOPs; each arm is its
own subflow run (named after the arm, so the Prefect UI shows two flows) that trains, samples and evaluates under
{storage}/compare/{arm}/; then `compare_report` writes {storage}/compare/report/compare.md side by side.
Both arms start from scratch whatever the recipe's `init` says: the arm roots hold no earlier stage to start
from, and from scratch the comparison measures masking alone.
"""
from __future__ import annotations

import dataclasses

from prefect import flow, get_run_logger

from flows import tasks
from flows.caching import code_version
from flows.full_run import FLOW, ray_address_of, resolve_recipe, run_step
from flows.stage import cached_latents
from pipeline.core import storage
from pipeline.report.compare import compare_report, equal_compute_plan
from pipeline.core.run_config import RunConfig, load_recipe
from pipeline.train.config import InitConfig
from pipeline.train.data import source_shapes

COMPARE = "compare"


def compare_root(cfg: RunConfig, *parts: str) -> str:
    return cfg.uri("compare", *parts)


@flow(name="microdit-compare-arm", flow_run_name="arm-{name}", log_prints=True)
def compare_arm(name: str, stage: dict, recipe: str, overrides: list[str], latents: dict[str, str],
                restart: bool = True) -> str:
    """Train, sample and evaluate one arm under its own root; returns that root."""
    cfg = load_recipe(resolve_recipe(recipe), overrides)
    root = compare_root(cfg, name)
    forced = {"train", "sample", "evaluate"} if restart else set()
    export = run_step(tasks.train_task, "train", forced, [root], stage=stage, model=dict(cfg.model), root=root,
                      latents=latents, vae=cfg.encoders.vae, text=cfg.encoders.text, code=code_version("train"),
                      ray_address=ray_address_of(cfg))
    run_step(tasks.sample_task, "sample", forced, [], weights_uri=export, prompts=list(cfg.sample.prompts),
             out_uri=storage.join(root, "samples"), generate=cfg.sample.generate_dict(), vae=cfg.encoders.vae,
             text=cfg.encoders.text, code=code_version("sample"))
    if cfg.evaluate is not None:
        run_step(tasks.evaluate_task, "evaluate", forced, [], weights_uri=export, root=root,
                 evaluate=tasks.plain(cfg.evaluate), vae=cfg.encoders.vae, text=cfg.encoders.text,
                 code=code_version("evaluate"))
    return root


@flow(name=FLOW, log_prints=True)
def compare_run(recipe: str = "recipes/tiny.yaml", overrides: list[str] | None = None, stage: str = "stage1",
                budget_flops: float | None = None, restart: bool = True) -> dict[str, str]:
    """Train `stage` masked and unmasked at the same FLOPs from cached latents; returns the report's URIs.

    budget_flops: None -> what the recipe's stage costs at its own steps and mask ratio.
    restart: retrain both arms (false: resume each from its checkpoints, or reuse its export).
    """
    log = get_run_logger()
    overrides = list(overrides or [])
    cfg = load_recipe(resolve_recipe(recipe), overrides)
    base = dataclasses.replace(cfg.stage(stage), init=InitConfig())  # scratch: see the module docstring
    latents = cached_latents(cfg)
    latent_shape, _ = source_shapes(next(iter(latents.values())), base.resolution)  # (C, H, W)
    arms = equal_compute_plan(cfg.model_config(), base, budget_flops, downsample=base.resolution // latent_shape[-1])
    for arm in arms:
        log.info("arm %s: mask %.2f, %d steps, %.4g FLOPs", arm.name, arm.stage.mask_ratio, arm.stage.steps, arm.flops)
    roots = [compare_arm(arm.name, tasks.plain(arm.stage), resolve_recipe(recipe), overrides, latents, restart)
             for arm in arms]
    report = compare_report(roots[0], roots[1], compare_root(cfg, "report"), [a.name for a in arms])
    log.info("comparison report %s", report)
    return {**{a.name: r for a, r in zip(arms, roots, strict=True)}, "report": report}
