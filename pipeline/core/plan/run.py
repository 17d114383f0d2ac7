"""The run plan: one recipe (a YAML file plus `path=value` overrides) validated once into typed sections.

    stages.0.steps=10          stages.stage1.steps=10       download.processes=2
    sources.synthetic.options.n=64     model.depth=2        sample.prompts=["a red circle"]

A list is indexed by position or, for lists of named items (`stages`, `sources`), by name. The same RunConfig
(or its JSON, validated again on arrival) is what the Prefect flow takes as its parameter and what crosses into
Ray; nothing downstream re-parses loose dicts. Checks that need the model families or the dataset adapters
live in pipeline/checks.py, so this module imports neither.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from pydantic import ConfigDict, Field, field_validator, model_validator

from model.family import DEFAULT as DEFAULT_FAMILY
from pipeline.core import storage
from pipeline.core.progress import DEFAULT_EVERY
from pipeline.core.plan.base import PlanError, Section, apply_override, load_yaml, validate
from pipeline.core.plan.data import DownloadConfig, EncodersConfig, PrecomputeConfig, SourceConfig
from pipeline.core.plan.outputs import DiffusersConfig, EstimateConfig, EvalConfig, ReportConfig, SampleConfig
from pipeline.core.plan.stage import StageConfig

# The pipeline's steps in run order ("train": every stage of the plan, by its name); the flow, the cache keys
# (flows/caching.py) and `force` read this list.
STEPS = ("estimate", "download", "precompute", "train", "sample", "evaluate", "diffusers", "report")
RESERVED_NAMES = {*STEPS, "all"}  # what a stage may not be called: `force` takes step and stage names alike


class ModelSection(Section):
    """The network: a family, one of its presets, and any field of the family's config as an override."""

    model_config = ConfigDict(extra="allow")

    family: str = DEFAULT_FAMILY
    preset: str = "MicroDiT_XL_2"

    def overrides(self) -> dict[str, Any]:
        """The preset's fields this recipe changes."""
        return dict(self.model_extra or {})


class RunConfig(Section):
    """A whole run: where it writes, which cluster runs it, and every step's section."""

    name: str
    storage: str
    ray_address: str | None = None
    model: ModelSection = Field(default_factory=ModelSection)
    encoders: EncodersConfig = Field(default_factory=EncodersConfig)
    sources: list[SourceConfig] = Field(min_length=1)
    download: DownloadConfig = Field(default_factory=DownloadConfig)
    precompute: PrecomputeConfig = Field(default_factory=PrecomputeConfig)
    stages: list[StageConfig] = Field(min_length=1)
    sample: SampleConfig = Field(default_factory=SampleConfig)
    evaluate: EvalConfig | None = None
    diffusers: DiffusersConfig | None = None  # None: no diffusers folder
    estimate: EstimateConfig = Field(default_factory=EstimateConfig)
    report: ReportConfig = Field(default_factory=ReportConfig)
    # Seconds between progress records of a running step (Prefect artifacts, log lines); its last always goes out.
    progress_every: float = Field(DEFAULT_EVERY, ge=0)

    @field_validator("precompute")
    @classmethod
    def _encoders_have_one_owner(cls, v: PrecomputeConfig) -> PrecomputeConfig:
        given = {k: getattr(v, k) for k in ("vae", "text_encoder", "text_mode", "repa", "source")
                 if getattr(v, k) is not None}
        if given:
            raise ValueError(f"precompute sets {given}: encoders come from the `encoders` section and the source "
                             "name from `sources`; remove them here")
        return v

    @model_validator(mode="after")
    def _cross_section(self):
        names = [s.name for s in self.stages]
        if len(set(names)) != len(names):
            raise ValueError(f"stages need unique names; got {names}")
        if RESERVED_NAMES & set(names):
            raise ValueError(f"stage names {sorted(RESERVED_NAMES & set(names))} clash with step names "
                             f"{sorted(RESERVED_NAMES)}")
        for i, st in enumerate(self.stages):
            if st.init.stage is not None and st.init.stage not in names[:i]:
                raise ValueError(f"stage {st.name!r} starts from {st.init.stage!r}, which is not an earlier stage "
                                 f"of {names}")
        sigma = {getattr(s.objective, "sigma_data", None) for s in self.stages} - {None}
        if len(sigma) > 1:  # a property of the network's parameterisation, shared by every stage it passes through
            raise ValueError(f"stages disagree on objective.sigma_data: {sorted(sigma)}")
        sources = [s.name for s in self.sources]
        if len(set(sources)) != len(sources):
            raise ValueError(f"sources need unique names; got {sources}")
        if self.sample.stage is not None and self.sample.stage not in names:
            raise ValueError(f"sample.stage={self.sample.stage!r} is not a stage of this recipe {names}")
        if self.diffusers is not None and self.diffusers.stage is not None and self.diffusers.stage not in names:
            raise ValueError(f"diffusers.stage={self.diffusers.stage!r} is not a stage of this recipe {names}")
        if not self.sample.prompts:
            raise ValueError("sample.prompts is empty: the sample grid needs at least one prompt")
        return self

    def step_order(self) -> list[str]:
        """This run's steps in order: STEPS with "train" as the stage names, estimate, evaluate and diffusers only
        when configured."""
        names = {"train": [s.name for s in self.stages], "evaluate": ["evaluate"] if self.evaluate else [],
                 "estimate": ["estimate"] if self.estimate.enabled else [],
                 "diffusers": ["diffusers"] if self.diffusers else []}
        return [name for step in STEPS for name in names.get(step, [step])]

    def stage(self, name: str) -> StageConfig:
        for st in self.stages:
            if st.name == name:
                return st
        raise ValueError(f"unknown stage {name!r}; this recipe has {[s.name for s in self.stages]}")

    def to_dict(self) -> dict[str, Any]:
        """The JSON-ready form (what config.json holds and what crosses Prefect and Ray)."""
        return self.model_dump(mode="json")


def load_recipe(path: str | os.PathLike, overrides: list[str] | tuple[str, ...] = (),
                storage_base: str | None = None) -> RunConfig:
    """Read a recipe YAML, apply overrides, validate it, and make a relative local storage root absolute.

    `stages:` is a list of stage mappings, or the name of a stage-list YAML (a mapping with only `stages:`)
    relative to the recipe; overrides apply after that file is read.
    """
    data = load_yaml(path)
    where = str(path)
    if isinstance(data.get("stages"), str):
        stages_file = Path(path).parent / data["stages"]
        stages = load_yaml(stages_file)
        if set(stages) != {"stages"} or not isinstance(stages["stages"], list):
            raise PlanError(f"{str(stages_file)!r}: expected a mapping with only a `stages:` list")
        data["stages"] = stages["stages"]
        where = f"{path} (stages from {stages_file.name})"
    for text in overrides or ():
        apply_override(data, text)
    return from_recipe_dict(data, where=where, storage_base=storage_base)


def from_recipe_dict(data: dict[str, Any] | RunConfig, where: str = "recipe",
                     storage_base: str | None = None) -> RunConfig:
    """A validated RunConfig from a recipe mapping or a saved config.json (local storage made absolute)."""
    cfg = validate(RunConfig, data, where)
    if not storage.is_s3(cfg.storage):
        cfg.storage = str((Path(storage_base or os.getcwd()) / cfg.storage).resolve())
    return cfg
