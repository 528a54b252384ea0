"""Whether a run may start in its run directory: the one rule, without torch.

The command line checks it right after loading the config, so a collision with an earlier run
is refused in a fraction of a second instead of after the data, the model and accelerate are
set up; the trainer applies the same function before it deletes or writes anything.
"""

from __future__ import annotations

from pathlib import Path

from .config import ConfigError, ExperimentOptions

# What an earlier run leaves that a fresh start would mix with or lose: the checkpoints and their index.
CHECKPOINT_ENTRIES = ("last", "previous", "best", "top", "checkpoints.json")


def holds_checkpoints(run_dir: Path) -> bool:
    """Whether `run_dir` holds checkpoints (or their index) of an earlier run."""
    return any((Path(run_dir) / name).exists() for name in CHECKPOINT_ENTRIES)


def fresh_start_overwrites(experiment: ExperimentOptions, run_dir: Path) -> bool:
    """Whether this run starts afresh over an earlier run's checkpoints, which it must delete first.

    Returns:
        True when resume is false, `run_dir` holds checkpoints and overwrite is true; False when
        there is nothing to delete or the run resumes.
    Raises:
        ConfigError: resume is false, `run_dir` holds checkpoints and overwrite is false.
    """
    if experiment.resume is not False or not holds_checkpoints(run_dir):
        return False
    if not experiment.overwrite:
        raise ConfigError(
            f"run directory {run_dir} already holds checkpoints of an earlier run: set experiment_options.resume=true "
            "to continue it, experiment_options.title=NAME to start another run beside it, or "
            "experiment_options.overwrite=true to delete it (on the command line: --set KEY=VALUE).")
    return True
