"""MicroDiT as a diffusers model class (model/pipelines/modeling.py): `MicroDiTTransformer2DModel.from_pretrained`
on an exported folder's `transformer/`, or `from_config(ModelConfig fields)`."""
from __future__ import annotations

from model.microdit.config import ModelConfig
from model.microdit.network import MicroDiT
from model.pipelines.modeling import diffusers_model

MicroDiTTransformer2DModel = diffusers_model(
    MicroDiT, ModelConfig, "MicroDiTTransformer2DModel",
    "MicroDiT (Sehwag et al. 2024) as a diffusers model: forward(c_in x, c_noise, caption) -> (F, keep).",
    __name__)
