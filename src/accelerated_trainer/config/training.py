"""training_options: loss, optimizer, schedule, precision, cadences, checkpoint ranking, early stopping."""

from __future__ import annotations

import difflib
import re
from typing import Any, Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from .base import _Named, _Section

TASK_METRICS = {
    "classification": ("val_loss", "val_accuracy"),
    "regression": ("val_loss", "val_mae", "val_mse"),
    "language_modeling": ("val_loss", "val_accuracy", "val_perplexity"),
}
MAXIMIZED_METRICS = {"val_accuracy"}
_METRIC_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]*")


class LossOptions(_Named):
    name: str
    """A torch.nn loss class (CrossEntropyLoss, MSELoss, BCEWithLogitsLoss, ...), or the import
    path package.module:attribute of a loss class or function (outputs, labels) -> loss."""
    kwargs: dict[str, Any] = Field(default_factory=dict)
    """Keyword arguments for the loss, e.g. {"label_smoothing": 0.1}; a list given for a tensor
    argument becomes a float tensor, e.g. {"weight": [1.0, 3.0]} or {"pos_weight": [2.0]}."""


class MetricOptions(_Named):
    name: str
    """A torchmetrics class (F1Score, AUROC, Precision, MeanAbsoluteError, ...) or the import path
    package.module:Class of a torchmetrics Metric."""
    kwargs: dict[str, Any] = Field(default_factory=dict)
    """Keyword arguments for the metric, e.g. {"average": "macro"}; task and num_classes are
    filled in from the data when the class takes them and they are not given."""


class OptimizerOptions(_Named):
    name: str = "AdamW"
    """Any torch.optim optimizer class."""
    lr: float = Field(1e-3, gt=0)
    """Peak learning rate."""
    weight_decay: float = Field(0.0, ge=0)
    """Weight decay passed to the optimizer."""
    kwargs: dict[str, Any] = Field(default_factory=dict)
    """Further optimizer arguments, e.g. {"betas": [0.9, 0.95]}."""


class SchedulerOptions(_Named):
    name: Literal["constant", "linear", "cosine"] = "constant"
    """Learning-rate shape after warmup: constant, linear decay to 0, or cosine decay to 0."""
    warmup_steps: int = Field(0, ge=0)
    """Optimizer steps of linear warmup from 0 to lr."""
    warmup_ratio: float = Field(0.0, ge=0, lt=1)
    """Warmup as a fraction of all optimizer steps (used when warmup_steps is 0)."""


class EarlyStoppingOptions(_Section):
    patience: int = Field(5, ge=1)
    """Evaluations without improvement of the monitored metric before training stops."""
    min_delta: float = Field(0.0, ge=0)
    """Smallest change of the monitored metric that counts as an improvement."""

    @model_validator(mode="before")
    @classmethod
    def _expand_patience(cls, data: Any) -> Any:
        # The original spec's `"early_stopping": 5` means a patience of 5 evaluations.
        return {"patience": data} if isinstance(data, int) and not isinstance(data, bool) else data


class TrainingOptions(_Section):
    task: Literal["classification", "regression", "language_modeling"] = "classification"
    """Chooses the default loss and the validation metrics; language_modeling scores next-token
    class outputs (batch, positions, vocabulary) and adds val_perplexity."""
    n_epochs: int = Field(10, ge=1)
    """Passes over the training data (training also stops at max_steps if set)."""
    max_steps: int | None = Field(None, ge=1)
    """Stop after this many optimizer steps, whatever n_epochs says."""
    loss_function: LossOptions | None = None
    """A torch.nn loss by name (string or {"name", "kwargs"}). Default: CrossEntropyLoss for
    classification and language_modeling, MSELoss for regression. A model that returns its own loss
    (HF ModelOutput.loss or a dict with "loss") uses that instead; on packed text
    (dataset_options.text) a model is never given the labels, which are already shifted."""
    optimizer: OptimizerOptions = Field(default_factory=OptimizerOptions)
    """Optimizer by name, with lr and weight decay."""
    scheduler: SchedulerOptions = Field(default_factory=SchedulerOptions)
    """Learning-rate schedule with warmup."""
    seed: int = 42
    """Seeds model init, data order and dropout on every process."""
    gradient_accumulation_steps: int = Field(1, ge=1)
    """Micro-batches per optimizer step."""
    max_grad_norm: float | None = Field(None, gt=0)
    """Clip the global gradient norm to this value; null disables clipping."""
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    """Autocast precision; fp16 needs a GPU, bf16 runs on recent CPUs and GPUs."""
    eval_every_n_steps: int | None = Field(None, ge=1)
    """Validate every N optimizer steps; null validates at the end of each epoch."""
    log_every_n_steps: int = Field(10, ge=1)
    """Optimizer steps between training-loss logs (the only host syncs of the loss)."""
    save_every_n_steps: int | None = Field(None, ge=1)
    """Also write the resumable `last` checkpoint every N optimizer steps."""
    metrics: dict[str, MetricOptions] = Field(default_factory=dict)
    """Validation metrics beside the task's own: short name to a torchmetrics class, e.g.
    {"f1": {"name": "F1Score", "kwargs": {"average": "macro"}}, "auroc": "AUROC"}. Reported as
    val_<name> (test_<name> on the test split), over every validation row once."""
    monitor: str = "val_loss"
    """Validation metric that ranks checkpoints and drives early stopping: one of the task's
    (val_loss, val_accuracy, ...) or val_<name> of a configured metric."""
    mode: Literal["min", "max"] | None = None
    """Whether a lower or higher monitored value is better; default from the metric (for a
    configured metric its higher_is_better, read when the trainer builds it)."""
    restore_best: bool = True
    """At the end of training, load the best checkpoint's weights into the model (when there is
    one), so that the model, evaluate(), predict() and the test split use them."""
    early_stopping: EarlyStoppingOptions | None = None
    """Stop when the monitored metric stops improving; an integer is the patience."""
    save_top_k: int = Field(3, ge=-1)
    """Keep the k best checkpoints by the monitored metric; -1 keeps all, 0 none."""
    nonfinite_loss: Literal["stop", "skip"] = "stop"
    """A NaN/inf loss: stop (checked at each log, evaluation and save: no per-step host sync;
    `last` keeps the last good state) or skip the optimizer step and count it (one host sync
    per optimizer step)."""
    max_time_s: float | None = Field(None, gt=0)
    """Wall-clock budget in seconds: when spent, finish the step, save `last` and exit as if
    preempted (exit code 99), so a scheduler can requeue the job and it resumes."""

    @field_validator("metrics")
    @classmethod
    def _check_metric_names(cls, metrics: dict[str, MetricOptions], info: ValidationInfo) -> dict[str, MetricOptions]:
        builtin = TASK_METRICS.get(info.data.get("task"), ())
        for name in metrics:
            if not _METRIC_NAME.fullmatch(name):
                raise ValueError(f"{name!r} is not a metric name: use letters, digits and underscores, starting with a letter")
            if f"val_{name}" in builtin:
                raise ValueError(f"{name!r}: the task already reports val_{name}; give the metric another name")
        return metrics

    @field_validator("monitor")
    @classmethod
    def _check_monitor(cls, monitor: str, info: ValidationInfo) -> str:
        builtin = TASK_METRICS.get(info.data.get("task"), ())
        # load_config passes the names of the metrics given to the Python API (trainer metrics=)
        # as the validation context. Without one, this is a run's saved config.json (export,
        # predict), checked when that run started, and its monitor may be such a metric.
        if not builtin or info.context is None:
            return monitor
        configured = [*info.data.get("metrics", {}), *info.context.get("metrics", ())]
        allowed = [*builtin, *(f"val_{name}" for name in configured)]
        if monitor not in allowed:
            close = difflib.get_close_matches(monitor, allowed, n=1)
            hint = f"; did you mean {close[0]!r}" if close else ""
            raise ValueError(f"task {info.data['task']!r} produces {allowed}, not {monitor!r}{hint} (a metric of your own: "
                             "add it to training_options.metrics)")
        return monitor

    @model_validator(mode="after")
    def _default_mode(self) -> "TrainingOptions":
        # A configured metric's direction is its own higher_is_better, known once it is built
        # (the trainer fills it in): the config never imports torchmetrics.
        if self.mode is None and self.monitor in TASK_METRICS.get(self.task, ()):
            self.mode = "max" if self.monitor in MAXIMIZED_METRICS else "min"
        return self
