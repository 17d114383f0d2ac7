"""E-MMDiT as a model family: rectified flow, Euler sampler, DC-AE f32c32 latents, Llama-3.2-1B caption states."""
from __future__ import annotations

import dataclasses

from torch import nn

from model.emmdit.config import PRESETS, EMMDiTConfig, flops_per_sample
from model.emmdit.network import EMMDiT
from model.emmdit.release import RELEASE
from model.family import Drawing, Family, LatentSpec, SamplerDefaults, TextSpec, latent_side
from model.objectives.configs import RectifiedFlowConfig

DCAE = "mit-han-lab/dc-ae-f32c32-sana-1.0-diffusers"
LLAMA = "meta-llama/Llama-3.2-1B"


def build(cfg: EMMDiTConfig) -> nn.Module:

    return EMMDiT(cfg)


def shard_units(model: nn.Module) -> list[nn.Module]:
    """Joint blocks of the three groups, in forward order."""
    return [blk for group in model.block_groups for blk in group]


def fit(cfg: EMMDiTConfig, latent_shape, caption_shape, pos_interp_scale: float) -> EMMDiTConfig:
    """The network for latents (C, H, W) and captions (L, D): square latent side from the data.

    `pos_interp_scale` (the stage's resolution / base_resolution) is not used: E-MMDiT derives its position
    scale from the latent side (max(side // 16, 1), as the release does), so 512 px -> 1 and 1024 px -> 2.
    """
    h = latent_side(cfg, latent_shape, caption_shape, "E-MMDiT")
    try:
        return dataclasses.replace(cfg, input_size=h)
    except ValueError as e:  # e.g. a grid the token compression or the subregions cannot split
        raise ValueError(f"latent side {h} does not fit E-MMDiT: {e}") from None


def training_flops(cfg: EMMDiTConfig, objective: RectifiedFlowConfig) -> float:
    # The projector runs only when REPA is on; the config's `repa` flag says whether it is built.
    return flops_per_sample(cfg)


def scheduler(objective: RectifiedFlowConfig):
    """The release's sampler: diffusers' flow-matching Euler over 1000 training timesteps, shift 1."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000)


FAMILY = Family(
    name="emmdit",
    title="E-MMDiT",
    config_class=EMMDiTConfig,
    presets=PRESETS,
    build=build,
    flops_per_sample=training_flops,
    shard_units=shard_units,
    fit=fit,
    objectives=("rectified_flow",),
    # Scaling 0.41407 is the release's training-time constant (DC-AE's config says the same); deterministic encode.
    latent=LatentSpec(vae=DCAE, channels=32, downsample=32, scaling_factor=0.41407, encode="mode"),
    text=TextSpec(encoder=LLAMA, tokens=128, width=2048, padding="eos (right, to 128 tokens; no attention mask)",
                  unconditional="empty_prompt"),
    sampler=SamplerDefaults(kind="euler", steps=20, guidance=4.5),
    drawing=Drawing(transformer="model.emmdit.transformer:EMMDiTTransformer2DModel",
                    pipeline="model.pipelines.emmdit:EMMDiTPipeline", scheduler=scheduler),
    release=RELEASE,
    notes={"paper": "arXiv 2510.27135", "release": "amd/Nitro-E"},
)
