"""checkpoint/run_dir.py, the run directory rule: a fresh run never starts over an earlier run's checkpoints unless told to."""

import pytest

from accelerated_trainer.checkpoint.run_dir import SLOTS, RunDir
from accelerated_trainer.config import ConfigError, ExperimentOptions

CHECKPOINT_ENTRIES = (*SLOTS, "best", "top", "checkpoints.json")


def fresh_start_overwrites(experiment, run_dir):
    return RunDir(run_dir).fresh_start_overwrites(experiment.resume, experiment.overwrite)


def holds_checkpoints(run_dir):
    return RunDir(run_dir).has_checkpoints()


@pytest.mark.parametrize("entries, resume, overwrite, expected", [
    ([], False, False, False),                    # nothing there: start
    (["metrics.jsonl", "config.json", "wandb"], False, False, False),  # no checkpoint: start
    (["last"], False, False, "refused"),
    (["checkpoints.json"], False, False, "refused"),  # the index alone: a run died between saves
    (["top"], False, True, True),                 # overwrite: delete, then start
    (["last", "best"], True, False, False),       # resume: nothing to delete
    (["last"], True, True, False),                # resume wins over overwrite
    (["last"], "runs/other/last", False, False),  # resume from a path
    ([], False, True, False),                     # overwrite with nothing there: nothing to delete
])
def test_fresh_start_overwrites(tmp_path, entries, resume, overwrite, expected):
    for name in entries:
        (tmp_path / name).mkdir()
    experiment = ExperimentOptions(resume=resume, overwrite=overwrite)
    if expected == "refused":
        with pytest.raises(ConfigError) as refused:
            fresh_start_overwrites(experiment, tmp_path)
        message = str(refused.value)
        assert str(tmp_path) in message and "\n" not in message
        for fix in ("experiment_options.resume=true", "experiment_options.title=", "experiment_options.overwrite=true"):
            assert fix in message
    else:
        assert fresh_start_overwrites(experiment, tmp_path) is expected
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(entries), "the rule never changes the directory"


def test_every_checkpoint_entry_counts(tmp_path):
    assert not holds_checkpoints(tmp_path / "absent")
    for name in CHECKPOINT_ENTRIES:
        (tmp_path / name).touch()
        assert holds_checkpoints(tmp_path)
        (tmp_path / name).unlink()
