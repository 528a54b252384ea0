"""The run directory: what its checkpoints are called, the index, which checkpoint a resume can
use, clearing an earlier run, and what changed since a checkpoint was written.

    {ckpt_dir}/{title}/
        config.json          resolved config of the latest start
        metrics.jsonl        every logged metric
        checkpoints.json     index of the kept checkpoints (paths relative to the run directory)
        last/                full state: model, optimizer, scheduler, RNG per process, training state
        previous/            the full state before `last`: the fallback
        older/               the full state before `previous`, rewritten by the next save of `last`
        best/                weights of the best evaluation so far
        top/epoch003-step000120/   weights of each top-k evaluation
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import time
from pathlib import Path
from typing import Any

from ..config import ConfigError
from . import files
from .top_k import Entry

LAST, PREVIOUS, OLDER, BEST, TOP = "last", "previous", "older", "best", "top"
# The full states, newest first. A save of `last` writes into a slot other than the two newest
# complete ones, so a save in flight, a failed one or a crash leaves two complete states.
SLOTS = (LAST, PREVIOUS, OLDER)
INDEX = "checkpoints.json"
# What a fresh run with overwrite removes: the earlier run's checkpoints and what it logged.
EARLIER_RUN = (*SLOTS, BEST, TOP, INDEX, "metrics.jsonl", "wandb", "wandb.log", "tensorboard")


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
        names = (*SLOTS, BEST, TOP, INDEX)
        return any((self.path / name).exists() for name in names) or files.verify(self.temporary(self.path / LAST)) is None

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
            if name in (*SLOTS, BEST):
                files.remove(path)
            elif path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)

    def write_index(self, index: dict) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        files.atomic_write_json(self.path / INDEX, index)

    def find_resumable(self, path: Path | None = None) -> tuple[Path | None, list[str], list[str]]:
        """The checkpoint to resume from, the reasons any candidate was passed over, and the slots
        that hold complete checkpoints (newest first; with `path`, only that one is looked at).

        With no path: the newest by step of `last`, `previous` and `older` whose manifest
        verifies; on equal steps the first of them.
        """
        if path is not None:
            reason = files.verify(Path(path)) if Path(path).exists() else None
            found = Path(path) if Path(path).exists() and reason is None else None
            return found, [reason] if reason else [], []
        usable, skipped = [], []
        for order, name in enumerate(SLOTS):
            if not (self.path / name).exists():
                continue
            if reason := files.verify(self.path / name):
                skipped.append(reason)
                continue
            usable.append((-self.step_of(self.path / name), order, name))
        good = [name for _, _, name in sorted(usable)]
        return (self.path / good[0] if good else None), skipped, good

    @staticmethod
    def step_of(checkpoint: Path) -> int:
        return files.read_json(checkpoint / "state.json")["step"]

    def recover_interrupted_save(self) -> str | None:
        """Complete a save of `last` that a crash cut short after its seal: a complete `.last.tmp`
        newer than every slot becomes `last` (the slots move down). Returns what it did, or None."""
        tmp = self.temporary(self.path / LAST)
        if not tmp.is_dir() or files.verify(tmp) is not None:
            return None
        _, _, good = self.find_resumable()
        step = self.step_of(tmp)
        if good and self.step_of(self.path / good[0]) >= step:
            return None
        files.shift_in(tmp, [self.path / name for name in SLOTS], [self.path / name for name in good])
        return f"resume: completed the save of step {step} that was interrupted after it was written; it is now {LAST}."

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


class RunLock:
    """One live run per run directory: an exclusive flock on {run_dir}/.lock.json, taken by the main
    process before anything in the directory changes and held until the run ends.

    The kernel releases the lock when its holder dies, however it dies, so a killed run leaves
    no lock to clean up: the next run takes it and says whose it was (the holder writes its
    host, pid and start time into the file). Across nodes this relies on the shared file
    system's locks (NFSv4, Lustre mounted with -o flock, GPFS, BeeGFS and CephFS have them); one
    without them is reported and the run goes on unlocked.
    """

    def __init__(self, run_dir: RunDir):
        self.path = run_dir.path / ".lock.json"
        self._fd: int | None = None

    def acquire(self) -> str | None:
        """Take the lock; a message when it took over from a run that died, else None.

        Raises:
            ConfigError: a live run holds the directory (its host, pid and start time named).
        """
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise ConfigError(
                f"run directory {self.path.parent} is in use by a run that is still going: {holder}. Wait for it to "
                "end, stop it, or choose another experiment_options.title.") from None
        except OSError as err:
            os.close(fd)
            if err.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                return (f"warning: the file system of {self.path.parent} does not support file locks ({err.strerror}): "
                        "nothing stops a second run from using this run directory at the same time.")
            raise
        earlier = _read_holder(fd) if os.fstat(fd).st_size else None
        os.ftruncate(fd, 0)
        started = time.strftime("%Y-%m-%d %H:%M:%S %Z")
        os.pwrite(fd, json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "started": started}).encode(), 0)
        os.fsync(fd)
        self._fd = fd
        return f"run directory: took over the lock of a run that ended without releasing it ({earlier})." if earlier else None

    def release(self) -> None:
        """Give the lock up (an empty file: the next run knows this one ended cleanly)."""
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
            os.close(self._fd)  # closing the file releases the flock
            self._fd = None


def _read_holder(fd: int) -> str:
    try:
        holder = json.loads(os.pread(fd, 4096, 0) or b"{}")
        return f"host {holder['host']}, pid {holder['pid']}, started {holder['started']}"
    except (ValueError, KeyError):
        return "a run that left no details"


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
