"""Fault injection for training tests, reached through pipeline/train/hooks.py (never through the plan).

    with faults.injected(crash_rank=1, crash_at_step=3, nan_loss_steps=[4], stop_at_step=5):
        train_stage(...)
"""
from __future__ import annotations

import contextlib
import json
import os

import torch

from pipeline.core import storage
from pipeline.train import hooks


class Faults:
    """A rank that dies once at a step, losses forced to NaN at some steps, a clean stop after a step."""

    def __init__(self, crash_rank: int | None = None, crash_at_step: int | None = None,
                 stop_at_step: int | None = None, nan_loss_steps: list[int] | None = None):
        self.crash_rank, self.crash_at_step, self.stop_at_step = crash_rank, crash_at_step, stop_at_step
        self.nan_loss_steps = set(nan_loss_steps or [])

    def before_step(self, stage_uri: str, step: int, rank: int) -> None:
        """Rank `crash_rank` exits at `crash_at_step`, on the first attempt only (a marker remembers it)."""
        if self.crash_at_step is None or step != self.crash_at_step or rank != self.crash_rank:
            return
        marker = storage.join(stage_uri, "debug_crashed")
        if not storage.exists(marker):
            storage.write_bytes(marker, f"rank {rank} exited at step {step}\n".encode())
            print(f"[train] fault injection: rank {rank} exits at step {step}", flush=True)
            os._exit(1)

    def loss(self, step: int, loss: torch.Tensor) -> torch.Tensor:
        return loss * float("nan") if step in self.nan_loss_steps else loss

    def stop_after(self, step: int) -> bool:
        return self.stop_at_step is not None and step == self.stop_at_step


def spec(**options) -> str:
    """The hook spec (for MICRODIT_TRAIN_HOOKS) of Faults(**options)."""
    return json.dumps({"hook": f"{__name__}:Faults", "options": options})


@contextlib.contextmanager
def injected(**options):
    """Faults(**options) in every stage started inside the block."""
    old = os.environ.get(hooks.ENV)
    os.environ[hooks.ENV] = spec(**options)
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(hooks.ENV, None)
        else:
            os.environ[hooks.ENV] = old
