"""SA-1B with LLaVA captions -> webdataset shards.

Assumed layout:
- archives: Meta's `sa_NNNNNN.tar` files (from the links file on the SA-1B download page), each holding
  `sa_<id>.jpg` + `sa_<id>.json` (the SAM masks; not needed here: the id is in the file name and the size is read
  from the image) at the top level or under `./`.
- captions: PixArt-alpha/SAM-LLaVA-Captions10M's `SA1B_caption.tar.gz` extracted to a folder of `sa_<id>.txt`
  files (the layout the MicroDiT release reads), or one mapping file from image name/id to caption: `.json`
  ({"sa_1": "...", ...}), `.jsonl` or `.parquet` (columns `image` or `image_id`, and `caption`).
Images without a caption are skipped and counted (`no_caption`). SA-1B faces and plates are blurred by Meta
already. Images are large (~1500 px): they are shrunk to max_side here. One shard per archive, id = NNNNNN.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Iterator

from pipeline.core import storage
from pipeline.data.sources.archives import is_file, iter_jsonl, iter_tar, list_archives, stem
from pipeline.data.sources.shards import ArchiveTask, IngestConfig, RawSample, ingest

OUTPUT = "shards"
_TAR = re.compile(r"^sa_(\d+)\.tar$")


@dataclass
class SA1BConfig:
    """Folder of sa_NNNNNN.tar archives, caption folder or mapping file, size policy."""

    archives: str
    captions: str
    ingest: IngestConfig = field(default_factory=IngestConfig)


def _norm_id(value) -> str:
    """'sa_12.jpg', 'sa_12', 12, '12' -> 'sa_12'."""
    s = stem(str(value))
    return s if s.startswith("sa_") else f"sa_{s}"


def load_caption_map(uri: str) -> dict[str, str]:
    """Image name ('sa_<id>') -> caption from a .json / .jsonl / .parquet mapping file."""
    if uri.endswith(".json"):
        data = storage.read_json(uri)
        if not isinstance(data, dict):
            raise ValueError(f"{uri!r}: expected a JSON object mapping image ids to captions")
        return {_norm_id(k): str(v) for k, v in data.items()}
    if uri.endswith(".parquet"):
        records = storage.read_parquet(uri).to_pylist()
    elif uri.endswith((".jsonl", ".jsonl.gz")):
        records = iter_jsonl(uri)
    else:
        raise ValueError(f"caption file {uri!r}: expected a folder of sa_<id>.txt, or a .json/.jsonl/.parquet file")
    out = {}
    for r in records:
        ident = r.get("image", r.get("image_id", r.get("file_name")))
        if ident is None or "caption" not in r:
            raise ValueError(f"{uri!r}: records need 'image' (or 'image_id') and 'caption'; got keys {sorted(r)}")
        out[_norm_id(ident)] = str(r["caption"])
    return out


def _caption_for(name: str, params: dict) -> str | None:
    if params["map"] is not None:
        return params["map"].get(name)
    uri = storage.join(params["captions"], name + ".txt")
    try:
        return storage.read_bytes(uri).decode("utf-8").strip() or None
    except FileNotFoundError:
        return None


def _read_archive(task: ArchiveTask) -> Iterator[RawSample]:
    for path, data in iter_tar(task.params["tar"]):
        if not path.lower().endswith(".jpg"):
            continue  # the per-image mask json
        name = stem(path)
        extra = {"image": name, "archive": task.name}
        caption = _caption_for(name, task.params)
        if caption is None:
            yield RawSample(name, None, "", extra, reason="no_caption")
        else:
            yield RawSample(name, data, caption, extra)


def run(cfg: SA1BConfig, out_uri: str) -> dict:
    """Ingest every sa_NNNNNN.tar in cfg.archives with its LLaVA captions into shards at out_uri."""
    tars = [u for u in list_archives(cfg.archives, (".tar",)) if _TAR.match(os.path.basename(u))]
    if not tars:
        raise FileNotFoundError(f"no sa_NNNNNN.tar archives in {cfg.archives!r}")
    if not storage.exists(cfg.captions):
        raise FileNotFoundError(f"SA-1B captions {cfg.captions!r} do not exist")
    cmap = load_caption_map(cfg.captions) if is_file(cfg.captions) else None
    tasks = [ArchiveTask(int(_TAR.match(os.path.basename(u)).group(1)), os.path.basename(u), _read_archive,
                         {"tar": u, "map": cmap, "captions": cfg.captions}) for u in tars]
    return ingest(tasks, out_uri, cfg.ingest, "sa1b", {"captions": cfg.captions})
