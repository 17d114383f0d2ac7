"""A plan as text (the CLI) and Markdown (the Prefect artifact, the report), and beside what a run measured."""
from __future__ import annotations

from pipeline.planner.memory import GIB
from pipeline.planner.plan import Plan


def _gib(n: float) -> str:
    return f"{n / GIB:.1f}"


def _size(n: float) -> str:
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} B"


def markdown(plan: Plan) -> str:
    """The plan as Markdown tables (time and cost, memory per GPU, data), then its warnings and assumptions."""
    t = plan.totals
    lines = [f"# Plan: {plan.recipe} on {plan.cluster}", "",
             f"**{t['days']:.2f} days, {t['gpu_hours']:,.0f} GPU-hours, ${t['cost_usd']:,.0f}** at "
             f"${plan.price_per_gpu_hour:.2f} per GPU-hour and {plan.mfu:.1%} MFU ({plan.mfu_source}"
             f"{', of 6 x parameters x kept tokens' if plan.mfu_basis == '6nd' else ''}); peak "
             f"{plan.peak_flops / 1e12:,.1f} TFLOP/s per GPU ({plan.gpu_source}).", "",
             "| stage | res | mask | steps | samples | GFLOP/sample | hours | GPU-hours | cost ($) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for s in plan.stages:
        mask = "-" if s.mask_ratio is None else f"{s.mask_ratio:.2f}"
        lines.append(f"| {s.name} | {s.resolution} | {mask} | {s.steps:,} | {s.samples / 1e6:,.1f}M | "
                     f"{s.flops_per_sample / 1e9:,.1f} | {s.hours:,.1f} | {s.gpu_hours:,.0f} | {s.cost_usd:,.0f} |")
    lines += ["", "Memory per GPU (GiB):", "",
              "| stage | micro-batch | weights | grads | AdamW | EMA | gathered | activations | overhead | total | "
              "fits | largest micro-batch (with checkpointing) |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for s in plan.stages:
        m = s.memory
        lines.append(f"| {s.name} | {s.micro_batch}{' (AC)' if m['checkpointing'] else ''} | {_gib(m['weights'])} | "
                     f"{_gib(m['gradients'])} | {_gib(m['optimizer'])} | {_gib(m['ema'])} | {_gib(m['gathered'])} | "
                     f"{_gib(m['activations'])} | {_gib(m['overhead'])} | **{_gib(m['total'])}** / "
                     f"{_gib(m['capacity'])} | {'yes' if m['fits'] else '**NO**'} | {m['largest_micro_batch']} "
                     f"({m['largest_micro_batch_checkpointing']}) |")
    d = plan.data
    lines += ["", "Data:", "",
              "| stage | bytes a sample | samples/s per GPU | input MB/s per GPU | CPU cores per GPU |",
              "|---|---|---|---|---|"]
    for s in plan.stages:
        lines.append(f"| {s.name} | {_size(s.data['bytes_per_sample'])} | {s.data['samples_per_s_per_gpu']:,.0f} | "
                     f"{s.data['input_mb_per_s_per_gpu']:,.0f} | {s.data['cpu_cores_per_gpu']:.2f} |")
    rows = ", ".join(f"{k} {_size(v)}" for k, v in d["row_bytes"].items())
    lines += ["", f"A stored row: {_size(d['bytes_per_row'])} ({rows}); {_size(d['storage_per_million_images'])} per "
                  "million images" + (f", {_size(d['storage'])} for {d['images']:,} images." if d["images"] else ".")]
    pre = d["precompute"]
    if "reason" in pre:
        lines += ["", f"Precompute GPU-hours: not estimated; {pre['reason']}."]
    else:
        hours = f"{pre['gpu_hours']:,.1f} GPU-hours for {d['images']:,} images" if d["images"] else \
            "give --images for the GPU-hours"
        lines += ["", f"Precompute: {pre['seconds_per_image'] * 1e3:.2f} GPU-ms per image, {hours} "
                      f"({pre['source']})."]
    if plan.warnings:
        lines += ["", "**Warnings**", ""] + [f"- {w}" for w in plan.warnings]
    lines += ["", "Assumptions: " + "; ".join(plan.assumptions) + "."]
    return "\n".join(lines) + "\n"


def beside_measured(plan: dict, measured: dict[str, dict]) -> list[str]:
    """Markdown lines: the plan's hours, cost and memory per stage beside what the run's stages measured (report.py
    stats: hours, cost_usd, mem_gb)."""
    lines = [f"Planned for {plan['cluster']} at {plan['mfu']:.1%} MFU ({plan['mfu_source']}); measured on this run's "
             "own devices.", "",
             "| stage | planned h | measured h | planned $ | measured $ | planned GiB/GPU | measured GiB |",
             "|---|---|---|---|---|---|---|"]
    for s in plan["stages"]:
        m = measured.get(s["name"]) or {}
        mem = m.get("mem_gb")
        lines.append(f"| {s['name']} | {s['hours']:,.2f} | {m.get('hours', float('nan')):,.2f} | "
                     f"{s['cost_usd']:,.0f} | {m.get('cost_usd', float('nan')):,.2f} | "
                     f"{s['memory']['total'] / GIB:.1f} | {'-' if mem is None else f'{mem:.2f}'} |")
    return lines
