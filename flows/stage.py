"""The `microdit` flow's second deployment, `stage`: rerun one training stage from an earlier run's latents.

It reads the latents (and, for stages that start from another stage, that stage's export) already under the
plan's storage root; nothing is downloaded or encoded again. With `restart` the stage's checkpoints are
deleted and it trains from its start; without, it continues from its last checkpoint (or returns at once if
it finished). Then it draws the plan's sample grid from the new export under {root}/samples/{stage}/.
Stages after it are not touched: `full-run` with `force: [<stage>]` retrains them too.
"""
from __future__ import annotations

from prefect import flow, get_run_logger

from flows.full_run import FLOW, plan_of, run_owner, sample, train
from pipeline.core import layout, lease, storage
from pipeline.core.layout import Layout
from pipeline.core.plan import RunConfig

STAGE = "stage"


def cached_latents(cfg: RunConfig) -> dict[str, str]:
    """source -> latents URI for every source of the plan; FileNotFoundError if one was not precomputed."""
    latents = {}
    for src in cfg.sources:
        uri = Layout(cfg.storage).latents(src.name)
        if not layout.is_complete(uri):
            raise FileNotFoundError(f"no finished latents for source {src.name!r} at {uri!r} (no {layout.MARKER}); "
                                    "run microdit/full-run first")
        latents[src.name] = uri
    return latents


@flow(name=FLOW, log_prints=True)
def stage_run(stage: str = "stage1", plan: RunConfig | None = None, recipe: str = "recipes/tiny.yaml",
              overrides: list[str] | None = None, restart: bool = True) -> dict[str, str]:
    """Retrain one stage from cached latents; returns its export URI and its sample grid.

    stage: the stage's name in the plan (e.g. stage2).
    plan, recipe, overrides: as for full-run; the same storage root must hold the earlier run's latents.
    restart: delete the stage's checkpoints and train it from its start (false: resume or return).
    """
    log = get_run_logger()
    cfg = plan_of(plan, recipe, overrides)
    paths = Layout(cfg.storage)
    cfg.stage(stage)  # unknown stage -> ValueError naming the plan's stages
    latents = cached_latents(cfg)
    forced = {stage, f"sample-{stage}"} if restart else set()
    log.info("stage %s of %r from latents %s (%s)", stage, cfg.name, latents, "restart" if restart else "resume")
    with lease.hold(cfg.storage, run_owner()):  # one run per storage root (pipeline/core/lease.py)
        export = train(cfg, stage, latents, forced)
        grid = sample(cfg, export, paths.samples(stage), forced, name=f"sample-{stage}")
        storage.write_json(paths.stage_plan(stage), cfg.to_dict())
    log.info("export %s; sample grid %s", export, grid)
    return {"export": export, "sample_grid": grid}
