"""Exports as diffusers folders (pipeline/export/): they load in a Python whose sys.path holds neither the repository
nor an installed microdit, and draw what `microdit generate` draws; the folder's layout, card and bad input."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from pipeline.core.plan import GenerateConfig
from pipeline.export.diffusers_folder import export_diffusers
from pipeline.generate import Generator
from test_generate import _random_model, write_export
from test_generate_emmdit import write_emmdit_export

PROMPTS = ["a large red circle on a white background, center", "a small blue square, top left"]
SEEDS = [5, 6]
STEPS = 3

# Run in a fresh interpreter: the repository and any installed microdit are taken off the import system first,
# then the folder is loaded the way diffusers documents for pipelines that ship their code.
CLEAN_LOAD = textwrap.dedent("""
    import importlib.util, json, sys
    repo = sys.argv[3]
    inside = lambda p: p.startswith(repo + "/") and not p.startswith(sys.prefix)  # a venv may live in the repo
    sys.path = [p for p in sys.path if p not in ("", repo) and not inside(p)]
    sys.meta_path = [f for f in sys.meta_path if "editable" not in repr(f).lower()]  # pip install -e finders
    found = [m for m in ("model", "pipeline", "flows", "cli") if importlib.util.find_spec(m) is not None]
    assert not found, f"microdit is importable: {found}"
    import numpy as np, torch
    from diffusers import DiffusionPipeline
    pipe = DiffusionPipeline.from_pretrained(sys.argv[1], trust_remote_code=True)
    pipe.set_progress_bar_config(disable=True)
    request = json.loads(sys.argv[2])
    generators = [torch.Generator().manual_seed(s) for s in request["seeds"]]
    out = pipe(request["prompts"], num_inference_steps=request["steps"], generator=generators,
               output_type="latent").images
    np.save(request["out"], out.numpy())
    print(type(pipe).__name__, type(pipe.scheduler).__name__, sorted(m for m in sys.modules if m.split(".")[0] in
          ("model", "pipeline")))
""")


def clean_load(folder: str, out: str) -> subprocess.CompletedProcess:
    request = json.dumps({"prompts": PROMPTS, "seeds": SEEDS, "steps": STEPS, "out": out})
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return subprocess.run([sys.executable, "-c", CLEAN_LOAD, folder, request, repo], capture_output=True, text=True,
                          env=env, cwd=os.path.dirname(out), timeout=600)


def microdit_latents(export: str) -> np.ndarray:
    """What `microdit generate` draws for PROMPTS and SEEDS, as latents (its pipeline, its generators)."""
    gen = Generator(export, GenerateConfig(steps=STEPS))
    generators = [torch.Generator().manual_seed(s) for s in SEEDS]
    return gen.pipe(PROMPTS, num_inference_steps=STEPS, guidance_scale=gen.guidance, generator=generators,
                    output_type="latent").images.numpy()


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    from model.encoders import load_text_encoder

    tmp = tmp_path_factory.mktemp("exports")
    uncond = load_text_encoder("tiny-llama").unconditional().numpy()
    return {"microdit": write_export(tmp / "microdit", _random_model(0), ema=_random_model(1)),
            "emmdit": write_emmdit_export(tmp / "emmdit", uncond, text_mode="release")}


@pytest.mark.parametrize("family", ["microdit", "emmdit"])
def test_a_folder_loads_without_microdit_and_draws_what_generate_draws(exports, tmp_path, family):
    folder = export_diffusers(exports[family], str(tmp_path / "diffusers"))
    done = clean_load(folder, str(tmp_path / "latents.npy"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split()[-1] == "[]"  # no module of ours was imported
    theirs, ours = np.load(tmp_path / "latents.npy"), microdit_latents(exports[family])
    assert theirs.shape == ours.shape
    np.testing.assert_allclose(theirs, ours, rtol=1e-5, atol=1e-5 * np.abs(ours).max())

    shutil.rmtree(os.path.join(folder, "scheduler"))  # a broken conversion: the sampler's config is gone
    broken = clean_load(folder, str(tmp_path / "broken.npy"))
    assert broken.returncode != 0 and "scheduler" in broken.stderr


def test_the_folder_follows_diffusers_conventions_and_carries_a_card(exports, tmp_path):
    folder = export_diffusers(exports["microdit"], str(tmp_path / "d"))
    index = json.load(open(os.path.join(folder, "model_index.json")))
    assert index["_class_name"] == ["pipeline_microdit", "MicroDiTPipeline"]
    assert index["transformer"] == ["transformer_microdit", "MicroDiTTransformer2DModel"]
    assert index["scheduler"] == ["scheduler_edm_heun", "EDMHeunScheduler"]
    assert index["text_encoder"] == ["transformers", "CLIPTextModel"] and index["tokenizer"][0] == "transformers"
    assert (index["num_inference_steps"], index["guidance_scale"]) == (30, 5.0)  # the export's sampler defaults
    for path in ("pipeline_microdit.py", "transformer/transformer_microdit.py", "transformer/config.json",
                 "transformer/diffusion_pytorch_model.safetensors", "scheduler/scheduler_config.json",
                 "scheduler/scheduler_edm_heun.py", "vae/config.json", "text_encoder/config.json", "README.md"):
        assert os.path.isfile(os.path.join(folder, path)), path
    assert json.load(open(os.path.join(folder, "scheduler/scheduler_config.json")))["sigma_data"] == 0.9
    card = open(os.path.join(folder, "README.md")).read()
    front = card.split("---")[1]
    assert "library_name: \"diffusers\"" in front and "pipeline_tag: \"text-to-image\"" in front
    assert "license:" in front and "- text-to-image" in front
    assert "trust_remote_code=True" in card and "DiffusionPipeline.from_pretrained" in card

    before = os.path.getmtime(os.path.join(folder, "README.md"))
    assert export_diffusers(exports["microdit"], folder) == folder  # the same weights and settings: left as is
    assert os.path.getmtime(os.path.join(folder, "README.md")) == before
    with pytest.raises(ValueError, match="already holds a finished diffusers folder"):
        export_diffusers(exports["microdit"], folder, use_ema=False)


def test_emmdit_folder_records_its_text_mode(exports, tmp_path):
    folder = export_diffusers(exports["emmdit"], str(tmp_path / "d"))
    index = json.load(open(os.path.join(folder, "model_index.json")))
    assert index["scheduler"] == ["diffusers", "FlowMatchEulerDiscreteScheduler"]  # diffusers' own, no code shipped
    assert index["text_mode"] == "release" and index["clean_caption"] is True
    assert not os.path.exists(os.path.join(folder, "scheduler", "scheduler_flowmatch.py"))


def test_bad_exports_are_named(exports, tmp_path):
    from pipeline.export.export_folder import open_export

    other = tmp_path / "other"
    shutil.copytree(exports["microdit"], other)
    config = json.load(open(other / "config.json"))
    json.dump({**config, "family": "unet"}, open(other / "config.json", "w"))
    with pytest.raises(ValueError, match="unknown model family 'unet'"):
        open_export(str(other))
    json.dump(config, open(other / "config.json", "w"))
    os.remove(other / "ema.safetensors")
    with pytest.raises(FileNotFoundError, match="ema.safetensors"):
        export_diffusers(str(other), str(tmp_path / "o1"))
    small = write_export(tmp_path / "small", _random_model(0))
    config = json.load(open(os.path.join(small, "config.json")))
    config["model"]["dim"] = 96
    json.dump(config, open(os.path.join(small, "config.json"), "w"))
    with pytest.raises(ValueError, match=r"do not match the model config.*shape mismatches"):
        export_diffusers(small, str(tmp_path / "o2"))
    with pytest.raises(ValueError, match="prompt is an empty list"):
        Generator(exports["microdit"], GenerateConfig(steps=1)).pipe([], num_inference_steps=1)


def test_generate_draws_from_a_diffusers_folder_and_names_a_bad_one(exports, tmp_path):
    folder = export_diffusers(exports["microdit"], str(tmp_path / "d"))
    cfg = GenerateConfig(steps=2, seed=4)
    from_folder = Generator(folder, cfg)
    assert from_folder.provenance()["pipeline"] == "MicroDiTPipeline"
    assert np.array_equal(from_folder.sample(PROMPTS), Generator(exports["microdit"], cfg).sample(PROMPTS))

    plain = tmp_path / "plain"
    plain.mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):  # neither an export nor a diffusers folder
        Generator(str(plain), cfg)
    from pipeline.export.loading import check_diffusers_folder

    with pytest.raises(FileNotFoundError, match="has no model_index.json: not a diffusers folder"):
        check_diffusers_folder(str(plain))
    index_path = os.path.join(folder, "model_index.json")
    with open(index_path) as f:
        index = json.load(f)
    with open(index_path, "w") as f:
        json.dump({**index, "scheduler": ["diffusers", "KarrasHeunScheduler"]}, f)
    with pytest.raises(ValueError, match="unknown scheduler class 'KarrasHeunScheduler'"):
        Generator(folder, cfg)
    with open(index_path, "w") as f:
        json.dump({**index, "scheduler": ["scheduler_mine", "MyScheduler"]}, f)
    with pytest.raises(ValueError, match=r"unknown scheduler class 'MyScheduler'.*scheduler_mine\.py"):
        Generator(folder, cfg)
