"""Image metrics behind pipeline/evaluate/evaluate.py: FID (torchmetrics + torch-fidelity Inception), CLIP score
(torchmetrics over an open_clip model) and the synthetic demo's caption-match check.

FID and CLIP score are computed by torchmetrics, never re-implemented here; this file only feeds them: local
Inception weights loaded safely, an open_clip model and preprocessing behind torchmetrics' CLIP interface, and
the real-image statistics saved so that 30K COCO images are featurised once.
"""
from __future__ import annotations

import io
import os
import tempfile
from functools import lru_cache
from types import SimpleNamespace
from typing import Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.core import storage
from pipeline.data.shapes import BACKGROUNDS, COLOURS
from pipeline.data.shapes import BACKGROUNDS, COLOURS, POSITIONS, SHAPES, SIZES, parse_caption
from pipeline.data.shapes import POSITIONS, SHAPES, SIZES, ShapeSpec, render

FID_REAL_STATE = ("real_features_sum", "real_features_cov_sum", "real_features_num_samples")


# ---------------------------------------------------------------------------------------------- FID

def _safe_state_dict(uri: str) -> dict[str, torch.Tensor]:
    """Tensors of a .safetensors file, or of a .pth loaded with weights_only=True (no code runs)."""
    data = storage.read_bytes(uri)  # FileNotFoundError names the URI
    if uri.endswith(".safetensors"):
        from safetensors.torch import load

        return load(data)
    state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"Inception weights {uri!r}: expected a state_dict of tensors")
    return state


def build_fid(feature: int | nn.Module = 2048, weights_path: str | None = None, antialias: bool = False,
              device: str | torch.device = "cpu"):
    """torchmetrics FrechetInceptionDistance on uint8 (N, 3, H, W) images.

    feature: an Inception pool size (2048 standard) or a custom module mapping uint8 images to (N, D).
    weights_path: local Inception weights (torch-fidelity's pt_inception-2015-12-05 file, .pth or .safetensors);
    None downloads torch-fidelity's copy. antialias=False resizes to 299 with torch-fidelity's
    TensorFlow-1-compatible bilinear resize (the reference FID implementation); True uses torch's antialiased one.
    """
    from torchmetrics.image.fid import FrechetInceptionDistance

    if isinstance(feature, nn.Module) or weights_path is None:
        metric = FrechetInceptionDistance(feature=feature, antialias=antialias, reset_real_features=False)
        return metric.to(device)
    # torch-fidelity reads a weights path with torch.load(weights_only=False): hand it a copy we wrote ourselves
    # from tensors loaded safely, so no pickled code from the given file can run.
    state = _safe_state_dict(weights_path)
    fd, tmp = tempfile.mkstemp(suffix=".pth")
    os.close(fd)
    try:
        torch.save(state, tmp)
        metric = FrechetInceptionDistance(feature=feature, antialias=antialias, reset_real_features=False,
                                          feature_extractor_weights_path=tmp)
    finally:
        os.unlink(tmp)
    return metric.to(device)


def update_fid(metric, images: np.ndarray | torch.Tensor, real: bool) -> None:
    """Add (N, H, W, 3) uint8 arrays (or (N, 3, H, W) uint8 tensors) to the real or fake side."""
    x = torch.as_tensor(images)
    if x.dtype != torch.uint8:
        raise ValueError(f"FID expects uint8 images, got {x.dtype}")
    if x.shape[-1] == 3 and x.shape[1] != 3:
        x = x.permute(0, 3, 1, 2)
    metric.update(x.contiguous().to(metric.device), real=real)


def fid_from_batches(real: Iterable, fake: Iterable, feature: int | nn.Module = 2048, **kw) -> float:
    """FID between two iterables of uint8 image batches."""
    metric = build_fid(feature, **kw)
    for batch in real:
        update_fid(metric, batch, real=True)
    for batch in fake:
        update_fid(metric, batch, real=False)
    return float(metric.compute())


def save_real_state(metric, uri: str) -> None:
    """Store the accumulated real-image statistics (sums, not features) as safetensors."""
    from safetensors.torch import save

    storage.write_bytes(uri, save({k: getattr(metric, k).detach().cpu().contiguous() for k in FID_REAL_STATE}))


def load_real_state(metric, uri: str) -> int:
    """Restore real-image statistics saved by save_real_state; returns the number of real images."""
    from safetensors.torch import load

    state = load(storage.read_bytes(uri))
    for k in FID_REAL_STATE:
        if getattr(metric, k).shape != state[k].shape:
            raise ValueError(f"real statistics {uri!r}: {k} has shape {tuple(state[k].shape)}, "
                             f"the metric expects {tuple(getattr(metric, k).shape)}")
        setattr(metric, k, state[k].to(getattr(metric, k).device))
    return int(state["real_features_num_samples"])


# ----------------------------------------------------------------------------------------- CLIP score

class OpenClipForScore(nn.Module):
    """An open_clip model behind the two methods torchmetrics' CLIPScore calls (HF CLIPModel's names)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.config = SimpleNamespace()  # torchmetrics probes config.text_config for HF models only

    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(pixel_values)

    def get_text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.model.encode_text(input_ids)


class OpenClipProcessor:
    """Processor with HF CLIPProcessor's call signature: bicubic resize of the short side, center crop, normalise."""

    def __init__(self, tokenizer, image_size: int, mean: Sequence[float], std: Sequence[float]):
        self.tokenizer, self.image_size = tokenizer, int(image_size)
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)

    def pixels(self, image: torch.Tensor) -> torch.Tensor:
        """(3, H, W) uint8 or float in [0, 1] -> (3, S, S) normalised float32."""
        x = image.float() / 255.0 if image.dtype == torch.uint8 else image.float()
        h, w = x.shape[-2:]
        s = self.image_size
        if (h, w) != (s, s):
            scale = s / min(h, w)
            nh, nw = max(s, round(h * scale)), max(s, round(w * scale))
            x = F.interpolate(x[None], size=(nh, nw), mode="bicubic", antialias=True, align_corners=False)[0]
            top, left = (nh - s) // 2, (nw - s) // 2
            x = x[:, top:top + s, left:left + s].clamp(0, 1)
        return (x - self.mean) / self.std

    def __call__(self, images=None, text=None, return_tensors: str = "pt", padding: bool = True) -> dict:
        if images is not None:
            return {"pixel_values": torch.stack([self.pixels(i) for i in images])}
        ids = self.tokenizer(list(text))  # (N, L)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def build_clip_score(model: nn.Module, tokenizer, image_size: int, mean: Sequence[float], std: Sequence[float],
                     device: str | torch.device = "cpu"):
    """torchmetrics CLIPScore (100 x cosine, mean over images, floored at 0) over an open_clip model."""
    from torchmetrics.multimodal.clip_score import CLIPScore

    adapter = OpenClipForScore(model).to(device)
    processor = OpenClipProcessor(tokenizer, image_size, mean, std)
    return CLIPScore(model_name_or_path=lambda: (adapter, processor)).to(device)


def load_clip_score(model_name: str, pretrained: str, device: str | torch.device = "cpu"):
    """CLIPScore for an open_clip architecture and pretrained tag or local weights file (e.g. ViT-L-14, openai)."""
    import open_clip

    if os.path.sep in pretrained and not os.path.isfile(pretrained):
        raise FileNotFoundError(f"CLIP weights {pretrained!r} do not exist; expected a local file or an "
                                f"open_clip pretrained tag for {model_name!r}")
    model = open_clip.create_model(model_name, pretrained=pretrained, device="cpu")
    pre = open_clip.get_model_preprocess_cfg(model)
    size = pre["size"][0] if isinstance(pre["size"], (tuple, list)) else pre["size"]
    return build_clip_score(model, open_clip.get_tokenizer(model_name), size, pre["mean"], pre["std"], device)


def update_clip(metric, images: np.ndarray | torch.Tensor, captions: Sequence[str]) -> None:
    """Add (N, H, W, 3) uint8 images and their captions."""
    x = torch.as_tensor(images)
    if x.shape[-1] == 3 and x.shape[1] != 3:
        x = x.permute(0, 3, 1, 2)
    metric.update(list(x.to(metric.device)), list(captions))


# ------------------------------------------------------------------------------- demo caption match

def _nearest(colour: np.ndarray, palette: dict[str, tuple[int, int, int]]) -> str:
    names = list(palette)
    d = [float(np.sum((colour - np.asarray(palette[n], np.float64)) ** 2)) for n in names]
    return names[int(np.argmin(d))]


@lru_cache(maxsize=8)
def _templates(width: int, height: int) -> tuple[list[tuple[str, str, str]], np.ndarray]:
    """Masks of every (shape, position, size) the synthetic renderer draws at this size: (K, H, W) bool."""
    keys = [(s, p, z) for s in SHAPES for p in POSITIONS for z in SIZES]
    masks = [np.asarray(render(ShapeSpec("red", s, "black", p, z), width, height))[..., 0] > 127 for s, p, z in keys]
    return keys, np.stack(masks)


def describe(image: np.ndarray, fg_threshold: float = 80.0, min_area: float = 0.005) -> dict[str, str]:
    """Read a synthetic picture back: background, shape colour, shape, position, size ('none' if no shape).

    Background is the median border colour; foreground pixels differ from it by more than fg_threshold (RGB
    distance). Shape, position and size come from the renderer's mask that overlaps the foreground best (IoU).
    """
    x = np.asarray(image, np.float64)  # (H, W, 3)
    h, w = x.shape[:2]
    b = max(1, min(h, w) // 32)
    border = np.concatenate([x[:b].reshape(-1, 3), x[-b:].reshape(-1, 3), x[:, :b].reshape(-1, 3),
                             x[:, -b:].reshape(-1, 3)])
    bg = np.median(border, axis=0)
    out = {"background": _nearest(bg, BACKGROUNDS)}
    fg = np.sqrt(((x - bg) ** 2).sum(-1)) > fg_threshold  # (H, W)
    if fg.mean() < min_area:
        return {**out, "colour": "none", "shape": "none", "position": "none", "size": "none"}
    out["colour"] = _nearest(x[fg].mean(0), COLOURS)
    keys, masks = _templates(w, h)
    inter = (masks & fg).sum((1, 2))
    union = (masks | fg).sum((1, 2))
    out["shape"], out["position"], out["size"] = keys[int(np.argmax(inter / union))]
    return out


def caption_match(images: Sequence[np.ndarray], captions: Sequence[str]) -> dict:
    """Per-attribute accuracy of synthetic pictures against their captions; caption_match = colour and shape."""
    if len(images) != len(captions) or not len(images):
        raise ValueError(f"expected as many images as captions (and some), got {len(images)} and {len(captions)}")
    attrs = ("colour", "shape", "background", "position", "size")
    hits = {a: 0 for a in attrs}
    both = every = 0
    rows = []
    for image, caption in zip(images, captions):
        spec = parse_caption(caption)
        seen = describe(image)
        ok = {a: seen[a] == getattr(spec, a) for a in attrs}
        for a in attrs:
            hits[a] += ok[a]
        both += ok["colour"] and ok["shape"]
        every += all(ok.values())
        rows.append({"caption": caption, "seen": seen})
    n = len(images)
    chance = {"colour": 1 / len(COLOURS), "shape": 1 / len(SHAPES), "background": 1 / len(BACKGROUNDS),
              "position": 1 / len(POSITIONS), "size": 1 / len(SIZES)}
    return {"caption_match": both / n, "all_attributes": every / n, "n": n,
            "accuracy": {a: hits[a] / n for a in attrs},
            "chance": {**chance, "caption_match": chance["colour"] * chance["shape"]}, "images": rows}
