"""Text-to-image generation from a stage's exported weights: per-image PNGs with their provenance, and a grid.

Drawing goes through the family's diffusers pipeline (model/pipelines/), built from the export alone
(pipeline/export/loading.py): the network, the scheduler its objective implies, the encoders it records, its
sampler defaults and text mode. Each image i of a prompt list gets its own noise seed `seed + i` (a CPU generator
per image), so images do not depend on the batch size or the device. The network runs in bf16 on GPU and fp32 on
CPU.
"""
from __future__ import annotations

import io
import json
import math
import textwrap
from typing import Iterator, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from PIL.PngImagePlugin import PngInfo

from pipeline.core import storage
from pipeline.core.plan import GenerateConfig
from pipeline.core.progress import Reporter, Sink
from pipeline.export.export_folder import Export, open_export
from pipeline.export.loading import is_diffusers_folder, load_diffusers_folder, load_pipeline

MANIFEST = "generate.json"  # written last: its presence (with matching inputs) means the output is complete
# How close the export's stored empty-prompt states must be to what its text encoder gives now (fp16 storage).
UNCONDITIONAL_ATOL = 2e-2


# ------------------------------------------------------------------------------------------ loading

def read_prompts(prompts: str | Sequence[str]) -> list[str]:
    """Prompts from a list, or from a text file URI (one per line, blank lines skipped); none -> ValueError."""
    if isinstance(prompts, str):
        text = storage.read_bytes(prompts).decode("utf-8")  # FileNotFoundError names the URI
        out = [line.strip() for line in text.splitlines() if line.strip()]
        if not out:
            raise ValueError(f"prompt file {prompts!r} holds no prompts; expected one prompt per line")
        return out
    out = [str(p) for p in prompts]
    if not out:
        raise ValueError("no prompts given; expected a non-empty list of prompts or a prompt file")
    return out


def check_unconditional(export: Export, pipe) -> str:
    """The unconditional caption guidance will use, checked against the export: the empty prompt's states as the
    pipeline's text encoder computes them must match the ones training stored (`unconditional`), else the text
    encoder or its mode is not the one the model trained with. -> where the unconditional caption comes from."""
    from safetensors.numpy import load

    name = export.config.get("unconditional")
    if not getattr(pipe, "text_encoder", None) or not hasattr(pipe.config, "text_mode"):
        return "zeros"
    source = f"the empty prompt ({pipe.config.text_mode} text mode)"
    if not name:
        return source
    uri = storage.join(export.folder, name)
    if not storage.exists(uri):
        raise FileNotFoundError(f"{export.folder!r} names the unconditional caption {name!r}, but {uri!r} does not "
                                "exist")
    stored = torch.from_numpy(load(storage.read_bytes(uri))["unconditional"]).float()
    now = pipe.encode_prompt([""])[0].cpu()
    if tuple(stored.shape) != tuple(now.shape) or not torch.allclose(stored, now, atol=UNCONDITIONAL_ATOL):
        diff = "shape " + str(tuple(stored.shape)) if tuple(stored.shape) != tuple(now.shape) \
            else f"max difference {float((stored - now).abs().max()):.3g}"
        raise ValueError(f"{uri!r}: the unconditional caption the model trained with differs from the empty prompt "
                         f"as its text encoder now computes it in {pipe.config.text_mode!r} mode ({diff}); the text "
                         "encoder or its text mode is not the one the model was trained with")
    return source


def to_uint8(images: np.ndarray) -> np.ndarray:
    """(N, H, W, 3) floats in [0, 1] -> uint8."""
    return (np.clip(images, 0.0, 1.0) * 255.0).round().astype(np.uint8)


class Generator:
    """An export's pipeline (or a diffusers folder's) turning prompts into uint8 images, seed = base seed + index."""

    def __init__(self, weights_uri: str, cfg: GenerateConfig, vae_spec: str | None = None,
                 text_spec: str | None = None):
        self.cfg = cfg
        if is_diffusers_folder(weights_uri):  # `microdit export-diffusers` output, or one from the Hub
            self._from_folder(str(weights_uri).rstrip("/"), cfg)
        else:
            self._from_export(weights_uri, cfg, vae_spec, text_spec)
        self.pipe.set_progress_bar_config(disable=True)
        self.steps = cfg.steps if cfg.steps is not None else self.pipe.config.num_inference_steps
        self.guidance = cfg.guidance if cfg.guidance is not None else self.pipe.config.guidance_scale
        self.resolution = self.pipe.transformer.cfg.input_size * self.pipe.vae_scale_factor
        self.dtype = next(self.pipe.transformer.parameters()).dtype
        self.weights_sha256 = storage.sha256(self.weights_uri)

    def _from_export(self, uri: str, cfg: GenerateConfig, vae_spec: str | None, text_spec: str | None) -> None:
        export = open_export(uri, cfg.use_ema)
        self.weights_uri, self.step = export.weights, export.step
        self.pipe = load_pipeline(export, cfg.device, cfg.dtype, cfg.resolution, vae_spec, text_spec)
        self.family, self.objective = export.family.name, json.dumps(export.config["objective"], sort_keys=True)
        self.vae_spec = vae_spec or export.encoders.get("vae")
        self.text_spec = text_spec or export.encoders.get("text")
        self.unconditional_source = check_unconditional(export, self.pipe)

    def _from_folder(self, folder: str, cfg: GenerateConfig) -> None:
        if cfg.resolution is not None:
            raise ValueError(f"{folder!r} is a diffusers folder: it draws at its network's own resolution "
                             f"(resolution={cfg.resolution} given)")
        self.pipe = load_diffusers_folder(folder, cfg.device, cfg.dtype)
        self.weights_uri = storage.join(folder, "transformer", "diffusion_pytorch_model.safetensors")
        self.step, self.family = None, type(self.pipe).__name__
        self.objective = json.dumps(dict(self.pipe.scheduler.config), sort_keys=True, default=str)
        self.vae_spec = self.text_spec = folder
        self.unconditional_source = "the pipeline's own"

    def seeds(self, start: int, n: int) -> list[int]:
        return [self.cfg.seed + start + i for i in range(n)]

    def sample(self, prompts: Sequence[str], start: int = 0, seeds: Sequence[int] | None = None) -> np.ndarray:
        """(N, H, W, 3) uint8 images for prompts[i] with seed base + start + i, or seeds[i] (one batch)."""
        seeds = list(seeds) if seeds is not None else self.seeds(start, len(prompts))
        if len(seeds) != len(prompts):
            raise ValueError(f"{len(seeds)} seeds for {len(prompts)} prompts")
        generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
        images = self.pipe(list(prompts), num_inference_steps=self.steps, guidance_scale=self.guidance,
                           generator=generators, output_type="np").images
        return to_uint8(images)

    def batches(self, prompts: Sequence[str], start: int = 0) -> Iterator[tuple[int, np.ndarray]]:
        """(index of the first image, images) per batch of cfg.batch_size."""
        for i in range(0, len(prompts), self.cfg.batch_size):
            yield start + i, self.sample(prompts[i:i + self.cfg.batch_size], start + i)

    def sample_png(self, image: np.ndarray, prompt: str, index: int) -> bytes:
        """PNG bytes of image `index` (seed base + index) with its prompt, seed and provenance as text chunks."""
        return encode_png(image, {"prompt": prompt, "seed": str(self.cfg.seed + index), "index": str(index),
                                  **self.provenance()})

    def provenance(self) -> dict[str, str]:
        return {"steps": str(self.steps), "guidance": str(self.guidance), "weights": self.weights_uri,
                "weights_sha256": self.weights_sha256, "use_ema": str(self.cfg.use_ema),
                "resolution": str(self.resolution), "dtype": str(self.dtype).replace("torch.", ""),
                "vae": self.vae_spec, "text_encoder": self.text_spec, "family": self.family,
                "pipeline": type(self.pipe).__name__, "scheduler": type(self.pipe.scheduler).__name__,
                "unconditional": self.unconditional_source, "objective": self.objective}


# ------------------------------------------------------------------------------------------ output

def encode_png(image: np.ndarray, text: dict[str, str] | None = None) -> bytes:
    """PNG bytes of an (H, W, 3) uint8 array with `text` as tEXt/iTXt chunks."""
    info = PngInfo()
    for key, value in (text or {}).items():
        info.add_itxt(key, str(value))  # iTXt: UTF-8, so any prompt survives
    buf = io.BytesIO()
    Image.fromarray(image, "RGB").save(buf, "PNG", pnginfo=info)
    return buf.getvalue()


def make_grid(images: Sequence[np.ndarray], captions: Sequence[str] | None = None, cols: int | None = None,
              pad: int = 2) -> Image.Image:
    """A grid of equally sized (H, W, 3) images, optionally with wrapped captions under each cell."""
    if not len(images):
        raise ValueError("make_grid needs at least one image")
    h, w = images[0].shape[:2]
    n = len(images)
    cols = cols or math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    font = ImageFont.load_default()
    chars = max(8, w // 6)  # the default bitmap font is about 6 px a character
    lines = [textwrap.wrap(c, chars)[:6] for c in captions] if captions else None
    text_h = 11 * max((len(l) for l in lines), default=0) + 4 if lines else 0
    grid = Image.new("RGB", (cols * (w + pad) + pad, rows * (h + text_h + pad) + pad), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for i, im in enumerate(images):
        x, y = pad + (i % cols) * (w + pad), pad + (i // cols) * (h + text_h + pad)
        grid.paste(Image.fromarray(im, "RGB"), (x, y))
        if lines:
            draw.multiline_text((x + 1, y + h + 2), "\n".join(lines[i]), fill=(0, 0, 0), font=font, spacing=1)
    return grid


def image_name(index: int, seed: int) -> str:
    return f"{index:05d}_seed{seed}.png"


def _request(weights_uri: str, prompts: list[str], cfg: GenerateConfig, vae_spec, text_spec) -> dict:
    return {"weights": str(weights_uri), "prompts": prompts, "config": cfg.model_dump(mode="json"),
            "vae": vae_spec, "text": text_spec}


def generate(weights_uri: str, prompts: str | Sequence[str], out_uri: str, cfg: GenerateConfig | None = None,
             vae_spec: str | None = None, text_spec: str | None = None, progress: Sink | None = None,
             step: str = "sample") -> list[str]:
    """Sample one PNG per prompt (+ grid.png) under out_uri; returns the written file URIs. Idempotent.

    progress: where records of images done (of the prompts) go while it runs, as `step`."""
    cfg = cfg or GenerateConfig()
    prompts = read_prompts(prompts)
    request = _request(weights_uri, prompts, cfg, vae_spec, text_spec)
    manifest_uri = storage.join(out_uri, MANIFEST)
    if storage.exists(manifest_uri):
        done = storage.read_json(manifest_uri)
        if done.get("request") == request and all(storage.exists(u) for u in done["files"]):
            return list(done["files"])

    gen = Generator(weights_uri, cfg, vae_spec, text_spec)
    reporter = Reporter(step, "images", progress, total=len(prompts))
    reporter.update(0)  # the clock starts: the model is loaded
    files, images = [], []
    for start, batch in gen.batches(prompts):
        for j, image in enumerate(batch):
            i = start + j
            uri = storage.join(out_uri, image_name(i, cfg.seed + i))
            storage.write_bytes(uri, gen.sample_png(image, prompts[i], i))
            files.append(uri)
            if cfg.grid:
                images.append(image)
        reporter.update(len(files))
    if cfg.grid:
        grid = make_grid(images, prompts if cfg.grid_captions else None)
        uri = storage.join(out_uri, "grid.png")
        storage.write_bytes(uri, encode_png(np.asarray(grid), {"prompts": json.dumps(prompts),
                                                               "seed": str(cfg.seed), **gen.provenance()}))
        files.append(uri)
    storage.write_json(manifest_uri, {"request": request, "files": files, "provenance": gen.provenance(),
                                      "seeds": gen.seeds(0, len(prompts)), "step": gen.step})
    reporter.finish(len(prompts))
    return files
