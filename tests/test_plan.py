"""The typed run plan: recipes validate into typed sections once, overrides apply by index or name, wrong keys
and wrong types fail when the recipe is read (naming the file, the key and the value), and the plan's JSON is
what crosses Prefect and Ray."""
from __future__ import annotations

import inspect
import json
from pathlib import Path

import pytest
import yaml

from flows.full_run import expand_force
from pipeline.checks import load_run
from pipeline.core.layout import Layout
from pipeline.core.plan import (DownloadConfig, EvalConfig, PlanError, PrecomputeConfig, StageConfig,
                                apply_override, from_recipe_dict, load_recipe, stage_config)

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
TINY, BUDGET = RECIPES / "tiny.yaml", RECIPES / "micro_budget.yaml"


def test_tiny_recipe_sections_are_typed(tmp_path):
    cfg = load_run(TINY, storage_base=str(tmp_path))
    assert isinstance(cfg.download, DownloadConfig) and isinstance(cfg.precompute, PrecomputeConfig)
    assert isinstance(cfg.evaluate, EvalConfig) and all(isinstance(s, StageConfig) for s in cfg.stages)
    assert [s.name for s in cfg.stages] == ["stage1", "stage2", "stage3", "stage4"]
    assert [s.data.resolution for s in cfg.stages] == [64, 64, 128, 128]
    assert [s.pos_interp_scale for s in cfg.stages] == [1.0, 1.0, 2.0, 2.0]
    assert cfg.precompute.resolutions == [64, 128]
    assert (cfg.download.min_side, cfg.download.max_side) == (64, 128)
    assert (cfg.model.family, cfg.model.preset) == ("microdit", "MicroDiT_Debug")
    assert (cfg.encoders.vae, cfg.encoders.text) == ("standin", "tiny")
    # The encoders section is the one owner of precompute's encoders: they are filled per source, not stored.
    assert (cfg.precompute.vae, cfg.precompute.text_encoder) == (None, None)
    filled = cfg.precompute.for_source("synthetic", cfg.encoders)
    assert (filled.vae, filled.text_encoder, filled.source) == ("standin", "tiny", "synthetic")
    assert cfg.storage == str(tmp_path / "runs" / "tiny")
    assert cfg.sources[0].kind == "synthetic" and cfg.sample.prompts


def test_micro_budget_recipe_is_the_papers(tmp_path):
    cfg = load_run(BUDGET, storage_base=str(tmp_path))
    assert cfg.storage.startswith("s3://")
    assert cfg.model.preset == "MicroDiT_XL_2"
    assert cfg.encoders.text == "hf-hub:apple/DFN5B-CLIP-ViT-H-14-378"
    assert [s.steps for s in cfg.stages] == [250_000, 30_000, 50_000, 5_000]
    assert [s.data.resolution for s in cfg.stages] == [256, 256, 512, 512]
    assert [s.objective.mask_ratio for s in cfg.stages] == [0.75, 0.0, 0.75, 0.0]
    assert [(s.objective.p_mean, s.objective.p_std) for s in cfg.stages] == [(-0.6, 1.2)] * 2 + [(0.0, 0.6)] * 2
    assert {s.objective.sigma_data for s in cfg.stages} == {0.9}
    assert all(s.batch.global_batch == 2048 for s in cfg.stages)
    assert [s.batch.accumulation_steps for s in cfg.stages] == [1, 4, 8, 16]
    assert {"cc12m", "sa1b", "textcaps", "journeydb", "diffusiondb"} <= {s.kind for s in cfg.sources}
    assert (cfg.download.min_side, cfg.download.max_side) == (256, 512)


def test_overrides_by_index_name_and_nested(tmp_path):
    cfg = load_run(TINY, ["stages.0.steps=17", "stages.stage2.optim.lr=1e-5", "download.threads=3",
                          "sources.synthetic.options.n=10", "model.depth=2", f"storage={tmp_path}",
                          "stages.stage1.objective.sigma_data=0.5", "stages.stage2.objective.sigma_data=0.5",
                          "stages.stage3.objective.sigma_data=0.5", "stages.stage4.objective.sigma_data=0.5"])
    assert cfg.stages[0].steps == 17 and cfg.stages[1].optim.lr == 1e-5
    assert cfg.download.threads == 3 and cfg.sources[0].options["n"] == 10
    assert cfg.model.overrides() == {"depth": 2} and cfg.storage == str(tmp_path)
    assert {s.objective.sigma_data for s in cfg.stages} == {0.5}


@pytest.mark.parametrize("override, message", [
    ("download.threadz=3", "threadz"),
    ("stages.stage9.steps=1", "stage9"),
    ("stages.7.steps=1", "out of range"),
    ("model.depthh=2", "depthh"),
    ("model.preset=MicroDiT_Huge", "MicroDiT_Huge"),
    ("model.family=imagen", "imagen"),
    ("sources.0.kind=flickr", "flickr"),
    ("sources.synthetic.options.nn=3", "nn"),
    ("stages.stage1.optim.lrr=1", "lrr"),
    ("colour=red", "colour"),
    ("nonsense", "path.to.key=value"),
    ("sample.stage=stage7", "stage7"),
    ("precompute.vae=madebyollin/sdxl-vae-fp16-fix", "encoders"),
    ("stages.stage3.objective.sigma_data=0.5", "sigma_data"),
    ("stages.stage1.objective.kind=rectified_flow", "rectified_flow.p_mean"),
    ("stages.stage1.objective={kind: rectified_flow}", "microdit family trains with"),
])
def test_bad_keys_and_values_are_named(override, message):
    with pytest.raises(ValueError, match=message):
        load_run(TINY, [override])


# Reliability item 5: values of the wrong type fail when the recipe is read, naming the key, value and file.
@pytest.mark.parametrize("override, key, shown", [
    ("stages.stage1.steps=ten", "stages.0.steps", "'ten'"),
    ("stages.stage1.batch.compile='false'", "stages.0.batch.compile", "'false'"),
    ("stages.stage1.optim.lr='1e-4'", "stages.0.optim.lr", "'1e-4'"),
    ("precompute.resolutions='64'", "precompute.resolutions", "'64'"),
    ("download.timeout=2.5", "download.timeout", "2.5"),
    ("model.depth='2'", "model.depth", "'2'"),
    ("sources.synthetic.options.n='10'", "options.n", "'10'"),
    ("stages.stage1.batch.micro_batch=12", "global_batch=32 is not divisible", ""),
])
def test_wrong_types_fail_at_load_naming_key_value_and_file(override, key, shown):
    with pytest.raises(PlanError) as err:
        load_run(TINY, [override])
    text = str(err.value)
    assert key in text and shown in text and "tiny.yaml" in text, text


def test_yaml_exponent_floats_are_floats(tmp_path):
    """`lr: 1e-4` is a string to YAML 1.1; the plan reads it as the float it means (and overrides too)."""
    recipe = yaml.safe_load(TINY.read_text())
    text = TINY.read_text().replace("stages: stages_tiny.yaml", "stages:\n" + "\n".join(
        "  " + line for line in (RECIPES / "stages_tiny.yaml").read_text().split("stages:\n", 1)[1].splitlines()))
    text = text.replace("lr: 0.001", "lr: 1e-3")
    assert "lr: 1e-3" in text and recipe
    path = tmp_path / "r.yaml"
    path.write_text(text)
    cfg = load_run(path, ["stages.stage2.optim.lr=5e-4"])
    assert cfg.stages[0].optim.lr == 1e-3 and cfg.stages[1].optim.lr == 5e-4


def test_missing_recipe_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        load_recipe(tmp_path / "nope.yaml")


def test_plan_round_trips_through_json_and_is_revalidated(tmp_path):
    cfg = load_run(TINY, ["stages.stage3.steps=6"], storage_base=str(tmp_path))
    data = json.loads(json.dumps(cfg.to_dict()))
    again = from_recipe_dict(data)
    assert again == cfg
    data["stages"][0]["batch"]["compile"] = "false"  # a plan tampered with on the way is refused on arrival
    with pytest.raises(PlanError, match="stages.0.batch.compile"):
        from_recipe_dict(data)
    stage = stage_config(cfg.stages[0].model_dump(mode="json"))  # what a Ray worker receives and validates
    assert stage == cfg.stages[0]


def test_apply_override_parses_yaml_values():
    data = {"a": {"b": 1}, "items": [{"name": "x", "v": 1}]}
    apply_override(data, "a.c=[1, 2]")
    apply_override(data, "items.x.v=true")
    apply_override(data, "a.lr=1e-5")
    assert data == {"a": {"b": 1, "c": [1, 2], "lr": 1e-5}, "items": [{"name": "x", "v": True}]}


def test_layout_owns_the_paths(tmp_path):
    cfg = load_run(TINY, [f"storage={tmp_path}"])
    paths = Layout(cfg.storage)
    assert paths.shards("synthetic") == str(tmp_path / "data" / "shards" / "synthetic")
    assert paths.latents("synthetic") == str(tmp_path / "data" / "latents" / "synthetic")
    assert paths.url_list("synthetic") == str(tmp_path / "data" / "urls" / "synthetic.parquet")
    assert paths.export("stage2") == str(tmp_path / "train" / "stage2" / "export")
    assert Layout("s3://b/run").latents("x") == "s3://b/run/data/latents/x"


def test_force_reruns_the_step_and_everything_after(tmp_path):
    cfg = load_run(TINY, storage_base=str(tmp_path))
    order = cfg.step_order()
    assert order == ["estimate", "download", "precompute", "stage1", "stage2", "stage3", "stage4", "sample",
                     "evaluate", "report"]
    assert expand_force(cfg, []) == set()
    assert expand_force(cfg, ["stage3"]) == {"stage3", "stage4", "sample", "evaluate", "report"}
    assert expand_force(cfg, ["sample", "stage2"]) == set(order[4:])
    assert expand_force(cfg, ["all"]) == set(order)
    with pytest.raises(ValueError, match="stage9"):
        expand_force(cfg, ["stage9"])


def test_flow_parameters_are_the_typed_plan():
    """The Prefect UI builds its run form from this schema: the whole plan, section by section."""
    from flows.full_run import full_run
    from flows.stage import stage_run

    for flow in (full_run, stage_run):
        schema = flow.parameters
        assert "#/definitions/RunConfig" in str(schema.properties["plan"])
        assert {"RunConfig", "StageConfig", "StageOptim", "EDMObjective", "DownloadConfig"} <= set(schema.definitions)
        assert "sigma_data" in schema.definitions["EDMObjective"]["properties"]


def test_the_plan_repeats_no_default():
    """Each constant has one owner: the plan's objective sections are made from the objectives' own configs (the
    same default objects, the same range checks), the sample grid and generate take the family's sampler
    defaults, and the plan's remaining defaults are the owning module's values."""
    import dataclasses

    from model.family import DEFAULT
    from model.objectives.configs import EDMConfig, RectifiedFlowConfig
    from pipeline.core.plan import (EDMObjective, GenerateConfig, ModelSection, PlanError, RectifiedFlowObjective,
                                    RunConfig, StageConfig, StageSampling, stage_config)
    from pipeline.core.progress import DEFAULT_EVERY

    for section, config in ((EDMObjective, EDMConfig), (RectifiedFlowObjective, RectifiedFlowConfig)):
        owned = {f.name: f.default for f in dataclasses.fields(config)}
        assert set(section.model_fields) == set(owned)
        assert all(section.model_fields[k].default is v for k, v in owned.items())
        assert section().config() == config()
    assert StageConfig().objective.config() == EDMConfig()
    with pytest.raises(PlanError, match="sigma_data=0"):
        stage_config({"name": "s", "objective": {"kind": "edm", "sigma_data": 0}})
    assert (StageSampling().steps, StageSampling().guidance) == (None, None)
    assert (GenerateConfig().steps, GenerateConfig().guidance) == (None, None)
    assert RunConfig.model_fields["progress_every"].default is DEFAULT_EVERY
    assert ModelSection().family is DEFAULT
    from model.samplers.edm_heun import EDMHeunScheduler  # the drawing side takes the objective's sigma_data too

    assert inspect.signature(EDMHeunScheduler.__init__).parameters["sigma_data"].default is EDMConfig.sigma_data
