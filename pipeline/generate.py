"""Text-to-image generation from a stage's exported weights: per-image PNGs with their provenance, and a grid.

Weights come from `{root}/train/{stage}/export/` (model.safetensors or ema.safetensors beside config.json).
Each image i of a prompt list gets its own noise seed `seed + i`, so images do not depend on the batch size.
The export's config.json names the family, the objective (with its constants, e.g. EDM's sigma_data), the
encoders and the sampler defaults; sampling uses exactly those (for MicroDiT: EDM Heun with classifier-free
guidance, cond and uncond in one batched forward, the ODE state in float64). The network runs in bf16 on GPU
and fp32 on CPU.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import math
import textwrap
from typing import Iterator, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from PIL.PngImagePlugin import PngInfo

from model import family as families
from model.encoders import load_text_encoder, load_vae, unconditional_caption
from model.family import DEFAULT as DEFAULT_FAMILY
from model.objectives.configs import config_from_dict as objective_config
from model.objectives.objective import build as build_objective
from model.samplers.heun import make_noise
from pipeline.core import storage
from pipeline.core.plan import GenerateConfig
from pipeline.core.progress import Reporter, Sink

WEIGHTS = {False: "model.safetensors", True: "ema.safetensors"}
CONFIG_NAME = "config.json"
MANIFEST = "generate.json"  # written last: its presence (with matching inputs) means the output is complete
# Prefixes that wrappers add to state_dict keys (torch.compile, DDP); the tensors themselves are the same.
WRAPPER_PREFIXES = ("_orig_mod.", "module.")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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


# Exports written before the family interface recorded neither family nor objective: they are MicroDiT + EDM.
LEGACY_EXPORT = {"family": DEFAULT_FAMILY, "objective": {"kind": "edm"}}  # EDM's own constants (configs.py)


def read_export(config_uri: str) -> dict:
    """An export's config.json: family, model, objective, encoders, sampler (ValueError if it is not one)."""
    export = storage.read_json(config_uri)
    if not isinstance(export, dict) or "model" not in export:
        raise ValueError(f"{config_uri!r} has no 'model' section; expected an export config "
                         "{'family', 'model', 'objective', 'encoders', 'sampler', ...}")
    if "family" not in export:
        export = {**LEGACY_EXPORT, **export}
    return export


def resolve_weights(weights_uri: str, use_ema: bool) -> tuple[str, str]:
    """(safetensors URI, config.json URI): `weights_uri` is an export folder or a .safetensors file in one."""
    uri = str(weights_uri).rstrip("/")
    if uri.endswith(".safetensors"):
        weights = uri
        folder = uri.rsplit("/", 1)[0] if "/" in uri else "."
    else:
        folder = uri
        weights = storage.join(folder, WEIGHTS[use_ema])
    config = storage.join(folder, CONFIG_NAME)
    if not storage.exists(weights):
        raise FileNotFoundError(f"weights {weights!r} do not exist; expected an export folder holding "
                                f"{WEIGHTS[use_ema]} (use_ema={use_ema}) or a .safetensors file")
    if not storage.exists(config):
        raise FileNotFoundError(f"model config {config!r} does not exist; expected it beside the weights")
    return weights, config


def _strip_wrappers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        for prefix in WRAPPER_PREFIXES:
            while key.startswith(prefix):
                key = key[len(prefix):]
        out[key] = value
    return out


def load_state(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Strict load; missing, unexpected or mis-shaped keys -> ValueError naming them and `source`.

    Persistent buffers missing from `state` keep the built model's values: they are deterministic tables
    (E-MMDiT's sin-cos positions) that an EMA export does not hold."""
    expected = model.state_dict()
    params = {n for n, _ in model.named_parameters()}
    state = {**{k: v for k, v in expected.items() if k not in params and k not in state}, **state}
    missing = sorted(expected.keys() - state.keys())
    unexpected = sorted(state.keys() - expected.keys())
    shapes = sorted(f"{k}: weights {tuple(state[k].shape)} vs config {tuple(expected[k].shape)}"
                    for k in expected.keys() & state.keys() if state[k].shape != expected[k].shape)
    if missing or unexpected or shapes:
        def few(items):
            return f"{items[:8]}{' ...' if len(items) > 8 else ''} ({len(items)})"
        raise ValueError(f"weights {source!r} do not match the model config beside them: "
                         f"missing keys {few(missing)}, unexpected keys {few(unexpected)}, "
                         f"shape mismatches {few(shapes)}")
    model.load_state_dict(state, strict=True)


def resolve_device(device: str) -> torch.device:
    """"auto" -> cuda when available, else cpu; any other name as given."""
    return torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)


def _device_dtype(cfg: GenerateConfig) -> tuple[torch.device, torch.dtype]:
    device = resolve_device(cfg.device)
    if cfg.dtype == "auto":
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    else:
        dtype = DTYPES[cfg.dtype]
    return device, dtype


def to_uint8(pixels: torch.Tensor) -> np.ndarray:
    """(N, 3, H, W) in [-1, 1] -> (N, H, W, 3) uint8."""
    x = ((pixels.float().clamp(-1, 1) + 1) * 127.5).round().clamp(0, 255)
    return x.to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


class Generator:
    """A loaded network + VAE + text encoder that turns prompts into uint8 images, seed = base seed + index."""

    def __init__(self, weights_uri: str, cfg: GenerateConfig, vae_spec: str | None = None,
                 text_spec: str | None = None):
        from safetensors.torch import load as load_safetensors

        self.cfg = cfg
        self.weights_uri, config_uri = resolve_weights(weights_uri, cfg.use_ema)
        export = read_export(config_uri)
        self.family = families.get(export["family"])
        self.objective_spec = export["objective"]
        self.objective = build_objective(objective_config(export["objective"]))
        sampler = export.get("sampler") or dataclasses.asdict(self.family.sampler)
        self.steps = cfg.steps if cfg.steps is not None else sampler["steps"]
        self.guidance = cfg.guidance if cfg.guidance is not None else sampler["guidance"]
        encoders = export.get("encoders") or {}
        self.vae_spec = vae_spec or encoders.get("vae")
        self.text_spec = text_spec or encoders.get("text")
        for name, spec in (("vae_spec", self.vae_spec), ("text_spec", self.text_spec)):
            if not spec:
                raise ValueError(f"{name} not given and {config_uri!r} records no encoders; pass it explicitly")
        self.device, self.dtype = _device_dtype(cfg)
        try:
            model_cfg = self.family.config_from_dict(export["model"])
        except (TypeError, ValueError) as e:
            raise ValueError(f"{config_uri}: model: {e}") from None
        # Encoders in bf16 on GPU (the SDXL VAE overflows in fp16), fp32 on CPU.
        enc_dtype = torch.float32 if self.dtype == torch.float32 else torch.bfloat16
        self.vae = load_vae(self.vae_spec, device=self.device, dtype=enc_dtype)
        self.text = load_text_encoder(self.text_spec, device=self.device, dtype=enc_dtype,
                                      tokens=model_cfg.caption_len)
        self.unconditional_source = self._bind_unconditional(export, config_uri)
        if model_cfg.caption_dim != self.text.width:
            raise ValueError(f"text encoder {self.text_spec!r} has width {self.text.width} but the model expects "
                             f"caption_dim={model_cfg.caption_dim}")
        if model_cfg.in_channels != self.vae.latent_channels:
            raise ValueError(f"VAE {self.vae_spec!r} has {self.vae.latent_channels} latent channels but the model "
                             f"expects in_channels={model_cfg.in_channels}")
        f = self.vae.downsample
        self.resolution = cfg.resolution or model_cfg.input_size * f
        if self.resolution % (f * model_cfg.patch_size):
            raise ValueError(f"resolution={self.resolution} is not a multiple of VAE downsample {f} x patch "
                             f"{model_cfg.patch_size}")
        latent = self.resolution // f
        if latent != model_cfg.input_size:
            # Positions are a rebuilt buffer: other sizes load strictly; interpolation scales with the grid.
            scale = {f.name for f in dataclasses.fields(model_cfg)} & {"pos_interp_scale"}
            model_cfg = dataclasses.replace(  # families without the field derive their scale from input_size
                model_cfg, input_size=latent,
                **{k: model_cfg.pos_interp_scale * latent / model_cfg.input_size for k in scale})
        self.model_cfg = model_cfg

        raw = storage.read_bytes(self.weights_uri)
        self.weights_sha256 = hashlib.sha256(raw).hexdigest()
        try:
            state = load_safetensors(raw)
        except Exception as e:  # safetensors raises its own error type for a damaged or foreign file
            raise ValueError(f"weights {self.weights_uri!r} are not a readable safetensors file: {e}") from e
        model = self.family.build(model_cfg)
        load_state(model, _strip_wrappers(state), self.weights_uri)
        # fp32 weights; bf16 compute via autocast as in training (LayerNorm and softmax stay fp32).
        self.model = model.to(device=self.device).eval().requires_grad_(False)
        self.step = export.get("step")

    def _bind_unconditional(self, export: dict, config_uri: str) -> str:
        """Give the objective its unconditional caption: the export's stored one (the empty prompt's embedding
        the network trained with), else the text encoder's own (zeros for open_clip towers). -> where it came from."""
        from safetensors.numpy import load

        name = export.get("unconditional")
        if name:
            uri = storage.join(config_uri.rsplit("/", 1)[0] if "/" in config_uri else ".", name)
            if not storage.exists(uri):
                raise FileNotFoundError(f"{config_uri!r} names the unconditional caption {name!r}, but {uri!r} "
                                        "does not exist")
            uncond = torch.from_numpy(load(storage.read_bytes(uri))["unconditional"])
            if tuple(uncond.shape) != (self.text.context_length, self.text.width):
                raise ValueError(f"{uri!r} holds a {tuple(uncond.shape)} unconditional caption; the text encoder "
                                 f"{self.text_spec!r} gives ({self.text.context_length}, {self.text.width})")
            self.objective = self.objective.bind(unconditional=uncond)
            return uri
        if self.objective.kind != "edm":
            self.objective = self.objective.bind(unconditional=unconditional_caption(self.text))
            return "text encoder"
        return "zeros"

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        s = self.resolution // self.vae.downsample
        return (self.model_cfg.in_channels, s, s)

    def seeds(self, start: int, n: int) -> list[int]:
        return [self.cfg.seed + start + i for i in range(n)]

    @torch.no_grad()
    def sample(self, prompts: Sequence[str], start: int = 0, seeds: Sequence[int] | None = None) -> np.ndarray:
        """(N, H, W, 3) uint8 images for prompts[i] with seed base + start + i, or seeds[i] (one batch)."""
        seeds = list(seeds) if seeds is not None else self.seeds(start, len(prompts))
        if len(seeds) != len(prompts):
            raise ValueError(f"{len(seeds)} seeds for {len(prompts)} prompts")
        # Noise per image on the CPU generator: the same picture whatever the batch or device.
        noise = torch.cat([make_noise((1, *self.latent_shape), s) for s in seeds])  # (N, C, h, w)
        caption = self.text.encode(list(prompts)).to(self.device, torch.float32)  # (N, 77, width)
        # guidance 1 is the conditional model itself: skip the unconditional branch.
        guidance = None if self.guidance == 1.0 else self.guidance
        # The ODE state is not autocast; only the network's matmuls run in self.dtype.
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32):
            latents = self.objective.sample(self.model, noise.to(self.device), caption, steps=self.steps,
                                            guidance=guidance)  # (N, C, h, w)
        return to_uint8(self.vae.decode(latents))

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
                "vae": self.vae_spec, "text_encoder": self.text_spec, "family": self.family.name,
                "unconditional": self.unconditional_source,
                "objective": json.dumps(self.objective_spec, sort_keys=True)}


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
