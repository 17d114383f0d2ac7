"""A plan's record: per stage and for the whole recipe (estimate.py fills it, render.py shows it; the flow stores it
as {root}/estimate/estimate.json)."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class StagePlan:
    name: str
    resolution: int
    mask_ratio: float | None
    steps: int
    global_batch: int
    micro_batch: int
    samples: int
    flops_per_sample: float
    flops: float
    hours: float
    gpu_hours: float
    cost_usd: float
    memory: dict
    data: dict


@dataclass
class Plan:
    recipe: str
    family: str
    cluster: str
    gpus: int
    peak_flops: float
    gpu_source: str
    price_per_gpu_hour: float
    mfu: float
    mfu_source: str
    mfu_basis: str
    stages: list[StagePlan]
    totals: dict
    data: dict
    warnings: list[str] = field(default_factory=list)
    assumptions: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)
