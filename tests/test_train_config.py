"""Fast unit tests of the training stage config, schedules, batch arithmetic, data decoding and checkpoint checks."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from pipeline.core import schema
from pipeline.core.plan import load_recipe, stage_config
from pipeline.train.optim import stage_lr_lambda
from pipeline.train.data import DecodeLatents, MixtureStream, mixture_weights
from model.microdit.family import FAMILY as MICRODIT

REPO = Path(__file__).resolve().parents[1]


def test_unknown_and_misspelled_keys_are_named():
    with pytest.raises(ValueError, match="grad_clipp"):
        stage_config({"name": "s", "optim": {"grad_clipp": 0.5}})
    with pytest.raises(ValueError, match="warmup"):
        stage_config({"name": "s", "optim": {"schedule": {"kind": "cosine", "warmup": 10}}})
    with pytest.raises(ValueError, match="init.kind.*'pretrained'"):
        stage_config({"name": "s", "init": {"from": "pretrained", "stage": "x"}})
    with pytest.raises(ValueError, match="needs init.stage"):
        stage_config({"name": "s", "init": {"from": "weights"}})
    with pytest.raises(ValueError, match="schedule.kind.*'linear'"):
        stage_config({"name": "s", "optim": {"schedule": {"kind": "linear"}}})
    with pytest.raises(ValueError, match="data.cache_dataset_mb = -1"):
        stage_config({"name": "s", "data": {"cache_dataset_mb": -1}})
    with pytest.raises(ValueError, match="batch.cpu_threads = 0"):
        stage_config({"name": "s", "batch": {"cpu_threads": 0}})
    with pytest.raises(ValueError, match="grad_clip"):  # flat keys of the old layout are refused, not ignored
        stage_config({"name": "s", "grad_clip": 0.5})


def test_init_from_alias_and_defaults():
    s = stage_config({"name": "b", "init": {"from": "full_state", "stage": "a"}})
    assert (s.init.kind, s.init.stage) == ("full_state", "a")
    assert s.objective.caption_dropout == 0.1 and s.optim.betas == (0.9, 0.999)


def test_accumulation_arithmetic():
    s = stage_config({"name": "s", "batch": {"global_batch": 2048, "micro_batch": 32, "num_workers": 8}})
    assert s.batch.accumulation_steps == 8
    with pytest.raises(ValueError, match=r"global_batch=2048 is not divisible by micro_batch x num_workers = 48 x 8"):
        stage_config({"name": "s", "batch": {"global_batch": 2048, "micro_batch": 48, "num_workers": 8}})


def test_micro_budget_recipe_matches_the_stage_table():
    stages = load_recipe(REPO / "recipes" / "micro_budget.yaml").stages
    got = [(s.data.resolution, s.objective.mask_ratio, s.steps, s.optim.lr, s.optim.schedule.kind,
            s.optim.schedule.warmup_steps, s.optim.grad_clip, s.objective.p_mean, s.objective.p_std,
            s.batch.micro_batch, s.batch.accumulation_steps, s.init.kind) for s in stages]
    assert got == [
        (256, 0.75, 250_000, 2.4e-4, "cosine", 2500, 0.25, -0.6, 1.2, 256, 1, "scratch"),
        (256, 0.0, 30_000, 8e-5, "constant", 0, 0.25, -0.6, 1.2, 64, 4, "full_state"),
        (512, 0.75, 50_000, 8e-5, "constant", 500, 0.5, 0.0, 0.6, 32, 8, "weights"),
        (512, 0.0, 5_000, 8e-5, "constant", 0, 0.5, 0.0, 0.6, 16, 16, "full_state"),
    ]
    assert all(s.batch.global_batch == 2048 and s.optim.weight_decay == 0.1 for s in stages)
    assert [s.init.stage for s in stages[1:]] == [s.name for s in stages[:-1]]
    assert stages[0].optim.schedule.floor == 0.33 and stages[2].pos_interp_scale == 2.0
    assert sum(s.steps * s.batch.global_batch for s in stages) == 686_080_000  # "about 686M samples"


def test_tiny_recipe_is_cpu_sized():
    stages = load_recipe(REPO / "recipes" / "tiny.yaml").stages
    assert [s.data.resolution for s in stages] == [64, 64, 128, 128]
    assert all(not s.batch.use_gpu and s.batch.num_workers == 2 for s in stages)
    assert [s.pos_interp_scale for s in stages] == [1.0, 1.0, 2.0, 2.0]


def _schedule(steps: int, **schedule):
    return stage_lr_lambda(stage_config({"name": "s", "steps": steps, "optim": {"schedule": schedule}}))


def test_cosine_schedule_warmup_then_floor():
    f = _schedule(100, kind="cosine", warmup_steps=10, floor=0.33)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(55) == pytest.approx(0.33 + 0.67 * 0.5)
    assert f(100) == pytest.approx(0.33) and f(500) == pytest.approx(0.33)
    values = [f(i) for i in range(10, 101)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_constant_schedule_after_warmup():
    f = _schedule(50, kind="constant", warmup_steps=5)
    assert [f(i) for i in range(7)] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0, 1.0, 1.0])
    assert _schedule(50, kind="constant")(0) == 1.0


def test_mixture_weights(tmp_path):
    latents = {"a": "unused_a", "b": "unused_b"}
    assert mixture_weights(latents, {"a": 3, "b": 1}) == {"a": 0.75, "b": 0.25}
    assert mixture_weights(latents, {"a": 1, "diffusiondb": 0}) == {"a": 1.0}
    with pytest.raises(ValueError, match="'c'"):
        mixture_weights(latents, {"a": 1, "c": 2})
    with pytest.raises(ValueError, match="no source left"):
        mixture_weights(latents, {"a": 1}, exclude=["a"])


def test_mixture_choice_is_seeded_and_shared_by_ranks():
    a = MixtureStream({}, {"x": 0.7, "y": 0.3}, 4, seed=5, shuffle_buffer=0, rank=0)
    b = MixtureStream({}, {"x": 0.7, "y": 0.3}, 4, seed=5, shuffle_buffer=0, rank=1)
    picks = [a.choose(step, m) for step in range(200) for m in range(2)]
    assert picks == [b.choose(step, m) for step in range(200) for m in range(2)]
    assert 0.6 < picks.count("x") / len(picks) < 0.8


def test_decode_latents_reshapes_and_filters_has_column():
    s = schema.latent_schema([64, 128], 4, 4, 77, 8)
    n = 3
    lat128 = [np.full((4, 32, 32), i, np.float32) if i != 1 else None for i in range(n)]
    caps = [np.full((77, 8), 10 + i, np.float32) for i in range(n)]
    table = pa.table({
        "latents_128": schema.tensor_array(lat128, s.field("latents_128")),
        "has_128": pa.array([True, False, True]),
        "caption_states": schema.tensor_array(caps, s.field("caption_states")),
    }, schema=pa.schema([s.field("latents_128"), s.field("has_128"), s.field("caption_states")]))
    out = DecodeLatents(128, (4, 32, 32), (77, 8))(table)
    assert out["latents"].shape == (2, 4, 32, 32) and out["caption"].shape == (2, 77, 8)
    assert out["latents"][:, 0, 0, 0].tolist() == [0, 2] and out["caption"][:, 0, 0].tolist() == [10, 12]


def _write_fake_checkpoint(folder: Path) -> None:
    from pipeline.train.checkpoint import write_manifest

    folder.mkdir()
    (folder / ".metadata").write_bytes(b"m" * 10)
    (folder / "__0_0.distcp").write_bytes(b"x" * 100)
    (folder / "train_state.json").write_text(json.dumps({"world_size": 1, "stage_step": 3}))
    (folder / "model_config.json").write_text(json.dumps({"dim": 128}))
    write_manifest(str(folder), 0)


def test_verify_names_truncated_and_altered_files(tmp_path):
    from pipeline.train.checkpoint import check_model_config, verify

    good = tmp_path / "checkpoint_000000003"
    _write_fake_checkpoint(good)
    assert verify(str(good), hash_all=True)["stage_step"] == 3
    (good / "__0_0.distcp").write_bytes(b"x" * 60)
    with pytest.raises(ValueError, match=r"__0_0\.distcp.*truncated"):
        verify(str(good), hash_all=True)
    (good / "__0_0.distcp").write_bytes(b"y" * 100)
    verify(str(good), hash_all=False)  # shards: sizes only
    with pytest.raises(ValueError, match=r"__0_0\.distcp.*SHA-256"):
        verify(str(good), hash_all=True)
    (good / "manifest_rank0.json").unlink()
    with pytest.raises(ValueError, match="manifest_rank0.json"):
        verify(str(good), hash_all=True)
    check_model_config(str(good), {"dim": 128})
    with pytest.raises(ValueError, match=r"model_config\.json.*dim"):
        check_model_config(str(good), {"dim": 256})


def test_dcp_round_trip_of_sharded_model_optimizer_ema(tmp_path):
    """One gloo rank: FSDP2 from outside, a step, DCP save, then load into a fresh copy gives the same state."""
    import torch.distributed as dist

    from model.microdit.config import model_config
    from model.ema import EMA
    from model.microdit.network import MicroDiT
    from pipeline.train.optim import build_optimizer
    from pipeline.train import checkpoint as ckpt
    from pipeline.train.parallelize import build_mesh, parallelize

    store = dist.HashStore()  # in-process rendezvous: no port needed
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        cfg = model_config("MicroDiT_Debug", depth=2, mixer_depth=1)

        def build(seed):
            torch.manual_seed(seed)
            m = parallelize(MicroDiT(cfg), build_mesh(1, "cpu"), units=MICRODIT.shard_units, bf16=False, compile=False,
                            activation_checkpointing=True)
            opt = build_optimizer(m, 1e-3)
            return m, opt, EMA(m, 0.9)

        model, opt, ema = build(0)
        x, cap = torch.randn(2, 4, 16, 16), torch.randn(2, 77, 64)
        out, _ = model(x, torch.zeros(2), cap)
        out.square().mean().backward()
        opt.step()
        ema.update(model, 0)
        train = ckpt.TrainState(stage_step=1, global_step=7, data={"train": [0, 2]})
        folder = str(tmp_path / "c")
        os.makedirs(folder)
        ckpt.save_local(ckpt.AppState(model, opt, ema, train), folder, 0, 1, {ckpt.MODEL_CONFIG: {"a": 1}})
        ckpt.verify(folder, hash_all=True)

        model2, opt2, ema2 = build(1)
        train2 = ckpt.TrainState()
        ckpt.load_local(ckpt.AppState(model2, opt2, ema2, train2), folder, 0, 1, restore_rng=True)
        assert (train2.global_step, train2.data) == (7, {"train": [0, 2]})
        for (n, p), (_, q) in zip(model.named_parameters(), model2.named_parameters()):
            assert torch.equal(p.full_tensor(), q.full_tensor()), n
        for n in ema.shadow:
            assert torch.equal(ema.shadow[n].full_tensor(), ema2.shadow[n].full_tensor()), n
        s1, s2 = opt.state_dict()["state"], opt2.state_dict()["state"]
        assert all(torch.equal(s1[k]["exp_avg"].full_tensor(), s2[k]["exp_avg"].full_tensor()) for k in s1)
    finally:
        dist.destroy_process_group()
