"""The run report: per-stage loss and throughput, GPU-hours and cost, sample grids and metrics vs the paper.

Reads only what the steps left under the run root:
    {root}/config.json                       the resolved recipe (stage order; optional)
    {root}/train/{stage}/metrics.jsonl       {step, loss, samples_per_s, step_s, data_wait_s?, mfu?, ...} per log
    {root}/train/{stage}/export/config.json  {"model", "stage"}: workers, GPUs, global batch, mask ratio
    {root}/train/{stage}/samples/*.png, {root}/samples/grid.png, {root}/eval/metrics.json, eval/demo_grid.png
and writes {root}/report/report.md, report.html, stats.json and the PNGs they show (copied in, so the folder
stands alone, on S3 too). Training time of a stage is the sum over logged windows of steps x seconds per step,
so time lost to a crash before the last checkpoint is not counted; cost = time x GPUs x price per GPU-hour. A
stage trained on CPUs is counted in core-hours (time x workers x CPUs per worker) and costs nothing here. The
report states only what ran: a metric that was not computed has no row, and the FID protocol line appears only
with an FID.
"""
from __future__ import annotations

import html
import io
import json
import os
from typing import Any

from model import family as families
from pipeline.core import storage
from pipeline.core.layout import METRICS, Layout
from pipeline.core.plan import ReportConfig
from pipeline.evaluate.geneval.scores import tag_table
from pipeline.planner.render import beside_measured

# Stretching Each Dollar (arXiv 2407.15811), Table / abstract figures.
PAPER = {"fid_22m_real": 12.72, "fid_37m": 12.66, "geneval": 0.46, "cost_usd": 1890.0, "price_per_gpu_hour": 3.75,
         "gpus": 8, "days": 2.6, "samples_per_s": 3050.0}


def read_jsonl(uri: str) -> list[dict[str, Any]]:
    """Rows of a JSON-lines file; a malformed line -> ValueError naming the file and line."""
    rows = []
    for n, line in enumerate(storage.read_bytes(uri).decode().splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{uri!r} line {n} is not JSON: {e}") from e
    return sorted(rows, key=lambda r: r["step"])


def stage_fields(stage: dict[str, Any]) -> dict[str, Any]:
    """The few settings the report reads from a stage config (the plan's sections, or an older flat one)."""
    if "batch" not in stage:
        return stage
    return {"global_batch": stage["batch"].get("global_batch"), "num_workers": stage["batch"].get("num_workers"),
            "use_gpu": stage["batch"].get("use_gpu"), "cpus_per_worker": stage["batch"].get("cpus_per_worker"),
            "resolution": stage.get("data", {}).get("resolution"),
            "mask_ratio": stage.get("objective", {}).get("mask_ratio")}


def stage_stats(rows: list[dict[str, Any]], stage: dict[str, Any], price: float, tail: int = 5) -> dict[str, Any]:
    """Steps, samples, training time, mean throughput, GPU-hours, cost and final loss of one stage's metrics."""
    if not rows:
        raise ValueError("stage has no metrics rows")
    stage = stage_fields(stage)
    batch = int(stage.get("global_batch", 0)) or None
    seconds, waited, timed, prev = 0.0, 0.0, 0.0, 0
    for r in rows:
        window = r["step"] - prev  # optimizer steps since the previous log line
        if "step_s" in r:
            seconds += window * float(r["step_s"])
            if r.get("data_wait_s") is not None:
                waited, timed = waited + window * float(r["data_wait_s"]), timed + window * float(r["step_s"])
        elif batch and r.get("samples_per_s"):
            seconds += window * batch / float(r["samples_per_s"])
        prev = r["step"]
    if not seconds and all("time" in r for r in rows) and len(rows) > 1:
        seconds = float(rows[-1]["time"]) - float(rows[0]["time"])  # wall clock between first and last log
    steps = int(rows[-1]["step"])
    gpus = int(stage.get("num_workers", 1)) if stage.get("use_gpu", True) else 0
    # A CPU stage's Ray workers each hold `cpus_per_worker` cores (1 when the config does not say).
    cores = 0.0 if gpus else int(stage.get("num_workers", 1)) * float(stage.get("cpus_per_worker") or 1.0)
    hours = seconds / 3600.0
    losses = [float(r["loss"]) for r in rows if r.get("loss") is not None]
    out = {"steps": steps, "samples": steps * batch if batch else None, "hours": hours, "gpus": gpus,
           "workers": int(stage.get("num_workers", 1)), "gpu_hours": hours * gpus, "cores": cores,
           "core_hours": hours * cores,
           "cost_usd": hours * gpus * price, "final_loss": sum(losses[-tail:]) / len(losses[-tail:]),
           "first_loss": losses[0], "resolution": stage.get("resolution"), "mask_ratio": stage.get("mask_ratio")}
    out["samples_per_s"] = out["samples"] / seconds if batch and seconds else None
    out["input_wait"] = waited / timed if timed else None  # share of step time spent waiting for batches
    for key in ("mfu", "mem_gb"):
        values = [float(r[key]) for r in rows if r.get(key) is not None]
        out[key] = sum(values) / len(values) if values else None
    return out


def _stage_names(root: str, cfg: ReportConfig) -> list[str]:
    paths = Layout(root)
    train = paths.train_root if storage.is_s3(root) else os.path.abspath(paths.train_root)  # list_files: absolute
    found = set()
    for uri in storage.list_files(train, METRICS, recursive=True):
        parts = uri[len(train):].strip("/").split("/")
        if len(parts) == 2 and parts[1] == METRICS:  # train/{stage}/metrics.jsonl only
            found.add(parts[0])
    found = sorted(found)
    order = cfg.stages
    if order is None and storage.exists(paths.config):
        run = storage.read_json(paths.config)
        order = [s["name"] for s in run.get("stages", []) if isinstance(s, dict) and "name" in s] or None
    if order is None:
        return found
    missing = [s for s in order if s not in found]
    if cfg.stages is not None and missing:
        raise FileNotFoundError(f"no {METRICS} for stage(s) {missing} under {paths.train_root!r}")
    return [s for s in order if s in found]


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return buf.getvalue()


def plot_curves(series: dict[str, list[dict[str, Any]]], key: str, ylabel: str, x: str = "step",
                xlabel: str = "stage step", logy: bool = False) -> bytes:
    """PNG of `key` against `x`, one line per named series of metric rows."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    for name, rows in series.items():
        pts = [(r[x], r[key]) for r in rows if r.get(key) is not None and r.get(x) is not None]
        if pts:
            ax.plot(*zip(*pts), label=name, linewidth=1.2)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if logy:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    data = _png(fig)
    plt.close(fig)
    return data


def _fmt(value, spec: str = ".3f", none: str = "n/a") -> str:
    return none if value is None else format(value, spec)


def _metrics_rows(metrics: dict[str, Any] | None) -> list[tuple[str, str, str]]:
    """A row per metric the run computed (none for what did not run)."""
    m = metrics or {}
    demo = m.get("demo") or {}
    rows = []
    if m.get("fid") is not None:
        rows.append(("FID (COCO-2014 val, %s images)" % m.get("num_images", "-"), _fmt(m["fid"], ".2f"),
                     f"{PAPER['fid_22m_real']} (22M real) / {PAPER['fid_37m']} (37M)"))
    if m.get("clip_score") is not None:
        rows.append(("CLIP score", _fmt(m["clip_score"], ".2f"), "not reported"))
    if demo.get("caption_match") is not None:
        rows.append(("Demo caption match (colour and shape)", _fmt(demo["caption_match"], ".2%"),
                     "n/a (synthetic recipe only)"))
    return rows


def _copy(src: str, report: str, name: str) -> str | None:
    if not storage.exists(src):
        return None
    storage.write_bytes(storage.join(report, name), storage.read_bytes(src))
    return name


def build_report(root_uri: str, cfg: ReportConfig | None = None) -> str:
    """Write {root}/report/report.md (+ .html, stats.json, PNGs) from the run's outputs; returns report.md's URI."""
    cfg = cfg or ReportConfig()
    paths = Layout(root_uri)
    report = paths.report_dir
    stages = _stage_names(root_uri, cfg)
    if not stages:
        raise FileNotFoundError(f"no {paths.stage_metrics('<stage>')!r}: nothing to report; train a stage first")
    series, stats, family = {}, {}, None
    for name in stages:
        series[name] = read_jsonl(paths.stage_metrics(name))
        export = paths.export_config(name)
        exported = storage.read_json(export) if storage.exists(export) else {}
        family = family or exported.get("family")
        stats[name] = stage_stats(series[name], exported.get("stage", {}), cfg.price_per_gpu_hour, cfg.tail)
    totals = {k: sum(s[k] or 0 for s in stats.values()) for k in ("steps", "samples", "hours", "gpu_hours",
                                                                   "core_hours", "cost_usd")}
    totals["samples_per_s"] = totals["samples"] / (totals["hours"] * 3600) if totals["hours"] else None
    metrics = storage.read_json(paths.metrics) if storage.exists(paths.metrics) else None

    figures = {"loss.png": plot_curves(series, "loss", "training loss", logy=True),
               "throughput.png": plot_curves(series, "samples_per_s", "samples / s")}
    for fname, data in figures.items():
        storage.write_bytes(storage.join(report, fname), data)
    grids = []  # (title, file name in the report folder)
    for title, src, fname in ([("Final samples", paths.sample_grid(), "samples.png"),
                               ("Demo caption-match samples", paths.demo_grid, "demo_grid.png")]
                              + [(f"{s}: last training samples", _last_png(root_uri, s), f"samples_{s}.png")
                                 for s in stages]):
        if src and _copy(src, report, fname):
            grids.append((title, fname))

    if cfg.title is None:
        cfg = cfg.model_copy(update={"title": f"{_family_title(family)} run report"})
    estimate = storage.read_json(paths.estimate) if storage.exists(paths.estimate) else None
    md = _markdown(cfg, stages, stats, totals, metrics, grids, estimate)
    storage.write_json(storage.join(report, "stats.json"), {"stages": stats, "totals": totals, "metrics": metrics,
                                                            "price_per_gpu_hour": cfg.price_per_gpu_hour,
                                                            "paper": PAPER})
    if cfg.html:
        storage.write_bytes(storage.join(report, "report.html"), _html(cfg.title, md).encode())
    uri = paths.report
    storage.write_bytes(uri, md.encode())  # last: the report's presence means its figures are there
    return uri


def _family_title(name: str | None) -> str:

    try:
        return families.get(name or families.DEFAULT).title
    except ValueError:
        return str(name)


def _last_png(root: str, stage: str) -> str | None:
    files = storage.list_files(Layout(root).stage_samples(stage), ".png")
    return files[-1] if files else None


def _markdown(cfg, stages, stats, totals, metrics, grids, estimate=None) -> str:
    price = cfg.price_per_gpu_hour
    work = (f"{totals['hours']:,.2f} h of training, {totals['steps']:,} steps, {totals['samples']:,} samples, "
            f"{_fmt(totals['samples_per_s'], ',.1f')} samples/s")
    if totals["gpu_hours"]:
        cost = (f"Cost at ${price:.2f} per GPU-hour: **${totals['cost_usd']:,.2f}** for {totals['gpu_hours']:,.2f} "
                f"GPU-hours ({work})" + (f", plus {totals['core_hours']:,.2f} CPU core-hours" if totals['core_hours']
                                         else "") + ".")
    else:  # "0 GPU-hours, $0" would hide what the run used
        cost = f"CPU run: **{totals['core_hours']:,.2f} core-hours** ({work}); no GPU time to price."
    lines = [f"# {cfg.title}", "",
             f"{cost} Paper: ${PAPER['cost_usd']:,.0f} "
             f"({PAPER['days']} days on {PAPER['gpus']}xH100, about {PAPER['samples_per_s']:,.0f} samples/s).", "",
             "## Stages", "",
             "| stage | res | mask | steps | samples | hours | devices | device-hours | cost ($) | samples/s | MFU "
             "| input wait | first loss | final loss |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name in stages:
        s = stats[name]
        devices, used = (f"{s['gpus']} GPU", f"{s['gpu_hours']:.3f} GPU-h") if s["gpus"] else \
            (f"{s['cores']:g} CPU cores", f"{s['core_hours']:.3f} core-h")
        lines.append(f"| {name} | {s['resolution'] or '-'} | {_fmt(s['mask_ratio'], '.2f')} | {s['steps']:,} | "
                     f"{_fmt(s['samples'], ',')} | {s['hours']:.3f} | {devices} | {used} | "
                     f"{s['cost_usd']:.2f} | {_fmt(s['samples_per_s'], ',.1f')} | {_fmt(s['mfu'], '.1%')} | "
                     f"{_fmt(s['input_wait'], '.0%')} | {s['first_loss']:.4f} | {s['final_loss']:.4f} |")
    if estimate:  # the forecast made at the start of the run (pipeline/planner/)
        lines += ["", "## Planned and measured", ""] + beside_measured(estimate, stats)
    lines += ["", "![loss](loss.png)", "", "![throughput](throughput.png)", "", "## Metrics", ""]
    rows = _metrics_rows(metrics)
    if rows:
        lines += ["| metric | this run | paper |", "|---|---|---|"] + [f"| {a} | {b} | {c} |" for a, b, c in rows]
    else:
        lines.append("No evaluation ran." if not metrics else "The evaluation computed no metric.")
    if metrics and metrics.get("protocol") and metrics.get("fid") is not None:  # the protocol is FID's
        p = metrics["protocol"]
        lines += ["", f"Protocol: {p.get('num_images')} COCO-2014 val captions, {p.get('resolution')} px, "
                      f"{p.get('steps')} Heun steps, guidance {p.get('guidance')}, seed {p.get('seed')}, "
                      f"EMA weights: {p.get('use_ema')}."]
    if metrics and metrics.get("skipped"):
        lines += ["", "Skipped: " + "; ".join(f"{k}: {v}" for k, v in metrics["skipped"].items())]
    if metrics and metrics.get("geneval"):
        g = metrics["geneval"]
        lines += ["", "## GenEval", "", f"{g['images']} images of {g['prompts']} prompts; detector `{g['detector']}`, "
                  f"colours `{g['colour_model']}` (transformers / open_clip ports: docs/GENEVAL.md).", "",
                  "| tag | this run | paper |", "|---|---|---|"]
        lines += [f"| {a} | {b} | {c} |" for a, b, c in tag_table(g)]
    if grids:
        lines += ["", "## Samples", ""]
        for title, fname in grids:
            lines += [f"### {title}", "", f"![{title}]({fname})", ""]
    return "\n".join(lines).rstrip() + "\n"


def _html(title: str, md: str) -> str:
    """A standalone HTML rendering of the report (python-markdown when installed, else preformatted)."""
    try:
        import markdown

        body = markdown.markdown(md, extensions=["tables"])
    except ImportError:
        body = f"<pre>{html.escape(md)}</pre>"
    style = "body{font-family:sans-serif;max-width:960px;margin:auto}table{border-collapse:collapse}" \
            "td,th{border:1px solid #ccc;padding:2px 6px}img{max-width:100%}"
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{style}</style></head><body>{body}</body></html>\n")


def main(argv: list[str] | None = None) -> int:
    """`python -m pipeline.report.report ROOT [--price 3.75]`."""
    import argparse

    p = argparse.ArgumentParser(prog="microdit report", description=__doc__.splitlines()[0])
    p.add_argument("root")
    p.add_argument("--price", type=float, default=ReportConfig.model_fields["price_per_gpu_hour"].default)
    args = p.parse_args(argv)
    print(build_report(args.root, ReportConfig(price_per_gpu_hour=args.price)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
