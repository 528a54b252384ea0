"""The run directory: what its checkpoints are called, the index, which checkpoint a resume can
use, clearing an earlier run, and what changed since a checkpoint was written.

    {ckpt_dir}/{title}/
        config.json          resolved config of the latest start
        metrics.jsonl        every logged metric
        checkpoints.json     index of the kept checkpoints (paths relative to the run directory)
        last/                full state: model, optimizer, scheduler, RNG per process, training state
        previous/            the full state before `last`, the fallback (recycled by the next save)
        best/                weights of the best evaluation so far
        top/epoch003-step000120/   weights of each top-k evaluation
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from ..config import ConfigError
from . import files
from .top_k import Entry

LAST, PREVIOUS, BEST, TOP = "last", "previous", "best", "top"
INDEX = "checkpoints.json"
# What a fresh run with overwrite removes: the earlier run's checkpoints and what it logged.
EARLIER_RUN = (LAST, PREVIOUS, BEST, TOP, INDEX, "metrics.jsonl", "wandb", "tensorboard")


class RunDir:
    """Names and lookups in one run directory; the Checkpointer decides what is written there."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    @staticmethod
    def top_name(epoch: int, step: int) -> str:
        return f"{TOP}/epoch{epoch:03d}-step{step:07d}"

    @staticmethod
    def temporary(dest: Path) -> Path:
        """Where a checkpoint bound for `dest` is written before it is published (files.temporary_dir)."""
        return dest.with_name(f".{dest.name}.tmp")

    def has_checkpoints(self) -> bool:
        return any((self.path / name).exists() for name in (LAST, PREVIOUS, BEST, TOP, INDEX))

    def fresh_start_overwrites(self, resume, overwrite: bool) -> bool:
        """Whether this run starts afresh over an earlier run's checkpoints, which it must delete
        first (the one rule; the command line checks it before anything slow, without torch).

        Raises:
            ConfigError: resume is false, the directory holds checkpoints and overwrite is false.
        """
        if resume is not False or not self.has_checkpoints():
            return False
        if not overwrite:
            raise ConfigError(
                f"run directory {self.path} already holds checkpoints of an earlier run: set "
                "experiment_options.resume=true to continue it, experiment_options.title=NAME to start another run "
                "beside it, or experiment_options.overwrite=true to delete it (on the command line: --set KEY=VALUE).")
        return True

    def prepare(self, resume, overwrite: bool, accelerator) -> None:
        """Refuse to train a fresh run over earlier checkpoints unless `overwrite` deletes them.

        Raises:
            ConfigError: the run directory holds checkpoints, resume is false and overwrite is not set.
        """
        if self.fresh_start_overwrites(resume, overwrite):
            if accelerator.is_main_process:
                self.clear()
            accelerator.wait_for_everyone()

    def clear(self) -> None:
        """Delete an earlier run's checkpoints and logs (a fresh run with overwrite, main process only)."""
        for name in EARLIER_RUN:
            path = self.path / name
            if name in (LAST, PREVIOUS, BEST):
                files.remove(path)
            elif path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)

    def write_index(self, index: dict) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        files.atomic_write_json(self.path / INDEX, index)

    def find_resumable(self, path: Path | None = None) -> tuple[Path | None, list[str]]:
        """The checkpoint to resume from and the reasons any candidate was passed over.

        With no path: the newest of `last` and `previous` whose manifest verifies.
        """
        candidates = [Path(path)] if path else [self.path / LAST, self.path / PREVIOUS]
        usable, skipped = [], []
        for candidate in candidates:
            if not candidate.exists():
                continue
            if reason := files.verify(candidate):
                skipped.append(reason)
                continue
            usable.append((files.read_json(candidate / "state.json")["step"], candidate))
        return (max(usable)[1] if usable else None), skipped

    def verified_entries(self) -> tuple[list[Entry], Entry | None]:
        """The top-k entries and the best entry whose directories verify, from their meta.json."""
        found = {}
        for meta_file in sorted(self.path.glob(f"{TOP}/*/meta.json")):
            if files.verify(meta_file.parent) is None:
                meta = files.read_json(meta_file)
                found[meta["path"]] = Entry(meta["path"], meta["epoch"], meta["step"], meta["value"])
        best = None
        if files.verify(self.path / BEST) is None:
            meta = files.read_json(self.path / BEST / "meta.json")
            best = Entry(BEST, meta["epoch"], meta["step"], meta["value"])
        return list(found.values()), best


# Settings whose change between a checkpoint and its resume changes what "the next batch" means.
RESUME_SENSITIVE = ("dataset_options.batch_size", "training_options.gradient_accumulation_steps", "training_options.seed")


class RunSignature:
    """What a resume compares with the run that wrote the checkpoint; saved in every `last`.

    Args:
        config: the resolved config as JSON.
        num_processes: processes of this run.
        train_rows / fingerprint: size and datasets content hash of the training split.
        total_steps: the length of the learning-rate schedule.
    """

    def __init__(self, config: dict, num_processes: int, train_rows: int, fingerprint: str, total_steps: int):
        self.current = {"config": config, "num_processes": num_processes, "total_steps": total_steps,
                        "data": {"train_rows": train_rows, "train_fingerprint": fingerprint}}
        self.changes: list[str] = []  # what differs from the checkpoint loaded last

    def state_dict(self) -> dict[str, Any]:
        return self.current

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.changes = changes_since(state_dict, self.current)


def changes_since(saved: dict, current: dict) -> list[str]:
    """Messages for what differs between a checkpoint's run (`saved`) and this one: settings that
    change the data order, the number of processes, the schedule's length, the training data."""
    old, new, changes = saved["config"], current["config"], []
    for dotted in RESUME_SENSITIVE:
        section, key = dotted.split(".")
        if old[section][key] != new[section][key]:
            changes.append(f"resume: {dotted} changed from {old[section][key]} to {new[section][key]}; "
                           "the data order within the epoch will differ from the original run.")
    if saved["num_processes"] != current["num_processes"]:
        changes.append(f"resume: the checkpoint was written by {saved['num_processes']} processes, this run has "
                       f"{current['num_processes']}; the rest of the current epoch is resharded.")
    if saved.get("total_steps", current["total_steps"]) != current["total_steps"]:
        changes.append(f"resume: the learning-rate schedule now spans {current['total_steps']} optimizer steps instead of "
                       f"{saved['total_steps']} (training_options.n_epochs or max_steps changed); the learning rate "
                       "follows the new schedule from the resumed step on.")
    if saved["data"]["train_fingerprint"] != current["data"]["train_fingerprint"]:
        changes.append(f"resume: the training data changed since the checkpoint (fingerprint "
                       f"{saved['data']['train_fingerprint']} -> {current['data']['train_fingerprint']}, "
                       f"{saved['data']['train_rows']} -> {current['data']['train_rows']} rows).")
    return changes
