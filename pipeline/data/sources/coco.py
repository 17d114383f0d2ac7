"""COCO-2014 val (evaluation) -> webdataset shards of the real images + the eval caption list.

Assumed layout (cocodataset.org): `annotations/captions_val2014.json` = {"images": [{id, file_name, coco_url,
width, height, ...}], "annotations": [{id, image_id, caption}]} (about 5 captions per image) and the images in
`val2014/` or `val2014.zip` (`COCO_val2014_<id:012d>.jpg`).
Eval captions: the selection of pipeline/data/coco_captions.py, the same one `pipeline/evaluate/evaluate.py` uses: one seeded
random caption per image, over every captioned image or a seeded subset (`max_images`). The caption list goes
to `{out}/_eval_captions.parquet` (image_id, file_name, url, width, height, caption, key); `key` is the image's
key in the shards, or null where the size policy dropped it, so FID/CLIP-score code can pair them.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field

import pyarrow as pa

from pipeline.core import storage
from pipeline.data.coco_captions import select_captions
from pipeline.data.sources.archives import chunk_tasks, read_listed_images
from pipeline.data.sources.shards import IngestConfig, done_shards, ingest, shard_name

OUTPUT = "shards"
EVAL_CAPTIONS = "_eval_captions.parquet"


@dataclass
class COCOConfig:
    """captions_val2014.json, the val2014 folder or zip, an optional seeded subset, size policy."""

    annotations: str
    images: str
    max_images: int | None = None
    seed: int = 0
    images_per_shard: int = 5000
    ingest: IngestConfig = field(default_factory=IngestConfig)


def eval_captions(annotations: str, max_images: int | None = None, seed: int = 0) -> pa.Table:
    """The shared selection (pipeline/data/coco_captions.py) as a table: every captioned image, or a seeded subset."""
    rows = select_captions(annotations, max_images, seed)
    return pa.table({
        "image_id": pa.array([r["image_id"] for r in rows], pa.int64()),
        "file_name": pa.array([r["file_name"] for r in rows], pa.string()),
        "url": pa.array([r["url"] for r in rows], pa.string()),
        "width": pa.array([r["width"] for r in rows], pa.int32()),
        "height": pa.array([r["height"] for r in rows], pa.int32()),
        "caption": pa.array([r["caption"] for r in rows], pa.string()),
    })


def run(cfg: COCOConfig, out_uri: str) -> dict:
    """Ingest the (subset of) val2014 images into shards at out_uri and write the eval caption list beside them."""
    caps = eval_captions(cfg.annotations, cfg.max_images, cfg.seed)
    if caps.num_rows == 0:
        raise ValueError(f"{cfg.annotations!r} has no captioned images")
    if not storage.exists(cfg.images):
        raise FileNotFoundError(f"COCO images {cfg.images!r} do not exist (expected val2014/ or val2014.zip)")
    items = [(f, c, {"image_id": i}) for f, c, i in
             zip(caps["file_name"].to_pylist(), caps["caption"].to_pylist(), caps["image_id"].to_pylist())]

    def finalize(report: dict) -> dict:
        keys = _keys_by_image_id(out_uri)
        table = caps.append_column("key", pa.array([keys.get(i) for i in caps["image_id"].to_pylist()], pa.string()))
        storage.write_parquet(storage.join(out_uri, EVAL_CAPTIONS), table)
        return {"eval_captions": caps.num_rows, "eval_captions_uri": storage.join(out_uri, EVAL_CAPTIONS)}

    tasks = chunk_tasks(items, cfg.images_per_shard, cfg.images, read_listed_images)
    return ingest(tasks, out_uri, cfg.ingest, "coco2014_val", {"images_selected": caps.num_rows}, finalize)


def _keys_by_image_id(out_uri: str) -> dict[int, str]:
    keys = {}
    for sid in sorted(done_shards(out_uri)):
        t = storage.read_parquet(storage.join(out_uri, shard_name(sid) + ".parquet"), ["key", "status", "extra"])
        for key, st, extra in zip(t["key"].to_pylist(), t["status"].to_pylist(), t["extra"].to_pylist()):
            if st == "success":
                keys[json.loads(extra)["image_id"]] = key
    return keys
