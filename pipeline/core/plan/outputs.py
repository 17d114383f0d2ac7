"""Plan sections of the output steps: sampling a grid, evaluation, the report."""
from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from pipeline.core.plan.base import Section

DTYPE_NAMES = ("float32", "bfloat16", "float16")


class GenerateConfig(Section):
    """How to sample: steps, guidance, base seed, batch size, output resolution, weights and precision.

    `steps` and `guidance` of None take the export's own sampler defaults (its family's recipe)."""

    steps: int | None = Field(None, ge=1)
    guidance: float | None = Field(None, ge=0)  # 1.0 = no guidance
    seed: int = 0
    batch_size: int = Field(16, ge=1)
    resolution: int | None = Field(None, ge=1)  # pixels; None: the model's input_size x the VAE's downsample
    use_ema: bool = True
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # auto: bfloat16 on CUDA, float32 on CPU
    device: str = "auto"  # auto: cuda if available, else cpu
    grid: bool = True  # also write grid.png
    grid_captions: bool = True  # caption text under each grid cell


class SampleConfig(GenerateConfig):
    """The run's sample grid: fixed prompts drawn from a stage's export (default: the last stage)."""

    prompts: list[str] = Field(default_factory=list)
    stage: str | None = None

    def generate_config(self) -> GenerateConfig:
        """The GenerateConfig part."""
        return GenerateConfig.model_validate(self.model_dump(include=set(GenerateConfig.model_fields)))


class GenEvalConfig(Section):
    """GenEval (pipeline/evaluate/geneval/): its prompts drawn `images_per_prompt` times (image j of every prompt with
    seed `seed + j`), Mask2Former detections, the CLIP colour check, the protocol's verdicts and tag scores."""

    enabled: bool = False
    images_per_prompt: int = Field(4, ge=1)
    seed: int = 42  # GenEval's generation script seeds 42 for every prompt
    per_tag: int | None = Field(None, ge=1)  # a smoke run: the first N prompts of each of the six tags
    prompts: list[int] | None = None  # or these prompt indices (lines of the metadata file)
    metadata: str | None = None  # a metadata file in GenEval's format; None: the one shipped with microdit
    steps: int | None = Field(None, ge=1)  # None: the export's sampler default
    guidance: float | None = Field(None, ge=0)
    resolution: int | None = Field(None, ge=1)  # None: the model's own
    draw_batch_size: int = Field(16, ge=1)
    detect_batch_size: int = Field(8, ge=1)
    colour_batch_size: int = Field(16, ge=1)
    detector: str = "facebook/mask2former-swin-small-coco-instance"  # or a local folder, or tiny-mask2former
    colour_model: str = "ViT-L-14/openai"  # open_clip architecture/pretrained, an hf-hub: repo, or tiny-clip

    @model_validator(mode="after")
    def _one_subset(self):
        if self.per_tag is not None and self.prompts is not None:
            raise ValueError("geneval: give per_tag or prompts, not both")
        return self


class EvalConfig(Section):
    """What to measure and by which protocol (pipeline/evaluate/evaluate.py explains each)."""

    coco: str | None = None  # COCO-2014 root (annotations/ + val2014/); None: no FID / CLIP score
    num_images: int = Field(30_000, ge=2)
    resolution: int = Field(256, ge=1)
    steps: int | None = Field(None, ge=1)  # None: the export's sampler default
    guidance: float | None = Field(None, ge=0)
    seed: int = 0
    batch_size: int = Field(32, ge=1)
    use_ema: bool = True
    fid: bool = True
    inception_weights: str | None = None  # local Inception file; None: torch-fidelity downloads its copy
    fid_antialias: bool = False
    fid_features: Literal[64, 192, 768, 2048] = 2048  # 2048 is the standard FID; the others for quick checks
    clip: bool = True
    clip_model: str = "ViT-L-14"
    clip_pretrained: str = "openai"  # open_clip tag or a local weights file
    demo: bool = False  # the synthetic caption-match metric
    demo_prompts: list[str] | None = None  # None: every demo combination
    demo_seeds: int = Field(1, ge=1)  # images per demo prompt
    demo_resolution: int | None = Field(None, ge=1)  # None: the model's own
    geneval: GenEvalConfig = Field(default_factory=GenEvalConfig)
    device: str = "auto"


class DiffusersConfig(Section):
    """The run's model as a diffusers folder (pipeline/export/diffusers_folder.py) under {root}/diffusers, written
    after evaluate so its model card carries the metrics and the sample grid."""

    stage: str | None = None  # whose export (None: the sampled stage, the last by default)
    use_ema: bool = True


class EstimateConfig(Section):
    """The plan's forecast (pipeline/planner/) written at the start of every run and set beside what it measured:
    the cluster it is priced on, the MFU assumed (None: the GPU suite's figure for that GPU, else the MicroDiT
    paper's), the image count storage is sized for. Price: report.price_per_gpu_hour."""

    enabled: bool = True
    cluster: str = "8xH100"  # COUNTxKIND (pipeline/planner/clusters.py)
    mfu: float | None = Field(None, gt=0, le=1)
    images: int | None = Field(None, ge=1)


class ReportConfig(Section):
    """Report settings: GPU price, stage order (None: the run's), title (None: from the family), HTML copy."""

    price_per_gpu_hour: float = Field(3.75, ge=0)  # docs/RECIPE.md: $3.75 per H100-hour
    stages: list[str] | None = None
    title: str | None = None
    html: bool = True
    tail: int = Field(5, ge=1)  # final loss = mean of the last `tail` logged losses
