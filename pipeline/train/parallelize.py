"""Parallelism, activation checkpointing and compile, applied to a plain MicroDiT from outside (torchtitan order).

apply_ac -> apply_compile -> apply_fsdp: every mixer and backbone block becomes its own FSDP2 unit (its
parameters are all-gathered just before it runs and freed after), then the root holds the rest. None of these
renames a parameter, so checkpoints, the EMA and exported weights use the plain module's names.
"""
from __future__ import annotations

import functools

import torch
from torch import nn


def blocks_of(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks that are sharded, checkpointed and compiled one by one (mixer, then backbone)."""
    return list(model.mixer) + list(model.blocks)


def apply_ac(model: nn.Module) -> None:
    """Recompute each block's activations in backward instead of storing them (non-reentrant checkpoint)."""
    from torch.utils.checkpoint import checkpoint

    for block in blocks_of(model):
        # Wrapping the bound forward keeps the module (and its parameter names) as it is.
        block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)


def apply_compile(model: nn.Module) -> None:
    """torch.compile each block in place (same code per block; compiled once, reused)."""
    for block in blocks_of(model):
        block.compile(fullgraph=False)


def build_mesh(world_size: int, device_type: str):
    """A 1-D device mesh over all workers ("cpu" uses the gloo process group Ray Train set up)."""
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(device_type, (world_size,), mesh_dim_names=("dp",))


def apply_fsdp(model: nn.Module, mesh, bf16: bool, reshard_after_forward: bool = True) -> nn.Module:
    """FSDP2 `fully_shard` per block and on the root; bf16 compute with fp32 reduction when `bf16`."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 \
        else MixedPrecisionPolicy()
    blocks = blocks_of(model)
    for i, block in enumerate(blocks):
        # The last block's parameters are needed again at once by backward: keep them gathered.
        fully_shard(block, mesh=mesh, mp_policy=mp,
                    reshard_after_forward=reshard_after_forward and i < len(blocks) - 1)
    fully_shard(model, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward)
    return model


def parallelize(model: nn.Module, mesh, *, bf16: bool, compile: bool, activation_checkpointing: bool) -> nn.Module:
    """AC, compile, then FSDP2, each only when asked (FSDP always: it is how gradients are reduced)."""
    if activation_checkpointing:
        apply_ac(model)
    if compile:
        apply_compile(model)
    return apply_fsdp(model, mesh, bf16)


def reshard_all(model: nn.Module) -> None:
    """Free gathered parameters left by a forward without backward (sampling), so parameters are shards again."""
    from torch.distributed.fsdp import FSDPModule

    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.reshard()
