"""Precompute throughput: rows/s through Ray Data vs a plain single-process loop over the same shards and encoders.

    python -m bench.precompute_throughput                      # CPU: stand-in VAE + tiny text tower, small shards
    python -m bench.precompute_throughput --vae tiny-diffusers # exercise the diffusers AutoencoderKL path
    python -m bench.precompute_throughput --gpu                # + SDXL-VAE / DFN5B-text architectures, random
                                                               #   weights, images/s per GPU at 256+512 px
Both paths run the same stage code (pipeline/data/precompute_stages.py) and the same commit; the ratio is measured in
one run on one machine. The Ray figure includes the pipeline's own start (actors loading encoders), not the
cluster's. Prints one JSON line per measurement.
"""
from __future__ import annotations

import argparse
import io
import json
import random
import shutil
import tarfile
import tempfile
import time
from pathlib import Path

from pipeline.data.precompute import PrecomputeConfig, list_shards, precompute, precompute_locally

from bench.encoder_configs import DFN5B_TEXT_CONFIG, SDXL_VAE_CONFIG  # noqa: E402


def make_shards(folder: Path, shards: int, per_shard: int, size: int, seed: int = 0) -> int:
    """Synthetic webdataset shards (coloured shapes, JPEG, captions naming them) + _SUCCESS; returns samples."""
    from pipeline.data.shapes import random_spec, render

    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for s in range(shards):
        with tarfile.open(folder / f"{s:05d}.tar", "w") as tf:
            for i in range(per_shard):
                spec = random_spec(rng)
                w = size + rng.randrange(0, size // 2)  # mixed aspect ratios
                buf = io.BytesIO()
                render(spec, w, size).save(buf, "JPEG", quality=90)
                for ext, data in (("jpg", buf.getvalue()), ("txt", spec.caption.encode())):
                    info = tarfile.TarInfo(f"{s:05d}{i:04d}.{ext}")
                    info.size = len(data)
                    tf.addfile(info, io.BytesIO(data))
    (folder / "_SUCCESS").write_bytes(b"")
    return shards * per_shard


def plain_loop(shards_uri: str, out: Path, cfg: PrecomputeConfig) -> int:
    """The baseline: the same stages and commit, one process, no Ray; returns rows written."""
    stats = precompute_locally(list_shards(shards_uri), str(out), cfg, "bench")
    return sum(s["rows"] for s in stats.values())


def ray_vs_loop(args) -> dict:
    import ray

    from pipeline.core import ray_cluster

    work = Path(tempfile.mkdtemp(prefix="pcbench"))
    try:
        n = make_shards(work / "shards", args.shards, args.per_shard, args.size)
        vae = args.vae
        if vae == "tiny-diffusers":
            from model.encoders.sdxl_vae import save_tiny_vae

            vae = save_tiny_vae(work / "vae")
        cfg = PrecomputeConfig(resolutions=args.resolutions, vae=vae, text_encoder=args.text,
                               vae_batch_size=args.batch, text_batch_size=args.batch, vae_actors=args.actors,
                               text_actors=args.actors, cpus_per_actor=args.cpus_per_actor)
        t = time.perf_counter()
        base_rows = plain_loop(str(work / "shards"), work / "loop", cfg)
        t_loop = time.perf_counter() - t
        ray_cluster.connect(args.ray_address)
        t = time.perf_counter()
        report = precompute(str(work / "shards"), str(work / "ray"), cfg)
        t_ray = time.perf_counter() - t
        ray.shutdown()
        assert report["rows_written"] == base_rows == n, (report["rows_written"], base_rows, n)
        return {"bench": "precompute_ray_vs_loop", "rows": n, "shards": args.shards, "image_px": args.size,
                "resolutions": args.resolutions, "vae": args.vae, "text": args.text,
                "loop_rows_per_s": round(n / t_loop, 2), "ray_rows_per_s": round(n / t_ray, 2),
                "ray_over_loop": round(t_loop / t_ray, 3), "loop_s": round(t_loop, 2), "ray_s": round(t_ray, 2)}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def sdxl_per_device(device: str, batch: int, iters: int, resolutions=(256, 512)) -> dict:
    """Images/s on one device of the real architectures (random weights): SDXL VAE encode + DFN5B text states."""
    import torch
    from diffusers import AutoencoderKL

    from model.encoders.clip_text import TextEncoder, build_text_tower
    from model.encoders.sdxl_vae import DiffusersVAE

    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    vae = DiffusersVAE(AutoencoderKL.from_config(SDXL_VAE_CONFIG), device, dtype)
    text = TextEncoder(build_text_tower(DFN5B_TEXT_CONFIG, dtype), device, dtype)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)

    def timed(fn) -> float:
        fn()  # warm-up (kernel selection, allocator)
        sync()
        t = time.perf_counter()
        for _ in range(iters):
            fn()
        sync()
        return (time.perf_counter() - t) / (iters * batch)

    per_image = {}
    for r in resolutions:
        x = torch.rand(batch, 3, r, r, device=device) * 2 - 1
        gens = [torch.Generator().manual_seed(i) for i in range(batch)]
        per_image[f"vae_{r}_s"] = timed(lambda: vae.encode(x, generator=gens))
    captions = [f"a photo of {i} red cubes on a wooden table in the evening light" for i in range(batch)]
    per_image["text_s"] = timed(lambda: text.encode(captions))
    total = sum(per_image.values())
    return {"bench": "precompute_encoders_per_device", "device": torch.cuda.get_device_name() if
            device.startswith("cuda") else "cpu", "dtype": str(dtype), "batch": batch,
            **{k.replace("_s", "_images_per_s"): round(1 / v, 2) for k, v in per_image.items()},
            "images_per_s_all": round(1 / total, 2)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shards", type=int, default=4)
    p.add_argument("--per-shard", type=int, default=32)
    p.add_argument("--size", type=int, default=160, help="short side of the synthetic JPEGs")
    p.add_argument("--resolutions", type=int, nargs="+", default=[64, 128])
    p.add_argument("--vae", default="standin", help="'standin', 'tiny-diffusers' or a VAE spec")
    p.add_argument("--text", default="tiny")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--actors", type=int, default=1)
    p.add_argument("--cpus-per-actor", type=float, default=1.0)
    p.add_argument("--ray-address", default=None)
    p.add_argument("--gpu", action="store_true", help="also time the SDXL VAE / DFN5B text architectures on cuda")
    p.add_argument("--arch-on-cpu", action="store_true", help="time those architectures on CPU (batch 1, slow)")
    p.add_argument("--gpu-batch", type=int, default=32)
    args = p.parse_args()
    print(json.dumps(ray_vs_loop(args)), flush=True)
    if args.gpu:
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("--gpu: no CUDA device here")
        print(json.dumps(sdxl_per_device("cuda", args.gpu_batch, iters=10)), flush=True)
    if args.arch_on_cpu:
        print(json.dumps(sdxl_per_device("cpu", 1, iters=1)), flush=True)


if __name__ == "__main__":
    main()
