"""E-MMDiT through the pipeline on real Ray Train (2 CPU workers, gloo, FSDP2): precompute (tiny DC-AE, compact
tiny-Llama states, the unconditional file, tiny-DINOv2 REPA features) -> a stage -> an export that generates; a
stopped stage resumes to the uninterrupted losses exactly; a REPA stage adds its term and exports without its
projector."""
from __future__ import annotations

import json

import numpy as np
import pytest

from pipeline.testing import faults
from test_precompute import _encode, picture, sample, write_tar
from test_train_helpers import tiny_stage

pytestmark = pytest.mark.slow

WORDS = [("red", "circle"), ("blue", "square"), ("green", "triangle"), ("yellow", "circle")]


def emmdit_stage(**overrides) -> dict:
    st = tiny_stage(**{"steps": 6, **overrides})
    st["objective"] = {"kind": "rectified_flow", "caption_dropout": 0.25, "repa_weight": 0.0}
    st["sampling"]["guidance"] = 4.5
    return st


def _synth_latents(tmp, **settings) -> dict:
    """24 synthetic shapes precomputed with the tiny encoders at 64 px (16x16 latents), as one finished source."""
    from pipeline.core import layout
    from pipeline.data.precompute import PrecomputeConfig, precompute_locally

    members = []
    for i in range(24):
        colour, shape = WORDS[i % 4]
        members += sample(f"{i:05d}", _encode(picture(72, 64, seed=i), "JPEG", quality=90),
                          f"a large {colour} {shape} on a white background, center".encode())
    write_tar(tmp / "00000.tar", members)
    out = tmp / "latents" / "synth"
    cfg = PrecomputeConfig(resolutions=[64], vae="tiny-dcae", text_encoder="tiny-llama", max_caption_tokens=16,
                           vae_batch_size=8, text_batch_size=8, spool_rows=16, decode_batch_rows=8,
                           read_batch_rows=8, **settings)
    precompute_locally({"00000": str(tmp / "00000.tar")}, str(out), cfg, "synth")
    layout.mark_complete(str(out))
    return {"synth": str(out)}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return _synth_latents(tmp_path_factory.mktemp("emmdit_data"))


@pytest.fixture(scope="module")
def repa_data(tmp_path_factory):
    """The same rows plus tiny-DINOv2 features (256 x 32: EMMDiT_Debug's REPA target)."""
    return _synth_latents(tmp_path_factory.mktemp("emmdit_repa_data"), repa="tiny-dinov2", repa_batch_size=8)


@pytest.fixture(scope="module")
def reference(ray_address, data, tmp_path_factory):
    import ray

    from pipeline.train.stage import train_stage

    root = str(tmp_path_factory.mktemp("emmdit_ref"))
    out = train_stage(emmdit_stage(), {"family": "emmdit", "preset": "EMMDiT_Debug"}, root, data,
                      encoders={"vae": "tiny-dcae", "text": "tiny-llama"})
    assert out == f"{root}/train/s1/export"
    yield root
    ray.shutdown()


def _losses(root: str) -> list[float]:
    from pipeline.train.metrics import read_metrics

    rows = read_metrics(f"{root}/train/s1")
    assert [r["step"] for r in rows] == list(range(1, 7))
    return [r["loss"] for r in rows]


def test_stage_exports_an_emmdit_that_generates(reference, data, tmp_path):
    from pipeline.core import schema
    from pipeline.generate import GenerateConfig, generate

    export = f"{reference}/train/s1/export"
    config = json.loads(open(f"{export}/config.json").read())
    assert config["family"] == "emmdit" and config["model"]["input_size"] == 16
    assert config["objective"]["kind"] == "rectified_flow" and config["sampler"]["kind"] == "euler"
    assert config["unconditional"] == schema.UNCONDITIONAL_FILE
    stored = schema.read_unconditional(export)
    assert np.array_equal(stored, schema.read_unconditional(data["synth"]))
    losses = _losses(reference)
    assert all(np.isfinite(losses))
    files = generate(export, ["a large red circle on a white background, center"], str(tmp_path / "gen"),
                     GenerateConfig(steps=2, batch_size=1))
    assert any(f.endswith("grid.png") for f in files)
    manifest = json.loads((tmp_path / "gen" / "generate.json").read_text())
    assert manifest["provenance"]["family"] == "emmdit"
    assert manifest["provenance"]["unconditional"].endswith(schema.UNCONDITIONAL_FILE)


def test_stopped_stage_resumes_to_the_same_losses(reference, data, tmp_path):
    from pipeline.train.stage import train_stage

    root = str(tmp_path)
    model = {"family": "emmdit", "preset": "EMMDiT_Debug"}
    with faults.injected(stop_at_step=3):
        with pytest.raises(RuntimeError, match="stopped before its last step"):
            train_stage(emmdit_stage(), model, root, data, encoders={"vae": "tiny-dcae", "text": "tiny-llama"})
    assert (tmp_path / "train" / "s1" / "checkpoint_000000003").is_dir()
    train_stage(emmdit_stage(), model, root, data, encoders={"vae": "tiny-dcae", "text": "tiny-llama"})
    np.testing.assert_array_equal(_losses(root), _losses(reference))


def test_repa_without_features_is_refused_before_ray(data, repa_data, tmp_path):
    from pipeline.train.stage import train_stage

    st = emmdit_stage()
    st["objective"]["repa_weight"] = 0.5
    with pytest.raises(ValueError, match="source 'synth' has no 'repa_features' column"):
        train_stage(st, {"family": "emmdit", "preset": "EMMDiT_Debug"}, str(tmp_path), data)
    # features of another shape than the network's REPA target (256 tokens x repa_dim) are refused too
    with pytest.raises(ValueError, match=r"shape \(256, 32\), but the network's REPA target is \(256, 16\)"):
        train_stage(st, {"family": "emmdit", "preset": "EMMDiT_Debug", "repa_dim": 16}, str(tmp_path), repa_data)


def test_repa_stage_adds_its_term_and_exports_the_inference_network(reference, repa_data, tmp_path):
    """Stage 1 with REPA (weight 0.5) on precomputed tiny-DINOv2 features: same data, seed and init as the
    reference run, so its first loss is the reference's plus 0.5 x the REPA term (minus a cosine, |.| <= 0.5);
    the export drops the training-only projector, so stage 2 and generate load it as the inference network."""
    import torch
    from safetensors.torch import load_file

    from model import family as families
    from pipeline.train.metrics import read_metrics
    from pipeline.train.stage import train_stage

    st = emmdit_stage(steps=3, checkpoint_every=3, sample_prompts=0)
    st["objective"]["repa_weight"] = 0.5
    root = str(tmp_path)
    out = train_stage(st, {"family": "emmdit", "preset": "EMMDiT_Debug"}, root, repa_data,
                      encoders={"vae": "tiny-dcae", "text": "tiny-llama", "repa": "tiny-dinov2"})
    losses = [r["loss"] for r in read_metrics(f"{root}/train/s1")]
    assert len(losses) == 3 and all(np.isfinite(losses))
    term = losses[0] - _losses(reference)[0]
    assert 1e-4 < abs(term) <= 0.5
    config = json.loads(open(f"{out}/config.json").read())
    assert config["model"]["repa"] is False and config["encoders"]["repa"] == "tiny-dinov2"
    weights = load_file(f"{out}/model.safetensors")
    assert not any(k.startswith("repa_projector") for k in weights)
    fam = families.get("emmdit")
    net = fam.build(fam.config_from_dict(config["model"]))
    net.load_state_dict(weights, strict=True)  # what stage 2's init from these weights does
    ema = load_file(f"{out}/ema.safetensors")  # parameters only (the position table is a buffer)
    assert ema and set(ema) <= set(weights)
    assert torch.isfinite(next(iter(weights.values()))).all()


def test_fine_tune_from_a_released_emmdit_file(data, tmp_path, ray_address):
    """Two steps of a real Ray Train stage started from a file in Nitro-E's released layout (safetensors, its
    tensor names, the persistent position table): the export is those weights moved a little, not a fresh init."""
    import torch
    from safetensors.torch import load_file, save_file

    from model import family as families
    from pipeline.train.stage import train_stage

    fam = families.get("emmdit")
    torch.manual_seed(5)
    released = fam.build(fam.config("EMMDiT_Debug"))
    with torch.no_grad():
        for p in released.parameters():
            p.add_(0.02 * torch.randn_like(p))
    state = {k: v.detach().clone().contiguous() for k, v in released.state_dict().items()}
    assert "pos_embed.pos_embed" in state  # the release stores its sin-cos table
    path = str(tmp_path / "Nitro-E-debug.safetensors")
    save_file(state, path)
    stage = emmdit_stage(name="ft", steps=2, lr=1e-6, schedule={"kind": "constant"}, checkpoint_every=2,
                         init={"from": "weights", "path": path}, sample_prompts=0)
    out = train_stage(stage, {"family": "emmdit", "preset": "EMMDiT_Debug"}, str(tmp_path / "run"), data,
                      encoders={"vae": "tiny-dcae", "text": "tiny-llama"})
    tuned = load_file(f"{out}/model.safetensors")
    params = dict(released.named_parameters())
    moved = max(float((tuned[k] - params[k].detach()).abs().max()) for k in params)
    assert 0 < moved < 1e-3
