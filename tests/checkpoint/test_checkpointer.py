"""checkpoint/checkpointer.py: the top-k decision, and the last/previous/best/top layout written through a real Accelerator."""

import dataclasses
import math
import time
import random

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from accelerated_trainer.checkpoint import INDEX, WEIGHTS, Checkpointer, Entry, ModelState, files, select_top_k, tensors
from accelerated_trainer.config import CheckpointOptions
from accelerated_trainer.checkpoint.checkpointer import EPOCH_SAVE_SHARE
from checkpoint_helpers import TrainingPosition, accelerator, trained  # noqa: F401  (fixture)

NAN = float("nan")

# ---------------------------------------------------------------- the top-k decision (pure)

# (values evaluated in order, k, mode) -> positions in `values` of the kept entries, best first.
TOP_K_CASES = {
    "min keeps the k smallest": ([0.9, 0.5, 0.7, 0.4, 0.8, 0.6], 3, "min", [3, 1, 5]),
    "max keeps the k largest": ([0.9, 0.5, 0.7, 0.4, 0.8, 0.6], 3, "max", [0, 4, 2]),
    "fewer values than k keeps all": ([0.3, 0.1], 5, "min", [1, 0]),
    "k=1 keeps the best only": ([0.3, 0.1, 0.2], 1, "min", [1]),
    "nan ranks worst in min": ([NAN, 0.5, 0.7], 2, "min", [1, 2]),
    "nan ranks worst in max": ([NAN, 0.5, 0.7], 2, "max", [2, 1]),
    "nan enters only while there is room": ([0.5, NAN, 0.7], 3, "min", [0, 2, 1]),
    "nan never evicts nan": ([NAN, NAN], 1, "min", [0]),
    "tie keeps the older entry": ([0.5, 0.5, 0.5], 2, "min", [0, 1]),
    "tie with the worst kept does not enter": ([0.5, 0.2, 0.2], 2, "max", [0, 1]),
    "strictly better evicts the newest of tied worst": ([0.5, 0.5, 0.4], 2, "min", [2, 0]),
    "infinities rank as values": ([math.inf, 1.0, -math.inf], 2, "min", [2, 1]),
    "k=-1 keeps all, best first": ([0.9, NAN, 0.5, 0.7, 0.5], -1, "min", [2, 4, 3, 0, 1]),
    "k=0 keeps none": ([0.9, 0.5, 0.1], 0, "min", []),
}


@pytest.mark.parametrize(("values", "k", "mode", "expected"), TOP_K_CASES.values(), ids=TOP_K_CASES.keys())
def test_select_top_k(values, k, mode, expected):
    kept: list[Entry] = []
    entries = [Entry(f"top/{i}", epoch=i, step=10 * i, value=value) for i, value in enumerate(values)]
    for candidate in entries:
        new_kept, evicted = select_top_k(kept, candidate, k, mode)
        # Nothing is lost, duplicated or invented: every entry kept before is now kept or evicted.
        out = [id(e) for e in [*new_kept, *evicted]]
        assert len(out) == len(set(out))
        assert {id(e) for e in kept} <= set(out) <= {id(e) for e in [*kept, candidate]}
        kept = new_kept
    assert [entries.index(e) for e in kept] == expected


def test_select_top_k_does_not_mutate_the_kept_list():
    kept = [Entry("top/a", 0, 0, 0.1), Entry("top/b", 0, 1, 0.2)]
    before = list(kept)
    select_top_k(kept, Entry("top/c", 0, 2, 0.05), 2, "min")
    assert kept == before


def test_select_top_k_zero_evicts_what_was_kept():
    kept = [Entry("top/a", 0, 0, 0.1)]
    new_kept, evicted = select_top_k(kept, Entry("top/b", 0, 1, 0.05), 0, "min")
    assert new_kept == [] and evicted == kept


# ---------------------------------------------------------------- Checkpointer with a real Accelerator





def weights_of(model):
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


def assert_weights_equal(actual: dict, expected: dict):
    assert actual.keys() == expected.keys()
    for name in expected:
        assert torch.equal(actual[name], expected[name]), name


def read_index(run_dir):
    return files.read_json(run_dir / INDEX)


def checkpointer_for(run_dir, accelerator, model, optimizer=None, scheduler=None, *, monitor="val_loss", mode="min",
                     save_top_k=1):
    """A Checkpointer over the registry the trainer builds: weights, optimizer, scheduler, training state."""
    optimizer = optimizer or torch.optim.AdamW(model.parameters())
    scheduler = scheduler or LambdaLR(optimizer, lambda step: 1.0)
    options = CheckpointOptions(monitor=monitor, mode=mode, save_top_k=save_top_k, save_every_n_steps=None, resume=False,
                                overwrite=False, async_save=False, on_save_error="stop")
    states = {"model": ModelState(accelerator, model), "optimizer": optimizer, "scheduler": scheduler,
              "trainer": TrainingPosition()}
    return Checkpointer(run_dir, accelerator, options, states)


def save_last(checkpointer, state, asynchronous=False):
    """Save `last` with the training state `state` (its step and epoch name the checkpoint)."""
    checkpointer.states["trainer"].state = dict(state)
    return checkpointer.save_last(state["epoch"], state["step"], asynchronous=asynchronous)


def test_maybe_save_top_keeps_top_k_and_best_in_step_with_the_index(tmp_path, accelerator):
    run_dir = tmp_path / "run"
    model = nn.Linear(3, 2)
    checkpointer = checkpointer_for(run_dir, accelerator, model, monitor="val_loss", mode="min", save_top_k=3)
    values = [0.9, 0.5, 0.7, 0.4, 0.8, 0.6]
    expected_kept = [[0.9], [0.5, 0.9], [0.5, 0.7, 0.9], [0.4, 0.5, 0.7], [0.4, 0.5, 0.7], [0.4, 0.5, 0.6]]
    snapshots, best_call = {}, None

    for call, value in enumerate(values):
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.fill_(float(call))
        snapshots[call] = weights_of(model)
        improved = checkpointer.maybe_save_top(value, epoch=call, step=100 * call, metrics={"val_loss": value})
        assert improved == (value < min(values[:call], default=math.inf))
        if improved:
            best_call = call

        index = read_index(run_dir)
        assert [entry["value"] for entry in index["top_k"]] == expected_kept[call]
        listed = {run_dir / entry["path"] for entry in index["top_k"]}
        assert set((run_dir / "top").iterdir()) == listed  # no leftover, temporary or evicted directory
        for entry in index["top_k"]:
            top = run_dir / entry["path"]
            assert files.verify(top) is None
            meta = files.read_json(top / "meta.json")
            assert meta["value"] == entry["value"] and meta["step"] == entry["step"]
            assert_weights_equal(load_file(top / WEIGHTS), snapshots[values.index(entry["value"])])

        best_meta = files.read_json(run_dir / "best" / "meta.json")
        assert best_meta["value"] == min(values[: call + 1])
        assert (best_meta["epoch"], best_meta["step"], best_meta["path"]) == (best_call, 100 * best_call, "best")
        assert best_meta["monitor"] == "val_loss" and best_meta["metrics"] == {"val_loss": values[best_call]}
        assert index["best"] == {"path": "best", "epoch": best_call, "step": 100 * best_call, "value": values[best_call]}
        assert files.verify(run_dir / "best") is None
        assert_weights_equal(load_file(run_dir / "best" / WEIGHTS), snapshots[best_call])

    assert sorted(p.name for p in run_dir.iterdir()) == ["best", INDEX, "top"]


def test_maybe_save_top_with_k_zero_still_keeps_best(tmp_path, accelerator):
    run_dir = tmp_path / "run"
    model = nn.Linear(2, 2)
    checkpointer = checkpointer_for(run_dir, accelerator, model, monitor="val_accuracy", mode="max", save_top_k=0)
    assert checkpointer.maybe_save_top(0.5, epoch=0, step=1, metrics={})
    assert not checkpointer.maybe_save_top(0.4, epoch=1, step=2, metrics={})
    assert not checkpointer.maybe_save_top(NAN, epoch=2, step=3, metrics={})
    assert read_index(run_dir)["top_k"] == []
    assert not (run_dir / "top").exists()
    assert files.read_json(run_dir / "best" / "meta.json")["value"] == 0.5





def state_step(directory):
    return files.read_json(directory / "state.json")["step"]


def test_save_last_shifts_last_previous_older_and_rewrites_the_oldest_in_place(tmp_path, accelerator):
    run_dir = tmp_path / "run"
    model, optimizer, scheduler = trained()
    checkpointer = checkpointer_for(run_dir, accelerator, model, optimizer, scheduler, monitor="val_loss", mode="min", save_top_k=2)

    save_last(checkpointer, {"step": 10, "epoch": 1})
    assert state_step(run_dir / "last") == 10 and not (run_dir / "previous").exists()
    save_last(checkpointer, {"step": 20, "epoch": 2})

    assert (state_step(run_dir / "last"), state_step(run_dir / "previous")) == (20, 10)
    assert files.verify(run_dir / "last") is None and files.verify(run_dir / "previous") is None
    assert read_index(run_dir)["last"] == {"path": "last", "epoch": 2, "step": 20, "value": None}
    assert sorted(p.name for p in run_dir.iterdir()) == [INDEX, "last", "previous"]
    names = {p.name for p in (run_dir / "last").iterdir()}
    assert names == {WEIGHTS, "optimizer.json", "optimizer.safetensors", "state.json", "rng-rank0.json", files.MANIFEST}

    save_last(checkpointer, {"step": 30, "epoch": 3})
    assert [state_step(run_dir / name) for name in ("last", "previous", "older")] == [30, 20, 10]
    assert sorted(p.name for p in run_dir.iterdir()) == [INDEX, "last", "older", "previous"]

    # The fourth save writes over the first one's files (by then `older`) in place: `last` and
    # `previous` stay whole while it is written.
    first = {name: (run_dir / "older" / name).stat().st_ino for name in (WEIGHTS, "optimizer.safetensors")}
    save_last(checkpointer, {"step": 40, "epoch": 4})
    assert [state_step(run_dir / name) for name in ("last", "previous", "older")] == [40, 30, 20]
    assert {name: (run_dir / "last" / name).stat().st_ino for name in first} == first
    assert all(files.verify(run_dir / name) is None for name in ("last", "previous", "older"))
    assert sorted(p.name for p in run_dir.iterdir()) == [INDEX, "last", "older", "previous"]


def test_find_resumable_prefers_last_and_falls_back_to_previous(tmp_path, accelerator):
    run_dir = tmp_path / "run"
    model, optimizer, scheduler = trained()
    checkpointer = checkpointer_for(run_dir, accelerator, model, optimizer, scheduler, monitor="val_loss", mode="min", save_top_k=2)
    assert checkpointer.find_resumable() == (None, [])
    save_last(checkpointer, {"step": 10, "epoch": 1})
    save_last(checkpointer, {"step": 20, "epoch": 2})

    assert checkpointer.find_resumable() == (run_dir / "last", [])

    damaged = run_dir / "last" / "optimizer.safetensors"
    damaged.write_bytes(damaged.read_bytes()[:-3])
    found, skipped = checkpointer.find_resumable()
    assert found == run_dir / "previous"
    assert len(skipped) == 1 and "optimizer.safetensors" in skipped[0]

    (run_dir / "previous" / "state.json").unlink()
    found, skipped = checkpointer.find_resumable()
    assert found is None and len(skipped) == 2 and "state.json" in skipped[1]


def test_find_resumable_with_an_explicit_path(tmp_path, accelerator):
    run_dir = tmp_path / "run"
    model, optimizer, scheduler = trained()
    checkpointer = checkpointer_for(run_dir, accelerator, model, optimizer, scheduler, monitor="val_loss", mode="min", save_top_k=2)
    save_last(checkpointer, {"step": 10, "epoch": 1})
    save_last(checkpointer, {"step": 20, "epoch": 2})
    assert checkpointer.find_resumable(run_dir / "previous") == (run_dir / "previous", [])
    assert checkpointer.find_resumable(tmp_path / "elsewhere") == (None, [])


def test_load_restores_model_optimizer_scheduler_rng_and_trainer_state(tmp_path, accelerator):
    run_dir = tmp_path / "run"
    model, optimizer, scheduler = trained(seed=0)
    checkpointer = checkpointer_for(run_dir, accelerator, model, optimizer, scheduler, monitor="val_loss", mode="min", save_top_k=2)
    checkpointer.maybe_save_top(0.3, epoch=0, step=3, metrics={})
    saved_weights = weights_of(model)
    saved_optimizer = optimizer.state_dict()
    torch.manual_seed(1234)
    random.seed(1234)
    np.random.seed(1234)
    save_last(checkpointer, {"step": 3, "epoch": 1, "position": [1, 2]})
    after_save = (torch.rand(5), random.random(), np.random.rand(3))

    # A different process: other weights, a fresh optimizer and scheduler, RNG elsewhere.
    twin, twin_optimizer, twin_scheduler = trained(seed=7, steps=1)
    torch.rand(100)
    random.random()
    np.random.rand(10)
    resumed = checkpointer_for(run_dir, accelerator, twin, twin_optimizer, twin_scheduler, monitor="val_loss", mode="min",
                               save_top_k=2)
    resumed.load(run_dir / "last")

    after_load = (torch.rand(5), random.random(), np.random.rand(3))
    assert torch.equal(after_load[0], after_save[0])
    assert after_load[1] == after_save[1]
    assert np.array_equal(after_load[2], after_save[2])
    assert_weights_equal(weights_of(twin), saved_weights)
    loaded = twin_optimizer.state_dict()
    assert loaded["param_groups"] == saved_optimizer["param_groups"]
    for index, state in saved_optimizer["state"].items():
        for key in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(loaded["state"][index][key], state[key]), (index, key)
    assert twin_scheduler.state_dict() == scheduler.state_dict()
    assert resumed.states["trainer"].state == {"step": 3, "epoch": 1, "position": [1, 2]}
    assert resumed.kept == [Entry("top/epoch000-step0000003", 0, 3, 0.3)]
    assert resumed.best == Entry("best", 0, 3, 0.3)


def test_load_restores_every_rng_stream(tmp_path, accelerator):
    run_dir = tmp_path / "run"
    model, optimizer, scheduler = trained()
    checkpointer = checkpointer_for(run_dir, accelerator, model, optimizer, scheduler, monitor="val_loss", mode="min", save_top_k=1)
    save_last(checkpointer, {"step": 1, "epoch": 0})
    expected = (torch.rand(5), random.random(), np.random.rand(3), np.random.randn())  # randn: numpy's cached gaussian

    torch.rand(50)
    random.random()
    np.random.randn(7)
    checkpointer.load(run_dir / "last")
    actual = (torch.rand(5), random.random(), np.random.rand(3), np.random.randn())

    assert torch.equal(actual[0], expected[0])
    assert actual[1] == expected[1]
    assert np.array_equal(actual[2], expected[2])
    assert actual[3] == expected[3]


def test_load_restores_the_record_of_last(tmp_path, accelerator):
    # After resuming from `last` at step 20, the checkpointer must know `last` holds step 20: the
    # trainer skips its final save only when checkpointer.last.step equals the current step.
    run_dir = tmp_path / "run"
    model, optimizer, scheduler = trained()
    checkpointer = checkpointer_for(run_dir, accelerator, model, optimizer, scheduler, monitor="val_loss", mode="min", save_top_k=1)
    save_last(checkpointer, {"step": 10, "epoch": 1})
    save_last(checkpointer, {"step": 20, "epoch": 2})

    resumed = checkpointer_for(run_dir, accelerator, model, optimizer, scheduler, monitor="val_loss", mode="min", save_top_k=1)
    resumed.load(run_dir / "last")
    assert resumed.last == Entry("last", 2, 20)


@pytest.mark.parametrize(
    "layers",
    [
        pytest.param([nn.Linear(4, 8), nn.Tanh()], id="checkpoint-has-extra-weights"),
        pytest.param([nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2), nn.Linear(2, 2)], id="model-has-extra-weights"),
    ],
)
def test_load_rejects_weights_that_do_not_fit(tmp_path, accelerator, layers):
    run_dir = tmp_path / "run"
    model, optimizer, scheduler = trained()
    checkpointer = checkpointer_for(run_dir, accelerator, model, optimizer, scheduler, monitor="val_loss", mode="min", save_top_k=1)
    save_last(checkpointer, {"step": 1, "epoch": 0})
    other = nn.Sequential(*layers)
    other_optimizer = torch.optim.AdamW(other.parameters())
    with pytest.raises(files.CheckpointError, match="does not fit the model"):
        checkpointer_for(run_dir, accelerator, other, other_optimizer).load(run_dir / "last")


class TiedLM(nn.Module):
    def __init__(self, vocab=11, dim=4):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.body = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, tokens):
        return self.head(torch.tanh(self.body(self.emb(tokens))))


def test_tied_weights_save_once_and_load_tied(tmp_path, accelerator):
    run_dir = tmp_path / "run"
    torch.manual_seed(0)
    model = TiedLM()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    scheduler = LambdaLR(optimizer, lambda step: 1.0)
    checkpointer = checkpointer_for(run_dir, accelerator, model, optimizer, scheduler, monitor="val_loss", mode="min", save_top_k=1)
    nn.functional.cross_entropy(model(torch.tensor([1, 2, 3])), torch.tensor([4, 5, 6])).backward()
    optimizer.step()
    save_last(checkpointer, {"step": 1, "epoch": 0})
    saved = weights_of(model)

    stored = load_file(run_dir / "last" / WEIGHTS)
    assert len({"emb.weight", "head.weight"} & stored.keys()) == 1  # the shared matrix is stored once

    torch.manual_seed(99)
    fresh = TiedLM()
    fresh_optimizer = torch.optim.AdamW(fresh.parameters(), lr=0.01)
    assert not torch.equal(fresh.emb.weight, saved["emb.weight"])
    checkpointer_for(run_dir, accelerator, fresh, fresh_optimizer).load(run_dir / "last")

    assert fresh.head.weight is fresh.emb.weight
    assert_weights_equal(weights_of(fresh), saved)
    assert torch.equal(fresh.head.weight, saved["emb.weight"])


# ---------------------------------------------------------------- asynchronous `last`


def optimizer_tensors(optimizer):
    return {f"{i}.{k}": v.clone() for i, state in optimizer.state_dict()["state"].items() for k, v in state.items()}


def test_async_save_writes_the_state_as_it_was_when_asked(tmp_path, accelerator, monkeypatch):
    """Training changes weights and optimizer state in place while the save is in flight."""
    run_dir = tmp_path / "run"
    model, optimizer, scheduler = trained()
    checkpointer = checkpointer_for(run_dir, accelerator, model, optimizer, scheduler, monitor="val_loss", mode="min", save_top_k=1)
    saved_weights, saved_optimizer = weights_of(model), optimizer_tensors(optimizer)
    may_write = __import__("threading").Event()
    real_seal = files.seal
    monkeypatch.setattr(files, "seal", lambda directory, checksums=None: (may_write.wait(timeout=30), real_seal(directory, checksums)))

    save_last(checkpointer, {"step": 3, "epoch": 0}, asynchronous=True)
    assert checkpointer.last.step == 3
    for _ in range(2):  # two more training steps, in place, as the trainer runs them
        model(torch.randn(6, 4)).pow(2).mean().backward()
        checkpointer.before_optimizer_step()  # returns once the state is copied, long before the write ends
        optimizer.step()
        optimizer.zero_grad()
    assert not (run_dir / "last").exists(), "the write is still held at the seal"
    assert not all(torch.equal(a, b) for a, b in zip(weights_of(model).values(), saved_weights.values()))
    may_write.set()
    checkpointer.wait()

    assert files.verify(run_dir / "last") is None
    assert_weights_equal(load_file(run_dir / "last" / WEIGHTS), saved_weights)
    fresh, fresh_optimizer, fresh_scheduler = trained(seed=1, steps=1)
    checkpointer_for(run_dir, accelerator, fresh, fresh_optimizer, fresh_scheduler).load(run_dir / "last")
    assert_weights_equal(optimizer_tensors(fresh_optimizer), saved_optimizer)
    assert read_index(run_dir)["last"]["step"] == 3


@pytest.mark.parametrize("error", [OSError(28, "No space left on device"), MemoryError("host copy")])
def test_async_save_failure_is_reported_by_wait_and_keeps_the_earlier_last(tmp_path, accelerator, monkeypatch, error):
    run_dir = tmp_path / "run"
    model, optimizer, scheduler = trained()
    checkpointer = checkpointer_for(run_dir, accelerator, model, optimizer, scheduler, monitor="val_loss", mode="min", save_top_k=1)
    save_last(checkpointer, {"step": 3, "epoch": 0}, asynchronous=True)
    checkpointer.wait()

    def fail(directory, checksums=None):
        raise error

    monkeypatch.setattr(files, "seal", fail)
    save_last(checkpointer, {"step": 6, "epoch": 1}, asynchronous=True)
    with pytest.raises(files.CheckpointError, match=r"last.*failed") as raised:
        checkpointer.wait()
    if not isinstance(error, OSError):
        assert raised.value.__cause__ is error
    assert checkpointer.last.step == 3
    assert state_step(run_dir / "last") == 3 and files.verify(run_dir / "last") is None
    assert read_index(run_dir)["last"]["step"] == 3
    assert not (run_dir / ".last.tmp").exists()
    checkpointer.wait()  # reported once


def test_save_waits_for_the_save_in_flight(tmp_path, accelerator):
    run_dir = tmp_path / "run"
    model, optimizer, scheduler = trained()
    checkpointer = checkpointer_for(run_dir, accelerator, model, optimizer, scheduler, monitor="val_loss", mode="min", save_top_k=1)
    for step in (1, 2, 3):
        save_last(checkpointer, {"step": step, "epoch": 0}, asynchronous=True)
    checkpointer.maybe_save_top(0.5, epoch=0, step=3, metrics={"val_loss": 0.5})
    assert (state_step(run_dir / "last"), state_step(run_dir / "previous")) == (3, 2)
    index = read_index(run_dir)
    assert index["last"]["step"] == 3 and index["best"]["step"] == 3 and len(index["top_k"]) == 1


def test_async_save_keeps_buffers_as_they_were_when_a_forward_updates_them(tmp_path, accelerator):
    """BatchNorm's running statistics change in the forward, before the optimizer step waits."""
    run_dir = tmp_path / "run"
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    scheduler = LambdaLR(optimizer, lambda step: 1.0)
    checkpointer = checkpointer_for(run_dir, accelerator, model, optimizer, scheduler, monitor="val_loss", mode="min", save_top_k=1)
    model(torch.randn(16, 4)).pow(2).mean().backward()
    optimizer.step()
    saved = weights_of(model)

    save_last(checkpointer, {"step": 1, "epoch": 0}, asynchronous=True)
    model(torch.randn(16, 4) * 5 + 3)  # running_mean/var and num_batches_tracked move at once
    assert not torch.equal(model[1].running_mean, saved["1.running_mean"])
    checkpointer.wait()
    assert_weights_equal(load_file(run_dir / "last" / WEIGHTS), saved)


def test_async_save_releases_the_optimizer_step_before_the_files_are_written(tmp_path, accelerator, monkeypatch):
    """The state is copied into host buffers first: the write itself never holds training."""
    run_dir = tmp_path / "run"
    model, optimizer, scheduler = trained()
    checkpointer = checkpointer_for(run_dir, accelerator, model, optimizer, scheduler, monitor="val_loss", mode="min", save_top_k=1)
    saved_weights, saved_optimizer = weights_of(model), optimizer_tensors(optimizer)
    may_write = __import__("threading").Event()
    real_write = tensors.write_tensors

    def held_write(*args, **kwargs):
        assert may_write.wait(timeout=30)
        return real_write(*args, **kwargs)

    monkeypatch.setattr(tensors, "write_tensors", held_write)
    save_last(checkpointer, {"step": 3, "epoch": 0}, asynchronous=True)
    model(torch.randn(6, 4)).pow(2).mean().backward()
    checkpointer.before_optimizer_step()  # returns although not one byte is written
    optimizer.step()
    assert not any((run_dir / ".last.tmp" / name).exists() and (run_dir / ".last.tmp" / name).stat().st_size
                   for name in (WEIGHTS, "optimizer.safetensors"))
    may_write.set()
    checkpointer.wait()

    assert_weights_equal(load_file(run_dir / "last" / WEIGHTS), saved_weights)
    fresh, fresh_optimizer, fresh_scheduler = trained(seed=1, steps=1)
    checkpointer_for(run_dir, accelerator, fresh, fresh_optimizer, fresh_scheduler).load(run_dir / "last")
    assert_weights_equal(optimizer_tensors(fresh_optimizer), saved_optimizer)


def test_an_epoch_end_save_while_one_is_in_flight_does_not_wait_and_is_taken_after_it(tmp_path, accelerator, monkeypatch):
    """Small epochs: the epoch-end `last` must not hold training until the save before it is written."""
    import threading

    run_dir = tmp_path / "run"
    model, optimizer, scheduler = trained()
    checkpointer = checkpointer_for(run_dir, accelerator, model, optimizer, scheduler)
    checkpointer.options = dataclasses.replace(checkpointer.options, async_save=True)
    position = checkpointer.states["trainer"]
    may_write = threading.Event()
    real_seal = files.seal

    def held_seal(directory, checksums=None):
        assert may_write.wait(timeout=30)
        return real_seal(directory, checksums)

    monkeypatch.setattr(files, "seal", held_seal)
    position.state = {"step": 10, "epoch": 1}
    checkpointer.on_epoch_end(epoch=1, step=10)  # in flight, held at its seal
    position.state = {"step": 20, "epoch": 2}
    began = time.perf_counter()
    checkpointer.on_epoch_end(epoch=2, step=20)  # due: returns at once instead of waiting
    checkpointer.on_step(epoch=2, step=21)  # still in flight: nothing yet
    assert time.perf_counter() - began < 5 and not (run_dir / "last").exists()
    may_write.set()
    while not checkpointer._pending.done():
        time.sleep(0.01)
    checkpointer.on_step(epoch=2, step=22)  # written, but it took all the time since it began: not yet
    assert state_step(run_dir / "last") == 10 and checkpointer._due
    while not checkpointer._pending.took_at_most(EPOCH_SAVE_SHARE):
        time.sleep(0.01)
    position.state = {"step": 23, "epoch": 2}
    checkpointer.on_step(epoch=2, step=23)  # the due save, with the newest state
    checkpointer.finish(epoch=2, step=23)
    assert (state_step(run_dir / "last"), state_step(run_dir / "previous")) == (23, 10)
    assert read_index(run_dir)["last"]["step"] == 23
