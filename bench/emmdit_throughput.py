"""E-MMDiT training step against MicroDiT at equal batch, and token compression's speedup, in one run.

    python -m bench.emmdit_throughput --batch-size 2 --iters 3 --out emmdit.json                 # CPU
    python -m bench.emmdit_throughput --microdit-preset MicroDiT_XL_2 --batch-size 64 --iters 10  # one GPU

Cases, all at `--batch-size`, forward + backward of each family's training loss (no optimizer step), the timed
steps interleaved across cases and the median reported:

- `emmdit`: EMMDiT_512 (latents 32x16x16, captions 128x2048, rectified flow), token compression on;
- `emmdit_nocompress`: the same network with `compression=False` (every block on all 256 image tokens; no
  compressor or reconstructor): compression's speedup = its step time / `emmdit`'s;
- `microdit`: `--microdit-preset` at the 512 px stage shape (4x64x64, position scale 2, EDM, mask 0.75) or
  `--microdit-side 32` for the 256 px stage-1 shape.

On CUDA: bf16 autocast, ratios from wall step times, peak memory = torch.cuda.max_memory_allocated over the
step. On CPU: float32, ratios from the process's CPU seconds per step (steady under other load with one thread),
peak resident set over the step and the exact bytes autograd saves for backward (bench.model_throughput's probes).
`python -m bench.gpu_suite` runs the GPU side of this (parts `emmdit/512_eager`, `emmdit/512_nocompress`).
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from bench.model_throughput import MIB, PeakMemory, SavedActivations, _sync
from model import family as families
from model.objectives.configs import config_from_dict as objective_config
from model.objectives.objective import build as build_objective


def cases(microdit_preset: str, microdit_side: int) -> dict[str, dict]:
    """name -> (family, preset, overrides, latent shape, caption shape, objective, position scale)."""
    em = {"family": "emmdit", "preset": "EMMDiT_512", "latent": (32, 16, 16), "caption": (128, 2048),
          "objective": {"kind": "rectified_flow", "caption_dropout": 0.0}, "pos_scale": 1.0}
    return {
        "emmdit": {**em, "overrides": {}},
        "emmdit_nocompress": {**em, "overrides": {"compression": False}},
        "microdit": {"family": "microdit", "preset": microdit_preset, "overrides": {},
                     "latent": (4, microdit_side, microdit_side), "caption": (77, 1024),
                     "objective": {"kind": "edm", "mask_ratio": 0.75}, "pos_scale": microdit_side / 32},
    }


def build_case(c: dict, batch: int, device: torch.device):
    """(network, objective, inputs, flops per sample) of one case, seeded."""
    fam = families.get(c["family"])
    cfg = fam.fit(fam.config(c["preset"], **c["overrides"]), c["latent"], c["caption"], c["pos_scale"])
    torch.manual_seed(0)
    with torch.device(device):
        net = fam.build(cfg).train()
    x = torch.randn(batch, *c["latent"], device=device)
    cap = torch.randn(batch, *c["caption"], device=device)
    objective = objective_config(c["objective"])
    return net, build_objective(objective), (x, cap), fam.flops_per_sample(cfg, objective)


def step(net, obj, inputs, device: torch.device) -> None:
    with torch.autocast("cuda", torch.bfloat16, enabled=device.type == "cuda"):
        loss = obj.loss(net, *inputs)
    loss.backward()
    net.zero_grad(set_to_none=False)  # keep the gradient buffers: the step holds them on every iteration


def measure(names: list[str], all_cases: dict, batch: int, iters: int, warmup: int, device: torch.device) -> dict:
    built = {n: build_case(all_cases[n], batch, device) for n in names}
    times: dict[str, list[float]] = {n: [] for n in names}
    cpu_times: dict[str, list[float]] = {n: [] for n in names}
    out = {}
    for n in names:  # warm-up, then the memory probes on one more step
        net, obj, inputs, flops = built[n]
        for _ in range(warmup):
            step(net, obj, inputs, device)
        params = list(net.parameters())
        with PeakMemory(device) as peak, SavedActivations(exclude=params) as saved:
            step(net, obj, inputs, device)
        out[n] = {"params": sum(p.numel() for p in params), "flops_per_sample": flops,
                  "peak_mib": None if peak.peak_bytes is None else peak.peak_bytes / MIB,
                  "saved_for_backward_mib": saved.mib}
    for _ in range(iters):  # interleaved, so load changes hit every case alike
        for n in names:
            net, obj, inputs, _ = built[n]
            _sync(device)
            t, c = time.perf_counter(), time.process_time()
            step(net, obj, inputs, device)
            _sync(device)
            times[n].append(time.perf_counter() - t)
            cpu_times[n].append(time.process_time() - c)
    for n in names:
        s = statistics.median(times[n])
        out[n].update(step_s=s, samples_per_s=batch / s, step_times=times[n],
                      cpu_s=statistics.median(cpu_times[n]), cpu_times=cpu_times[n])
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--microdit-preset", default="MicroDiT_Tiny_2")
    p.add_argument("--microdit-side", type=int, default=64, choices=(32, 64), help="latent side: 64 = 512 px")
    p.add_argument("--cases", nargs="+", default=["emmdit", "emmdit_nocompress", "microdit"])
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    res = measure(args.cases, cases(args.microdit_preset, args.microdit_side), args.batch_size, args.iters,
                  args.warmup, device)
    report = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
              "threads": torch.get_num_threads(), "torch": torch.__version__, "args": vars(args), "cases": res}
    # On a shared CPU the wall time swings with other work; the process's CPU seconds per step (one thread) do not.
    key = "step_s" if device.type == "cuda" else "cpu_s"
    report["speedups_from"] = key
    if "emmdit" in res and "emmdit_nocompress" in res:
        report["compression_speedup"] = res["emmdit_nocompress"][key] / res["emmdit"][key]
        report["compression_flops_ratio"] = res["emmdit_nocompress"]["flops_per_sample"] / res["emmdit"][
            "flops_per_sample"]
    if "emmdit" in res and "microdit" in res:
        report["emmdit_over_microdit_samples"] = res["microdit"][key] / res["emmdit"][key]
    print("| case | params | samples/s | step s | CPU s/step | peak MiB | saved for bwd MiB | GFLOP/sample |")
    print("|---|---|---|---|---|---|---|---|")
    for n, r in res.items():
        peak = "-" if r["peak_mib"] is None else f"{r['peak_mib']:.0f}"
        print(f"| {n} | {r['params']:,} | {r['samples_per_s']:.3g} | {r['step_s']:.3g} | {r['cpu_s']:.3g} | {peak} | "
              f"{r['saved_for_backward_mib']:.0f} | {r['flops_per_sample'] / 1e9:.1f} |")
    print(json.dumps({k: v for k, v in report.items() if k not in ("cases", "args")}, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
