"""MicroDiT's public release (`VSehwag24/MicroDiT`, folder `ckpts/`): its variants and its tensor names.

The release (SonyResearch/micro_diffusion, `micro_diffusion/models/dit.py` and `utils.py`) saves the DiT's state
dict alone, float32, keys at the top level. Its modules and ours hold the same tensors under other names:
    x_embedder.proj (timm PatchEmbed)   -> x_embedder                  (Conv2d, same (D, C, p, p))
    y_embedder.y_proj.{fc1,norm,fc2}     -> caption_embedder.mlp.*
    y_emb_preprocess.{norm1,attn.qkv,attn.proj,norm2}, .mlp.w1-3 -> caption_embedder.block.*, .ffn.w1-3
    pooled_y_emb_process.*               -> pooled_embedder.*
    patch_mixer_map_{xin,y,xout}.{0,1}   -> mixer_in / mixer_caption / mixer_out .{0,1}  (LayerNorm, Linear)
    patch_mixer.{i}. / blocks.{i}.       -> mixer.{i}. / blocks.{i}. with, inside a block:
        cross_attn.q_linear / kv_linear  -> cross_attn.q / kv    (kv rows: keys then values, as ours)
        mlp.w1 / mlp.w2 (E, D, H) / (E, H, D) expert banks, mlp.gate -> ffn.experts.w1 / w2, ffn.router
        mlp.w{1,2,3}.weight (dense SwiGLU) -> ffn.w{1,2,3}.weight
        adaLN_modulation.1               -> adaLN.1
        norm1-3, attn.qkv (fused q|k|v rows), attn.proj, cross_attn.proj: same names
    final_layer.{norm_final,adaLN_modulation.1,linear} -> final_layer.{norm,adaLN.1,linear}
Bias-free qkv/proj/FFN/mixer maps (the release's MicroDiT_XL_2 sets use_bias=False), bias-free LayerNorms, and
its q/k LayerNorms without parameters (`ln_q`, `ln_k`): no tensors there on either side. The release also stores
two buffers: `pos_embed` (1, T, D), the sin-cos table our network rebuilds from its config (checked equal), and
`mask_token` (1, 1, p*p*C), zeros that fill masked patches (ours writes zeros): both rebuilt on export.
"""
from __future__ import annotations

import re

import torch

from model.family import ReleaseFormat, Variant
from model.positions import sincos_2d

# (release, ours) key prefixes at the top level; longer first where one is a prefix of another.
TOP = (
    ("x_embedder.proj.", "x_embedder."),
    ("t_embedder.mlp.", "t_embedder.mlp."),
    ("y_embedder.y_proj.", "caption_embedder.mlp."),
    ("y_emb_preprocess.mlp.", "caption_embedder.block.ffn."),
    ("y_emb_preprocess.", "caption_embedder.block."),
    ("pooled_y_emb_process.", "pooled_embedder."),
    ("patch_mixer_map_xin.", "mixer_in."),
    ("patch_mixer_map_y.", "mixer_caption."),
    ("patch_mixer_map_xout.", "mixer_out."),
    ("final_layer.norm_final.", "final_layer.norm."),
    ("final_layer.adaLN_modulation.", "final_layer.adaLN."),
    ("final_layer.linear.", "final_layer.linear."),
)
# (release, ours) inside a mixer or backbone block: whole rests for the expert banks, prefixes otherwise.
BLOCK_EXACT = (("mlp.w1", "ffn.experts.w1"), ("mlp.w2", "ffn.experts.w2"))
BLOCK = (
    ("norm1.", "norm1."), ("norm2.", "norm2."), ("norm3.", "norm3."),
    ("attn.qkv.", "attn.qkv."), ("attn.proj.", "attn.proj."),
    ("cross_attn.q_linear.", "cross_attn.q."), ("cross_attn.kv_linear.", "cross_attn.kv."),
    ("cross_attn.proj.", "cross_attn.proj."),
    ("mlp.gate.", "ffn.router."), ("mlp.", "ffn."),
    ("adaLN_modulation.", "adaLN."),
)
BLOCK_LISTS = (("patch_mixer", "mixer"), ("blocks", "blocks"))
_BLOCK_KEY = re.compile(r"([A-Za-z_]+)\.(\d+)\.(.+)")


def _rename(key: str, release_to_ours: bool) -> str | None:
    src, dst = (0, 1) if release_to_ours else (1, 0)
    m = _BLOCK_KEY.fullmatch(key)
    lists = {pair[src]: pair[dst] for pair in BLOCK_LISTS}
    if m and m.group(1) in lists:
        rest = m.group(3)
        head = f"{lists[m.group(1)]}.{m.group(2)}."
        for pair in BLOCK_EXACT:
            if rest == pair[src]:
                return head + pair[dst]
        for pair in BLOCK:
            if rest.startswith(pair[src]):
                return head + pair[dst] + rest[len(pair[src]):]
        return None
    for pair in TOP:
        if key.startswith(pair[src]):
            return pair[dst] + key[len(pair[src]):]
    return None


def release_to_ours(key: str) -> str | None:
    """Our name of a release tensor; None when the release layout has no such tensor."""
    return _rename(key, True)


def ours_to_release(key: str) -> str:
    """The release's name of one of our tensors."""
    out = _rename(key, False)
    if out is None:
        raise ValueError(f"MicroDiT tensor {key!r} has no name in the release layout")
    return out


def _positions(cfg) -> torch.Tensor:
    return sincos_2d(cfg.dim, cfg.grid_size, pos_interp_scale=cfg.pos_interp_scale).unsqueeze(0)  # (1, T, D)


def _mask_token(cfg) -> torch.Tensor:
    return torch.zeros(1, 1, cfg.patch_size ** 2 * cfg.in_channels)


SDXL_VAE = "stabilityai/stable-diffusion-xl-base-1.0"
DFN5B = "hf-hub:apple/DFN5B-CLIP-ViT-H-14-378"
# 512 px: latent 64, positions at scale 2 (docs/RECIPE.md "Released weights"); EDM as the release's
# LatentDiffusion (sigma_data 0.9; the 512-px stages' noise ln(sigma) ~ N(0.0, 0.6^2)); Heun 30 steps, CFG 5.
_XL_512 = {"input_size": 64, "pos_interp_scale": 2.0}
_EDM = {"kind": "edm", "p_mean": 0.0, "p_std": 0.6}  # sigma_data: EDM's own (model/objectives/configs.py)
_HEUN = {"kind": "heun", "steps": 30, "guidance": 5.0}  # the family's sampler defaults (family.py)

VARIANTS = {v.name: v for v in (
    Variant("22M", "dit_4_channel_22M_real_only_data.pt", "MicroDiT_XL_2", {**_XL_512, "in_channels": 4},
            {"vae": SDXL_VAE, "text": DFN5B}, _EDM, _HEUN, {"fid_coco": 12.72, "geneval": 0.46},
            "22M real images"),
    Variant("37M", "dit_4_channel_37M_real_and_synthetic_data.pt", "MicroDiT_XL_2", {**_XL_512, "in_channels": 4},
            {"vae": SDXL_VAE, "text": DFN5B}, _EDM, _HEUN, {"fid_coco": 12.66, "geneval": 0.46},
            "37M images: 22M real, 15M synthetic"),
    Variant("16ch", "dit_16_channel_37M_real_and_synthetic_data.pt", "MicroDiT_XL_2",
            {**_XL_512, "in_channels": 16}, {"vae": "ostris/vae-kl-f8-d16", "text": DFN5B}, _EDM, _HEUN,
            {"fid_coco": 13.04, "geneval": 0.40}, "37M images, 16-channel VAE"),
    Variant("0.5B", "dit_4_channel_0.5B_synthetic_data.pt", "MicroDiT_XL_2", {**_XL_512, "in_channels": 4},
            {"vae": SDXL_VAE, "text": DFN5B}, _EDM, _HEUN, {"fid_coco": 13.26, "geneval": 0.52},
            "490M synthetic images"),
)}

RELEASE = ReleaseFormat(
    family="microdit",
    repo="VSehwag24/MicroDiT",
    variants=VARIANTS,
    to_ours=release_to_ours,
    to_release=ours_to_release,
    buffers={"pos_embed": _positions, "mask_token": _mask_token},
    checked_buffers=("pos_embed",),
    signature="y_emb_preprocess.",
)
