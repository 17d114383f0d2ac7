"""The `microdit` deployments served by a real process against the session's Prefect server and Ray head, on the
shared tiny run (tests/shared_runs.py `tiny_flow`: stages 1-3 of the shrunk tiny recipe, killed mid-stage-1 and
run again beside a refused third run): the killed run resumes stage 1 from its checkpoint, the stages chain (full
state, then weights only into the 128-px model), a refused run on a busy root leaves the live one whole, the run is
watchable in Prefect and Ray, a rerun finds every step cached, and the stage deployment retrains one stage from
cached latents.
"""
from __future__ import annotations

import json

import pytest
import torch

from shared_runs import (SHRINK, STAGE1_STEPS, TINY, deployment_run, finished, flow_run, flow_run_id, flow_state,
                         mtimes, task_states)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(2400)]
STAGES = ("stage1", "stage2", "stage3")


def test_killed_run_resumes_the_interrupted_stage(tiny_flow):
    from pipeline.train.metrics import read_metrics

    assert tiny_flow["outcomes"]["second"] == "Completed"
    states = task_states(tiny_flow["second"])
    assert states["download-synthetic"] == "Cached"
    assert states["precompute-synthetic"] == "Cached"
    assert states["train-stage1"] == "Completed"  # ran again, but from its checkpoint:
    stage1 = tiny_flow["root"] / "train" / "stage1"
    rows = read_metrics(str(stage1))
    k = tiny_flow["killed_at"]
    # Rows up to the checkpoint are the ones logged before the kill (timings included): a restart from step 0
    # would have rewritten them.
    assert [r for r in rows if r["step"] <= k] == tiny_flow["rows_before"]
    assert tiny_flow["rows_before"] and rows[-1]["step"] == STAGE1_STEPS
    export = json.loads((stage1 / "export" / "config.json").read_text())
    assert export["step"] == STAGE1_STEPS
    assert all(states[f"train-{s}"] == "Completed" for s in STAGES[1:]) and "train-stage4" not in states
    assert (tiny_flow["root"] / "samples" / "grid.png").is_file()
    metrics = json.loads((tiny_flow["root"] / "eval" / "metrics.json").read_text())
    assert metrics["geneval"]["images"] == 6 and len(metrics["geneval"]["tags"]) == 6  # one prompt per tag
    assert states["report"] == "Completed" and (tiny_flow["root"] / "report" / "report.md").is_file()
    report = (tiny_flow["root"] / "report" / "report.md").read_text()
    assert "## GenEval" in report and "| overall (prompt subset) |" in report and "0.46 (MicroDiT" in report
    # the diffusers folder, after evaluate: its card carries the run's stages, metrics and grid
    assert states["diffusers"] == "Completed"
    folder = tiny_flow["root"] / "diffusers"
    assert json.loads((folder / "model_index.json").read_text())["_class_name"][1] == "MicroDiTPipeline"
    card = (folder / "README.md").read_text()
    assert "| stage1 |" in card and "geneval" in card and "![samples](samples.png)" in card
    assert (folder / "samples.png").is_file()
    # the forecast made before the run (pipeline/planner/), set beside what it measured in the report
    assert states["estimate"] == "Cached"  # made by the killed run, before its stage 1
    forecast = json.loads((tiny_flow["root"] / "estimate" / "estimate.json").read_text())
    assert [s["name"] for s in forecast["stages"]] == list(STAGES) and forecast["cluster"].startswith("8 x H100")
    assert "## Planned and measured" in report and "| stage1 |" in report.split("## Planned and measured")[1]
    saved = json.loads((tiny_flow["root"] / "config.json").read_text())
    assert saved["stages"][0]["steps"] == STAGE1_STEPS and saved["storage"] == str(tiny_flow["root"])


def test_a_run_refused_on_a_busy_root_leaves_the_live_run_whole(tiny_flow):
    """Two flow runs in one serve process at once on one storage root: the later one waits, then is refused
    naming the holder, and the live one completes with every output (its cache keys computed meanwhile)."""
    assert tiny_flow["outcomes"] == {"second": "Completed", "third": "Failed"}
    message = flow_run(tiny_flow["third"]).state.message or ""
    assert "RootBusy" in message or "in use by" in message, message
    assert tiny_flow["second"] in message  # names the holder
    states = task_states(tiny_flow["second"])
    assert {s for s in states.values()} <= {"Completed", "Cached"} and "report" in states
    assert task_states(tiny_flow["third"]) == {}  # refused before any step


def test_stages_chain_full_state_then_weights_at_128px(tiny_flow):
    """Stage 2 continues stage 1's full state (the global step carries on); stage 3 starts from stage 2's weights
    only, in the 128-px model with positions rebuilt at scale 2, on the rows that have a 128-px latent."""
    from model.microdit.config import ModelConfig
    from model.microdit.network import MicroDiT
    from pipeline.core import storage
    from pipeline.train.checkpoint import load_weights
    from pipeline.train.stage import train_stage
    from test_train_helpers import tiny_stage

    root = tiny_flow["root"]
    configs = [json.loads((root / "train" / s / "export" / "config.json").read_text()) for s in STAGES]
    assert [c["global_step"] for c in configs] == [STAGE1_STEPS, STAGE1_STEPS + 2, 2]
    assert [c["model"]["input_size"] for c in configs] == [16, 16, 32]
    assert [c["model"]["pos_interp_scale"] for c in configs] == [1.0, 1.0, 2.0]
    assert [c["stage"]["init"]["kind"] for c in configs] == ["scratch", "full_state", "weights"]
    assert configs[2]["final_checkpoint"].startswith(f"{root}/train/stage3/checkpoint_")
    for s in STAGES:
        assert storage.list_files(f"{root}/train/{s}/samples", ".png")
        assert storage.list_files(configs[STAGES.index(s)]["final_checkpoint"], ".distcp")
    # Stage 3 started from stage 2's weights (2 steps at lr 1e-6 move them by ~2e-6), not from a fresh init.
    w2, w3 = (load_weights(f"{root}/train/{s}/export/model.safetensors") for s in ("stage2", "stage3"))
    torch.manual_seed(configs[2]["stage"]["seed"])  # stage 3's own seed: its fresh init
    fresh = MicroDiT(ModelConfig(**configs[2]["model"])).state_dict()
    max_diff = lambda a, b: max(float((a[k] - b[k]).abs().max()) for k in a)  # noqa: E731
    assert max_diff(w3, w2) < 1e-4 < 1e-2 < max_diff(w2, fresh)
    # The 128-px model loads the 64-px weights strictly; only its position buffer differs.
    model = MicroDiT(ModelConfig(**configs[2]["model"]))
    model.load_state_dict(w2, strict=True)
    assert model.pos_embed.shape == (1, 256, configs[2]["model"]["dim"])
    # A stage that starts from one that has not finished is refused before anything runs.
    with pytest.raises(FileNotFoundError, match="'c1', which has not finished"):
        train_stage(tiny_stage(name="c2", init={"from": "full_state", "stage": "c1"}), "MicroDiT_Debug",
                    str(root / "elsewhere"), {"synthetic": str(root / "data" / "latents" / "synthetic")})


def test_the_run_is_watchable_in_prefect_and_ray(tiny_flow, ray_train_runs):
    """Each step's progress and figures and the report on the flow run pages; the stages' Train runs and their
    workers in the Ray dashboard (its HTTP API, with the session's token)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    from cli.watch import read_steps
    from flows.progress_sinks import PLAN_KEY

    with get_client(sync_client=True) as client:
        second = {s.name: s for s in read_steps(client, tiny_flow["second"])}
        for name in [f"train-{s}" for s in STAGES] + ["sample", "evaluate"]:
            assert second[name].percent == 100.0 and second[name].line.endswith(", done"), second[name]
        assert "steps" in second["train-stage1"].line and "loss" in second["train-stage1"].line
        first = {s.name: s for s in read_steps(client, tiny_flow["first"])}
        assert first["download-synthetic"].line.endswith(", done") and "images" in first["download-synthetic"].line
        assert first["precompute-synthetic"].percent == 100.0 and "samples" in first["precompute-synthetic"].line
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[tiny_flow["second"]])))
        report = [a for a in artifacts if a.type == "markdown" and a.key == "microdit-report"]
        assert report and "](data:image/png;base64," in report[0].data and "core-hours" in report[0].data
        assert any(a.type == "table" and '"stage": "stage2"' in a.data for a in artifacts)
        # The forecast is the first run's first artifact (the rerun finds the step cached).
        planned = client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[tiny_flow["first"]])))
        assert any(a.key == PLAN_KEY and a.data.startswith("# Plan: ") for a in planned), [a.key for a in planned]

    runs = ray_train_runs()
    finished_runs = {run["name"] for run in runs if run["status"] == "FINISHED" and run["attempts"][-1]["workers"]}
    assert set(STAGES) <= finished_runs, [(run["name"], run["status"]) for run in runs]
    # The workers' figures as Ray metrics leave with the workers: tests/test_train_stage.py reads them live.


def step_of(task_run: str) -> str:
    return task_run.split("-")[0]  # download-synthetic -> download, train-stage1 -> train


def test_second_run_finds_every_step_cached(tiny_flow):
    from flows.caching import code_versions

    root = tiny_flow["root"]
    before, code = mtimes(root, "data", "train", "samples", "eval", "report"), tiny_flow["code"]
    run_id = finished(deployment_run("microdit/full-run", tiny_flow["params"]))
    states = task_states(run_id)
    # A step's code version is part of its cache key: a step whose modules were edited meanwhile must run.
    edited = {step for step, v in code_versions().items() if v != code[step]}
    assert {t: s for t, s in states.items() if step_of(t) in edited and s != "Completed"} == {}
    states = {t: s for t, s in states.items() if step_of(t) not in edited}
    assert states and set(states.values()) == {"Cached"}, states
    if edited:  # only possible while someone edits the code under test
        return
    assert {"download-synthetic", "precompute-synthetic", *(f"train-{s}" for s in STAGES), "sample", "evaluate",
            "report"} <= set(states)
    assert mtimes(root, "data", "train", "samples", "eval", "report") == before


def test_stage_deployment_retrains_one_stage_from_cached_latents(tiny_flow):
    root = tiny_flow["root"]
    latents, stage1 = mtimes(root, "data"), mtimes(root, "train/stage1")
    export = root / "train" / "stage2" / "export" / "model.safetensors"
    old_export = export.stat().st_mtime_ns
    # The typed plan itself as the flow parameter (what `microdit stage` sends): validated before it is sent,
    # validated again by Prefect on arrival.
    from pipeline.checks import load_run

    plan = load_run(tiny_flow["params"]["recipe"], tiny_flow["params"]["overrides"] + ["stages.stage2.steps=3"])
    run_id = finished(deployment_run("microdit/stage", {"stage": "stage2", "plan": plan.to_dict()}))
    states = task_states(run_id)
    assert states == {"train-stage2": "Completed", "sample": "Completed"}, states
    assert mtimes(root, "data") == latents and mtimes(root, "train/stage1") == stage1
    assert export.stat().st_mtime_ns != old_export
    assert json.loads((export.parent / "config.json").read_text())["step"] == 3
    assert (root / "samples" / "stage2" / "grid.png").is_file()


def test_stage_deployment_without_latents_fails_plainly(tiny_flow, tmp_path):
    params = {"stage": "stage1", "recipe": TINY, "overrides": [f"storage={tmp_path / 'empty'}", *SHRINK]}
    proc = deployment_run("microdit/stage", params, timeout=300)
    out = proc.stdout + proc.stderr
    run_id = flow_run_id(out)
    assert flow_state(run_id) == "Failed"
    message = flow_run(run_id).state.message or ""
    assert "no finished latents" in message or "FileNotFoundError" in message, message
