"""storage.py: pickle-free nested state, and sealed checkpoint directories that verify or say why not."""

import hashlib
import json
import math
import zlib

import pytest
import torch
from safetensors.torch import load_file
from torch.optim.lr_scheduler import LambdaLR

from accelerated_trainer import storage
from accelerated_trainer.storage import CheckpointError


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

    skeleton, tensors = storage.split_tensors(state)
    # The skeleton must survive JSON as text, as it does on disk.
    restored = storage.join_tensors(json.loads(json.dumps(skeleton)), tensors)

    assert_identical(restored, state)
    assert len(tensors) == 4 * 3  # step, exp_avg, exp_avg_sq for each of 4 parameters


def test_scheduler_state_round_trips_exactly_through_split_and_join():
    _, _, scheduler = trained_optimizer()
    state = scheduler.state_dict()
    skeleton, tensors = storage.split_tensors(state)
    assert tensors == {}
    assert_identical(storage.join_tensors(json.loads(json.dumps(skeleton)), tensors), state)


def test_mixed_nesting_round_trips():
    state = {
        "tuple": (1, 2.5, "x", None, True, torch.arange(3)),
        "list": [torch.zeros(2, 2, dtype=torch.bfloat16), [torch.tensor(True)]],
        "int_keys": {3: {"t": torch.tensor(7, dtype=torch.int64)}, -1: "neg"},
        "empty": {},
        "nan": float("nan"),
        "inf": float("-inf"),
    }
    skeleton, tensors = storage.split_tensors(state)
    assert_identical(storage.join_tensors(json.loads(json.dumps(skeleton)), tensors), state)


def test_tensors_are_stored_detached_and_contiguous_under_their_path():
    weight = torch.randn(3, 4, requires_grad=True)
    skeleton, tensors = storage.split_tensors({"w": weight.t(), "groups": [{"v": weight[0]}]})
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
        storage.split_tensors({"outer": [1, {"inner": bad}]})
    assert "/outer/1/inner" in str(err.value)


def test_refused_state_writes_no_files(tmp_path):
    with pytest.raises(CheckpointError):
        storage.save_state({"ok": torch.ones(2), "bad": object()}, tmp_path, "state")
    assert list(tmp_path.iterdir()) == []


def test_keys_that_spell_the_same_path_keep_their_own_tensors():
    # "/a/b" is the path of both tensors; one must not silently overwrite the other.
    state = {"a": {"b": torch.zeros(2)}, "a/b": torch.ones(2)}
    skeleton, tensors = storage.split_tensors(state)
    restored = storage.join_tensors(skeleton, tensors)
    assert torch.equal(restored["a"]["b"], torch.zeros(2))
    assert torch.equal(restored["a/b"], torch.ones(2))


def test_save_and_load_state_round_trip_through_files(tmp_path):
    model, optimizer, scheduler = trained_optimizer()
    storage.save_state(optimizer.state_dict(), tmp_path, "optimizer")
    storage.save_state(scheduler.state_dict(), tmp_path, "scheduler")

    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "optimizer.json", "optimizer.safetensors", "scheduler.json", "scheduler.safetensors",
    ]
    assert_identical(storage.load_state(tmp_path, "optimizer"), optimizer.state_dict())
    assert_identical(storage.load_state(tmp_path, "scheduler"), scheduler.state_dict())


def test_loaded_optimizer_state_continues_training_identically(tmp_path):
    model, optimizer, _ = trained_optimizer()
    storage.save_state(optimizer.state_dict(), tmp_path, "optimizer")
    twin, twin_optimizer, _ = trained_optimizer(steps=0)
    twin.load_state_dict(model.state_dict())
    twin_optimizer.load_state_dict(storage.load_state(tmp_path, "optimizer"))

    batch = torch.randn(5, 4)
    for net, opt in ((model, optimizer), (twin, twin_optimizer)):
        net(batch).pow(2).mean().backward()
        opt.step()
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a, b)


# ---------------------------------------------------------------- sealed directories


@pytest.fixture
def sealed(tmp_path):
    directory = tmp_path / "ckpt"
    directory.mkdir()
    storage.save_state({"w": torch.arange(100, dtype=torch.float32)}, directory, "state")
    storage.write_json(directory / "meta.json", {"step": 3})
    storage.seal(directory)
    return directory


def test_seal_lists_every_file_and_verify_passes(sealed):
    manifest = storage.read_json(sealed / storage.MANIFEST)
    assert sorted(manifest["files"]) == ["meta.json", "state.json", "state.safetensors"]
    assert manifest["files"]["meta.json"]["size"] == (sealed / "meta.json").stat().st_size
    assert storage.verify(sealed) is None


def test_verify_reports_a_truncated_file(sealed):
    path = sealed / "state.safetensors"
    path.write_bytes(path.read_bytes()[:-10])
    reason = storage.verify(sealed)
    assert reason is not None and "state.safetensors" in reason and "truncated" in reason


def test_verify_reports_a_flipped_byte_of_the_same_size(sealed):
    path = sealed / "state.safetensors"
    raw = bytearray(path.read_bytes())
    raw[-5] ^= 0xFF
    path.write_bytes(bytes(raw))
    assert path.stat().st_size == storage.read_json(sealed / storage.MANIFEST)["files"][path.name]["size"]
    reason = storage.verify(sealed)
    assert reason is not None and "state.safetensors" in reason and "crc32" in reason


def test_verify_reads_the_sha256_manifests_of_earlier_versions(sealed):
    manifest = storage.read_json(sealed / storage.MANIFEST)
    files = {name: {"size": entry["size"], "sha256": hashlib.sha256((sealed / name).read_bytes()).hexdigest()}
             for name, entry in manifest["files"].items()}
    storage.write_json(sealed / storage.MANIFEST, {"files": files})
    assert storage.verify(sealed) is None
    path = sealed / "state.safetensors"
    raw = bytearray(path.read_bytes())
    raw[-5] ^= 0xFF
    path.write_bytes(bytes(raw))
    reason = storage.verify(sealed)
    assert reason is not None and "state.safetensors" in reason and "sha256" in reason


def test_verify_reports_a_missing_file(sealed):
    (sealed / "meta.json").unlink()
    reason = storage.verify(sealed)
    assert reason is not None and "meta.json" in reason and "missing" in reason


def test_verify_reports_a_directory_without_manifest(sealed):
    (sealed / storage.MANIFEST).unlink()
    reason = storage.verify(sealed)
    assert reason is not None and storage.MANIFEST in reason


def test_verify_reports_an_unreadable_manifest(sealed):
    (sealed / storage.MANIFEST).write_text("{not json")
    reason = storage.verify(sealed)
    assert reason is not None and storage.MANIFEST in reason


def test_remove_unseals_and_deletes(sealed):
    storage.remove(sealed)
    assert not sealed.exists()
    storage.remove(sealed)  # removing twice is harmless


def test_atomic_write_json_replaces_without_leftovers(tmp_path):
    path = tmp_path / "index.json"
    storage.atomic_write_json(path, {"a": 1})
    storage.atomic_write_json(path, {"a": 2})
    assert storage.read_json(path) == {"a": 2}
    assert [p.name for p in tmp_path.iterdir()] == ["index.json"]


# ---------------------------------------------------------------- temporary dirs and publishing


def sealed_dir(path, step):
    path.mkdir(parents=True)
    storage.write_json(path / "state.json", {"step": step})
    storage.seal(path)
    return path


def step_of(path):
    assert storage.verify(path) is None
    return storage.read_json(path / "state.json")["step"]


def test_temporary_dir_removes_a_stale_leftover(tmp_path):
    dest = tmp_path / "last"
    stale = tmp_path / ".last.tmp"
    (stale / "sub").mkdir(parents=True)
    (stale / "model.safetensors").write_bytes(b"half written")
    tmp = storage.temporary_dir(dest)
    assert tmp == stale and tmp.is_dir() and list(tmp.iterdir()) == []
    assert not dest.exists()


def test_temporary_dir_recycles_an_older_checkpoint_unsealed_with_only_the_kept_files(tmp_path):
    old = sealed_dir(tmp_path / "previous", 1)
    storage.write_tensors(old / "big.safetensors", {"w": torch.arange(1000, dtype=torch.float32)})
    (old / "stale.json").write_text("{}")
    inode = (old / "big.safetensors").stat().st_ino

    tmp = storage.temporary_dir(tmp_path / "last", recycle=old, keep=("big.safetensors",))
    assert tmp == tmp_path / ".last.tmp" and not old.exists()
    assert [p.name for p in tmp.iterdir()] == ["big.safetensors"], "no manifest, nothing but the kept file"
    # Overwritten in place (same inode) and cut to the new, shorter length.
    storage.write_tensors(tmp / "big.safetensors", {"w": torch.arange(10, dtype=torch.float32)})
    assert (tmp / "big.safetensors").stat().st_ino == inode
    assert torch.equal(load_file(tmp / "big.safetensors")["w"], torch.arange(10, dtype=torch.float32))


def test_temporary_dir_does_not_recycle_what_is_not_a_sealed_checkpoint(tmp_path):
    unsealed = tmp_path / "previous"
    (unsealed / "x").mkdir(parents=True)
    tmp = storage.temporary_dir(tmp_path / "last", recycle=unsealed)
    assert list(tmp.iterdir()) == [] and (unsealed / "x").is_dir()


def test_publish_into_an_empty_place(tmp_path):
    tmp = sealed_dir(tmp_path / ".last.tmp", 1)
    storage.publish(tmp, tmp_path / "last", keep_previous=tmp_path / "previous")
    assert step_of(tmp_path / "last") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last"]


def test_publish_keeps_the_old_directory_as_previous(tmp_path):
    dest, previous = tmp_path / "last", tmp_path / "previous"
    sealed_dir(dest, 1)
    storage.publish(sealed_dir(tmp_path / ".last.tmp", 2), dest, keep_previous=previous)
    assert (step_of(dest), step_of(previous)) == (2, 1)

    storage.publish(sealed_dir(tmp_path / ".last.tmp", 3), dest, keep_previous=previous)
    assert (step_of(dest), step_of(previous)) == (3, 2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last", "previous"]


def test_publish_without_keep_previous_replaces_dest(tmp_path):
    dest = tmp_path / "best"
    sealed_dir(dest, 1)
    storage.publish(sealed_dir(tmp_path / ".best.tmp", 2), dest)
    assert step_of(dest) == 2
    assert [p.name for p in tmp_path.iterdir()] == ["best"]


def test_publish_clears_a_stale_trash_dir(tmp_path):
    dest = tmp_path / "best"
    sealed_dir(dest, 1)
    (tmp_path / ".best.trash" / "x").mkdir(parents=True)
    storage.publish(sealed_dir(tmp_path / ".best.tmp", 2), dest)
    assert step_of(dest) == 2
    assert [p.name for p in tmp_path.iterdir()] == ["best"]


def test_publish_with_keep_previous_after_a_crash_during_cleanup(tmp_path):
    # A crash after the last rename but before the old `previous` was deleted leaves
    # `.last.trash-previous` behind; the next save must still go through.
    dest, previous = tmp_path / "last", tmp_path / "previous"
    sealed_dir(dest, 2)
    sealed_dir(previous, 1)
    sealed_dir(tmp_path / ".last.trash-previous", 0)

    storage.publish(sealed_dir(tmp_path / ".last.tmp", 3), dest, keep_previous=previous)
    assert (step_of(dest), step_of(previous)) == (3, 2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last", "previous"]


@pytest.mark.parametrize("dtype", sorted(storage.SAFETENSORS_DTYPES, key=str), ids=str)
def test_write_tensors_is_read_back_by_safetensors_with_its_checksum(tmp_path, dtype):
    from safetensors import safe_open

    generator = torch.Generator().manual_seed(0)
    values = torch.randint(0, 100, (3, 5), generator=generator)
    tensors = {"matrix": values.to(dtype) if dtype not in (torch.float8_e4m3fn, torch.float8_e5m2) else values.float().to(dtype),
               "scalar": torch.ones((), dtype=dtype), "empty": torch.zeros(0, 4, dtype=dtype),
               "row of a bigger tensor": torch.zeros(4, 7, dtype=torch.float32)[1].to(dtype)}
    path = tmp_path / "t.safetensors"
    digest = storage.write_tensors(path, tensors, metadata={"format": "pt"})

    assert digest == f"{zlib.crc32(path.read_bytes()):08x}"
    loaded = load_file(path)
    assert loaded.keys() == tensors.keys()
    for name, tensor in tensors.items():
        assert loaded[name].dtype == dtype and loaded[name].shape == tensor.shape
        assert torch.equal(loaded[name].reshape(-1).view(torch.uint8), tensor.reshape(-1).view(torch.uint8)), name
    with safe_open(path, framework="pt") as handle:
        assert handle.metadata() == {"format": "pt"}


def test_a_paced_write_writes_the_same_file_and_checksum_piece_by_piece(tmp_path, monkeypatch):
    monkeypatch.setattr(storage, "PACED_PIECE", 1000)  # a 40 kB tensor goes in 41 pieces
    generator = torch.Generator().manual_seed(0)
    tensors = {"big": torch.randn(100, 100, generator=generator), "odd": torch.arange(7, dtype=torch.int16)}
    pieces = []
    real_sleep = storage.time.sleep
    monkeypatch.setattr(storage.time, "sleep", lambda seconds: (pieces.append(seconds), real_sleep(0)))

    flat = storage.write_tensors(tmp_path / "flat.safetensors", tensors)
    assert pieces == [], "a flat-out write never pauses"
    paced = storage.write_tensors(tmp_path / "paced.safetensors", tensors, pause=2.0)

    assert len(pieces) > 40 and all(seconds >= 0 for seconds in pieces)
    assert paced == flat == f"{zlib.crc32((tmp_path / 'paced.safetensors').read_bytes()):08x}"
    assert (tmp_path / "paced.safetensors").read_bytes() == (tmp_path / "flat.safetensors").read_bytes()
