"""E-MMDiT training on real Ray Train (gloo, FSDP2) from the shared E-MMDiT run's S3 latents (tests/shared_runs.py
`emmdit_flow`: tiny DC-AE, compact tiny-Llama states, the unconditional file, tiny-DINOv2 REPA features): its REPA
stage exports the inference network (no projector) that generates; the same stage stopped and rerun resumes from
its S3 checkpoint to the flow's losses exactly; a REPA stage without matching features is refused before Ray; a
fine-tune from a released file."""
from __future__ import annotations

import json

import numpy as np
import pytest

from pipeline.testing import faults

pytestmark = [pytest.mark.slow]


def _plan(emmdit_flow):
    from pipeline.checks import load_run
    from shared_runs import EMMDIT_TINY

    return load_run(EMMDIT_TINY, [f"storage={emmdit_flow['root']}", *emmdit_flow["overrides"]])


def _losses(stage_uri: str) -> list[float]:
    from pipeline.train.metrics import read_metrics

    rows = read_metrics(stage_uri)
    assert [r["step"] for r in rows] == list(range(1, 7))
    return [r["loss"] for r in rows]


def test_repa_stage_exports_the_inference_network_that_generates(emmdit_flow, tmp_path):
    """Stage 1 with REPA (weight 0.5; the objective refuses a batch without features, so finishing means the
    features reached it) exports without the training-only projector: stage 2 and generate load the export as
    the inference network, strictly."""
    import torch
    from safetensors.torch import load as load_bytes

    from model import family as families
    from pipeline.core import schema, storage
    from pipeline.generate import GenerateConfig, generate

    export = f"{emmdit_flow['root']}/train/stage1/export"
    config = storage.read_json(f"{export}/config.json")
    assert config["family"] == "emmdit" and config["model"]["input_size"] == 16
    assert config["objective"]["kind"] == "rectified_flow" and config["objective"]["repa_weight"] == 0.5
    assert config["sampler"]["kind"] == "euler"
    assert config["model"]["repa"] is False and config["encoders"]["repa"] == "tiny-dinov2"
    assert config["encoders"]["text_mode"] == "release"  # the release's caption states, in the data and the export
    assert config["unconditional"] == schema.UNCONDITIONAL_FILE
    assert np.array_equal(schema.read_unconditional(export), schema.read_unconditional(emmdit_flow["latents"]))
    assert all(np.isfinite(_losses(f"{emmdit_flow['root']}/train/stage1")))
    weights = load_bytes(storage.read_bytes(f"{export}/model.safetensors"))
    assert not any(k.startswith("repa_projector") for k in weights)
    fam = families.get("emmdit")
    fam.build(fam.config_from_dict(config["model"])).load_state_dict(weights, strict=True)
    ema = load_bytes(storage.read_bytes(f"{export}/ema.safetensors"))  # parameters only (positions: a buffer)
    assert ema and set(ema) <= set(weights)
    assert torch.isfinite(next(iter(weights.values()))).all()
    stage2 = storage.read_json(f"{emmdit_flow['root']}/train/stage2/export/config.json")
    assert stage2["stage"]["init"] == {"kind": "weights", "stage": "stage1", "path": None}

    files = generate(export, ["a large red circle on a white background, center"], str(tmp_path / "gen"),
                     GenerateConfig(steps=2, batch_size=1))
    assert any(f.endswith("grid.png") for f in files)
    manifest = json.loads((tmp_path / "gen" / "generate.json").read_text())
    assert manifest["provenance"]["family"] == "emmdit"
    # guidance's empty prompt, computed by the pipeline and checked against the states the stage trained with
    assert manifest["provenance"]["unconditional"] == "the empty prompt (release text mode)"
    assert manifest["provenance"]["pipeline"] == "EMMDiTPipeline"


def test_stopped_repa_stage_resumes_from_s3_to_the_same_losses(emmdit_flow):
    """The flow's REPA stage trained again under another S3 root, stopped after step 3 and rerun: the checkpoint
    (on S3) carries the REPA projector and its optimizer state, so the resumed losses are the flow's, bit for
    bit."""
    from pipeline.core import storage
    from pipeline.train.stage import train_stage

    cfg = _plan(emmdit_flow)
    root = emmdit_flow["root"].replace("/run", "/resume")
    latents = {"synthetic": emmdit_flow["latents"]}
    with faults.injected(stop_at_step=3):
        with pytest.raises(RuntimeError, match="stopped before its last step"):
            train_stage(cfg.stage("stage1"), cfg.model, root, latents, encoders=cfg.encoders)
    assert storage.list_files(f"{root}/train/stage1/checkpoint_000000003", ".distcp")
    train_stage(cfg.stage("stage1"), cfg.model, root, latents, encoders=cfg.encoders)
    np.testing.assert_array_equal(_losses(f"{root}/train/stage1"),
                                  _losses(f"{emmdit_flow['root']}/train/stage1"))


def _local_copy(uri: str, dest, drop: str | None = None) -> str:
    """The Parquet parts (and markers) of an S3 latents folder copied to `dest`, optionally without a column."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.core import storage

    dest.mkdir(parents=True)
    for f in storage.list_files(uri, recursive=False):
        data = storage.read_bytes(f)
        name = f.rsplit("/", 1)[1]
        if drop and name.endswith(".parquet"):
            table = pq.read_table(pa.BufferReader(data)).drop_columns([drop])
            pq.write_table(table, dest / name)
        else:
            (dest / name).write_bytes(data)
    return str(dest)


def test_repa_without_features_is_refused_before_ray(emmdit_flow, tmp_path):
    from pipeline.core import schema
    from pipeline.train.stage import train_stage

    cfg = _plan(emmdit_flow)
    plain = {"synthetic": _local_copy(emmdit_flow["latents"], tmp_path / "plain", drop=schema.REPA_FEATURES)}
    with pytest.raises(ValueError, match="source 'synthetic' has no 'repa_features' column"):
        train_stage(cfg.stage("stage1"), cfg.model, str(tmp_path / "run"), plain, encoders=cfg.encoders)
    # features of another shape than the network's REPA target (256 tokens x repa_dim) are refused too
    from pipeline.core.plan import ModelSection

    model = ModelSection.model_validate({**cfg.model.model_dump(), "repa_dim": 16})
    with pytest.raises(ValueError, match=r"shape \(256, 32\), but the network's REPA target is \(256, 16\)"):
        train_stage(cfg.stage("stage1"), model, str(tmp_path / "run"), {"synthetic": emmdit_flow["latents"]},
                    encoders=cfg.encoders)


def test_fine_tune_from_a_released_emmdit_file(emmdit_flow, tmp_path):
    """Two steps of a real Ray Train stage (one worker) started from a file in Nitro-E's released layout
    (safetensors, its tensor names, the persistent position table): the export is those weights moved a little,
    not a fresh init."""
    import torch
    from safetensors.torch import load_file, save_file

    from model import family as families
    from pipeline.core.plan import stage_config
    from pipeline.train.stage import train_stage

    cfg = _plan(emmdit_flow)
    fam = families.get("emmdit")
    torch.manual_seed(5)
    released = fam.build(fam.config(cfg.model.preset))
    with torch.no_grad():
        for p in released.parameters():
            p.add_(0.02 * torch.randn_like(p))
    state = {k: v.detach().clone().contiguous() for k, v in released.state_dict().items()}
    assert "pos_embed.pos_embed" in state  # the release stores its sin-cos table
    path = str(tmp_path / "Nitro-E-debug.safetensors")
    save_file(state, path)
    stage = cfg.stage("stage2").model_dump()
    stage.update(name="ft", steps=2, init={"kind": "weights", "path": path})
    stage["optim"]["lr"], stage["sampling"]["prompts"] = 1e-6, 0
    out = train_stage(stage_config(stage), cfg.model, str(tmp_path / "run"), {"synthetic": emmdit_flow["latents"]},
                      encoders=cfg.encoders)
    tuned = load_file(f"{out}/model.safetensors")
    params = dict(released.named_parameters())
    moved = max(float((tuned[k] - params[k].detach()).abs().max()) for k in params)
    assert 0 < moved < 1e-3
