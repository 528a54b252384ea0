"""Export for inference and the one-liner that loads it back."""

import subprocess
import sys

import datasets
import pytest
import torch
from torch import nn

from accelerated_trainer import AcceleratedTrainer, ConfigError, export_model, load_exported

from conftest import DIGITS, REPO, digits_config


def test_export_best_and_load_it_back_without_the_data(tmp_path):
    trainer = AcceleratedTrainer(None, digits_config(tmp_path, training_options={"n_epochs": 3}))
    result = trainer.train()
    out = tmp_path / "exported"
    completed = subprocess.run([sys.executable, "-m", "accelerated_trainer.export", str(result.run_dir), str(out)],
                               capture_output=True, text=True, cwd=REPO)
    assert completed.returncode == 0, completed.stderr
    model = load_exported(out)  # rebuilt from the exported config: input/output sizes were resolved
    validation = datasets.Dataset.from_parquet(str(DIGITS / "validation.parquet")).with_format("torch")[:]
    with torch.no_grad():
        accuracy = (model(validation["pixels"]).argmax(-1) == validation["label"]).float().mean().item()
    assert accuracy == pytest.approx(result.best_metric, abs=1e-6)
    assert not model.training


def test_export_of_an_api_model_needs_the_model_to_load(tmp_path):
    net = nn.Sequential(nn.Linear(64, 10))
    result = AcceleratedTrainer(net, digits_config(tmp_path, training_options={"n_epochs": 1}),).train()
    out = export_model(result.run_dir, tmp_path / "out", checkpoint="last")
    with pytest.raises(ConfigError, match="pass the model"):
        load_exported(out)
    loaded = load_exported(out, model=nn.Sequential(nn.Linear(64, 10)))
    assert torch.equal(loaded[0].weight, net[0].weight.detach())


def test_export_refuses_a_damaged_checkpoint(tmp_path):
    result = AcceleratedTrainer(None, digits_config(tmp_path, training_options={"n_epochs": 1})).train()
    weights = result.run_dir / "best" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])
    with pytest.raises(ConfigError, match="does not verify"):
        export_model(result.run_dir, tmp_path / "out")
    assert not (tmp_path / "out").exists()
