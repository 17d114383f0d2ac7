"""A training worker's figures as Ray metrics, labelled like Ray Train's own (run name, world rank), read back from
the node's metrics export while the worker runs (they leave with it)."""
from __future__ import annotations

import os
import re
import threading
import time
import urllib.request

import pytest

pytestmark = pytest.mark.slow  # a Ray Train run on the session's Ray head


def test_worker_figures_reach_ray_metrics_by_run_and_rank(ray_address, tmp_path):
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from pipeline.core.ray_cluster import connect

    connect(ray_address)

    def _worker(config):
        """Set the gauges until the driver has seen them (or two minutes passed); defined here, so it travels
        by value (workers cannot import this test module)."""
        import ray.train

        from pipeline.train.metrics import RayGauges

        ctx = ray.train.get_context()
        gauges = RayGauges(ctx.get_experiment_name(), ctx.get_world_rank())
        deadline = time.monotonic() + 120
        while not os.path.exists(config["seen"]) and time.monotonic() < deadline:
            gauges.set({"step": 3, "loss": 0.5, "samples_per_s": 8.0, "skipped": False, "note": "not a number"})
            time.sleep(0.5)

    head = next(n for n in ray.nodes() if n["Alive"] and n.get("MetricsExportPort"))
    url = f"http://{head['NodeManagerAddress']}:{head['MetricsExportPort']}/metrics"
    seen, found = tmp_path / "seen", {}

    def watch():
        while not seen.exists():
            try:
                with urllib.request.urlopen(url, timeout=30) as r:
                    text = r.read().decode()
            except OSError as e:  # the node's exporter may still be starting
                found["error"] = repr(e)
                time.sleep(1)
                continue
            lines = [x for x in text.splitlines() if x.startswith("ray_microdit_train_")
                     and 'ray_train_run_name="gauges-check"' in x]
            if any(x.startswith("ray_microdit_train_loss{") for x in lines):
                found["lines"] = lines
                seen.touch()
            time.sleep(1)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    TorchTrainer(_worker, train_loop_config={"seen": str(seen)},
                 scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": 0.5}),
                 run_config=RunConfig(name="gauges-check", storage_path=str(tmp_path / "train"))).fit()
    seen.touch()
    watcher.join(timeout=60)
    lines = found.get("lines", [])
    names = {re.match(r"ray_microdit_train_(\w+)\{", x).group(1) for x in lines}
    assert {"loss", "samples_per_s", "step", "skipped"} <= names and "note" not in names, (url, found)
    loss = next(x for x in lines if x.startswith("ray_microdit_train_loss{"))
    assert 'ray_train_worker_world_rank="0"' in loss and loss.endswith(" 0.5")
