"""The families as diffusers pipelines: what microdit draws with, and what an exported model folder carries.

    modeling.py    a family's network as a diffusers model class (ModelMixin + ConfigMixin, our parameter names)
    common.py      what both pipelines share: prompts, noise, decoding
    microdit.py    MicroDiTPipeline: CLIP text states, EDM Heun (model/samplers/edm_heun.py), zeros as the
                   unconditional caption
    emmdit.py      EMMDiTPipeline: Llama text states as the Nitro-E release computes them, flow-matching Euler
                   (diffusers' FlowMatchEulerDiscreteScheduler), the empty prompt as the unconditional caption

None of these files imports microdit itself (only torch, diffusers, transformers, numpy, PIL): an exported folder
(pipeline/export/diffusers.py) carries them, bundled one file per component, and loads where microdit is not
installed. This file imports nothing, so a bundle never drags in the package.
"""
