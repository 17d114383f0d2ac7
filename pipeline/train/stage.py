"""`train_stage`: one Ray Train job (TorchTrainer, FSDP2) per stage, resumable, ending in an atomic export.

Layout under the run's root (local folder or s3://):
    {root}/train/{stage}/checkpoint_<step>/   merged DCP checkpoints (the last `keep_checkpoints` kept)
    {root}/train/{stage}/metrics.jsonl, tensorboard/, samples/step_<step>.png
    {root}/train/{stage}/export/              model.safetensors, ema.safetensors, config.json, _SUCCESS (last)
A stage whose export has its _SUCCESS marker is done; rerunning it returns at once. Otherwise Ray Train (same
run name and storage) hands the workers the latest checkpoint and training continues from there.
"""
from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Mapping
from typing import Any

from pipeline.core import storage
from pipeline.train import checkpoint as ckpt
from pipeline.train.config import StageConfig, stage_config
from pipeline.train.data import build_datasets, dataset_name, fixed_prompts, mixture_weights, source_shapes

log = logging.getLogger(__name__)


def stage_uri(root: str, name: str) -> str:
    return storage.join(root, "train", name)


def export_uri(root: str, name: str) -> str:
    return storage.join(stage_uri(root, name), "export")


def is_done(root: str, name: str) -> bool:
    """True when the stage's export is complete (its marker is written last)."""
    return storage.exists(storage.join(export_uri(root, name), ckpt.EXPORT_MARKER))


def resolve_model_config(model: Any):
    """A ModelConfig from a ModelConfig, a preset name, or {"preset": ..., **overrides}."""
    from model.microdit.config import ModelConfig, model_config

    if isinstance(model, ModelConfig):
        return model
    if isinstance(model, str):
        return model_config(model)
    if isinstance(model, Mapping):
        overrides = dict(model)
        if "preset" not in overrides:
            raise ValueError(f"model config {dict(model)} needs a `preset` (e.g. 'MicroDiT_XL_2')")
        return model_config(overrides.pop("preset"), **overrides)
    raise ValueError(f"model: expected a ModelConfig, a preset name or a dict with `preset`, got {model!r}")


def stage_model_config(base, stage: StageConfig, latent_shape, caption_shape):
    """The model for this stage: latent side from the data, positions scaled by resolution / base_resolution."""
    c, h, w = latent_shape
    if h != w:
        raise ValueError(f"latents at {stage.resolution} px are {h}x{w}; MicroDiT expects square latents")
    if c != base.in_channels:
        raise ValueError(f"latents have {c} channels, the model expects in_channels={base.in_channels}")
    if tuple(caption_shape) != (base.caption_len, base.caption_dim):
        raise ValueError(f"caption states are {tuple(caption_shape)}, the model expects "
                         f"(caption_len, caption_dim) = ({base.caption_len}, {base.caption_dim})")
    return dataclasses.replace(base, input_size=h, pos_interp_scale=stage.pos_interp_scale)


def discover_latents(root: str) -> dict[str, str]:
    """source -> latents folder for every finished precompute output under {root}/data/latents/."""
    base = storage.join(root, "data", "latents")
    found = {}
    for marker in storage.list_files(base, "_SUCCESS", recursive=True):
        folder = marker[: -len("/_SUCCESS")]
        found[folder.rstrip("/").rsplit("/", 1)[-1]] = folder
    if not found:
        raise FileNotFoundError(f"no finished latents (…/_SUCCESS) under {base!r}; run precompute first")
    return found


def _latest_checkpoint(run: str) -> str | None:
    """The checkpoint Ray Train will resume from: its manager snapshot's latest, else the highest step."""
    snap = storage.join(run, "checkpoint_manager_snapshot.json")
    if storage.exists(snap):
        try:
            name = (storage.read_json(snap).get("latest_checkpoint_result") or {}).get("checkpoint_dir_name")
        except (ValueError, AttributeError):  # an unreadable snapshot: Ray Train itself will say so
            name = None
        if name:
            return storage.join(run, name)
    found = ckpt.checkpoints(run)
    return found[-1][1] if found else None


def resolve_init(root: str, stage: StageConfig, model_dict: dict) -> dict[str, Any]:
    """Worker inputs for the stage's start: nothing (own checkpoint / scratch), a full state, or weights."""
    own = _latest_checkpoint(stage_uri(root, stage.name))
    if own:  # resuming this stage: its own checkpoint wins over `init`; check it before starting workers
        ckpt.verify(own, check_crc=False)  # sizes here; rank 0 checks CRCs when it loads
        ckpt.check_model_config(own, model_dict)
        # Named explicitly: a checkpoint folder committed just before the driver died is not yet in Ray
        # Train's snapshot, and `get_checkpoint()` alone would then restart the stage from step 0.
        return {"resume_checkpoint": own}
    if stage.init.kind == "scratch":
        return {}
    prev = stage.init.stage
    if not is_done(root, prev):
        raise FileNotFoundError(f"stage {stage.name!r} starts from stage {prev!r}, which has not finished: "
                                f"{export_uri(root, prev)!r} has no {ckpt.EXPORT_MARKER}; train {prev!r} first")
    if stage.init.kind == "weights":
        return {"init_weights": storage.join(export_uri(root, prev), "model.safetensors")}
    final = storage.read_json(storage.join(export_uri(root, prev), "config.json"))["final_checkpoint"]
    ckpt.verify(final, check_crc=False)
    ckpt.check_model_config(final, model_dict)
    return {"init_checkpoint": final}


def train_stage(stage: StageConfig | dict, model: Any, root: str, latents: Mapping[str, str] | None = None, *,
                vae: str | None = None, text: str | None = None, ray_address: str | None = None) -> str:
    """Train one stage on Ray Train and return its export URI ({root}/train/{stage}/export).

    `model`: ModelConfig, preset name or {"preset", **overrides} (input_size and pos_interp_scale are set
    from the data and the stage); `latents`: source -> latents folder (default: every finished one under
    {root}/data/latents); `vae`: VAE spec to decode sample grids (None: latent channels shown as RGB);
    `vae` and `text` (the encoder specs the latents were made with) are recorded in the export's config.json,
    so `microdit generate` can draw from an export alone.
    """
    import ray.train
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from model.microdit.config import flops_per_sample
    from pipeline.core.configs import to_dict
    from pipeline.core.ray_cluster import connect
    from pipeline.train.loop import train_loop_per_worker

    stage = stage_config(stage)
    out = export_uri(root, stage.name)
    if is_done(root, stage.name):
        log.info("stage %s already exported at %s", stage.name, out)
        return out
    latents = dict(latents) if latents else discover_latents(root)
    weights = mixture_weights(latents, stage.mixture, stage.exclude_sources)
    used = {s: latents[s] for s in weights}
    latent_shape, caption_shape = source_shapes(next(iter(used.values())), stage.resolution)
    model_cfg = stage_model_config(resolve_model_config(model), stage, latent_shape, caption_shape)
    model_dict = json.loads(json.dumps(to_dict(model_cfg)))
    init = resolve_init(root, stage, model_dict)

    connect(ray_address)
    import ray.data

    datasets, shapes = build_datasets(used, stage.resolution, stage.seed, int(stage.cache_dataset_mb * 2**20))
    captions, prompts = fixed_prompts(next(iter(used.values())), stage.resolution, stage.sample_prompts)
    run = stage_uri(root, stage.name)
    if captions:
        storage.write_json(storage.join(run, "samples", "prompts.json"), captions)
    config = {
        "stage": to_dict(stage), "model": model_dict, "stage_uri": run, "export_uri": out, "vae": vae,
        "encoders": {"vae": vae, "text": text},
        "weights_by_dataset": {dataset_name(s, used): w for s, w in weights.items()},
        "latent_shape": shapes["latent_shape"], "prompts": prompts,
        "flops_per_sample": flops_per_sample(model_cfg, stage.mask_ratio), **init,
    }
    fs, train_path = storage.filesystem(storage.join(root, "train"))
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=config,
        scaling_config=ScalingConfig(num_workers=stage.num_workers, use_gpu=stage.use_gpu,
                                     resources_per_worker={"CPU": stage.cpus_per_worker}),
        run_config=RunConfig(
            name=stage.name, storage_path=train_path, storage_filesystem=fs,
            failure_config=FailureConfig(max_failures=stage.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=stage.keep_checkpoints)),
        datasets=datasets,
        # preserve_order makes the split across workers deterministic, so resumed data order is exact.
        dataset_config=DataConfig(execution_options=ray.data.ExecutionOptions(preserve_order=True),
                                  enable_shard_locality=False),
    )
    log.info("training stage %s: %s", stage.name, {k: config[k] for k in ("weights_by_dataset", "latent_shape")})
    try:
        trainer.fit()
    except ray.train.TrainingFailedError as e:
        raise RuntimeError(f"stage {stage.name!r} failed (checkpoints kept under {run!r}; rerun to resume): "
                           f"{e}") from e
    if not is_done(root, stage.name):
        raise RuntimeError(f"stage {stage.name!r} stopped before its last step (no {ckpt.EXPORT_MARKER} in "
                           f"{out!r}); rerun to resume from its latest checkpoint")
    return out
