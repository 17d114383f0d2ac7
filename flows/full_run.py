"""The `microdit` flow, deployment `full-run`: download -> precompute -> stages -> sample -> evaluate -> diffusers
-> report.

The flow only sequences tasks (flows/tasks.py). Its parameter is the typed run plan (pipeline/core/plan), so the
Prefect UI shows a form for a run and validates it on arrival; without a plan it reads `recipe` + `overrides`.
Every task is cached on its plan section, inputs and code version, so a rerun skips what finished and
continues the step that was interrupted. `force` reruns finished steps: the named step's output is deleted and
its cache refreshed, and so is every step after it (their inputs changed even though their URIs did not).
"""
from __future__ import annotations

import os
from pathlib import Path

from prefect import flow, get_run_logger

from flows import tasks
from flows.caching import code_version
from pipeline.checks import check_run, load_run
from pipeline.core import lease, storage
from pipeline.core.layout import Layout
from pipeline.core.plan import RunConfig

FLOW = "microdit"
FULL_RUN = "full-run"
REPO = Path(__file__).resolve().parents[1]


def resolve_recipe(path: str) -> str:
    """The recipe file: as given (absolute or relative to the working directory), else relative to the repo."""
    for p in (Path(path), REPO / path):
        if p.is_file():
            return str(p.resolve())
    raise FileNotFoundError(f"recipe {path!r} not found in {os.getcwd()} or {REPO}")


def plan_of(plan: RunConfig | None, recipe: str, overrides: list[str] | None) -> RunConfig:
    """The run plan: the one given (already validated by Prefect; checked again here), else the recipe's."""
    if plan is not None:
        return check_run(RunConfig.model_validate(plan), "flow parameter `plan`")
    return load_run(resolve_recipe(recipe), overrides or [])


def run_owner() -> str:
    """This flow run, as a lease owner ("flow run <name> (<id>)")."""
    from prefect.runtime import flow_run

    return f"flow run {flow_run.name} ({flow_run.id})"


def expand_force(cfg: RunConfig, force: list[str] | None) -> set[str]:
    """The steps to rerun: each named step and every step after it ('all': every step)."""
    order = cfg.step_order()
    force = list(force or [])
    unknown = sorted(set(force) - set(order) - {"all"})
    if unknown:
        raise ValueError(f"cannot force unknown step(s) {unknown}; steps are {order} (or 'all')")
    if not force:
        return set()
    first = 0 if "all" in force else min(order.index(f) for f in force)
    return set(order[first:])


def ray_address_of(cfg: RunConfig) -> str | None:
    return cfg.ray_address or os.environ.get("RAY_ADDRESS") or None


def run_step(t, name: str, forced: set[str], clear: list[str], **kwargs):
    """Call task `t`; when forced, delete its outputs first and bypass (and refresh) its cache entry."""
    if name in forced:
        for uri in clear:
            storage.delete(uri)
        t = t.with_options(refresh_cache=True)
    return t(**kwargs)


def download_and_precompute(cfg: RunConfig, forced: set[str]) -> dict[str, str]:
    """Every source downloaded and encoded; returns source -> latents URI."""
    paths = Layout(cfg.storage)
    latents = {}
    for src in cfg.sources:
        shards = run_step(tasks.download_task, "download", forced, [paths.shards(src.name),
                                                                    paths.url_list(src.name)],
                          source=src, download=cfg.download, root=cfg.storage, code=code_version("download"),
                          progress_every=cfg.progress_every)
        latents[src.name] = run_step(
            tasks.precompute_task, "precompute", forced, [paths.latents(src.name)], source=src.name,
            shards_uri=shards, latents_uri=paths.latents(src.name), precompute=cfg.precompute,
            encoders=cfg.encoders, code=code_version("precompute"), ray_address=ray_address_of(cfg),
            progress_every=cfg.progress_every)
    return latents


def train(cfg: RunConfig, stage: str, latents: dict[str, str], forced: set[str], root: str | None = None,
          stage_plan=None) -> str:
    root = root or cfg.storage
    return run_step(tasks.train_task, stage, forced, [Layout(root).stage(stage)],
                    stage=stage_plan or cfg.stage(stage), model=cfg.model, encoders=cfg.encoders, root=root,
                    latents=latents, code=code_version("train"), ray_address=ray_address_of(cfg),
                    progress_every=cfg.progress_every)


def sample(cfg: RunConfig, export: str, out_uri: str, forced: set[str], name: str = "sample") -> str:
    return run_step(tasks.sample_task, name, forced, [out_uri], weights_uri=export,
                    prompts=list(cfg.sample.prompts), out_uri=out_uri, generate=cfg.sample.generate_config(),
                    code=code_version("sample"), progress_every=cfg.progress_every)


def evaluate(cfg: RunConfig, export: str, root: str, forced: set[str]) -> str:
    return run_step(tasks.evaluate_task, "evaluate", forced, [Layout(root).eval], weights_uri=export, root=root,
                    evaluate=cfg.evaluate, code=code_version("evaluate"), progress_every=cfg.progress_every)


@flow(name=FLOW, log_prints=True)
def full_run(plan: RunConfig | None = None, recipe: str = "recipes/tiny.yaml", overrides: list[str] | None = None,
             force: list[str] | None = None) -> dict[str, str]:
    """Run a plan end to end; returns the URIs of what each step wrote.

    plan: the whole run plan (validated on arrival); when absent, `recipe` + `overrides` make it.
    recipe: recipe YAML (absolute, relative to the serving directory, or to the repository).
    overrides: `path=value` changes to the recipe, e.g. `stages.stage1.steps=10` (see pipeline/core/plan/run.py).
    force: steps to rerun although finished (and every step after them): download, precompute, a stage
    name, sample, evaluate, report, or all.
    """
    log = get_run_logger()
    cfg = plan_of(plan, recipe, overrides)
    forced = expand_force(cfg, force)
    with lease.hold(cfg.storage, run_owner()):  # one run per storage root (pipeline/core/lease.py)
        return _full_run(cfg, forced, log)


def _full_run(cfg: RunConfig, forced: set[str], log) -> dict[str, str]:
    paths = Layout(cfg.storage)
    storage.write_json(paths.config, cfg.to_dict())
    log.info("run %r under %s; Ray at %s; forced steps: %s", cfg.name, cfg.storage,
             ray_address_of(cfg) or "a new local head", sorted(forced) or "none")

    out = {"config": paths.config}
    if cfg.estimate.enabled:  # the forecast first: what this run should take on `estimate.cluster`
        out["estimate"] = run_step(tasks.estimate_task, "estimate", forced, [paths.estimate_dir], plan=cfg,
                                   code=code_version("estimate"))
    latents = download_and_precompute(cfg, forced)
    out.update({f"latents/{k}": v for k, v in latents.items()})
    export = None
    for st in cfg.stages:
        export = out[f"export/{st.name}"] = train(cfg, st.name, latents, forced)
    final = paths.export(cfg.sample.stage) if cfg.sample.stage else export
    out["sample_grid"] = sample(cfg, final, paths.samples(), forced)
    if cfg.evaluate is not None:
        out["metrics"] = evaluate(cfg, final, cfg.storage, forced)
    if cfg.diffusers is not None:
        chosen = paths.export(cfg.diffusers.stage) if cfg.diffusers.stage else final
        out["diffusers"] = run_step(tasks.diffusers_task, "diffusers", forced, [paths.diffusers], export_uri=chosen,
                                    out_uri=paths.diffusers, diffusers=cfg.diffusers, code=code_version("diffusers"),
                                    upstream=[v for k, v in out.items() if k in ("sample_grid", "metrics")])
    upstream = [v for k, v in out.items() if k not in ("config", "estimate")]
    out["report"] = run_step(tasks.report_task, "report", forced, [paths.report_dir], root=cfg.storage,
                             report=cfg.report, upstream=upstream, code=code_version("report"))
    for key, uri in out.items():
        log.info("%-22s %s", key, uri)
    return out
