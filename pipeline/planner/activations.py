"""Bytes a training step saves for backward, per sample: measured, then modelled per token.

Measured by running the stage's real loss (its objective on its network, bf16 parameters as FSDP2's mixed precision
gives the forward) on the meta device: autograd records every tensor it saves, with shape and dtype, and nothing is
computed or allocated. Parameters and inputs are left out (they are counted with the weights), each storage once.
Attention is measured as the GPU's flash kernel saves it (q, k, v, the output and a float32 log-sum-exp per query):
on the meta device SDPA would decompose into the math path and save the T x T scores, which flash never does.

Per block (the family's shard units) the bytes are attributed to the block running when they are saved, so the
model can also say what activation checkpointing keeps: each block's input, plus one block's own activations while
it is recomputed in backward, plus everything outside the blocks.

The model: bytes per sample = a + b x tokens, fitted from two small token counts, scaled to the stage's tokens; the
tests check it against direct measurements at two other sizes (within 15%).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from model.objectives.objective import build as build_objective


class _FlashSaves(torch.autograd.Function):
    """SDPA with exactly what the flash kernel keeps for backward (meta tensors: nothing is computed)."""

    @staticmethod
    def forward(ctx, q, k, v):
        out = torch.empty_like(q[..., :v.shape[-1]]).expand(*q.shape[:-1], v.shape[-1]).contiguous()
        lse = q.new_empty(q.shape[:-1], dtype=torch.float32)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad):  # never run: the planner measures, it does not train
        raise RuntimeError("measurement only")


def _flash_like(q, k, v, *args, **kwargs):
    return _FlashSaves.apply(q, k, v)


@dataclass
class Saved:
    """Saved-for-backward bytes of one step: in total, and the parts activation checkpointing keeps."""

    total: int
    outside_blocks: int  # saved while no block runs (embedders, loss, final layer)
    largest_block: int  # the most any one block saves
    block_inputs: int  # the sum of every block's input tensors (what checkpointing keeps per block)

    def with_checkpointing(self) -> int:
        return self.outside_blocks + self.block_inputs + self.largest_block


_MEASURED: dict[str, Saved] = {}  # a plan measures the same shapes for several stages and clusters


def measure(family, cfg, objective_config, batch: int, unconditional_shape: tuple[int, int] | None = None) -> Saved:
    """Saved bytes of one training loss on `batch` samples of the network `cfg` (module docstring); remembered per
    process by the configs' reprs (dataclasses and pydantic models: every field)."""
    key = repr((family.name, cfg, objective_config, batch, unconditional_shape))
    if key not in _MEASURED:
        _MEASURED[key] = _measure(family, cfg, objective_config, batch, unconditional_shape)
    return _MEASURED[key]


def _measure(family, cfg, objective_config, batch: int, unconditional_shape: tuple[int, int] | None) -> Saved:
    with torch.device("meta"):
        net = family.build(cfg).to(torch.bfloat16)
    units = family.shard_units(net)
    skip = {t.untyped_storage()._cdata for t in [*net.parameters(), *net.buffers()]}
    per_unit = [0] * len(units)
    inputs, outside, active = [0], [0], []
    seen: set[int] = set()

    def pack(t):
        key = t.untyped_storage()._cdata
        if key not in skip and key not in seen:
            seen.add(key)
            nbytes = t.untyped_storage().nbytes()
            if active:
                per_unit[active[-1]] += nbytes
            else:
                outside[0] += nbytes
        return t

    hooks = []
    for i, unit in enumerate(units):
        def pre(module, args, i=i):
            active.append(i)
            inputs[0] += sum(a.numel() * a.element_size() for a in args if torch.is_tensor(a))

        def post(module, args, out):
            active.pop()  # returns None: a forward hook's return value would replace the output

        hooks += [unit.register_forward_pre_hook(pre), unit.register_forward_hook(post)]
    c, h, w = cfg.in_channels, cfg.input_size, cfg.input_size
    latents = torch.empty(batch, c, h, w, device="meta", dtype=torch.bfloat16)
    caption = torch.empty(batch, cfg.caption_len, cfg.caption_dim, device="meta", dtype=torch.bfloat16)
    skip |= {latents.untyped_storage()._cdata, caption.untyped_storage()._cdata}
    objective = build_objective(objective_config)
    if unconditional_shape is not None:
        uncond = torch.zeros(*unconditional_shape, device="meta", dtype=torch.bfloat16)
        skip.add(uncond.untyped_storage()._cdata)
        objective = objective.bind(unconditional=uncond)
    extras = {}
    if getattr(objective_config, "repa_weight", 0) > 0:
        feats = torch.empty(batch, cfg.num_patches, cfg.repa_dim, device="meta", dtype=torch.bfloat16)
        skip.add(feats.untyped_storage()._cdata)
        extras[objective.REPA_FEATURES] = feats
    try:
        with _sdpa_as_flash(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            objective.loss(net, latents, caption, None, extras)
    finally:
        for hook in hooks:
            hook.remove()
    return Saved(sum(per_unit) + outside[0], outside[0], max(per_unit, default=0), inputs[0])


@contextlib.contextmanager
def _sdpa_as_flash():
    real = F.scaled_dot_product_attention
    F.scaled_dot_product_attention = _flash_like
    try:
        yield
    finally:
        F.scaled_dot_product_attention = real


@dataclass
class ActivationModel:
    """Saved bytes per sample = fixed + per_token x tokens (without and with activation checkpointing)."""

    fixed: float
    per_token: float
    fixed_ac: float
    per_token_ac: float

    def per_sample(self, tokens: int, checkpointing: bool) -> float:
        return (self.fixed_ac + self.per_token_ac * tokens) if checkpointing else (self.fixed + self.per_token * tokens)


MIN_TOKENS = 16  # below this, masking keeps a token or two and rounding dominates the fit


def small_sides(cfg_at, target: int) -> tuple[int, int]:
    """The two smallest latent sides around `target` that the network accepts (E-MMDiT tiles its tokens in runs, so
    few sides fit it) with at least MIN_TOKENS tokens: where the per-token model is fitted."""
    valid = []
    for side in sorted({max(1, target // 8), max(1, target // 4), max(1, target // 2), target, 2 * target,
                        4 * target}):
        try:
            if cfg_at(side).num_patches >= MIN_TOKENS:
                valid.append(side)
        except ValueError:
            continue
    if len(valid) < 2:
        raise ValueError(f"no two latent sides near {target} that this network accepts: {valid}")
    return valid[0], valid[1]


def fit(family, cfg_at, objective_config, sides: tuple[int, int],
        unconditional_shape: tuple[int, int] | None = None) -> ActivationModel:
    """The per-token model from measurements at two latent sides (`cfg_at(side)` -> the network there), one sample
    each."""
    points = []
    for side in sides:
        cfg = cfg_at(side)
        saved = measure(family, cfg, objective_config, 1, unconditional_shape)
        points.append((cfg.num_patches, saved.total, saved.with_checkpointing()))
    (t1, a1, c1), (t2, a2, c2) = points
    slope, slope_ac = (a2 - a1) / (t2 - t1), (c2 - c1) / (t2 - t1)
    return ActivationModel(a1 - slope * t1, slope, c1 - slope_ac * t1, slope_ac)
