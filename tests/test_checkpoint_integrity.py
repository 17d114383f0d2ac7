"""Checkpoints are code from data: a checkpoint whose signed manifest does not check out is refused before
any of its bytes are unpickled (a malicious `.metadata` would create a marker file), on the driver and on the
workers; a good one still loads. One real DCP checkpoint (FSDP2, one gloo rank) is written per module."""
from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch

from pipeline.core import signing


class _MakesMarker:
    """Unpickling this creates the file at `path` (what an attacker's pickle would do, harmlessly)."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.fixture(scope="module")
def gloo():
    import torch.distributed as dist

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def _build(seed: int):
    from model.ema import EMA
    from model.microdit.config import model_config
    from model.microdit.network import MicroDiT
    from pipeline.train import checkpoint as ckpt
    from pipeline.train.optim import build_optimizer
    from model.microdit.family import FAMILY as MICRODIT
    from pipeline.train.parallelize import build_mesh, parallelize

    torch.manual_seed(seed)
    m = parallelize(MicroDiT(model_config("MicroDiT_Debug", depth=2, mixer_depth=1)), build_mesh(1, "cpu"),
                    units=MICRODIT.shard_units, bf16=False, compile=False, activation_checkpointing=False)
    opt = build_optimizer(m, 1e-3)
    return ckpt.AppState(m, opt, EMA(m, 0.9), ckpt.TrainState(stage_step=3, global_step=3))


@pytest.fixture(scope="module")
def saved(gloo, tmp_path_factory):
    """A real signed checkpoint folder (model config {"a": 1}) written under this session's key."""
    from pipeline.train import checkpoint as ckpt

    folder = tmp_path_factory.mktemp("ckpt") / "checkpoint_000000003"
    folder.mkdir()
    ckpt.save_local(_build(0), str(folder), 0, 1, {ckpt.MODEL_CONFIG: {"a": 1}})
    return folder


@pytest.fixture
def copy(saved, tmp_path) -> Path:
    dest = tmp_path / "train" / "s1" / saved.name
    shutil.copytree(saved, dest)
    return dest


def _evil_metadata(folder: Path, size: int = 4096) -> Path:
    """Replace `.metadata` by a pickle that creates a marker when unpickled, padded to the original file's size
    (pickle stops at its STOP opcode), so only the hash can tell; returns the marker path."""
    marker = folder.parent / "PWNED"
    path = folder / ".metadata"
    payload = pickle.dumps(_MakesMarker(str(marker)))
    size = path.stat().st_size if path.exists() else size
    path.write_bytes(payload + b"\0" * (size - len(payload)))
    return marker


def test_malicious_pickle_does_make_the_marker(tmp_path):
    """The probe works: unpickling it really creates the marker (so its absence below means 'never unpickled')."""
    folder = tmp_path / "c"
    folder.mkdir()
    marker = _evil_metadata(folder)
    pickle.loads((folder / ".metadata").read_bytes())
    assert marker.exists()


def test_good_checkpoint_verifies_and_loads(saved, gloo):
    from pipeline.train import checkpoint as ckpt

    manifest = json.loads((saved / "manifest_rank0.json").read_text())
    assert set(manifest) == {"format", "rank", "files", "hmac"}
    assert {".metadata", "__0_0.distcp", "train_state.json", "rng_rank0.pt"} <= set(manifest["files"])
    assert ckpt.verify(str(saved), hash_all=True)["stage_step"] == 3
    app = _build(1)
    ckpt.load_local(app, str(saved), 0, 1, restore_rng=True)
    ref = _build(0)
    for (n, p), (_, q) in zip(app.model.named_parameters(), ref.model.named_parameters()):
        assert torch.equal(p.full_tensor(), q.full_tensor()), n
    assert app.train.global_step == 3


def test_tampered_metadata_is_refused_before_unpickling(copy, gloo):
    from pipeline.train import checkpoint as ckpt

    marker = _evil_metadata(copy)
    for check in (lambda: ckpt.verify(str(copy), hash_all=False),
                  lambda: ckpt.load_local(_build(1), str(copy), 0, 1, restore_rng=True)):
        with pytest.raises(ckpt.CheckpointIntegrityError, match=rf"{copy}/\.metadata.*SHA-256.*manifest_rank0"):
            check()
    assert not marker.exists()


def test_resigned_manifest_without_the_key_is_refused(copy, gloo, monkeypatch):
    """The attacker also rewrites the manifest with matching hashes, but can only sign it with another key."""
    from pipeline.train import checkpoint as ckpt

    marker = _evil_metadata(copy)
    with monkeypatch.context() as m:
        m.setenv(signing.KEY_ENV, "attacker-" + "0" * 40)
        ckpt.write_manifest(str(copy), 0)
    with pytest.raises(ckpt.CheckpointIntegrityError, match=rf"checkpoint '{copy}' is refused: the HMAC"):
        ckpt.load_local(_build(1), str(copy), 0, 1, restore_rng=True)
    manifest = json.loads((copy / "manifest_rank0.json").read_text())
    del manifest["hmac"]  # an unsigned (pre-signing) manifest
    (copy / "manifest_rank0.json").write_text(json.dumps(manifest))
    with pytest.raises(ckpt.CheckpointIntegrityError, match=rf"checkpoint '{copy}' is refused: .*no signature"):
        ckpt.load_local(_build(1), str(copy), 0, 1, restore_rng=True)
    assert not marker.exists()


def test_checkpoint_written_under_another_key_is_refused(gloo, tmp_path, monkeypatch):
    from pipeline.train import checkpoint as ckpt

    folder = tmp_path / "checkpoint_000000003"
    folder.mkdir()
    with monkeypatch.context() as m:
        m.setenv(signing.KEY_ENV, "another-machine-" + "1" * 40)
        ckpt.save_local(_build(0), str(folder), 0, 1, {ckpt.MODEL_CONFIG: {"a": 1}})
        ckpt.verify(str(folder), hash_all=True)  # fine under the writer's key
    with pytest.raises(ckpt.CheckpointIntegrityError, match=rf"'{folder}'.*another key.*{signing.KEY_ENV}"):
        ckpt.verify(str(folder), hash_all=True)


def test_metadata_swapped_after_verification_is_not_unpickled(copy, gloo):
    """The reader unpickles only the bytes it hashed: a swap between verify and load is caught too."""
    from pipeline.train import checkpoint as ckpt

    _, files = ckpt._verified_files(str(copy), hash_all=True)
    marker = _evil_metadata(copy)
    with pytest.raises(ckpt.CheckpointIntegrityError, match=r"\.metadata.*not the signed one"):
        ckpt._VerifiedReader(str(copy), files).read_metadata()
    assert not marker.exists()


def test_non_tensor_values_load_weights_only(tmp_path):
    """DCP's default planner unpickles a shard's non-tensor values with weights_only=False; ours refuses code."""
    import io

    from pipeline.train.checkpoint import _WeightsOnlyPlanner

    marker = tmp_path / "PWNED"
    buf = io.BytesIO()
    torch.save(_MakesMarker(str(marker)), buf)
    buf.seek(0)
    with pytest.raises(pickle.UnpicklingError):
        _WeightsOnlyPlanner().load_bytes(None, buf)
    assert not marker.exists()


def test_driver_refuses_before_workers_start_and_is_not_retried(copy):
    """train_stage checks the stage's own checkpoint before Ray starts; the error is bad input to Prefect."""
    from flows.tasks import BAD_INPUT
    from pipeline.train import checkpoint as ckpt
    from pipeline.core.plan import stage_config
    from pipeline.train.stage import resolve_init
    from test_train_helpers import tiny_stage

    root = str(copy.parent.parent.parent)
    marker = _evil_metadata(copy)
    with pytest.raises(ckpt.CheckpointIntegrityError, match=rf"{copy}/\.metadata"):
        resolve_init(root, stage_config(tiny_stage()), {"a": 1}, "microdit")
    assert not marker.exists()
    assert issubclass(ckpt.CheckpointIntegrityError, BAD_INPUT)  # retry_unless_bad_input: no retry


def test_worker_load_path_refuses(copy, gloo):
    """pipeline.train.loop.load_checkpoint (what each Ray Train worker runs) refuses the same way, as a refusal
    that ends the run rather than a failure Ray Train retries."""
    from pipeline.train.loop import StageRefused, load_checkpoint

    marker = _evil_metadata(copy)
    with pytest.raises(StageRefused, match=r"\.metadata' is corrupt or altered"):
        load_checkpoint(_build(1), str(copy), 0, 1, {"a": 1}, same_stage=True)
    assert not marker.exists()


def test_key_file_is_created_private_and_reused(tmp_path, monkeypatch):
    monkeypatch.delenv(signing.KEY_ENV)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    monkeypatch.setattr(signing, "_ray_job_kv_name", lambda: None)  # as outside Ray (this worker may be a driver)
    key = signing.checkpoint_key()
    path = tmp_path / "microdit" / "checkpoint.key"
    assert path.read_text().strip() == key and len(key) == 64
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    assert signing.checkpoint_key() == key
    path.chmod(0o644)
    with pytest.raises(ValueError, match="readable or writable by others"):
        signing.checkpoint_key()
    monkeypatch.setenv(signing.KEY_ENV, "short")
    with pytest.raises(ValueError, match="shorter than 32"):
        signing.checkpoint_key()


@pytest.mark.slow
def test_ray_workers_use_the_drivers_key_which_is_never_logged(ray_address, tmp_path):
    """A worker without $MICRODIT_CHECKPOINT_KEY and without a key file gets the driver's key from the job's
    entry in the cluster's key-value store (connect() puts it there); no file of the Ray session holds it."""
    import ray

    from pipeline.core.ray_cluster import connect

    connect(ray_address)
    try:
        @ray.remote
        def worker_key(config_home: str) -> str:
            saved = {k: os.environ.pop(k, None) for k in (signing.KEY_ENV, "XDG_CONFIG_HOME")}
            os.environ["XDG_CONFIG_HOME"] = config_home  # a node never given the key: a new file would go here
            try:
                return signing.checkpoint_key()
            finally:
                os.environ.pop("XDG_CONFIG_HOME")
                os.environ.update({k: v for k, v in saved.items() if v is not None})

        key = signing.checkpoint_key()
        assert ray.get(worker_key.remote(str(tmp_path))) == key
        assert not (tmp_path / "microdit").exists()
        session = Path(ray._private.worker._global_node.get_session_dir_path())
        leaked = [p for p in session.rglob("*")
                  if p.is_file() and not p.is_symlink() and key.encode() in p.read_bytes()]
        assert not leaked, leaked
    finally:
        ray.shutdown()
