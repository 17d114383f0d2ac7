"""The `microdit` deployments served by a real process against the fixture Prefect server and Ray head.

One shrunk tiny recipe (few images, a few steps per stage, its first two stages: the chain of all four is
tests/test_train_chain.py's) goes through `prefect deployment run` three times and through the `stage`
deployment once: a run killed in the middle of stage 1 resumes that stage from its
checkpoint, a rerun finds every step cached, and the stage deployment retrains one stage from cached latents.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flows.local_stack import RAY_AUTH

# The shared fixture (a kill, a resume and a full rerun) takes a few minutes on 2 idle cores; allow for load.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(2400)]

REPO = Path(__file__).resolve().parents[1]
RECIPE = str(REPO / "recipes" / "tiny.yaml")
BIN = Path(sys.executable).parent
STAGE1_STEPS = 12
# The tiny recipe at its minimum: 48 images, batch 8, a few steps per stage, cheap samplers.
SHRINK = [
    "sources.synthetic.options.n=48",
    "download.number_sample_per_shard=32",
    "sample.steps=2", "sample.prompts=['a large red circle on a white background, center']",
    "evaluate.steps=2", "evaluate.demo_prompts=['a large blue square on a white background, center']",
] + [o for name, steps, every in (("stage1", STAGE1_STEPS, 2), ("stage2", 2, 2))
     for o in (f"stages.{name}.steps={steps}", f"stages.{name}.checkpoint.every={every}",
               f"stages.{name}.log_every=1", f"stages.{name}.batch.global_batch=8",
               f"stages.{name}.batch.micro_batch=8", f"stages.{name}.batch.num_workers=1",
               f"stages.{name}.sampling.prompts=2", f"stages.{name}.sampling.steps=2",
               f"stages.{name}.optim.schedule.warmup_steps=0", f"stages.{name}.optim.ema.start_step=0")]


@pytest.fixture(scope="session", autouse=True)
def _ray_token_mode():
    """Ray 2.60 local heads use token auth; `ray status` and drivers send ~/.ray/auth_token only in token mode."""
    from flows.local_stack import ensure_ray_token

    saved = os.environ.get("RAY_AUTH_MODE")
    os.environ["RAY_AUTH_MODE"] = "token"
    ensure_ray_token()  # in explicit token mode `ray start` will not create one
    yield
    if saved is None:
        os.environ.pop("RAY_AUTH_MODE", None)
    else:
        os.environ["RAY_AUTH_MODE"] = saved


class Served:
    """`python -m flows.serve` as our own process group, restartable."""

    def __init__(self, log: Path):
        self.log, self.proc = log, None

    def start(self) -> None:
        from flows.local_stack import deployments_ready

        since = time.time()
        env = dict(os.environ, PREFECT_RUNNER_POLL_FREQUENCY="2", **RAY_AUTH)
        with open(self.log, "ab") as f:
            self.proc = subprocess.Popen([sys.executable, "-m", "flows.serve"], cwd=REPO, env=env, stdout=f,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 180
        while not deployments_ready(since):
            assert self.proc.poll() is None, f"flows.serve exited; see {self.log}"
            assert time.monotonic() < deadline, f"deployments not served within 180s; see {self.log}"
            time.sleep(1)

    def stop(self) -> None:
        """Kill the whole group at once (the flow run process is in it): an interruption, not a shutdown."""
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)


def deployment_run(name: str, params: dict, watch: bool = True, timeout: int = 1500):
    """`prefect deployment run NAME --params JSON [--watch]`: (Popen or CompletedProcess)."""
    cmd = [str(BIN / "prefect"), "deployment", "run", name, "--params", json.dumps(params)]
    if not watch:
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
    return subprocess.run(cmd + ["--watch", "--watch-interval", "3", "--watch-timeout", str(timeout)],
                          capture_output=True, text=True, timeout=timeout + 60)


def flow_run_id(output: str) -> str:
    m = re.search(r"UUID: ([0-9a-f-]{36})", output)
    assert m, f"no flow run id in:\n{output}"
    return m.group(1)


def flow_state(run_id: str) -> str:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return client.read_flow_run(run_id).state.name


def task_states(run_id: str) -> dict[str, str]:
    """task run name -> state name ("Completed", "Cached", ...) of one flow run."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run_id])))
        return {tr.name: tr.state.name for tr in runs}


def mtimes(root: Path, *subdirs: str) -> dict[str, int]:
    return {str(p): p.stat().st_mtime_ns for d in subdirs for p in sorted((root / d).rglob("*")) if p.is_file()}


def two_stage_recipe(folder: Path) -> str:
    """The tiny recipe with only its first two stages, written into `folder`; returns its path."""
    import yaml

    data = yaml.safe_load(Path(RECIPE).read_text())
    data["stages"] = yaml.safe_load((Path(RECIPE).parent / data["stages"]).read_text())["stages"][:2]
    path = folder / "tiny_two_stages.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return str(path)


def resumable_step(stage_dir: Path) -> int:
    """Step of the checkpoint Ray Train resumes from: the latest one in its manager snapshot (0: none yet).

    A checkpoint folder appears a moment before Ray Train records it; a kill in between resumes from the
    previous recorded one, so the test waits for the record.
    """
    snap = stage_dir / "checkpoint_manager_snapshot.json"
    try:
        data = json.loads(snap.read_text())
        data = json.loads(data) if isinstance(data, str) else data
        name = (data.get("latest_checkpoint_result") or {}).get("checkpoint_dir_name") or ""
    except (OSError, ValueError, AttributeError):
        return 0
    m = re.match(r"checkpoint_(\d+)$", name)
    return int(m.group(1)) if m and (stage_dir / name).is_dir() else 0


def finished(proc) -> str:
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    run_id = flow_run_id(out)
    assert flow_state(run_id) == "Completed", out[-4000:]
    return run_id


@pytest.fixture(scope="module")
def interrupted(prefect_server, ray_address, tmp_path_factory):
    """Run full-run, kill it (serve process group) once stage 1 has a checkpoint, serve again, run again."""
    from pipeline.train.metrics import read_metrics

    base = tmp_path_factory.mktemp("flows")
    root = base / "run"
    params = {"recipe": two_stage_recipe(base), "overrides": [f"storage={root}", *SHRINK]}
    served = Served(base / "serve.log")
    served.start()
    try:
        first = deployment_run("microdit/full-run", params, watch=False)
        out, _ = first.communicate(timeout=120)  # without --watch the CLI returns once the run is created
        first_id = flow_run_id(out)
        stage1 = root / "train" / "stage1"
        deadline, polled = time.monotonic() + 1200, time.monotonic()
        while resumable_step(stage1) < 2:
            assert time.monotonic() < deadline, "stage 1 registered no checkpoint within 20 minutes"
            assert not (stage1 / "export" / "_SUCCESS").exists(), "stage 1 finished before the kill"
            if time.monotonic() - polled > 10:
                state = flow_state(first_id)
                assert state not in ("Failed", "Crashed", "Completed", "Cancelled"), f"first run {state}"
                polled = time.monotonic()
            time.sleep(0.2)
        served.stop()  # mid-stage: the flow run process dies with the serve group
        killed_at = resumable_step(stage1)
        assert 2 <= killed_at < STAGE1_STEPS, "stage 1 finished before the kill"
        before = [r for r in read_metrics(str(stage1)) if r["step"] <= killed_at]

        served.start()
        code = code_versions()
        second = finished(deployment_run("microdit/full-run", params))
        yield {"root": root, "params": params, "served": served, "killed_at": killed_at, "rows_before": before,
               "second": second, "code": code}
    finally:
        served.stop()


def test_killed_run_resumes_the_interrupted_stage(interrupted):
    from pipeline.train.metrics import read_metrics

    states = task_states(interrupted["second"])
    assert states["download-synthetic"] == "Cached"
    assert states["precompute-synthetic"] == "Cached"
    assert states["train-stage1"] == "Completed"  # ran again, but from its checkpoint:
    stage1 = interrupted["root"] / "train" / "stage1"
    rows = read_metrics(str(stage1))
    k = interrupted["killed_at"]
    # Rows up to the checkpoint are the ones logged before the kill (timings included): a restart from step 0
    # would have rewritten them.
    assert [r for r in rows if r["step"] <= k] == interrupted["rows_before"]
    assert interrupted["rows_before"] and rows[-1]["step"] == STAGE1_STEPS
    export = json.loads((stage1 / "export" / "config.json").read_text())
    assert export["step"] == STAGE1_STEPS
    assert states["train-stage2"] == "Completed" and "train-stage3" not in states
    assert (interrupted["root"] / "samples" / "grid.png").is_file()
    assert (interrupted["root"] / "eval" / "metrics.json").is_file()
    assert states["report"] == "Completed" and (interrupted["root"] / "report" / "report.md").is_file()
    saved = json.loads((interrupted["root"] / "config.json").read_text())
    assert saved["stages"][0]["steps"] == STAGE1_STEPS and saved["storage"] == str(interrupted["root"])


def test_the_run_is_watchable_in_prefect_and_ray(interrupted, ray_address):
    """Each step's progress and figures and the report on the flow run pages; the stages' Train runs and their
    workers in the Ray dashboard (its HTTP API, with the session's token)."""
    import urllib.request

    import ray
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    from flows.local_stack import ray_token_path
    from flows.watch import read_steps
    from pipeline.core.ray_cluster import connect

    stages = ("stage1", "stage2")
    with get_client(sync_client=True) as client:
        second = {s.name: s for s in read_steps(client, interrupted["second"])}
        for name in [f"train-{s}" for s in stages] + ["sample", "evaluate"]:
            assert second[name].percent == 100.0 and second[name].line.endswith(", done"), second[name]
        assert "steps" in second["train-stage1"].line and "loss" in second["train-stage1"].line
        ours = [r.id for r in client.read_flow_runs()
                if str(interrupted["root"]) in json.dumps(r.parameters, default=str)]
        first = {s.name: s for rid in ours if str(rid) != str(interrupted["second"]) for s in read_steps(client, rid)}
        assert first["download-synthetic"].line.endswith(", done") and "images" in first["download-synthetic"].line
        assert first["precompute-synthetic"].percent == 100.0 and "samples" in first["precompute-synthetic"].line
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[interrupted["second"]])))
        report = [a for a in artifacts if a.type == "markdown" and a.key == "microdit-report"]
        assert report and "](data:image/png;base64," in report[0].data and "core-hours" in report[0].data
        assert any(a.type == "table" and '"stage": "stage2"' in a.data for a in artifacts)

    connect(ray_address)
    token = ray_token_path().read_text().strip()
    req = urllib.request.Request(f"http://{ray._private.worker.get_dashboard_url()}/api/train/v2/runs/v1",
                                 headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(req, timeout=60) as r:
        runs = json.loads(r.read())["train_runs"]
    finished = {run["name"] for run in runs if run["status"] == "FINISHED" and run["attempts"][-1]["workers"]}
    assert set(stages) <= finished, [(run["name"], run["status"]) for run in runs]
    # The workers' figures as Ray metrics leave with the workers: tests/test_progress_ray.py reads them live.


def code_versions() -> dict[str, str]:
    from flows.caching import STEP_MODULES, code_version

    return {step: code_version.__wrapped__(step) for step in STEP_MODULES}


def step_of(task_run: str) -> str:
    return task_run.split("-")[0]  # download-synthetic -> download, train-stage1 -> train


def test_second_run_finds_every_step_cached(interrupted):
    root = interrupted["root"]
    before, code = mtimes(root, "data", "train", "samples", "eval", "report"), interrupted["code"]
    run_id = finished(deployment_run("microdit/full-run", interrupted["params"]))
    states = task_states(run_id)
    # A step's code version is part of its cache key: a step whose modules were edited meanwhile must run.
    edited = {step for step, v in code_versions().items() if v != code[step]}
    assert {t: s for t, s in states.items() if step_of(t) in edited and s != "Completed"} == {}
    states = {t: s for t, s in states.items() if step_of(t) not in edited}
    assert states and set(states.values()) == {"Cached"}, states
    if edited:  # only possible while someone edits the code under test
        return
    assert {"download-synthetic", "precompute-synthetic", "train-stage1", "train-stage2", "sample",
            "evaluate", "report"} <= set(states)
    assert mtimes(root, "data", "train", "samples", "eval", "report") == before


def test_stage_deployment_retrains_one_stage_from_cached_latents(interrupted):
    root = interrupted["root"]
    latents, stage1 = mtimes(root, "data"), mtimes(root, "train/stage1")
    export = root / "train" / "stage2" / "export" / "model.safetensors"
    old_export = export.stat().st_mtime_ns
    # The typed plan itself as the flow parameter (what `microdit stage` sends): validated before it is sent,
    # validated again by Prefect on arrival.
    from pipeline.checks import load_run

    plan = load_run(interrupted["params"]["recipe"], interrupted["params"]["overrides"] + ["stages.stage2.steps=3"])
    run_id = finished(deployment_run("microdit/stage", {"stage": "stage2", "plan": plan.to_dict()}))
    states = task_states(run_id)
    assert states == {"train-stage2": "Completed", "sample": "Completed"}, states
    assert mtimes(root, "data") == latents and mtimes(root, "train/stage1") == stage1
    assert export.stat().st_mtime_ns != old_export
    assert json.loads((export.parent / "config.json").read_text())["step"] == 3
    assert (root / "samples" / "stage2" / "grid.png").is_file()


def test_stage_deployment_without_latents_fails_plainly(interrupted, tmp_path):
    params = {"stage": "stage1", "recipe": RECIPE, "overrides": [f"storage={tmp_path / 'empty'}", *SHRINK]}
    proc = deployment_run("microdit/stage", params, timeout=300)
    out = proc.stdout + proc.stderr
    run_id = flow_run_id(out)
    assert flow_state(run_id) == "Failed"
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        message = client.read_flow_run(run_id).state.message or ""
    assert "no finished latents" in message or "FileNotFoundError" in message, message
