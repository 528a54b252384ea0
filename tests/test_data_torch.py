"""Plain torch data through the Python API (data/torch_data.py): map-style Datasets with dict or
tuple items, IterableDatasets, a user's DataLoader; resuming each mid-epoch; datasets transforms
and the training batch transform."""

import json

import datasets
import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from torch.utils.data import DataLoader, Dataset, IterableDataset, TensorDataset

from accelerated_trainer import AcceleratedTrainer, DataError

from conftest import digits_config

N, WIDTH, CLASSES = 256, 8, 3


def separable(n=N, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, WIDTH, generator=generator)
    return x, x[:, :CLASSES].argmax(dim=1)


def net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(WIDTH, 32), nn.ReLU(), nn.Linear(32, CLASSES))


def config(tmp_path, title="torch", **training):
    return digits_config(tmp_path, dataset_options={"data_files": {}, "feature_columns": [], "batch_size": 16},
                         training_options={"n_epochs": 3, "monitor": "val_accuracy", "optimizer": {"name": "AdamW", "lr": 0.01},
                                           "scheduler": "constant", "save_top_k": 1, **training},
                         experiment_options={"title": title})


def validation():
    return TensorDataset(*separable(128, seed=1))


class DictRows(Dataset):
    """Dict items, with a counted __getitems__: a batch must be one call."""

    def __init__(self, x, y):
        self.x, self.y, self.batch_calls, self.row_calls = x, y, 0, 0

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        self.row_calls += 1
        return {"x": self.x[i], "label": self.y[i]}

    def __getitems__(self, indices):
        self.batch_calls += 1
        return [{"x": self.x[i], "label": self.y[i]} for i in indices]


class Stream(IterableDataset):
    """The same rows in the same order every pass, no __len__."""

    def __init__(self, x, y):
        self.x, self.y = x, y

    def __iter__(self):
        return iter(zip(self.x, self.y))


def test_tensor_dataset_trains_and_holds_out_validation(tmp_path):
    trainer = AcceleratedTrainer(net(), config(tmp_path), train_dataset=TensorDataset(*separable()))
    result = trainer.train()
    # validation_split 0.1 of 256 rows: 26 held out, 230 trained in batches of 16.
    assert result.steps == 3 * 15
    assert len(trainer.eval_loader.dataset) == 26
    assert result.metrics["val_accuracy"] > 0.8, result.metrics


def test_map_style_dict_items_are_fetched_a_batch_per_call(tmp_path):
    rows = DictRows(*separable())
    trainer = AcceleratedTrainer(net(), config(tmp_path), train_dataset=rows, eval_dataset=validation())
    result = trainer.train()
    assert trainer.config.dataset_options.feature_columns == ["x"], "the one key beside the label"
    assert rows.row_calls == 0, "never row by row"
    # 16 batches per epoch (3 epochs), plus a batch of one to learn the layout: each batch was one call.
    assert rows.batch_calls == 3 * 16 + 1
    assert result.metrics["val_accuracy"] > 0.8, result.metrics


class Masked(nn.Module):
    """Takes a second input by keyword: tuple items (x, mask, label) name it from the forward."""

    def __init__(self):
        super().__init__()
        self.net = net()
        self.seen_masks = 0

    def forward(self, x, mask):
        self.seen_masks += 1
        return self.net(x * mask)


def test_tuple_items_with_several_inputs_name_them_by_the_forward(tmp_path):
    x, y = separable()
    model = Masked()
    result = AcceleratedTrainer(model, config(tmp_path), train_dataset=TensorDataset(x, torch.ones_like(x), y),
                                eval_dataset=TensorDataset(x[:64], torch.ones(64, WIDTH), y[:64])).train()
    assert model.seen_masks > 0 and result.metrics["val_accuracy"] > 0.8


def test_tuple_items_that_cannot_be_named_are_a_clear_error(tmp_path):
    x, y = separable()
    with pytest.raises(DataError, match=r"tuples of 4.*dataset_options\.input_columns"):
        AcceleratedTrainer(net(), config(tmp_path), train_dataset=TensorDataset(x, x, x, y))


def test_iterable_dataset_trains_epoch_by_epoch(tmp_path):
    trainer = AcceleratedTrainer(net(), config(tmp_path), train_dataset=Stream(*separable()), eval_dataset=validation())
    result = trainer.train()
    assert trainer.steps_per_epoch is None
    assert result.steps == 3 * 16 and result.epochs == 3
    assert result.metrics["val_accuracy"] > 0.8


def test_a_users_dataloader_keeps_its_batch_size_and_collate(tmp_path):
    calls = []

    def collate(items):
        calls.append(len(items))
        return {"inputs": torch.stack([x for x, _ in items]), "labels": torch.stack([y for _, y in items])}

    loader = DataLoader(TensorDataset(*separable()), batch_size=64, shuffle=True, collate_fn=collate)
    trainer = AcceleratedTrainer(net(), config(tmp_path, n_epochs=8), train_dataset=loader, eval_dataset=validation())
    result = trainer.train()
    assert result.steps == 8 * 4, "256 rows in the loader's batches of 64, not the config's 16"
    assert trainer.config.dataset_options.batch_size == 64
    assert calls and set(calls) == {64}
    assert result.metrics["val_accuracy"] > 0.8, result.metrics


class Crash(Exception):
    pass


class CrashingTrainer(AcceleratedTrainer):
    crash_after = 0

    def _after_optimizer_step(self):
        if self.state.step + 1 == self.crash_after:
            raise Crash
        return super()._after_optimizer_step()


SOURCES = {
    "map-style": lambda: DictRows(*separable()),
    "iterable": lambda: Stream(*separable()),
    "DataLoader": lambda: DataLoader(TensorDataset(*separable()), batch_size=16, shuffle=True),
}


@pytest.mark.parametrize("source", sorted(SOURCES))
def test_resume_mid_epoch_matches_the_uninterrupted_run(tmp_path, source):
    # save_every 5 with 16 batches an epoch: the crash at step 24 resumes from step 20, 4 batches into epoch 1.
    options = {"save_every_n_steps": 5}
    straight = AcceleratedTrainer(net(), config(tmp_path / "a", **options), train_dataset=SOURCES[source](),
                                  eval_dataset=validation()).train()
    resumed_config = config(tmp_path / "b", **options)
    CrashingTrainer.crash_after = 24
    with pytest.raises(Crash):
        CrashingTrainer(net(), resumed_config, train_dataset=SOURCES[source](), eval_dataset=validation()).train()
    state = json.loads((tmp_path / "b" / "torch" / "last" / "state.json").read_text())
    assert (state["epoch"], state["step"], state["samples_in_epoch"]) == (1, 20, 4 * 16)

    resumed_config["experiment_options"]["resume"] = True
    resumed = AcceleratedTrainer(net(), resumed_config, train_dataset=SOURCES[source](), eval_dataset=validation()).train()
    assert resumed.steps == straight.steps == 48
    a, b = (load_file(str(run.run_dir / "last" / "model.safetensors")) for run in (straight, resumed))
    assert all(torch.equal(a[name], b[name]) for name in a), "bit for bit"


# ---------------------------------------------------------------- transforms on the fly


def test_a_datasets_transform_is_run_never_skipped(tmp_path):
    x, y = separable()
    calls = []

    def reveal(batch):
        # The stored features are zeros: only the transform gives the model something to learn from.
        calls.append(len(batch["label"]))
        return {"x": [row for row in x[batch["row"]].tolist()], "label": batch["label"]}

    train = datasets.Dataset.from_dict({"x": torch.zeros(N, WIDTH).tolist(), "row": list(range(N)), "label": y.tolist()})
    result = AcceleratedTrainer(net(), config(tmp_path), train_dataset=train.with_transform(reveal),
                                eval_dataset=validation()).train()
    assert sum(calls) >= 3 * len(train) * 0.9, "the transform ran on the rows of every epoch"
    assert result.metrics["val_accuracy"] > 0.8, result.metrics


def flip_features(batch):
    """A train_batch_transform for the tests: negate the features, count the calls."""
    flip_features.calls += 1
    return {**batch, "features": -batch["features"]}


flip_features.calls = 0


def test_train_batch_transform_runs_on_training_batches_only(tmp_path):
    flip_features.calls = 0
    cfg = config(tmp_path)
    cfg["dataset_options"]["train_batch_transform"] = "test_data_torch:flip_features"
    trainer = AcceleratedTrainer(net(), cfg, train_dataset=TensorDataset(*separable()), eval_dataset=validation())
    result = trainer.train()
    assert flip_features.calls == result.steps == 3 * 16
    # Trained on negated features, validated on the plain ones: the model learned the mirror image.
    assert result.metrics["val_accuracy"] < 0.3, result.metrics
    assert flip_features.calls == 3 * 16, "validation never ran it"


@pytest.mark.parametrize("kind, port", [("map-style", 29651), ("DataLoader", 29653)])
def test_two_processes_share_each_epoch_of_torch_data(tmp_path, kind, port):
    import os
    import subprocess
    import sys
    from pathlib import Path

    from conftest import REPO

    command = [str(Path(sys.executable).parent / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port),
               "tests/helpers/torch_data_run.py", str(tmp_path), kind]
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1"}
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-4000:]
    ranks = sorted((json.loads(path.read_text()) for path in (tmp_path / "report").glob("rank*.json")), key=lambda r: r["rank"])
    assert [r["rank"] for r in ranks] == [0, 1]
    # 250 rows in batches of 25 per process: 5 steps an epoch, each process a different half of the rows.
    assert all(r["steps"] == 3 * 5 for r in ranks)
    for epoch in range(3):
        halves = [set(r["seen"][epoch * 125:(epoch + 1) * 125]) for r in ranks]
        assert not halves[0] & halves[1] and halves[0] | halves[1] == set(range(250)), epoch
    # Both processes report the same validation metrics, over exactly the 101 rows (no padded repeats).
    assert ranks[0]["metrics"] == ranks[1]["metrics"]
    assert abs(ranks[0]["metrics"]["val_accuracy"] * 101 - round(ranks[0]["metrics"]["val_accuracy"] * 101)) < 1e-3
