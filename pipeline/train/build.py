"""Model construction for training: build on the meta device, parallelize, then materialise each rank's shard.

`build_training_model` gives the parameters of the plain build it replaces (`torch.manual_seed(seed);
MicroDiT(cfg)`, then `parallelize`) bit for bit, and leaves the global RNG where that build left it, without
any rank holding the unsharded model. How: the network is constructed on `meta` under `InitRecorder`, a
dispatch mode that runs every init op (`uniform_`, `normal_`, ...) the constructor issues on a CPU scratch
tensor of the same shape and strides, so the CPU generator advances exactly as a CPU build would, and notes
each parameter's last init op with the RNG state before it. After fully_shard and to_empty, each parameter is
replayed alone from that state into a scratch tensor, this rank's shard is copied out and the scratch freed:
the peak is the largest single parameter (MicroDiT_XL_2: one expert bank, 128 MiB), not the model.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from model import family as families
from pipeline.train.parallelize import parallelize

aten = torch.ops.aten

# In-place ops that overwrite a whole tensor: the only ones an init may apply to a parameter here.
_RANDOM_FILLS = {aten.uniform_.default, aten.normal_.default}
_CONSTANT_FILLS = {aten.zero_.default, aten.fill_.Scalar}
# Random in-place ops (every overload) on any meta tensor: replayed on scratch so the generator advances as on CPU.
_RANDOM_INPLACE = {aten.uniform_, aten.normal_, aten.random_, aten.bernoulli_, aten.exponential_, aten.geometric_,
                   aten.log_normal_, aten.cauchy_}
# Random factory ops, which a meta construction would run without consuming the generator.
_RANDOM_FACTORIES = {"rand", "randn", "randint", "randperm", "normal", "rand_like", "randn_like",
                     "randint_like", "bernoulli", "multinomial", "poisson"}


@dataclass
class _InitOp:
    """One whole-tensor init op on a parameter (or a full view of it) and the CPU RNG state before it."""

    func: Any
    args: tuple
    kwargs: dict
    size: tuple[int, ...]
    stride: tuple[int, ...]
    offset: int
    rng_state: torch.Tensor | None


class _Scratch:
    """One reused CPU buffer for the replays: a fresh tensor per parameter would leave the allocator holding
    hundreds of MiB of freed, fragmented heap (measured: 330 MiB for MicroDiT_Tiny_2)."""

    def __init__(self):
        self.buf = torch.empty(0, dtype=torch.uint8, device="cpu")

    def like(self, size, stride, dtype: torch.dtype, storage_bytes: int) -> torch.Tensor:
        """A CPU tensor of this size, stride and dtype at offset 0 of the buffer (grown when too small)."""
        if self.buf.numel() < storage_bytes:
            self.buf = torch.empty(0, dtype=torch.uint8, device="cpu")  # free the old one first
            self.buf = torch.empty(storage_bytes, dtype=torch.uint8, device="cpu")
        return self.buf[:storage_bytes].view(dtype).as_strided(size, stride, 0)


class InitRecorder(TorchDispatchMode):
    """Dispatch mode for a meta-device construction: advances the CPU generator as a CPU build would and
    records the last init op of every parameter (`last`, keyed by id of the parameter object)."""

    def __init__(self):
        super().__init__()
        self.last: dict[int, tuple[nn.Parameter, _InitOp]] = {}
        self.scratch = _Scratch()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.overloadpacket.__name__ in _RANDOM_FACTORIES and kwargs.get("device") == torch.device("meta"):
            raise NotImplementedError(f"{func} on the meta device: a meta build cannot replay it; initialise "
                                      "parameters in place (nn.init) instead")
        target = args[0] if args and isinstance(args[0], torch.Tensor) else None
        if target is None or not target.is_meta or not _mutates_first(func):
            return func(*args, **kwargs)
        base = target._base if target._base is not None else target
        if not isinstance(base, nn.Parameter):
            if func.overloadpacket in _RANDOM_INPLACE:  # a meta buffer: its values are rebuilt later, its draws still count
                self._draw(target, func, args, kwargs)
            return func(*args, **kwargs)
        if func not in _RANDOM_FILLS | _CONSTANT_FILLS or kwargs.get("generator") is not None \
                or target.numel() != base.numel():
            raise NotImplementedError(f"init op {func} on a parameter of shape {tuple(base.shape)}"
                                      f"{' (partial view)' if target.numel() != base.numel() else ''}: "
                                      "the meta build replays only whole-tensor uniform_/normal_/zero_/fill_ "
                                      "from the global generator")
        state = torch.get_rng_state() if func in _RANDOM_FILLS else None
        if state is not None:
            self._draw(target, func, args, kwargs)
        op = _InitOp(func, tuple(args[1:]), dict(kwargs), tuple(target.size()), tuple(target.stride()),
                     target.storage_offset(), state)
        self.last[id(base)] = (base, op)
        return func(*args, **kwargs)

    def _draw(self, target: torch.Tensor, func, args, kwargs) -> None:
        """Run a random op on a CPU tensor laid out like `target`: same draws, same generator advance."""
        scratch = self.scratch.like(target.size(), target.stride(), target.dtype, target.untyped_storage().nbytes())
        func(scratch, *args[1:], **kwargs)


def _mutates_first(func) -> bool:
    schema = func._schema
    if not schema.arguments:
        return False
    alias = schema.arguments[0].alias_info
    return alias is not None and alias.is_write


def _replay(param: nn.Parameter, op: _InitOp, scratch: _Scratch) -> torch.Tensor:
    """The full CPU value the recorded op gave `param` (the generator is set to its state before the op)."""
    full = scratch.like(param.shape, param.stride(), param.dtype, param.untyped_storage().nbytes())
    view = full.as_strided(op.size, op.stride, op.offset)
    if op.rng_state is not None:
        torch.set_rng_state(op.rng_state)
    op.func(view, *op.args, **op.kwargs)
    return full


def _local_slices(param: torch.Tensor) -> tuple[slice, ...] | None:
    """Index of this rank's shard in the full tensor (None: not a DTensor, the whole tensor is local)."""
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    if not isinstance(param, DTensor):
        return None
    shape, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)
    return tuple(slice(o, o + s) for o, s in zip(offset, shape))


@torch.no_grad()
def _write_local(param: torch.Tensor, full: torch.Tensor) -> None:
    """Copy this rank's part of a full CPU tensor into a (sharded) parameter."""
    index = _local_slices(param)
    local = param if index is None else param.to_local()
    local.copy_(full if index is None else full[index])


def check_buffers(model: nn.Module) -> None:
    """A meta-built network rebuilds its buffers with `init_buffers()`; NotImplementedError if it has none."""
    buffers = [n for n, _ in model.named_buffers()]
    if buffers and not hasattr(model, "init_buffers"):
        raise NotImplementedError(f"{type(model).__name__} has buffers {buffers[:3]} but no init_buffers(): a "
                                  "meta-device build cannot rebuild them; add the method or build it plainly")


def materialize(model: nn.Module, ops: Mapping[str, tuple[nn.Parameter, _InitOp]],
                state: Mapping[str, torch.Tensor] | None = None) -> None:
    """Fill every parameter's local shard from its replayed init op, or from `state` (a full state dict;
    a lazy mapping, e.g. safetensors' safe_open, keeps the peak at one tensor); then rebuild the buffers
    (and copy persistent ones from `state`)."""
    check_buffers(model)
    if state is not None:
        keys = set(model.state_dict().keys())
        missing = sorted(keys - set(state.keys()))
        unexpected = sorted(set(state.keys()) - keys)
        if missing or unexpected:
            raise ValueError(f"init weights do not fit this model: missing {missing[:5]}"
                             f"{'...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
                             f"{'...' if len(unexpected) > 5 else ''}")
    end_state = torch.get_rng_state()
    scratch = _Scratch()
    try:
        for name, param in model.named_parameters():
            if state is not None:
                full = state[name]
                if tuple(full.shape) != tuple(param.shape):
                    raise ValueError(f"init weights: {name} has shape {tuple(full.shape)}, this model expects "
                                     f"{tuple(param.shape)}")
            else:
                if name not in ops:
                    raise ValueError(f"parameter {name} was never initialised by the model's constructor")
                meta_param, op = ops[name]
                full = _replay(meta_param, op, scratch)
            _write_local(param, full)
            del full
    finally:
        torch.set_rng_state(end_state)
    if hasattr(model, "init_buffers"):
        model.init_buffers()
    if state is not None:
        with torch.no_grad():
            for name, buf in model.named_buffers():
                if name in state:
                    buf.copy_(state[name])


def record_meta_build(build) -> tuple[nn.Module, dict[str, tuple[nn.Parameter, _InitOp]]]:
    """Run `build()` on the meta device under InitRecorder -> (meta module, {name: (meta param, last op)}).

    The global CPU generator ends where a CPU build would leave it."""
    recorder = InitRecorder()
    with torch.device("meta"), recorder:
        model = build()
    by_id = recorder.last
    ops = {n: by_id[id(p)] for n, p in model.named_parameters() if id(p) in by_id}
    return model, ops


def build_training_model(model_cfg, seed: int, mesh, *, device: torch.device | str, family: str,
                         bf16: bool = False, compile: bool = False, activation_checkpointing: bool = False,
                         float8: bool = False, init_weights_state: Mapping[str, torch.Tensor] | None = None
                         ) -> nn.Module:
    """The family's sharded training network on `device`: built on meta, parallelized (float8, AC, compile,
    FSDP2 over the family's shard units), then each rank's shards materialised. Parameters equal the plain
    seeded build's (`torch.manual_seed(seed); family.build(cfg)`), or `init_weights_state` (a full state dict,
    strict: ValueError naming missing/unexpected keys or a wrong shape).

    model_cfg: the family's config or its dict. The global RNG is seeded with `seed` and left where the plain
    build leaves it.
    """
    fam = families.get(family)
    cfg = model_cfg if isinstance(model_cfg, fam.config_class) else fam.config_from_dict(dict(model_cfg))
    torch.manual_seed(seed)
    model, ops = record_meta_build(lambda: fam.build(cfg))
    check_buffers(model)
    model = parallelize(model, mesh, units=fam.shard_units, bf16=bf16, compile=compile,
                        activation_checkpointing=activation_checkpointing, float8=float8)
    model.to_empty(device=device)
    materialize(model, ops, init_weights_state)
    return model
