"""RunConfig: one recipe (a YAML file plus overrides) resolved into the typed sections of every step.

Overrides are `path=value` strings, the value parsed as YAML. The path is dotted; a list is indexed by position
or, for lists of named items (`stages`, `sources`), by name:

    stages.0.steps=10          stages.stage1.steps=10       download.processes_count=2
    sources.synthetic.n=64     model.depth=2                sample.prompts=["a red circle"]

Unknown keys anywhere raise ValueError naming them. The resolved config is written to {storage}/config.json by
the flow, and the layout helpers below are the one place that knows where each step writes under the root.
"""
from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pipeline.core import configs, storage
from pipeline.data.download import DownloadConfig
from pipeline.evaluate.evaluate import EvalConfig
from pipeline.generate import GenerateConfig
from pipeline.data.precompute import PrecomputeConfig
from pipeline.report.report import ReportConfig
from pipeline.train.config import StageConfig, stage_config


@dataclass
class EncodersConfig:
    """Frozen encoders: a VAE spec and a text encoder spec (see model/encoders.py for the accepted specs)."""

    vae: str = "stabilityai/stable-diffusion-xl-base-1.0"
    text: str = "hf-hub:apple/DFN5B-CLIP-ViT-H-14-378"


@dataclass
class SourceConfig:
    """One dataset: its name (folder names under data/), its adapter kind (pipeline.data.sources), its options."""

    name: str
    kind: str
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class SampleConfig(GenerateConfig):
    """The sample grid: fixed prompts drawn from a stage's export (default: the last stage) by generate()."""

    prompts: list[str] = field(default_factory=list)
    stage: str | None = None

    def generate_dict(self) -> dict[str, Any]:
        """The GenerateConfig part, as a plain dict."""
        names = {f.name for f in dataclasses.fields(GenerateConfig)}
        return {k: v for k, v in dataclasses.asdict(self).items() if k in names}


@dataclass
class RunConfig:
    """A whole run: where it writes, which cluster runs it, and every step's section."""

    name: str
    storage: str
    ray_address: str | None = None
    model: dict[str, Any] = field(default_factory=lambda: {"preset": "MicroDiT_XL_2"})
    encoders: EncodersConfig = field(default_factory=EncodersConfig)
    sources: list[SourceConfig] = field(default_factory=list)
    download: DownloadConfig = field(default_factory=DownloadConfig)
    precompute: PrecomputeConfig = field(default_factory=PrecomputeConfig)
    stages: list[StageConfig] = field(default_factory=list)
    sample: SampleConfig = field(default_factory=SampleConfig)
    evaluate: EvalConfig | None = None
    report: ReportConfig = field(default_factory=ReportConfig)

    # ---- layout under the storage root (BRIEF: "Storage layout")
    def uri(self, *parts: str) -> str:
        return storage.join(self.storage, *parts)

    def config_uri(self) -> str:
        return self.uri("config.json")

    def url_list_uri(self, source: str) -> str:
        return self.uri("data", "urls", f"{source}.parquet")

    def raw_uri(self, source: str) -> str:
        return self.uri("data", "raw", source)

    def shards_uri(self, source: str) -> str:
        return self.uri("data", "shards", source)

    def latents_uri(self, source: str) -> str:
        return self.uri("data", "latents", source)

    def stage_uri(self, stage: str) -> str:
        return self.uri("train", stage)

    def export_uri(self, stage: str) -> str:
        return self.uri("train", stage, "export")

    def samples_uri(self) -> str:
        return self.uri("samples")

    def sample_grid_uri(self) -> str:
        return self.uri("samples", "grid.png")

    def eval_uri(self) -> str:
        return self.uri("eval")

    def report_uri(self) -> str:
        return self.uri("report", "report.md")

    def stage(self, name: str) -> StageConfig:
        for st in self.stages:
            if st.name == name:
                return st
        raise ValueError(f"unknown stage {name!r}; this recipe has {[s.name for s in self.stages]}")

    def model_config(self):
        """The network config: the preset with the recipe's overrides (ValueError on unknown keys)."""
        from model.microdit.config import model_config

        params = dict(self.model)
        if "preset" not in params:
            raise ValueError(f"model section needs a 'preset'; got keys {sorted(params)}")
        return model_config(params.pop("preset"), **params)

    def to_dict(self) -> dict[str, Any]:
        return configs.to_dict(self)


def apply_override(data: dict[str, Any], text: str) -> None:
    """Apply one `a.b.0.c=value` override to the raw recipe dict in place."""
    if "=" not in text:
        raise ValueError(f"override {text!r} must look like path.to.key=value")
    dotted, raw = text.split("=", 1)
    keys = [k for k in dotted.strip().split(".")]
    if not all(keys):
        raise ValueError(f"override {text!r} has an empty key in {dotted!r}")
    value = parse_value(raw)
    node: Any = data
    for depth, key in enumerate(keys):
        last = depth == len(keys) - 1
        where = ".".join(keys[:depth]) or "<recipe>"
        if isinstance(node, list):
            index = _list_index(node, key, where)
            if last:
                node[index] = value
            else:
                node = node[index]
        elif isinstance(node, dict):
            if last:
                node[key] = value
            else:
                if node.get(key) is None:
                    node[key] = {}
                node = node[key]
        else:
            raise ValueError(f"override {text!r}: {where} is a {type(node).__name__}, not a section or list")


_FLOAT = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)$")


def parse_value(raw: str) -> Any:
    """An override value as YAML, except that 1e-5 is a float (YAML 1.1 wants 1.0e-5, a classic surprise)."""
    value = yaml.safe_load(raw)
    if isinstance(value, str) and _FLOAT.match(value.strip()):
        return float(value)
    return value


def _list_index(items: list, key: str, where: str) -> int:
    if key.lstrip("-").isdigit():
        i = int(key)
        if not -len(items) <= i < len(items):
            raise ValueError(f"override index {i} out of range for {where} (length {len(items)})")
        return i
    names = [it.get("name") if isinstance(it, dict) else None for it in items]
    if key not in names:
        raise ValueError(f"no item named {key!r} in {where}; names are {names}")
    return names.index(key)


def load_recipe(path: str | os.PathLike, overrides: list[str] | tuple[str, ...] = (),
                storage_base: str | None = None) -> RunConfig:
    """Read a recipe YAML, apply overrides, build and check the RunConfig (relative storage -> absolute path).

    `stages:` is a list of stage dicts, or the name of a stage-list YAML (pipeline.train.load_stages format)
    relative to the recipe; overrides apply after that file is read.
    """
    data = configs.load_yaml(path)
    if isinstance(data.get("stages"), str):
        stages_file = Path(path).parent / data["stages"]
        stages = configs.load_yaml(stages_file)
        if set(stages) != {"stages"} or not isinstance(stages["stages"], list):
            raise ValueError(f"{str(stages_file)!r}: expected a mapping with only a `stages:` list")
        data["stages"] = stages["stages"]
    for text in overrides or ():
        apply_override(data, text)
    return from_recipe_dict(data, where=f"recipe {Path(path).name}", storage_base=storage_base)


def from_recipe_dict(data: dict[str, Any], where: str = "recipe", storage_base: str | None = None) -> RunConfig:
    """A checked RunConfig from the plain recipe dict (what load_recipe reads, or a saved config.json)."""
    data = dict(data)
    stages = data.pop("stages", None) or []
    if not isinstance(stages, list):
        raise ValueError(f"{where}: `stages` must be a list of stages, got {type(stages).__name__}")
    for key in ("vae", "text_encoder"):
        given = (data.get("precompute") or {}).get(key)
        wanted = (data.get("encoders") or {}).get("vae" if key == "vae" else "text")
        if given is not None and wanted is not None and given != wanted:
            raise ValueError(f"{where}: precompute.{key}={given!r} contradicts encoders ({wanted!r}); "
                             "set the encoders section only")
    cfg = configs.from_dict(RunConfig, data, where=where)
    cfg.stages = [stage_config(s) for s in stages]
    return resolve(cfg, storage_base)


def resolve(cfg: RunConfig, storage_base: str | None = None) -> RunConfig:
    """Check cross-section invariants, fill derived settings and make a local storage root absolute."""
    from pipeline.data import sources

    if not storage.is_s3(cfg.storage):
        cfg.storage = str((Path(storage_base or os.getcwd()) / cfg.storage).resolve())
    names = [s.name for s in cfg.stages]
    if len(set(names)) != len(names) or not names:
        raise ValueError(f"stages need unique names and at least one stage; got {names}")
    reserved = {"download", "precompute", "sample", "evaluate", "report", "all"}
    if reserved & set(names):
        raise ValueError(f"stage names {sorted(reserved & set(names))} clash with step names {sorted(reserved)}")
    for st in cfg.stages:
        if st.init.stage is not None and st.init.stage not in names[: names.index(st.name)]:
            raise ValueError(f"stage {st.name!r} starts from {st.init.stage!r}, which is not an earlier stage "
                             f"of {names}")
    source_names = [s.name for s in cfg.sources]
    if len(set(source_names)) != len(source_names) or not source_names:
        raise ValueError(f"sources need unique names and at least one source; got {source_names}")
    for src in cfg.sources:
        sources.get(src.kind)  # unknown kind -> ValueError naming the known ones
    if cfg.sample.stage is not None and cfg.sample.stage not in names:
        raise ValueError(f"sample.stage={cfg.sample.stage!r} is not a stage of this recipe {names}")
    if not cfg.sample.prompts:
        raise ValueError("sample.prompts is empty: the sample grid needs at least one prompt")
    cfg.precompute.vae, cfg.precompute.text_encoder = cfg.encoders.vae, cfg.encoders.text
    cfg.model_config()  # unknown preset or model keys fail here, before any work
    return cfg


