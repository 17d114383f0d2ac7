"""RunConfig: recipes parse into typed sections, overrides apply by index or name, bad keys fail loudly."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from flows.full_run import expand_force, step_order
from pipeline.core import configs
from pipeline.data.download import DownloadConfig
from pipeline.evaluate.evaluate import EvalConfig
from pipeline.data.precompute import PrecomputeConfig
from pipeline.core.run_config import apply_override, from_recipe_dict, load_recipe
from pipeline.train.config import StageConfig

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
TINY, BUDGET = RECIPES / "tiny.yaml", RECIPES / "micro_budget.yaml"


def test_tiny_recipe_sections_are_typed(tmp_path):
    cfg = load_recipe(TINY, storage_base=str(tmp_path))
    assert isinstance(cfg.download, DownloadConfig) and isinstance(cfg.precompute, PrecomputeConfig)
    assert isinstance(cfg.evaluate, EvalConfig) and all(isinstance(s, StageConfig) for s in cfg.stages)
    assert [s.name for s in cfg.stages] == ["stage1", "stage2", "stage3", "stage4"]
    assert [s.resolution for s in cfg.stages] == [64, 64, 128, 128]
    assert cfg.precompute.resolutions == [64, 128]
    assert (cfg.download.min_side, cfg.download.max_side) == (64, 128)
    assert cfg.model_config().caption_dim == 64  # the tiny text tower's width
    assert (cfg.encoders.vae, cfg.encoders.text) == ("standin", "tiny")
    # The encoders section is the one source of truth for precompute's encoders.
    assert (cfg.precompute.vae, cfg.precompute.text_encoder) == ("standin", "tiny")
    assert cfg.storage == str(tmp_path / "runs" / "tiny")
    assert cfg.sources[0].kind == "synthetic" and cfg.sample.prompts


def test_micro_budget_recipe_is_the_papers(tmp_path):
    cfg = load_recipe(BUDGET, storage_base=str(tmp_path))
    assert cfg.storage.startswith("s3://")
    assert cfg.model["preset"] == "MicroDiT_XL_2"
    assert cfg.encoders.vae.startswith("stabilityai/stable-diffusion-xl") or "sdxl" in cfg.encoders.vae
    assert cfg.encoders.text == "hf-hub:apple/DFN5B-CLIP-ViT-H-14-378"
    assert [s.steps for s in cfg.stages] == [250_000, 30_000, 50_000, 5_000]
    assert [s.resolution for s in cfg.stages] == [256, 256, 512, 512]
    assert [s.mask_ratio for s in cfg.stages] == [0.75, 0.0, 0.75, 0.0]
    assert all(s.global_batch == 2048 for s in cfg.stages)
    kinds = {s.kind for s in cfg.sources}
    assert {"cc12m", "sa1b", "textcaps", "journeydb", "diffusiondb"} <= kinds
    assert (cfg.download.min_side, cfg.download.max_side) == (256, 512)
    assert cfg.precompute.resolutions == [256, 512]


def test_overrides_by_index_name_and_nested(tmp_path):
    cfg = load_recipe(TINY, ["stages.0.steps=17", "stages.stage2.optimizer.lr=1e-5", "download.threads=3",
                             "sources.synthetic.options.n=10", "model.depth=2", f"storage={tmp_path}"])
    assert cfg.stages[0].steps == 17 and cfg.stages[1].optimizer.lr == 1e-5
    assert cfg.download.threads == 3 and cfg.sources[0].options["n"] == 10
    assert cfg.model_config().depth == 2 and cfg.storage == str(tmp_path)


@pytest.mark.parametrize("override, message", [
    ("download.threadz=3", "threadz"),
    ("stages.stage9.steps=1", "stage9"),
    ("stages.7.steps=1", "out of range"),
    ("model.depthh=2", "depthh"),
    ("model.preset=MicroDiT_Huge", "MicroDiT_Huge"),
    ("sources.0.kind=flickr", "flickr"),
    ("stages.stage1.optimizer.lrr=1", "lrr"),
    ("colour=red", "colour"),
    ("nonsense", "path.to.key=value"),
    ("sample.stage=stage7", "stage7"),
    ("precompute.vae=madebyollin/sdxl-vae-fp16-fix", "encoders"),
])
def test_bad_keys_and_values_are_named(override, message):
    with pytest.raises(ValueError, match=message):
        load_recipe(TINY, [override])


def test_missing_recipe_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        load_recipe(tmp_path / "nope.yaml")


def test_resolved_config_round_trips_through_json(tmp_path):
    cfg = load_recipe(TINY, ["stages.stage3.steps=6"], storage_base=str(tmp_path))
    again = from_recipe_dict(json.loads(json.dumps(cfg.to_dict())))
    assert configs.to_dict(again) == configs.to_dict(cfg)


def test_apply_override_parses_yaml_values():
    data = {"a": {"b": 1}, "items": [{"name": "x", "v": 1}]}
    apply_override(data, "a.c=[1, 2]")
    apply_override(data, "items.x.v=true")
    apply_override(data, "a.lr=1e-5")
    assert data == {"a": {"b": 1, "c": [1, 2], "lr": 1e-5}, "items": [{"name": "x", "v": True}]}


def test_layout_follows_the_brief(tmp_path):
    cfg = load_recipe(TINY, [f"storage={tmp_path}"])
    assert cfg.shards_uri("synthetic") == str(tmp_path / "data" / "shards" / "synthetic")
    assert cfg.latents_uri("synthetic") == str(tmp_path / "data" / "latents" / "synthetic")
    assert cfg.url_list_uri("synthetic") == str(tmp_path / "data" / "urls" / "synthetic.parquet")
    assert cfg.export_uri("stage2") == str(tmp_path / "train" / "stage2" / "export")


def test_force_reruns_the_step_and_everything_after(tmp_path):
    cfg = load_recipe(TINY, storage_base=str(tmp_path))
    order = step_order(cfg)
    assert order == ["download", "precompute", "stage1", "stage2", "stage3", "stage4", "sample", "evaluate",
                     "report"]
    assert expand_force(cfg, []) == set()
    assert expand_force(cfg, ["stage3"]) == {"stage3", "stage4", "sample", "evaluate", "report"}
    assert expand_force(cfg, ["sample", "stage2"]) == set(order[3:])
    assert expand_force(cfg, ["all"]) == set(order)
    with pytest.raises(ValueError, match="stage9"):
        expand_force(cfg, ["stage9"])
