"""generate on an E-MMDiT export: Euler + CFG against the stored unconditional caption (the empty prompt's)."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from model import family as families
from pipeline.core import schema
from pipeline.generate import GenerateConfig, Generator

PROMPT = ["a large red circle on a white background, center"]


def write_emmdit_export(folder, uncond: np.ndarray | None, seed: int = 0) -> str:
    fam = families.get("emmdit")
    cfg = fam.config("EMMDiT_Debug")
    torch.manual_seed(seed)
    net = fam.build(cfg)
    os.makedirs(folder, exist_ok=True)
    sd = {k: v.contiguous() for k, v in net.state_dict().items()}
    save_file(sd, os.path.join(folder, "model.safetensors"))
    # EMA exports hold parameters only (model/ema.py): the sin-cos table comes from the built model.
    save_file({k: v for k, v in sd.items() if k != "pos_embed.pos_embed"}, os.path.join(folder, "ema.safetensors"))
    config = {"family": "emmdit", "model": fam.config_to_dict(cfg), "step": 3, "stage": {"name": "debug"},
              "objective": {"kind": "rectified_flow", "logit_mean": 0.0, "logit_std": 1.0, "caption_dropout": 0.1,
                            "repa_weight": 0.0},
              "sampler": {"kind": "euler", "steps": 20, "guidance": 4.5},
              "encoders": {"vae": "tiny-dcae", "text": "tiny-llama"}, "unconditional": None}
    if uncond is not None:
        schema.write_unconditional(str(folder), uncond, uncond[-1])
        config["unconditional"] = schema.UNCONDITIONAL_FILE
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f)
    return str(folder)


def test_generate_uses_the_stored_unconditional_caption(tmp_path):
    from model.encoders import load_text_encoder

    uncond = load_text_encoder("tiny-llama").unconditional().numpy()
    stored = write_emmdit_export(tmp_path / "a", uncond)
    other = write_emmdit_export(tmp_path / "b", uncond + 1.0)
    missing = write_emmdit_export(tmp_path / "c", None)  # no file: the text encoder's own empty prompt
    cfg = GenerateConfig(steps=2, seed=1)
    gens = {k: Generator(u, cfg) for k, u in (("a", stored), ("b", other), ("c", missing))}
    a = gens["a"]
    assert type(a.objective).__name__ == "RectifiedFlow" and a.resolution == 64
    assert a.provenance()["unconditional"].endswith(schema.UNCONDITIONAL_FILE)
    assert gens["c"].provenance()["unconditional"] == "text encoder"
    images = {k: g.sample(PROMPT) for k, g in gens.items()}
    assert images["a"].shape == (1, 64, 64, 3) and images["a"].dtype == np.uint8
    assert np.array_equal(images["a"], images["c"])  # the same empty prompt, stored or recomputed
    assert not np.array_equal(images["a"], images["b"])  # the stored one is what guidance uses
    default = Generator(stored, GenerateConfig())
    assert (default.steps, default.guidance) == (20, 4.5)


def test_a_wrong_unconditional_file_is_refused(tmp_path):
    bad = write_emmdit_export(tmp_path / "bad", np.zeros((8, 64), np.float32))
    with pytest.raises(ValueError, match="unconditional caption"):
        Generator(bad, GenerateConfig(steps=1))
