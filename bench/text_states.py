"""E-MMDiT caption states: compute Llama-3.2-1B on the training workers, or store them and read them back?

    python -m bench.text_states --batch 8 --iters 2 --out text_states.json

Measures, in one run on this machine:

- **compute**: the real Llama-3.2-1B architecture (transformers `LlamaModel` from bench.gpu_suite's config:
  hidden 2048, 16 layers, 32 heads, 8 kv heads, intermediate 8192, vocab 128256; random weights) at 128 tokens,
  captions/s at `--batch`, and its FLOPs per caption (2 x non-embedding parameters x tokens + attention);
- **store**: bytes per row of the compact caption column (`pipeline.core.schema.compact_array`: only a caption's
  own token rows) at `--lengths` real token counts, against the 512 KiB padded row, and the CPU cost of reading
  such rows back from Parquet and re-padding them (`schema.read_tensor`), MB and rows per CPU-second.

Per-GPU cost of computing on the trainers is estimated from FLOPs: Llama's forward per caption against the E-MMDiT
512 px training step per sample (`model.emmdit.config.flops_per_sample`), both at the same MFU, i.e. the share of
GPU time the trainers would add every epoch. Storing costs bytes once and CPU time per read instead.
"""
from __future__ import annotations

import argparse
import io
import json
import statistics
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from bench.gpu_suite import LLAMA_3_2_1B_CONFIG
from model.emmdit.config import flops_per_sample, model_config
from pipeline.core import schema

TOKENS, WIDTH = 128, 2048


def llama_flops_per_caption(cfg, tokens: int = TOKENS) -> float:
    """Forward FLOPs of one caption: 2 x (non-embedding weights) x tokens plus the causal attention matmuls."""
    d, layers, kv = cfg.hidden_size, cfg.num_hidden_layers, cfg.num_key_value_heads
    head = d // cfg.num_attention_heads
    per_layer = d * d * 2 + 2 * d * kv * head + 3 * d * cfg.intermediate_size  # q, o, k, v, gate/up/down
    attention = 2 * 2 * tokens * tokens * d / 2  # scores and values, causal half
    return layers * (2 * per_layer * tokens + attention)


def measure_compute(batch: int, iters: int, dtype: torch.dtype) -> dict:
    from transformers import LlamaConfig, LlamaModel

    cfg = LlamaConfig(**LLAMA_3_2_1B_CONFIG)
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # build in the measured dtype: a float32 build first would double the peak
    try:
        model = LlamaModel(cfg).eval()
    finally:
        torch.set_default_dtype(default)
    ids = torch.randint(0, cfg.vocab_size, (batch, TOKENS))
    times = []
    with torch.no_grad():
        for i in range(iters + 1):  # the first call warms up
            t = time.perf_counter()
            h = model(input_ids=ids).last_hidden_state  # (B, 128, 2048)
            if i:
                times.append(time.perf_counter() - t)
    assert h.shape == (batch, TOKENS, WIDTH)
    s = statistics.median(times)
    return {"params": sum(p.numel() for p in model.parameters()), "dtype": str(dtype), "batch": batch,
            "step_s": s, "captions_per_s": batch / s, "flops_per_caption": llama_flops_per_caption(cfg)}


def measure_store(lengths: list[int], rows: int, seed: int = 0) -> dict:
    """Bytes per compact row at each length, and the read + re-pad cost of a Parquet file of such rows."""
    rng = np.random.default_rng(seed)
    pad = rng.standard_normal(WIDTH).astype(np.float16)
    field = schema.compact_tensor_field(schema.CAPTION_STATES, (TOKENS, WIDTH), pad)
    out = {"padded_bytes_per_row": TOKENS * WIDTH * 2, "by_length": {}}
    for n in lengths:
        values = rng.standard_normal((rows, TOKENS, WIDTH), dtype=np.float32).astype(np.float16)
        arr = schema.compact_array(list(values), [n] * rows, field)
        buf = io.BytesIO()
        pq.write_table(pa.table({schema.CAPTION_STATES: arr}, schema=pa.schema([field])), buf)
        raw = buf.getvalue()
        c = time.process_time()
        table = pq.read_table(pa.BufferReader(raw), use_threads=False)
        states = schema.read_tensor(table, schema.CAPTION_STATES, np.float16)  # (rows, 128, 2048) re-padded
        cpu = time.process_time() - c
        assert states.shape == (rows, TOKENS, WIDTH)
        out["by_length"][n] = {"parquet_bytes_per_row": len(raw) / rows, "read_cpu_s_per_row": cpu / rows,
                               "rows_per_cpu_s": rows / cpu, "stored_mb_per_cpu_s": len(raw) / 1e6 / cpu}
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--iters", type=int, default=2)
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--lengths", type=int, nargs="+", default=[32, 64, 96, 128], help="real tokens per caption")
    p.add_argument("--rows", type=int, default=64)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    store = measure_store(args.lengths, args.rows)
    print(json.dumps(store, indent=1), flush=True)
    compute = measure_compute(args.batch, args.iters, getattr(torch, args.dtype))
    train = flops_per_sample(model_config("EMMDiT_512"))  # forward + backward per sample
    report = {"threads": torch.get_num_threads(), "store": store, "compute": compute,
              "emmdit_train_flops_per_sample": train,
              # GPU time added per sample by computing on the trainers, at equal MFU: every epoch, every sample.
              "compute_over_train_flops": compute["flops_per_caption"] / train}
    print(json.dumps({k: v for k, v in report.items() if k != "store"}, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
