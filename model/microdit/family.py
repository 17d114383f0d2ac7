"""MicroDiT as a model family: EDM objective, Heun sampler, SDXL-VAE latents, DFN5B-CLIP caption states."""
from __future__ import annotations

import dataclasses

from torch import nn

from model.family import Drawing, Family, LatentSpec, SamplerDefaults, TextSpec, latent_side
from model.microdit.config import PRESETS, ModelConfig, flops_per_sample
from model.microdit.network import MicroDiT
from model.microdit.release import RELEASE
from model.objectives.configs import EDMConfig


def build(cfg: ModelConfig) -> nn.Module:

    return MicroDiT(cfg)


def shard_units(model: nn.Module) -> list[nn.Module]:
    """Mixer blocks, then backbone blocks."""
    return list(model.mixer) + list(model.blocks)


def fit(cfg: ModelConfig, latent_shape, caption_shape, pos_interp_scale: float) -> ModelConfig:
    """The network for latents (C, H, W) and captions (L, D): square side from the data, positions scaled."""
    h = latent_side(cfg, latent_shape, caption_shape, "MicroDiT")
    return dataclasses.replace(cfg, input_size=h, pos_interp_scale=pos_interp_scale)


def training_flops(cfg: ModelConfig, objective: EDMConfig) -> float:
    return flops_per_sample(cfg, objective.mask_ratio)


def scheduler(objective: EDMConfig):
    """EDM Heun with the network's sigma_data (model/samplers/edm_heun.py)."""
    from model.samplers.edm_heun import EDMHeunScheduler

    return EDMHeunScheduler(sigma_data=objective.sigma_data)


FAMILY = Family(
    name="microdit",
    title="MicroDiT",
    config_class=ModelConfig,
    presets=PRESETS,
    build=build,
    flops_per_sample=training_flops,
    shard_units=shard_units,
    fit=fit,
    objectives=("edm",),
    latent=LatentSpec(vae="stabilityai/stable-diffusion-xl-base-1.0", channels=4, downsample=8, scaling_factor=None),
    text=TextSpec(encoder="hf-hub:apple/DFN5B-CLIP-ViT-H-14-378", tokens=77, width=1024,
                  padding="open_clip (zeros after EOT)", unconditional="zeros"),
    sampler=SamplerDefaults(kind="heun", steps=30, guidance=5.0),
    drawing=Drawing(transformer="model.microdit.transformer:MicroDiTTransformer2DModel",
                    pipeline="model.pipelines.microdit:MicroDiTPipeline", scheduler=scheduler),
    release=RELEASE,
)
