"""A narrow hook into the training loop, for fault injection in tests and for tools, never a plan setting.

`MICRODIT_TRAIN_HOOKS` (read on the driver when a stage starts, handed to every worker) names an object as
`module:attribute` with JSON options: `{"hook": "pipeline.testing.faults:Faults", "options": {...}}`. The loop
calls its methods at fixed points; the default does nothing.
"""
from __future__ import annotations

import importlib
import json
import os

import torch

ENV = "MICRODIT_TRAIN_HOOKS"


class NoHooks:
    """What the loop calls when no hook is configured."""

    def before_step(self, stage_uri: str, step: int, rank: int) -> None:
        pass

    def loss(self, step: int, loss: torch.Tensor) -> torch.Tensor:
        return loss

    def stop_after(self, step: int) -> bool:
        return False


def spec_from_env() -> str | None:
    """The hook spec of this process's environment (on the driver), or None."""
    return os.environ.get(ENV) or None


def load(spec: str | None):
    """The hook object a spec names (NoHooks for None); ValueError naming a bad spec."""
    if not spec:
        return NoHooks()
    try:
        data = json.loads(spec)
        module, attr = data["hook"].split(":")
        return getattr(importlib.import_module(module), attr)(**data.get("options", {}))
    except (ValueError, KeyError, AttributeError, ImportError, TypeError) as e:
        raise ValueError(f"{ENV}={spec!r} is not a usable hook spec: {e}") from None
