"""Training: one Ray Train job per stage (FSDP2), resumable, exporting safetensors at the end."""
from pipeline.train.config import StageConfig, load_stages, stage_config
from pipeline.train.stage import train_stage

__all__ = ["StageConfig", "load_stages", "stage_config", "train_stage"]
