"""The one place that knows every path and completion marker under a run's storage root (local or s3://).

    {root}/config.json                       the validated run plan
    {root}/estimate/                         the planner's forecast: estimate.json, estimate.md
    {root}/_lease.json                       the live run's lease (pipeline/core/lease.py)
    {root}/data/urls/{source}.parquet        URL lists made by the source adapters
    {root}/data/raw/{source}/                files served by the synthetic demo source
    {root}/data/shards/{source}/             webdataset shards (download)       + _SUCCESS
    {root}/data/latents/{source}/            latent Parquet parts (precompute)  + _SUCCESS
    {root}/train/{stage}/                    checkpoints, metrics.jsonl, samples/ of one stage
    {root}/train/{stage}/export/             weights + config.json              + _SUCCESS
    {root}/samples/[{stage}/]                the sample grid (generate.json written last)
    {root}/eval/                             metrics.json                       + _SUCCESS
    {root}/diffusers/                        the model as a diffusers folder    + _SUCCESS
    {root}/report/                           report.md, figures

A step's output folder is complete when its marker exists: the marker is always written last, so a folder
without it is work in progress that a rerun continues.
"""
from __future__ import annotations

from dataclasses import dataclass

from pipeline.core import storage

MARKER = "_SUCCESS"
METRICS = "metrics.jsonl"  # a stage's log rows, beside its checkpoints


def is_complete(folder: str) -> bool:
    """True when `folder`'s completion marker exists."""
    return storage.exists(storage.join(folder, MARKER))


def mark_complete(folder: str, payload: bytes | str = b"") -> None:
    """Write `folder`'s completion marker (last, after everything it vouches for)."""
    storage.write_bytes(storage.join(folder, MARKER), payload.encode() if isinstance(payload, str) else payload)


def read_marker(folder: str) -> bytes | None:
    """The marker's payload, or None when the folder is not complete."""
    uri = storage.join(folder, MARKER)
    return storage.read_bytes(uri) if storage.exists(uri) else None


@dataclass(frozen=True)
class Layout:
    """Paths under one storage root."""

    root: str

    def uri(self, *parts: str) -> str:
        return storage.join(self.root, *parts)

    @property
    def config(self) -> str:
        return self.uri("config.json")

    @property
    def estimate_dir(self) -> str:
        return self.uri("estimate")

    @property
    def estimate(self) -> str:
        return self.uri("estimate", "estimate.json")

    def url_list(self, source: str) -> str:
        return self.uri("data", "urls", f"{source}.parquet")

    def raw(self, source: str) -> str:
        return self.uri("data", "raw", source)

    def shards(self, source: str) -> str:
        return self.uri("data", "shards", source)

    @property
    def latents_root(self) -> str:
        return self.uri("data", "latents")

    def latents(self, source: str) -> str:
        return self.uri("data", "latents", source)

    @property
    def train_root(self) -> str:
        return self.uri("train")

    def stage(self, name: str) -> str:
        return self.uri("train", name)

    def export(self, stage: str) -> str:
        return self.uri("train", stage, "export")

    def export_config(self, stage: str) -> str:
        return self.uri("train", stage, "export", "config.json")

    def stage_metrics(self, stage: str) -> str:
        """Rank 0's log rows of a stage (pipeline/train/metrics.py)."""
        return self.uri("train", stage, METRICS)

    def stage_samples(self, stage: str) -> str:
        """The training-time sample grids of a stage."""
        return self.uri("train", stage, "samples")

    def stage_plan(self, stage: str) -> str:
        """The run plan a single-stage rerun used (beside that stage's checkpoints)."""
        return self.uri("train", stage, "run_config.json")

    def samples(self, stage: str | None = None) -> str:
        return self.uri("samples", stage) if stage else self.uri("samples")

    def sample_grid(self, stage: str | None = None) -> str:
        return storage.join(self.samples(stage), "grid.png")

    @property
    def eval(self) -> str:
        return self.uri("eval")

    @property
    def metrics(self) -> str:
        return self.uri("eval", "metrics.json")

    @property
    def demo_grid(self) -> str:
        return self.uri("eval", "demo_grid.png")

    @property
    def diffusers(self) -> str:
        return self.uri("diffusers")

    @property
    def report_dir(self) -> str:
        return self.uri("report")

    @property
    def report(self) -> str:
        return self.uri("report", "report.md")

    def finished_latents(self) -> dict[str, str]:
        """source -> latents folder for every complete precompute output."""
        found = {}
        for marker in storage.list_files(self.latents_root, MARKER, recursive=True):
            folder = marker[: -len("/" + MARKER)]
            found[folder.rstrip("/").rsplit("/", 1)[-1]] = folder
        return found
