"""Sample grids during training: fixed prompts, EMA weights, drawn through the family's diffusers pipeline (the
scheduler its objective implies, CFG), a PNG under {stage}/samples/."""
from __future__ import annotations

import io

import numpy as np
import torch
from torch import nn

from model.encoders import load_vae
from pipeline.core import storage
from pipeline.train.parallelize import reshard_all


@torch.no_grad()
def sample_latents(model: nn.Module, ema, captions: torch.Tensor, family, objective_config,
                   unconditional: torch.Tensor | None, *, steps: int, guidance: float, seed: int) -> torch.Tensor:
    """Latents (K, C, H, W) drawn with the EMA weights (swapped in, then back) from precomputed caption states, by
    the family's pipeline without encoders; run on every rank (FSDP). `unconditional`: the empty prompt's states
    (None: the family's own, zeros for MicroDiT)."""
    backup = {n: p.detach().clone() for n, p in model.named_parameters()}
    ema.copy_to(model)
    try:
        pipe = family.drawing.pipeline_class()(transformer=model, scheduler=family.drawing.scheduler(objective_config))
        pipe.set_progress_bar_config(disable=True)
        noise = torch.randn((captions.shape[0], *_latent_shape(model)), generator=torch.Generator().manual_seed(seed))
        negative = None if unconditional is None else unconditional.reshape(1, *unconditional.shape[-2:])
        return pipe(prompt_embeds=captions, negative_prompt_embeds=negative, num_inference_steps=steps,
                    guidance_scale=guidance, latents=noise, output_type="latent").images
    finally:
        reshard_all(model)  # forwards without backward leave the last block gathered
        for n, p in model.named_parameters():
            p.copy_(backup[n])


def _latent_shape(model: nn.Module) -> tuple[int, int, int]:
    cfg = model.cfg
    return (cfg.in_channels, cfg.input_size, cfg.input_size)


def to_pixels(latents: torch.Tensor, vae_spec: str | None) -> np.ndarray:
    """(K, 3, H, W) uint8 pictures: decoded with the VAE when given, else the first 3 channels, normalised."""
    if vae_spec:

        x = load_vae(vae_spec).decode(latents.float().cpu())  # (K, 3, H*f, W*f) in [-1, 1]
    else:
        x = latents[:, :3].float().cpu()
        lo = x.amin(dim=(1, 2, 3), keepdim=True)
        hi = x.amax(dim=(1, 2, 3), keepdim=True)
        x = (x - lo) / (hi - lo).clamp_min(1e-6) * 2 - 1
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()


def grid_png(pixels: np.ndarray, columns: int = 4) -> bytes:
    """PNG bytes of (K, 3, H, W) uint8 pictures laid out in rows of `columns`."""
    from PIL import Image

    k, _, h, w = pixels.shape
    cols = min(columns, k)
    rows = (k + cols - 1) // cols
    canvas = np.full((rows * h, cols * w, 3), 255, dtype=np.uint8)
    for i in range(k):
        r, c = divmod(i, cols)
        canvas[r * h:(r + 1) * h, c * w:(c + 1) * w] = pixels[i].transpose(1, 2, 0)
    buf = io.BytesIO()
    Image.fromarray(canvas).save(buf, format="PNG")
    return buf.getvalue()


def write_grid(stage_uri: str, step: int, latents: torch.Tensor, vae_spec: str | None) -> str:
    """Write samples/step_<step>.png; returns its URI."""
    uri = storage.join(stage_uri, "samples", f"step_{step:09d}.png")
    storage.write_bytes(uri, grid_png(to_pixels(latents, vae_spec)))
    return uri
