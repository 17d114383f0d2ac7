"""GPU memory of a training stage, per GPU: the sharded training state (exact, from the network built on the meta
device), the blocks FSDP2 gathers while it computes, and the activations (activations.py).

Sharded state, per parameter tensor, as FSDP2 (`fully_shard`, pipeline/train/parallelize.py) lays it out: dim 0
split into `world` chunks of ceil(rows / world) rows (rank 0 holds a full chunk: the most any rank holds), float32;
gradients the same; AdamW's two moments the same; the EMA's shadow the same. So 4 + 4 + 8 + 4 bytes per element
of the padded shard.

While computing, FSDP2 holds a block's parameters unsharded in bf16 (the mixed-precision policy's param dtype), the
next block's too when it prefetches, and in backward the block's bf16 gradients and their float32 copy for the
reduce-scatter; the root's own parameters (embedders, final layer) stay gathered through the forward. CUDA's context,
NCCL's buffers and the allocator's slack are not measured here: an assumed 2 GiB (OVERHEAD) is added.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

GIB = 2 ** 30
OVERHEAD = 2 * GIB  # an assumption (module docstring), stated in every plan
FP32, BF16 = 4, 2


def shard_elements(shape: tuple[int, ...], world: int) -> int:
    """Elements of rank 0's FSDP2 shard of a tensor of `shape` (dim 0 in chunks of ceil(rows / world))."""
    if not shape:
        return 1 if world else 0
    return math.ceil(shape[0] / world) * math.prod(shape[1:])


@dataclass
class StateBytes:
    """Per-GPU bytes of the sharded training state and of what FSDP2 gathers while computing."""

    parameters: int
    shard_parameters: int
    weights: int
    gradients: int
    optimizer: int
    ema: int
    gathered: int

    @property
    def static(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.ema


def state_bytes(family, cfg, world: int) -> StateBytes:
    """The sharded state of the network `cfg` on `world` GPUs (module docstring); built on the meta device."""
    with torch.device("meta"):
        net = family.build(cfg)
    units = family.shard_units(net)
    in_units = {id(p) for u in units for p in u.parameters()}
    shapes = [tuple(p.shape) for p in net.parameters()]
    shard = sum(shard_elements(s, world) for s in shapes)
    unit_sizes = sorted((sum(p.numel() for p in u.parameters()) for u in units), reverse=True) or [0]
    root = sum(p.numel() for p in net.parameters() if id(p) not in in_units)
    two_largest = sum(unit_sizes[:2])
    gathered = two_largest * BF16 + unit_sizes[0] * (BF16 + FP32) + root * BF16
    return StateBytes(parameters=sum(math.prod(s) for s in shapes), shard_parameters=shard, weights=shard * FP32,
                      gradients=shard * FP32, optimizer=2 * shard * FP32, ema=shard * FP32, gathered=gathered)
