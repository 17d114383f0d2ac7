"""The tiny recipe's flow on two Ray nodes whose only shared state is Ray and S3 (tests/multinode.py).

Precompute's tasks and actors and the training workers request {"worker_node": 1}, so they run on the worker
node, which cannot see the head's /tmp, the test's folders or the repository's runs/ (tmpfs over each in its own
mount namespace). The flow itself runs on the head's side, as a Prefect flow against the session's server, with
`storage: s3://...` on moto: download -> precompute (on the worker node) -> one short stage (on the worker node) ->
sample grid and report (on the head's side, from S3). A step that hands a node-local path to another node fails
here. Kill and resume are the single-machine flow's and the training tests' (tests/test_flows.py,
tests/test_train_emmdit.py resumes from an S3 checkpoint); what only this test proves is the hand-off through S3.
Prints the flow's time and the bytes each step wrote to S3.
"""
from __future__ import annotations

import json
import re
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
ON_WORKER = f"{{{WORKER_RESOURCE}: 1}}"
# The tiny recipe at its minimum, one stage (see _plan), with the data and training steps placed on the worker.
OVERRIDES = [
    "sources.synthetic.options.n=48", "download.number_sample_per_shard=32",
    f"precompute.resources={ON_WORKER}",
    "sample.steps=2", "sample.prompts=['a large red circle on a white background, center']",
    "stages.stage1.steps=2", "stages.stage1.checkpoint.every=2", "stages.stage1.log_every=1",
    "stages.stage1.batch.global_batch=8", "stages.stage1.batch.micro_batch=8", "stages.stage1.batch.num_workers=1",
    f"stages.stage1.batch.resources={ON_WORKER}", "stages.stage1.sampling.prompts=2",
    "stages.stage1.sampling.steps=2", "stages.stage1.optim.schedule.warmup_steps=0",
]
# Steps of the flow and the folders they write (bytes per step are measured over these prefixes).
STEP_PREFIXES = {"download": ("data/urls/", "data/raw/", "data/shards/"), "precompute": ("data/latents/",),
                 "stage1": ("train/stage1/",), "sample": ("samples/",), "report": ("report/",),
                 "run": ("config.json", "_lease.json")}


def _plan(root: str) -> dict:
    from pipeline.checks import check_run, load_run
    from pipeline.core.plan import RunConfig

    cfg = load_run(RECIPE, [f"storage={root}", *OVERRIDES])
    cfg = RunConfig.model_validate({**cfg.to_dict(), "stages": cfg.to_dict()["stages"][:1], "evaluate": None})
    return check_run(cfg, "multinode plan").to_dict()


def _flow(env: dict, params: dict, log: Path) -> dict:
    """The full-run flow in its own process group (a driver on the head's side); returns its result."""
    code = ("import json, sys; from flows.full_run import full_run; "
            "print('RESULT', json.dumps(full_run(**json.loads(sys.argv[1]))))")
    with open(log, "a") as f:
        proc = subprocess.run([sys.executable, "-c", code, json.dumps(params)], cwd=REPO, env=env, stdout=f,
                              stderr=subprocess.STDOUT, start_new_session=True, timeout=1200)
    out = log.read_text()
    assert proc.returncode == 0, out[-6000:]
    return json.loads(out.rsplit("RESULT ", 1)[1].splitlines()[0])


def _objects(bucket: str) -> dict[str, int]:
    """key -> size of every object in the bucket."""
    import boto3

    client, found = boto3.client("s3"), {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        found.update({o["Key"]: o["Size"] for o in page.get("Contents", [])})
    return found


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
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    root = f"s3://{s3_bucket}/run"
    env = dict(cluster.client_env(), AWS_ENDPOINT_URL=s3_endpoint, PREFECT_API_URL=prefect_server)
    t0 = time.monotonic()
    out = _flow(env, {"plan": _plan(root)}, tmp_path / "flow.log")
    took = time.monotonic() - t0
    placed = _worker_logs_mention(cluster, "ReadShard", "EncodeImages", "RayTrainWorker")
    assert placed == {"ReadShard": True, "EncodeImages": True, "RayTrainWorker": True}, placed
    assert out["report"].startswith(root) and out["sample_grid"] == f"{root}/samples/grid.png"

    # Every output is in S3.
    objects = _objects(s3_bucket)
    keys = set(objects)
    for key in ("run/config.json", "run/data/urls/synthetic.parquet", "run/data/shards/synthetic/_SUCCESS",
                "run/data/latents/synthetic/_SUCCESS", "run/data/latents/synthetic/_report.json",
                "run/train/stage1/export/_SUCCESS", "run/train/stage1/export/model.safetensors",
                "run/train/stage1/metrics.jsonl", "run/samples/grid.png",
                "run/report/report.md"):
        assert key in keys, (key, sorted(keys))
    assert any(re.match(r"run/data/shards/synthetic/\d+\.tar$", k) for k in keys)
    assert any(re.match(r"run/data/latents/synthetic/part-\d+\.parquet$", k) for k in keys)
    assert any(re.match(r"run/train/stage1/checkpoint_\d+/.*\.distcp$", k) for k in keys)
    assert any(re.match(r"run/train/stage1/samples/.*\.png$", k) for k in keys)
    assert not [k for k in keys if "/_spool/" in k], "precompute left spools behind"

    print(f"\nmulti-node tiny flow (download, precompute and a 2-step stage on the worker node): {took:.0f}s")
    for step, prefixes in STEP_PREFIXES.items():
        written = sum(size for k, size in objects.items() if k[len("run/"):].startswith(prefixes))
        print(f"  bytes in S3 after {step:<10}: {written:>12,}")
