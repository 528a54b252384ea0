"""A finished run whose directory every fault test checks is left exactly as it was."""

import hashlib
from pathlib import Path

import pytest


from accelerated_trainer import AcceleratedTrainer
from accelerated_trainer.checkpoint.files import verify

from conftest import digits_config


def snapshot(run_dir: Path) -> dict[str, str]:
    return {str(p.relative_to(run_dir)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(run_dir.rglob("*")) if p.is_file()}


@pytest.fixture
def finished_run(tmp_path):
    """A 2-epoch digits run in tmp_path; returns (config, run_dir, snapshot)."""
    config = digits_config(tmp_path, training_options={"n_epochs": 2})
    AcceleratedTrainer(None, config).train()
    run_dir = tmp_path / "digits-mlp"
    return config, run_dir, snapshot(run_dir)


def assert_intact(run_dir: Path, before: dict[str, str]) -> None:
    assert snapshot(run_dir) == before, "the run directory changed"
    for checkpoint in ("last", "previous", "best"):
        assert verify(run_dir / checkpoint) is None
