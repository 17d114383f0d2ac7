"""pipeline/generate.py on the debug model: reproducible pixels, batch-size independence, provenance, bad input."""
from __future__ import annotations

import hashlib
import io
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from model.microdit.config import model_config
from model.microdit.network import MicroDiT
import dataclasses
from cli.main import main
from pipeline.generate import GenerateConfig, Generator, generate, read_prompts

PROMPTS = ["a large red circle on a white background, center", "a small blue square on a black background, top left",
           "a large green triangle on a gray background, bottom right"]
FAST = dict(steps=1, batch_size=3)  # one Euler step: these tests are about files, seeds and errors


def _random_model(seed: int) -> MicroDiT:
    torch.manual_seed(seed)
    model = MicroDiT(model_config("MicroDiT_Debug"))
    with torch.no_grad():  # the zero-initialised output layers would make every network the identity
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model


def write_export(folder, model: MicroDiT, ema: MicroDiT | None = None, encoders: bool = True, cfg=None,
                 objective: dict | None = None, legacy: bool = False) -> str:
    """The train step's export layout: model.safetensors, ema.safetensors, config.json (family, model,
    objective, encoders, sampler; `legacy`: the older layout with the model only)."""
    os.makedirs(folder, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, os.path.join(folder, "model.safetensors"))
    save_file({k: v.contiguous() for k, v in (ema or model).state_dict().items()},
              os.path.join(folder, "ema.safetensors"))
    config = {"model": dataclasses.asdict(cfg or model.cfg), "stage": {"name": "debug"}, "step": 7}
    if not legacy:
        config.update(family="microdit", objective=objective or {"kind": "edm", "sigma_data": 0.9},
                      sampler={"kind": "heun", "steps": 30, "guidance": 5.0})
    if encoders:
        config["encoders"] = {"vae": "standin", "text": "tiny"}
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f)
    return str(folder)


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    return write_export(tmp_path_factory.mktemp("export"), _random_model(0), ema=_random_model(1))


def pixels(files):
    return [np.asarray(Image.open(f)) for f in files if not f.endswith("grid.png")]


def test_same_seed_gives_bitwise_equal_pixels(export, tmp_path):
    cfg = GenerateConfig(steps=2, batch_size=3, seed=11)  # Heun: 3 network calls
    a = pixels(generate(export, PROMPTS, str(tmp_path / "a"), cfg))
    b = pixels(generate(export, PROMPTS, str(tmp_path / "b"), cfg))
    assert len(a) == len(PROMPTS)
    assert a[0].shape == (64, 64, 3)  # 16x16 latents x standin downsample 4
    for x, y in zip(a, b):
        assert np.array_equal(x, y)
    assert a[0].std() > 1  # a picture, not a constant
    assert not np.array_equal(a[0], a[1])  # different prompt and seed, different picture


def test_batch_size_does_not_change_images(export):
    gen = Generator(export, GenerateConfig(steps=2, seed=5))
    a = gen.sample(PROMPTS)  # one batch of 3: seeds 5, 6, 7
    b = [gen.sample([p], start=i)[0] for i, p in enumerate(PROMPTS)]  # batches of 1
    c = gen.sample(PROMPTS[1:], seeds=[6, 7])  # what a run with base seed 6 gives for the last two
    pairs = list(zip(a, b)) + list(zip(a[1:], c))
    for x, y in pairs:
        # Batched matmuls sum in a batch-size-dependent order (~1e-6 relative), so a rare pixel may round
        # to the neighbouring level; a seed that followed the batch would change nearly every pixel.
        diff = np.abs(x.astype(int) - y)
        assert diff.max() <= 1 and (diff > 0).mean() < 0.01
    other = gen.sample(PROMPTS[:1], seeds=[6])[0]
    assert (other != a[0]).mean() > 0.1  # the check above can fail: another seed is another picture


def test_seed_and_ema_change_images(export, tmp_path):
    base = pixels(generate(export, PROMPTS[:1], str(tmp_path / "a"), GenerateConfig(steps=1, seed=0)))[0]
    other_seed = pixels(generate(export, PROMPTS[:1], str(tmp_path / "b"), GenerateConfig(steps=1, seed=1)))[0]
    raw = pixels(generate(export, PROMPTS[:1], str(tmp_path / "c"), GenerateConfig(steps=1, seed=0,
                                                                                      use_ema=False)))[0]
    assert not np.array_equal(base, other_seed)
    assert not np.array_equal(base, raw)


def test_png_metadata_and_grid(export, tmp_path):
    files = generate(export, PROMPTS, str(tmp_path / "out"), GenerateConfig(**FAST, seed=3, guidance=4.0))
    assert [os.path.basename(f) for f in files] == ["00000_seed3.png", "00001_seed4.png", "00002_seed5.png",
                                                    "grid.png"]
    meta = Image.open(files[1]).text
    sha = hashlib.sha256(open(os.path.join(export, "ema.safetensors"), "rb").read()).hexdigest()
    assert meta["prompt"] == PROMPTS[1]
    assert (meta["seed"], meta["steps"], meta["guidance"]) == ("4", "1", "4.0")
    assert meta["weights"].endswith("ema.safetensors") and meta["weights_sha256"] == sha
    grid = Image.open(files[-1])
    assert grid.width >= 2 * 64 and grid.height > 2 * 64  # 2x2 cells plus caption strips
    assert json.loads(grid.text["prompts"]) == PROMPTS


def test_rerun_is_a_noop(export, tmp_path):
    out = str(tmp_path / "out")
    files = generate(export, PROMPTS[:2], out, GenerateConfig(**FAST))
    stamps = [os.stat(f).st_mtime_ns for f in files]
    assert generate(export, PROMPTS[:2], out, GenerateConfig(**FAST)) == files
    assert [os.stat(f).st_mtime_ns for f in files] == stamps
    os.remove(files[0])  # an incomplete output is regenerated
    assert generate(export, PROMPTS[:2], out, GenerateConfig(**FAST)) == files
    assert os.path.exists(files[0])


def test_prompt_file_and_cli(export, tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text(PROMPTS[0] + "\n\n" + PROMPTS[1] + "\n")
    assert read_prompts(str(path)) == PROMPTS[:2]
    out = tmp_path / "cli"
    assert main(["generate", export, str(out), "--prompts-file", str(path), "--steps", "1", "--no-ema"]) == 0
    assert sorted(os.listdir(out)) == ["00000_seed0.png", "00001_seed1.png", "generate.json", "grid.png"]
    assert Image.open(out / "00000_seed0.png").text["use_ema"] == "False"


def test_bad_inputs(export, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    with pytest.raises(ValueError, match="no prompts"):
        generate(export, str(empty), str(tmp_path / "o"), GenerateConfig(**FAST))
    with pytest.raises(ValueError, match="no prompts"):
        generate(export, [], str(tmp_path / "o"), GenerateConfig(**FAST))
    with pytest.raises(FileNotFoundError, match="nowhere"):
        generate(export, str(tmp_path / "nowhere.txt"), str(tmp_path / "o"), GenerateConfig(**FAST))
    missing = str(tmp_path / "no-export")
    with pytest.raises(FileNotFoundError, match="no-export.*ema.safetensors"):
        generate(missing, PROMPTS, str(tmp_path / "o"), GenerateConfig(**FAST))
    damaged = write_export(tmp_path / "damaged", _random_model(0))
    with open(os.path.join(damaged, "ema.safetensors"), "wb") as f:
        f.write(b"not a safetensors file")
    with pytest.raises(ValueError, match="damaged.*ema.safetensors' are not a readable safetensors file"):
        generate(damaged, PROMPTS, str(tmp_path / "o"), GenerateConfig(**FAST))


def test_config_that_does_not_match_weights(tmp_path):
    model = _random_model(0)
    deeper = model_config("MicroDiT_Debug", depth=5, dim=96, head_dim=32)
    folder = write_export(tmp_path / "x", model, cfg=deeper)
    expected = r"ema.safetensors' do not match.*missing tensors.*'blocks\.4\.adaLN.*shape mismatches \['blocks\.0"
    with pytest.raises(ValueError, match=expected):
        Generator(folder, GenerateConfig(**FAST))


def test_encoder_specs_from_arguments(tmp_path):
    folder = write_export(tmp_path / "x", _random_model(0), encoders=False)
    with pytest.raises(ValueError, match="records no vae encoder; pass one"):
        Generator(folder, GenerateConfig(**FAST))
    gen = Generator(folder, GenerateConfig(**FAST), vae_spec="standin", text_spec="tiny")
    assert gen.sample(PROMPTS[:1]).shape == (1, 64, 64, 3)


def test_weights_and_output_on_s3(export, tmp_path, s3_endpoint, s3_bucket, monkeypatch):
    from pipeline.core import storage

    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    remote = f"s3://{s3_bucket}/run/train/stage1/export"
    for name in ("ema.safetensors", "config.json"):
        storage.write_bytes(f"{remote}/{name}", open(os.path.join(export, name), "rb").read())
    out = f"s3://{s3_bucket}/run/samples"
    files = generate(remote, PROMPTS[:2], out, GenerateConfig(**FAST))
    assert files == [f"{out}/00000_seed0.png", f"{out}/00001_seed1.png", f"{out}/grid.png"]
    local = pixels(generate(export, PROMPTS[:2], str(tmp_path / "local"), GenerateConfig(**FAST)))
    remote_png = Image.open(io.BytesIO(storage.read_bytes(files[0])))
    assert remote_png.text["prompt"] == PROMPTS[0]
    assert np.array_equal(np.asarray(remote_png), local[0])
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        generate(remote, PROMPTS[:1], out, GenerateConfig(**FAST, use_ema=False))


def test_bfloat16_is_close_to_float32(export):
    a = Generator(export, GenerateConfig(steps=2)).sample(PROMPTS[:2])
    gen = Generator(export, GenerateConfig(steps=2, dtype="bfloat16"))  # what a GPU gets by default
    b = gen.sample(PROMPTS[:2])
    assert gen.provenance()["dtype"] == "bfloat16"
    assert next(gen.pipe.transformer.parameters()).dtype == torch.bfloat16  # the network; the ODE state stays fp64
    diff = np.abs(a.astype(int) - b)
    assert 0 < diff.mean() < 4  # bf16 rounding shows, but the pictures are the same


def test_cli_generate_from_an_export_alone(export, tmp_path, capsys):
    out = tmp_path / "cli"
    assert main(["generate", export, str(out), "--prompt", PROMPTS[0], "--steps", "2", "--seed", "3"]) == 0
    written = capsys.readouterr().out.split()
    assert str(out / "grid.png") in written
    image = Image.open(next(f for f in written if not f.endswith("grid.png")))
    assert image.text["prompt"] == PROMPTS[0] and image.text["seed"] == "3"

    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    assert main(["generate", export, str(tmp_path / "none"), "--prompts-file", str(empty)]) == 2
    assert "empty" in capsys.readouterr().err.lower()


def test_sampler_reads_the_objective_and_defaults_from_the_export(tmp_path):
    """One owner: sigma_data and the sampler defaults come from the export's config.json, not from defaults."""
    model = _random_model(0)
    edm09 = write_export(tmp_path / "a", model)
    edm05 = write_export(tmp_path / "b", model, objective={"kind": "edm", "sigma_data": 0.5})
    legacy = write_export(tmp_path / "c", model, legacy=True)  # older exports: MicroDiT + EDM, sigma_data 0.9
    cfg = GenerateConfig(steps=2, seed=3)
    gens = {name: Generator(uri, cfg) for name, uri in (("0.9", edm09), ("0.5", edm05), ("legacy", legacy))}
    assert [g.pipe.scheduler.config.sigma_data for g in gens.values()] == [0.9, 0.5, 0.9]
    images = {name: g.sample(PROMPTS[:1]) for name, g in gens.items()}
    assert np.array_equal(images["0.9"], images["legacy"])
    assert not np.array_equal(images["0.9"], images["0.5"])
    default = Generator(edm09, GenerateConfig(seed=3))  # no steps/guidance given: the export's sampler defaults
    assert (default.steps, default.guidance) == (30, 5.0)
    assert json.loads(default.provenance()["objective"]) == {"kind": "edm", "sigma_data": 0.9}
