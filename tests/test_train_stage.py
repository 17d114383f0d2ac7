"""One training stage on real Ray Train (2 CPU workers, gloo, FSDP2): train, export, NaN guard, worker kill,
stop and resume (same losses as an uninterrupted run), damaged checkpoints, and what the live stage listens on."""
from __future__ import annotations

import contextlib
import json
import re
import shutil
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.testing import faults
from sockets import assert_loopback_only, polling, watch_listeners
from test_train_helpers import tiny_stage, write_latents

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("latents")
    return {"synth": write_latents(str(root / "synth"), rows=48)}


@contextlib.contextmanager
def watch_train_metrics(run_name: str, every: float = 1.0):
    """Record, while the block runs, the `ray_microdit_train_*` lines of run `run_name` that the head node's
    metrics export serves (the workers' gauges leave with the workers, so they are read live)."""
    import ray

    head = next(n for n in ray.nodes() if n["Alive"] and n.get("MetricsExportPort"))
    url = f"http://{head['NodeManagerAddress']}:{head['MetricsExportPort']}/metrics"
    seen: set[str] = set()

    def read():
        try:
            with urllib.request.urlopen(url, timeout=30) as r:
                text = r.read().decode()
        except OSError:  # the node's exporter may still be starting
            return
        seen.update(x for x in text.splitlines() if x.startswith("ray_microdit_train_")
                    and f'ray_train_run_name="{run_name}"' in x)

    with polling(read, every, join_timeout=60):
        yield seen


@pytest.fixture(scope="module")
def reference_run(ray_head, data, tmp_path_factory):
    """An uninterrupted 8-step stage (the loss of step index 4 is forced to NaN); yields its root, every socket the
    head's processes (the training workers among them) listened on while it ran, and the workers' Ray metrics."""
    import ray

    from pipeline.core.ray_cluster import connect
    from pipeline.train.stage import train_stage

    connect(ray_head[0])
    root = str(tmp_path_factory.mktemp("ref"))
    with faults.injected(nan_loss_steps=[4]), watch_listeners(ray_head[1]) as listeners, \
            watch_train_metrics("s1") as metrics:
        out = train_stage(tiny_stage(), "MicroDiT_Debug", root, data, encoders={"vae": "standin", "text": "tiny"})
    assert out == f"{root}/train/s1/export"
    yield {"root": root, "listeners": set(listeners), "metrics": set(metrics)}
    ray.shutdown()


@pytest.fixture(scope="module")
def reference(reference_run) -> str:
    return reference_run["root"]


def test_a_live_stage_listens_on_loopback_only(reference_run):
    """The training workers' sockets (the process group's rendezvous store on rank 0, gloo's pairs) while the
    stage trains: on a single-machine head, nothing listens beyond loopback."""
    socks = reference_run["listeners"]
    assert [s for s in socks if "TrainWorker" in s[1]], f"no listener of a training worker was seen: {sorted(socks)}"
    assert_loopback_only(socks)


def test_worker_figures_reach_ray_metrics_by_run_and_rank(reference_run):
    """Every rank's logged figures as Ray metrics, labelled like Ray Train's own (run name, world rank), with the
    values the loop logged; only numbers (booleans as 0/1) become metrics."""
    from pipeline.train.metrics import numeric, read_metrics

    lines = reference_run["metrics"]
    names = {re.match(r"ray_microdit_train_(\w+)\{", x).group(1) for x in lines}
    assert {"loss", "samples_per_s", "step", "skipped", "data_wait_s"} <= names, lines
    losses = {x for x in lines if x.startswith("ray_microdit_train_loss{")}
    assert {re.search(r'ray_train_worker_world_rank="(\d)"', x).group(1) for x in losses} == {"0", "1"}
    logged = {r["loss"] for r in read_metrics(f"{reference_run['root']}/train/s1")}
    assert all(float(x.rsplit(" ", 1)[1]) in logged or x.endswith(" NaN") for x in losses), (losses, logged)
    assert numeric({"loss": 0.5, "skipped": True, "note": "not a number"}) == {"loss": 0.5, "skipped": 1.0}


def _losses(root: str) -> list[float]:
    from pipeline.train.metrics import read_metrics

    rows = read_metrics(f"{root}/train/s1")
    assert [r["step"] for r in rows] == list(range(1, 9))
    return [r["loss"] for r in rows]


def _eval_loss(model, latents, caption) -> float:
    from model.objectives.edm import EDMConfig, edm_loss

    gen = torch.Generator().manual_seed(0)
    sigma = torch.exp(torch.randn(latents.shape[0], generator=gen) * 1.2 - 0.6)
    noise = torch.randn(latents.shape, generator=gen)
    with torch.no_grad():
        return float(edm_loss(model, latents, caption, EDMConfig(sigma_data=0.5), sigma=sigma, noise=noise)[0])


def test_stage_trains_exports_and_skips_nonfinite_step(reference, data):
    from safetensors.torch import load_file

    from model.microdit.config import ModelConfig
    from model.microdit.network import MicroDiT
    from pipeline.core import schema
    from pipeline.train.metrics import read_metrics
    import pyarrow.parquet as pq

    stage_dir = Path(reference) / "train" / "s1"
    export = stage_dir / "export"
    assert {p.name for p in export.iterdir()} >= {"model.safetensors", "ema.safetensors", "config.json", "_SUCCESS"}
    config = json.loads((export / "config.json").read_text())
    assert config["step"] == 8 and config["global_step"] == 8 and config["stage"]["name"] == "s1"
    assert config["model"]["input_size"] == 16 and config["model"]["pos_interp_scale"] == 1.0
    # generate needs no flags
    assert config["encoders"] == {"vae": "standin", "text": "tiny", "repa": None, "text_mode": "release"}
    # One owner: the stage's objective constants travel in the export, and generate samples with them.
    assert config["family"] == "microdit" and config["objective"]["sigma_data"] == 0.5
    from pipeline.generate import GenerateConfig, Generator

    gen = Generator(str(export), GenerateConfig(steps=1))
    assert gen.pipe.scheduler.config.sigma_data == 0.5 and gen.provenance()["steps"] == "1"

    rows = read_metrics(str(stage_dir))
    assert [r["skipped"] for r in rows] == [i == 4 for i in range(8)]  # step index 4 -> logged as step 5
    assert rows[-1]["nonfinite_total"] == 1 and np.isnan(rows[4]["loss"])
    assert all(np.isfinite(r["grad_norm"]) for i, r in enumerate(rows) if i != 4)
    assert all(0 <= r["data_wait_s"] <= r["step_s"] for r in rows)  # input wait is part of the step

    # The loss falls: the exported model beats a fresh init on a fixed noisy batch of the training data.
    table = pq.read_table(sorted(Path(data["synth"]).glob("*.parquet"))[0])
    latents = torch.from_numpy(schema.read_tensor(table, "latents_64")[:16])
    caption = torch.from_numpy(schema.read_tensor(table, "caption_states")[:16])
    cfg = ModelConfig(**config["model"])
    torch.manual_seed(0)
    fresh = MicroDiT(cfg)
    trained = MicroDiT(cfg)
    trained.load_state_dict(load_file(export / "model.safetensors"), strict=True)
    ema = load_file(export / "ema.safetensors")
    assert ema.keys() == trained.state_dict().keys()
    assert any(not torch.equal(ema[k], v) for k, v in trained.state_dict().items())  # EMA really averaged
    assert _eval_loss(trained, latents, caption) < 0.8 * _eval_loss(fresh, latents, caption)

    assert list((stage_dir / "samples").glob("step_000000008.png"))
    assert len(json.loads((stage_dir / "samples" / "prompts.json").read_text())) == 4
    assert list((stage_dir / "tensorboard").glob("events.*"))
    kept = sorted(p.name for p in stage_dir.glob("checkpoint_0*"))
    assert kept == ["checkpoint_000000006", "checkpoint_000000008"]  # keep_checkpoints=2

    # Done is done: a rerun returns the export without training (no new metrics, same files).
    from pipeline.train.stage import train_stage

    before = (stage_dir / "metrics.jsonl").read_bytes()
    assert train_stage(tiny_stage(), "MicroDiT_Debug", reference, data) == str(export)
    assert (stage_dir / "metrics.jsonl").read_bytes() == before


def test_small_source_is_cached_with_the_streamed_order(reference, data):
    from pipeline.train.data import build_datasets

    def rows(ds) -> list[bytes]:
        return [b.tobytes() for batch in ds.iter_batches(batch_size=None, batch_format="numpy")
                for b in batch["latents"]]

    cached, _ = build_datasets(data, 64, seed=3, cache_bytes=1 << 30)
    streamed, _ = build_datasets(data, 64, seed=3, cache_bytes=0)
    streamed["train"].context.execution_options.preserve_order = True  # as Ray Train's DataConfig sets it
    assert type(cached["train"]).__name__ == "MaterializedDataset"
    assert type(streamed["train"]).__name__ != "MaterializedDataset"
    assert rows(cached["train"]) == rows(streamed["train"]) and len(rows(streamed["train"])) == 48


def test_killed_worker_and_stopped_run_resume_to_the_same_losses(reference, data, tmp_path):
    """Rank 1 dies before step 3 (Ray restarts the group from checkpoint 2), the run stops after step 5, a
    rerun finishes it: every step's loss equals the uninterrupted reference run's."""
    from pipeline.train.stage import train_stage

    root = str(tmp_path)
    with faults.injected(nan_loss_steps=[4], crash_rank=1, crash_at_step=3, stop_at_step=5):
        with pytest.raises(RuntimeError, match="stopped before its last step"):
            train_stage(tiny_stage(), "MicroDiT_Debug", root, data)
    assert (tmp_path / "train" / "s1" / "debug_crashed").exists()  # the worker really died once
    assert (tmp_path / "train" / "s1" / "checkpoint_000000005").is_dir()
    assert not (tmp_path / "train" / "s1" / "export").exists()

    with faults.injected(nan_loss_steps=[4]):
        train_stage(tiny_stage(), "MicroDiT_Debug", root, data)
    np.testing.assert_array_equal(_losses(root), _losses(reference))


def _copy_unfinished(reference: str, dest: Path) -> Path:
    shutil.copytree(Path(reference) / "train", dest / "train")
    shutil.rmtree(dest / "train" / "s1" / "export")
    return dest / "train" / "s1"


def test_truncated_checkpoint_is_refused_on_the_driver(reference, data, tmp_path, ray_train_runs):
    from pipeline.train.stage import train_stage

    stage_dir = _copy_unfinished(reference, tmp_path)
    shard = stage_dir / "checkpoint_000000008" / "__1_0.distcp"
    shard.write_bytes(shard.read_bytes()[:1000])
    before = len(ray_train_runs())
    with pytest.raises(ValueError, match=r"checkpoint_000000008/__1_0\.distcp.*truncated"):
        train_stage(tiny_stage(), "MicroDiT_Debug", str(tmp_path), data)
    assert len(ray_train_runs()) == before  # no Ray Train run was started


def test_altered_checkpoint_ends_the_run_without_a_retry(reference, data, tmp_path, ray_train_runs):
    """Bytes flipped in a shard (same size, so only its hash tells): rank 0 finds it while loading, every rank
    ends the attempt, and the driver raises it; Ray Train does not retry what no retry fixes."""
    from pipeline.train.stage import train_stage

    stage_dir = _copy_unfinished(reference, tmp_path)
    shard = stage_dir / "checkpoint_000000008" / "__1_0.distcp"
    data_bytes = bytearray(shard.read_bytes())
    data_bytes[len(data_bytes) // 2] ^= 0xFF
    shard.write_bytes(bytes(data_bytes))
    before = {r["id"] for r in ray_train_runs()}
    with pytest.raises(ValueError, match=r"cannot start: .*checkpoint_000000008/__1_0\.distcp.*corrupt or altered"):
        train_stage(tiny_stage(), "MicroDiT_Debug", str(tmp_path), data)
    runs = [r for r in ray_train_runs() if r["id"] not in before]
    assert [len(r["attempts"]) for r in runs] == [1], runs


def test_checkpoint_of_another_model_is_a_clear_error(reference, data, tmp_path):
    from pipeline.train.stage import train_stage

    _copy_unfinished(reference, tmp_path)
    with pytest.raises(ValueError, match=r"model_config\.json.*depth"):
        train_stage(tiny_stage(), {"preset": "MicroDiT_Debug", "depth": 3}, str(tmp_path), data)


def test_too_many_nonfinite_steps_stop_the_stage(reference, data, tmp_path):
    from pipeline.train.stage import train_stage

    # One worker: the stop rule acts on the one global verdict per step; two ranks are the reference's business.
    stage = tiny_stage(name="nan", steps=4, max_failures=0, max_consecutive_nonfinite=1, sample_prompts=0,
                       num_workers=1, micro_batch=4)
    with faults.injected(nan_loss_steps=[0, 1, 2]), pytest.raises(RuntimeError, match="2 non-finite steps in a row"):
        train_stage(stage, "MicroDiT_Debug", str(tmp_path), data)
