"""E-MMDiT through the pipeline on real Ray Train (2 CPU workers, gloo, FSDP2): precompute (tiny DC-AE, compact
tiny-Llama states, the unconditional file, tiny-DINOv2 REPA features) -> a REPA stage (stage 1 of the paper) -> an
export of the inference network (no projector) that generates; a stopped REPA stage resumes to the uninterrupted
losses exactly; a REPA stage without matching features is refused before Ray; a fine-tune from a released file."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from pipeline.testing import faults
from test_precompute import _encode, picture, sample, write_tar
from test_train_helpers import tiny_stage

pytestmark = pytest.mark.slow

WORDS = [("red", "circle"), ("blue", "square"), ("green", "triangle"), ("yellow", "circle")]
MODEL = {"family": "emmdit", "preset": "EMMDiT_Debug"}
ENCODERS = {"vae": "tiny-dcae", "text": "tiny-llama", "repa": "tiny-dinov2"}


def emmdit_stage(repa_weight: float = 0.5, **overrides) -> dict:
    st = tiny_stage(**{"steps": 6, **overrides})
    st["objective"] = {"kind": "rectified_flow", "caption_dropout": 0.25, "repa_weight": repa_weight}
    st["sampling"]["guidance"] = 4.5
    return st


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """24 synthetic shapes precomputed with the tiny encoders at 64 px (16x16 latents) plus tiny-DINOv2 features
    (256 x 32: EMMDiT_Debug's REPA target), as one finished source."""
    from pipeline.core import layout
    from pipeline.data.precompute import PrecomputeConfig, precompute_locally

    tmp = tmp_path_factory.mktemp("emmdit_data")
    members = []
    for i in range(24):
        colour, shape = WORDS[i % 4]
        members += sample(f"{i:05d}", _encode(picture(72, 64, seed=i), "JPEG", quality=90),
                          f"a large {colour} {shape} on a white background, center".encode())
    write_tar(tmp / "00000.tar", members)
    out = tmp / "latents" / "synth"
    cfg = PrecomputeConfig(resolutions=[64], vae="tiny-dcae", text_encoder="tiny-llama", repa="tiny-dinov2",
                           max_caption_tokens=16, vae_batch_size=8, text_batch_size=8, repa_batch_size=8,
                           spool_rows=16, decode_batch_rows=8, read_batch_rows=8)
    precompute_locally({"00000": str(tmp / "00000.tar")}, str(out), cfg, "synth")
    layout.mark_complete(str(out))
    return {"synth": str(out)}


def without_column(source: str, column: str, dest) -> str:
    """A copy of a finished source whose part files lack `column` (a source precomputed without it)."""
    import pyarrow.parquet as pq

    shutil.copytree(source, dest)
    for part in dest.glob("part-*.parquet"):
        pq.write_table(pq.read_table(part).drop_columns([column]), part)
    return str(dest)


@pytest.fixture(scope="module")
def reference(ray_address, data, tmp_path_factory):
    import ray

    from pipeline.train.stage import train_stage

    root = str(tmp_path_factory.mktemp("emmdit_ref"))
    out = train_stage(emmdit_stage(), MODEL, root, data, encoders=ENCODERS)
    assert out == f"{root}/train/s1/export"
    yield root
    ray.shutdown()


def _losses(root: str) -> list[float]:
    from pipeline.train.metrics import read_metrics

    rows = read_metrics(f"{root}/train/s1")
    assert [r["step"] for r in rows] == list(range(1, 7))
    return [r["loss"] for r in rows]


def test_repa_stage_exports_the_inference_network_that_generates(reference, data, tmp_path):
    """Stage 1 with REPA (weight 0.5; the objective refuses a batch without features, so finishing means the
    features reached it) exports without the training-only projector: stage 2 and generate load the export as
    the inference network, strictly."""
    import torch
    from safetensors.torch import load_file

    from model import family as families
    from pipeline.core import schema
    from pipeline.generate import GenerateConfig, generate

    export = f"{reference}/train/s1/export"
    config = json.loads(open(f"{export}/config.json").read())
    assert config["family"] == "emmdit" and config["model"]["input_size"] == 16
    assert config["objective"]["kind"] == "rectified_flow" and config["objective"]["repa_weight"] == 0.5
    assert config["sampler"]["kind"] == "euler"
    assert config["model"]["repa"] is False and config["encoders"]["repa"] == "tiny-dinov2"
    assert config["unconditional"] == schema.UNCONDITIONAL_FILE
    assert np.array_equal(schema.read_unconditional(export), schema.read_unconditional(data["synth"]))
    assert all(np.isfinite(_losses(reference)))
    weights = load_file(f"{export}/model.safetensors")
    assert not any(k.startswith("repa_projector") for k in weights)
    fam = families.get("emmdit")
    fam.build(fam.config_from_dict(config["model"])).load_state_dict(weights, strict=True)
    ema = load_file(f"{export}/ema.safetensors")  # parameters only (the position table is a buffer)
    assert ema and set(ema) <= set(weights)
    assert torch.isfinite(next(iter(weights.values()))).all()

    files = generate(export, ["a large red circle on a white background, center"], str(tmp_path / "gen"),
                     GenerateConfig(steps=2, batch_size=1))
    assert any(f.endswith("grid.png") for f in files)
    manifest = json.loads((tmp_path / "gen" / "generate.json").read_text())
    assert manifest["provenance"]["family"] == "emmdit"
    assert manifest["provenance"]["unconditional"].endswith(schema.UNCONDITIONAL_FILE)


def test_stopped_repa_stage_resumes_to_the_same_losses(reference, data, tmp_path):
    """The checkpoint carries the REPA projector and its optimizer state: the resumed losses are the
    uninterrupted run's, bit for bit."""
    from pipeline.train.stage import train_stage

    with faults.injected(stop_at_step=3):
        with pytest.raises(RuntimeError, match="stopped before its last step"):
            train_stage(emmdit_stage(), MODEL, str(tmp_path), data, encoders=ENCODERS)
    assert (tmp_path / "train" / "s1" / "checkpoint_000000003").is_dir()
    train_stage(emmdit_stage(), MODEL, str(tmp_path), data, encoders=ENCODERS)
    np.testing.assert_array_equal(_losses(str(tmp_path)), _losses(reference))


def test_repa_without_features_is_refused_before_ray(data, tmp_path):
    from pipeline.core import schema
    from pipeline.train.stage import train_stage

    plain = {"synth": without_column(data["synth"], schema.REPA_FEATURES, tmp_path / "plain")}
    with pytest.raises(ValueError, match="source 'synth' has no 'repa_features' column"):
        train_stage(emmdit_stage(), MODEL, str(tmp_path / "run"), plain)
    # features of another shape than the network's REPA target (256 tokens x repa_dim) are refused too
    with pytest.raises(ValueError, match=r"shape \(256, 32\), but the network's REPA target is \(256, 16\)"):
        train_stage(emmdit_stage(), {**MODEL, "repa_dim": 16}, str(tmp_path / "run"), data)


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
    stage = emmdit_stage(0.0, name="ft", steps=2, lr=1e-6, schedule={"kind": "constant"}, checkpoint_every=2,
                         init={"from": "weights", "path": path}, sample_prompts=0)
    out = train_stage(stage, MODEL, str(tmp_path / "run"), data, encoders={"vae": "tiny-dcae", "text": "tiny-llama"})
    tuned = load_file(f"{out}/model.safetensors")
    params = dict(released.named_parameters())
    moved = max(float((tuned[k] - params[k].detach()).abs().max()) for k in params)
    assert 0 < moved < 1e-3
