"""EMMDiTPipeline: text -> image with E-MMDiT as the Nitro-E release samples it (core/models/emmdit_pipeline.py).

Text, in the release's mode ("release"): each caption lower-cased and stripped, or cleaned twice with the DeepFloyd-IF
cleaner (`clean_caption`, on by default, as in the release's pipeline call and its precompute; needs beautifulsoup4
and ftfy), tokenized to 128 tokens with padding and truncation (pad = EOS), and run through Llama with that
attention mask; all 128 last hidden states are kept (the pad rows depend on the caption; the network attends to
every row). The unconditional caption is the empty prompt, encoded the same way. `encode_llama` is also what
precompute stores for training, so training and drawing see the same states.

The older "compact" mode (an opt-in for storage: 8x smaller caption rows at 20 tokens, so pad rows must not depend
on the caption) runs Llama without a mask on BOS + caption and replaces every pad row by one fixed vector, the state
of a lone EOS token. A model trained on one mode must be drawn with it: the export records it.

Sampling: flow-matching Euler (diffusers' FlowMatchEulerDiscreteScheduler, 20 steps, shift 1), guidance 4.5 as
v_u + g (v_c - v_u) with the unconditional branch first in the batch; the network's time input is the scheduler's
sigma (it multiplies by 1000 itself, giving the release's timestep exactly). The state stays float32.
"""
from __future__ import annotations

from typing import Sequence

import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput
from diffusers.pipelines.pixart_alpha.pipeline_pixart_alpha import PixArtAlphaPipeline
from diffusers.utils import is_bs4_available, is_ftfy_available

from model.pipelines.common import (as_prompts, conditional_states, decode, initial_noise, latent_side, network_config,
                                    network_dtype, per_image, vae_scale_factor)

TEXT_MODES = ("release", "compact")


class _CaptionCleaner:
    """The release's caption preprocessing, as diffusers keeps it (PixArt's copy of DeepFloyd IF's cleaner)."""

    bad_punct_regex = PixArtAlphaPipeline.bad_punct_regex
    _clean_caption = PixArtAlphaPipeline._clean_caption
    _text_preprocessing = PixArtAlphaPipeline._text_preprocessing


def preprocess_captions(captions: list[str], clean_caption: bool) -> list[str]:
    """Lower-cased and stripped, or cleaned twice with the DeepFloyd-IF cleaner (`clean_caption`)."""
    if clean_caption:
        missing = [name for name, ok in (("beautifulsoup4", is_bs4_available()), ("ftfy", is_ftfy_available()))
                   if not ok]
        if missing:  # the release silently skips cleaning then; a model trained on cleaned captions would drift
            raise ValueError(f"clean_caption needs {missing} installed (the release's caption cleaning)")
    return _CaptionCleaner()._text_preprocessing(list(captions), clean_caption=clean_caption)


def _pad_to_eos(tokenizer):
    if tokenizer.pad_token is None:  # Llama-3 has none; the release pads with EOS
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


@torch.no_grad()
def encode_llama(tokenizer, text_encoder, captions: list[str], tokens: int, mode: str = "release",
                 clean_caption: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """((N, tokens, width) float32 Llama last hidden states, (N,) real token counts) in `mode` (module docstring)."""
    if mode not in TEXT_MODES:
        raise ValueError(f"text mode {mode!r}: expected one of {TEXT_MODES}")
    tokenizer, device = _pad_to_eos(tokenizer), text_encoder.device
    if mode == "release":
        batch = tokenizer(preprocess_captions(captions, clean_caption), padding="max_length", max_length=tokens,
                          truncation=True, add_special_tokens=True, return_tensors="pt")
        mask = batch.attention_mask.to(device)
        states = text_encoder(batch.input_ids.to(device), attention_mask=mask).last_hidden_state.float()
        return states, mask.sum(1).cpu()
    ids, lengths = compact_ids(tokenizer, captions, tokens)
    states = text_encoder(input_ids=ids.to(device)).last_hidden_state.float()  # causal: real rows ignore the pads
    pad = torch.arange(tokens, device=device)[None, :] >= lengths.to(device)[:, None]
    lone_eos = text_encoder(input_ids=torch.tensor([[tokenizer.eos_token_id]], device=device)).last_hidden_state
    return torch.where(pad[..., None], lone_eos[0, 0].float(), states), lengths


def compact_ids(tokenizer, captions: list[str], tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Compact mode's tokens: ((N, tokens) BOS + caption right-padded with EOS, (N,) real lengths), truncated."""
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    if bos is None or eos is None:
        raise ValueError("the Llama tokenizer needs a BOS and an EOS token")
    rows = tokenizer(list(captions), add_special_tokens=True)["input_ids"]
    rows = [(r if r[:1] == [bos] else [bos, *r])[:tokens] for r in rows]  # BOS first, as Llama-3's
    ids = torch.full((len(rows), tokens), eos, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r, dtype=torch.long)
    return ids, torch.tensor([len(r) for r in rows], dtype=torch.long)


class EMMDiTPipeline(DiffusionPipeline):
    """E-MMDiT text-to-image (see the module docstring); its config holds the model's sampler defaults and text
    mode."""

    model_cpu_offload_seq = "text_encoder->transformer->vae"
    _optional_components = ["vae", "text_encoder", "tokenizer"]

    def __init__(self, transformer, scheduler, vae=None, text_encoder=None, tokenizer=None,
                 num_inference_steps: int = 20, guidance_scale: float = 4.5, text_mode: str = "release",
                 clean_caption: bool = True):
        super().__init__()
        if text_mode not in TEXT_MODES:
            raise ValueError(f"text_mode {text_mode!r}: expected one of {TEXT_MODES}")
        self.register_modules(transformer=transformer, scheduler=scheduler, vae=vae, text_encoder=text_encoder,
                              tokenizer=tokenizer)
        self.vae_scale_factor = vae_scale_factor(vae) if vae is not None else 1  # pixels per latent
        self.register_to_config(num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                                text_mode=text_mode, clean_caption=clean_caption)

    def encode_prompt(self, prompts: list[str]) -> torch.Tensor:
        if self.text_encoder is None or self.tokenizer is None:
            raise ValueError("this pipeline has no text encoder: pass prompt_embeds and negative_prompt_embeds")
        return encode_llama(self.tokenizer, self.text_encoder, prompts, network_config(self.transformer).caption_len,
                            self.config.text_mode, self.config.clean_caption)[0]

    def _encode_negatives(self, negatives: tuple[str, ...]) -> torch.Tensor:
        """The negative prompts' states, kept for the next call: nearly always the empty prompt, the same every
        call of a frozen text encoder."""
        key = (id(self.text_encoder), negatives)
        if getattr(self, "_negatives", (None,))[0] != key:
            self._negatives = (key, self.encode_prompt(list(negatives)))
        return self._negatives[1]

    @torch.no_grad()
    def __call__(self, prompt: str | Sequence[str] | None = None, negative_prompt: str | Sequence[str] | None = None,
                 num_inference_steps: int | None = None, guidance_scale: float | None = None,
                 height: int | None = None, width: int | None = None, num_images_per_prompt: int = 1,
                 generator=None, latents: torch.Tensor | None = None, output_type: str = "pil",
                 return_dict: bool = True, prompt_embeds: torch.Tensor | None = None,
                 negative_prompt_embeds: torch.Tensor | None = None):
        """Draw images. `negative_prompt` None: the empty prompt, the unconditional caption E-MMDiT trained with.
        `latents`: the standard normal noise to start from (N, C, h, w); else drawn from `generator`."""
        cfg, device = network_config(self.transformer), self._execution_device
        steps = num_inference_steps or self.config.num_inference_steps
        guidance = self.config.guidance_scale if guidance_scale is None else guidance_scale
        cond = conditional_states(self, prompt, prompt_embeds, num_images_per_prompt, device)  # (N, L, D)
        use_cfg = guidance > 1.0  # as the release: guidance 1 (the distilled weights) draws conditionally
        if use_cfg:
            if negative_prompt_embeds is not None:
                uncond = per_image(negative_prompt_embeds.float().to(device), cond, num_images_per_prompt)
            else:
                negatives = as_prompts("" if negative_prompt is None else negative_prompt, "negative_prompt")
                uncond = per_image(self._encode_negatives(tuple(negatives)).to(device), cond, num_images_per_prompt)
        side = latent_side(height, width, cfg.input_size, self.vae_scale_factor, cfg.patch_size) \
            if self.vae is not None else cfg.input_size
        x = initial_noise((len(cond), cfg.in_channels, side, side), generator, latents, device)

        self.scheduler.set_timesteps(steps, device=device)
        dtype = network_dtype(self.transformer)
        caption = torch.cat([uncond, cond]) if use_cfg else cond
        for i, t in enumerate(self.progress_bar(self.scheduler.timesteps)):
            x_in = torch.cat([x, x]) if use_cfg else x
            # The network takes t in [0, 1] and scales it by 1000 itself: the scheduler's sigma, whose x 1000 is
            # exactly the timestep the release's network sees.
            time = self.scheduler.sigmas[i].to(device).expand(len(x_in))
            v = self.transformer(x_in.to(dtype), time.to(dtype), caption.to(dtype)).float()
            if use_cfg:
                v_u, v_c = v.chunk(2)
                v = v_u + guidance * (v_c - v_u)
            x = self.scheduler.step(v, t, x).prev_sample
        images = decode(self.vae, x, output_type)
        self.maybe_free_model_hooks()
        return ImagePipelineOutput(images=images) if return_dict else (images,)
