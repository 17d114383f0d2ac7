"""pipeline/report/report.py and pipeline/report/compare.py on synthetic run folders: figures computed from the inputs, valid PNGs."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
from PIL import Image

from pipeline.report.report import PAPER, ReportConfig, build_report, read_jsonl, stage_stats

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def write_stage(root, name: str, steps: int, step_s: float, workers: int, batch: int, mask: float = 0.0,
                use_gpu: bool = True, loss0: float = 1.0, model: dict | None = None, every: int = 10) -> list[dict]:
    """A stage folder as training leaves it: metrics.jsonl (a log line every `every` steps) + export/config.json."""
    folder = os.path.join(root, "train", name)
    os.makedirs(os.path.join(folder, "export"), exist_ok=True)
    rows = [{"step": s, "loss": loss0 / (1 + s / 50), "grad_norm": 0.5, "lr": 1e-4,
             "samples_per_s": batch / step_s, "step_s": step_s, "mem_gb": 1.5} for s in range(every, steps + 1, every)]
    with open(os.path.join(folder, "metrics.jsonl"), "w") as f:
        f.write("".join(json.dumps(r) + "\n" for r in reversed(rows)))  # order on disk does not matter
    stage = {"name": name, "resolution": 64, "mask_ratio": mask, "steps": steps, "global_batch": batch,
             "num_workers": workers, "use_gpu": use_gpu}
    config = {"stage": stage, "step": steps}
    if model is not None:
        config["model"] = model
    with open(os.path.join(folder, "export", "config.json"), "w") as f:
        json.dump(config, f)
    return rows


def write_grid(path, seed: int = 0):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (40, 60, 3), dtype=np.uint8)).save(path)


def valid_png(path) -> bool:
    with open(path, "rb") as f:
        if f.read(8) != PNG_SIGNATURE:
            return False
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        return im.size[0] > 50 and np.asarray(im.convert("L")).std() > 0  # a drawn figure, not a blank


def test_stage_stats_arithmetic():
    rows = [{"step": 10, "loss": 2.0, "step_s": 3.0, "data_wait_s": 1.5},
            {"step": 30, "loss": 1.0, "step_s": 1.5, "data_wait_s": 0.0},
            {"step": 40, "loss": 0.5, "samples_per_s": 64.0}]
    s = stage_stats(rows, {"global_batch": 32, "num_workers": 4, "use_gpu": True}, price=2.0, tail=2)
    seconds = 10 * 3.0 + 20 * 1.5 + 10 * 32 / 64.0  # window steps x seconds per step
    assert s["hours"] == pytest.approx(seconds / 3600)
    assert s["gpu_hours"] == pytest.approx(seconds / 3600 * 4)
    assert s["cost_usd"] == pytest.approx(seconds / 3600 * 4 * 2.0)
    assert s["samples"] == 40 * 32 and s["samples_per_s"] == pytest.approx(40 * 32 / seconds)
    assert s["final_loss"] == pytest.approx(0.75) and s["first_loss"] == 2.0
    assert s["input_wait"] == pytest.approx(10 * 1.5 / (10 * 3.0 + 20 * 1.5))  # over the windows that log it
    assert stage_stats(rows[1:], {"global_batch": 32}, price=2.0)["input_wait"] == 0.0
    assert stage_stats(rows[2:], {"global_batch": 32}, price=2.0)["input_wait"] is None  # not logged: unknown
    cpu = stage_stats(rows, {"global_batch": 32, "num_workers": 2, "use_gpu": False}, price=2.0)
    assert cpu["gpus"] == 0 and cpu["cost_usd"] == 0.0 and cpu["hours"] == pytest.approx(seconds / 3600)
    assert cpu["core_hours"] == pytest.approx(seconds / 3600 * 2)  # 2 workers x 1 CPU each (the default)
    plan_cpu = stage_stats(rows, {"batch": {"global_batch": 32, "num_workers": 2, "use_gpu": False,
                                            "cpus_per_worker": 0.5}}, price=2.0)
    assert plan_cpu["core_hours"] == pytest.approx(seconds / 3600) and s["core_hours"] == 0.0


def test_report_from_synthetic_run(tmp_path):
    root = str(tmp_path / "run")
    write_stage(root, "stage1", steps=100, step_s=36.0, workers=8, batch=2048, mask=0.75)
    write_stage(root, "stage2", steps=50, step_s=72.0, workers=8, batch=2048, loss0=0.5)
    with open(os.path.join(root, "config.json"), "w") as f:  # the run's stage order: stage2 listed first
        json.dump({"stages": [{"name": "stage2"}, {"name": "stage1"}]}, f)
    os.makedirs(os.path.join(root, "eval"))
    with open(os.path.join(root, "eval", "metrics.json"), "w") as f:
        json.dump({"fid": 23.456, "clip_score": 27.5, "num_images": 30000, "demo": {"caption_match": 0.75},
                   "protocol": {"num_images": 30000, "resolution": 256, "steps": 30, "guidance": 5.0, "seed": 0,
                                "use_ema": True}}, f)
    write_grid(os.path.join(root, "samples", "grid.png"))
    write_grid(os.path.join(root, "train", "stage1", "samples", "step_000000100.png"), seed=1)

    uri = build_report(root, ReportConfig(price_per_gpu_hour=3.75))
    assert uri == os.path.join(root, "report", "report.md")
    md = open(uri).read()
    hours = (100 * 36.0 + 50 * 72.0) / 3600  # 2 hours of training on 8 GPUs
    cost = hours * 8 * 3.75
    assert f"**${cost:,.2f}**" in md and "$60.00" in md and f"{hours * 8:,.2f} GPU-hours" in md
    assert md.index("| stage2 |") < md.index("| stage1 |")
    assert "| 23.46 |" in md and "| 27.50 |" in md and "75.00%" in md
    assert str(PAPER["fid_22m_real"]) in md and "$1,890" in md
    report = os.path.join(root, "report")
    for name in ("loss.png", "throughput.png", "samples.png", "samples_stage1.png"):
        assert f"]({name})" in md and valid_png(os.path.join(report, name))
    stats = json.load(open(os.path.join(report, "stats.json")))
    assert stats["stages"]["stage1"]["samples_per_s"] == pytest.approx(2048 / 36.0)
    assert stats["totals"]["cost_usd"] == pytest.approx(cost)
    assert stats["stages"]["stage1"]["final_loss"] == pytest.approx(np.mean([1 / (1 + s / 50) for s in
                                                                             range(60, 101, 10)]))
    page = open(os.path.join(report, "report.html")).read()
    assert "<table>" in page and 'src="loss.png"' in page
    # Rebuilding with another price rewrites the figures from the same inputs.
    build_report(root, ReportConfig(price_per_gpu_hour=2.0))
    assert f"**${hours * 8 * 2.0:,.2f}**" in open(uri).read()


def test_cpu_report_states_core_hours_and_only_what_ran(tmp_path):
    root = str(tmp_path / "run")
    write_stage(root, "stage1", steps=20, step_s=90.0, workers=2, batch=8, use_gpu=False)
    os.makedirs(os.path.join(root, "eval"))
    with open(os.path.join(root, "eval", "metrics.json"), "w") as f:  # demo only: no FID, no CLIP
        json.dump({"demo": {"caption_match": 0.5}, "protocol": {"num_images": 30000, "steps": 30}}, f)
    md = open(build_report(root)).read()
    assert "**1.00 core-hours**" in md and "GPU-hours" not in md  # 20 steps x 90 s x 2 workers
    assert "| 2 CPU cores | 1.000 core-h |" in md
    assert "Demo caption match" in md and "50.00%" in md
    assert "FID" not in md and "CLIP" not in md and "Protocol" not in md
    os.remove(os.path.join(root, "eval", "metrics.json"))
    assert "No evaluation ran." in open(build_report(root)).read()


def test_report_bad_inputs(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing to report"):
        build_report(str(tmp_path / "empty"))
    root = str(tmp_path / "run")
    write_stage(root, "stage1", steps=20, step_s=1.0, workers=1, batch=8)
    with pytest.raises(FileNotFoundError, match=r"stage\(s\) \['stage9'\]"):
        build_report(root, ReportConfig(stages=["stage1", "stage9"]))
    with open(os.path.join(root, "train", "stage1", "metrics.jsonl"), "a") as f:
        f.write("{not json\n")
    with pytest.raises(ValueError, match="line 3 is not JSON"):
        read_jsonl(os.path.join(root, "train", "stage1", "metrics.jsonl"))
    with pytest.raises(ValueError, match="price_per_gpu_hour"):
        ReportConfig(price_per_gpu_hour=-1)


# ------------------------------------------------------------------------------------------ compare

def test_equal_compute_plan_arithmetic():
    from model.microdit.config import flops_per_sample, model_config
    from pipeline.report.compare import equal_compute_plan
    from pipeline.core.plan import stage_config

    model = model_config("MicroDiT_XL_2")
    stage = stage_config({"name": "s1", "steps": 1000, "data": {"resolution": 256},
                          "objective": {"kind": "edm", "mask_ratio": 0.75},
                          "batch": {"global_batch": 2048, "micro_batch": 256, "num_workers": 8}})
    masked, plain = equal_compute_plan(model, stage, mask_ratios=(0.75, 0.0), downsample=8)
    f75, f0 = flops_per_sample(model, 0.75), flops_per_sample(model, 0.0)  # input_size 32 at 256 px, f=8
    assert masked.stage.steps == 1000 and masked.flops == pytest.approx(1000 * 2048 * f75)
    assert plain.stage.steps == int(1000 * 2048 * f75 // (2048 * f0)) and plain.stage.objective.mask_ratio == 0.0
    assert plain.flops <= masked.flops < plain.flops + 2048 * f0  # equal up to one step
    assert 1.5 < masked.stage.steps / plain.stage.steps < 4  # masking buys more steps, at most 1/(1-0.75)
    assert (masked.name, plain.name) == ("s1-mask75", "s1-mask0")
    budget = 1e18
    arms = equal_compute_plan(model, stage, budget_flops=budget)
    assert [a.stage.steps for a in arms] == [int(budget // (2048 * f75)), int(budget // (2048 * f0))]
    with pytest.raises(ValueError, match="buys no step"):
        equal_compute_plan(model, stage, budget_flops=1.0)
    with pytest.raises(ValueError, match="not a multiple"):
        equal_compute_plan(model, stage, downsample=7)


def test_compare_report(tmp_path):
    from dataclasses import asdict

    from model.microdit.config import flops_per_sample, model_config
    from pipeline.report.compare import compare_report

    model = model_config("MicroDiT_Debug")
    masked, plain = str(tmp_path / "masked"), str(tmp_path / "plain")
    write_stage(masked, "stage1", steps=120, step_s=1.0, workers=1, batch=16, mask=0.75, model=asdict(model))
    write_stage(plain, "stage1", steps=60, step_s=2.0, workers=1, batch=16, mask=0.0, model=asdict(model))
    for root, caption_match in ((masked, 0.5), (plain, 0.25)):
        os.makedirs(os.path.join(root, "eval"))
        with open(os.path.join(root, "eval", "metrics.json"), "w") as f:
            json.dump({"demo": {"caption_match": caption_match}}, f)
    uri = compare_report(masked, plain, str(tmp_path / "cmp"), labels=("masked", "unmasked"))
    md = open(uri).read()
    data = json.load(open(tmp_path / "cmp" / "compare.json"))
    assert data["totals"]["masked"]["flops"] == pytest.approx(120 * 16 * flops_per_sample(model, 0.75))
    assert data["totals"]["unmasked"]["flops"] == pytest.approx(60 * 16 * flops_per_sample(model, 0.0))
    assert data["totals"]["masked"]["samples"] == 1920 and "| samples seen | 1,920 | 960 |" in md
    assert "| demo caption match | 50.00% | 25.00% |" in md
    for name in ("loss_vs_flops.png", "loss_vs_samples.png"):
        assert valid_png(tmp_path / "cmp" / name)
    with pytest.raises(FileNotFoundError, match="no training metrics"):
        compare_report(masked, str(tmp_path / "nothing"), str(tmp_path / "cmp2"))
    with pytest.raises(ValueError, match="two distinct names"):
        compare_report(masked, plain, str(tmp_path / "cmp3"), labels=("a", "b", "c"))


def test_report_on_s3(tmp_path, s3_endpoint, s3_bucket, monkeypatch):
    from pipeline.core import storage

    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    local = str(tmp_path / "run")
    write_stage(local, "stage1", steps=40, step_s=90.0, workers=4, batch=64)
    write_grid(os.path.join(local, "samples", "grid.png"))
    root = f"s3://{s3_bucket}/runs/r1"
    for folder, _, files in os.walk(local):
        for name in files:
            path = os.path.join(folder, name)
            storage.write_bytes(storage.join(root, os.path.relpath(path, local)), open(path, "rb").read())
    uri = build_report(root)
    assert uri == f"{root}/report/report.md"
    md = storage.read_bytes(uri).decode()
    assert f"**${40 * 90.0 / 3600 * 4 * 3.75:,.2f}**" in md and "| stage1 |" in md
    assert storage.read_bytes(f"{root}/report/loss.png").startswith(PNG_SIGNATURE)
    assert storage.exists(f"{root}/report/samples.png")
