"""Data a recipe moves: bytes per row of latents and caption states at the recipe's resolutions, storage for N
images, the input rate each GPU needs at the predicted speed, and the CPU cores it takes at the input pipeline's
measured cost (bench/README.md, "The byte layout": the product's Ray path read and decoded 146 MB per CPU-second,
all its processes counted; measured 2026-12-03 on the 2-core build machine)."""
from __future__ import annotations

import math

INPUT_MB_PER_CPU_SECOND = 146.0  # bench/input_pipeline.py, the byte layout's Ray path (bench/README.md)
INPUT_SOURCE = "bench/README.md: input pipeline, byte layout, Ray path (146 MB per CPU-s, 2026-12-03)"
FLOAT16 = 2


def latent_bytes(channels: int, resolution: int, downsample: int) -> int:
    side = resolution // downsample
    return channels * side * side * FLOAT16


def caption_bytes(tokens: int, width: int) -> int:
    """A caption's states as stored: every row (open_clip's 77, or Llama's 128 in the release's text mode)."""
    return tokens * width * FLOAT16


def latent_geometry(family, vae_spec: str | None, channels: int) -> tuple[int, int]:
    """(channels, downsample) of the run's latents. The family's release VAE, or another hub VAE (not downloaded to
    plan: assumed to downsample as the family's, with the network's `channels`), by the family's LatentSpec; a
    stand-in, tiny or local VAE is built (no download) and asked."""
    from model.encoders import load_vae
    from model.encoders.specs import DCAE_TINY, STANDIN, is_local_spec

    if vae_spec in (STANDIN, DCAE_TINY) or is_local_spec(vae_spec):
        vae = load_vae(vae_spec)
        return vae.latent_channels, vae.downsample
    return (family.latent.channels if vae_spec in (None, family.latent.vae) else channels), family.latent.downsample


def row_bytes(latent: tuple[int, int], caption: tuple[int, int], resolutions: list[int],
              repa_shape: tuple[int, int] | None = None) -> dict[str, int]:
    """Bytes of one stored row: a latent per resolution ((channels, downsample)), the caption states ((tokens,
    width)), REPA features if any."""
    out = {f"latents_{r}": latent_bytes(latent[0], r, latent[1]) for r in resolutions}
    out["caption_states"] = caption_bytes(*caption)
    if repa_shape is not None:
        out["repa_features"] = math.prod(repa_shape) * FLOAT16
    return out


def read_bytes_per_sample(rows: dict[str, int], resolution: int, repa: bool) -> int:
    """What a stage's trainer reads a sample: its resolution's latent, the caption states, and the REPA features
    only when the stage uses them (its dataset leaves the column out otherwise)."""
    wanted = {f"latents_{resolution}", "caption_states"} | ({"repa_features"} if repa else set())
    return sum(v for k, v in rows.items() if k in wanted)


def cores_per_gpu(bytes_per_s: float) -> float:
    return bytes_per_s / (INPUT_MB_PER_CPU_SECOND * 1e6)
