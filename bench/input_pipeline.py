"""Training input at real row sizes: a plain pyarrow read against the trainer's Ray Data path, same files, same run.

    python -m bench.input_pipeline --rows 3072 --files 6 --ray-cpus 1 --out input.json

Rows are written in the product's latent schema (`pipeline.core.schema` writers and write options, as precompute
writes them: snappy, `row_group_rows` per row group): 4x32x32 and 4x64x64 float16 latents and 77x1024 caption
states, random normal values (latents do not compress either). Then, at one `--resolution`:

- **pyarrow** (the baseline): one process, one thread, `ParquetFile.iter_batches` of the three columns the
  trainer reads, reshaped to numpy (N, C, H, W) and (N, L, D) batches.
- **ray**: `pipeline.train.data.build_datasets` (Parquet read + `DecodeLatents` as Ray Data tasks, streamed:
  sources this size exceed the object-store cache), split as Ray Train's `DataConfig` splits it
  (preserve_order, `streaming_split`), consumed through `MixtureStream` as the trainer consumes it (local
  shuffle buffer, torch batches, pinned when CUDA is there), on a local Ray head started here with
  `--ray-cpus` CPUs.

Per-core figures divide rows by the CPU seconds the arm actually used (this process plus, for Ray, every process
of its local cluster), so a contended machine still gives the cost per core; wall rows/s are reported too.
`cores_per_gpu` = (380 samples/s per GPU, the official run's average, x `--headroom`) / rows per CPU-second.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.core import schema, storage

SAMPLES_PER_GPU = 380.0  # the official MicroDiT run's average per H100 (2.6 days on 8 GPUs)
LATENT_CHANNELS, DOWNSAMPLE, RESOLUTIONS = 4, 8, (256, 512)  # SDXL VAE
CAPTION_SHAPE = (77, 1024)  # DFN5B-CLIP text states


def write_rows(folder: str, rows: int, files: int, row_group_rows: int, seed: int = 0) -> list[str]:
    """`files` Parquet parts of random rows in the latent schema; returns their paths."""
    s = schema.latent_schema(RESOLUTIONS, LATENT_CHANNELS, DOWNSAMPLE, *CAPTION_SHAPE)
    rng = np.random.default_rng(seed)
    paths, per_file = [], -(-rows // files)
    for f in range(files):
        n = min(per_file, rows - f * per_file)
        cols: dict[str, pa.Array] = {
            "key": pa.array([f"bench/{f:03d}{i:06d}" for i in range(n)]), "caption": pa.array(["a caption"] * n),
            "source": pa.array(["bench"] * n), "width": pa.array([640] * n, pa.int32()),
            "height": pa.array([640] * n, pa.int32()), "caption_truncated": pa.array([False] * n)}
        for r in RESOLUTIONS:
            side = r // DOWNSAMPLE
            values = rng.standard_normal((n, LATENT_CHANNELS, side, side), dtype=np.float32).astype(np.float16)
            cols[schema.latent_column(r)] = schema.tensor_array(list(values), s.field(schema.latent_column(r)))
            cols[schema.has_column(r)] = pa.array([True] * n)
        caps = rng.standard_normal((n, *CAPTION_SHAPE), dtype=np.float32).astype(np.float16)
        cols[schema.CAPTION_STATES] = schema.tensor_array(list(caps), s.field(schema.CAPTION_STATES))
        path = os.path.join(folder, f"part-{f:05d}.parquet")
        storage.write_parquet(path, pa.table(cols, schema=s), row_group_size=row_group_rows,
                              **schema.parquet_options(s))
        paths.append(path)
    return paths


def row_bytes(resolution: int) -> int:
    """Bytes of one training row as the trainer consumes it: the latent at `resolution` + caption states."""
    side = resolution // DOWNSAMPLE
    return 2 * (LATENT_CHANNELS * side * side + int(np.prod(CAPTION_SHAPE)))


def _cpu_seconds(pids: list[int]) -> dict[str, float]:
    """User + system CPU seconds so far of these processes by role: this process ("driver", where the trainer's
    iterator runs), Ray workers ("tasks": read, decode, split coordinator) and the rest ("daemons": raylet,
    GCS, dashboard, agents), from Linux /proc; gone processes count 0."""
    tick, total = os.sysconf("SC_CLK_TCK"), {"driver": 0.0, "tasks": 0.0, "daemons": 0.0}
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        role = "driver" if pid == os.getpid() else "tasks" if (b"ray::" in cmd or b"default_worker" in cmd) \
            else "daemons"
        total[role] += (int(fields[11]) + int(fields[12])) / tick  # utime, stime
    return total


def _descendants(pid: int) -> list[int]:
    """`pid` and every process below it (a local Ray head's GCS, raylet and workers are the driver's children)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children.get(p, [])
    return out


def _figures(rows: int, wall: float, cpu: float, resolution: int) -> dict:
    mb = rows * row_bytes(resolution) / 1e6
    return {"rows": rows, "wall_s": round(wall, 3), "cpu_s": round(cpu, 3), "rows_per_s": rows / wall,
            "mb_per_s": mb / wall, "rows_per_cpu_s": rows / cpu, "mb_per_cpu_s": mb / cpu}


def pyarrow_read(paths: list[str], resolution: int, batch: int) -> dict:
    """Baseline: one thread of plain pyarrow, Parquet -> numpy (N, C, H, W) latents and (N, L, D) captions."""
    lat_col, has_col = schema.latent_column(resolution), schema.has_column(resolution)
    side = resolution // DOWNSAMPLE
    rows, checksum = 0, 0.0
    t, c = time.perf_counter(), time.process_time()
    for path in paths:
        for b in pq.ParquetFile(path).iter_batches(batch_size=batch, columns=[lat_col, has_col,
                                                                            schema.CAPTION_STATES],
                                                   use_threads=False):
            keep = b.column(has_col).to_numpy(zero_copy_only=False)
            lat = schema.flat_values(b.column(lat_col), LATENT_CHANNELS * side * side).reshape(
                -1, LATENT_CHANNELS, side, side)[keep]
            cap = schema.flat_values(b.column(schema.CAPTION_STATES), int(np.prod(CAPTION_SHAPE))).reshape(
                -1, *CAPTION_SHAPE)[keep]
            rows += len(lat)
            checksum += float(lat[:, 0, 0, 0].sum()) + float(cap[:, 0, 0].sum())  # touch the data
    return _figures(rows, time.perf_counter() - t, time.process_time() - c, resolution)


def ray_read(folder: str, resolution: int, micro: int, shuffle: int, batches: int, seed: int = 0) -> dict:
    """The trainer's path: build_datasets -> DataConfig's ordered streaming_split -> MixtureStream batches."""
    import ray
    import torch

    from pipeline.train.data import MixtureStream, build_datasets

    datasets, _ = build_datasets({"bench": folder}, resolution, seed, cache_bytes=0)
    ds = datasets["train"]
    ds.context.execution_options.preserve_order = True  # as stage.py's DataConfig(ExecutionOptions(...))
    shard = ds.streaming_split(1, equal=True)[0]
    stream = MixtureStream({"train": shard}, {"train": 1.0}, micro, seed, shuffle, rank=0)
    first = stream.next(0, 0)  # pipeline start-up (tasks scheduled, first blocks read) left out of the figures
    assert first["latents"].dtype == torch.float16 and first["caption"].shape[1:] == CAPTION_SHAPE
    t, c = time.perf_counter(), _cpu_seconds(_descendants(os.getpid()))
    for step in range(1, batches + 1):
        stream.next(step, 0)
    wall, c1 = time.perf_counter() - t, _cpu_seconds(_descendants(os.getpid()))
    by_role = {k: round(c1[k] - c[k], 3) for k in c}
    out = _figures(batches * micro, wall, sum(by_role.values()), resolution)
    out["cpu_s_by_role"] = by_role
    # Daemons idle at a near-fixed rate per node, so their share grows with wall time on a slow machine:
    # the cost per row is the driver's and the tasks'.
    out["rows_per_cpu_s_driver_tasks"] = out["rows"] / (by_role["driver"] + by_role["tasks"])
    out["device"] = str(first["latents"].device)
    # End the split's iteration before the cluster goes: a Ray Data iterator collected after shutdown reconnects
    # (auto-init starts a fresh local Ray) and the process then hangs at exit.
    del stream, shard, first, ds, datasets
    gc.collect()
    ray.shutdown()
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=3072)
    p.add_argument("--files", type=int, default=6)
    p.add_argument("--row-group-rows", type=int, default=1024, help="as precompute's row_group_rows default")
    p.add_argument("--resolution", type=int, default=256, choices=RESOLUTIONS)
    p.add_argument("--micro-batch", type=int, default=256, help="stage 1's micro-batch per GPU")
    p.add_argument("--shuffle-buffer", type=int, default=1024, help="the plan's default shuffle_buffer")
    p.add_argument("--batches", type=int, default=0, help="Ray batches timed (default: two epochs' worth)")
    p.add_argument("--ray-cpus", type=int, default=1, help="CPUs of the local Ray head started here")
    p.add_argument("--headroom", type=float, default=1.5, help="feed rate asked of the CPUs, x 380 samples/s")
    p.add_argument("--dir", default=None, help="scratch folder (default: a temporary one, removed at the end)")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)

    from pipeline.core import ray_cluster

    scratch = tempfile.mkdtemp(prefix="mdit-input-", dir=args.dir)
    try:
        t = time.perf_counter()
        paths = write_rows(scratch, args.rows, args.files, args.row_group_rows)
        written = sum(os.path.getsize(x) for x in paths)
        print(f"wrote {args.rows} rows in {len(paths)} files, {written / 1e6:.0f} MB, "
              f"{time.perf_counter() - t:.1f} s", flush=True)
        base = pyarrow_read(paths, args.resolution, args.micro_batch)
        print("pyarrow:", json.dumps(base), flush=True)
        ray_cluster.connect(num_cpus=args.ray_cpus)
        batches = args.batches or 2 * (args.rows // args.micro_batch)
        ray = ray_read(scratch, args.resolution, args.micro_batch, args.shuffle_buffer, batches)
        print("ray:", json.dumps(ray), flush=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    need = SAMPLES_PER_GPU * args.headroom
    report = {
        "args": vars(args), "row_bytes": row_bytes(args.resolution), "parquet_bytes_per_row": written / args.rows,
        "pyarrow": base, "ray": ray,
        "ray_over_pyarrow_per_core": ray["rows_per_cpu_s"] / base["rows_per_cpu_s"],
        "ray_driver_tasks_over_pyarrow_per_core": ray["rows_per_cpu_s_driver_tasks"] / base["rows_per_cpu_s"],
        "cores_per_gpu": {"pyarrow": need / base["rows_per_cpu_s"], "ray": need / ray["rows_per_cpu_s"],
                          "ray_driver_tasks": need / ray["rows_per_cpu_s_driver_tasks"]},
        "samples_per_gpu": SAMPLES_PER_GPU, "headroom": args.headroom,
    }
    print(json.dumps({k: v for k, v in report.items() if k not in ("args",)}, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
