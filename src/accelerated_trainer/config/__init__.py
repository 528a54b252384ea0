"""The run configuration: one validated object built from a JSON/YAML file or a dict.

Every default lives here, in the pydantic models; components receive their own section.
Errors name the JSON path, the bad value and, for a typo, the closest valid key.

One module per section of the config file: dataset, training, experiment, model; base holds
what they share, loading the whole TrainerConfig, load_config and its error messages.
"""

from .base import ConfigError
from .dataset import TORCH_DTYPES, DatasetOptions, TextOptions, TransformOptions
from .experiment import ExperimentOptions, WandbOptions
from .loading import CheckpointOptions, TrainerConfig, json_schema, load_config
from .model import ModelOptions
from .training import (
    MAXIMIZED_METRICS,
    TASK_METRICS,
    EarlyStoppingOptions,
    LossOptions,
    MetricOptions,
    OptimizerOptions,
    SchedulerOptions,
    TrainingOptions,
)

__all__ = [
    "MAXIMIZED_METRICS",
    "TASK_METRICS",
    "TORCH_DTYPES",
    "CheckpointOptions",
    "ConfigError",
    "DatasetOptions",
    "EarlyStoppingOptions",
    "ExperimentOptions",
    "LossOptions",
    "MetricOptions",
    "ModelOptions",
    "OptimizerOptions",
    "SchedulerOptions",
    "TextOptions",
    "TrainerConfig",
    "TrainingOptions",
    "TransformOptions",
    "WandbOptions",
    "json_schema",
    "load_config",
]
