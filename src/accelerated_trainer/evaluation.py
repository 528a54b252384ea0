"""Evaluation and prediction with the run's model: the validation split, the test split, or any
dataset given later, each row scored once across the processes.

The Evaluator turns a dataset into a prepared loader the way the run's splits were made
(data.load_split, data.build_loader, accelerate's prepare_data_loader), then runs the model over
it in eval mode: `score` reduces the gathered losses and outputs to metrics (metrics.py),
`predict` returns the gathered outputs. `gather_for_metrics` drops the rows that accelerate
repeats to even out the last batch, and the batches of the processes interleave in input
order, so every process gets every row once, in order.
"""

from __future__ import annotations

import contextlib
from typing import Callable

import torch

from . import data
from .config import DatasetOptions
from .loss import BatchLoss, ModelError
from .metrics import MetricSet, ValidationMetrics


class Evaluator:
    """Scores and predicts with a prepared model.

    Args:
        accelerator: the run's Accelerator.
        batch_loss: calls the model and computes per-sample losses (loss.BatchLoss).
        metrics: the configured metrics beside the task's own.
        options: the run's dataset_options (columns, transforms, eval batch size).
        task / label_dtype / seed / collate_fn: as for the run's own loaders.
        threshold: for a one-output binary classifier (loss.binary_threshold), else None.
    """

    def __init__(self, accelerator, batch_loss: BatchLoss, metrics: MetricSet, options: DatasetOptions, *, task: str,
                 label_dtype: torch.dtype, seed: int, collate_fn: Callable | None = None, threshold: float | None = None,
                 padding: dict[str, int] | None = None, input_names: tuple[str, ...] = (),
                 label_names: list[str] | None = None):
        self.accelerator, self.batch_loss, self.metrics, self.options = accelerator, batch_loss, metrics, options
        self.task, self.label_dtype, self.seed, self.collate_fn, self.threshold = task, label_dtype, seed, collate_fn, threshold
        self.padding, self.input_names, self.label_names = padding, input_names, label_names

    def loader_for(self, dataset, name: str, labels: bool):
        """A prepared loader over a dataset given later (whatever train_dataset= takes), made as
        the run's own splits were (transforms, tokenization); `name` is for messages."""
        with self.accelerator.main_process_first():
            split = data.load_split(dataset, self.options, name, require_labels=labels, input_names=self.input_names,
                                    label_names=self.label_names)
        return self.prepared(split, labels)

    def prepared(self, split, labels: bool):
        """A prepared loader over a split as load_splits returns it."""
        loader = data.build_loader(
            split, self.options, label_dtype=self.label_dtype, batch_size=self.options.eval_batch_size or self.options.batch_size,
            seed=self.seed, train=False, num_processes=self.accelerator.num_processes, collate_fn=self.collate_fn,
            with_labels=labels, padding=self.padding)
        return data.prepare_loader(self.accelerator, loader)

    @torch.no_grad()
    def score(self, loader, prefix: str = "val") -> dict[str, float]:
        """{prefix}_loss, the task's metrics and the configured ones over every row of `loader`."""
        metrics = ValidationMetrics(self.task, self.accelerator, self.metrics, prefix=prefix, threshold=self.threshold)
        with self._eval_mode():
            for batch in loader:
                sample_losses, predictions = self.batch_loss.compute(batch)
                metrics.update(sample_losses, predictions, batch["labels"])
        return metrics.compute()

    @torch.no_grad()
    def predict(self, loader) -> torch.Tensor:
        """The model's outputs for every row of `loader`, in order, on the CPU.

        Raises:
            ModelError: the model returns only a loss.
        """
        outputs = []
        with self._eval_mode():
            for batch in loader:
                _, predictions = self.batch_loss.forward(batch)
                if predictions is None:
                    raise ModelError("predict(): the model returned no outputs (only a loss); return logits or predictions.")
                outputs.append(self.accelerator.gather_for_metrics(predictions.detach()).cpu())
        return torch.cat(outputs)

    @contextlib.contextmanager
    def _eval_mode(self):
        model = self.batch_loss.model
        training = model.training
        model.eval()
        try:
            yield
        finally:
            model.train(training)
