"""Plain PyTorch, by model family, plus the diffusion pieces the families share.

    family.py         what the pipeline asks of a family (network, presets, objective, sampler, latent/text specs)
    microdit/         MicroDiT (Sehwag et al. 2024): network, blocks, MoE, config and presets, family entry
    emmdit/           E-MMDiT (Shen et al. 2025, "Nitro-E"): network, blocks, config and presets
    objectives/       training objectives, one per file (EDM, rectified flow), their configs, `build(config)`
    samplers/         samplers, one per file (EDM Heun, flow Euler)
    ema.py, positions.py, encoders.py   EMA of weights, 2-D sin-cos positions, frozen VAE and text encoders
Nothing here imports the pipeline, Prefect, Ray or distributed code: parallelism is applied from outside.
"""
