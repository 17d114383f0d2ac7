"""Checkpoints: DCP over Stateful objects, a per-rank manifest that catches damaged files, and safetensors export.

A checkpoint directory (one per save, `checkpoint_<stage step>`) is what every rank reported to Ray Train,
merged: DCP's `.metadata` and `__<rank>_0.distcp` shards, `manifest_rank<r>.json` (size and CRC32 of each file
that rank wrote), `rng_rank<r>.pt`, and rank 0's `train_state.json`, `model_config.json`, `stage_config.json`.
A file that is missing, truncated or altered, or a model config that differs, is a ValueError naming the file;
a damaged checkpoint never turns into a silent fresh start.
"""
from __future__ import annotations

import json
import os
import re
import zlib
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from pipeline.core import storage

CHECKPOINT_RE = re.compile(r"^checkpoint_(\d+)$")
MODEL_CONFIG, STAGE_CONFIG, TRAIN_STATE = "model_config.json", "stage_config.json", "train_state.json"
EXPORT_FILES = ("model.safetensors", "ema.safetensors", "config.json")
EXPORT_MARKER = "_SUCCESS"


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


def _crc(path: str) -> int:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            crc = zlib.crc32(chunk, crc)
    return crc


def save_local(app: AppState, folder: str, rank: int, world: int, extra_json: dict[str, Any]) -> None:
    """DCP-save `app` into this rank's local `folder` and write its manifest (rank 0 also the JSON files)."""
    import torch.distributed.checkpoint as dcp

    dcp.save({"app": app}, checkpoint_id=folder)
    torch.save({"cpu": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None},
               os.path.join(folder, f"rng_rank{rank}.pt"))
    if rank == 0:
        for name, obj in {**extra_json, TRAIN_STATE: {**app.train.state_dict(), "world_size": world}}.items():
            with open(os.path.join(folder, name), "w") as f:
                json.dump(obj, f, indent=2, sort_keys=True, default=str)
    files = sorted(n for n in os.listdir(folder) if not n.startswith("manifest_"))
    manifest = {n: {"size": os.path.getsize(os.path.join(folder, n)), "crc32": _crc(os.path.join(folder, n))}
                for n in files}
    with open(os.path.join(folder, f"manifest_rank{rank}.json"), "w") as f:
        json.dump(manifest, f, indent=1, sort_keys=True)


def _read_checkpoint_json(uri: str, name: str) -> Any:
    """A JSON file of checkpoint `uri`; missing or corrupt is a ValueError naming the file."""
    file_uri = storage.join(uri, name)
    try:
        return storage.read_json(file_uri)
    except FileNotFoundError:
        raise ValueError(f"checkpoint {uri!r} is incomplete: {file_uri!r} is missing") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"checkpoint file {file_uri!r} is corrupt: {e}") from None


def verify(uri: str, *, check_crc: bool) -> dict[str, Any]:
    """Check every rank's manifest against the files of checkpoint `uri`; returns its train_state.json."""
    import pyarrow.fs as pafs

    state = _read_checkpoint_json(uri, TRAIN_STATE)
    fs, _ = storage.filesystem(uri)
    for rank in range(int(state.get("world_size", 1))):
        m_name = f"manifest_rank{rank}.json"
        manifest = _read_checkpoint_json(uri, m_name)
        for name, meta in manifest.items():
            f_uri = storage.join(uri, name)
            info = fs.get_file_info(storage.filesystem(f_uri)[1])
            if info.type == pafs.FileType.NotFound:
                raise ValueError(f"checkpoint file {f_uri!r} is missing (listed in {m_name!r})")
            if info.size != meta["size"]:
                raise ValueError(f"checkpoint file {f_uri!r} is truncated or damaged: {info.size} bytes, "
                                 f"expected {meta['size']}")
            if check_crc and not storage.is_s3(f_uri) and _crc(f_uri) != meta["crc32"]:
                raise ValueError(f"checkpoint file {f_uri!r} is corrupt: CRC32 differs from {m_name!r}")
    return state


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


def load_local(app: AppState, folder: str, rank: int, world: int, *, restore_rng: bool) -> None:
    """Load checkpoint `folder` (already local) into `app`; any failure is a ValueError naming the folder."""
    import torch.distributed.checkpoint as dcp

    try:
        dcp.load({"app": app}, checkpoint_id=folder)
    except Exception as e:  # DCP wraps per-rank errors; name the checkpoint, keep the cause
        raise ValueError(f"checkpoint {folder!r} could not be loaded: {type(e).__name__}: {e}") from e
    rng_path = os.path.join(folder, f"rng_rank{rank}.pt")
    saved_world = json.load(open(os.path.join(folder, TRAIN_STATE))).get("world_size")
    if restore_rng and saved_world == world and os.path.exists(rng_path):
        rng = torch.load(rng_path, weights_only=True)
        torch.set_rng_state(rng["cpu"])
        if rng["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])


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
    storage.write_json(storage.join(export_uri, EXPORT_MARKER), {"step": config.get("step")})


def load_weights(uri: str) -> dict[str, torch.Tensor]:
    """A safetensors file from a local path or s3:// URI (ValueError naming it when unreadable)."""
    from safetensors.torch import load

    data = storage.read_bytes(uri)
    try:
        return load(data)
    except Exception as e:
        raise ValueError(f"weights file {uri!r} is not a readable safetensors file: {e}") from e
