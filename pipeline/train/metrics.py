"""Training metrics: rank 0's log lines, {stage}/metrics.jsonl and TensorBoard; every rank's Ray metrics;
the driver's view of a running stage; MFU and memory helpers.

metrics.jsonl is rewritten whole (atomically) at each log, so it works the same on S3; a resumed run first
drops the entries after its checkpoint's step, so the file never holds a step twice. It is also how the driver
follows a running stage (`follow_metrics`): the run's storage is the one state every node shares.
"""
from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import resource
import sys
import threading
from collections.abc import Iterator
from typing import Any

import torch

from pipeline.core import storage
from pipeline.core.layout import METRICS
from pipeline.core.progress import Reporter, Sink
from pipeline.planner.clusters import peak_by_device_name

log = logging.getLogger("microdit.train")



def peak_flops(override: float | None) -> float | None:
    """Per-device peak FLOP/s: the config's value, else looked up from the CUDA device name; None on CPU."""
    if override:
        return float(override)
    if not torch.cuda.is_available():
        return None
    return peak_by_device_name(torch.cuda.get_device_name())  # the planner's table of GPU kinds


def memory_gb() -> dict[str, float]:
    """Peak accelerator memory allocated (GPU) or peak resident memory of this process (CPU), in GiB."""
    if torch.cuda.is_available():
        return {"mem_gb": torch.cuda.max_memory_allocated() / 2**30}
    return {"mem_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}  # ru_maxrss is KiB on Linux


class MetricsLogger:
    """Rank-0 sink: prints a line per log step, keeps metrics.jsonl, writes TensorBoard scalars."""

    def __init__(self, stage_uri: str, resume_step: int, tensorboard: bool = True):
        self.uri = storage.join(stage_uri, METRICS)
        self.rows: list[dict[str, Any]] = []
        if storage.exists(self.uri):
            lines = storage.read_bytes(self.uri).decode().splitlines()
            self.rows = [r for r in (json.loads(x) for x in lines if x.strip()) if r["step"] <= resume_step]
        self.writer = None
        if tensorboard and not storage.is_s3(stage_uri):
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(storage.join(stage_uri, "tensorboard"), purge_step=resume_step + 1)
            except ImportError:  # tensorboard is an optional extra for the logger, not for training
                log.warning("tensorboard is not installed; TensorBoard logging is off")

    def log(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        text = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items())
        print(f"[train] {text}", file=sys.stderr, flush=True)
        storage.write_bytes(self.uri, "".join(json.dumps(r) + "\n" for r in self.rows).encode())
        if self.writer is not None:
            for k, v in row.items():
                if isinstance(v, (int, float)) and k not in ("step",):
                    self.writer.add_scalar(f"train/{k}", v, row["step"])
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def read_metrics(stage_uri: str) -> list[dict[str, Any]]:
    """The rows of a stage's metrics.jsonl (empty when there is none yet)."""
    uri = storage.join(stage_uri, METRICS)
    if not storage.exists(uri):
        return []
    return [json.loads(x) for x in storage.read_bytes(uri).decode().splitlines() if x.strip()]


class RayGauges:
    """Every rank's latest logged figures as Ray metrics `microdit_train_<key>`, tagged with the Train run name and
    the worker's world rank (the labels of the Ray dashboard's Train panels), exported by each node's agent."""

    TAGS = ("ray_train_run_name", "ray_train_worker_world_rank")

    def __init__(self, run_name: str, rank: int):
        self.tags = {"ray_train_run_name": run_name, "ray_train_worker_world_rank": str(rank)}
        self.gauges: dict[str, Any] = {}

    def set(self, row: dict[str, Any]) -> None:
        from ray.util.metrics import Gauge

        for key, value in numeric(row).items():
            if key not in self.gauges:
                self.gauges[key] = Gauge(f"microdit_train_{key}", f"microdit training figure {key!r} (last log step)",
                                         tag_keys=self.TAGS)
            self.gauges[key].set(value, tags=self.tags)


def numeric(row: dict[str, Any]) -> dict[str, float]:
    """The row's numbers (booleans as 0/1): what Ray Train's report and Ray metrics take."""
    return {k: float(v) for k, v in row.items() if isinstance(v, (int, float))}


def progress_of(row: dict[str, Any], reporter: Reporter, final: bool = False) -> None:
    """Hand one metrics row to the stage's reporter: step of total, loss, samples/s, MFU, input wait, memory."""
    figures = {"loss": row.get("loss"), "samples/s": row.get("samples_per_s")}
    if row.get("mfu") is not None:
        figures["MFU"] = f"{row['mfu']:.1%}"
    if row.get("data_wait_s") is not None and row.get("step_s"):
        figures["input wait"] = f"{row['data_wait_s'] / row['step_s']:.0%}"
    figures["mem GiB"] = row.get("mem_gb")
    figures = {k: v for k, v in figures.items() if v is not None}
    rate = 1.0 / row["step_s"] if row.get("step_s") else None  # steps/s of the last window: the ETA's basis
    if final:  # the last window's rate: the stage's average would count Ray Train's start-up
        reporter.finish(row["step"], rate=rate, **figures)
    else:
        reporter.update(row["step"], rate=rate, **figures)


@contextlib.contextmanager
def follow_metrics(stage_uri: str, steps: int, sink: Sink | None, step: str, poll: float = 5.0) -> Iterator[None]:
    """While the block runs (Ray Train's fit), read the stage's metrics.jsonl every `poll` s and report its newest
    row to `sink` as `step`; at a clean exit report the final row. Reading errors never stop training."""
    if sink is None:
        yield
        return
    reporter, stop = Reporter(step, "steps", sink, total=steps), threading.Event()
    rows = read_metrics(stage_uri)
    reporter.update(rows[-1]["step"] if rows else 0)  # at once: where the stage starts (or resumes)

    def watch() -> None:
        seen = None
        while not stop.wait(poll):
            try:
                rows = read_metrics(stage_uri)
            except Exception as e:  # a half-written object on a flaky store: the next poll reads it
                log.debug("metrics of %s not readable yet: %s", stage_uri, e)
                continue
            if rows and rows[-1]["step"] != seen:
                seen = rows[-1]["step"]
                progress_of(rows[-1], reporter)

    # The sink may need the caller's context (Prefect's task run): the thread runs in a copy of it.
    thread = threading.Thread(target=contextvars.copy_context().run, args=(watch,), daemon=True,
                              name=f"follow-{step}")
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
    rows = read_metrics(stage_uri)
    if rows:
        progress_of(rows[-1], reporter, final=rows[-1]["step"] >= steps)
