"""What the GPU suite measured (`bench/results/**/gpu_suite.json`, bench/gpu_suite.py) on a GPU kind: the training
step's MFU per family and the encoders' items per second, for the plan to use instead of assumptions (it names the
part and the file). A run counts for a GPU kind when the device name holds the kind's first word ("H100"); debug
(CPU) runs never count; the newest run wins.
"""
from __future__ import annotations

import glob
import json
import os

RESULTS = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "bench",
                       "results")
# The parts that measure each family's training step, best first.
SUITE_PARTS = {"microdit": ("microdit/stage1_compile", "microdit/stage1_eager"), "emmdit": ("emmdit/512_eager",)}
# The `encoders` part's items/s each family's precompute needs: its VAE per resolution, its text encoder.
SUITE_ENCODERS = {"microdit": ({256: "sdxl_vae_256", 512: "sdxl_vae_512"}, "dfn5b_text"),
                  "emmdit": ({512: "dcae_f32c32_512"}, "llama_3_2_1b_128")}


def suite_reports(gpu_name: str, results: str | None = None) -> list[tuple[str, dict]]:
    """(path relative to `results`, report) of every GPU-suite run on this GPU kind, newest first."""
    results = results or RESULTS
    found = []
    for path in glob.glob(os.path.join(results, "**", "gpu_suite.json"), recursive=True):
        try:
            with open(path, encoding="utf-8") as f:
                report = json.load(f)
            env, parts = report["environment"], report["parts"]
            if not isinstance(env, dict) or not isinstance(parts, dict):
                continue
        except (OSError, ValueError, KeyError, TypeError):  # not a GPU-suite report: not ours to read
            continue
        if not env.get("debug") and gpu_name.split()[0].lower() in str(env.get("device", "")).lower():
            found.append((str(env.get("date_utc", "")), os.path.relpath(path, results), report))
    return [(where, report) for _, where, report in sorted(found, key=lambda f: f[0], reverse=True)]


def measured_mfu(gpu_name: str, family: str, results: str | None = None) -> tuple[float, str] | None:
    """(MFU, where it comes from) of the newest run that measured this family's training step, if any."""
    for where, report in suite_reports(gpu_name, results):
        for name in SUITE_PARTS.get(family, ()):
            part = report["parts"].get(name) or {}
            if part.get("status") == "ok" and part.get("mfu"):
                return float(part["mfu"]), (f"measured by the GPU suite: {name} on "
                                            f"{report['environment']['device']} ({where})")
    return None


def precompute_hours(gpu_name: str, family: str, resolutions: list[int], images: int | None,
                     results: str | None = None) -> dict:
    """GPU-hours to encode `images` (every resolution's latent and the caption) at the encoders' measured items/s:
    {"gpu_hours", "seconds_per_image", "source"}, or {"reason"} saying why there is no figure."""
    if family not in SUITE_ENCODERS:
        return {"reason": f"the GPU suite measures no encoders of family {family!r}"}
    vaes, text = SUITE_ENCODERS[family]
    missing = [r for r in resolutions if r not in vaes]
    if missing:
        return {"reason": f"the GPU suite measures no VAE encode at {missing} px"}
    names = [vaes[r] for r in resolutions] + [text]
    for where, report in suite_reports(gpu_name, results):
        part = report["parts"].get("encoders") or {}
        rates = [part.get(f"{n}_per_s") if part.get(f"{n}_status") == "ok" else None for n in names]
        if all(rates):
            seconds = sum(1.0 / float(r) for r in rates)
            source = f"{', '.join(names)} measured by the GPU suite on {report['environment']['device']} ({where})"
            if family == "emmdit":
                source += "; REPA's DINOv2 features not included (not measured)"
            return {"seconds_per_image": seconds, "gpu_hours": seconds * images / 3600 if images else None,
                    "source": source}
    return {"reason": "no encoder throughput measured on this GPU kind yet (bench/gpu_suite.py, `encoders`)"}
