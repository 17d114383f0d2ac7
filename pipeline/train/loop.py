"""The per-worker training loop that Ray Train runs on every rank; each part of a step is visible here.

One optimizer step = `accumulation_steps` micro-batches per rank (caption dropout, EDM loss, backward), then a
global non-finite check, gradient clipping, AdamW, EMA. All randomness of a micro-step comes from a generator
seeded by (seed, stage, step, micro, rank), so a resumed run draws exactly what an uninterrupted one would.
"""
from __future__ import annotations

import hashlib
import os
import tempfile
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from pipeline.core import storage
from pipeline.train import checkpoint as ckpt
from pipeline.train.config import StageConfig, stage_config
from pipeline.train.data import MixtureStream
from pipeline.train.metrics import MetricsLogger, memory_gb, peak_flops
from pipeline.train.parallelize import build_mesh, parallelize


def micro_generator(stage: StageConfig, step: int, micro: int, rank: int, device: torch.device) -> torch.Generator:
    """The RNG of one micro-step (noise, sigmas, masks, caption dropout): a pure function of its coordinates."""
    digest = hashlib.blake2b(f"{stage.seed}:{stage.name}:{step}:{micro}:{rank}".encode(), digest_size=8).digest()
    return torch.Generator(device=device).manual_seed(int.from_bytes(digest, "little") & (2**63 - 1))


def build_model(model_cfg: dict[str, Any], stage: StageConfig, weights_uri: str | None):
    """The plain MicroDiT, initialised identically on every rank (seeded), or from exported weights."""
    from model.microdit.config import ModelConfig
    from model.microdit.network import MicroDiT

    torch.manual_seed(stage.seed)
    model = MicroDiT(ModelConfig(**model_cfg))
    if weights_uri:
        # Positions are a non-persistent buffer rebuilt from this stage's config (e.g. 512 px, scale 2).
        state = ckpt.load_weights(weights_uri)
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as e:
            raise ValueError(f"weights {weights_uri!r} do not fit this stage's model: {e}") from e
    return model


def apply_stage_hyperparams(optimizer: torch.optim.Optimizer, ema, stage: StageConfig) -> None:
    """Loaded optimizer/EMA state keeps moments, not settings: this stage's config sets betas, eps, decay."""
    o = stage.optimizer
    for g in optimizer.param_groups:
        g["betas"], g["eps"] = tuple(o.betas), o.eps
        g["weight_decay"] = o.weight_decay if g["name"] in ("decay", "moe_experts") else 0.0
        g["lr_scale"] = o.moe_lr_scale if g["name"].startswith("moe_experts") else 1.0
    ema.decay, ema.start_step, ema.update_every = stage.ema.decay, stage.ema.start_step, stage.ema.update_every


def maybe_crash(stage: StageConfig, stage_uri: str, step: int, rank: int) -> None:
    """Test knob: rank `crash_rank` dies at `crash_at_step` once (a marker in the stage folder remembers it)."""
    d = stage.debug
    if d.crash_at_step is None or step != d.crash_at_step or rank != d.crash_rank:
        return
    marker = storage.join(stage_uri, "debug_crashed")
    if not storage.exists(marker):
        storage.write_bytes(marker, f"rank {rank} exited at step {step}\n".encode())
        print(f"[train] debug: rank {rank} exits at step {step}", flush=True)
        os._exit(1)


def load_checkpoint(app, uri_or_ckpt, rank: int, world: int, model_cfg: dict, *, same_stage: bool) -> None:
    """Verify (manifests, CRC, model config) and load a checkpoint, local or remote."""
    import ray.train

    checkpoint = uri_or_ckpt if isinstance(uri_or_ckpt, ray.train.Checkpoint) else \
        ray.train.Checkpoint(path=storage.filesystem(uri_or_ckpt)[1], filesystem=storage.filesystem(uri_or_ckpt)[0])
    with checkpoint.as_directory() as folder:
        ckpt.verify(folder, check_crc=rank == 0)  # sizes everywhere; one full CRC read is enough
        ckpt.check_model_config(folder, model_cfg)
        ckpt.load_local(app, folder, rank, world, restore_rng=same_stage)


@dataclass
class Worker:
    """One rank's training state: the sharded model, optimizer, EMA and counters, with its stage settings."""

    stage: StageConfig
    config: dict[str, Any]
    rank: int
    world: int
    device: torch.device
    model: nn.Module
    optimizer: torch.optim.Optimizer
    ema: Any
    train: ckpt.TrainState

    @property
    def app(self) -> ckpt.AppState:
        return ckpt.AppState(self.model, self.optimizer, self.ema, self.train)


def build_worker(config: dict[str, Any]) -> Worker:
    """Build the model on CPU (same seed on every rank), shard it, then resume or start as the stage says."""
    import ray.train
    import ray.train.torch
    from model.ema import EMA
    from pipeline.train.optim import build_optimizer

    stage = stage_config(config["stage"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device() if stage.use_gpu else torch.device("cpu")
    if device.type == "cpu" and stage.cpu_threads:
        torch.set_num_threads(stage.cpu_threads)
    resume = ray.train.get_checkpoint() or config.get("resume_checkpoint")

    model = build_model(config["model"], stage, None if resume else config.get("init_weights"))
    model = parallelize(model, build_mesh(world, device.type), bf16=device.type == "cuda",
                        compile=stage.compile, activation_checkpointing=stage.activation_checkpointing)
    o = stage.optimizer
    optimizer = build_optimizer(model, o.lr, o.betas, o.eps, o.weight_decay, o.moe_lr_scale)
    ema = EMA(model, stage.ema.decay, stage.ema.start_step, stage.ema.update_every)
    w = Worker(stage, config, rank, world, device, model, optimizer, ema, ckpt.TrainState())
    if resume is not None:  # this stage's own latest checkpoint: continue exactly
        load_checkpoint(w.app, resume, rank, world, config["model"], same_stage=True)
    elif config.get("init_checkpoint"):  # another stage's final full state: continue its counters and moments
        load_checkpoint(w.app, config["init_checkpoint"], rank, world, config["model"], same_stage=False)
        w.train.stage_step, w.train.data = 0, {}
        w.train.nonfinite_total = w.train.nonfinite_consecutive = 0
    apply_stage_hyperparams(optimizer, ema, stage)
    return w


def train_step(w: Worker, stream: MixtureStream, step: int, edm) -> tuple[float, float, bool, float]:
    """One optimizer step: accumulate, global non-finite check, clip, AdamW, EMA.

    -> (loss, grad norm, stepped, seconds this rank waited for its batches)."""
    from model.objectives.edm import drop_captions, edm_loss

    stage, model, device = w.stage, w.model, w.device
    accum = stage.accumulation_steps()

    # 1. accumulate gradients over micro-batches (FSDP reduce-scatters them, averaged over ranks)
    loss_sum, data_s = torch.zeros((), device=device), 0.0
    for micro in range(accum):
        t0 = time.perf_counter()
        batch = stream.next(step, micro)
        data_s += time.perf_counter() - t0
        latents = batch["latents"].to(device, torch.float32, non_blocking=True)  # (B, C, H, W)
        caption = batch["caption"].to(device, torch.float32, non_blocking=True)  # (B, L, D)
        gen = micro_generator(stage, step, micro, w.rank, device)
        caption = drop_captions(caption, stage.caption_dropout, gen)  # zeros: the CFG unconditional
        loss, _ = edm_loss(model, latents, caption, edm, stage.mask_ratio, gen)
        if step in stage.debug.nan_loss_steps:
            loss = loss * float("nan")
        (loss / accum).backward()
        loss_sum += loss.detach()

    # 2. one global verdict: the mean loss and whether any rank saw a non-finite loss
    stats = torch.stack([loss_sum / accum, (~torch.isfinite(loss_sum)).float()])
    dist.all_reduce(stats)
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), stage.grad_clip)
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
    if t.nonfinite_consecutive > stage.max_consecutive_nonfinite:
        raise RuntimeError(f"stage {stage.name!r}: {t.nonfinite_consecutive} non-finite steps in a row "
                           f"(limit max_consecutive_nonfinite={stage.max_consecutive_nonfinite}) at step {step}")
    return float(stats[0] / w.world), float(grad_norm), finite, data_s


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train entry point: build, shard, resume, train the stage's steps, checkpoint, sample, export."""
    import ray.train
    from model.objectives.edm import EDMConfig
    from pipeline.train.optim import apply_lr

    w = build_worker(config)
    stage, t = w.stage, w.train
    stream = MixtureStream({n: ray.train.get_dataset_shard(n) for n in config["weights_by_dataset"]},
                           config["weights_by_dataset"], stage.micro_batch, stage.seed, stage.shuffle_buffer, w.rank)
    stream.load_state_dict(t.data)
    logger = MetricsLogger(config["stage_uri"], t.stage_step) if w.rank == 0 else None
    edm = EDMConfig(sigma_data=stage.sigma_data, p_mean=stage.p_mean, p_std=stage.p_std)
    lr_fn = stage.lr_lambda()
    peak = peak_flops(stage.peak_flops) if w.device.type == "cuda" else None
    prompts = torch.as_tensor(config["prompts"], dtype=torch.float32, device=w.device)  # (K, L, D)
    window_t, window_steps, window_data_s = time.perf_counter(), 0, 0.0
    w.model.train()

    while t.stage_step < stage.steps:
        step = t.stage_step
        maybe_crash(stage, config["stage_uri"], step, w.rank)
        lr = stage.optimizer.lr * lr_fn(step)
        apply_lr(w.optimizer, lr)
        loss, grad_norm, stepped, data_s = train_step(w, stream, step, edm)
        t.stage_step, t.global_step, t.data = step + 1, t.global_step + 1, stream.state_dict()
        window_steps, window_data_s = window_steps + 1, window_data_s + data_s
        done = t.stage_step == stage.steps

        # metrics, checkpoints, samples
        if t.stage_step % stage.log_every == 0 or done:
            elapsed = time.perf_counter() - window_t
            sps = window_steps * stage.global_batch / max(elapsed, 1e-9)
            row = {"step": t.stage_step, "global_step": t.global_step, "loss": loss, "grad_norm": grad_norm,
                   "lr": lr, "samples_per_s": sps, "step_s": elapsed / window_steps,
                   "data_wait_s": window_data_s / window_steps,  # rank 0's input wait: input-bound if near step_s
                   "nonfinite_total": t.nonfinite_total, "skipped": not stepped, **memory_gb()}
            if peak:
                row["mfu"] = sps * config["flops_per_sample"] / (peak * w.world)
            if logger:
                logger.log(row)
            window_t, window_steps, window_data_s = time.perf_counter(), 0, 0.0
        stop = stage.debug.stop_at_step is not None and t.stage_step == stage.debug.stop_at_step
        if t.stage_step % stage.checkpoint_every == 0 or done or stop:
            save_checkpoint(w.app, w.rank, w.world, config, {"step": t.stage_step, "loss": loss})
        if stage.sample_every and t.stage_step % stage.sample_every == 0 and not done:
            maybe_sample(w.model, w.ema, prompts, stage, config, t.stage_step, w.rank)
        if stop:
            if logger:
                logger.close()
            return

    maybe_sample(w.model, w.ema, prompts, stage, config, t.stage_step, w.rank)
    finish(w, logger)


def finish(w: Worker, logger: MetricsLogger | None) -> None:
    """Gather full weights and EMA, and (rank 0) write the export with its marker last."""
    model_sd, ema_sd = ckpt.full_state_dicts(w.model, w.ema)
    if w.rank == 0:
        t, config = w.train, w.config
        final = storage.join(config["stage_uri"], ckpt.checkpoint_dir_name(t.stage_step))
        ckpt.export(config["export_uri"], model_sd, ema_sd, {
            "model": config["model"], "stage": config["stage"], "encoders": config["encoders"], "step": t.stage_step,
            "global_step": t.global_step, "final_checkpoint": final, "nonfinite_total": t.nonfinite_total})
        logger.close()
    dist.barrier()


def save_checkpoint(app, rank: int, world: int, config: dict[str, Any], metrics: dict[str, Any]) -> None:
    """Every rank saves its DCP shard locally and reports it; Ray Train merges them into one folder."""
    import ray.train

    extra = {ckpt.MODEL_CONFIG: config["model"], ckpt.STAGE_CONFIG: config["stage"]}
    with tempfile.TemporaryDirectory(prefix="mdit-ckpt-") as folder:
        ckpt.save_local(app, folder, rank, world, extra)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder),
                         checkpoint_dir_name=ckpt.checkpoint_dir_name(app.train.stage_step))


def maybe_sample(model, ema, prompts: torch.Tensor, stage: StageConfig, config: dict, step: int, rank: int) -> None:
    """A sample grid from the fixed prompts with EMA weights (all ranks run the sharded model; rank 0 writes)."""
    from pipeline.train.samples import sample_latents, write_grid

    if prompts.shape[0] == 0 or stage.sample_prompts == 0:
        return
    model.eval()  # FSDP's bf16 policy already covers the sampler's forwards on GPU
    latents = sample_latents(model, ema, prompts, config["latent_shape"], steps=stage.sample_steps,
                             guidance=stage.sample_guidance, sigma_data=stage.sigma_data, seed=stage.seed)
    model.train()
    if rank == 0:
        write_grid(config["stage_uri"], step, latents, config.get("vae"))
