"""The whole diffusion stack learns: MicroDiT_Debug memorises 4 latent/caption pairs and samples them back."""
from __future__ import annotations

import pytest
import torch

from model.microdit.config import model_config
from model.objectives.edm import EDMConfig, edm_loss
from model.microdit.network import MicroDiT
from pipeline.train.optim import build_optimizer, cosine_schedule
from model.pipelines.microdit import MicroDiTPipeline
from model.samplers.edm_heun import EDMHeunScheduler

PAIRS, BATCH, STEPS, EVAL_REPEATS = 4, 8, 250, 8


@pytest.mark.slow  # about 45 s of CPU on one core
def test_debug_model_memorises_pairs_and_samples_them():
    torch.manual_seed(0)
    cfg = model_config("MicroDiT_Debug")
    net = MicroDiT(cfg)
    data_gen = torch.Generator().manual_seed(0)
    latents = torch.randn(PAIRS, cfg.in_channels, cfg.input_size, cfg.input_size, generator=data_gen)
    captions = torch.randn(PAIRS, cfg.caption_len, cfg.caption_dim, generator=data_gen)  # distinct captions
    edm = EDMConfig()

    # Evaluation loss on a fixed draw of the training sigma distribution and noise, so start and end compare.
    eval_gen = torch.Generator().manual_seed(123)
    n_eval = PAIRS * EVAL_REPEATS
    eval_sigma = (torch.randn(n_eval, generator=eval_gen) * edm.p_std + edm.p_mean).exp()
    eval_noise = torch.randn(n_eval, *latents.shape[1:], generator=eval_gen)

    def eval_loss() -> float:
        with torch.no_grad():
            return edm_loss(net, latents.repeat(EVAL_REPEATS, 1, 1, 1), captions.repeat(EVAL_REPEATS, 1, 1), edm,
                            sigma=eval_sigma, noise=eval_noise)[0].item()

    start = eval_loss()
    opt = build_optimizer(net, lr=2e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, cosine_schedule(10, STEPS, final_ratio=0.05))
    train_gen = torch.Generator().manual_seed(1)
    idx = torch.arange(BATCH) % PAIRS
    for _ in range(STEPS):
        loss, _ = edm_loss(net, latents[idx], captions[idx], edm, generator=train_gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        sched.step()
    end = eval_loss()
    assert end * 5 <= start, f"eval loss fell only from {start:.3f} to {end:.3f}"

    net.eval()
    pipe = MicroDiTPipeline(transformer=net, scheduler=EDMHeunScheduler(sigma_data=edm.sigma_data))
    pipe.set_progress_bar_config(disable=True)
    samples = pipe(prompt_embeds=captions, latents=torch.randn(latents.shape, generator=torch.Generator().manual_seed(0)),
                   num_inference_steps=8, guidance_scale=1.0, output_type="latent").images
    dist = ((samples[:, None] - latents[None]) ** 2).mean(dim=(2, 3, 4))  # (sample, target)
    own = dist.diagonal()
    others = dist.masked_fill(torch.eye(PAIRS, dtype=torch.bool), float("inf")).min(dim=1).values
    assert bool((own < others).all()), f"samples not closest to their own targets:\n{dist}"
    assert bool((own * 4 < others).all()), f"samples only loosely match their targets:\n{dist}"
