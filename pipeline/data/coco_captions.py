"""The one COCO-2014 val caption selection, shared by the COCO ingest and the evaluation.

Images with at least one caption, sorted by id. With `num` set, `num` of them are drawn without replacement by
random.Random(seed) and sorted by id again. Each image's caption is drawn from its captions (sorted by annotation
id) by random.Random(f"{seed}:{image_id}"), so an image's caption does not depend on which others were drawn: the
ingest of all images and an evaluation on a subset agree on every image they share. Whitespace runs (newlines
included) collapse to one space.
"""
from __future__ import annotations

import random

from pipeline.core import storage


def select_captions(annotations_uri: str, num: int | None = None, seed: int = 0) -> list[dict]:
    """[{image_id, file_name, url, width, height, caption}] in image-id order; every captioned image if num is None."""
    doc = storage.read_json(annotations_uri)  # FileNotFoundError names the URI
    if not isinstance(doc, dict) or "images" not in doc or "annotations" not in doc:
        keys = sorted(doc) if isinstance(doc, dict) else type(doc).__name__
        raise ValueError(f"{annotations_uri!r} is not a COCO captions file (needs 'images' and 'annotations'; "
                         f"has {keys})")
    captions: dict[int, list[tuple[int, str]]] = {}
    for a in doc["annotations"]:
        captions.setdefault(int(a["image_id"]), []).append((int(a["id"]), " ".join(str(a["caption"]).split())))
    images = sorted((im for im in doc["images"] if int(im["id"]) in captions), key=lambda im: int(im["id"]))
    if num is not None:
        if num > len(images):
            raise ValueError(f"num_images={num} but {annotations_uri!r} has only {len(images)} captioned images")
        images = sorted(random.Random(seed).sample(images, num), key=lambda im: int(im["id"]))
    return [{"image_id": int(im["id"]), "file_name": im["file_name"], "url": im.get("coco_url"),
             "width": im.get("width"), "height": im.get("height"),
             "caption": _draw(captions[int(im["id"])], seed, int(im["id"]))} for im in images]


def _draw(captions: list[tuple[int, str]], seed: int, image_id: int) -> str:
    return random.Random(f"{seed}:{image_id}").choice(sorted(captions))[1]  # str seeds hash stably (sha512)
