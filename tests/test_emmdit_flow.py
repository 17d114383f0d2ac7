"""The E-MMDiT tiny recipe end to end through the full-run flow on moto's S3 (tests/shared_runs.py `emmdit_flow`):
download -> precompute (tiny DC-AE, compact tiny-Llama states, REPA features) -> both stages -> sample grid ->
evaluate (demo caption match) -> report, every output in the bucket."""
from __future__ import annotations

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(2400)]


def test_emmdit_tiny_recipe_runs_end_to_end_on_s3(emmdit_flow):
    from pipeline.core import schema, storage

    root, latents = emmdit_flow["root"], emmdit_flow["latents"]
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
