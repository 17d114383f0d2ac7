"""The `compare` flow on the shared tiny run's cached latents (tests/shared_runs.py `tiny_flow`): two arms at equal
compute, each under its own root, then the side-by-side report."""
from __future__ import annotations

import dataclasses
import json

import pytest

from shared_runs import mtimes

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def test_compare_flow_trains_both_arms_at_equal_compute(tiny_flow, tmp_path):
    from flows.compare import compare_run
    from model.microdit.config import flops_per_sample, model_config
    from pipeline.checks import load_run
    from pipeline.report.compare import equal_compute_plan

    recipe, overrides = tiny_flow["params"]["recipe"], tiny_flow["params"]["overrides"]
    with pytest.raises(FileNotFoundError, match="full-run first"):  # no latents under a new root: a plain error
        compare_run(recipe=recipe, overrides=[*overrides, f"storage={tmp_path / 'empty'}"])

    root = tiny_flow["root"]
    cfg = load_run(recipe, overrides)
    stage = cfg.stage("stage1")
    # Two unmasked steps' worth of FLOPs (stand-in VAE: downsample 4).
    model = model_config(cfg.model.preset)
    batch = stage.batch.global_batch
    budget = 2 * batch * flops_per_sample(dataclasses.replace(model, input_size=stage.data.resolution // 4), 0.0)
    plan = {a.stage.objective.mask_ratio: a.stage.steps
            for a in equal_compute_plan(model, stage, budget, downsample=4)}
    assert plan[0.0] == 2 and plan[0.75] > plan[0.0]

    trained = mtimes(root, "data", "train")
    out = compare_run(recipe=recipe, overrides=overrides, stage="stage1", budget_flops=budget)

    names = {0.75: "stage1-mask75", 0.0: "stage1-mask0"}
    for ratio, name in names.items():
        arm = root / "compare" / name
        assert out[name] == str(arm)
        export = arm / "train" / name / "export"
        assert (export / "model.safetensors").is_file()
        config = json.loads((export / "config.json").read_text())
        assert config["step"] == plan[ratio] and config["stage"]["objective"]["mask_ratio"] == ratio
        assert config["stage"]["init"]["kind"] == "scratch"
        assert (arm / "samples" / "grid.png").is_file()
        assert "demo" in json.loads((arm / "eval" / "metrics.json").read_text())
    assert mtimes(root, "data", "train") == trained  # the arms trained under their own roots only

    report = root / "compare" / "report"
    md = (report / "compare.md").read_text()
    assert out["report"] == str(report / "compare.md")
    assert all(name in md for name in names.values())
    totals = json.loads((report / "compare.json").read_text())["totals"]
    assert set(totals) == set(names.values())
    # Equal compute: each arm's FLOPs are within one of its steps of the budget.
    for ratio, name in names.items():
        per_step = totals[name]["flops"] / plan[ratio]
        assert budget - per_step < totals[name]["flops"] <= budget * (1 + 1e-9)
    assert (report / "loss_vs_flops.png").is_file() and (report / "loss_vs_samples.png").is_file()
    runs = arm_flow_runs(["arm-" + n for n in names.values()])
    assert sorted(runs) == sorted("arm-" + n for n in names.values())  # two flow runs in the UI, one per arm
    assert all(state == "Completed" and parent for state, parent in runs.values()), runs


def arm_flow_runs(run_names: list[str]) -> dict[str, tuple[str, bool]]:
    """flow run name -> (state, has a parent run) for the named runs on the Prefect server."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName

    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=run_names)))
    return {r.name: (r.state.name, r.parent_task_run_id is not None) for r in runs}
