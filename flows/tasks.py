"""Prefect tasks: a few typed lines around each pipeline step; they take and return URIs, never data.

Caching (ENVIRONMENT.md): the cache key is the task's inputs (configs as plain dicts, input/output URIs and the
step's `code` version from flows/caching.py) plus the task body, never the run id; results are persisted, so a
finished step is a cache hit in any later run. `ray_address` is left out of the key: the same step on another
cluster writes the same output. Below Prefect, every step is idempotent on its own markers, so a step
interrupted half-way continues from what it committed when its task runs again.
"""
from __future__ import annotations

import dataclasses
import hashlib
import tempfile
from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import INPUTS, TASK_SOURCE

from pipeline.core import storage
from pipeline.core.configs import from_dict

STEP_CACHE = (INPUTS - "ray_address") + TASK_SOURCE
BAD_INPUT = (ValueError, TypeError, KeyError, FileNotFoundError)


def retry_unless_bad_input(task, task_run, state) -> bool:
    """Retry transient failures (network, a lost Ray node), never bad config or missing inputs."""
    exc = state.data if isinstance(state.data, BaseException) else None
    if exc is None:
        try:
            exc = state.result(raise_on_failure=False)
        except Exception:  # the state carries no readable result: be conservative and retry
            return True
    return not isinstance(exc, BAD_INPUT)


_STEP = dict(cache_policy=STEP_CACHE, persist_result=True, log_prints=True)
_RETRY = dict(retries=2, retry_delay_seconds=15, retry_condition_fn=retry_unless_bad_input)


@task(name="download", task_run_name="download-{source[name]}", **_STEP, **_RETRY)
def download_task(source: dict, download: dict, url_list_uri: str, shards_uri: str, code: str) -> str:
    """Fetch one source into webdataset shards (adapter -> URL list -> img2dataset, or adapter -> shards)."""
    from pipeline.data import sources
    from pipeline.data.download import DownloadConfig
    from pipeline.data.download import download as run_download

    spec = sources.get(source["kind"])
    if spec.output == "shards":
        spec.prepare(source["options"], shards_uri)
        return shards_uri
    if source["kind"] == "synthetic":  # served over loopback for the span of the download
        from pipeline.testing.synthetic import serve_folder

        options = dict(source["options"])
        options.setdefault("images_dir", synthetic_images_dir(shards_uri))
        Path(options["images_dir"]).mkdir(parents=True, exist_ok=True)
        with serve_folder(options["images_dir"]) as server:
            spec.prepare({**options, "base_url": server.url}, url_list_uri)
            run_download(url_list_uri, shards_uri, from_dict(DownloadConfig, download))
        return shards_uri
    spec.prepare(source["options"], url_list_uri)
    run_download(url_list_uri, shards_uri, from_dict(DownloadConfig, download))
    return shards_uri


@task(name="precompute", task_run_name="precompute-{source}", **_STEP, **_RETRY)
def precompute_task(source: str, shards_uri: str, latents_uri: str, precompute: dict, code: str,
                    ray_address: str | None = None) -> str:
    """Encode one source's shards into latent Parquet parts on the Ray cluster."""
    from pipeline.data.precompute import PrecomputeConfig
    from pipeline.data.precompute import precompute as run_precompute

    run_precompute(shards_uri, latents_uri, from_dict(PrecomputeConfig, precompute), ray_address)
    return latents_uri


@task(name="train", task_run_name="train-{stage[name]}", **_STEP, retries=1, retry_delay_seconds=30,
      retry_condition_fn=retry_unless_bad_input)  # a retry resumes from the stage's last checkpoint
def train_task(stage: dict, model: dict, root: str, latents: dict[str, str], vae: str, text: str, code: str,
               ray_address: str | None = None) -> str:
    """Train one stage with Ray Train (resumes from its own checkpoints); returns its export URI."""
    from pipeline.train import stage_config, train_stage

    return train_stage(stage_config(stage), model, root, latents, vae=vae, text=text, ray_address=ray_address)


@task(name="sample", task_run_name="sample", **_STEP)
def sample_task(weights_uri: str, prompts: list[str], out_uri: str, generate: dict, vae: str, text: str,
                code: str) -> str:
    """Draw the fixed prompts from a stage's export; returns the grid PNG's URI."""
    from pipeline.generate import GenerateConfig, generate as run_generate

    files = run_generate(weights_uri, prompts, out_uri, from_dict(GenerateConfig, generate), vae, text)
    grids = [f for f in files if f.endswith("grid.png")]
    return grids[0] if grids else out_uri


@task(name="evaluate", task_run_name="evaluate", **_STEP)
def evaluate_task(weights_uri: str, root: str, evaluate: dict, vae: str, text: str, code: str) -> str:
    """Measure a stage's export (demo caption match, FID/CLIP on COCO when configured); returns metrics.json."""
    from pipeline.evaluate.evaluate import EvalConfig, evaluate as run_evaluate

    run_evaluate(weights_uri, root, from_dict(EvalConfig, evaluate), vae, text)
    return storage.join(root, "eval", "metrics.json")


@task(name="report", task_run_name="report", **_STEP)
def report_task(root: str, report: dict, upstream: list[str], code: str) -> str:
    """Write the run report (loss curves, throughput, cost, sample grids, metrics); `upstream` orders and keys it."""
    from pipeline.report.report import ReportConfig, build_report

    return build_report(root, from_dict(ReportConfig, report))


def synthetic_images_dir(shards_uri: str) -> str:
    """A local folder for the synthetic images: beside the shards locally, under /tmp for an s3:// root."""
    if not storage.is_s3(shards_uri):
        return str(Path(shards_uri).parent.parent / "raw" / Path(shards_uri).name)
    digest = hashlib.sha1(shards_uri.encode()).hexdigest()[:12]
    return str(Path(tempfile.gettempdir()) / "microdit-synthetic" / digest)


def plain(obj: Any) -> Any:
    """A config dataclass as a JSON-ready dict (what task inputs and cache keys are made of)."""
    return dataclasses.asdict(obj) if dataclasses.is_dataclass(obj) else obj
