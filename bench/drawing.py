"""Drawing through the diffusers pipelines: peak memory with the released XL layout, and where drawing time goes.

    python -m bench.drawing memory --out drawing_memory.json [--before /path/to/older/checkout]
    python -m bench.drawing speed --presets MicroDiT_Debug MicroDiT_Tiny_2 EMMDiT_Debug --batch 8 --out speed.json

memory: writes a file in the MicroDiT release's layout at MicroDiT_XL_2's size (random weights, torch.save as the
release ships it; about 4.7 GB of disk), then, each in a fresh process, imports it (`import_weights`) and draws one
image from the export (`Generator`, 1 step, no guidance, at 128 px through the stand-in VAE and a one-layer CLIP text
tower of DFN5B's width, so the network's own memory dominates). Each process reports its resident set after imports
(baseline) and its peak resident set (VmHWM) as a multiple of the file's size. `--before` runs the same two steps
with the code of another checkout (its own import and Generator), in the same run.

speed: per preset, a random export with the tiny encoders; the time to draw a batch (text encoding, the sampler,
VAE decode, PNG-ready uint8) against the network's own forward time at the sampler's batch x its number of network
evaluations. The overhead is the rest, as a share of the total; the parts are timed separately too.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time

import torch

GIB = 2 ** 30
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS = ["a large red circle on a white background, center", "a small blue square on a black background",
           "a green triangle, bottom right", "a purple circle, top left", "a yellow square on a gray background",
           "a large white triangle on a black background", "a small orange circle, center", "a pink square"]

# Run in a fresh interpreter with the given checkout first on sys.path; prints one JSON line.
_CHILD = textwrap.dedent("""
    import json, sys, time
    sys.path.insert(0, sys.argv[1])
    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    job = json.loads(sys.argv[2])
    import torch
    torch.set_num_threads(job["threads"])
    from pipeline.weights import import_weights
    from pipeline.generate import GenerateConfig, Generator
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # the peak so far := now: imports are the baseline
    base, t0 = status("VmRSS"), time.perf_counter()
    if job["step"] == "import":
        import_weights(job["file"], job["out"], "microdit", job["variant"])
    else:
        gen = Generator(job["out"], GenerateConfig(steps=1, guidance=1.0, resolution=128, batch_size=1),
                        vae_spec="standin", text_spec=job["text"])
        gen.sample(["a red circle"])
    print(json.dumps({"baseline": base, "peak": status("VmHWM"), "seconds": time.perf_counter() - t0}))
""")


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def write_xl_release(path: str, variant: str) -> int:
    """A MicroDiT_XL_2-sized file in the release's layout, random weights; returns its size in bytes."""
    from pipeline.weights import get_format, to_release_state

    fmt = get_format("microdit")
    v = fmt.variants[variant]
    cfg = fmt.config(v.preset, v.overrides)
    with torch.device("meta"):
        model = fmt.build(cfg)
    gen = torch.Generator().manual_seed(0)
    state = {k: (torch.randn(t.shape, generator=gen) * 0.02) for k, t in model.state_dict().items()
             if not k.endswith("pos_embed")}
    torch.save(to_release_state(fmt, state, cfg), path)
    return os.path.getsize(path)


def write_wide_text_tower(folder: str, width: int) -> str:
    """An open_clip text tower folder of `width` (DFN5B's 1024) with one layer: the text encoder the XL export needs,
    small beside the network."""
    from safetensors.torch import save_file

    from model.encoders.clip_text import CONFIG_NAME, WEIGHTS_NAME, build_text_tower

    cfg = {"embed_dim": width, "quick_gelu": False,
           "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": width, "heads": 16, "layers": 1}}
    os.makedirs(folder, exist_ok=True)
    save_file({k: v.contiguous() for k, v in build_text_tower(cfg).state_dict().items()},
              os.path.join(folder, WEIGHTS_NAME))
    with open(os.path.join(folder, CONFIG_NAME), "w") as f:
        json.dump({"model_cfg": cfg}, f)
    return folder


def _child(tree: str, job: dict) -> dict:
    done = subprocess.run([sys.executable, "-c", _CHILD, tree, json.dumps(job)], capture_output=True, text=True,
                          cwd=tree, env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    if done.returncode:
        raise RuntimeError(f"{job['step']} in {tree} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def memory(args) -> dict:
    work = args.workdir or tempfile.mkdtemp(prefix="bench-drawing-")
    from pipeline.weights import get_format

    path = os.path.join(work, args.file_name or get_format("microdit").variants[args.variant].file)
    if not os.path.isfile(path):
        write_xl_release(path, args.variant)
    size = os.path.getsize(path)
    text = write_wide_text_tower(os.path.join(work, "text"), 1024)
    trees = {"now": REPO, **({"before": args.before} if args.before else {})}
    rows = []
    for label, tree in trees.items():
        out = os.path.join(work, f"export-{label}")
        for step in ("import", "draw"):
            r = _child(tree, {"step": step, "file": path, "out": out, "variant": args.variant, "text": text,
                              "threads": args.threads})
            rows.append({"code": label, "step": step, "file_gib": size / GIB, "baseline_gib": r["baseline"] / GIB,
                         "peak_gib": r["peak"] / GIB, "peak_over_file": r["peak"] / size, "seconds": r["seconds"]})
            print(f"{label:6s} {step:6s} peak {r['peak'] / GIB:6.2f} GiB = {r['peak'] / size:4.2f} x file "
                  f"({size / GIB:.2f} GiB; baseline {r['baseline'] / GIB:.2f} GiB) in {r['seconds']:.0f} s", flush=True)
    return {"file_bytes": size, "variant": args.variant, "rows": rows}


def _random_export(folder: str, preset: str) -> str:
    from safetensors.torch import save_file

    from model import family as families

    family = "emmdit" if preset.startswith("EMMDiT") else "microdit"
    fam = families.get(family)
    cfg = fam.config(preset, **({"input_size": 16} if family == "microdit" else {}))
    torch.manual_seed(0)
    net = fam.build(cfg)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.02 * torch.randn_like(p))
    os.makedirs(folder, exist_ok=True)
    state = {k: v.contiguous() for k, v in net.state_dict().items()}
    for name in ("model.safetensors", "ema.safetensors"):
        save_file(state, os.path.join(folder, name))
    # The tiny CLIP tower is 64 wide; a wider MicroDiT (Tiny_2: DFN5B's 1024) gets a one-layer tower of its width.
    text = "tiny" if cfg.caption_dim == 64 else write_wide_text_tower(os.path.join(folder, "text"), cfg.caption_dim)
    encoders = ({"vae": "standin", "text": text} if family == "microdit" else
                {"vae": "tiny-dcae", "text": "tiny-llama", "text_mode": "release"})
    objective = {"kind": "edm"} if family == "microdit" else {"kind": "rectified_flow"}
    config = {"family": family, "model": fam.config_to_dict(cfg), "objective": objective, "encoders": encoders,
              "sampler": {"steps": fam.sampler.steps, "guidance": fam.sampler.guidance}, "step": 0}
    if family == "emmdit":  # E-MMDiT's exports carry the empty prompt's states they trained with
        from model.encoders import load_text_encoder
        from pipeline.core import schema

        uncond = load_text_encoder("tiny-llama", tokens=cfg.caption_len).unconditional().numpy()
        schema.write_unconditional(folder, uncond)
        config["unconditional"] = schema.UNCONDITIONAL_FILE
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f)
    return folder


def _median_s(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


@torch.no_grad()
def speed_of(preset: str, batch: int, steps: int, repeats: int, work: str) -> dict:
    from model.pipelines.common import decode
    from pipeline.core.plan import GenerateConfig
    from pipeline.generate import Generator

    export = _random_export(os.path.join(work, preset), preset)
    gen = Generator(export, GenerateConfig(steps=steps, batch_size=batch))
    pipe, prompts = gen.pipe, (PROMPTS * batch)[:batch]
    gen.sample(prompts)  # warm-up
    total = _median_s(lambda: gen.sample(prompts), repeats)
    cfg = pipe.transformer.cfg
    pipe.scheduler.set_timesteps(steps)
    nfe = len(pipe.scheduler.timesteps)
    guided = gen.guidance != 1.0
    n = batch * (2 if guided else 1)
    x = torch.randn(n, cfg.in_channels, cfg.input_size, cfg.input_size)
    t = torch.full((n,), 0.5)
    caption = pipe.encode_prompt(prompts * (2 if guided else 1))
    forward = _median_s(lambda: pipe.transformer(x, t, caption), repeats * 3)
    text = _median_s(lambda: pipe.encode_prompt(prompts), repeats)
    latents = torch.randn(batch, cfg.in_channels, cfg.input_size, cfg.input_size)
    vae = _median_s(lambda: decode(pipe.vae, latents, "np"), repeats)
    network = forward * nfe
    row = {"preset": preset, "batch": batch, "steps": steps, "nfe": nfe, "guidance": gen.guidance,
           "resolution": gen.resolution, "total_s": total, "images_per_s": batch / total, "forward_s": forward,
           "network_s": network, "overhead": 1 - network / total, "text_s": text, "vae_decode_s": vae}
    print(f"{preset:16s} batch {batch} steps {steps} ({nfe} evaluations): {batch / total:6.2f} images/s, network "
          f"{network:6.2f} s of {total:6.2f} s -> overhead {100 * row['overhead']:4.1f}% (text {text:.3f} s, "
          f"VAE {vae:.3f} s)", flush=True)
    return row


def speed(args) -> dict:
    torch.set_num_threads(args.threads)
    work = tempfile.mkdtemp(prefix="bench-drawing-speed-")
    return {"threads": args.threads, "rows": [speed_of(p, args.batch, args.steps, args.repeats, work)
                                              for p in args.presets]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="what", required=True)
    m = sub.add_parser("memory")
    m.add_argument("--variant", default="22M", help="the MicroDiT release variant whose layout and size to write")
    m.add_argument("--file-name", default=None, help="default: the variant's release file name")
    m.add_argument("--workdir", default=None, help="where the file and exports go (default: a temp folder)")
    m.add_argument("--before", default=None, help="another checkout to measure in the same run")
    s = sub.add_parser("speed")
    s.add_argument("--presets", nargs="+", default=["MicroDiT_Debug", "MicroDiT_Tiny_2", "EMMDiT_Debug"])
    s.add_argument("--batch", type=int, default=8)
    s.add_argument("--steps", type=int, default=4)
    s.add_argument("--repeats", type=int, default=3)
    for q in (m, s):
        q.add_argument("--threads", type=int, default=os.cpu_count())
        q.add_argument("--out", default=None)
    args = p.parse_args(argv)
    result = {"what": args.what, "torch": torch.__version__, **(memory(args) if args.what == "memory" else speed(args))}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
