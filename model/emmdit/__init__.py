"""E-MMDiT (Shen et al. 2025, AMD "Nitro-E"): the network, its blocks, its config, presets and FLOP count."""
