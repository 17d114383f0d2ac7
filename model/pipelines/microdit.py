"""MicroDiTPipeline: text -> image with MicroDiT as its release samples (Sehwag et al. 2024, micro_diffusion).

CLIP text states (all 77 token states after ln_final: a transformers CLIPTextModel's last hidden state), EDM Heun
(EDMHeunScheduler: 30 steps, sigma 0.002..80, rho 7, the network's sigma_data, ODE state in float64), classifier-free
guidance against zeros as the unconditional caption (what caption dropout trained), then the VAE decode.
"""
from __future__ import annotations

import html
from typing import Sequence

import ftfy
import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput

from model.pipelines.common import (as_prompts, conditional_states, decode, initial_noise, latent_side, network_config,
                                    network_dtype, per_image, vae_scale_factor)


def clip_ids(tokenizer, prompts: list[str], tokens: int) -> torch.Tensor:
    """(N, tokens) ids as open_clip's tokenizer makes them: its text cleaning (ftfy, HTML entities unescaped twice),
    start, text, end, truncated to `tokens` with the end kept, then id 0 (open_clip's pad, not a special token)."""
    cleaned = [html.unescape(html.unescape(ftfy.fix_text(p))).strip() for p in prompts]
    rows = tokenizer(cleaned, truncation=True, max_length=tokens)["input_ids"]
    ids = torch.zeros(len(rows), tokens, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, :len(row)] = torch.tensor(row, dtype=torch.long)
    return ids


def encode_clip(tokenizer, text_encoder, prompts: list[str], tokens: int) -> torch.Tensor:
    """(N, tokens, width) float32 CLIP states (clip_ids): every token state after the final LayerNorm (no pooling,
    no projection), as MicroDiT's training captions were encoded (model/encoders/clip_text.py, open_clip)."""
    ids = clip_ids(tokenizer, prompts, tokens)
    return text_encoder(ids.to(text_encoder.device)).last_hidden_state.float()


class MicroDiTPipeline(DiffusionPipeline):
    """MicroDiT text-to-image (see the module docstring). `num_inference_steps` and `guidance_scale` default to what
    the model was released or trained with (this pipeline's config)."""

    model_cpu_offload_seq = "text_encoder->transformer->vae"
    _optional_components = ["vae", "text_encoder", "tokenizer"]

    def __init__(self, transformer, scheduler, vae=None, text_encoder=None, tokenizer=None,
                 num_inference_steps: int = 30, guidance_scale: float = 5.0):
        super().__init__()
        self.register_modules(transformer=transformer, scheduler=scheduler, vae=vae, text_encoder=text_encoder,
                              tokenizer=tokenizer)
        self.vae_scale_factor = vae_scale_factor(vae) if vae is not None else 1  # pixels per latent
        self.register_to_config(num_inference_steps=num_inference_steps, guidance_scale=guidance_scale)

    def encode_prompt(self, prompts: list[str]) -> torch.Tensor:
        if self.text_encoder is None or self.tokenizer is None:
            raise ValueError("this pipeline has no text encoder: pass prompt_embeds")
        return encode_clip(self.tokenizer, self.text_encoder, prompts, network_config(self.transformer).caption_len)

    @torch.no_grad()
    def __call__(self, prompt: str | Sequence[str] | None = None, negative_prompt: str | Sequence[str] | None = None,
                 num_inference_steps: int | None = None, guidance_scale: float | None = None,
                 height: int | None = None, width: int | None = None, num_images_per_prompt: int = 1,
                 generator=None, latents: torch.Tensor | None = None, output_type: str = "pil",
                 return_dict: bool = True, prompt_embeds: torch.Tensor | None = None,
                 negative_prompt_embeds: torch.Tensor | None = None):
        """Draw images. `negative_prompt` None: zeros, the unconditional caption MicroDiT trained with.
        `latents`: the standard normal noise to start from (N, C, h, w); else drawn from `generator`."""
        cfg, device = network_config(self.transformer), self._execution_device
        steps = num_inference_steps or self.config.num_inference_steps
        guidance = self.config.guidance_scale if guidance_scale is None else guidance_scale
        cond = conditional_states(self, prompt, prompt_embeds, num_images_per_prompt, device)  # (N, L, D)
        use_cfg = guidance != 1.0
        if use_cfg:
            negatives = as_prompts(negative_prompt, "negative_prompt")
            if negatives is not None:
                uncond = per_image(self.encode_prompt(negatives).to(device), cond, num_images_per_prompt)
            elif negative_prompt_embeds is not None:
                uncond = per_image(negative_prompt_embeds.float().to(device), cond, num_images_per_prompt)
            else:
                uncond = torch.zeros_like(cond)
        side = latent_side(height, width, cfg.input_size, self.vae_scale_factor, cfg.patch_size) \
            if self.vae is not None else cfg.input_size
        noise = initial_noise((len(cond), cfg.in_channels, side, side), generator, latents, device)

        self.scheduler.set_timesteps(steps, device=device)
        x = noise.to(torch.float64) * self.scheduler.init_noise_sigma  # the ODE state, float64
        dtype = network_dtype(self.transformer)
        caption = torch.cat([cond, uncond]) if use_cfg else cond
        for t in self.progress_bar(self.scheduler.timesteps):
            x_in = self.scheduler.scale_model_input(x, t)
            x_in = torch.cat([x_in, x_in]) if use_cfg else x_in
            out = self.transformer(x_in.to(dtype), t.expand(len(x_in)).to(dtype), caption.to(dtype))[0].float()
            if use_cfg:
                out_c, out_u = out.chunk(2)
                out = out_u + guidance * (out_c - out_u)
            x = self.scheduler.step(out, t, x).prev_sample
        images = decode(self.vae, x.float(), output_type)
        self.maybe_free_model_hooks()
        return ImagePipelineOutput(images=images) if return_dict else (images,)
