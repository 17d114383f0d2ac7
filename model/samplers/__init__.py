"""Samplers, one algorithm per file: each integrates a trained denoiser from noise to latents."""
