"""Exponential moving average of a model's parameters that really runs (the release's never did).

Works on any nn.Module, including FSDP2-sharded ones: the shadow tensors are clones of the parameter
tensors (DTensor shards stay shards) and are updated in place under no_grad with lerp_.
Buffers are not averaged: MicroDiT's only buffer (positions) is deterministic.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["EMA"]


class EMA:
    """EMA of parameters: ema = decay * ema + (1 - decay) * param every `update_every` steps from `start_step`.

    Before `start_step` the EMA copies the weights, so averaging starts from the trained model, not the init.
    """

    def __init__(self, model: nn.Module, decay: float = 0.9999, start_step: int = 0, update_every: int = 1):
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must be in [0, 1], got {decay}")
        if start_step < 0:
            raise ValueError(f"EMA start_step must be >= 0, got {start_step}")
        if update_every < 1:
            raise ValueError(f"EMA update_every must be >= 1, got {update_every}")
        self.decay, self.start_step, self.update_every = float(decay), int(start_step), int(update_every)
        self.num_updates = 0  # averaging updates applied (copies before start_step not counted)
        with torch.no_grad():
            self.shadow: dict[str, torch.Tensor] = {
                name: p.detach().clone() for name, p in model.named_parameters()}

    def _pairs(self, model: nn.Module):
        params = dict(model.named_parameters())
        if params.keys() != self.shadow.keys():
            missing = sorted(self.shadow.keys() - params.keys())
            extra = sorted(params.keys() - self.shadow.keys())
            raise ValueError(f"model parameters do not match the EMA: missing {missing}, unexpected {extra}")
        return [(self.shadow[name], p) for name, p in params.items()]

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        """Call after optimizer step `step`: copy weights before start_step, else average (every update_every)."""
        pairs = self._pairs(model)
        if step < self.start_step:
            for ema, p in pairs:
                ema.copy_(p.detach())
            return
        if (step - self.start_step) % self.update_every:
            return
        for ema, p in pairs:
            ema.lerp_(p.detach().to(ema.dtype), 1.0 - self.decay)
        self.num_updates += 1

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Write the EMA weights into `model`'s parameters (in place)."""
        for ema, p in self._pairs(model):
            p.copy_(ema)

    def state_dict(self) -> dict[str, Any]:
        """Shadow tensors plus the settings and update counter (tensors are the live ones, not copies)."""
        return {"shadow": dict(self.shadow), "decay": self.decay, "start_step": self.start_step,
                "update_every": self.update_every, "num_updates": self.num_updates}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Load in place into the existing shadow tensors (keeps sharding and device); names must match."""
        shadow = state["shadow"]
        if shadow.keys() != self.shadow.keys():
            missing = sorted(self.shadow.keys() - shadow.keys())
            extra = sorted(shadow.keys() - self.shadow.keys())
            raise ValueError(f"EMA state does not match: missing {missing}, unexpected {extra}")
        for name, t in shadow.items():
            if t is not self.shadow[name]:
                self.shadow[name].copy_(t)
        self.decay = float(state["decay"])
        self.start_step = int(state["start_step"])
        self.update_every = int(state["update_every"])
        self.num_updates = int(state["num_updates"])
