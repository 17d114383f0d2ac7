"""pipeline/evaluate/evaluate.py + eval_metrics.py: FID and CLIP score against independent computations, the demo metric,
the COCO protocol and an idempotent end-to-end evaluation of the debug model."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import scipy.linalg
import torch
from PIL import Image
from torch import nn

from pipeline.evaluate.metrics import (build_clip_score, build_fid, caption_match, describe, fid_from_batches,
                                   load_real_state, save_real_state, update_clip, update_fid)
from pipeline.evaluate.evaluate import EvalConfig, coco_eval_set, demo_prompts, evaluate
from pipeline.data.shapes import ShapeSpec, parse_caption, render


class TinyFeatures(nn.Module):
    """A random-init feature extractor on uint8 images: (N, 3, H, W) -> (N, 8)."""

    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.conv = nn.Conv2d(3, 8, 3, stride=2)
        self.fc = nn.Linear(8 * 4 * 4, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float() / 255.0
        x = torch.tanh(self.conv(x))
        x = nn.functional.adaptive_avg_pool2d(x, 4).flatten(1)
        return self.fc(x)


def reference_fid(f_real: np.ndarray, f_fake: np.ndarray) -> float:
    """Frechet distance of Gaussians fitted to two feature sets (Heusel et al. 2017)."""
    mu1, mu2 = f_real.mean(0), f_fake.mean(0)
    s1, s2 = np.cov(f_real, rowvar=False), np.cov(f_fake, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


def _images(seed: int, n: int = 64, shift: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(rng.integers(0, 200, (n, 16, 16, 3)) + shift, 0, 255).astype(np.uint8)


def test_fid_matches_independent_computation():
    net = TinyFeatures()
    real, fake = _images(0), _images(1, shift=20)
    with torch.no_grad():
        feats = [net(torch.from_numpy(a).permute(0, 3, 1, 2)).double().numpy() for a in (real, fake)]
    expected = reference_fid(*feats)
    got = fid_from_batches([real[:40], real[40:]], [fake[:30], fake[30:]], feature=net)
    assert got == pytest.approx(expected, rel=1e-3, abs=1e-5)
    same = fid_from_batches([real], [real], feature=net)
    assert abs(same) < 1e-3 * expected
    near = fid_from_batches([real], [_images(2)], feature=net)  # same distribution, other draws
    far = fid_from_batches([real], [_images(2, shift=60)], feature=net)
    assert 0 < near < expected < far


def test_real_statistics_round_trip(tmp_path):
    net = TinyFeatures()
    a = build_fid(net)
    update_fid(a, _images(0), real=True)
    update_fid(a, _images(1), real=False)
    save_real_state(a, str(tmp_path / "real.safetensors"))
    b = build_fid(net)
    assert load_real_state(b, str(tmp_path / "real.safetensors")) == 64
    update_fid(b, _images(1), real=False)
    assert float(b.compute()) == pytest.approx(float(a.compute()), rel=1e-6)
    with pytest.raises(ValueError, match="uint8"):
        update_fid(b, _images(1).astype(np.float32), real=False)


def _random_inception_weights(path) -> str:
    """torch-fidelity's Inception-v3 with random weights, saved as safetensors (the real file is not here)."""
    from safetensors.torch import save_file
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    class Unloaded(FeatureExtractorInceptionV3):
        def load_state_dict(self, state_dict, strict=True, assign=False):
            return super().load_state_dict(state_dict, strict=False)

    empty = str(path) + ".empty.pth"
    torch.save({}, empty)
    torch.manual_seed(0)
    net = Unloaded("inception-v3-compat", ["2048"], feature_extractor_weights_path=empty)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))
    return str(path)


@pytest.fixture(scope="module")
def inception(tmp_path_factory):
    return _random_inception_weights(tmp_path_factory.mktemp("inception") / "inception.safetensors")


def test_inception_from_a_local_file(inception, tmp_path):
    metric = build_fid(64, weights_path=inception)  # 64-d pool: the same network, cheap on 2 CPU cores
    real, fake = _images(0, n=3), _images(1, n=3, shift=40)
    update_fid(metric, real, real=True)
    update_fid(metric, fake, real=False)
    assert metric.real_features_num_samples == 3 and float(metric.compute()) > 0
    # A pickle that would run code on load is refused (torch.load with weights_only=True).
    bad = tmp_path / "bad.pth"
    torch.save({"x": torch.zeros(1), "obj": TinyFeatures()}, bad)
    with pytest.raises(Exception, match="(?i)weights_only|unsupported|global"):
        build_fid(64, weights_path=str(bad))
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        build_fid(64, weights_path=str(tmp_path / "missing.pth"))


def _tiny_clip():
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    torch.manual_seed(0)
    return CLIP(16, CLIPVisionCfg(layers=1, width=32, head_width=16, patch_size=8, image_size=32),
                CLIPTextCfg(context_length=77, vocab_size=49408, width=32, heads=2, layers=1)).eval()


def test_clip_score_matches_independent_cosine():
    from open_clip import tokenize

    model = _tiny_clip()
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    metric = build_clip_score(model, tokenize, 32, mean, std)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (5, 32, 32, 3)).astype(np.uint8)
    captions = ["a red circle", "a blue square", "a green triangle", "two cats", "a photo of a dog"]
    update_clip(metric, images[:3], captions[:3])
    update_clip(metric, images[3:], captions[3:])
    with torch.no_grad():
        x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
        x = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
        fi = model.encode_image(x)
        ft = model.encode_text(tokenize(captions))
        cos = nn.functional.cosine_similarity(fi, ft, dim=-1)
    expected = max(float(100 * cos.mean()), 0.0)
    assert float(metric.compute()) == pytest.approx(expected, rel=1e-4, abs=1e-4)
    # The per-pair cosines are not all alike, so a wrong pairing or normalisation would show.
    assert float(cos.max() - cos.min()) > 1e-3


def test_demo_metric_reads_synthetic_pictures():
    prompts = demo_prompts()
    assert len(prompts) == 18 and all(parse_caption(p) for p in prompts)
    specs = [parse_caption(p) for p in prompts]
    for res in (64, 128):
        images = [np.asarray(render(s, res)) for s in specs]
        r = caption_match(images, prompts)
        assert r["caption_match"] == 1.0 and r["all_attributes"] == 1.0
    images = [np.asarray(render(s, 64)) for s in specs]
    # Captions naming another colour (same shape): colour and caption match fall to 0, shape stays right.
    recoloured = [ShapeSpec("blue" if s.colour != "blue" else "red", s.shape, s.background).caption for s in specs]
    r = caption_match(images, recoloured)
    assert r["accuracy"]["colour"] == 0.0 and r["caption_match"] == 0.0 and r["accuracy"]["shape"] == 1.0
    blank = np.full((64, 64, 3), 255, np.uint8)
    assert describe(blank)["colour"] == "none"
    assert caption_match([blank], prompts[:1])["caption_match"] == 0.0
    with pytest.raises(ValueError, match="not a synthetic caption"):
        caption_match([blank], ["a photo of a cat"])


def write_coco(folder, n: int = 6, size: int = 80) -> str:
    """A COCO-2014-shaped folder: annotations/captions_val2014.json and val2014/*.jpg (synthetic pictures)."""
    os.makedirs(os.path.join(folder, "annotations"), exist_ok=True)
    os.makedirs(os.path.join(folder, "val2014"), exist_ok=True)
    colours = ["red", "green", "blue", "yellow", "purple", "orange"]
    images, anns = [], []
    for i in range(n):
        spec = ShapeSpec(colours[i % 6], ("circle", "square", "triangle")[i % 3])
        name = f"COCO_val2014_{i + 100:012d}.jpg"
        render(spec, size + 8 * i, size).save(os.path.join(folder, "val2014", name), quality=95)
        images.append({"id": i + 100, "file_name": name})
        anns += [{"id": 1000 + 2 * i, "image_id": i + 100, "caption": spec.caption},
                 {"id": 1001 + 2 * i, "image_id": i + 100, "caption": f" {spec.colour} {spec.shape} "}]
    images.append({"id": 999, "file_name": "uncaptioned.jpg"})  # no caption: never selected
    with open(os.path.join(folder, "annotations", "captions_val2014.json"), "w") as f:
        json.dump({"images": images, "annotations": anns}, f)
    return str(folder)


def test_coco_selection_is_fixed(tmp_path):
    coco = write_coco(tmp_path / "coco")
    a, b = coco_eval_set(coco, 4, seed=0), coco_eval_set(coco, 4, seed=0)
    assert a == b and len({r["image_id"] for r in a}) == 4
    assert coco_eval_set(coco, 4, seed=1) != a
    assert all(os.path.exists(r["file"]) and r["caption"] == r["caption"].strip() for r in a)
    with pytest.raises(ValueError, match="num_images=7.*only 6"):
        coco_eval_set(coco, 7, seed=0)
    with pytest.raises(FileNotFoundError, match="captions_val2014.json"):
        coco_eval_set(str(tmp_path / "nothing"), 2, seed=0)


@pytest.mark.slow
def test_evaluate_end_to_end_is_idempotent(tmp_path, inception):
    import open_clip
    from safetensors.torch import save_file

    from test_generate import _random_model, write_export  # tests/ is on sys.path under pytest

    export = write_export(tmp_path / "export", _random_model(0))
    coco = write_coco(tmp_path / "coco")
    clip_cfg = tmp_path / "clip" / "TinyCLIP-test.json"
    clip_cfg.parent.mkdir()
    clip_cfg.write_text(json.dumps({"embed_dim": 16, "vision_cfg": {"layers": 1, "width": 32, "head_width": 16,
                                                                    "patch_size": 8, "image_size": 32},
                                    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32,
                                                 "heads": 2, "layers": 1}}))
    open_clip.add_model_config(clip_cfg)
    clip_weights = str(tmp_path / "clip" / "tiny.safetensors")
    save_file({k: v.contiguous() for k, v in _tiny_clip().state_dict().items()}, clip_weights)

    cfg = EvalConfig(coco=coco, num_images=4, resolution=64, steps=1, batch_size=3, inception_weights=inception,
                     fid_features=64,
                     clip_model="TinyCLIP-test", clip_pretrained=clip_weights, demo=True,
                     demo_prompts=demo_prompts()[:3])
    root = str(tmp_path / "run")
    m = evaluate(export, root, cfg)
    assert m["num_images"] == 4 and np.isfinite(m["fid"]) and m["fid"] > 0 and m["clip_score"] >= 0
    assert 0.0 <= m["demo"]["caption_match"] <= 1.0 and m["demo"]["n"] == 3
    on_disk = json.load(open(os.path.join(root, "eval", "metrics.json")))
    assert on_disk["fid"] == m["fid"] and on_disk["protocol"]["num_images"] == 4
    samples = sorted(os.listdir(m["samples"]))
    assert samples == ["00000_seed0.png", "00001_seed1.png", "00002_seed2.png", "00003_seed3.png"]
    assert Image.open(os.path.join(m["samples"], samples[0])).size == (64, 64)
    stamp = os.stat(os.path.join(root, "eval", "metrics.json")).st_mtime_ns
    assert evaluate(export, root, cfg) == m  # done: nothing recomputed
    assert os.stat(os.path.join(root, "eval", "metrics.json")).st_mtime_ns == stamp
    # Resume: a lost sample and lost metrics are redone; the kept samples and real statistics are reused.
    os.remove(os.path.join(root, "eval", "_SUCCESS"))
    os.remove(os.path.join(m["samples"], samples[2]))
    again = evaluate(export, root, cfg)
    # (the redone sample may differ by a rounding level: it is sampled in a batch of one)
    assert again["fid"] == pytest.approx(m["fid"], rel=1e-2)
    assert again["clip_score"] == pytest.approx(m["clip_score"], rel=1e-2)
