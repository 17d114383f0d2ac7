"""Checkpoints: DCP over Stateful objects, signed per-rank manifests, and safetensors export.

A checkpoint directory (one per save, `checkpoint_<stage step>`) is what every rank reported to Ray Train,
merged: DCP's `.metadata` and `__<rank>_0.distcp` shards, `manifest_rank<r>.json` (size and SHA-256 of each
file that rank wrote, signed with HMAC-SHA256 under the checkpoint key of `pipeline.core.signing`),
`rng_rank<r>.pt`, and rank 0's `train_state.json`, `model_config.json`, `stage_config.json`.
A file that is missing, truncated or altered, or a model config that differs, is a ValueError naming the file;
a damaged checkpoint never turns into a silent fresh start.

Storage is not trusted with code: DCP unpickles `.metadata` (and, by default, non-tensor values in the shards).
So a manifest whose HMAC is missing or wrong is a `CheckpointIntegrityError` naming the folder before any byte
of the checkpoint is unpickled; `.metadata` is unpickled only from the very bytes whose hash was checked, and
everything else loads with `torch.load(weights_only=True)`.
"""
from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader

from pipeline.core import layout, signing, storage

CHECKPOINT_RE = re.compile(r"^checkpoint_(\d+)$")
MODEL_CONFIG, STAGE_CONFIG, TRAIN_STATE = "model_config.json", "stage_config.json", "train_state.json"
EXPORT_FILES = ("model.safetensors", "ema.safetensors", "config.json")
MANIFEST_FORMAT = "microdit-checkpoint-manifest/2"
DCP_METADATA = ".metadata"


class CheckpointIntegrityError(ValueError):
    """A checkpoint whose signature or hashes do not check out: refused unread, and (a ValueError) never retried."""


def checkpoint_dir_name(stage_step: int) -> str:
    return f"checkpoint_{stage_step:09d}"


@dataclass
class TrainState:
    """Counters and the data position: everything besides tensors that a resumed run must continue from."""

    stage_step: int = 0  # optimizer steps taken in this stage
    global_step: int = 0  # optimizer steps taken since the first stage (carried through full_state inits)
    nonfinite_total: int = 0
    nonfinite_consecutive: int = 0
    data: dict[str, Any] = field(default_factory=dict)  # MixtureStream.state_dict()

    def state_dict(self) -> dict[str, Any]:
        return {"stage_step": self.stage_step, "global_step": self.global_step,
                "nonfinite_total": self.nonfinite_total, "nonfinite_consecutive": self.nonfinite_consecutive,
                "data": json.dumps(self.data)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.stage_step = int(state["stage_step"])
        self.global_step = int(state["global_step"])
        self.nonfinite_total = int(state["nonfinite_total"])
        self.nonfinite_consecutive = int(state["nonfinite_consecutive"])
        self.data = json.loads(state["data"])


class AppState:
    """The Stateful handed to DCP: sharded model and optimizer state, EMA shadow shards, train counters."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, ema, train: TrainState):
        self.model, self.optimizer, self.ema, self.train = model, optimizer, ema, train

    def state_dict(self) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        return {"model": model_sd, "optim": optim_sd, "ema": self.ema.state_dict(),
                "train": self.train.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        from torch.distributed.checkpoint.state_dict import set_state_dict

        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"],
                       optim_state_dict=state["optim"])
        self.ema.load_state_dict(state["ema"])
        self.train.load_state_dict(state["train"])


def _sha256(uri: str) -> str:
    fs, path = storage.filesystem(uri)
    h = hashlib.sha256()
    with fs.open_input_stream(path) as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


def write_manifest(folder: str, rank: int) -> None:
    """Sign this rank's files of local `folder` (all but manifests): manifest_rank<r>.json with size, SHA-256, HMAC."""
    files = {n: {"size": os.path.getsize(os.path.join(folder, n)), "sha256": _sha256(os.path.join(folder, n))}
             for n in sorted(os.listdir(folder)) if not n.startswith("manifest_")}
    body = {"format": MANIFEST_FORMAT, "rank": rank, "files": files}
    with open(os.path.join(folder, f"manifest_rank{rank}.json"), "w") as f:
        json.dump({**body, "hmac": signing.sign(body)}, f, indent=1, sort_keys=True)


def save_local(app: AppState, folder: str, rank: int, world: int, extra_json: dict[str, Any]) -> None:
    """DCP-save `app` into this rank's local `folder` and write its signed manifest (rank 0 also the JSON files)."""
    import torch.distributed.checkpoint as dcp

    dcp.save({"app": app}, checkpoint_id=folder)
    torch.save({"cpu": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None},
               os.path.join(folder, f"rng_rank{rank}.pt"))
    if rank == 0:
        for name, obj in {**extra_json, TRAIN_STATE: {**app.train.state_dict(), "world_size": world}}.items():
            with open(os.path.join(folder, name), "w") as f:
                json.dump(obj, f, indent=2, sort_keys=True, default=str)
    write_manifest(folder, rank)


def _read_checkpoint_json(uri: str, name: str) -> Any:
    """A JSON file of checkpoint `uri`; missing or corrupt is a ValueError naming the file."""
    file_uri = storage.join(uri, name)
    try:
        return storage.read_json(file_uri)
    except FileNotFoundError:
        raise ValueError(f"checkpoint {uri!r} is incomplete: {file_uri!r} is missing") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"checkpoint file {file_uri!r} is corrupt: {e}") from None


def _signed_files(uri: str, rank: int) -> dict[str, dict[str, Any]]:
    """The file list of rank `rank`'s manifest, after its HMAC checked out (JSON only is read before that)."""
    m_name = f"manifest_rank{rank}.json"
    data = _read_checkpoint_json(uri, m_name)
    if not isinstance(data, dict) or "hmac" not in data:
        raise CheckpointIntegrityError(
            f"checkpoint {uri!r} is refused: {m_name!r} carries no signature (written before checkpoints were "
            f"signed, or not by this pipeline); nothing of it was unpickled")
    body = {k: v for k, v in data.items() if k != "hmac"}
    if not signing.signature_ok(body, data["hmac"]):
        raise CheckpointIntegrityError(
            f"checkpoint {uri!r} is refused: the HMAC of {m_name!r} does not match the checkpoint key (altered in "
            f"storage, or written under another key: set ${signing.KEY_ENV} to the writer's key to resume it); "
            f"nothing of it was unpickled")
    if body.get("format") != MANIFEST_FORMAT or body.get("rank") != rank or not isinstance(body.get("files"), dict):
        raise CheckpointIntegrityError(f"checkpoint {uri!r} is refused: {m_name!r} is signed but not a rank-{rank} "
                                       f"manifest of format {MANIFEST_FORMAT!r}")
    return body["files"]


def _verified_files(uri: str, *, hash_all: bool) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """(train_state.json, every rank's signed file list merged) of checkpoint `uri`, each file checked.

    Sizes always; SHA-256 of every file that is parsed or unpickled outside DCP's tensor reads (`.metadata`,
    JSON, RNG state) always, and of the large `.distcp` shards too when `hash_all`.
    """
    import pyarrow.fs as pafs

    fs, _ = storage.filesystem(uri)

    def check(rank: int) -> dict[str, dict[str, Any]]:
        files = _signed_files(uri, rank)
        m_name = f"manifest_rank{rank}.json"
        for name, meta in files.items():
            f_uri = storage.join(uri, name)
            info = fs.get_file_info(storage.filesystem(f_uri)[1])
            if info.type == pafs.FileType.NotFound:
                raise CheckpointIntegrityError(f"checkpoint file {f_uri!r} is missing (listed in {m_name!r})")
            if info.size != meta["size"]:
                raise CheckpointIntegrityError(f"checkpoint file {f_uri!r} is truncated or damaged: {info.size} "
                                               f"bytes, expected {meta['size']}")
            if (hash_all or not name.endswith(".distcp")) and _sha256(f_uri) != meta["sha256"]:
                raise CheckpointIntegrityError(f"checkpoint file {f_uri!r} is corrupt or altered: its SHA-256 "
                                               f"differs from the signed {m_name!r}")
        return files

    files = check(0)
    if TRAIN_STATE not in files:
        raise CheckpointIntegrityError(f"checkpoint {uri!r} is refused: {TRAIN_STATE!r} is not in the signed "
                                       "manifest_rank0.json")
    state = _read_checkpoint_json(uri, TRAIN_STATE)  # its hash was just checked
    for rank in range(1, int(state.get("world_size", 1))):
        for name, meta in check(rank).items():
            files.setdefault(name, meta)
    if DCP_METADATA not in files:
        raise CheckpointIntegrityError(f"checkpoint {uri!r} is refused: no manifest signs its {DCP_METADATA!r}")
    return state, files


def verify(uri: str, *, hash_all: bool) -> dict[str, Any]:
    """Check every rank's signed manifest against the files of checkpoint `uri`; returns its train_state.json.

    Unpickles nothing. `hash_all=False` hashes all but the `.distcp` shards (their sizes are still checked).
    """
    return _verified_files(uri, hash_all=hash_all)[0]


def check_model_config(uri: str, model_cfg: dict[str, Any]) -> None:
    """ValueError naming the file when checkpoint `uri` holds a model of another config."""
    c_uri = storage.join(uri, MODEL_CONFIG)
    try:
        saved = storage.read_json(c_uri)
    except (FileNotFoundError, json.JSONDecodeError) as e:
        raise ValueError(f"checkpoint file {c_uri!r} is missing or corrupt: {e}") from None
    current = json.loads(json.dumps(model_cfg))
    diff = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))
    if diff:
        raise ValueError(f"checkpoint {uri!r} was written for another model ({c_uri!r} differs in {diff}: "
                         f"{ {k: saved.get(k) for k in diff} } vs { {k: current.get(k) for k in diff} })")


def _integrity_cause(e: BaseException) -> CheckpointIntegrityError | None:
    """The CheckpointIntegrityError inside a DCP exception (DCP wraps per-rank failures), if any."""
    for f in [e, e.__cause__, *getattr(e, "failures", {}).values()]:
        f = getattr(f, "exception", f)  # torch's _WrappedException
        if isinstance(f, CheckpointIntegrityError):
            return f
    return None


def load_local(app: AppState, folder: str, rank: int, world: int, *, restore_rng: bool) -> None:
    """Load checkpoint `folder` (already local) into `app`; any failure is a ValueError naming the folder.

    The signatures and small-file hashes are checked here on every rank (the caller may hash the shards
    too); then DCP reads through `_VerifiedReader` and `_WeightsOnlyPlanner`, so nothing unverified is unpickled.
    """
    import torch.distributed.checkpoint as dcp

    _, files = _verified_files(folder, hash_all=False)
    try:
        dcp.load({"app": app}, storage_reader=_VerifiedReader(folder, files), planner=_WeightsOnlyPlanner())
    except Exception as e:  # DCP wraps per-rank errors; name the checkpoint, keep the cause
        if (bad := _integrity_cause(e)) is not None:
            raise bad from None
        raise ValueError(f"checkpoint {folder!r} could not be loaded: {type(e).__name__}: {e}") from e
    rng_path = os.path.join(folder, f"rng_rank{rank}.pt")
    saved_world = json.load(open(os.path.join(folder, TRAIN_STATE))).get("world_size")
    if restore_rng and saved_world == world and os.path.exists(rng_path):
        rng = torch.load(rng_path, weights_only=True)
        torch.set_rng_state(rng["cpu"])
        if rng["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])


class _VerifiedReader(FileSystemReader):
    """FileSystemReader that unpickles `.metadata` only from the bytes whose SHA-256 the signed manifest names."""

    def __init__(self, folder: str, signed_files: dict[str, dict[str, Any]]):
        super().__init__(folder)
        self._folder, self._signed = folder, signed_files

    def read_metadata(self, *args: Any, **kwargs: Any):
        from torch.distributed.checkpoint.metadata import StorageMeta

        rank = kwargs.get("rank")
        name = DCP_METADATA if rank is None else f"__{rank}{DCP_METADATA}"
        with open(os.path.join(self._folder, name), "rb") as f:
            data = f.read()  # read once: the bytes checked are the bytes unpickled
        meta = self._signed.get(name)
        if meta is None or hashlib.sha256(data).hexdigest() != meta["sha256"]:
            raise CheckpointIntegrityError(f"checkpoint file {os.path.join(self._folder, name)!r} is not the "
                                           "signed one (altered after it was verified); it was not unpickled")
        metadata = pickle.loads(data)
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class _WeightsOnlyPlanner(DefaultLoadPlanner):
    """DefaultLoadPlanner whose non-tensor values (counters, param-group settings) load with weights_only=True.

    DCP's own planner uses `torch.load(weights_only=False)` for them: arbitrary pickles from the shards.
    """

    def load_bytes(self, read_item, value) -> None:
        obj = torch.load(value, weights_only=True)
        if self.flatten_state_dict:
            from torch.distributed.checkpoint._traverse import set_element  # what DefaultLoadPlanner uses

            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj


def checkpoints(run_uri: str) -> list[tuple[int, str]]:
    """(stage step, URI) of the checkpoint folders under a stage's run folder, oldest first."""
    fs, path = storage.filesystem(run_uri)
    import pyarrow.fs as pafs

    infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    out = []
    for info in infos:
        m = CHECKPOINT_RE.match(info.base_name)
        if m and info.type == pafs.FileType.Directory:
            out.append((int(m.group(1)), storage.join(run_uri, info.base_name)))
    return sorted(out)


def full_state_dicts(model: nn.Module, ema) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Consolidated (model, EMA) fp32 CPU state dicts on rank 0 (empty elsewhere); a collective on all ranks."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.tensor import DTensor

    model_sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    ema_sd = {}
    for name, t in ema.shadow.items():
        full = t.full_tensor() if isinstance(t, DTensor) else t
        if dist.get_rank() == 0:
            ema_sd[name] = full.detach().float().cpu().contiguous()
    model_sd = {k: v.float().contiguous() for k, v in model_sd.items()} if dist.get_rank() == 0 else {}
    return model_sd, ema_sd


def export(export_uri: str, model_sd: dict, ema_sd: dict, config: dict[str, Any]) -> None:
    """Write model.safetensors, ema.safetensors, config.json, then the _SUCCESS marker last."""
    from safetensors.torch import save

    storage.write_bytes(storage.join(export_uri, "model.safetensors"), save(model_sd))
    storage.write_bytes(storage.join(export_uri, "ema.safetensors"), save(ema_sd))
    storage.write_json(storage.join(export_uri, "config.json"), config)
    layout.mark_complete(export_uri, json.dumps({"step": config.get("step")}))


def load_weights(uri: str) -> dict[str, torch.Tensor]:
    """A safetensors file from a local path or s3:// URI (ValueError naming it when unreadable)."""
    from safetensors.torch import load

    data = storage.read_bytes(uri)
    try:
        return load(data)
    except Exception as e:
        raise ValueError(f"weights file {uri!r} is not a readable safetensors file: {e}") from e
