"""Nitro-E drawn as its release draws. A file in the release's layout (random weights) is imported with
`microdit import-weights --diffusers`, and the folder's pipeline must give the latents and pixels that the release's
own procedure gives for the same weights, text encoder, prompts and noise.

The procedure below is written from the release's pipeline (AMD-AGI/Nitro-E core/models/emmdit_pipeline.py and
core/tools/inference_pipe.py), step by step, with the libraries it uses, not with model/pipelines/:
  1. captions lower-cased and stripped, or (clean_caption, on by default in its __call__) cleaned twice with the
     DeepFloyd-IF cleaner it copies from diffusers' PixArt pipeline;
  2. the tokenizer pads with EOS, to max_length 128, truncating, special tokens added;
  3. Llama loaded as AutoModelForCausalLM runs with that attention mask; output_hidden_states[-1], all 128 rows;
  4. the negative prompt "" the same way; the batch is [negative, positive];
  5. FlowMatchEulerDiscreteScheduler(1000), set_timesteps(steps);
  6. each step: the transformer sees the duplicated latents and the raw timestep t (its own time embedding scales
     nothing); v = v_u + g (v_c - v_u); latents = scheduler.step(v, t, latents);
  7. pixels = vae.decode(latents / scaling_factor), post-processed by PixArt's image processor.
The release's transformer is our network (bit-identical to it: tests/test_emmdit.py) with the timestep scale set to
1, so it takes t in [0, 1000] as the release's does.
"""
from __future__ import annotations

import json
import os

import pytest
import torch
from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler
from diffusers.image_processor import PixArtImageProcessor
from diffusers.pipelines.pixart_alpha.pipeline_pixart_alpha import PixArtAlphaPipeline
from transformers import AutoModelForCausalLM, AutoTokenizer

from cli.main import main
from model import family as families
from model.encoders.dcae import build_tiny as tiny_dcae
from model.encoders.llama import save_tiny_llama
from model.family import Variant
from pipeline.weights import get_format
from test_import_weights import release_file

TOKENS = 128  # the release's max_sequence_length
PROMPTS = ["A Large RED circle <b>on</b> a white background https://example.com/x.png", "  a small blue square  "]
STEPS, GUIDANCE = 6, 4.5
NITRO_DEBUG = Variant("debug", "nitro_e_debug.safetensors", "EMMDiT_Debug", {"caption_len": TOKENS},
                      {"vae": "tiny-dcae", "text": "tiny-llama", "text_mode": "release"}, {"kind": "rectified_flow"},
                      {"kind": "euler", "steps": 20, "guidance": GUIDANCE}, {})


def release_text_states(tokenizer, text_encoder, prompts: list[str]) -> torch.Tensor:
    """Steps 1-3 of the module docstring."""
    cleaner = PixArtAlphaPipeline.__new__(PixArtAlphaPipeline)  # its caption cleaner, as the release copies it
    texts = cleaner._text_preprocessing(prompts, clean_caption=True)
    batch = tokenizer(texts, padding="max_length", max_length=TOKENS, truncation=True, add_special_tokens=True,
                      return_tensors="pt")
    out = text_encoder(batch.input_ids, attention_mask=batch.attention_mask, output_hidden_states=True)
    return out["hidden_states"][-1]


@torch.no_grad()
def release_draw(net_weights: dict, net_cfg, llama_folder: str, vae, noise: torch.Tensor):
    """The whole procedure (module docstring) -> (latents, pixels as numpy)."""
    fam = families.get("emmdit")
    transformer = fam.build(dataclasses_replace(net_cfg, timestep_scale=1.0)).eval()
    transformer.load_state_dict(net_weights, strict=True)
    tokenizer = AutoTokenizer.from_pretrained(llama_folder)
    tokenizer.pad_token = tokenizer.eos_token
    text_encoder = AutoModelForCausalLM.from_pretrained(llama_folder).eval()
    positive = release_text_states(tokenizer, text_encoder, PROMPTS)
    negative = release_text_states(tokenizer, text_encoder, [""] * len(PROMPTS))
    states = torch.cat([negative, positive])
    scheduler = FlowMatchEulerDiscreteScheduler(1000)
    scheduler.set_timesteps(STEPS)
    latents = noise.clone()
    for t in scheduler.timesteps:
        v = transformer(torch.cat([latents] * 2), t.expand(2 * len(PROMPTS)), states)
        v_u, v_c = v.chunk(2)
        latents = scheduler.step(v_u + GUIDANCE * (v_c - v_u), t, latents, return_dict=False)[0]
    pixels = vae.decode(latents / vae.config.scaling_factor).sample
    return latents, PixArtImageProcessor(vae_scale_factor=4).postprocess(pixels, output_type="np")


def dataclasses_replace(cfg, **changes):
    import dataclasses

    return dataclasses.replace(cfg, **changes)


@pytest.fixture
def nitro_debug(monkeypatch):
    monkeypatch.setitem(get_format("emmdit").variants, "debug", NITRO_DEBUG)


def test_imported_release_draws_as_the_release_procedure(nitro_debug, tmp_path, capsys):
    from safetensors.torch import load_file

    fmt = get_format("emmdit")
    path, release = release_file(tmp_path, fmt, NITRO_DEBUG)
    folder = str(tmp_path / "diffusers")
    assert main(["import-weights", path, str(tmp_path / "export"), "--family", "emmdit", "--diffusers", folder]) == 0
    assert "diffusers folder ->" in capsys.readouterr().out
    index = json.load(open(os.path.join(folder, "model_index.json")))
    assert index["text_mode"] == "release" and index["guidance_scale"] == GUIDANCE

    pipe = DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)
    pipe.set_progress_bar_config(disable=True)
    cfg = fmt.config(NITRO_DEBUG.preset, NITRO_DEBUG.overrides)
    noise = torch.randn(len(PROMPTS), cfg.in_channels, cfg.input_size, cfg.input_size,
                        generator=torch.Generator().manual_seed(0))
    ours = pipe(PROMPTS, num_inference_steps=STEPS, latents=noise, output_type="latent").images
    ours_np = pipe(PROMPTS, num_inference_steps=STEPS, latents=noise, output_type="np").images

    weights = load_file(os.path.join(tmp_path / "export", "model.safetensors"))
    llama = save_tiny_llama(tmp_path / "llama")  # the same fixed-seed weights "tiny-llama" builds
    want, want_np = release_draw(weights, cfg, llama, tiny_dcae().eval(), noise)
    torch.testing.assert_close(ours, want, rtol=1e-5, atol=1e-5)
    assert abs(ours_np - want_np).max() < 1e-5

    # The release's conditioning is what makes them agree: the old compact states (no mask, one pad row) do not.
    compact = pipe.__class__(**pipe.components, num_inference_steps=STEPS, guidance_scale=GUIDANCE,
                             text_mode="compact")
    compact.set_progress_bar_config(disable=True)
    other = compact(PROMPTS, num_inference_steps=STEPS, latents=noise, output_type="latent").images
    assert (other - want).abs().max() > 1e-3
