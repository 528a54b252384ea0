"""End-to-end training through the Python API on the shipped digits data."""

import json
import os
import signal

import datasets
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from accelerated_trainer import AcceleratedTrainer, ConfigError, DataError, Trainer

from conftest import DIGITS, digits_config


def weights(run_dir, name="last"):
    return load_file(str(run_dir / name / "model.safetensors"))


def metric_rows(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_trainer_alias_is_the_same_class():
    assert Trainer is AcceleratedTrainer


def test_trains_digits_and_reports_the_result(tmp_path):
    config = digits_config(tmp_path, training_options={"n_epochs": 12})
    result = AcceleratedTrainer(None, config).train()
    assert result.best_metric >= 0.95, result
    assert result.monitor == "val_accuracy"
    assert result.epochs == 12 and result.steps == 12 * 23  # 1438 rows / 64 per batch
    assert result.stop_reason == "completed 12 epochs"
    index = json.loads((result.run_dir / "checkpoints.json").read_text())
    assert [e["value"] for e in index["top_k"]] == sorted((e["value"] for e in index["top_k"]), reverse=True)
    assert len(index["top_k"]) == 3 and index["best"]["value"] == result.best_metric
    for entry in index["top_k"]:
        assert (result.run_dir / entry["path"] / "model.safetensors").is_file()
    assert result.best_checkpoint == result.run_dir / "best"
    rows = metric_rows(result.run_dir)
    assert {"train_loss", "lr", "samples_per_s"} <= set(rows[0])
    assert sum("val_accuracy" in row for row in rows) == 12
    assert json.loads((result.run_dir / "config.json").read_text())["training_options"]["n_epochs"] == 12


def test_accepts_a_model_and_in_memory_datasets(tmp_path):
    train = datasets.Dataset.from_parquet(str(DIGITS / "train.parquet"))
    validation = datasets.Dataset.from_parquet(str(DIGITS / "validation.parquet"))
    config = digits_config(tmp_path, training_options={"n_epochs": 6})
    config["dataset_options"]["data_files"] = {}
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    result = AcceleratedTrainer(model, config, train_dataset=train, eval_dataset=validation).train()
    assert result.metrics["val_accuracy"] > 0.8
    assert set(weights(result.run_dir)) == {"0.weight", "0.bias", "2.weight", "2.bias"}


class OwnLoss(nn.Module):
    """Returns its own loss (twice the cross-entropy) in a dict, as HF models do in ModelOutput."""

    def __init__(self):
        super().__init__()
        self.net = nn.Linear(64, 10)
        self.calls_with_labels = 0

    def forward(self, features, labels=None):
        logits = self.net(features)
        out = {"logits": logits}
        if labels is not None:
            self.calls_with_labels += 1
            out["loss"] = 2 * nn.functional.cross_entropy(logits, labels)
        return out


def test_uses_the_loss_the_model_returns(tmp_path):
    model = OwnLoss()
    trainer = AcceleratedTrainer(model, digits_config(tmp_path, training_options={"n_epochs": 1}))
    with pytest.warns(UserWarning, match="CrossEntropyLoss.*not used"):  # digits.json names a loss the model overrides
        trainer.train()
    assert model.calls_with_labels > 0
    validation = datasets.Dataset.from_parquet(str(DIGITS / "validation.parquet")).with_format("torch")[:]
    with torch.no_grad():
        expected = 2 * nn.functional.cross_entropy(model.net(validation["pixels"]), validation["label"]).item()
    assert trainer.evaluate()["val_loss"] == pytest.approx(expected, rel=1e-5)


class Crash(Exception):
    pass


class CrashingTrainer(AcceleratedTrainer):
    """Dies right after optimizer step `crash_after`, before anything of that step is saved."""

    crash_after = 0

    def _after_optimizer_step(self):
        if self.state.step + 1 == self.crash_after:
            raise Crash
        return super()._after_optimizer_step()


def assert_same_weights(run_a, run_b):
    a, b = weights(run_a), weights(run_b)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


@pytest.mark.parametrize("save_every, crash_after, resumed_at", [
    (None, 50, (2, 0, 46)),  # after the end-of-epoch checkpoint of epoch 2
    (10, 35, (1, 7 * 64, 30)),  # mid-epoch: the step-30 checkpoint is 7 batches into epoch 1
])
def test_resume_after_a_crash_matches_an_uninterrupted_run(tmp_path, save_every, crash_after, resumed_at):
    options = {"n_epochs": 4, "save_every_n_steps": save_every}
    straight = AcceleratedTrainer(None, digits_config(tmp_path / "a", training_options=options)).train()
    config = digits_config(tmp_path / "b", training_options=options)
    CrashingTrainer.crash_after = crash_after
    with pytest.raises(Crash):
        CrashingTrainer(None, config).train()
    run_dir = tmp_path / "b" / "digits-mlp"
    state = json.loads((run_dir / "last" / "state.json").read_text())
    assert (state["epoch"], state["samples_in_epoch"], state["step"]) == resumed_at

    config["experiment_options"]["resume"] = True
    resumed = AcceleratedTrainer(None, config).train()
    assert resumed.steps == straight.steps == 4 * 23
    # Bit for bit: optimizer moments, schedule, dropout RNG and the data position were all restored.
    assert_same_weights(straight.run_dir, resumed.run_dir)
    index = json.loads((run_dir / "checkpoints.json").read_text())
    assert index["last"]["step"] == 92
    steps = [row["step"] for row in metric_rows(run_dir) if "train_loss" in row]
    assert steps == sorted(set(steps)), "a resumed run logs no step twice"


def test_resume_from_an_explicit_checkpoint_path(tmp_path):
    AcceleratedTrainer(None, digits_config(tmp_path, training_options={"n_epochs": 2})).train()
    checkpoint = tmp_path / "digits-mlp" / "previous"  # the state after epoch 1
    config = digits_config(tmp_path, training_options={"n_epochs": 2}, experiment_options={"resume": str(checkpoint)})
    result = AcceleratedTrainer(None, config).train()
    assert result.steps == 46
    with pytest.raises(ConfigError, match="experiment_options.resume"):
        bad = digits_config(tmp_path, experiment_options={"resume": str(tmp_path / "missing")})
        AcceleratedTrainer(None, bad).train()


def test_fresh_run_never_deletes_existing_checkpoints(tmp_path):
    config = digits_config(tmp_path, training_options={"n_epochs": 1})
    AcceleratedTrainer(None, config).train()
    before = weights(tmp_path / "digits-mlp")
    with pytest.raises(ConfigError, match="already holds checkpoints"):
        AcceleratedTrainer(None, config).train()
    after = weights(tmp_path / "digits-mlp")
    assert all(torch.equal(before[k], after[k]) for k in before)
    config["experiment_options"]["overwrite"] = True
    assert AcceleratedTrainer(None, config).train().steps == 23
    assert sum("val_loss" in row for row in metric_rows(tmp_path / "digits-mlp")) == 1, "the old curve is gone"


def test_bf16_mixed_precision_on_cpu(tmp_path):
    config = digits_config(tmp_path, training_options={"n_epochs": 3, "mixed_precision": "bf16"})
    trainer = AcceleratedTrainer(None, config)
    assert trainer.accelerator.mixed_precision == "bf16"
    result = trainer.train()
    assert result.metrics["val_accuracy"] > 0.8
    assert all(t.dtype == torch.float32 for t in weights(result.run_dir).values())  # master weights stay fp32


def test_fp16_without_a_gpu_says_what_to_use(tmp_path):
    with pytest.raises(ConfigError, match="bf16"):
        AcceleratedTrainer(None, digits_config(tmp_path, training_options={"mixed_precision": "fp16"}))


def test_early_stopping_stops_after_patience(tmp_path):
    # min_delta larger than any possible change: the first evaluation stays the best.
    config = digits_config(tmp_path, training_options={
        "n_epochs": 20, "monitor": "val_loss", "early_stopping": {"patience": 3, "min_delta": 100.0}})
    result = AcceleratedTrainer(None, config).train()
    assert result.epochs == 4
    assert "early stopping" in result.stop_reason
    state = json.loads((result.run_dir / "last" / "state.json").read_text())
    assert state["early_stopping"]["evaluations_without_improvement"] == 3


def test_gradient_accumulation_and_max_steps(tmp_path):
    config = digits_config(tmp_path, training_options={"gradient_accumulation_steps": 2, "max_steps": 20,
                                                       "max_grad_norm": 1.0, "eval_every_n_steps": 5})
    trainer = AcceleratedTrainer(None, config)
    assert trainer.steps_per_epoch == 12  # 23 batches, 2 per optimizer step, the last one alone
    result = trainer.train()
    assert result.steps == 20 and "max_steps" in result.stop_reason
    rows = metric_rows(result.run_dir)
    assert [r["step"] for r in rows if "val_loss" in r] == [5, 10, 15, 20]
    assert all("grad_norm" in r for r in rows if "train_loss" in r)


def test_single_process_fast_path_trains_exactly_like_the_prepared_dataloader(tmp_path):
    """One process, one micro-batch per step: batches come from the InProcessLoader, the step skips
    accelerate's accumulate/backward wrappers; the weights are those of the DataLoader path."""
    from accelerated_trainer.data import InProcessLoader

    def train(title: str, **dataset_options):
        config = digits_config(tmp_path, dataset_options=dataset_options, training_options={"n_epochs": 1},
                               experiment_options={"title": title})
        trainer = AcceleratedTrainer(None, config)
        result = trainer.train()
        return trainer, load_file(result.run_dir / "last" / "model.safetensors")

    fast, fast_weights = train("fast")
    prepared, prepared_weights = train("prepared", num_workers=1)  # workers: torch's DataLoader, prepared by accelerate
    assert isinstance(fast.train_loader, InProcessLoader)
    assert not isinstance(prepared.train_loader, InProcessLoader)
    assert fast.state.step == prepared.state.step == 23
    assert fast_weights.keys() == prepared_weights.keys()
    assert all(torch.equal(fast_weights[k], prepared_weights[k]) for k in fast_weights)


def test_async_save_lets_training_go_on_while_last_is_written(tmp_path, monkeypatch):
    """The epoch-1 `last` is held at its seal until training is well into epoch 2: possible only
    when the training thread does not wait for the disk. The result is the synchronous run's."""
    import threading

    from accelerated_trainer.checkpoint import files

    later_step, held = threading.Event(), []
    real_seal = files.seal

    def seal(directory, checksums=None):
        if directory.name == ".last.tmp" and not held:
            held.append(later_step.wait(timeout=60))
        real_seal(directory, checksums)

    monkeypatch.setattr(files, "seal", seal)
    trainer = AcceleratedTrainer(None, digits_config(tmp_path, experiment_options={"title": "async"}))
    trainer.model.register_forward_pre_hook(lambda module, args: later_step.set() if trainer.state.step >= 30 else None)
    result = trainer.train()
    assert held == [True], "the first save waited for a step of the next epoch"
    assert files.verify(result.run_dir / "last") is None and files.verify(result.run_dir / "previous") is None

    monkeypatch.setattr(files, "seal", real_seal)
    sync = AcceleratedTrainer(None, digits_config(tmp_path, experiment_options={"title": "sync", "async_save": False})).train()
    for name in ("last", "previous", "best"):
        written, expected = (load_file(run.run_dir / name / "model.safetensors") for run in (result, sync))
        assert all(torch.equal(written[k], expected[k]) for k in expected), name
    for name in ("last", "previous"):
        states = [json.loads((run.run_dir / name / "state.json").read_text()) for run in (result, sync)]
        assert states[0]["step"] == states[1]["step"] and states[0]["scheduler"] == states[1]["scheduler"]


def test_gradient_accumulation_steps_on_an_epochs_last_odd_batch(tmp_path):
    # 23 batches at 2 per step: accelerate's prepared loader marks the last one, which steps alone.
    config = digits_config(tmp_path, training_options={"gradient_accumulation_steps": 2, "n_epochs": 2})
    trainer = AcceleratedTrainer(None, config)
    result = trainer.train()
    assert result.steps == 24
    assert all(p.grad is None for p in trainer.model.parameters()), "no gradient left over into the next epoch"


def test_regression_on_stacked_scalar_columns(tmp_path):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2000, 4, generator=generator)
    y = x @ torch.tensor([1.5, -2.0, 0.5, 3.0]) + 0.1
    columns = {f"x{i}": x[:, i].tolist() for i in range(4)} | {"y": y.tolist()}
    config = digits_config(tmp_path, training_options={"task": "regression", "monitor": "val_mse", "n_epochs": 15,
                                                       "loss_function": "MSELoss"},
                           dataset_options={"feature_columns": ["x0", "x1", "x2", "x3"], "label_column": "y",
                                            "data_files": {}, "validation_split": 0.2},
                           model_options={"name": "mlp", "kwargs": {"hidden_dims": [32]}})
    result = AcceleratedTrainer(None, config, train_dataset=datasets.Dataset.from_dict(columns)).train()
    assert result.monitor == "val_mse" and result.best_metric < 0.1
    assert result.metrics["val_mae"] < 0.3


def test_missing_data_file_names_the_key(tmp_path):
    config = digits_config(tmp_path)
    config["dataset_options"]["data_files"]["train"] = str(tmp_path / "nope.parquet")
    with pytest.raises(DataError, match="dataset_options.data_files.train.*nope.parquet"):
        AcceleratedTrainer(None, config)


def test_wrong_output_shape_names_the_shapes(tmp_path):
    model = nn.Sequential(nn.Linear(64, 10), nn.Flatten(0))  # (640,) instead of (64, 10)
    with pytest.raises(RuntimeError, match=r"output of shape \(640,\).*labels of shape \(64,\).*features \(64, 64\)"):
        AcceleratedTrainer(model, digits_config(tmp_path)).train()


class CountsTokens(nn.Module):
    """Embeds a (batch, 16) id sequence given as the input_ids keyword."""

    def __init__(self):
        super().__init__()
        self.embed, self.head = nn.Embedding(10, 8), nn.Linear(8, 3)

    def forward(self, input_ids):
        return self.head(self.embed(input_ids).mean(dim=1))


def test_token_throughput_is_logged_for_token_inputs(tmp_path):
    ids = torch.randint(0, 10, (256, 16), generator=torch.Generator().manual_seed(0))
    train = datasets.Dataset.from_dict({"input_ids": ids.tolist(), "label": (ids[:, 0] % 3).tolist()})
    config = digits_config(tmp_path, training_options={"n_epochs": 1, "log_every_n_steps": 2},
                           dataset_options={"feature_columns": [], "data_files": {}, "validation_split": 0.25})
    config["dataset_options"]["input_columns"] = ["input_ids"]
    config["dataset_options"]["dtypes"] = {"input_ids": "int64"}
    AcceleratedTrainer(CountsTokens(), config, train_dataset=train).train()
    rows = [row for row in metric_rows(tmp_path / "digits-mlp") if "train_loss" in row]
    assert rows and all(row["tokens_per_s"] == pytest.approx(row["samples_per_s"] * 16) for row in rows)


# ---------------------------------------------------------------- the end of a run


def falling_metric():
    """A metric whose first evaluation is its best (mode max): best/ is then the first evaluation's weights."""
    values = iter(range(100, 0, -1))
    metric = lambda outputs, labels: float(next(values))  # noqa: E731
    metric.higher_is_better = True
    return {"first": metric}


def module_weights(trainer):
    return {name: tensor.detach().clone() for name, tensor in trainer.accelerator.unwrap_model(trainer.model).state_dict().items()}


def test_after_train_the_model_holds_the_best_weights(tmp_path):
    config = digits_config(tmp_path, training_options={"n_epochs": 3, "monitor": "val_first"})
    config["training_options"].pop("mode", None)
    trainer = AcceleratedTrainer(None, config, metrics=falling_metric())
    result = trainer.train()
    index = json.loads((result.run_dir / "checkpoints.json").read_text())
    assert index["best"]["step"] == 23 and index["last"]["step"] == 69
    assert result.weights == "best"
    held, best, last = module_weights(trainer), weights(result.run_dir, "best"), weights(result.run_dir, "last")
    assert all(torch.equal(held[name], best[name]) for name in best)
    assert not all(torch.equal(held[name], last[name]) for name in last)


def test_restore_best_false_keeps_the_last_weights(tmp_path):
    config = digits_config(tmp_path, training_options={"n_epochs": 2, "monitor": "val_first", "restore_best": False})
    config["training_options"].pop("mode", None)
    trainer = AcceleratedTrainer(None, config, metrics=falling_metric())
    result = trainer.train()
    assert result.weights == "last"
    held, last = module_weights(trainer), weights(result.run_dir, "last")
    assert all(torch.equal(held[name], last[name]) for name in last)


def test_a_max_steps_run_evaluates_its_final_weights(tmp_path):
    # 23 steps per epoch: max_steps=30 ends 7 steps into the second epoch, 10 ends the first one early.
    result = AcceleratedTrainer(None, digits_config(tmp_path, training_options={"n_epochs": 5, "max_steps": 30})).train()
    rows = metric_rows(result.run_dir)
    assert [row["step"] for row in rows if "val_accuracy" in row] == [23, 30]
    index = json.loads((result.run_dir / "checkpoints.json").read_text())
    assert 30 in [entry["step"] for entry in index["top_k"]] and index["last"]["step"] == 30
    config = digits_config(tmp_path, training_options={"max_steps": 10}, experiment_options={"title": "short"})
    short = AcceleratedTrainer(None, config).train()
    assert short.best_checkpoint == short.run_dir / "best" and short.best_metric is not None
    assert json.loads((short.run_dir / "best" / "meta.json").read_text())["step"] == 10


def test_step_cadence_evaluates_the_final_step_too(tmp_path):
    config = digits_config(tmp_path, training_options={"n_epochs": 1, "eval_every_n_steps": 10})
    result = AcceleratedTrainer(None, config).train()
    assert [row["step"] for row in metric_rows(result.run_dir) if "val_loss" in row] == [10, 20, 23]


def test_a_stop_on_an_epochs_last_batch_counts_that_epoch(tmp_path):
    # Evaluations at steps 23 and 46, the last batches of epochs 1 and 2: the second one stops.
    config = digits_config(tmp_path, training_options={
        "n_epochs": 10, "eval_every_n_steps": 23, "monitor": "val_loss", "early_stopping": {"patience": 1, "min_delta": 100.0}})
    result = AcceleratedTrainer(None, config).train()
    assert result.steps == 46 and result.epochs == 2, result
    index = json.loads((result.run_dir / "checkpoints.json").read_text())
    assert index["last"]["epoch"] == 2 and sorted(entry["epoch"] for entry in index["top_k"]) == [1, 2]
    ended = AcceleratedTrainer(None, digits_config(tmp_path, training_options={"max_steps": 23},
                                                   experiment_options={"title": "one-epoch"})).train()
    assert ended.epochs == 1 and ended.steps == 23


def test_a_resumed_early_stopped_run_stops_at_once(tmp_path):
    options = {"n_epochs": 20, "monitor": "val_loss", "early_stopping": {"patience": 2, "min_delta": 100.0}}
    first = AcceleratedTrainer(None, digits_config(tmp_path, training_options=options)).train()
    assert first.epochs == 3 and "in 2 evaluations" in first.stop_reason
    resumed = AcceleratedTrainer(None, digits_config(tmp_path, training_options=options,
                                                     experiment_options={"resume": True})).train()
    assert resumed.steps == first.steps and resumed.epochs == 3
    assert "early stopping" in resumed.stop_reason and "in 2 evaluations" in resumed.stop_reason
    assert sum("val_loss" in row for row in metric_rows(first.run_dir)) == 3, "no evaluation after the resume"


def test_max_time_s_evaluates_the_final_weights_and_a_signal_does_not(tmp_path):
    config = digits_config(tmp_path, training_options={"n_epochs": 50, "max_time_s": 0.5}, experiment_options={"title": "timed"})
    timed = AcceleratedTrainer(None, config).train()
    assert timed.preempted and timed.weights == "last", "a run to be resumed keeps its final weights"
    assert [row["step"] for row in metric_rows(timed.run_dir) if "val_loss" in row][-1] == timed.steps

    trainer = AcceleratedTrainer(None, digits_config(tmp_path, training_options={"n_epochs": 50},
                                                     experiment_options={"title": "signalled"}))
    # Delivered during step 31's forward: the run stops after that step, in the signal's grace time.
    trainer.model.register_forward_pre_hook(
        lambda module, args: os.kill(os.getpid(), signal.SIGUSR1) if trainer.state.step == 30 and module.training else None)
    signalled = trainer.train()
    assert signalled.preempted and "SIGUSR1" in signalled.stop_reason and signalled.steps == 31
    assert [row["step"] for row in metric_rows(signalled.run_dir) if "val_loss" in row] == [23]


def test_the_original_spec_config_trains_verbatim(tmp_path, monkeypatch):
    """The spec's own config, unchanged, with the user's model and a dict of features and labels."""
    from test_config import SPEC_CONFIG

    monkeypatch.chdir(tmp_path)  # its ckpt_dir is ./checkpoints
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(1000, 8, generator=generator)
    labels = features[:, :3].argmax(dim=1)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 3))
    result = AcceleratedTrainer(model, SPEC_CONFIG, train_dataset={"features": features, "label": labels}).train()

    assert result.run_dir.resolve() == tmp_path / "checkpoints" / "MyExperiment"
    assert (result.run_dir / "best" / "model.safetensors").is_file()
    assert result.metrics["val_accuracy"] > 0.8, result.metrics
    saved = json.loads((result.run_dir / "config.json").read_text())
    assert saved["dataset_options"]["feature_columns"] == ["features"]
    assert saved["training_options"]["early_stopping"]["patience"] == 5


@pytest.mark.parametrize("max_grad_norm", [None, 0.05])
def test_the_logged_grad_norm_is_the_norm_of_the_gradients_stepped_on(tmp_path, max_grad_norm):
    """Measured without clipping (plain gradients), or returned by the clipping: either way the
    norm of the gradients before clipping, and clipping changes them only when asked to."""
    trainer = AcceleratedTrainer(None, digits_config(tmp_path, training_options={"n_epochs": 1, "max_grad_norm": max_grad_norm}))
    step = trainer.optimizer_step
    assert step._plain_grads
    before, stepped = [], []
    step.wants_grad_norm = lambda: True
    step.before_step = lambda: stepped.append([p.grad.clone() for p in trainer.model.parameters()])
    batch = next(iter(trainer.train_loader))
    rng = torch.get_rng_state()  # the same dropout masks in both backwards
    step.loss_of(batch).backward()
    before.append([p.grad.clone() for p in trainer.model.parameters()])
    trainer.optimizer.zero_grad(set_to_none=True)
    torch.set_rng_state(rng)
    step.micro_batch(batch)
    expected = torch.linalg.vector_norm(torch.stack([g.norm() for g in before[0]]))
    assert step.take_grad_norm() == pytest.approx(expected.item(), rel=1e-5)
    scale = 1.0 if max_grad_norm is None else min(1.0, max_grad_norm / (expected.item() + 1e-6))
    assert max_grad_norm is None or scale < 1.0
    for grad, reference in zip(stepped[0], before[0]):
        torch.testing.assert_close(grad, reference * scale)
