"""Losses: the configured torch.nn loss, and BatchLoss, which calls the model on a batch and
turns its output into per-sample losses and predictions.

A model that fails, or whose output does not fit the loss, raises ModelError with a message
that names the call, the batch's shapes and what the loss expects.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn

from .config import ConfigError, LossOptions

IGNORE_INDEX = -100  # CrossEntropyLoss's default ignore_index, also used by HF models: a target to skip
DEFAULT_LOSS = {"classification": "CrossEntropyLoss", "regression": "MSELoss", "language_modeling": "CrossEntropyLoss"}


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


class ModelError(RuntimeError):
    """The model's forward failed, or its output does not fit the loss; the message names the shapes."""


EXPECTED_OUTPUT = {
    "classification": "the loss expects outputs of shape (batch, classes) (or (batch, positions, classes)) and "
                      "int64 class indices of shape (batch,) (or (batch, positions)) below the number of classes.",
    "regression": "the loss expects outputs with as many values per example as the labels.",
}


class BatchLoss:
    """Calls the model on a batch and computes the loss, the same way for training and validation.

    `features` is the model's first argument; any other input column (input_ids,
    attention_mask, ...) is a keyword argument; `labels` too when `pass_labels` and the batch
    has them. A model that returns its own loss (HF ModelOutput.loss or a dict with "loss")
    keeps it; otherwise `loss_fn` (elementwise, reduction="none") compares its predictions
    with the labels.
    """

    def __init__(self, model: torch.nn.Module, loss_fn: torch.nn.Module, *, pass_labels: bool, task: str, label_column: str):
        self.model = model  # the prepared model: the trainer's `model`
        self.loss_fn = loss_fn
        self.pass_labels = pass_labels
        self.task = task
        self.label_column = label_column  # for messages

    # Named methods, not __call__: calling an instance with keywords packs them into a new dict
    # and tuple on every training step (about 0.25 us on Python 3.11); a method call does not.
    def compute(self, batch: dict[str, torch.Tensor], per_sample_losses: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Per-sample losses and the model's predictions (None when it only returns a loss).

        With `per_sample_losses` false the losses come as the loss function returns them
        (elementwise, or the model's own mean): their mean is the same batch loss, with fewer ops.
        """
        model_loss, predictions = self.forward(batch)
        return self.loss(model_loss, predictions, batch, per_sample_losses), predictions

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The model's own loss (or None) and its predictions (or None) for a batch; labels optional."""
        inputs = {name: value for name, value in batch.items() if name != "labels"}
        args = (inputs.pop("features"),) if "features" in inputs else ()
        if self.pass_labels and "labels" in batch:
            inputs["labels"] = batch["labels"]
        try:
            output = self.model(*args, **inputs)
        except (TypeError, ValueError, RuntimeError, IndexError, KeyError, AttributeError) as err:
            if isinstance(err, torch.distributed.DistError):
                raise
            call = ", ".join(["features"] * bool(args) + [f"{name}=..." for name in inputs])
            raise ModelError(
                f"the model's forward raised {type(err).__name__}: {err}. Its inputs come from "
                f"dataset_options.feature_columns / input_columns; it was called as model({call}) with {_shapes(batch)}; "
                f"{EXPECTED_OUTPUT.get(self.task, EXPECTED_OUTPUT['classification'])}"
            ) from err
        return _unpack_output(output)

    def loss(self, model_loss: torch.Tensor | None, predictions: torch.Tensor | None, batch: dict[str, torch.Tensor],
             per_sample_losses: bool = True) -> torch.Tensor:
        """The loss of a forward's output against the batch's labels (see compute)."""
        labels = batch["labels"]
        if model_loss is not None:
            return per_sample(model_loss, labels.shape[0]) if per_sample_losses else model_loss
        if self.task == "regression" and predictions.numel() == labels.numel():
            predictions = predictions.reshape(labels.shape)  # (B, 1) outputs against (B,) targets
        try:
            if predictions.ndim > 2 and predictions.ndim == labels.ndim + 1:
                # One class distribution per position (B, T, C) against (B, T) targets.
                losses = self.loss_fn(predictions.flatten(0, -2), labels.flatten()).view(labels.shape)
            else:
                losses = self.loss_fn(predictions, labels)
        except (RuntimeError, ValueError, IndexError) as err:
            raise self._loss_error(err, predictions, labels, batch) from err
        return per_sample(losses, labels.shape[0]) if per_sample_losses else losses

    def _loss_error(self, err: Exception, predictions: torch.Tensor, labels: torch.Tensor, batch: dict[str, torch.Tensor]) -> ModelError:
        if self.task != "regression" and labels.dtype == torch.long and predictions.ndim >= 2:
            classes = predictions.shape[-1]
            low, high = int(labels.min()), int(labels.max())
            if low < 0 or high >= classes:
                outputs = "1 class (0)" if classes == 1 else f"{classes} classes (0..{classes - 1})"
                return ModelError(
                    f"dataset_options.label_column {self.label_column!r} holds class {high if high >= classes else low} "
                    f"but the model outputs {outputs}; fix the labels or the model's output size."
                )
        return ModelError(
            f"{type(self.loss_fn).__name__} cannot compare the model output of shape {tuple(predictions.shape)} "
            f"with labels of shape {tuple(labels.shape)} (batch: {_shapes(batch)}): {err}. "
            f"{EXPECTED_OUTPUT.get(self.task, EXPECTED_OUTPUT['classification'])}"
        )


def token_count(batch: dict[str, torch.Tensor]) -> int:
    """Tokens in a batch, from shapes only (no device sync): input_ids, or per-position labels."""
    if "input_ids" in batch:
        return batch["input_ids"].numel()
    labels = batch["labels"]
    return labels.numel() if labels.ndim > 1 else 0


def _shapes(batch: dict[str, torch.Tensor]) -> str:
    return ", ".join(f"{name} {tuple(value.shape)} {str(value.dtype).removeprefix('torch.')}" for name, value in batch.items())


def _unpack_output(output: Any) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(loss, predictions) from a tensor, a dict, or an HF ModelOutput."""
    if isinstance(output, torch.Tensor):
        return None, output
    if isinstance(output, dict):  # ModelOutput is a dict too
        return output.get("loss"), output.get("logits", output.get("predictions"))
    if isinstance(output, (tuple, list)):
        return None, output[0]
    raise TypeError(f"the model returned {type(output).__name__}; return a tensor, a dict with 'loss'/'logits', or a ModelOutput.")
