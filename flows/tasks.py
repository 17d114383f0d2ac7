"""Prefect tasks: a few typed lines around each pipeline step; they take plan sections and URIs, return URIs.

Caching (docs/ENVIRONMENT.md): the cache key is the task's inputs (plan sections, input/output URIs and the step's
`code` version from flows/caching.py, the import closure of the step) plus the task body, never the run id;
results are persisted as JSON (URIs and small dicts: a cache hit never unpickles anything from storage), so a
finished step is a cache hit in any later run. `ray_address` is left out of the key: the same step on another
cluster writes the same output. Below Prefect, every step is idempotent on its own markers, so a step
interrupted half-way continues from what it committed when its task runs again.
"""
from __future__ import annotations

from prefect import task
from prefect.cache_policies import INPUTS, TASK_SOURCE

from pipeline.core.layout import Layout
from pipeline.core.plan import (DownloadConfig, EncodersConfig, EvalConfig, GenerateConfig, ModelSection,
                                PrecomputeConfig, PlanError, ReportConfig, SourceConfig, StageConfig)

STEP_CACHE = (INPUTS - "ray_address") + TASK_SOURCE
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
def download_task(source: SourceConfig, download: DownloadConfig, root: str, code: str) -> str:
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
            run_download(paths.url_list(source.name), paths.shards(source.name), download)
    return paths.shards(source.name)


@task(name="precompute", task_run_name="precompute-{source}", **_STEP, **_RETRY)
def precompute_task(source: str, shards_uri: str, latents_uri: str, precompute: PrecomputeConfig,
                    encoders: EncodersConfig, code: str, ray_address: str | None = None) -> str:
    """Encode one source's shards into latent Parquet parts on the Ray cluster."""
    from pipeline.data.precompute import precompute as run_precompute

    run_precompute(shards_uri, latents_uri, precompute.for_source(source, encoders), ray_address)
    return latents_uri


@task(name="train", task_run_name="train-{stage.name}", **_STEP, retries=1, retry_delay_seconds=30,
      retry_condition_fn=retry_unless_bad_input)  # a retry resumes from the stage's last checkpoint
def train_task(stage: StageConfig, model: ModelSection, encoders: EncodersConfig, root: str,
               latents: dict[str, str], code: str, ray_address: str | None = None) -> str:
    """Train one stage with Ray Train (resumes from its own checkpoints); returns its export URI."""
    from pipeline.train.stage import train_stage

    return train_stage(stage, model, root, latents, encoders=encoders, ray_address=ray_address)


@task(name="sample", task_run_name="sample", **_STEP)
def sample_task(weights_uri: str, prompts: list[str], out_uri: str, generate: GenerateConfig, code: str) -> str:
    """Draw the fixed prompts from a stage's export (its family, objective and encoders); returns the grid."""
    from pipeline.generate import generate as run_generate

    files = run_generate(weights_uri, prompts, out_uri, generate)
    grids = [f for f in files if f.endswith("grid.png")]
    return grids[0] if grids else out_uri


@task(name="evaluate", task_run_name="evaluate", **_STEP)
def evaluate_task(weights_uri: str, root: str, evaluate: EvalConfig, code: str) -> str:
    """Measure a stage's export (demo caption match, FID/CLIP on COCO when configured); returns metrics.json."""
    from pipeline.evaluate.evaluate import evaluate as run_evaluate

    run_evaluate(weights_uri, root, evaluate)
    return Layout(root).metrics


@task(name="report", task_run_name="report", **_STEP)
def report_task(root: str, report: ReportConfig, upstream: list[str], code: str) -> str:
    """Write the run report (loss curves, throughput, cost, sample grids, metrics); `upstream` orders and keys it."""
    from pipeline.report.report import build_report

    return build_report(root, report)
