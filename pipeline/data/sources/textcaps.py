"""TextCaps -> URL list (Flickr URLs) or, with a local image folder, webdataset shards.

Assumed layout (textvqa.org/textcaps): `TextCaps_0.1_train.json` (or `_val`) = {"data": [...]}, one entry per
caption (about 5 per image) with `image_id`, `caption_id`, `caption_str`, `reference_strs` (all captions of the
image), `flickr_original_url`, `flickr_300k_url`, `image_width`, `image_height`, `image_path` ("train/<id>.jpg").
Images: TextVQA's `train_val_images.zip` -> `train_images/<image_id>.jpg` (folder or the zip itself).
One row per image: the caption is the one with the lowest caption_id (deterministic); all captions are kept in
`all_captions` (a JSON list). Entries without `caption_str` (the test split) are skipped and counted.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field

import pyarrow as pa

from pipeline.core import storage
from pipeline.data.sources.archives import chunk_tasks, read_listed_images
from pipeline.data.sources.shards import IngestConfig, ingest
from pipeline.data.sources.urls import write_url_table

OUTPUT = "urls"
OUTPUT_LOCAL = "shards"


@dataclass
class TextCapsConfig:
    """The TextCaps annotation json and which URL field to download from."""

    annotations: str
    url_field: str = "flickr_original_url"  # or "flickr_300k_url" (smaller copies)


@dataclass
class TextCapsLocalConfig:
    """The TextCaps annotation json and TextVQA's image folder (or zip), ingested under the size policy."""

    annotations: str
    images: str
    images_per_shard: int = 5000
    ingest: IngestConfig = field(default_factory=IngestConfig)


def read_images(annotations: str) -> tuple[list[dict], dict]:
    """One record per image (image_id, caption, all_captions, urls, sizes), in image_id order; and counts."""
    if not storage.exists(annotations):
        raise FileNotFoundError(f"TextCaps annotations {annotations!r} do not exist")
    doc = storage.read_json(annotations)
    data = doc.get("data") if isinstance(doc, dict) else None
    if not isinstance(data, list):
        raise ValueError(f"{annotations!r}: expected TextCaps json with a 'data' list; top-level keys: "
                         f"{sorted(doc) if isinstance(doc, dict) else type(doc).__name__}")
    images: dict[str, dict] = {}
    no_caption = 0
    for e in data:
        if "image_id" not in e:
            raise ValueError(f"{annotations!r}: entry without image_id (keys {sorted(e)})")
        if not e.get("caption_str"):
            no_caption += 1
            continue
        rec = images.setdefault(e["image_id"], {"image_id": e["image_id"], "entries": [], **{
            k: e.get(k) for k in ("flickr_original_url", "flickr_300k_url", "image_width", "image_height")}})
        rec["entries"].append((e.get("caption_id", 0), e["caption_str"], e.get("reference_strs")))
    out = []
    for image_id in sorted(images):
        rec = images.pop(image_id)
        entries = sorted(rec.pop("entries"), key=lambda x: (x[0], x[1]))
        refs = entries[0][2] or [c for _, c, _ in entries]
        out.append({**rec, "caption": entries[0][1], "all_captions": json.dumps(refs)})
    return out, {"entries": len(data), "no_caption": no_caption, "images": len(out)}


def run(cfg: TextCapsConfig, out_uri: str) -> dict:
    """Write the URL list (url, caption, image_id, all_captions, ...) to out_uri."""
    records, counts = read_images(cfg.annotations)
    rows = [r for r in records if r.get(cfg.url_field)]
    table = pa.Table.from_pylist([{"url": r[cfg.url_field], "caption": r["caption"], "image_id": r["image_id"],
                                   "all_captions": r["all_captions"], "image_width": r["image_width"],
                                   "image_height": r["image_height"]} for r in rows])
    return write_url_table(table, out_uri, {"source": "textcaps", **counts, "no_url": len(records) - len(rows)})


def run_local(cfg: TextCapsLocalConfig, out_uri: str) -> dict:
    """Ingest <image_id>.jpg from the TextVQA image folder/zip with their captions into shards at out_uri."""
    records, counts = read_images(cfg.annotations)
    if not storage.exists(cfg.images):
        raise FileNotFoundError(f"TextVQA images {cfg.images!r} do not exist (expected train_images/ or its zip)")
    items = [(f"{r['image_id']}.jpg", r["caption"], {"image_id": r["image_id"], "all_captions": r["all_captions"]})
             for r in records]
    tasks = chunk_tasks(items, cfg.images_per_shard, cfg.images, read_listed_images)
    return ingest(tasks, out_uri, cfg.ingest, "textcaps", counts)
