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


# ---------------------------------------------------------------- configured metrics (training_options.metrics, metrics=)

import json  # noqa: E402

import datasets  # noqa: E402

from accelerated_trainer import AcceleratedTrainer  # noqa: E402

from conftest import DIGITS, digits_config  # noqa: E402


def metric_rows(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def validation_tensors():
    return datasets.Dataset.from_parquet(str(DIGITS / "validation.parquet")).with_format("torch")[:]


def test_a_configured_auroc_is_computed_from_the_scores_not_the_arg_max():
    from torchmetrics import AUROC
    from torchmetrics.functional import auroc

    from accelerated_trainer.metrics import MetricSet

    logits = torch.randn(50, 3, generator=torch.Generator().manual_seed(0))
    labels = torch.randint(0, 3, (50,), generator=torch.Generator().manual_seed(1))
    configured = MetricSet({"auroc": AUROC(task="multiclass", num_classes=3)}, device="cpu")
    metrics = ValidationMetrics("classification", OneProcess(), configured)
    for part in (slice(0, 20), slice(20, 50)):  # two batches, accumulated
        metrics.update(torch.ones(len(labels[part])), logits[part], labels[part])
    result = metrics.compute()
    expected = auroc(logits.softmax(-1), labels, task="multiclass", num_classes=3).item()
    one_hot = nn.functional.one_hot(logits.argmax(-1), 3).float()  # what an arg-max-only path could give
    assert result["val_auroc"] == pytest.approx(expected, abs=1e-6)
    assert result["val_auroc"] != pytest.approx(auroc(one_hot, labels, task="multiclass", num_classes=3).item(), abs=1e-3)
    assert result["val_accuracy"] == pytest.approx((logits.argmax(-1) == labels).float().mean().item())


def test_val_auroc_from_the_config_matches_the_model_scores(tmp_path):
    from torchmetrics.functional import auroc

    config = digits_config(tmp_path, training_options={"n_epochs": 1, "metrics": {"auroc": "AUROC"}})
    trainer = AcceleratedTrainer(None, config)
    trainer.train()
    validation = validation_tensors()
    with torch.no_grad():
        scores = trainer.model.eval()(validation["pixels"]).softmax(-1)
    expected = auroc(scores, validation["label"], task="multiclass", num_classes=10).item()
    assert trainer.evaluate()["val_auroc"] == pytest.approx(expected, abs=1e-5)
    assert any("val_auroc" in row for row in metric_rows(trainer.run_dir))


def test_early_stopping_and_top_k_by_a_configured_f1(tmp_path):
    # min_delta above any possible change: the first evaluation stays early stopping's best.
    config = digits_config(tmp_path, training_options={
        "n_epochs": 6, "metrics": {"f1": {"name": "F1Score", "kwargs": {"average": "macro"}}}, "monitor": "val_f1",
        "early_stopping": {"patience": 2, "min_delta": 100.0}, "save_top_k": 2})
    config["training_options"].pop("mode", None)
    result = AcceleratedTrainer(None, config).train()
    assert result.monitor == "val_f1" and "early stopping" in result.stop_reason and result.epochs == 3
    f1 = [row["val_f1"] for row in metric_rows(result.run_dir) if "val_f1" in row]
    assert len(f1) == 3 and all(0.0 < value <= 1.0 for value in f1)
    index = json.loads((result.run_dir / "checkpoints.json").read_text())
    assert index["monitor"] == "val_f1" and index["mode"] == "max"  # from F1Score's higher_is_better
    assert [entry["value"] for entry in index["top_k"]] == sorted(f1, reverse=True)[:2]
    assert index["best"]["value"] == max(f1) == result.best_metric
    saved = json.loads((result.run_dir / "config.json").read_text())["training_options"]
    assert saved["mode"] == "max" and saved["metrics"]["f1"]["kwargs"] == {"average": "macro"}


def test_a_callable_metric_from_the_api_is_reported_and_monitored(tmp_path):
    seen = []

    def top2(outputs, labels):
        seen.append(len(labels))
        return (outputs.topk(2, dim=-1).indices == labels[:, None]).any(dim=-1).float().mean().item()

    top2.higher_is_better = True
    from torchmetrics.classification import MulticlassAccuracy

    config = digits_config(tmp_path, training_options={"n_epochs": 2, "monitor": "val_top2"})
    config["training_options"].pop("mode", None)
    micro = MulticlassAccuracy(num_classes=10, average="micro")  # a torchmetrics object given as it is
    trainer = AcceleratedTrainer(None, config, metrics={"top2": top2, "micro": micro})
    result = trainer.train()
    assert seen == [359, 359], "called once per evaluation, on every validation row"
    rows = [row for row in metric_rows(result.run_dir) if "val_top2" in row]
    assert len(rows) == 2 and all(row["val_top2"] >= row["val_accuracy"] for row in rows)
    assert all(row["val_micro"] == pytest.approx(row["val_accuracy"], abs=1e-6) for row in rows)
    assert result.monitor == "val_top2" and result.best_metric == max(row["val_top2"] for row in rows)
    assert json.loads((result.run_dir / "checkpoints.json").read_text())["mode"] == "max"


def test_a_callable_metric_without_a_direction_needs_mode(tmp_path):
    from accelerated_trainer import ConfigError

    config = digits_config(tmp_path, training_options={"n_epochs": 1, "monitor": "val_spread"})
    config["training_options"].pop("mode", None)
    with pytest.raises(ConfigError, match="training_options.mode"):
        AcceleratedTrainer(None, config, metrics={"spread": lambda outputs, labels: outputs.std().item()})


def test_configured_metrics_get_one_row_per_scored_position():
    from accelerated_trainer.metrics import MetricSet

    shapes = []
    configured = MetricSet({"seen": lambda outputs, labels: shapes.append((outputs.shape, labels.tolist())) or 0.0}, device="cpu")
    metrics = ValidationMetrics("language_modeling", OneProcess(), configured)
    logits = torch.zeros(2, 3, 4)
    metrics.update(torch.tensor([1.0, 1.0]), logits, torch.tensor([[1, 1, 0], [2, -100, 3]]))
    assert metrics.compute()["val_seen"] == 0.0
    assert shapes == [((5, 4), [1, 1, 0, 2, 3])], "positions flattened, the ignored one dropped"


def test_a_run_without_configured_metrics_never_imports_torchmetrics(tmp_path):
    import subprocess
    import sys

    from conftest import REPO

    code = ("import json, sys; sys.path.insert(0, 'tests'); from conftest import digits_config\n"
            "from accelerated_trainer import AcceleratedTrainer\n"
            f"AcceleratedTrainer(None, digits_config({str(tmp_path)!r}, training_options={{'n_epochs': 1}})).train()\n"
            "print('torchmetrics' in sys.modules)")
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert completed.returncode == 0, completed.stderr[-2000:]
    assert completed.stdout.strip().endswith("False")
