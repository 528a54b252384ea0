"""A NaN/inf loss: stop with the last good checkpoint intact, or skip the step and count it."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from accelerated_trainer import AcceleratedTrainer
from accelerated_trainer.checkpoint.files import verify
from accelerated_trainer.trainer import NonFiniteLossError

from conftest import digits_config


class PoisonedAt(nn.Module):
    """An MLP whose output is NaN on the given forward calls (counted in training mode)."""

    def __init__(self, poisoned_calls):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
        self.poisoned, self.calls = set(poisoned_calls), 0

    def forward(self, features):
        out = self.net(features)
        if self.training:
            self.calls += 1
            if self.calls in self.poisoned:
                out = out * float("nan")
        return out


def test_stop_policy_keeps_the_last_good_checkpoint(tmp_path):
    # Diverges in epoch 2 (call 30): the epoch-1 checkpoint (step 23) is the last good state.
    model = PoisonedAt({30})
    config = digits_config(tmp_path, training_options={"n_epochs": 3, "log_every_n_steps": 10})
    with pytest.raises(NonFiniteLossError) as err:
        AcceleratedTrainer(model, config).train()
    message = str(err.value)
    assert "NaN or infinite at or before step 31" in message and "last (step 23) keeps the last good state" in message
    assert "training_options.nonfinite_loss" in message
    last = tmp_path / "digits-mlp" / "last"
    assert verify(last) is None
    assert json.loads((last / "state.json").read_text())["step"] == 23
    assert all(torch.isfinite(t).all() for t in load_file(str(last / "model.safetensors")).values())


def test_skip_policy_skips_and_counts(tmp_path):
    model = PoisonedAt({3, 7, 40})
    config = digits_config(tmp_path, training_options={"n_epochs": 2, "nonfinite_loss": "skip", "log_every_n_steps": 5})
    result = AcceleratedTrainer(model, config).train()
    assert result.steps == 46
    state = json.loads((tmp_path / "digits-mlp" / "last" / "state.json").read_text())
    assert state["skipped_steps"] == 3
    assert all(torch.isfinite(p).all() for p in model.parameters())
    rows = [json.loads(line) for line in (tmp_path / "digits-mlp" / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped_steps"] for r in rows if "skipped_steps" in r][-1] == 3
    assert math.isfinite(result.metrics["val_loss"])


def test_a_huge_learning_rate_is_caught(tmp_path):
    config = digits_config(tmp_path, training_options={"n_epochs": 2, "optimizer": {"name": "SGD", "lr": 1e30}})
    with pytest.raises(NonFiniteLossError, match="Lower training_options.optimizer.lr"):
        AcceleratedTrainer(None, config).train()
