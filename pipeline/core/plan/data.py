"""Plan sections of the data steps: sources, encoders, download (img2dataset) and precompute (Ray Data)."""
from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from pipeline.core.plan.base import CustomResources, Section

# img2dataset 1.47's default opt-out directives (X-Robots-Tag): images served with them are never fetched.
OPT_OUT_DIRECTIVES = ["noai", "noimageai", "noindex", "noimageindex"]
DEFAULT_MAX_PIXELS = 64_000_000  # about 8000 x 8000 decoded pixels; above: a counted `too_large` skip


class SourceConfig(Section):
    """One dataset: its name (folder names under data/), its adapter kind (pipeline.data.sources), its options."""

    name: str
    kind: str
    options: dict[str, Any] = Field(default_factory=dict)

    @field_validator("name")
    @classmethod
    def _plain_name(cls, v: str) -> str:
        if not v or "/" in v:
            raise ValueError(f"source name {v!r}: expected a non-empty name without '/'")
        return v


class EncodersConfig(Section):
    """Frozen encoders: a VAE spec, a text encoder spec (model/encoders/ lists the accepted specs) and, for REPA,
    an image feature encoder (model/encoders/dino.py: "dinov2-base", "tiny-dinov2"; None: no features written)."""

    vae: str = "stabilityai/stable-diffusion-xl-base-1.0"
    text: str = "hf-hub:apple/DFN5B-CLIP-ViT-H-14-378"
    repa: str | None = None
    # How a Llama text encoder computes caption states (model/encoders/llama.py): "release", as the Nitro-E release
    # (cleaned captions, masked Llama, every row kept), or "compact" (an opt-in storage mode: caption rows only,
    # one fixed pad row; about 6x fewer bytes a row at 128 tokens). Open_clip towers have one way ("release").
    text_mode: Literal["release", "compact"] = "release"


class DownloadConfig(Section):
    """img2dataset settings and the size policy (docs/RECIPE.md: drop short side < 256, shrink short side > 512)."""

    processes: int = Field(4, ge=1)
    threads: int = Field(64, ge=1)
    timeout: int = Field(10, ge=1)  # seconds per request (each read)
    total_timeout: float = Field(20.0, gt=0)  # seconds for a URL's whole transfer: past it, a transfer_timeout
    retries: int = Field(0, ge=0)  # img2dataset's immediate re-requests of a failed URL
    retry_rounds: int = Field(1, ge=0)  # our later pass over retryable failures, into extra shards
    max_shard_retry: int = Field(1, ge=0)  # img2dataset's re-runs of a shard whose worker crashed
    min_side: int = Field(256, ge=1)
    max_side: int = Field(512, ge=1)
    max_aspect_ratio: float | None = None  # None: no limit
    encode_format: Literal["jpg", "png", "webp"] = "jpg"
    encode_quality: int = Field(95, ge=1, le=100)
    number_sample_per_shard: int = Field(10000, ge=1)
    url_col: str = "url"
    caption_col: str = "caption"
    extra_columns: list[str] | None = None  # None: every other column of the list (reserved names excepted)
    disallowed_header_directives: list[str] = Field(default_factory=lambda: list(OPT_OUT_DIRECTIVES))
    user_agent_token: str | None = None
    compute_hash: str | None = "sha256"
    extract_exif: bool = False
    staging_dir: str | None = None  # local staging for s3:// outputs (default: under the system temp dir)
    log_interval: float = Field(10.0, gt=0)  # seconds between progress lines
    max_pixels: int = Field(DEFAULT_MAX_PIXELS, ge=1)  # declared width x height above: too_large, never decoded

    @model_validator(mode="after")
    def _sides(self):
        if self.min_side > self.max_side:
            raise ValueError(f"expected min_side <= max_side, got {self.min_side}, {self.max_side}")
        return self


class PrecomputeConfig(Section):
    """What to compute (resolutions, decode limits) and how wide to run it on Ray.

    `vae`, `text_encoder`, `text_mode`, `repa` and `source` are the step's inputs, not recipe settings: the flow fills
    them from the run's `encoders` section and the source's name (a recipe that sets them is refused, so they have one
    owner). With `repa` set, each row also gets REPA's DINOv2 patch features of the crop at the largest resolution
    the image has (pipeline/core/schema.py, `repa_features`).
    """

    resolutions: list[int] = Field(default_factory=lambda: [256, 512], min_length=1)
    vae: str | None = None
    text_encoder: str | None = None
    text_mode: Literal["release", "compact"] | None = None  # None: "release"
    repa: str | None = None  # REPA feature encoder spec; None: no `repa_features` column
    source: str | None = None  # dataset name in keys; default: the shard folder's name
    max_caption_tokens: int = Field(77, ge=1)
    seed: int = 0  # posterior samples are seeded per row from (seed, key, resolution)
    min_side: int | None = None  # skip images whose short side is below this; default: the smallest resolution
    max_pixels: int = Field(DEFAULT_MAX_PIXELS, ge=1)  # declared width x height above this: skipped as too_large
    empty_captions: Literal["keep", "skip"] = "keep"  # keep: caption ""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # auto: bfloat16 on GPU, float32 on CPU
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: cuda when the cluster has GPUs
    vae_batch_size: int = Field(32, ge=1)
    text_batch_size: int = Field(64, ge=1)
    repa_batch_size: int = Field(32, ge=1)
    vae_actors: int = Field(1, ge=1)
    text_actors: int = Field(1, ge=1)
    repa_actors: int = Field(1, ge=1)
    vae_gpus_per_actor: float = Field(0.5, ge=0)  # two encoder actors share one GPU by default
    text_gpus_per_actor: float = Field(0.5, ge=0)
    repa_gpus_per_actor: float = Field(0.5, ge=0)  # only when `encoders.repa` is set
    cpus_per_actor: float = Field(1.0, gt=0)
    read_batch_rows: int = Field(64, ge=1)  # rows per block leaving the shard reader
    decode_batch_rows: int = Field(16, ge=1)
    spool_rows: int = Field(256, ge=1)  # rows per spool file (before the per-shard merge)
    row_group_rows: int = Field(1024, ge=1)  # Parquet row group size; a part file holds one input shard
    max_commits_in_flight: int = Field(4, ge=1)
    require_complete_input: bool = True  # the shard folder must carry the download step's completion marker
    # Ray custom resources every read/decode/encode/spool task and actor also requests, e.g. {worker_node: 1} to
    # keep them on nodes that declare that resource (infra/ declares it on worker nodes); {}: anywhere.
    resources: CustomResources = Field(default_factory=dict)

    @field_validator("resolutions")
    @classmethod
    def _sorted(cls, v: list[int]) -> list[int]:
        if min(v) < 1:
            raise ValueError(f"resolutions must be positive pixel sizes, got {v}")
        return sorted(set(v))

    def for_source(self, source: str, encoders: EncodersConfig) -> "PrecomputeConfig":
        """This section as one source's step input: encoders from the run, the source's name."""
        return self.model_copy(update={"vae": encoders.vae, "text_encoder": encoders.text,
                                       "text_mode": encoders.text_mode, "repa": encoders.repa, "source": source})
