"""Evaluation of exported weights: FID and CLIP score on COCO-2014 val captions, and the synthetic demo metric.

Protocol (fixed; every number below is recorded in metrics.json beside the result):
  * Captions: COCO-2014 val (`{coco}/annotations/captions_val2014.json`), `num_images` (30,000) images and one
    caption each, drawn with random.Random(seed) by pipeline/data/coco_captions.py (the COCO ingest uses the same).
  * Generated: one image per caption at `resolution` (256 or 512), with the export's own objective and sampler
    (MicroDiT: EDM Heun, 30 steps, guidance 5.0 unless `steps` / `guidance` say otherwise), image i with noise
    seed `seed + i`, EMA weights; written as PNGs under {root}/eval/samples/.
  * Real: the same COCO images, bicubic resize of the short side and center crop to `resolution`
    (pipeline/core/images.py, the training preprocessing), as uint8.
  * FID: torchmetrics FrechetInceptionDistance, 2048-d pool features (`fid_features`) of torch-fidelity's Inception-v3
    (pt_inception-2015-12-05 weights, local file via `inception_weights`), images resized to 299 by
    torch-fidelity's TF1-compatible bilinear resize (`fid_antialias=False`, as the reference FID code does).
  * CLIP score: torchmetrics CLIPScore (100 x cosine of image and caption embeddings, mean, floored at 0) with
    open_clip `clip_model` / `clip_pretrained` (ViT-L-14 / openai by default; a local weights file offline).
  * Demo (tiny recipe): fixed synthetic captions; each sample is read back (colour, shape, background,
    position, size) and compared with its caption: caption_match = colour and shape both right.
  * GenEval (`geneval.enabled`): its 553 prompts (or a subset), 4 images each, Mask2Former detections, the CLIP
    colour check and the protocol's rules (pipeline/evaluate/geneval/): per-tag and overall scores.
Writes {root}/eval/metrics.json, then {root}/eval/_SUCCESS holding the request; a rerun with the same request is
a no-op, and an interrupted run resumes: generated PNGs and the real-image statistics are kept.
"""
from __future__ import annotations

import hashlib
import io
import json

import numpy as np
from PIL import Image

from pipeline.core import layout, storage
from pipeline.core.images import decode_image, preprocess, to_uint8
from pipeline.core.layout import Layout
from pipeline.core.plan import EvalConfig, GenerateConfig
from pipeline.core.progress import Reporter, Sink
from pipeline.data.coco_captions import select_captions
from pipeline.data.shapes import BACKGROUNDS, COLOURS, SHAPES, ShapeSpec
from pipeline.evaluate.metrics import (build_fid, caption_match, load_clip_score, load_real_state, save_real_state,
                                   update_clip, update_fid)
from pipeline.evaluate.geneval.step import run_geneval
from pipeline.export.loading import resolve_device
from pipeline.generate import Generator, encode_png, image_name, make_grid

COCO_CAPTIONS = "annotations/captions_val2014.json"
COCO_IMAGES = "val2014"


def demo_prompts() -> list[str]:
    """Every colour x shape, large and centred, backgrounds in turn: 18 in-distribution synthetic captions."""
    bgs = list(BACKGROUNDS)
    specs = [(c, s) for c in COLOURS for s in SHAPES]
    return [ShapeSpec(c, s, bgs[i % len(bgs)], "center", "large").caption for i, (c, s) in enumerate(specs)]


def coco_eval_set(coco: str, num: int, seed: int) -> list[dict]:
    """[{image_id, file, caption}] of the protocol's COCO selection (pipeline/data/coco_captions.py)."""
    rows = select_captions(storage.join(coco, COCO_CAPTIONS), num, seed)
    return [{"image_id": r["image_id"], "file": storage.join(coco, COCO_IMAGES, r["file_name"]),
             "caption": r["caption"]} for r in rows]


def _real_batches(rows: list[dict], resolution: int, batch: int):

    for i in range(0, len(rows), batch):
        out = []
        for r in rows[i:i + batch]:
            d = decode_image(storage.read_bytes(r["file"]))
            if d.image is None:
                raise ValueError(f"COCO image {r['file']!r} could not be decoded ({d.reason.value})")
            out.append(to_uint8(preprocess(d.image, resolution)))  # (R, R, 3)
        yield np.stack(out)


def _key(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def sample_to_folder(gen: Generator, prompts: list[str], folder: str, reporter: Reporter | None = None,
                     before: int = 0) -> list[str]:
    """PNG per prompt (seed base + i) under folder; images already there are kept (resume).

    reporter: told the images done, counting `before` images of earlier parts of the step."""
    have = set(storage.list_files(folder, ".png"))
    files = [storage.join(folder, image_name(i, gen.cfg.seed + i)) for i in range(len(prompts))]
    todo = [i for i, f in enumerate(files) if f not in have and not storage.exists(f)]
    for k in range(0, len(todo), gen.cfg.batch_size):
        idx = todo[k:k + gen.cfg.batch_size]
        # Seeds are per image, so a batch of leftovers after a resume samples the same pictures.
        images = gen.sample([prompts[i] for i in idx], seeds=[gen.cfg.seed + i for i in idx])
        for i, image in zip(idx, images, strict=True):
            storage.write_bytes(files[i], gen.sample_png(image, prompts[i], i))
        if reporter is not None:
            reporter.update(before + len(files) - len(todo) + k + len(idx))
    return files


def _read_png(uri: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(storage.read_bytes(uri))).convert("RGB"))


def _batches(files: list[str], size: int):
    for i in range(0, len(files), size):
        yield np.stack([_read_png(f) for f in files[i:i + size]])


def evaluate(weights_uri: str, root_uri: str, cfg: EvalConfig | None = None, vae_spec: str | None = None,
             text_spec: str | None = None, progress: Sink | None = None, step: str = "evaluate") -> dict:
    """Measure the weights by the protocol; writes {root}/eval/metrics.json (+ its marker). Idempotent.

    progress: where records of images sampled (demo, then COCO) and, at the end, the metrics go, as `step`."""
    cfg = cfg or EvalConfig()
    paths = Layout(root_uri)
    eval_uri, metrics_uri = paths.eval, paths.metrics
    request = {"weights": str(weights_uri), "config": cfg.model_dump(mode="json"), "vae": vae_spec,
               "text": text_spec}
    marker = layout.read_marker(eval_uri)
    if marker is not None and json.loads(marker or b"null") == request and storage.exists(metrics_uri):
        return storage.read_json(metrics_uri)

    metrics: dict = {"protocol": cfg.model_dump(mode="json"), "weights": str(weights_uri)}
    gcfg = GenerateConfig(steps=cfg.steps, guidance=cfg.guidance, seed=cfg.seed, batch_size=cfg.batch_size,
                          use_ema=cfg.use_ema, device=cfg.device, grid=False)
    n_demo = len(cfg.demo_prompts or demo_prompts()) * cfg.demo_seeds if cfg.demo else 0
    coco = bool(cfg.coco and (cfg.fid or cfg.clip))
    reporter = Reporter(step, "images", progress, total=n_demo + (cfg.num_images if coco else 0))
    reporter.update(0)
    if cfg.demo:
        metrics["demo"] = _demo(weights_uri, eval_uri, cfg, gcfg, vae_spec, text_spec, reporter)
    if coco:
        metrics.update(_coco(weights_uri, eval_uri, cfg, gcfg.model_copy(update={"resolution": cfg.resolution}),
                             vae_spec, text_spec, reporter, n_demo))
    elif cfg.fid or cfg.clip:
        metrics["skipped"] = {"fid_clip": "no COCO-2014 root given (evaluate.coco)"}
    if cfg.geneval.enabled:
        metrics["geneval"] = run_geneval(weights_uri, storage.join(eval_uri, "geneval"), cfg.geneval, cfg.use_ema,
                                         cfg.device, progress)
    storage.write_json(metrics_uri, metrics)
    layout.mark_complete(eval_uri, json.dumps(request))  # last: metrics.json is complete for this request
    figures = {k: round(metrics[k], 3) for k in ("fid", "clip_score") if k in metrics}
    if "caption_match" in metrics.get("demo", {}):
        figures["caption match"] = f"{metrics['demo']['caption_match']:.1%}"
    if metrics.get("geneval", {}).get("overall") is not None:
        figures["geneval"] = round(metrics["geneval"]["overall"], 3)
    reporter.finish(reporter.last.done if reporter.last else 0, **figures)
    return metrics


def _demo(weights_uri, eval_uri, cfg: EvalConfig, gcfg: GenerateConfig, vae_spec, text_spec,
          reporter: Reporter | None = None) -> dict:
    prompts = [p for p in (cfg.demo_prompts or demo_prompts()) for _ in range(cfg.demo_seeds)]
    gen = Generator(weights_uri, gcfg.model_copy(update={"resolution": cfg.demo_resolution}), vae_spec, text_spec)
    folder = storage.join(eval_uri, "demo", _key({"prompts": prompts, "w": gen.weights_sha256,
                                                   "g": gcfg.model_dump(mode="json"),
                                                   "r": gen.resolution}))
    files = sample_to_folder(gen, prompts, folder, reporter)
    images = [_read_png(f) for f in files]
    result = caption_match(images, prompts)
    grid_uri = storage.join(eval_uri, "demo_grid.png")
    storage.write_bytes(grid_uri, encode_png(np.asarray(make_grid(images, prompts))))
    return {**result, "samples": folder, "grid": grid_uri, "resolution": gen.resolution}


def _coco(weights_uri, eval_uri, cfg: EvalConfig, gcfg: GenerateConfig, vae_spec, text_spec,
          reporter: Reporter | None = None, before: int = 0) -> dict:
    rows = coco_eval_set(cfg.coco, cfg.num_images, cfg.seed)
    prompts = [r["caption"] for r in rows]
    gen = Generator(weights_uri, gcfg, vae_spec, text_spec)
    folder = storage.join(eval_uri, "samples", _key({"rows": _key(rows), "w": gen.weights_sha256,
                                                     "g": gcfg.model_dump(mode="json")}))
    files = sample_to_folder(gen, prompts, folder, reporter, before)
    del gen  # free the generator before the metric networks load
    device, out = resolve_device(cfg.device), {"num_images": len(rows), "samples": folder}
    if cfg.fid:
        fid = build_fid(cfg.fid_features, cfg.inception_weights, cfg.fid_antialias, device)
        real_key = _key([_key(rows), cfg.resolution, cfg.fid_antialias, cfg.fid_features, cfg.inception_weights])
        real_uri = storage.join(eval_uri, f"fid_real_{real_key}.safetensors")
        if storage.exists(real_uri):
            load_real_state(fid, real_uri)
        else:
            for batch in _real_batches(rows, cfg.resolution, cfg.batch_size):
                update_fid(fid, batch, real=True)
            save_real_state(fid, real_uri)
        for batch in _batches(files, cfg.batch_size):
            update_fid(fid, batch, real=False)
        out["fid"] = float(fid.compute())
        out["fid_real_stats"] = real_uri
    if cfg.clip:
        clip = load_clip_score(cfg.clip_model, cfg.clip_pretrained, device)
        for i, batch in enumerate(_batches(files, cfg.batch_size)):
            update_clip(clip, batch, prompts[i * cfg.batch_size:(i + 1) * cfg.batch_size])
        out["clip_score"] = float(clip.compute())
    return out
