"""loss.py: losses from the config (tensors from JSON lists, import paths), loss_fn= from the API,
binary classification with one output, and a model's own loss."""

import warnings

import datasets
import pytest
import torch
from torch import nn

from accelerated_trainer import AcceleratedTrainer, ConfigError
from accelerated_trainer.loss import build_loss

from conftest import DIGITS, digits_config

CLASS_WEIGHTS = [0.5, 1.0, 2.0, 1.0, 0.25, 1.0, 3.0, 1.0, 1.0, 0.75]


def validation_tensors():
    return datasets.Dataset.from_parquet(str(DIGITS / "validation.parquet")).with_format("torch")[:]


def test_class_weights_from_json_become_a_tensor(tmp_path):
    loss = {"name": "CrossEntropyLoss", "kwargs": {"weight": CLASS_WEIGHTS, "label_smoothing": 0.05}}
    trainer = AcceleratedTrainer(None, digits_config(tmp_path, training_options={"n_epochs": 1, "loss_function": loss}))
    trainer.train()
    validation = validation_tensors()
    with torch.no_grad():
        expected = nn.functional.cross_entropy(trainer.model.eval()(validation["pixels"]), validation["label"],
                                               weight=torch.tensor(CLASS_WEIGHTS), label_smoothing=0.05, reduction="none")
    assert trainer.evaluate()["val_loss"] == pytest.approx(expected.mean().item(), rel=1e-5)


def test_pos_weight_from_json_and_a_bad_kwarg_names_the_key():
    built = build_loss(load_loss({"name": "BCEWithLogitsLoss", "kwargs": {"pos_weight": [2.0]}}), "classification")
    assert torch.equal(built.pos_weight, torch.tensor([2.0]))
    with pytest.raises(ConfigError, match="training_options.loss_function.kwargs"):
        build_loss(load_loss({"name": "CrossEntropyLoss", "kwargs": {"wieght": [1.0]}}), "classification")


def load_loss(options):
    from accelerated_trainer.config import LossOptions

    return LossOptions.model_validate(options)


def test_a_loss_by_import_path(tmp_path):
    loss = {"name": "torch.nn.functional:cross_entropy", "kwargs": {"label_smoothing": 0.1}}
    trainer = AcceleratedTrainer(None, digits_config(tmp_path, training_options={"n_epochs": 1, "loss_function": loss}))
    trainer.train()
    validation = validation_tensors()
    with torch.no_grad():
        expected = nn.functional.cross_entropy(trainer.model.eval()(validation["pixels"]), validation["label"], label_smoothing=0.1)
    assert trainer.evaluate()["val_loss"] == pytest.approx(expected.item(), rel=1e-5)
    with pytest.raises(ConfigError, match="training_options.loss_function.name.*torch.nn.functional:nope"):
        build_loss(load_loss("torch.nn.functional:nope"), "classification")


def test_loss_fn_from_the_api_is_used_for_training_and_validation(tmp_path):
    calls = []

    def doubled_cross_entropy(outputs, labels):
        calls.append(outputs.shape[0])
        return 2 * nn.functional.cross_entropy(outputs, labels, reduction="none")

    trainer = AcceleratedTrainer(None, digits_config(tmp_path, training_options={"n_epochs": 1}), loss_fn=doubled_cross_entropy)
    trainer.train()
    assert sum(calls) == 1438 + 359, "every training row once, every validation row once"
    validation = validation_tensors()
    with torch.no_grad():
        expected = 2 * nn.functional.cross_entropy(trainer.model.eval()(validation["pixels"]), validation["label"])
    assert trainer.evaluate()["val_loss"] == pytest.approx(expected.item(), rel=1e-5)


class OwnLoss(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Linear(64, 10)

    def forward(self, features, labels=None):
        logits = self.net(features)
        return {"logits": logits, "loss": nn.functional.cross_entropy(logits, labels)} if labels is not None else {"logits": logits}


def test_a_configured_loss_ignored_for_the_models_own_is_warned_about_once(tmp_path):
    config = digits_config(tmp_path, training_options={"n_epochs": 1, "loss_function": "MultiMarginLoss"})
    with pytest.warns(UserWarning, match="MultiMarginLoss.*own loss") as caught:
        AcceleratedTrainer(OwnLoss(), config).train()
    assert sum("own loss" in str(w.message) for w in caught) == 1
    default = digits_config(tmp_path / "default", training_options={"n_epochs": 1})
    default["training_options"].pop("loss_function")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        AcceleratedTrainer(OwnLoss(), default).train()
    assert not [w for w in caught if "own loss" in str(w.message)], "nothing was configured, so nothing is ignored"


def binary_digits(split):
    table = datasets.Dataset.from_parquet(str(DIGITS / f"{split}.parquet"))
    return table.map(lambda row: {"label": int(row["label"] >= 5)})


def test_binary_classification_with_one_output_and_bce(tmp_path):
    config = digits_config(tmp_path, training_options={"n_epochs": 4, "loss_function": "BCEWithLogitsLoss"})
    config["dataset_options"]["data_files"] = {}
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 1))
    trainer = AcceleratedTrainer(model, config, train_dataset=binary_digits("train"), eval_dataset=binary_digits("validation"))
    result = trainer.train()
    validation = binary_digits("validation").with_format("torch")[:]
    with torch.no_grad():
        logits = trainer.model.eval()(validation["pixels"]).squeeze(1)
    accuracy = ((logits > 0).long() == validation["label"]).float().mean().item()
    metrics = trainer.evaluate()
    assert metrics["val_accuracy"] == pytest.approx(accuracy, abs=1e-6) and accuracy > 0.85
    expected = nn.functional.binary_cross_entropy_with_logits(logits, validation["label"].float())
    assert metrics["val_loss"] == pytest.approx(expected.item(), rel=1e-5)
    assert result.best_metric is not None


def test_binary_classification_with_the_built_in_mlp_gets_one_output(tmp_path):
    config = digits_config(tmp_path, training_options={"n_epochs": 1, "loss_function": "BCEWithLogitsLoss",
                                                       "metrics": {"auroc": "AUROC"}})
    config["dataset_options"]["data_files"] = {}
    trainer = AcceleratedTrainer(None, config, train_dataset=binary_digits("train"), eval_dataset=binary_digits("validation"))
    assert trainer.config.model_options.kwargs["output_dim"] == 1
    metrics = trainer.train().metrics
    assert 0.5 < metrics["val_auroc"] <= 1.0 and 0.5 < metrics["val_accuracy"] <= 1.0


# The training step's loss: the same batch mean whichever way it is computed.

def _batch_loss(loss_fn, task, model, pass_labels=False):
    from accelerated_trainer.loss import BatchLoss

    return BatchLoss(model, loss_fn, pass_labels=pass_labels, task=task, label_column="label")


class _Logits(nn.Module):
    def __init__(self, outputs):
        super().__init__()
        self.outputs = outputs

    def forward(self, features):
        return self.outputs


class _OwnLoss(nn.Module):
    def forward(self, features, labels):
        return {"loss": (features.sum(dim=1) - labels).pow(2).mean(), "logits": features}


def _case(name):
    generator = torch.Generator().manual_seed(3)
    logits = torch.randn(16, 5, generator=generator, requires_grad=True)
    classes = torch.randint(0, 5, (16,), generator=generator)
    if name == "CrossEntropyLoss":
        return nn.CrossEntropyLoss(reduction="none", label_smoothing=0.1), "classification", logits, classes, True
    if name == "weighted CrossEntropyLoss":  # 'mean' would divide by the weights' sum: not the per-sample mean
        return nn.CrossEntropyLoss(weight=torch.linspace(0.2, 3.0, 5), reduction="none"), "classification", logits, classes, False
    if name == "NLLLoss":
        return nn.NLLLoss(reduction="none"), "classification", logits.log_softmax(-1), classes, True
    if name == "per-position CrossEntropyLoss":  # language modeling: targets may be ignore_index padding
        positions = torch.randn(4, 6, 5, generator=generator, requires_grad=True)
        targets = torch.randint(0, 5, (4, 6), generator=generator)
        targets[0, 3:] = -100
        return nn.CrossEntropyLoss(reduction="none"), "language_modeling", positions, targets, False
    if name == "BCEWithLogitsLoss":  # one output against 0/1 labels
        return nn.BCEWithLogitsLoss(pos_weight=torch.tensor([2.5]), reduction="none"), "classification", logits[:, :1], classes % 2, True
    if name == "MSELoss":
        return nn.MSELoss(reduction="none"), "regression", logits, torch.randn(16, 5, generator=generator), True
    if name == "HuberLoss":
        return nn.HuberLoss(reduction="none", delta=0.5), "regression", logits[:, 0], torch.randn(16, generator=generator), True
    raise KeyError(name)


@pytest.mark.parametrize("name", ["CrossEntropyLoss", "weighted CrossEntropyLoss", "NLLLoss", "per-position CrossEntropyLoss",
                                  "BCEWithLogitsLoss", "MSELoss", "HuberLoss"])
def test_the_training_loss_is_the_mean_of_the_per_sample_losses(name):
    loss_fn, task, outputs, labels, fused = _case(name)
    batch_loss = _batch_loss(loss_fn, task, _Logits(outputs))
    batch = {"features": torch.zeros(len(labels), 1), "labels": labels}
    per_sample, _ = batch_loss.compute(batch)
    trained = batch_loss.training_loss(batch)
    assert (batch_loss.mean_fn is not None) == fused
    assert loss_fn.reduction == "none"  # the per-sample loss is left as it was: the mean one is a copy
    assert trained.ndim == 0 and per_sample.shape == (len(labels),)
    torch.testing.assert_close(trained, per_sample.mean(), rtol=1e-6, atol=1e-7)
    # The gradients agree too: the step trains on the same loss.
    trained_grad, = torch.autograd.grad(trained, outputs, retain_graph=True)
    reference_grad, = torch.autograd.grad(per_sample.mean(), outputs)
    torch.testing.assert_close(trained_grad, reference_grad, rtol=1e-5, atol=1e-7)


def test_a_subclassed_or_function_loss_is_averaged_as_it_is():
    from accelerated_trainer.loss import batch_mean_loss

    class Focal(nn.CrossEntropyLoss):  # a forward of its own: its 'mean' may mean anything
        def forward(self, input, target):
            return super().forward(input, target) ** 2

    assert batch_mean_loss(Focal(reduction="none"), "classification") is None
    assert batch_mean_loss(nn.functional.cross_entropy, "classification") is None
    loss_fn, task, outputs, labels, _ = _case("CrossEntropyLoss")
    focal = _batch_loss(Focal(reduction="none"), task, _Logits(outputs))
    batch = {"features": torch.zeros(len(labels), 1), "labels": labels}
    expected = (nn.functional.cross_entropy(outputs, labels, reduction="none") ** 2).mean()
    torch.testing.assert_close(focal.training_loss(batch), expected)


def test_the_models_own_loss_is_trained_on_as_returned():
    features, labels = torch.randn(8, 3), torch.randn(8)
    batch_loss = _batch_loss(None, "regression", _OwnLoss(), pass_labels=True)
    expected = (features.sum(dim=1) - labels).pow(2).mean()
    assert torch.equal(batch_loss.training_loss({"features": features, "labels": labels}), expected)
