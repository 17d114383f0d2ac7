"""Plan of one training stage (docs/RECIPE.md "Stages"), split by concern.

Every step count counts optimizer steps *of this stage*, from 0: `steps: 30000` for stage 2 means 30,000 more
steps (the recipe's 250,000 -> 280,000). A stage started from another stage's full state also carries that
stage's `global_step` on, so metrics show both the stage step and the run-wide step.

    name, steps, seed, log_every, init      what the stage is and where its weights come from
    data:       resolution, base_resolution, mixture, exclude_sources, shuffle_buffer, cache_dataset_mb
    batch:      global_batch, micro_batch, num_workers, use_gpu, cpus_per_worker, cpu_threads, compile, ...
    optim:      lr, betas, eps, weight_decay, moe_lr_scale, schedule, grad_clip, ema, max_consecutive_nonfinite
    objective:  the training objective's constants (kind: edm -> sigma_data, noise distribution, masking)
    checkpoint: every, keep, max_failures
    sampling:   the training-time sample grid (every, prompts, steps, guidance)
"""
from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, StrictFloat, model_validator

from model.objectives.configs import EDMConfig, RectifiedFlowConfig
from pipeline.core.plan.base import CustomResources, Section, section_of, validate


class StageData(Section):
    """Which latents the stage reads, at which resolution, and how they are shuffled and cached."""

    resolution: int = Field(256, ge=1)
    base_resolution: int = Field(256, ge=1)  # resolution where pos_interp_scale = 1
    mixture: dict[str, Annotated[float, Field(ge=0)]] = Field(default_factory=dict)  # source -> weight; {}: union
    exclude_sources: list[str] = Field(default_factory=list)  # e.g. diffusiondb at 512 px (docs/RECIPE.md "Data")
    shuffle_buffer: int = Field(1024, ge=0)  # rows in each worker's local shuffle buffer (0: off)
    # Sources smaller than this (uncompressed Parquet) are read once into Ray's object store instead of being
    # re-read every epoch; 0 turns it off. The paper's sources (hundreds of GB of latents) always stream.
    cache_dataset_mb: float = Field(1024.0, ge=0)

    @model_validator(mode="after")
    def _mixture(self):
        if self.mixture and sum(self.mixture.values()) <= 0:
            raise ValueError(f"mixture {self.mixture}: weights must not all be zero")
        return self


class StageBatch(Section):
    """Batch arithmetic and parallelism: accumulation = global_batch / (micro_batch x num_workers)."""

    global_batch: int = Field(2048, ge=1)
    micro_batch: int = Field(256, ge=1)  # per worker and forward pass
    num_workers: int = Field(8, ge=1)
    use_gpu: bool = True
    cpus_per_worker: float = Field(1.0, gt=0)  # below 1 on small CPU hosts leaves cores for Ray Data's readers
    # torch intra-op threads per CPU worker; None keeps what Ray sets (OMP_NUM_THREADS = whole CPUs reserved, >= 1)
    cpu_threads: int | None = Field(None, ge=1)
    compile: bool = False
    activation_checkpointing: bool = False  # recompute each block's activations in backward
    float8: bool = False  # FP8 training of the large block linears (torchao; H100-class GPUs)
    peak_flops: float | None = Field(None, gt=0)  # per device, for MFU; None: looked up from the GPU name
    # Ray custom resources each training worker also requests, e.g. {worker_node: 1} to place the workers on
    # nodes that declare it (infra/ declares it on worker nodes); {}: anywhere.
    resources: CustomResources = Field(default_factory=dict)

    @model_validator(mode="after")
    def _divides(self):
        per_pass = self.micro_batch * self.num_workers
        if self.global_batch % per_pass:
            raise ValueError(f"global_batch={self.global_batch} is not divisible by micro_batch x num_workers = "
                             f"{self.micro_batch} x {self.num_workers} = {per_pass}")
        return self

    @property
    def accumulation_steps(self) -> int:
        """Micro-batches per worker per optimizer step."""
        return self.global_batch // (self.micro_batch * self.num_workers)


class ScheduleConfig(Section):
    """LR multiplier over stage steps: cosine (warmup, then down to `floor` x peak at the end) or constant."""

    kind: Literal["cosine", "constant"] = "cosine"
    warmup_steps: int = Field(0, ge=0)
    floor: float = Field(0.33, ge=0)


class EMAConfig(Section):
    """EMA of the weights; before `start_step` (stage step) the EMA copies the weights."""

    decay: float = Field(0.9999, ge=0, le=1)
    start_step: int = Field(0, ge=0)
    update_every: int = Field(1, ge=1)


class StageOptim(Section):
    """AdamW (docs/RECIPE.md: betas (0.9, 0.999), eps 1e-8, weight decay 0.1), its schedule, clipping and EMA."""

    lr: float = Field(2.4e-4, gt=0)
    betas: Annotated[tuple[StrictFloat, StrictFloat], Field(strict=False)] = (0.9, 0.999)
    eps: float = Field(1e-8, gt=0)
    weight_decay: float = Field(0.1, ge=0)
    moe_lr_scale: float = Field(1.0, ge=0)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    grad_clip: float = Field(0.25, gt=0)
    ema: EMAConfig = Field(default_factory=EMAConfig)
    max_consecutive_nonfinite: int = Field(20, ge=0)  # NaN/inf steps are skipped; more in a row stop the stage


# The objectives' own configs (model/objectives/) are the one home of their constants and defaults.
EDMObjective = section_of(EDMConfig, "EDMObjective")
RectifiedFlowObjective = section_of(RectifiedFlowConfig, "RectifiedFlowObjective")


Objective = Annotated[EDMObjective | RectifiedFlowObjective, Field(discriminator="kind")]


class StageCheckpoint(Section):
    """How often the full training state is saved, how many are kept, how often Ray restarts failed workers."""

    every: int = Field(1000, ge=1)
    keep: int = Field(3, ge=1)
    max_failures: int = Field(3, ge=0)


class StageSampling(Section):
    """The training-time sample grid from fixed caption states of the data (0 `every`: at the stage's end).

    `steps` and `guidance` of None take the family's sampler defaults (model/family.py), as generate does."""

    every: int = Field(0, ge=0)
    prompts: int = Field(8, ge=0)
    steps: int | None = Field(None, ge=1)
    guidance: float | None = Field(None, ge=0)


class InitConfig(Section):
    """Where the stage's weights come from: scratch, another stage's full state, or weights: another stage's
    export (`stage`) or a `path` (an export folder, or a released file such as MicroDiT's `.pt`)."""

    kind: Literal["scratch", "full_state", "weights"] = "scratch"
    stage: str | None = None
    path: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _from(cls, data: Any) -> Any:
        if isinstance(data, dict) and "from" in data:  # recipes spell it `from`, a Python keyword
            if "kind" in data:
                raise ValueError("init: give `from` or `kind`, not both")
            data = {("kind" if k == "from" else k): v for k, v in data.items()}
        return data

    @model_validator(mode="after")
    def _needs_stage(self):
        if self.kind == "weights":
            if bool(self.stage) == bool(self.path):
                raise ValueError("init.kind='weights' needs init.stage (a stage's export) or init.path (an export "
                                 "folder or a released weights file), exactly one of them")
        elif self.path:
            raise ValueError(f"init.path is for init.kind='weights'; init.kind={self.kind!r} takes none")
        elif self.kind != "scratch" and not self.stage:
            raise ValueError(f"init.kind={self.kind!r} needs init.stage (the stage to start from)")
        return self


class StageConfig(Section):
    """One Ray Train job: what it trains, on which data, with which batch, optimiser and objective."""

    name: str = "stage1"
    steps: int = Field(250_000, ge=1)  # optimizer steps in this stage
    seed: int = 0
    log_every: int = Field(100, ge=1)
    init: InitConfig = Field(default_factory=InitConfig)
    data: StageData = Field(default_factory=StageData)
    batch: StageBatch = Field(default_factory=StageBatch)
    optim: StageOptim = Field(default_factory=StageOptim)
    objective: Objective = Field(default_factory=EDMObjective)
    checkpoint: StageCheckpoint = Field(default_factory=StageCheckpoint)
    sampling: StageSampling = Field(default_factory=StageSampling)

    @model_validator(mode="after")
    def _consistent(self):
        if not self.name or "/" in self.name:
            raise ValueError(f"stage name {self.name!r}: expected a non-empty name without '/'")
        if self.init.stage == self.name:
            raise ValueError(f"stage {self.name!r} cannot start from itself")
        if self.optim.schedule.warmup_steps > self.steps:
            raise ValueError(f"optim.schedule.warmup_steps={self.optim.schedule.warmup_steps} exceeds "
                             f"steps={self.steps}")
        return self

    @property
    def pos_interp_scale(self) -> float:
        """Position-grid scale of this stage's model: resolution / base_resolution (2.0 at 512 px)."""
        return self.data.resolution / self.data.base_resolution

    def resume_key(self) -> dict[str, Any]:
        """The settings a resumed run must share with its checkpoint."""
        return self.model_dump(mode="json")


def stage_config(data: dict[str, Any] | StageConfig, where: str | None = None) -> StageConfig:
    """A validated StageConfig from a plain dict (or JSON-ready dict) or a StageConfig."""
    if isinstance(data, StageConfig):
        return data
    name = data.get("name", "?") if isinstance(data, dict) else "?"
    return validate(StageConfig, data, where or f"stage {name!r}")
