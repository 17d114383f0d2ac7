"""GenEval's object detector through transformers: Mask2Former (Swin-S backbone, COCO instance segmentation).

GenEval runs mmdetection's Mask2Former Swin-S COCO checkpoint; this runs the Hub's transformers port of that
architecture (`facebook/mask2former-swin-small-coco-instance`), whose weights are not mmdet's file, so scores can
differ (docs/GENEVAL.md gives the command that compares both on the same images on a GPU machine). The instances are
made as mmdet's Mask2Former makes them: the top (query, class) pairs by class probability (as many as queries), a
mask where the query's mask logit is positive (upsampled to the image), the score = class probability x the mask's
mean probability, the box from the mask's extent. The protocol's thresholds are applied later (rules.keep).

Specs: a Hub id or local folder of a Mask2FormerForUniversalSegmentation with its image processor, or
"tiny-mask2former" (built from config with fixed-seed weights, COCO's 80 labels: for tests).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import (AutoImageProcessor, Mask2FormerConfig, Mask2FormerForUniversalSegmentation,
                          Mask2FormerImageProcessor, SwinConfig)

from pipeline.evaluate.geneval.rules import Detection

TINY = "tiny-mask2former"
TINY_SEED = 20231101
# GenEval's names for the COCO classes whose detector label reads otherwise (by name, never by position).
SYNONYMS = {"tv": ("tv", "tvmonitor", "television"), "computer mouse": ("mouse",), "tv remote": ("remote",),
            "computer keyboard": ("keyboard",), "couch": ("couch", "sofa"), "motorcycle": ("motorcycle", "motorbike"),
            "airplane": ("airplane", "aeroplane"), "dining table": ("dining table", "diningtable"),
            "potted plant": ("potted plant", "pottedplant"), "hair drier": ("hair drier", "hair dryer")}


def label_map(id2label: dict, names: list[str]) -> dict[int, str]:
    """Detector label id -> GenEval class name, matched by name; ValueError naming the classes it does not cover."""
    by_name = {str(v).strip().lower().replace("_", " "): int(k) for k, v in id2label.items()}
    found, missing = {}, []
    for name in names:
        ids = [by_name[n] for n in (name, *SYNONYMS.get(name, ())) if n in by_name]
        if not ids:
            missing.append(name)
        else:
            found[ids[0]] = name
    if missing:
        raise ValueError(f"the detector's labels do not cover GenEval's 80 COCO classes: missing {missing} (its "
                         f"labels: {sorted(by_name)[:12]}...); use a COCO instance segmentation checkpoint")
    return found


def coco_labels(names: list[str]) -> list[str]:
    """GenEval's names as COCO checkpoints label those classes (mouse, remote, keyboard)."""
    coco = {"computer mouse": "mouse", "tv remote": "remote", "computer keyboard": "keyboard"}
    return [coco.get(n, n) for n in names]


def build_tiny(names: list[str]):
    """(model, processor): a tiny Mask2Former (Swin backbone) labelled as COCO checkpoints are, fixed-seed weights."""
    names = coco_labels(names)
    backbone = SwinConfig(image_size=64, patch_size=4, embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 2, 2],
                          window_size=2, out_features=["stage1", "stage2", "stage3", "stage4"])
    cfg = Mask2FormerConfig(backbone_config=backbone, num_queries=12, hidden_dim=32, mask_feature_size=32,
                            feature_size=32, encoder_layers=1, decoder_layers=2, encoder_feedforward_dim=64,
                            dim_feedforward=64, num_attention_heads=2, common_stride=4,
                            id2label=dict(enumerate(names)), label2id={n: i for i, n in enumerate(names)})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED)
        model = Mask2FormerForUniversalSegmentation(cfg)
    processor = Mask2FormerImageProcessor(size={"shortest_edge": 64, "longest_edge": 128}, size_divisor=32)
    return model, processor


class Detector:
    """Images -> per image, GenEval class name -> detections (module docstring), in batches."""

    def __init__(self, spec: str, names: list[str], device="cpu", dtype=torch.float32):
        if spec == TINY:
            model, self.processor = build_tiny(names)
        else:
            model = Mask2FormerForUniversalSegmentation.from_pretrained(spec, dtype=dtype, use_safetensors=None)
            self.processor = AutoImageProcessor.from_pretrained(spec)
        self.model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)
        self.device, self.dtype = torch.device(device), dtype
        self.classes = label_map(self.model.config.id2label, names)

    @torch.no_grad()
    def detect(self, images: list) -> list[dict[str, list[Detection]]]:
        """Per PIL image, class name -> detections (most confident first; unthresholded)."""
        batch = self.processor(images=[im.convert("RGB") for im in images], return_tensors="pt")
        out = self.model(pixel_values=batch["pixel_values"].to(self.device, self.dtype),
                         pixel_mask=batch["pixel_mask"].to(self.device))
        padded = batch["pixel_values"].shape[-2:]
        found = []
        for i, image in enumerate(images):
            valid = batch["pixel_mask"][i]
            h, w = int(valid.any(1).sum()), int(valid.any(0).sum())  # the resized image inside the padding
            logits = F.interpolate(out.masks_queries_logits[i:i + 1].float(), size=padded, mode="bilinear",
                                   align_corners=False)[:, :, :h, :w]
            logits = F.interpolate(logits, size=(image.height, image.width), mode="bilinear", align_corners=False)[0]
            found.append(self._instances(out.class_queries_logits[i].float(), logits))
        return found

    def _instances(self, class_logits: torch.Tensor, mask_logits: torch.Tensor) -> dict[str, list[Detection]]:
        queries, labels = class_logits.shape[0], class_logits.shape[1] - 1  # the last class is "no object"
        probs = class_logits.softmax(-1)[:, :-1].flatten()
        top, index = probs.topk(queries)
        query, label = index // labels, index % labels
        masks = mask_logits[query] > 0  # (K, H, W)
        mask_score = (mask_logits[query].sigmoid() * masks).flatten(1).sum(1) / (masks.flatten(1).sum(1) + 1e-6)
        scores = top * mask_score
        out: dict[str, list[Detection]] = {}
        for k in scores.argsort(descending=True).tolist():
            name = self.classes.get(int(label[k]))
            if name is None or not masks[k].any():
                continue
            out.setdefault(name, []).append(Detection(mask_box(masks[k]), float(scores[k]), masks[k].cpu().numpy()))
        return out


def mask_box(mask: torch.Tensor) -> tuple[float, float, float, float]:
    """(x1, y1, x2, y2) of a mask's extent, x2 and y2 one past the last pixel (mmdet's mask2bbox)."""
    cols, rows = torch.nonzero(mask.any(0)).flatten(), torch.nonzero(mask.any(1)).flatten()
    return float(cols[0]), float(rows[0]), float(cols[-1] + 1), float(rows[-1] + 1)
