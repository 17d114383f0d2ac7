"""The tiny recipe's whole flow on two Ray nodes whose only shared state is Ray and S3 (tests/multinode.py).

Precompute's tasks and actors and the training workers request {"worker_node": 1}, so they run on the worker
node, which cannot see the head's /tmp, the test's folders or the repository's runs/ (tmpfs over each in its own
mount namespace). The flow itself runs on the head's side, as a Prefect flow against the session's server, with
`storage: s3://...` on moto. A step that hands a node-local path to another node fails here.

The worker node is killed (its whole process group, with the flow) once stage 1 has a checkpoint in S3; a fresh
worker node joins and the rerun resumes stage 1 from that checkpoint. Then the single-stage deployment's flow
retrains stage 2. Prints the flow's time and the bytes each step wrote to S3.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from multinode import WORKER_RESOURCE, start_cluster, unshare_available

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]

REPO = Path(__file__).resolve().parents[1]
RECIPE = str(REPO / "recipes" / "tiny.yaml")
STAGE1_STEPS = 10
ON_WORKER = f"{{{WORKER_RESOURCE}: 1}}"
# The tiny recipe at its minimum, two stages (see _plan), with the data and training steps placed on the worker.
OVERRIDES = [
    "sources.synthetic.options.n=48", "download.number_sample_per_shard=32",
    f"precompute.resources={ON_WORKER}",
    "sample.steps=2", "sample.prompts=['a large red circle on a white background, center']",
] + [o for name, steps in (("stage1", STAGE1_STEPS), ("stage2", 2))
     for o in (f"stages.{name}.steps={steps}", f"stages.{name}.checkpoint.every=2", f"stages.{name}.log_every=1",
               f"stages.{name}.batch.global_batch=8", f"stages.{name}.batch.micro_batch=8",
               f"stages.{name}.batch.num_workers=1", f"stages.{name}.batch.resources={ON_WORKER}",
               f"stages.{name}.sampling.prompts=2", f"stages.{name}.sampling.steps=2",
               f"stages.{name}.optim.schedule.warmup_steps=0", f"stages.{name}.optim.ema.start_step=0")]
# Steps of the flow and the folders they write (bytes per step are measured over these prefixes).
STEP_PREFIXES = {"download": ("data/urls/", "data/raw/", "data/shards/"), "precompute": ("data/latents/",),
                 "stage1": ("train/stage1/",), "stage2": ("train/stage2/",), "sample": ("samples/",),
                 "report": ("report/",), "run": ("config.json", "_lease.json")}


def _plan(root: str) -> dict:
    from pipeline.checks import check_run, load_run
    from pipeline.core.plan import RunConfig

    cfg = load_run(RECIPE, [f"storage={root}", *OVERRIDES])
    cfg = RunConfig.model_validate({**cfg.to_dict(), "stages": cfg.to_dict()["stages"][:2], "evaluate": None})
    return check_run(cfg, "multinode plan").to_dict()


def _flow(cluster, env: dict, call: str, params: dict, log: Path) -> subprocess.Popen:
    """The flow function run as a Prefect flow in its own process group (a driver on the head's side)."""
    code = ("import json, sys; from flows.full_run import full_run; from flows.stage import stage_run; "
            f"print('RESULT', json.dumps({call}(**json.loads(sys.argv[1]))))")
    f = open(log, "a")
    return subprocess.Popen([sys.executable, "-c", code, json.dumps(params)], cwd=REPO, env=env, stdout=f,
                            stderr=subprocess.STDOUT, start_new_session=True)


def _finish(proc: subprocess.Popen, log: Path, timeout: float = 1200) -> dict:
    proc.wait(timeout=timeout)
    out = log.read_text()
    assert proc.returncode == 0, out[-6000:]
    return json.loads(out.rsplit("RESULT ", 1)[1].splitlines()[0])


def _objects(bucket: str) -> dict[str, int]:
    """key -> size of every object in the bucket."""
    from pipeline.core import storage

    client, found = storage.boto3_client(), {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        found.update({o["Key"]: o["Size"] for o in page.get("Contents", [])})
    return found


def _resumable_step(stage_uri: str) -> int:
    """Step of the checkpoint Ray Train resumes from, per its snapshot in S3 (0: none yet)."""
    from pipeline.core import storage

    try:
        data = storage.read_json(storage.join(stage_uri, "checkpoint_manager_snapshot.json"))
        data = json.loads(data) if isinstance(data, str) else data
        name = (data.get("latest_checkpoint_result") or {}).get("checkpoint_dir_name") or ""
    except (OSError, ValueError, AttributeError):
        return 0
    m = re.match(r"checkpoint_(\d+)$", name)
    return int(m.group(1)) if m else 0


def _worker_logs_mention(cluster, *names: str) -> dict[str, bool]:
    """Which names appear in the worker node's Ray worker logs, read through its mount namespace (/proc/PID/root):
    the proof that those tasks and actors ran on the worker node."""
    root = Path(f"/proc/{cluster.worker.pid}/root/tmp")  # session_latest links to an absolute path: not followed
    text = "".join(p.read_text(errors="replace") for p in root.glob("rw*/session_2*/logs/worker-*"))
    return {n: n in text for n in names}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    reason = unshare_available()
    if reason:
        pytest.skip(reason)
    state = tmp_path_factory.mktemp("multinode")
    # Everything the head's side writes locally: /tmp (this session's folders, Ray's and Prefect's temp files),
    # the system temp dir and the repository's runs/ (the default storage root).
    hidden = ["/tmp", tempfile.gettempdir(), str(tmp_path_factory.getbasetemp()), str(REPO / "runs")]
    c = start_cluster(state, hidden, head_cpus=1, worker_cpus=3)
    try:
        yield c
    finally:
        c.stop()


def test_full_run_on_two_nodes_with_s3_as_the_only_shared_state(cluster, prefect_server, s3_endpoint, s3_bucket,
                                                                  tmp_path, monkeypatch):
    from pipeline.core import storage
    from pipeline.train.metrics import read_metrics

    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    root = f"s3://{s3_bucket}/run"
    plan = _plan(root)
    env = dict(cluster.client_env(), AWS_ENDPOINT_URL=s3_endpoint, PREFECT_API_URL=prefect_server)
    stage1 = f"{root}/train/stage1"
    log = tmp_path / "flow.log"

    # Run 1: killed with its worker node once stage 1 has a checkpoint in S3.
    t0 = time.monotonic()
    first = _flow(cluster, env, "full_run", {"plan": plan}, log)
    try:
        deadline = time.monotonic() + 1200
        while _resumable_step(stage1) < 2:
            assert first.poll() is None, log.read_text()[-6000:]
            assert time.monotonic() < deadline, "stage 1 registered no checkpoint within 20 minutes"
            time.sleep(0.2)
        placed = _worker_logs_mention(cluster, "ReadShard", "EncodeImages", "RayTrainWorker")
        cluster.kill_worker()
        killed_at = _resumable_step(stage1)
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
        first.wait(timeout=60)
    t_first = time.monotonic() - t0
    assert placed == {"ReadShard": True, "EncodeImages": True, "RayTrainWorker": True}, placed
    assert 2 <= killed_at < STAGE1_STEPS, "stage 1 finished before the kill"
    assert not storage.exists(f"{stage1}/export/_SUCCESS")
    before = [r for r in read_metrics(stage1) if r["step"] <= killed_at]
    after_kill = _objects(s3_bucket)

    # Run 2 on a fresh worker node: download and precompute are cached, stage 1 resumes from its S3 checkpoint.
    cluster.start_worker()
    t1 = time.monotonic()
    out = _finish(_flow(cluster, env, "full_run", {"plan": plan}, log), log)
    t_second = time.monotonic() - t1
    rows = read_metrics(stage1)
    assert [r for r in rows if r["step"] <= killed_at] == before  # a restart from step 0 would rewrite them
    assert rows[-1]["step"] == STAGE1_STEPS
    assert storage.read_json(f"{stage1}/export/config.json")["step"] == STAGE1_STEPS
    assert out["report"].startswith(root) and out["sample_grid"] == f"{root}/samples/grid.png"
    after_full = _objects(s3_bucket)

    # The single-stage rerun (deployment `stage`) retrains stage 2 from the cached latents, on the worker node.
    t2 = time.monotonic()
    rerun = _finish(_flow(cluster, env, "stage_run", {"stage": "stage2", "plan": plan}, log), log)
    t_stage = time.monotonic() - t2
    assert rerun == {"export": f"{root}/train/stage2/export", "sample_grid": f"{root}/samples/stage2/grid.png"}
    objects = _objects(s3_bucket)

    # Every output is in S3.
    keys = set(objects)
    for key in ("run/config.json", "run/data/urls/synthetic.parquet", "run/data/shards/synthetic/_SUCCESS",
                "run/data/latents/synthetic/_SUCCESS", "run/data/latents/synthetic/_report.json",
                "run/train/stage1/export/_SUCCESS", "run/train/stage1/export/model.safetensors",
                "run/train/stage1/metrics.jsonl", "run/train/stage2/export/_SUCCESS",
                "run/train/stage2/run_config.json", "run/samples/grid.png", "run/samples/stage2/grid.png",
                "run/report/report.md"):
        assert key in keys, (key, sorted(keys))
    assert any(re.match(r"run/data/shards/synthetic/\d+\.tar$", k) for k in keys)
    assert any(re.match(r"run/data/latents/synthetic/part-\d+\.parquet$", k) for k in keys)
    assert any(re.match(r"run/train/stage1/checkpoint_\d+/.*\.distcp$", k) for k in keys)
    assert any(re.match(r"run/train/stage1/samples/.*\.png$", k) for k in keys)
    assert not [k for k in keys if "/_spool/" in k], "precompute left spools behind"

    def written(objs: dict[str, int], step: str) -> int:
        return sum(size for k, size in objs.items() if k[len("run/"):].startswith(STEP_PREFIXES[step]))

    print(f"\nmulti-node tiny flow: run 1 (killed in stage 1 at step {killed_at}) {t_first:.0f}s, "
          f"run 2 (resume + rest) {t_second:.0f}s, stage-2 rerun {t_stage:.0f}s")
    for step in STEP_PREFIXES:
        print(f"  bytes in S3 after {step:<10}: {written(after_full, step):>12,}"
              f"   (at the kill {written(after_kill, step):,}; after the stage rerun {written(objects, step):,})")
