"""A checkpoint write that fails leaves every earlier checkpoint and the index intact."""

import errno
import json

import pytest

from accelerated_trainer import AcceleratedTrainer, checkpoint
from accelerated_trainer.checkpoint import tensors
from accelerated_trainer.checkpoint.files import CheckpointError, verify

from conftest import digits_config


def fail_on_write(monkeypatch, nth, error):
    """Make the nth weights file write (any checkpoint) fail with `error`."""
    real = tensors.write_tensors
    calls = {"n": 0}

    def write_tensors(path, *args, **kwargs):
        calls["n"] += path.name == checkpoint.WEIGHTS
        if calls["n"] == nth and path.name == checkpoint.WEIGHTS:
            raise error
        return real(path, *args, **kwargs)

    monkeypatch.setattr(tensors, "write_tensors", write_tensors)


def index_matches_disk(run_dir):
    index = json.loads((run_dir / "checkpoints.json").read_text())
    listed = sorted(e["path"] for e in index["top_k"])
    on_disk = sorted(str(p.relative_to(run_dir)) for p in (run_dir / "top").iterdir())
    return listed == on_disk and all(verify(run_dir / path) is None for path in listed)


def test_disk_full_stops_with_every_checkpoint_intact(tmp_path, monkeypatch):
    # Epoch 1 writes top, best, last (3 files); epoch 2: top, best, then last fails.
    fail_on_write(monkeypatch, 6, OSError(errno.ENOSPC, "No space left on device"))
    config = digits_config(tmp_path, training_options={"n_epochs": 3})
    with pytest.raises(CheckpointError) as err:
        AcceleratedTrainer(None, config).train()
    assert "No space left on device" in str(err.value) and "earlier checkpoints" in str(err.value)
    run_dir = tmp_path / "digits-mlp"
    assert verify(run_dir / "last") is None
    assert json.loads((run_dir / "last" / "state.json").read_text())["step"] == 23
    assert json.loads((run_dir / "checkpoints.json").read_text())["last"]["step"] == 23
    assert not list(run_dir.glob(".*tmp*")), "no half-written checkpoint is left behind"
    assert index_matches_disk(run_dir)


def test_permission_denied_with_continue_policy_trains_on(tmp_path, monkeypatch, capsys):
    fail_on_write(monkeypatch, 2, PermissionError(errno.EACCES, "Permission denied"))
    config = digits_config(tmp_path, training_options={"n_epochs": 3},
                           experiment_options={"on_save_error": "continue"})
    result = AcceleratedTrainer(None, config).train()
    assert result.steps == 69
    assert "Permission denied" in capsys.readouterr().out
    run_dir = tmp_path / "digits-mlp"
    assert json.loads((run_dir / "last" / "state.json").read_text())["step"] == 69
    assert index_matches_disk(run_dir)
