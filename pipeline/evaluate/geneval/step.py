"""GenEval as a resumable evaluation step: draw every prompt's images, detect, check colours, give verdicts, score.

Layout under `{out}/{key}/` (`key`: the weights' hash and every drawing setting, so other weights never reuse these
images), in GenEval's own image layout, so its official evaluator can run on the same pictures:

    images/{index:05d}/metadata.jsonl       the prompt's metadata row
    images/{index:05d}/samples/{j:05d}.png  image j, seed `seed + j`
    results/{index:05d}.jsonl               one row per image: tag, prompt, correct, reason, kept detections
    results.jsonl                           every prompt's rows, in prompt order
    summary.json                            per-tag and overall scores (written last: the step is done)

Each image and each prompt's results file is written atomically; a rerun draws only the images that are missing
and detects only the prompts without results, so a killed step loses nothing and duplicates nothing.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging

from PIL import Image

from model import family as families
from pipeline.core import storage
from pipeline.core.plan import GenerateConfig, GenEvalConfig
from pipeline.core.progress import Reporter, Sink
from pipeline.evaluate.geneval.colour import ColourClassifier
from pipeline.evaluate.geneval.detector import Detector
from pipeline.evaluate.geneval.prompts import METADATA, Prompt, object_names, read_prompts, subset
from pipeline.evaluate.geneval.rules import keep, verdict
from pipeline.evaluate.geneval.scores import summarize
from pipeline.export.export_folder import locate, read_export_config
from pipeline.export.loading import is_diffusers_folder, resolve_device
from pipeline.generate import Generator, encode_png

log = logging.getLogger(__name__)


def image_uri(folder: str, prompt: Prompt, j: int) -> str:
    return storage.join(folder, "images", f"{prompt.index:05d}", "samples", f"{j:05d}.png")


def _key(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _generate_config(cfg: GenEvalConfig, use_ema: bool, device: str) -> GenerateConfig:
    return GenerateConfig(steps=cfg.steps, guidance=cfg.guidance, seed=cfg.seed, batch_size=cfg.draw_batch_size,
                          resolution=cfg.resolution, use_ema=use_ema, device=device, grid=False)


def draw(gen: Generator, prompts: list[Prompt], folder: str, cfg: GenEvalConfig, reporter: Reporter) -> int:
    """Every missing image of every prompt; returns how many were drawn."""
    todo = [(p, j) for p in prompts for j in range(cfg.images_per_prompt)
            if not storage.exists(image_uri(folder, p, j))]
    done = len(prompts) * cfg.images_per_prompt - len(todo)
    for p in prompts:
        meta = storage.join(folder, "images", f"{p.index:05d}", "metadata.jsonl")
        if not storage.exists(meta):
            storage.write_bytes(meta, json.dumps(p.metadata).encode() + b"\n")
    for i in range(0, len(todo), cfg.draw_batch_size):
        batch = todo[i:i + cfg.draw_batch_size]
        images = gen.sample([p.text for p, _ in batch], seeds=[cfg.seed + j for _, j in batch])
        for (p, j), image in zip(batch, images):
            storage.write_bytes(image_uri(folder, p, j), encode_png(image, {"prompt": p.text, "seed": str(cfg.seed + j),
                                                                             **gen.provenance()}))
        done += len(batch)
        reporter.update(done)
    return len(todo)


def _read_image(uri: str) -> Image.Image:
    return Image.open(io.BytesIO(storage.read_bytes(uri))).convert("RGB")


def score_prompt(prompt: Prompt, folder: str, cfg: GenEvalConfig, detector: Detector,
                 colour: ColourClassifier) -> list[dict]:
    """The result rows of one prompt's images (module docstring)."""
    uris = [image_uri(folder, prompt, j) for j in range(cfg.images_per_prompt)]
    rows = []
    for i in range(0, len(uris), cfg.detect_batch_size):
        images = [_read_image(u) for u in uris[i:i + cfg.detect_batch_size]]
        for uri, image, found in zip(uris[i:], images, detector.detect(images)):
            kept = keep(found, prompt.tag)
            correct, reason = verdict(image, kept, prompt.metadata, colour)
            rows.append({"image": uri, "index": prompt.index, "tag": prompt.tag, "prompt": prompt.text,
                         "correct": correct, "reason": reason,
                         "detections": {name: [[*d.box, d.score] for d in ds] for name, ds in kept.items()}})
    return rows


def run_geneval(weights_uri: str, out_uri: str, cfg: GenEvalConfig, use_ema: bool = True, device: str = "auto",
                progress: Sink | None = None, step: str = "geneval") -> dict:
    """GenEval of the weights under `out_uri` (module docstring); returns the summary. Idempotent and resumable."""
    prompts = subset(read_prompts(cfg.metadata or METADATA), cfg.per_tag, cfg.prompts)
    names = object_names()
    gcfg = _generate_config(cfg, use_ema, device)
    folder = storage.join(out_uri, _key({"weights": storage.sha256(_weights_file(weights_uri, use_ema)),
                                         "generate": gcfg.model_dump(mode="json"), "n": cfg.images_per_prompt}))
    request = {"weights": str(weights_uri), "config": cfg.model_dump(mode="json"), "folder": folder}
    summary_uri = storage.join(folder, "summary.json")
    if storage.exists(summary_uri) and storage.read_json(summary_uri).get("request") == request:
        return storage.read_json(summary_uri)

    reporter = Reporter(step, "images", progress, total=len(prompts) * cfg.images_per_prompt)
    reporter.update(0)
    missing = [(p, j) for p in prompts for j in range(cfg.images_per_prompt)
               if not storage.exists(image_uri(folder, p, j))]
    if missing:
        gen = Generator(weights_uri, gcfg)
        log.info("geneval: drawing %d missing images of %d", draw(gen, prompts, folder, cfg, reporter),
                 len(prompts) * cfg.images_per_prompt)
        del gen  # free the generator before the detector loads
    dev = resolve_device(device)
    detector = colour = None
    rows = []
    for p in prompts:
        uri = storage.join(folder, "results", f"{p.index:05d}.jsonl")
        if not storage.exists(uri):
            if detector is None:
                detector = Detector(cfg.detector, names, dev)
                colour = ColourClassifier(cfg.colour_model, dev, batch_size=cfg.colour_batch_size)
            lines = [json.dumps(r) for r in score_prompt(p, folder, cfg, detector, colour)]
            storage.write_bytes(uri, ("\n".join(lines) + "\n").encode())
        rows += [json.loads(line) for line in storage.read_bytes(uri).decode().splitlines() if line.strip()]
    storage.write_bytes(storage.join(folder, "results.jsonl"), "".join(json.dumps(r) + "\n" for r in rows).encode())
    complete = cfg.per_tag is None and cfg.prompts is None  # every prompt of the metadata: the protocol's score
    summary = {**summarize(rows), "prompts": len(prompts), "complete": complete, "folder": folder,
               "family": family_of(weights_uri),
               "request": request, "detector": cfg.detector, "colour_model": cfg.colour_model}
    storage.write_json(summary_uri, summary)
    reporter.finish(len(rows), geneval=round(summary["overall"], 3) if summary["overall"] is not None else None)
    return summary


def _weights_file(weights_uri: str, use_ema: bool) -> str:
    if is_diffusers_folder(weights_uri):
        return storage.join(str(weights_uri).rstrip("/"), "transformer", "diffusion_pytorch_model.safetensors")
    return locate(weights_uri, use_ema)[1]


def family_of(weights_uri: str) -> str | None:
    """The model family of an export (its config) or of a diffusers folder (its pipeline class)."""
    uri = str(weights_uri).rstrip("/")
    if is_diffusers_folder(uri):
        pipeline = storage.read_json(storage.join(uri, "model_index.json"))["_class_name"]
        pipeline = pipeline[1] if isinstance(pipeline, list) else pipeline
        return next((name for name in families.REGISTRY
                     if families.get(name).drawing.pipeline.split(":")[1] == pipeline), None)
    return read_export_config(storage.join(locate(uri, True)[0], "config.json")).get("family")
