"""Frozen encoders: the SDXL VAE (diffusers) for latents and the DFN5B CLIP text tower (open_clip) for captions.

Real weights load through the same code paths as the tiny test models: a diffusers `AutoencoderKL` folder and an
open_clip config JSON + safetensors. Specs:
  VAE:  "stabilityai/stable-diffusion-xl-base-1.0" (subfolder vae), "madebyollin/sdxl-vae-fp16-fix",
        "ostris/vae-kl-f8-d16" (16 channels, no subfolder: the 16-channel released MicroDiT's),
        a local folder written by `save_pretrained` / `save_tiny_vae`, or "standin" (parameter-free, f=4).
  Text: "hf-hub:apple/DFN5B-CLIP-ViT-H-14-378" (any "hf-hub:" open_clip repo with a plain text tower),
        a local folder written by `save_tiny_text_encoder`, or "tiny" (width 64, fixed seed).
"""
from __future__ import annotations

import json
import os
from functools import lru_cache
from pathlib import Path

import torch

from model.encoder_checks import check_latents, check_pixels
import torch.nn.functional as F

# --------------------------------------------------------------------------------------------- VAE

# Hub id -> subfolder holding the VAE. Channels, downsampling and scaling are read from each VAE's config.
VAE_HUB = {
    "stabilityai/stable-diffusion-xl-base-1.0": "vae",
    "madebyollin/sdxl-vae-fp16-fix": None,
    "ostris/vae-kl-f8-d16": None,  # 16 latent channels
}
DCAE_HUB = ("mit-han-lab/dc-ae-f32c32-sana-1.0-diffusers",)
VAE_SPECS_HELP = (f"one of {sorted(VAE_HUB) + list(DCAE_HUB)}, 'standin', 'tiny-dcae', or a local diffusers VAE "
                  "folder (absolute or ./relative)")


class StandinVAE:
    """Parameter-free autoencoder: 4x4 average pool of RGB plus luminance; decode upsamples the RGB channels."""

    downsample = 4
    latent_channels = 4
    scaling_factor = 1.0
    # Rec. 601 luma weights: the 4th channel is a linear summary, so decode needs only RGB.
    _luma = (0.299, 0.587, 0.114)

    def __init__(self, device="cpu", dtype=torch.float32):
        self.device, self.dtype = torch.device(device), dtype

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """(N, 3, H, W) in [-1, 1] -> (N, 4, H/4, W/4) float32; deterministic, `generator` is ignored."""
        check_pixels(pixels, self.downsample)
        x = pixels.to(self.device, self.dtype)
        rgb = F.avg_pool2d(x, self.downsample)  # (N, 3, h, w)
        w = torch.tensor(self._luma, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
        luma = (rgb * w).sum(1, keepdim=True)  # (N, 1, h, w)
        return torch.cat([rgb, luma], 1).float() * self.scaling_factor

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """(N, 4, h, w) -> (N, 3, 4h, 4w) float32 in [-1, 1]."""
        check_latents(latents, self.latent_channels)
        z = latents.to(self.device, self.dtype) / self.scaling_factor
        x = F.interpolate(z[:, :3], scale_factor=self.downsample, mode="bilinear", align_corners=False)
        return x.clamp(-1, 1).float()


class DiffusersVAE:
    """A diffusers AutoencoderKL; latents are one posterior sample, shifted and scaled as its config says."""

    def __init__(self, vae, device, dtype):
        vae = vae.to(device=device) if vae.dtype == dtype else vae.to(device=device, dtype=dtype)
        self.vae = vae.eval().requires_grad_(False)
        self.device, self.dtype = torch.device(device), dtype
        cfg = vae.config
        self.scaling_factor = float(cfg.scaling_factor)  # 0.13025 for SDXL, read, never copied
        self.shift_factor = float(cfg.shift_factor) if getattr(cfg, "shift_factor", None) is not None else 0.0
        self.latent_channels = int(cfg.latent_channels)
        self.downsample = 2 ** (len(cfg.block_out_channels) - 1)

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """(N, 3, H, W) in [-1, 1] -> (N, C, H/f, W/f) float32: one posterior sample x scaling factor."""
        check_pixels(pixels, self.downsample)
        posterior = self.vae.encode(pixels.to(self.device, self.dtype)).latent_dist
        z = posterior.sample(generator=generator)  # (N, C, h, w)
        return ((z - self.shift_factor) * self.scaling_factor).float()

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """(N, C, h, w) -> (N, 3, f*h, f*w) float32 in [-1, 1]."""
        check_latents(latents, self.latent_channels)
        z = latents.to(self.device, self.dtype) / self.scaling_factor + self.shift_factor
        return self.vae.decode(z).sample.clamp(-1, 1).float()


def _is_local(spec: str) -> bool:
    # Hub ids look like relative paths ("org/name"), so a local spec must exist or be explicit.
    return os.path.isabs(spec) or spec.startswith((".", "~")) or os.path.isdir(spec)


def load_vae(spec: str, device="cpu", dtype: torch.dtype = torch.float32):
    """A VAE by spec (see module docstring); bf16 on GPU, fp32 on CPU. The SDXL VAE overflows in fp16: refused."""
    if spec == "standin":
        return StandinVAE(device, dtype)
    from model import encoders_dcae

    if spec == encoders_dcae.TINY or spec in DCAE_HUB or (
            isinstance(spec, (str, os.PathLike)) and _is_local(str(spec)) and encoders_dcae.is_dcae_folder(spec)):
        return encoders_dcae.load_dcae(str(spec), device, dtype)
    if spec in VAE_HUB:
        if dtype == torch.float16 and spec != "madebyollin/sdxl-vae-fp16-fix":
            raise ValueError(f"VAE {spec!r} overflows in float16; use bfloat16/float32 or "
                             "'madebyollin/sdxl-vae-fp16-fix'")
        return _load_diffusers_vae(spec, VAE_HUB[spec], device, dtype)
    if isinstance(spec, (str, os.PathLike)) and _is_local(str(spec)):
        folder = Path(spec).expanduser()
        if not folder.is_dir():
            raise FileNotFoundError(f"VAE folder {str(folder)!r} does not exist")
        if (folder / "config.json").is_file():
            subfolder = None
        elif (folder / "vae" / "config.json").is_file():  # a whole pipeline snapshot
            subfolder = "vae"
        else:
            raise FileNotFoundError(f"VAE folder {str(folder)!r} has no config.json (nor vae/config.json)")
        return _load_diffusers_vae(str(folder), subfolder, device, dtype)
    raise ValueError(f"unknown VAE spec {spec!r}; expected {VAE_SPECS_HELP}")


def _load_diffusers_vae(path: str, subfolder: str | None, device, dtype) -> DiffusersVAE:
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(path, subfolder=subfolder, torch_dtype=dtype, use_safetensors=True,
                                        low_cpu_mem_usage=False)  # low-memory loading needs accelerate
    # force_upcast marks VAEs that overflow in fp16 (SDXL's); the fp16-fix VAE clears it.
    if dtype == torch.float16 and getattr(vae.config, "force_upcast", False):
        raise ValueError(f"VAE {path!r} has force_upcast=True in its config: it overflows in float16; "
                         "use bfloat16 or float32")
    return DiffusersVAE(vae, device, dtype)


def save_tiny_vae(folder, scaling_factor: float = 0.5, seed: int = 0, force_upcast: bool = False) -> str:
    """Write a tiny AutoencoderKL (SDXL's class, f=4, a few channels, random weights) with save_pretrained."""
    from diffusers import AutoencoderKL

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=4,
            down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
            block_out_channels=(8, 8, 16), layers_per_block=1, norm_num_groups=4, sample_size=32,
            scaling_factor=scaling_factor, force_upcast=force_upcast,
        )
    vae.save_pretrained(str(folder), safe_serialization=True)
    return str(folder)


# ------------------------------------------------------------------------------------ text encoder

DFN5B = "hf-hub:apple/DFN5B-CLIP-ViT-H-14-378"
LLAMA_HUB = ("meta-llama/Llama-3.2-1B",)
TEXT_SPECS_HELP = (f"{DFN5B!r} (or another 'hf-hub:' open_clip repo), 'tiny', a local folder from "
                   f"save_tiny_text_encoder, {LLAMA_HUB[0]!r}, 'tiny-llama', or a local Llama folder")
CONFIG_NAME = "open_clip_config.json"  # open_clip's names, so hub repos and local folders read alike
WEIGHTS_NAME = "open_clip_model.safetensors"
TINY_SEED = 20240715
TINY_MODEL_CFG = {
    "embed_dim": 64,
    "quick_gelu": False,
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 4, "layers": 2},
}


@lru_cache(maxsize=4)
def _tokenizer(context_length: int):
    from open_clip.tokenizer import SimpleTokenizer

    return SimpleTokenizer(context_length=context_length)  # vocab ships inside open_clip


class TextEncoder:
    """An open_clip text tower returning every token state after ln_final (no pooling, no projection)."""

    def __init__(self, tower: torch.nn.Module, device, dtype):
        self.tower = tower.to(device=device, dtype=dtype).eval().requires_grad_(False)
        self.device, self.dtype = torch.device(device), dtype
        self.width = int(tower.width)
        self.context_length = int(tower.context_length)
        self.tokenizer = _tokenizer(self.context_length)

    def tokenize(self, captions: list[str]) -> torch.Tensor:
        """(N, context_length) token ids; long captions are truncated (end token kept)."""
        if isinstance(captions, str):
            raise ValueError("expected a list of captions, got a single str")
        return self.tokenizer(list(captions))

    def count_tokens(self, captions: list[str]) -> list[int]:
        """Untruncated token count per caption, start and end tokens included (> context_length: truncated)."""
        return [len(self.tokenizer.encode(c)) + 2 for c in captions]

    @torch.no_grad()
    def encode(self, captions: list[str]) -> torch.Tensor:
        """(N, 77, width) float32 token states after ln_final."""
        t = self.tower
        tokens = self.tokenize(captions).to(self.device)  # (N, L)
        x = t.token_embedding(tokens).to(self.dtype) + t.positional_embedding.to(self.dtype)  # (N, L, D)
        x = t.transformer(x, attn_mask=t.attn_mask)  # batch-first, causal
        return t.ln_final(x).float()  # (N, L, D)


def build_text_tower(model_cfg: dict, dtype=torch.float32) -> torch.nn.Module:
    """The text tower of an open_clip model config, without its projection."""
    from open_clip.model import CLIPTextCfg, _build_text_tower

    text_cfg = dict(model_cfg["text_cfg"])
    if text_cfg.get("hf_model_name") or text_cfg.get("hf_tokenizer_name"):
        raise ValueError(f"text tower with a HuggingFace model/tokenizer ({text_cfg}) is not supported; "
                         "expected an open_clip TextTransformer config")
    text_cfg["proj_type"] = "none"
    cast = dtype if dtype in (torch.float16, torch.bfloat16) else None  # fp32 LayerNorm in low precision
    return _build_text_tower(model_cfg.get("embed_dim", 0), CLIPTextCfg(**text_cfg),
                             quick_gelu=model_cfg.get("quick_gelu", False), cast_dtype=cast)


def _text_state(weights_path: str) -> dict[str, torch.Tensor]:
    """Text-tower tensors of an open_clip checkpoint (CLIP keys, or CustomTextCLIP's "text." prefix)."""
    def keep(k: str) -> str | None:
        k = k[len("text."):] if k.startswith("text.") else k
        if k.startswith(("token_embedding.", "positional_embedding", "transformer.", "ln_final.")):
            return k
        return None

    if weights_path.endswith(".safetensors"):
        from safetensors import safe_open

        with safe_open(weights_path, framework="pt") as f:  # reads only the text tensors
            return {keep(k): f.get_tensor(k) for k in f.keys() if keep(k)}
    sd = torch.load(weights_path, map_location="cpu", weights_only=True)
    sd = sd.get("state_dict", sd)
    return {keep(k): v for k, v in sd.items() if keep(k)}


def _load_tower(model_cfg: dict, weights_path: str, dtype) -> torch.nn.Module:
    tower = build_text_tower(model_cfg, dtype)
    tower.load_state_dict(_text_state(weights_path), strict=True)
    return tower


def load_text_encoder(spec: str, device="cpu", dtype: torch.dtype = torch.float32, tokens: int | None = None):
    """A caption encoder by spec (see module docstring). `tokens`: the padded length (Llama: any, default its
    spec's; open_clip towers: their fixed context length, or None)."""
    from model import encoders_llama

    if spec == encoders_llama.TINY or spec in LLAMA_HUB or (
            isinstance(spec, (str, os.PathLike)) and _is_local(str(spec)) and encoders_llama.is_llama_folder(spec)):
        return encoders_llama.load_llama(str(spec), device, dtype, tokens)
    enc = _load_open_clip(spec, device, dtype)
    if tokens is not None and tokens != enc.context_length:
        raise ValueError(f"text encoder {spec!r} has a fixed context length {enc.context_length}, not {tokens}")
    return enc


def unconditional_caption(encoder) -> torch.Tensor:
    """(L, D) float32 unconditional caption for classifier-free guidance: the encoder's empty-prompt embedding
    when it defines one (Llama), else zeros (open_clip towers, as MicroDiT trains)."""
    if hasattr(encoder, "unconditional"):
        return encoder.unconditional().cpu()
    return torch.zeros(encoder.context_length, encoder.width)


def _load_open_clip(spec: str, device, dtype) -> TextEncoder:
    if spec == "tiny":
        return TextEncoder(_tiny_tower(), device, dtype)
    if isinstance(spec, str) and spec.startswith("hf-hub:") and len(spec) > len("hf-hub:"):
        from open_clip.pretrained import download_pretrained_from_hf

        repo = spec[len("hf-hub:"):]
        with open(download_pretrained_from_hf(repo, filename=CONFIG_NAME), encoding="utf-8") as f:
            cfg = json.load(f)
        weights = download_pretrained_from_hf(repo)  # prefers open_clip_model.safetensors
        return TextEncoder(_load_tower(cfg.get("model_cfg", cfg), weights, dtype), device, dtype)
    if isinstance(spec, (str, os.PathLike)) and _is_local(str(spec)):
        folder = Path(spec).expanduser()
        if not (folder / CONFIG_NAME).is_file() or not (folder / WEIGHTS_NAME).is_file():
            raise FileNotFoundError(f"text encoder folder {str(folder)!r} needs {CONFIG_NAME} and {WEIGHTS_NAME}")
        cfg = json.loads((folder / CONFIG_NAME).read_text(encoding="utf-8"))
        return TextEncoder(_load_tower(cfg.get("model_cfg", cfg), str(folder / WEIGHTS_NAME), dtype), device, dtype)
    raise ValueError(f"unknown text encoder spec {spec!r}; expected {TEXT_SPECS_HELP}")


def _tiny_tower(seed: int = TINY_SEED) -> torch.nn.Module:
    # Own RNG state: the same weights in every process, whatever the caller seeded.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build_text_tower(TINY_MODEL_CFG, torch.float32)


def save_tiny_text_encoder(folder, seed: int = TINY_SEED) -> str:
    """Write the tiny text tower as an open_clip config JSON + safetensors weights (CLIP key names)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in _tiny_tower(seed).state_dict().items()}
    save_file(state, str(folder / (WEIGHTS_NAME + ".tmp")))
    os.replace(folder / (WEIGHTS_NAME + ".tmp"), folder / WEIGHTS_NAME)
    (folder / CONFIG_NAME).write_text(json.dumps({"model_cfg": TINY_MODEL_CFG}, indent=2), encoding="utf-8")
    return str(folder)


# ------------------------------------------------------------------------------- REPA feature encoder


def load_repa_encoder(spec: str, device="cpu", dtype: torch.dtype = torch.float32):
    """REPA's image feature encoder by spec: DINOv2 (model/encoders_dino.py lists the specs)."""
    from model import encoders_dino

    return encoders_dino.load_dino(spec, device, dtype)
