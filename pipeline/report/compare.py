"""Equal-compute comparison of masked and unmasked training: the step arithmetic and a side-by-side report.

At a fixed FLOP budget a masked run (mask_ratio 0.75: the backbone sees a quarter of the tokens) affords more
optimizer steps than an unmasked one; `equal_compute_plan` gives each arm its steps from
model.microdit.config.flops_per_sample, and `compare_report` puts two finished runs side by side by FLOPs and samples.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Sequence

from model import family as families
from model.microdit.config import flops_per_sample
from model.objectives.configs import config_from_dict as objective_config
from pipeline.core import storage
from pipeline.core.layout import Layout
from pipeline.core.plan import stage_config
from pipeline.report.report import ReportConfig, _fmt, _stage_names, plot_curves, read_jsonl
from pipeline.report.report import stage_fields


@dataclass(frozen=True)
class Arm:
    """One side of the comparison: its stage config (steps set from the budget) and its compute."""

    name: str
    stage: Any  # pipeline.core.plan.StageConfig
    flops_per_sample: float
    flops: float  # steps x global_batch x flops_per_sample


def equal_compute_plan(model_cfg, stage_cfg, budget_flops: float | None = None,
                       mask_ratios: Sequence[float] = (0.75, 0.0), downsample: int = 8) -> list[Arm]:
    """Stage configs with the same training FLOPs, one per mask ratio (steps = budget // per-step FLOPs).

    model_cfg: ModelConfig (its input_size is set from the stage resolution / VAE `downsample`).
    budget_flops: None -> what `stage_cfg` itself costs (its steps at its own mask ratio).
    """
    stage = stage_config(stage_cfg)
    resolution, batch = stage.data.resolution, stage.batch.global_batch
    if stage.objective.kind != "edm":
        raise ValueError(f"equal-compute masking arms need a masked objective (edm), got {stage.objective.kind!r}")
    if resolution % downsample:
        raise ValueError(f"resolution {resolution} is not a multiple of the VAE downsample {downsample}")
    cfg = dataclasses.replace(model_cfg, input_size=resolution // downsample)
    if budget_flops is None:
        budget_flops = stage.steps * batch * flops_per_sample(cfg, stage.objective.mask_ratio)
    if not budget_flops > 0:
        raise ValueError(f"budget_flops={budget_flops}: expected > 0")
    arms = []
    for ratio in mask_ratios:
        fps = flops_per_sample(cfg, ratio)
        steps = int(budget_flops // (batch * fps))
        if steps < 1:
            raise ValueError(f"budget {budget_flops:.3g} FLOPs buys no step at mask_ratio={ratio} "
                             f"({batch} x {fps:.3g} FLOPs per step)")
        warmup = stage.optim.schedule.warmup_steps
        if warmup > steps:
            raise ValueError(f"mask_ratio={ratio}: {steps} steps is fewer than the warmup "
                             f"({warmup}); raise the budget or lower the warmup")
        name = f"{stage.name}-mask{int(round(ratio * 100))}"
        arm_stage = stage_config({**stage.model_dump(mode="json"), "name": name, "steps": steps,
                                  "objective": {**stage.objective.model_dump(mode="json"), "mask_ratio": ratio}})
        arms.append(Arm(name, arm_stage, fps, steps * batch * fps))
    return arms


def run_curves(root: str) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Metric rows of a run's stages in order, with cumulative `samples` and `flops`; plus totals."""
    rows, samples, flops, paths = [], 0, 0.0, Layout(root)
    for name in _stage_names(root, ReportConfig()):
        export = paths.export_config(name)
        if not storage.exists(export):
            raise FileNotFoundError(f"{export!r} does not exist; compare needs each stage's model and stage config")
        config = storage.read_json(export)
        stage, model = stage_fields(config.get("stage") or {}), config.get("model")
        if model is None or not stage.get("global_batch"):
            raise ValueError(f"{export!r} needs 'model' and the stage's global batch to count FLOPs")
        fam = families.get(config.get("family", families.DEFAULT))
        objective = config.get("objective") or {"kind": "edm", "mask_ratio": float(stage.get("mask_ratio") or 0.0)}
        fps = fam.flops_per_sample(fam.config_from_dict(model), objective_config(objective))
        batch, last = int(stage["global_batch"]), 0
        for r in read_jsonl(paths.stage_metrics(name)):
            n = (r["step"] - last) * batch
            samples, flops, last = samples + n, flops + n * fps, r["step"]
            rows.append({**r, "stage": name, "samples": samples, "flops": flops})
    metrics = storage.read_json(paths.metrics) if storage.exists(paths.metrics) else {}
    final = [r["loss"] for r in rows if r.get("loss") is not None][-5:]
    return rows, {"samples": samples, "flops": flops,
                  "final_loss": sum(final) / len(final) if final else None, "metrics": metrics}


def compare_report(run_a_root: str, run_b_root: str, out_uri: str, labels: Sequence[str] = ("A", "B")) -> str:
    """Write out_uri/compare.md (+ loss_vs_flops.png, loss_vs_samples.png, compare.json); returns compare.md."""
    if len(labels) != 2 or labels[0] == labels[1]:
        raise ValueError(f"labels={tuple(labels)}: expected two distinct names, one per run")
    curves, totals = {}, {}
    for label, root in zip(labels, (run_a_root, run_b_root), strict=True):
        rows, tot = run_curves(root)
        if not rows:
            raise FileNotFoundError(f"no training metrics under {Layout(root).train_root!r}")
        curves[label], totals[label] = rows, tot
    storage.write_bytes(storage.join(out_uri, "loss_vs_flops.png"),
                        plot_curves(curves, "loss", "training loss", x="flops", xlabel="training FLOPs", logy=True))
    storage.write_bytes(storage.join(out_uri, "loss_vs_samples.png"),
                        plot_curves(curves, "loss", "training loss", x="samples", xlabel="samples seen", logy=True))
    lines = ["# Equal-compute comparison", "", "| | " + " | ".join(labels) + " |", "|---|" + "---|" * len(labels)]

    def row(title, fn):
        lines.append(f"| {title} | " + " | ".join(fn(totals[lab]) for lab in labels) + " |")

    lines.append("| run root | " + " | ".join(f"`{r}`" for r in (run_a_root, run_b_root)) + " |")
    row("training FLOPs", lambda t: f"{t['flops']:.4g}")
    row("samples seen", lambda t: f"{t['samples']:,}")
    row("final training loss", lambda t: _fmt(t["final_loss"], ".4f"))
    row("FID", lambda t: _fmt(t["metrics"].get("fid"), ".2f"))
    row("CLIP score", lambda t: _fmt(t["metrics"].get("clip_score"), ".2f"))
    row("demo caption match", lambda t: _fmt((t["metrics"].get("demo") or {}).get("caption_match"), ".2%"))
    lines += ["", "Masked training averages its loss over kept patches only, so training losses are a rough guide;",
              "the evaluation metrics compare the two models on equal terms.", "",
              "![loss vs FLOPs](loss_vs_flops.png)", "", "![loss vs samples](loss_vs_samples.png)", ""]
    storage.write_json(storage.join(out_uri, "compare.json"), {"runs": dict(zip(labels, (run_a_root, run_b_root), strict=True)),
                                                               "totals": totals})
    uri = storage.join(out_uri, "compare.md")
    storage.write_bytes(uri, "\n".join(lines).encode())
    return uri
