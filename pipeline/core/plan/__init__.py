"""The typed run plan (pydantic, strict): validated once from a recipe, then passed as is across Prefect and Ray."""
from pipeline.core.plan.base import PlanError, Section, apply_override, load_yaml, parse_yaml, validate
from pipeline.core.plan.data import DownloadConfig, EncodersConfig, PrecomputeConfig, SourceConfig
from pipeline.core.plan.outputs import (DiffusersConfig, EstimateConfig, EvalConfig, GenerateConfig, GenEvalConfig,
                                        ReportConfig, SampleConfig)
from pipeline.core.plan.run import ModelSection, RunConfig, from_recipe_dict, load_recipe
from pipeline.core.plan.stage import (EDMObjective, EMAConfig, InitConfig, RectifiedFlowObjective, ScheduleConfig,
                                      StageBatch, StageCheckpoint, StageConfig, StageData, StageOptim,
                                      StageSampling, stage_config)

__all__ = [
    "DiffusersConfig",
    "DownloadConfig",
    "EDMObjective",
    "EMAConfig",
    "EncodersConfig",
    "EstimateConfig",
    "EvalConfig",
    "GenerateConfig",
    "GenEvalConfig",
    "InitConfig",
    "ModelSection",
    "PlanError",
    "PrecomputeConfig",
    "RectifiedFlowObjective",
    "ReportConfig",
    "RunConfig",
    "SampleConfig",
    "ScheduleConfig",
    "Section",
    "SourceConfig",
    "StageBatch",
    "StageCheckpoint",
    "StageConfig",
    "StageData",
    "StageOptim",
    "StageSampling",
    "apply_override",
    "from_recipe_dict",
    "load_recipe",
    "load_yaml",
    "parse_yaml",
    "stage_config",
    "validate",
]
