"""AdamW parameter groups (weight decay, MoE expert learning-rate scale) and learning-rate schedules.

Weight decay applies to tensors with >= 2 dimensions (linear and conv weights, expert matrices); biases,
norm gains and other 1-D/0-D tensors do not decay. Position embeddings are buffers, so they never reach
the optimizer. MoE expert weights (parameters under every ExpertChoiceMoE's `experts` submodule) are picked
by module type, not by name, and carry `lr_scale` = moe_lr_scale (the release's name match hit nothing).
"""
from __future__ import annotations

import math
from typing import Any, Callable

import torch
from torch import nn

__all__ = ["param_groups", "build_optimizer", "apply_lr", "cosine_schedule", "constant_schedule",
           "moe_expert_parameters"]


def _default_moe_types() -> tuple[type, ...]:
    from model.microdit.moe import ExpertChoiceMoE  # the module type only; optim never builds the network

    return (ExpertChoiceMoE,)


def moe_expert_parameters(model: nn.Module, moe_types: tuple[type, ...] | None = None) -> set[int]:
    """ids of the parameters under the `experts` submodule of every MoE module of the given types."""
    moe_types = moe_types or _default_moe_types()
    ids: set[int] = set()
    for module in model.modules():
        if isinstance(module, moe_types):
            experts = getattr(module, "experts", None)
            if not isinstance(experts, nn.Module):
                raise ValueError(f"{type(module).__name__} has no `experts` submodule to put in the MoE group")
            ids.update(id(p) for p in experts.parameters())
    return ids


def param_groups(model: nn.Module, weight_decay: float, moe_lr_scale: float = 1.0,
                 moe_types: tuple[type, ...] | None = None) -> list[dict[str, Any]]:
    """Split trainable parameters into named groups: decay, no_decay, moe_experts (+ moe_experts_no_decay).

    Each group has "name", "weight_decay" and "lr_scale"; empty groups are left out. Every trainable
    parameter lands in exactly one group.
    """
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
    if moe_lr_scale <= 0:
        raise ValueError(f"moe_lr_scale must be > 0, got {moe_lr_scale}")
    moe = moe_expert_parameters(model, moe_types)
    buckets: dict[str, list[nn.Parameter]] = {
        "decay": [], "no_decay": [], "moe_experts": [], "moe_experts_no_decay": []}
    for _, p in model.named_parameters():  # shared parameters appear once
        if not p.requires_grad:
            continue
        key = "moe_experts" if id(p) in moe else "decay"
        if p.ndim < 2:
            key = "no_decay" if key == "decay" else "moe_experts_no_decay"
        buckets[key].append(p)
    settings = {"decay": (weight_decay, 1.0), "no_decay": (0.0, 1.0),
                "moe_experts": (weight_decay, moe_lr_scale), "moe_experts_no_decay": (0.0, moe_lr_scale)}
    return [{"params": params, "name": key, "weight_decay": settings[key][0], "lr_scale": settings[key][1]}
            for key, params in buckets.items() if params]


def build_optimizer(model: nn.Module, lr: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                    weight_decay: float = 0.1, moe_lr_scale: float = 1.0,
                    moe_types: tuple[type, ...] | None = None, **adamw_kwargs: Any) -> torch.optim.AdamW:
    """AdamW over `param_groups`; each group's lr starts at lr * lr_scale, so LambdaLR keeps the scale."""
    if lr <= 0:
        raise ValueError(f"lr must be > 0, got {lr}")
    groups = param_groups(model, weight_decay, moe_lr_scale, moe_types)
    for g in groups:
        g["lr"] = lr * g["lr_scale"]
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                             **adamw_kwargs)


def apply_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set every group's lr to lr * its lr_scale (for loops that set the lr by hand instead of LambdaLR)."""
    for g in optimizer.param_groups:
        g["lr"] = lr * g.get("lr_scale", 1.0)


def _check_steps(warmup_steps: int, total_steps: int | None = None) -> None:
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
    if total_steps is not None and total_steps < warmup_steps:
        raise ValueError(f"total_steps ({total_steps}) must be >= warmup_steps ({warmup_steps})")


def _warmup(step: int, warmup_steps: int) -> float:
    # step counts optimizer steps taken (0-based); the peak is reached at step warmup_steps - 1.
    return min(1.0, (step + 1) / warmup_steps) if warmup_steps else 1.0


def cosine_schedule(warmup_steps: int, total_steps: int, final_ratio: float = 0.33) -> Callable[[int], float]:
    """lr multiplier: linear warmup to 1, then cosine decay to final_ratio at total_steps (held after)."""
    _check_steps(warmup_steps, total_steps)
    if not 0.0 <= final_ratio <= 1.0:
        raise ValueError(f"final_ratio must be in [0, 1], got {final_ratio}")

    def fn(step: int) -> float:
        if step < warmup_steps:
            return _warmup(step, warmup_steps)
        span = total_steps - warmup_steps
        progress = min(1.0, (step - warmup_steps) / span) if span else 1.0
        return final_ratio + (1.0 - final_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return fn


def constant_schedule(warmup_steps: int = 0) -> Callable[[int], float]:
    """lr multiplier: linear warmup to 1 over warmup_steps, then constant 1."""
    _check_steps(warmup_steps)
    return lambda step: _warmup(step, warmup_steps)


def stage_lr_lambda(stage) -> Callable[[int], float]:
    """The LR multiplier of a stage (its optim.schedule) as a function of the stage step."""
    s = stage.optim.schedule
    if s.kind == "cosine":
        return cosine_schedule(s.warmup_steps, stage.steps, s.floor)
    return constant_schedule(s.warmup_steps)
