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


def write_emmdit_export(folder, uncond: np.ndarray | None, seed: int = 0, text_mode: str | None = None) -> str:
    """An E-MMDiT export as training writes it; `text_mode` None: an older export that recorded none (compact)."""
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
    if text_mode is not None:
        config["encoders"]["text_mode"] = text_mode
    if uncond is not None:
        schema.write_unconditional(str(folder), uncond)
        config["unconditional"] = schema.UNCONDITIONAL_FILE
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f)
    return str(folder)


def test_generate_checks_the_stored_unconditional_caption_against_the_text_mode(tmp_path):
    from model.encoders import load_text_encoder

    release = load_text_encoder("tiny-llama").unconditional().numpy()
    compact = load_text_encoder("tiny-llama", mode="compact").unconditional().numpy()
    assert not np.allclose(release, compact, atol=1e-2)  # the two modes' empty prompts differ
    cfg = GenerateConfig(steps=2, seed=1)
    gens = {"release": Generator(write_emmdit_export(tmp_path / "a", release, text_mode="release"), cfg),
            "legacy": Generator(write_emmdit_export(tmp_path / "b", compact), cfg),  # recorded no mode: compact
            "none": Generator(write_emmdit_export(tmp_path / "c", None, text_mode="release"), cfg)}
    assert gens["release"].pipe.config.text_mode == "release" and gens["legacy"].pipe.config.text_mode == "compact"
    assert gens["release"].provenance()["unconditional"] == "the empty prompt (release text mode)"
    assert gens["release"].resolution == 64 and type(gens["release"].pipe.scheduler).__name__ == \
        "FlowMatchEulerDiscreteScheduler"
    images = {k: g.sample(PROMPT) for k, g in gens.items()}
    assert images["release"].shape == (1, 64, 64, 3) and images["release"].dtype == np.uint8
    assert np.array_equal(images["release"], images["none"])  # the stored file is the encoder's own empty prompt
    assert not np.array_equal(images["release"], images["legacy"])  # the mode changes the caption states
    default = Generator(write_emmdit_export(tmp_path / "d", release, text_mode="release"), GenerateConfig())
    assert (default.steps, default.guidance) == (20, 4.5)


def test_an_unconditional_file_of_another_mode_or_shape_is_refused(tmp_path):
    from model.encoders import load_text_encoder

    compact = load_text_encoder("tiny-llama", mode="compact").unconditional().numpy()
    with pytest.raises(ValueError, match="differs from the empty prompt.*'release' mode"):
        Generator(write_emmdit_export(tmp_path / "mode", compact, text_mode="release"), GenerateConfig(steps=1))
    with pytest.raises(ValueError, match=r"unconditional caption.*shape \(8, 64\)"):
        Generator(write_emmdit_export(tmp_path / "bad", np.zeros((8, 64), np.float32)), GenerateConfig(steps=1))
