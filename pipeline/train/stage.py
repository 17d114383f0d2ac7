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

from pipeline.core import layout, schema, storage
from pipeline.core.layout import Layout
from pipeline.core.plan import EncodersConfig, ModelSection, StageConfig, stage_config
from pipeline.core.ray_cluster import connect
from pipeline.train import checkpoint as ckpt
from pipeline.train import hooks
from pipeline.train.data import (build_datasets, candidate_sources, dataset_name, fixed_prompts,
                                 mixture_weights, unconditional)
from pipeline.train.inputs import check_repa_features, check_sources
from pipeline.train.loop import train_loop_per_worker
from pipeline.train.network import repa_target, stage_model_config, uses_repa
from pipeline.train.process_group import BoundTorchConfig
from pipeline.train.worker_plan import ExportSection, SamplerSection, StartFrom, WorkerPlan

log = logging.getLogger(__name__)


def stage_uri(root: str, name: str) -> str:
    return Layout(root).stage(name)


def export_uri(root: str, name: str) -> str:
    return Layout(root).export(name)


def is_done(root: str, name: str) -> bool:
    """True when the stage's export is complete (its marker is written last)."""
    return layout.is_complete(export_uri(root, name))


def check_objective_inputs(stage: StageConfig, fam, latents: Mapping[str, str], model_cfg=None,
                           text_mode: str | None = None):
    """The unconditional caption the stage's objective trains with (None: zeros), checked before Ray starts.

    A family whose unconditional input is the empty prompt's embedding needs `_unconditional.safetensors` from
    precompute, made in the run's text mode (`text_mode`, the export records it: drawing must compute caption states
    the way training saw them); REPA needs per-row DINOv2 features (`repa_features`, precompute with
    `encoders.repa`) of the network's REPA target shape in every file.
    """
    uncond = unconditional(latents)
    if fam.text.unconditional == "empty_prompt" and uncond is None:
        raise FileNotFoundError(f"the {fam.name} family's unconditional caption is the empty prompt's embedding, but "
                                f"the latents {sorted(latents.values())} hold no _unconditional.safetensors; "
                                f"precompute them with the family's text encoder ({fam.text.encoder})")
    if fam.text.unconditional == "empty_prompt" and text_mode is not None:
        stored = {source: schema.stored_text_mode(uri) for source, uri in sorted(latents.items())}
        other = {source: mode for source, mode in stored.items() if mode != text_mode}
        if other:
            raise ValueError(f"encoders.text_mode is {text_mode!r}, but the caption states of {other} were "
                             f"precomputed in another mode; precompute them again with text_mode {text_mode!r} "
                             "into a fresh folder, or set encoders.text_mode to match")
    if uses_repa(stage):
        if model_cfg is None:
            raise ValueError(f"stage {stage.name!r}: checking REPA features needs the stage's network config")
        check_repa_features(latents, repa_target(model_cfg))
    return uncond


def discover_latents(root: str) -> dict[str, str]:
    """source -> latents folder for every finished precompute output under {root}/data/latents/."""
    found = Layout(root).finished_latents()
    if not found:
        raise FileNotFoundError(f"no finished latents (…/{layout.MARKER}) under {Layout(root).latents_root!r}; "
                                "run precompute first")
    return found


def _latest_checkpoint(run: str) -> str | None:
    """The checkpoint Ray Train will resume from: its manager snapshot's latest, else the highest step."""
    snap = storage.join(run, "checkpoint_manager_snapshot.json")
    if storage.exists(snap):
        try:
            data = storage.read_json(snap)
            if isinstance(data, str):  # Ray 2.60 writes it JSON-encoded twice: check the inner document too
                json.loads(data)
            name = (data.get("latest_checkpoint_result") or {}).get("checkpoint_dir_name") \
                if isinstance(data, dict) else None  # else: the highest complete checkpoint, below
        except (ValueError, AttributeError, TypeError) as e:
            # Ray Train would fail on it with no file named; no retry fixes it.
            raise ValueError(f"Ray Train's checkpoint snapshot {snap!r} is unreadable (truncated or damaged: "
                             f"{e}); delete it and rerun: the stage then resumes from its highest complete "
                             "checkpoint") from None
        if name:
            return storage.join(run, name)
    found = ckpt.checkpoints(run)
    return found[-1][1] if found else None


def resolve_init(root: str, stage: StageConfig, model_dict: dict, family: str) -> StartFrom:
    """Where the stage's workers start: its own checkpoint, scratch, another stage's full state, or weights.

    Weights from `init.path` (an export folder or a released file) are loaded and shape-checked here against
    the stage's network before any worker starts; a released file is converted once under the stage folder.
    """
    own = _latest_checkpoint(stage_uri(root, stage.name))
    if own:  # resuming this stage: its own checkpoint wins over `init`; check it before starting workers
        ckpt.verify(own, hash_all=False)  # signatures here; rank 0 hashes the shards when it loads
        ckpt.check_model_config(own, model_dict)
        # Named explicitly: a checkpoint folder committed just before the driver died is not yet in Ray
        # Train's snapshot, and `get_checkpoint()` alone would then restart the stage from step 0.
        return StartFrom(kind="resume", uri=own)
    if stage.init.kind == "scratch":
        return StartFrom()
    if stage.init.kind == "weights":
        # An init.path (an export or a released file) or an earlier stage's export, checked against this stage's
        # network here, before any worker starts.
        from pipeline.weights import prepare_init

        source = stage.init.path or _finished_export(root, stage.init.stage, stage.name)
        work = storage.join(stage_uri(root, stage.name), "init")
        return StartFrom(kind="weights", uri=prepare_init(source, family, model_dict, work))
    final = storage.read_json(storage.join(_finished_export(root, stage.init.stage, stage.name),
                                           "config.json"))["final_checkpoint"]
    ckpt.verify(final, hash_all=False)
    ckpt.check_model_config(final, model_dict)
    return StartFrom(kind="full_state", uri=final)


def _finished_export(root: str, prev: str, stage: str) -> str:
    if not is_done(root, prev):
        raise FileNotFoundError(f"stage {stage!r} starts from stage {prev!r}, which has not finished: "
                                f"{export_uri(root, prev)!r} has no {layout.MARKER}; train {prev!r} first")
    return export_uri(root, prev)


def train_stage(stage: StageConfig | dict, model: ModelSection | dict | str, root: str,
                latents: Mapping[str, str] | None = None, *, encoders: EncodersConfig | dict | None = None,
                ray_address: str | None = None) -> str:
    """Train one stage on Ray Train and return its export URI ({root}/train/{stage}/export).

    `model`: the plan's model section (family, preset, overrides) or a MicroDiT preset name; the network's
    latent side and position scale come from the data and the stage. `latents`: source -> latents folder
    (default: every finished one under {root}/data/latents). `encoders`: the specs the latents were made with;
    recorded in the export with the family, objective and sampler defaults, so generate and evaluate need
    nothing but the export (None: sample grids show latent channels as RGB).
    """
    import ray.train
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    stage = stage_config(stage)
    model = ModelSection(preset=model) if isinstance(model, str) else ModelSection.model_validate(model)
    encoders = EncodersConfig.model_validate(encoders) if encoders is not None else None
    out = export_uri(root, stage.name)
    if is_done(root, stage.name):
        log.info("stage %s already exported at %s", stage.name, out)
        return out
    latents = dict(latents) if latents else discover_latents(root)
    d = stage.data
    # Every file of every source the stage may use, checked (and named when damaged) before any reader of them.
    latent_shape, caption_shape = check_sources(candidate_sources(latents, d.mixture, d.exclude_sources),
                                                d.resolution)
    weights = mixture_weights(latents, d.mixture, d.exclude_sources)
    used = {s: latents[s] for s in weights}
    fam, model_cfg = stage_model_config(model, stage, latent_shape, caption_shape)
    model_dict = fam.config_to_dict(model_cfg)
    uncond = check_objective_inputs(stage, fam, used, model_cfg, encoders.text_mode if encoders else None)
    start = resolve_init(root, stage, model_dict, fam.name)

    connect(ray_address)
    import ray.data

    extras = {schema.REPA_FEATURES: repa_target(model_cfg)} if uses_repa(stage) else None  # only when used
    datasets, shapes = build_datasets(used, d.resolution, stage.seed, int(d.cache_dataset_mb * 2**20), extras)
    captions, prompts = fixed_prompts(next(iter(used.values())), d.resolution, stage.sampling.prompts)
    run = stage_uri(root, stage.name)
    if captions:
        storage.write_json(storage.join(run, "samples", "prompts.json"), captions)
    plan = WorkerPlan(
        export=ExportSection(family=fam.name, model=model_dict, objective=stage.objective, encoders=encoders,
                             sampler=SamplerSection(**dataclasses.asdict(fam.sampler)), stage=stage,
                             unconditional=schema.UNCONDITIONAL_FILE if uncond is not None else None),
        stage_uri=run, export_uri=out, start=start,
        weights_by_dataset={dataset_name(s, used): w for s, w in weights.items()},
        latent_shape=shapes["latent_shape"], prompts=prompts.tolist(),
        flops_per_sample=fam.flops_per_sample(model_cfg, stage.objective.config()),
        # Where the empty prompt's embedding (tokens, width) lies, for caption dropout, sample grids and the
        # export (every source holds the same one, checked above); None: zeros.
        unconditional_from=next(iter(used.values())) if uncond is not None else None,
        hooks=hooks.spec_from_env())  # test-only fault injection, when MICRODIT_TRAIN_HOOKS is set
    b, c = stage.batch, stage.checkpoint
    fs, train_path = storage.filesystem(Layout(root).train_root)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=plan.model_dump(mode="json"),  # validated again, once, in each worker
        torch_config=BoundTorchConfig(),  # the rendezvous listens on rank 0's Ray address only
        scaling_config=ScalingConfig(num_workers=b.num_workers, use_gpu=b.use_gpu,
                                     resources_per_worker={"CPU": b.cpus_per_worker, **b.resources}),
        run_config=RunConfig(
            name=stage.name, storage_path=train_path, storage_filesystem=fs,
            failure_config=FailureConfig(max_failures=c.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=c.keep)),
        datasets=datasets,
        # preserve_order makes the split across workers deterministic, so resumed data order is exact.
        dataset_config=DataConfig(execution_options=ray.data.ExecutionOptions(preserve_order=True),
                                  enable_shard_locality=False),
    )
    log.info("training stage %s: sources %s, latents %s", stage.name, plan.weights_by_dataset, plan.latent_shape)
    try:
        result = trainer.fit()
    except ray.train.TrainingFailedError as e:
        raise RuntimeError(f"stage {stage.name!r} failed (checkpoints kept under {run!r}; rerun to resume): "
                           f"{e}") from e
    refused = result.return_value.get("refused") if isinstance(result.return_value, dict) else None
    if refused:  # the workers found what no retry fixes (a damaged checkpoint, weights of another model)
        raise ValueError(f"stage {stage.name!r} cannot start: {refused}")
    if not is_done(root, stage.name):
        raise RuntimeError(f"stage {stage.name!r} stopped before its last step (no {layout.MARKER} in "
                           f"{out!r}); rerun to resume from its latest checkpoint")
    return out
