"""DINOv2 patch features for REPA (E-MMDiT stage 1) through transformers' `Dinov2Model`.

Specs: "dinov2-base" (= "facebook/dinov2-base", ViT-B/14: 224 px input -> 16 x 16 = 256 patch tokens of width
768), any hub id or local folder holding a Dinov2 `config.json` and weights (as `save_pretrained` writes them; a
`preprocessor_config.json` beside it gives the input size and normalisation), or "tiny-dinov2" (built offline from
a `Dinov2Config`, fixed-seed weights) whose tokens x width are EMMDiT_Debug's REPA target.

Features are the last hidden state (after DINOv2's final LayerNorm) without the CLS and register tokens, the
tokens REPA aligns the network's projected group-1 tokens with.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.nn.functional as F

DINOV2_BASE = "facebook/dinov2-base"
ALIASES = {"dinov2-base": DINOV2_BASE}
TINY = "tiny-dinov2"
TINY_SEED = 20251101
TINY_PATCH = 4  # small patches keep the tiny input at the tiny recipe's 64-px crops (no resize there)
TINY_GRID, TINY_WIDTH = 16, 32  # 256 tokens x 32: EMMDiT_Debug's group-1 grid and REPA projector width
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
BASE_IMAGE_SIZE = 224  # the processor's crop size for dinov2-base, used when a folder has no preprocessor config
SPECS_HELP = f"'dinov2-base' ({DINOV2_BASE}), {TINY!r}, another Dinov2 hub id, or a local Dinov2 folder"


def tiny_config():
    """Dinov2Config of the tiny encoder: TINY_GRID x TINY_GRID patch tokens of width TINY_WIDTH (EMMDiT_Debug's
    REPA target, tests/test_encoders_emmdit.py checks), image size = grid side x patch size."""
    from transformers import Dinov2Config

    return Dinov2Config(hidden_size=TINY_WIDTH, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=2,
                        patch_size=TINY_PATCH, image_size=TINY_GRID * TINY_PATCH)


class DinoEncoder:
    """Pixels (N, 3, R, R) in [-1, 1] -> (N, tokens, width) float32 DINOv2 patch features."""

    def __init__(self, model, device, dtype, image_size: int, mean=IMAGENET_MEAN, std=IMAGENET_STD):
        self.model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)
        self.device, self.dtype = torch.device(device), dtype
        cfg = model.config
        self.image_size, self.patch_size = int(image_size), int(cfg.patch_size)
        if self.image_size % self.patch_size:
            raise ValueError(f"DINOv2 input size {self.image_size} is not a multiple of its patch size "
                             f"{self.patch_size}")
        self.width = int(cfg.hidden_size)
        self.tokens = (self.image_size // self.patch_size) ** 2
        # CLS first, then any register tokens, then the patches.
        self.skip = 1 + int(getattr(cfg, "num_register_tokens", 0) or 0)
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)

    @property
    def shape(self) -> tuple[int, int]:
        """(tokens, width) of one image's features."""
        return self.tokens, self.width

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) in [-1, 1] -> (N, tokens, width) float32; resized (bicubic, antialiased) to the input size."""
        if pixels.ndim != 4 or pixels.shape[1] != 3:
            raise ValueError(f"expected pixels (N, 3, H, W), got {tuple(pixels.shape)}")
        x = (pixels.to(self.device, torch.float32) + 1.0) / 2.0  # [0, 1], as the DINOv2 processor rescales
        if tuple(x.shape[-2:]) != (self.image_size, self.image_size):
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bicubic", antialias=True,
                              align_corners=False).clamp(0, 1)
        x = (x - self.mean.to(x.device)) / self.std.to(x.device)  # ImageNet normalisation
        out = self.model(pixel_values=x.to(self.dtype)).last_hidden_state  # (N, skip + T, D)
        feats = out[:, self.skip:].float()
        if feats.shape[1] != self.tokens:
            raise RuntimeError(f"DINOv2 gave {feats.shape[1]} patch tokens, expected {self.tokens}")
        return feats


def build_tiny(seed: int = TINY_SEED):
    """The tiny Dinov2Model with fixed-seed weights (the same in every process)."""
    from transformers import Dinov2Model

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return Dinov2Model(tiny_config())


def save_tiny_dinov2(folder, seed: int = TINY_SEED) -> str:
    """Write the tiny DINOv2 and its image processor config with save_pretrained (read back by load_dino)."""
    from transformers import BitImageProcessor

    model = build_tiny(seed)
    size = int(model.config.image_size)
    Path(folder).mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(folder), safe_serialization=True)
    BitImageProcessor(do_resize=True, size={"shortest_edge": size}, do_center_crop=True,
                      crop_size={"height": size, "width": size}, image_mean=list(IMAGENET_MEAN),
                      image_std=list(IMAGENET_STD), do_convert_rgb=True).save_pretrained(str(folder))
    return str(folder)


def is_dino_spec(spec) -> bool:
    """True for the DINOv2 specs this module loads (named ones, or a local folder of a Dinov2 config)."""
    spec = str(spec)
    if spec in (TINY, *ALIASES, DINOV2_BASE):
        return True
    cfg = Path(spec).expanduser() / "config.json"
    if not cfg.is_file():
        return spec.startswith("facebook/dinov2")
    try:
        return json.loads(cfg.read_text(encoding="utf-8")).get("model_type") == "dinov2"
    except ValueError:
        return False


def _processor_settings(path: str) -> tuple[int, tuple, tuple]:
    """(input size, mean, std) from the model's image processor config; the base defaults where it has none."""
    from transformers import AutoImageProcessor

    try:
        proc = AutoImageProcessor.from_pretrained(path)
    except (OSError, ValueError):  # a folder written without a processor config
        return BASE_IMAGE_SIZE, IMAGENET_MEAN, IMAGENET_STD
    crop = getattr(proc, "crop_size", None) or {}
    size = int(crop.get("height", BASE_IMAGE_SIZE))
    if crop.get("width", size) != size:
        raise ValueError(f"DINOv2 processor of {path!r} crops {crop}: expected a square input")
    return size, tuple(proc.image_mean), tuple(proc.image_std)


def load_dino(spec: str, device="cpu", dtype: torch.dtype = torch.float32) -> DinoEncoder:
    """A DINOv2 feature encoder by spec (see module docstring); ValueError naming an unknown spec."""
    if spec == TINY:
        model = build_tiny()
        return DinoEncoder(model, device, dtype, int(model.config.image_size))
    if not is_dino_spec(spec):
        raise ValueError(f"unknown REPA feature encoder {spec!r}; expected {SPECS_HELP}")
    from transformers import Dinov2Model

    path = ALIASES.get(str(spec), str(spec))
    if os.path.isdir(os.path.expanduser(path)):
        path = os.path.expanduser(path)
    model = Dinov2Model.from_pretrained(path, dtype=dtype, use_safetensors=True)
    size, mean, std = _processor_settings(path)
    return DinoEncoder(model, device, dtype, size, mean, std)


HUB_WIDTHS = {DINOV2_BASE: 768}  # DINOv2-B's hidden size: what the planner needs without downloading its config


def feature_width(spec: str) -> int:
    """The width of a spec's features: known for the hub's DINOv2-B, else from its config (feature_shape)."""
    return HUB_WIDTHS.get(ALIASES.get(str(spec), str(spec))) or feature_shape(spec)[1]


def feature_shape(spec: str) -> tuple[int, int]:
    """(tokens, width) of a spec's features, from configs only (no weights are loaded)."""
    if spec == TINY:
        cfg = tiny_config()
        return (cfg.image_size // cfg.patch_size) ** 2, cfg.hidden_size
    if not is_dino_spec(spec):
        raise ValueError(f"unknown REPA feature encoder {spec!r}; expected {SPECS_HELP}")
    from transformers import AutoConfig

    path = ALIASES.get(str(spec), str(spec))
    path = os.path.expanduser(path) if os.path.isdir(os.path.expanduser(path)) else path
    cfg = AutoConfig.from_pretrained(path)
    size = _processor_settings(path)[0]
    return (size // cfg.patch_size) ** 2, cfg.hidden_size
