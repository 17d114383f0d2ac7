"""Encoder specs and the tests that tell them apart, without importing any encoder's library: the dispatchers in
__init__.py read these, then import only the one encoder module a spec needs (open_clip, diffusers and
transformers each take seconds to import, in every Ray worker that would not use them)."""
from __future__ import annotations

import json
import os
from pathlib import Path

# SDXL-class VAEs (sdxl_vae.py): hub id -> subfolder holding the VAE.
SDXL_VAE_HUB = {
    "stabilityai/stable-diffusion-xl-base-1.0": "vae",
    "madebyollin/sdxl-vae-fp16-fix": None,
    "ostris/vae-kl-f8-d16": None,  # 16 latent channels
}
DCAE_F32C32 = "mit-han-lab/dc-ae-f32c32-sana-1.0-diffusers"
DCAE_HUB = (DCAE_F32C32,)  # the E-MMDiT release's (dcae.py)
DCAE_TINY = "tiny-dcae"
DFN5B = "hf-hub:apple/DFN5B-CLIP-ViT-H-14-378"  # MicroDiT's text tower (clip_text.py)
CLIP_TINY = "tiny"
LLAMA_3_2_1B = "meta-llama/Llama-3.2-1B"
LLAMA_HUB = (LLAMA_3_2_1B,)  # the E-MMDiT release's (llama.py)
LLAMA_TINY = "tiny-llama"
STANDIN = "standin"


def is_local_spec(spec) -> bool:
    """True for a spec naming a local folder. Hub ids look like relative paths ("org/name"), so a local spec must
    exist or be explicit (absolute, ./relative, ~)."""
    if not isinstance(spec, (str, os.PathLike)):
        return False
    spec = str(spec)
    return os.path.isabs(spec) or spec.startswith((".", "~")) or os.path.isdir(spec)


def _config_says(folder, key: str, value: str) -> bool:
    cfg = Path(folder).expanduser() / "config.json"
    if not cfg.is_file():
        return False
    try:
        return json.loads(cfg.read_text(encoding="utf-8")).get(key) == value
    except ValueError:
        return False


def is_dcae_folder(folder) -> bool:
    """True for a local folder holding an AutoencoderDC config.json."""
    return _config_says(folder, "_class_name", "AutoencoderDC")


def is_llama_folder(folder) -> bool:
    """True for a local folder holding a transformers Llama config (model_type "llama")."""
    return _config_says(folder, "model_type", "llama")


def is_dcae_spec(spec) -> bool:
    return spec == DCAE_TINY or spec in DCAE_HUB or (is_local_spec(spec) and is_dcae_folder(spec))


def is_llama_spec(spec) -> bool:
    return spec == LLAMA_TINY or spec in LLAMA_HUB or (is_local_spec(spec) and is_llama_folder(spec))


def is_open_clip_spec(spec) -> bool:
    hub = isinstance(spec, str) and spec.startswith("hf-hub:") and len(spec) > len("hf-hub:")
    return spec == CLIP_TINY or hub or is_local_spec(spec)
