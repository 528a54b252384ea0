"""checkpoint/tensors.py: pickle-free nested state, and the safetensors writer with its checksum."""

import json
import math
import zlib

import pytest
import torch
from safetensors.torch import load_file
from torch.optim.lr_scheduler import LambdaLR

from accelerated_trainer.checkpoint import tensors as tensor_files
from accelerated_trainer.checkpoint.files import CheckpointError


def trained_optimizer(steps=3):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01, betas=(0.8, 0.95), weight_decay=0.1)
    scheduler = LambdaLR(optimizer, lambda step: 1.0 / (step + 1))
    for _ in range(steps):
        model(torch.randn(5, 4)).pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        scheduler.step()
    return model, optimizer, scheduler


def assert_identical(actual, expected, path="/"):
    """Equal values of the same types all the way down: int keys stay ints, tuples stay tuples."""
    assert type(actual) is type(expected), f"{path}: {type(actual).__name__} != {type(expected).__name__}"
    if isinstance(expected, torch.Tensor):
        assert actual.dtype == expected.dtype and actual.shape == expected.shape, path
        assert torch.equal(actual, expected), path
    elif isinstance(expected, dict):
        assert list(actual) == list(expected), path
        for key in expected:
            assert type(key) is type(next(k for k in actual if k == key)), f"{path}: key {key!r}"
            assert_identical(actual[key], expected[key], f"{path}{key}/")
    elif isinstance(expected, (list, tuple)):
        assert len(actual) == len(expected), path
        for i, (a, e) in enumerate(zip(actual, expected)):
            assert_identical(a, e, f"{path}{i}/")
    elif isinstance(expected, float) and math.isnan(expected):
        assert math.isnan(actual), path
    else:
        assert actual == expected, path


# ---------------------------------------------------------------- nested state


def test_optimizer_state_round_trips_exactly_through_split_and_join():
    _, optimizer, _ = trained_optimizer()
    state = optimizer.state_dict()
    assert set(state["state"]) == {0, 1, 2, 3}
    assert state["state"][0]["step"].dim() == 0 and state["param_groups"][0]["betas"] == (0.8, 0.95)

    skeleton, tensors = tensor_files.split_tensors(state)
    # The skeleton must survive JSON as text, as it does on disk.
    restored = tensor_files.join_tensors(json.loads(json.dumps(skeleton)), tensors)

    assert_identical(restored, state)
    assert len(tensors) == 4 * 3  # step, exp_avg, exp_avg_sq for each of 4 parameters


def test_scheduler_state_round_trips_exactly_through_split_and_join():
    _, _, scheduler = trained_optimizer()
    state = scheduler.state_dict()
    skeleton, tensors = tensor_files.split_tensors(state)
    assert tensors == {}
    assert_identical(tensor_files.join_tensors(json.loads(json.dumps(skeleton)), tensors), state)


def test_mixed_nesting_round_trips():
    state = {
        "tuple": (1, 2.5, "x", None, True, torch.arange(3)),
        "list": [torch.zeros(2, 2, dtype=torch.bfloat16), [torch.tensor(True)]],
        "int_keys": {3: {"t": torch.tensor(7, dtype=torch.int64)}, -1: "neg"},
        "empty": {},
        "nan": float("nan"),
        "inf": float("-inf"),
    }
    skeleton, tensors = tensor_files.split_tensors(state)
    assert_identical(tensor_files.join_tensors(json.loads(json.dumps(skeleton)), tensors), state)


def test_tensors_are_stored_detached_and_contiguous_under_their_path():
    weight = torch.randn(3, 4, requires_grad=True)
    skeleton, tensors = tensor_files.split_tensors({"w": weight.t(), "groups": [{"v": weight[0]}]})
    # Names are a running number (unique by construction) and the readable path.
    assert set(tensors) == {"0:/w", "1:/groups/0/v"}
    assert skeleton == {"w": {"__tensor__": "0:/w"}, "groups": [{"v": {"__tensor__": "1:/groups/0/v"}}]}
    assert tensors["0:/w"].is_contiguous() and not tensors["0:/w"].requires_grad
    assert torch.equal(tensors["0:/w"], weight.detach().t())


@pytest.mark.parametrize(
    "bad",
    [object(), {1, 2}, b"bytes", lambda: 0, complex(1, 2), torch.nn.Linear(1, 1)],
    ids=["object", "set", "bytes", "lambda", "complex", "module"],
)
def test_values_that_would_need_pickle_are_refused(bad):
    with pytest.raises(CheckpointError, match=r"without pickle") as err:
        tensor_files.split_tensors({"outer": [1, {"inner": bad}]})
    assert "/outer/1/inner" in str(err.value)


def test_refused_state_writes_no_files(tmp_path):
    with pytest.raises(CheckpointError):
        tensor_files.save_state({"ok": torch.ones(2), "bad": object()}, tmp_path, "state")
    assert list(tmp_path.iterdir()) == []


def test_keys_that_spell_the_same_path_keep_their_own_tensors():
    # "/a/b" is the path of both tensors; one must not silently overwrite the other.
    state = {"a": {"b": torch.zeros(2)}, "a/b": torch.ones(2)}
    skeleton, tensors = tensor_files.split_tensors(state)
    restored = tensor_files.join_tensors(skeleton, tensors)
    assert torch.equal(restored["a"]["b"], torch.zeros(2))
    assert torch.equal(restored["a/b"], torch.ones(2))


def test_save_and_load_state_round_trip_through_files(tmp_path):
    model, optimizer, scheduler = trained_optimizer()
    tensor_files.save_state(optimizer.state_dict(), tmp_path, "optimizer")
    tensor_files.save_state(scheduler.state_dict(), tmp_path, "scheduler")

    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "optimizer.json", "optimizer.safetensors", "scheduler.json", "scheduler.safetensors",
    ]
    assert_identical(tensor_files.load_state(tmp_path, "optimizer"), optimizer.state_dict())
    assert_identical(tensor_files.load_state(tmp_path, "scheduler"), scheduler.state_dict())


def test_loaded_optimizer_state_continues_training_identically(tmp_path):
    model, optimizer, _ = trained_optimizer()
    tensor_files.save_state(optimizer.state_dict(), tmp_path, "optimizer")
    twin, twin_optimizer, _ = trained_optimizer(steps=0)
    twin.load_state_dict(model.state_dict())
    twin_optimizer.load_state_dict(tensor_files.load_state(tmp_path, "optimizer"))

    batch = torch.randn(5, 4)
    for net, opt in ((model, optimizer), (twin, twin_optimizer)):
        net(batch).pow(2).mean().backward()
        opt.step()
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", sorted(tensor_files.SAFETENSORS_DTYPES, key=str), ids=str)
def test_write_tensors_is_read_back_by_safetensors_with_its_checksum(tmp_path, dtype):
    from safetensors import safe_open

    generator = torch.Generator().manual_seed(0)
    values = torch.randint(0, 100, (3, 5), generator=generator)
    tensors = {"matrix": values.to(dtype) if dtype not in (torch.float8_e4m3fn, torch.float8_e5m2) else values.float().to(dtype),
               "scalar": torch.ones((), dtype=dtype), "empty": torch.zeros(0, 4, dtype=dtype),
               "row of a bigger tensor": torch.zeros(4, 7, dtype=torch.float32)[1].to(dtype)}
    path = tmp_path / "t.safetensors"
    digest = tensor_files.write_tensors(path, tensors, metadata={"format": "pt"})

    assert digest == f"{zlib.crc32(path.read_bytes()):08x}"
    loaded = load_file(path)
    assert loaded.keys() == tensors.keys()
    for name, tensor in tensors.items():
        assert loaded[name].dtype == dtype and loaded[name].shape == tensor.shape
        assert torch.equal(loaded[name].reshape(-1).view(torch.uint8), tensor.reshape(-1).view(torch.uint8)), name
    with safe_open(path, framework="pt") as handle:
        assert handle.metadata() == {"format": "pt"}


def test_a_paced_write_writes_the_same_file_and_checksum_piece_by_piece(tmp_path, monkeypatch):
    monkeypatch.setattr(tensor_files, "PACED_PIECE", 1000)  # a 40 kB tensor goes in 41 pieces
    generator = torch.Generator().manual_seed(0)
    tensors = {"big": torch.randn(100, 100, generator=generator), "odd": torch.arange(7, dtype=torch.int16)}
    pieces = []
    real_sleep = tensor_files.time.sleep
    monkeypatch.setattr(tensor_files.time, "sleep", lambda seconds: (pieces.append(seconds), real_sleep(0)))

    flat = tensor_files.write_tensors(tmp_path / "flat.safetensors", tensors)
    assert pieces == [], "a flat-out write never pauses"
    paced = tensor_files.write_tensors(tmp_path / "paced.safetensors", tensors, pause=2.0)

    assert len(pieces) > 40 and all(seconds >= 0 for seconds in pieces)
    assert paced == flat == f"{zlib.crc32((tmp_path / 'paced.safetensors').read_bytes()):08x}"
    assert (tmp_path / "paced.safetensors").read_bytes() == (tmp_path / "flat.safetensors").read_bytes()
