"""Losses: the configured loss (a torch.nn loss, or a class or function by import path), and
BatchLoss, which calls the model on a batch and turns its output into per-sample losses and
predictions.

A model that fails, or whose output does not fit the loss, raises ModelError with a message
that names the call, the batch's shapes and what the loss expects.
"""

from __future__ import annotations

import copy
import functools
import inspect
import warnings
from typing import Any, Callable

import torch
from torch import nn

from .config import ConfigError, LossOptions
from .imports import import_object

IGNORE_INDEX = -100  # CrossEntropyLoss's default ignore_index, also used by HF models: a target to skip
DEFAULT_LOSS = {"classification": "CrossEntropyLoss", "regression": "MSELoss", "language_modeling": "CrossEntropyLoss"}


def build_loss(options: LossOptions | None, task: str) -> Callable:
    """The configured loss, computing one value per element (reduction 'none'); the trainer takes the mean.

    `options.name` is a torch.nn loss class or the import path of a loss class or function
    `(outputs, labels) -> loss`. A list given for a tensor argument (weight, pos_weight) becomes
    a float tensor. Per-sample values let validation average over exactly the gathered samples;
    a loss that takes no `reduction` may return its batch mean instead.

    Raises:
        ConfigError: the name is no loss, or the kwargs do not fit it.
    """
    options = options or LossOptions(name=DEFAULT_LOSS[task])
    target = _loss_target(options.name)
    if "reduction" in options.kwargs:
        raise ConfigError("training_options.loss_function.kwargs: leave out 'reduction'; the trainer averages per-sample losses.")
    parameters = _parameters(target)
    kwargs = {name: _as_tensor(value) if _takes_tensor(parameters.get(name)) else value for name, value in options.kwargs.items()}
    if "reduction" in parameters:
        kwargs["reduction"] = "none"
    try:
        if inspect.isclass(target):
            return target(**kwargs)
        inspect.signature(target).bind_partial(**kwargs)
        return functools.partial(target, **kwargs) if kwargs else target
    except (TypeError, ValueError) as err:
        raise ConfigError(f"training_options.loss_function.kwargs do not fit {options.name}: {err}.") from None


def as_per_sample(loss_fn: Callable) -> Callable:
    """A loss given to the Python API, with a torch.nn loss's reduction set to 'none' (on a copy)."""
    if isinstance(loss_fn, nn.modules.loss._Loss) and loss_fn.reduction != "none":
        loss_fn = copy.copy(loss_fn)
        loss_fn.reduction = "none"
    return loss_fn


# torch.nn losses whose 'mean' reduction is the mean of their reduction='none' values (a weight
# scales each element before either reduction).
ELEMENTWISE_MEAN = (nn.MSELoss, nn.L1Loss, nn.SmoothL1Loss, nn.HuberLoss, nn.BCELoss, nn.BCEWithLogitsLoss)


def batch_mean_loss(loss_fn: Callable | None, task: str) -> nn.Module | None:
    """A copy of a torch.nn loss with reduction 'mean', where that mean is the mean of its
    reduction='none' values; None for any other loss.

    Not for CrossEntropyLoss and NLLLoss with class weights (their 'mean' divides by the sum of
    the weights), nor outside classification, where targets may be ignore_index (their 'mean'
    leaves those out of the count; per-position language modeling targets may be padding).
    """
    kind = type(loss_fn)
    if kind in ELEMENTWISE_MEAN or (kind in (nn.CrossEntropyLoss, nn.NLLLoss) and loss_fn.weight is None and task == "classification"):
        mean = copy.copy(loss_fn)
        mean.reduction = "mean"
        return mean
    return None


def binary_threshold(loss_fn: Callable) -> float | None:
    """For a one-output binary loss, the output above which the prediction is class 1: 0 for
    logits (BCEWithLogitsLoss), 0.5 for probabilities (BCELoss); None for any other loss."""
    target = getattr(loss_fn, "func", loss_fn)  # a function loss with kwargs is a functools.partial
    if isinstance(target, nn.BCEWithLogitsLoss) or target is nn.functional.binary_cross_entropy_with_logits:
        return 0.0
    if isinstance(target, nn.BCELoss) or target is nn.functional.binary_cross_entropy:
        return 0.5
    return None


def _loss_target(name: str) -> Any:
    if ":" in name:
        target = import_object(name, "training_options.loss_function.name")
        if not callable(target):
            raise ConfigError(f"training_options.loss_function.name: {name!r} is neither a loss class nor a function.")
        return target
    cls = getattr(nn, name, None)
    if not (inspect.isclass(cls) and issubclass(cls, nn.modules.loss._Loss)):
        raise ConfigError(
            f"training_options.loss_function.name: {name!r} is not a torch.nn loss "
            "(e.g. CrossEntropyLoss, MSELoss, L1Loss, SmoothL1Loss, BCEWithLogitsLoss), nor an import path "
            "package.module:attribute of a loss class or function."
        )
    return cls


def _parameters(target: Any) -> dict[str, inspect.Parameter]:
    try:
        return dict(inspect.signature(target).parameters)
    except (TypeError, ValueError):  # some builtins have no signature
        return {}


def _takes_tensor(parameter: inspect.Parameter | None) -> bool:
    # Annotations may be strings (postponed evaluation): look for the name either way.
    return parameter is not None and "Tensor" in str(parameter.annotation)


def _as_tensor(value: Any) -> Any:
    return torch.tensor(value, dtype=torch.float32) if isinstance(value, (list, tuple)) else value


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
    with the labels. `ignored_loss` names a configured loss, warned about once if the model's
    own loss makes it unused. With a one-output binary loss (binary_threshold), outputs of
    shape (batch,) or (batch, 1) meet the labels as floats.
    """

    def __init__(self, model: torch.nn.Module, loss_fn: Callable | None, *, pass_labels: bool, task: str, label_column: str,
                 ignored_loss: str | None = None):
        self.model = model  # the prepared model: the trainer's `model`
        self.loss_fn = loss_fn
        self.pass_labels = pass_labels
        self.task = task
        self.label_column = label_column  # for messages
        self.ignored_loss = ignored_loss
        self.mean_fn = batch_mean_loss(loss_fn, task)
        self.binary = task == "classification" and binary_threshold(loss_fn) is not None
        self.one_value_per_label = self.binary or task == "regression"

    # Named methods, not __call__: calling an instance with keywords packs them into a new dict
    # and tuple on every training step (about 0.25 us on Python 3.11); a method call does not.
    def compute(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Per-sample losses and the model's predictions (None when it only returns a loss)."""
        model_loss, predictions = self.forward(batch)
        return self.loss(model_loss, predictions, batch), predictions

    def training_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The batch's mean loss, the one training steps on: the model's own loss, or the mean of
        the loss function's values. Where a torch loss's own 'mean' reduction is that same mean
        (batch_mean_loss), it computes it: one op forward and backward instead of per-element
        values and their mean (on the tiny workload about 28 us of a 0.5 ms step)."""
        model_loss, predictions = self.forward(batch)
        if model_loss is not None:
            self._warn_if_ignored()
            return model_loss if model_loss.ndim == 0 else model_loss.mean()
        if self.mean_fn is not None:
            return self._compare(self.mean_fn, predictions, batch)
        return self._compare(self.loss_fn, predictions, batch).mean()

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

    def loss(self, model_loss: torch.Tensor | None, predictions: torch.Tensor | None, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The per-sample losses of a forward's output against the batch's labels."""
        batch_size = batch["labels"].shape[0]
        if model_loss is not None:
            self._warn_if_ignored()
            return per_sample(model_loss, batch_size)
        return per_sample(self._compare(self.loss_fn, predictions, batch), batch_size)

    def _compare(self, loss_fn: Callable, predictions: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """`loss_fn` of the predictions against the batch's labels, elementwise values in the labels' shape."""
        labels = batch["labels"]
        if self.one_value_per_label and predictions.numel() == labels.numel():
            predictions = predictions.reshape(labels.shape)  # (B, 1) outputs against (B,) targets
            if self.binary:
                labels = labels.to(predictions.dtype)  # BCE compares class indices 0/1 as floats
        try:
            if predictions.ndim > 2 and predictions.ndim == labels.ndim + 1:
                # One class distribution per position (B, T, C) against (B, T) targets.
                losses = loss_fn(predictions.flatten(0, -2), labels.flatten())
                return losses.view(labels.shape) if losses.ndim else losses
            return loss_fn(predictions, labels)
        except (RuntimeError, ValueError, IndexError) as err:
            raise self._loss_error(err, predictions, labels, batch) from err

    def _warn_if_ignored(self) -> None:
        if self.ignored_loss is None:
            return
        warnings.warn(f"{self.ignored_loss} is not used: the model returns its own loss "
                      "(ModelOutput.loss or a dict with \"loss\") when it gets labels, and that one is trained on. Remove "
                      "loss_function, or make the model return logits only.", UserWarning, stacklevel=3)
        self.ignored_loss = None

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
            f"{_name(self.loss_fn)} cannot compare the model output of shape {tuple(predictions.shape)} "
            f"with labels of shape {tuple(labels.shape)} (batch: {_shapes(batch)}): {err}. "
            f"{EXPECTED_OUTPUT.get(self.task, EXPECTED_OUTPUT['classification'])}"
        )


def token_count(batch: dict[str, torch.Tensor]) -> int:
    """Tokens in a batch, from shapes only (no device sync): input_ids, or per-position labels."""
    if "input_ids" in batch:
        return batch["input_ids"].numel()
    labels = batch["labels"]
    return labels.numel() if labels.ndim > 1 else 0


def _name(loss_fn: Callable) -> str:
    target = getattr(loss_fn, "func", loss_fn)
    return getattr(target, "__name__", type(target).__name__)


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
