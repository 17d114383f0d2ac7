"""Helpers shared by the training tests: small Parquet latent files and tiny stage configs (no tests here)."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.core import schema, storage

TEXT_WIDTH = 64  # MicroDiT_Debug caption_dim


def write_latents(uri: str, rows: int = 48, files: int = 2, resolutions=(64,), source: str = "synth",
                  seed: int = 0, downsample: int = 4, without_high_res: int = 0) -> str:
    """Latent rows of 4 classes of smooth patterns whose caption states carry the class; then _SUCCESS.

    The last `without_high_res` rows of each file have no latent at the highest resolution (has_<R> False).
    """
    rng = np.random.default_rng(seed)
    s = schema.latent_schema(resolutions, 4, downsample, 77, TEXT_WIDTH)
    per = rows // files
    top = max(resolutions)
    for f in range(files):
        cls = rng.integers(0, 4, per)
        has_top = np.arange(per) < per - without_high_res
        arrays = []
        for fld in s:
            name = fld.name
            if name == "key":
                arrays.append(pa.array([f"{source}/{f}_{i}" for i in range(per)]))
            elif name == "caption":
                arrays.append(pa.array([f"shape of class {c}" for c in cls]))
            elif name == "source":
                arrays.append(pa.array([source] * per))
            elif name in ("width", "height"):
                arrays.append(pa.array([top] * per, pa.int32()))
            elif name == "caption_truncated":
                arrays.append(pa.array([False] * per))
            elif name.startswith("has_"):
                r = int(name.split("_")[1])
                arrays.append(pa.array(has_top if r == top else np.ones(per, bool)))
            elif name.startswith("latents_"):
                r = int(name.split("_")[1])
                h = r // downsample
                yy, xx = np.meshgrid(np.linspace(-1, 1, h), np.linspace(-1, 1, h), indexing="ij")
                vals = []
                for i, c in enumerate(cls):
                    if r == top and not has_top[i]:
                        vals.append(None)
                        continue
                    base = np.stack([np.sin(np.pi * (c + 1) * xx / 2), np.cos(np.pi * (c + 1) * yy / 2),
                                     xx * yy * (c - 1.5), (xx + yy) * 0.5])
                    vals.append(base + 0.05 * rng.standard_normal(base.shape))
                arrays.append(schema.tensor_array(vals, fld))
            else:  # caption states: a one-hot-ish block per class plus a little noise
                st = 0.01 * rng.standard_normal((per, 77, TEXT_WIDTH))
                for i, c in enumerate(cls):
                    st[i, :, c * 4:(c + 1) * 4] += 1.0
                arrays.append(schema.tensor_array(list(st), fld))
        sink = pa.BufferOutputStream()
        pq.write_table(pa.Table.from_arrays(arrays, schema=s), sink)
        storage.write_bytes(storage.join(uri, f"part-{f:05d}.parquet"), sink.getvalue().to_pybytes())
    storage.write_json(storage.join(uri, "_SUCCESS"), {"rows": rows})
    return uri


# Where each flat key of a stage lives in the plan's sections (pipeline/core/plan/stage.py).
SECTION_OF = {
    "resolution": "data", "base_resolution": "data", "mixture": "data", "exclude_sources": "data",
    "shuffle_buffer": "data", "cache_dataset_mb": "data",
    "global_batch": "batch", "micro_batch": "batch", "num_workers": "batch", "use_gpu": "batch",
    "cpus_per_worker": "batch", "cpu_threads": "batch", "compile": "batch", "activation_checkpointing": "batch",
    "lr": "optim", "grad_clip": "optim", "ema": "optim", "schedule": "optim", "max_consecutive_nonfinite": "optim",
    "sigma_data": "objective", "p_mean": "objective", "p_std": "objective", "mask_ratio": "objective",
    "caption_dropout": "objective",
    "checkpoint_every": ("checkpoint", "every"), "keep_checkpoints": ("checkpoint", "keep"),
    "max_failures": "checkpoint", "sample_every": ("sampling", "every"), "sample_prompts": ("sampling", "prompts"),
    "sample_steps": ("sampling", "steps"),
}


def tiny_stage(**overrides) -> dict:
    """A few-step CPU stage: 2 gloo workers, micro 2, accumulation 2, a checkpoint every 2 steps, and a
    non-default EDM sigma_data (0.5) that must reach the export and the samplers. Flat keyword overrides are
    put into their plan sections (SECTION_OF)."""
    flat = dict(name="s1", resolution=64, mask_ratio=0.5, steps=8, global_batch=8, micro_batch=2, num_workers=2,
                use_gpu=False, cpus_per_worker=0.5, base_resolution=64, lr=3e-3, sigma_data=0.5,
                schedule=dict(kind="cosine", warmup_steps=2), grad_clip=1.0, ema=dict(decay=0.5),
                shuffle_buffer=8, log_every=1, checkpoint_every=2, keep_checkpoints=2, sample_prompts=4,
                sample_steps=3, max_failures=2)
    flat.update(overrides)
    out: dict = {"objective": {"kind": "edm"}}
    for key, value in flat.items():
        where = SECTION_OF.get(key)
        if where is None:
            out[key] = value
        else:
            section, name = where if isinstance(where, tuple) else (where, key)
            out.setdefault(section, {})[name] = value
    return out
