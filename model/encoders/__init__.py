"""Frozen encoders, one per file, loaded by spec: the same code paths load the real weights and the tiny test models.

    sdxl_vae.py    SDXL VAE (diffusers AutoencoderKL): MicroDiT's latents
    dcae.py        DC-AE f32c32 (diffusers AutoencoderDC): E-MMDiT's latents
    standin.py     the parameter-free stand-in autoencoder of the CPU demo
    clip_text.py   DFN5B CLIP text tower (open_clip): MicroDiT's caption states
    llama.py       Llama-3.2-1B (transformers): E-MMDiT's caption states
    dino.py        DINOv2 (transformers): REPA's patch features
    checks.py      shape checks and spec helpers they share

`load_vae`, `load_text_encoder` and `load_repa_encoder` pick the encoder a spec names.
"""
from __future__ import annotations

import torch

from model.encoders import clip_text, dcae, dino, llama, sdxl_vae
from model.encoders.checks import is_local_spec
from model.encoders.standin import StandinVAE

VAE_SPECS_HELP = (f"one of {sorted(sdxl_vae.VAE_HUB) + list(dcae.HUB)}, 'standin', {dcae.TINY!r}, or a local diffusers "
                  "VAE folder (absolute or ./relative)")
TEXT_SPECS_HELP = (f"{clip_text.DFN5B!r} (or another 'hf-hub:' open_clip repo), 'tiny', a local folder from "
                   f"save_tiny_text_encoder, {llama.HUB[0]!r}, {llama.TINY!r}, or a local Llama folder")


def load_vae(spec: str, device="cpu", dtype: torch.dtype = torch.float32):
    """A VAE by spec ({VAE_SPECS_HELP}); bf16 on GPU, fp32 on CPU. The SDXL VAE overflows in fp16: refused."""
    if spec == "standin":
        return StandinVAE(device, dtype)
    if spec == dcae.TINY or spec in dcae.HUB or (is_local_spec(spec) and dcae.is_dcae_folder(spec)):
        return dcae.load_dcae(str(spec), device, dtype)
    if spec in sdxl_vae.VAE_HUB or is_local_spec(spec):
        return sdxl_vae.load_sdxl_vae(str(spec), device, dtype)
    raise ValueError(f"unknown VAE spec {spec!r}; expected {VAE_SPECS_HELP}")


def load_text_encoder(spec: str, device="cpu", dtype: torch.dtype = torch.float32, tokens: int | None = None):
    """A caption encoder by spec ({TEXT_SPECS_HELP}). `tokens`: the padded length (Llama: any, default its spec's;
    open_clip towers: their fixed context length, or None)."""
    if spec == llama.TINY or spec in llama.HUB or (is_local_spec(spec) and llama.is_llama_folder(spec)):
        return llama.load_llama(str(spec), device, dtype, tokens)
    hub = isinstance(spec, str) and spec.startswith("hf-hub:") and len(spec) > len("hf-hub:")
    if not (spec == "tiny" or hub or is_local_spec(spec)):
        raise ValueError(f"unknown text encoder spec {spec!r}; expected {TEXT_SPECS_HELP}")
    enc = clip_text.load_open_clip(spec, device, dtype)
    if tokens is not None and tokens != enc.context_length:
        raise ValueError(f"text encoder {spec!r} has a fixed context length {enc.context_length}, not {tokens}")
    return enc


def unconditional_caption(encoder) -> torch.Tensor:
    """(L, D) float32 unconditional caption for classifier-free guidance: the encoder's empty-prompt embedding
    when it defines one (Llama), else zeros (open_clip towers, as MicroDiT trains)."""
    if hasattr(encoder, "unconditional"):
        return encoder.unconditional().cpu()
    return torch.zeros(encoder.context_length, encoder.width)


def load_repa_encoder(spec: str, device="cpu", dtype: torch.dtype = torch.float32):
    """REPA's image feature encoder by spec: DINOv2 (model/encoders/dino.py lists the specs)."""
    return dino.load_dino(spec, device, dtype)
