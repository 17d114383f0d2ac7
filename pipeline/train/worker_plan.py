"""What crosses into Ray Train: one typed plan per stage, made on the driver, validated once more in each worker.

`WorkerPlan.export` is exactly what the stage's export records in its `config.json` (with the step counters the
run adds): the family, the network, the objective's constants, the encoders, the sampler defaults, the stage and
the unconditional caption. Generate, evaluation and later stages read that section back (`ExportSection`), so
what a trained model needs to be used again travels with it, in one form.
"""
from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from pipeline.core.plan import EncodersConfig, Section, StageConfig, validate
from pipeline.core.plan.stage import Objective


class SamplerSection(Section):
    """The family's recipe for drawing (model/family.py SamplerDefaults)."""

    kind: str
    steps: int = Field(ge=1)
    guidance: float = Field(ge=0)


class ExportSection(Section):
    """An export's config.json: what using the weights again needs, then where they came from."""

    family: str
    model: dict[str, Any]  # the family's network config (family.config_to_dict), checked by the family on use
    objective: Objective
    encoders: EncodersConfig | None  # None: sample grids show latent channels as RGB
    sampler: SamplerSection
    stage: StageConfig
    unconditional: str | None = None  # the export's unconditional caption file (the empty prompt's), or zeros
    # Counters of the run that wrote it (absent from the plan, written at export).
    step: int | None = None
    global_step: int | None = None
    final_checkpoint: str | None = None
    nonfinite_total: int | None = None


class StartFrom(Section):
    """Where the workers' weights come from: this stage's own checkpoint (`resume`), another stage's final full
    state (`full_state`), a weights file (`weights`), or a fresh init (`scratch`)."""

    kind: Literal["scratch", "resume", "full_state", "weights"] = "scratch"
    uri: str | None = None


class WorkerPlan(Section):
    """Everything a training worker reads, besides its dataset shards."""

    export: ExportSection
    stage_uri: str
    export_uri: str
    start: StartFrom = Field(default_factory=StartFrom)
    weights_by_dataset: dict[str, float]  # Ray dataset name -> sampling weight
    latent_shape: list[int]  # (C, H, W) of one latent
    prompts: list[list[list[float]]]  # the sample grid's caption states (K, L, D)
    flops_per_sample: float
    # Where the empty prompt's embedding lies (a latents folder), for caption dropout and guidance; None: zeros.
    unconditional_from: str | None = None
    hooks: str | None = None  # test-only fault injection (pipeline/train/hooks.py), when MICRODIT_TRAIN_HOOKS is set

    @property
    def stage(self) -> StageConfig:
        return self.export.stage

    @classmethod
    def received(cls, data: dict[str, Any]) -> "WorkerPlan":
        """The plan as a worker receives it (Ray Train hands the train function a dict), validated."""
        return validate(cls, data, f"worker plan of stage {data.get('export', {}).get('stage', {}).get('name')!r}")
