"""Scoring and inference after training: evaluate(dataset), the test split, predict(), and the
`python -m accelerated_trainer.predict` command."""

import json
import os
import subprocess
import sys
from pathlib import Path

import datasets
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

from accelerated_trainer import AcceleratedTrainer, ConfigError

from conftest import DIGITS, REPO, digits_config

ACCELERATE = str(Path(sys.executable).parent / "accelerate")


def validation():
    return datasets.Dataset.from_parquet(str(DIGITS / "validation.parquet"))


def outputs_of(run_dir, checkpoint, pixels):
    from accelerated_trainer.models import build_model
    from accelerated_trainer.config import TrainerConfig

    config = TrainerConfig.model_validate(json.loads((run_dir / "config.json").read_text()))
    model = build_model(config.model_options)
    model.load_state_dict(load_file(str(run_dir / checkpoint / "model.safetensors")))
    with torch.no_grad():
        return model.eval()(pixels)


def falling_metric():
    values = iter(range(100, 0, -1))
    metric = lambda outputs, labels: float(next(values))  # noqa: E731
    metric.higher_is_better = True
    return {"first": metric}


def test_evaluate_scores_any_dataset_or_the_validation_split(tmp_path):
    trainer = AcceleratedTrainer(None, digits_config(tmp_path, training_options={"n_epochs": 1}))
    result = trainer.train()
    rows = validation().select(range(100))
    tensors = rows.with_format("torch")[:]
    with torch.no_grad():
        expected = (trainer.model.eval()(tensors["pixels"]).argmax(-1) == tensors["label"]).float().mean().item()
    assert trainer.evaluate(rows)["val_accuracy"] == pytest.approx(expected)
    as_columns = {"pixels": tensors["pixels"].tolist(), "label": tensors["label"].tolist()}
    assert trainer.evaluate(as_columns, prefix="holdout")["holdout_accuracy"] == pytest.approx(expected)
    assert trainer.evaluate()["val_accuracy"] == pytest.approx(result.metrics["val_accuracy"])


def test_evaluate_without_validation_data_says_what_to_pass(tmp_path):
    config = digits_config(tmp_path, training_options={"n_epochs": 1}, dataset_options={"validation_split": 0.0})
    config["dataset_options"]["data_files"].pop("validation")
    trainer = AcceleratedTrainer(None, config)
    with pytest.raises(ConfigError, match="evaluate.*dataset.*validation"):
        trainer.evaluate()


def test_the_test_split_is_scored_with_the_best_weights(tmp_path, capsys):
    config = digits_config(tmp_path, training_options={"n_epochs": 3, "monitor": "val_first"})
    config["training_options"].pop("mode", None)
    config["dataset_options"]["data_files"]["test"] = str(DIGITS / "validation.parquet")
    result = AcceleratedTrainer(None, config, metrics=falling_metric()).train()
    tensors = validation().with_format("torch")[:]
    best = outputs_of(result.run_dir, "best", tensors["pixels"])
    last = outputs_of(result.run_dir, "last", tensors["pixels"])
    best_accuracy = (best.argmax(-1) == tensors["label"]).float().mean().item()
    assert best_accuracy != (last.argmax(-1) == tensors["label"]).float().mean().item()
    assert result.test_metrics["test_accuracy"] == pytest.approx(best_accuracy)
    assert set(result.test_metrics) >= {"test_loss", "test_accuracy", "test_first"}
    rows = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    tested = [row for row in rows if "test_accuracy" in row]
    assert len(tested) == 1 and tested[0]["test_accuracy"] == result.test_metrics["test_accuracy"] and tested[0]["step"] == 69
    assert "test (best weights) test_loss" in capsys.readouterr().out


def test_a_test_file_without_labels_does_not_stop_training(tmp_path, capsys):
    unlabelled = tmp_path / "unlabelled.parquet"
    validation().remove_columns("label").to_parquet(str(unlabelled))
    config = digits_config(tmp_path, training_options={"n_epochs": 1})
    config["dataset_options"]["data_files"]["test"] = str(unlabelled)
    result = AcceleratedTrainer(None, config).train()
    assert result.steps == 23 and result.test_metrics == {}
    assert "not scored" in capsys.readouterr().out


def test_predict_returns_every_row_in_input_order_without_labels(tmp_path):
    trainer = AcceleratedTrainer(None, digits_config(tmp_path, training_options={"n_epochs": 1},
                                                     dataset_options={"eval_batch_size": 16}))
    trainer.train()
    rows = validation().select(range(101)).remove_columns("label")
    predicted = trainer.predict(rows)
    with torch.no_grad():
        expected = trainer.model.eval()(rows.with_format("torch")[:]["pixels"])
    assert predicted.shape == (101, 10)
    assert torch.allclose(predicted, expected, atol=1e-6)


def test_predict_and_evaluate_on_two_processes_see_every_row_once_in_order(tmp_path):
    out = tmp_path / "predicted.safetensors"
    command = [ACCELERATE, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29623",
               "tests/helpers/predict_two_processes.py", str(tmp_path), str(out), "101"]
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1"}
    completed = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert completed.returncode == 0, completed.stderr[-4000:]
    predicted = load_file(str(out))
    pixels = validation().select(range(101)).with_format("torch")[:]["pixels"]
    expected = outputs_of(tmp_path / "digits-mlp", "best", pixels)
    labels = validation().select(range(101)).with_format("torch")[:]["label"]
    accuracy = (expected.argmax(-1) == labels).float().mean()
    for rank in (0, 1):  # every process got all rows, and scored each once
        assert predicted[f"rank{rank}"].shape == (101, 10)
        assert torch.allclose(predicted[f"rank{rank}"], expected, atol=1e-5)
        assert predicted[f"accuracy{rank}"].item() == pytest.approx(accuracy.item(), abs=1e-6)


def run_predict(*args):
    return subprocess.run([sys.executable, "-m", "accelerated_trainer.predict", *map(str, args)],
                          cwd=REPO, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("predict")
    result = AcceleratedTrainer(None, digits_config(root, training_options={"n_epochs": 2})).train()
    return result.run_dir


def test_the_predict_command_writes_one_row_per_input(trained_run, tmp_path):
    out = tmp_path / "preds.parquet"
    completed = run_predict(trained_run, "--data", DIGITS / "validation.parquet", "--out", out)
    assert completed.returncode == 0, completed.stderr
    table = pq.read_table(out).to_pydict()
    tensors = validation().with_format("torch")[:]
    logits = outputs_of(trained_run, "best", tensors["pixels"])
    assert len(table["prediction"]) == 359
    assert table["prediction"] == logits.argmax(-1).tolist()
    probabilities = torch.tensor(table["probabilities"])
    assert probabilities.shape == (359, 10) and torch.allclose(probabilities, logits.softmax(-1), atol=1e-6)
    last = tmp_path / "last.parquet"
    assert run_predict(trained_run, "--data", DIGITS / "validation.parquet", "--checkpoint", "last", "--out", last).returncode == 0
    assert pq.read_table(last).num_rows == 359


def test_the_predict_command_writes_regression_values(tmp_path):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(300, 3, generator=generator)
    columns = {"x": x.tolist(), "y": (x.sum(dim=1)).tolist()}
    config = digits_config(tmp_path, training_options={"task": "regression", "monitor": "val_mse", "loss_function": "MSELoss"},
                           dataset_options={"feature_columns": ["x"], "label_column": "y", "data_files": {}})
    result = AcceleratedTrainer(None, config, train_dataset=columns).train()
    data = tmp_path / "new.jsonl"
    data.write_text("".join(json.dumps({"x": row}) + "\n" for row in x[:7].tolist()))
    out = tmp_path / "values.parquet"
    completed = run_predict(result.run_dir, "--data", data, "--out", out)
    assert completed.returncode == 0, completed.stderr
    values = pq.read_table(out).column("prediction").to_pylist()
    assert values == pytest.approx(outputs_of(result.run_dir, "best", x[:7]).squeeze(1).tolist(), abs=1e-5)


@pytest.mark.parametrize("args, message", [
    (["{missing}", "--data", "{data}", "--out", "{out}"], "config.json"),
    (["{run}", "--data", "{tmp}/nope.parquet", "--out", "{out}"], "nope.parquet"),
    (["{run}", "--data", "{data}", "--checkpoint", "top/none", "--out", "{out}"], "top/none"),
    (["{run}", "--data", "{data}", "--out", "{tmp}/preds.txt"], "--out"),
    (["{run}", "--data", "{unlabelled_wrong}", "--out", "{out}"], "pixels"),
])
def test_the_predict_command_exits_2_on_bad_input(trained_run, tmp_path, args, message):
    wrong = tmp_path / "wrong.parquet"
    validation().rename_column("pixels", "image").to_parquet(str(wrong))
    values = {"missing": tmp_path / "no-run", "data": DIGITS / "validation.parquet", "out": tmp_path / "p.parquet",
              "run": trained_run, "tmp": tmp_path, "unlabelled_wrong": wrong}
    completed = run_predict(*[arg.format(**values) for arg in args])
    assert completed.returncode == 2, completed.stderr
    assert message in completed.stderr and "Traceback" not in completed.stderr
    assert not (tmp_path / "p.parquet").exists()
