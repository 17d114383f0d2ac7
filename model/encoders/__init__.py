"""Frozen encoders, one per file, loaded by spec: the same code paths load the real weights and the tiny test models.

    sdxl_vae.py    SDXL VAE (diffusers AutoencoderKL): MicroDiT's latents
    dcae.py        DC-AE f32c32 (diffusers AutoencoderDC): E-MMDiT's latents
    standin.py     the parameter-free stand-in autoencoder of the CPU demo
    clip_text.py   DFN5B CLIP text tower (open_clip): MicroDiT's caption states
    llama.py       Llama-3.2-1B (transformers): E-MMDiT's caption states
    dino.py        DINOv2 (transformers): REPA's patch features
    specs.py       the specs and how to tell them apart (no encoder library imported)
    checks.py      shape checks they share

`load_vae`, `load_text_encoder`, `load_text_components` and `load_repa_encoder` pick the encoder a spec names and
import only its module ("module:function" below, as model/family.py's registry): a Ray worker that uses the
stand-in VAE never pays for open_clip or diffusers.
"""
from __future__ import annotations

import torch

from model.encoders import specs
from model.family import load_attribute

VAE_SPECS_HELP = (f"one of {sorted(specs.SDXL_VAE_HUB) + list(specs.DCAE_HUB)}, {specs.STANDIN!r}, "
                  f"{specs.DCAE_TINY!r}, or a local diffusers VAE folder (absolute or ./relative)")
TEXT_SPECS_HELP = (f"{specs.DFN5B!r} (or another 'hf-hub:' open_clip repo), {specs.CLIP_TINY!r}, a local folder from "
                   f"save_tiny_text_encoder, {specs.LLAMA_3_2_1B!r}, {specs.LLAMA_TINY!r}, or a local Llama folder")
LOADERS = {
    "standin": "model.encoders.standin:StandinVAE",
    "dcae": "model.encoders.dcae:load_dcae",
    "sdxl_vae": "model.encoders.sdxl_vae:load_sdxl_vae",
    "llama": "model.encoders.llama:load_llama",
    "open_clip": "model.encoders.clip_text:load_open_clip",
    "clip_as_transformers": "model.encoders.clip_text:to_transformers",
    "dino": "model.encoders.dino:load_dino",
}


def load_vae(spec: str, device="cpu", dtype: torch.dtype = torch.float32):
    """A VAE by spec ({VAE_SPECS_HELP}); bf16 on GPU, fp32 on CPU. The SDXL VAE overflows in fp16: refused."""
    if spec == specs.STANDIN:
        return load_attribute(LOADERS["standin"])(device, dtype)
    if specs.is_dcae_spec(spec):
        return load_attribute(LOADERS["dcae"])(str(spec), device, dtype)
    if spec in specs.SDXL_VAE_HUB or specs.is_local_spec(spec):
        return load_attribute(LOADERS["sdxl_vae"])(str(spec), device, dtype)
    raise ValueError(f"unknown VAE spec {spec!r}; expected {VAE_SPECS_HELP}")


def load_text_encoder(spec: str, device="cpu", dtype: torch.dtype = torch.float32, tokens: int | None = None,
                      mode: str = "release"):
    """A caption encoder by spec ({TEXT_SPECS_HELP}). `tokens`: the padded length (Llama: any, default its spec's;
    open_clip towers: their fixed context length, or None). `mode`: Llama's text mode (model/encoders/llama.py);
    open_clip towers have one way only ("release")."""
    if specs.is_llama_spec(spec):
        return load_attribute(LOADERS["llama"])(str(spec), device, dtype, tokens, mode)
    if not specs.is_open_clip_spec(spec):
        raise ValueError(f"unknown text encoder spec {spec!r}; expected {TEXT_SPECS_HELP}")
    if mode != "release":
        raise ValueError(f"text mode {mode!r} is for Llama caption encoders; {spec!r} encodes one way ('release')")
    enc = load_attribute(LOADERS["open_clip"])(spec, device, dtype)
    if tokens is not None and tokens != enc.context_length:
        raise ValueError(f"text encoder {spec!r} has a fixed context length {enc.context_length}, not {tokens}")
    return enc


def load_text_components(spec: str, device="cpu", dtype: torch.dtype = torch.float32, tokens: int | None = None):
    """(text_encoder, tokenizer) as transformers objects for a diffusers pipeline: Llama as loaded; an open_clip
    tower as the CLIPTextModel computing the same states (clip_text.to_transformers)."""
    if specs.is_llama_spec(spec):
        enc = load_text_encoder(spec, device, dtype, tokens)
        return enc.model, enc.tokenizer
    return load_attribute(LOADERS["clip_as_transformers"])(load_text_encoder(spec, device, dtype, tokens))


def unconditional_caption(encoder) -> torch.Tensor:
    """(L, D) float32 unconditional caption for classifier-free guidance: the encoder's empty-prompt embedding
    when it defines one (Llama), else zeros (open_clip towers, as MicroDiT trains)."""
    if hasattr(encoder, "unconditional"):
        return encoder.unconditional().cpu()
    return torch.zeros(encoder.context_length, encoder.width)


def load_repa_encoder(spec: str, device="cpu", dtype: torch.dtype = torch.float32):
    """REPA's image feature encoder by spec: DINOv2 (model/encoders/dino.py lists the specs)."""
    return load_attribute(LOADERS["dino"])(spec, device, dtype)
