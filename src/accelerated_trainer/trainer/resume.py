"""The run directory and resume: whether a run may start there, which checkpoint it continues
from, and what changed since that checkpoint was written.

Which checkpoints exist and which of them is usable is the Checkpointer's; this module turns
experiment_options.resume / overwrite into calls to it, and its findings into messages.
"""

from __future__ import annotations

from pathlib import Path

from ..checkpoint import Checkpointer
from ..config import ConfigError, ExperimentOptions, TrainingOptions
from .report import say
from .state import TrainingState

# Settings whose change between a checkpoint and its resume changes what "the next batch" means.
RESUME_SENSITIVE = ("dataset_options.batch_size", "training_options.gradient_accumulation_steps", "training_options.seed")


def prepare_run_dir(checkpointer: Checkpointer, experiment: ExperimentOptions, run_dir: Path) -> None:
    """Refuse to train over earlier checkpoints unless the config resumes or overwrites them.

    Raises:
        ConfigError: the run directory holds checkpoints, resume is false and overwrite is not set.
    """
    if experiment.resume is False and checkpointer.has_checkpoints():
        if not experiment.overwrite:
            raise ConfigError(
                f"run directory {run_dir} already holds checkpoints. Set experiment_options.resume to true to "
                "continue it, choose another experiment_options.title, or set experiment_options.overwrite to true "
                "to delete them."
            )
        checkpointer.clear()


def find_checkpoint(checkpointer: Checkpointer, resume: bool | str | Path, run_dir: Path, accelerator) -> Path | None:
    """The checkpoint to resume from, or None to start afresh; says which ones it passed over.

    Raises:
        ConfigError: `resume` names a checkpoint that is not usable.
    """
    if resume is False:
        return None
    path = None if resume is True else Path(resume)
    found, skipped = checkpointer.find_resumable(path)
    for reason in skipped:
        say(accelerator, f"resume: passing over a checkpoint: {reason}")
    if found is None:
        if path is not None:
            raise ConfigError(f"experiment_options.resume: {path} is not a usable checkpoint ({'; '.join(skipped) or 'not found'}).")
        say(accelerator, f"resume: no checkpoint in {run_dir}; starting a fresh run.")
    return found


def changes_since(saved: dict, config: dict, num_processes: int, fingerprint: str, train_rows: int) -> list[str]:
    """Messages for what differs between a checkpoint's run (`saved`) and this one: settings
    that change the data order, the number of processes, the training data."""
    old, changes = saved["config"], []
    for dotted in RESUME_SENSITIVE:
        section, key = dotted.split(".")
        if old[section][key] != config[section][key]:
            changes.append(f"resume: {dotted} changed from {old[section][key]} to {config[section][key]}; "
                           "the data order within the epoch will differ from the original run.")
    if saved["num_processes"] != num_processes:
        changes.append(f"resume: the checkpoint was written by {saved['num_processes']} processes, this run has "
                       f"{num_processes}; the rest of the current epoch is resharded.")
    if saved["data"]["train_fingerprint"] != fingerprint:
        changes.append(f"resume: the training data changed since the checkpoint (fingerprint "
                       f"{saved['data']['train_fingerprint']} -> {fingerprint}, "
                       f"{saved['data']['train_rows']} -> {train_rows} rows).")
    return changes


def stop_reason_before_start(state: TrainingState, training: TrainingOptions) -> str | None:
    """Why a resumed run has nothing left to do, or None."""
    if state.epoch >= training.n_epochs:
        return f"completed {training.n_epochs} epochs (already done in the resumed checkpoint)"
    if training.max_steps and state.step >= training.max_steps:
        return f"reached max_steps={training.max_steps} (already done in the resumed checkpoint)"
    return None
