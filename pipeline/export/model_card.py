"""The README.md model card of an exported diffusers folder: the Hub's YAML metadata, then what the model is, how it
was made (recipe, data, stages), what it scored, a sample grid, and the lines that load it.

Run facts are read from the run the export belongs to (`{root}/train/{stage}/export` -> `{root}`, pipeline/core/
layout.py) when they are there: the plan, the row counts of the precomputed data, each stage's export, the evaluate
step's metrics and its sample grid. An imported release states where its file came from and its published scores.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from pipeline.core import layout, storage
from pipeline.core.layout import Layout
from pipeline.export.export_folder import Export

GRID_NAME = "samples.png"


@dataclass
class RunFacts:
    """What the card says about how the model was made (each part optional)."""

    root: str | None = None
    recipe: dict[str, Any] | None = None  # the run plan (config.json under the root)
    rows: dict[str, int] = field(default_factory=dict)  # data source -> precomputed rows
    stages: list[dict[str, Any]] = field(default_factory=list)  # one row per finished stage
    metrics: dict[str, Any] | None = None  # the evaluate step's metrics.json
    grid: str | None = None  # a sample grid's URI


def run_root(export_folder: str) -> str | None:
    """The run root of a trained export (`{root}/train/{stage}/export`), else None."""
    parts = export_folder.rstrip("/").rsplit("/", 3)
    if len(parts) == 4 and parts[1] == "train" and parts[3] == "export":
        return parts[0]
    return None


def _part_rows(folder: str) -> int:
    from pipeline.data.precompute import read_part_stats

    return sum(int(read_part_stats(p).get("rows", 0)) for p in storage.list_files(folder, ".parquet"))


def gather(export: Export) -> RunFacts:
    """The run facts of `export` (module docstring); empty for an export outside a run."""
    root = run_root(export.folder)
    if root is None or not storage.exists(Layout(root).config):
        return RunFacts()
    paths = Layout(root)
    facts = RunFacts(root=root, recipe=storage.read_json(paths.config))
    for source, folder in sorted(paths.finished_latents().items()):
        facts.rows[source] = _part_rows(folder)
    for stage in facts.recipe.get("stages", []):
        name = stage.get("name") if isinstance(stage, dict) else None
        if name and layout.is_complete(paths.export(name)):
            config = storage.read_json(paths.export_config(name))
            s = config.get("stage") or {}
            batch = (s.get("batch") or {}).get("global_batch")
            facts.stages.append({"name": name, "resolution": (s.get("data") or {}).get("resolution"),
                                 "steps": config.get("step"), "global_batch": batch,
                                 "objective": (config.get("objective") or {}).get("kind")})
    if storage.exists(paths.metrics):
        facts.metrics = storage.read_json(paths.metrics)
    for grid in (paths.demo_grid, paths.sample_grid()):
        if storage.exists(grid):
            facts.grid = grid
            break
    return facts


def _table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join("" if v is None else str(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _metric_rows(metrics: dict[str, Any]) -> list[list[Any]]:
    rows = []
    for key, value in sorted(metrics.items()):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            rows.append([key, f"{value:.4g}"])
        elif isinstance(value, dict):
            rows += [[f"{key}.{k}", f"{v:.4g}"] for k, v in sorted(value.items())
                     if isinstance(v, (int, float)) and not isinstance(v, bool)]
    return rows


def model_card(export: Export, facts: RunFacts, repo_hint: str, license: str) -> str:
    """README.md text for the folder (module docstring); `repo_hint` is the path shown in the loading lines."""
    family = export.family
    source = export.config.get("source") or {}
    tags = ["text-to-image", "diffusion", "microdit", family.name]
    meta = {"license": license, "library_name": "diffusers", "pipeline_tag": "text-to-image", "tags": tags}
    if source.get("repo"):
        meta["base_model"] = source["repo"]
    yaml = "\n".join(["---"] + [f"{k}: {json.dumps(v)}" if not isinstance(v, list) else
                                f"{k}:\n" + "\n".join(f"- {t}" for t in v) for k, v in meta.items()] + ["---"])
    m = export.model
    lines = [yaml, "", f"# {family.title} ({'imported release' if source else 'trained with microdit'})", "",
             f"A {family.title} text-to-image diffusion transformer ({getattr(m, 'dim', '?')} wide, "
             f"{getattr(m, 'depth', '?')} blocks, {m.input_size}x{m.input_size} latents, caption states "
             f"{m.caption_len} x {m.caption_dim}), drawn with the `{family.drawing.pipeline.split(':')[1]}` pipeline "
             f"in this folder: {export.sampler['steps']} steps, guidance {export.sampler['guidance']} by default. "
             f"Encoders: VAE `{export.encoders.get('vae')}`, text `{export.encoders.get('text')}`"
             + (f" (text mode `{export.text_mode}`)" if family.text.unconditional == "empty_prompt" else "") + ".",
             "", "## Use it", "", "```python", "from diffusers import DiffusionPipeline", "",
             f'pipe = DiffusionPipeline.from_pretrained("{repo_hint}", trust_remote_code=True)',
             'image = pipe("a red circle on a white background").images[0]', "```", "",
             "The pipeline's, network's and scheduler's code ship in this folder (`pipeline_*.py`, `transformer/`, "
             "`scheduler/`): loading needs diffusers, transformers and torch, not microdit."]
    if source:
        lines += ["", "## Source", "", f"Converted from `{source.get('file')}` (sha256 `{source.get('sha256')}`), "
                  f"variant `{source.get('variant')}` of {source.get('repo')}."]
        if source.get("scores"):
            lines += ["", "Published scores:", "", _table(["metric", "value"],
                                                         [[k, v] for k, v in sorted(source["scores"].items())])]
    if facts.recipe:
        sources = [f"{s.get('name')} ({s.get('kind')})" for s in facts.recipe.get("sources", [])]
        lines += ["", "## How it was made", "", f"Trained with microdit, run `{facts.recipe.get('name')}` (its plan: "
                  f"`{facts.root}/config.json`). Data sources: {', '.join(sources) or 'n/a'}."]
        if facts.rows:
            lines += ["", _table(["source", "rows (precomputed)"], [[k, v] for k, v in facts.rows.items()])]
        if facts.stages:
            lines += ["", _table(["stage", "resolution", "steps", "global batch", "objective"],
                                 [[s["name"], s["resolution"], s["steps"], s["global_batch"], s["objective"]]
                                  for s in facts.stages])]
    if facts.metrics and _metric_rows(facts.metrics):
        lines += ["", "## Evaluation", "", _table(["metric", "value"], _metric_rows(facts.metrics))]
    if facts.grid:
        lines += ["", "## Samples", "", f"![samples]({GRID_NAME})"]
    return "\n".join(lines) + "\n"
