"""A recipe's plan on a cluster: per stage its samples, FLOPs, hours and cost at an MFU, its memory per GPU and the
largest micro-batch that fits, the data it reads; for the whole recipe GPU-hours, days and dollars, and the storage
its rows take.

FLOPs per sample are the family's own count (`flops_per_sample`, checked against FlopCounterMode in the tests). The
MFU is the one given, else one the GPU suite measured for that GPU kind (`bench/results/`), else the MicroDiT paper's
run's by our FLOP count (said in the plan).
"""
from __future__ import annotations

import dataclasses

from model import family as families
from model.encoders.dino import feature_width
from pipeline.core import storage
from pipeline.core.layout import Layout
from pipeline.core.plan import RunConfig
from pipeline.planner import activations, memory
from pipeline.planner.clusters import Cluster, parse_cluster
from pipeline.planner.data import INPUT_SOURCE, cores_per_gpu, latent_geometry, read_bytes_per_sample, row_bytes
from pipeline.planner.measured import measured_mfu, precompute_hours
from pipeline.planner.plan import Plan, StagePlan
from pipeline.planner.render import markdown
from pipeline.train.network import stage_model_config, uses_repa

# The MicroDiT paper's run by our FLOP count: 686M samples, 328.6 EFLOP (what the network runs: masked tokens never
# computed, each token through the experts that chose it) in 2.6 days on 8 x H100 at 989 TFLOP/s: 18.5% of peak.
# 6 x 1.16B parameters x kept tokens (592 EFLOP) says 33%; masked tokens counted as computed (748 EFLOP) say 42%.
PAPER_MFU = 0.185
MFU_BASES = ("executed", "6nd")


def _divisors_up_to(n: int, limit: int) -> int:
    return max((d for d in range(1, max(1, limit) + 1) if n % d == 0), default=0)


def six_nd_flops(parameters: int, num_patches: int, mask_ratio: float | None) -> float:
    """6 x every parameter x the tokens a sample keeps: the rule-of-thumb count (MoE experts all counted, attention
    not) in which MicroDiT's run is quoted at about 34% of peak."""
    return 6.0 * parameters * int(num_patches * (1 - (mask_ratio or 0.0)))


def plan_run(run: RunConfig, cluster: Cluster, price: float, mfu: float | None = None,
             images: int | None = None, recipe: str = "", mfu_basis: str = "executed") -> Plan:
    """The plan of `run` on `cluster` (module docstring). `mfu_basis` says which FLOPs a given MFU counts:
    "executed" (what the network runs; what training metrics and the GPU suite report) or "6nd" (`six_nd_flops`)."""
    if mfu_basis not in MFU_BASES:
        raise ValueError(f"mfu_basis={mfu_basis!r}: expected one of {', '.join(MFU_BASES)}")
    if mfu_basis != "executed" and mfu is None:
        raise ValueError(f"mfu_basis={mfu_basis!r} needs the MFU given: measured and assumed MFUs count executed FLOPs")
    if mfu is not None and not 0 < mfu <= 1:
        raise ValueError(f"mfu={mfu}: expected a fraction in (0, 1]")
    if price < 0:
        raise ValueError(f"price={price}: expected >= 0 dollars per GPU-hour")
    if images is not None and images < 1:
        raise ValueError(f"images={images}: expected a positive count")
    fam = families.get(run.model.family)
    found = measured_mfu(cluster.gpu.name, fam.name) if mfu is None else None
    mfu, mfu_source = (mfu, "given") if mfu is not None else found or (
        PAPER_MFU, "assumed: the MicroDiT paper's run by our FLOP count; no GPU-suite figure for this GPU")
    gpus, capacity = cluster.gpus, cluster.gpu.memory_gib * memory.GIB
    base = fam.config(run.model.preset, **run.model.overrides())
    caption = (base.caption_len, base.caption_dim)
    channels, downsample = latent_geometry(fam, run.encoders.vae, base.in_channels)
    repa_shape, rates = None, []
    plan = Plan(recipe=recipe or run.name, family=fam.name, cluster=cluster.label, gpus=gpus,
                peak_flops=cluster.gpu.peak_bf16, gpu_source=cluster.gpu.source, price_per_gpu_hour=price, mfu=mfu,
                mfu_source=mfu_source, mfu_basis=mfu_basis, stages=[], totals={}, data={},
                assumptions=[f"{memory.OVERHEAD / memory.GIB:g} GiB per GPU for the CUDA context, NCCL buffers and "
                             "allocator slack (not measured)",
                             "activations: saved-for-backward bytes of the stage's loss on the meta device, bf16, "
                             "flash attention (pipeline/planner/activations.py)",
                             f"input cost: {INPUT_SOURCE}"])
    for stage in run.stages:
        side = stage.data.resolution // downsample
        _, cfg = stage_model_config(run.model, stage, (channels, side, side), caption)
        objective = stage.objective.config()
        samples = stage.steps * stage.batch.global_batch
        per_sample = fam.flops_per_sample(cfg, objective)
        flops = per_sample * samples
        state = memory.state_bytes(fam, cfg, gpus)
        mask_ratio = getattr(objective, "mask_ratio", None)
        timed = flops if mfu_basis == "executed" else six_nd_flops(state.parameters, cfg.num_patches,
                                                                   mask_ratio) * samples
        hours = timed / (gpus * cluster.gpu.peak_bf16 * mfu) / 3600
        uncond = caption if fam.text.unconditional == "empty_prompt" else None

        def at(s, cfg=cfg):  # the stage's network at another latent side (memory does not depend on positions)
            return dataclasses.replace(cfg, input_size=s)

        act_model = activations.fit(fam, at, objective, activations.small_sides(at, side), uncond)
        ac = stage.batch.activation_checkpointing
        act = act_model.per_sample(cfg.num_patches, ac) * stage.batch.micro_batch
        total = state.static + state.gathered + act + memory.OVERHEAD
        room = capacity - state.static - state.gathered - memory.OVERHEAD
        per_gpu_batch = stage.batch.global_batch // gpus if stage.batch.global_batch % gpus == 0 else 0
        largest = {mode: max(0, int(room // act_model.per_sample(cfg.num_patches, mode))) for mode in (False, True)}
        mem = {"weights": state.weights, "gradients": state.gradients, "optimizer": state.optimizer, "ema": state.ema,
               "gathered": state.gathered, "activations": act, "overhead": memory.OVERHEAD, "total": total,
               "capacity": capacity, "fits": total <= capacity, "checkpointing": ac,
               "activation_per_sample": act_model.per_sample(cfg.num_patches, ac),
               "largest_micro_batch": largest[False], "largest_micro_batch_checkpointing": largest[True],
               "largest_dividing_micro_batch": _divisors_up_to(per_gpu_batch, largest[ac]) if per_gpu_batch else None,
               "parameters": state.parameters}
        if uses_repa(stage) and run.encoders.repa:
            repa_shape = (cfg.num_patches, feature_width(run.encoders.repa))  # as stored (pipeline/core/schema.py)
        rates.append(samples / (hours * 3600) / gpus)
        plan.stages.append(StagePlan(
            name=stage.name, resolution=stage.data.resolution, mask_ratio=mask_ratio,
            steps=stage.steps, global_batch=stage.batch.global_batch, micro_batch=stage.batch.micro_batch,
            samples=samples, flops_per_sample=per_sample, flops=flops, hours=hours, gpu_hours=hours * gpus,
            cost_usd=hours * gpus * price, memory=mem, data={}))
        if not mem["fits"]:
            fix = (f"the largest micro-batch that fits is {largest[ac]}" if largest[ac] else
                   "not even one sample fits") + ("" if ac else
                                                   f" ({largest[True]} with activation checkpointing)")
            plan.warnings.append(f"stage {stage.name!r} does not fit: {total / memory.GIB:.1f} GiB per GPU of "
                                 f"{capacity / memory.GIB:g} GiB at micro-batch {stage.batch.micro_batch}; {fix}")
        if stage.batch.global_batch % (stage.batch.micro_batch * gpus):
            plan.warnings.append(f"stage {stage.name!r}: global batch {stage.batch.global_batch} is not a multiple of "
                                 f"micro-batch {stage.batch.micro_batch} x {gpus} GPUs")
    hours = sum(s.hours for s in plan.stages)
    plan.totals = {"hours": hours, "days": hours / 24, "gpu_hours": hours * gpus,
                   "cost_usd": hours * gpus * price, "samples": sum(s.samples for s in plan.stages),
                   "flops": sum(s.flops for s in plan.stages)}
    # Every row stores what any stage reads; each stage reads its own part of it.
    rows = row_bytes((channels, downsample), caption, run.precompute.resolutions, repa_shape)
    for s, stage, rate in zip(plan.stages, run.stages, rates):
        read = read_bytes_per_sample(rows, stage.data.resolution, uses_repa(stage))
        s.data = {"bytes_per_sample": read, "samples_per_s_per_gpu": rate, "input_mb_per_s_per_gpu": rate * read / 1e6,
                  "cpu_cores_per_gpu": cores_per_gpu(rate * read)}
    per_row = sum(rows.values())
    plan.data = {"row_bytes": rows, "bytes_per_row": per_row, "storage_per_million_images": per_row * 1e6,
                 "images": images, "storage": per_row * images if images else None,
                 "precompute": precompute_hours(cluster.gpu.name, fam.name, run.precompute.resolutions, images)}
    return plan


def write_estimate(run: RunConfig) -> tuple[str, str]:
    """The run's forecast on its `estimate.cluster` under {root}/estimate/ (JSON and Markdown); (JSON URI, Markdown)."""
    plan = plan_run(run, parse_cluster(run.estimate.cluster), run.report.price_per_gpu_hour, run.estimate.mfu,
                    run.estimate.images)
    paths = Layout(run.storage)
    md = markdown(plan)
    storage.write_bytes(storage.join(paths.estimate_dir, "estimate.md"), md.encode())
    storage.write_json(paths.estimate, plan.to_dict())  # last: the record that the step is done
    return paths.estimate, md
