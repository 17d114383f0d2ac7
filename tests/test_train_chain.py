"""Stages 1 -> 2 -> 3 of the tiny recipe's shape, chained on moto S3: full state carried on, then weights only
into the 128-px model with positions rebuilt at scale 2 (stage 4 repeats stage 2's kind of start at 128 px, so the
chain stops at 3: each stage here costs a Ray Train start)."""
from __future__ import annotations

import json

import pytest
import torch

from test_train_helpers import tiny_stage, write_latents

pytestmark = pytest.mark.slow


def _stages() -> list[dict]:
    # cache_dataset_mb=0: the chain streams from S3 every epoch, as the paper-sized sources do.
    common = dict(steps=3, checkpoint_every=3, log_every=3, sample_prompts=2, sample_steps=2, shuffle_buffer=0,
                  cache_dataset_mb=0)
    return [
        tiny_stage(name="c1", resolution=64, mask_ratio=0.5, **common),
        tiny_stage(name="c2", resolution=64, mask_ratio=0.0, init={"from": "full_state", "stage": "c1"},
                   schedule={"kind": "constant"}, **common),
        # A tiny lr, so stage 3's weights show where it started (stage 2's, not a fresh init).
        tiny_stage(name="c3", resolution=128, mask_ratio=0.5, init={"from": "weights", "stage": "c2"},
                   schedule={"kind": "constant", "warmup_steps": 1}, lr=1e-6, p_mean=0.0, p_std=0.6,
                   **common),
    ]


def _weights(uri: str) -> dict[str, torch.Tensor]:
    from pipeline.train.checkpoint import load_weights

    return load_weights(uri)


def test_four_stages_chain_on_s3(ray_address, s3_endpoint, s3_bucket, monkeypatch):
    import ray

    from model.microdit.config import ModelConfig
    from model.microdit.network import MicroDiT
    from pipeline.core import storage
    from pipeline.train.stage import train_stage

    ray.shutdown()  # reconnect below with the S3 endpoint in the workers' environment
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    root = f"s3://{s3_bucket}/run"
    # 64 rows at 64 px; 8 rows per file lack a 128-px latent and must be filtered out of stages 3-4.
    data = {"synth": write_latents(f"{root}/data/latents/synth", rows=64, resolutions=(64, 128),
                                   without_high_res=8)}
    stages = _stages()
    try:
        with pytest.raises(FileNotFoundError, match="'c1', which has not finished"):
            train_stage(stages[1], "MicroDiT_Debug", root, data)
        encoders = {"vae": "standin", "text": "tiny"}
        exports = [train_stage(s, "MicroDiT_Debug", root, data, encoders=encoders) for s in stages]
    finally:
        ray.shutdown()

    assert exports == [f"{root}/train/c{i}/export" for i in range(1, 4)]
    configs = [storage.read_json(f"{e}/config.json") for e in exports]
    assert [c["global_step"] for c in configs] == [3, 6, 3]  # full state carries the step on; weights restart it
    assert [c["model"]["input_size"] for c in configs] == [16, 16, 32]
    assert [c["model"]["pos_interp_scale"] for c in configs] == [1.0, 1.0, 2.0]
    assert configs[2]["final_checkpoint"].startswith(f"{root}/train/c3/checkpoint_")
    for i in range(1, 4):
        assert storage.list_files(f"{root}/train/c{i}/samples", ".png")
        assert storage.list_files(f"{root}/train/c{i}/checkpoint_000000003", ".distcp")
        assert len(storage.read_bytes(f"{root}/train/c{i}/metrics.jsonl").decode().splitlines()) == 1

    # Stage 3 started from stage 2's weights (3 steps at lr 1e-6 move them by ~3e-6), not from a fresh init.
    w2, w3 = _weights(f"{exports[1]}/model.safetensors"), _weights(f"{exports[2]}/model.safetensors")
    torch.manual_seed(0)  # the seed every stage here initialises with
    fresh = MicroDiT(ModelConfig(**configs[2]["model"])).state_dict()
    max_diff = lambda a, b: max(float((a[k] - b[k]).abs().max()) for k in a)
    assert max_diff(w3, w2) < 1e-4 < 1e-2 < max_diff(w2, fresh)
    # The 128-px model loads the 64-px weights strictly; only its position buffer differs.
    model = MicroDiT(ModelConfig(**configs[2]["model"]))
    model.load_state_dict(w2, strict=True)
    assert model.pos_embed.shape == (1, 256, 128)
    json.dumps(configs)  # configs are plain JSON
