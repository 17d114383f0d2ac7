"""E-MMDiT's two text modes side by side: bytes per stored row and the training loss.

    python -m bench.text_modes --pairs 32 --steps 300 --out text_modes.json

"release" (the Nitro-E procedure: cleaned captions, Llama with the attention mask, all 128 rows stored, the pad rows
depending on the caption) against the opt-in "compact" mode (Llama without a mask, every pad row one fixed vector,
only a caption's own rows stored). Bytes: the real shapes (128 rows x 2048, float16) at the token counts the tiny
Llama's tokenizer gives the demo's captions, through the schema's own compact column. Loss: EMMDiT_Debug learns
`--pairs` caption -> latent pairs (the demo's captions; each pair's latent a fixed random tensor) from the same
initial weights, with the same noise and times, once per mode, each mode conditioned on its own caption states
(tiny Llama, fixed-seed weights: the shapes and the procedure are the release's, the numbers a stand-in's). The
figure is the fixed-noise evaluation loss at the end, and its ratio between the modes.
"""
from __future__ import annotations

import argparse
import random

import numpy as np
import torch

from bench import emit
from model.emmdit.config import model_config
from model.emmdit.network import EMMDiT
from model.encoders import load_text_encoder
from model.objectives.configs import RectifiedFlowConfig
from model.objectives.rectified_flow import rf_loss
from pipeline.core import schema
from pipeline.data.shapes import random_spec

RELEASE_ROWS, WIDTH = 128, 2048


def stored_bytes(lengths: list[int]) -> dict:
    """Bytes per row of the caption column at the release's shapes: every row, or the caption's own rows only."""
    field = schema.compact_tensor_field(schema.CAPTION_STATES, (RELEASE_ROWS, WIDTH), np.zeros(WIDTH))
    rows = [np.zeros((RELEASE_ROWS, WIDTH), np.float16) for _ in lengths]
    compact = schema.compact_array(rows, lengths, field).nbytes / len(lengths)
    return {"release": RELEASE_ROWS * WIDTH * 2, "compact": compact,
            "ratio": RELEASE_ROWS * WIDTH * 2 / compact, "mean_tokens": float(np.mean(lengths))}


def train(states: torch.Tensor, latents: torch.Tensor, steps: int, seed: int) -> list[float]:
    """EMMDiT_Debug on fixed (caption states, latent) pairs; the fixed-noise evaluation loss every 50 steps."""
    cfg = model_config("EMMDiT_Debug")
    torch.manual_seed(seed)
    net = EMMDiT(cfg)
    gen, rf = torch.Generator().manual_seed(seed), RectifiedFlowConfig()
    probe = torch.Generator().manual_seed(seed + 1)
    eval_t, eval_noise = torch.rand(len(latents), generator=probe), torch.randn(latents.shape, generator=probe)
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=0.0)
    curve = []
    for step in range(steps + 1):
        if step % 50 == 0:
            with torch.no_grad():
                curve.append(rf_loss(net, latents, states, rf, t=eval_t, noise=eval_noise)[0].item())
        if step == steps:
            break
        loss = rf_loss(net, latents, states, rf, gen)[0]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return curve


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pairs", type=int, default=32)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(2)
    cfg = model_config("EMMDiT_Debug")
    rng = random.Random(args.seed)
    texts = [random_spec(rng).caption for _ in range(args.pairs)]
    latents = torch.randn(len(texts), cfg.in_channels, cfg.input_size, cfg.input_size,
                          generator=torch.Generator().manual_seed(args.seed))
    result = {"pairs": len(texts), "steps": args.steps, "modes": {}}
    for mode in ("release", "compact"):
        enc = load_text_encoder("tiny-llama", tokens=cfg.caption_len, mode=mode)
        states = enc.encode(texts)
        result["modes"][mode] = {"eval_loss": train(states, latents, args.steps, args.seed)}
        if mode == "compact":
            result["bytes"] = stored_bytes(enc.count_tokens(texts))
    release, compact = (result["modes"][m]["eval_loss"][-1] for m in ("release", "compact"))
    result["final_loss_ratio_compact_over_release"] = compact / release
    return emit(result, args.out)


if __name__ == "__main__":
    main()
