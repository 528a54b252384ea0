"""Checkpoint policy and layout: `last` (full resumable state), `best`, and the top-k by the monitored metric.

Run directory layout::

    {ckpt_dir}/{title}/
        config.json          resolved config
        metrics.jsonl        every logged metric
        checkpoints.json     index of the kept checkpoints (paths relative to the run directory)
        last/                full state: model, optimizer, scheduler, RNG per process, trainer state
        previous/            the full state before `last`, a fallback (recycled by the next save)
        best/                weights of the best evaluation so far
        top/epoch003-step000120/   weights of each top-k evaluation

Every directory is sealed with a manifest (size and CRC32 of each file) and renamed into
place only when complete; an old checkpoint is deleted only after its replacement is in place.
The one exception is `previous`: a save of `last` overwrites its files in place (see
files.temporary_dir), so while a save is in flight, or after one failed, `last` is the only
full state, as it is before the second save. `last` itself is never touched until the new one
is complete.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Literal

import torch
from accelerate.utils import clean_state_dict_for_safetensors
from safetensors.torch import load_model

from ..early_stopping import is_improvement
from . import files, tensors
from .async_writer import PendingSave, Staging
from .files import CheckpointError
from .rng import capture_rng, restore_rng
from .top_k import Entry, rank_key, select_top_k

INDEX = "checkpoints.json"
WEIGHTS = "model.safetensors"
LAST_TENSOR_FILES = (WEIGHTS, "optimizer.safetensors")  # the bulk of `last`, rewritten in place by the next save


class Checkpointer:
    """Writes and reads the checkpoints of one run directory.

    Only the main process writes files; every process takes part in gathering the state and
    waits until a checkpoint is complete before training goes on.
    """

    def __init__(self, run_dir: Path, accelerator, monitor: str, mode: Literal["min", "max"], save_top_k: int):
        self.run_dir = Path(run_dir)
        self.accelerator = accelerator
        self.monitor, self.mode, self.save_top_k = monitor, mode, save_top_k
        self.kept: list[Entry] = []
        self.best: Entry | None = None
        self.last: Entry | None = None
        self._pending: PendingSave | None = None
        self._staging = Staging()  # host snapshot buffers of asynchronous saves
        self._last_async_save_at: float | None = None  # time.perf_counter() of the latest asynchronous save

    # ------------------------------------------------------------ saving

    def save_last(self, model, optimizer, scheduler, trainer_state: dict, *, asynchronous: bool = False) -> Path:
        """Write the full resumable state to `last`, keeping the old one as `previous`.

        The new state is written over the files of the old `previous`. With `asynchronous`, it is
        written on a background thread (see _last_writer) and `wait()`, which the next save calls,
        reports how it went. Until the new `last` is complete the old `last` is untouched, so a
        crash mid-write loses only this save.

        Raises:
            CheckpointError: on every process, when any write failed; `last`, the index and the
                lists are then as they were (`previous` is gone). Asynchronous: from `wait()`.
        """
        self.wait()
        dest = self.run_dir / "last"
        model_state = self.accelerator.get_state_dict(model)  # collective under FSDP/DeepSpeed
        tmp = dest.with_name(f".{dest.name}.tmp")
        # `previous` is about to be replaced: its files are overwritten in place with the new state.
        # Until this save is complete `last` is then the only checkpoint, as it is before the second.
        self._on_main(lambda: files.temporary_dir(dest, recycle=self.run_dir / "previous", keep=LAST_TENSOR_FILES), dest)
        self._everywhere(lambda: files.write_json(tmp / f"rng-rank{self.accelerator.process_index}.json", capture_rng(), indent=None), dest)
        previous_last = self.last
        # The state written below already names this checkpoint as `last`.
        self.last = Entry("last", trainer_state["epoch"], trainer_state["step"])
        write = None
        if self.accelerator.is_main_process:
            write = self._last_writer(tmp, dest, model, model_state, optimizer, scheduler, trainer_state, asynchronous)
        if asynchronous:
            attempt = write and (lambda captured, pause: self._attempt(lambda: write(captured, pause), dest, tmp))
            # Paced for half the time since the save before (not at all the first time): it ends before the next.
            now, before = time.perf_counter(), self._last_async_save_at
            self._last_async_save_at = now
            pace_for = 0.5 * (now - before) if before is not None else 0.0
            self._pending = PendingSave(previous_last, attempt, dest, tmp, _what_is_intact(dest), pace_for)
            return dest
        try:
            self._on_main(write and (lambda: write(lambda: None, 0.0)), dest, cleanup=tmp)
        except CheckpointError:
            self.last = previous_last
            raise
        return dest

    def _last_writer(self, tmp: Path, dest: Path, model, model_state, optimizer, scheduler, trainer_state: dict, asynchronous: bool):
        """The main process's write of `last`: a function of `captured`, called once the state is
        taken, and of the `pause` of its writes (tensors.write_tensors).

        Everything but the parameters and the optimizer's tensors is taken now: buffers (which a
        forward may update) are copied, the rest serialized. Those two change only in the
        optimizer step, so an asynchronous save copies them into its staging buffers on the
        save thread while the next forward and backward run, and `before_optimizer_step` holds
        the step until `captured`. The files are then written from the copies while training
        goes on.
        """
        weights = self._weights_to_write(model_state, to_host=not asynchronous)
        skeleton, optimizer_tensors = tensors.split_tensors(optimizer.state_dict(), to_host=not asynchronous)
        live = set()
        if asynchronous:
            unwrapped = self.accelerator.unwrap_model(model)
            parameters = {p.data_ptr() for p in unwrapped.parameters()}
            buffers = {b.data_ptr() for b in unwrapped.buffers()}
            # Parameters are copied on the save thread; a gathered copy (FSDP, ZeRO-3) is no live tensor.
            live = {name for name, tensor in weights.items() if tensor.data_ptr() in parameters}
            for name in weights.keys() - live:
                weights[name] = tensors.host_tensor(weights[name], copy=weights[name].data_ptr() in buffers)
        state = {**trainer_state, "scheduler": scheduler.state_dict(), "checkpoints": self.state_dict()}
        scaler = getattr(self.accelerator, "scaler", None)
        if scaler is not None:
            state["scaler"] = scaler.state_dict()
        state_text, index = files.to_json(state), self._index()

        def write(captured: Callable[[], None], pause: float | Callable[[], float]) -> None:
            nonlocal optimizer_tensors
            if asynchronous:
                weights.update(self._staging.copy({name: weights[name] for name in live}, "model"))
                optimizer_tensors = self._staging.copy(optimizer_tensors, "optimizer")
            captured()
            checksums = {WEIGHTS: tensors.write_tensors(tmp / WEIGHTS, weights, metadata={"format": "pt"}, pause=pause)}
            checksums |= tensors.write_state(skeleton, optimizer_tensors, tmp, "optimizer", pause=pause)
            (tmp / "state.json").write_text(state_text)
            # No read-back verify here: right after writing it would hash the page cache, not the
            # disk (0.2 s per 300 MB for nothing). Resume verifies every file against the manifest.
            files.seal(tmp, checksums)
            files.publish(tmp, dest, keep_previous=self.run_dir / "previous")
            files.atomic_write_json(self.run_dir / INDEX, index)

        return write

    def before_optimizer_step(self) -> None:
        """Hold the optimizer step until a save in flight has written what the step changes."""
        if self._pending is not None:
            self._pending.captured.wait()

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
        try:
            self._agree(error)
        except CheckpointError as err:
            self.last = pending.previous_last
            raise err from pending.crash

    def release_staging(self) -> None:
        """Free the host buffers of asynchronous saves (after the last save of a run)."""
        self._staging.release()

    def _on_main(self, action, dest: Path, cleanup: Path | None = None) -> None:
        """Run a write on the main process; every process learns whether it failed."""
        error = None
        if self.accelerator.is_main_process:
            error = self._attempt(action, dest, cleanup)
        self._agree(error)

    def _everywhere(self, action, dest: Path) -> None:
        self._agree(self._attempt(action, dest, None))

    @staticmethod
    def _attempt(action, dest: Path, cleanup: Path | None) -> str | None:
        try:
            action()
            return None
        except (OSError, CheckpointError) as err:
            if cleanup is not None:
                shutil.rmtree(cleanup, ignore_errors=True)
            return f"writing the checkpoint {dest} failed: {err}. {_what_is_intact(dest)}"

    def _agree(self, error: str | None) -> None:
        # Also the barrier after each write: no process goes on before the checkpoint is complete.
        errors = [error]
        if self.accelerator.num_processes > 1:
            from accelerate.utils import gather_object

            errors = gather_object([error])
        if failures := [e for e in errors if e]:
            raise CheckpointError(failures[0])

    def maybe_save_top(self, model, value: float, epoch: int, step: int, metrics: dict) -> bool:
        """Record an evaluation: write weights if it enters the top-k, refresh `best` if it improves.

        Returns whether it is the new best. Called on every process with the same gathered value,
        so every process takes the same decision.
        """
        self.wait()  # the index lists one save at a time
        candidate = Entry(f"top/epoch{epoch:03d}-step{step:07d}", epoch, step, value)
        # A replayed evaluation (after a resume) replaces its own earlier checkpoint.
        others = [entry for entry in self.kept if entry.path != candidate.path]
        kept, evicted = select_top_k(others, candidate, self.save_top_k, self.mode)
        enters = candidate in kept
        improves = is_improvement(value, self.best.value if self.best else None, self.mode)
        model_state = self.accelerator.get_state_dict(model) if enters or improves else None
        meta = {**asdict(candidate), "monitor": self.monitor, "mode": self.mode, "metrics": metrics}
        # Each write is recorded (lists, then index) as soon as it is complete, so a write that
        # fails later leaves the index listing exactly what is on disk.
        if enters:
            self._on_main(lambda: self._write_weights_dir(self.run_dir / candidate.path, model_state, meta),
                          self.run_dir / candidate.path, cleanup=self.run_dir / "top" / f".{Path(candidate.path).name}.tmp")
        self.kept = kept
        # The index first stops listing a checkpoint, then it is deleted. A candidate that did not
        # enter can still have a directory: its own, from before a crash, when this is a replay.
        stale = [e for e in evicted if e is not candidate] + ([] if enters else [candidate])
        self._on_main(lambda: self._forget(stale), self.run_dir / INDEX)
        if improves:
            self._on_main(lambda: self._write_weights_dir(self.run_dir / "best", model_state, {**meta, "path": "best"}),
                          self.run_dir / "best", cleanup=self.run_dir / ".best.tmp")
            self.best = Entry("best", epoch, step, value)
            self._on_main(self._write_index, self.run_dir / INDEX)
        return improves

    def _forget(self, entries: list[Entry]) -> None:
        self._write_index()
        for entry in entries:
            files.remove(self.run_dir / entry.path)

    def _write_weights_dir(self, dest: Path, model_state: dict, meta: dict) -> None:
        tmp = files.temporary_dir(dest)
        checksums = self._write_weights(tmp, model_state)
        files.write_json(tmp / "meta.json", meta)
        files.seal(tmp, checksums)
        files.publish(tmp, dest)

    @classmethod
    def _write_weights(cls, directory: Path, model_state: dict) -> dict[str, str]:
        """Write model.safetensors; its checksum by file name, for the seal."""
        return {WEIGHTS: tensors.write_tensors(directory / WEIGHTS, cls._weights_to_write(model_state), metadata={"format": "pt"})}

    @staticmethod
    def _weights_to_write(model_state: dict, to_host: bool = True) -> dict[str, torch.Tensor]:
        # Tied weights share storage; safetensors stores each storage once and load_model re-ties
        # them. The shared entries are dropped before any copy, which would untie them.
        state = clean_state_dict_for_safetensors(dict(model_state))
        return {key: tensors.host_tensor(value) if to_host else value.detach() for key, value in state.items()}

    def _index(self) -> dict:
        return {
            "monitor": self.monitor,
            "mode": self.mode,
            "last": self.last and asdict(self.last),
            "best": self.best and asdict(self.best),
            "top_k": [asdict(entry) for entry in self.kept],
        }

    def _write_index(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        files.atomic_write_json(self.run_dir / INDEX, self._index())

    # ------------------------------------------------------------ resuming

    def find_resumable(self, path: Path | None = None) -> tuple[Path | None, list[str]]:
        """The checkpoint to resume from and the reasons any newer candidate was passed over.

        With no path: the newest of `last` and `previous` whose manifest verifies.
        """
        candidates = [Path(path)] if path else [self.run_dir / "last", self.run_dir / "previous"]
        usable, skipped = [], []
        for candidate in candidates:
            if not candidate.exists():
                continue
            if reason := files.verify(candidate):
                skipped.append(reason)
                continue
            usable.append((files.read_json(candidate / "state.json")["step"], candidate))
        return (max(usable)[1] if usable else None), skipped

    def load(self, directory: Path, model, optimizer, scheduler) -> dict:
        """Restore model, optimizer, scheduler, scaler, this process's RNG and the checkpoint lists.

        Returns the trainer state saved with it (step, epoch, position, early stopping, ...).
        """
        directory = Path(directory)
        missing, unexpected = load_model(self.accelerator.unwrap_model(model), str(directory / WEIGHTS), strict=False)
        if missing or unexpected:
            raise CheckpointError(
                f"{directory / WEIGHTS} does not fit the model: missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}."
            )
        optimizer.load_state_dict(tensors.load_state(directory, "optimizer"))
        state = files.read_json(directory / "state.json")
        scheduler.load_state_dict(state.pop("scheduler"))
        scaler = getattr(self.accelerator, "scaler", None)
        if scaler is not None and "scaler" in state:
            scaler.load_state_dict(state.pop("scaler"))
        self.load_state_dict(state.pop("checkpoints"))
        self._reconcile()
        rng_file = directory / f"rng-rank{self.accelerator.process_index}.json"
        if rng_file.is_file():
            restore_rng(files.read_json(rng_file))
        return state

    def _reconcile(self) -> None:
        """Make the lists and the index agree with the disk after a crash or a fallback.

        The resumed state lists the checkpoints as they were at that save; evaluations after it
        may have written or evicted checkpoints before the crash. The lists become what verifies
        on disk: listed entries that no longer verify are dropped, and whole top-k directories
        the state does not know are adopted (a replayed evaluation then replaces its own). Nothing
        is deleted here. The main process decides; every process gets its lists.
        """
        decision = [None]
        if self.accelerator.is_main_process:
            found = {}
            for meta_file in sorted(self.run_dir.glob("top/*/meta.json")):
                if files.verify(meta_file.parent) is None:
                    meta = files.read_json(meta_file)
                    found[meta["path"]] = Entry(meta["path"], meta["epoch"], meta["step"], meta["value"])
            kept = sorted(found.values(), key=lambda e: (rank_key(e.value, self.mode), e.step))
            best = None
            if files.verify(self.run_dir / "best") is None:
                meta = files.read_json(self.run_dir / "best" / "meta.json")
                best = Entry("best", meta["epoch"], meta["step"], meta["value"])
            decision = [([asdict(e) for e in kept], best and asdict(best))]
        if self.accelerator.num_processes > 1:
            from accelerate.utils import broadcast_object_list

            broadcast_object_list(decision)
        kept, best = decision[0]
        self.kept, self.best = [Entry(**e) for e in kept], best and Entry(**best)
        if self.accelerator.is_main_process:
            self._write_index()
        self.accelerator.wait_for_everyone()

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

    def clear(self) -> None:
        """Remove the checkpoints and metrics of an earlier run (only when the config says overwrite)."""
        if self.accelerator.is_main_process:
            for name in ("last", "previous", "best", "top"):
                files.remove(self.run_dir / name)
            (self.run_dir / INDEX).unlink(missing_ok=True)
            (self.run_dir / "metrics.jsonl").unlink(missing_ok=True)  # a fresh run's curve starts empty
        self.accelerator.wait_for_everyone()

    def has_checkpoints(self) -> bool:
        return any((self.run_dir / name).exists() for name in ("last", "previous", "best", "top", INDEX))


def _what_is_intact(dest: Path) -> str:
    if dest.name == "last":  # a save of `last` writes over `previous` (files.temporary_dir)
        return f"The earlier checkpoints and {INDEX} are intact, but for `previous`, which it was rewriting."
    return f"The earlier checkpoints and {INDEX} are intact."
