"""MicroDiT (Sehwag et al. 2024): the network, its blocks and MoE, its config, presets and FLOP count."""
