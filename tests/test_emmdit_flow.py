"""The E-MMDiT tiny recipe end to end through the full-run flow on moto's S3 (in process, against the fixture
Prefect server and Ray head): download -> precompute (tiny DC-AE, compact tiny-Llama states) -> both stages ->
sample grid -> evaluate (demo caption match) -> report, every output in the bucket."""
from __future__ import annotations

from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(2400)]

RECIPE = str(Path(__file__).resolve().parents[1] / "recipes" / "emmdit_tiny.yaml")
SHRINK = [
    "encoders.vae=tiny-dcae",  # the real DC-AE code path (the recipe's demo default is the stand-in)
    "sources.synthetic.options.n=48",
    "download.number_sample_per_shard=32",
    "sample.steps=2", "sample.prompts=['a large red circle on a white background, center']",
    "evaluate.steps=2", "evaluate.demo_prompts=['a large blue square on a white background, center']",
] + [o for name in ("stage1", "stage2")
     for o in (f"stages.{name}.steps=2", f"stages.{name}.checkpoint.every=2", f"stages.{name}.log_every=1",
               f"stages.{name}.batch.global_batch=8", f"stages.{name}.batch.micro_batch=8",
               f"stages.{name}.batch.num_workers=1", f"stages.{name}.sampling.prompts=2",
               f"stages.{name}.sampling.steps=2", f"stages.{name}.optim.schedule.warmup_steps=0")]


def test_emmdit_tiny_recipe_runs_end_to_end_on_s3(prefect_server, ray_address, s3_endpoint, s3_bucket, monkeypatch):
    import ray

    from flows.full_run import full_run
    from pipeline.core import schema, storage

    ray.shutdown()  # reconnect inside the flow with the S3 endpoint in the workers' environment
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    root = f"s3://{s3_bucket}/run"
    try:
        full_run(recipe=RECIPE, overrides=[f"storage={root}", f"ray_address={ray_address}", *SHRINK])
    finally:
        ray.shutdown()
    latents = f"{root}/data/latents/synthetic"
    assert storage.exists(f"{latents}/{schema.UNCONDITIONAL_FILE}") and storage.exists(f"{latents}/_SUCCESS")
    for stage in ("stage1", "stage2"):
        config = storage.read_json(f"{root}/train/{stage}/export/config.json")
        assert (config["family"], config["objective"]["kind"], config["sampler"]["kind"]) == \
            ("emmdit", "rectified_flow", "euler")
        assert config["unconditional"] == schema.UNCONDITIONAL_FILE
    assert storage.exists(f"{root}/samples/grid.png")
    metrics = storage.read_json(f"{root}/eval/metrics.json")
    assert "caption_match" in metrics["demo"]
    assert "E-MMDiT" in storage.read_bytes(f"{root}/report/report.md").decode()
