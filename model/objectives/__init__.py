"""Training objectives, one algorithm per file: each turns (network, clean latents, captions) into a loss."""
