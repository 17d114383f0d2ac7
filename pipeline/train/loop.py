"""The per-worker training loop that Ray Train runs on every rank; each part of a step is visible here.

One optimizer step = `accumulation_steps` micro-batches per rank (the family's objective: caption dropout, loss,
backward), then a global non-finite check, gradient clipping, AdamW, EMA. All randomness of a micro-step comes from a generator
seeded by (seed, stage, step, micro, rank), so a resumed run draws exactly what an uninterrupted one would.
"""
from __future__ import annotations

import hashlib
import tempfile
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from model import family as families
from model.ema import EMA
from model.objectives.objective import build as build_objective
from pipeline.core import schema, storage
from pipeline.core.plan import StageConfig
from pipeline.train import checkpoint as ckpt
from pipeline.train import hooks as train_hooks
from pipeline.train.build import build_training_model
from pipeline.train.data import MixtureStream
from pipeline.train.metrics import MetricsLogger, RayGauges, memory_gb, numeric, peak_flops
from pipeline.train.optim import apply_lr, stage_lr_lambda
from pipeline.train.optim import build_optimizer
from pipeline.train.parallelize import build_mesh, parallelize
from pipeline.train.samples import sample_latents, write_grid
from pipeline.train.worker_plan import WorkerPlan


class StageRefused(ValueError):
    """The stage cannot start and no retry would change that: a checkpoint that fails its integrity check, or
    weights of another model. Every rank returns with the reason instead of raising (a raise is a worker failure
    that Ray Train retries); `train_stage` raises it on the driver."""


def agree_on_refusal(reason: str | None) -> str | None:
    """The first rank's refusal, seen by every rank; a collective, so every rank calls it at the same point."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return reason
    found: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(found, reason)
    return next((r for r in found if r), None)


def micro_generator(stage: StageConfig, step: int, micro: int, rank: int, device: torch.device) -> torch.Generator:
    """The RNG of one micro-step (noise, sigmas, masks, caption dropout): a pure function of its coordinates."""
    digest = hashlib.blake2b(f"{stage.seed}:{stage.name}:{step}:{micro}:{rank}".encode(), digest_size=8).digest()
    return torch.Generator(device=device).manual_seed(int.from_bytes(digest, "little") & (2**63 - 1))


def build_model(family: str, model_cfg: dict[str, Any], stage: StageConfig, weights_uri: str | None):
    """The family's plain network, initialised identically on every rank (seeded), or from exported weights."""
    fam = families.get(family)
    torch.manual_seed(stage.seed)
    model = fam.build(fam.config_from_dict(model_cfg))
    if weights_uri:
        # Positions are a non-persistent buffer rebuilt from this stage's config (e.g. 512 px, scale 2).
        state = ckpt.load_weights(weights_uri)
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as e:
            raise StageRefused(f"weights {weights_uri!r} do not fit this stage's model: {e}") from e
    return model


def build_sharded_model(plan: WorkerPlan, device: torch.device, world: int, weights_uri: str | None):
    """The family's network, sharded: built on the meta device and materialised shard by shard (no rank holds
    the whole unsharded model), or, for a family that cannot replay its init that way, built whole and sharded.
    Parameters are the same either way: the seeded plain build's, or the given weights."""
    stage, export = plan.stage, plan.export
    b, fam = stage.batch, families.get(export.family)
    mesh = build_mesh(world, device.type)
    levers = dict(bf16=device.type == "cuda", compile=b.compile, activation_checkpointing=b.activation_checkpointing,
                  float8=b.float8)
    state = ckpt.load_weights(weights_uri) if weights_uri else None
    try:
        return build_training_model(export.model, stage.seed, mesh, device=device, family=fam.name,
                                    init_weights_state=state, **levers)
    except NotImplementedError:  # its network cannot be rebuilt on meta (see pipeline/train/build.py)
        pass
    except ValueError as e:  # the same weights and check on every rank: all of them refuse here
        if state is None:
            raise
        raise StageRefused(f"weights {weights_uri!r} do not fit this stage's model: {e}") from e
    model = build_model(export.family, export.model, stage, weights_uri)
    return parallelize(model, mesh, units=fam.shard_units, **levers)


def apply_stage_hyperparams(optimizer: torch.optim.Optimizer, ema, stage: StageConfig) -> None:
    """Loaded optimizer/EMA state keeps moments, not settings: this stage's config sets betas, eps, decay."""
    o = stage.optim
    for g in optimizer.param_groups:
        g["betas"], g["eps"] = tuple(o.betas), o.eps
        g["weight_decay"] = o.weight_decay if g["name"] in ("decay", "moe_experts") else 0.0
        g["lr_scale"] = o.moe_lr_scale if g["name"].startswith("moe_experts") else 1.0
    ema.decay, ema.start_step, ema.update_every = o.ema.decay, o.ema.start_step, o.ema.update_every


def load_checkpoint(app, uri_or_ckpt, rank: int, world: int, model_cfg: dict, *, same_stage: bool) -> None:
    """Verify (signed manifests, hashes, model config) and load a checkpoint, local or remote."""
    import ray.train

    checkpoint = uri_or_ckpt if isinstance(uri_or_ckpt, ray.train.Checkpoint) else \
        ray.train.Checkpoint(path=storage.filesystem(uri_or_ckpt)[1], filesystem=storage.filesystem(uri_or_ckpt)[0])
    with checkpoint.as_directory() as folder:
        try:
            ckpt.verify(folder, hash_all=rank == 0)  # signatures everywhere; one full hash read is enough
            ckpt.check_model_config(folder, model_cfg)
            reason = None
        except ValueError as e:  # CheckpointIntegrityError included
            reason = str(e)
        # Before DCP's collective load: a rank that found damage must not leave the others waiting in it.
        reason = agree_on_refusal(reason)
        if reason:
            raise StageRefused(reason)
        ckpt.load_local(app, folder, rank, world, restore_rng=same_stage)


@dataclass
class Worker:
    """One rank's training state: the sharded model, optimizer, EMA and counters, with its stage settings."""

    plan: WorkerPlan
    rank: int
    world: int
    device: torch.device
    model: nn.Module
    optimizer: torch.optim.Optimizer
    ema: Any
    train: ckpt.TrainState

    @property
    def stage(self) -> StageConfig:
        return self.plan.stage

    @property
    def app(self) -> ckpt.AppState:
        return ckpt.AppState(self.model, self.optimizer, self.ema, self.train)


def build_worker(plan: WorkerPlan) -> Worker:
    """Build the model on CPU (same seed on every rank), shard it, then resume or start as the stage says."""
    import ray.train
    import ray.train.torch

    stage = plan.stage
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    b = stage.batch
    device = ray.train.torch.get_device() if b.use_gpu else torch.device("cpu")
    if device.type == "cpu" and b.cpu_threads:
        torch.set_num_threads(b.cpu_threads)
    start = plan.start
    resume = ray.train.get_checkpoint() or (start.uri if start.kind == "resume" else None)

    model = build_sharded_model(plan, device, world, start.uri if start.kind == "weights" and not resume else None)
    o = stage.optim
    optimizer = build_optimizer(model, o.lr, o.betas, o.eps, o.weight_decay, o.moe_lr_scale)
    ema = EMA(model, o.ema.decay, o.ema.start_step, o.ema.update_every)
    w = Worker(plan, rank, world, device, model, optimizer, ema, ckpt.TrainState())
    if resume is not None:  # this stage's own latest checkpoint: continue exactly
        load_checkpoint(w.app, resume, rank, world, plan.export.model, same_stage=True)
    elif start.kind == "full_state":  # another stage's final full state: continue its counters and moments
        load_checkpoint(w.app, start.uri, rank, world, plan.export.model, same_stage=False)
        w.train.stage_step, w.train.data = 0, {}
        w.train.nonfinite_total = w.train.nonfinite_consecutive = 0
    apply_stage_hyperparams(optimizer, ema, stage)
    return w


def train_step(w: Worker, stream: MixtureStream, step: int, objective, hooks) -> tuple[float, float, bool, float]:
    """One optimizer step: accumulate, global non-finite check, clip, AdamW, EMA.

    -> (loss, grad norm, stepped, seconds this rank waited for its batches)."""
    stage, model, device = w.stage, w.model, w.device
    accum = stage.batch.accumulation_steps

    # 1. accumulate gradients over micro-batches (FSDP reduce-scatters them, averaged over ranks)
    loss_sum, data_s = torch.zeros((), device=device), 0.0
    for micro in range(accum):
        t0 = time.perf_counter()
        batch = stream.next(step, micro)
        data_s += time.perf_counter() - t0
        latents = batch["latents"].to(device, torch.float32, non_blocking=True)  # (B, C, H, W)
        caption = batch["caption"].to(device, torch.float32, non_blocking=True)  # (B, L, D)
        # Per-batch inputs beyond latents and captions (e.g. REPA's DINOv2 features), when the data carries them.
        extras = {k: v.to(device, non_blocking=True) for k, v in batch.items() if k not in ("latents", "caption")}
        gen = micro_generator(stage, step, micro, w.rank, device)
        loss = hooks.loss(step, objective.loss(model, latents, caption, gen, extras=extras or None))  # dropout inside
        (loss / accum).backward()
        loss_sum += loss.detach()

    # 2. one global verdict: the mean loss and whether any rank saw a non-finite loss
    stats = torch.stack([loss_sum / accum, (~torch.isfinite(loss_sum)).float()])
    dist.all_reduce(stats)
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), stage.optim.grad_clip)
    grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
    finite = bool(stats[1] == 0) and bool(torch.isfinite(grad_norm))

    # 3. step, or skip a non-finite step (gradients dropped, counted; too many in a row stop the stage)
    t = w.train
    if finite:
        w.optimizer.step()
        w.ema.update(model, step)
        t.nonfinite_consecutive = 0
    else:
        t.nonfinite_total += 1
        t.nonfinite_consecutive += 1
    w.optimizer.zero_grad(set_to_none=True)
    limit = stage.optim.max_consecutive_nonfinite
    if t.nonfinite_consecutive > limit:
        raise RuntimeError(f"stage {stage.name!r}: {t.nonfinite_consecutive} non-finite steps in a row "
                           f"(limit optim.max_consecutive_nonfinite={limit}) at step {step}")
    return float(stats[0] / w.world), float(grad_norm), finite, data_s


def train_loop_per_worker(config: dict[str, Any]) -> dict[str, str] | None:
    """Ray Train entry point: build, shard, resume, train the stage's steps, checkpoint, sample, export.

    `config` is the stage's WorkerPlan as Ray Train hands it over (a dict), validated here once. Returns
    {"refused": reason} (rank 0's return value reaches the driver) when the stage cannot start."""
    import ray.train

    plan = WorkerPlan.received(config)
    try:
        w = build_worker(plan)
    except StageRefused as e:
        return {"refused": str(e)}
    stage, t = w.stage, w.train
    hooks = train_hooks.load(plan.hooks)
    stream = MixtureStream({n: ray.train.get_dataset_shard(n) for n in plan.weights_by_dataset},
                           plan.weights_by_dataset, stage.batch.micro_batch, stage.seed,
                           stage.data.shuffle_buffer, w.rank)
    stream.load_state_dict(t.data)
    logger = MetricsLogger(plan.stage_uri, t.stage_step) if w.rank == 0 else None
    gauges = RayGauges(ray.train.get_context().get_experiment_name(), w.rank)
    objective = build_objective(stage.objective.config()).bind(unconditional=unconditional_of(plan))
    lr_fn = stage_lr_lambda(stage)
    peak = peak_flops(stage.batch.peak_flops) if w.device.type == "cuda" else None
    prompts = torch.as_tensor(plan.prompts, dtype=torch.float32, device=w.device)  # (K, L, D)
    window_t, window_steps, window_data_s = time.perf_counter(), 0, 0.0
    w.model.train()

    while t.stage_step < stage.steps:
        step = t.stage_step
        hooks.before_step(plan.stage_uri, step, w.rank)
        lr = stage.optim.lr * lr_fn(step)
        apply_lr(w.optimizer, lr)
        loss, grad_norm, stepped, data_s = train_step(w, stream, step, objective, hooks)
        t.stage_step, t.global_step, t.data = step + 1, t.global_step + 1, stream.state_dict()
        window_steps, window_data_s = window_steps + 1, window_data_s + data_s
        done = t.stage_step == stage.steps

        # metrics, checkpoints, samples
        row = None
        if t.stage_step % stage.log_every == 0 or done:
            elapsed = time.perf_counter() - window_t
            sps = window_steps * stage.batch.global_batch / max(elapsed, 1e-9)
            row = {"step": t.stage_step, "global_step": t.global_step, "loss": loss, "grad_norm": grad_norm,
                   "lr": lr, "samples_per_s": sps, "step_s": elapsed / window_steps,
                   "data_wait_s": window_data_s / window_steps,  # rank 0's input wait: input-bound if near step_s
                   "nonfinite_total": t.nonfinite_total, "skipped": not stepped, **memory_gb()}
            if peak:
                row["mfu"] = sps * plan.flops_per_sample / (peak * w.world)
            if logger:
                logger.log(row)
            gauges.set(row)  # this rank's figures (its own input wait, memory) for the dashboard's metrics
            window_t, window_steps, window_data_s = time.perf_counter(), 0, 0.0
        stop = hooks.stop_after(t.stage_step)
        if t.stage_step % stage.checkpoint.every == 0 or done or stop:
            save_checkpoint(w.app, w.rank, w.world, plan, {**numeric(row or {}), "step": t.stage_step,
                                                           "loss": loss})
        elif row is not None:  # every rank, as Ray Train asks: the run's latest metrics without a checkpoint
            ray.train.report(numeric(row))
        if stage.sampling.every and t.stage_step % stage.sampling.every == 0 and not done:
            maybe_sample(w.model, w.ema, prompts, objective, plan, t.stage_step, w.rank)
        if stop:
            if logger:
                logger.close()
            return None

    maybe_sample(w.model, w.ema, prompts, objective, plan, t.stage_step, w.rank)
    finish(w, logger)
    return None


def unconditional_of(plan: WorkerPlan) -> torch.Tensor | None:
    """The stage's unconditional caption (tokens, width) float32, read from the latents folder its plan names;
    None (zeros) when it names none."""
    folder = plan.unconditional_from
    if folder is None:
        return None
    u = schema.read_unconditional(folder)
    if u is None:
        raise FileNotFoundError(f"{storage.join(folder, schema.UNCONDITIONAL_FILE)!r} is gone since the stage started")
    return torch.from_numpy(u)


def inference_weights(family: str, model_cfg: dict[str, Any], *states: dict) -> tuple[dict, ...]:
    """(network config, *state dicts) without training-only parts: a REPA stage's projector is not exported, so
    the next stage and generate build the inference network (E-MMDiT: repa=False) and load the export strictly."""
    if not model_cfg.get("repa"):
        return (model_cfg, *states)

    fam, cfg = families.get(family), {**model_cfg, "repa": False}
    with torch.device("meta"):
        keys = set(fam.build(fam.config_from_dict(cfg)).state_dict())
    return (cfg, *({k: v for k, v in sd.items() if k in keys} for sd in states))


def finish(w: Worker, logger: MetricsLogger | None) -> None:
    """Gather full weights and EMA, and (rank 0) write the export with its marker last."""
    model_sd, ema_sd = ckpt.full_state_dicts(w.model, w.ema)
    if w.rank == 0:
        plan, t = w.plan, w.train
        export_model, model_sd, ema_sd = inference_weights(plan.export.family, plan.export.model, model_sd, ema_sd)
        uncond = unconditional_of(plan)
        if uncond is not None:  # before the export's marker: generate draws against the same empty prompt
            # The empty prompt is BOS then pads, so its last row is the pad row.
            schema.write_unconditional(plan.export_uri, uncond.numpy(), uncond[-1].numpy())
        # The plan's export section (family, network, objective, encoders, sampler, stage) and the run's counters.
        export = plan.export.model_copy(update=dict(
            model=export_model, step=t.stage_step, global_step=t.global_step, nonfinite_total=t.nonfinite_total,
            final_checkpoint=storage.join(plan.stage_uri, ckpt.checkpoint_dir_name(t.stage_step))))
        ckpt.export(plan.export_uri, model_sd, ema_sd, export.model_dump(mode="json"))
        logger.close()
    dist.barrier()


def save_checkpoint(app, rank: int, world: int, plan: WorkerPlan, metrics: dict[str, Any]) -> None:
    """Every rank saves its DCP shard locally and reports it; Ray Train merges them into one folder."""
    import ray.train

    extra = {ckpt.MODEL_CONFIG: plan.export.model, ckpt.STAGE_CONFIG: plan.stage.model_dump(mode="json")}
    with tempfile.TemporaryDirectory(prefix="mdit-ckpt-") as folder:
        ckpt.save_local(app, folder, rank, world, extra)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder),
                         checkpoint_dir_name=ckpt.checkpoint_dir_name(app.train.stage_step))


def maybe_sample(model, ema, prompts: torch.Tensor, objective, plan: WorkerPlan, step: int, rank: int) -> None:
    """A sample grid from the fixed prompts with EMA weights (all ranks run the sharded model; rank 0 writes)."""
    stage, s = plan.stage, plan.stage.sampling
    if prompts.shape[0] == 0 or s.prompts == 0:
        return
    model.eval()  # FSDP's bf16 policy already covers the sampler's forwards on GPU
    defaults = plan.export.sampler  # the family's, where the stage sets none
    latents = sample_latents(model, ema, prompts, families.get(plan.export.family), stage.objective.config(),
                             getattr(objective, "unconditional", None),
                             steps=s.steps or defaults.steps,
                             guidance=defaults.guidance if s.guidance is None else s.guidance, seed=stage.seed)
    model.train()
    if rank == 0:
        encoders = plan.export.encoders
        write_grid(plan.stage_uri, step, latents, encoders.vae if encoders else None)
