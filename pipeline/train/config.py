"""Typed config of one training stage (RECIPE.md "Stages"), its arithmetic and its learning-rate schedule.

Every step count in a StageConfig counts optimizer steps *of this stage*, from 0: `steps: 30000` for stage 2
means 30,000 more steps (the recipe's 250,000 -> 280,000). A stage started from another stage's full state also
carries that stage's `global_step` on, so metrics show both the stage step and the run-wide step.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable

from pipeline.core.configs import from_dict

INIT_KINDS = ("scratch", "full_state", "weights")
SCHEDULES = ("cosine", "constant")


@dataclass
class OptimizerConfig:
    """AdamW settings (RECIPE.md: betas (0.9, 0.999), eps 1e-8, weight decay 0.1)."""

    lr: float = 2.4e-4
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.1
    moe_lr_scale: float = 1.0


@dataclass
class ScheduleConfig:
    """LR multiplier over stage steps: cosine (warmup, then down to `floor` x peak at the end) or constant."""

    kind: str = "cosine"
    warmup_steps: int = 0
    floor: float = 0.33


@dataclass
class EMAConfig:
    """EMA of the weights; before `start_step` (stage step) the EMA copies the weights."""

    decay: float = 0.9999
    start_step: int = 0
    update_every: int = 1


@dataclass
class InitConfig:
    """Where the stage's weights come from: scratch, another stage's full state, or its exported weights."""

    kind: str = "scratch"
    stage: str | None = None


@dataclass
class DebugConfig:
    """Test-only fault injection; all off by default and ignored when checking a resumed run's config."""

    crash_rank: int | None = None  # this rank calls os._exit(1) ...
    crash_at_step: int | None = None  # ... when about to take this step, on the first attempt only
    stop_at_step: int | None = None  # all ranks return cleanly after this step's checkpoint (simulated stop)
    nan_loss_steps: list[int] = field(default_factory=list)  # the loss of these steps is replaced by NaN


@dataclass
class StageConfig:
    """One Ray Train job: resolution, masking, steps, batch arithmetic, optimisation, logging and init."""

    name: str = "stage1"
    resolution: int = 256
    mask_ratio: float = 0.75
    steps: int = 250_000  # optimizer steps in this stage
    global_batch: int = 2048
    micro_batch: int = 256  # per worker and forward pass; accumulation = global / (micro x workers)
    num_workers: int = 8
    use_gpu: bool = True
    cpus_per_worker: float = 1.0  # below 1 on small CPU hosts leaves cores for Ray Data's read tasks
    # torch intra-op threads per CPU worker; None keeps what Ray sets (OMP_NUM_THREADS = whole CPUs reserved, >= 1),
    # so one worker can use every core while its reservation stays fractional and Ray Data keeps a slot to read.
    cpu_threads: int | None = None
    base_resolution: int = 256  # resolution where pos_interp_scale = 1
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    grad_clip: float = 0.25
    p_mean: float = -0.6
    p_std: float = 1.2
    sigma_data: float = 0.9
    caption_dropout: float = 0.1
    ema: EMAConfig = field(default_factory=EMAConfig)
    init: InitConfig = field(default_factory=InitConfig)
    mixture: dict[str, float] = field(default_factory=dict)  # source -> weight; empty: union, by row count
    exclude_sources: list[str] = field(default_factory=list)  # e.g. diffusiondb at 512 px (RECIPE.md Data)
    shuffle_buffer: int = 1024  # rows in each worker's local shuffle buffer (0: off)
    # Sources smaller than this (uncompressed Parquet) are read once into Ray's object store instead of being
    # re-read every epoch; 0 turns it off. The paper's sources (hundreds of GB of latents) always stream.
    cache_dataset_mb: float = 1024.0
    log_every: int = 100
    checkpoint_every: int = 1000
    keep_checkpoints: int = 3
    sample_every: int = 0  # 0: a sample grid at the stage's end only
    sample_prompts: int = 8  # fixed caption states taken from the data
    sample_steps: int = 30
    sample_guidance: float = 5.0
    compile: bool = False
    activation_checkpointing: bool = False
    max_failures: int = 3
    max_consecutive_nonfinite: int = 20
    seed: int = 0
    peak_flops: float | None = None  # per device, for MFU; None: looked up from the GPU name
    debug: DebugConfig = field(default_factory=DebugConfig)

    def __post_init__(self) -> None:
        self.optimizer.betas = tuple(float(b) for b in self.optimizer.betas)
        if not self.name or "/" in self.name:
            raise ValueError(f"stage name {self.name!r}: expected a non-empty name without '/'")
        for key in ("resolution", "steps", "global_batch", "micro_batch", "num_workers", "base_resolution",
                    "log_every", "checkpoint_every", "keep_checkpoints", "sample_steps"):
            if getattr(self, key) <= 0:
                raise ValueError(f"{key}={getattr(self, key)!r} in stage {self.name!r}: expected > 0")
        if not 0.0 <= self.mask_ratio < 1.0:
            raise ValueError(f"mask_ratio={self.mask_ratio!r} in stage {self.name!r}: expected [0, 1)")
        if not 0.0 <= self.caption_dropout <= 1.0:
            raise ValueError(f"caption_dropout={self.caption_dropout!r}: expected [0, 1]")
        if self.cpus_per_worker <= 0:
            raise ValueError(f"cpus_per_worker={self.cpus_per_worker!r}: expected > 0")
        if self.cache_dataset_mb < 0:
            raise ValueError(f"cache_dataset_mb={self.cache_dataset_mb!r} in stage {self.name!r}: expected >= 0")
        if self.cpu_threads is not None and self.cpu_threads < 1:
            raise ValueError(f"cpu_threads={self.cpu_threads!r} in stage {self.name!r}: expected >= 1 or null")
        if self.grad_clip <= 0:
            raise ValueError(f"grad_clip={self.grad_clip!r}: expected > 0")
        if self.schedule.kind not in SCHEDULES:
            raise ValueError(f"schedule.kind={self.schedule.kind!r}: expected one of {SCHEDULES}")
        if self.schedule.warmup_steps > self.steps:
            raise ValueError(f"schedule.warmup_steps={self.schedule.warmup_steps} exceeds steps={self.steps}")
        if self.init.kind not in INIT_KINDS:
            raise ValueError(f"init.kind={self.init.kind!r}: expected one of {INIT_KINDS}")
        if self.init.kind != "scratch" and not self.init.stage:
            raise ValueError(f"init.kind={self.init.kind!r} needs init.stage (the stage to start from)")
        if self.init.stage == self.name:
            raise ValueError(f"stage {self.name!r} cannot start from itself")
        for source, w in self.mixture.items():
            if not w >= 0:
                raise ValueError(f"mixture weight of {source!r} is {w!r}: expected >= 0")
        if self.mixture and sum(self.mixture.values()) <= 0:
            raise ValueError(f"mixture {self.mixture}: weights must not all be zero")
        self.accumulation_steps()  # a bad batch split fails at construction, before Ray starts

    def accumulation_steps(self) -> int:
        """Micro-batches per worker per optimizer step: global_batch / (micro_batch x num_workers)."""
        per_pass = self.micro_batch * self.num_workers
        if self.global_batch % per_pass:
            raise ValueError(
                f"global_batch={self.global_batch} is not divisible by micro_batch x num_workers = "
                f"{self.micro_batch} x {self.num_workers} = {per_pass} in stage {self.name!r}")
        return self.global_batch // per_pass

    @property
    def pos_interp_scale(self) -> float:
        """Position-grid scale of this stage's model: resolution / base_resolution (2.0 at 512 px)."""
        return self.resolution / self.base_resolution

    def lr_lambda(self) -> Callable[[int], float]:
        """The stage's LR multiplier as a function of the stage step."""
        from pipeline.train.optim import constant_schedule, cosine_schedule

        s = self.schedule
        if s.kind == "cosine":
            return cosine_schedule(s.warmup_steps, self.steps, s.floor)
        return constant_schedule(s.warmup_steps)

    def resume_key(self) -> dict[str, Any]:
        """The config a resumed run must share with its checkpoint (debug knobs left out)."""
        d = dataclasses.asdict(self)
        d.pop("debug")
        return d


def stage_config(data: dict[str, Any] | StageConfig) -> StageConfig:
    """A StageConfig from a plain dict (unknown keys -> ValueError naming them); `init.from` is accepted."""
    if isinstance(data, StageConfig):
        return data
    data = dict(data)
    init = data.get("init")
    if isinstance(init, dict) and "from" in init:  # the recipe spells it `from`, a Python keyword
        init = dict(init)
        if "kind" in init:
            raise ValueError("init: give `from` or `kind`, not both")
        init["kind"] = init.pop("from")
        data["init"] = init
    return from_dict(StageConfig, data, where=f"stage {data.get('name', '?')!r}")


def load_stages(path: str) -> list[StageConfig]:
    """Parse a stage-list YAML (a `stages:` list of StageConfig dicts) into StageConfigs."""
    from pipeline.core.configs import load_yaml

    data = load_yaml(path)
    unknown = sorted(set(data) - {"stages"})
    if unknown or not isinstance(data.get("stages"), list):
        raise ValueError(f"{path!r}: expected a mapping with only a `stages:` list; got keys {sorted(data)}")
    stages = [stage_config(s) for s in data["stages"]]
    names = [s.name for s in stages]
    if len(set(names)) != len(names):
        raise ValueError(f"{path!r}: duplicate stage names in {names}")
    return stages
