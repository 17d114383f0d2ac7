"""JourneyDB -> webdataset shards (Midjourney images in tgz archives + a jsonl of annotations).

Assumed layout (JourneyDB/JourneyDB on the Hugging Face Hub, train or valid split):
- annotations: `data/train/train_anno_realease_repath.jsonl` (or the `.jsonl.tgz` it ships in), one JSON object
  per image with `img_path` like "./046/<uuid>.jpg", `prompt` (the Midjourney prompt) and `Task2.Caption`
  (a GPT-3.5 caption).
- images: `data/train/imgs/NNN.tgz` (000..199), each extracting to `NNN/<uuid>.<ext>`.
The release trained on `prompt`; `caption_field: caption` uses Task2.Caption instead. The archive of an image is
the first directory of its img_path; one shard per archive present, shard id = NNN. Annotations whose archive is
absent are counted, not errors (a subset download is normal).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Iterator

from pipeline.data.sources.archives import iter_jsonl, iter_tar, list_archives, stem
from pipeline.data.sources.shards import ArchiveTask, IngestConfig, RawSample, ingest

OUTPUT = "shards"
_SUFFIXES = (".tgz", ".tar.gz", ".tar")


@dataclass
class JourneyDBConfig:
    """Annotation jsonl (or its tgz), the folder of NNN.tgz image archives, caption choice, size policy."""

    annotations: str
    images: str
    caption_field: str = "prompt"  # "prompt" or "caption" (Task2.Caption)
    ingest: IngestConfig = field(default_factory=IngestConfig)

    def __post_init__(self):
        if self.caption_field not in ("prompt", "caption"):
            raise ValueError(f"caption_field must be 'prompt' or 'caption', got {self.caption_field!r}")


def _caption(rec: dict, field_name: str) -> str | None:
    if field_name == "prompt":
        return rec.get("prompt")
    return (rec.get("Task2") or {}).get("Caption")


def _archive_name(uri: str) -> str:
    name = os.path.basename(uri)
    for s in _SUFFIXES:
        if name.endswith(s):
            return name[: -len(s)]
    return name


def _read_archive(task: ArchiveTask) -> Iterator[RawSample]:
    wanted: dict[str, dict] = task.params["rows"]
    seen = set()
    for name, data in iter_tar(task.params["tar"]):
        key = stem(name)
        if key in wanted and key not in seen:
            seen.add(key)
            row = wanted[key]
            yield RawSample(name, data, row["caption"], {"img_path": row["img_path"], "archive": task.name})
    for key in sorted(set(wanted) - seen):
        row = wanted[key]
        yield RawSample(key, None, row["caption"], {"img_path": row["img_path"], "archive": task.name},
                        reason="missing_in_archive")


def run(cfg: JourneyDBConfig, out_uri: str) -> dict:
    """Ingest every NNN.tgz in cfg.images with the captions of cfg.annotations into shards at out_uri."""
    archives = {_archive_name(u): u for u in list_archives(cfg.images, _SUFFIXES)}
    if not archives:
        raise FileNotFoundError(f"no NNN.tgz image archives in {cfg.images!r}")
    rows: dict[str, dict[str, dict]] = {}
    n = no_caption = absent = duplicates = 0
    for rec in iter_jsonl(cfg.annotations):
        n += 1
        path = str(rec.get("img_path") or "").lstrip("./")
        caption = _caption(rec, cfg.caption_field)
        if "/" not in path:
            raise ValueError(f"{cfg.annotations!r} record {n}: img_path {rec.get('img_path')!r} is not "
                             "'./NNN/<name>.<ext>'")
        if not caption:
            no_caption += 1
            continue
        archive = path.split("/")[0]
        if archive not in archives:
            absent += 1
            continue
        wanted = rows.setdefault(archive, {})
        duplicates += stem(path) in wanted  # the last record of an image wins; the others are counted
        wanted[stem(path)] = {"caption": caption, "img_path": rec["img_path"]}
    if n == 0:
        raise ValueError(f"annotation file {cfg.annotations!r} holds no records")
    # Shard id = NNN; archives with other names get ids after the numbered ones, so no two share a shard.
    numbered = [int(a) for a in archives if a.isdigit()]
    other = iter(range(max(numbered, default=-1) + 1, 1 << 62))
    tasks = [ArchiveTask(int(a) if a.isdigit() else next(other), os.path.basename(u), _read_archive,
                         {"tar": u, "rows": rows.get(a, {})})
             for a, u in sorted(archives.items())]
    extra = {"annotations": n, "no_caption": no_caption, "rows_in_absent_archives": absent,
             "duplicate_annotations": duplicates,
             "caption_field": cfg.caption_field}
    return ingest(tasks, out_uri, cfg.ingest, "journeydb", extra)
