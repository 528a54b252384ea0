"""A model that raises, or returns what the loss cannot take: the message names the shapes."""

import pytest
from torch import nn

from accelerated_trainer import AcceleratedTrainer
from accelerated_trainer.trainer import ModelError

from conftest import digits_config


class Broken(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Linear(32, 10)  # built for 32 features; the data has 64

    def forward(self, features):
        return self.net(features)


def test_forward_that_raises_names_the_batch(tmp_path):
    with pytest.raises(ModelError) as err:
        AcceleratedTrainer(Broken(), digits_config(tmp_path)).train()
    message = str(err.value)
    assert "forward raised RuntimeError" in message
    assert "features (64, 64) float32" in message and "labels (64,) int64" in message
    assert "(batch, classes)" in message


def test_output_that_does_not_fit_the_loss(tmp_path):
    flat = nn.Sequential(nn.Linear(64, 10), nn.Flatten(0))  # (640,) instead of (64, 10)
    with pytest.raises(ModelError, match=r"output of shape \(640,\) with labels of shape \(64,\).*\(batch, classes\)"):
        AcceleratedTrainer(flat, digits_config(tmp_path)).train()


def test_labels_beyond_the_model_classes_name_the_column(tmp_path):
    with pytest.raises(ModelError, match=r"dataset_options.label_column 'label' holds class 9 but the model outputs 8 classes"):
        AcceleratedTrainer(nn.Linear(64, 8), digits_config(tmp_path)).train()
