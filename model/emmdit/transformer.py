"""E-MMDiT as a diffusers model class (model/pipelines/modeling.py): `EMMDiTTransformer2DModel.from_pretrained` on
an exported folder's `transformer/`, or `from_config(EMMDiTConfig fields)`."""
from __future__ import annotations

from model.emmdit.config import EMMDiTConfig
from model.emmdit.network import EMMDiT
from model.pipelines.modeling import diffusers_model

EMMDiTTransformer2DModel = diffusers_model(
    EMMDiT, EMMDiTConfig, "EMMDiTTransformer2DModel",
    "E-MMDiT (Shen et al. 2025, Nitro-E) as a diffusers model: forward(x_t, t in [0, 1], caption) -> velocity.",
    __name__)
