"""The E-MMDiT tiny recipe end to end through the full-run flow (in process, against the fixture Prefect server
and Ray head): download -> precompute (tiny DC-AE, compact tiny-Llama states) -> both stages -> sample grid ->
evaluate (demo caption match) -> report."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(2400)]

RECIPE = str(Path(__file__).resolve().parents[1] / "recipes" / "emmdit_tiny.yaml")
SHRINK = [
    "sources.synthetic.options.n=48",
    "download.number_sample_per_shard=32",
    "sample.steps=2", "sample.prompts=['a large red circle on a white background, center']",
    "evaluate.steps=2", "evaluate.demo_prompts=['a large blue square on a white background, center']",
] + [o for name in ("stage1", "stage2")
     for o in (f"stages.{name}.steps=2", f"stages.{name}.checkpoint.every=2", f"stages.{name}.log_every=1",
               f"stages.{name}.batch.global_batch=8", f"stages.{name}.batch.micro_batch=8",
               f"stages.{name}.batch.num_workers=1", f"stages.{name}.sampling.prompts=2",
               f"stages.{name}.sampling.steps=2", f"stages.{name}.optim.schedule.warmup_steps=0")]


def test_emmdit_tiny_recipe_runs_end_to_end(prefect_server, ray_address, tmp_path):
    from flows.full_run import full_run
    from pipeline.core import schema

    root = tmp_path / "run"
    out = full_run(recipe=RECIPE, overrides=[f"storage={root}", f"ray_address={ray_address}", *SHRINK])
    latents = root / "data" / "latents" / "synthetic"
    assert (latents / schema.UNCONDITIONAL_FILE).is_file() and (latents / "_SUCCESS").is_file()
    for stage in ("stage1", "stage2"):
        config = json.loads((root / "train" / stage / "export" / "config.json").read_text())
        assert (config["family"], config["objective"]["kind"], config["sampler"]["kind"]) == \
            ("emmdit", "rectified_flow", "euler")
        assert config["unconditional"] == schema.UNCONDITIONAL_FILE
    assert Path(out["sample_grid"]).exists() or (root / "samples" / "grid.png").is_file()
    metrics = json.loads((root / "eval" / "metrics.json").read_text())
    assert "caption_match" in metrics["demo"]
    report = next((root / "report").glob("*.md")).read_text() if (root / "report").is_dir() else ""
    assert "E-MMDiT" in report
