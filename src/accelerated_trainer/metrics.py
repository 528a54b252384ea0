"""Losses by name and validation metrics over results gathered from every process.

Metrics are reductions over `accelerator.gather_for_metrics` results, which drops the samples
that distributed sampling repeats to even out the last batch, so every process computes the
same values over exactly the validation set.
"""

from __future__ import annotations

import inspect
import math
from typing import Literal

import torch
from torch import nn

from .config import ConfigError, LossOptions

IGNORE_INDEX = -100  # CrossEntropyLoss's default ignore_index, also used by HF models

DEFAULT_LOSS = {"classification": "CrossEntropyLoss", "regression": "MSELoss", "language_modeling": "CrossEntropyLoss"}
CLASS_TASKS = ("classification", "language_modeling")  # outputs are class scores, labels class indices


def rank_key(value: float, mode: Literal["min", "max"]) -> float:
    """Sort key of a monitored value where smaller is better; NaN ranks worst."""
    if math.isnan(value):
        return math.inf
    return value if mode == "min" else -value


def is_improvement(value: float, best: float | None, mode: Literal["min", "max"], min_delta: float = 0.0) -> bool:
    """Whether `value` beats `best` by more than `min_delta`. NaN never improves; anything beats no best."""
    if math.isnan(value):
        return False
    if best is None or math.isnan(best):
        return True
    return value < best - min_delta if mode == "min" else value > best + min_delta


def build_loss(options: LossOptions | None, task: str) -> nn.Module:
    """The configured torch.nn loss with per-sample reduction ('none'); the trainer takes the mean.

    Per-sample values let validation average over exactly the gathered samples.
    """
    options = options or LossOptions(name=DEFAULT_LOSS[task])
    cls = getattr(nn, options.name, None)
    if not (inspect.isclass(cls) and issubclass(cls, nn.modules.loss._Loss)):
        raise ConfigError(
            f"training_options.loss_function.name: {options.name!r} is not a torch.nn loss "
            "(e.g. CrossEntropyLoss, MSELoss, L1Loss, SmoothL1Loss, BCEWithLogitsLoss)."
        )
    if "reduction" in options.kwargs:
        raise ConfigError("training_options.loss_function.kwargs: leave out 'reduction'; the trainer averages per-sample losses.")
    try:
        return cls(reduction="none", **options.kwargs)
    except TypeError as err:
        raise ConfigError(f"training_options.loss_function.kwargs do not fit {options.name}: {err}.") from None


def per_sample(loss: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Reduce an elementwise loss to one value per sample (mean over the other dimensions)."""
    if loss.ndim == 0:  # a model's own loss is already a batch mean
        return loss.expand(batch_size)
    return loss.reshape(loss.shape[0], -1).mean(dim=1)


class ValidationMetrics:
    """Accumulates gathered per-sample losses and predictions over one validation pass."""

    def __init__(self, task: str, accelerator):
        self.task = task
        self.accelerator = accelerator
        self.losses: list[torch.Tensor] = []
        self.predictions: list[torch.Tensor] = []
        self.targets: list[torch.Tensor] = []

    def update(self, sample_losses: torch.Tensor, outputs: torch.Tensor | None, labels: torch.Tensor) -> None:
        # Classification keeps only the arg-max, not the logits: validation memory stays O(samples).
        predictions = None
        if outputs is not None:
            predictions = outputs.argmax(dim=-1) if self.task in CLASS_TASKS else outputs.reshape(labels.shape)
        if predictions is None:
            self.losses.append(self.accelerator.gather_for_metrics(sample_losses.detach().float()))
            return
        losses, predictions, labels = self.accelerator.gather_for_metrics((sample_losses.detach().float(), predictions, labels))
        self.losses.append(losses)
        self.predictions.append(predictions)
        self.targets.append(labels)

    def compute(self) -> dict[str, float]:
        result = {"val_loss": torch.cat(self.losses).mean().item()}
        if self.task == "language_modeling":
            # Every block has the same length, so the mean of per-block means is the mean per token.
            result["val_perplexity"] = math.exp(min(result["val_loss"], 700.0))
        if self.predictions:
            predictions, targets = torch.cat(self.predictions), torch.cat(self.targets)
            if self.task in CLASS_TASKS:
                scored = targets != IGNORE_INDEX  # positions a loss skips are not scored either
                result["val_accuracy"] = (predictions == targets)[scored].float().mean().item()
            else:
                errors = predictions.float() - targets.float()
                result["val_mae"] = errors.abs().mean().item()
                result["val_mse"] = errors.pow(2).mean().item()
        return result
