"""DiffusionDB -> webdataset shards (the images ship in zip archives, not as URLs).

Assumed layout (poloclub/diffusiondb on the Hugging Face Hub), under `root`:
- `metadata-large.parquet` (DiffusionDB Large, 14M) or `metadata.parquet` (2M): one row per image with at least
  `image_name`, `prompt`, `part_id`, `image_nsfw` (and `prompt_nsfw`, `width`, `height`, `seed`, ...).
- `part-NNNNNN.zip` archives anywhere below root (2M: `images/part-000001.zip`; Large:
  `diffusiondb-large-part-1/part-000001.zip`), each holding its images by `image_name` (png or webp) plus a
  `part-NNNNNN.json` we do not need (the metadata has the prompts).
Rows with an NSFW score above the threshold in any of `nsfw_columns` are dropped (the release used 0.2 on both
image and prompt scores; a missing score counts as unsafe). Only archives present are ingested (a subset download
is normal); their rows are counted in the report. One shard per archive, shard id = part id.
"""
from __future__ import annotations

import os
import re
import zipfile
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipeline.core import storage
from pipeline.data.sources.shards import ArchiveTask, IngestConfig, RawSample, ingest

OUTPUT = "shards"
REQUIRED = ("image_name", "prompt", "part_id", "image_nsfw")
_PART = re.compile(r"^part-(\d{6})\.zip$")
_EXTRA = ("seed", "step", "cfg", "sampler", "width", "height", "image_nsfw", "prompt_nsfw")


@dataclass
class DiffusionDBConfig:
    """Folder with the metadata parquet and part zips; NSFW filter; size policy."""

    root: str
    metadata: str | None = None  # default: root/metadata-large.parquet, else root/metadata.parquet
    nsfw_threshold: float = 0.2
    nsfw_columns: list[str] = field(default_factory=lambda: ["image_nsfw", "prompt_nsfw"])
    ingest: IngestConfig = field(default_factory=IngestConfig)


def find_parts(root: str) -> dict[int, str]:
    """part id -> URI of every part-NNNNNN.zip below root."""
    fs, path = storage.filesystem(root)
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
    prefix = "s3://" if storage.is_s3(root) else ""
    return {int(m.group(1)): prefix + i.path for i in infos
            if i.type == pafs.FileType.File and (m := _PART.match(i.base_name))}


def _metadata_uri(cfg: DiffusionDBConfig) -> str:
    if cfg.metadata:
        return cfg.metadata
    for name in ("metadata-large.parquet", "metadata.parquet"):
        if storage.exists(storage.join(cfg.root, name)):
            return storage.join(cfg.root, name)
    raise FileNotFoundError(f"no metadata-large.parquet or metadata.parquet in {cfg.root!r}")


def _read_part(task: ArchiveTask) -> Iterator[RawSample]:
    fs, path = storage.filesystem(task.params["zip"])
    with fs.open_input_file(path) as f, zipfile.ZipFile(f) as z:
        names = set(z.namelist())
        for row in task.params["rows"].to_pylist():
            name = row["image_name"]
            extra = {k: row[k] for k in _EXTRA if k in row} | {"image_name": name, "part_id": task.shard_id}
            if name in names:
                yield RawSample(name, z.read(name), row["prompt"] or "", extra)
            else:
                yield RawSample(name, None, row["prompt"] or "", extra, reason="missing_in_archive")


def run(cfg: DiffusionDBConfig, out_uri: str) -> dict:
    """Filter the metadata, then ingest every part zip present under root into shards at out_uri."""
    meta_uri = _metadata_uri(cfg)
    fs, path = storage.filesystem(meta_uri)
    columns = pq.read_schema(path, filesystem=fs).names
    missing = [c for c in REQUIRED if c not in columns]
    if missing:
        raise ValueError(f"DiffusionDB metadata {meta_uri!r} lacks column(s) {missing}; columns found: {columns}")
    unknown = [c for c in cfg.nsfw_columns if c not in columns]
    if unknown:  # a misspelled score column must not silently turn the filter off
        raise ValueError(f"nsfw_columns {unknown} are not in DiffusionDB metadata {meta_uri!r}; columns found: "
                         f"{columns}")
    nsfw = list(cfg.nsfw_columns)
    t = pq.read_table(path, filesystem=fs, columns=[c for c in columns if c in REQUIRED + _EXTRA + tuple(nsfw)])
    safe = pa.array(np.ones(t.num_rows, dtype=bool))  # nsfw_columns: [] keeps every row
    for c in nsfw:
        # Compare in the column's own precision: a float32 0.2 is 0.2000000030 as a double.
        thr = pa.scalar(cfg.nsfw_threshold, t[c].type if pa.types.is_floating(t[c].type) else pa.float64())
        ok = pc.fill_null(pc.less_equal(t[c], thr), False)  # unknown score: unsafe
        safe = pc.and_(safe, ok)
    kept = t.filter(safe)
    kept_rows = kept.num_rows
    parts = find_parts(cfg.root)
    if not parts:
        raise FileNotFoundError(f"no part-NNNNNN.zip archives below {cfg.root!r}")
    present = pc.is_in(kept["part_id"], value_set=pa.array(sorted(parts), kept["part_id"].type))
    rows_absent = kept.num_rows - pc.sum(present).as_py() if kept.num_rows else 0
    # Rows grouped by part as Arrow slices (14M rows as Python dicts would not fit comfortably in memory).
    kept = kept.filter(present).sort_by([("part_id", "ascending"), ("image_name", "ascending")])
    pids = kept["part_id"].to_numpy()
    tasks = []
    for pid in sorted(parts):
        lo, hi = np.searchsorted(pids, pid, "left"), np.searchsorted(pids, pid, "right")
        tasks.append(ArchiveTask(pid, os.path.basename(parts[pid]), _read_part,
                                 {"zip": parts[pid], "rows": kept.slice(lo, hi - lo)}))
    extra = {"metadata_rows": t.num_rows, "nsfw_dropped": t.num_rows - kept_rows,
             "nsfw_threshold": cfg.nsfw_threshold, "nsfw_columns": nsfw, "rows_in_absent_parts": rows_absent}
    return ingest(tasks, out_uri, cfg.ingest, "diffusiondb", extra)
