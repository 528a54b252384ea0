"""metrics.py and loss.py: default losses by task and the validation metrics computed from gathered results."""

import math

import pytest
import torch
from torch import nn

from accelerated_trainer.loss import build_loss
from accelerated_trainer.metrics import ValidationMetrics


class OneProcess:
    """The part of an Accelerator that ValidationMetrics uses, for a single process."""

    @staticmethod
    def gather_for_metrics(values):
        return values


@pytest.mark.parametrize("task, loss", [("classification", nn.CrossEntropyLoss), ("regression", nn.MSELoss),
                                        ("language_modeling", nn.CrossEntropyLoss)])
def test_default_loss_per_task(task, loss):
    assert isinstance(build_loss(None, task), loss)


def test_language_modeling_metrics_score_every_position():
    metrics = ValidationMetrics("language_modeling", OneProcess())
    logits = torch.zeros(2, 3, 4)
    logits[0, :, 1] = 1.0  # predicts 1 at every position of the first block
    logits[1, :, 2] = 1.0  # predicts 2 everywhere in the second
    labels = torch.tensor([[1, 1, 0], [2, -100, 3]])  # -100: a position the loss ignores
    metrics.update(torch.tensor([2.0, 1.0]), logits, labels)
    metrics.update(torch.tensor([1.5]), logits[:1], torch.tensor([[1, 1, 1]]))

    result = metrics.compute()
    assert result["val_loss"] == pytest.approx(1.5)
    assert result["val_perplexity"] == pytest.approx(math.exp(1.5))
    assert result["val_accuracy"] == pytest.approx(6 / 8)  # 8 scored positions, 6 right


def test_language_modeling_perplexity_without_predictions():
    metrics = ValidationMetrics("language_modeling", OneProcess())
    metrics.update(torch.tensor([0.5, 1.5]), None, torch.zeros(2, 3, dtype=torch.long))  # a model that returns only its loss
    assert metrics.compute() == {"val_loss": 1.0, "val_perplexity": pytest.approx(math.e)}
