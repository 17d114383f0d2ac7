"""The `compare` flow on a shrunk tiny recipe: two arms from cached latents at equal compute, then the report."""
from __future__ import annotations

import dataclasses
import json

import pytest

from test_flows import RECIPE, SHRINK  # the shrunk tiny recipe (48 images, a few steps)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def test_compare_flow_trains_both_arms_at_equal_compute(prefect_server, ray_address, tmp_path):
    from flows import tasks
    from flows.caching import code_version
    from flows.compare import compare_run
    from model.microdit.config import flops_per_sample, model_config
    from pipeline.checks import load_run
    from pipeline.core.layout import Layout
    from pipeline.report.compare import equal_compute_plan

    root = tmp_path / "run"
    overrides = [f"storage={root}", *SHRINK]
    cfg = load_run(RECIPE, overrides)
    with pytest.raises(FileNotFoundError, match="full-run first"):  # no latents yet: a plain error
        compare_run(recipe=RECIPE, overrides=overrides)

    src = cfg.sources[0]  # the run's latents, made by the step functions full-run wraps
    shards = tasks.download_task.fn(source=src, download=cfg.download, root=cfg.storage,
                                    code=code_version("download"))
    tasks.precompute_task.fn(source=src.name, shards_uri=shards, latents_uri=Layout(cfg.storage).latents(src.name),
                             precompute=cfg.precompute, encoders=cfg.encoders, code=code_version("precompute"),
                             ray_address=ray_address)

    stage = cfg.stage("stage1")
    # Two unmasked steps' worth of FLOPs (stand-in VAE: downsample 4).
    model = model_config(cfg.model.preset)
    batch = stage.batch.global_batch
    budget = 2 * batch * flops_per_sample(dataclasses.replace(model, input_size=stage.data.resolution // 4), 0.0)
    plan = {a.stage.objective.mask_ratio: a.stage.steps
            for a in equal_compute_plan(model, stage, budget, downsample=4)}
    assert plan[0.0] == 2 and plan[0.75] > plan[0.0]

    out = compare_run(recipe=RECIPE, overrides=overrides, stage="stage1", budget_flops=budget)

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
    assert (root / "data" / "latents" / src.name / "_SUCCESS").is_file()
    assert not (root / "train").exists()  # the arms trained under their own roots only

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
