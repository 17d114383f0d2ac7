"""Prefect tasks: a few typed lines around each pipeline step; they take plan sections and URIs, return URIs.

Caching (docs/ENVIRONMENT.md): the cache key is the task's inputs (plan sections, input/output URIs and the step's
`code` version from flows/caching.py, the import closure of the step) plus the task body, never the run id;
results are persisted as JSON (URIs and small dicts: a cache hit never unpickles anything from storage), so a
finished step is a cache hit in any later run. `ray_address` and `progress_every` are left out of the key: the
same step on another cluster, or watched more often, writes the same output. Below Prefect, every step is
idempotent on its own markers, so a step interrupted half-way continues from what it committed when its task runs
again. Each task hands its step a progress sink (flows/progress_sinks.py): the flow run page shows a progress
artifact per step and, at its end, a table of its figures.
"""
from __future__ import annotations

import os

from prefect import task
from prefect.cache_policies import INPUTS, TASK_SOURCE

from flows.progress_sinks import plan_artifact, report_artifacts, task_sink
from pipeline.core.layout import Layout
from pipeline.core.progress import DEFAULT_EVERY
from pipeline.core.plan import (DiffusersConfig, DownloadConfig, EncodersConfig, EvalConfig, GenerateConfig,
                                ModelSection, PrecomputeConfig, PlanError, ReportConfig, RunConfig, SourceConfig,
                                StageConfig)

# Each task imports its step when it runs: the deployment server (`microdit up`, flows/serve.py) imports this module
# and then waits, and a step's modules bring torch, Ray Data or the encoders with them.
STEP_CACHE = (INPUTS - "ray_address" - "progress_every") + TASK_SOURCE
BAD_INPUT = (ValueError, TypeError, KeyError, FileNotFoundError, PlanError)


def retry_unless_bad_input(task, task_run, state) -> bool:
    """Retry transient failures (network, a lost Ray node), never bad config or missing inputs."""
    exc = state.data if isinstance(state.data, BaseException) else None
    if exc is None:
        try:
            exc = state.result(raise_on_failure=False)
        except Exception:  # the state carries no readable result: be conservative and retry
            return True
    return not isinstance(exc, BAD_INPUT)


_STEP = dict(cache_policy=STEP_CACHE, persist_result=True, result_serializer="json", log_prints=True)
_RETRY = dict(retries=2, retry_delay_seconds=15, retry_condition_fn=retry_unless_bad_input)


@task(name="download", task_run_name="download-{source.name}", **_STEP, **_RETRY)
def download_task(source: SourceConfig, download: DownloadConfig, root: str, code: str,
                  progress_every: float = DEFAULT_EVERY) -> str:
    """Fetch one source into webdataset shards (adapter -> URL list -> img2dataset, or adapter -> shards)."""
    from pipeline.data import sources
    from pipeline.data.download import download as run_download

    paths = Layout(root)
    spec = sources.get(source.kind)
    cfg = spec.build(source.options)
    with spec.open(cfg, paths.raw(source.name)) as cfg:  # e.g. the synthetic demo's loopback server
        if spec.output == "shards":
            spec.run(cfg, paths.shards(source.name))
        else:
            spec.run(cfg, paths.url_list(source.name))
            run_download(paths.url_list(source.name), paths.shards(source.name), download,
                         progress=task_sink(progress_every), step=f"download-{source.name}")
    return paths.shards(source.name)


@task(name="precompute", task_run_name="precompute-{source}", **_STEP, **_RETRY)
def precompute_task(source: str, shards_uri: str, latents_uri: str, precompute: PrecomputeConfig,
                    encoders: EncodersConfig, code: str, ray_address: str | None = None,
                    progress_every: float = DEFAULT_EVERY) -> str:
    """Encode one source's shards into latent Parquet parts on the Ray cluster."""
    from pipeline.data.precompute import precompute as run_precompute

    run_precompute(shards_uri, latents_uri, precompute.for_source(source, encoders), ray_address,
                   progress=task_sink(progress_every), step=f"precompute-{source}")
    return latents_uri


@task(name="train", task_run_name="train-{stage.name}", **_STEP, retries=1, retry_delay_seconds=30,
      retry_condition_fn=retry_unless_bad_input)  # a retry resumes from the stage's last checkpoint
def train_task(stage: StageConfig, model: ModelSection, encoders: EncodersConfig, root: str,
               latents: dict[str, str], code: str, ray_address: str | None = None,
               progress_every: float = DEFAULT_EVERY) -> str:
    """Train one stage with Ray Train (resumes from its own checkpoints); returns its export URI."""
    from pipeline.train.metrics import follow_metrics
    from pipeline.train.stage import train_stage

    # Ray Train records runs and workers for the dashboard's Train view only when the driver asks for it.
    os.environ.setdefault("RAY_TRAIN_ENABLE_STATE_TRACKING", "1")
    # The workers write metrics.jsonl to the run's storage; this process reads it back while they train.
    with follow_metrics(Layout(root).stage(stage.name), stage.steps, task_sink(progress_every),
                        f"train-{stage.name}", poll=min(progress_every, 5.0) or 1.0):
        return train_stage(stage, model, root, latents, encoders=encoders, ray_address=ray_address)


@task(name="sample", task_run_name="sample", **_STEP)
def sample_task(weights_uri: str, prompts: list[str], out_uri: str, generate: GenerateConfig, code: str,
                progress_every: float = DEFAULT_EVERY) -> str:
    """Draw the fixed prompts from a stage's export (its family, objective and encoders); returns the grid."""
    from pipeline.generate import generate as run_generate

    files = run_generate(weights_uri, prompts, out_uri, generate, progress=task_sink(progress_every))
    grids = [f for f in files if f.endswith("grid.png")]
    return grids[0] if grids else out_uri


@task(name="evaluate", task_run_name="evaluate", **_STEP)
def evaluate_task(weights_uri: str, root: str, evaluate: EvalConfig, code: str,
                  progress_every: float = DEFAULT_EVERY) -> str:
    """Measure a stage's export (demo caption match, FID/CLIP on COCO when configured); returns metrics.json."""
    from pipeline.evaluate.evaluate import evaluate as run_evaluate

    run_evaluate(weights_uri, root, evaluate, progress=task_sink(progress_every))
    return Layout(root).metrics


@task(name="estimate", task_run_name="estimate", **_STEP)
def estimate_task(plan: RunConfig, code: str) -> str:
    """The run's forecast (pipeline/planner/: time, memory, data, cost on `estimate.cluster`), written under
    {root}/estimate/ and shown on the flow run page (the artifact's key keeps the latest when a rerun is cached)."""
    from pipeline.planner.estimate import write_estimate

    uri, md = write_estimate(plan)
    plan_artifact(md, uri)
    return uri


@task(name="diffusers", task_run_name="diffusers", **_STEP)
def diffusers_task(export_uri: str, out_uri: str, diffusers: DiffusersConfig, code: str, upstream: list[str]) -> str:
    """Write the export as a diffusers folder (model card with the run's metrics and grid); `upstream` keys it on
    what the card shows."""
    from pipeline.export.diffusers_folder import export_diffusers

    return export_diffusers(export_uri, out_uri, use_ema=diffusers.use_ema)


@task(name="report", task_run_name="report", **_STEP)
def report_task(root: str, report: ReportConfig, upstream: list[str], code: str) -> str:
    """Write the run report (loss curves, throughput, cost, sample grids, metrics); `upstream` orders and keys it.

    The report also goes on the flow run page: a Markdown artifact (sample grid inline) and its stage table."""
    from pipeline.report.report import build_report

    uri = build_report(root, report)
    report_artifacts(Layout(root).report_dir, uri)
    return uri
