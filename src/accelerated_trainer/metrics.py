"""What a run measures: the training-log window and validation metrics (the task's own and
configured ones: torchmetrics classes or callables).

Validation metrics are reductions over `accelerator.gather_for_metrics` results, which drops
the samples that distributed sampling repeats to even out the last batch, so every process
computes the same values over exactly the validation set.
"""

from __future__ import annotations

import inspect
import math
import time
from typing import Any, Literal

import torch

from .config import TASK_METRICS, ConfigError, MetricOptions
from .imports import import_object
from .loss import IGNORE_INDEX, token_count

CLASS_TASKS = ("classification", "language_modeling")  # outputs are class scores, labels class indices


class ValidationMetrics:
    """Accumulates gathered per-sample losses and predictions over one validation pass.

    `configured` holds the metrics beyond the task's own (training_options.metrics and the
    API's metrics=); they get the gathered scores, the task's own metrics only the arg-max.
    `threshold` marks a one-output binary classifier (see loss.binary_threshold). Values are
    named `{prefix}_loss`, `{prefix}_accuracy`, `{prefix}_<metric>`.
    """

    def __init__(self, task: str, accelerator, configured: "MetricSet | None" = None, *, prefix: str = "val",
                 threshold: float | None = None):
        self.task = task
        self.accelerator = accelerator
        self.configured = configured if configured else None
        self.prefix, self.threshold = prefix, threshold
        self.losses: list[torch.Tensor] = []
        self.predictions: list[torch.Tensor] = []
        self.targets: list[torch.Tensor] = []
        if self.configured is not None:
            self.configured.reset()

    def update(self, sample_losses: torch.Tensor, outputs: torch.Tensor | None, labels: torch.Tensor) -> None:
        losses = sample_losses.detach().float()
        if outputs is None:
            self.losses.append(self.accelerator.gather_for_metrics(losses))
            return
        if self.configured is not None:
            # The configured metrics need the scores (AUROC ranks them), so they are gathered whole;
            # each metric keeps what it needs of them.
            losses, outputs, labels = self.accelerator.gather_for_metrics((losses, outputs.detach(), labels))
            self.configured.update(*metric_inputs(outputs, labels, self.task, self.threshold is not None))
            predictions = self._predictions(outputs, labels)
        else:
            # The task's own metrics keep only the arg-max, not the scores: validation memory stays O(samples).
            losses, predictions, labels = self.accelerator.gather_for_metrics((losses, self._predictions(outputs, labels), labels))
        self.losses.append(losses)
        self.predictions.append(predictions)
        self.targets.append(labels)

    def _predictions(self, outputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.threshold is not None:
            return (outputs.reshape(labels.shape) > self.threshold).long()
        return outputs.argmax(dim=-1) if self.task in CLASS_TASKS else outputs.reshape(labels.shape)

    def compute(self) -> dict[str, float]:
        name = f"{self.prefix}_{{}}".format
        result = {name("loss"): torch.cat(self.losses).mean().item()}
        if self.task == "language_modeling":
            # Every block has the same length, so the mean of per-block means is the mean per token.
            result[name("perplexity")] = math.exp(min(result[name("loss")], 700.0))
        if self.predictions:
            predictions, targets = torch.cat(self.predictions), torch.cat(self.targets)
            if self.task in CLASS_TASKS:
                scored = targets != IGNORE_INDEX  # positions a loss skips are not scored either
                result[name("accuracy")] = (predictions == targets.long())[scored].float().mean().item()
            else:
                errors = predictions.float() - targets.float()
                result[name("mae")] = errors.abs().mean().item()
                result[name("mse")] = errors.pow(2).mean().item()
            if self.configured is not None:
                result.update(self.configured.compute(self.prefix))
        return result


def metric_inputs(outputs: torch.Tensor, labels: torch.Tensor, task: str, binary: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(scores, targets) as torchmetrics takes them, one row per scored example: class scores
    (N, classes) and class indices (N,); for one binary output or regression, (N,) values.
    Per-position outputs (N, positions, classes) become one row per position, without the
    positions a loss ignores (IGNORE_INDEX)."""
    outputs = outputs.float()
    if binary or (task == "regression" and outputs.numel() == labels.numel()):
        outputs = outputs.reshape(labels.shape)
        return outputs, labels.long() if binary else labels
    if task in CLASS_TASKS:
        if outputs.ndim > 2:
            outputs, labels = outputs.flatten(0, -2), labels.flatten()
        scored = labels != IGNORE_INDEX
        return outputs[scored], labels[scored]
    return outputs, labels


class MetricSet:
    """Metrics beyond the task's own, by short name: torchmetrics objects or callables
    `(outputs, labels) -> float`, fed the gathered rows of a pass (see metric_inputs).

    A torchmetrics object keeps its own state (F1 its counts, AUROC the scores it ranks); a
    callable gets every row of the pass at once, so only callables make a pass keep all outputs
    (on the CPU). Every process feeds the same gathered rows and computes the same values, so
    torchmetrics' own cross-process sync is switched off: it would count accelerate's padding.
    """

    def __init__(self, metrics: dict[str, Any], device):
        self.metrics = dict(metrics)
        for metric in self.metrics.values():
            if _is_torchmetric(metric):
                metric.sync_on_compute = False
                metric.to(device)
        self._outputs: list[torch.Tensor] = []
        self._labels: list[torch.Tensor] = []

    def __bool__(self) -> bool:
        return bool(self.metrics)

    def reset(self) -> None:
        for metric in self.metrics.values():
            if _is_torchmetric(metric):
                metric.reset()
        self._outputs, self._labels = [], []

    def update(self, outputs: torch.Tensor, labels: torch.Tensor) -> None:
        for metric in self.metrics.values():
            if _is_torchmetric(metric):
                metric.update(outputs, labels)
        if any(not _is_torchmetric(metric) for metric in self.metrics.values()):
            self._outputs.append(outputs.cpu())
            self._labels.append(labels.cpu())

    def compute(self, prefix: str) -> dict[str, float]:
        result = {}
        for name, metric in self.metrics.items():
            if _is_torchmetric(metric):
                value = metric.compute()
            else:
                value = metric(torch.cat(self._outputs), torch.cat(self._labels))
            value = torch.as_tensor(value).detach().float().cpu()
            if value.numel() == 1:
                result[f"{prefix}_{name}"] = value.item()
            else:  # e.g. average="none": one value per class
                result.update({f"{prefix}_{name}_{i}": v for i, v in enumerate(value.flatten().tolist())})
        return result

    def mode_for(self, monitor: str) -> Literal["min", "max"]:
        """The direction of a monitored configured metric: from its higher_is_better.

        Raises:
            ConfigError: the metric does not say (a plain callable without higher_is_better).
        """
        metric = self.metrics.get(monitor.removeprefix("val_"))
        better = getattr(metric, "higher_is_better", None)
        if better is None:
            raise ConfigError(f"training_options.mode: the monitored metric {monitor!r} does not say whether higher is better "
                              "(it has no higher_is_better); set training_options.mode to \"min\" or \"max\".")
        return "max" if better else "min"


def _is_torchmetric(metric: Any) -> bool:
    # Duck-typed, so that no torchmetrics import is needed to tell them from plain callables.
    return all(callable(getattr(metric, verb, None)) for verb in ("update", "compute", "reset"))


def build_metrics(configured: dict[str, MetricOptions], given: dict[str, Any] | None, *, task: str, num_classes: int | None,
                  binary: bool, device) -> MetricSet:
    """The configured metrics (torchmetrics classes by name) and those given to the Python API.

    A torchmetrics class that takes `task` gets "binary" (one binary output) or "multiclass"
    (classification, language_modeling) unless the kwargs say; `num_classes` the data's number
    of classes for multiclass. torchmetrics is imported only here, only when a metric is configured.

    Raises:
        ConfigError: an unknown metric, kwargs that do not fit it, a name used twice or taken by
            the task's own metrics, or an API metric that is neither a torchmetrics Metric nor callable.
    """
    given = dict(given or {})
    for name, metric in given.items():
        key = f"metrics={{{name!r}: ...}}"
        if name in configured:
            raise ConfigError(f"{key}: training_options.metrics already has a metric {name!r}; give one of them another name.")
        if f"val_{name}" in TASK_METRICS.get(task, ()):
            raise ConfigError(f"{key}: the task already reports val_{name}; give the metric another name.")
        if not callable(metric) and not _is_torchmetric(metric):
            raise ConfigError(f"{key}: {type(metric).__name__} is neither a torchmetrics Metric nor a function (outputs, labels) -> float.")
    built = {name: _build_metric(name, options, task, num_classes, binary) for name, options in configured.items()}
    return MetricSet({**built, **given}, device)


def _build_metric(name: str, options: MetricOptions, task: str, num_classes: int | None, binary: bool):
    key = f"training_options.metrics.{name}"
    try:
        import torchmetrics
    except ImportError:
        raise ConfigError(f"{key}: torchmetrics is not installed: pip install torchmetrics.") from None
    cls = import_object(options.name, f"{key}.name", kind="Class") if ":" in options.name else getattr(torchmetrics, options.name, None)
    if not (inspect.isclass(cls) and issubclass(cls, torchmetrics.Metric)):
        raise ConfigError(f"{key}.name: {options.name!r} is not a torchmetrics metric (e.g. F1Score, AUROC, Accuracy, Precision, "
                          "Recall, MeanAbsoluteError, R2Score), nor an import path package.module:Class of one.")
    kwargs = dict(options.kwargs)
    parameters = inspect.signature(cls).parameters
    if "task" in parameters and "task" not in kwargs and task in CLASS_TASKS:
        kwargs["task"] = "binary" if binary else "multiclass"
    if "num_classes" in parameters and "num_classes" not in kwargs and kwargs.get("task") == "multiclass" and num_classes:
        kwargs["num_classes"] = num_classes
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{key}.kwargs do not fit {options.name} ({err}); the trainer filled in "
                          f"{ {k: v for k, v in kwargs.items() if k not in options.kwargs} }.") from None


class TrainWindow:
    """The training-log window: the losses and counts since the last log, reduced once per log.

    `add` runs every micro-batch, keeps its loss and never syncs with the host; `compute` sums
    the window's losses and is the one reduction of the loss per logging interval. With
    `skip_nonfinite` (nonfinite_loss "skip") the losses of skipped steps stay out of the sum.
    """

    def __init__(self, accelerator, every_n_steps: int, skip_nonfinite: bool):
        self.accelerator = accelerator
        self.every_n_steps = every_n_steps
        self.skip_nonfinite = skip_nonfinite
        self.reset()

    def reset(self) -> None:
        self.losses: list[torch.Tensor] = []  # the window's micro-batch losses, detached, summed when logged
        self.samples = self.tokens = 0
        self.started = time.perf_counter()

    @property
    def micro_batches(self) -> int:
        return len(self.losses)

    def should_log(self, step: int) -> bool:
        return step % self.every_n_steps == 0

    def add(self, loss: torch.Tensor, batch: dict[str, torch.Tensor]) -> int:
        """Count one micro-batch; return its rows. No op on the loss: it is kept until the log."""
        self.losses.append(loss.detach())
        rows = batch["labels"].shape[0]
        self.samples += rows
        self.tokens += token_count(batch)
        return rows

    def _loss_sum(self) -> torch.Tensor:
        """The window's losses summed in float32; with skip_nonfinite, NaN and inf count as 0."""
        if not self.losses:
            return torch.zeros((), device=self.accelerator.device)
        losses = torch.stack(self.losses)
        if self.skip_nonfinite:
            losses = torch.nan_to_num(losses, 0.0, 0.0, 0.0)
        return losses.sum(dtype=torch.float32)

    def compute(self) -> dict[str, float] | None:
        """train_loss (mean over the window and the processes) and throughput; None if empty.

        A NaN/inf loss of any process makes train_loss non-finite.
        """
        if self.micro_batches == 0:
            return None
        processes = self.accelerator.num_processes
        if processes == 1:  # nothing to reduce: accelerate's reduce would only add its dispatch
            loss = self._loss_sum().item() / self.micro_batches
        else:
            loss = self.accelerator.reduce(self._loss_sum() / self.micro_batches, reduction="mean").item()
        elapsed = max(time.perf_counter() - self.started, 1e-9)
        metrics = {"train_loss": loss, "samples_per_s": self.samples * processes / elapsed}
        if self.tokens:
            metrics["tokens_per_s"] = self.tokens * processes / elapsed
        return metrics

    def is_finite(self) -> bool:
        """Whether every process's losses since the last log are finite (one reduction)."""
        return math.isfinite(self.accelerator.reduce(self._loss_sum(), reduction="sum").item())
