"""The suite's shared runs: expensive, mostly read-only results that many tests look at, made once per session.

Most of the suite's time is Ray Train and flow start-ups (about 20-40 CPU-seconds each on 2 cores), so the
integration tests read a few shared runs instead of starting their own:

- `tiny_flow`: the MicroDiT tiny recipe (stages 1-3, shrunk) through the served `microdit/full-run` deployment,
  killed mid-stage-1 and run again (with a second run on the same root at the same time, refused by the lease);
  tests/test_flows.py and tests/test_compare_flow.py read it.
- `emmdit_flow`: the E-MMDiT tiny recipe (REPA stage + stage 2) through the full-run flow on moto's S3;
  tests/test_emmdit_flow.py and tests/test_train_emmdit.py read it.

A file that reads one of them is listed in conftest's SHARED_RUNS, so that all of them run on one xdist worker and
the run is made once. New integration tests read these runs (or add to them) rather than
start their own flow runs or Ray Train jobs; tests that must kill, resume or race keep their own runs, at the fewest
steps that still prove it.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
TINY = str(REPO / "recipes" / "tiny.yaml")
EMMDIT_TINY = str(REPO / "recipes" / "emmdit_tiny.yaml")
STAGE1_STEPS = 12


def stage_overrides(name: str, steps: int, every: int = 2, workers: int = 1) -> list[str]:
    """A tiny stage at its minimum: batch 8 on `workers` Ray Train workers, cheap sample grids, no warmup."""
    return [f"stages.{name}.steps={steps}", f"stages.{name}.checkpoint.every={every}", f"stages.{name}.log_every=1",
            f"stages.{name}.batch.global_batch=8", f"stages.{name}.batch.micro_batch={8 // workers}",
            f"stages.{name}.batch.num_workers={workers}", f"stages.{name}.sampling.prompts=2",
            f"stages.{name}.sampling.steps=2", f"stages.{name}.optim.schedule.warmup_steps=0"]


# The tiny recipe at its minimum: 48 images, batch 8, a few steps per stage, cheap samplers. Stage 3 (128 px,
# weights only, positions rebuilt at scale 2) trains at lr 1e-6, so its export shows where it started.
SHRINK = [
    "sources.synthetic.options.n=48",
    "download.number_sample_per_shard=32",
    "sample.steps=2", "sample.prompts=['a large red circle on a white background, center']",
    "evaluate.steps=2", "evaluate.demo_prompts=['a large blue square on a white background, center']",
    *stage_overrides("stage1", STAGE1_STEPS), *stage_overrides("stage2", 2), *stage_overrides("stage3", 2),
    "stages.stage1.optim.ema.start_step=0", "stages.stage2.optim.ema.start_step=0",
    "stages.stage3.optim.ema.start_step=0", "stages.stage3.optim.lr=1e-6",
    "stages.stage3.optim.schedule.kind=constant",
    # GenEval on a prompt subset with the tiny detector and colour model, and the run's diffusers folder
    "evaluate.geneval.enabled=true", "evaluate.geneval.per_tag=1", "evaluate.geneval.images_per_prompt=1",
    "evaluate.geneval.steps=2", "evaluate.geneval.detector=tiny-mask2former", "evaluate.geneval.colour_model=tiny-clip",
    "diffusers={}",
]


def recipe_with_stages(recipe: str, count: int, folder: Path) -> str:
    """`recipe` with only its first `count` stages, written into `folder`; returns its path."""
    import yaml

    data = yaml.safe_load(Path(recipe).read_text())
    data["stages"] = yaml.safe_load((Path(recipe).parent / data["stages"]).read_text())["stages"][:count]
    path = folder / f"{Path(recipe).stem}_{count}_stages.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return str(path)


class Served:
    """`python -m flows.serve` as our own process group, restartable."""

    def __init__(self, log: Path):
        self.log, self.proc = log, None

    def start(self) -> None:
        from cli.stack import RAY_AUTH, deployments_ready

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
        """Kill the whole group at once (the flow run processes are in it): an interruption, not a shutdown."""
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


def created(proc: subprocess.Popen) -> str:
    """The flow run id a `deployment_run(..., watch=False)` created."""
    out, _ = proc.communicate(timeout=120)  # without --watch the CLI returns once the run is created
    return flow_run_id(out)


def flow_run(run_id: str):
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return client.read_flow_run(run_id)


def flow_state(run_id: str) -> str:
    return flow_run(run_id).state.name


FINAL = ("Completed", "Failed", "Crashed", "Cancelled")


def wait_for_end(run_id: str, timeout: float = 1500) -> str:
    deadline = time.monotonic() + timeout
    while (state := flow_state(run_id)) not in FINAL:
        assert time.monotonic() < deadline, f"flow run {run_id} still {state} after {timeout:.0f}s"
        time.sleep(2)
    return state


def task_states(run_id: str) -> dict[str, str]:
    """task run name -> state name ("Completed", "Cached", ...) of one flow run."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run_id])))
        return {tr.name: tr.state.name for tr in runs}


def mtimes(root: Path, *subdirs: str) -> dict[str, int]:
    return {str(p): p.stat().st_mtime_ns for d in subdirs for p in sorted((root / d).rglob("*")) if p.is_file()}


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


def lease_owner(root: Path) -> str:
    try:
        return json.loads((root / "_lease.json").read_text()).get("owner", "")
    except (OSError, ValueError):
        return ""


def finished(proc) -> str:
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    run_id = flow_run_id(out)
    assert flow_state(run_id) == "Completed", out[-4000:]
    return run_id


@pytest.fixture(scope="session")
def _ray_token_mode():
    """Ray 2.60 local heads use token auth; `ray status` and drivers send the token only in token mode."""
    from cli.stack import ensure_ray_token

    env = pytest.MonkeyPatch()
    env.setenv("RAY_AUTH_MODE", "token")
    ensure_ray_token()  # in explicit token mode `ray start` will not create one
    yield
    env.undo()


@pytest.fixture(scope="session")
def tiny_flow(prefect_server, ray_address, _ray_token_mode, tmp_path_factory):
    """The tiny recipe's first three stages through `prefect deployment run microdit/full-run`: the first run is
    killed (its serve process group) once stage 1 has a checkpoint; after serving again, a second run and, at the
    same moment, a third on the same storage root are started in the one serve process: the third is refused by
    the lease while the second resumes stage 1 from its checkpoint and finishes every step."""
    from flows.caching import code_versions
    from pipeline.train.metrics import read_metrics

    base = tmp_path_factory.mktemp("flows")
    root = base / "run"
    params = {"recipe": recipe_with_stages(TINY, 3, base), "overrides": [f"storage={root}", *SHRINK]}
    served = Served(base / "serve.log")
    served.start()
    try:
        first_id = created(deployment_run("microdit/full-run", params, watch=False))
        stage1 = root / "train" / "stage1"
        deadline, polled = time.monotonic() + 1200, time.monotonic()
        while resumable_step(stage1) < 2:
            assert time.monotonic() < deadline, "stage 1 registered no checkpoint within 20 minutes"
            assert not (stage1 / "export" / "_SUCCESS").exists(), "stage 1 finished before the kill"
            if time.monotonic() - polled > 10:
                state = flow_state(first_id)
                assert state not in FINAL, f"first run {state}"
                polled = time.monotonic()
            time.sleep(0.2)
        served.stop()  # mid-stage: the flow run process dies with the serve group
        killed_at = resumable_step(stage1)
        assert 2 <= killed_at < STAGE1_STEPS, "stage 1 finished before the kill"
        before = [r for r in read_metrics(str(stage1)) if r["step"] <= killed_at]

        served.start()
        code = code_versions()
        second_id = created(deployment_run("microdit/full-run", params, watch=False))
        while second_id not in lease_owner(root):  # the second run holds the root before the third asks for it
            assert flow_state(second_id) not in FINAL, flow_state(second_id)
            time.sleep(0.5)
        third_id = created(deployment_run("microdit/full-run", params, watch=False))
        outcomes = {"second": wait_for_end(second_id), "third": wait_for_end(third_id)}
        yield {"root": root, "params": params, "served": served, "killed_at": killed_at, "rows_before": before,
               "first": first_id, "second": second_id, "third": third_id, "outcomes": outcomes, "code": code}
    finally:
        served.stop()


@pytest.fixture(scope="session")
def emmdit_flow(prefect_server, ray_address, s3_endpoint, tmp_path_factory):
    """The E-MMDiT tiny recipe end to end through the full-run flow (in process, against the session's Prefect
    server and Ray head) on moto's S3: download -> precompute (tiny DC-AE, compact tiny-Llama states, the
    unconditional file, tiny-DINOv2 REPA features) -> stage 1 (REPA, 2 workers) -> stage 2 -> sample grid ->
    evaluate -> report. AWS_ENDPOINT_URL stays set for the rest of the session (the group's tests train on
    these S3 latents). Yields {"root", "latents", "overrides"}."""
    import boto3
    import ray

    from flows.full_run import full_run

    env = pytest.MonkeyPatch()
    env.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    bucket = f"emmdit-{uuid.uuid4().hex[:12]}"  # a download's S3 staging folder is named after its URI
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=bucket)
    root = f"s3://{bucket}/run"
    overrides = [
        "encoders.vae=tiny-dcae",  # the real DC-AE code path (the recipe's demo default is the stand-in)
        "sources.synthetic.options.n=48", "download.number_sample_per_shard=32",
        "sample.steps=2", "sample.prompts=['a large red circle on a white background, center']",
        "evaluate.steps=2", "evaluate.demo_prompts=['a large blue square on a white background, center']",
        *stage_overrides("stage1", 6, workers=2), *stage_overrides("stage2", 2),
    ]
    ray.shutdown()  # reconnect inside the flow with the S3 endpoint in the workers' environment
    try:
        full_run(recipe=EMMDIT_TINY, overrides=[f"storage={root}", f"ray_address={ray_address}", *overrides])
        yield {"root": root, "latents": f"{root}/data/latents/synthetic", "overrides": overrides}
    finally:
        ray.shutdown()
        env.undo()
