"""Training throughput: the Ray Train stage loop vs a plain single-process loop (CPU), and MicroDiT_XL_2
samples/s and MFU at the stage 1 and stage 3 shapes on one GPU.

    python -m bench.train_throughput --mode cpu --steps 12      # Ray Train (2 workers, gloo, FSDP2) vs plain
    python -m bench.train_throughput --mode gpu                 # XL_2, bf16, compile off/on, largest micro-batch

CPU: both loops train MicroDiT_Debug on the same Parquet latents with the same global batch; the figure is
samples/s of each (warm-up steps dropped) and their ratio, measured in the same run. The plain loop runs
first with all of torch's threads and with one; Ray Train runs 2 workers (one thread each), gloo, FSDP2, once
streaming the Parquet every epoch and once with the source cached in the object store (cache_dataset_mb), with
the share of step time each spent waiting for input.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def plain_loop(latents: torch.Tensor, captions: torch.Tensor, preset: str, global_batch: int, steps: int,
               mask_ratio: float, warmup: int) -> float:
    """samples/s of a single-process loop: same model, loss, clipping, AdamW and EMA as a stage."""
    from model.microdit.config import model_config
    from model.objectives.edm import EDMConfig, drop_captions, edm_loss
    from model.ema import EMA
    from model.microdit.network import MicroDiT
    from pipeline.train.optim import build_optimizer

    torch.manual_seed(0)
    model = MicroDiT(model_config(preset, input_size=latents.shape[-1]))
    opt = build_optimizer(model, 1e-3)
    ema = EMA(model, 0.99)
    gen = torch.Generator().manual_seed(0)
    times = []
    for step in range(steps):
        t = time.perf_counter()
        idx = torch.randint(0, latents.shape[0], (global_batch,), generator=gen)
        cap = drop_captions(captions[idx], 0.1, gen)
        loss, _ = edm_loss(model, latents[idx], cap, EDMConfig(mask_ratio=mask_ratio), gen)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        ema.update(model, step)
        times.append(time.perf_counter() - t)
    return global_batch * len(times[warmup:]) / sum(times[warmup:])


def cpu_bench(args) -> dict:
    """Ray Train stage vs plain loop on CPU, same run."""
    import pyarrow.parquet as pq

    from pipeline.core import schema
    from pipeline.train.stage import train_stage
    from pipeline.train.metrics import read_metrics

    sys.path.insert(0, str(REPO / "tests"))
    from test_train_helpers import tiny_stage, write_latents

    root = tempfile.mkdtemp(prefix="mdit-bench-")
    data = {"synth": write_latents(f"{root}/data/latents/synth", rows=args.rows)}
    table = pq.read_table(sorted(Path(data["synth"]).glob("*.parquet"))[0])
    latents = torch.from_numpy(schema.read_tensor(table, "latents_64"))
    captions = torch.from_numpy(schema.read_tensor(table, "caption_states"))
    plain = {}
    for threads in (torch.get_num_threads(), 1):  # all cores in one process, and one thread (as each worker)
        torch.set_num_threads(threads)
        plain[threads] = plain_loop(latents, captions, args.preset, args.global_batch, args.steps, 0.5, args.warmup)

    ray = {}
    for arm, cache_mb in (("streamed", 0), ("cached", 1024)):  # Ray Data re-reading every epoch vs object store
        stage = tiny_stage(name=f"bench-{arm}", steps=args.steps, global_batch=args.global_batch,
                           micro_batch=args.micro_batch, checkpoint_every=args.steps, log_every=1, sample_prompts=0,
                           max_failures=0, cache_dataset_mb=cache_mb)
        t = time.perf_counter()
        train_stage(stage, args.preset, root, data)
        wall = time.perf_counter() - t
        rows = read_metrics(f"{root}/train/bench-{arm}")[args.warmup:]
        step_s = sum(r["step_s"] for r in rows)
        ray[arm] = {"samples_per_s": args.global_batch * len(rows) / step_s, "wall_s": wall,
                    "input_wait": sum(r["data_wait_s"] for r in rows) / step_s}
    best = max(plain.values())
    return {"mode": "cpu", "preset": args.preset, "global_batch": args.global_batch, "steps": args.steps,
            **{f"plain_{t}_threads_samples_per_s": v for t, v in plain.items()},
            **{f"ray_train_{arm}_{k}": v for arm, r in ray.items() for k, v in r.items()},
            **{f"ratio_ray_{arm}_over_best_plain": r["samples_per_s"] / best for arm, r in ray.items()}}


def gpu_point(preset: str, side: int, mask_ratio: float, micro: int, compile: bool, steps: int) -> float:
    """samples/s of fwd+bwd+AdamW at one micro-batch (bf16 autocast, fp32 master weights), one GPU."""
    from model.microdit.config import model_config
    from model.objectives.edm import EDMConfig, edm_loss
    from model.microdit.network import MicroDiT
    from pipeline.train.optim import build_optimizer

    cfg = model_config(preset, input_size=side, pos_interp_scale=side / 32)
    model = MicroDiT(cfg).cuda()
    if compile:
        for block in list(model.mixer) + list(model.blocks):
            block.compile()
    opt = build_optimizer(model, 1e-4)
    x = torch.randn(micro, 4, side, side, device="cuda")
    cap = torch.randn(micro, 77, cfg.caption_dim, device="cuda")
    times = []
    for _ in range(steps):
        torch.cuda.synchronize()
        t = time.perf_counter()
        with torch.autocast("cuda", torch.bfloat16):
            loss, _ = edm_loss(model, x, cap, EDMConfig(mask_ratio=mask_ratio))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    del model, opt
    torch.cuda.empty_cache()
    keep = times[steps // 2:]
    return micro * len(keep) / sum(keep)


def gpu_bench(args) -> dict:
    """XL_2 at stage 1 (32x32 latents, mask 0.75) and stage 3 (64x64, mask 0.75): largest fitting power-of-2 batch."""
    from model.microdit.config import flops_per_sample, model_config
    from pipeline.train.metrics import peak_flops

    peak = peak_flops(None)
    results = []
    for name, side, mask in (("stage1_256", 32, 0.75), ("stage3_512", 64, 0.75)):
        flops = flops_per_sample(model_config(args.gpu_preset, input_size=side), mask)
        for compile in (False, True):
            micro, best = args.start_micro, None
            while micro <= args.max_micro:
                try:
                    sps = gpu_point(args.gpu_preset, side, mask, micro, compile, args.gpu_steps)
                except torch.OutOfMemoryError:
                    torch.cuda.empty_cache()
                    break
                best = {"stage": name, "compile": compile, "micro_batch": micro, "samples_per_s": sps,
                        "mfu": sps * flops / peak if peak else None, "peak_mem_gb":
                        torch.cuda.max_memory_allocated() / 2**30}
                torch.cuda.reset_peak_memory_stats()
                micro *= 2
            results.append(best)
            print(json.dumps(best), flush=True)
    return {"mode": "gpu", "device": torch.cuda.get_device_name(), "preset": args.gpu_preset, "results": results}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", choices=["cpu", "gpu"], default="gpu" if torch.cuda.is_available() else "cpu")
    p.add_argument("--preset", default="MicroDiT_Debug")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--rows", type=int, default=256)
    p.add_argument("--global-batch", type=int, default=16)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--gpu-preset", default="MicroDiT_XL_2")
    p.add_argument("--gpu-steps", type=int, default=8)
    p.add_argument("--start-micro", type=int, default=16)
    p.add_argument("--max-micro", type=int, default=1024)
    args = p.parse_args()
    result = cpu_bench(args) if args.mode == "cpu" else gpu_bench(args)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
