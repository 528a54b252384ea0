"""The Checkpointer: when to save what, what a failed write does, and resuming.

The trainer calls it at a few points (torchtitan's shape):

    resume()                          refuse or clear the run directory, find, load, report
    before_optimizer_step()           an asynchronous save may still be copying the state
    on_step(epoch, step)              `last` every save_every_n_steps
    on_epoch_end(epoch, step)         `last` at every epoch end
    on_evaluation(metrics, epoch, step)   top-k and best by the monitored metric
    finish(epoch, step)               `last` unless already saved at this step, then wait for it

It saves a registry {name: Stateful} (states.py) through a store into the layout of run_dir.py:
FullStore (store.py), written by the main process, or for a sharded model (DTensor parameters,
FSDP2) ShardedStore (sharded.py), every process writing its shards; each checkpoint is read by
the store of its own kind, whatever the model is now. Every directory is sealed with a
manifest and renamed into place only when complete; an old checkpoint is deleted only after
its replacement is in place. A save of `last` is written into a slot without a complete
checkpoint, or over `older` (files.temporary_dir), so while a save is in flight, or after one
failed, `last` and `previous` are both whole; the slots shift only once it is sealed.

A failed write (disk full, permission denied) is a CheckpointError on every process; under
on_save_error "continue" it is reported and training goes on, under "stop" it is raised.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable

from ..config import CheckpointOptions, ConfigError
from ..distributed import any_process, first_error, from_main
from ..monitor import is_improvement, rank_key
from ..tracking import say
from . import files
from .async_writer import PendingSave
from .files import CheckpointError
from .run_dir import BEST, INDEX, LAST, SLOTS, RunDir, RunLock, RunSignature
from .states import MODEL, RNG, RNGState
from .sharded import ShardedStore, is_sharded_checkpoint
from .store import WEIGHTS, FullStore, write_weights_dir
from .top_k import Entry, select_top_k

__all__ = ["INDEX", "WEIGHTS", "Checkpointer"]

# An epoch end's asynchronous `last` waits until the save before it took at most this share of
# the time since that one began. A save in flight slows the training thread by about half of its
# own duration on 2 cores (bench_step.py's small-epochs workload: steps during a save 1.2 ms, the
# others 0.64 ms); on epochs shorter than a few saves the background writer then takes a tenth of
# the run at most, not all of it. Epochs longer than ten saves are each saved, as before.
EPOCH_SAVE_SHARE = 0.1
# While an epoch end's save waits, several processes agree whether it may go every this many
# steps (a collective each time); one process asks at every step (no collective).
DUE_CHECK_EVERY = 8


class Checkpointer:
    """Saves and resumes the states of one run directory.

    Args:
        run_dir: the run directory.
        accelerator: the run's Accelerator; only its main process writes files (and, for a
            sharded model, each process its own shards).
        options: the checkpoint settings (config.checkpoint).
        states: the resumable state, {name: Stateful}; must hold "model" (a ModelState) and
            "optimizer". The Checkpointer adds each process's RNG, its own lists and `signature`.
        signature: what a resume compares with the run that wrote the checkpoint.
        guard: called before every `last` save; raises if the state must not be saved (a
            diverged loss).
    """

    def __init__(self, run_dir: Path, accelerator, options: CheckpointOptions, states: dict, *,
                 signature: RunSignature | None = None, guard: Callable[[], None] = lambda: None):
        self.run_dir = RunDir(run_dir)
        self.accelerator = accelerator
        self.options = options
        self.states = {**states, RNG: RNGState(), "checkpoints": self}
        if signature is not None:
            self.states["run"] = signature
        self.signature, self.guard = signature, guard
        self.store = ShardedStore(accelerator) if states[MODEL].sharded else FullStore(accelerator)
        self.kept: list[Entry] = []
        self.best: Entry | None = None
        self.last: Entry | None = None
        self._good: list[str] = []  # the slots holding complete checkpoints, newest first (main process)
        self.lock = RunLock(self.run_dir)
        self.failure: str | None = None  # the latest write that failed under on_save_error "continue"
        self.unsaved: str | None = None  # set by finish() when the final state is not in `last`
        self._pending: PendingSave | None = None
        self._due = False  # an epoch end's `last` waits for the save in flight (see on_epoch_end)
        self._last_async_save_at: float | None = None  # time.perf_counter() of the latest asynchronous save

    # ------------------------------------------------------------ what the trainer calls

    def resume(self) -> bool:
        """Take the run directory, prepare it and load the checkpoint the config resumes from, if any.

        Returns whether a checkpoint was loaded.

        Raises:
            ConfigError: another live run holds the run directory; it holds checkpoints and
                neither resume nor overwrite is set; resume is set and none of its checkpoints
                can be resumed from; or `resume` names a checkpoint that is not usable.
        """
        self._lock()
        self.run_dir.prepare(self.options.resume, self.options.overwrite, self.accelerator)
        if self.options.resume is True:
            if self.accelerator.is_main_process and (recovered := self.run_dir.recover_interrupted_save()):
                say(self.accelerator, recovered)
            self.accelerator.wait_for_everyone()
        found = self._find_resumable()
        if found is None:
            return False
        saved = self.load(found)
        for change in self.signature.changes if self.signature else ():
            say(self.accelerator, change)
        say(self.accelerator, f"resume: continuing from {found} at epoch {saved['epoch']}, step {saved['step']}.")
        return True

    def before_optimizer_step(self) -> None:
        """Hold the optimizer step until a save in flight has copied what the step changes."""
        if self._pending is not None:
            self._pending.captured.wait()

    def on_step(self, epoch: int, step: int) -> None:
        every = self.options.save_every_n_steps
        if every and step % every == 0:
            self._due = False  # this one holds a newer state than a due epoch end's
            self._save_last_guarded(epoch, step)
        elif self._due and (self.accelerator.num_processes == 1 or step % DUE_CHECK_EVERY == 0) and self._may_save_again():
            self._due = False
            self._save_last_guarded(epoch, step)

    def on_epoch_end(self, epoch: int, step: int) -> None:
        """The epoch end's `last`. Asynchronous, it never waits for the save before it: while that
        one is still being written (it is hurried on), or began less than 1 / EPOCH_SAVE_SHARE
        times its own duration ago, this one is due, and taken with the state of that moment at
        the first step after that (the newest state wins), unless a save_every_n_steps save comes
        first. Steps named by save_every_n_steps are saved at that step; the end of training, an
        evaluation and a preemption wait for the save in flight."""
        if self.options.async_save and self._pending is not None and not self._may_save_again():
            self._due = True
            self._pending.hurry()
            return
        self._due = False
        self._save_last_guarded(epoch, step)

    def _may_save_again(self) -> bool:
        """Whether the save before took at most EPOCH_SAVE_SHARE of the time since it began,
        agreed (only the main process writes; all decide alike)."""
        waiting = self._pending is not None and not self._pending.took_at_most(EPOCH_SAVE_SHARE)
        return not any_process(self.accelerator, waiting)

    def on_evaluation(self, metrics: dict[str, float], epoch: int, step: int) -> None:
        """Record an evaluation: top-k and best by the monitored metric (the same gathered
        metrics on every process, so every process takes the same decision)."""
        self._guarded(self.wait)  # a `last` save still in flight reports first
        value = metrics[self.options.monitor]
        self._guarded(lambda: self.maybe_save_top(value, epoch, step, metrics))

    def finish(self, epoch: int, step: int) -> None:
        """End of training: `last` holds the final state and every save is on disk.

        Under on_save_error "continue", `unsaved` then says why the final state is not in `last`
        (None when it is).
        """
        try:
            if self.last is None or self.last.step != step:
                self._save_last_guarded(epoch, step)
            self._guarded(self.wait)
        finally:
            self.store.release()  # nothing is in flight any more
            self.lock.release()
        if self.last is None or self.last.step != step:
            held = f"`last` holds step {self.last.step}" if self.last else "no `last` checkpoint was written"
            self.unsaved = f"the final state (step {step}) was not saved: {self.failure}; {held}."

    def abort(self) -> None:
        """After a failure: let this process's save in flight finish, so the last good state is
        kept, without talking to the others (they may never get here). Never raises."""
        try:
            self.wait(agree=False)
        except Exception:
            pass
        self.store.release()
        self.lock.release()

    def _lock(self) -> None:
        error = None
        if self.accelerator.is_main_process:
            try:
                if taken_over := self.lock.acquire():
                    say(self.accelerator, taken_over)
            except ConfigError as err:
                error = str(err)
        if error := first_error(self.accelerator, error):
            raise ConfigError(error)

    # ------------------------------------------------------------ saving

    def _guarded(self, action: Callable[[], object]) -> None:
        """Run a checkpoint write under on_save_error."""
        try:
            action()
        except CheckpointError as err:
            if self.options.on_save_error == "stop":
                raise
            self.failure = str(err)
            say(self.accelerator, f"warning: {err} Training goes on (experiment_options.on_save_error: continue).")

    def _save_last_guarded(self, epoch: int, step: int) -> None:
        self.guard()
        self._guarded(self.wait)  # the save before, if still in flight, reports first
        self._guarded(lambda: self.save_last(epoch, step))

    def save_last(self, epoch: int, step: int, asynchronous: bool | None = None) -> Path:
        """Write the full resumable state to `last`; the two before it stay `previous` and `older`.

        The new state is written into a slot that holds no complete checkpoint, or else over
        the files of `older`: until it is complete, `last` and `previous` are untouched, so a
        crash or a failed write mid-save leaves two full states. Asynchronous (the default of
        options.async_save), it is written on a background thread and `wait()`, which the next
        save calls, reports how it went.

        Raises:
            CheckpointError: on every process, when any write failed; `last`, `previous`, the
                index and the lists are then as they were. Asynchronous: from `wait()`.
        """
        asynchronous = self.options.async_save if asynchronous is None else asynchronous
        self.wait()
        dest = self.run_dir / LAST
        tmp = RunDir.temporary(dest)
        previous_last = self.last
        # The state captured below already names this checkpoint as `last`.
        self.last = Entry(LAST, epoch, step)
        try:
            capture = self.store.capture(self.states, asynchronous)
        except CheckpointError:
            self.last = previous_last
            raise
        index = self._index()

        def write(captured: Callable[[], None], pause: float | Callable[[], float]) -> None:
            checksums = self.store.write(capture, tmp, captured, pause, prepare=lambda: self._prepare_slot(dest))
            if not self.accelerator.is_main_process:  # a sharded store's other process: its shards are written
                return
            # No read-back verify here: right after writing it would hash the page cache, not the
            # disk. Resume verifies every file against the manifest.
            files.seal(tmp, checksums)
            try:
                placed = files.shift_in(tmp, [self.run_dir / name for name in SLOTS], [self.run_dir / name for name in self._good])
            except OSError:
                self._good = self.run_dir.find_resumable()[2]  # some renames may have happened
                raise
            self._good = [path.name for path in placed]
            files.atomic_write_json(self.run_dir / INDEX, index)

        writes_here = self.accelerator.is_main_process or self.store.collective
        cleanup = tmp if self.accelerator.is_main_process else None  # the main process's directory
        if asynchronous:
            attempt = None
            if writes_here:
                attempt = lambda captured, pause: self._attempt(lambda: write(captured, pause), dest, cleanup)  # noqa: E731
            # Paced for half the time since the save before (not at all the first time): it ends before the next.
            now, before = time.perf_counter(), self._last_async_save_at
            self._last_async_save_at = now
            pace_for = 0.5 * (now - before) if before is not None else 0.0
            self._pending = PendingSave(previous_last, attempt, dest, cleanup, _what_is_intact(dest), pace_for)
            return dest
        try:
            self._on_main(lambda: write(lambda: None, 0.0), dest, cleanup=tmp, everywhere=self.store.collective)
        except CheckpointError:
            self.last = previous_last
            raise
        return dest

    def _prepare_slot(self, dest: Path) -> None:
        """Make the temporary directory of a `last` save (main process): the slot to rewrite,
        emptied but for what the store overwrites in place, or a new directory."""
        recycle = self._slot_to_rewrite()
        try:
            files.temporary_dir(dest, recycle=recycle, keep=self.store.REWRITTEN_IN_PLACE)
        finally:  # the slot rewritten no longer holds a checkpoint, whatever happens next
            self._good = [name for name in self._good if recycle is None or name != recycle.name]

    def _slot_to_rewrite(self) -> Path | None:
        """Where the next `last` is written: a slot without a complete checkpoint (a damaged one
        after a fallback), else the oldest of three complete ones, else a new directory."""
        for name in SLOTS:
            if (self.run_dir / name).exists() and name not in self._good:
                return self.run_dir / name
        return self.run_dir / self._good[-1] if len(self._good) == len(SLOTS) else None

    def wait(self, agree: bool = True) -> None:
        """Block until the asynchronous save in flight, if any, is on disk.

        Every process calls it at the same point: they all learn whether the save failed.
        `agree=False` only waits for this process's own write, without talking to the others
        (for the way out of a failure, where they may not all get here).

        Raises:
            CheckpointError: on every process, when the save failed; `last` is then the one before.
        """
        pending, self._pending = self._pending, None
        if pending is None:
            return
        error = pending.result()
        if not agree:
            return
        if error := first_error(self.accelerator, error):
            self.last = pending.previous_last
            raise CheckpointError(error) from pending.crash

    def _on_main(self, action, dest: Path, cleanup: Path | None = None, everywhere: bool = False) -> None:
        """Run a write on the main process (`everywhere`: on every process, a collective one whose
        `cleanup` is the main process's); every process learns whether it failed."""
        main = self.accelerator.is_main_process
        error = self._attempt(action, dest, cleanup if main else None) if main or everywhere else None
        # Also the barrier after each write: no process goes on before the checkpoint is complete.
        if error := first_error(self.accelerator, error):
            raise CheckpointError(error)

    @staticmethod
    def _attempt(action, dest: Path, cleanup: Path | None) -> str | None:
        try:
            action()
            return None
        except (OSError, CheckpointError) as err:
            if cleanup is not None:
                shutil.rmtree(cleanup, ignore_errors=True)
            return f"writing the checkpoint {dest} failed: {err}. {_what_is_intact(dest)}"

    def maybe_save_top(self, value: float, epoch: int, step: int, metrics: dict) -> bool:
        """Record an evaluation: write weights if it enters the top-k, refresh `best` if it improves.

        Returns whether it is the new best. Called on every process with the same gathered value,
        so every process takes the same decision.
        """
        self.wait()  # the index lists one save at a time
        candidate = Entry(RunDir.top_name(epoch, step), epoch, step, value)
        # A replayed evaluation (after a resume) replaces its own earlier checkpoint.
        others = [entry for entry in self.kept if entry.path != candidate.path]
        kept, evicted = select_top_k(others, candidate, self.options.save_top_k, self.options.mode)
        enters = candidate in kept
        improves = is_improvement(value, self.best.value if self.best else None, self.options.mode)
        weights = self.states[MODEL].state_dict() if enters or improves else None  # collective under FSDP/DeepSpeed
        meta = {**asdict(candidate), "monitor": self.options.monitor, "mode": self.options.mode, "metrics": metrics}
        # Each write is recorded (lists, then index) as soon as it is complete, so a write that
        # fails later leaves the index listing exactly what is on disk.
        if enters:
            dest = self.run_dir / candidate.path
            self._on_main(lambda: write_weights_dir(dest, weights, meta, self.states[MODEL]), dest, cleanup=RunDir.temporary(dest))
        self.kept = kept
        # The index first stops listing a checkpoint, then it is deleted. A candidate that did not
        # enter can still have a directory: its own, from before a crash, when this is a replay.
        stale = [e for e in evicted if e is not candidate] + ([] if enters else [candidate])
        self._on_main(lambda: self._forget(stale), self.run_dir / INDEX)
        if improves:
            dest = self.run_dir / BEST
            self._on_main(lambda: write_weights_dir(dest, weights, {**meta, "path": BEST}, self.states[MODEL]), dest, cleanup=RunDir.temporary(dest))
            self.best = Entry(BEST, epoch, step, value)
            self._on_main(self._write_index, self.run_dir / INDEX)
        return improves

    def _forget(self, entries: list[Entry]) -> None:
        self._write_index()
        for entry in entries:
            files.remove(self.run_dir / entry.path)

    def _index(self) -> dict:
        return {
            "monitor": self.options.monitor,
            "mode": self.options.mode,
            "last": self.last and asdict(self.last),
            "best": self.best and asdict(self.best),
            "top_k": [asdict(entry) for entry in self.kept],
        }

    def _write_index(self) -> None:
        self.run_dir.write_index(self._index())

    # ------------------------------------------------------------ resuming

    def _find_resumable(self) -> Path | None:
        resume = self.options.resume
        if resume is False:
            return None
        path = None if resume is True else Path(resume)
        found, skipped, self._good = self.run_dir.find_resumable(path)
        if path is not None:  # the run directory's own checkpoints, which the next saves must keep
            self._good = self.run_dir.find_resumable()[2]
        for reason in skipped:
            say(self.accelerator, f"resume: passing over a checkpoint: {reason}")
        if found is not None:
            return found
        if path is not None:
            raise ConfigError(f"experiment_options.resume: {path} is not a usable checkpoint ({'; '.join(skipped) or 'not found'}).")
        if self.run_dir.has_checkpoints():
            damaged = "; ".join(skipped) or f"there is no {', '.join(SLOTS[:-1])} or {SLOTS[-1]} checkpoint, only best/ or top/ weights"
            raise ConfigError(
                f"experiment_options.resume: run directory {self.run_dir.path} holds checkpoints, but none of them can be "
                f"resumed from: {damaged}. Nothing was changed. Restore a good copy of one of them, resume from a "
                "checkpoint elsewhere by setting experiment_options.resume to its path, or start afresh with "
                "experiment_options.resume false and experiment_options.overwrite true (which deletes them).")
        say(self.accelerator, f"resume: no checkpoint in {self.run_dir.path}; starting a fresh run.")
        return None

    def find_resumable(self, path: Path | None = None) -> tuple[Path | None, list[str]]:
        """The checkpoint to resume from and the reasons any candidate was passed over."""
        found, skipped, _ = self.run_dir.find_resumable(path)
        return found, skipped

    def load(self, directory: Path) -> dict:
        """Restore every registered state from a checkpoint, then reconcile the lists with the disk.

        Returns what the checkpoint's state.json held (the training state's keys at the top).
        """
        store = ShardedStore(self.accelerator) if is_sharded_checkpoint(directory) else FullStore(self.accelerator)
        saved = store.read(Path(directory), self.states)
        self._reconcile()
        return saved

    def _reconcile(self) -> None:
        """Make the lists and the index agree with the disk after a crash or a fallback.

        The resumed state lists the checkpoints as they were at that save; evaluations after it
        may have written or evicted checkpoints before the crash. The lists become what verifies
        on disk: listed entries that no longer verify are dropped, and whole top-k directories
        the state does not know are adopted (a replayed evaluation then replaces its own). Nothing
        is deleted here. The main process decides; every process gets its lists.
        """
        decision = None
        if self.accelerator.is_main_process:
            found, best = self.run_dir.verified_entries()
            kept = sorted(found, key=lambda e: (rank_key(e.value, self.options.mode), e.step))
            decision = ([asdict(e) for e in kept], best and asdict(best))
        kept, best = from_main(self.accelerator, decision)
        self.kept, self.best = [Entry(**e) for e in kept], best and Entry(**best)
        if self.accelerator.is_main_process:
            self._write_index()
        self.accelerator.wait_for_everyone()

    # The Checkpointer's own resumable state: its lists, saved in every `last`.

    def state_dict(self) -> dict:
        return {
            "kept": [asdict(e) for e in self.kept],
            "best": self.best and asdict(self.best),
            "last": self.last and asdict(self.last),
        }

    def load_state_dict(self, state: dict) -> None:
        self.kept = [Entry(**e) for e in state["kept"]]
        self.best = state["best"] and Entry(**state["best"])
        self.last = state["last"] and Entry(**state["last"])


def _what_is_intact(dest: Path) -> str:
    return f"The earlier checkpoints and {INDEX} are intact."
