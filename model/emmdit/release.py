"""E-MMDiT's public release (AMD `amd/Nitro-E`, MIT): its variants; its tensor names are ours.

The release's `EMMDiTTransformer` (diffusers modules) names its tensors `pos_embed.{proj.*,pos_embed}`,
`adaln_single.{emb.timestep_embedder.linear_{1,2},linear}.*`, `context_embedder.*`,
`block_groups.{g}.{i}.{norm1,norm1_context,attn.{to_q,to_k,to_v,norm_q,norm_k,add_{q,k,v}_proj,norm_added_{q,k},
to_out.0,to_add_out},ff.net.{0.proj,2},ff_context.*,scale_shift_{bias,scale}[_c]}`,
`tokencompressor.0.0.body{2x,4x}.{1,3}.*`, `tokenreconstructor.0.0.{body2x,body4x,mergers}.*` and `proj_out.*`;
model/emmdit keeps those module names, so the map is the identity (its fixed (1, 96*96, D) sin-cos table
`pos_embed.pos_embed` is a persistent buffer on both sides). Training-only REPA projectors (`projectors.*`), if a
file carries them, are dropped on import.
"""
from __future__ import annotations

from model.family import ReleaseFormat, Variant

DC_AE = "mit-han-lab/dc-ae-f32c32-sana-1.0-diffusers"
LLAMA = "meta-llama/Llama-3.2-1B"
_RF = {"kind": "rectified_flow"}  # the objective's own constants (model/objectives/configs.py)
# The release computes caption states its own way (masked Llama, every row, cleaned captions): model/pipelines/emmdit.py
_ENC = {"vae": DC_AE, "text": LLAMA, "text_mode": "release"}

VARIANTS = {v.name: v for v in (
    Variant("512px", "Nitro-E-512px.safetensors", "EMMDiT_512", {}, _ENC, _RF,
            {"kind": "euler", "steps": 20, "guidance": 4.5}, {"geneval": 0.66},
            "GenEval: the paper's 512 px figure; no FID published"),
    Variant("512px-dist", "Nitro-E-512px-dist.safetensors", "EMMDiT_512", {}, _ENC, _RF,
            {"kind": "euler", "steps": 4, "guidance": 1.0}, {},
            "4-step distilled, no guidance; no scores published"),
)}


RELEASE = ReleaseFormat(
    family="emmdit",
    repo="amd/Nitro-E",
    variants=VARIANTS,
    to_ours=lambda key: key,
    to_release=lambda key: key,
    dropped=("projectors.",),
    signature="block_groups.",
    license="mit",  # the LICENSE of github.com/AMD-AGI/Nitro-E
)
