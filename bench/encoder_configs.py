"""Configs of the real encoders, written out so benchmarks build them with random weights and real shapes."""

# SDXL's VAE (stabilityai/stable-diffusion-xl-base-1.0, vae/config.json).
SDXL_VAE_CONFIG = dict(
    in_channels=3, out_channels=3, latent_channels=4, act_fn="silu", layers_per_block=2, norm_num_groups=32,
    block_out_channels=[128, 256, 512, 512], down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4, sample_size=1024, scaling_factor=0.13025, force_upcast=True,
)
# DFN5B-CLIP-ViT-H-14-378's text tower (open_clip ViT-H-14 text config).
DFN5B_TEXT_CONFIG = {"embed_dim": 1024, "quick_gelu": True,
                     "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 1024, "heads": 16,
                                  "layers": 24}}
