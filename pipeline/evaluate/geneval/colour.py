"""GenEval's colour check through open_clip: CLIP ViT-L/14 with OpenAI's weights, zero-shot over ten colours.

Per object class, the classifier is the mean of the normalised text embeddings of "a photo of a {c} {object}",
"a photo of a {c}-colored {object}" and "a photo of a {c} object" for each colour c, normalised (clip_benchmark's
zero-shot classifier, which GenEval calls). An object's image is the picture with every pixel outside its mask set to
#999, cropped to its box, then CLIP's own preprocessing; its colour is the arg-max of the logits.

Specs: "ViT-L-14/openai" (any open_clip "architecture/pretrained tag", or "hf-hub:" repo), or "tiny-clip" (built from
config, fixed-seed weights: for tests).
"""
from __future__ import annotations

from typing import Sequence

import open_clip
import torch
import torch.nn.functional as F
from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg
from PIL import Image

from pipeline.evaluate.geneval.rules import COLORS, Detection

TINY = "tiny-clip"
TINY_SEED = 20231102
TEMPLATES = ("a photo of a {c} {object}", "a photo of a {c}-colored {object}", "a photo of a {c} object")
BACKGROUND = (0x99, 0x99, 0x99)  # "#999"


def _load(spec: str, device, dtype):
    """(model, preprocess, tokenizer) of an open_clip spec (module docstring)."""
    if spec == TINY:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(TINY_SEED)
            model = CLIP(embed_dim=32, vision_cfg=CLIPVisionCfg(layers=1, width=32, head_width=16, patch_size=8,
                                                                image_size=32),
                         text_cfg=CLIPTextCfg(context_length=77, vocab_size=49408, width=32, heads=2, layers=1))
        preprocess = open_clip.image_transform(32, is_train=False)
        return model, preprocess, open_clip.get_tokenizer("ViT-B-32")
    if spec.startswith("hf-hub:"):
        model, _, preprocess = open_clip.create_model_and_transforms(spec)
        return model, preprocess, open_clip.get_tokenizer(spec)
    arch, _, tag = spec.partition("/")
    if not tag:
        raise ValueError(f"colour model {spec!r}: expected 'architecture/pretrained' (e.g. 'ViT-L-14/openai'), an "
                         f"'hf-hub:' repo, or {TINY!r}")
    model, _, preprocess = open_clip.create_model_and_transforms(arch, pretrained=tag)
    return model, preprocess, open_clip.get_tokenizer(arch)


class ColourClassifier:
    """(image, detections of one class, class name) -> one colour per detection (module docstring)."""

    def __init__(self, spec: str, device="cpu", dtype=torch.float32, batch_size: int = 16):
        model, self.preprocess, self.tokenizer = _load(spec, device, dtype)
        self.model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)
        self.device, self.dtype, self.batch_size = torch.device(device), dtype, batch_size
        self._classifiers: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def classifier(self, name: str) -> torch.Tensor:
        """(dim, colours): the zero-shot weights for objects of class `name`."""
        if name not in self._classifiers:
            weights = []
            for colour in COLORS:
                texts = [t.format(c=colour, object=name) for t in TEMPLATES]
                emb = self.model.encode_text(self.tokenizer(texts).to(self.device))
                mean = F.normalize(emb.float(), dim=-1).mean(0)
                weights.append(mean / mean.norm())
            self._classifiers[name] = torch.stack(weights, dim=1)
        return self._classifiers[name]

    @staticmethod
    def crop(image: Image.Image, det: Detection) -> Image.Image:
        """The object alone: outside its mask the picture is #999, then cropped to its box."""
        image = image.convert("RGB")
        if det.mask is not None:
            if tuple(det.mask.shape) != (image.height, image.width):
                raise ValueError(f"mask of shape {tuple(det.mask.shape)} for a {image.width}x{image.height} image")
            image = Image.composite(image, Image.new("RGB", image.size, BACKGROUND), Image.fromarray(det.mask))
        return image.crop(tuple(det.box))

    @torch.no_grad()
    def __call__(self, image: Image.Image, detections: Sequence[Detection], name: str) -> list[str]:
        weights = self.classifier(name)
        colours = []
        for i in range(0, len(detections), self.batch_size):
            crops = torch.stack([self.preprocess(self.crop(image, d)) for d in detections[i:i + self.batch_size]])
            feats = F.normalize(self.model.encode_image(crops.to(self.device, self.dtype)).float(), dim=-1)
            colours += [COLORS[k] for k in (feats @ weights).argmax(1).tolist()]
        return colours
