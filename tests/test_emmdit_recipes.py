"""The E-MMDiT recipes load and check against the family (pipeline.checks.load_run)."""
from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.checks import load_run
from pipeline.core.plan import PlanError

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


def test_paper_recipe():
    run = load_run(RECIPES / "emmdit.yaml")
    assert (run.model.family, run.model.preset) == ("emmdit", "EMMDiT_512")
    assert run.encoders.vae == "mit-han-lab/dc-ae-f32c32-sana-1.0-diffusers"
    assert run.encoders.text == "meta-llama/Llama-3.2-1B" and run.precompute.max_caption_tokens == 128
    assert run.encoders.repa == "dinov2-base"
    s1, s2 = run.stages
    for st in (s1, s2):
        assert st.batch.global_batch == 2048 and st.batch.micro_batch * st.batch.num_workers == 2048
        assert (st.optim.weight_decay, st.optim.eps) == (0.03, 1e-10)
        assert (st.optim.schedule.kind, st.optim.schedule.warmup_steps) == ("constant", 500)
        assert st.objective.kind == "rectified_flow" and st.objective.caption_dropout == 0.1
    assert (s1.steps, s1.optim.lr, s1.optim.grad_clip, s1.objective.repa_weight, s1.optim.ema.decay) == \
        (100_000, 3e-4, 0.5, 0.5, 0.0)
    assert (s2.steps, s2.optim.lr, s2.optim.grad_clip, s2.objective.repa_weight, s2.optim.ema.decay) == \
        (50_000, 1e-4, 1.0, 0.0, 0.9999)
    assert (s2.init.kind, s2.init.stage) == ("weights", "stage1")
    assert (run.sample.steps, run.sample.guidance) == (20, 4.5)


def test_tiny_recipe():
    run = load_run(RECIPES / "emmdit_tiny.yaml")
    assert (run.model.family, run.model.preset) == ("emmdit", "EMMDiT_Debug")
    # The stand-in VAE: its decodes are pictures, so the demo's caption match means something (tiny-dcae's
    # random weights decode noise); the suite's E-MMDiT flow overrides it with tiny-dcae.
    assert (run.encoders.vae, run.encoders.text) == ("standin", "tiny-llama")
    assert [s.name for s in run.stages] == ["stage1", "stage2"]
    assert run.encoders.repa == "tiny-dinov2"
    assert [s.objective.repa_weight for s in run.stages] == [0.5, 0.0]  # REPA in stage 1 only, as the paper
    assert not any(s.batch.use_gpu for s in run.stages)


def test_repa_stage_without_a_feature_encoder_is_refused():
    with pytest.raises(PlanError, match=r"stages \['stage1'\] train with REPA .* encoders.repa is not set"):
        load_run(RECIPES / "emmdit_tiny.yaml", ["encoders.repa=null"])
    run = load_run(RECIPES / "emmdit_tiny.yaml", ["encoders.repa=null", "stages.stage1.objective.repa_weight=0"])
    assert run.precompute.for_source("synthetic", run.encoders).repa is None


def test_edm_stage_on_emmdit_is_refused():
    with pytest.raises(PlanError, match="rectified_flow"):
        load_run(RECIPES / "emmdit_tiny.yaml", ["stages.stage1.objective={kind: edm}"])


def test_demo_family_picks_its_tiny_recipe():
    from cli.main import CLIError, build_parser, demo_recipe

    p = build_parser()
    assert demo_recipe(p.parse_args(["demo", "--family", "emmdit"])) == "recipes/emmdit_tiny.yaml"
    assert demo_recipe(p.parse_args(["demo"])) == "recipes/tiny.yaml"
    assert demo_recipe(p.parse_args(["demo", "--family", "microdit"])) == "recipes/tiny.yaml"
    with pytest.raises(CLIError, match="not both"):
        demo_recipe(p.parse_args(["demo", "--family", "emmdit", "--recipe", "recipes/micro_budget.yaml"]))
    with pytest.raises(SystemExit):
        p.parse_args(["demo", "--family", "dit"])
