"""What the families' pipelines share: checked prompts, per-image noise, the network's shape, and decoding."""
from __future__ import annotations

from typing import Sequence

import torch
from diffusers.image_processor import VaeImageProcessor
from diffusers.utils.torch_utils import randn_tensor

OUTPUT_TYPES = ("pil", "np", "pt", "latent")


def as_prompts(prompt: str | Sequence[str] | None, what: str = "prompt") -> list[str] | None:
    """A list of prompts from a string or a sequence; ValueError naming an empty list or a non-string."""
    if prompt is None:
        return None
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    if not prompts:
        raise ValueError(f"{what} is an empty list; expected a prompt or a non-empty list of prompts")
    bad = [p for p in prompts if not isinstance(p, str)]
    if bad:
        raise ValueError(f"{what} holds {bad[:3]}: expected strings")
    return prompts


def conditional_states(pipe, prompt, prompt_embeds, num_images_per_prompt: int, device) -> torch.Tensor:
    """(prompts x images per prompt, L, D) float32 caption states: `prompt` through the pipeline's `encode_prompt`,
    or the `prompt_embeds` given (exactly one of them)."""
    prompts = as_prompts(prompt)
    if (prompts is None) == (prompt_embeds is None):
        raise ValueError("give prompt or prompt_embeds, exactly one of them")
    cond = (pipe.encode_prompt(prompts) if prompts is not None else prompt_embeds.float()).to(device)
    return cond.repeat_interleave(num_images_per_prompt, 0)


def per_image(negative: torch.Tensor, cond: torch.Tensor, num_images_per_prompt: int) -> torch.Tensor:
    """Negative caption states (one, or one per prompt) lined up with `cond` (one row per image)."""
    if len(negative) == 1:
        return negative.expand_as(cond)
    if len(negative) * num_images_per_prompt != len(cond):
        raise ValueError(f"{len(negative)} negative prompts for {len(cond) // num_images_per_prompt} prompts: "
                         "expected one, or one per prompt")
    return negative.repeat_interleave(num_images_per_prompt, 0)


def network_config(transformer):
    """The network's own config dataclass (`cfg`): the same on the diffusers class and the plain training network."""
    cfg = getattr(transformer, "cfg", None)
    if cfg is None:
        raise ValueError(f"transformer {type(transformer).__name__} has no `cfg`: expected a microdit network")
    return cfg


def network_dtype(transformer) -> torch.dtype:
    return next(transformer.parameters()).dtype


def vae_scale_factor(vae) -> int:
    """Pixels per latent side: AutoencoderDC's `spatial_compression_ratio`, else 2^(blocks - 1) (AutoencoderKL)."""
    ratio = getattr(vae, "spatial_compression_ratio", None)
    if ratio is not None:
        return int(ratio)
    return 2 ** (len(vae.config.block_out_channels) - 1)


def initial_noise(shape: tuple[int, ...], generator, latents: torch.Tensor | None, device) -> torch.Tensor:
    """Standard normal noise (N, C, h, w) float32: `latents` when given (checked), else drawn on the CPU from
    `generator` (a list gives each image its own: the same picture whatever the batch or device)."""
    if latents is not None:
        if tuple(latents.shape) != tuple(shape):
            raise ValueError(f"latents of shape {tuple(latents.shape)}: expected {tuple(shape)}")
        return latents.to(device=device, dtype=torch.float32)
    return randn_tensor(shape, generator=generator, device=torch.device("cpu"), dtype=torch.float32).to(device)


def latent_side(height: int | None, width: int | None, default_side: int, factor: int, patch: int) -> int:
    """The square latent side of a requested image size (default: the network's own); ValueError otherwise."""
    height, width = height or default_side * factor, width or default_side * factor
    if height != width:
        raise ValueError(f"height={height}, width={width}: the families draw square images")
    if height % (factor * patch):
        raise ValueError(f"height={height} is not a multiple of the VAE's {factor} x the network's patch {patch}")
    side = height // factor
    if side != default_side:
        raise ValueError(f"the network was built for {default_side * factor} px ({default_side} latents a side), "
                         f"not {height} px; load it at that resolution")
    return side


def decode(vae, latents: torch.Tensor, output_type: str):
    """Latents -> images as `output_type` ("pil" list, "np" (N, H, W, 3) in [0, 1], "pt", or the latents)."""
    if output_type not in OUTPUT_TYPES:
        raise ValueError(f"output_type={output_type!r}: expected one of {OUTPUT_TYPES}")
    if output_type == "latent":
        return latents
    if vae is None:
        raise ValueError("this pipeline has no VAE: use output_type='latent'")
    scale = float(vae.config.scaling_factor)
    shift = float(getattr(vae.config, "shift_factor", None) or 0.0)
    z = (latents / scale + shift).to(device=vae.device, dtype=vae.dtype)
    images = vae.decode(z).sample.float().clamp(-1, 1)  # (N, 3, H, W)
    return VaeImageProcessor(vae_scale_factor=vae_scale_factor(vae)).postprocess(images, output_type=output_type)
