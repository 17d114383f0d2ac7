"""MicroDiT training throughput (forward + backward of the EDM loss) and MoE memory, on CPU or CUDA.

    python -m bench.model_throughput --preset MicroDiT_Debug --resolution-latent 16 --batch-size 8 --out r.json

Reports, in one run: samples/s and peak memory with masking (stage 1 shape, default ratio 0.75) and without
(stage 2 shape) and their speedup ratio; model FLOPs/sample and MFU on CUDA (bf16 autocast, a chosen SDPA
kernel, torch.compile off/on); and the memory of one expert-choice MoE layer at --moe-tokens tokens (1,024 =
the 512 px stages) in our gather/scatter form against the release's one-hot (batch, experts, k, tokens) form.
Peak memory is torch.cuda.max_memory_allocated on CUDA and the peak resident set (VmHWM, reset through
/proc/self/clear_refs) on CPU; both are deltas over the memory held before the measured step.
"""
from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from model.microdit.config import backbone_specs, model_config, tokens_per_expert
from model.objectives.edm import EDMConfig, edm_loss
from model.microdit.network import MicroDiT
from model.microdit.moe import ExpertChoiceMoE

try:
    from model.microdit.config import flops_per_sample
except ImportError:  # the contract allows either module
    from model.microdit.network import flops_per_sample

MIB = 2 ** 20


# ---------------------------------------------------------------- memory probes
class PeakMemory:
    """Peak memory above the level at entry: CUDA allocator peak, or the process's peak RSS on CPU."""

    def __init__(self, device: torch.device):
        self.device, self.peak_bytes = device, None

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        else:
            _malloc_trim()
            self.base = _reset_rss_peak()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device) - self.base
        elif self.base is not None:
            self.peak_bytes = _proc_status_kib("VmHWM") * 1024 - self.base
        return False


class SavedActivations:
    """Bytes of distinct tensor storages autograd saves for backward, leaving out the given tensors (weights).

    Exact and load-independent, unlike the CPU peak RSS; not available under torch.compile.
    """

    def __init__(self, exclude=()):
        self.exclude = {t.untyped_storage().data_ptr() for t in exclude}
        self.storages: dict[int, int] = {}

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        st = t.untyped_storage()
        if st.data_ptr() not in self.exclude:
            self.storages[st.data_ptr()] = st.nbytes()
        return t

    def __enter__(self):
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self._hooks.__exit__(*exc)
        return False

    @property
    def mib(self) -> float:
        return sum(self.storages.values()) / MIB


def _proc_status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def _reset_rss_peak() -> int | None:
    """Reset VmHWM to the current RSS (Linux); returns the current RSS in bytes, None if unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _proc_status_kib("VmRSS") * 1024
    except OSError:
        return None


def _malloc_trim() -> None:
    # Hand freed heap pages back so memory cached from an earlier measurement does not hide this one's peak.
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


# ---------------------------------------------------------------- training throughput
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _sdpa_context(kind: str):
    if kind == "auto":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
               "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}[kind]
    return sdpa_kernel([backend])


def measure_training(cfg, batch: int, mask_ratios: list[float], device: torch.device, compiles: list[bool],
                     sdpa: str, iters: int, warmup: int, seed: int = 0) -> list[dict]:
    """Time forward + backward of the EDM loss (no optimizer step) for each (compile, mask ratio) case.

    One network serves every case; timed steps are interleaved across cases and the median step time
    is reported, so load on a shared machine hits every case alike.
    """
    torch.manual_seed(seed)
    net = MicroDiT(cfg).to(device)
    fns = {False: net, True: torch.compile(net) if True in compiles else None}
    gen = torch.Generator(device=device).manual_seed(seed)
    latents = torch.randn(batch, cfg.in_channels, cfg.input_size, cfg.input_size, device=device, generator=gen)
    caption = torch.randn(batch, cfg.caption_len, cfg.caption_dim, device=device, generator=gen)

    def step(comp: bool, ratio: float, probe=contextlib.nullcontext()) -> None:
        autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda"
                    else contextlib.nullcontext())
        with autocast, _sdpa_context(sdpa), probe:
            loss, _ = edm_loss(fns[comp], latents, caption, EDMConfig(mask_ratio=ratio), generator=gen)
        loss.backward()
        for p in net.parameters():
            p.grad = None

    cases = [(comp, ratio) for comp in compiles for ratio in mask_ratios]
    results = {}
    for case in cases:
        for _ in range(warmup):  # compile and allocator warm-up
            step(*case)
        _sync(device)
        saved = None if case[0] else SavedActivations(exclude=list(net.parameters()) + [latents, caption])
        with PeakMemory(device) as mem:
            step(*case, probe=saved or contextlib.nullcontext())
        results[case] = {"mask_ratio": case[1], "compile": case[0], "batch": batch,
                         "params": sum(p.numel() for p in net.parameters()),
                         "peak_mem_mib": None if mem.peak_bytes is None else mem.peak_bytes / MIB,
                         "saved_activations_mib": None if saved is None else saved.mib,
                         "flops_per_sample": flops_per_sample(cfg, case[1]), "times": []}
    for _ in range(iters):
        for case in cases:
            _sync(device)
            t0 = time.perf_counter()
            step(*case)
            _sync(device)
            results[case]["times"].append(time.perf_counter() - t0)
    for r in results.values():
        seconds = statistics.median(r.pop("times"))
        r.update(step_ms=1e3 * seconds, samples_per_s=batch / seconds)
    return [results[c] for c in cases]


# ---------------------------------------------------------------- MoE memory: gather/scatter vs one-hot
def onehot_moe_forward(moe: ExpertChoiceMoE, x: torch.Tensor) -> torch.Tensor:
    """The release's expert choice: routing by a (N, E, k, T) one-hot tensor, quadratic in tokens."""
    n, t, _ = x.shape
    k = tokens_per_expert(moe.capacity, t, moe.num_experts)
    probs = F.softmax(moe.router(x), dim=-1)  # (N, T, E)
    gate, idx = torch.topk(probs.transpose(1, 2), k, dim=-1)  # (N, E, k)
    onehot = F.one_hot(idx, num_classes=t).to(x.dtype)  # (N, E, k, T)
    routed = torch.einsum("nekt,ntd->nekd", onehot, x)  # (N, E, k, D)
    y = moe.experts(routed) * gate.unsqueeze(-1).to(x.dtype)  # (N, E, k, D)
    return torch.einsum("nekt,nekd->ntd", onehot, y)  # (N, T, D)


def measure_moe(cfg, tokens: int, batch: int, device: torch.device) -> dict:
    """Peak memory of forward + backward of one MoE layer (preset width, first MoE block's expert size)."""
    spec = next((s for s in backbone_specs(cfg) if s.moe), None)
    if spec is None:
        raise ValueError(f"preset has no MoE block (experts_every_n={cfg.experts_every_n}, depth={cfg.depth})")
    torch.manual_seed(0)
    moe = ExpertChoiceMoE(spec.dim, spec.hidden, cfg.num_experts, cfg.expert_capacity).to(device)
    moe.init_weights(0.02)
    x = torch.randn(batch, tokens, spec.dim, device=device, requires_grad=True)
    k = tokens_per_expert(cfg.expert_capacity, tokens, cfg.num_experts)
    result = {"tokens": tokens, "batch": batch, "dim": spec.dim, "hidden": spec.hidden,
              "experts": cfg.num_experts, "k": k,
              "onehot_tensor_mib": batch * cfg.num_experts * k * tokens * x.element_size() / MIB}
    outs = {}
    for name, fwd in (("gather", moe), ("onehot", lambda inp: onehot_moe_forward(moe, inp))):
        peaks = []
        for rep in range(4):  # one warm-up, then the median of three peaks (CPU RSS peaks are noisy)
            saved = SavedActivations(exclude=list(moe.parameters()) + [x])
            _sync(device)
            with PeakMemory(device) as mem:
                with saved:
                    out = fwd(x)
                out.sum().backward()
            if rep:
                peaks.append(mem.peak_bytes)
            outs[name] = out.detach()
            x.grad = None
            moe.zero_grad()
            del out
        result[f"{name}_peak_mib"] = None if None in peaks else statistics.median(peaks) / MIB
        result[f"{name}_saved_mib"] = saved.mib
    result["max_abs_diff"] = (outs["gather"] - outs["onehot"]).abs().max().item()
    if result["gather_peak_mib"] and result["onehot_peak_mib"]:
        result["onehot_over_gather"] = result["onehot_peak_mib"] / result["gather_peak_mib"]
    result["onehot_over_gather_saved"] = result["onehot_saved_mib"] / result["gather_saved_mib"]
    return result


# ---------------------------------------------------------------- report
def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {platform.machine()} ({torch.get_num_threads()} threads)"


def _fmt(v, spec: str = ".1f") -> str:
    return "n/a" if v is None else format(v, spec)


def print_report(report: dict) -> None:
    print(f"# {report['preset']} latent {report['resolution_latent']} on {report['device_name']} "
          f"(batch {report['batch']}, torch {report['torch']})")
    print(f"{'mask':>5} {'compile':>7} {'samples/s':>10} {'step ms':>9} {'peak MiB':>9} {'saved MiB':>9} "
          f"{'GFLOP/sample':>13} {'TFLOP/s':>8} {'MFU':>7}")
    for r in report["training"]:
        print(f"{r['mask_ratio']:>5.2f} {str(r['compile']):>7} {r['samples_per_s']:>10.2f} {r['step_ms']:>9.1f} "
              f"{_fmt(r['peak_mem_mib']):>9} {_fmt(r['saved_activations_mib']):>9} "
              f"{r['flops_per_sample'] / 1e9:>13.3f} "
              f"{r['achieved_flops'] / 1e12:>8.3f} {_fmt(r['mfu'], '.2%'):>7}")
    for key, ratio in report["masked_speedup"].items():
        print(f"masked {report['mask_ratio']} vs unmasked samples/s ({key}): {ratio:.2f}x")
    for m in report["moe"]:
        _print_moe(m)


def _print_moe(m: dict) -> None:
    print(f"# MoE layer at {m['tokens']} tokens (batch {m['batch']}, dim {m['dim']}, hidden {m['hidden']}, "
          f"E {m['experts']}, k {m['k']}), forward + backward:")
    print(f"  peak memory   gather/scatter {_fmt(m['gather_peak_mib']):>8} MiB   "
          f"one-hot {_fmt(m['onehot_peak_mib']):>8} MiB   ratio {_fmt(m.get('onehot_over_gather'), '.2f')}x")
    print(f"  saved for bwd gather/scatter {m['gather_saved_mib']:>8.1f} MiB   "
          f"one-hot {m['onehot_saved_mib']:>8.1f} MiB   ratio {m['onehot_over_gather_saved']:.2f}x")
    print(f"  the (N, E, k, T) one-hot tensor alone: {m['onehot_tensor_mib']:.1f} MiB; "
          f"outputs differ by {m['max_abs_diff']:.2e}")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="MicroDiT_Debug")
    p.add_argument("--resolution-latent", type=int, default=None, help="latent side (default: the preset's)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--mask-ratio", type=float, default=0.75, help="stage 1 masking, compared against 0")
    p.add_argument("--iters", type=int, default=10, help="timed steps per case (median reported)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:i]")
    p.add_argument("--compile", choices=["off", "on", "both"], default=None,
                   help="torch.compile the network (default: both on CUDA, off on CPU)")
    p.add_argument("--sdpa", choices=["auto", "flash", "efficient", "cudnn", "math"], default=None,
                   help="attention kernel (default: flash on CUDA, auto on CPU)")
    p.add_argument("--peak-flops", type=float, default=989e12, help="peak bf16 FLOP/s for MFU (H100 SXM dense)")
    p.add_argument("--moe-tokens", type=int, nargs="+", default=[1024],
                   help="token counts for the MoE memory table")
    p.add_argument("--moe-batch", type=int, default=2)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--out", default=None, help="write the report as JSON here")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if not 0.0 < args.mask_ratio < 1.0:
        raise ValueError(f"--mask-ratio {args.mask_ratio}: expected a value in (0, 1) to compare against 0")
    if args.batch_size < 1 or args.iters < 1 or args.warmup < 0:
        raise ValueError(f"--batch-size {args.batch_size}, --iters {args.iters}, --warmup {args.warmup}: "
                         "expected batch and iters >= 1, warmup >= 0")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    on_cuda = device.type == "cuda"
    compile_mode = args.compile or ("both" if on_cuda else "off")
    sdpa = args.sdpa or ("flash" if on_cuda else "auto")
    overrides = {} if args.resolution_latent is None else {"input_size": args.resolution_latent}
    cfg = model_config(args.preset, **overrides)
    compiles = {"off": [False], "on": [True], "both": [False, True]}[compile_mode]

    training = measure_training(cfg, args.batch_size, [args.mask_ratio, 0.0], device, compiles, sdpa,
                                args.iters, args.warmup)
    for r in training:
        r["achieved_flops"] = r["flops_per_sample"] * r["samples_per_s"]
        r["mfu"] = r["achieved_flops"] / args.peak_flops if on_cuda else None
    speedup = {}
    for comp in compiles:
        by_ratio = {r["mask_ratio"]: r for r in training if r["compile"] == comp}
        speedup[f"compile={comp}"] = by_ratio[args.mask_ratio]["samples_per_s"] / by_ratio[0.0]["samples_per_s"]

    report = {
        "preset": args.preset, "resolution_latent": cfg.input_size, "batch": args.batch_size,
        "mask_ratio": args.mask_ratio, "device": str(device), "sdpa": sdpa,
        "device_name": _device_name(device), "torch": torch.__version__, "peak_flops": args.peak_flops,
        "params": training[0]["params"],
        "training": training, "masked_speedup": speedup,
        "moe": [measure_moe(cfg, t, args.moe_batch, device) for t in args.moe_tokens],
        "command": " ".join([Path(sys.argv[0]).name] + (argv if argv is not None else sys.argv[1:])),
    }
    print_report(report)
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
