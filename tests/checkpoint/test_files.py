"""checkpoint/files.py: sealed checkpoint directories that verify or say why not, temporary
directories and publishing."""

import hashlib

import pytest
import torch
from safetensors.torch import load_file

from accelerated_trainer.checkpoint import files, tensors


# ---------------------------------------------------------------- sealed directories


@pytest.fixture
def sealed(tmp_path):
    directory = tmp_path / "ckpt"
    directory.mkdir()
    tensors.save_state({"w": torch.arange(100, dtype=torch.float32)}, directory, "state")
    files.write_json(directory / "meta.json", {"step": 3})
    files.seal(directory)
    return directory


def test_seal_lists_every_file_and_verify_passes(sealed):
    manifest = files.read_json(sealed / files.MANIFEST)
    assert sorted(manifest["files"]) == ["meta.json", "state.json", "state.safetensors"]
    assert manifest["files"]["meta.json"]["size"] == (sealed / "meta.json").stat().st_size
    assert files.verify(sealed) is None


def test_verify_reports_a_truncated_file(sealed):
    path = sealed / "state.safetensors"
    path.write_bytes(path.read_bytes()[:-10])
    reason = files.verify(sealed)
    assert reason is not None and "state.safetensors" in reason and "truncated" in reason


def test_verify_reports_a_flipped_byte_of_the_same_size(sealed):
    path = sealed / "state.safetensors"
    raw = bytearray(path.read_bytes())
    raw[-5] ^= 0xFF
    path.write_bytes(bytes(raw))
    assert path.stat().st_size == files.read_json(sealed / files.MANIFEST)["files"][path.name]["size"]
    reason = files.verify(sealed)
    assert reason is not None and "state.safetensors" in reason and "crc32" in reason


def test_verify_reads_the_sha256_manifests_of_earlier_versions(sealed):
    manifest = files.read_json(sealed / files.MANIFEST)
    listed = {name: {"size": entry["size"], "sha256": hashlib.sha256((sealed / name).read_bytes()).hexdigest()}
              for name, entry in manifest["files"].items()}
    files.write_json(sealed / files.MANIFEST, {"files": listed})
    assert files.verify(sealed) is None
    path = sealed / "state.safetensors"
    raw = bytearray(path.read_bytes())
    raw[-5] ^= 0xFF
    path.write_bytes(bytes(raw))
    reason = files.verify(sealed)
    assert reason is not None and "state.safetensors" in reason and "sha256" in reason


def test_verify_reports_a_tensor_file_added_after_the_seal(sealed):
    # A sharded checkpoint's reader takes every safetensors file of its directory.
    (sealed / "shard-00009-model-00001-of-00001.safetensors").write_bytes((sealed / "state.safetensors").read_bytes())
    reason = files.verify(sealed)
    assert reason is not None and "shard-00009" in reason and "not in manifest.json" in reason


def test_verify_reports_a_missing_file(sealed):
    (sealed / "meta.json").unlink()
    reason = files.verify(sealed)
    assert reason is not None and "meta.json" in reason and "missing" in reason


def test_verify_reports_a_directory_without_manifest(sealed):
    (sealed / files.MANIFEST).unlink()
    reason = files.verify(sealed)
    assert reason is not None and files.MANIFEST in reason


def test_verify_reports_an_unreadable_manifest(sealed):
    (sealed / files.MANIFEST).write_text("{not json")
    reason = files.verify(sealed)
    assert reason is not None and files.MANIFEST in reason


def test_remove_unseals_and_deletes(sealed):
    files.remove(sealed)
    assert not sealed.exists()
    files.remove(sealed)  # removing twice is harmless


def test_atomic_write_json_replaces_without_leftovers(tmp_path):
    path = tmp_path / "index.json"
    files.atomic_write_json(path, {"a": 1})
    files.atomic_write_json(path, {"a": 2})
    assert files.read_json(path) == {"a": 2}
    assert [p.name for p in tmp_path.iterdir()] == ["index.json"]


# ---------------------------------------------------------------- temporary dirs and publishing


def sealed_dir(path, step):
    path.mkdir(parents=True)
    files.write_json(path / "state.json", {"step": step})
    files.seal(path)
    return path


def step_of(path):
    assert files.verify(path) is None
    return files.read_json(path / "state.json")["step"]


def test_temporary_dir_removes_a_stale_leftover(tmp_path):
    dest = tmp_path / "last"
    stale = tmp_path / ".last.tmp"
    (stale / "sub").mkdir(parents=True)
    (stale / "model.safetensors").write_bytes(b"half written")
    tmp = files.temporary_dir(dest)
    assert tmp == stale and tmp.is_dir() and list(tmp.iterdir()) == []
    assert not dest.exists()


def test_temporary_dir_recycles_an_older_checkpoint_unsealed_with_only_the_kept_files(tmp_path):
    old = sealed_dir(tmp_path / "previous", 1)
    tensors.write_tensors(old / "big.safetensors", {"w": torch.arange(1000, dtype=torch.float32)})
    (old / "stale.json").write_text("{}")
    inode = (old / "big.safetensors").stat().st_ino

    tmp = files.temporary_dir(tmp_path / "last", recycle=old, keep=("big.safetensors",))
    assert tmp == tmp_path / ".last.tmp" and not old.exists()
    assert [p.name for p in tmp.iterdir()] == ["big.safetensors"], "no manifest, nothing but the kept file"
    # Overwritten in place (same inode) and cut to the new, shorter length.
    tensors.write_tensors(tmp / "big.safetensors", {"w": torch.arange(10, dtype=torch.float32)})
    assert (tmp / "big.safetensors").stat().st_ino == inode
    assert torch.equal(load_file(tmp / "big.safetensors")["w"], torch.arange(10, dtype=torch.float32))


def test_temporary_dir_does_not_recycle_what_is_not_a_sealed_checkpoint(tmp_path):
    unsealed = tmp_path / "previous"
    (unsealed / "x").mkdir(parents=True)
    tmp = files.temporary_dir(tmp_path / "last", recycle=unsealed)
    assert list(tmp.iterdir()) == [] and (unsealed / "x").is_dir()


SLOT_NAMES = ("last", "previous", "older")


def slots(tmp_path):
    return [tmp_path / name for name in SLOT_NAMES]


def test_shift_in_into_empty_slots(tmp_path):
    placed = files.shift_in(sealed_dir(tmp_path / ".last.tmp", 1), slots(tmp_path), [])
    assert placed == [tmp_path / "last"] and step_of(tmp_path / "last") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last"]


def test_shift_in_moves_the_newest_down_and_drops_what_no_longer_fits(tmp_path):
    current = []
    for step in (1, 2, 3, 4):
        current = files.shift_in(sealed_dir(tmp_path / ".last.tmp", step), slots(tmp_path), current)
    assert current == slots(tmp_path)
    assert [step_of(path) for path in current] == [4, 3, 2]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last", "older", "previous"]


def test_shift_in_sets_aside_a_damaged_slot_and_keeps_the_good_ones_in_order(tmp_path):
    # After a fallback: `last` is damaged, `previous` and `older` are the good states.
    (tmp_path / "last").mkdir()
    (tmp_path / "last" / "state.json").write_text("{broken")
    sealed_dir(tmp_path / "previous", 2)
    sealed_dir(tmp_path / "older", 1)
    placed = files.shift_in(sealed_dir(tmp_path / ".last.tmp", 3), slots(tmp_path),
                            [tmp_path / "previous", tmp_path / "older"])
    assert [step_of(path) for path in placed] == [3, 2, 1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last", "older", "previous"]


def test_shift_in_keeps_each_checkpoint_whole_whatever_rename_a_crash_stops_at(tmp_path, monkeypatch):
    for stop_at in range(3):
        root = tmp_path / str(stop_at)
        for step, name in ((3, "last"), (2, "previous"), (1, "older")):
            sealed_dir(root / name, step)
        renames, real_rename = [], type(root).rename

        def rename(self, target, renames=renames, stop_at=stop_at):
            if len(renames) == stop_at:
                raise KeyboardInterrupt  # a crash at this rename
            renames.append(target)
            return real_rename(self, target)

        monkeypatch.setattr(type(root), "rename", rename)
        with pytest.raises(KeyboardInterrupt):
            files.shift_in(sealed_dir(root / ".last.tmp", 4), slots(root), [root / "last", root / "previous"])
        monkeypatch.undo()
        steps = sorted(step_of(path) for path in root.iterdir() if files.verify(path) is None)
        assert steps[-2:] == [3, 4] or steps[-3:] == [2, 3, 4], (stop_at, steps)


def test_publish_without_keep_previous_replaces_dest(tmp_path):
    dest = tmp_path / "best"
    sealed_dir(dest, 1)
    files.publish(sealed_dir(tmp_path / ".best.tmp", 2), dest)
    assert step_of(dest) == 2
    assert [p.name for p in tmp_path.iterdir()] == ["best"]


def test_publish_clears_a_stale_trash_dir(tmp_path):
    dest = tmp_path / "best"
    sealed_dir(dest, 1)
    (tmp_path / ".best.trash" / "x").mkdir(parents=True)
    files.publish(sealed_dir(tmp_path / ".best.tmp", 2), dest)
    assert step_of(dest) == 2
    assert [p.name for p in tmp_path.iterdir()] == ["best"]
