"""Host memory (peak RSS) per rank of building the sharded training model: plain build vs meta-device build.

    python -m bench.host_memory --preset MicroDiT_XL_2 --world 2 --out host_memory.json

Each mode runs in fresh processes (a gloo group of --world CPU ranks, torch.multiprocessing spawn), so one mode's
peak cannot hide the other's. Per rank: resident set after imports and the process group (baseline), the peak
resident set during the build (VmHWM, reset through /proc/self/clear_refs before it starts), the resident set
after it (allocator trimmed), and the build time.

- plain: today's `torch.manual_seed(seed); MicroDiT(cfg)` on CPU on every rank, then `parallelize` (FSDP2).
- meta: `pipeline.train.build.build_training_model`: meta-device construction, FSDP2, then each rank's shards
  materialised one parameter at a time (bit-identical to plain; tested in tests/test_meta_build.py).
"""
from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import platform
import socket
import time

import torch
import torch.multiprocessing as mp
from model.microdit.family import FAMILY as MICRODIT

MIB = 2 ** 20


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def _trim() -> None:
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS


def _rank(rank: int, world: int, port: int, mode: str, preset: str, seed: int, out_dir: str) -> None:
    import torch.distributed as dist

    from model.microdit.config import model_config
    from model.microdit.network import MicroDiT
    from pipeline.train.build import build_training_model
    from pipeline.train.parallelize import build_mesh, parallelize

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    cfg = model_config(preset)
    mesh = build_mesh(world, "cpu")
    # Warm up in both modes: the first meta-device build imports ~900 modules (meta kernels, sympy), ~185 MiB
    # of RSS that is a one-time cost of torch, not of the model.
    with torch.device("meta"):
        MicroDiT(model_config("MicroDiT_Debug"))
    dist.barrier()
    _trim()
    base = _status_kib("VmRSS") * 1024
    _reset_peak()
    t0 = time.perf_counter()
    if mode == "plain":
        torch.manual_seed(seed)
        model = parallelize(MicroDiT(cfg), mesh,
                            units=MICRODIT.shard_units, bf16=False, compile=False, activation_checkpointing=False)
    else:
        model = build_training_model(cfg, seed, mesh, device="cpu", family="microdit")
    seconds = time.perf_counter() - t0
    peak = _status_kib("VmHWM") * 1024
    _trim()
    after = _status_kib("VmRSS") * 1024
    local = sum(p.to_local().numel() * p.element_size() for p in model.parameters())
    checksum = sum(float(p.detach().to_local().double().sum()) for p in model.parameters())
    result = {"mode": mode, "rank": rank, "baseline_mib": base / MIB, "peak_mib": peak / MIB,
              "peak_over_baseline_mib": (peak - base) / MIB, "after_mib": after / MIB,
              "after_over_baseline_mib": (after - base) / MIB, "local_params_mib": local / MIB,
              "build_s": seconds, "local_checksum": checksum}
    with open(os.path.join(out_dir, f"{mode}-{rank}.json"), "w") as f:
        json.dump(result, f)
    dist.barrier()
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(preset: str, world: int, modes: list[str], seed: int, out_dir: str) -> list[dict]:
    results = []
    for mode in modes:
        mp.spawn(_rank, args=(world, _free_port(), mode, preset, seed, out_dir), nprocs=world, join=True)
        for rank in range(world):
            with open(os.path.join(out_dir, f"{mode}-{rank}.json")) as f:
                results.append(json.load(f))
    return results


def main(argv=None) -> None:
    import tempfile

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="MicroDiT_XL_2")
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--modes", nargs="+", default=["plain", "meta"], choices=["plain", "meta"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="write the results as JSON here")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="mdit-hostmem-") as tmp:
        results = run(args.preset, args.world, args.modes, args.seed, tmp)
    print(f"{'mode':>6} {'rank':>4} {'baseline MiB':>12} {'peak MiB':>9} {'peak-base':>9} {'after-base':>10} "
          f"{'shard MiB':>9} {'build s':>8}")
    for r in results:
        print(f"{r['mode']:>6} {r['rank']:>4} {r['baseline_mib']:>12.0f} {r['peak_mib']:>9.0f} "
              f"{r['peak_over_baseline_mib']:>9.0f} {r['after_over_baseline_mib']:>10.0f} "
              f"{r['local_params_mib']:>9.0f} {r['build_s']:>8.1f}")
    by = {(r["mode"], r["rank"]): r for r in results}
    if set(args.modes) == {"plain", "meta"}:
        for rank in range(args.world):
            a, b = by[("plain", rank)], by[("meta", rank)]
            same = a["local_checksum"] == b["local_checksum"]
            print(f"rank {rank}: peak over baseline plain/meta = "
                  f"{a['peak_over_baseline_mib'] / max(b['peak_over_baseline_mib'], 1e-9):.1f}x; "
                  f"shard checksums {'equal' if same else 'DIFFER'}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"preset": args.preset, "world": args.world, "torch": torch.__version__,
                       "machine": platform.machine(), "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
