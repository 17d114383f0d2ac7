"""GenEval's detector and colour check: images per second, against the bare networks measured in the same run.

    python -m bench.geneval_throughput --images 4 --crops 16 --out geneval_throughput.json [--device cuda]

Full-size networks with random weights, so nothing is downloaded and only the speed means something: Mask2Former
with a Swin-S backbone shaped as the COCO instance checkpoint (100 queries, 80 classes), saved and loaded back as a
local folder through `Detector`, at its image processor's default resize (shortest edge 800, longest 1333) of 512 px
pictures; CLIP ViT-L/14 at 224 px, saved as a local checkpoint and loaded through `ColourClassifier`.

detector: `Detector.detect` (resize and pad, forward, instances: top (query, class) pairs, masks upsampled to the
image, boxes) against the bare forward on the already-processed batch. colour: `ColourClassifier` on detections
(crop with #999 outside the mask, CLIP preprocessing, image encoder, zero-shot against the cached class weights)
against the bare image encoder on ready tensors.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np
import torch
from PIL import Image

from bench import emit
from pipeline.evaluate.geneval.colour import ColourClassifier
from pipeline.evaluate.geneval.detector import Detector, coco_labels
from pipeline.evaluate.geneval.prompts import object_names
from pipeline.evaluate.geneval.rules import Detection


def _pictures(n: int, side: int = 512) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (side, side, 3), dtype=np.uint8)) for _ in range(n)]


def _timed(fn, repeats: int) -> float:
    fn()  # warm-up: lazy allocations, kernels
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def swin_s_mask2former(folder: str) -> None:
    """A random Mask2Former shaped as facebook/mask2former-swin-small-coco-instance, saved with its processor."""
    from transformers import (Mask2FormerConfig, Mask2FormerForUniversalSegmentation, Mask2FormerImageProcessor,
                              SwinConfig)

    names = coco_labels(object_names())
    backbone = SwinConfig(embed_dim=96, depths=[2, 2, 18, 2], num_heads=[3, 6, 12, 24], window_size=7,
                          drop_path_rate=0.3, out_features=["stage1", "stage2", "stage3", "stage4"])
    cfg = Mask2FormerConfig(backbone_config=backbone, num_queries=100, id2label=dict(enumerate(names)),
                            label2id={n: i for i, n in enumerate(names)})
    Mask2FormerForUniversalSegmentation(cfg).save_pretrained(folder)
    Mask2FormerImageProcessor().save_pretrained(folder)


def bench_detector(folder: str, n: int, device: str, repeats: int) -> dict:
    detector = Detector(folder, object_names(), device)
    images = _pictures(n)
    batch = detector.processor(images=images, return_tensors="pt")
    pixels, mask = batch["pixel_values"].to(device), batch["pixel_mask"].to(device)

    @torch.no_grad()
    def bare():
        detector.model(pixel_values=pixels, pixel_mask=mask)

    plain, ours = _timed(bare, repeats), _timed(lambda: detector.detect(images), repeats)
    return {"images": n, "input": list(pixels.shape[-2:]), "bare_images_per_s": n / plain,
            "detect_images_per_s": n / ours, "ratio": plain / ours}


def bench_colour(checkpoint: str, crops: int, device: str, repeats: int) -> dict:
    colour = ColourClassifier(f"ViT-L-14/{checkpoint}", device, batch_size=crops)
    image = _pictures(1)[0]
    mask = np.zeros((512, 512), dtype=bool)
    mask[100:400, 150:350] = True
    detections = [Detection((150, 100, 350, 400), 0.9, mask)] * crops
    colour.classifier("apple")  # the zero-shot weights, cached per class: not what an image costs
    ready = torch.stack([colour.preprocess(colour.crop(image, d)) for d in detections]).to(device)

    @torch.no_grad()
    def bare():
        colour.model.encode_image(ready)

    plain, ours = _timed(bare, repeats), _timed(lambda: colour(image, detections, "apple"), repeats)
    return {"crops": crops, "bare_crops_per_s": crops / plain, "colour_crops_per_s": crops / ours,
            "ratio": plain / ours}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=4, help="pictures per detector batch")
    p.add_argument("--crops", type=int, default=16, help="detections per colour batch")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    import open_clip
    from safetensors.torch import save_file

    with tempfile.TemporaryDirectory() as tmp:
        folder = os.path.join(tmp, "mask2former")
        swin_s_mask2former(folder)
        detector = bench_detector(folder, args.images, args.device, args.repeats)
        checkpoint = os.path.join(tmp, "vit-l-14.safetensors")
        model = open_clip.create_model("ViT-L-14", pretrained=None)
        save_file({k: v.half().contiguous() for k, v in model.state_dict().items()}, checkpoint)
        del model
        colour = bench_colour(checkpoint, args.crops, args.device, args.repeats)
    result = {"device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
              "threads": torch.get_num_threads(), "detector": detector, "colour": colour}
    return emit(result, args.out)


if __name__ == "__main__":
    main()
