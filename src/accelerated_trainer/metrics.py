"""What a run measures: the training-log window and validation metrics.

Validation metrics are reductions over `accelerator.gather_for_metrics` results, which drops
the samples that distributed sampling repeats to even out the last batch, so every process
computes the same values over exactly the validation set.
"""

from __future__ import annotations

import math
import time

import torch

from .loss import IGNORE_INDEX, token_count

CLASS_TASKS = ("classification", "language_modeling")  # outputs are class scores, labels class indices


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


class TrainWindow:
    """The training-log window: the losses and counts since the last log, reduced once per log.

    `add` runs every micro-batch and never syncs with the host; `compute` is the one reduction
    of the loss per logging interval. With `skip_nonfinite` (nonfinite_loss "skip") the losses
    of skipped steps stay out of the sum.
    """

    def __init__(self, accelerator, every_n_steps: int, skip_nonfinite: bool):
        self.accelerator = accelerator
        self.every_n_steps = every_n_steps
        self.add = self._add_finite if skip_nonfinite else self._add
        self.reset()

    def reset(self) -> None:
        self.loss_sum = torch.zeros((), device=self.accelerator.device)
        self.micro_batches = self.samples = self.tokens = 0
        self.started = time.perf_counter()

    def should_log(self, step: int) -> bool:
        return step % self.every_n_steps == 0

    def _add(self, loss: torch.Tensor, batch: dict[str, torch.Tensor]) -> int:
        """Count one micro-batch; return its rows."""
        self.loss_sum += loss.detach()
        return self._count(batch)

    def _add_finite(self, loss: torch.Tensor, batch: dict[str, torch.Tensor]) -> int:
        self.loss_sum += torch.nan_to_num(loss.detach(), 0.0, 0.0, 0.0)
        return self._count(batch)

    def _count(self, batch: dict[str, torch.Tensor]) -> int:
        rows = batch["labels"].shape[0]
        self.micro_batches += 1
        self.samples += rows
        self.tokens += token_count(batch)
        return rows

    def compute(self) -> dict[str, float] | None:
        """train_loss (mean over the window and the processes) and throughput; None if empty.

        A NaN/inf loss of any process makes train_loss non-finite.
        """
        if self.micro_batches == 0:
            return None
        processes = self.accelerator.num_processes
        loss = self.accelerator.reduce(self.loss_sum / self.micro_batches, reduction="mean").item()
        elapsed = max(time.perf_counter() - self.started, 1e-9)
        metrics = {"train_loss": loss, "samples_per_s": self.samples * processes / elapsed}
        if self.tokens:
            metrics["tokens_per_s"] = self.tokens * processes / elapsed
        return metrics

    def is_finite(self) -> bool:
        """Whether every process's losses since the last log are finite (one reduction)."""
        return math.isfinite(self.accelerator.reduce(self.loss_sum, reduction="sum").item())
