"""MicroDiT network and diffusion components (plain PyTorch)."""
