"""Training metrics on rank 0: worker log lines, {stage}/metrics.jsonl and TensorBoard; MFU and memory helpers.

metrics.jsonl is rewritten whole (atomically) at each log, so it works the same on S3; a resumed run first
drops the entries after its checkpoint's step, so the file never holds a step twice.
"""
from __future__ import annotations

import json
import logging
import resource
import sys
from typing import Any

import torch

from pipeline.core import storage

log = logging.getLogger("microdit.train")

# Dense bf16 peak per device (no sparsity), for MFU.
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12}


def peak_flops(override: float | None) -> float | None:
    """Per-device peak FLOP/s: the config's value, else looked up from the CUDA device name; None on CPU."""
    if override:
        return float(override)
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    for key, value in PEAK_BF16_FLOPS.items():
        if key in name:
            return value
    return None


def memory_gb() -> dict[str, float]:
    """Peak accelerator memory allocated (GPU) or peak resident memory of this process (CPU), in GiB."""
    if torch.cuda.is_available():
        return {"mem_gb": torch.cuda.max_memory_allocated() / 2**30}
    return {"mem_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}  # ru_maxrss is KiB on Linux


class MetricsLogger:
    """Rank-0 sink: prints a line per log step, keeps metrics.jsonl, writes TensorBoard scalars."""

    def __init__(self, stage_uri: str, resume_step: int, tensorboard: bool = True):
        self.uri = storage.join(stage_uri, "metrics.jsonl")
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
    uri = storage.join(stage_uri, "metrics.jsonl")
    if not storage.exists(uri):
        return []
    return [json.loads(x) for x in storage.read_bytes(uri).decode().splitlines() if x.strip()]
