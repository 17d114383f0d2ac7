"""One GPU suite: training steps, encoders and a real Ray Train stage on one card, in <= 8 minutes.

    python -m bench.gpu_suite --out bench/results/$(date +%F)     # on one H100/H200
    python -m bench.gpu_suite --debug --out /tmp/suite            # every part at debug size on CPU

Parts (each sub-part runs in its own subprocess under its own time limit, so an OOM crash, a hang or a compile
that never ends costs only that sub-part: it is recorded as "timeout" or "error: ..." and the suite goes on):

1. microdit: MicroDiT_XL_2 training step (loss + backward + AdamW; bf16 autocast over float32 master weights) at
   the stage-1 shape (4x32x32, mask 0.75) and the stage-3 shape (4x64x64, pos scale 2, mask 0.75), eager and
   per-block torch.compile (as pipeline.train.parallelize.apply_compile); the largest micro-batch of
   --micro-candidates that fits, samples/s, MFU, peak memory.
2. emmdit: E-MMDiT (EMMDiT_512: latent 32x16x16, caption 128x2048, rectified flow) at the micro-batch of part 1's
   stage-1 eager measurement, and the same network without token compression (`compression=False`: every block
   on all 256 image tokens) at that micro-batch: compression's speedup.
3. encoders: images/s (captions/s) of the real architectures with random weights in bf16: SDXL VAE encode at 256
   and 512 px, DFN5B-CLIP text tower, DC-AE f32c32 encode at 512 px, Llama-3.2-1B at 128 tokens.
4. ray: a real Ray Train stage (world size 1, FSDP2, NCCL; gloo on CPU) on synthetic Parquet latents, its logged
   samples/s against a plain single-process loop (same model, loss, clip, AdamW, EMA) at the same shapes: the
   Ray overhead ratio (target >= 0.9).

Writes <out>/gpu_suite.json (every figure, device, versions, each sub-part's status and wall time) and
<out>/gpu_suite.md (the table, also printed).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterable

REPO = Path(__file__).resolve().parents[1]

MICRO_CANDIDATES = (256, 128, 64, 32, 16, 8, 4, 2, 1)
DEBUG_MICRO_CANDIDATES = (4, 2)

# Sub-part time limits in seconds on GPU (sum 470 s of the 480 s budget; process start is inside each limit).
GPU_LIMITS = {"microdit/stage1_eager": 50, "microdit/stage1_compile": 80, "microdit/stage3_eager": 45,
              "microdit/stage3_compile": 70, "emmdit/512_eager": 40, "emmdit/512_nocompress": 35, "encoders": 55,
              "ray/plain": 25, "ray/stage": 70}
DEBUG_LIMITS = {k: 180 for k in GPU_LIMITS} | {"ray/stage": 360}  # loaded shared CPUs
TOTAL_BUDGET_S = 480

from bench.encoder_configs import DFN5B_TEXT_CONFIG, SDXL_VAE_CONFIG  # noqa: E402
from pipeline.planner.clusters import peak_by_device_name  # noqa: E402
# DC-AE f32c32 (mit-han-lab/dc-ae-f32c32-sana-1.0-diffusers config.json, as diffusers' conversion script
# writes it for that checkpoint; written from that script, not read from the hub: check it against the hub's
# config.json before quoting DC-AE figures). Encode only is timed.
DCAE_F32C32_CONFIG = dict(
    in_channels=3, latent_channels=32, attention_head_dim=32,
    encoder_block_types=["ResBlock", "ResBlock", "ResBlock", "EfficientViTBlock", "EfficientViTBlock",
                         "EfficientViTBlock"],
    decoder_block_types=["ResBlock", "ResBlock", "ResBlock", "EfficientViTBlock", "EfficientViTBlock",
                         "EfficientViTBlock"],
    encoder_block_out_channels=[128, 256, 512, 512, 1024, 1024],
    decoder_block_out_channels=[128, 256, 512, 512, 1024, 1024],
    encoder_layers_per_block=[2, 2, 2, 3, 3, 3], decoder_layers_per_block=[3, 3, 3, 3, 3, 3],
    encoder_qkv_multiscales=[[], [], [], [5], [5], [5]], decoder_qkv_multiscales=[[], [], [], [5], [5], [5]],
    upsample_block_type="interpolate", downsample_block_type="Conv",
    decoder_norm_types=["batch_norm", "batch_norm", "batch_norm", "rms_norm", "rms_norm", "rms_norm"],
    decoder_act_fns=["relu", "relu", "relu", "silu", "silu", "silu"], scaling_factor=0.41407,
)
# Llama-3.2-1B (meta-llama/Llama-3.2-1B config.json), the E-MMDiT caption encoder; LlamaModel, no LM head.
LLAMA_3_2_1B_CONFIG = dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                           intermediate_size=8192, vocab_size=128256, max_position_embeddings=131072,
                           rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=True)


# ---------------------------------------------------------------- arithmetic (unit-tested without a GPU)

def peak_flops(device_name: str | None, override: float | None = None) -> float | None:
    """Dense bf16 peak FLOP/s of the card by name (pipeline/planner/clusters.py); `override` wins; else None."""
    if override:
        return float(override)
    return peak_by_device_name(device_name)


def mfu(samples_per_s: float, flops_per_sample: float, peak: float | None) -> float | None:
    """Model FLOPs utilisation: samples/s x training FLOPs per sample / peak FLOP/s (None without a peak)."""
    if not peak:
        return None
    return samples_per_s * flops_per_sample / peak


def is_oom(exc: BaseException) -> bool:
    """An accelerator out-of-memory error (torch.OutOfMemoryError or a RuntimeError saying so)."""
    try:
        import torch

        if isinstance(exc, torch.OutOfMemoryError):
            return True
    except ImportError:  # pragma: no cover
        pass
    return isinstance(exc, (RuntimeError, MemoryError)) and "out of memory" in str(exc).lower()


def search_micro_batch(measure: Callable[[int], dict], candidates: Iterable[int],
                       on_oom: Callable[[], None] = lambda: None) -> tuple[int | None, dict | None, list[int]]:
    """Try `candidates` from the largest down; the first that does not run out of memory wins.

    Returns (micro-batch, its measurement, the candidates that ran out of memory). Errors other than OOM
    propagate. (None, None, all) when none fits."""
    oom = []
    for micro in sorted(set(candidates), reverse=True):
        try:
            return micro, measure(micro), oom
        except Exception as e:  # noqa: BLE001 - only OOM is handled
            if not is_oom(e):
                raise
            oom.append(micro)
        on_oom()  # outside the except block: the traceback (and the tensors its frames hold) is gone by now
    return None, None, oom


# ---------------------------------------------------------------- child helpers

def _device(debug: bool) -> str:
    import torch

    if debug:
        return "cpu"
    if not torch.cuda.is_available():
        raise RuntimeError("no CUDA device (use --debug for the CPU path)")
    return "cuda"


def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def _free(device: str) -> None:
    import gc

    import torch

    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _peak_gib(device: str) -> float | None:
    import torch

    return torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None


class Writer:
    """A child's result file, rewritten after every figure so a timeout keeps what was measured."""

    def __init__(self, path: str):
        self.path, self.data = path, {}

    def put(self, **kv) -> None:
        self.data.update(kv)
        tmp = self.path + ".tmp"
        Path(tmp).write_text(json.dumps(self.data, indent=1, default=str))
        os.replace(tmp, self.path)


def train_step_point(family_name: str, preset: str, latent: tuple[int, int, int], caption: tuple[int, int],
                     objective: dict, pos_scale: float, micro: int, compile: bool, device: str,
                     warmup: int, steps: int, overrides: dict | None = None) -> dict:
    """samples/s of loss + backward + AdamW at one micro-batch: bf16 autocast over float32 weights on CUDA,
    float32 on CPU; compile per block like parallelize.apply_compile (inductor on CUDA, eager backend on CPU)."""
    import torch

    from model import family as families
    from model.objectives.configs import config_from_dict as objective_config
    from model.objectives.objective import build as build_objective
    from pipeline.train.optim import build_optimizer

    fam = families.get(family_name)
    cfg = fam.fit(fam.config(preset, **(overrides or {})), latent, caption, pos_scale)
    torch.manual_seed(0)
    with torch.device(device):
        net = fam.build(cfg)
    net.train()
    if compile:
        # CPU (--debug): dynamo's full-graph trace without codegen, so the path runs in seconds, not minutes.
        backend = "inductor" if device == "cuda" else "eager"
        for block in fam.shard_units(net):  # apply_compile's loop, with the backend chosen by device
            block.compile(fullgraph=True, backend=backend)
    objective = objective_config(objective)
    obj = build_objective(objective)
    opt = build_optimizer(net, 1e-4)
    x = torch.randn(micro, *latent, device=device)
    cap = torch.randn(micro, *caption, device=device)
    flops = fam.flops_per_sample(cfg, objective)
    _free(device)
    times = []
    try:
        for i in range(warmup + steps):
            _sync(device)
            t = time.perf_counter()
            with torch.autocast("cuda", torch.bfloat16, enabled=device == "cuda"):
                loss = obj.loss(net, x, cap)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            _sync(device)
            if i >= warmup:
                times.append(time.perf_counter() - t)
        step_s = statistics.median(times)
        return {"micro_batch": micro, "samples_per_s": micro / step_s, "step_s": step_s,
                "flops_per_sample": flops, "peak_mem_gib": _peak_gib(device), "params": sum(
                    p.numel() for p in net.parameters()), "loss": float(loss)}
    finally:
        del net, opt, x, cap
        _free(device)


def child_train(args, w: Writer) -> None:
    """Part 1 / part 2 sub-part: one (family, shape, compile) with the micro-batch search."""
    import torch

    device = _device(args.debug)
    spec = json.loads(args.spec)
    peak = peak_flops(torch.cuda.get_device_name() if device == "cuda" else None, args.peak_flops)
    cands = spec.get("candidates") or (DEBUG_MICRO_CANDIDATES if args.debug else MICRO_CANDIDATES)
    w.put(spec=spec, candidates=list(cands), peak_flops=peak)

    def measure(micro: int) -> dict:
        return train_step_point(spec["family"], spec["preset"], tuple(spec["latent"]), tuple(spec["caption"]),
                                spec["objective"], spec.get("pos_scale", 1.0), micro, spec["compile"], device,
                                spec["warmup"], spec["steps"], spec.get("overrides"))

    micro, point, oom = search_micro_batch(measure, cands, on_oom=lambda: _free(device))
    if point is None:
        raise RuntimeError(f"no micro-batch of {list(cands)} fits")
    w.put(**point, oom=oom, mfu=mfu(point["samples_per_s"], point["flops_per_sample"], peak))


def _timed(fn, iters: int, device: str) -> float:
    """Seconds per call after one warm-up call."""
    fn()
    _sync(device)
    t = time.perf_counter()
    for _ in range(iters):
        fn()
    _sync(device)
    return (time.perf_counter() - t) / iters


def child_encoders(args, w: Writer) -> None:
    """Part 3: images/s of each encoder; each one's failure is recorded and the next one still runs."""
    import torch

    device = _device(args.debug)
    dtype = torch.float32 if args.debug else torch.bfloat16
    iters = 1 if args.debug else 5
    batch = 2 if args.debug else args.encoder_batch
    w.put(dtype=str(dtype), batch=batch, iters=iters)

    def run(name: str, fn) -> None:
        t = time.perf_counter()
        try:
            w.put(**{f"{name}_per_s": fn(), f"{name}_status": "ok"})
        except Exception as e:  # noqa: BLE001 - one encoder's failure is recorded
            w.put(**{f"{name}_status": f"error: {type(e).__name__}: {e}"[:300]})
        w.put(**{f"{name}_wall_s": round(time.perf_counter() - t, 2)})
        _free(device)

    def build(ctor):
        torch.manual_seed(0)
        with torch.device(device):
            m = ctor()
        return m.to(dtype).eval().requires_grad_(False)

    def vae(res: int):
        def f():
            from diffusers import AutoencoderKL

            cfg = SDXL_VAE_CONFIG if not args.debug else dict(
                SDXL_VAE_CONFIG, block_out_channels=[8, 16], down_block_types=["DownEncoderBlock2D"] * 2,
                up_block_types=["UpDecoderBlock2D"] * 2, norm_num_groups=4, layers_per_block=1)
            m = build(lambda: AutoencoderKL.from_config(cfg))
            x = torch.rand(batch, 3, res, res, device=device, dtype=dtype) * 2 - 1
            with torch.no_grad():
                return batch / _timed(lambda: m.encode(x).latent_dist.sample(), iters, device)
        return f

    def clip():
        from model.encoders.clip_text import TextEncoder, build_text_tower, tiny_tower

        tower = tiny_tower() if args.debug else build(lambda: build_text_tower(DFN5B_TEXT_CONFIG, dtype))
        enc = TextEncoder(tower, device, dtype)
        caps = [f"a photo of {i} red cubes on a wooden table in the evening light" for i in range(batch)]
        return batch / _timed(lambda: enc.encode(caps), iters, device)

    def dcae():
        from diffusers import AutoencoderDC

        from model.encoders.dcae import TINY_CONFIG

        m = build(lambda: AutoencoderDC(**(TINY_CONFIG if args.debug else DCAE_F32C32_CONFIG)))
        res = 64 if args.debug else 512
        x = torch.rand(batch, 3, res, res, device=device, dtype=dtype) * 2 - 1
        with torch.no_grad():
            return batch / _timed(lambda: m.encode(x).latent, iters, device)

    def llama():
        from transformers import LlamaConfig, LlamaModel

        from model.encoders.llama import TINY_CONFIG

        cfg = LlamaConfig(**(dict(TINY_CONFIG, vocab_size=256) if args.debug else LLAMA_3_2_1B_CONFIG))
        m = build(lambda: LlamaModel(cfg))
        tokens = 16 if args.debug else 128
        ids = torch.randint(0, cfg.vocab_size, (batch, tokens), device=device)
        with torch.no_grad():
            return batch / _timed(lambda: m(input_ids=ids).last_hidden_state, iters, device)

    run("sdxl_vae_256" if not args.debug else "sdxl_vae_64", vae(64 if args.debug else 256))
    run("sdxl_vae_512" if not args.debug else "sdxl_vae_128", vae(128 if args.debug else 512))
    run("dfn5b_text", clip)
    run("dcae_f32c32_512" if not args.debug else "dcae_tiny_64", dcae)
    run("llama_3_2_1b_128" if not args.debug else "llama_tiny_16", llama)


def _ray_shapes(args) -> dict:
    """Preset, latent side, resolution, caption width and micro-batch of part 4."""
    spec = json.loads(args.spec)
    if args.debug:
        return dict(spec, preset="MicroDiT_Debug", resolution=64, downsample=4, side=16, width=64)
    from model.microdit.config import model_config

    return dict(spec, resolution=256, downsample=8, side=32, width=model_config(spec["preset"]).caption_dim)


def child_ray_plain(args, w: Writer) -> None:
    """Part 4 baseline: one process, same model/loss/clip/AdamW/EMA as a stage, batches already on the device."""
    import torch

    from model import family as families
    from model.ema import EMA
    from model.objectives.configs import config_from_dict as objective_config
    from model.objectives.objective import build as build_objective
    from pipeline.train.optim import build_optimizer

    device = _device(args.debug)
    s = _ray_shapes(args)
    fam = families.get("microdit")
    cfg = fam.fit(fam.config(s["preset"]), (4, s["side"], s["side"]), (77, s["width"]), 1.0)
    torch.manual_seed(0)
    with torch.device(device):
        net = fam.build(cfg)
    obj = build_objective(objective_config({"kind": "edm", "mask_ratio": 0.75, "caption_dropout": 0.1}))
    opt = build_optimizer(net, 1e-4)
    ema = EMA(net, 0.999)
    micro = s["micro"]
    x = torch.randn(micro, 4, s["side"], s["side"], device=device)
    cap = torch.randn(micro, 77, s["width"], device=device)
    times = []
    for step in range(s["steps"]):
        _sync(device)
        t = time.perf_counter()
        with torch.autocast("cuda", torch.bfloat16, enabled=device == "cuda"):
            loss = obj.loss(net, x, cap)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        ema.update(net, step)
        _sync(device)
        times.append(time.perf_counter() - t)
    keep = times[s["warmup"]:]
    w.put(preset=s["preset"], micro_batch=micro, steps=s["steps"], samples_per_s=micro * len(keep) / sum(keep),
          peak_mem_gib=_peak_gib(device))


def child_ray_stage(args, w: Writer) -> None:
    """Part 4: a real train_stage (Ray Train, world size 1, FSDP2; NCCL on GPU, gloo on CPU) on Parquet latents."""
    sys.path.insert(0, str(REPO / "tests"))
    import test_train_helpers as helpers

    from pipeline.train.metrics import read_metrics
    from pipeline.train.stage import train_stage

    s = _ray_shapes(args)
    root = tempfile.mkdtemp(prefix="gpu-suite-ray-")
    micro, steps = s["micro"], s["steps"]
    helpers.TEXT_WIDTH = s["width"]  # write_latents reads the caption width from this module global
    rows = max(2 * micro, 16)
    data = {"synth": helpers.write_latents(f"{root}/data/latents/synth", rows=rows, files=2,
                                           resolutions=(s["resolution"],), downsample=s["downsample"])}
    stage = helpers.tiny_stage(
        name="gpu-suite", resolution=s["resolution"], base_resolution=s["resolution"], mask_ratio=0.75,
        steps=steps, global_batch=micro, micro_batch=micro, num_workers=1, use_gpu=not args.debug,
        cpus_per_worker=0.5 if args.debug else 1.0, lr=1e-4, sigma_data=0.5, schedule=dict(kind="cosine", warmup_steps=1),
        ema=dict(decay=0.999), shuffle_buffer=min(micro, 64), log_every=1, checkpoint_every=steps,
        keep_checkpoints=1, sample_prompts=0, max_failures=0, cache_dataset_mb=4096)
    w.put(preset=s["preset"], micro_batch=micro, steps=steps, rows=rows, backend="gloo" if args.debug else "nccl")
    t = time.perf_counter()
    try:
        train_stage(stage, s["preset"], root, data)
    finally:
        import ray

        if ray.is_initialized():
            ray.shutdown()
    wall = time.perf_counter() - t
    metrics = read_metrics(f"{root}/train/gpu-suite")
    kept = metrics[s["warmup"]:] or metrics
    step_s = sum(r["step_s"] for r in kept)
    w.put(samples_per_s=micro * len(kept) / step_s, stage_wall_s=wall, logged_steps=len(metrics),
          input_wait=sum(r.get("data_wait_s", 0.0) for r in kept) / step_s,
          logged_mfu=kept[-1].get("mfu"), logged_mem_gb=kept[-1].get("mem_gb"))


CHILDREN = {"train": child_train, "encoders": child_encoders, "ray_plain": child_ray_plain,
            "ray_stage": child_ray_stage}


# ---------------------------------------------------------------- parent: run each sub-part under a limit

def run_part(name: str, kind: str, spec: dict, args, limit: float) -> dict:
    """Run one sub-part in a fresh process group; kill it at `limit` s. Returns its figures + status + wall_s."""
    fd, result = tempfile.mkstemp(prefix="gpu-suite-", suffix=".json")
    os.close(fd)
    Path(result).write_text("{}")
    cmd = [sys.executable, "-m", "bench.gpu_suite", "--child", kind, "--result", result, "--spec", json.dumps(spec)]
    if args.debug:
        cmd.append("--debug")
    if args.peak_flops:
        cmd += ["--peak-flops", str(args.peak_flops)]
    cmd += ["--encoder-batch", str(args.encoder_batch)]
    log = Path(args.out) / "logs" / (name.replace("/", "_") + ".log")
    log.parent.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    status = "ok"
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout=max(limit, 1))
            if rc != 0:
                tail = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()][-1:] or [""]
                status = f"error: exit {rc}: {tail[0][:240]}"
        except subprocess.TimeoutExpired:
            status = "timeout"
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # the sub-part's whole group (its Ray processes too)
            except ProcessLookupError:
                pass
            proc.wait()
    wall = time.perf_counter() - t
    try:
        figures = json.loads(Path(result).read_text() or "{}")
    finally:
        Path(result).unlink(missing_ok=True)
    out = {"status": status, "wall_s": round(wall, 2), "limit_s": round(limit, 1), "log": str(log), **figures}
    print(f"[gpu_suite] {name}: {status} in {wall:.1f} s", file=sys.stderr, flush=True)
    return out


def environment(debug: bool) -> dict:
    import torch

    env = {"torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
           "host": platform.node(), "debug": debug, "date_utc": _dt.datetime.now(_dt.timezone.utc).isoformat()}
    if torch.cuda.is_available() and not debug:
        env.update(device=torch.cuda.get_device_name(), device_count=torch.cuda.device_count(),
                   cudnn=torch.backends.cudnn.version())
        env["device_memory_gib"] = torch.cuda.get_device_properties(0).total_memory / 2**30
    else:
        env["device"] = "cpu"
    return env


def plan(args) -> list[tuple[str, str, Callable[[dict], dict]]]:
    """(sub-part name, child kind, spec from the results so far), in run order."""
    d = args.debug
    preset = "MicroDiT_Debug" if d else args.preset
    sides = {"stage1": 8, "stage3": 16} if d else {"stage1": 32, "stage3": 64}
    cap_w = 64 if d else 1024
    warm, steps = (1, 2) if d else (2, 5)
    warm_c = 1 if d else 3
    cands = list(DEBUG_MICRO_CANDIDATES if d else args.micro_candidates)
    out = []
    for stage, side in sides.items():
        for compile in (False, True):
            spec = {"family": "microdit", "preset": preset, "latent": [4, side, side], "caption": [77, cap_w],
                    "objective": {"kind": "edm", "mask_ratio": 0.75}, "pos_scale": side / sides["stage1"],
                    "compile": compile, "warmup": warm_c if compile else warm, "steps": steps, "candidates": cands}
            out.append((f"microdit/{stage}_{'compile' if compile else 'eager'}", "train", lambda r, s=spec: s))

    def stage1_micro(r: dict, default: int) -> int:
        return r.get("microdit/stage1_eager", {}).get("micro_batch") or default

    def emmdit(r: dict, overrides: dict) -> dict:
        m = stage1_micro(r, 2 if d else 64)
        return {"family": "emmdit", "preset": "EMMDiT_Debug" if d else "EMMDiT_512",
                "latent": [4, 16, 16] if d else [32, 16, 16], "caption": [16, 64] if d else [128, 2048],
                # No caption dropout: it needs the empty prompt's embedding, and costs nothing worth timing.
                "objective": {"kind": "rectified_flow", "caption_dropout": 0.0}, "compile": False, "warmup": warm,
                "steps": steps, "candidates": [m], "overrides": overrides}
    out.append(("emmdit/512_eager", "train", lambda r: emmdit(r, {})))
    # The same network with every block on all tokens: token compression's measured speedup.
    out.append(("emmdit/512_nocompress", "train", lambda r: emmdit(r, {"compression": False})))
    out.append(("encoders", "encoders", lambda r: {}))
    ray_steps = 2 if d else args.ray_steps

    def ray_spec(r: dict) -> dict:
        return {"preset": args.ray_preset, "micro": args.ray_micro or stage1_micro(r, 2 if d else 64),
                "steps": ray_steps, "warmup": 0 if d else min(5, ray_steps // 3)}
    out.append(("ray/plain", "ray_plain", ray_spec))
    out.append(("ray/stage", "ray_stage", ray_spec))
    return out


def fmt(v: Any, digits: int = 3) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}g}" if abs(v) < 1000 else f"{v:,.0f}"
    return str(v)


def markdown(report: dict) -> str:
    env, parts = report["environment"], report["parts"]
    lines = [f"GPU suite, {env['date_utc'][:16]}Z, device {env['device']}, torch {env['torch']}, CUDA {env['cuda']}"
             f"{' (debug, CPU, float32)' if env['debug'] else ''}; total {report['wall_s']:.0f} s", "",
             "| part | status | micro-batch | samples/s | MFU | peak GiB | wall s |", "|---|---|---|---|---|---|---|"]
    for name, p in parts.items():
        if name == "encoders":
            continue
        m = p.get("mfu")
        lines.append(f"| {name} | {p['status']} | {fmt(p.get('micro_batch'))} | {fmt(p.get('samples_per_s'))} | "
                     f"{f'{m:.1%}' if m is not None else '-'} | {fmt(p.get('peak_mem_gib'))} | {p['wall_s']:.1f} |")
    ratio = report.get("ray_overhead_ratio")
    lines.append(f"| **Ray stage / plain loop** | | | **{fmt(ratio)}** (target >= 0.9) | | | |")
    lines.append(f"| **E-MMDiT token compression speedup** | | | **{fmt(report.get('emmdit_compression_speedup'))}** "
                 f"| | | |")
    enc = parts.get("encoders", {})
    lines += ["", f"Encoders ({enc.get('dtype', '-')}, batch {enc.get('batch', '-')}; part status "
              f"{enc.get('status', '-')}, {enc.get('wall_s', 0):.1f} s):", "",
              "| encoder | items/s | status |", "|---|---|---|"]
    for key in [k[:-len("_status")] for k in enc if k.endswith("_status")]:
        lines.append(f"| {key} | {fmt(enc.get(key + '_per_s'))} | {enc[key + '_status']} |")
    return "\n".join(lines) + "\n"


def suite(args) -> dict:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    limits = DEBUG_LIMITS if args.debug else GPU_LIMITS
    start = time.perf_counter()
    report: dict = {"environment": environment(args.debug), "parts": {}}
    report["peak_flops"] = peak_flops(report["environment"].get("device"), args.peak_flops)
    budget = args.budget_s or (10**9 if args.debug else TOTAL_BUDGET_S)
    for name, kind, spec_of in plan(args):
        if args.only and not any(name.startswith(o) for o in args.only):
            continue
        left = budget - (time.perf_counter() - start)
        if left < 5:
            report["parts"][name] = {"status": "timeout", "wall_s": 0.0, "note": "suite budget spent"}
            continue
        limit = min(limits[name] * args.limit_scale, left)
        try:
            spec = spec_of(report["parts"])
        except Exception as e:  # noqa: BLE001
            report["parts"][name] = {"status": f"error: {e}", "wall_s": 0.0}
            continue
        report["parts"][name] = run_part(name, kind, spec, args, limit)
    parts = report["parts"]
    plain, ray = parts.get("ray/plain", {}), parts.get("ray/stage", {})
    if plain.get("status") == "ok" and ray.get("status") == "ok":
        report["ray_overhead_ratio"] = ray["samples_per_s"] / plain["samples_per_s"]
    s1, em = parts.get("microdit/stage1_eager", {}), parts.get("emmdit/512_eager", {})
    if s1.get("status") == "ok" and em.get("status") == "ok":
        report["emmdit_over_microdit_stage1_samples"] = em["samples_per_s"] / s1["samples_per_s"]
    flat = parts.get("emmdit/512_nocompress", {})
    if em.get("status") == "ok" and flat.get("status") == "ok":
        report["emmdit_compression_speedup"] = em["samples_per_s"] / flat["samples_per_s"]
    report["wall_s"] = round(time.perf_counter() - start, 2)
    (out / "gpu_suite.json").write_text(json.dumps(report, indent=2, default=str))
    table = markdown(report)
    (out / "gpu_suite.md").write_text(table)
    print(table, flush=True)
    return report


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=f"bench/results/gpu_suite-{_dt.date.today().isoformat()}")
    p.add_argument("--debug", action="store_true", help="every part at debug size on CPU, float32, gloo")
    p.add_argument("--peak-flops", type=float, default=None, help="peak bf16 FLOP/s (default: by card name)")
    p.add_argument("--preset", default="MicroDiT_XL_2", help="part 1 preset")
    p.add_argument("--micro-candidates", type=int, nargs="+", default=list(MICRO_CANDIDATES))
    p.add_argument("--encoder-batch", type=int, default=32)
    p.add_argument("--ray-preset", default="MicroDiT_Tiny_2", help="part 4 preset (256 px, mask 0.75)")
    p.add_argument("--ray-micro", type=int, default=None, help="part 4 micro-batch (default: part 1 stage-1 eager)")
    p.add_argument("--ray-steps", type=int, default=30)
    p.add_argument("--only", nargs="+", default=None, help="run only sub-parts whose name starts with these")
    p.add_argument("--limit-scale", type=float, default=1.0, help="multiply every sub-part's time limit")
    p.add_argument("--budget-s", type=float, default=None, help="whole-suite budget (GPU default 480)")
    p.add_argument("--child", choices=sorted(CHILDREN), help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    p.add_argument("--spec", default="{}", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        w = Writer(args.result)
        CHILDREN[args.child](args, w)
        return
    suite(args)


if __name__ == "__main__":
    main()
