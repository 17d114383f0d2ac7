"""Parallelism, activation checkpointing, compile and float8, applied to a plain network from outside (torchtitan
order), over the blocks its family names (`Family.shard_units`).

apply_float8 -> apply_ac -> apply_compile -> apply_fsdp: every block becomes its own FSDP2 unit (its parameters
are all-gathered just before it runs and freed after), then the root holds the rest. None of
these renames a parameter, so checkpoints, the EMA and exported weights use the plain module's names.
"""
from __future__ import annotations

import functools
from typing import Callable

import torch
from torch import nn


Units = Callable[[nn.Module], list[nn.Module]]


def apply_ac(model: nn.Module, units: Units) -> None:
    """Recompute each block's activations in backward instead of storing them (non-reentrant checkpoint)."""
    from torch.utils.checkpoint import checkpoint

    for block in units(model):
        # Wrapping the bound forward keeps the module (and its parameter names) as it is.
        block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)


def apply_compile(model: nn.Module, units: Units) -> None:
    """torch.compile each block in place as one graph (fullgraph: a graph break is an error, not a slowdown)."""
    for block in units(model):
        block.compile(fullgraph=True)


# Linear layers inside blocks that stay in high precision whatever their size: conditioning and routing.
FLOAT8_SKIP = ("adaLN", "router")


def float8_filter(module: nn.Module, fqn: str, min_features: int = 512,
                  prefixes: tuple[str, ...] = ("mixer.", "blocks.")) -> bool:
    """True for a block's large Linear: under a block (`prefixes`), not adaLN or router, both dims multiples
    of 16 (float8 matmul tiles) and at least `min_features`. Embedders, projections and the final layer never."""
    if not isinstance(module, nn.Linear) or not fqn.startswith(prefixes):
        return False
    if any(part in FLOAT8_SKIP for part in fqn.split(".")):
        return False
    dims = (module.in_features, module.out_features)
    return all(d % 16 == 0 and d >= min_features for d in dims)


def apply_float8(model: nn.Module, units: Units, min_features: int = 512,
                 fsdp_float8_all_gather: bool = False) -> list[str]:
    """Swap the blocks' large Linear layers (`float8_filter`) for torchao Float8Linear (dynamic tensorwise
    scaling); returns their names. Runs on any device (meta too); training in float8 needs an SM 8.9+ GPU
    (H100-class). Parameter names do not change. Apply before AC, compile and FSDP."""
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training

    chosen: list[str] = []
    blocks = {id(m) for m in units(model)}
    prefixes = tuple(n + "." for n, m in model.named_modules() if id(m) in blocks)

    def keep(module: nn.Module, fqn: str) -> bool:
        ok = float8_filter(module, fqn, min_features, prefixes)
        if ok:
            chosen.append(fqn)
        return ok

    config = Float8LinearConfig(enable_fsdp_float8_all_gather=fsdp_float8_all_gather)
    convert_to_float8_training(model, config=config, module_filter_fn=keep)
    return chosen


def build_mesh(world_size: int, device_type: str):
    """A 1-D device mesh over all workers ("cpu" uses the gloo process group Ray Train set up)."""
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(device_type, (world_size,), mesh_dim_names=("dp",))


def apply_fsdp(model: nn.Module, mesh, bf16: bool, units: Units, reshard_after_forward: bool = True) -> nn.Module:
    """FSDP2 `fully_shard` per block and on the root; bf16 compute with fp32 reduction when `bf16`."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 \
        else MixedPrecisionPolicy()
    # The root leaves its inputs as given: c_noise reaches the timestep embedder in float32 and the network
    # casts latents and captions to its compute dtype itself. Blocks cast their inputs to bf16.
    root_mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32,
                                   cast_forward_inputs=False) if bf16 else mp
    blocks = units(model)
    for i, block in enumerate(blocks):
        # The last block's parameters are needed again at once by backward: keep them gathered.
        fully_shard(block, mesh=mesh, mp_policy=mp,
                    reshard_after_forward=reshard_after_forward and i < len(blocks) - 1)
    fully_shard(model, mesh=mesh, mp_policy=root_mp, reshard_after_forward=reshard_after_forward)
    return model


def parallelize(model: nn.Module, mesh, *, units: Units, bf16: bool, compile: bool, activation_checkpointing: bool,
                float8: bool = False) -> nn.Module:
    """Float8, AC, compile, then FSDP2, each only when asked (FSDP always: it is how gradients are reduced).

    units: the family's `shard_units`: the blocks sharded, checkpointed and compiled one by one."""
    if float8:
        apply_float8(model, units)
    if activation_checkpointing:
        apply_ac(model, units)
    if compile:
        apply_compile(model, units)
    return apply_fsdp(model, mesh, bf16, units)


def reshard_all(model: nn.Module) -> None:
    """Free gathered parameters left by a forward without backward (sampling), so parameters are shards again."""
    from torch.distributed.fsdp import FSDPModule

    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.reshard()
